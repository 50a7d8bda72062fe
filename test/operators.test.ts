/*
 * What an operator reads, end to end: the stats socket and balstat (JSON
 * and tables) against real traffic, the startup errors around -S, the stats
 * socket file's life (stale, shared), the SIGUSR2 snapshot, --version, and
 * the `npm start` demo fleet.  What an operator does to a running bbal (the
 * signals that stop it and make it rescan, its start) is signals.test.ts.
 * Clients use 127.0.0.200-254 and 127.0.1.x.
 */

import { execFile } from 'node:child_process';
import { existsSync, lstatSync, readFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import path from 'node:path';
import t from 'tap';
import type { Snapshot } from '../src/stats.js';
import { runBalstat, runBbal, startBbal, statsSocketFor } from './support/bbal.js';
import { tcpQuery, udpQuery } from './support/dns_client.js';
import { backendOf } from './support/dns_messages.js';
import { makeSocketDir, startBackend, startFleet } from './support/fleet.js';
import { freePort } from './support/ports.js';
import { childEnv, projectRoot, startChild } from './support/process.js';
import { waitFor, withDeadline } from './support/wait.js';

const ids = (snap: { backends: Array<{ id: number }> }): number[] => snap.backends.map((b) => b.id);

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
		const ans = (await tcpQuery({ port, source: tcpSource, name: 'tcp.example', id })).packet;
		t.equal(ans.id, id, 'TCP answer id');
		t.equal(backendOf(ans), served.get(tcpSource), 'TCP lands on the UDP backend');
	}

	const out = await runBalstat(['--json', '-S', sock]);
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
	const out = await runBalstat(['-S', sock]);
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
	t.match(lines.find((l) => l.startsWith('udp: ')), /; socket errors: receiving 0, sending 0 \(0 with the send queue full\)$/,
		'the UDP socket\'s errors on the udp line');
});

t.test('bbal --version and balstat --version print the package version and exit 0', async (t) => {
	const pkg = JSON.parse(readFileSync(path.join(projectRoot, 'package.json'), 'utf8')) as { version: string };
	t.match(pkg.version, /^\d+\.\d+\.\d+/, 'package.json has a version');
	const bbal = await runBbal(['--version']);
	t.same({ code: bbal.code, stdout: bbal.stdout, stderr: bbal.stderr }, { code: 0, stdout: `${pkg.version}\n`, stderr: '' },
		'bbal: the version alone, no -s needed');
	const stat = await runBalstat(['--version']);
	t.same({ code: stat.code, stdout: stat.stdout, stderr: stat.stderr }, { code: 0, stdout: `${pkg.version}\n`, stderr: '' },
		'balstat: the same version');
	const bad = await runBbal(['--version', '--no-such-flag']);
	t.equal(bad.code, 2, 'an unknown flag beside it is still a usage error');
});

t.test('a bad stats path is one line on stderr for balstat and for bbal', async (t) => {
	const missing = '/tmp/does-not-exist.sock';
	const out = await runBalstat(['-S', missing]);
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
	const holder = startChild('stats socket holder', process.execPath, ['-e',
		`require('net').createServer().listen(${JSON.stringify(sock)}, () => console.log('ready'))`],
	{ env: childEnv() });
	t.teardown(() => holder.stop('SIGKILL'));
	await holder.waitOutput((out) => out.includes('ready'), 10_000, 'ready');
	await withDeadline(holder.stop('SIGKILL'), 3000, 'the holder to exit');
	t.ok(lstatSync(sock).isSocket(), 'a stale socket file is left behind');

	await startBackend(t, dir, '5301');
	const port = await freePort();
	const a = await startBbal(t, { dir, port });
	t.ok(a.logs.some((r) => r.msg === 'replaced stale stats socket'), 'bbal says it replaced the stale socket');
	const first = await runBalstat(['--json', '-S', sock]);
	t.equal(first.code, 0, `balstat reaches it (${first.stderr})`);
	t.equal((JSON.parse(first.stdout) as Snapshot).pid, a.proc.pid, 'the snapshot is from this bbal');

	const dir2 = await makeSocketDir(t);
	const res = await runBbal(['-b', '127.0.0.1', '-p', String(await freePort()), '-s', dir2, '-S', sock]);
	t.equal(res.code, 1, 'second bbal exits 1');
	t.equal(res.stderr.trim().split('\n').length, 1, `one line: ${res.stderr}`);
	t.match(res.stderr, sock, 'naming the path');
	const again = await runBalstat(['--json', '-S', sock]);
	t.equal(again.code, 0, 'the first bbal still serves its stats socket');
	t.equal((JSON.parse(again.stdout) as Snapshot).pid, a.proc.pid, 'and it is still the first bbal');
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
	const demo = startChild('demo', process.execPath, [path.join(projectRoot, 'demo', 'fleet.js')], {
		env: childEnv({ BBAL_DEMO_PORT: String(port) }),
	});
	const pid = demo.pid;
	let kids: number[] = [];
	let dir = '';
	t.teardown(async () => {
		/* A demo killed outright would orphan its children (and they hold our stderr pipe). */
		const more = alive(pid) ? await childrenOf(pid) : [];
		for (const p of [pid, ...kids, ...more]) {
			try { process.kill(p, 'SIGKILL'); } catch { /* gone */ }
		}
		demo.proc.stdout?.destroy();
		demo.proc.stderr?.destroy();
		if (dir !== '') {
			await rm(dir, { recursive: true, force: true });
			await rm(`${dir}.stats.sock`, { force: true });
		}
	});
	await demo.waitOutput((out) => out.includes('demo: bbal listens on'), 15000, 'the demo banner');
	const m = /demo: bbal listens on 127\.0\.0\.1:(\d+); backends 5301-5303 in (\/tmp\/bbal-demo-\S+)/.exec(demo.stdout);
	t.ok(m, 'banner names the port and directory');
	dir = m?.[2] ?? '';
	t.equal(Number(m?.[1]), port, 'on BBAL_DEMO_PORT');
	/* The banner comes once bbal listens and the three hellos are in: a query now is answered. */
	t.ok((demo.stdout.match(/backend socket established/g) ?? []).length >= 3, '3 backends up before the banner');
	t.match(demo.stdout, /"msg":"listening"/, 'and bbal listening');
	const res = await udpQuery({ port, source: '127.0.0.250', name: 'demo.example' });
	t.match(String(res.backend), /^530[123]$/, `answered by ${res.backend}`);
	t.ok(existsSync(`${dir}.stats.sock`), 'stats socket beside the directory');

	kids = await childrenOf(pid);
	t.equal(kids.length, 4, `three backends and bbal are children (${kids})`);
	const exit = withDeadline(demo.processExit, 3000, 'the demo to exit');
	demo.proc.kill('SIGINT');
	t.same(await exit, { code: 0, signal: null }, 'demo exits 0 on SIGINT');
	t.notOk(existsSync(dir), `${dir} removed`);
	t.notOk(existsSync(`${dir}.stats.sock`), 'stats socket removed');
	await waitFor(() => kids.every((pid) => !alive(pid)), 2000, 50, `children ${kids} all gone`)
		.then(() => t.pass('no child survives'), (err: Error) => t.fail(err.message));
});
