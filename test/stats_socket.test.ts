/*
 * The stats socket's bounds, in-process: a Balancer with a clock the test
 * steps, a fake UDP transport fed queries from thousands of sources (no
 * backend, so each is answered SERVFAIL and its remote held), and a real
 * AF_UNIX stats socket read by real clients.
 *
 * The snapshot is streamed: the remotes are read from the table
 * STATS_REMOTES_SLICE at a time, and a slice is serialised only once the
 * socket has taken the last one, so a client that does not read holds a
 * slice or two, not the document; what a reader gets is byte for byte the
 * JSON of the whole snapshot.  At most STATS_MAX_CONNECTIONS are served,
 * the next is closed at once; a connection not done within
 * STATS_CONNECTION_TIMEOUT_SECS (on the wheel) is destroyed; both are
 * counted.  The socket file's mode is 0660 whatever the umask.  SIGUSR2's
 * log line counts the remotes and lists only the first
 * LOG_SNAPSHOT_MAX_REMOTES.
 */

import { execFile } from 'node:child_process';
import { statSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import t, { type Test } from 'tap';
import { Balancer } from '../src/balancer.js';
import { formatSnapshot, readSnapshot } from '../src/balstat.js';
import { makeLogger } from '../src/log.js';
import {
	LOG_SNAPSHOT_MAX_REMOTES, type Snapshot, STATS_CONNECTION_TIMEOUT_SECS, STATS_MAX_CONNECTIONS, STATS_REMOTES_SLICE,
	takeSnapshot,
} from '../src/stats.js';
import { FakeTransport } from './support/fake_transport.js';
import { type LogRecord, statsSocketFor } from './support/bbal.js';
import { encodeQuery } from './support/dns_messages.js';
import { makeSocketDir } from './support/fleet.js';
import { childEnv, projectRoot } from './support/process.js';
import { waitFor } from './support/wait.js';

const START = Date.parse('2030-01-02T03:04:05.000Z');
const BASE = 0x0b000000;

/* A running Balancer holding `remotes` remotes, with a stats socket; every log line kept. */
async function start(t: Test, remotes: number) {
	const dir = await makeSocketDir(t);
	const sock = statsSocketFor(dir);
	let now = START;
	const logs: LogRecord[] = [];
	const log = makeLogger('info', { write: (line: string) => { logs.push(JSON.parse(line) as LogRecord); } });
	const udp = new FakeTransport();
	const bal = new Balancer({
		bind: '127.0.0.1', port: 0, socketDir: dir, log, clock: () => now, transport: udp, watchDir: false,
		statsSocket: sock, maxRemotes: remotes + 10,
	});
	t.teardown(() => bal.close());
	await bal.start();
	const q = encodeQuery('s.example', 'A', 1);
	for (let i = 0; i < remotes; i++) {
		udp.onDatagram(q, BASE + i, 4000, q.length, 0);
	}
	t.equal(bal.remotes.size, remotes, `${remotes} remotes held`);
	/* Every call the stats socket makes for a slice of the table. */
	const slices: number[] = [];
	const slice = bal.remotes.slice.bind(bal.remotes);
	bal.remotes.slice = (from: number, max: number) => {
		slices.push(max);
		return slice(from, max);
	};
	return {
		bal, sock, logs, slices,
		advance: (secs: number): void => {
			now += secs * 1000;
			bal.wheel.run(now);
		},
	};
}

/*
 * A client that does not read until told to (a paused socket does not see
 * the close either, until it reads); then it counts what it gets.
 */
function stall(t: Test, sock: string) {
	const conn = net.createConnection({ path: sock });
	let closed = false;
	let bytes = 0;
	conn.pause();
	conn.on('error', () => {});
	conn.on('data', (d: Buffer) => {
		bytes += d.length;
	});
	conn.on('close', () => {
		closed = true;
	});
	t.teardown(() => {
		conn.destroy();
	});
	return {
		conn,
		connected: new Promise<void>((resolve) => conn.once('connect', () => resolve())),
		/* Read now; resolves with the bytes read once bbal has closed the connection. */
		async drain(): Promise<number> {
			conn.resume();
			await waitFor(() => closed, 5000, 10, 'the connection closed');
			return bytes;
		},
	};
}

t.test('the streamed snapshot is the JSON of the whole snapshot, read a slice at a time', async (t) => {
	const n = 5 * STATS_REMOTES_SLICE + 17;
	const { bal, sock, slices } = await start(t, n);
	const text = await readSnapshot(sock);
	t.ok(text.endsWith('}\n'), 'one document and a newline');
	const streamed = JSON.parse(text) as Snapshot;
	t.equal(`${JSON.stringify(streamed)}\n`, text, 'byte for byte what JSON.stringify gives');
	const whole = takeSnapshot(bal.statsSources);
	t.same(Object.keys(streamed), Object.keys(whole), 'the same fields in the same order');
	t.same(streamed.remotes, whole.remotes, `the ${n} remotes, in address order`);
	t.same(streamed.backends, whole.backends);
	t.same([streamed.udp, streamed.tcp, streamed.maxRemotes], [whole.udp, whole.tcp, whole.maxRemotes]);
	t.match(streamed.statsSocket, { open: 1, served: 0, overCap: 0, timedOut: 0 }, 'its own counts, as it connected');
	await waitFor(() => bal.statsSources.statsServer?.stats.served === 1, 2000, 10, 'served');
	t.match(takeSnapshot(bal.statsSources).statsSocket, { open: 0, served: 1 }, 'and counted as served once read');
	t.same(slices, Array<number>(Math.ceil(n / STATS_REMOTES_SLICE)).fill(STATS_REMOTES_SLICE),
		`read from the table in ${slices.length} slices of ${STATS_REMOTES_SLICE}`);
	t.match(formatSnapshot(streamed), /\nstats socket: open 1, served 0; closed: over cap 0, too slow 0$/, 'balstat says so too');
});

t.test(`a reader that does not read holds a slice or two; ${STATS_MAX_CONNECTIONS} are served, more are closed at once`, async (t) => {
	const n = 20 * STATS_REMOTES_SLICE;
	const { bal, sock, slices, logs, advance } = await start(t, n);
	const stalled = Array.from({ length: STATS_MAX_CONNECTIONS }, () => stall(t, sock));
	await Promise.all(stalled.map((s) => s.connected));
	await waitFor(() => slices.length >= STATS_MAX_CONNECTIONS, 2000, 10, 'each connection started');
	await new Promise((resolve) => setTimeout(resolve, 300));
	const perConn = slices.length / STATS_MAX_CONNECTIONS;
	t.ok(perConn <= 3, `with no reader, ${perConn} slices each of ${n / STATS_REMOTES_SLICE} were made (backpressure)`);

	t.equal(await readSnapshot(sock), '', 'one more is closed unanswered');
	t.match(bal.statsSources.statsServer?.stats, { overCap: 1, timedOut: 0 });
	t.match(logs.filter((r) => r.msg === 'too many stats connections (closing new connection)'),
		[{ max: STATS_MAX_CONNECTIONS, level: 40 }]);

	advance(STATS_CONNECTION_TIMEOUT_SECS - 1);
	t.equal(bal.statsSources.statsServer?.size, STATS_MAX_CONNECTIONS, `${STATS_CONNECTION_TIMEOUT_SECS - 1} s: still open`);
	advance(1);
	await waitFor(() => bal.statsSources.statsServer?.size === 0, 2000, 10, 'the stalled connections closed');
	t.match(bal.statsSources.statsServer?.stats, { overCap: 1, timedOut: STATS_MAX_CONNECTIONS, served: 0 },
		`${STATS_CONNECTION_TIMEOUT_SECS} s: every one destroyed and counted`);
	const got = await Promise.all(stalled.map((s) => s.drain()));
	t.ok(got.every((b) => b > 0 && b < 200 * n), `each client got part of the document, then the close (${got[0]} bytes)`);
	t.match(logs.filter((r) => r.msg === 'stats connection too slow (closed)'), [{ state: 'awaiting drain' }], 'logged once');
	t.notOk(bal.wheel.list().some((to) => /^stats connection/.test(to.name)), 'no deadline left on the wheel');
	const text = await readSnapshot(sock);
	t.equal((JSON.parse(text) as Snapshot).remotes.length, n, 'a reader that reads is served in full afterwards');
});

t.test('close() cuts the connections being served and resolves', async (t) => {
	const { bal, sock } = await start(t, 10 * STATS_REMOTES_SLICE);
	const s = stall(t, sock);
	await s.connected;
	await waitFor(() => bal.statsSources.statsServer?.size === 1, 2000, 10, 'being served');
	await bal.close();
	t.ok(await s.drain() > 0, 'the client reads what it was sent, then the close');
	t.equal(bal.wheel.list().length, 0, 'nothing left on the wheel');
});

t.test('the stats socket file is 0660, whatever the umask', async (t) => {
	const old = process.umask(0);
	t.teardown(() => {
		process.umask(old);
	});
	const { sock } = await start(t, 1);
	process.umask(old);
	t.equal(statSync(sock).mode & 0o777, 0o660);
});

t.test('SIGUSR2\'s snapshot counts every remote and lists only the first ones, in address order', async (t) => {
	const n = 3 * STATS_REMOTES_SLICE;
	const { bal, logs } = await start(t, n);
	bal.logSnapshot();
	const [rec] = logs.filter((r) => r.msg === 'stats snapshot');
	const snap = rec?.snapshot as Snapshot & { remoteCount: number };
	t.equal(snap.remoteCount, n);
	t.equal(snap.remotes.length, LOG_SNAPSHOT_MAX_REMOTES);
	t.equal(snap.remotes[0].ip, '11.0.0.0', 'the lowest address first');
	t.equal(snap.remotes.at(-1)?.ip, `11.0.0.${LOG_SNAPSHOT_MAX_REMOTES - 1}`);
	t.ok(Array.isArray(snap.backends) && Array.isArray(snap.timeouts), 'the rest of the snapshot');
});

t.test('balstat says so in one line when bbal cuts the document short (over the cap, too slow)', async (t) => {
	const dir = await makeSocketDir(t);
	const sock = statsSocketFor(dir);
	const server = net.createServer((c) => c.end('{"version":1,"pid":1'));
	await new Promise<void>((resolve) => server.listen(sock, resolve));
	t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())));
	for (const args of [['--json'], []]) {
		const out = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
			execFile(process.execPath, [path.join(projectRoot, 'bin', 'balstat.js'), ...args, '-S', sock], { env: childEnv() },
				(err, stdout, stderr) => resolve({ code: err ? (err.code as number) : 0, stdout, stderr }));
		});
		t.same(out, {
			code: 1, stdout: '',
			stderr: `balstat: ${sock} closed the connection before the whole snapshot (too many readers at once, or too slow a read); `
				+ 'try again\n',
		}, `balstat ${args.join(' ')}`);
	}
});
