/*
 * BBAL SEEN FROM A HARNESS
 *
 * Two things the chaos harness and the benchmark both need to know about a
 * bbal they run, read the way an operator's tools read them.
 *
 * THE LAUNCHER'S V8 FLAGS.  Operators start bbal through bin/bbal, a shell
 * script whose last line is `exec node FLAGS bin/bbal.js "$@"`; the flags
 * bound V8's young generation, which is most of bbal's resident memory.  A
 * harness that starts bin/bbal.js itself (the chaos fleet, through
 * NODE_OPTIONS; the benchmark's profiled runs, which need --cpu-prof and
 * node refuses that in NODE_OPTIONS) hands it the same flags, read from that
 * line, so memory and profiles are those of production.  Only flags of the
 * form --name or --name=value are taken; a launcher without the line gives
 * none.
 *
 * THE STATS SNAPSHOT.  What `balstat --json` prints: bbal's whole state as
 * one JSON document on its stats socket (src/stats.ts has the fields, which
 * are never renamed).  It is read with balstat's own reader, so a harness
 * sees exactly what an operator sees, and given up after timeoutMs: a bbal
 * too busy to answer its stats socket must not hang the harness.  Its
 * counter groups (udp, tcp) are read as plain tables with counters().
 */

import { readFileSync } from 'node:fs';
import path from 'node:path';
import { readSnapshot } from '../../src/balstat.js';
import type { Snapshot } from '../../src/stats.js';
import { projectRoot } from '../helpers.js';

export type { Snapshot };

/** How long a snapshot may take before the read is given up. */
export const SNAPSHOT_TIMEOUT_MS = 10_000;

/* The V8 flags on the production launcher's `exec node ...` line. */
export const LAUNCHER_V8_FLAGS: string[] = (() => {
	try {
		const text = readFileSync(path.join(projectRoot, 'bin', 'bbal'), 'utf8');
		const line = /^exec node (.*)$/m.exec(text)?.[1] ?? '';
		return line.split(/\s+/).filter((w) => /^--[a-z0-9-]+(=\S+)?$/.test(w));
	} catch {
		return [];
	}
})();

/** A counter group of a snapshot (udp, tcp) as a plain table of numbers, for diffs and listings. */
export function counters(group: object): Record<string, number> {
	const out: Record<string, number> = {};
	for (const [k, v] of Object.entries(group)) {
		if (typeof v === 'number') {
			out[k] = v;
		}
	}
	return out;
}

/** bbal's stats snapshot, read from its stats socket (what balstat --json prints). */
export async function statsSnapshot(socketPath: string, timeoutMs = SNAPSHOT_TIMEOUT_MS): Promise<Snapshot> {
	let timer: NodeJS.Timeout | undefined;
	const timeout = new Promise<never>((_, reject) => {
		timer = setTimeout(() => reject(new Error(`stats socket ${socketPath}: no snapshot within ${timeoutMs} ms`)),
			timeoutMs);
	});
	try {
		return JSON.parse(await Promise.race([readSnapshot(socketPath), timeout])) as Snapshot;
	} finally {
		clearTimeout(timer);
	}
}
