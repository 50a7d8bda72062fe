/*
 * SAMPLER
 *
 * What the dashboard (http_listener.ts, dashboard/) draws, taken once a
 * second from counters bbal already keeps.  Nothing here runs per packet:
 * the proxies and backends count in plain integer fields as they always
 * did, and once a second run() reads them, subtracts what it read the
 * second before, and divides by the time between the two reads.  With no
 * dashboard open this costs one pass over the backends a second; with ten
 * open, the same pass, and the same strings written to ten sockets.
 *
 * What it keeps, all bounded:
 *
 *   the history   the last SAMPLE_HISTORY_SECS (900) samples, each kept as
 *                 the JSON string it was sent as, so a page that connects
 *                 gets fifteen minutes of charts without anything being
 *                 serialised again.  A sample holds the rates of the UDP
 *                 and TCP edges, the drops by reason, the answers bbal
 *                 made itself, and per backend its queries, its answers by
 *                 rcode class and its latency p50/p99 over that second
 *                 (from the answer book's cumulative histogram: this
 *                 second's counts are the difference of two reads).
 *   the status    the latest state only: the backend table, the remotes
 *                 held, the top talkers, the takeover record.
 *   the events    the EventRing (events.ts), fed by the EventWatcher's
 *                 look at each run.
 *
 * TOP TALKERS.  Finding the remotes that send the most means reading every
 * remote, up to --max-remotes (100,000) of them, which in one go would hold
 * the event loop for several milliseconds.  So it is a pass sliced like the
 * stats socket's: TALKERS_SLICE remotes per turn of the loop, from a cursor
 * in address order, every TALKERS_INTERVAL_SECS (5) -- and only while a
 * dashboard is open (talkersWanted).  Each remote carries the count of
 * queries it had at the previous pass (Remote.talkMark); the difference over
 * the time between the passes is its rate, and the pass keeps the
 * TALKERS_MAX (10) highest.  A remote that came after the previous pass is
 * measured from its first sight.  The first pass after a pause only sets the
 * marks: status.talkers is null ("measuring") until the second ends.
 *
 * The dashboard's JSON is an interface for the page (the contract is the
 * README's Dashboard section): fields may be added, never renamed.
 */

import { LATENCY_BUCKETS, latencyBoundMs } from './answers.js';
import type { BackendView } from './backends.js';
import { EVENTS_MAX, EventRing, EventWatcher } from './events.js';
import { ADDR_END, type Remote } from './remotes.js';
import { cacheSnapshot, lastFaultJson, type StatsSources } from './stats.js';

/** Samples kept: fifteen minutes at one a second. */
export const SAMPLE_HISTORY_SECS = 900;
/** How often the top talkers are measured while a dashboard is open. */
export const TALKERS_INTERVAL_SECS = 5;
/** Remotes read per turn of the event loop by a talkers pass. */
export const TALKERS_SLICE = 2_000;
/** Top talkers shown. */
export const TALKERS_MAX = 10;

/** The once-a-connection facts the page's header shows. */
export interface SamplerIdentity {
	version: string;
	transport: string;
}

/* What run() read the second before, per backend. */
interface BackendPrev {
	udp: number;
	answers: [number, number, number, number, number];
	latency: Float64Array;
}

/* What run() read the second before, for the edges. */
interface EdgePrev {
	atMs: number;
	rx: number;
	tx: number;
	fwd: number;
	tcp: number;
	drop: Record<string, number>;
	servfail: number;
	refused: number;
	/* The packet cache's counters (0 without one). */
	hits: number;
	misses: number;
	stale: number;
}

export interface Talker {
	ip: string;
	backend: number;
	qps: number;
}

/* A talkers pass under way. */
interface TalkersPass {
	cursor: number;
	startMs: number;
	/* Rates are taken only when the previous pass ended within two intervals. */
	measuring: boolean;
	elapsedMs: number;
	top: Talker[];
}

const round1 = (x: number): number => Math.round(x * 10) / 10;
const round3 = (x: number): number => Math.round(x * 1000) / 1000;

/** The q quantile of a latency histogram's counts (answers.ts's buckets), in ms; null when empty. */
export function quantileMs(counts: ArrayLike<number>, q: number): number | null {
	let n = 0;
	for (let k = 0; k < counts.length; k++) {
		n += counts[k];
	}
	if (n === 0) {
		return null;
	}
	const want = Math.max(1, Math.ceil(q * n));
	let acc = 0;
	for (let k = 0; k < counts.length; k++) {
		acc += counts[k];
		if (acc >= want) {
			return latencyBoundMs(k);
		}
	}
	return latencyBoundMs(counts.length - 1);
}

export class Sampler {
	readonly events = new EventRing(EVENTS_MAX);
	private readonly watcher: EventWatcher;
	private readonly history: string[] = [];
	private statusJson = '';
	private edge: EdgePrev | null = null;
	private readonly perBackend = new Map<number, BackendPrev>();
	private talkers: Talker[] | null = null;
	private talkersPass: TalkersPass | null = null;
	private lastPassEndMs = -Infinity;
	private talkersTimer: NodeJS.Immediate | null = null;
	private wanted = false;

	/**
	 * `nowMs` is the balancer's clock (rates are taken over it), `wallMs`
	 * the time of day the page shows.
	 */
	constructor(
		private readonly src: StatsSources,
		private readonly identity: SamplerIdentity,
		private readonly nowMs: () => number,
		private readonly wallMs: () => number = Date.now,
	) {
		this.watcher = new EventWatcher(this.events, src);
	}

	/**
	 * Set by the listener while a dashboard is open: the talkers are measured
	 * only then.  When the last closes, the list goes (and a pass under way
	 * stops): it would be stale by the time the next page opened.
	 */
	set talkersWanted(on: boolean) {
		if (this.wanted && !on) {
			this.close();
			this.talkers = null;
			if (this.statusJson !== '') {
				this.statusJson = JSON.stringify(this.takeStatus(this.wallMs()));
			}
		}
		this.wanted = on;
	}

	/** The history, oldest first, as the JSON strings sent. */
	samples(): readonly string[] {
		return this.history;
	}

	/** The latest status as JSON ('' before the first run). */
	get status(): string {
		return this.statusJson;
	}

	/** What a page is told once, when it connects. */
	hello(): string {
		const s = this.src;
		return JSON.stringify({
			version: this.identity.version, pid: process.pid, startedAt: s.startedAt.toISOString(), listen: s.listen,
			transport: this.identity.transport, socketDir: s.socketDir, historySecs: SAMPLE_HISTORY_SECS, maxEvents: EVENTS_MAX,
		});
	}

	/** Take this second's sample, status and events; returns the sample's JSON. */
	run(): string {
		const now = this.nowMs();
		const wall = this.wallMs();
		this.watcher.look(wall);
		const sample = JSON.stringify(this.takeSample(now, wall));
		this.history.push(sample);
		if (this.history.length > SAMPLE_HISTORY_SECS) {
			this.history.shift();
		}
		this.statusJson = JSON.stringify(this.takeStatus(wall));
		if (this.wanted && this.talkersPass === null && now - this.lastPassEndMs >= TALKERS_INTERVAL_SECS * 1000) {
			this.startTalkersPass(now);
		}
		return sample;
	}

	/* ---- the sample ---- */

	private takeSample(now: number, wall: number): Record<string, unknown> {
		const u = this.src.udp.stats;
		const t = this.src.tcp.stats;
		const cache = this.src.udp.cache?.cache.stats;
		const cur: EdgePrev = {
			atMs: now, rx: u.received, tx: u.sent, fwd: u.forwarded, tcp: t.accepted,
			drop: {
				oversize: u.oversize, invalid: u.invalid, acl: u.aclDropped, no_backend: u.noBackend, stuck: u.stuck,
				rate_limited: u.rateLimited, send_full: u.sendQueueFull,
				tcp: t.overCap + t.noBackend + t.aclDropped + t.invalid + t.overRemoteCap + t.evictedBusy + t.messageTimeouts
					+ t.badFirstFrame + t.okTimeouts,
			},
			servfail: u.servfail, refused: u.refused,
			hits: cache?.hits ?? 0, misses: cache?.misses ?? 0, stale: cache?.staleHits ?? 0,
		};
		const prev = this.edge ?? cur;
		this.edge = cur;
		const secs = Math.max(now - prev.atMs, 1) / 1000;
		const rate = (a: number, b: number): number => round1((a - b) / secs);
		const drop: Record<string, number> = {};
		for (const [k, v] of Object.entries(cur.drop)) {
			drop[k] = rate(v, prev.drop[k]);
		}
		const views = this.src.backends.views();
		const be = views.map((v) => this.backendSample(v, secs));
		if (this.perBackend.size > views.length) {
			const ids = new Set(views.map((v) => v.id));
			for (const id of this.perBackend.keys()) {
				if (!ids.has(id)) {
					this.perBackend.delete(id);
				}
			}
		}
		return {
			t: wall, rx: rate(cur.rx, prev.rx), tx: rate(cur.tx, prev.tx), fwd: rate(cur.fwd, prev.fwd),
			tcp: rate(cur.tcp, prev.tcp), drop,
			synth: { servfail: rate(cur.servfail, prev.servfail), refused: rate(cur.refused, prev.refused) }, be,
			...(cache === undefined ? {} : {
				cache: {
					hits: rate(cur.hits, prev.hits), misses: rate(cur.misses, prev.misses), stale: rate(cur.stale, prev.stale),
				},
			}),
		};
	}

	private backendSample(v: BackendView, secs: number): Record<string, unknown> {
		const book = v.health.book;
		const a = book.answers;
		const answers: BackendPrev['answers'] = [a.noerror, a.nxdomain, a.servfail, a.refused, a.other];
		const latency = Float64Array.from(book.latencyCounts);
		const prev = this.perBackend.get(v.id);
		this.perBackend.set(v.id, { udp: v.stats.udp, answers, latency });
		if (prev === undefined) {
			return { id: v.id, q: 0, a: [0, 0, 0, 0, 0], p50: null, p99: null };
		}
		const delta = new Float64Array(LATENCY_BUCKETS);
		for (let k = 0; k < LATENCY_BUCKETS; k++) {
			delta[k] = latency[k] - prev.latency[k];
		}
		const p50 = quantileMs(delta, 0.5);
		const p99 = quantileMs(delta, 0.99);
		return {
			id: v.id, q: round1((v.stats.udp - prev.udp) / secs), a: answers.map((n, i) => round1((n - prev.answers[i]) / secs)),
			p50: p50 === null ? null : round3(p50), p99: p99 === null ? null : round3(p99),
		};
	}

	/* ---- the status ---- */

	private takeStatus(wall: number): Record<string, unknown> {
		const s = this.src;
		return {
			t: wall, uptimeSecs: Math.floor((wall - s.startedAt.getTime()) / 1000), remotes: s.remotes.size,
			maxRemotes: s.remotes.maxRemotes, failOpen: s.health.failOpen, tcpOpen: s.tcp.size,
			backends: s.backends.views().map((be) => ({
				id: be.id, path: be.path, state: be.state, ok: be.ok, removed: be.removed,
				health: be.health.state.name, healthReason: be.health.state.name === 'sick' ? be.health.state.reason : null,
				remotes: be.remoteCount, outstanding: be.health.book.outstanding, stuck: be.stuck, faults: be.stats.faults,
				lastFault: lastFaultJson(be),
			})),
			talkers: this.talkers,
			takeover: s.takeover?.() ?? null,
			cache: cacheSnapshot(s),
		};
	}

	/* ---- top talkers (see TOP TALKERS) ---- */

	private startTalkersPass(now: number): void {
		const sinceLast = now - this.lastPassEndMs;
		this.talkersPass = {
			cursor: 0, startMs: now, measuring: sinceLast <= 2 * TALKERS_INTERVAL_SECS * 1000,
			elapsedMs: sinceLast, top: [],
		};
		if (!this.talkersPass.measuring) {
			this.talkers = null;
		}
		this.talkersTimer = setImmediate(this.talkersSlice);
	}

	private readonly talkersSlice = (): void => {
		this.talkersTimer = null;
		const pass = this.talkersPass;
		if (pass === null) {
			return;
		}
		const remotes = this.src.remotes;
		const { remotes: slice, next } = remotes.slice(pass.cursor, TALKERS_SLICE);
		const now = this.nowMs();
		for (const rem of slice) {
			this.measure(pass, rem, now);
		}
		pass.cursor = next;
		if (next !== ADDR_END) {
			this.talkersTimer = setImmediate(this.talkersSlice);
			return;
		}
		this.talkersPass = null;
		this.lastPassEndMs = now;
		if (pass.measuring) {
			this.talkers = pass.top;
		}
	};

	/* One remote: its rate since the last pass (or its first sight), kept if among the highest. */
	private measure(pass: TalkersPass, rem: Remote, now: number): void {
		const count = rem.udp + rem.tcp;
		const queries = count - rem.talkMark;
		rem.talkMark = count;
		if (!pass.measuring || queries <= 0) {
			return;
		}
		const sinceFirstMs = now - rem.firstSeenMs + 1000;
		const qps = queries / (Math.max(1000, Math.min(pass.elapsedMs, sinceFirstMs)) / 1000);
		const top = pass.top;
		if (top.length === TALKERS_MAX && qps <= top[top.length - 1].qps) {
			return;
		}
		const talker = { ip: rem.ip, backend: rem.primary?.id ?? 0, qps: round1(qps) };
		let i = top.length;
		while (i > 0 && top[i - 1].qps < qps) {
			i--;
		}
		top.splice(i, 0, talker);
		if (top.length > TALKERS_MAX) {
			top.pop();
		}
	}

	/** Stop a talkers pass under way. */
	close(): void {
		if (this.talkersTimer !== null) {
			clearImmediate(this.talkersTimer);
			this.talkersTimer = null;
		}
		this.talkersPass = null;
	}
}
