/*
 * CHAOS SUITE
 *
 * Builds the fleet (three real mname backends 5301-5303 and the fake 5310,
 * bbal in front), starts the load, warms up, then runs a list of scenarios
 * -- a fixed one (`npm run chaos`, the short form in `npm test`) or a seeded
 * random one for a given time (`npm run soak`) -- and stops everything,
 * also when a scenario throws.
 *
 * WARM-UP.  bbal's resident set grows for its first seconds under load:
 * V8 compiles the hot path, and it grows its young generation (8 -> 16 ->
 * 32 MiB, V8's default ceiling on 64-bit; bin/bbal caps it lower, and the
 * fleet runs bbal with the launcher's flags) each time the bytes that survived its
 * scavenges since the last growth exceed its size.  That happens once in
 * the life of a bbal, at its first bursts of work -- which the first fault
 * would otherwise be, and that scenario would be charged 16-24 MB that are
 * no leak (measured: heap reserved 26.5 -> 43 MB and RSS +25% in whichever
 * scenario came first).  A long-running bbal has been through bursts, so
 * the warm-up gives it some: the load starts at twice the rate with every
 * 4th query over TCP until bbal's /metrics shows the young generation at its
 * ceiling (5-7 s for 32 MiB, measured; at most burstMs), then runs steady for warmupMs,
 * and then until bbal's RSS has stopped growing by more than 1% a second.  The
 * warm-up line says where the young generation ended up.  Only then is the
 * first "before" sampled; every scenario samples its own "before", right
 * before its fault, and its "after" at the end, both at a quiet moment
 * (load.ts, quiesce()).
 */

import { seededRandom } from '../support/random.js';
import { sleep } from '../support/wait.js';
import { LAUNCHER_V8_FLAGS } from '../support/bbal.js';
import type { Teardowns } from '../support/process.js';
import { ChaosFleet, heapSample, procSample, YOUNG_GENERATION_MAX_KB } from './fleet.js';
import { chaosSources, LoadDriver } from './load.js';
import { formatSummary } from './report.js';
import { type Ctx, runScenario, scenario, type ScenarioResult, type Timing, targetFor } from './scenarios.js';

/**
 * Under `npm run coverage` bbal runs with V8's coverage on (c8 hands
 * NODE_V8_COVERAGE down): slower, and its heap holds the counters, so the
 * suite's losses and memory bounds measure the instrumentation, not bbal.
 * The tap files then report those verdicts as todo rather than failures.
 */
const UNDER_COVERAGE = process.env['NODE_V8_COVERAGE'] !== undefined;
export const FIGURES_UNDER_COVERAGE = UNDER_COVERAGE
	? { todo: 'bbal runs under V8 coverage: its timings and memory are not its own' }
	: {};

export interface SuiteOptions {
	rate: number;
	sources: number;
	tcpEvery: number;
	timeoutMs: number;
	warmupMs: number;
	/** Longest part of the warm-up at twice the rate (it ends when V8's young generation is at its maximum). */
	burstMs: number;
	timing: Timing;
	/** Scenario names in order, or null for the soak. */
	plan: string[] | null;
	/** Soak: run random scenarios until this much time has passed. */
	soakMs?: number;
	seed?: number;
	log: (line: string) => void;
}

/**
 * The short form's load and phases, shared by the tap files inside `npm test`
 * (chaos.test.ts, hostile.test.ts): the full load, shorter phases.
 */
export const SHORT_FORM: Omit<SuiteOptions, 'plan' | 'log'> = {
	rate: 2000,
	sources: 50,
	tcpEvery: 20,
	timeoutMs: 1000,
	warmupMs: 1500,
	burstMs: 8000,
	timing: {
		beforeMs: 2000, afterMs: 2000, killDownMs: 2000, stopMs: 25_000, stuckMs: 14_000, addAfterMs: 1000,
		orphanMs: 8000, returnWaitMs: 12_000, balanceWaitMs: 0, hostileMs: 15_000, servfailMs: 8000,
		blackholeMs: 8000, allServfailMs: 10_000,
	},
};

async function warmUp(fleet: ChaosFleet, driver: LoadDriver, opts: SuiteOptions): Promise<void> {
	const started = Date.now();
	/* Twice the rate, every 4th query over TCP: what grows V8's young generation soonest (5-7 s, measured). */
	driver.setRate(opts.rate * 2, 4);
	let young = NaN;
	for (;;) {
		await sleep(500);
		young = fleet.metricsUrl === null ? NaN : (await heapSample(fleet.metricsUrl)).newSpace;
		/* NaN (a scrape that failed on a busy machine) is "not yet". */
		if (young >= YOUNG_GENERATION_MAX_KB || Date.now() - started > opts.burstMs) {
			break;
		}
	}
	const burstSecs = (Date.now() - started) / 1000;
	driver.setRate(opts.rate, opts.tcpEvery);
	await sleep(opts.warmupMs);
	const t0 = Date.now();
	let prev = procSample(fleet.bbalPid).rssKb;
	for (;;) {
		await sleep(1000);
		const rss = procSample(fleet.bbalPid).rssKb;
		if (rss <= prev * 1.01 || Date.now() - t0 > opts.warmupMs) {
			opts.log(`chaos: warmed up in ${((Date.now() - started) / 1000).toFixed(0)} s (${burstSecs.toFixed(1)} s at `
				+ 'twice the rate with every 4th query over TCP, then the steady load); V8 young generation '
				+ `${(young / 1024).toFixed(0)} MiB`
				+ `${!(young >= YOUNG_GENERATION_MAX_KB) ? ' (NOT at its maximum: the first scenario may be charged its growth)' : ''}`
				+ `, bbal RSS ${(rss / 1024).toFixed(1)} MB`);
			return;
		}
		prev = rss;
	}
}

export interface SuiteResult {
	results: ScenarioResult[];
	summary: string;
	pass: boolean;
	sent: number;
	elapsedMs: number;
}

export async function runSuite(t: Teardowns, opts: SuiteOptions): Promise<SuiteResult> {
	const t0 = Date.now();
	const fleet = await ChaosFleet.create(t);
	for (const name of ['5301', '5302', '5303']) {
		await fleet.addMname(name);
	}
	await fleet.addFake('5310');
	await fleet.startBbal();
	const driver = new LoadDriver({
		port: fleet.port, sources: chaosSources(opts.sources), rate: opts.rate, tcpEvery: opts.tcpEvery,
		timeoutMs: opts.timeoutMs,
	});
	t.teardown(() => driver.stop());
	let nextId = 5320;
	const ctx: Ctx = {
		fleet, driver, timing: opts.timing, timeoutMs: opts.timeoutMs, log: opts.log,
		nextName: () => String(nextId++),
	};
	const results: ScenarioResult[] = [];
	await driver.start();
	opts.log(`chaos: bbal runs with the launcher's V8 flags (${LAUNCHER_V8_FLAGS.join(' ') || 'none'}); `
		+ `young generation ceiling ${YOUNG_GENERATION_MAX_KB / 1024} MiB`);
	opts.log(`chaos: ${opts.rate} qps from ${opts.sources} sources (every ${opts.tcpEvery}th over TCP), `
		+ `lost after ${opts.timeoutMs} ms; bbal pid ${fleet.bbalPid} on 127.0.0.1:${fleet.port}`);
	await warmUp(fleet, driver, opts);
	driver.take(Date.now());

	if (opts.plan !== null) {
		for (const name of opts.plan) {
			const sc = scenario(name);
			results.push(await runScenario(ctx, sc, targetFor(ctx, sc, results.length)));
		}
	} else {
		const rand = seededRandom(opts.seed ?? 1);
		const names = ['kill', 'stop', 'remove', 'stuck', 'violate', 'restart', 'takeover', 'hostile', 'servfail',
			'blackhole', 'allservfail'];
		const until = Date.now() + (opts.soakMs ?? 60_000);
		while (Date.now() < until) {
			const sc = scenario(names[Math.floor(rand() * names.length)]);
			results.push(await runScenario(ctx, sc, targetFor(ctx, sc, Math.floor(rand() * 1000))));
		}
	}
	const sent = driver.sent;
	await driver.stop();
	const summary = formatSummary(results);
	return { results, summary, pass: results.every((r) => r.a.pass), sent, elapsedMs: Date.now() - t0 };
}
