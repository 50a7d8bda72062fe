/*
 * ANSWER ACCOUNTING
 *
 * A backend that answers heartbeats may still fail its queries: a Binder
 * that started without ZooKeeper answers SERVFAIL to everything, a wedged
 * handler answers nothing.  To see that, bbal matches each answer a
 * backend sends (OUTBOUND_UDP) to the query it forwarded (INBOUND_UDP) and
 * counts, per backend, how it answered and how fast.  The protocol carries
 * the client's address and port both ways and leaves the DNS id alone, so
 * (address, port, id) names a query in flight without rewriting anything.
 *
 * THE IN-FLIGHT TABLE.  One per backend, in typed arrays so that it costs
 * the collector nothing: entries live in slots, chained in send order (a
 * doubly linked list through `prev`/`next`), and found by an open-addressing
 * hash of (address, port << 16 | id) with linear probing and backward-shift
 * deletion (no tombstones, so lookups never slow down as entries come and
 * go).  Every entry has the same timeout, so entries expire in send order:
 * the oldest is always at the head, and expiry is a walk from the head that
 * stops at the first entry still in time -- no timer per query.  The walk
 * runs when a query is recorded (amortised O(1): each entry is expired
 * once) and on the balancer's tick, so a backend with no traffic is swept
 * too.  An entry is in one of two states:
 *
 *   in flight --answer--> removed (answered: counted by rcode, latency)
 *       |
 *       +--query timeout--> expired (counted unanswered) --answer--> removed (late)
 *                              |
 *                              +--another query timeout--> removed
 *
 * The table grows by doubling from INFLIGHT_INITIAL_SLOTS up to its cap
 * (--max-inflight-per-backend); at the cap the oldest entry is dropped to
 * make room, and counted (`dropped`) when it was still in flight.
 *
 * WHICH ANSWERS GO OUT.  An answer that matches an entry in flight is sent.
 * A late one (its entry expired, but within another timeout) is sent too:
 * the client may still be waiting (stub resolvers wait seconds and retry
 * with the same id), and it cost the backend the work already.  Anything
 * else is dropped and counted `unsolicited`: a second answer to a query
 * already answered, or an answer to an address, port or id nobody asked
 * for.  Without that rule a backend could make bbal send millions of
 * datagrams to any address it names; with it, a backend can reach only the
 * clients that asked it, once per question.  (A duplicate and an answer
 * nobody asked for cannot be told apart without remembering answered
 * queries, which would cost the table a slot per answer for a timeout; they
 * are one counter.)
 *
 * TAGS.  A query may carry a tag, which the table keeps beside its entry
 * and hands back with its answer (`matchedTag`, read right after answer())
 * or, when the timeout passes first, to `onUnanswered`: the packet cache
 * (udp_proxy.ts, packet_cache.ts) tags the queries it missed with their
 * cache key, so that the answer is filed under the query it answers and a
 * query left unanswered can be given a stale answer.  A tag is one
 * reference in a plain array beside the typed ones, set only for tagged
 * queries and cleared with the entry.
 *
 * What it does not do: decide health (health.ts reads the events it
 * reports through `onEvent`), or look at TCP, whose answers are counted by
 * the proxy's message follower where it already reads them.
 */

/** The answer classes counted per backend (REFUSED and NXDOMAIN are normal answers for Binder). */
export interface AnswerCounts {
	noerror: number;
	nxdomain: number;
	servfail: number;
	refused: number;
	other: number;
}

/** Every answer counted, whatever its rcode. */
export const answerTotal = (a: Readonly<AnswerCounts>): number => a.noerror + a.nxdomain + a.servfail + a.refused + a.other;

export const DEFAULT_QUERY_TIMEOUT_MS = 2000;
export const DEFAULT_MAX_INFLIGHT_PER_BACKEND = 65_536;
export const INFLIGHT_INITIAL_SLOTS = 1024;

/*
 * Latency buckets: upper bounds 2^(k/2) / 16 ms (k = 0 .. 35), about 41%
 * apart, from 1/16 ms to 11.6 s, the last one open-ended.  Fine enough for
 * p50/p99 to within a bucket; Prometheus is given every other bound, the
 * powers of two.
 */
export const LATENCY_BUCKETS = 36;
export const latencyBoundMs = (k: number): number => 2 ** (k / 2) / 16;
/** Seconds of history behind the snapshot's p50/p99. */
export const LATENCY_WINDOW_SECS = 60;

function latencyBucket(ms: number): number {
	if (!(ms > 1 / 16)) {
		return 0;
	}
	const k = Math.ceil(2 * Math.log2(ms * 16));
	return k >= LATENCY_BUCKETS ? LATENCY_BUCKETS - 1 : k;
}

/** What the table reports to health.ts as it happens: an answer (with its rcode) or a query that went unanswered. */
export type AnswerEvent = 'answer' | 'servfail' | 'unanswered';

/** What to do with an answer (see WHICH ANSWERS GO OUT). */
export const ANSWER_SEND = 0;
export const ANSWER_LATE = 1;
export const ANSWER_DROP = 2;

const EMPTY = -1;
const IN_FLIGHT = 0;
const EXPIRED = 1;

function hashKey(addr: number, portId: number): number {
	let h = Math.imul(addr ^ Math.imul(portId, 0x9e3779b1), 0x85ebca6b);
	h ^= h >>> 13;
	h = Math.imul(h, 0xc2b2ae35);
	return h ^ (h >>> 16);
}

export class AnswerBook {
	/* What operators read. */
	readonly answers: AnswerCounts = { noerror: 0, nxdomain: 0, servfail: 0, refused: 0, other: 0 };
	/** Queries recorded (forwarded) in all. */
	queries = 0;
	/** No answer within the query timeout. */
	unanswered = 0;
	/** Answers after their query's timeout (sent). */
	late = 0;
	/** Answers matching no query (dropped): duplicates and answers nobody asked for. */
	unsolicited = 0;
	/** In-flight entries dropped at the table's cap. */
	dropped = 0;
	/** Latency histogram since start (answers in time or late), per bucket, and its sum. */
	readonly latencyCounts = new Float64Array(LATENCY_BUCKETS);
	latencySumMs = 0;
	/** The same over the last LATENCY_WINDOW_SECS, one histogram per second. */
	private readonly window = new Uint32Array(LATENCY_WINDOW_SECS * LATENCY_BUCKETS);
	private windowSec = -1;

	/* The table (see THE IN-FLIGHT TABLE). */
	private slots = 0;
	private addr = new Uint32Array(0);
	private portId = new Uint32Array(0);
	private sentAt = new Float64Array(0);
	private prev = new Int32Array(0);
	private next = new Int32Array(0);
	private state = new Int8Array(0);
	private index = new Int32Array(0);
	/* Each slot's tag (see TAGS), undefined for most. */
	private tags: Array<object | undefined> = [];
	private mask = 0;
	private free = EMPTY;
	private head = EMPTY;
	private tail = EMPTY;
	/** The tag of the entry the last answer() matched, undefined when it had none (see TAGS). */
	matchedTag: object | undefined = undefined;
	/* The oldest entry still in flight (expiry marks from here on). */
	private firstLive = EMPTY;
	private used = 0;
	private live = 0;

	constructor(
		readonly timeoutMs: number = DEFAULT_QUERY_TIMEOUT_MS,
		readonly cap: number = DEFAULT_MAX_INFLIGHT_PER_BACKEND,
		/** Each answer and each unanswered query, as it is counted (health.ts). */
		readonly onEvent: (ev: AnswerEvent, nowMs: number) => void = () => {},
	) {}

	/** A tagged query's timeout passed with no answer (see TAGS): its client, its id and its tag. */
	onUnanswered: ((addr: number, port: number, id: number, tag: object) => void) | null = null;

	/** Queries forwarded and neither answered nor timed out yet. */
	get outstanding(): number {
		return this.live;
	}

	/** Entries held (in flight, or expired and waiting for a late answer). */
	get size(): number {
		return this.used;
	}

	/** Bytes held by the table's arrays. */
	get tableBytes(): number {
		return this.slots * (4 + 4 + 8 + 4 + 4 + 1) + this.index.length * 4;
	}

	/** A query forwarded to this backend at nowMs, with its tag if any.  A retry of one still in flight keeps the first. */
	query(addr: number, port: number, id: number, nowMs: number, tag?: object): void {
		this.queries++;
		this.sweep(nowMs);
		const pid = ((port << 16) | id) >>> 0;
		const held = this.find(addr, pid);
		if (held !== EMPTY) {
			if (this.state[held] === IN_FLIGHT) {
				return;
			}
			/* A retry after the timeout: a query of its own. */
			this.remove(held);
		}
		if (this.used === this.slots && !this.grow()) {
			this.evictOldest(nowMs);
		}
		const s = this.free;
		this.free = this.next[s];
		this.addr[s] = addr;
		this.portId[s] = pid;
		this.sentAt[s] = nowMs;
		this.state[s] = IN_FLIGHT;
		if (tag !== undefined) {
			this.tags[s] = tag;
		}
		this.prev[s] = this.tail;
		this.next[s] = EMPTY;
		if (this.tail === EMPTY) {
			this.head = s;
		} else {
			this.next[this.tail] = s;
		}
		this.tail = s;
		if (this.firstLive === EMPTY) {
			this.firstLive = s;
		}
		this.used++;
		this.live++;
		this.insertIndex(s);
	}

	/**
	 * An answer from this backend to (addr, port) with this DNS id and rcode:
	 * ANSWER_SEND, ANSWER_LATE (send it too) or ANSWER_DROP.
	 */
	answer(addr: number, port: number, id: number, rcode: number, nowMs: number): number {
		const pid = ((port << 16) | id) >>> 0;
		const s = this.find(addr, pid);
		if (s === EMPTY) {
			this.unsolicited++;
			this.matchedTag = undefined;
			return ANSWER_DROP;
		}
		const late = this.state[s] === EXPIRED;
		const ms = nowMs - this.sentAt[s];
		this.matchedTag = this.tags[s];
		this.remove(s);
		this.count(rcode, ms, nowMs);
		if (late) {
			this.late++;
			return ANSWER_LATE;
		}
		this.live--;
		this.onEvent(rcode === 2 ? 'servfail' : 'answer', nowMs);
		return ANSWER_SEND;
	}

	/** An answer too short to name its query: counted as nobody's. */
	nothingAsked(): number {
		this.unsolicited++;
		return ANSWER_DROP;
	}

	/** Expire what has waited a timeout, forget what has waited two (see the diagram). */
	sweep(nowMs: number): void {
		const due = nowMs - this.timeoutMs;
		for (let s = this.firstLive; s !== EMPTY && this.sentAt[s] <= due; s = this.firstLive) {
			this.state[s] = EXPIRED;
			this.firstLive = this.nextLive(s);
			this.live--;
			this.unanswered++;
			this.onEvent('unanswered', nowMs);
			const tag = this.tags[s];
			if (tag !== undefined && this.onUnanswered !== null) {
				this.onUnanswered(this.addr[s], this.portId[s] >>> 16, this.portId[s] & 0xffff, tag);
			}
		}
		const gone = due - this.timeoutMs;
		while (this.head !== EMPTY && this.head !== this.firstLive && this.sentAt[this.head] <= gone) {
			this.remove(this.head);
		}
	}

	/** The control session went away: nothing in flight will be answered, and none of it is the backend's fault. */
	clear(): void {
		while (this.head !== EMPTY) {
			this.remove(this.head);
		}
		this.live = 0;
	}

	/** The latency quantile q over the last LATENCY_WINDOW_SECS, in ms (the bucket's upper bound), or null with no answer. */
	latencyQuantileMs(q: number, nowMs: number): number | null {
		this.rollWindow(Math.floor(nowMs / 1000));
		const sums = new Float64Array(LATENCY_BUCKETS);
		let n = 0;
		for (let i = 0; i < this.window.length; i++) {
			const c = this.window[i];
			sums[i % LATENCY_BUCKETS] += c;
			n += c;
		}
		if (n === 0) {
			return null;
		}
		const want = Math.max(1, Math.ceil(q * n));
		let acc = 0;
		for (let k = 0; k < LATENCY_BUCKETS; k++) {
			acc += sums[k];
			if (acc >= want) {
				return latencyBoundMs(k);
			}
		}
		return latencyBoundMs(LATENCY_BUCKETS - 1);
	}

	/* ---- counting ---- */

	private count(rcode: number, ms: number, nowMs: number): void {
		const a = this.answers;
		if (rcode === 0) {
			a.noerror++;
		} else if (rcode === 3) {
			a.nxdomain++;
		} else if (rcode === 2) {
			a.servfail++;
		} else if (rcode === 5) {
			a.refused++;
		} else {
			a.other++;
		}
		const k = latencyBucket(ms);
		this.latencyCounts[k]++;
		this.latencySumMs += ms;
		const sec = Math.floor(nowMs / 1000);
		if (sec !== this.windowSec) {
			this.rollWindow(sec);
		}
		this.window[(sec % LATENCY_WINDOW_SECS) * LATENCY_BUCKETS + k]++;
	}

	/* Clear the seconds of the window between the last one written and sec. */
	private rollWindow(sec: number): void {
		if (sec <= this.windowSec) {
			return;
		}
		const gap = Math.min(sec - this.windowSec, LATENCY_WINDOW_SECS);
		for (let i = 1; i <= gap; i++) {
			const at = ((this.windowSec + i) % LATENCY_WINDOW_SECS) * LATENCY_BUCKETS;
			this.window.fill(0, at, at + LATENCY_BUCKETS);
		}
		this.windowSec = sec;
	}

	/* ---- the table ---- */

	private nextLive(s: number): number {
		let n = this.next[s];
		while (n !== EMPTY && this.state[n] !== IN_FLIGHT) {
			n = this.next[n];
		}
		return n;
	}

	private find(addr: number, pid: number): number {
		if (this.slots === 0) {
			return EMPTY;
		}
		const mask = this.mask;
		for (let i = hashKey(addr, pid) & mask; ; i = (i + 1) & mask) {
			const s = this.index[i] - 1;
			if (s === EMPTY || (this.addr[s] === addr && this.portId[s] === pid)) {
				return s;
			}
		}
	}

	private insertIndex(s: number): void {
		const mask = this.mask;
		let i = hashKey(this.addr[s], this.portId[s]) & mask;
		while (this.index[i] !== 0) {
			i = (i + 1) & mask;
		}
		this.index[i] = s + 1;
	}

	/* Backward-shift deletion: later entries of the probe run move up into the hole. */
	private removeIndex(s: number): void {
		const mask = this.mask;
		let i = hashKey(this.addr[s], this.portId[s]) & mask;
		while (this.index[i] !== s + 1) {
			i = (i + 1) & mask;
		}
		let hole = i;
		for (let j = (hole + 1) & mask; this.index[j] !== 0; j = (j + 1) & mask) {
			const t = this.index[j] - 1;
			const home = hashKey(this.addr[t], this.portId[t]) & mask;
			/* t may fill the hole when its home is not in (hole, j], cyclically. */
			if (((j - home) & mask) >= ((j - hole) & mask)) {
				this.index[hole] = this.index[j];
				hole = j;
			}
		}
		this.index[hole] = 0;
	}

	private remove(s: number): void {
		if (s === this.firstLive) {
			this.firstLive = this.nextLive(s);
		}
		this.removeIndex(s);
		const p = this.prev[s];
		const n = this.next[s];
		if (p === EMPTY) {
			this.head = n;
		} else {
			this.next[p] = n;
		}
		if (n === EMPTY) {
			this.tail = p;
		} else {
			this.prev[n] = p;
		}
		this.next[s] = this.free;
		this.free = s;
		this.used--;
		if (this.tags[s] !== undefined) {
			this.tags[s] = undefined;
		}
	}

	/* At the cap: the oldest entry goes; counted when it was still in flight, and health hears of it as unanswered. */
	private evictOldest(nowMs: number): void {
		const s = this.head;
		if (this.state[s] === IN_FLIGHT) {
			this.live--;
			this.dropped++;
			this.onEvent('unanswered', nowMs);
		}
		this.remove(s);
	}

	/* Double the table (up to the cap), keeping every entry and its order; false at the cap. */
	private grow(): boolean {
		const want = this.slots === 0 ? Math.min(INFLIGHT_INITIAL_SLOTS, this.cap) : Math.min(this.slots * 2, this.cap);
		if (want <= this.slots) {
			return false;
		}
		const old = {
			addr: this.addr, portId: this.portId, sentAt: this.sentAt, state: this.state, tags: this.tags, head: this.head,
		};
		const oldNext = this.next;
		this.addr = new Uint32Array(want);
		this.portId = new Uint32Array(want);
		this.sentAt = new Float64Array(want);
		this.state = new Int8Array(want);
		this.tags = [];
		this.prev = new Int32Array(want);
		this.next = new Int32Array(want);
		let size = 2;
		while (size < want * 2) {
			size *= 2;
		}
		this.index = new Int32Array(size);
		this.mask = size - 1;
		this.slots = want;
		/* Re-lay the entries in send order in slots 0 .. used-1; the rest is the free list. */
		let n = 0;
		this.firstLive = EMPTY;
		for (let s = old.head; s !== EMPTY; s = oldNext[s], n++) {
			this.addr[n] = old.addr[s];
			this.portId[n] = old.portId[s];
			this.sentAt[n] = old.sentAt[s];
			this.state[n] = old.state[s];
			if (old.tags[s] !== undefined) {
				this.tags[n] = old.tags[s];
			}
			this.prev[n] = n - 1;
			this.next[n] = n + 1;
			if (this.firstLive === EMPTY && old.state[s] === IN_FLIGHT) {
				this.firstLive = n;
			}
			this.insertIndex(n);
		}
		this.head = n === 0 ? EMPTY : 0;
		this.tail = n - 1;
		if (n > 0) {
			this.next[n - 1] = EMPTY;
		}
		for (let s = n; s < want; s++) {
			this.next[s] = s + 1 < want ? s + 1 : EMPTY;
		}
		this.free = n < want ? n : EMPTY;
		return true;
	}
}
