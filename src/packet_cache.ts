/*
 * PACKET CACHE
 *
 * Binder answers the same few questions from every host in the datacenter,
 * and each answer stays good for its TTL (30 seconds by default).  The
 * packet cache keeps those answers in bbal, prepared by cache_message.ts,
 * so that a repeated question is answered without a trip to a backend.
 * This file is the table: what is kept under which key, for how long, and
 * what goes when it is full.  It knows nothing of sockets or of the clock:
 * every time is a parameter, and the UDP proxy decides when to look.
 *
 * INDEXING.  One Map from the key (the caller's backend prefix followed by
 * cache_message.ts's queryKey()) to a CacheEntry: one hash lookup per query.
 * The entries also sit in an array of slots, one per entry up to the cap,
 * which the eviction hand walks.
 *
 * LIFETIME.  An entry is fresh for its TTL after it was put, inclusive (an
 * entry put at t with TTL 30 s is fresh at t + 30 s exactly, when its
 * shortest record is sent with TTL 0); get() returns only fresh entries
 * and counts a hit or a miss.  After that it is stale for staleSecs more:
 * getStale() returns it, when the caller has no backend answer to give
 * (RFC 8767, "serve stale"), and counts a stale answer, never a hit; the
 * caller sends it with STALE_ANSWER_TTL_SECS.  getStale() does not return
 * a fresh entry: the caller tries get() first.  Past both an entry is dead,
 * and it is dropped where it is met, by get(), getStale() or the eviction
 * hand (counted `expired`), or replaced by a put() of its key.  Dead
 * entries nobody meets stay until the hand comes round; that is fine, since
 * the cap bounds them like any other.
 *
 * THE CAP.  At most maxEntries entries: at the cap a new key evicts one,
 * chosen by CLOCK, the second-chance algorithm remotes.ts uses for its
 * table.  A hit sets the entry's reference bit, which costs nothing more
 * than the lookup (a Map delete and set per hit would keep an exact LRU
 * order at twice the cost).  To make room the hand moves over the slots:
 * a dead entry is dropped and its slot taken; an entry with its bit set
 * has it cleared and is passed over, once; the first without is evicted.
 * The hand ends within one lap and a bit, and each entry is passed over at
 * most once per lap, so an eviction is O(1) amortised.  A flood of unique
 * names therefore churns through the entries nobody asked for again,
 * while those that get hits keep their place.
 *
 * MEMORY.  `bytes` counts what each entry is estimated to cost: the
 * prepared answer's one ArrayBuffer, the objects around it
 * (PREPARED_OVERHEAD_BYTES, cache_message.ts), the key's characters, and
 * ENTRY_OVERHEAD_BYTES for the entry object, its Map and array slots and
 * the key string's header.  Both overheads were measured with node
 * --expose-gc (node 20, x64): 100,000 entries of a 3-record A answer (91
 * bytes prepared, from mname's 100-odd) under 37-character keys grew the
 * heap by 816 bytes an entry and the array buffers by 123, 939 in all,
 * against the 940 the estimate gives; of the heap's share, 416 bytes are
 * the prepared answer's objects.  The process's RSS grew by about 1,130
 * bytes an entry (malloc's and the heap's slack), so a full table of
 * 100,000 entries costs about 110 MB.
 *
 * What it does not do: prepare or build messages (cache_message.ts), know
 * which backend an answer came from (the key says), or refresh entries
 * before they expire (a miss goes to a backend like any other query).
 */

import assert from 'node:assert/strict';
import { type PreparedAnswer, type Uncacheable, UNCACHEABLE_REASONS } from './cache_message.js';

/** The TTL a stale answer is sent with (RFC 8767 recommends 30 seconds). */
export const STALE_ANSWER_TTL_SECS = 30;
/**
 * --cache-max-ttl's default: Binder's answers say 30 s, but a service's
 * members change when ZooKeeper says so, and a host should see a change
 * within seconds, as it does with no cache (every query reaches a Binder).
 * Five seconds keeps nearly all of the cache's gain at any real query rate
 * (a name asked 10 times a second is answered by a backend once in 50).
 */
export const DEFAULT_CACHE_MAX_TTL_SECS = 5;
/** The largest --cache-size: about 10 GB at the measured 1 KB an entry. */
export const MAX_CACHE_SIZE = 10_000_000;
/** The largest --cache-max-ttl (an hour). */
export const MAX_CACHE_TTL_SECS = 3600;
/** The largest --serve-stale (a day). */
export const MAX_SERVE_STALE_SECS = 86_400;
/** Per entry beyond its prepared answer and its key's characters; measured (see MEMORY). */
export const ENTRY_OVERHEAD_BYTES = 360;

export interface PacketCacheOptions {
	/** The most entries held. */
	maxEntries: number;
	/** No entry is fresh for longer, whatever its records' TTLs. */
	maxTtlSecs: number;
	/** How long past its TTL an entry may still be given as a stale answer; 0: never. */
	staleSecs: number;
}

export interface PacketCacheStats {
	/** get() found a fresh entry. */
	hits: number;
	/** get() found none. */
	misses: number;
	/** getStale() gave an entry. */
	staleHits: number;
	/** put() calls that stored an entry, new or replacing one. */
	inserts: number;
	/** Of those, entries kept in the backend's own form, not shuffled (see cache_message.ts). */
	unshuffled: number;
	/** Entries dropped to make room at the cap. */
	evictions: number;
	/** Dead entries dropped where met. */
	expired: number;
	/** Entries held now, and their estimated bytes. */
	entries: number;
	bytes: number;
	/** Answers not kept, by prepareAnswer()'s reason (noteUncacheable()). */
	readonly uncacheable: Record<Uncacheable, number>;
}

/** One kept answer. */
export class CacheEntry {
	/** Set by a hit; cleared when the eviction hand passes it over. */
	referenced = false;

	constructor(
		readonly key: string,
		public prepared: PreparedAnswer,
		/** When it was put, and until when it is fresh and may be given stale (ms, inclusive). */
		public insertedMs: number,
		public freshUntilMs: number,
		public staleUntilMs: number,
		/** Its place in the hand's array. */
		readonly slot: number,
	) {}

	/** Whole seconds since it was put (never negative, should the clock step back). */
	ageSecs(nowMs: number): number {
		const ms = nowMs - this.insertedMs;
		return ms > 0 ? Math.floor(ms / 1000) : 0;
	}

	/* What the entry costs in `bytes`. */
	get costBytes(): number {
		return this.prepared.costBytes + this.key.length + ENTRY_OVERHEAD_BYTES;
	}
}

export class PacketCache {
	readonly maxEntries: number;
	readonly maxTtlSecs: number;
	readonly staleSecs: number;
	readonly stats: PacketCacheStats;
	private readonly byKey = new Map<string, CacheEntry>();
	/* The hand's circle: every entry at its slot; null where one was dropped (see free). */
	private slots: Array<CacheEntry | null> = [];
	/* Slots emptied by drops, to be filled first. */
	private free: number[] = [];
	private hand = 0;

	constructor(opts: PacketCacheOptions) {
		assert(Number.isInteger(opts.maxEntries) && opts.maxEntries >= 1, 'maxEntries must be a positive integer');
		assert(opts.maxTtlSecs >= 0 && opts.staleSecs >= 0, 'maxTtlSecs and staleSecs cannot be negative');
		this.maxEntries = opts.maxEntries;
		this.maxTtlSecs = opts.maxTtlSecs;
		this.staleSecs = opts.staleSecs;
		const uncacheable = Object.fromEntries(UNCACHEABLE_REASONS.map((r) => [r, 0])) as Record<Uncacheable, number>;
		this.stats = {
			hits: 0, misses: 0, staleHits: 0, inserts: 0, unshuffled: 0, evictions: 0, expired: 0,
			entries: 0, bytes: 0, uncacheable,
		};
	}

	get size(): number {
		return this.byKey.size;
	}

	/** The fresh entry under `key`, or null (see LIFETIME). */
	get(key: string, nowMs: number): CacheEntry | null {
		const e = this.byKey.get(key);
		if (e !== undefined) {
			if (nowMs <= e.freshUntilMs) {
				e.referenced = true;
				this.stats.hits++;
				return e;
			}
			if (nowMs > e.staleUntilMs) {
				this.drop(e);
				this.stats.expired++;
			}
		}
		this.stats.misses++;
		return null;
	}

	/**
	 * A fresh entry, counted as neither hit nor miss: for a query whose
	 * backend cannot answer, which is looking for any answer it may give
	 * (udp_cache.ts).
	 */
	peekFresh(key: string, nowMs: number): CacheEntry | null {
		const e = this.byKey.get(key);
		if (e === undefined || nowMs > e.freshUntilMs) {
			return null;
		}
		e.referenced = true;
		return e;
	}

	/** The stale entry under `key` (past its TTL, not by more than staleSecs), or null. */
	getStale(key: string, nowMs: number): CacheEntry | null {
		const e = this.byKey.get(key);
		if (e === undefined || nowMs <= e.freshUntilMs) {
			return null;
		}
		if (nowMs > e.staleUntilMs) {
			this.drop(e);
			this.stats.expired++;
			return null;
		}
		e.referenced = true;
		this.stats.staleHits++;
		return e;
	}

	/** Keep `prepared` under `key` from nowMs, replacing what was there; at the cap, evict first. */
	put(key: string, prepared: PreparedAnswer, nowMs: number): void {
		const ttlMs = Math.min(prepared.ttlSecs, this.maxTtlSecs) * 1000;
		if (!(ttlMs > 0)) {
			return;
		}
		const freshUntilMs = nowMs + ttlMs;
		const staleUntilMs = freshUntilMs + this.staleSecs * 1000;
		const st = this.stats;
		let e = this.byKey.get(key);
		if (e !== undefined) {
			st.bytes -= e.costBytes;
			e.prepared = prepared;
			e.insertedMs = nowMs;
			e.freshUntilMs = freshUntilMs;
			e.staleUntilMs = staleUntilMs;
			e.referenced = false;
		} else {
			if (this.byKey.size >= this.maxEntries) {
				this.makeRoom(nowMs);
			}
			const slot = this.free.length > 0 ? this.free.pop() as number : this.slots.length;
			e = new CacheEntry(key, prepared, nowMs, freshUntilMs, staleUntilMs, slot);
			this.slots[slot] = e;
			this.byKey.set(key, e);
			st.entries = this.byKey.size;
		}
		st.bytes += e.costBytes;
		st.inserts++;
		if (!prepared.shuffleable) {
			st.unshuffled++;
		}
	}

	/** An answer prepareAnswer() would not keep, by its reason. */
	noteUncacheable(reason: Uncacheable): void {
		this.stats.uncacheable[reason]++;
	}

	/** Forget every entry (the counters stay: they count since start). */
	clear(): void {
		this.byKey.clear();
		this.slots = [];
		this.free = [];
		this.hand = 0;
		this.stats.entries = 0;
		this.stats.bytes = 0;
	}

	/* The CLOCK hand (see THE CAP): drop or evict one entry. */
	private makeRoom(nowMs: number): void {
		const slots = this.slots;
		/* Two laps at most: the first clears every bit it meets. */
		for (let steps = 2 * slots.length + 1; steps > 0; steps--) {
			if (this.hand >= slots.length) {
				this.hand = 0;
			}
			const e = slots[this.hand++];
			if (e === null) {
				continue;
			}
			if (nowMs > e.staleUntilMs) {
				this.drop(e);
				this.stats.expired++;
				return;
			}
			if (e.referenced) {
				e.referenced = false;
				continue;
			}
			this.drop(e);
			this.stats.evictions++;
			return;
		}
		assert.fail('packet cache: the eviction hand found no entry at the cap');
	}

	private drop(e: CacheEntry): void {
		this.byKey.delete(e.key);
		this.slots[e.slot] = null;
		this.free.push(e.slot);
		this.stats.entries = this.byKey.size;
		this.stats.bytes -= e.costBytes;
	}
}
