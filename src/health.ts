/*
 * BACKEND HEALTH
 *
 * A backend's control session says only that the process is there.  Health
 * says whether it answers: a backend is `healthy` or `sick` (with a reason:
 * `servfail`, `timeouts` or `probe`), apart from its session's state.  While
 * any other connected backend is healthy a sick one gets no client traffic:
 * Backend.usable is false, so its remotes use a backup exactly as when
 * their primary is down, new remotes go elsewhere, the rebalance leaves it
 * out, and its remotes return the moment it is healthy again.  Its session
 * and heartbeats go on as before.
 *
 *               passive (window) or `fall` failed probes
 *   healthy ------------------------------------------------> sick {reason}
 *      ^                                                        |
 *      +--- `rise` passing probes in a row, its hold-down over -+
 *
 * PASSIVE.  Every answer and every query left unanswered (answers.ts) lands
 * in a sliding window of the last PASSIVE_WINDOW_MS, in PASSIVE_BUCKETS
 * buckets.  Every run() (each HEALTH_RUN_MS) looks at each healthy backend's
 * window: with at least PASSIVE_MIN_SAMPLES in it, a backend whose answers
 * and unanswered queries are PASSIVE_SICK_SHARE or more SERVFAIL turns sick
 * (`servfail`), or unanswered (`timeouts`).  REFUSED and NXDOMAIN are normal
 * answers (Binder refuses names outside its domain on purpose).  The window
 * is no longer than the query timeout, so a backend that stops answering
 * at t is judged on its timeouts alone from t + timeout on: it turns sick
 * within a quarter of a second of its first queries timing out.
 *
 * PROBES.  Every --health-interval seconds bbal sends each connected
 * backend a query for --health-query in an INBOUND_UDP frame from 0.0.0.0
 * port 0, a source no client can have (no datagram arrives from port 0),
 * and takes the answer to that address itself (udp_proxy.ts): it never
 * goes out, and only the answer with the probe's id counts.  SERVFAIL, or
 * no answer within --health-timeout, fails a probe; any other rcode passes.
 * `fall` failures in a row make a healthy backend sick (a quiet backend has
 * no window to judge), and only probes bring a sick one back: `rise` passes
 * in a row.  With --no-health-check there are no probes; a sick backend is
 * then tried again when its hold-down is over (at least HOLD_DOWN_SECS).
 *
 * NO FLAPPING.  A backend whose SERVFAIL share hovers at the threshold
 * would otherwise go sick, lose its traffic, pass its probes (the probe
 * name is not the names that fail), come back, and go sick again every few
 * seconds, moving its remotes each time.  So a backend that turns sick
 * again within RELAPSE_SECS of its last return is held sick at least
 * HOLD_DOWN_SECS the first time and twice as long each further time, up to
 * HOLD_DOWN_MAX_SECS; a minute without relapse forgets the history.  The
 * first sickness has no hold-down: a backend that recovers is back after
 * its `rise` probes.  Its window starts empty on its return.
 *
 * FAIL OPEN.  When every connected backend is sick, none is treated as
 * sick: clients get the backends' own answers (from their primaries, as
 * before) rather than bbal's SERVFAIL, which stays reserved for "no backend
 * connected".  Logged once at warn when it begins and at info when it ends.
 */

import type { Logger } from 'pino';
import { AnswerBook, type AnswerEvent } from './answers.js';
import type { Backend } from './backend.js';
import { DNS_HEADER_BYTES, encodeQuestion, RCODE_SERVFAIL } from './dns.js';

export const HEALTH_RUN_MS = 250;
export const PASSIVE_WINDOW_MS = 2000;
export const PASSIVE_BUCKETS = 8;
export const PASSIVE_MIN_SAMPLES = 20;
export const PASSIVE_SICK_SHARE = 0.5;
export const HOLD_DOWN_SECS = 5;
export const HOLD_DOWN_MAX_SECS = 60;
export const RELAPSE_SECS = 60;

export const DEFAULT_HEALTH_QUERY = 'bbal-health-check.invalid';
export const DEFAULT_HEALTH_QTYPE = 1; /* A */
export const DEFAULT_HEALTH_INTERVAL_SECS = 1;
export const DEFAULT_HEALTH_TIMEOUT_MS = 1000;
export const DEFAULT_HEALTH_RISE = 2;
export const DEFAULT_HEALTH_FALL = 2;

export interface HealthOptions {
	queryTimeoutMs: number;
	maxInflight: number;
	/** False: --no-health-check. */
	probes: boolean;
	intervalSecs: number;
	timeoutMs: number;
	rise: number;
	fall: number;
	queryName: string;
	queryType: number;
}

export const DEFAULT_HEALTH_OPTIONS: HealthOptions = {
	queryTimeoutMs: 2000, maxInflight: 65_536, probes: true, intervalSecs: DEFAULT_HEALTH_INTERVAL_SECS,
	timeoutMs: DEFAULT_HEALTH_TIMEOUT_MS, rise: DEFAULT_HEALTH_RISE, fall: DEFAULT_HEALTH_FALL,
	queryName: DEFAULT_HEALTH_QUERY, queryType: DEFAULT_HEALTH_QTYPE,
};

export type SickReason = 'servfail' | 'timeouts' | 'probe';
export type HealthState =
	| { readonly name: 'healthy' }
	| { readonly name: 'sick'; readonly reason: SickReason; readonly sinceMs: number; readonly holdUntilMs: number };

/** The last probe's outcome, as operators read it. */
export interface ProbeOutcome {
	ok: boolean;
	/** The answer's rcode, or null: no answer in time. */
	rcode: number | null;
	ms: number | null;
	/** When it was judged (clock ms). */
	at: number;
}

const HEALTHY: HealthState = { name: 'healthy' };
const BUCKET_MS = PASSIVE_WINDOW_MS / PASSIVE_BUCKETS;

/** One backend's health: its answer book, its passive window, its probes. */
export class BackendHealth {
	readonly book: AnswerBook;
	state: HealthState = HEALTHY;
	/** Times it changed state. */
	transitions = 0;
	lastProbe: ProbeOutcome | null = null;
	/* The window: per bucket, events, SERVFAILs and unanswered queries. */
	private readonly events = new Uint32Array(PASSIVE_BUCKETS);
	private readonly servfails = new Uint32Array(PASSIVE_BUCKETS);
	private readonly timeouts = new Uint32Array(PASSIVE_BUCKETS);
	private bucket = -1;
	/* The probe out, if any: its id and when it went. */
	probeId = -1;
	probeSentAt = -Infinity;
	passes = 0;
	failures = 0;
	/* No flapping: when it last came back, and the hold-down it last served. */
	private returnedAt = -Infinity;
	private lastHoldSecs = 0;

	constructor(readonly be: Backend, opts: HealthOptions, private readonly monitor: HealthMonitor) {
		this.book = new AnswerBook(opts.queryTimeoutMs, opts.maxInflight, this.bookOnEvent);
	}

	get sick(): boolean {
		return this.state.name === 'sick';
	}

	/** Served client traffic: healthy, or every connected backend is sick (FAIL OPEN). */
	get serving(): boolean {
		return this.state.name === 'healthy' || this.monitor.failOpen;
	}

	private readonly bookOnEvent = (ev: AnswerEvent, nowMs: number): void => {
		const b = this.roll(nowMs);
		this.events[b]++;
		if (ev === 'servfail') {
			this.servfails[b]++;
		} else if (ev === 'unanswered') {
			this.timeouts[b]++;
		}
	};

	/* The bucket for nowMs, clearing those the window has moved on to since the last event. */
	private roll(nowMs: number): number {
		const at = Math.floor(nowMs / BUCKET_MS);
		if (at > this.bucket) {
			const gap = this.bucket < 0 ? PASSIVE_BUCKETS : Math.min(at - this.bucket, PASSIVE_BUCKETS);
			for (let i = 0; i < gap; i++) {
				const b = (at - i) % PASSIVE_BUCKETS;
				this.events[b] = 0;
				this.servfails[b] = 0;
				this.timeouts[b] = 0;
			}
			this.bucket = at;
		}
		return this.bucket % PASSIVE_BUCKETS;
	}

	/** What the window holds now. */
	window(nowMs: number): { events: number; servfail: number; unanswered: number } {
		this.roll(nowMs);
		let events = 0;
		let servfail = 0;
		let unanswered = 0;
		for (let b = 0; b < PASSIVE_BUCKETS; b++) {
			events += this.events[b];
			servfail += this.servfails[b];
			unanswered += this.timeouts[b];
		}
		return { events, servfail, unanswered };
	}

	/** The passive verdict for a healthy backend: a reason to turn sick, or null. */
	passiveVerdict(nowMs: number): SickReason | null {
		const w = this.window(nowMs);
		if (w.events < PASSIVE_MIN_SAMPLES) {
			return null;
		}
		if (w.servfail >= w.events * PASSIVE_SICK_SHARE) {
			return 'servfail';
		}
		if (w.unanswered >= w.events * PASSIVE_SICK_SHARE) {
			return 'timeouts';
		}
		return null;
	}

	/** Turn sick now, with the hold-down NO FLAPPING asks for. */
	fallSick(reason: SickReason, nowMs: number): void {
		let hold = 0;
		if (nowMs - this.returnedAt < RELAPSE_SECS * 1000) {
			hold = Math.min(HOLD_DOWN_MAX_SECS, Math.max(HOLD_DOWN_SECS, this.lastHoldSecs * 2));
		} else if (!this.monitor.opts.probes) {
			hold = HOLD_DOWN_SECS;
		}
		this.lastHoldSecs = hold;
		this.passes = 0;
		this.state = { name: 'sick', reason, sinceMs: nowMs, holdUntilMs: nowMs + hold * 1000 };
		this.transitions++;
	}

	/** Healthy again: an empty window, and the time for NO FLAPPING. */
	recover(nowMs: number): void {
		this.state = HEALTHY;
		this.transitions++;
		this.returnedAt = nowMs;
		this.failures = 0;
		this.events.fill(0);
		this.servfails.fill(0);
		this.timeouts.fill(0);
	}

	/** The control session went away: nothing out will be answered, and the probe starts over. */
	sessionLost(): void {
		this.book.clear();
		this.probeId = -1;
		this.passes = 0;
		this.failures = 0;
	}
}

/**
 * Every backend's health: the periodic run (sweeps, passive verdicts,
 * probes), probe answers, fail-open, and the log lines of each change.
 */
export class HealthMonitor {
	/** Every connected backend is sick (FAIL OPEN). */
	failOpen = false;
	/** Probe answers that were not the probe out (a wrong id, or none out). */
	strayProbeAnswers = 0;
	private nextProbeId = 1;

	constructor(
		readonly opts: HealthOptions,
		private readonly log: Logger,
		/** Every backend the registry holds. */
		private readonly backends: () => Iterable<Backend>,
	) {}

	/** The factory the registry gives each backend it makes. */
	readonly attach = (be: Backend): BackendHealth => new BackendHealth(be, this.opts, this);

	/** Every HEALTH_RUN_MS: sweep every table, judge every healthy window, send and judge probes, then fail-open. */
	run(nowMs: number): void {
		/* Each backend on its own schedule: one that has just connected is probed at once. */
		const probeDue = nowMs - (this.opts.intervalSecs * 1000 - HEALTH_RUN_MS / 2);
		let changed = false;
		for (const be of this.backends()) {
			const h = be.health;
			h.book.sweep(nowMs);
			if (!be.ok) {
				continue;
			}
			if (h.probeId >= 0 && nowMs - h.probeSentAt >= this.opts.timeoutMs) {
				changed = this.probeJudged(h, false, null, null, nowMs) || changed;
			}
			if (h.state.name === 'healthy') {
				const reason = h.passiveVerdict(nowMs);
				if (reason !== null) {
					changed = this.fall(h, reason, nowMs) || changed;
				}
			} else if (!this.opts.probes && nowMs >= h.state.holdUntilMs) {
				changed = this.rise(h, nowMs) || changed;
			}
			/* A stuck session would drop it (and count a client's drop): it is faulted within seconds anyway. */
			if (this.opts.probes && h.probeId < 0 && h.probeSentAt <= probeDue && !be.stuck) {
				this.sendProbe(h, nowMs);
			}
		}
		if (changed) {
			this.recount();
		}
	}

	/** A control session began or ended (backend.ts): fail-open may change; a lost session forgets what was out. */
	readonly sessionChanged = (be: Backend): void => {
		if (!be.ok) {
			be.health.sessionLost();
		}
		this.recount();
	};

	/**
	 * An answer to 0.0.0.0 port 0 from `be`: the probe's, if its id is the
	 * probe's; anything else there is counted and dropped.  Never sent.
	 */
	probeAnswer(be: Backend, payload: Buffer, nowMs: number): void {
		const h = be.health;
		if (payload.length < DNS_HEADER_BYTES || h.probeId < 0 || payload.readUInt16BE(0) !== h.probeId) {
			this.strayProbeAnswers++;
			return;
		}
		const rcode = payload[3] & 0x0f;
		const ms = nowMs - h.probeSentAt;
		const ok = rcode !== RCODE_SERVFAIL && ms <= this.opts.timeoutMs;
		if (this.probeJudged(h, ok, rcode, ms, nowMs)) {
			this.recount();
		}
	}

	private sendProbe(h: BackendHealth, nowMs: number): void {
		const id = this.nextProbeId;
		this.nextProbeId = id >= 0xffff ? 1 : id + 1;
		const msg = encodeQuestion(this.opts.queryName, this.opts.queryType, id);
		/* options.ts checked the name. */
		if (msg !== null && h.be.sendUdp(0, 0, msg)) {
			/* Not a client's query: stats.udp counts those alone. */
			h.be.stats.udp--;
		}
		h.probeId = id;
		h.probeSentAt = nowMs;
	}

	/* One probe judged; true when the backend changed state. */
	private probeJudged(h: BackendHealth, ok: boolean, rcode: number | null, ms: number | null, nowMs: number): boolean {
		h.probeId = -1;
		h.lastProbe = { ok, rcode, ms, at: nowMs };
		if (ok) {
			h.passes++;
			h.failures = 0;
			const s = h.state;
			if (s.name === 'sick' && h.passes >= this.opts.rise && nowMs >= s.holdUntilMs) {
				return this.rise(h, nowMs);
			}
			return false;
		}
		h.failures++;
		h.passes = 0;
		if (h.state.name === 'healthy' && h.failures >= this.opts.fall) {
			return this.fall(h, 'probe', nowMs);
		}
		return false;
	}

	private fall(h: BackendHealth, reason: SickReason, nowMs: number): boolean {
		const w = h.window(nowMs);
		h.fallSick(reason, nowMs);
		const s = h.state as Extract<HealthState, { name: 'sick' }>;
		h.be.log.warn({
			health: 'sick', health_reason: reason, window_answers: w.events - w.unanswered, window_servfail: w.servfail,
			window_unanswered: w.unanswered, probe_failures: h.failures, hold_secs: (s.holdUntilMs - nowMs) / 1000,
		}, 'backend health changed');
		return true;
	}

	private rise(h: BackendHealth, nowMs: number): boolean {
		const s = h.state;
		h.recover(nowMs);
		h.be.log.info({
			health: 'healthy', health_reason: null, sick_secs: s.name === 'sick' ? (nowMs - s.sinceMs) / 1000 : 0,
			probe_passes: h.passes,
		}, 'backend health changed');
		return true;
	}

	/* FAIL OPEN: recomputed whenever a state or a session changes. */
	private recount(): void {
		let connected = 0;
		let healthy = 0;
		for (const be of this.backends()) {
			if (be.ok) {
				connected++;
				if (!be.health.sick) {
					healthy++;
				}
			}
		}
		const failOpen = connected > 0 && healthy === 0;
		if (failOpen !== this.failOpen) {
			this.failOpen = failOpen;
			if (failOpen) {
				this.log.warn({ backends: connected }, 'every backend is sick: failing open');
			} else {
				this.log.info({ backends: connected, healthy }, 'failing open no more');
			}
		}
	}
}
