/*
 * What an operator sees and does, end to end: the stats socket and balstat
 * (JSON and tables) against real traffic, the startup errors around -S, the
 * stats socket file's life (stale, shared, removed on exit), --version, the signals
 * (SIGTERM/SIGINT with TCP drain, SIGHUP rescan, SIGUSR2 snapshot) and the
 * `npm start` demo fleet.  Clients use 127.0.0.200-254 and 127.0.1.x.
 */

import { type ChildProcess, execFile, spawn } from 'node:child_process';
import dgram from 'node:dgram';
import { existsSync, lstatSync, readFileSync } from 'node:fs';
import { rename, rm } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import dnsPacket from 'dns-packet';
import t, { type Test } from 'tap';
import { readSnapshot } from '../src/balstat.js';
import type { Snapshot } from '../src/stats.js';
import { runBbal, startBbal, statsSocketFor } from './support/bbal.js';
import { udpQuery } from './support/dns_client.js';
import { backendOf, encodeQuery, framed } from './support/dns_messages.js';
import { makeSocketDir, startBackend, startFleet } from './support/fleet.js';
import { freePort } from './support/ports.js';
import { childEnv, projectRoot } from './support/process.js';
import { waitFor } from './support/wait.js';

const balstatBin = path.join(projectRoot, 'bin', 'balstat.js');
const ids = (snap: { backends: Array<{ id: number }> }): number[] => snap.backends.map((b) => b.id);

function balstat(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
	return new Promise((resolve) => {
		execFile(process.execPath, [balstatBin, ...args], { env: childEnv(), timeout: 10_000 }, (err, stdout, stderr) => {
			resolve({ code: err === null ? 0 : (typeof err.code === 'number' ? err.code : -1), stdout, stderr });
		});
	});
}

/* Resolves with how proc exited, or rejects after ms (the process is left to teardown). */
function exitWithin(proc: ChildProcess, ms: number): Promise<{ code: number | null; signal: string | null }> {
	return new Promise((resolve, reject) => {
		if (proc.exitCode !== null || proc.signalCode !== null) {
			resolve({ code: proc.exitCode, signal: proc.signalCode });
			return;
		}
		const timer = setTimeout(() => reject(new Error(`pid ${proc.pid} still running after ${ms} ms`)), ms);
		proc.once('exit', (code, signal) => {
			clearTimeout(timer);
			resolve({ code, signal });
		});
	});
}

/* A DNS-over-TCP client from `source`; every message received is decoded. */
class TcpDns {
	readonly messages: dnsPacket.Packet[] = [];
	ended = false;
	closed = false;
	private buf = Buffer.alloc(0);
	private constructor(readonly sock: net.Socket) {
		sock.on('data', (d: Buffer) => {
			this.buf = Buffer.concat([this.buf, d]);
			while (this.buf.length >= 2 && this.buf.length >= 2 + this.buf.readUInt16BE(0)) {
				this.messages.push(dnsPacket.decode(this.buf.subarray(2, 2 + this.buf.readUInt16BE(0))));
				this.buf = this.buf.subarray(2 + this.buf.readUInt16BE(0));
			}
		});
		sock.on('end', () => { this.ended = true; });
		sock.on('close', () => { this.closed = true; });
		sock.on('error', () => {});
	}

	/* Rejects with the socket error (ECONNREFUSED) if the connect fails. */
	static connect(t: Test, port: number, source: string): Promise<TcpDns> {
		return new Promise((resolve, reject) => {
			const sock = net.connect({ host: '127.0.0.1', port, localAddress: source });
			t.teardown(() => { sock.destroy(); });
			sock.once('error', reject);
			sock.once('connect', () => resolve(new TcpDns(sock)));
		});
	}

	async query(id: number, name = 'tcp.example', timeoutMs = 2000): Promise<dnsPacket.Packet> {
		this.sock.write(framed(encodeQuery(name, 'TXT', id)));
		await waitFor(() => this.messages.some((m) => m.id === id) || this.closed, timeoutMs, 10, `TCP answer ${id}`);
		const ans = this.messages.find((m) => m.id === id);
		if (ans === undefined) {
			throw new Error(`TCP connection closed before answer ${id}`);
		}
		return ans;
	}
}

/* One query on a fresh connection, closed afterwards. */
async function tcpQuery(t: Test, port: number, source: string, id: number): Promise<dnsPacket.Packet> {
	const c = await TcpDns.connect(t, port, source);
	try {
		return await c.query(id);
	} finally {
		c.sock.destroy();
	}
}

t.test('the JSON snapshot agrees with the traffic that was sent', async (t) => {
	const { port, sock } = await startFleet(t, ['5301', '5302', '5303']);
	const sources = [200, 201, 202, 203, 204, 205].map((n) => `127.0.0.${n}`);
	const served = new Map<string, string | null>();
	for (const s of sources) {
		for (let i = 0; i < 2; i++) {
			const res = await udpQuery({ port, source: s, name: `q${i}.example` });
			t.equal(served.get(s) ?? res.backend, res.backend, `${s} sticky`);
			served.set(s, res.backend);
		}
	}
	const tcpSource = sources[2];
	for (const id of [7001, 7002]) {
		const ans = await tcpQuery(t, port, tcpSource, id);
		t.equal(ans.id, id, 'TCP answer id');
		t.equal(backendOf(ans), served.get(tcpSource), 'TCP lands on the UDP backend');
	}

	const out = await balstat(['--json', '-S', sock]);
	t.equal(out.code, 0, `balstat --json exits 0 (${out.stderr})`);
	const snap = JSON.parse(out.stdout) as Snapshot;
	t.same(ids(snap), [5301, 5302, 5303], 'backend ids');
	for (const b of snap.backends) {
		t.same(Object.keys(b).filter((k) => ['id', 'path', 'ok', 'removed', 'remotes', 'heartbeatOutstanding',
			'reconnectDelay', 'stats'].includes(k)).length, 8, `backend ${b.id} has the documented fields`);
		t.same(Object.keys(b.stats).filter((k) => ['connStart', 'connError', 'udp', 'tcp', 'stuck'].includes(k)).length,
			5, `backend ${b.id} stats fields`);
		t.equal(b.ok, true, `backend ${b.id} ok`);
		t.equal(b.removed, false, `backend ${b.id} not removed`);
		t.equal(typeof b.heartbeatOutstanding, 'boolean');
		t.equal(typeof b.reconnectDelay, 'number');
	}
	const sum = (f: (b: Snapshot['backends'][number]) => number): number => snap.backends.reduce((a, b) => a + f(b), 0);
	t.equal(sum((b) => b.remotes), 6, 'six remotes over the backends');
	t.equal(sum((b) => b.stats.udp), 12, 'twelve UDP queries forwarded');
	t.same(snap.remotes.map((r) => r.ip).sort(), [...sources].sort(), 'one remote per source');
	for (const r of snap.remotes) {
		for (const k of ['ip', 'backend', 'backup', 'firstSeen', 'lastSeen']) {
			t.ok(k in r, `remote ${r.ip} has ${k}`);
		}
		t.same(Object.keys(r.stats).filter((k) => ['tcp', 'tcpDrop', 'udp', 'udpDrop'].includes(k)).sort(),
			['tcp', 'tcpDrop', 'udp', 'udpDrop'], `remote ${r.ip} has the documented stats fields`);
		t.equal(new Date(r.firstSeen).toISOString(), r.firstSeen, 'firstSeen is an ISO string');
		t.equal(new Date(r.lastSeen).toISOString(), r.lastSeen, 'lastSeen is an ISO string');
		t.equal(String(r.backend), served.get(r.ip), `remote ${r.ip}'s backend is the one that answered`);
		t.equal(r.stats.udp, 2, `remote ${r.ip} sent two UDP queries`);
	}
	const tcpRem = snap.remotes.find((r) => r.ip === tcpSource);
	t.equal(tcpRem?.stats.tcp, 2, 'the TCP source has two TCP connections');
	t.ok((snap.backends.find((b) => b.id === tcpRem?.backend)?.stats.tcp ?? 0) >= 2, 'its backend counted them');
	t.ok(snap.timeouts.length > 0, 'timeouts listed');
	for (const to of snap.timeouts) {
		t.ok(typeof to.id === 'number' && typeof to.name === 'string' && typeof to.expiresInMs === 'number',
			`timeout ${to.name} has id, name, expiresInMs`);
	}
});

t.test('balstat tables list every backend path and every remote, in address order', async (t) => {
	const { port, sock, backends } = await startFleet(t, ['5301', '5302']);
	const sources = ['127.0.1.10', '127.0.1.100', '127.0.0.254', '127.0.1.9'];
	for (const s of sources) {
		await udpQuery({ port, source: s, name: 'tbl.example' });
	}
	const out = await balstat(['-S', sock]);
	t.equal(out.code, 0, `balstat exits 0 (${out.stderr})`);
	const lines = out.stdout.split('\n');
	const bIdx = lines.indexOf('BACKENDS');
	const rIdx = lines.indexOf('REMOTE PEERS');
	t.ok(bIdx >= 0 && rIdx > bIdx, 'BACKENDS then REMOTE PEERS headers');
	for (const be of backends) {
		t.ok(lines.slice(bIdx, rIdx).some((l) => l.endsWith(be.path)), `backend path ${be.path} listed`);
	}
	const order = ['127.0.0.254', '127.0.1.9', '127.0.1.10', '127.0.1.100'].map((a) =>
		lines.findIndex((l, i) => i > rIdx && l.split(/\s+/)[0] === a));
	t.ok(order.every((i) => i > rIdx), `every remote listed: ${order}`);
	t.same([...order].sort((a, b) => a - b), order, '127.0.1.9 before 127.0.1.10 before 127.0.1.100');
});

t.test('bbal --version and balstat --version print the package version and exit 0', async (t) => {
	const pkg = JSON.parse(readFileSync(path.join(projectRoot, 'package.json'), 'utf8')) as { version: string };
	t.match(pkg.version, /^\d+\.\d+\.\d+/, 'package.json has a version');
	const bbal = await runBbal(['--version']);
	t.same({ code: bbal.code, stdout: bbal.stdout, stderr: bbal.stderr }, { code: 0, stdout: `${pkg.version}\n`, stderr: '' },
		'bbal: the version alone, no -s needed');
	const stat = await balstat(['--version']);
	t.same(stat, { code: 0, stdout: `${pkg.version}\n`, stderr: '' }, 'balstat: the same version');
	const bad = await runBbal(['--version', '--no-such-flag']);
	t.equal(bad.code, 2, 'an unknown flag beside it is still a usage error');
});

t.test('a bad stats path is one line on stderr for balstat and for bbal', async (t) => {
	const missing = '/tmp/does-not-exist.sock';
	const out = await balstat(['-S', missing]);
	t.not(out.code, 0, 'balstat fails');
	t.equal(out.stderr.trim().split('\n').length, 1, `one line: ${out.stderr}`);
	t.match(out.stderr, missing, 'naming the path');

	const dir = await makeSocketDir(t);
	const inside = path.join(dir, 'stats.sock');
	const res = await runBbal(['-b', '127.0.0.1', '-p', String(await freePort()), '-s', dir, '-S', inside]);
	t.equal(res.code, 2, 'bbal exits 2');
	t.equal(res.stderr.trim().split('\n').length, 1, `one line: ${res.stderr}`);
	t.match(res.stderr, inside, 'naming the path');
	t.notOk(existsSync(inside), 'no socket left in the backend directory');
});

t.test('a stale stats socket is replaced; a live one stops a second bbal', async (t) => {
	const dir = await makeSocketDir(t);
	const sock = statsSocketFor(dir);
	const holder = spawn(process.execPath, ['-e',
		`require('net').createServer().listen(${JSON.stringify(sock)}, () => console.log('ready'))`],
	{ env: childEnv(), stdio: ['ignore', 'pipe', 'inherit'] });
	t.teardown(() => { holder.kill('SIGKILL'); });
	await new Promise<void>((resolve) => holder.stdout.once('data', () => resolve()));
	holder.kill('SIGKILL');
	await exitWithin(holder, 3000);
	t.ok(lstatSync(sock).isSocket(), 'a stale socket file is left behind');

	await startBackend(t, dir, '5301');
	const port = await freePort();
	const a = await startBbal(t, { dir, port });
	t.ok(a.logs.some((r) => r.msg === 'replaced stale stats socket'), 'bbal says it replaced the stale socket');
	const first = await balstat(['--json', '-S', sock]);
	t.equal(first.code, 0, `balstat reaches it (${first.stderr})`);
	t.equal((JSON.parse(first.stdout) as Snapshot).pid, a.proc.pid, 'the snapshot is from this bbal');

	const dir2 = await makeSocketDir(t);
	const res = await runBbal(['-b', '127.0.0.1', '-p', String(await freePort()), '-s', dir2, '-S', sock]);
	t.equal(res.code, 1, 'second bbal exits 1');
	t.equal(res.stderr.trim().split('\n').length, 1, `one line: ${res.stderr}`);
	t.match(res.stderr, sock, 'naming the path');
	const again = await balstat(['--json', '-S', sock]);
	t.equal(again.code, 0, 'the first bbal still serves its stats socket');
	t.equal((JSON.parse(again.stdout) as Snapshot).pid, a.proc.pid, 'and it is still the first bbal');
});

t.test('a starting bbal opens its DNS port only once its backends are up: no SERVFAIL at start', async (t) => {
	const dir = await makeSocketDir(t);
	for (const l of ['5301', '5302', '5303']) {
		await startBackend(t, dir, l);
	}
	const port = await freePort();
	/* A host querying every 2 ms from before bbal starts, as hosts do through a restart. */
	const client = dgram.createSocket('udp4');
	await new Promise<void>((resolve) => client.bind(0, '127.0.0.40', resolve));
	const rcodes: number[] = [];
	client.on('message', (m: Buffer) => rcodes.push((m[3]) & 0x0f));
	client.on('error', () => {});
	let id = 1;
	const sender = setInterval(() => client.send(encodeQuery('start.example', 'A', id++ & 0xffff), port, '127.0.0.1'), 2);
	t.teardown(() => {
		clearInterval(sender);
		client.close();
	});
	const bbal = await startBbal(t, { dir, port });
	await bbal.waitForLog((r) => r.msg === 'listening');
	await new Promise((resolve) => setTimeout(resolve, 300));
	clearInterval(sender);
	await new Promise((resolve) => setTimeout(resolve, 100));
	const established = bbal.logs.findIndex((r) => r.msg === 'backend socket established');
	const listening = bbal.logs.findIndex((r) => r.msg === 'listening');
	t.ok(established >= 0 && established < listening, 'a backend was established before bbal said it was listening');
	t.ok(rcodes.length > 50, `the host's queries were answered from the start (${rcodes.length} answers)`);
	t.same([...new Set(rcodes)], [0], 'every answer came from a backend: none was bbal\'s SERVFAIL');
});

t.test('SIGTERM: exit 0, stats socket removed, shutdown logged', async (t) => {
	const { bbal, sock } = await startFleet(t, ['5301']);
	t.ok(lstatSync(sock).isSocket(), 'stats socket exists while running');
	const st = await bbal.stop('SIGTERM');
	t.same(st, { code: 0, signal: null }, 'exit 0');
	t.notOk(existsSync(sock), 'stats socket file removed');
	t.ok(bbal.logs.some((r) => r.msg === 'shutting down'), 'logs shutting down');
	t.ok(bbal.logs.some((r) => r.msg === 'exiting'), 'logs exiting');
});

t.test('SIGTERM lets open TCP sessions finish, refuses new work, exits 0', async (t) => {
	const { port, bbal } = await startFleet(t, ['5301', '5302', '5303']);
	const sources = ['127.0.0.220', '127.0.0.221', '127.0.0.222'];
	const clients: TcpDns[] = [];
	const home: Array<string | null> = [];
	for (const [i, s] of sources.entries()) {
		const c = await TcpDns.connect(t, port, s);
		home.push(backendOf(await c.query(100 + i)));
		clients.push(c);
	}
	const since = bbal.logs.length;
	const sigAt = Date.now();
	const exit = exitWithin(bbal.proc, 4000);
	exit.catch(() => {});
	bbal.proc.kill('SIGTERM');
	const rec = await bbal.waitForLog((r) => r.msg === 'shutting down', 2000, since);
	t.equal(rec.tcp_open, 3, 'three sessions open at shutdown');

	for (const [i, c] of clients.entries()) {
		const ans = await c.query(200 + i, 'after-term.example');
		t.equal(ans.id, 200 + i, `${sources[i]}: answer after SIGTERM has its id`);
		t.equal(backendOf(ans), home[i], `${sources[i]}: from the same backend`);
	}
	const fresh = await TcpDns.connect(t, port, '127.0.0.223').then(
		async (c) => (await c.query(300, 'new.example', 1000).then(() => 'answered', () => 'closed')),
		(err: NodeJS.ErrnoException) => err.code ?? 'error');
	t.not(fresh, 'answered', `a new TCP connection gets no answer (${fresh})`);
	const udp = await udpQuery({ port, source: '127.0.0.224', name: 'udp.example', timeoutMs: 500 })
		.then(() => 'answered', () => 'silent');
	t.equal(udp, 'silent', 'UDP is no longer answered');
	t.equal(bbal.proc.exitCode, null, 'bbal still draining while sessions are open');

	const endAt = Date.now();
	for (const c of clients) {
		c.sock.end();
	}
	const st = await exit;
	t.same(st, { code: 0, signal: null }, 'exit 0');
	t.ok(Date.now() - sigAt < 4000, `exited ${Date.now() - sigAt} ms after SIGTERM`);
	t.ok(Date.now() - endAt < 1500, `and ${Date.now() - endAt} ms after the clients closed (no drain wait)`);
	await waitFor(() => clients.every((c) => c.ended), 1000, 10, 'clients see a clean FIN');
});

t.test('SIGTERM with a TCP client that never closes: exit 0 after the drain limit', async (t) => {
	const { port, bbal } = await startFleet(t, ['5301']);
	const c = await TcpDns.connect(t, port, '127.0.0.230');
	t.equal((await c.query(42)).id, 42, 'session flows');
	const sigAt = Date.now();
	const exit = exitWithin(bbal.proc, 5000);
	bbal.proc.kill('SIGTERM');
	const st = await exit;
	const took = Date.now() - sigAt;
	t.same(st, { code: 0, signal: null }, 'exit 0');
	t.ok(took >= 2500 && took < 5000, `exited after ${took} ms (drain limit 3 s)`);
	await waitFor(() => c.closed, 1000, 10, 'client connection closed');
});

/*
 * Wait until bbal's periodic rescan is at least 2.5 s away, so that what a
 * test sees next cannot be its doing; returns when the rescan is due.
 */
async function rescanPeriodLeft(sock: string): Promise<number> {
	let rescanAt = 0;
	await waitFor(async () => {
		const snap = JSON.parse(await readSnapshot(sock)) as Snapshot;
		const to = snap.timeouts.find((x) => x.name === 'rescan socket directory');
		rescanAt = Date.now() + (to?.expiresInMs ?? 0);
		return (to?.expiresInMs ?? 0) >= 2500;
	}, 7000, 100, 'a rescan period with 2.5 s left');
	return rescanAt;
}

t.test('SIGHUP finds a new backend socket at once, not at the next periodic rescan', async (t) => {
	/* Without the directory watch, which would find it at once too. */
	const { dir, bbal, sock } = await startFleet(t, ['5301'], ['--no-watch']);
	/* The backend starts elsewhere and is renamed in, so its start-up time cannot eat the window. */
	const side = await makeSocketDir(t);
	const late = await startBackend(t, side, '5302');
	const rescanAt = await rescanPeriodLeft(sock);
	const since = bbal.logs.length;
	await rename(late.path, path.join(dir, '5302'));
	bbal.proc.kill('SIGHUP');
	const rec = await bbal.waitForLog((r) => r.msg === 'backend socket established' && r.be_id === 5302, 1000, since);
	t.ok(Date.now() < rescanAt, `established ${rescanAt - Date.now()} ms before the periodic rescan was due`);
	t.equal(rec.be_path, path.join(dir, '5302'), 'the new socket');
	t.ok(bbal.logs.slice(since).some((r) => r.msg === 'SIGHUP: rescanning socket directory'), 'SIGHUP logged');
});

t.test('a backend socket that appears in the directory is connected within a second, unasked', async (t) => {
	const { dir, bbal, sock } = await startFleet(t, ['5301']);
	const side = await makeSocketDir(t);
	const late = await startBackend(t, side, '5302');
	const rescanAt = await rescanPeriodLeft(sock);
	const since = bbal.logs.length;
	const movedAt = Date.now();
	await rename(late.path, path.join(dir, '5302'));
	await bbal.waitForLog((r) => r.msg === 'backend socket established' && r.be_id === 5302, 1000, since);
	t.ok(Date.now() < rescanAt, `established ${Date.now() - movedAt} ms after the socket appeared, `
		+ `${rescanAt - Date.now()} ms before the periodic rescan was due`);
});

t.test('a backend restarted after a long outage is connected at once, not at the end of its back-off', async (t) => {
	const { bbal, backends } = await startFleet(t, ['5301', '5302']);
	const be = backends[0];
	t.ok(be, 'backend 5301');
	await be?.kill('SIGKILL');
	/* Two refused reconnects (1 s and 4 s after the fault): the next is 5 s away. */
	await waitFor(() => bbal.logs.filter((r) => r.be_id === 5301 && r.msg === 'backend connect failed').length >= 2,
		8000, 50, 'two failed reconnects');
	const since = bbal.logs.length;
	const restartedAt = Date.now();
	await be?.restart();
	await bbal.waitForLog((r) => r.be_id === 5301 && r.msg === 'backend socket established', 6000, since);
	const ms = Date.now() - restartedAt;
	t.ok(ms < 2500, `established ${ms} ms after the restart began (its back-off had 5 s to run)`);
	t.ok(bbal.logs.slice(since).some((r) => r.be_id === 5301 && r.msg === 'backend socket re-created (connecting now)'),
		'bbal saw the socket file bound afresh (the inode number may be the same)');
});

t.test('SIGUSR2 logs the stats snapshot', async (t) => {
	const { bbal, port } = await startFleet(t, ['5301', '5302']);
	await udpQuery({ port, source: '127.0.0.240', name: 'u.example' });
	const since = bbal.logs.length;
	bbal.proc.kill('SIGUSR2');
	const rec = await bbal.waitForLog((r) => r.msg === 'stats snapshot', 2000, since);
	const snap = rec.snapshot as Snapshot & { remoteCount: number };
	t.same(ids(snap), [5301, 5302], 'snapshot.backends lists the backends');
	t.equal(snap.remoteCount, 1, 'and counts the remote');
	t.equal(bbal.proc.exitCode, null, 'bbal keeps running');
});

function childrenOf(pid: number): Promise<number[]> {
	return new Promise((resolve) => {
		execFile('pgrep', ['-P', String(pid)], (_err, stdout) =>
			resolve(stdout.split('\n').filter((l) => l !== '').map(Number)));
	});
}

function alive(pid: number): boolean {
	try {
		process.kill(pid, 0);
		return true;
	} catch {
		return false;
	}
}

t.test('the npm start demo answers, and Ctrl-C leaves nothing behind', async (t) => {
	const port = await freePort();
	const demo = spawn(process.execPath, [path.join(projectRoot, 'demo', 'fleet.js')], {
		cwd: projectRoot, env: childEnv({ BBAL_DEMO_PORT: String(port) }), stdio: ['ignore', 'pipe', 'pipe'],
	});
	let out = '';
	let kids: number[] = [];
	let dir = '';
	t.teardown(async () => {
		/* A demo killed outright would orphan its children (and they hold our stderr pipe). */
		const more = alive(demo.pid as number) ? await childrenOf(demo.pid as number) : [];
		for (const pid of [demo.pid as number, ...kids, ...more]) {
			try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
		}
		demo.stdout.destroy();
		demo.stderr.destroy();
		if (dir !== '') {
			await rm(dir, { recursive: true, force: true });
			await rm(`${dir}.stats.sock`, { force: true });
		}
	});
	demo.stdout.setEncoding('utf8');
	demo.stdout.on('data', (s: string) => { out += s; });
	demo.stderr.resume();
	await waitFor(() => out.includes('demo: bbal listens on'), 15000, 50, 'the demo banner');
	const m = /demo: bbal listens on 127\.0\.0\.1:(\d+); backends 5301-5303 in (\/tmp\/bbal-demo-\S+)/.exec(out);
	t.ok(m, 'banner names the port and directory');
	dir = m?.[2] ?? '';
	t.equal(Number(m?.[1]), port, 'on BBAL_DEMO_PORT');
	/* The banner comes at bbal's "listening", before the hellos (see report): wait for them. */
	await waitFor(() => (out.match(/backend socket established/g) ?? []).length >= 3, 5000, 20, '3 backends up');
	const res = await udpQuery({ port, source: '127.0.0.250', name: 'demo.example' });
	t.match(String(res.backend), /^530[123]$/, `answered by ${res.backend}`);
	t.ok(existsSync(`${dir}.stats.sock`), 'stats socket beside the directory');

	kids = await childrenOf(demo.pid as number);
	t.equal(kids.length, 4, `three backends and bbal are children (${kids})`);
	const exit = exitWithin(demo, 3000);
	demo.kill('SIGINT');
	t.same(await exit, { code: 0, signal: null }, 'demo exits 0 on SIGINT');
	t.notOk(existsSync(dir), `${dir} removed`);
	t.notOk(existsSync(`${dir}.stats.sock`), 'stats socket removed');
	await waitFor(() => kids.every((pid) => !alive(pid)), 2000, 50, `children ${kids} all gone`)
		.then(() => t.pass('no child survives'), (err: Error) => t.fail(err.message));
});
