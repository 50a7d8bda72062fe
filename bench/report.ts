/*
 * BENCH REPORT
 *
 * The figures of one run as the Markdown report that is printed and saved
 * (bench/results/<timestamp>.md, and latest.md after a full run), and the
 * ratios and the targets computed from them.  bench/README.md says
 * what each figure means; this file only arranges them.
 *
 * THE REPORT opens with the machine and the command, then how busy the rest
 * of the machine was (flagged when another process used over 10% of a core
 * in some run), then one table per scenario: qps (median over rounds, and
 * the lowest and highest round), loss, p50/p99, the proxy's and the
 * backends' CPU per query and the proxy's kernel share.  Then the remotes
 * table, the ratios, the targets with PASS or FAIL, and, under --profile,
 * the CPU profile summary.
 *
 * RATIOS are those of the aggregates: medians of qps, pooled CPU per query.
 * Each is also given per round, since the two configurations of a round ran
 * within seconds of each other: a round that something disturbed shows as
 * one outlier there, where the aggregate would hide it.  A ratio or target
 * whose configurations were not run (a partial run) is left out.
 *
 * THE TARGETS are issue 6's and issue 13's, and issue 15's dashboard, each a
 * bar to pass:
 *
 *   saturation, framed stub   bbal CPU/query <= 0.75 x dnsdist's, and
 *                             bbal qps >= 1.3 x dnsdist's;
 *   5,000 qps                 bbal CPU/query <= 1.5 x dnsdist's, and the p99
 *                             bbal adds over the direct path <= 0.5 ms;
 *   one real mname            bbal qps >= 1.2 x that mname's own UDP qps,
 *                             with nothing lost;
 *   100,000 remotes           RSS <= 100 MB, with at least 100,000 held;
 *   the dashboard             bbal's CPU/query with --http and 0, 1 or 10
 *                             dashboards open <= 1.05 x without --http
 *                             (the bench's own round-to-round noise);
 *   the packet cache          under the cache workload, bbal's qps with its
 *                             cache >= 2.5 x without it, and its CPU/query
 *                             (nearly all hits) <= 0.7 x that of dnsdist
 *                             with its packet cache.
 *
 * THE CACHE SCENARIO's table is followed by each proxy's cache hit rate
 * over the measured runs, when it counted them (bbal's snapshot `cache`,
 * dnsdist's statistics): hits over lookups, and hits over answers.
 *
 * NUMBERS are printed en-US with fixed decimals (1,234.5); a missing figure
 * (null, NaN: a configuration with no CPU, a run with no answers) is a dash.
 */

import type { RemotesResult } from './configurations.js';
import type { Aggregate, Configuration, QuietSummary } from './measure.js';
import { usPerQuery } from './measure.js';
import type { MachineInfo } from './tools.js';

/** Another process using more than this much of a core in some run makes the report say so. */
const NOISY_CORE_PCT = 10;

/** A number en-US with `digits` decimals; a dash for a missing one. */
export function fmt(v: number | null | undefined, digits = 1): string {
	return v === null || v === undefined || Number.isNaN(v) ? '–' : v.toLocaleString('en-US', {
		minimumFractionDigits: digits, maximumFractionDigits: digits,
	});
}

export function fmtInt(v: number | null | undefined): string {
	return fmt(v, 0);
}

export interface Ratio {
	name: string;
	value: number;
	perRound?: Array<number | null>;
	text: string;
}

export interface Target {
	name: string;
	measured: string;
	bar: string;
	pass: boolean;
}

/** Everything a run found, as saved in the JSON (configurations keyed by id). */
export interface BenchResult {
	startedAt: string;
	durationSec: number;
	command: string;
	params: {
		rounds: number; seconds: number; tcpSeconds: number; warmSeconds: number; quick: boolean; scenarios: string[];
		profile: boolean;
	};
	machine: MachineInfo;
	configs: Record<string, Configuration>;
	rss: RemotesResult | null;
	/** The in-flight tables of the saturation bbal after its runs (issue 13). */
	inflight: { tableBytes: number; backends: number; outstanding: number; answered: number } | null;
	ratios: Ratio[];
	targets: Target[];
	quiet: QuietSummary | null;
	profile: string | null;
}

/** The ratios between configurations, and the targets they are held to. */
export function ratiosAndTargets(configs: Record<string, Configuration>, rss: RemotesResult | null):
{ ratios: Ratio[]; targets: Target[] } {
	const a = (id: string): Aggregate | undefined => configs[id]?.aggregate;
	const ratios: Ratio[] = [];
	const targets: Target[] = [];
	/* The same ratio within each round (paired in time). */
	const perRound = (idX: string, idY: string, key: 'cpu' | 'qps'): Array<number | null> => {
		const xs = configs[idX]?.samples ?? [];
		const ys = configs[idY]?.samples ?? [];
		const v = (smp: Configuration['samples'][number]): number | null =>
			(key === 'cpu' ? usPerQuery(smp.proxyTicks, smp.completed) : smp.qps);
		return xs.map((sx, i) => (ys[i] ? (v(sx) ?? NaN) / (v(ys[i]) ?? NaN) : null));
	};
	const ratio = (name: string, x: number | null | undefined, y: number | null | undefined,
		pair?: [string, string, 'cpu' | 'qps']): number | null => {
		if (x === null || x === undefined || !y) {
			return null;
		}
		const v = x / y;
		const rounds = pair ? perRound(...pair) : [];
		ratios.push({
			name, value: v, perRound: rounds,
			text: `${fmt(v, 2)}×${rounds.length > 1 ? ` (rounds: ${rounds.map((r) => fmt(r, 2)).join(', ')})` : ''}`,
		});
		return v;
	};
	/* A ratio that could not be computed (a path with no answers) fails its target. */
	const target = (name: string, measured: string, bar: string, pass: boolean): void => {
		targets.push({ name, measured, bar, pass });
	};
	const satBbal = a('sat-bbal');
	const satDnsdist = a('sat-dnsdist');
	if (satBbal && satDnsdist) {
		const cpu = ratio('saturation: bbal / dnsdist CPU per query', satBbal.proxyUsPerQuery, satDnsdist.proxyUsPerQuery,
			['sat-bbal', 'sat-dnsdist', 'cpu']);
		const qps = ratio('saturation: bbal / dnsdist qps', satBbal.qps, satDnsdist.qps, ['sat-bbal', 'sat-dnsdist', 'qps']);
		target('saturation, framed stub: bbal CPU/query vs dnsdist', `${fmt(cpu, 2)}×`, '≤ 0.75×', cpu !== null && cpu <= 0.75);
		target('saturation, framed stub: bbal qps vs dnsdist', `${fmt(qps, 2)}×`, '≥ 1.3×', qps !== null && qps >= 1.3);
	}
	const satPlain = a('sat-bbal-plain');
	if (satBbal && satPlain) {
		const cpu = ratio('saturation: bbal / bbal without answer accounting and probes, CPU per query', satBbal.proxyUsPerQuery,
			satPlain.proxyUsPerQuery, ['sat-bbal', 'sat-bbal-plain', 'cpu']);
		target('saturation: CPU/query with accounting and probes vs without', `${fmt(cpu, 2)}×`, '≤ 1.10×', cpu !== null && cpu <= 1.10);
	}
	const dashOff = a('dash-off');
	for (const n of [0, 1, 10]) {
		const dash = a(`dash-${n}`);
		if (dashOff && dash) {
			const cpu = ratio(`saturation: bbal with --http and ${n} dashboard(s) / without --http, CPU per query`,
				dash.proxyUsPerQuery, dashOff.proxyUsPerQuery, [`dash-${n}`, 'dash-off', 'cpu']);
			target(`dashboard: CPU/query with --http and ${n} open vs without`, `${fmt(cpu, 2)}×`, '≤ 1.05× (noise)',
				cpu !== null && cpu <= 1.05);
		}
	}
	const rateBbal = a('rate-bbal');
	const rateDnsdist = a('rate-dnsdist');
	const rateDirect = a('rate-direct');
	if (rateBbal && rateDnsdist) {
		const cpu = ratio('5,000 qps: bbal / dnsdist CPU per query', rateBbal.proxyUsPerQuery, rateDnsdist.proxyUsPerQuery,
			['rate-bbal', 'rate-dnsdist', 'cpu']);
		ratio('5,000 qps: bbal / dnsdist qps', rateBbal.qps, rateDnsdist.qps, ['rate-bbal', 'rate-dnsdist', 'qps']);
		target('5,000 qps: bbal CPU/query vs dnsdist', `${fmt(cpu, 2)}×`, '≤ 1.5×', cpu !== null && cpu <= 1.5);
	}
	if (rateBbal && rateDirect) {
		const added = (rateBbal.p99 ?? NaN) - (rateDirect.p99 ?? NaN);
		const directSamples = configs['rate-direct'].samples;
		const rounds = configs['rate-bbal'].samples.map((x, i) => (x.p99 ?? NaN) - (directSamples[i]?.p99 ?? NaN));
		ratios.push({
			name: '5,000 qps: p99 added by bbal over direct', value: added, perRound: rounds,
			text: `${fmt(added, 3)} ms${rounds.length > 1 ? ` (rounds: ${rounds.map((r) => fmt(r, 3)).join(', ')})` : ''}`,
		});
		if (rateDnsdist) {
			const dd = (rateDnsdist.p99 ?? NaN) - (rateDirect.p99 ?? NaN);
			ratios.push({ name: '5,000 qps: p99 added by dnsdist over direct', value: dd, text: `${fmt(dd, 3)} ms` });
		}
		target('5,000 qps: p99 added over direct', `${fmt(added, 3)} ms`, '≤ 0.5 ms', added <= 0.5);
	}
	const mnameBbal1 = a('mname-bbal1');
	const mnameUdp = a('mname-udp');
	if (mnameBbal1 && mnameUdp) {
		const r = ratio('bbal → 1 mname qps / that mname\'s own UDP qps', mnameBbal1.qps, mnameUdp.qps,
			['mname-bbal1', 'mname-udp', 'qps']);
		const lost = mnameBbal1.lost;
		target('one real mname: bbal qps vs its own UDP, zero loss', `${fmt(r, 2)}×, ${fmtInt(lost)} lost`, '≥ 1.2×, 0 lost',
			r !== null && r >= 1.2 && lost === 0);
	}
	const mnameBbal2 = a('mname-bbal2');
	if (mnameBbal2 && mnameUdp) {
		ratio('bbal → 2 mnames qps / one mname\'s own UDP qps', mnameBbal2.qps, mnameUdp.qps, ['mname-bbal2', 'mname-udp', 'qps']);
	}
	const tcpqBbal = a('tcpq-bbal');
	const tcpqDirect = a('tcpq-direct');
	if (tcpqBbal && tcpqDirect) {
		ratio('TCP queries/s: bbal → mname / mname directly', tcpqBbal.qps, tcpqDirect.qps, ['tcpq-bbal', 'tcpq-direct', 'qps']);
	}
	const tcpcBbal = a('tcpc-bbal');
	const tcpcDirect = a('tcpc-direct');
	if (tcpcBbal && tcpcDirect) {
		ratio('TCP connections/s: bbal → mname / mname directly', tcpcBbal.qps, tcpcDirect.qps,
			['tcpc-bbal', 'tcpc-direct', 'qps']);
	}
	const cacheOn = a('cache-on');
	const cacheOff = a('cache-off');
	const cacheDnsdist = a('cache-dnsdist');
	if (cacheOn && cacheOff) {
		const qps = ratio('cache: bbal qps, cache on / off', cacheOn.qps, cacheOff.qps, ['cache-on', 'cache-off', 'qps']);
		target('cache: bbal qps with cache on vs off', `${fmt(qps, 2)}×`, '≥ 2.5×', qps !== null && qps >= 2.5);
	}
	if (cacheOn && cacheDnsdist) {
		ratio('cache: bbal (cache on) / dnsdist (packet cache) CPU per query, misses included', cacheOn.proxyUsPerQuery,
			cacheDnsdist.proxyUsPerQuery, ['cache-on', 'cache-dnsdist', 'cpu']);
		ratio('cache: bbal (cache on) / dnsdist (packet cache) qps', cacheOn.qps, cacheDnsdist.qps,
			['cache-on', 'cache-dnsdist', 'qps']);
	}
	const onHits = a('cache-on-hits');
	const ddHits = a('cache-dnsdist-hits');
	if (onHits && ddHits) {
		const cpu = ratio('cache, popular names only: bbal / dnsdist CPU per query (per hit)', onHits.proxyUsPerQuery,
			ddHits.proxyUsPerQuery, ['cache-on-hits', 'cache-dnsdist-hits', 'cpu']);
		target('cache: bbal CPU per cache hit vs dnsdist\'s with its packet cache', `${fmt(cpu, 2)}×`, '≤ 0.7×',
			cpu !== null && cpu <= 0.7);
	}
	const cacheDirect = a('cache-direct');
	if (cacheOn && cacheDirect) {
		ratio('cache: bbal (cache on) qps / the generator\'s ceiling (direct → stub)', cacheOn.qps, cacheDirect.qps,
			['cache-on', 'cache-direct', 'qps']);
	}
	if (rss) {
		const mb = (rss.rssAfterKb ?? NaN) / 1024;
		ratios.push({ name: `bbal RSS holding ${fmtInt(rss.remotesHeld)} remotes`, value: mb, text: `${fmt(mb)} MB` });
		target('100,000 remotes: RSS', `${fmt(mb)} MB (${fmtInt(rss.remotesHeld)} held)`, '≤ 100 MB',
			mb <= 100 && rss.remotesHeld >= 100000);
	}
	return { ratios, targets };
}

/* One scenario's table (nothing if none of its configurations ran). */
function scenarioTable(L: string[], configs: Record<string, Configuration>, title: string, ids: string[], unit = 'qps'): void {
	const rows = ids.filter((id) => configs[id]);
	if (rows.length === 0) {
		return;
	}
	L.push('');
	L.push(`### ${title}`);
	L.push('');
	L.push(`| path | ${unit} | range | loss % | p50 ms | p99 ms | proxy CPU µs/q | proxy sys % | backend CPU µs/q |`);
	L.push('|---|---:|---:|---:|---:|---:|---:|---:|---:|');
	for (const id of rows) {
		const c = configs[id];
		const a = c.aggregate as Aggregate;
		L.push(`| ${c.label} | ${fmtInt(a.qps)} | ${fmtInt(a.qpsMin)}–${fmtInt(a.qpsMax)} | ${fmt(a.lossPct, 2)} | `
			+ `${fmt(a.p50, 3)} | ${fmt(a.p99, 3)} | ${fmt(a.proxyUsPerQuery, 2)} | ${fmt(a.proxySysPct, 0)} | `
			+ `${fmt(a.backendUsPerQuery, 2)} |`);
	}
}

/* The cache scenario's configurations, in the order of its table. */
const CACHE_IDS = ['cache-direct', 'cache-off', 'cache-on', 'cache-dnsdist', 'cache-on-hits', 'cache-dnsdist-hits'];

/* The cache scenario's hit rates, for the proxies that counted them; a line saying so for those that did not. */
function cacheHitRates(L: string[], configs: Record<string, Configuration>): void {
	const proxies = CACHE_IDS.filter((id) => configs[id]?.proxy);
	if (proxies.length === 0) {
		return;
	}
	const parts = proxies.map((id) => {
		const c = configs[id];
		const a = c.aggregate as Aggregate;
		if (a.cacheHitPct === undefined) {
			return `${id}: not reported`;
		}
		const looked = (a.cacheHits ?? 0) + (a.cacheMisses ?? 0);
		/* What the cache did not answer went to the backends (or was lost): hits are counted against all answers too. */
		const ofAnswers = a.completed > 0 ? `, ${fmt((100 * (a.cacheHits ?? 0)) / a.completed, 1)}% of the answers` : '';
		return `${id}: ${fmt(a.cacheHitPct, 1)}% (${fmtInt(a.cacheHits)} hits of ${fmtInt(looked)} lookups${ofAnswers})`;
	});
	L.push('');
	L.push(`Cache hit rate over the measured runs (hits ÷ (hits + misses), as each proxy counts them): ${parts.join('; ')}.`);
}

/** The Markdown report; `kind` says what sort of run it was (full, partial, quick). */
export function report(res: BenchResult, kind: string): string {
	const { machine, configs, ratios, targets, rss, quiet, inflight } = res;
	const L: string[] = [];
	L.push(`# bbal benchmark, ${res.startedAt.slice(0, 16).replace('T', ' ')} UTC (${kind})`);
	L.push('');
	L.push(`Machine: ${machine.nproc} cores (${machine.cpu}), ${machine.memGiB} GiB, ${machine.kernel}; `
		+ `node ${machine.node}, dnsperf ${machine.dnsperf}, dnsdist ${machine.dnsdist}, mname ${machine.mname}, `
		+ `bbal ${machine.bbalCommit}.`);
	L.push(`Command: \`${res.command}\`: ${res.params.rounds} round(s) round-robin, UDP runs ${res.params.seconds} s, `
		+ `TCP runs ${res.params.tcpSeconds} s, after a ${res.params.warmSeconds} s warm-up of each path; `
		+ `total ${fmt(res.durationSec, 0)} s.`);
	L.push('');
	L.push('qps: median over rounds (range: lowest–highest round); loss: lost/sent over all rounds; p50/p99: median over rounds of each '
		+ "run's percentile of dnsperf's per-query latencies (the cache scenario's: stub load's own histogram); CPU µs/q: utime+stime from /proc/PID/stat summed over "
		+ 'rounds ÷ queries answered (all threads of the process); proxy sys %: the share of that in the kernel (stime).');
	if (quiet) {
		L.push('');
		L.push(`Other processes used ${fmt(quiet.avgCorePct, 1)}% of a core on average during the measured runs `
			+ `(${fmt(quiet.maxCorePct, 1)}% at most in one run); hypervisor steal ${fmt(quiet.stealCorePct, 1)}%; `
			+ `interrupt time (mostly loopback packet processing, charged to no process) ${fmt(quiet.irqCorePct, 1)}%.`
			+ (quiet.maxCorePct > NOISY_CORE_PCT ? ' **The machine was not quiet: treat these figures with care.**' : ''));
	}
	scenarioTable(L, configs, 'UDP at saturation, fast C stub (dnsperf -c 4 -q 200)', ['sat-direct', 'sat-dnsdist', 'sat-bbal',
		'sat-bbal-plain']);
	scenarioTable(L, configs, 'UDP at saturation, fast C stub: the dashboard\'s cost (dnsperf -c 4 -q 200)',
		['dash-off', 'dash-0', 'dash-1', 'dash-10']);
	scenarioTable(L, configs, 'UDP at 5,000 qps, fast C stub (dnsperf -Q 5000)', ['rate-direct', 'rate-dnsdist', 'rate-bbal']);
	scenarioTable(L, configs, 'UDP at saturation, real mname backends', ['mname-udp', 'mname-bbal1', 'mname-bbal2']);
	scenarioTable(L, configs, 'UDP at saturation, a datacenter\'s DNS through a packet cache (stub load from 50 sources, 200 '
		+ 'outstanding; 300 names Zipf s=1 + 10% unique; 2 Binder-like mnames)', CACHE_IDS);
	cacheHitRates(L, configs);
	scenarioTable(L, configs, 'TCP, queries over 4 persistent connections (dnsperf -m tcp -c 4 -q 200)',
		['tcpq-direct', 'tcpq-bbal']);
	scenarioTable(L, configs, 'TCP, new connections per second (8 workers: connect, 1 query, close)',
		['tcpc-direct', 'tcpc-bbal'], 'conn/s');
	if (rss) {
		L.push('');
		L.push('### bbal memory with 100,000 remotes');
		L.push('');
		L.push('| remotes held | RSS before | RSS after | peak RSS | spray: sent / answered / time |');
		L.push('|---:|---:|---:|---:|---:|');
		L.push(`| ${fmtInt(rss.remotesHeld)} | ${fmt((rss.rssBeforeKb ?? NaN) / 1024)} MB | ${fmt((rss.rssAfterKb ?? NaN) / 1024)} MB | `
			+ `${fmt((rss.hwmKb ?? NaN) / 1024)} MB | ${fmtInt(rss.sent)} / ${fmtInt(rss.answered)} / ${fmt(rss.sprayMs / 1000, 2)} s |`);
	}
	if (inflight) {
		L.push('');
		L.push(`In-flight tables of \`bbal → framed stub\` after its saturation runs: ${fmt(inflight.tableBytes / 1024, 1)} KiB `
			+ `over ${inflight.backends} backend(s), ${fmtInt(inflight.answered)} answers matched, ${inflight.outstanding} outstanding.`);
	}
	if (ratios.length) {
		L.push('');
		L.push('### Ratios');
		L.push('');
		L.push('| ratio | value |');
		L.push('|---|---:|');
		for (const r of ratios) {
			L.push(`| ${r.name} | ${r.text} |`);
		}
	}
	if (targets.length) {
		L.push('');
		L.push('### Targets');
		L.push('');
		L.push('| target | measured | bar | result |');
		L.push('|---|---:|---:|:---:|');
		for (const t of targets) {
			L.push(`| ${t.name} | ${t.measured} | ${t.bar} | ${t.pass ? 'PASS' : '**FAIL**'} |`);
		}
	}
	if (res.profile) {
		L.push('');
		L.push('### CPU profile of bbal (--profile; these runs are slower than unprofiled ones)');
		L.push('');
		L.push('```');
		L.push(res.profile);
		L.push('```');
	}
	L.push('');
	return L.join('\n');
}
