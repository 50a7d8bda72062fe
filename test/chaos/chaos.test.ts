/*
 * The chaos suite's short form, inside `npm test` (under 70 s).
 *
 * The same fleet, load driver, fault windows and verdicts as `npm run
 * chaos` (see scenarios.ts and report.ts), with shorter phases and five of
 * the eleven scenarios:
 *
 *   kill      SIGKILL an mname, restart it 2 s later (not 5)
 *   violate   the fake sends garbage mid-stream
 *   remove    unlink an mname's socket, add a new backend 1 s later, kill
 *             the orphaned process 8 s after the unlink (past the 6-s bound)
 *   restart   SIGTERM bbal and start it again
 *   servfail  an mname answers SERVFAIL for 8 s (not 15): bbal must find
 *             it sick within 3 s and take its remotes back within 5 s
 *
 * Left to `npm run chaos`: the SIGSTOP (25 s, for the heartbeat), the
 * stuck backend (14 s, for bbal's 256 KiB stuck threshold to fill at this
 * rate), which alone would take longer than the whole budget, the hostile
 * clients (hostile.test.ts), the blackhole (servfail's twin through the
 * query timeout), allservfail, and the takeover (takeover_scenario.ts):
 * it passes here in about 8 s, but that took the short form from 64 s to
 * 70.5-72 s, past the budget, and `npm test` has the takeover under load
 * already (test/takeover.test.ts).  The load is the full one (2,000 qps
 * from 50 sources, every 20th query over TCP).
 *
 * Every scenario must pass: nothing lost outside its fault windows, its
 * remotes back on their primary within 10 s of its recovery (5 s for
 * servfail), bbal's RSS and descriptors back within 10%, no untold exit.
 * Each table is printed as a TAP comment.
 */

import t from 'tap';
import { FIGURES_UNDER_COVERAGE, runSuite, SHORT_FORM } from './suite.js';

t.test('chaos, short form: faults under load lose nothing outside their windows', async (t) => {
	const res = await runSuite(t, {
		...SHORT_FORM,
		plan: ['kill', 'violate', 'remove', 'restart', 'servfail'],
		log: (line) => t.comment(line),
	});
	t.comment(`summary (${(res.elapsedMs / 1000).toFixed(1)} s):\n${res.summary}`);
	for (const { run, a } of res.results) {
		t.equal(a.outside, 0, `${run.name}: no query lost outside the fault windows (${a.inside} inside)`, FIGURES_UNDER_COVERAGE);
		t.same(a.notReturned, [], `${run.name}: every moved remote back on its primary`);
		t.same(a.lateReturns, [], `${run.name}: ... within ${run.returnLimitMs / 1000} s of the primary's recovery`);
		t.equal(run.unexpectedExits.length, 0, `${run.name}: bbal never exited untold`);
		t.ok(a.pass, `${run.name}: ${a.pass ? 'PASS' : a.failures.join('; ')}`, FIGURES_UNDER_COVERAGE);
	}
	/* The budget is a design figure, not an assertion: a busy machine makes everything slower. */
	t.comment(`the short form took ${(res.elapsedMs / 1000).toFixed(1)} s (budget 70 s; 66 s measured on a shared 2-core machine)`);
});
