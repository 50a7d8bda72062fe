/*
 * The backend state machine and the registry, without I/O: a fake control
 * socket stands in for net.Socket and a variable stands in for the clock, so
 * a 15-second heartbeat deadline is one call to wheel.run().
 */

import { rename } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { Writable } from 'node:stream';
import t, { type Test } from 'tap';
import pino, { type Logger } from 'pino';
import {
	CONNECT_DEADLINE_SECS, HEARTBEAT_DEADLINE_SECS, HEARTBEAT_INTERVAL_SECS, MAX_RECONNECT_DELAY_SECS,
} from '../src/backend.js';
import { type Backend, Backends } from '../src/backends.js';
import { CLIENT_HEARTBEAT_FRAME, CLIENT_HELLO_FRAME, FRAME_INBOUND_UDP, FRAME_OUTBOUND_UDP } from '../src/protocol.js';
import { makeLogger } from '../src/log.js';
import { TimeoutWheel } from '../src/timeouts.js';
import {
	encodeUdpFrame, INBOUND_TCP_OK_FRAME, SERVER_HEARTBEAT_FRAME, SERVER_HELLO_FRAME,
} from './support/backend_frames.js';
import { FakeConnector, type FakeSocket } from './support/fake_socket.js';
import { makeSocketDir } from './support/fleet.js';
import { waitFor } from './support/wait.js';

interface Sent {
	addr: number;
	port: number;
	payload: Buffer;
	from: Backend;
}

function setup(dir = '/var/run/binder/sockets', log: Logger = pino({ level: 'silent' })) {
	let now = 1_000_000;
	const wheel = new TimeoutWheel(() => now);
	const connector = new FakeConnector();
	const sent: Sent[] = [];
	const reg = new Backends({
		socketDir: dir,
		log,
		wheel,
		onOutboundUdp: (addr, port, payload, from) => sent.push({ addr, port, payload, from }),
		connector: connector.connect,
	});
	return {
		wheel, reg, sent,
		/* Every socket the registry opened, oldest first. */
		sockets: connector.sockets,
		/* Step the clock and run the wheel, as the 1 s tick does. */
		advance(secs: number): void {
			now += secs * 1000;
			wheel.run(now);
		},
		last: (): FakeSocket => connector.last(),
	};
}

/* Let the per-turn flush (setImmediate) run. */
const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/* A backend brought to `ok` through connect and hello. */
function okBackend(env: ReturnType<typeof setup>, name: string): { be: Backend; sock: FakeSocket } {
	const be = env.reg.trackAndConnect(name) as Backend;
	const sock = env.last();
	sock.establish();
	return { be, sock };
}

t.test('a new socket is connected at once and becomes ok on SERVER_HELLO', async (t) => {
	const env = setup();
	const be = env.reg.trackAndConnect('5301') as Backend;
	t.equal(be.id, 5301, 'id from the socket name');
	t.equal(be.state, 'connecting');
	t.equal(be.stats.connStart, 1);
	t.equal(env.sockets.length, 1);
	t.equal(env.last().path, '/var/run/binder/sockets/5301');
	env.last().emit('connect');
	t.same(env.last().all(), CLIENT_HELLO_FRAME, 'CLIENT_HELLO is the first frame');
	t.notOk(be.ok, 'not ok before the hello');
	env.last().emit('data', SERVER_HELLO_FRAME);
	t.ok(be.ok);
	t.equal(be.reconnectDelaySecs, 1);
});

t.test('heartbeats: sent 5 s after hello, answered, sent again; a missing reply faults at 15 s', async (t) => {
	const env = setup();
	const { be, sock } = okBackend(env, '5301');
	env.advance(HEARTBEAT_INTERVAL_SECS - 1);
	await turn();
	t.equal(sock.writes.length, 1, 'no heartbeat before 5 s');
	env.advance(1);
	await turn();
	t.same(sock.writes[1], CLIENT_HEARTBEAT_FRAME, 'heartbeat at 5 s');
	t.ok(be.heartbeatOutstanding);
	sock.emit('data', SERVER_HEARTBEAT_FRAME);
	t.notOk(be.heartbeatOutstanding);
	t.ok(be.lastHeartbeatRttMs >= 0, 'round trip recorded');
	env.advance(HEARTBEAT_INTERVAL_SECS);
	await turn();
	t.same(sock.writes[2], CLIENT_HEARTBEAT_FRAME, 'next heartbeat 5 s after the reply');
	env.advance(HEARTBEAT_DEADLINE_SECS - 1);
	t.ok(be.ok, 'still ok 14 s into the deadline');
	env.advance(1);
	t.equal(be.state, 'waiting', 'faulted at 15 s');
	t.ok(sock.destroyed);
	t.equal(be.stats.faults, 1);
	env.advance(1);
	t.equal(be.state, 'connecting', 'reconnects after 1 s');
	t.equal(be.stats.connStart, 2);
});

t.test('no hello within 30 s faults the connect attempt', async (t) => {
	const env = setup();
	const be = env.reg.trackAndConnect('5301') as Backend;
	env.last().emit('connect');
	env.advance(CONNECT_DEADLINE_SECS - 1);
	t.equal(be.state, 'connecting');
	env.advance(1);
	t.equal(be.state, 'waiting');
	t.ok(env.last().destroyed);
});

t.test('reconnect back-off: 0, then 1, growing by 2, capped at 32, back to 1 after a hello', async (t) => {
	const env = setup();
	const be = env.reg.trackAndConnect('5301') as Backend;
	const delays: number[] = [];
	for (let i = 0; i < 20; i++) {
		env.last().connectError('ECONNREFUSED');
		t.equal(be.state, 'waiting');
		const before = env.sockets.length;
		let waited = 0;
		while (env.sockets.length === before && waited <= MAX_RECONNECT_DELAY_SECS) {
			env.advance(1);
			waited++;
		}
		delays.push(waited);
	}
	t.same(delays.slice(0, 17), [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 32]);
	t.same(delays.slice(17), [32, 32, 32]);
	t.equal(be.stats.connError, 20);
	env.last().establish();
	t.equal(be.reconnectDelaySecs, 1, 'reset by the hello');
	env.last().emit('end');
	env.advance(1);
	t.equal(be.state, 'connecting', 'reconnect 1 s after a fault of a healthy backend');
});

t.test('ENOENT marks the backend removed; it returns when a rescan sees the socket again', async (t) => {
	const env = setup();
	const { be, sock } = okBackend(env, '5301');
	sock.emit('end');
	t.equal(be.state, 'waiting');
	env.advance(1);
	env.last().connectError('ENOENT');
	t.equal(be.state, 'removed');
	t.ok(be.removed);
	const n = env.sockets.length;
	env.advance(120);
	t.equal(env.sockets.length, n, 'no reconnect attempts while removed');
	t.equal(env.reg.trackAndConnect('5301'), be, 'same backend object for the same path');
	t.equal(be.state, 'connecting', 'connects at once when the socket returns');
	t.equal(env.sockets.length, n + 1);
});

t.test('a socket bound afresh at the same path (a restarted backend) is tried at once, not after its back-off',
	async (t) => {
		const env = setup();
		const be = env.reg.trackAndConnect('5301', '100/1000') as Backend;
		const refused = (): void => {
			env.last().connectError('ECONNREFUSED');
		};
		refused();
		for (let i = 0; i < 5; i++) {
			env.advance(be.reconnectDelaySecs);
			refused();
		}
		t.equal(be.state, 'waiting');
		t.ok(be.reconnectDelaySecs >= 9, `the back-off has grown (${be.reconnectDelaySecs} s)`);
		const n = env.sockets.length;
		env.reg.trackAndConnect('5301', '100/1000');
		t.equal(env.sockets.length, n, 'the same socket file: the back-off is honoured');
		env.reg.trackAndConnect('5301', '100/2000');
		t.equal(env.sockets.length, n + 1, 'the same inode number but created anew (a later change time): connected at once');
		t.equal(be.state, 'connecting');
		env.last().establish();
		t.ok(be.ok, 'and ok on its hello');
	});

t.test('protocol violations on the control session fault the backend', async (t) => {
	const cases: Array<[string, Buffer[]]> = [
		['a frame before the hello', [SERVER_HEARTBEAT_FRAME]],
		['a second hello', [SERVER_HELLO_FRAME, SERVER_HELLO_FRAME]],
		['a heartbeat reply with none outstanding', [SERVER_HELLO_FRAME, SERVER_HEARTBEAT_FRAME]],
		['an unknown frame type', [SERVER_HELLO_FRAME, Buffer.from([0x39, 0x05, 0, 0])]],
		['OUTBOUND_UDP over 1500 bytes', [SERVER_HELLO_FRAME, encodeUdpFrame(FRAME_OUTBOUND_UDP, 1, 53, Buffer.alloc(1501))]],
		['INBOUND_TCP_OK on the control session', [SERVER_HELLO_FRAME, INBOUND_TCP_OK_FRAME]],
		['a balancer-side frame type', [SERVER_HELLO_FRAME, CLIENT_HELLO_FRAME]],
	];
	for (const [what, frames] of cases) {
		const env = setup();
		const be = env.reg.trackAndConnect('5301') as Backend;
		const sock = env.last();
		sock.emit('connect');
		for (const f of frames) {
			sock.emit('data', f);
		}
		t.equal(be.state, 'waiting', `${what}: faulted`);
		t.ok(sock.destroyed, `${what}: session closed`);
		t.equal(be.stats.faults, 1, `${what}: counted`);
	}
});

t.test('EOF and socket errors fault; the old socket is forgotten', async (t) => {
	const env = setup();
	const { be, sock } = okBackend(env, '5301');
	sock.emit('error', Object.assign(new Error('read ECONNRESET'), { code: 'ECONNRESET' }));
	t.equal(be.state, 'waiting');
	t.equal(be.stats.connError, 1);
	sock.emit('close');
	sock.emit('data', SERVER_HELLO_FRAME);
	t.equal(be.state, 'waiting', 'late events from the old socket change nothing');
	t.equal(be.stats.faults, 1);
});

t.test('OUTBOUND_UDP frames go to the handler, split anywhere', async (t) => {
	const env = setup();
	const { be, sock } = okBackend(env, '5301');
	const answer = Buffer.from('an answer of some bytes');
	const frame = encodeUdpFrame(FRAME_OUTBOUND_UDP, 0x7f000005, 4000, answer);
	/* mname writes header and payload separately; split mid-header too. */
	sock.emit('data', frame.subarray(0, 7));
	sock.emit('data', frame.subarray(7, 16));
	sock.emit('data', Buffer.concat([frame.subarray(16), frame]));
	t.equal(env.sent.length, 2);
	for (const s of env.sent) {
		t.equal(s.addr, 0x7f000005);
		t.equal(s.port, 4000);
		t.same(s.payload, answer);
		t.equal(s.from, be);
	}
	t.ok(be.ok);
});

t.test('writes queued in one turn leave in one write; a stuck session drops and counts', async (t) => {
	const env = setup();
	const { be, sock } = okBackend(env, '5301');
	const q = Buffer.from('query');
	for (let i = 0; i < 50; i++) {
		t.ok(be.sendUdp(0x7f000001 + i, 1000 + i, q));
	}
	t.equal(sock.writes.length, 1, 'nothing written before the turn ends');
	await turn();
	t.equal(sock.writes.length, 2, 'one write for fifty frames');
	const out = sock.writes[1];
	t.equal(out.length, 50 * (16 + q.length));
	t.same(out.subarray(0, 21), encodeUdpFrame(FRAME_INBOUND_UDP, 0x7f000001, 1000, q));
	t.equal(be.stats.udp, 50);

	sock.accept = false;
	be.sendUdp(1, 1, q);
	await turn();
	t.ok(be.stuck, 'write() returned false: stuck');
	t.notOk(be.sendUdp(1, 1, q), 'dropped while stuck');
	t.notOk(be.sendUdp(1, 1, q));
	t.equal(be.stats.stuck, 2);
	await turn();
	t.equal(sock.writes.length, 3, 'nothing queued while stuck');
	sock.accept = true;
	sock.emit('drain');
	t.notOk(be.stuck);
	t.ok(be.sendUdp(1, 1, q), 'accepted again after drain');
	t.ok(be.ok, 'a stuck session is not a fault by itself');
});

t.test('a session stuck for 2 s is faulted; one that drains in time is not', async (t) => {
	const env = setup();
	const { be, sock } = okBackend(env, '5301');
	sock.accept = false;
	be.sendUdp(1, 1, Buffer.from('q'));
	await turn();
	t.ok(be.stuck);
	env.advance(1);
	sock.emit('drain');
	env.advance(2);
	t.ok(be.ok, 'drained within the deadline: still ok');
	be.sendUdp(1, 1, Buffer.from('q'));
	await turn();
	t.ok(be.stuck, 'stuck again');
	env.advance(1);
	t.ok(be.ok, 'still ok after 1 s');
	env.advance(1);
	t.equal(be.state, 'waiting', 'faulted after 2 s stuck');
	t.ok(sock.destroyed, 'its queue is thrown away with the session');
	t.notOk(be.stuck);
});

t.test('ids: 5300-5399 names when free, otherwise one more than the highest', async (t) => {
	const env = setup('/s');
	t.equal(env.reg.trackAndConnect('5310')?.id, 5310);
	t.equal(env.reg.trackAndConnect('alpha')?.id, 5311);
	t.equal(env.reg.trackAndConnect('5400')?.id, 5312);
	t.equal(env.reg.trackAndConnect('05301')?.id, 5313);
	t.equal(env.reg.trackAndConnect('5300')?.id, 5300);
	t.same(env.reg.list().map((b) => b.id), [5300, 5310, 5311, 5312, 5313], 'listed in id order');
	const env2 = setup('/s');
	t.equal(env2.reg.trackAndConnect('x')?.id, 1, 'the first non-numeric name is id 1');
	t.equal(env2.reg.trackAndConnect('5301')?.id, 5301);
});

t.test('a socket path longer than sun_path is skipped, not truncated', async (t) => {
	const env = setup('/s');
	t.equal(env.reg.trackAndConnect('x'.repeat(105)), null, '108 bytes: skipped');
	t.equal(env.reg.list().length, 0);
	t.equal(env.reg.trackAndConnect('y'.repeat(104))?.path.length, 107, '107 bytes: used');
});

t.test('round-robin selection skips backends that are not ok, in id order', async (t) => {
	const env = setup();
	const a = okBackend(env, '5301').be;
	const b = okBackend(env, '5302').be;
	const c = okBackend(env, '5303').be;
	t.same([1, 2, 3, 4].map(() => env.reg.select()?.id), [5301, 5302, 5303, 5301]);
	b.fault('test');
	t.same([1, 2, 3].map(() => env.reg.select()?.id), [5303, 5301, 5303]);
	a.fault('test');
	c.fault('test');
	t.equal(env.reg.select(), null, 'none ok: none selected');
});

/* n more remotes on `be`, as remotes.ts counts them. */
function load(be: Backend, n: number): void {
	for (let i = 0; i < n; i++) {
		be.addRemote();
	}
}

t.test('rebalance plan: move (spread - ok backends) from the fullest', async (t) => {
	const env = setup();
	const a = okBackend(env, '5301').be;
	const b = okBackend(env, '5302').be;
	const c = okBackend(env, '5303').be;
	load(a, 10);
	load(b, 7);
	load(c, 5);
	const plan = env.reg.rebalancePlan();
	t.equal(plan?.backend, a);
	t.equal(plan?.count, 2, 'spread 5 - 3 backends');
	a.removeRemote();
	a.removeRemote();
	t.equal(env.reg.rebalancePlan(), null, 'spread 3 is within 3 backends');
	c.fault('test');
	t.equal(env.reg.rebalancePlan(), null, 'spread over ok backends only: 8 - 7');
	a.fault('test');
	b.fault('test');
	t.equal(env.reg.rebalancePlan(), null, 'no ok backend: no plan');
});

/* A logger at `level` whose records land in an array. */
function memoryLog(level: 'trace' | 'info' = 'info') {
	const records: Array<Record<string, unknown>> = [];
	const dest = new Writable({
		write(chunk: Buffer, _enc, cb) {
			records.push(JSON.parse(chunk.toString()) as Record<string, unknown>);
			cb();
		},
	});
	return { log: makeLogger(level, dest), records };
}

t.test('the control session asks for the larger write high-water mark', async (t) => {
	const env = setup();
	env.reg.trackAndConnect('5301');
	t.equal(env.last().highWaterMark, 256 * 1024);
});

t.test('every change of state is traced, sub-states of ok included', async (t) => {
	const { log, records } = memoryLog('trace');
	const env = setup('/s', log);
	const { sock } = okBackend(env, '5301');
	env.advance(HEARTBEAT_INTERVAL_SECS);
	sock.emit('data', SERVER_HEARTBEAT_FRAME);
	sock.accept = false;
	env.reg.lookup(5301)?.sendUdp(1, 1, Buffer.from('q'));
	await turn();
	sock.emit('drain');
	sock.emit('end');
	env.reg.close();
	const changes = records.filter((r) => r.msg === 'backend state').map((r) => `${String(r.from)} -> ${String(r.to)}`);
	t.same(changes, [
		'new -> connecting',
		'connecting -> ok',
		'ok -> ok, heartbeat outstanding',
		'ok, heartbeat outstanding -> ok',
		'ok -> ok, stuck',
		'ok, stuck -> ok',
		'ok -> waiting 1 s',
		'waiting 1 s -> closed',
	]);
});

t.test('a backend waiting to reconnect carries its delay; the view shows the next one', async (t) => {
	const env = setup();
	const be = env.reg.trackAndConnect('5301') as Backend;
	t.equal(be.reconnectDelaySecs, 1, 'a first failure will wait 1 s');
	env.last().connectError('ECONNREFUSED');
	t.equal(be.state, 'waiting');
	t.equal(be.reconnectDelaySecs, 3, 'waiting 1 s now, 3 s after the next failure');
	t.notOk(be.heartbeatOutstanding);
	t.notOk(be.stuck);
	env.advance(1);
	t.equal(be.state, 'connecting', 'reconnected after its 1 s');
});

t.test('the socket file gone: an ok backend is removed (a fault), a waiting one just removed', async (t) => {
	const env = setup();
	const { be, sock } = okBackend(env, '5301');
	be.socketGone();
	t.equal(be.state, 'removed');
	t.equal(be.stats.faults, 1, 'losing an ok backend counts as a fault');
	t.ok(sock.destroyed, 'its session is closed');
	be.socketGone();
	t.equal(be.stats.faults, 1, 'once');
	const n = env.sockets.length;
	env.advance(60);
	t.equal(env.sockets.length, n, 'no reconnects while removed');

	const other = env.reg.trackAndConnect('5302') as Backend;
	env.last().connectError('ECONNREFUSED');
	t.equal(other.state, 'waiting');
	other.socketGone();
	t.equal(other.state, 'removed');
	t.equal(other.stats.faults, 1, 'only the failed connect counted');
	env.advance(60);
	t.equal(env.sockets.length, n + 1, 'its reconnect was called off');
	env.reg.trackAndConnect('5302');
	t.equal(other.state, 'connecting', 'back when the socket is');
});

t.test('close(): every backend closed, nothing reconnects, late events change nothing', async (t) => {
	const env = setup();
	const a = okBackend(env, '5301');
	const b = env.reg.trackAndConnect('5302') as Backend;
	env.last().connectError('ECONNREFUSED');
	a.be.sendUdp(1, 1, Buffer.from('q'));
	env.reg.close();
	env.reg.close();
	t.same([a.be.state, b.state], ['closed', 'closed']);
	t.ok(a.sock.destroyed);
	await turn();
	t.equal(a.sock.writes.length, 1, 'what was queued is thrown away, not written');
	const n = env.sockets.length;
	env.advance(120);
	t.equal(env.sockets.length, n, 'no reconnect after close');
	a.sock.emit('data', SERVER_HELLO_FRAME);
	a.be.fault('late');
	a.be.socketGone();
	env.reg.trackAndConnect('5302', 'x/1');
	t.same([a.be.state, b.state], ['closed', 'closed'], 'and stay closed');
	t.equal(env.sockets.length, n);
	t.throws(() => a.be.sendUdp(1, 1, Buffer.from('q')), 'traffic for a closed backend is a bug');
});

t.test('the remote count never goes negative', async (t) => {
	const env = setup();
	const be = env.reg.trackAndConnect('5301') as Backend;
	be.addRemote();
	be.removeRemote();
	t.equal(be.remoteCount, 0);
	t.throws(() => be.removeRemote(), /backend 5301 remote count would go negative/);
	t.equal(be.remoteCount, 0);
});

t.test('one turn, several backends: one write each, a burst over a chunk leaves corked and whole', async (t) => {
	const env = setup();
	const a = okBackend(env, '5301');
	const b = okBackend(env, '5302');
	const q = Buffer.alloc(100, 7);
	const expected: Buffer[] = [];
	for (let i = 0; i < 400; i++) {
		a.be.sendUdp(0x0a000000 + i, 2000 + i, q);
		expected.push(encodeUdpFrame(FRAME_INBOUND_UDP, 0x0a000000 + i, 2000 + i, q));
	}
	b.be.sendUdp(1, 2, q);
	await turn();
	t.equal(b.sock.writes.length, 2, 'hello, then one write for the turn');
	t.same(b.sock.writes[1], encodeUdpFrame(FRAME_INBOUND_UDP, 1, 2, q));
	const out = Buffer.concat(a.sock.writes.slice(1));
	t.same(out, Buffer.concat(expected), '46,400 bytes, exactly the frames in order');
	t.equal(a.sock.corkedWrites.length, 1, 'written under one cork');
	t.equal(a.sock.corkedWrites[0], a.sock.writes.length - 1, 'every piece of the turn inside it');
	t.ok(a.sock.corkedWrites[0] > 1, 'in more than one piece');
	a.be.sendUdp(3, 4, q);
	await turn();
	t.equal(a.sock.writes.length, 2 + a.sock.corkedWrites[0], 'the next turn: one more write, no cork');
	t.equal(a.sock.corkedWrites.length, 1);
});

t.test('the directory read error and "no backends available" each have their own gate', async (t) => {
	const { log, records } = memoryLog();
	const env = setup('/nonexistent/bbal-sockets', log);
	await env.reg.rescan();
	t.equal(env.reg.select(), null);
	t.match(records.map((r) => r.msg), ['error reading socket directory', 'no backends available'],
		'the one does not silence the other');
	await env.reg.rescan();
	t.equal(env.reg.select(), null);
	t.equal(records.length, 2, 'each is held back within its interval');
	env.advance(5);
	await env.reg.rescan();
	t.match(records[2], { msg: 'error reading socket directory', socket_dir: '/nonexistent/bbal-sockets', not_logged: 1 });
	t.equal(env.reg.select(), null);
	t.match(records[3], { msg: 'no backends available', backends: 0, not_logged: 1 });
});

/* A listening AF_UNIX socket at dir/name, closed (and so unlinked) on teardown or by the returned function. */
async function socketFile(t: Test, dir: string, name: string): Promise<() => Promise<void>> {
	const srv = net.createServer();
	await new Promise<void>((resolve) => srv.listen(path.join(dir, name), resolve));
	const close = (): Promise<void> => new Promise((resolve) => {
		srv.close(() => resolve());
	});
	t.teardown(() => {
		srv.close();
	});
	return close;
}

t.test('rescan: new sockets connect, vanished ones are removed, returning and re-created ones connect at once',
	async (t) => {
		const dir = await makeSocketDir(t);
		const env = setup(dir);
		await socketFile(t, dir, '5301');
		const close5302 = await socketFile(t, dir, '5302');
		await socketFile(t, dir, 'other');
		await env.reg.rescan();
		t.same(env.reg.list().map((b) => [b.id, b.state]), [[5301, 'connecting'], [5302, 'connecting'], [5303, 'connecting']],
			'each socket found, named ids first come first served, connected at once');
		t.same(env.sockets.map((s) => path.basename(s.path)), ['5301', '5302', 'other']);
		for (const s of env.sockets) {
			s.establish();
		}
		await env.reg.rescan();
		t.equal(env.sockets.length, 3, 'a rescan leaves connected backends alone');

		await close5302();
		await env.reg.rescan();
		const be = env.reg.lookup(5302) as Backend;
		t.equal(be.state, 'removed', 'its socket file is gone: removed although its session was up');
		t.ok(env.sockets[1].destroyed);

		await socketFile(t, dir, '5302');
		await env.reg.rescan();
		t.equal(be.state, 'connecting', 'the socket is back: connected at once');
		t.equal(env.reg.lookupPath(path.join(dir, '5302')), be, 'the same Backend for the same path');

		/* A backend that fails twice waits 3 s; its socket bound afresh cuts that short. */
		env.last().connectError('ECONNREFUSED');
		env.advance(1);
		env.last().connectError('ECONNREFUSED');
		t.equal(be.state, 'waiting');
		const n = env.sockets.length;
		await env.reg.rescan();
		t.equal(env.sockets.length, n, 'the same socket file: the back-off is honoured');
		await rename(path.join(dir, '5302'), path.join(dir, 'tmp'));
		await rename(path.join(dir, 'tmp'), path.join(dir, '5302'));
		await env.reg.rescan();
		t.equal(env.sockets.length, n + 1, 'the file changed (a new change time): connected at once');
		t.equal(be.state, 'connecting');
	});

t.test('watch(): a change in the directory brings a rescan within moments', async (t) => {
	const dir = await makeSocketDir(t);
	const env = setup(dir);
	env.reg.watch();
	t.teardown(() => env.reg.close());
	await socketFile(t, dir, '5301');
	await waitFor(() => env.sockets.length === 1, 2000, 10, 'the new socket connected without a periodic rescan');
	t.equal(env.reg.lookup(5301)?.state, 'connecting');
});
