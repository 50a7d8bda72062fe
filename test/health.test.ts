/*
 * Backend health (src/health.ts), in-process with the clock a parameter:
 * issue 13 item 2.  The passive window and its thresholds, probes (fall,
 * rise, timeouts, answers that are not the probe's), fail-open, and the
 * rule that keeps a backend whose SERVFAIL share hovers at the threshold
 * from flapping.  The backends are stand-ins with what the monitor reads
 * (ok, log, sendUdp, stats); real mname backends judged end to end are in
 * health_mname.test.ts.
 */

import pino from 'pino';
import t from 'tap';
import type { Backend } from '../src/backend.js';
import {
	DEFAULT_HEALTH_OPTIONS, HEALTH_RUN_MS, HealthMonitor, type HealthOptions, HOLD_DOWN_SECS, PASSIVE_MIN_SAMPLES,
} from '../src/health.js';

const T0 = 1_700_000_000_000;

interface Stand {
	be: Backend;
	probes: Buffer[];
}

function fleet(n: number, opts: Partial<HealthOptions> = {}) {
	const lines: Array<Record<string, unknown>> = [];
	const log = pino({ level: 'info' }, { write: (s: string) => lines.push(JSON.parse(s) as Record<string, unknown>) });
	const stands: Stand[] = [];
	const monitor = new HealthMonitor({ ...DEFAULT_HEALTH_OPTIONS, ...opts }, log, () => stands.map((s) => s.be));
	for (let i = 0; i < n; i++) {
		const probes: Buffer[] = [];
		const be = {
			id: 5301 + i, ok: true, stats: { udp: 0, stuck: 0 }, log: log.child({ be_id: 5301 + i }),
			sendUdp: (addr: number, port: number, msg: Buffer) => {
				if (addr === 0 && port === 0) {
					probes.push(Buffer.from(msg));
				}
				be.stats.udp++;
				return true;
			},
		} as unknown as Backend & { health: unknown };
		(be as { health: unknown }).health = monitor.attach(be);
		stands.push({ be, probes });
	}
	for (const s of stands) {
		monitor.sessionChanged(s.be);
	}
	return { monitor, stands, lines, changes: () => lines.filter((l) => l['msg'] === 'backend health changed') };
}

/* `n` client answers with this rcode, 1 ms each, at `now`. */
function traffic(be: Backend, now: number, n: number, rcode: number): void {
	for (let i = 0; i < n; i++) {
		be.health.book.query(0x0a000001, 1000 + i, i, now);
		be.health.book.answer(0x0a000001, 1000 + i, i, rcode, now + 1);
	}
}

/* The answer a backend gives the last probe it was sent. */
function probeAnswer(s: Stand, rcode: number, id = s.probes.at(-1)?.readUInt16BE(0) ?? 0): Buffer {
	const q = s.probes.at(-1) as Buffer;
	const a = Buffer.from(q);
	a.writeUInt16BE(id, 0);
	a[2] |= 0x80;
	a[3] = rcode;
	return a;
}

t.test('a backend whose answers are mostly SERVFAIL turns sick at the next run; fewer than the minimum samples do not', async (t) => {
	const { monitor, stands: [a, b], changes } = fleet(2, { probes: false });
	traffic(a.be, T0, PASSIVE_MIN_SAMPLES - 1, 2);
	monitor.run(T0 + 10);
	t.equal(a.be.health.state.name, 'healthy', `${PASSIVE_MIN_SAMPLES - 1} SERVFAILs are too few to judge`);
	traffic(a.be, T0 + 20, 1, 2);
	traffic(a.be, T0 + 30, 18, 0);
	monitor.run(T0 + 100);
	t.same(a.be.health.state, { name: 'sick', reason: 'servfail', sinceMs: T0 + 100, holdUntilMs: T0 + 100 + HOLD_DOWN_SECS * 1000 },
		'20 SERVFAILs of 38: sick (held down: with no probes it is tried again after the hold-down)');
	t.notOk(a.be.health.serving, 'no client traffic while another is healthy');
	t.ok(b.be.health.serving);
	const [line] = changes();
	t.match(line, { level: 40, be_id: 5301, health: 'sick', health_reason: 'servfail', window_servfail: 20 }, 'one warn line with be_id');
});

t.test('REFUSED and NXDOMAIN are answers, never sickness', async (t) => {
	const { monitor, stands: [a, b] } = fleet(2, { probes: false });
	for (let ms = 0; ms < 10_000; ms += HEALTH_RUN_MS) {
		traffic(a.be, T0 + ms, 50, 5);
		traffic(b.be, T0 + ms, 50, 3);
		monitor.run(T0 + ms + 10);
	}
	t.equal(a.be.health.state.name, 'healthy', 'REFUSED only');
	t.equal(b.be.health.state.name, 'healthy', 'NXDOMAIN only');
});

t.test('queries left unanswered: sick for timeouts within a run of their timeout', async (t) => {
	const { monitor, stands: [a] } = fleet(2, { probes: false });
	traffic(a.be, T0, 200, 0);
	for (let i = 0; i < 100; i++) {
		a.be.health.book.query(0x0a000002, 2000 + i, i, T0 + 100);
	}
	monitor.run(T0 + 2000);
	t.equal(a.be.health.state.name, 'healthy', 'before the timeout nothing is known');
	monitor.run(T0 + 2100);
	t.equal(a.be.health.book.unanswered, 100);
	t.same(a.be.health.state.name === 'sick' && a.be.health.state.reason, 'timeouts', 'sick: timeouts (the window no longer holds the answers of 2 s ago)');
});

t.test('probes: a quiet backend turns sick after `fall` failures and healthy after `rise` passes', async (t) => {
	const { monitor, stands: [a, b], changes } = fleet(2);
	let now = T0;
	/* A second passes; b answers its probes. */
	const step = (): void => {
		now += 1000;
		monitor.run(now);
		monitor.probeAnswer(b.be, probeAnswer(b, 0), now + 1);
	};
	step();
	t.equal(a.probes.length, 1, 'a probe sent at the first run');
	t.equal(a.be.stats.udp, 0, 'not counted as a client query');
	t.equal(a.probes[0].readUInt16BE(4), 1, 'one question');
	monitor.probeAnswer(a.be, probeAnswer(a, 2), now + 5);
	t.same(a.be.health.lastProbe, { ok: false, rcode: 2, ms: 5, at: now + 5 }, 'SERVFAIL fails it');
	step();
	t.equal(a.be.health.state.name, 'healthy', 'one failure is not `fall`');
	step(); /* the second probe timed out: no answer within --health-timeout */
	t.same(a.be.health.state.name === 'sick' && a.be.health.state.reason, 'probe', 'two failures: sick (probe)');
	t.same(a.be.health.lastProbe?.rcode, null, 'the last failure was no answer');
	monitor.probeAnswer(a.be, probeAnswer(a, 0, 0xdead), now + 1);
	t.equal(monitor.strayProbeAnswers, 1, 'an answer with another id is not the probe');
	monitor.probeAnswer(a.be, probeAnswer(a, 5), now + 2);
	step();
	t.equal(a.be.health.state.name, 'sick', 'one pass is not `rise`');
	monitor.probeAnswer(a.be, probeAnswer(a, 3), now + 2);
	t.equal(a.be.health.state.name, 'healthy', 'REFUSED then NXDOMAIN: two passes, healthy');
	t.equal(b.be.health.state.name, 'healthy', 'the other was never touched');
	t.same(changes().map((l) => [l['be_id'], l['health'], l['health_reason']]), [[5301, 'sick', 'probe'], [5301, 'healthy', null]]);
	t.equal(a.be.health.transitions, 2);
});

t.test('a probe answered after --health-timeout fails; a backend that is not ok is not probed', async (t) => {
	const { monitor, stands: [a, b] } = fleet(2, { timeoutMs: 300 });
	monitor.run(T0);
	monitor.probeAnswer(a.be, probeAnswer(a, 0), T0 + 400);
	t.same(a.be.health.lastProbe, { ok: false, rcode: 0, ms: 400, at: T0 + 400 });
	(b.be as { ok: boolean }).ok = false;
	monitor.run(T0 + 1000);
	t.equal(b.probes.length, 1, 'no new probe to a backend whose session is down');
});

t.test('fail open: when every connected backend is sick none is treated as sick, said once each way', async (t) => {
	const { monitor, stands: [a, b], lines } = fleet(2, { probes: false });
	traffic(a.be, T0, 40, 2);
	monitor.run(T0 + 10);
	t.notOk(monitor.failOpen, 'one of two sick: no');
	traffic(b.be, T0 + 20, 40, 2);
	monitor.run(T0 + 30);
	t.ok(monitor.failOpen, 'both sick: failing open');
	t.ok(a.be.health.serving && b.be.health.serving, 'both serve their remotes again');
	(b.be as { ok: boolean }).ok = false;
	monitor.sessionChanged(b.be);
	t.ok(monitor.failOpen, 'still: the one connected is sick');
	monitor.run(T0 + 30 + HOLD_DOWN_SECS * 1000);
	t.notOk(monitor.failOpen, 'a back after its hold-down (no probes): not failing open');
	const said = lines.filter((l) => /failing open/.test(String(l['msg']))).map((l) => [l['level'], l['msg']]);
	t.same(said, [[40, 'every backend is sick: failing open'], [30, 'failing open no more']]);
});

t.test('a lost session clears the table: its queries are nobody\'s timeouts', async (t) => {
	const { monitor, stands: [a] } = fleet(2, { probes: false });
	traffic(a.be, T0, 30, 0);
	for (let i = 0; i < 50; i++) {
		a.be.health.book.query(0x0a000003, 3000 + i, i, T0);
	}
	(a.be as { ok: boolean }).ok = false;
	monitor.sessionChanged(a.be);
	(a.be as { ok: boolean }).ok = true;
	monitor.sessionChanged(a.be);
	monitor.run(T0 + 5000);
	t.equal(a.be.health.book.unanswered, 0);
	t.equal(a.be.health.state.name, 'healthy');
});

t.test('no flapping: a SERVFAIL share hovering at the threshold, probes passing, changes state ever more rarely', async (t) => {
	const { monitor, stands: [a] } = fleet(2);
	const changedAt: number[] = [];
	let state = 'healthy';
	for (let ms = 0; ms <= 180_000; ms += HEALTH_RUN_MS) {
		const now = T0 + ms;
		if (a.be.health.state.name === 'healthy') {
			/* Traffic only while it has its remotes: every other answer SERVFAIL. */
			traffic(a.be, now, 10, 0);
			traffic(a.be, now, 10, 2);
		}
		monitor.run(now);
		const probe = a.probes.at(-1);
		if (probe !== undefined && a.be.health.probeId === probe.readUInt16BE(0)) {
			monitor.probeAnswer(a.be, probeAnswer(a, 0), now + 1);
		}
		if (a.be.health.state.name !== state) {
			state = a.be.health.state.name;
			changedAt.push(ms);
		}
	}
	const gaps = changedAt.filter((_, i) => i % 2 === 1).map((back, i) => back - changedAt[i * 2]);
	/* Sick spells of 2 (probes), 5, 10, 20, 40, 60, 60 s: 13 changes; without the rule one every ~2 s. */
	t.ok(changedAt.length <= 13, `${changedAt.length} changes in 3 minutes (every ~2 s without the rule: ~120)`);
	t.ok(gaps.slice(1).every((g, i) => g >= gaps[i]), `each sick spell at least as long as the last: ${gaps.join(', ')} ms`);
	t.ok(Math.max(...gaps) >= 60_000, 'up to the 60-s hold-down');
	t.ok(gaps[0] <= 3000, 'the first sickness ends as soon as the probes pass');
});

t.test('a minute without relapse forgets the history: the next sickness has no hold-down', async (t) => {
	const { monitor, stands: [a] } = fleet(2, { probes: false });
	traffic(a.be, T0, 40, 2);
	monitor.run(T0);
	monitor.run(T0 + HOLD_DOWN_SECS * 1000);
	t.equal(a.be.health.state.name, 'healthy', 'back after the hold-down');
	traffic(a.be, T0 + HOLD_DOWN_SECS * 1000 + 500, 40, 2);
	monitor.run(T0 + HOLD_DOWN_SECS * 1000 + 600);
	const relapse = a.be.health.state;
	t.ok(relapse.name === 'sick' && relapse.holdUntilMs - relapse.sinceMs === 2 * HOLD_DOWN_SECS * 1000, 'a relapse: held twice as long');
	monitor.run(T0 + 100_000);
	traffic(a.be, T0 + 170_000, 40, 2);
	monitor.run(T0 + 170_000);
	const later = a.be.health.state;
	t.ok(later.name === 'sick' && later.holdUntilMs - later.sinceMs === HOLD_DOWN_SECS * 1000,
		'sick again over a minute later: the plain hold-down (no probes) again');
});

t.test('the thresholds exactly: 20 samples are enough, half is sick, one less than half is not', async (t) => {
	const cases: Array<[string, number, number, number, string]> = [
		/* label, answers ok, SERVFAIL, unanswered, health after */
		['20 SERVFAILs alone', 0, 20, 0, 'sick'],
		['10 SERVFAILs of 20', 10, 10, 0, 'sick'],
		['9 SERVFAILs of 20', 11, 9, 0, 'healthy'],
		['10 unanswered of 20', 10, 0, 10, 'sick'],
		['9 unanswered of 20', 11, 0, 9, 'healthy'],
		['19 unanswered alone', 0, 0, 19, 'healthy'],
	];
	for (const [label, ok, servfail, unanswered, want] of cases) {
		const { monitor, stands: [a] } = fleet(2, { probes: false });
		traffic(a.be, T0, ok, 0);
		traffic(a.be, T0, servfail, 2);
		for (let i = 0; i < unanswered; i++) {
			a.be.health.book.query(0x0a000009, 4000 + i, i, T0 - 2000);
		}
		monitor.run(T0 + 10);
		t.equal(a.be.health.state.name, want, label);
	}
});

t.test('the window slides: what was judged 2 s ago is gone', async (t) => {
	const { monitor, stands: [a] } = fleet(2, { probes: false });
	traffic(a.be, T0, 10, 2);
	traffic(a.be, T0 + 1000, 10, 2);
	t.same(a.be.health.window(T0 + 1000), { events: 20, servfail: 20, unanswered: 0 }, 'both halves held');
	t.same(a.be.health.window(T0 + 2100), { events: 10, servfail: 10, unanswered: 0 }, 'the first half gone');
	t.same(a.be.health.window(T0 + 60_000), { events: 0, servfail: 0, unanswered: 0 }, 'all gone');
	monitor.run(T0 + 60_000);
	t.equal(a.be.health.state.name, 'healthy', 'nothing left to judge');
});

t.test('probes: one per interval, none while off, none to a stuck session; answers that are not the probe\'s', async (t) => {
	const { monitor, stands: [a, b] } = fleet(2, { intervalSecs: 1 });
	(b.be as { stuck: boolean }).stuck = true;
	for (let ms = 0; ms < 3000; ms += HEALTH_RUN_MS) {
		monitor.run(T0 + ms);
		if (a.be.health.probeId >= 0) {
			monitor.probeAnswer(a.be, probeAnswer(a, 0), T0 + ms + 1);
		}
	}
	t.equal(a.probes.length, 3, 'three probes in three seconds, each answered at once');
	t.equal(b.probes.length, 0, 'a stuck session is not probed');
	monitor.probeAnswer(a.be, probeAnswer(a, 0), T0 + 3001);
	t.equal(monitor.strayProbeAnswers, 1, 'an answer with no probe out is stray');
	monitor.run(T0 + 3000);
	monitor.probeAnswer(a.be, Buffer.alloc(11), T0 + 3002);
	t.equal(monitor.strayProbeAnswers, 2, 'so is one shorter than a header');
	const off = fleet(1, { probes: false });
	for (let ms = 0; ms < 3000; ms += HEALTH_RUN_MS) {
		off.monitor.run(T0 + ms);
	}
	t.equal(off.stands[0].probes.length, 0, '--no-health-check: none');
});

t.test('fail-open follows probes too, counts only connected backends, and says how many', async (t) => {
	const { monitor, stands: [a, b], lines } = fleet(2, { timeoutMs: 500 });
	/* Nobody answers a probe: both fall by their timeouts, and that alone must open. */
	for (let ms = 0; ms <= 2500; ms += HEALTH_RUN_MS) {
		monitor.run(T0 + ms);
	}
	t.ok(a.be.health.sick && b.be.health.sick, 'both sick by probe timeouts');
	t.ok(monitor.failOpen, 'failing open');
	t.match(lines.find((l) => l['msg'] === 'every backend is sick: failing open'), { backends: 2 });
	/* Both answer SERVFAIL from now on; then b's session goes: a alone, sick, connected. */
	(b.be as { ok: boolean }).ok = false;
	monitor.sessionChanged(b.be);
	t.ok(monitor.failOpen, 'still open: the one connected is sick');
	(a.be as { ok: boolean }).ok = false;
	monitor.sessionChanged(a.be);
	t.notOk(monitor.failOpen, 'none connected: nothing to fail open to (bbal answers SERVFAIL itself)');
	t.match(lines.find((l) => l['msg'] === 'failing open no more'), { backends: 0, healthy: 0 });
	const two = fleet(2);
	two.monitor.run(T0);
	two.monitor.probeAnswer(two.stands[0].be, probeAnswer(two.stands[0], 2), T0 + 1);
	two.monitor.probeAnswer(two.stands[1].be, probeAnswer(two.stands[1], 2), T0 + 1);
	two.monitor.run(T0 + 1000);
	two.monitor.probeAnswer(two.stands[0].be, probeAnswer(two.stands[0], 2), T0 + 1001);
	two.monitor.probeAnswer(two.stands[1].be, probeAnswer(two.stands[1], 2), T0 + 1001);
	t.ok(two.monitor.failOpen, 'two SERVFAIL probe answers each: open at the answer, not at the next run');
});

t.test('the lines say why: window figures and hold-down when sick, how long it was sick when back', async (t) => {
	const { monitor, stands: [a], changes } = fleet(2, { probes: false });
	traffic(a.be, T0, 15, 2);
	traffic(a.be, T0, 5, 0);
	monitor.run(T0);
	monitor.run(T0 + HOLD_DOWN_SECS * 1000);
	traffic(a.be, T0 + 6000, 30, 2);
	monitor.run(T0 + 6000);
	const [first, back, relapse] = changes();
	t.match(first, { health: 'sick', window_answers: 20, window_servfail: 15, window_unanswered: 0, hold_secs: HOLD_DOWN_SECS });
	t.match(back, { health: 'healthy', sick_secs: HOLD_DOWN_SECS });
	t.match(relapse, { health: 'sick', hold_secs: 2 * HOLD_DOWN_SECS }, 'a relapse within the minute: twice the hold-down');
});
