/*
 * The control session's read budget (src/control_reader.ts): at most
 * CONTROL_FRAMES_PER_TURN frames a turn per session, the rest kept and the
 * socket paused until the turn's end, nothing lost or reordered, a fault or
 * close while paused clean.  First without I/O (a fake socket, the turns
 * are setImmediate's), then over a real AF_UNIX socket against a backend
 * that floods, beside a real mname whose answers must all come back.
 */

import net from 'node:net';
import path from 'node:path';
import pino from 'pino';
import t from 'tap';
import { CONTROL_FRAMES_PER_TURN } from '../src/control_reader.js';
import { type Backend, Backends, connectUnix } from '../src/backends.js';
import { FRAME_OUTBOUND_UDP, ipv4ToU32 } from '../src/protocol.js';
import { TimeoutWheel } from '../src/timeouts.js';
import { encodeUdpFrame, SERVER_HEARTBEAT_FRAME } from './support/backend_frames.js';
import { encodeQuery } from './support/dns_messages.js';
import { FakeBackend } from './support/fake_backend.js';
import { FakeConnector } from './support/fake_socket.js';
import { makeSocketDir, startBackend } from './support/fleet.js';
import { waitFor } from './support/wait.js';

const BUDGET = CONTROL_FRAMES_PER_TURN;
const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/* A backend 5301, ok, its hello's turn over (the hello is a frame of that turn's budget). */
async function setup() {
	let now = 1_000_000;
	const wheel = new TimeoutWheel(() => now);
	const connector = new FakeConnector();
	const ports: number[] = [];
	const reg = new Backends({
		socketDir: '/s', log: pino({ level: 'silent' }), wheel, connector: connector.connect,
		onOutboundUdp: (_addr, port) => ports.push(port),
	});
	const be = reg.trackAndConnect('5301') as Backend;
	const sock = connector.last();
	sock.establish();
	await turn();
	return {
		be, sock, ports, connector,
		advance(secs: number): void {
			now += secs * 1000;
			wheel.run(now);
		},
	};
}

/* n OUTBOUND_UDP frames, ports first, first+1, ... */
function answers(n: number, first = 1): Buffer {
	return Buffer.concat(Array.from({ length: n }, (_, i) => encodeUdpFrame(FRAME_OUTBOUND_UDP, 0x7f000005, first + i, Buffer.from('ans'))));
}

const range = (n: number, first = 1): number[] => Array.from({ length: n }, (_, i) => first + i);

t.test('a flood is read at most the budget a turn; the rest waits, in order, and the socket resumes after it', async (t) => {
	const env = await setup();
	const n = BUDGET * 3 + 10;
	env.sock.emit('data', answers(n));
	t.equal(env.ports.length, BUDGET, 'one turn: the budget, not the whole chunk');
	t.ok(env.sock.paused, 'the socket is paused: no more reads from the kernel');
	t.equal(env.be.stats.throttled, 1);
	await turn();
	t.equal(env.ports.length, 2 * BUDGET, 'the next turn: the budget again, from the kept bytes');
	t.ok(env.sock.paused);
	await turn();
	await turn();
	t.same(env.ports, range(n), 'every frame, once, in order');
	t.notOk(env.sock.paused, 'resumed once the kept bytes are read');
	t.equal(env.be.stats.throttled, 3, 'three turns hit the budget');
	t.ok(env.be.ok);
});

t.test('the budget is per turn, not per read: small chunks in one turn share it', async (t) => {
	const env = await setup();
	for (let i = 0; i < 5; i++) {
		env.sock.emit('data', answers(100, 1 + 100 * i));
	}
	t.equal(env.ports.length, BUDGET, 'five reads of 100 frames in one turn: 256 processed');
	t.ok(env.sock.paused);
	await turn();
	await turn();
	t.same(env.ports, range(500));
	t.notOk(env.sock.paused);

	/* Spent to the last byte of a chunk: the next chunk of the turn is kept whole. */
	env.sock.emit('data', answers(BUDGET, 1000));
	t.notOk(env.sock.paused, 'exactly the budget, nothing left over');
	env.sock.emit('data', answers(3, 5000));
	t.equal(env.ports.length, 500 + BUDGET, 'nothing more this turn');
	t.ok(env.sock.paused);
	await turn();
	t.same(env.ports.slice(-3), [5000, 5001, 5002]);
	t.notOk(env.sock.paused);

	/* A quiet session's budget is renewed each turn (the 3 read at the last turn's end counted against this one). */
	await turn();
	for (let i = 0; i < 4; i++) {
		env.sock.emit('data', answers(BUDGET - 1, 10_000 * (i + 1)));
		t.notOk(env.sock.paused, `turn ${i}: under the budget`);
		await turn();
	}
});

t.test('a heartbeat reply and a violation behind a flood are read in their turn', async (t) => {
	const env = await setup();
	env.advance(5);
	env.sock.emit('data', Buffer.concat([answers(BUDGET + 5), SERVER_HEARTBEAT_FRAME, answers(2, 9000)]));
	t.ok(env.be.heartbeatOutstanding, 'the reply waits behind the flood');
	await turn();
	t.notOk(env.be.heartbeatOutstanding, 'and is read the next turn, not lost');
	t.equal(env.ports.length, BUDGET + 7);

	const bad = Buffer.alloc(4);
	bad.writeUInt32LE(77, 0);
	env.sock.emit('data', Buffer.concat([answers(BUDGET + 1, 20_000), bad, answers(10, 30_000)]));
	t.ok(env.be.ok, 'the garbage is not read yet');
	await turn();
	t.equal(env.be.state, 'waiting', 'read in its turn, it faults the backend');
	t.same(env.ports.slice(-1), [20_000 + BUDGET], 'nothing after it is taken');
	t.ok(env.sock.destroyed);
});

t.test('a fault or close while paused: the kept bytes are dropped, nothing is read again', async (t) => {
	const env = await setup();
	env.sock.emit('data', answers(BUDGET * 2));
	t.ok(env.sock.paused);
	env.sock.emit('error', Object.assign(new Error('read ECONNRESET'), { code: 'ECONNRESET' }));
	t.equal(env.be.state, 'waiting');
	await turn();
	await turn();
	t.equal(env.ports.length, BUDGET, 'the kept frames of the dead session are not sent');

	env.advance(1);
	const sock2 = env.connector.last();
	t.not(sock2, env.sock, 'reconnected');
	sock2.establish();
	t.ok(env.be.ok);
	await turn();
	sock2.emit('data', answers(BUDGET * 2, 50_000));
	t.equal(env.ports.length, 2 * BUDGET, 'a fresh session starts with a fresh budget');
	env.be.close();
	await turn();
	t.equal(env.ports.length, 2 * BUDGET, 'closed while paused: nothing more');
});

t.test('over a real socket: a flooding backend is held to the budget and its unread bytes are bounded; '
	+ 'a real mname beside it answers every query', async (t) => {
	const dir = await makeSocketDir(t);
	await startBackend(t, dir, '5301');
	const flooder = await FakeBackend.listen(t, path.join(dir, '5302'));
	flooder.flood(ipv4ToU32('127.0.0.9'), 9, Buffer.alloc(28, 0x5a));
	const wheel = new TimeoutWheel(() => 1_000_000);
	const sockets = new Map<string, net.Socket>();
	/* Frames handed up per backend, and the most of 5302's in one turn. */
	const answers5301: number[] = [];
	let floodThisTurn = 0;
	let floodMaxPerTurn = 0;
	let floodTotal = 0;
	const reg = new Backends({
		socketDir: dir, log: pino({ level: 'silent' }), wheel,
		connector: (p, hwm) => {
			const s = connectUnix(p, hwm);
			sockets.set(path.basename(p), s);
			return s;
		},
		onOutboundUdp: (_addr, port, _payload, from) => {
			if (from.id === 5301) {
				answers5301.push(port);
			} else {
				floodThisTurn++;
				floodTotal++;
			}
		},
	});
	t.teardown(() => reg.close());
	let stop = false;
	let maxUnread = 0;
	let turns = 0;
	const perTurn = (): void => {
		floodMaxPerTurn = Math.max(floodMaxPerTurn, floodThisTurn);
		floodThisTurn = 0;
		const s = sockets.get('5302');
		maxUnread = Math.max(maxUnread, s?.readableLength ?? 0);
		turns++;
		if (!stop) {
			setImmediate(perTurn);
		}
	};
	setImmediate(perTurn);
	await reg.rescan();
	await waitFor(() => reg.list().every((be) => be.ok), 5000, 5, 'both backends ok');
	await waitFor(() => floodTotal > 20 * CONTROL_FRAMES_PER_TURN, 5000, 5, 'the flood under way');
	const mname = reg.lookup(5301) as Backend;
	const n = 200;
	for (let i = 0; i < n; i++) {
		mname.sendUdp(ipv4ToU32('127.0.0.2'), 10_000 + i, encodeQuery('q.example', 'TXT', i));
		if (i % 20 === 19) {
			await turn();
		}
	}
	await waitFor(() => answers5301.length === n, 5000, 5, 'every query to the real mname answered');
	stop = true;
	flooder.stopFlood();
	t.same([...answers5301].sort((a, b) => a - b), range(n, 10_000), 'each answered once');
	t.ok(floodTotal > 20 * CONTROL_FRAMES_PER_TURN, `the flood ran (${floodTotal} frames over ${turns} turns)`);
	/* One turn's frames can straddle the probe's setImmediate: at most two budgets between two probes. */
	t.ok(floodMaxPerTurn <= 2 * CONTROL_FRAMES_PER_TURN, `at most the budget a turn (${floodMaxPerTurn})`);
	t.ok(maxUnread <= 256 * 1024, `unread bytes inside bbal bounded (${maxUnread})`);
	t.ok(reg.lookup(5302)?.ok, 'the flooder is throttled, not faulted');
	t.ok((reg.lookup(5302)?.stats.throttled ?? 0) > 0);
	await flooder.close();
});
