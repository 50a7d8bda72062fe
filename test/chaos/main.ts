/*
 * npm run chaos / npm run soak
 *
 *   node dist/test/chaos/main.js chaos [--only kill,stop,...] [options]
 *   node dist/test/chaos/main.js soak --minutes N [--seed S] [options]
 *
 * options: --rate QPS (2000)  --sources N (50)  --tcp-every N (20)
 *          --timeout-ms MS (1000)  --warmup-secs S (10)  --stop-secs S (25)
 *          --fuzz-runs N (chaos: 100000; 0 skips the long fuzz)
 *
 * `chaos` runs every scenario once, in a fixed order, with full phases and
 * prints each table and a summary; then the property-based fuzz of the
 * untrusted-bytes parsers (test/fuzz.test.ts) with BBAL_FUZZ_RUNS cases per
 * property.  `soak` cycles scenarios chosen by a seeded PRNG for N minutes
 * and prints the same tables.  The exit status is 0 only if every scenario
 * (and the fuzz) passed.  SIGINT stops everything that was started.
 */

import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { childEnv, Cleanup } from '../support/process.js';
import { FULL_TIMING } from './scenarios.js';
import { runSuite } from './suite.js';

const FULL_PLAN = ['kill', 'stop', 'remove', 'stuck', 'violate', 'restart', 'takeover', 'hostile', 'servfail',
	'blackhole', 'allservfail'];

function parse(argv: string[]): { mode: string; flags: Map<string, string> } {
	const [mode = 'chaos', ...rest] = argv;
	const flags = new Map<string, string>();
	for (let i = 0; i < rest.length; i++) {
		const a = rest[i];
		if (!a.startsWith('--')) {
			throw new Error(`unexpected argument ${a}`);
		}
		const eq = a.indexOf('=');
		if (eq > 0) {
			flags.set(a.slice(2, eq), a.slice(eq + 1));
		} else {
			flags.set(a.slice(2), rest[++i] ?? '');
		}
	}
	return { mode, flags };
}

function num(flags: Map<string, string>, name: string, dflt: number): number {
	const v = flags.get(name);
	if (v === undefined) {
		return dflt;
	}
	const n = Number(v);
	if (!Number.isFinite(n) || n < 0) {
		throw new Error(`--${name} ${v} is not a number`);
	}
	return n;
}

function runFuzz(runs: number): Promise<boolean> {
	const file = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'fuzz.test.js');
	console.log(`\n== fuzz: ${runs} cases per property (BBAL_FUZZ_RUNS) ==`);
	return new Promise((resolve) => {
		const p = spawn(process.execPath, [file], {
			env: childEnv({ BBAL_FUZZ_RUNS: String(runs), TAP_TIMEOUT: '0' }), stdio: ['ignore', 'inherit', 'inherit'],
		});
		p.on('close', (code) => resolve(code === 0));
	});
}

async function main(): Promise<number> {
	const { mode, flags } = parse(process.argv.slice(2));
	if (mode !== 'chaos' && mode !== 'soak') {
		throw new Error(`mode must be chaos or soak, not ${mode}`);
	}
	const timing = { ...FULL_TIMING, stopMs: num(flags, 'stop-secs', FULL_TIMING.stopMs / 1000) * 1000 };
	const cleanup = new Cleanup('chaos');
	let stopping = false;
	const onSignal = (): void => {
		if (!stopping) {
			stopping = true;
			console.error('chaos: interrupted, stopping everything');
			void cleanup.run().then(() => process.exit(130));
		}
	};
	process.on('SIGINT', onSignal);
	process.on('SIGTERM', onSignal);
	let pass = false;
	try {
		const seed = num(flags, 'seed', Date.now() % 1_000_000);
		const minutes = num(flags, 'minutes', 5);
		const only = flags.get('only');
		const plan = mode === 'soak' ? null : (only === undefined ? FULL_PLAN : only.split(','));
		if (mode === 'soak') {
			console.log(`soak: ${minutes} minutes, seed ${seed} (repeat with --seed ${seed})`);
		}
		const res = await runSuite(cleanup, {
			rate: num(flags, 'rate', 2000),
			sources: num(flags, 'sources', 50),
			tcpEvery: num(flags, 'tcp-every', 20),
			timeoutMs: num(flags, 'timeout-ms', 1000),
			warmupMs: num(flags, 'warmup-secs', 10) * 1000,
			burstMs: 30_000,
			timing,
			plan,
			soakMs: minutes * 60_000,
			seed,
			log: (l) => console.log(l.startsWith('==') ? `\n${l}` : l),
		});
		console.log(`\n== summary: ${res.results.length} scenarios, ${res.sent} queries, `
			+ `${(res.elapsedMs / 1000).toFixed(0)} s ==\n${res.summary}`);
		/* Each bbal process, from its first sample to its last (a restart starts a new one). */
		let from = res.results[0]?.run.procBefore;
		let count = 0;
		res.results.forEach(({ run }, i) => {
			const last = i === res.results.length - 1;
			const to = run.bbalReplaced ? run.procBefore : run.procAfter;
			count += run.bbalReplaced ? 0 : 1;
			if ((run.bbalReplaced || last) && from !== undefined && count > 0) {
				console.log(`a bbal process over ${count} scenario(s): RSS ${(from.rssKb / 1024).toFixed(1)} -> `
					+ `${(to.rssKb / 1024).toFixed(1)} MB (anonymous ${(from.rssAnonKb / 1024).toFixed(1)} -> `
					+ `${(to.rssAnonKb / 1024).toFixed(1)} MB, V8 heap used ${(from.heapUsedKb / 1024).toFixed(1)} -> `
					+ `${(to.heapUsedKb / 1024).toFixed(1)} MB), open fds ${from.fds} -> ${to.fds}`);
			}
			if (run.bbalReplaced) {
				from = run.procAfter;
				count = 0;
			}
		});
		pass = res.pass;
		console.log(pass ? 'chaos: PASS' : 'chaos: FAIL');
		const fuzzRuns = num(flags, 'fuzz-runs', mode === 'chaos' ? 100_000 : 0);
		if (fuzzRuns > 0) {
			const fuzzOk = await runFuzz(fuzzRuns);
			console.log(fuzzOk ? 'fuzz: PASS' : 'fuzz: FAIL');
			pass = pass && fuzzOk;
		}
	} finally {
		await cleanup.run();
	}
	return pass ? 0 : 1;
}

main().then((code) => process.exit(code), (err: unknown) => {
	console.error(`chaos: ${err instanceof Error ? err.stack : String(err)}`);
	process.exit(2);
});
