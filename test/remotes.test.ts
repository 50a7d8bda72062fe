/*
 * Remotes without I/O: primary and backup choice, the return to the primary,
 * removed primaries, idle expiry (and its exact boundary), rebalancing, the
 * cap and its second-chance eviction queue, and the rate windows, over a
 * registry whose backends are driven to ok or faulted through fake sockets
 * and a clock stepped by hand.  Remotes are read through list(), as the
 * stats snapshot reads them.
 */

import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import t from 'tap';
import pino from 'pino';
import { type Backend, Backends } from '../src/backends.js';
import { type Remote, REMOTE_IDLE_EXPIRY_SECS, Remotes } from '../src/remotes.js';
import { TimeoutWheel } from '../src/timeouts.js';
import { FakeConnector } from './support/fake_socket.js';

function setup(names: string[], maxRemotes?: number) {
	let now = 5_000_000;
	const wheel = new TimeoutWheel(() => now);
	const log = pino({ level: 'silent' });
	const connector = new FakeConnector();
	const backends = new Backends({
		socketDir: '/s',
		log,
		wheel,
		onOutboundUdp: () => {},
		connector: connector.connect,
	});
	const remotes = new Remotes({ log, backends, wheel, maxRemotes });
	const bes = new Map<string, Backend>();
	/*
	 * Bring a backend (back) to ok: its socket found, or found bound afresh
	 * (a restart, so a backend waiting out its back-off connects at once),
	 * then hello.
	 */
	let generation = 0;
	const up = (name: string): Backend => {
		const be = backends.trackAndConnect(name, `1/${++generation}`) as Backend;
		connector.last().establish();
		t.ok(be.ok, `${name} is ok`);
		bes.set(name, be);
		return be;
	};
	for (const n of names) {
		up(n);
	}
	return {
		wheel, backends, remotes, up,
		lastSocket: () => connector.last(),
		be: (name: string) => bes.get(name) as Backend,
		advance(secs: number): void {
			now += secs * 1000;
			wheel.run(now);
		},
		/* The backend a remote would use now, by id (0 for none). */
		serve(addr: number): number {
			return remotes.lookup(addr).chooseBackend()?.id ?? 0;
		},
		/* The remote held for addr, without touching it: through list(), as the stats snapshot reads. */
		held(addr: number): Remote | undefined {
			return remotes.list().find((r) => r.addr === addr);
		},
	};
}

const ip = (last: number): number => 0x7f000000 + last;
/* The last octets of the remotes held, in address order. */
const heldLast = (remotes: Remotes): number[] => remotes.list().map((r) => r.addr - 0x7f000000);

t.test('new remotes are spread round-robin and stay with their primary', async (t) => {
	const env = setup(['5301', '5302', '5303']);
	t.same([1, 2, 3, 4, 5].map((n) => env.serve(ip(n))), [5301, 5302, 5303, 5301, 5302]);
	t.same([1, 2, 3, 4, 5].map((n) => env.serve(ip(n))), [5301, 5302, 5303, 5301, 5302], 'sticky');
	t.same([5301, 5302, 5303].map((id) => env.backends.lookup(id)?.remoteCount), [2, 2, 1], 'counts');
	t.equal(env.remotes.size, 5);
});

t.test('a faulted primary lends its remotes a backup; they return when it is ok again', async (t) => {
	const env = setup(['5301', '5302', '5303']);
	env.serve(ip(1));
	env.serve(ip(2));
	const rem = env.held(ip(1));
	t.equal(rem?.primary?.id, 5301);
	env.be('5301').fault('test');
	const backup = env.serve(ip(1));
	t.not(backup, 5301, 'served by another backend meanwhile');
	t.not(backup, 0);
	t.equal(rem?.backup?.id, backup);
	t.equal(rem?.primary?.id, 5301, 'the primary is kept');
	t.equal(env.be('5301').remoteCount, 1, 'a backup does not count as load');
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
	t.equal(env.held(ip(9))?.primary, null);
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
	env.lastSocket().connectError('ENOENT');
	t.ok(old.removed);
	t.equal(env.serve(ip(1)), 5302);
	t.equal(env.held(ip(1))?.primary?.id, 5302, 'new primary, not a backup');
	t.equal(old.remoteCount, 0);
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
	t.equal(env.held(ip(1)), undefined, 'idle remote gone');
	t.ok(env.held(ip(2)), 'active remote kept');
	t.equal(env.be('5301').remoteCount, 0, 'its backend count released');
	t.equal(env.be('5302').remoteCount, 1);
	t.equal(env.remotes.expired, 1);
});

t.test('rebalance clears the primary of N remotes of the fullest, in address order', async (t) => {
	const env = setup(['5301']);
	for (let n = 1; n <= 8; n++) {
		env.serve(ip(n));
	}
	t.equal(env.be('5301').remoteCount, 8);
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
	t.same([env.be('5301').remoteCount, env.be('5302').remoteCount], [5, 3], 'they chose afresh, round-robin');
	t.equal(env.backends.rebalancePlan(), null, 'balanced enough');
});

t.test('at the cap the idlest remotes are evicted, and the active ones keep their place', async (t) => {
	const env = setup(['5301', '5302'], 100);
	const legit = ip(1);
	const home = env.serve(legit);
	let created = 1;
	for (let n = 0; n < 500; n++) {
		env.serve(0x0a000000 + n);
		created++;
		if (n % 10 === 9) {
			/* (The fake backends never answer heartbeats, so after 20 s they
			 * fault and the remote is served by a backup: what matters here is
			 * that it keeps its place and its primary.) */
			env.advance(1);
			env.serve(legit);
			t.equal(env.held(legit)?.primary?.id, home, `the legit remote is held after ${n + 1} strangers`);
		}
	}
	t.equal(env.remotes.size, 100, 'held at the cap');
	t.equal(env.remotes.evicted, created - 100, 'every one beyond the cap was evicted');
	t.equal(env.held(legit)?.primary?.id, home, 'the active remote is still there, on its primary');
	t.equal(env.be('5301').remoteCount + env.be('5302').remoteCount, env.remotes.list().filter((r) => r.primary !== null).length,
		'backend counts follow evictions');
});

t.test('eviction takes those idle longest first', async (t) => {
	const env = setup(['5301'], 10);
	for (let n = 1; n <= 10; n++) {
		env.serve(ip(n));
	}
	env.advance(1);
	for (const n of [2, 4, 6, 8, 10]) {
		env.serve(ip(n));
	}
	env.advance(1);
	for (let n = 11; n <= 15; n++) {
		env.serve(ip(n));
	}
	const held = env.remotes.list().map((r) => r.addr - 0x7f000000);
	t.same(held, [2, 4, 6, 8, 10, 11, 12, 13, 14, 15], 'the five untouched since the start went first');
});

t.test('a flood of new sources within one second does not evict a host that is talking', async (t) => {
	/* Regression: comparing coarse times could not tell "seen since it was
	 * queued" from "queued this second", so the talking host was evicted. */
	const env = setup(['5301', '5302'], 10);
	const legit = ip(1);
	const home = env.serve(legit);
	const held = env.held(legit);
	for (let n = 0; n < 200; n++) {
		env.serve(0x0c000000 + n);
		if (n % 5 === 4) {
			env.serve(legit);
		}
	}
	t.equal(env.held(legit), held, 'the same remote, never evicted and re-created');
	t.equal(env.held(legit)?.primary?.id, home, 'on its primary');
	t.equal(env.held(legit)?.firstSeenMs, env.held(legit)?.lastSeenMs, 'all in one tick');
	t.equal(env.remotes.size, 10);
});

t.test('rate windows: N per second of the coarse clock, then a fresh second', async (t) => {
	const env = setup(['5301']);
	const rem = env.remotes.lookup(ip(1));
	const admitted = Array.from({ length: 8 }, () => rem.admitQuery(5)).filter(Boolean).length;
	t.equal(admitted, 5, 'five of eight in one second');
	t.equal(Array.from({ length: 12 }, () => rem.admitSynthesized(10)).filter(Boolean).length, 10,
		'synthesized answers have their own allowance');
	env.advance(1);
	env.remotes.lookup(ip(1));
	t.ok(rem.admitQuery(5), 'a new second, a new allowance');
});

t.test('a synthesized-answer allowance spent in one second is back in the next', async (t) => {
	const env = setup(['5301']);
	const rem = env.remotes.lookup(ip(1));
	t.same(Array.from({ length: 11 }, () => rem.admitSynthesized(10)), [...Array<boolean>(10).fill(true), false],
		'ten quick answers, then none this second');
	env.advance(1);
	env.remotes.lookup(ip(1));
	t.ok(rem.admitSynthesized(10), 'the next second: a quick answer again, with no query admitted first');
	t.equal(Array.from({ length: 10 }, () => rem.admitSynthesized(10)).filter(Boolean).length, 9,
		'and the whole allowance, counted afresh');
	t.ok(rem.admitQuery(1), 'queries are counted apart from synthesized answers');
	t.notOk(rem.admitQuery(1), 'against their own limit');
	env.advance(1);
	t.notOk(rem.admitSynthesized(10), 'the window follows the datagram\'s second (the lookup), not the clock alone');
});

t.test('a remote seen twice is kept by its last sighting and expires 300 s after it', async (t) => {
	const env = setup(['5301']);
	env.serve(ip(1));
	env.advance(100);
	env.serve(ip(1));
	const rem = env.held(ip(1));
	t.equal(rem?.lastSeenMs, (rem?.firstSeenMs ?? 0) + 100_000, 'last seen 100 s after it was first seen');
	env.advance(REMOTE_IDLE_EXPIRY_SECS);
	t.equal(env.remotes.expire(), 0, 'idle 300 s since the second sighting: kept');
	env.advance(1);
	t.equal(env.remotes.expire(), 1, 'idle 301 s: expired, although it was seen twice');
	t.same(heldLast(env.remotes), []);
});

t.test('expiry boundary: idle 299 s and exactly 300 s stay, anything over 300 s goes', async (t) => {
	/*
	 * The rule is "idle for more than REMOTE_IDLE_EXPIRY_SECS", on the
	 * coarse clock: last seen is kept in whole seconds of the table's life,
	 * "now" in milliseconds.
	 */
	const env = setup(['5301']);
	env.serve(ip(1));
	env.advance(REMOTE_IDLE_EXPIRY_SECS - 1);
	t.equal(env.remotes.expire(), 0, '299 s: stays');
	env.advance(1);
	t.equal(env.remotes.expire(), 0, '300 s: stays');
	env.advance(0.001);
	t.equal(env.remotes.expire(), 1, '300.001 s: goes');
	env.serve(ip(2));
	env.advance(REMOTE_IDLE_EXPIRY_SECS + 1);
	t.equal(env.remotes.expire(), 1, '301 s: goes');
	t.equal(env.remotes.expired, 2, 'both counted');
});

t.test('first and last seen are the wheel\'s times, in whole seconds since the table was made', async (t) => {
	let now = Date.parse('2030-01-02T03:04:05.000Z');
	const wheel = new TimeoutWheel(() => now);
	const log = pino({ level: 'silent' });
	const backends = new Backends({ socketDir: '/s', log, wheel, onOutboundUdp: () => {}, connector: new FakeConnector().connect });
	const remotes = new Remotes({ log, backends, wheel });
	now += 2_000;
	wheel.run(now);
	const rem = remotes.lookup(ip(1));
	now += 7_400;
	wheel.run(now);
	remotes.lookup(ip(1));
	t.equal(new Date(rem.firstSeenMs).toISOString(), '2030-01-02T03:04:07.000Z', 'first seen');
	t.equal(new Date(rem.lastSeenMs).toISOString(), '2030-01-02T03:04:14.000Z', 'last seen, to the whole second');
});

t.test('the second-chance bit: a referenced remote survives one eviction pass and is cleared by it', async (t) => {
	const env = setup(['5301'], 3);
	for (const n of [1, 2, 3]) {
		env.serve(ip(n));
	}
	env.serve(ip(1));
	t.equal(env.held(ip(1))?.referenced, true, 'seen again: referenced');
	env.serve(ip(4));
	t.same(heldLast(env.remotes), [1, 3, 4], 'the head was referenced: it moved to the back, 2 went instead');
	t.equal(env.held(ip(1))?.referenced, false, 'and its bit was cleared on the way');
	env.serve(ip(5));
	t.same(heldLast(env.remotes), [1, 4, 5], '3 was next');
	env.serve(ip(6));
	t.same(heldLast(env.remotes), [4, 5, 6], 'not seen since its second chance: 1 goes when it is at the head again');

	const again = setup(['5301'], 3);
	for (const n of [1, 2, 3]) {
		again.serve(ip(n));
	}
	again.serve(ip(1));
	again.serve(ip(4));
	again.serve(ip(5));
	again.serve(ip(1));
	again.serve(ip(6));
	t.same(heldLast(again.remotes), [1, 5, 6], 'seen again after its second chance: another one');
	t.equal(again.remotes.evicted, 3, 'three evicted');
});

t.test('a remote expired from the middle of the eviction queue leaves it whole', async (t) => {
	const env = setup(['5301'], 4);
	for (const n of [1, 2, 3, 4]) {
		env.serve(ip(n));
	}
	env.advance(100);
	for (const n of [1, 3, 4]) {
		env.serve(ip(n));
	}
	env.advance(REMOTE_IDLE_EXPIRY_SECS - 99);
	t.equal(env.remotes.expire(), 1, 'only 2, between 1 and 3, was idle');
	t.same(heldLast(env.remotes), [1, 3, 4]);
	env.serve(ip(5));
	const evictedInOrder: number[] = [];
	for (const n of [6, 7, 8, 9, 10]) {
		const before = heldLast(env.remotes);
		env.serve(ip(n));
		evictedInOrder.push(...before.filter((x) => !heldLast(env.remotes).includes(x)));
	}
	t.same(evictedInOrder, [5, 1, 3, 4, 6], 'the referenced ones got their second chance, then the queue went 1, 3, 4 in order');
	t.equal(env.remotes.size, 4, 'held at the cap');
});

t.test('a remote expired from the tail of the eviction queue leaves it whole', async (t) => {
	const env = setup(['5301'], 3);
	for (const n of [1, 2, 3]) {
		env.serve(ip(n));
	}
	env.advance(100);
	env.serve(ip(1));
	env.serve(ip(2));
	env.advance(REMOTE_IDLE_EXPIRY_SECS - 99);
	t.equal(env.remotes.expire(), 1, '3, the newest, was idle');
	env.serve(ip(4));
	t.same(heldLast(env.remotes), [1, 2, 4], 'a new remote queued behind what is left');
	env.serve(ip(5));
	t.same(heldLast(env.remotes), [1, 2, 5], '1 and 2 had their second chance; 4 went');
	env.serve(ip(6));
	t.same(heldLast(env.remotes), [2, 5, 6], 'then the queue from its head: 1');
	env.serve(ip(7));
	t.same(heldLast(env.remotes), [5, 6, 7], 'then 2');
});

t.test('with room for one remote, each new one takes the place of the last', async (t) => {
	const env = setup(['5301', '5302'], 1);
	env.serve(ip(1));
	env.serve(ip(1));
	t.same(heldLast(env.remotes), [1]);
	env.serve(ip(2));
	t.same(heldLast(env.remotes), [2], 'the only remote goes, referenced or not');
	env.serve(ip(3));
	t.same(heldLast(env.remotes), [3]);
	t.equal(env.remotes.evicted, 2);
	t.equal(env.be('5301').remoteCount + env.be('5302').remoteCount, 1, 'one remote counted on the backends');
});

t.test('rebalance moves only the fullest backend\'s remotes, in address order, among others\' remotes', async (t) => {
	const env = setup(['5301', '5302']);
	for (const n of [1, 2, 3, 4]) {
		env.serve(ip(n));
	}
	t.same([1, 2, 3, 4].map((n) => env.held(ip(n))?.primary?.id), [5301, 5302, 5301, 5302], 'interleaved');
	env.be('5302').fault('test');
	for (let n = 5; n <= 12; n++) {
		env.serve(ip(n));
	}
	env.up('5302');
	env.up('5303');
	t.same([5301, 5302, 5303].map((id) => env.backends.lookup(id)?.remoteCount), [10, 2, 0]);
	const plan = env.backends.rebalancePlan();
	t.equal(plan?.backend.id, 5301, 'the fullest');
	t.equal(plan?.count, 7, 'spread 10 - 3 ok backends');
	t.equal(env.remotes.rebalance(env.be('5301'), plan?.count ?? 0), 7);
	const cleared = env.remotes.list().filter((r) => r.primary === null).map((r) => r.addr - 0x7f000000);
	t.same(cleared, [1, 3, 5, 6, 7, 8, 9], 'the lowest addresses of 5301, skipping 5302\'s');
	t.same([2, 4].map((n) => env.held(ip(n))?.primary?.id), [5302, 5302], '5302\'s remotes stay');
	t.same([10, 11, 12].map((n) => env.held(ip(n))?.primary?.id), [5301, 5301, 5301], 'beyond the count, 5301 keeps');
	t.same([5301, 5302, 5303].map((id) => env.backends.lookup(id)?.remoteCount), [3, 2, 0], 'counts released');
});

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

t.test('five times the cap of distinct sources: the table and memory stay bounded', async (t) => {
	const cap = 100_000;
	const env = setup(['5301', '5302', '5303'], cap);
	gc();
	const before = process.memoryUsage().heapUsed;
	for (let n = 0; n < cap; n++) {
		env.serve(0x0b000000 + n);
	}
	gc();
	const perRemote = (process.memoryUsage().heapUsed - before) / cap;
	t.ok(perRemote < 600, `${Math.round(perRemote)} bytes of heap per remote`);
	for (let n = cap; n < 5 * cap; n++) {
		env.serve(0x0b000000 + n);
		if (n % 50_000 === 0) {
			env.advance(1);
		}
	}
	gc();
	const grown = (process.memoryUsage().heapUsed - before) / cap;
	t.equal(env.remotes.size, cap, 'held at the cap');
	t.equal(env.remotes.evicted, 4 * cap);
	t.ok(grown < perRemote * 1.25, `heap after ${5 * cap} sources is ${Math.round(grown)} bytes per held remote`);
});
