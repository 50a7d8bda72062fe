/*
 * CPU PROFILE SUMMARY
 *
 * Self time per function from a V8 .cpuprofile (what `node --cpu-prof`
 * writes), highest first, as shares of the busy time; and the share of the
 * samples that were busy at all.
 *
 *   node dist/bench/profile_summary.js FILE.cpuprofile [TOP]
 *
 * The benchmark's --profile runs bbal under the profiler (servers.ts) and
 * puts the summaries of its profiles in the report (summarizeRunProfiles).
 *
 * HOW TIME IS COUNTED.  A profile is a tree of call frames and a list of
 * samples, each naming the node that was on top of the stack, with the
 * time since the previous sample.  A sample's time is the gap to the next
 * one (V8 records timeDeltas[i] as the time before sample i), and its self
 * time goes to the function on top; frames of the same function at the same
 * place (a function inlined or called from many places appears many times
 * in the tree) are added together.  "(idle)" is the event loop waiting, and
 * is left out of the busy time; "(garbage collector)" and "(program)" (V8
 * and native code outside JavaScript) stay in, as the things they are.
 *
 * V8 samples the main thread by wall clock: at saturation, where the load
 * generator, bbal and the backend share two cores, time bbal spends
 * preempted counts against wherever it was preempted.  Read a profile for
 * its JavaScript shares (bench/README.md, Profiles).
 *
 * Paths are shortened to what follows node_modules/, dist/ or src/, with
 * the 1-based line of the function.
 */

import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** How many functions a summary lists unless told otherwise. */
const DEFAULT_TOP = 25;

/* The parts of a .cpuprofile this file reads. */
interface CpuProfile {
	nodes: Array<{ id: number; callFrame: { functionName: string; url: string; lineNumber: number } }>;
	samples: number[];
	timeDeltas: number[];
}

/** The summary of one profile: a header line, then one line per function. */
export function summarize(file: string, top = DEFAULT_TOP): string {
	const prof = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile;
	const byId = new Map(prof.nodes.map((n) => [n.id, n]));
	const selfUs = new Map<number, number>();
	const { samples, timeDeltas } = prof;
	let total = 0;
	for (let i = 0; i < samples.length; i++) {
		const dt = timeDeltas[i + 1] ?? 0; /* a sample's time is the gap to the next one */
		selfUs.set(samples[i], (selfUs.get(samples[i]) ?? 0) + dt);
		total += dt;
	}
	const byFn = new Map<string, number>();
	for (const [id, us] of selfUs) {
		const cf = byId.get(id)?.callFrame;
		if (cf === undefined) {
			continue;
		}
		const where = cf.url ? `${cf.url.replace(/^file:\/\/.*?\/(node_modules|dist|src)\//, '$1/')}:${cf.lineNumber + 1}` : '';
		const key = `${cf.functionName || '(anonymous)'} ${where}`.trim();
		byFn.set(key, (byFn.get(key) ?? 0) + us);
	}
	const rows = [...byFn].sort((a, b) => b[1] - a[1]);
	const idle = byFn.get('(idle)') ?? 0;
	const busy = total - idle;
	const lines = [
		`profile ${path.basename(file)}: ${(total / 1e6).toFixed(2)} s sampled, `
			+ `${(busy / 1e6).toFixed(2)} s busy (${((busy / total) * 100).toFixed(1)}%)`,
		'self time, share of busy time:',
	];
	for (const [k, us] of rows.filter(([k]) => k !== '(idle)').slice(0, top)) {
		lines.push(`  ${((us / busy) * 100).toFixed(1).padStart(5)}%  ${(us / 1000).toFixed(0).padStart(7)} ms  ${k}`);
	}
	return lines.join('\n');
}

/*
 * The summaries of the named profiles in dir written since `since` (a
 * profile left by an earlier run is not this run's), also saved as
 * summary.txt beside them; null when there is none.
 */
export function summarizeRunProfiles(dir: string, names: string[], since: Date): string | null {
	const parts: string[] = [];
	for (const name of names) {
		const file = path.join(dir, name);
		if (existsSync(file) && statSync(file).mtimeMs >= since.getTime()) {
			parts.push(summarize(file, DEFAULT_TOP));
		}
	}
	const text = parts.join('\n\n');
	if (text === '') {
		return null;
	}
	writeFileSync(path.join(dir, 'summary.txt'), `${text}\n`);
	return text;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
	const [file, top] = process.argv.slice(2);
	if (!file) {
		process.stderr.write('usage: profile_summary.js FILE.cpuprofile [TOP]\n');
		process.exit(2);
	}
	process.stdout.write(`${summarize(file, top ? Number(top) : DEFAULT_TOP)}\n`);
}
