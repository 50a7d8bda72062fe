/*
 * The packet cache's table (src/packet_cache.ts), pure: every time is a
 * parameter.  Fresh and stale windows at their edges, the CLOCK eviction
 * with its second chance, the cap under a flood of unique names, the
 * counters; and a fast-check property that drives the table against a
 * plain model.
 */

import fc from 'fast-check';
import t from 'tap';
import dnsPacket from 'dns-packet';
import { type PreparedAnswer, prepareAnswer, UNCACHEABLE_REASONS } from '../src/cache_message.js';
import { ENTRY_OVERHEAD_BYTES, PacketCache, STALE_ANSWER_TTL_SECS } from '../src/packet_cache.js';

const T0 = 1_700_000_000_000;
const NAME = 'svc.dc.example.com';

/* A Binder answer of three A records with this TTL, prepared. */
function answer(ttlSecs: number, members = 3): PreparedAnswer {
	const p = prepareAnswer(dnsPacket.encode({
		type: 'response', id: 1, flags: dnsPacket.AUTHORITATIVE_ANSWER,
		questions: [{ type: 'A', name: NAME }],
		answers: Array.from({ length: members }, (_, i) => ({ type: 'A' as const, name: NAME, ttl: ttlSecs, data: `10.0.0.${i + 1}` })),
	}), 512, 3600);
	if (typeof p === 'string') {
		throw new Error(p);
	}
	return p;
}

function cache(maxEntries = 100, staleSecs = 60, maxTtlSecs = 3600): PacketCache {
	return new PacketCache({ maxEntries, maxTtlSecs, staleSecs });
}

t.test('fresh for its TTL inclusive, then stale for staleSecs, then gone', async (t) => {
	const c = cache(100, 60);
	const p = answer(30);
	c.put('k', p, T0);
	t.equal(c.get('k', T0)?.prepared, p, 'fresh when put');
	t.equal(c.get('k', T0 + 30_000)?.prepared, p, 'fresh at its TTL exactly');
	t.equal(c.getStale('k', T0 + 30_000), null, 'not stale while fresh');
	t.equal(c.get('k', T0 + 30_001), null, 'not fresh a millisecond later');
	t.equal(c.getStale('k', T0 + 30_001)?.prepared, p, 'stale then');
	t.equal(c.getStale('k', T0 + 90_000)?.prepared, p, 'stale until TTL + staleSecs, inclusive');
	t.equal(c.stats.entries, 1, 'a stale entry is held');
	t.equal(c.getStale('k', T0 + 90_001), null, 'gone a millisecond later');
	t.equal(c.stats.entries, 0, 'and dropped where met');
	t.equal(c.stats.bytes, 0);
	t.same({ hits: c.stats.hits, misses: c.stats.misses, staleHits: c.stats.staleHits, expired: c.stats.expired },
		{ hits: 2, misses: 1, staleHits: 2, expired: 1 }, 'a stale answer is never a hit');
	t.equal(c.getStale('nothing', T0), null, 'no entry');
	t.equal(STALE_ANSWER_TTL_SECS, 30);
});

t.test('get() drops a dead entry; staleSecs 0 serves nothing stale', async (t) => {
	const c = cache(100, 0);
	c.put('k', answer(10), T0);
	t.equal(c.getStale('k', T0 + 10_001), null, 'nothing stale');
	c.put('j', answer(10), T0);
	t.equal(c.get('j', T0 + 10_001), null);
	t.equal(c.stats.entries, 0, 'both dropped');
	t.equal(c.stats.expired, 2);
	t.equal(c.stats.misses, 1);
});

t.test('age in whole seconds; the TTL capped by maxTtlSecs', async (t) => {
	const c = cache(100, 0, 60);
	c.put('k', answer(300), T0);
	const e = c.get('k', T0);
	t.ok(e);
	t.equal(e?.ageSecs(T0 + 999), 0);
	t.equal(e?.ageSecs(T0 + 1000), 1);
	t.equal(e?.ageSecs(T0 + 59_999), 59);
	t.equal(e?.ageSecs(T0 - 5000), 0, 'never negative');
	t.ok(c.get('k', T0 + 60_000), 'fresh at 60 s');
	t.equal(c.get('k', T0 + 60_001), null, 'not past the cap');
	c.put('z', { ...answer(30), ttlSecs: 0 }, T0);
	t.equal(c.stats.entries, 0, 'a TTL of 0 is not kept');
});

t.test('put() replaces: one entry, its bytes once, a fresh start', async (t) => {
	const c = cache();
	const p1 = answer(30);
	const p2 = answer(30, 5);
	c.put('k', p1, T0);
	c.put('k', p2, T0 + 20_000);
	t.equal(c.stats.entries, 1);
	t.equal(c.stats.inserts, 2);
	t.equal(c.stats.bytes, p2.costBytes + 1 + ENTRY_OVERHEAD_BYTES, 'the new answer\'s bytes only');
	const e = c.get('k', T0 + 45_000);
	t.equal(e?.prepared, p2, 'fresh for its own TTL from its own time');
	t.equal(e?.ageSecs(T0 + 45_000), 25);
});

t.test('at the cap, CLOCK: a referenced entry is passed over once', async (t) => {
	const c = cache(3, 0);
	const p = answer(300);
	c.put('a', p, T0);
	c.put('b', p, T0);
	c.put('c', p, T0);
	t.ok(c.get('a', T0), 'a is referenced');
	c.put('d', p, T0);
	t.equal(c.stats.evictions, 1);
	t.equal(c.size, 3, 'still 3');
	/* The hand passed a (clearing its bit) and evicted b; next it meets c, then a. */
	c.put('e', p, T0);
	c.put('f', p, T0);
	t.equal(c.stats.evictions, 3);
	const held = ['a', 'b', 'c', 'd', 'e', 'f'].filter((k) => c.get(k, T0) !== null);
	t.same(held, ['d', 'e', 'f'], 'a had one second chance, no more');
});

t.test('at the cap, every entry referenced: the hand clears them all and evicts where it began', async (t) => {
	const c = cache(4, 0);
	const p = answer(300);
	for (const k of ['a', 'b', 'c', 'd']) {
		c.put(k, p, T0);
		c.get(k, T0);
	}
	c.put('e', p, T0);
	t.equal(c.get('a', T0), null, 'a went');
	t.same(['b', 'c', 'd', 'e'].map((k) => c.get(k, T0) !== null), [true, true, true, true]);
});

t.test('at the cap, a dead entry met by the hand goes first, counted as expired', async (t) => {
	const c = cache(3, 10);
	c.put('short', answer(5), T0);
	c.put('long1', answer(300), T0);
	c.put('long2', answer(300), T0);
	c.get('short', T0);
	c.put('new', answer(300), T0 + 16_000);
	t.equal(c.stats.expired, 1, 'the dead one, though referenced');
	t.equal(c.stats.evictions, 0);
	t.equal(c.get('long1', T0 + 16_000) !== null && c.get('long2', T0 + 16_000) !== null, true, 'the live ones stay');
});

t.test('a flood of 100,000 unique names: entries stay at the cap, bytes bounded, hot names kept', async (t) => {
	const cap = 1000;
	const c = cache(cap, 60);
	const p = answer(30);
	const hot = Array.from({ length: 20 }, (_, i) => `hot---${i.toString().padStart(6, '0')}`);
	for (const k of hot) {
		c.put(k, p, T0);
	}
	let maxEntries = 0;
	let maxBytes = 0;
	for (let i = 0; i < 100_000; i++) {
		const now = T0 + Math.floor(i / 10);
		c.put(`flood-${i.toString().padStart(6, '0')}`, p, now);
		if (i % 100 === 0) {
			for (const k of hot) {
				c.get(k, now);
			}
		}
		maxEntries = Math.max(maxEntries, c.stats.entries);
		maxBytes = Math.max(maxBytes, c.stats.bytes);
	}
	t.equal(maxEntries, cap, 'never past the cap');
	t.equal(c.stats.entries, cap);
	t.equal(c.size, cap);
	const perEntry = p.costBytes + 'flood-000000'.length + ENTRY_OVERHEAD_BYTES;
	t.equal(maxBytes, cap * perEntry, `bytes bounded: ${cap} entries of ${perEntry}`);
	t.equal(c.stats.evictions, 100_000 + hot.length - cap);
	t.same(hot.filter((k) => c.get(k, T0 + 10_000) === null), [], 'every hot name kept');
	c.clear();
	t.equal(c.stats.entries, 0);
	t.equal(c.stats.bytes, 0);
	t.equal(c.get(hot[1], T0 + 10_000), null, 'clear() forgets');
	t.equal(c.stats.inserts, 100_020, 'the counters stay');
	c.put('again', p, T0 + 10_000);
	t.equal(c.stats.entries, 1, 'usable after clear()');
});

t.test('stats: uncacheable reasons, unshuffled answers', async (t) => {
	const c = cache();
	t.same(Object.keys(c.stats.uncacheable), [...UNCACHEABLE_REASONS], 'every reason, from 0');
	c.noteUncacheable('rcode');
	c.noteUncacheable('rcode');
	c.noteUncacheable('no-soa');
	t.equal(c.stats.uncacheable.rcode, 2);
	t.equal(c.stats.uncacheable['no-soa'], 1);
	t.equal(c.stats.uncacheable.truncated, 0);
	c.put('k', { ...answer(30), shuffleable: false }, T0);
	c.put('j', answer(30), T0);
	t.equal(c.stats.unshuffled, 1);
	t.throws(() => new PacketCache({ maxEntries: 0, maxTtlSecs: 60, staleSecs: 0 }), /maxEntries/);
});

t.test('the table against a model: hits, misses, stale answers, the cap and the bytes', async (t) => {
	type Op = { kind: 'put' | 'get' | 'stale'; key: number; ttl: number; advanceMs: number };
	const arbOp: fc.Arbitrary<Op> = fc.record({
		kind: fc.constantFrom('put', 'get', 'get', 'stale'),
		key: fc.nat(12),
		ttl: fc.integer({ min: 1, max: 20 }),
		advanceMs: fc.oneof(fc.constant(0), fc.nat(3000), fc.constantFrom(999, 1000, 1001)),
	});
	const prepared = Array.from({ length: 21 }, (_, ttl) => (ttl === 0 ? null : answer(ttl)));
	fc.assert(fc.property(fc.array(arbOp, { maxLength: 200 }), fc.integer({ min: 1, max: 16 }), fc.nat(5), (ops, cap, stale) => {
		const c = cache(cap, stale);
		/* Every prepared answer costs the same, and every key is 3 characters: bytes is size times one cost. */
		/* The model: every entry put, never evicted; the cache must agree whenever it holds the key. */
		const model = new Map<string, { at: number; ttl: number }>();
		let now = T0;
		let hits = 0;
		let staleHits = 0;
		for (const op of ops) {
			now += op.advanceMs;
			const key = `k${op.key.toString().padStart(2, '0')}`;
			const m = model.get(key);
			if (op.kind === 'put') {
				c.put(key, prepared[op.ttl] as PreparedAnswer, now);
				model.set(key, { at: now, ttl: op.ttl });
			} else if (op.kind === 'get') {
				const e = c.get(key, now);
				if (e !== null) {
					hits++;
					if (m === undefined || now > m.at + m.ttl * 1000 || e.prepared.ttlSecs !== m.ttl) {
						return false;
					}
				} else if (cap >= 13 && m !== undefined && now <= m.at + m.ttl * 1000) {
					return false;
				}
			} else {
				const e = c.getStale(key, now);
				if (e !== null) {
					staleHits++;
					if (m === undefined || now <= m.at + m.ttl * 1000 || now > m.at + (m.ttl + stale) * 1000) {
						return false;
					}
				} else if (cap >= 13 && m !== undefined && now > m.at + m.ttl * 1000 && now <= m.at + (m.ttl + stale) * 1000) {
					return false;
				}
			}
			if (c.stats.entries > cap || c.stats.entries !== c.size) {
				return false;
			}
		}
		const gets = ops.filter((o) => o.kind === 'get').length;
		return c.stats.hits === hits && c.stats.hits + c.stats.misses === gets && c.stats.staleHits === staleHits &&
			c.stats.bytes === c.size * ((prepared[1] as PreparedAnswer).costBytes + 3 + ENTRY_OVERHEAD_BYTES);
	}), { seed: 20260507, numRuns: 500 });
	t.pass('agrees with the model');
});
