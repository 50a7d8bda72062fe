/*
 * Issue 12 item 2, answers nobody reads: a client that pipelines queries
 * and never reads its answers used to have every query forwarded, and the
 * backend (mname buffers every answer it cannot write) grew without bound.
 * Now bbal stops reading a client while it does not read its answers, while
 * the backend does not read its queries, and while --max-tcp-queries-per-conn
 * of its queries are unanswered; it never drops, only pauses.  In-process
 * with real sockets (support/tcp_rig.ts); a fake backend where the test
 * must count what reaches the backend or hold its answers, a real mname for
 * the end-to-end case.  The first two tests failed on the code before the
 * fix (4dc3c32): every query reached the backend at once.
 */

import type net from 'node:net';
import t from 'tap';
import { INBOUND_TCP_OK_FRAME } from './support/backend_frames.js';
import { encodeQuery, framed, LengthPrefixReader } from './support/dns_messages.js';
import { makeSocketDir, startBackend } from './support/fleet.js';
import { connect, fakeRig, rig, settle } from './support/tcp_rig.js';
import { waitFor } from './support/wait.js';

/* A TCP session that accepts, keeps every query it receives, and answers as `answer` says. */
function session(got: Buffer[], answer: (sock: net.Socket, q: Buffer) => void = () => {}) {
	return (sock: net.Socket): void => {
		const reader = new LengthPrefixReader();
		sock.write(INBOUND_TCP_OK_FRAME);
		sock.on('data', (d: Buffer) => {
			for (const q of reader.feed(d)) {
				got.push(q);
				answer(sock, q);
			}
		});
	};
}

/* An answer of `size` bytes carrying the query's id; the proxy follows only its length. */
function reply(q: Buffer, size: number): Buffer {
	const a = Buffer.alloc(size);
	q.copy(a, 0, 0, 2);
	return framed(a);
}

const pipelined = (n: number, name = 'pipe.example'): Buffer =>
	Buffer.concat(Array.from({ length: n }, (_, i) => framed(encodeQuery(name, 'A', i))));

t.test('no more than --max-tcp-queries-per-conn unanswered queries reach the backend; the rest wait, none dropped',
	async (t) => {
		const got: Buffer[] = [];
		const held: Array<[net.Socket, Buffer]> = [];
		const env = await fakeRig(t, session(got, (sock, q) => held.push([sock, q])), { maxQueriesPerConn: 4 });
		const client = await connect(t, env.port, '127.0.0.60');
		client.sock.write(pipelined(20)); /* one write, most likely one read for bbal */
		await waitFor(() => got.length >= 4, 2000, 10, 'four queries at the backend');
		await settle(100);
		t.equal(got.length, 4, 'four forwarded, sixteen held back');
		t.ok(env.tcp.stats.pausedQueryCap >= 1, 'counted as paused at the query cap');
		/* Two answers back: two more queries go. */
		for (const [sock, q] of held.splice(0, 2)) {
			sock.write(reply(q, 40));
		}
		await waitFor(() => got.length === 6, 2000, 10, 'two more');
		await settle(100);
		t.equal(got.length, 6, 'exactly two more');
		/* Answer everything as it comes: all twenty get through, in order. */
		const answerAll = (): void => {
			for (const [sock, q] of held.splice(0)) {
				sock.write(reply(q, 40));
			}
		};
		await waitFor(() => {
			answerAll();
			return got.length === 20 && client.messages.length === 20;
		}, 5000, 10, 'all twenty queries and answers');
		t.same(got.map((q) => q.readUInt16BE(0)), Array.from({ length: 20 }, (_, i) => i), 'in order, none dropped');
	});

t.test('one source\'s connections together have no more than --max-tcp-queries-per-remote unanswered; another source is not held',
	async (t) => {
		const got: Buffer[] = [];
		const held: Array<[net.Socket, Buffer]> = [];
		const env = await fakeRig(t, session(got, (sock, q) => held.push([sock, q])),
			{ maxQueriesPerConn: 4, maxQueriesPerRemote: 6 });
		const a = await connect(t, env.port, '127.0.0.62');
		const b = await connect(t, env.port, '127.0.0.62');
		a.sock.write(pipelined(10));
		await waitFor(() => got.length >= 4, 2000, 10, 'the first connection\'s four');
		b.sock.write(pipelined(10, 'other.example'));
		await waitFor(() => got.length >= 6, 2000, 10, 'two of the second\'s');
		await settle(100);
		t.equal(got.length, 6, 'six from the source in all, not eight');
		t.ok(env.tcp.stats.pausedSourceQueryCap >= 1, 'counted as paused at the source\'s cap');
		const c = await connect(t, env.port, '127.0.0.63');
		c.sock.write(pipelined(1, 'c.example'));
		await waitFor(() => got.length === 7, 2000, 10, 'another source\'s query goes at once');
		/* One of the first connection's answered: the second, paused by the source's cap, takes the room. */
		const first = held.findIndex(([, q]) => q.includes(Buffer.from('pipe')));
		const [[sock, q]] = held.splice(first, 1);
		sock.write(reply(q, 40));
		await waitFor(() => got.length === 8, 2000, 10, 'one more from the source');
		await settle(100);
		t.equal(got.length, 8, 'exactly one more');
		t.ok(got.at(-1)?.includes(Buffer.from('other')), 'from the connection the source\'s cap held');
		const answerAll = (): void => {
			for (const [s, m] of held.splice(0)) {
				s.write(reply(m, 40));
			}
		};
		await waitFor(() => {
			answerAll();
			return a.messages.length === 10 && b.messages.length === 10;
		}, 5000, 10, 'everything answered in the end');
		a.sock.destroy();
		await waitFor(() => got.length === 21, 2000, 10, 'all forwarded');
		t.equal(env.tcp.sourceRoom({ remote: { addr: 0x7f00003e } } as never), 6, 'what a source is owed is counted down to zero');
	});

t.test('a query held at the source\'s cap before the backend\'s OK goes once there is room, even when the room came first',
	async (t) => {
		/* The first connection's session answers OK at once; the second's only when the test says. */
		const got: Buffer[] = [];
		const held: Array<[net.Socket, Buffer]> = [];
		let sendOk = (): void => {};
		let sessions = 0;
		const env = await fakeRig(t, (sock) => {
			const reader = new LengthPrefixReader();
			const ok = (): void => {
				sock.write(INBOUND_TCP_OK_FRAME);
			};
			if (sessions++ === 0) {
				ok();
			} else {
				sendOk = ok;
			}
			sock.on('data', (d: Buffer) => {
				for (const q of reader.feed(d)) {
					got.push(q);
					held.push([sock, q]);
				}
			});
		}, { maxQueriesPerConn: 4, maxQueriesPerRemote: 4 });
		const a = await connect(t, env.port, '127.0.0.64');
		a.sock.write(pipelined(4));
		await waitFor(() => got.length === 4, 2000, 10, 'the source\'s four at the backend');
		const b = await connect(t, env.port, '127.0.0.64');
		b.sock.write(pipelined(1, 'late.example'));
		await waitFor(() => env.tcp.stats.accepted === 2 && held.length === 4, 2000, 10, 'the second connection accepted');
		await settle(100);
		/* Room first: one of the first connection's queries answered while the second still awaits its OK. */
		const [[sock, q]] = held.splice(0, 1);
		sock.write(reply(q, 40));
		await a.until(() => a.messages.length === 1, 2000, 'the answer');
		sendOk();
		await waitFor(() => got.length === 5, 2000, 10, 'the held query reaches the backend once its session flows');
		t.ok(got[4].includes(Buffer.from('late')), 'it is the second connection\'s query');
		const [[s2, q2]] = held.splice(-1, 1);
		s2.write(reply(q2, 40));
		await b.until(() => b.messages.length === 1, 2000, 'and its answer reaches the client');
	});

t.test('a client that does not read its answers is not read either, until it does', async (t) => {
	const got: Buffer[] = [];
	const env = await fakeRig(t, session(got, (sock, q) => sock.write(reply(q, 4000))), { maxQueriesPerConn: 1_000_000 });
	const client = await connect(t, env.port, '127.0.0.61');
	await waitFor(() => env.tcp.stats.established === 1, 2000, 10, 'flowing');
	client.sock.pause();
	/*
	 * 40 MB of answers if all were asked for.  The queries go out 50 every
	 * 2 ms, as a resolver that keeps asking would send them: bbal reads them
	 * as they come until the answers it cannot hand over back up (one write
	 * bbal reads at once would tell nothing: it is in before any answer).
	 */
	const n = 10_000;
	const batch = 50;
	const queries = pipelined(n);
	const per = queries.length / n;
	for (let i = 0; i < n; i += batch) {
		client.sock.write(queries.subarray(i * per, (i + batch) * per));
		await settle(2);
	}
	/* Until nothing more reaches the backend for 300 ms. */
	let forwarded = -1;
	await waitFor(async () => {
		const before = got.length;
		await settle(300);
		forwarded = got.length;
		return forwarded === before && forwarded > 0;
	}, 8000, 0, 'forwarding stops');
	t.ok(forwarded < n / 2, `${forwarded} of ${n} forwarded: bounded by the buffers, not by what the client sent`);
	t.ok(env.tcp.stats.pausedClientNotReading >= 1, 'counted as paused: client not reading');
	client.sock.resume();
	await client.until(() => client.messages.length === n, 10_000, 'every answer once the client reads');
	t.equal(got.length, n, 'every query reached the backend in the end');
});

t.test('a backend that does not read: the client is paused, then resumes', async (t) => {
	const got: Buffer[] = [];
	const env = await fakeRig(t, session(got), { maxQueriesPerConn: 1_000_000 });
	const client = await connect(t, env.port, '127.0.0.62');
	await waitFor(() => env.tcp.stats.established === 1, 2000, 10, 'flowing');
	env.fake.stopReading();
	const n = 30_000; /* about 1 MB */
	client.sock.write(pipelined(n));
	await waitFor(() => env.tcp.stats.pausedBackendNotReading >= 1, 5000, 10, 'bbal pauses the client');
	env.fake.resumeReading();
	await waitFor(() => got.length === n, 10_000, 50, 'every query reaches the backend once it reads');
	t.pass('none dropped');
});

t.test('real mname: 300 pipelined queries for a big answer, read late, are all answered', async (t) => {
	const dir = await makeSocketDir(t);
	await startBackend(t, dir, '5301');
	const env = await rig(t, dir, { maxQueriesPerConn: 32 });
	const client = await connect(t, env.port, '127.0.0.63');
	client.sock.pause();
	client.sock.write(pipelined(300, 'big.example'));
	await waitFor(() => env.tcp.stats.pausedQueryCap + env.tcp.stats.pausedClientNotReading >= 1, 5000, 10, 'paused');
	await settle(200);
	client.sock.resume();
	await client.until(() => client.messages.length === 300, 10_000, 'all 300 answers');
	t.same(client.messages.map((m) => m.readUInt16BE(0)), Array.from({ length: 300 }, (_, i) => i), 'each once, in order');
});
