/*
 * The TCP proxy in-process, with real sockets but an injected clock: the
 * 10-second INBOUND_TCP_OK deadline and the idle deadline are stepped
 * through with wheel.run(), never slept through.  And a leak check: many
 * sequential TCP queries through a real mname backend leave no proxy, no
 * timeout, no handle and no heap growth behind.
 */

import type net from 'node:net';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import t from 'tap';
import { FRAME_OUTBOUND_UDP } from '../src/protocol.js';
import { makeLogger } from '../src/log.js';
import { TCP_OK_DEADLINE_SECS } from '../src/tcp_listener.js';
import { INBOUND_TCP_OK_FRAME, SERVER_HEARTBEAT_FRAME } from './support/backend_frames.js';
import { tcpQuery } from './support/dns_client.js';
import { encodeAnswer, encodeQuery, framed } from './support/dns_messages.js';
import { makeSocketDir, startBackend } from './support/fleet.js';
import { closed, connect, fakeRig, neverAnswers, rig, settle } from './support/tcp_rig.js';
import { waitFor } from './support/wait.js';

t.test('no INBOUND_TCP_OK within 10 s: the client is closed and the backend faulted', async (t) => {
	const env = await fakeRig(t, neverAnswers);
	const { be, fake } = env;
	const client = await connect(t, env.port, '127.0.0.150');
	await waitFor(() => fake.inboundTcp.length === 1, 2000, 10, 'INBOUND_TCP at the backend');
	const inbound = fake.inboundTcp[0];
	t.equal(inbound.addr, 0x7f000096, 'INBOUND_TCP carries the client address');
	t.equal(inbound.port, client.localPort, 'and its port');
	env.advance(TCP_OK_DEADLINE_SECS - 1);
	t.equal(env.tcp.size, 1, 'still waiting at 9 s');
	t.ok(be.ok, 'backend still ok at 9 s');
	env.advance(1);
	t.equal(be.state, 'waiting', 'backend faulted at 10 s');
	t.equal(env.tcp.stats.okTimeouts, 1);
	await closed(client);
	t.equal(env.tcp.size, 0, 'the proxy is released');
});

t.test('a client that hangs up before a whole query is closed at once; the backend is not faulted', async (t) => {
	const env = await fakeRig(t, neverAnswers);
	const { be, fake } = env;
	const client = await connect(t, env.port, '127.0.0.153');
	await waitFor(() => fake.inboundTcp.length === 1, 2000, 10, 'INBOUND_TCP at the backend');
	client.sock.end(framed(encodeQuery('half.example', 'A', 7)).subarray(0, 9));
	await waitFor(() => env.tcp.size === 0, 2000, 10, 'the slot is given back without waiting for the deadline');
	t.equal(env.tcp.stats.abandoned, 1, 'counted as abandoned');
	env.advance(TCP_OK_DEADLINE_SECS);
	t.ok(be.ok, 'the backend is not faulted for it');
	t.equal(env.tcp.stats.okTimeouts, 0);
});

t.test('a query half-closed before INBOUND_TCP_OK reaches the backend when it accepts, and is answered', async (t) => {
	let session: net.Socket | null = null;
	const got: Buffer[] = [];
	let backEnded = false;
	const env = await fakeRig(t, (sock) => {
		session = sock;
		sock.on('data', (d: Buffer) => got.push(d));
		sock.on('end', () => {
			backEnded = true;
		});
	});
	const client = await connect(t, env.port, '127.0.0.154');
	const query = framed(encodeQuery('early.example', 'A', 7));
	client.sock.end(query);
	await waitFor(() => session !== null, 2000, 10, 'INBOUND_TCP at the backend');
	await settle();
	t.equal(env.tcp.size, 1, 'kept while the backend has not answered: the client may be waiting');
	const back = session as unknown as net.Socket;
	back.write(INBOUND_TCP_OK_FRAME);
	await waitFor(() => backEnded, 2000, 10, 'the backend sees the client\'s FIN');
	t.same(Buffer.concat(got), query, 'after the OK the backend gets the query, byte for byte');
	back.end(Buffer.from([0x00, 0x02, 0xab, 0xcd]));
	await client.until(() => client.ended, 10_000, 'the end');
	t.same(client.bytes(), Buffer.from([0x00, 0x02, 0xab, 0xcd]), 'and the client the answer, then the end');
	t.equal(env.tcp.stats.abandoned, 0);
});

t.test('at the cap, a connection whose client half-closed before the OK makes room for a new one', async (t) => {
	const env = await fakeRig(t, neverAnswers, { maxConnections: 2 });
	const waiting = await connect(t, env.port, '127.0.0.155');
	const gone = await connect(t, env.port, '127.0.0.156');
	waiting.sock.write(framed(encodeQuery('waiting.example', 'A', 7)));
	gone.sock.end(framed(encodeQuery('gone.example', 'A', 7)));
	await waitFor(() => env.tcp.size === 2, 2000, 10, 'two connections held');
	await settle();
	const newcomer = await connect(t, env.port, '127.0.0.157');
	await closed(gone);
	await settle();
	t.equal(env.tcp.size, 2, 'the newcomer took the place of the one whose client had gone');
	t.equal(env.tcp.stats.overCap, 0, 'nobody refused');
	t.equal(env.tcp.stats.abandoned, 1);
	t.notOk(waiting.sock.destroyed, 'the client still waiting keeps its connection');
	await connect(t, env.port, '127.0.0.158');
	await closed(newcomer);
	t.equal(env.tcp.stats.evictedIdle, 1, 'with nobody gone, the idle connection (no query) makes room next');
	t.equal(env.tcp.stats.overCap, 0, 'and still nobody is refused');
	t.notOk(waiting.sock.destroyed, 'the one with a query outstanding is kept');
});

t.test('the idle deadline counts from the last whole message; a whole query postpones it', async (t) => {
	const env = await fakeRig(t, (sock) => sock.write(INBOUND_TCP_OK_FRAME));
	const { be } = env;
	const quiet = await connect(t, env.port, '127.0.0.151');
	const chatty = await connect(t, env.port, '127.0.0.152');
	await waitFor(() => env.tcp.stats.established === 2, 2000, 10, 'both sessions flowing');
	env.advance(5);
	chatty.send('chatty.example', 'A', 52); /* a whole query at 5 s (never answered) */
	/* Let the bytes reach the proxy before the clock moves on. */
	await settle();
	env.advance(4);
	t.equal(env.tcp.size, 2, 'both open at 9 s');
	env.advance(1);
	await closed(quiet);
	t.equal(env.tcp.stats.idleClosed, 1, 'the silent one closed at 10 s');
	t.notOk(chatty.sock.destroyed, 'the one that sent a query at 5 s is still open');
	env.advance(5);
	await closed(chatty);
	t.equal(env.tcp.stats.idleClosed, 2, 'closed 10 s after its last whole message');
	t.ok(be.ok, 'idle clients never fault the backend');
	t.equal(env.tcp.size, 0);
});

/* An answer as a backend would send it over TCP: length prefix, then the message. */
const framedAnswer = (id: number, label: string): Buffer =>
	framed(encodeAnswer(id, { type: 'TXT', name: 'split.example', class: 'IN' }, label));

t.test('an INBOUND_TCP_OK split 2+2, answer bytes after it: the client gets exactly the answer', async (t) => {
	const answer = framedAnswer(4242, 'split');
	const env = await fakeRig(t, (sock) => {
		sock.write(INBOUND_TCP_OK_FRAME.subarray(0, 2));
		/* Later, so that the two halves reach bbal in separate reads. */
		setTimeout(() => sock.write(Buffer.concat([INBOUND_TCP_OK_FRAME.subarray(2), answer])), 50);
	});
	const client = await connect(t, env.port, '127.0.0.159');
	client.send('split.example', 'TXT', 4242);
	await client.until(() => client.received >= answer.length || client.sock.destroyed, 2000, 'the answer');
	await settle();
	t.same(client.bytes(), answer, 'the answer, byte for byte: nothing of the OK, nothing lost');
	t.equal(env.tcp.stats.established, 1, 'the session flowed');
	t.equal(env.tcp.stats.badFirstFrame, 0, 'the reader stopped at the OK: nothing after it was read as a frame');
	client.sock.destroy();
});

t.test('a wrong first frame closes the client without faulting the backend, as soon as its header is in', async (t) => {
	const wrong: Array<[string, Buffer]> = [
		['another known frame', SERVER_HEARTBEAT_FRAME],
		['an unknown type', Buffer.from([0xe7, 0x03, 0x00, 0x00])],
		/* A UDP frame's header announcing a payload: refused without waiting for the payload. */
		['an OUTBOUND_UDP header', Buffer.from([FRAME_OUTBOUND_UDP & 255, FRAME_OUTBOUND_UDP >> 8, 0, 0,
			1, 0, 0, 127, 53, 0, 0, 0, 5, 0, 0, 0])],
	];
	let reply = wrong[0][1];
	const env = await fakeRig(t, (sock) => sock.write(reply));
	const { be } = env;
	for (const [i, [what, frame]] of wrong.entries()) {
		reply = frame;
		const client = await connect(t, env.port, `127.0.0.${170 + i}`);
		client.send('wrong.example', 'A', 7);
		await closed(client);
		t.equal(env.tcp.stats.badFirstFrame, i + 1, `${what}: counted`);
	}
	t.ok(be.ok, 'the backend is never faulted for it');
	t.equal(env.tcp.stats.okTimeouts, 0);
	await waitFor(() => env.tcp.size === 0, 2000, 10, 'every proxy released');
});

t.test('TCP log lines name the backend by be_id and be_path; trace shows the lifecycle', async (t) => {
	const records: Array<Record<string, unknown>> = [];
	const log = makeLogger('trace', { write: (line: string) => { records.push(JSON.parse(line) as Record<string, unknown>); } });
	const answer = framedAnswer(99, 'logged');
	const env = await fakeRig(t, (sock) => {
		sock.write(INBOUND_TCP_OK_FRAME);
		sock.on('end', () => sock.end(answer));
	}, { log });
	const { sockPath } = env;
	const client = await connect(t, env.port, '127.0.0.160');
	const localPort = client.localPort;
	await waitFor(() => env.tcp.stats.established === 1, 2000, 10, 'the session flows');
	client.sock.end(framed(encodeQuery('logged.example', 'TXT', 99)));
	await closed(client);
	await waitFor(() => env.tcp.size === 0, 2000, 10, 'the proxy released');

	const tcpLines = records.filter((r) => r.conn_id !== undefined);
	const accepted = tcpLines.find((r) => r.msg === 'tcp connection accepted');
	t.equal(accepted?.be_id, 5301, 'a TCP line carries be_id, so bunyan -c \'this.be_id === 5301\' finds it');
	t.equal(accepted?.be_path, sockPath, 'and be_path');
	t.equal(accepted?.remote_ip, '127.0.0.160', 'and the client\'s address');
	t.equal(accepted?.remote_port, localPort, 'and port');
	t.ok(tcpLines.length >= 3, `${tcpLines.length} TCP lines`);
	t.same(tcpLines.filter((r) => r.be_id !== 5301 || r.be_path !== sockPath || 'backend' in r), [],
		'every one of them names the backend the same way, and none under the old `backend` key');

	type State = { name: string; client?: string; front?: string; back?: string; open?: string; paused?: string | null };
	const steps = tcpLines.filter((r) => r.msg === 'tcp proxy state').map((r) => r.to as State);
	t.same(tcpLines.find((r) => r.msg === 'tcp proxy state')?.from,
		{ name: 'connecting', client: 'reading' }, 'born connecting, reading the client');
	const names = steps.map((s) => s.name).filter((n, i, all) => i === 0 || all[i - 1] !== n);
	t.same(names, ['awaiting OK', 'flowing', 'closing', 'closed'], 'then each state in turn');
	t.same(steps.filter((s) => s.name === 'flowing').at(-1), { name: 'flowing', front: 'ended', back: 'ended', paused: null },
		'both FINs passed on before a socket closed');
});

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

t.test('sequential TCP queries leave no proxy, timeout, handle or heap growth behind', async (t) => {
	const n = Number(process.env.BBAL_TCP_LEAK_QUERIES ?? 2000);
	const dir = await makeSocketDir(t);
	await startBackend(t, dir, '5301');
	const env = await rig(t, dir);
	const { be } = env;
	const run = async (count: number, base: number): Promise<void> => {
		for (let i = 0; i < count; i++) {
			const id = (base + i) & 0xffff;
			/* Fifty sources, all seen in the warm-up: remotes do not grow. */
			const got = (await tcpQuery({ port: env.port, source: `127.0.1.${1 + (i % 50)}`, name: 'leak.example', type: 'A', id,
				halfClose: true })).packet.id;
			if (got !== id) {
				t.fail(`query ${i}: answer id ${got}, expected ${id}`);
				return;
			}
		}
	};
	await run(200, 0);
	await waitFor(() => env.tcp.size === 0, 2000, 10, 'warm-up proxies released');
	gc();
	const heapBefore = process.memoryUsage().heapUsed;
	const handlesBefore = process.getActiveResourcesInfo().length;
	const timeoutsBefore = env.wheel.list().length;
	await run(n, 1000);
	await waitFor(() => env.tcp.size === 0, 2000, 10, 'all proxies released');
	await new Promise((resolve) => setImmediate(resolve));
	gc();
	const grownKb = Math.round((process.memoryUsage().heapUsed - heapBefore) / 1024);
	t.equal(env.tcp.stats.established, 200 + n, 'every query went through a session');
	t.equal(be.stats.tcp, 200 + n, 'counted on the backend');
	t.equal(env.wheel.list().length, timeoutsBefore, 'no timeout left armed');
	t.ok(process.getActiveResourcesInfo().length <= handlesBefore, 'no handle left open');
	t.ok(grownKb < 2048, `heap grew ${grownKb} kB over ${n} connections`);
});
