/*
 * BENCH MEASUREMENT
 *
 * One measured run of one configuration, and what the rounds of it add up
 * to.  A configuration (configurations.ts) is one path under one load: a
 * function that runs the load generator for some seconds, the proxy whose
 * CPU is charged to it (dnsdist or bbal; none for the direct paths) and the
 * backends whose CPU is charged to it (the stub, or the mname(s)).
 *
 * CPU ACCOUNTING.  Around each run, measure() takes a CpuSample
 * (test/support/procfs.ts): the machine's ticks from /proc/stat, each
 * server's utime and stime from /proc/PID/stat (every thread), and this
 * process's own ticks with those of its reaped children, which is where
 * the load generator's CPU shows once dnsperf or tcp_conns has exited.
 * Between the two samples:
 *
 *   proxy ticks     the proxy's utime + stime; its stime alone is "sys %",
 *                   the kernel's share (syscalls, and the wakeups of the
 *                   processes they hand packets to);
 *   backend ticks   the backends' utime + stime, together;
 *   load ticks      the load generator's, reaped by us;
 *   foreign ticks   user + nice + system of the whole machine, less all of
 *                   the above and the driver's own: what other processes
 *                   used meanwhile, reported as a share of one core;
 *   irq, steal      interrupt time (most loopback packet processing, charged
 *                   to no process) and the hypervisor's, for context.
 *
 * Every server is checked to be alive before and after the run, so no
 * figure is ever taken from a path whose server had died.
 *
 * BBAL'S OWN COUNTS.  When the proxy is bbal, its stats snapshot is read
 * before and after the run, and the sample keeps the change in each of its
 * UDP counters and in each backend's UDP count: that is how the two-backend
 * configuration checks that the load was really split.  The first snapshot
 * is read after the first CpuSample, as it always was, so its cost is
 * charged to bbal in every configuration alike.
 *
 * CACHE COUNTS.  When bbal's snapshot has a `cache` object with numeric
 * hits and misses (bbal's packet cache, read defensively: a build without
 * one has none), the sample keeps their change over the run; a proxy that
 * is not bbal can say the same through the configuration's cacheCounts()
 * (dnsdist's statistics), read at the same two moments.  aggregate() sums
 * them over the rounds into a hit rate: hits / (hits + misses).
 *
 * LATENCY.  Each run's percentiles (p50, p99, p99.9; nearest rank,
 * test/support/quantiles.ts) come from dnsperf's per-query latencies, or
 * from tcp_conns's own p50/p99.  aggregate() takes, over the rounds, the
 * median of qps and of each percentile, the lowest and highest qps, the
 * sums of counts, and CPU per query as pooled ticks over pooled answers,
 * in microseconds.
 *
 * A QUIET MACHINE.  otherLoad() is the foreign share of a core over an idle
 * interval of the driver (run.ts waits, up to --wait-quiet, for it to drop
 * below 15% before the first measurement); quietSummary() says afterwards
 * how busy the rest of the machine was during the measured runs.
 */

import { sleep } from '../test/support/wait.js';
import { counters, statsSnapshot, type Snapshot } from '../test/support/bbal.js';
import { clockTicksPerSecond, cpuDelta, cpuSample } from '../test/support/procfs.js';
import { median, percentile } from '../test/support/quantiles.js';
import type { LoadResult } from './load_generators.js';
import type { ScenarioName } from './options.js';
import { type CacheCounts, type Server, snapshotCacheCounts } from './servers.js';

export interface Sample {
	sent: number;
	completed: number;
	lost: number;
	runtime: number;
	qps: number;
	lossPct: number;
	avgLatencyMs: number | null;
	proxyTicks: number | null;
	proxySysTicks: number | null;
	backendTicks: number;
	/** The load generator's CPU (dnsperf or tcp_conns, reaped children of this process). */
	loadTicks: number;
	/** CPU that other processes on the machine used meanwhile, and the hypervisor's steal. */
	foreignTicks: number;
	stealTicks: number;
	irqTicks: number;
	wallSec: number;
	foreignCorePct: number;
	p50: number | null;
	p99: number | null;
	p999?: number | null;
	latencySamples?: number;
	perProcess?: Array<{ qps: number; completed: number; lost: number }>;
	/** bbal's UDP counters that moved during the run, and each backend's UDP count. */
	bbalUdp?: Record<string, number>;
	bbalBackendsUdp?: Record<string, number>;
	/** The proxy's cache hits and misses during the run, when it counts them. */
	cacheHits?: number;
	cacheMisses?: number;
	/** stub load: answers with a non-zero RCODE, and answers that matched no outstanding query. */
	rcodeErrors?: number;
	stray?: number;
}

export interface Aggregate {
	rounds: number;
	qps: number | null;
	qpsMin: number;
	qpsMax: number;
	sent: number;
	completed: number;
	lost: number;
	lossPct: number;
	p50: number | null;
	p99: number | null;
	proxyUsPerQuery: number | null;
	proxySysPct: number | null;
	backendUsPerQuery: number | null;
	loadUsPerQuery: number | null;
	foreignCorePct: number;
	/** Cache hits and misses over the rounds, and hits / (hits + misses) in %; only when every round counted them. */
	cacheHits?: number;
	cacheMisses?: number;
	cacheHitPct?: number | null;
}

export interface Configuration {
	scenario: ScenarioName;
	/** Short name in the progress lines, the JSON and the ratios (sat-bbal, tcpc-direct, ...). */
	id: string;
	label: string;
	proxy: Server | null;
	backends: Server[];
	run: (seconds: number) => Promise<LoadResult>;
	/** Looks at each measured sample (and warns). */
	check?: (sample: Sample) => void;
	/** A proxy other than bbal that counts cache hits: its counts now (null: it will not say). */
	cacheCounts?: () => Promise<CacheCounts | null>;
	samples: Sample[];
	aggregate?: Aggregate;
}

/** CPU ticks per answer, in microseconds; null without ticks or answers. */
export function usPerQuery(ticks: number | null, n: number): number | null {
	return ticks === null || !n ? null : ((ticks / clockTicksPerSecond()) * 1e6) / n;
}

/* The UDP counters of bbal that moved between two snapshots, and each backend's UDP count. */
function bbalDelta(before: Snapshot, after: Snapshot): Pick<Sample, 'bbalUdp' | 'bbalBackendsUdp'> {
	const udp: Record<string, number> = {};
	const was: Record<string, number | undefined> = counters(before.udp);
	for (const [k, v] of Object.entries(counters(after.udp))) {
		if (v - (was[k] ?? 0) !== 0) {
			udp[k] = v - (was[k] ?? 0);
		}
	}
	return {
		bbalUdp: udp,
		bbalBackendsUdp: Object.fromEntries(after.backends.map((b) => [b.id,
			b.stats.udp - (before.backends.find((x) => x.id === b.id)?.stats.udp ?? 0)])),
	};
}

/** One run of a configuration for `seconds`, with its CPU accounting. */
export async function measure(cfg: Configuration, seconds: number): Promise<Sample> {
	const servers = [cfg.proxy, ...cfg.backends].filter((s): s is Server => s !== null);
	servers.forEach((s) => s.child.alive());
	const pids = servers.map((s) => s.child.pid);
	const before = cpuSample(pids);
	const statsSocket = cfg.proxy?.statsSocket ?? null;
	const snapBefore = statsSocket !== null ? await statsSnapshot(statsSocket) : null;
	const cacheBefore = snapBefore !== null ? snapshotCacheCounts(snapBefore) : await cfg.cacheCounts?.() ?? null;
	const wall0 = performance.now();
	const r = await cfg.run(seconds);
	const wallSec = (performance.now() - wall0) / 1000;
	servers.forEach((s) => s.child.alive());
	const d = cpuDelta(before, cpuSample(pids));
	/* Read after the CPU sample, like bbal's second snapshot below. */
	const cacheAfter = snapBefore === null && cacheBefore !== null ? await cfg.cacheCounts?.() ?? null : null;
	const ticks = servers.map((s) => {
		const t = d.processes.get(s.child.pid);
		if (t === undefined) {
			throw new Error(`${s.child.name} is not running`);
		}
		return t;
	});
	const total = ticks.map((t) => t.user + t.system);
	const loadTicks = d.reapedTicks;
	const ours = total.reduce((a, b) => a + b, 0) + loadTicks + d.selfTicks;
	const latencies = r.latencies !== undefined ? Float64Array.from(r.latencies).sort() : null;
	const sample: Sample = {
		sent: r.sent, completed: r.completed, lost: r.lost, runtime: r.runtime, qps: r.qps,
		lossPct: r.sent > 0 ? (100 * r.lost) / r.sent : 0,
		avgLatencyMs: r.avgLatencyMs ?? null,
		proxyTicks: cfg.proxy ? total[0] : null,
		proxySysTicks: cfg.proxy ? ticks[0].system : null,
		backendTicks: total.slice(cfg.proxy ? 1 : 0).reduce((a, b) => a + b, 0),
		loadTicks,
		foreignTicks: Math.max(0, d.processTimeTicks - ours),
		stealTicks: d.stealTicks,
		irqTicks: d.irqTicks,
		wallSec,
		foreignCorePct: 0,
		p50: latencies !== null ? percentile(latencies, 0.5) : r.p50 ?? null,
		p99: latencies !== null ? percentile(latencies, 0.99) : r.p99 ?? null,
	};
	sample.foreignCorePct = (100 * sample.foreignTicks) / (wallSec * clockTicksPerSecond());
	if (latencies !== null) {
		sample.p999 = percentile(latencies, 0.999);
		sample.latencySamples = latencies.length;
	}
	if (r.perProcess) {
		sample.perProcess = r.perProcess;
	}
	if (r.rcodeErrors !== undefined) {
		sample.rcodeErrors = r.rcodeErrors;
		sample.stray = r.stray;
	}
	let cacheEnd = cacheAfter;
	if (snapBefore !== null && statsSocket !== null) {
		const snapAfter = await statsSnapshot(statsSocket);
		Object.assign(sample, bbalDelta(snapBefore, snapAfter));
		cacheEnd = snapshotCacheCounts(snapAfter);
	}
	if (cacheBefore !== null && cacheEnd !== null) {
		sample.cacheHits = cacheEnd.hits - cacheBefore.hits;
		sample.cacheMisses = cacheEnd.misses - cacheBefore.misses;
	}
	return sample;
}

type SummedKey = 'sent' | 'completed' | 'lost' | 'proxyTicks' | 'proxySysTicks' | 'backendTicks' | 'loadTicks'
	| 'foreignTicks' | 'stealTicks' | 'irqTicks' | 'wallSec';

/* A field summed over samples (a missing figure counts nothing). */
function sum(samples: Sample[], k: SummedKey): number {
	return samples.reduce((a, x) => a + (x[k] ?? 0), 0);
}

/** What a configuration's rounds add up to. */
export function aggregate(cfg: Configuration): Aggregate {
	const s = cfg.samples;
	const completed = sum(s, 'completed');
	const cache: Pick<Aggregate, 'cacheHits' | 'cacheMisses' | 'cacheHitPct'> = {};
	if (s.length > 0 && s.every((x) => x.cacheHits !== undefined && x.cacheMisses !== undefined)) {
		cache.cacheHits = s.reduce((a, x) => a + (x.cacheHits ?? 0), 0);
		cache.cacheMisses = s.reduce((a, x) => a + (x.cacheMisses ?? 0), 0);
		const looked = cache.cacheHits + cache.cacheMisses;
		cache.cacheHitPct = looked > 0 ? (100 * cache.cacheHits) / looked : null;
	}
	return {
		rounds: s.length,
		qps: median(s.map((x) => x.qps)),
		qpsMin: Math.min(...s.map((x) => x.qps)),
		qpsMax: Math.max(...s.map((x) => x.qps)),
		sent: sum(s, 'sent'),
		completed,
		lost: sum(s, 'lost'),
		lossPct: sum(s, 'sent') > 0 ? (100 * sum(s, 'lost')) / sum(s, 'sent') : 0,
		p50: median(s.map((x) => x.p50)),
		p99: median(s.map((x) => x.p99)),
		proxyUsPerQuery: cfg.proxy ? usPerQuery(sum(s, 'proxyTicks'), completed) : null,
		proxySysPct: cfg.proxy && sum(s, 'proxyTicks') > 0 ? (100 * sum(s, 'proxySysTicks')) / sum(s, 'proxyTicks') : null,
		backendUsPerQuery: usPerQuery(sum(s, 'backendTicks'), completed),
		loadUsPerQuery: usPerQuery(sum(s, 'loadTicks'), completed),
		foreignCorePct: (100 * sum(s, 'foreignTicks')) / (sum(s, 'wallSec') * clockTicksPerSecond()),
		...cache,
	};
}

/** Share of a core the rest of the machine keeps busy over `ms`, while the driver idles. */
export async function otherLoad(ms = 1000): Promise<number> {
	const a = cpuSample([]);
	await sleep(ms);
	const d = cpuDelta(a, cpuSample([]));
	const mine = d.selfTicks + d.reapedTicks;
	return (100 * Math.max(0, d.processTimeTicks - mine)) / ((ms / 1000) * clockTicksPerSecond());
}

export interface QuietSummary {
	avgCorePct: number;
	maxCorePct: number;
	stealCorePct: number;
	irqCorePct: number;
}

/** How busy the rest of the machine was over all measured runs (shares of one core); null without runs. */
export function quietSummary(samples: Sample[]): QuietSummary | null {
	if (samples.length === 0) {
		return null;
	}
	const coreTicks = sum(samples, 'wallSec') * clockTicksPerSecond();
	return {
		avgCorePct: (100 * sum(samples, 'foreignTicks')) / coreTicks,
		maxCorePct: Math.max(...samples.map((x) => x.foreignCorePct)),
		stealCorePct: (100 * sum(samples, 'stealTicks')) / coreTicks,
		irqCorePct: (100 * sum(samples, 'irqTicks')) / coreTicks,
	};
}
