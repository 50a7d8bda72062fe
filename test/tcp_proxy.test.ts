/*
 * The TCP proxy in-process, with real sockets but an injected clock: the
 * 10-second INBOUND_TCP_OK deadline and the idle deadline are stepped
 * through with wheel.run(), never slept through.  And a leak check: many
 * sequential TCP queries through a real mname backend leave no proxy, no
 * timeout, no handle and no heap growth behind.
 */

import net from 'node:net';
import path from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import t, { type Test } from 'tap';
import pino, { type Logger } from 'pino';
import dnsPacket from 'dns-packet';
import { type Backend, Backends } from '../src/backends.js';
import { FRAME_CLIENT_HEARTBEAT, FRAME_CLIENT_HELLO, FRAME_INBOUND_TCP, FRAME_OUTBOUND_UDP } from '../src/protocol.js';
import { makeLogger } from '../src/log.js';
import { Remotes } from '../src/remotes.js';
import { TcpListener, TCP_OK_DEADLINE_SECS } from '../src/tcp_proxy.js';
import { TimeoutWheel } from '../src/timeouts.js';
import { INBOUND_TCP_OK_FRAME, SERVER_HEARTBEAT_FRAME, SERVER_HELLO_FRAME } from './support/backend_frames.js';
import { encodeQuery, framed } from './support/dns_messages.js';
import { makeSocketDir, startBackend } from './support/fleet.js';
import { freePort } from './support/ports.js';
import { waitFor } from './support/wait.js';

/* Backends, remotes and a TCP listener on 127.0.0.1, driven by `now`. */
async function rig(t: Test, dir: string, idleTimeoutSecs = 10, maxConnections = 512,
	log: Logger = pino({ level: 'silent' })) {
	const clock = { now: 10_000_000 };
	const wheel = new TimeoutWheel(() => clock.now);
	const backends = new Backends({ socketDir: dir, log, wheel, onOutboundUdp: () => {} });
	const remotes = new Remotes({ log, backends, wheel });
	const tcp = new TcpListener({ remotes, backends, wheel, log, idleTimeoutSecs, maxConnections });
	const port = await freePort();
	await tcp.listen('127.0.0.1', port);
	t.teardown(async () => {
		await tcp.close(0);
		backends.close();
	});
	return {
		wheel, backends, remotes, tcp, port,
		advance(secs: number): void {
			clock.now += secs * 1000;
			wheel.run(clock.now);
		},
	};
}

/*
 * A backend that says hello and answers heartbeats on its control session,
 * and treats INBOUND_TCP as `onTcp` says.
 */
async function fakeBackend(t: Test, sockPath: string, onTcp: (sock: net.Socket, frame: Buffer) => void) {
	const tcpFrames: Buffer[] = [];
	const conns = new Set<net.Socket>();
	const srv = net.createServer({ allowHalfOpen: true }, (sock) => {
		conns.add(sock);
		sock.on('error', () => {});
		let first = true;
		sock.on('data', (d: Buffer) => {
			if (first && d.readUInt32LE(0) === FRAME_INBOUND_TCP) {
				first = false;
				tcpFrames.push(d.subarray(0, 12));
				onTcp(sock, d);
				return;
			}
			first = false;
			for (let off = 0; off + 4 <= d.length; off += 4) {
				const type = d.readUInt32LE(off);
				if (type === FRAME_CLIENT_HELLO) {
					sock.write(SERVER_HELLO_FRAME);
				} else if (type === FRAME_CLIENT_HEARTBEAT) {
					sock.write(SERVER_HEARTBEAT_FRAME);
				}
			}
		});
	});
	await new Promise<void>((resolve) => srv.listen(sockPath, resolve));
	t.teardown(() => {
		for (const c of conns) {
			c.destroy();
		}
		srv.close();
	});
	return { tcpFrames };
}

function connect(port: number, localAddress: string): Promise<net.Socket> {
	return new Promise((resolve, reject) => {
		const s = net.connect({ host: '127.0.0.1', port, localAddress }, () => resolve(s));
		s.once('error', reject);
	});
}

const closed = (s: net.Socket): Promise<void> => new Promise((resolve) => {
	if (s.destroyed) {
		resolve();
	} else {
		s.once('close', () => resolve());
	}
});

t.test('no INBOUND_TCP_OK within 10 s: the client is closed and the backend faulted', async (t) => {
	const dir = await makeSocketDir(t);
	const fake = await fakeBackend(t, path.join(dir, '5301'), () => { /* never answers */ });
	const env = await rig(t, dir);
	const be = env.backends.trackAndConnect('5301') as Backend;
	await waitFor(() => be.ok, 2000, 10, 'backend ok');
	const client = await connect(env.port, '127.0.0.150');
	client.on('error', () => {});
	await waitFor(() => fake.tcpFrames.length === 1, 2000, 10, 'INBOUND_TCP at the backend');
	const frame = fake.tcpFrames[0];
	t.equal(frame.readUInt32LE(4), 0x7f000096, 'INBOUND_TCP carries the client address');
	t.equal(frame.readUInt32LE(8), client.localPort, 'and its port');
	env.advance(TCP_OK_DEADLINE_SECS - 1);
	t.equal(env.tcp.size, 1, 'still waiting at 9 s');
	t.ok(be.ok, 'backend still ok at 9 s');
	env.advance(1);
	t.equal(be.state, 'waiting', 'backend faulted at 10 s');
	t.equal(env.tcp.stats.okTimeouts, 1);
	await closed(client);
	t.equal(env.tcp.size, 0, 'the proxy is released');
});

const settle = (): Promise<void> => new Promise((resolve) => setTimeout(resolve, 50));

t.test('a client that hangs up before a whole query is closed at once; the backend is not faulted', async (t) => {
	const dir = await makeSocketDir(t);
	const fake = await fakeBackend(t, path.join(dir, '5301'), () => { /* never answers */ });
	const env = await rig(t, dir);
	const be = env.backends.trackAndConnect('5301') as Backend;
	await waitFor(() => be.ok, 2000, 10, 'backend ok');
	const client = await connect(env.port, '127.0.0.153');
	client.on('error', () => {});
	await waitFor(() => fake.tcpFrames.length === 1, 2000, 10, 'INBOUND_TCP at the backend');
	client.end(framed(encodeQuery('half.example', 'A', 7)).subarray(0, 9));
	await waitFor(() => env.tcp.size === 0, 2000, 10, 'the slot is given back without waiting for the deadline');
	t.equal(env.tcp.stats.abandoned, 1, 'counted as abandoned');
	env.advance(TCP_OK_DEADLINE_SECS);
	t.ok(be.ok, 'the backend is not faulted for it');
	t.equal(env.tcp.stats.okTimeouts, 0);
});

t.test('a query half-closed before INBOUND_TCP_OK reaches the backend when it accepts, and is answered', async (t) => {
	const dir = await makeSocketDir(t);
	let session: net.Socket | null = null;
	const got: Buffer[] = [];
	let backEnded = false;
	await fakeBackend(t, path.join(dir, '5301'), (sock) => {
		session = sock;
		sock.on('data', (d: Buffer) => got.push(d));
		sock.on('end', () => {
			backEnded = true;
		});
	});
	const env = await rig(t, dir);
	const be = env.backends.trackAndConnect('5301') as Backend;
	await waitFor(() => be.ok, 2000, 10, 'backend ok');
	const client = await connect(env.port, '127.0.0.154');
	const answer: Buffer[] = [];
	client.on('data', (d: Buffer) => answer.push(d));
	const clientEnded = new Promise<void>((resolve) => client.on('end', resolve));
	const query = framed(encodeQuery('early.example', 'A', 7));
	client.end(query);
	await waitFor(() => session !== null, 2000, 10, 'INBOUND_TCP at the backend');
	await settle();
	t.equal(env.tcp.size, 1, 'kept while the backend has not answered: the client may be waiting');
	const back = session as unknown as net.Socket;
	back.write(INBOUND_TCP_OK_FRAME);
	await waitFor(() => backEnded, 2000, 10, 'the backend sees the client\'s FIN');
	t.same(Buffer.concat(got), query, 'after the OK the backend gets the query, byte for byte');
	back.end(Buffer.from([0x00, 0x02, 0xab, 0xcd]));
	await clientEnded;
	t.same(Buffer.concat(answer), Buffer.from([0x00, 0x02, 0xab, 0xcd]), 'and the client the answer, then the end');
	t.equal(env.tcp.stats.abandoned, 0);
});

t.test('at the cap, a connection whose client half-closed before the OK makes room for a new one', async (t) => {
	const dir = await makeSocketDir(t);
	await fakeBackend(t, path.join(dir, '5301'), () => { /* never answers */ });
	const env = await rig(t, dir, 10, 2);
	const be = env.backends.trackAndConnect('5301') as Backend;
	await waitFor(() => be.ok, 2000, 10, 'backend ok');
	const waiting = await connect(env.port, '127.0.0.155');
	const gone = await connect(env.port, '127.0.0.156');
	waiting.on('error', () => {});
	gone.on('error', () => {});
	waiting.write(framed(encodeQuery('waiting.example', 'A', 7)));
	gone.end(framed(encodeQuery('gone.example', 'A', 7)));
	await waitFor(() => env.tcp.size === 2, 2000, 10, 'two connections held');
	await settle();
	const fresh = await connect(env.port, '127.0.0.157');
	fresh.on('error', () => {});
	await closed(gone);
	await settle();
	t.equal(env.tcp.size, 2, 'the newcomer took the place of the one whose client had gone');
	t.equal(env.tcp.stats.overCap, 0, 'nobody refused');
	t.equal(env.tcp.stats.abandoned, 1);
	t.notOk(waiting.destroyed, 'the client still waiting keeps its connection');
	const refused = await connect(env.port, '127.0.0.158');
	await closed(refused);
	t.equal(env.tcp.stats.overCap, 1, 'with nobody gone, the cap refuses as before');
});

t.test('the idle deadline closes a silent connection; activity postpones it', async (t) => {
	const dir = await makeSocketDir(t);
	await fakeBackend(t, path.join(dir, '5301'), (sock) => sock.write(INBOUND_TCP_OK_FRAME));
	const env = await rig(t, dir, 10);
	const be = env.backends.trackAndConnect('5301') as Backend;
	await waitFor(() => be.ok, 2000, 10, 'backend ok');
	const quiet = await connect(env.port, '127.0.0.151');
	const chatty = await connect(env.port, '127.0.0.152');
	quiet.on('error', () => {});
	chatty.on('error', () => {});
	await waitFor(() => env.tcp.stats.established === 2, 2000, 10, 'both sessions flowing');
	quiet.write(Buffer.from([0x00])); /* half a length prefix, then nothing */
	await settle();
	env.advance(5);
	chatty.write(Buffer.from([0x00, 0x20])); /* a length prefix: still a well-formed stream */
	/* Let the bytes reach the proxy before the clock moves on. */
	await settle();
	env.advance(4);
	t.equal(env.tcp.size, 2, 'both open at 9 s');
	env.advance(1);
	await closed(quiet);
	t.equal(env.tcp.stats.idleClosed, 1, 'the silent one closed at 10 s');
	t.notOk(chatty.destroyed, 'the one that spoke at 5 s is still open');
	env.advance(5);
	await closed(chatty);
	t.equal(env.tcp.stats.idleClosed, 2, 'closed 10 s after its last byte');
	t.ok(be.ok, 'idle clients never fault the backend');
	t.equal(env.tcp.size, 0);
});

/* An answer as a backend would send it over TCP: length prefix, then the message. */
function framedAnswer(id: number, data: string): Buffer {
	return framed(dnsPacket.encode({
		type: 'response', id, flags: dnsPacket.AUTHORITATIVE_ANSWER,
		questions: [{ type: 'TXT', name: 'split.example', class: 'IN' }],
		answers: [{ type: 'TXT', name: 'split.example', ttl: 0, data }],
	}));
}

t.test('an INBOUND_TCP_OK split 2+2, answer bytes after it: the client gets exactly the answer', async (t) => {
	const dir = await makeSocketDir(t);
	const answer = framedAnswer(4242, 'be=split');
	await fakeBackend(t, path.join(dir, '5301'), (sock) => {
		sock.write(INBOUND_TCP_OK_FRAME.subarray(0, 2));
		/* Later, so that the two halves reach bbal in separate reads. */
		setTimeout(() => sock.write(Buffer.concat([INBOUND_TCP_OK_FRAME.subarray(2), answer])), 50);
	});
	const env = await rig(t, dir);
	const be = env.backends.trackAndConnect('5301') as Backend;
	await waitFor(() => be.ok, 2000, 10, 'backend ok');
	const client = await connect(env.port, '127.0.0.159');
	client.on('error', () => {});
	const got: Buffer[] = [];
	client.on('data', (d: Buffer) => got.push(d));
	client.write(framed(encodeQuery('split.example', 'TXT', 4242)));
	await waitFor(() => Buffer.concat(got).length >= answer.length || client.destroyed, 2000, 10, 'the answer');
	await settle();
	t.same(Buffer.concat(got), answer, 'the answer, byte for byte: nothing of the OK, nothing lost');
	t.equal(env.tcp.stats.established, 1, 'the session flowed');
	t.equal(env.tcp.stats.badFirstFrame, 0, 'the reader stopped at the OK: nothing after it was read as a frame');
	client.destroy();
});

t.test('a wrong first frame closes the client without faulting the backend, as soon as its header is in', async (t) => {
	const wrong: Array<[string, Buffer]> = [
		['another known frame', SERVER_HEARTBEAT_FRAME],
		['an unknown type', Buffer.from([0xe7, 0x03, 0x00, 0x00])],
		/* A UDP frame's header announcing a payload: refused without waiting for the payload. */
		['an OUTBOUND_UDP header', Buffer.from([FRAME_OUTBOUND_UDP & 255, FRAME_OUTBOUND_UDP >> 8, 0, 0,
			1, 0, 0, 127, 53, 0, 0, 0, 5, 0, 0, 0])],
	];
	const dir = await makeSocketDir(t);
	let reply = wrong[0][1];
	await fakeBackend(t, path.join(dir, '5301'), (sock) => sock.write(reply));
	const env = await rig(t, dir);
	const be = env.backends.trackAndConnect('5301') as Backend;
	await waitFor(() => be.ok, 2000, 10, 'backend ok');
	for (const [i, [what, frame]] of wrong.entries()) {
		reply = frame;
		const client = await connect(env.port, `127.0.0.${170 + i}`);
		client.on('error', () => {});
		client.write(framed(encodeQuery('wrong.example', 'A', 7)));
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
	const dir = await makeSocketDir(t);
	const sockPath = path.join(dir, '5301');
	const answer = framedAnswer(99, 'be=logged');
	await fakeBackend(t, sockPath, (sock) => {
		sock.write(INBOUND_TCP_OK_FRAME);
		sock.on('end', () => sock.end(answer));
	});
	const env = await rig(t, dir, 10, 512, log);
	const be = env.backends.trackAndConnect('5301') as Backend;
	await waitFor(() => be.ok, 2000, 10, 'backend ok');
	const client = await connect(env.port, '127.0.0.160');
	const localPort = client.localPort;
	client.on('error', () => {});
	client.resume();
	await waitFor(() => env.tcp.stats.established === 1, 2000, 10, 'the session flows');
	client.end(framed(encodeQuery('logged.example', 'TXT', 99)));
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

	type State = { name: string; client?: string; front?: string; back?: string; open?: string };
	const steps = tcpLines.filter((r) => r.msg === 'tcp proxy state').map((r) => r.to as State);
	t.same(tcpLines.find((r) => r.msg === 'tcp proxy state')?.from,
		{ name: 'connecting', client: 'reading' }, 'born connecting, reading the client');
	const names = steps.map((s) => s.name).filter((n, i, all) => i === 0 || all[i - 1] !== n);
	t.same(names, ['awaiting OK', 'flowing', 'closing', 'closed'], 'then each state in turn');
	t.same(steps.filter((s) => s.name === 'flowing').at(-1), { name: 'flowing', front: 'ended', back: 'ended' },
		'both FINs passed on before a socket closed');
});

/* One TCP query on a fresh connection; resolves with the answer's id. */
function tcpQuery(port: number, localAddress: string, id: number): Promise<number> {
	return new Promise((resolve, reject) => {
		const s = net.connect({ host: '127.0.0.1', port, localAddress },
			() => s.end(framed(encodeQuery('leak.example', 'A', id))));
		const chunks: Buffer[] = [];
		s.on('data', (d: Buffer) => chunks.push(d));
		s.on('error', reject);
		s.on('close', () => {
			const all = Buffer.concat(chunks);
			if (all.length < 2) {
				reject(new Error('no answer'));
				return;
			}
			resolve(dnsPacket.decode(all.subarray(2, 2 + all.readUInt16BE(0))).id ?? -1);
		});
	});
}

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

t.test('sequential TCP queries leave no proxy, timeout, handle or heap growth behind', async (t) => {
	const n = Number(process.env.BBAL_TCP_LEAK_QUERIES ?? 2000);
	const dir = await makeSocketDir(t);
	await startBackend(t, dir, '5301');
	const env = await rig(t, dir);
	const be = env.backends.trackAndConnect('5301') as Backend;
	await waitFor(() => be.ok, 3000, 10, 'backend ok');
	const run = async (count: number, base: number): Promise<void> => {
		for (let i = 0; i < count; i++) {
			const id = (base + i) & 0xffff;
			/* Fifty sources, all seen in the warm-up: remotes do not grow. */
			const got = await tcpQuery(env.port, `127.0.1.${1 + (i % 50)}`, id);
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
	const timeoutsBefore = env.wheel.size;
	await run(n, 1000);
	await waitFor(() => env.tcp.size === 0, 2000, 10, 'all proxies released');
	await new Promise((resolve) => setImmediate(resolve));
	gc();
	const grownKb = Math.round((process.memoryUsage().heapUsed - heapBefore) / 1024);
	t.equal(env.tcp.stats.established, 200 + n, 'every query went through a session');
	t.equal(be.stats.tcp, 200 + n, 'counted on the backend');
	t.equal(env.wheel.size, timeoutsBefore, 'no timeout left armed');
	t.ok(process.getActiveResourcesInfo().length <= handlesBefore, 'no handle left open');
	t.ok(grownKb < 2048, `heap grew ${grownKb} kB over ${n} connections`);
});
