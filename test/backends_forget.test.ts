/*
 * Forgetting backends whose socket is gone (backends.ts, FORGETTING): not
 * before BACKEND_FORGET_SECS, not while a remote points to one as primary
 * or backup, the same Backend (and id) for a backend that restarts in the
 * meantime, a working Backend for a socket of that name found later, and a
 * registry that stays bounded while 10,000 names come and go.  Units on a
 * stepped clock and fake sockets (socket files made by hard links to one
 * bound socket, so thousands cost nothing), then the Balancer in-process
 * with real mname backends, its metrics page dropping the forgotten
 * backend's series.
 */

import { link, unlink } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import pino from 'pino';
import t, { type Test } from 'tap';
import { Balancer } from '../src/balancer.js';
import { type Backend, Backends, BACKEND_FORGET_SECS } from '../src/backends.js';
import { makeLogger } from '../src/log.js';
import { ipv4ToU32 } from '../src/protocol.js';
import { TimeoutWheel } from '../src/timeouts.js';
import { encodeQuery } from './support/dns_messages.js';
import { FakeConnector, fakeTable } from './support/fake_socket.js';
import { FakeTransport } from './support/fake_transport.js';
import { makeSocketDir, startBackend } from './support/fleet.js';
import { freePort } from './support/ports.js';
import { waitFor } from './support/wait.js';

function setup(dir: string) {
	let now = 1_000_000;
	const wheel = new TimeoutWheel(() => now);
	const connector = new FakeConnector();
	const forgotten: number[] = [];
	const reg = new Backends({
		socketDir: dir, log: pino({ level: 'silent' }), wheel, connector: connector.connect,
		onOutboundUdp: () => {}, onForget: (be) => forgotten.push(be.id),
	});
	return {
		wheel, reg, connector, forgotten,
		advance(secs: number): void {
			now += secs * 1000;
			wheel.run(now);
		},
	};
}

/* One bound socket elsewhere; add(name) links it into dir (a socket file there), gone(name) removes that. */
async function socketFiles(t: Test, dir: string) {
	const seed = path.join(await makeSocketDir(t), 'seed');
	const srv = net.createServer();
	await new Promise<void>((resolve) => srv.listen(seed, resolve));
	t.teardown(() => {
		srv.close();
	});
	return {
		add: (name: string): Promise<void> => link(seed, path.join(dir, name)),
		gone: (name: string): Promise<void> => unlink(path.join(dir, name)),
	};
}

t.test('a removed backend is forgotten a minute after, at a rescan; a socket of that name later is a new, working one',
	async (t) => {
		const dir = await makeSocketDir(t);
		const files = await socketFiles(t, dir);
		const env = setup(dir);
		await files.add('5301');
		await files.add('other');
		await env.reg.rescan();
		for (const s of env.connector.sockets) {
			s.establish();
		}
		const old = env.reg.lookupPath(path.join(dir, 'other')) as Backend;
		t.same(env.reg.list().map((be) => [be.id, be.ok]), [[5301, true], [5302, true]]);

		await files.gone('other');
		await env.reg.rescan();
		t.equal(old.state, 'removed');
		env.advance(BACKEND_FORGET_SECS - 1);
		await env.reg.rescan();
		t.equal(env.reg.lookup(5302), old, 'kept for under a minute');

		/* A restart within the minute: the same Backend, the same id. */
		await files.add('other');
		await env.reg.rescan();
		t.equal(env.reg.lookupPath(path.join(dir, 'other')), old, 'the restarted backend finds its Backend');
		env.connector.last().establish();
		t.ok(old.ok);
		t.equal(old.id, 5302, 'and its id');

		await files.gone('other');
		await env.reg.rescan();
		env.advance(BACKEND_FORGET_SECS);
		t.equal(env.reg.size, 2, 'nothing forgotten between rescans');
		await env.reg.rescan();
		t.same(env.reg.list().map((be) => be.id), [5301], 'forgotten at the first rescan a minute after');
		t.equal(env.reg.lookupPath(path.join(dir, 'other')), undefined);
		t.equal(old.state, 'closed');
		t.same(env.forgotten, [5302], 'onForget told');
		t.equal(env.reg.forgotten, 1);
		t.equal(env.wheel.list().filter((to) => to.name.startsWith('backend 5302')).length, 0, 'none of its timeouts armed');

		await files.add('other');
		await env.reg.rescan();
		const fresh = env.reg.lookupPath(path.join(dir, 'other')) as Backend;
		t.not(fresh, old, 'a new Backend for the name');
		t.equal(fresh.state, 'connecting', 'connected at once');
		env.connector.last().establish();
		t.ok(fresh.ok, 'and working');
		t.ok([env.reg.select()?.id, env.reg.select()?.id].includes(fresh.id), 'selected by round-robin');
	});

t.test('a removed backend is kept while a remote points to it, as primary or as backup', async (t) => {
	const tbl = fakeTable(100);
	const a = tbl.up('5301');
	const b = tbl.up('5302');
	const ra = tbl.remotes.lookup(ipv4ToU32('10.0.0.1'));
	t.equal(ra.chooseBackend(), a);
	const rb = tbl.remotes.lookup(ipv4ToU32('10.0.0.2'));
	t.equal(rb.chooseBackend(), b);
	/* b's primary falls over: b's remote borrows a; then a's socket goes. */
	b.fault('test');
	t.equal(rb.chooseBackend(), a);
	t.same([a.remoteCount, a.backupCount], [1, 1]);
	a.socketGone();
	tbl.tick(BACKEND_FORGET_SECS + 1);
	tbl.backends.forgetGone();
	t.equal(tbl.backends.lookup(5301), a, 'kept: one remote has it as primary, another as backup');

	t.equal(ra.chooseBackend(), null, 'its primary removed, the remote chooses afresh (none is ok)');
	t.equal(a.remoteCount, 0);
	tbl.backends.forgetGone();
	t.equal(tbl.backends.lookup(5301), a, 'still a backup');
	t.equal(rb.chooseBackend(), null, 'the backup is not ok: the remote lets go of it');
	t.equal(a.backupCount, 0);
	tbl.backends.forgetGone();
	t.equal(tbl.backends.lookup(5301), undefined, 'forgotten once nobody points to it');
	t.equal(tbl.backends.forgotten, 1);
});

t.test('10,000 socket names come and go: the registry stays bounded', async (t) => {
	const dir = await makeSocketDir(t);
	const files = await socketFiles(t, dir);
	const env = setup(dir);
	const batch = 100;
	const stepSecs = 6;
	let most = 0;
	for (let i = 0; i < 10_000; i += batch) {
		const names = Array.from({ length: batch }, (_, j) => `be-${i + j}`);
		await Promise.all(names.map((n) => files.add(n)));
		await env.reg.rescan();
		await Promise.all(names.map((n) => files.gone(n)));
		env.advance(stepSecs);
		await env.reg.rescan();
		most = Math.max(most, env.reg.list().length);
	}
	const bound = batch * (Math.ceil(BACKEND_FORGET_SECS / stepSecs) + 1);
	t.ok(most <= bound, `at most ${most} backends held at once (bound ${bound})`);
	env.advance(BACKEND_FORGET_SECS);
	await env.reg.rescan();
	t.equal(env.reg.list().length, 0, 'all forgotten a minute after the last went');
	t.equal(env.reg.forgotten, 10_000);
	t.equal(env.wheel.list().length, 0, 'no timeout left armed');
	/* Ids are PROTOCOL's "one more than the highest in use": they rose while the names overlapped, and start over now. */
	await files.add('later');
	await env.reg.rescan();
	t.same(env.reg.list().map((be) => be.id), [1], 'with none in use, the next name gets id 1');
});

/* /metrics as text. */
function scrape(port: number): Promise<string> {
	return new Promise((resolve, reject) => {
		http.get({ host: '127.0.0.1', port, path: '/metrics' }, (res) => {
			let body = '';
			res.setEncoding('utf8');
			res.on('data', (d: string) => {
				body += d;
			});
			res.on('end', () => resolve(body));
		}).on('error', reject);
	});
}

t.test('the Balancer with real mname backends: remotes leave the removed backend, it is forgotten, '
	+ 'its metrics series go, and a new one at its path serves', async (t) => {
	const dir = await makeSocketDir(t);
	await startBackend(t, dir, '5301');
	const other = await startBackend(t, dir, 'other');
	let now = Date.parse('2030-01-02T03:04:05.000Z');
	const udp = new FakeTransport();
	const metricsPort = await freePort();
	const bal = new Balancer({
		bind: '127.0.0.1', port: 0, socketDir: dir, log: makeLogger('fatal'), clock: () => now, transport: udp,
		watchDir: false, http: { host: '127.0.0.1', port: metricsPort },
	});
	t.teardown(() => bal.close());
	await bal.start();
	const advance = (secs: number): void => {
		now += secs * 1000;
		bal.wheel.run(now);
	};
	t.same(bal.backends.list().map((be) => [be.id, be.ok]), [[5301, true], [5302, true]]);
	/* Two remotes, one on each backend (round-robin). */
	const r1 = ipv4ToU32('127.0.7.1');
	const r2 = ipv4ToU32('127.0.7.2');
	udp.deliver(encodeQuery('a.example', 'TXT', 1), r1, 4001);
	udp.deliver(encodeQuery('b.example', 'TXT', 2), r2, 4002);
	await waitFor(() => udp.sent.length === 2, 3000, 5, 'two answers');
	/* A heartbeat round trip each, so each has a histogram series. */
	advance(5);
	const rtt = (): Promise<string> => scrape(metricsPort);
	await waitFor(async () => (await rtt()).includes('bbal_backend_heartbeat_rtt_seconds_count{backend="5302"}'), 3000, 10,
		'a heartbeat series for 5302');
	const onOther = bal.remotes.list().find((r) => r.primary?.id === 5302);
	t.ok(onOther, 'a remote on 5302');

	await other.kill('SIGTERM');
	await bal.backends.rescan();
	const gone = bal.backends.lookup(5302) as Backend;
	t.equal(gone.state, 'removed');
	advance(BACKEND_FORGET_SECS);
	await bal.backends.rescan();
	t.equal(bal.backends.lookup(5302), gone, 'a remote still has it as primary: kept');

	/* Its next query moves it to 5301, which lets 5302 go. */
	const addr = (onOther as { addr: number }).addr;
	udp.deliver(encodeQuery('c.example', 'TXT', 3), addr, 4003);
	await waitFor(() => udp.sent.length === 3, 3000, 5, 'the third answer');
	t.equal((onOther as { primary: Backend | null }).primary?.id, 5301, 'the remote chose afresh');
	await bal.backends.rescan();
	t.equal(bal.backends.lookup(5302), undefined, 'forgotten');
	const page = await scrape(metricsPort);
	t.notMatch(page, /backend="5302"/, 'no series of the forgotten backend on /metrics');
	t.match(page, /bbal_backend_heartbeat_rtt_seconds_count\{backend="5301"\}/, 'the others keep theirs');
	t.match(page, /bbal_backends_forgotten_total 1/);

	await startBackend(t, dir, 'other');
	await bal.backends.rescan();
	const fresh = bal.backends.lookupPath(path.join(dir, 'other')) as Backend;
	await waitFor(() => fresh.ok, 3000, 5, 'the new backend at that path says hello');
	t.equal(fresh.id, 5302, 'its id chosen afresh: one more than the highest');
	t.not(fresh, gone);
	const r3 = ipv4ToU32('127.0.7.3');
	udp.deliver(encodeQuery('d.example', 'TXT', 4), r3, 4004);
	await waitFor(() => udp.sent.length === 4, 3000, 5, 'the fourth answer');
	t.equal(bal.remotes.list().find((r) => r.addr === r3)?.primary, fresh, 'a new remote goes to it, and is answered');
});
