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
import { FIGURES_UNDER_COVERAGE, runSuite, SHORT_FORM } from './suite.js';

t.test('chaos, hostile: four attacks at once cost well-behaved clients nothing', async (t) => {
	const res = await runSuite(t, {
		...SHORT_FORM,
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
