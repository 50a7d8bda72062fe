/*
 * What an operator does to a running bbal, end to end: its start (the DNS
 * port opens once the backends are up), SIGTERM (exit 0, the stats socket
 * removed, open TCP sessions drained up to the limit), SIGHUP and the
 * directory watch finding a new backend socket at once, and a backend
 * restarted after a long outage connected at once.  What an operator reads
 * is operators.test.ts.  Clients use 127.0.0.40 and 127.0.0.220-239.
 */

import { existsSync, lstatSync } from 'node:fs';
import { rename } from 'node:fs/promises';
import path from 'node:path';
import t from 'tap';
import { startBbal, statsSnapshot } from './support/bbal.js';
import { TcpDnsClient, UdpDnsClient, udpQuery } from './support/dns_client.js';
import { backendOf, encodeQuery } from './support/dns_messages.js';
import { makeSocketDir, startBackend, startFleet } from './support/fleet.js';
import { freePort } from './support/ports.js';
import { waitFor, withDeadline } from './support/wait.js';

t.test('a starting bbal opens its DNS port only once its backends are up: no SERVFAIL at start', async (t) => {
	const dir = await makeSocketDir(t);
	for (const l of ['5301', '5302', '5303']) {
		await startBackend(t, dir, l);
	}
	const port = await freePort();
	/* A host querying every 2 ms from before bbal starts, as hosts do through a restart. */
	const client = await UdpDnsClient.open(t, port, '127.0.0.40');
	let id = 1;
	const sender = setInterval(() => {
		client.send(encodeQuery('start.example', 'A', id++ & 0xffff)).catch(() => {});
	}, 2);
	t.teardown(() => clearInterval(sender));
	const bbal = await startBbal(t, { dir, port });
	await bbal.waitForLog((r) => r.msg === 'listening');
	await new Promise((resolve) => setTimeout(resolve, 300));
	clearInterval(sender);
	await new Promise((resolve) => setTimeout(resolve, 100));
	const rcodes = client.datagrams.map((d) => (d.bytes[3]) & 0x0f);
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
	const clients: TcpDnsClient[] = [];
	const home: Array<string | null> = [];
	for (const [i, s] of sources.entries()) {
		const c = await TcpDnsClient.connect(t, port, s);
		home.push(backendOf(await c.ask('tcp.example', 'TXT', 100 + i)));
		clients.push(c);
	}
	const since = bbal.logs.length;
	const sigAt = Date.now();
	const exit = withDeadline(bbal.exit, 4000, 'bbal to exit');
	exit.catch(() => {});
	bbal.proc.kill('SIGTERM');
	const rec = await bbal.waitForLog((r) => r.msg === 'shutting down', 2000, since);
	t.equal(rec.tcp_open, 3, 'three sessions open at shutdown');

	for (const [i, c] of clients.entries()) {
		const ans = await c.ask('after-term.example', 'TXT', 200 + i);
		t.equal(ans.id, 200 + i, `${sources[i]}: answer after SIGTERM has its id`);
		t.equal(backendOf(ans), home[i], `${sources[i]}: from the same backend`);
	}
	const fresh = await TcpDnsClient.connect(t, port, '127.0.0.223').then(
		async (c) => (await c.ask('new.example', 'TXT', 300, 1000).then(() => 'answered', () => 'closed')),
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
	const c = await TcpDnsClient.connect(t, port, '127.0.0.230');
	t.equal((await c.ask('tcp.example', 'TXT', 42)).id, 42, 'session flows');
	const sigAt = Date.now();
	const exit = withDeadline(bbal.exit, 5000, 'bbal to exit');
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
		const snap = await statsSnapshot(sock);
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
