/*
 * UDP CACHE
 *
 * Where the packet cache (packet_cache.ts, with the DNS work in
 * cache_message.ts) meets the UDP path.  The UDP proxy asks it three
 * things and otherwise knows nothing of caching:
 *
 *   a query, its backend chosen   hit(): a fresh answer of that backend's,
 *                                 sent at once; or the tag the query is
 *                                 forwarded with (the in-flight table keeps
 *                                 it: answers.ts, TAGS)
 *   no backend can take a query   noBackend(): an answer it holds instead
 *                                 of SERVFAIL -- a fresh one, or with
 *                                 serving stale on, an expired one
 *   an answer with a tag          answered(): filed in the cache; or, if it
 *                                 is a SERVFAIL and a stale answer is held,
 *                                 replaced by that
 *
 * and the in-flight table tells it of a tagged query left unanswered past
 * --query-timeout, which gets a stale answer when one is held.
 *
 * PER BACKEND.  The key begins with the backend's id (cache_message.ts), so a
 * host keeps seeing its own backend's answers, as stickiness intends (two
 * Binders may briefly disagree while ZooKeeper's changes reach them).  A
 * fresh hit is served only for a backend that is up and healthy: a sick
 * backend's answers are suspect, and a down one has none to give, so both
 * go the usual way (their remote's backup, or no backend at all).
 *
 * SERVE STALE (RFC 8767).  With --serve-stale SECS, an answer whose TTL has
 * passed is kept SECS more, and served -- with TTL 30, the RFC's
 * recommendation -- only when no backend can answer: the query's remote has
 * no usable backend (every one down or sick, no backup to borrow), or its
 * backend answered SERVFAIL (a Binder that started without ZooKeeper
 * answers SERVFAIL to everything), or did not answer within
 * --query-timeout.  Never while a healthy backend answers.  With no
 * backend, the remote's own primary's entry is tried first, then every
 * other backend's, in id order: during an outage any backend's recent
 * answer beats SERVFAIL.
 *
 * COST.  A query pays for its key (the question read once, no objects) and
 * a Map lookup; a hit, for one Buffer (the answer, written from the
 * prepared copy with the client's id and name, aged TTLs and shuffled
 * RRsets).  A miss allocates its tag (the key, the bucket's size limit, the
 * query's header and name for a stale answer later); an answer is parsed
 * only when it is filed.
 */

import type { Backend } from './backends.js';
import { keyFor, lastQnameLength, lastSizeLimit, queryKey } from './cache_key.js';
import { answersQuery, materialize, prepareAnswer } from './cache_message.js';
import { type CacheEntry, type PacketCache, STALE_ANSWER_TTL_SECS } from './packet_cache.js';

/* DNS rcodes the cache looks at. */
const RCODE_SERVFAIL = 2;
/* Where a message's question begins: after the 12-byte header. */
const QUESTION_AT = 12;

/** What a query missed with: where its answer is to be filed, and what a stale answer needs. */
export interface CacheTag {
	/** The key: the backend's id (its owner), then the query's (keyFor() makes it another backend's). */
	readonly key: string;
	/** The largest answer the query's EDNS bucket takes. */
	readonly sizeLimit: number;
	/** The query's header and question (name, type, class): what its answer must answer, and a stale answer's id and name. */
	readonly head: Buffer;
}

/** How the cache sends: the proxy's send, from the address the remote queried. */
export type CacheSend = (payload: Buffer, addr: number, port: number) => void;

export interface UdpCacheOptions {
	cache: PacketCache;
	maxTtlSecs: number;
	/** 0: never stale. */
	serveStaleSecs: number;
	send: CacheSend;
	/** Every backend, in id order (for stale answers when the remote's own has none). */
	backends: () => Iterable<Backend>;
	/** The balancer's clock (the in-flight table's), for answers given from its timeouts. */
	clock: () => number;
	random?: () => number;
}

export class UdpCache {
	readonly cache: PacketCache;
	readonly maxTtlSecs: number;
	readonly serveStaleSecs: number;
	private readonly stale: boolean;
	private readonly send: CacheSend;
	private readonly backends: () => Iterable<Backend>;
	private readonly random: () => number;
	private readonly clock: () => number;
	/* The query's key from the last hit() that missed, and its qname's length. */
	private missKey = '';
	private missQnameLength = 0;
	private missSizeLimit = 0;

	constructor(opts: UdpCacheOptions) {
		this.cache = opts.cache;
		this.maxTtlSecs = opts.maxTtlSecs;
		this.serveStaleSecs = opts.serveStaleSecs;
		this.stale = opts.serveStaleSecs > 0;
		this.send = opts.send;
		this.backends = opts.backends;
		this.random = opts.random ?? Math.random;
		this.clock = opts.clock;
	}

	/**
	 * A query its backend was chosen for: true when a fresh answer was sent.
	 * On a miss, tagFor() gives the tag to forward it with (undefined when
	 * the query is not cacheable).
	 */
	hit(be: Backend, msg: Buffer, len: number, addr: number, port: number, nowMs: number): boolean {
		this.missKey = '';
		if (!be.ok || be.health.state.name !== 'healthy') {
			return false;
		}
		const key = queryKey(msg, len, be.id);
		if (key === null) {
			return false;
		}
		const entry = this.cache.get(key, nowMs);
		if (entry === null) {
			this.missKey = key;
			this.missQnameLength = lastQnameLength;
			this.missSizeLimit = lastSizeLimit;
			return false;
		}
		this.send(materialize(entry.prepared, msg, lastQnameLength, entry.ageSecs(nowMs), null, this.random), addr, port);
		return true;
	}

	/** The tag for the query hit() just missed, undefined if it was not cacheable; wires the book's timeouts once. */
	tagFor(be: Backend, msg: Buffer): CacheTag | undefined {
		if (this.missKey === '') {
			return undefined;
		}
		const book = be.health.book;
		if (this.stale && book.onUnanswered === null) {
			book.onUnanswered = this.bookOnUnanswered;
		}
		return {
			key: this.missKey, sizeLimit: this.missSizeLimit,
			head: Buffer.from(msg.subarray(0, QUESTION_AT + this.missQnameLength + 4)),
		};
	}

	/**
	 * No backend can take this query: true when a stale answer was sent in
	 * place of SERVFAIL (the primary's entry first, then any backend's).
	 */
	noBackend(primary: Backend | null, msg: Buffer, len: number, addr: number, port: number, nowMs: number): boolean {
		if (!this.stale) {
			return false;
		}
		const key = queryKey(msg, len);
		if (key === null) {
			return false;
		}
		return this.sendStale(key, primary, msg, lastQnameLength, addr, port, nowMs);
	}

	/**
	 * A tagged query's answer, on its way out: filed in the cache when it
	 * may be.  True when it was a SERVFAIL replaced by a stale answer (the
	 * caller then sends nothing more).
	 */
	answered(from: Backend, tag: CacheTag, payload: Buffer, addr: number, port: number, nowMs: number): boolean {
		if (this.stale && payload.length >= 4 && (payload[3] & 0x0f) === RCODE_SERVFAIL) {
			return this.sendStale(tag.key, from, tag.head, tag.head.length - QUESTION_AT - 4, addr, port, nowMs);
		}
		const prepared = prepareAnswer(payload, tag.sizeLimit, this.maxTtlSecs);
		if (typeof prepared === 'string') {
			this.cache.noteUncacheable(prepared);
		} else if (answersQuery(prepared, tag.head, tag.head.length - QUESTION_AT - 4)) {
			/* Filed only under the question it answers: a backend that answered another cannot poison this key. */
			this.cache.put(tag.key, prepared, nowMs);
		} else {
			this.cache.noteUncacheable('malformed');
		}
		return false;
	}

	/* The in-flight table: a tagged query's timeout passed unanswered. */
	private readonly bookOnUnanswered = (addr: number, port: number, _id: number, tag: object): void => {
		const t = tag as CacheTag;
		const nowMs = this.clock();
		const ownId = (t.key.charCodeAt(0) << 8) | t.key.charCodeAt(1);
		let own: Backend | null = null;
		for (const be of this.backends()) {
			if (be.id === ownId) {
				own = be;
			}
		}
		this.sendStale(t.key, own, t.head, t.head.length - QUESTION_AT - 4, addr, port, nowMs);
	};

	/*
	 * An answer for this query when its backend cannot give one: `first`'s
	 * entry, then every other backend's.  A fresh one is served as a hit
	 * would be (aged TTLs; it may be fresh when the backends died a moment
	 * ago), an expired one within --serve-stale with TTL 30.
	 */
	private sendStale(anyKey: string, first: Backend | null, query: Buffer, qnameLength: number, addr: number, port: number,
		nowMs: number): boolean {
		let entry: CacheEntry | null = null;
		let stale = false;
		const order = first === null ? [...this.backends()] : [first, ...[...this.backends()].filter((be) => be !== first)];
		for (const be of order) {
			const key = keyFor(anyKey, be.id);
			entry = this.cache.peekFresh(key, nowMs);
			if (entry === null) {
				entry = this.cache.getStale(key, nowMs);
				stale = entry !== null;
			}
			if (entry !== null) {
				break;
			}
		}
		if (entry === null) {
			return false;
		}
		const ttl = stale ? STALE_ANSWER_TTL_SECS : null;
		this.send(materialize(entry.prepared, query, qnameLength, entry.ageSecs(nowMs), ttl, this.random), addr, port);
		return true;
	}
}
