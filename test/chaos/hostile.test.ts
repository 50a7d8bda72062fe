/*
 * The chaos suite's hostile scenario, short, inside `npm test` (35-52 s measured on this loaded 2-core VM).
 *
 * A file of its own: the short form in chaos.test.ts already takes most of
 * its 60-s budget.  The same fleet and load (2,000 qps from 50 sources,
 * every 20th query over TCP), a short warm-up, then the four attacks of
 * hostile.ts at once for 15 s (30 s under `npm run chaos`): a TCP lockout,
 * clients that never read their big answers, stats-socket hogs, junk
 * datagrams from thousands of new sources.  It must pass: no well-behaved
 * query lost, UDP or TCP; bbal's event loop and RSS within hostile.ts's
 * bounds; the attacks really in effect; every attacker gone at the end and
 * bbal's descriptors and memory back.  The table is printed as a TAP comment.
 */

import t from 'tap';
import type { Timing } from './scenarios.js';
import { FIGURES_UNDER_COVERAGE, runSuite } from './suite.js';

const HOSTILE_TIMING: Timing = {
	beforeMs: 2000, afterMs: 2000, killDownMs: 2000, stopMs: 25_000, stuckMs: 14_000, addAfterMs: 1000,
	orphanMs: 8000, returnWaitMs: 12_000, balanceWaitMs: 0, hostileMs: 15_000,
};

t.test('chaos, hostile: four attacks at once cost well-behaved clients nothing', async (t) => {
	const res = await runSuite(t, {
		rate: 2000,
		sources: 50,
		tcpEvery: 20,
		timeoutMs: 1000,
		warmupMs: 1500,
		burstMs: 8000,
		timing: HOSTILE_TIMING,
		plan: ['hostile'],
		log: (line) => t.comment(line),
	});
	for (const { run, a } of res.results) {
		t.equal(a.lost + a.servfail, 0, `${run.name}: every well-behaved query answered (${a.sent}, ${a.tcp} over TCP)`,
			FIGURES_UNDER_COVERAGE);
		t.equal(run.unexpectedExits.length, 0, `${run.name}: bbal never exited untold`);
		t.ok(a.pass, `${run.name}: ${a.pass ? 'PASS' : a.failures.join('; ')}`, FIGURES_UNDER_COVERAGE);
	}
	t.comment(`took ${(res.elapsedMs / 1000).toFixed(1)} s`);
});
