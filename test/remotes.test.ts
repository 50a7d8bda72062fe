/*
 * Remotes without I/O: primary and backup choice, the return to the primary,
 * removed primaries, idle expiry and rebalancing, over a registry whose
 * backends are driven to ok or faulted through fake sockets.
 */

import { EventEmitter } from 'node:events';
import type net from 'node:net';
import t from 'tap';
import pino from 'pino';
import { type Backend, Backends } from '../src/backends.js';
import { SERVER_HELLO_FRAME } from '../src/protocol.js';
import { REMOTE_IDLE_EXPIRY_SECS, Remotes } from '../src/remotes.js';
import { TimeoutWheel } from '../src/timeouts.js';

class FakeSocket extends EventEmitter {
	write(): boolean {
		return true;
	}
	cork(): void {}
	uncork(): void {}
	destroy(): this {
		return this;
	}
}

function setup(names: string[]) {
	let now = 5_000_000;
	const wheel = new TimeoutWheel(() => now);
	const log = pino({ level: 'silent' });
	let sock = new FakeSocket();
	const backends = new Backends({
		dir: '/s',
		log,
		wheel,
		onOutboundUdp: () => {},
		connector: () => {
			sock = new FakeSocket();
			return sock as unknown as net.Socket;
		},
	});
	const remotes = new Remotes({ log, backends, wheel });
	const bes = new Map<string, Backend>();
	/* Bring a backend (back) to ok: found, or reconnected, then hello. */
	const up = (name: string): Backend => {
		const be = backends.foundPath(name) as Backend;
		if (be.state === 'waiting') {
			be.connect();
		}
		sock.emit('connect');
		sock.emit('data', SERVER_HELLO_FRAME);
		t.ok(be.ok, `${name} is ok`);
		bes.set(name, be);
		return be;
	};
	for (const n of names) {
		up(n);
	}
	return {
		wheel, backends, remotes, up,
		lastSocket: () => sock,
		be: (name: string) => bes.get(name) as Backend,
		advance(secs: number): void {
			now += secs * 1000;
			wheel.run(now);
		},
		/* The backend a remote would use now, by id (0 for none). */
		serve(addr: number): number {
			return remotes.lookup(addr).backend()?.id ?? 0;
		},
	};
}

const ip = (last: number): number => 0x7f000000 + last;

t.test('new remotes are spread round-robin and stay with their primary', async (t) => {
	const env = setup(['5301', '5302', '5303']);
	t.same([1, 2, 3, 4, 5].map((n) => env.serve(ip(n))), [5301, 5302, 5303, 5301, 5302]);
	t.same([1, 2, 3, 4, 5].map((n) => env.serve(ip(n))), [5301, 5302, 5303, 5301, 5302], 'sticky');
	t.same([5301, 5302, 5303].map((id) => env.backends.lookup(id)?.remotes), [2, 2, 1], 'counts');
	t.equal(env.remotes.size, 5);
});

t.test('a faulted primary lends its remotes a backup; they return when it is ok again', async (t) => {
	const env = setup(['5301', '5302', '5303']);
	env.serve(ip(1));
	env.serve(ip(2));
	const rem = env.remotes.peek(ip(1));
	t.equal(rem?.primary?.id, 5301);
	env.be('5301').fault('test');
	const backup = env.serve(ip(1));
	t.not(backup, 5301, 'served by another backend meanwhile');
	t.not(backup, 0);
	t.equal(rem?.backup?.id, backup);
	t.equal(rem?.primary?.id, 5301, 'the primary is kept');
	t.equal(env.be('5301').remotes, 1, 'a backup does not count as load');
	t.equal(env.serve(ip(1)), backup, 'the backup is sticky too');
	env.be(backup === 5302 ? '5302' : '5303').fault('test');
	const second = env.serve(ip(1));
	t.not(second, backup, 'a failed backup is replaced');
	t.not(second, 5301);
	env.up('5301');
	t.equal(env.serve(ip(1)), 5301, 'back to the primary');
	t.equal(rem?.backup, null);
});

t.test('no backend ok: no answer, and nothing is assigned', async (t) => {
	const env = setup(['5301']);
	env.be('5301').fault('test');
	t.equal(env.serve(ip(9)), 0);
	t.equal(env.remotes.peek(ip(9))?.primary, null);
	env.up('5301');
	t.equal(env.serve(ip(9)), 5301, 'assigned once a backend is ok');
});

t.test('a removed primary is forgotten: the remote chooses a new primary', async (t) => {
	const env = setup(['5301', '5302']);
	env.serve(ip(1));
	const old = env.be('5301');
	old.fault('test');
	env.advance(1);
	/* The reconnect finds the socket gone. */
	t.equal(old.state, 'connecting');
	env.lastSocket().emit('error', Object.assign(new Error('connect ENOENT'), { code: 'ENOENT' }));
	t.ok(old.removed);
	t.equal(env.serve(ip(1)), 5302);
	t.equal(env.remotes.peek(ip(1))?.primary?.id, 5302, 'new primary, not a backup');
	t.equal(old.remotes, 0);
	env.up('5301');
	t.equal(env.serve(ip(1)), 5302, 'does not go back to a backend it left');
});

t.test('remotes idle for 300 s are expired; active ones are kept', async (t) => {
	const env = setup(['5301', '5302']);
	env.serve(ip(1));
	env.serve(ip(2));
	env.advance(REMOTE_IDLE_EXPIRY_SECS - 10);
	env.serve(ip(2));
	env.advance(11);
	t.equal(env.remotes.expire(), 1);
	t.equal(env.remotes.peek(ip(1)), undefined, 'idle remote gone');
	t.ok(env.remotes.peek(ip(2)), 'active remote kept');
	t.equal(env.be('5301').remotes, 0, 'its backend count released');
	t.equal(env.be('5302').remotes, 1);
	t.equal(env.remotes.expired, 1);
});

t.test('rebalance clears the primary of N remotes of the fullest, in address order', async (t) => {
	const env = setup(['5301']);
	for (let n = 1; n <= 8; n++) {
		env.serve(ip(n));
	}
	t.equal(env.be('5301').remotes, 8);
	env.up('5302');
	const plan = env.backends.rebalancePlan();
	t.equal(plan?.backend.id, 5301);
	t.equal(plan?.count, 6, 'spread 8 - 2 ok backends');
	t.equal(env.remotes.rebalance(env.be('5301'), plan?.count ?? 0), 6);
	const cleared = env.remotes.list().filter((r) => r.primary === null).map((r) => r.addr - 0x7f000000);
	t.same(cleared, [1, 2, 3, 4, 5, 6], 'lowest addresses first');
	for (let n = 1; n <= 8; n++) {
		env.serve(ip(n));
	}
	t.same([env.be('5301').remotes, env.be('5302').remotes], [5, 3], 'they chose afresh, round-robin');
	t.equal(env.backends.rebalancePlan(), null, 'balanced enough');
});
