/*
 * npm run bench: bbal side by side with dnsdist and with its backends alone.
 *
 *   npm run bench -- [--quick] [--only LIST] [--rounds N] [--seconds N] [--profile]
 *                    [--wait-quiet[=S]] [--no-install] [--no-build] [--list] [--help]
 *   node dist/bench/run.js [the same options]
 *
 * The driver.  It installs what is missing (Debian dnsperf and dnsdist),
 * builds the C stub (bench/stub.c -> bench/build/stub) and bbal (when src/
 * is newer than dist/), optionally waits for a quiet machine, starts every
 * server the chosen scenarios need on loopback, warms each path up, then
 * runs the measured configurations round-robin, measures bbal's RSS holding
 * 100,000 remotes, and prints a Markdown report.  It writes
 * bench/results/<timestamp>.json (every raw figure) and .md, and, after a
 * full run only, bench/results/latest.md, which git tracks.
 * bench/README.md says what each figure means.
 *
 * ROUND-ROBIN.  Round 1 runs each configuration once in a fixed order,
 * round 2 again, and so on, so that whatever drifts on the machine (another
 * process, thermal or hypervisor effects) hits every configuration alike,
 * and the two configurations a ratio compares ran within seconds of each
 * other in every round.  Before the rounds, each configuration runs once
 * for 1 s, not counted: V8 has compiled bbal's hot path, dnsdist has
 * connected its health checks, every cache is warm.
 *
 * THE PIECES.  options.ts reads the command line; session.ts owns the
 * processes, ports and temporary directory, and stops and removes them on
 * every way out (the end, an error, SIGINT/SIGTERM/SIGHUP, the 9-minute
 * watchdog); tools.ts installs and builds, and describes the machine;
 * servers.ts starts the servers; configurations.ts turns the scenarios into
 * configurations and runs the 100,000-remotes scenario; load_generators.ts
 * runs dnsperf and tcp_conns.ts; measure.ts does the CPU accounting and
 * the aggregates; report.ts writes the report and checks the targets;
 * profile_summary.ts summarises --profile's profiles.  The process, /proc,
 * percentile and stats-snapshot helpers are shared with the chaos harness,
 * in test/support/.
 *
 * This is not a test: `npm test` runs only the *.test.js files under
 * dist/test/, and nothing here is one or lives there.  Every address it
 * sends to is in 127.0.0.0/8.
 */

import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { startConfigurations, measureRemotes, type RemotesResult } from './configurations.js';
import { aggregate, type Configuration, measure, otherLoad, quietSummary, type Sample, usPerQuery } from './measure.js';
import { type BenchOptions, parseOptions, wants } from './options.js';
import { summarizeRunProfiles } from './profile_summary.js';
import { type BenchResult, fmt, fmtInt, ratiosAndTargets, report } from './report.js';
import { PROFILE_DIR } from './servers.js';
import { answerTotal } from '../src/answers.js';
import { statsSnapshot } from '../test/support/bbal.js';
import { BenchSession, log } from './session.js';
import { buildBbal, buildStub, installTools, machineInfo, RESULTS_DIR, type Tool } from './tools.js';

/** A machine whose other processes use this much of a core or more is not quiet. */
const QUIET_CORE_PCT = 15;
/* The profiles --profile makes (servers.ts names them after the bbal they come from). */
const PROFILE_NAMES = ['bbal-stub.cpuprofile', 'bbal-mname1.cpuprofile'];

const opts = parseOptions(process.argv.slice(2));
const session = new BenchSession();
const started = new Date();
const t0 = performance.now();

/* The tools the chosen scenarios need. */
function neededTools(o: BenchOptions): Tool[] {
	const tools: Tool[] = [];
	if (wants(o, 'sat-stub', 'rate-stub', 'mname', 'tcp-qps')) {
		tools.push({ bin: 'dnsperf', pkg: 'dnsperf' });
	}
	if (wants(o, 'sat-stub', 'rate-stub', 'cache')) {
		tools.push({ bin: 'dnsdist', pkg: 'dnsdist' });
	}
	return tools;
}

/* Wait up to waitSecs for a quiet machine (none: just look); warn if it is not. */
async function waitQuiet(waitSecs: number): Promise<void> {
	let load = await otherLoad(1000);
	if (waitSecs > 0 && load >= QUIET_CORE_PCT) {
		log(`other processes use ${fmt(load, 0)}% of a core: waiting up to ${waitSecs} s for < ${QUIET_CORE_PCT}%`);
		const until = performance.now() + waitSecs * 1000;
		while (load >= QUIET_CORE_PCT && performance.now() < until) {
			load = await otherLoad(2000);
		}
	}
	if (load >= QUIET_CORE_PCT) {
		log(`warning: other processes use ${fmt(load, 0)}% of a core; the figures will be noisy`);
	}
}

/* One progress line per measured run (with the cache's hit rate and stub load's oddities when there are any). */
function logSample(cfg: Configuration, round: number, s: Sample): void {
	const cpu = s.proxyTicks !== null ? `, proxy ${fmt(usPerQuery(s.proxyTicks, s.completed), 2)} µs/q` : '';
	const looked = (s.cacheHits ?? 0) + (s.cacheMisses ?? 0);
	const hits = looked > 0 ? `, cache hits ${fmt((100 * (s.cacheHits ?? 0)) / looked, 1)}%` : '';
	const odd = (s.rcodeErrors ?? 0) + (s.stray ?? 0) > 0 ? `, ${s.rcodeErrors} RCODE errors, ${s.stray} stray answers` : '';
	log(`round ${round}/${opts.rounds} ${cfg.id.padEnd(13)} ${fmtInt(s.qps).padStart(7)} `
		+ `${cfg.scenario === 'tcp-conns' ? 'conn/s' : 'qps'}, `
		+ `loss ${fmt(s.lossPct, 2)}%, p50 ${fmt(s.p50, 3)} ms, p99 ${fmt(s.p99, 3)} ms${cpu}, `
		+ `backend ${fmt(usPerQuery(s.backendTicks, s.completed), 2)} µs/q${hits}${odd}, `
		+ `others ${fmt(s.foreignCorePct, 0)}% of a core`);
}

/* Warm every path up, then the rounds. */
async function runRounds(configs: Configuration[]): Promise<void> {
	if (configs.length > 0) {
		log(`warming up ${configs.length} path(s), ${opts.warmSeconds} s each`);
		for (const cfg of configs) {
			await measure(cfg, opts.warmSeconds);
		}
	}
	for (let round = 1; round <= opts.rounds; round++) {
		for (const cfg of configs) {
			const s = await measure(cfg, cfg.scenario.startsWith('tcp') ? opts.tcpSeconds : opts.seconds);
			cfg.samples.push(s);
			cfg.check?.(s);
			logSample(cfg, round, s);
		}
	}
}

/* The JSON and the report into bench/results/, the report on stdout. */
function writeResults(res: BenchResult): void {
	const kind = opts.quick ? 'quick smoke run (not for the record)' : opts.partial ? 'partial run' : 'full run';
	const md = report(res, kind);
	const json = {
		...res,
		configs: Object.fromEntries(Object.values(res.configs).map((c) => [c.id, {
			scenario: c.scenario, label: c.label, aggregate: c.aggregate, samples: c.samples,
		}])),
	};
	mkdirSync(RESULTS_DIR, { recursive: true });
	const stamp = res.startedAt.replace(/[:]/g, '').replace(/\.\d+Z$/, 'Z');
	writeFileSync(path.join(RESULTS_DIR, `${stamp}.json`), `${JSON.stringify(json, null, '\t')}\n`);
	writeFileSync(path.join(RESULTS_DIR, `${stamp}.md`), md);
	/* latest.md is tracked in git: only a full, unprofiled run replaces it. */
	const full = !opts.quick && !opts.partial && !opts.profile;
	if (full) {
		writeFileSync(path.join(RESULTS_DIR, 'latest.md'), md);
	}
	process.stdout.write(`${md}\n`);
	log(`wrote bench/results/${stamp}.json and bench/results/${stamp}.md${full ? ' and bench/results/latest.md' : ''} `
		+ `(${fmt(res.durationSec, 0)} s)`);
}

/* The saturation bbal's in-flight tables, from its snapshot, once its runs are over. */
async function inflightTables(configs: Configuration[]): Promise<BenchResult['inflight']> {
	const sock = configs.find((c) => c.id === 'sat-bbal')?.proxy?.statsSocket;
	if (sock === undefined || sock === null) {
		return null;
	}
	const snap = await statsSnapshot(sock);
	const sum = (f: (b: (typeof snap.backends)[number]) => number): number => snap.backends.reduce((a, b) => a + f(b), 0);
	return {
		tableBytes: sum((b) => b.inflightTableBytes), backends: snap.backends.length, outstanding: sum((b) => b.outstanding),
		answered: sum((b) => answerTotal(b.answers)),
	};
}

async function main(): Promise<void> {
	installTools(neededTools(opts), opts.install);
	buildStub();
	buildBbal(opts.build);
	const machine = machineInfo();
	log(`${machine.nproc} cores (${machine.cpu}), node ${machine.node}, dnsperf ${machine.dnsperf}, dnsdist ${machine.dnsdist}`);
	log(`scenarios: ${opts.scenarios.join(', ')}; ${opts.rounds} round(s), ${opts.seconds} s UDP / ${opts.tcpSeconds} s TCP runs`);
	await waitQuiet(opts.waitQuietSecs);

	/* Servers, all up for the whole measured part (idle ones cost nothing). */
	const configs = await startConfigurations(session, opts);
	await runRounds(configs);
	const inflight = await inflightTables(configs);
	const rss: RemotesResult | null = wants(opts, 'rss') ? await measureRemotes(session) : null;
	/* Every bbal exits here, which is when --cpu-prof writes its profile. */
	await session.children.stopAll();
	const profile = opts.profile ? summarizeRunProfiles(PROFILE_DIR, PROFILE_NAMES, started) : null;

	const byId: Record<string, Configuration> = {};
	for (const cfg of configs) {
		cfg.aggregate = aggregate(cfg);
		byId[cfg.id] = cfg;
	}
	const { ratios, targets } = ratiosAndTargets(byId, rss);
	writeResults({
		startedAt: started.toISOString(),
		durationSec: (performance.now() - t0) / 1000,
		command: `npm run bench${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(' ')}` : ''}`,
		params: {
			rounds: opts.rounds, seconds: opts.seconds, tcpSeconds: opts.tcpSeconds, warmSeconds: opts.warmSeconds,
			quick: opts.quick, scenarios: opts.scenarios, profile: opts.profile,
		},
		machine,
		configs: byId,
		rss,
		inflight,
		ratios,
		targets,
		quiet: quietSummary(configs.flatMap((c) => c.samples)),
		profile,
	});
	session.removeTmp();
}

try {
	await main();
	session.finished();
} catch (err) {
	/* An interrupted run's in-flight failures are no news. */
	if (!session.isAborting) {
		process.stderr.write(`bench: ${err instanceof Error ? err.stack : String(err)}\n`);
		await session.abort('failed', 1);
	}
}
