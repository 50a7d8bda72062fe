#!/usr/bin/env node
/*
 * Summarise a V8 .cpuprofile (node --cpu-prof): self time per function,
 * highest first, and the share of samples spent in GC, idle and native code.
 *
 *   node bench/profile_summary.mjs FILE.cpuprofile [TOP]
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export function summarize(file, top = 25) {
	const prof = JSON.parse(readFileSync(file, 'utf8'));
	const byId = new Map(prof.nodes.map((n) => [n.id, n]));
	const selfUs = new Map();
	const { samples, timeDeltas } = prof;
	let total = 0;
	for (let i = 0; i < samples.length; i++) {
		const dt = timeDeltas[i + 1] ?? 0; /* a sample's time is the gap to the next one */
		selfUs.set(samples[i], (selfUs.get(samples[i]) ?? 0) + dt);
		total += dt;
	}
	const byFn = new Map();
	for (const [id, us] of selfUs) {
		const cf = byId.get(id).callFrame;
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

if (process.argv[1] === fileURLToPath(import.meta.url)) {
	const [file, top] = process.argv.slice(2);
	if (!file) {
		process.stderr.write('usage: profile_summary.mjs FILE.cpuprofile [TOP]\n');
		process.exit(2);
	}
	process.stdout.write(`${summarize(file, top ? Number(top) : 25)}\n`);
}
