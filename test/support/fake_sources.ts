/*
 * A stand-in for the balancer's live objects as the sampler and the event
 * watcher read them (StatsSources): plain counters a test moves by hand,
 * backends as plain views, remotes in an ordered array.  For the sampler's
 * and the events' unit tests, where a real fleet would make every number
 * depend on timing.
 */

import { LATENCY_BUCKETS } from '../../src/answers.js';
import type { BackendView } from '../../src/backends.js';
import type { HealthState } from '../../src/health.js';
import { ADDR_END, type Remote } from '../../src/remotes.js';
import type { StatsSources, TakeoverRecord } from '../../src/stats.js';
import { TimeoutWheel } from '../../src/timeouts.js';

/** A backend view whose fields a test sets. */
export interface FakeBackend {
	id: number;
	path: string;
	state: string;
	ok: boolean;
	removed: boolean;
	stuck: boolean;
	remoteCount: number;
	stats: { connStart: number; connError: number; udp: number; tcp: number; stuck: number; faults: number; throttled: number };
	lastFault: { reason: string; atMs: number } | null;
	health: {
		state: HealthState;
		book: {
			answers: { noerror: number; nxdomain: number; servfail: number; refused: number; other: number };
			latencyCounts: Float64Array;
			outstanding: number;
		};
	};
}

export function fakeBackend(id: number): FakeBackend {
	return {
		id, path: `/var/run/binder/sockets/${id}.sock`, state: 'ok', ok: true, removed: false, stuck: false, remoteCount: 0,
		stats: { connStart: 1, connError: 0, udp: 0, tcp: 0, stuck: 0, faults: 0, throttled: 0 },
		lastFault: null,
		health: {
			state: { name: 'healthy' },
			book: {
				answers: { noerror: 0, nxdomain: 0, servfail: 0, refused: 0, other: 0 },
				latencyCounts: new Float64Array(LATENCY_BUCKETS), outstanding: 0,
			},
		},
	};
}

/** A remote as the talkers pass reads it. */
export interface FakeRemote {
	addr: number;
	ip: string;
	udp: number;
	tcp: number;
	talkMark: number;
	firstSeenMs: number;
	primary: { id: number } | null;
}

export class FakeSources {
	backends: FakeBackend[] = [];
	remotes: FakeRemote[] = [];
	failOpen = false;
	rebalances = 0;
	lastRebalance: { backend: number; moved: number; planned: number } | null = null;
	takeover: TakeoverRecord | null = null;
	udp = {
		received: 0, forwarded: 0, oversize: 0, noBackend: 0, stuck: 0, sent: 0, receiveErrors: 0, sendErrors: 0,
		sendQueueFull: 0, invalid: 0, aclDropped: 0, rateLimited: 0, servfail: 0, refused: 0, unsolicited: 0, probeAnswers: 0,
	};
	tcp = {
		accepted: 0, overCap: 0, noBackend: 0, established: 0, idleClosed: 0, badFirstFrame: 0, okTimeouts: 0, abandoned: 0,
		aclDropped: 0, invalid: 0, overRemoteCap: 0, evictedIdle: 0, evictedBusy: 0, messageTimeouts: 0,
		pausedClientNotReading: 0, pausedBackendNotReading: 0, pausedQueryCap: 0, pausedSourceQueryCap: 0,
	};
	/** How many times the remotes were sliced (a talkers pass's turns). */
	slices = 0;
	/** The clock a test steps, and a wheel on it. */
	nowMs = Date.parse('2030-01-02T04:00:00.000Z');
	readonly wheel = new TimeoutWheel(() => this.nowMs);

	constructor(readonly startedAt = new Date('2030-01-02T03:04:05.000Z')) {}

	/** As the balancer's statsSources would give them. */
	sources(): StatsSources {
		/* The getters below read this object, not the literal they sit in. */
		const me = (): FakeSources => this;
		const self = me();
		return {
			backends: { views: () => self.backends as unknown as BackendView[] },
			remotes: {
				get size() { return self.remotes.length; },
				maxRemotes: 100_000,
				get rebalances() { return self.rebalances; },
				get lastRebalance() { return self.lastRebalance; },
				slice(from: number, max: number): { remotes: Remote[]; next: number } {
					self.slices++;
					const sorted = self.remotes.filter((r) => r.addr >= from).sort((a, b) => a.addr - b.addr);
					const out = sorted.slice(0, max);
					return { remotes: out as unknown as Remote[], next: sorted.length > max ? sorted[max].addr : ADDR_END };
				},
			},
			udp: { stats: self.udp },
			tcp: { stats: self.tcp, size: 0 },
			wheel: self.wheel,
			health: { get failOpen() { return self.failOpen; } },
			listen: { address: '127.0.0.1', port: 53 },
			socketDir: '/var/run/binder/sockets',
			startedAt: self.startedAt,
			takeover: () => self.takeover,
		} as unknown as StatsSources;
	}
}
