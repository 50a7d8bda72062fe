/*
 * The dashboard's recent events: the ring (bounded, numbered, read from
 * any point) and the watcher that turns what changed between two looks
 * into events a person reads -- a backend found, faulted, down with its
 * reason, up, sick and healthy, stuck, removed, forgotten; a rebalance;
 * fail-open; a takeover, once.
 */

import fc from 'fast-check';
import t from 'tap';
import { EventRing, EventWatcher, EVENTS_MAX } from '../src/events.js';
import { fakeBackend, FakeSources } from './support/fake_sources.js';

t.test('the ring keeps the newest EVENTS_MAX, numbered from 1, and since() gives what came after', async (t) => {
	const ring = new EventRing();
	t.equal(ring.capacity, EVENTS_MAX);
	t.same([ring.lastSeq, ring.size, ring.since(0)], [0, 0, []], 'empty');
	for (let i = 1; i <= EVENTS_MAX + 10; i++) {
		ring.push(i * 1000, 'fault', 1, `event ${i}`);
	}
	t.equal(ring.lastSeq, EVENTS_MAX + 10);
	t.equal(ring.size, EVENTS_MAX, 'held at the cap');
	const all = ring.since(0);
	t.equal(all.length, EVENTS_MAX);
	t.same([all[0].seq, all.at(-1)?.seq], [11, EVENTS_MAX + 10], 'the oldest ten are gone, oldest first');
	t.same(ring.since(EVENTS_MAX + 8).map((e) => e.text), [`event ${EVENTS_MAX + 9}`, `event ${EVENTS_MAX + 10}`]);
	t.same(ring.since(EVENTS_MAX + 10), [], 'nothing new');
	t.throws(() => new EventRing(0), RangeError);
});

t.test('any pushes and any reader position: since() is exactly the held events after it, in order', async () => {
	fc.assert(fc.property(fc.integer({ min: 1, max: 20 }), fc.integer({ min: 0, max: 60 }), fc.integer({ min: 0, max: 70 }),
		(cap, pushes, from) => {
			const ring = new EventRing(cap);
			for (let i = 1; i <= pushes; i++) {
				ring.push(i, 'up', null, String(i));
			}
			const got = ring.since(from).map((e) => e.seq);
			const want: number[] = [];
			for (let s = Math.max(from + 1, pushes - cap + 1, 1); s <= pushes; s++) {
				want.push(s);
			}
			return JSON.stringify(got) === JSON.stringify(want);
		}));
});

t.test('the watcher: each change between two looks is one event with its reason', async (t) => {
	const f = new FakeSources();
	const a = fakeBackend(1);
	const b = fakeBackend(2);
	f.backends = [a, b];
	const ring = new EventRing();
	const w = new EventWatcher(ring, f.sources());
	const kinds = (): string[] => ring.since(0).map((e) => `${e.kind}:${e.backend}`);
	const last = (): string => ring.since(0).at(-1)?.text ?? '';

	w.look(1000);
	t.same(kinds(), ['found:1', 'found:2'], 'the backends at the first look are found');
	t.match(last(), /^backend 2 \(2\.sock\) found, up$/);
	w.look(2000);
	t.equal(ring.lastSeq, 2, 'nothing changed, nothing pushed');

	a.ok = false;
	a.state = 'waiting';
	a.stats.faults = 1;
	a.lastFault = { reason: 'backend socket EOF', atMs: 1500 };
	w.look(3000);
	t.same(kinds().slice(2), ['down:1'], 'one fault that took it down is one event');
	t.equal(last(), 'backend 1 (1.sock) down: backend socket EOF', 'with the fault\'s reason');

	a.stats.faults = 4;
	a.lastFault = { reason: 'timed out connecting to backend', atMs: 3500 };
	w.look(4000);
	t.equal(last(), 'backend 1 (1.sock) faulted: timed out connecting to backend (3 times)', 'failed reconnects, counted');

	a.ok = true;
	a.state = 'ok';
	w.look(5000);
	t.equal(last(), 'backend 1 (1.sock) up');

	a.stats.faults = 5;
	w.look(6000);
	t.equal(ring.since(0).at(-1)?.kind, 'fault', 'faulted and back within the second: a fault, still up');

	b.health.state = { name: 'sick', reason: 'servfail', sinceMs: 0, holdUntilMs: 0 };
	b.stuck = true;
	w.look(7000);
	t.same(ring.since(0).slice(-2).map((e) => e.text),
		['backend 2 (2.sock) sick: servfail', 'backend 2 (2.sock) stuck: it stopped reading, its UDP queries are dropped']);
	b.health.state = { name: 'healthy' };
	b.stuck = false;
	w.look(8000);
	t.same(kinds().slice(-2), ['healthy:2', 'unstuck:2']);

	b.ok = false;
	b.removed = true;
	b.state = 'removed';
	w.look(9000);
	t.same(ring.since(0).slice(-2).map((e) => e.text),
		['backend 2 (2.sock) down: socket file removed', 'backend 2 (2.sock) removed: its socket file is gone']);
	f.backends = [a];
	w.look(10_000);
	t.same(kinds().slice(-1), ['forgotten:2'], 'gone from the registry: forgotten');

	f.rebalances = 1;
	f.lastRebalance = { backend: 1, moved: 7, planned: 8 };
	f.failOpen = true;
	f.takeover = { fromPid: 42, fromVersion: '0.1.0', at: '2030-01-02T03:04:05.000Z', remotes: 50, remotesChanged: 0 };
	w.look(11_000);
	t.same(ring.since(0).slice(-3).map((e) => e.text), [
		'took over from pid 42 (bbal 0.1.0) with 50 remotes',
		'rebalanced: 7 of 8 planned remotes moved off backend 1',
		'every backend is sick: failing open',
	]);
	f.failOpen = false;
	w.look(12_000);
	w.look(13_000);
	t.same(kinds().slice(-1), ['fail-open-ended:null'], 'the takeover is told once; fail-open ends');
	t.equal(ring.since(0).at(-1)?.t, 12_000, 'at the time of the look');
});
