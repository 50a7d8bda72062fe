/*
 * CHAOS SCENARIOS
 *
 * Each scenario hurts one thing while the load driver runs, repairs it, and
 * hands the runner its fault windows.  The runner measures bbal before and
 * after, waits for the remotes to come home, and asks report.ts for the
 * verdict.  Scenarios run one after another on one fleet (three real mname
 * backends, 5301-5303, and one fake, 5310) behind one bbal, and each
 * leaves the fleet whole for the next, so the same code serves `npm run
 * chaos`, its short form in `npm test` and the soak.
 *
 * THE FAULT WINDOWS.  A window runs from the fault to the moment bbal
 * noticed it, read from bbal's own log, never beyond the latest moment its
 * documented timings (README, PROTOCOL.md) let it know:
 *
 *   kill      SIGKILL of an mname.  The kernel closes the socket at once:
 *             EOF.  Ends at bbal's "backend faulted" line for it; at most
 *             1 s.
 *   stop      SIGSTOP of an mname, SIGCONT after stopSecs.  Only the
 *             heartbeat can tell: a heartbeat goes out 5 s after the last
 *             reply and must be answered within 15 s, and each of the two
 *             timeouts may fire up to one 1-s tick late.  Ends at bbal's
 *             "backend faulted" line -- no heartbeat, or, sooner, the 10-s
 *             INBOUND_TCP_OK deadline of a TCP session opened to it
 *             meanwhile; at most 22 s.  The stop
 *             lasts 25 s by default rather than 20: with a 20-s stop, the
 *             SIGCONT comes before bbal's worst case and, depending on where
 *             the heartbeat cycle was, bbal may rightly never fault it, so
 *             the heartbeat path would be tested only some of the time.
 *   remove    unlink of an mname's socket file; the process runs on, its
 *             open session to bbal too, but no new connection reaches it.
 *             bbal reads the directory every 5 s: ends at its "backend socket
 *             removed" (or faulted) line; at most 5 s + 1 tick = 6 s.  A new
 *             backend socket is added later, and the orphaned process is
 *             SIGKILLed well after that bound (a kill window of its own), so
 *             what bbal does between the bound and the kill counts.
 *   stuck     the fake stops reading everything for stuckSecs, then reads
 *             again.  bbal calls a session stuck once 256 KiB wait in it
 *             (backends.ts), about 10 s at this load, and faults a session
 *             stuck for 2 s; a TCP session opened to the backend meanwhile
 *             faults it at its 10-s INBOUND_TCP_OK deadline.  stuckSecs is 14,
 *             so that one of these happens.  "While stuck": ends when bbal
 *             logs the session writable again, or faults it; at most the
 *             resume + 1 s to drain what was queued.
 *   violate  the fake writes garbage between two answers on its control
 *             session.  The read that carries it faults the backend: ends at
 *             bbal's "backend faulted" line; at most 1 s.
 *   restart  SIGTERM to bbal, then a new bbal.  The restart gap: from the
 *             SIGTERM until the new bbal logs "listening", which it does once
 *             its backends have connected (before that nothing listens on
 *             the port).  No bound: the gap is the operator's.  Every remote
 *             is concerned.
 *   takeover  a new bbal started with --takeover while the old one runs,
 *             TCP connections mid-query at the moment (takeover_scenario.ts).
 *             No window: the handover promises that nobody notices, so
 *             every loss is outside, every remote must keep its backend and
 *             the old process must exit 0 by itself.
 *   hostile   four attacks at once from sources of their own (hostile.ts).
 *             No window: nothing bbal does about them may cost a
 *             well-behaved client a query, so every loss is outside.
 *   servfail  an mname answers every query SERVFAIL (its `be=` label in the
 *             additional section, so the load driver tells it from bbal's
 *             own) for servfailMs, then normally again.  The session stays
 *             up and heartbeats pass: only bbal's DNS-aware health can tell,
 *             from the answers (half SERVFAIL in its 2-s window, judged
 *             every 250 ms) or from its probes (one a second, sick after two
 *             failures).  Ends at bbal's "backend health changed" line for
 *             it with health sick; at most 3 s.  A SERVFAIL from the backend
 *             counts as not served.
 *   blackhole the same with an mname that answers nothing (heartbeats still
 *             pass) for blackholeMs; bbal must find it sick from queries
 *             unanswered past its 2-s query timeout, or from probes.  Same
 *             window, same 3-s bound.
 *   allservfail
 *             every mname answers SERVFAIL for allServfailMs.  The fake
 *             cannot answer SERVFAIL, and while it is healthy bbal rightly
 *             sends everything to it, so it is SIGKILLed first (a kill
 *             window for its own remotes, as in `kill`) and restarted after
 *             the mnames are back to normal.  Every connected backend is then
 *             sick and bbal must fail open: no window, a backend's SERVFAIL
 *             counts as an answer, a SERVFAIL bbal makes up does not, and no
 *             remote of an mname may move while bbal fails open.  While the
 *             mnames turn sick (or healthy) one by one, the first ones'
 *             remotes rightly go to the others for a moment: those moves
 *             are reported, not failed.
 *
 * Recovery, for the 10-s return criterion, is the moment the primary could
 * serve again: listening after its restart, SIGCONT, resumed, and for a
 * protocol violation the violation itself (new sessions are served at once).
 * For servfail and blackhole it is the backend's acknowledgement of
 * `normal`, and the criterion is 5 s: it never disconnected, and two passing
 * probes a second apart are all bbal needs to find it healthy again.
 */

import { readFileSync } from 'node:fs';
import { sleep } from '../support/wait.js';
import { cpuSample, cpuShare } from '../support/procfs.js';
import type { ChaosBackend, ChaosFleet } from './fleet.js';
import { injectHostile } from './hostile.js';
import { injectTakeover } from './takeover_scenario.js';
import type { LoadDriver, QueryRecord } from './load.js';
import {
	type Analysis, analyze, type FaultWindow, formatScenario, primaries, RETURN_LIMIT_MS, type ScenarioRun,
	SICK_RETURN_LIMIT_MS,
} from './report.js';

export interface Timing {
	beforeMs: number;
	afterMs: number;
	killDownMs: number;
	stopMs: number;
	stuckMs: number;
	/** From a socket's removal to the new backend socket. */
	addAfterMs: number;
	/** From a socket's removal to the SIGKILL of its orphaned process (at least 1 s after the new backend is up). */
	orphanMs: number;
	/** Longest wait for the remotes to return (after recovery). */
	returnWaitMs: number;
	/** Longest wait for bbal's rebalance to even the spread out after a reassignment; 0: don't wait. */
	balanceWaitMs: number;
	/** How long the hostile scenario's attacks last. */
	hostileMs: number;
	/** How long an mname answers SERVFAIL (servfail), nothing (blackhole), all of them SERVFAIL (allservfail). */
	servfailMs: number;
	blackholeMs: number;
	allServfailMs: number;
}

export const FULL_TIMING: Timing = {
	beforeMs: 5000, afterMs: 5000, killDownMs: 5000, stopMs: 25_000, stuckMs: 14_000, addAfterMs: 8000,
	orphanMs: 16_000, returnWaitMs: 12_000, balanceWaitMs: 65_000, hostileMs: 30_000, servfailMs: 15_000,
	blackholeMs: 15_000, allServfailMs: 10_000,
};

export interface Ctx {
	fleet: ChaosFleet;
	driver: LoadDriver;
	timing: Timing;
	timeoutMs: number;
	/** Names for backends added by the remove scenario. */
	nextName: () => string;
	log: (line: string) => void;
}

type LogPred = (r: {
	msg?: string; reason?: unknown; be_path?: unknown; health?: unknown; instance: number;
}) => boolean;

interface PendingWindow {
	label: string;
	target: string | null;
	faultAt: number;
	/** The line that shows bbal saw the fault (default: close). */
	notice?: LogPred;
	/** The line that ends the window. */
	close: LogPred;
	boundMs: number;
	definition: string;
}

export interface Injected {
	/** Empty when nothing may be lost (hostile): then attackAt is the moment the scenario began to hurt. */
	windows: PendingWindow[];
	attackAt?: number;
	recovery: { target: string; recoveredAt: number } | null;
	rehome: boolean;
	bbalReplaced?: boolean;
	expectedFdDelta?: number;
	failures?: string[];
	notes?: string[];
	/** Failures of the scenario's own, judged on every load record of the scenario; it may add notes. */
	judge?: (recs: QueryRecord[], notes: string[]) => string[];
	/** How soon a recovered primary must have its remotes back (RETURN_LIMIT_MS unless given). */
	returnLimitMs?: number;
	/** A backend's SERVFAIL counts as an answer (allservfail). */
	backendServfailAnswers?: boolean;
}

export interface Scenario {
	name: string;
	/** What it hurts: an mname backend, the fake, bbal, or every backend at once. */
	needs: 'mname' | 'fake' | 'bbal' | 'fleet';
	describe(target: string, t: Timing): string;
	inject(ctx: Ctx, target: string): Promise<Injected>;
}

const FAULTED = 'backend faulted (reset and reconnect)';
/* bbal's DNS-aware health (issue 13): a backend turns sick or healthy; every backend sick, and back. */
const HEALTH_CHANGED = 'backend health changed';
const FAILING_OPEN = 'every backend is sick: failing open';
const FAILING_OPEN_NO_MORE = 'failing open no more';
const HEALTH_LINES = new Set([HEALTH_CHANGED, FAILING_OPEN, FAILING_OPEN_NO_MORE]);
/*
 * bbal's own comings and goings, shown when a scenario replaces it: a
 * restart (src/main.ts) and a takeover, old and new (src/handover.ts,
 * src/balancer.ts).  Anything at warn or above is shown then too, but for
 * the lines about one remote.
 */
const BBAL_LIFECYCLE_LINES = new Set(['shutting down', 'exiting', 'listening', 'backend socket established',
	'takeover: sockets received', 'takeover: sockets passed', 'handed over: no longer reading or accepting, draining',
	'takeover: listeners released, remotes changed meanwhile sent', 'took over', 'new bbal has taken over: draining',
	'exiting after handover', 'takeover: option differs from the running bbal']);
/* pino's level number for warn. */
const WARN_LEVEL = 40;
/*
 * How soon bbal must find a backend sick: two probes a second apart, or the
 * answers it passes on, each up to a 1-s tick late.
 */
const SICK_BOUND_MS = 3000;
/* How long bbal may take to find a backend healthy again after it answers normally (two passing probes). */
const HEALTHY_WAIT_MS = 5000;

function faultOf(path: string): LogPred {
	return (r) => r.be_path === path && (r.msg === FAULTED || r.msg === 'backend socket removed');
}

function healthOf(path: string, health: 'sick' | 'healthy'): LogPred {
	return (r) => r.be_path === path && r.msg === HEALTH_CHANGED && r.health === health;
}

function describeLog(r: { msg?: string; reason?: unknown; be_path?: unknown; health?: unknown;
	health_reason?: unknown; }): string {
	if (r.msg === HEALTH_CHANGED) {
		return `${r.msg}: ${String(r.be_path).split('/').pop()} ${JSON.stringify(r.health)}`
			+ (typeof r.health_reason === 'string' ? ` (${r.health_reason})` : '');
	}
	return r.reason !== undefined ? `${r.msg}: ${JSON.stringify(r.reason)}` : String(r.msg);
}

function backend(ctx: Ctx, name: string): ChaosBackend {
	const be = ctx.fleet.backends.get(name);
	if (be === undefined) {
		throw new Error(`no backend ${name}`);
	}
	return be;
}

function secs(ms: number): string {
	return `${(ms / 1000).toFixed(3)} s`;
}

/*
 * What bbal's stats socket says of these backends now, for a note, and what
 * is wrong with it: a backend that answers badly but still heartbeats must
 * be connected (ok) and, when `sick` is asked for, sick.  A snapshot that
 * cannot be had is a note, not a failure: a busy bbal may be slow on its
 * stats socket.
 */
async function healthSnapshot(ctx: Ctx, bes: ChaosBackend[], what: string, since: number, sick: boolean):
Promise<{ note: string; failures: string[] }> {
	let snap;
	try {
		snap = await ctx.fleet.snapshot();
	} catch (err) {
		return { note: `no stats snapshot ${secs(Date.now() - since)} into the ${what}: ${String(err)}`, failures: [] };
	}
	const failures: string[] = [];
	const seen = bes.map((be) => {
		/* health and healthReason come with issue 13's accounting; older snapshots have neither. */
		const b: (typeof snap.backends[number] & { health?: unknown; healthReason?: unknown }) | undefined =
			snap.backends.find((x) => x.path === be.path);
		if (b === undefined) {
			failures.push(`bbal's snapshot does not list ${be.name}`);
			return `${be.name} not listed`;
		}
		if (!b.ok) {
			failures.push(`bbal's snapshot shows ${be.name} not ok (${b.state}), though it answers heartbeats`);
		}
		/* Absent: a bbal whose snapshot does not carry health yet; the log lines judge it then. */
		if (sick && b.health !== undefined && b.health !== 'sick') {
			failures.push(`bbal's snapshot shows ${be.name} with health ${JSON.stringify(b.health)} during the ${what}`);
		}
		return `${be.name} ${b.state}, health ${JSON.stringify(b.health)}`
			+ (typeof b.healthReason === 'string' ? ` (${b.healthReason})` : '')
			+ `, ${b.remotes} remotes`;
	});
	return { note: `bbal's stats snapshot ${secs(Date.now() - since)} into the ${what}: ${seen.join('; ')}`, failures };
}

/*
 * servfail and blackhole: an mname answers badly for `ms`, then normally
 * again.  Its session to bbal stays up and its heartbeats pass, so the fault
 * window ends only when bbal's DNS-aware health finds it sick.
 */
async function injectSick(ctx: Ctx, name: string, mode: 'servfail' | 'blackhole', ms: number): Promise<Injected> {
	const { fleet } = ctx;
	const be = backend(ctx, name);
	const failures: string[] = [];
	const notes: string[] = [];
	const faultAt = await be.command(mode);
	let since = 0;
	let recoveredAt = 0;
	try {
		/* Once bbal has had its time to tell, ask what it thinks. */
		await sleep(Math.min(ms, SICK_BOUND_MS + 1000) - (Date.now() - faultAt));
		const seen = await healthSnapshot(ctx, [be], mode, faultAt, true);
		notes.push(seen.note);
		failures.push(...seen.failures);
		await sleep(ms - (Date.now() - faultAt));
	} finally {
		since = fleet.bbal.logs.length;
		recoveredAt = await be.command('normal');
	}
	const healthy = await fleet.bbal.waitForLog((r) => r.be_path === be.path && r.msg === HEALTH_CHANGED
		&& r.health === 'healthy', HEALTHY_WAIT_MS, since).catch(() => null);
	const sick = fleet.findLog(faultAt, healthOf(be.path, 'sick'));
	if (sick === null || sick.t > recoveredAt) {
		failures.push(`bbal never found ${name} sick in the ${ms / 1000} s it answered ${mode === 'servfail'
			? 'SERVFAIL' : 'nothing'}`);
	} else {
		notes.push(`bbal found ${name} sick ${secs(sick.t - faultAt)} after the switch to ${mode} `
			+ `(${describeLog(sick)})`);
		if (sick.t - faultAt > SICK_BOUND_MS) {
			failures.push(`bbal found ${name} sick only ${secs(sick.t - faultAt)} after the switch `
				+ `(bound ${SICK_BOUND_MS / 1000} s)`);
		}
		const flaps = [...fleet.logs()].filter((r) => r.t > sick.t && r.t < recoveredAt
			&& healthOf(be.path, 'healthy')(r)).length;
		if (flaps > 0) {
			notes.push(`bbal found ${name} healthy ${flaps} time(s) while it still answered ${mode}`);
		}
	}
	if (healthy === null) {
		failures.push(`bbal did not find ${name} healthy within ${HEALTHY_WAIT_MS / 1000} s of its answering `
			+ 'normally again');
	} else {
		notes.push(`bbal found ${name} healthy ${secs(Date.parse(String(healthy.time)) - recoveredAt)} after it `
			+ 'answered normally again');
	}
	return {
		windows: [{
			label: `${mode} ${name}`, target: name, faultAt, close: healthOf(be.path, 'sick'), boundMs: SICK_BOUND_MS,
			definition: `DNS health: from the switch to ${mode} until bbal logs the backend sick; at most `
				+ `${SICK_BOUND_MS / 1000} s: ${mode === 'servfail' ? 'its SERVFAILs are half of bbal\'s 2-s window '
					+ 'within about a second' : 'its queries go unanswered past bbal\'s 2-s query timeout'}, and a `
				+ '250-ms health run counts them; or two probes, a second apart, fail',
		}],
		recovery: { target: name, recoveredAt },
		rehome: false,
		returnLimitMs: SICK_RETURN_LIMIT_MS,
		failures,
		notes,
	};
}

/*
 * allservfail: every mname answers SERVFAIL; the fake, which cannot, is
 * killed first and restarted last (scenarios header).  The judge looks at
 * each mname remote's answers in four stretches: from the kill to the
 * switch and while bbal fails open no remote may move; while the mnames
 * turn sick, or healthy again, one by one, moves are rightly made and only
 * reported.  By the end every one must be back on its primary.
 */
async function injectAllServfail(ctx: Ctx): Promise<Injected> {
	const { fleet, timing } = ctx;
	const all = [...fleet.backends.values()].sort((a, b) => a.name.localeCompare(b.name));
	const mnames = all.filter((b) => b.kind === 'mname');
	const fakes = all.filter((b) => b.kind === 'fake');
	const failures: string[] = [];
	const notes: string[] = [];
	const windows: PendingWindow[] = [];
	const killAt = Date.now();
	for (const fake of fakes) {
		const since = fleet.bbal.logs.length;
		const at = Date.now();
		await fake.kill();
		windows.push({
			label: `SIGKILL ${fake.name}`, target: fake.name, faultAt: at, close: faultOf(fake.path), boundMs: 1000,
			definition: 'EOF: from the SIGKILL of the fake (it cannot answer SERVFAIL) until bbal logs it faulted; '
				+ 'at most 1 s',
		});
		/* Not connected any more, before the mnames turn sick: bbal is to fail open, not send all to the fake. */
		await fleet.bbal.waitForLog((r) => r.be_path === fake.path && r.msg === FAULTED, 2000, since).catch(() => {
			failures.push(`bbal did not find the killed fake ${fake.name} faulted within 2 s`);
		});
	}
	const switchAt = Math.min(...await Promise.all(mnames.map((b) => b.command('servfail'))));
	let normalAt = 0;
	try {
		await sleep(Math.min(timing.allServfailMs, SICK_BOUND_MS + 1000) - (Date.now() - switchAt));
		/* Failing open, bbal treats none as sick; whether it still calls them sick is its own affair. */
		const seen = await healthSnapshot(ctx, mnames, 'SERVFAIL', switchAt, false);
		notes.push(seen.note);
		failures.push(...seen.failures);
		await sleep(timing.allServfailMs - (Date.now() - switchAt));
	} finally {
		normalAt = Math.max(...await Promise.all(mnames.map((b) => b.command('normal'))));
	}
	/* Every mname healthy before the fake returns, or the fake, healthy among sick ones, would take all. */
	const healthyBy = Date.now() + HEALTHY_WAIT_MS;
	while (Date.now() < healthyBy && !mnames.every((b) => fleet.findLog(switchAt, healthOf(b.path, 'healthy')) !== null)) {
		await sleep(100);
	}
	const unhealthy = mnames.filter((b) => fleet.findLog(switchAt, healthOf(b.path, 'healthy')) === null);
	if (unhealthy.length > 0) {
		failures.push(`bbal did not find ${unhealthy.map((b) => b.name).join(', ')} healthy within `
			+ `${HEALTHY_WAIT_MS / 1000} s of their answering normally again`);
	}
	let recoveredAt = Date.now();
	for (const fake of fakes) {
		recoveredAt = await fake.restart();
	}
	const judge = (recs: QueryRecord[], judgeNotes: string[]): string[] => {
		const out: string[] = [];
		const open = fleet.findLog(switchAt, (r) => r.msg === FAILING_OPEN);
		const openAt = open === null || open.t > normalAt ? Infinity : open.t;
		if (openAt === Infinity) {
			out.push('bbal never failed open while every connected backend answered SERVFAIL');
		} else {
			judgeNotes.push(`bbal failed open ${secs(openAt - switchAt)} after the switch to servfail`);
			if (openAt - switchAt > SICK_BOUND_MS) {
				out.push(`bbal failed open only ${secs(openAt - switchAt)} after the switch (bound `
					+ `${SICK_BOUND_MS / 1000} s)`);
			}
			const closed = fleet.findLog(openAt, (r) => r.msg === FAILING_OPEN_NO_MORE);
			if (closed === null) {
				out.push('bbal never logged that it stopped failing open');
			} else {
				judgeNotes.push(`bbal stopped failing open ${secs(closed.t - normalAt)} after the backends answered `
					+ 'normally again');
			}
		}
		const made = recs.filter((r) => r.fate === 'servfail' && r.sentAt >= killAt).length;
		if (made > 0) {
			out.push(`bbal made up ${made} SERVFAIL answers`);
		}
		const n = ctx.driver.sources.length;
		const prim = primaries(recs, 0, killAt, n);
		const isMname = new Set(mnames.map((b) => b.name));
		const stretches: Array<[string, number, number, boolean]> = [
			['between the kill of the fake and the switch', killAt, switchAt, true],
			['while the backends turned sick', switchAt, openAt, false],
			['while bbal failed open', openAt, normalAt, true],
			['while the backends turned healthy again', normalAt, Infinity, false],
		];
		const moved = stretches.map(() => new Set<string>());
		const last: Array<string | null> = [...prim];
		for (const r of recs) {
			if (r.fate !== 'ok' && r.fate !== 'backend servfail') {
				continue;
			}
			last[r.src] = r.backend;
			const p = prim[r.src];
			if (p === null || !isMname.has(p) || r.backend === p) {
				continue;
			}
			const i = stretches.findIndex(([, from, to]) => r.sentAt >= from && r.sentAt < to);
			if (i >= 0) {
				moved[i].add(ctx.driver.sources[r.src]);
			}
		}
		stretches.forEach(([what, , , fail], i) => {
			if (moved[i].size === 0) {
				return;
			}
			const line = `${moved[i].size} remotes of an mname answered by another backend ${what}: `
				+ [...moved[i]].slice(0, 5).join(', ') + (moved[i].size > 5 ? ', ...' : '');
			if (fail) {
				out.push(line);
			} else {
				judgeNotes.push(`${line} (rightly: some backends were healthy, others sick)`);
			}
		});
		const away = prim.flatMap((p, src) => (p !== null && isMname.has(p) && last[src] !== p
			? [`${ctx.driver.sources[src]} (on ${last[src] ?? '?'}, not ${p})`] : []));
		if (away.length > 0) {
			out.push(`remotes of an mname not back on their primary by the end: ${away.slice(0, 5).join(', ')}`
				+ (away.length > 5 ? `, ... (${away.length})` : ''));
		}
		return out;
	};
	return {
		windows,
		attackAt: killAt,
		recovery: fakes.length > 0 ? { target: fakes[0].name, recoveredAt } : null,
		rehome: false,
		backendServfailAnswers: true,
		failures,
		notes,
		judge,
	};
}

export const SCENARIOS: Scenario[] = [
	{
		name: 'kill',
		needs: 'mname',
		describe: (b, t) => `SIGKILL backend ${b}, restart it at the same path ${t.killDownMs / 1000} s later`,
		async inject(ctx, name) {
			const be = backend(ctx, name);
			const faultAt = Date.now();
			await be.kill();
			await sleep(ctx.timing.killDownMs - (Date.now() - faultAt));
			const recoveredAt = await be.restart();
			return {
				windows: [{
					label: `SIGKILL ${name}`, target: name, faultAt, close: faultOf(be.path), boundMs: 1000,
					definition: 'EOF: from the SIGKILL until bbal logs the backend faulted; at most 1 s',
				}],
				recovery: { target: name, recoveredAt },
				rehome: false,
			};
		},
	},
	{
		name: 'stop',
		needs: 'mname',
		describe: (b, t) => `SIGSTOP backend ${b} for ${t.stopMs / 1000} s (heartbeat fault), then SIGCONT`,
		async inject(ctx, name) {
			const be = backend(ctx, name);
			const faultAt = Date.now();
			be.signal('SIGSTOP');
			try {
				await sleep(ctx.timing.stopMs);
			} finally {
				be.signal('SIGCONT');
			}
			const recoveredAt = Date.now();
			return {
				windows: [{
					label: `SIGSTOP ${name}`, target: name, faultAt, close: faultOf(be.path), boundMs: 22_000,
					definition: 'heartbeat: from the SIGSTOP until bbal logs the backend faulted; at most '
						+ '5 s (heartbeat interval) + 15 s (reply deadline) + 2 ticks = 22 s',
				}],
				recovery: { target: name, recoveredAt },
				rehome: false,
			};
		},
	},
	{
		name: 'remove',
		needs: 'mname',
		describe: (b, t) => `remove backend ${b}'s socket file (its process runs on); add a new backend socket `
			+ `${t.addAfterMs / 1000} s later; SIGKILL the orphaned process ${t.orphanMs / 1000} s after the removal`,
		async inject(ctx, name) {
			const be = backend(ctx, name);
			const faultAt = await ctx.fleet.removeSocket(name);
			await sleep(ctx.timing.addAfterMs);
			const newName = ctx.nextName();
			const added = await ctx.fleet.addMname(newName);
			const addedAt = Date.now();
			const bbal = ctx.fleet.bbal;
			const since = bbal.logs.length;
			const notes: string[] = [];
			const failures: string[] = [];
			try {
				await bbal.waitForLog((r) => r.msg === 'backend socket established' && r.be_path === added.path,
					7000, since);
				notes.push(`new backend ${newName} established ${((Date.now() - addedAt) / 1000).toFixed(1)} s `
					+ 'after its socket appeared (the directory is watched, and read every 5 s)');
			} catch {
				failures.push(`new backend ${newName} not established within 7 s of its socket appearing`);
			}
			/* The orphan outlives the window's bound, so what bbal does after it shows. */
			await sleep(Math.max(1000, ctx.timing.orphanMs - (Date.now() - faultAt)));
			const orphanAt = Date.now();
			await be.kill();
			ctx.fleet.backends.delete(name);
			return {
				windows: [{
					label: `unlink ${name}`, target: name, faultAt,
					close: (r) => r.be_path === be.path && (r.msg === 'backend socket removed' || r.msg === FAULTED),
					boundMs: 6000,
					definition: 'rescan: from the unlink until bbal logs the backend removed (or faulted); the '
						+ 'directory is watched, and read every 5 s in any case, so at most 5 s + 1 tick = 6 s',
				}, {
					label: `SIGKILL orphan ${name}`, target: name, faultAt: orphanAt, close: faultOf(be.path),
					boundMs: 1000,
					definition: 'EOF: from the SIGKILL of the orphaned process until bbal logs the fault; at most 1 s',
				}],
				recovery: null,
				rehome: true,
				expectedFdDelta: 0,
				notes,
				failures,
			};
		},
	},
	{
		name: 'stuck',
		needs: 'fake',
		describe: (b, t) => `backend ${b} stops reading for ${t.stuckMs / 1000} s while load continues, then reads again`,
		async inject(ctx, name) {
			const be = backend(ctx, name);
			const faultAt = await be.command('stuck');
			await sleep(ctx.timing.stuckMs);
			const recoveredAt = await be.command('resume');
			const stuckLine = ctx.fleet.findLog(faultAt, (r) => r.be_path === be.path
				&& r.msg === 'backend session stuck (write queue full): dropping new UDP queries');
			const notes = [stuckLine === null ? 'bbal never found the session stuck (the socket took every write)'
				: `bbal found the session stuck after ${((stuckLine.t - faultAt) / 1000).toFixed(3)} s and dropped `
					+ 'new queries for it from then on'];
			return {
				windows: [{
					label: `stuck ${name}`, target: name, faultAt,
					notice: (r) => r.be_path === be.path && (r.msg?.startsWith('backend session stuck') === true
						|| r.msg === FAULTED),
					close: (r) => r.be_path === be.path && (r.msg === 'backend session writable again' || r.msg === FAULTED),
					boundMs: ctx.timing.stuckMs + 1000,
					definition: 'while stuck: from the moment the backend stops reading until bbal logs its session '
						+ 'writable again (or faults it); at most the resume + 1 s',
				}],
				recovery: { target: name, recoveredAt },
				rehome: false,
				notes,
			};
		},
	},
	{
		name: 'violate',
		needs: 'fake',
		describe: (b) => `backend ${b} sends garbage mid-stream on its control session, then serves new sessions`,
		async inject(ctx, name) {
			const be = backend(ctx, name);
			const faultAt = await be.command('violate');
			return {
				windows: [{
					label: `garbage from ${name}`, target: name, faultAt, close: faultOf(be.path), boundMs: 1000,
					definition: 'protocol violation: from the garbage until bbal logs the backend faulted; at most 1 s',
				}],
				recovery: { target: name, recoveredAt: faultAt },
				rehome: false,
			};
		},
	},
	{
		name: 'restart',
		needs: 'bbal',
		describe: () => 'restart bbal (SIGTERM, then start it again) while load runs',
		async inject(ctx) {
			const failures: string[] = [];
			const stopped = await ctx.fleet.stopBbal();
			if (stopped.code !== 0) {
				failures.push(`bbal did not exit 0 on SIGTERM (code ${stopped.code}, signal ${stopped.signal})`);
			}
			const instance = ctx.fleet.bbalInstances;
			await ctx.fleet.startBbal();
			return {
				windows: [{
					label: 'bbal restart', target: null, faultAt: stopped.at,
					close: (r) => r.instance === instance && r.msg === 'listening',
					boundMs: Infinity,
					definition: 'restart gap: from the SIGTERM until the new bbal, its backends connected, is listening',
				}],
				recovery: null,
				rehome: true,
				bbalReplaced: true,
				failures,
				notes: [`old bbal exited ${stopped.code} after SIGTERM`],
			};
		},
	},
	{
		name: 'takeover',
		needs: 'bbal',
		describe: () => 'a new bbal takes over from the running one (--takeover) while load runs, TCP connections '
			+ 'mid-query; nothing may be lost, no remote may move, the old one exits 0',
		inject: (ctx) => injectTakeover(ctx),
	},
	{
		name: 'servfail',
		needs: 'mname',
		describe: (b, t) => `backend ${b} answers every query SERVFAIL for ${t.servfailMs / 1000} s (its session and `
			+ 'heartbeats fine), then normally',
		inject: (ctx, name) => injectSick(ctx, name, 'servfail', ctx.timing.servfailMs),
	},
	{
		name: 'blackhole',
		needs: 'mname',
		describe: (b, t) => `backend ${b} answers no query for ${t.blackholeMs / 1000} s (its session and heartbeats `
			+ 'fine), then normally',
		inject: (ctx, name) => injectSick(ctx, name, 'blackhole', ctx.timing.blackholeMs),
	},
	{
		name: 'allservfail',
		needs: 'fleet',
		describe: (_b, t) => `every mname backend answers SERVFAIL for ${t.allServfailMs / 1000} s, the fake (which `
			+ 'cannot) SIGKILLed for the while and restarted after; bbal must fail open',
		inject: (ctx) => injectAllServfail(ctx),
	},
	{
		name: 'hostile',
		needs: 'bbal',
		describe: (_b, t) => `four attacks at once for ${t.hostileMs / 1000} s (hostile.ts): a TCP lockout trickling `
			+ 'bytes, clients that pipeline big queries and never read, stats-socket hogs, junk datagrams from new '
			+ 'sources; nothing may be lost',
		inject: (ctx) => injectHostile(ctx),
	},
];

export function scenario(name: string): Scenario {
	const s = SCENARIOS.find((x) => x.name === name);
	if (s === undefined) {
		throw new Error(`no scenario ${name} (have ${SCENARIOS.map((x) => x.name).join(', ')})`);
	}
	return s;
}

/* Poll until every source that was on `target` before the fault is answered by it again. */
async function waitReturn(ctx: Ctx, start: number, faultAt: number, target: string, deadline: number): Promise<void> {
	const n = ctx.driver.sources.length;
	for (;;) {
		const recs = ctx.driver.records;
		const prim = primaries(recs, start, faultAt, n);
		const last: Array<string | null> = Array.from({ length: n }, () => null);
		for (const r of recs) {
			if (r.fate === 'ok' && r.sentAt >= faultAt) {
				last[r.src] = r.backend;
			}
		}
		if (prim.every((p, i) => p !== target || last[i] === target) || Date.now() > deadline) {
			return;
		}
		await sleep(200);
	}
}

/* Poll bbal's snapshot until the ok backends' spread is what rebalancing leaves alone. */
export async function waitBalanced(ctx: Ctx, timeoutMs: number): Promise<string> {
	const t0 = Date.now();
	let last = '';
	for (;;) {
		try {
			const snap = await ctx.fleet.snapshot();
			const ok = snap.backends.filter((b) => b.ok);
			const counts = ok.map((b) => b.remotes);
			last = ok.map((b) => `${b.id}:${b.remotes}`).join(' ');
			if (ok.length > 0 && Math.max(...counts) - Math.min(...counts) <= ok.length) {
				return `spread even (${last}) after ${((Date.now() - t0) / 1000).toFixed(1)} s`;
			}
		} catch {
			/* bbal busy or restarting: try again. */
		}
		if (Date.now() - t0 > timeoutMs) {
			return `spread still uneven after ${timeoutMs / 1000} s (${last})`;
		}
		await sleep(500);
	}
}

export interface ScenarioResult {
	run: ScenarioRun;
	a: Analysis;
}

/** Run one scenario against the fleet under load and return its verdict. */
export async function runScenario(ctx: Ctx, sc: Scenario, target: string): Promise<ScenarioResult> {
	const { fleet, driver, timing } = ctx;
	const start = Date.now();
	const exitsBefore = fleet.unexpectedExits.length;
	driver.maxStallMs = 0;
	driver.maxBurst = 0;
	driver.stalls = [];
	const skippedBefore = driver.skipped;
	const procBefore = await driver.quiesce(() => fleet.sample());
	/* The load's own beforeMs, however long the quiet sample took: it tells each source's primary. */
	await sleep(timing.beforeMs);
	const loadBefore = readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
	const cpuBefore = cpuSample(fleet.pids);
	ctx.log(`chaos: ${sc.name} ${target}`);
	const inj = await sc.inject(ctx, target);
	const faultAt = Math.min(inj.attackAt ?? Infinity, ...inj.windows.map((w) => w.faultAt));
	const notes = [...(inj.notes ?? [])];
	if (inj.recovery !== null) {
		await waitReturn(ctx, start, faultAt, inj.recovery.target, inj.recovery.recoveredAt + timing.returnWaitMs);
	}
	if (inj.rehome && timing.balanceWaitMs > 0) {
		notes.push(`rebalance: ${await waitBalanced(ctx, timing.balanceWaitMs)}`);
	}
	const settledAt = Date.now();
	await sleep(timing.afterMs);
	const procAfter = await driver.quiesce(() => fleet.sample());
	const end = Date.now();
	const stalls = driver.stalls.filter(([a, b]) => b - a >= 250);
	notes.push(`load driver: its own event loop stalled at most ${driver.maxStallMs.toFixed(0)} ms`
		+ (stalls.length > 0 ? `; ${stalls.length} stalls of 250 ms or more (the machine was too busy for these `
			+ `figures to be trusted), at ${stalls.slice(0, 4).map(([a, b]) => `${new Date(a).toISOString().slice(11, 23)}`
			+ ` (${b - a} ms)`).join(', ')}` : '')
		+ `; ${driver.skipped - skippedBefore} queries skipped rather than sent late`);
	const cpu = cpuShare(cpuBefore, cpuSample(fleet.pids));
	notes.push(`machine: ${cpu.busy.toFixed(0)}% of all cores busy, ${cpu.foreign.toFixed(0)}% with processes outside `
		+ `the chaos fleet${cpu.foreign > 25 ? ' (another workload competed for the CPU: latencies and timeouts are '
			+ 'not bbal\'s alone)' : ''}; load average ${loadBefore} before, `
		+ `${readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')} after`);
	await driver.settled(end);
	const recs = driver.take(end).filter((r) => r.sentAt >= start);
	const failures = [...(inj.failures ?? []), ...(inj.judge?.(recs, notes) ?? [])];

	const windows: FaultWindow[] = inj.windows.map((w) => {
		const closing = fleet.findLog(w.faultAt, w.close);
		const noticed = w.notice === undefined ? closing : fleet.findLog(w.faultAt, w.notice);
		const bound = w.faultAt + w.boundMs;
		const byLog = closing !== null && closing.t <= bound;
		return {
			label: w.label,
			target: w.target,
			faultAt: w.faultAt,
			noticedAt: noticed?.t ?? null,
			noticedBy: noticed === null ? null : describeLog(noticed),
			end: byLog ? (closing as { t: number }).t : bound,
			endBy: byLog ? `when bbal logged "${describeLog(closing)}"`
			: `at the bound (${w.boundMs / 1000} s): bbal logged ${closing === null ? 'nothing' : 'later'}`,
			definition: w.definition,
		};
	});
	/* What bbal logged about the hurt backend (or about itself: a restart, a takeover), for the table. */
	const paths = new Set(inj.windows.map((w) => (w.target === null ? null : fleet.backendPath(w.target))));
	const aboutBbal = paths.has(null) || inj.bbalReplaced === true;
	/* In time order: during a takeover two bbals write, and each one's lines come in a list of its own. */
	const saidAt: Array<[number, string]> = [];
	for (const r of fleet.logs()) {
		if (r.t < faultAt - 100 || r.t > end) {
			continue;
		}
		const mine = HEALTH_LINES.has(String(r.msg)) || (aboutBbal
			? BBAL_LIFECYCLE_LINES.has(String(r.msg)) || ((r.level ?? 0) >= WARN_LEVEL && r.remote_ip === undefined)
			: (paths.has(r.be_path as string) && r.remote_ip === undefined));
		if (mine) {
			const errCode = (r.err as { code?: string } | undefined)?.code;
			saidAt.push([r.t, `${r.t >= faultAt ? '+' : ''}${((r.t - faultAt) / 1000).toFixed(3)} s  ${describeLog(r)}`
				+ (errCode !== undefined ? ` (${errCode})` : '') + (aboutBbal ? ` [bbal #${r.instance + 1}]` : '')]);
		}
	}
	const said = saidAt.sort((x, y) => x[0] - y[0]).slice(0, 14).map(([, line]) => line);
	const run: ScenarioRun = {
		name: `${sc.name} ${target}`.trim(),
		description: sc.describe(target, timing),
		sources: driver.sources,
		timeoutMs: ctx.timeoutMs,
		start,
		faultAt,
		settledAt,
		end,
		windows,
		recovery: inj.recovery,
		rehome: inj.rehome,
		returnLimitMs: inj.returnLimitMs ?? RETURN_LIMIT_MS,
		backendServfailAnswers: inj.backendServfailAnswers ?? false,
		procBefore,
		procAfter,
		bbalReplaced: inj.bbalReplaced ?? false,
		expectedFdDelta: inj.expectedFdDelta ?? 0,
		unexpectedExits: fleet.unexpectedExits.slice(exitsBefore),
		failures,
		notes,
		bbalSaid: said,
		driverStalls: stalls,
	};
	const a = analyze(run, recs);
	ctx.log(formatScenario(run, a));
	return { run, a };
}

/** A backend of the kind a scenario needs, chosen by `pick` (index into the candidates). */
export function targetFor(ctx: Ctx, sc: Scenario, pick = 0): string {
	if (sc.needs === 'bbal' || sc.needs === 'fleet') {
		return '';
	}
	const names = [...ctx.fleet.backends.values()].filter((b) => b.kind === sc.needs).map((b) => b.name).sort();
	if (names.length === 0) {
		throw new Error(`no ${sc.needs} backend for ${sc.name}`);
	}
	return names[pick % names.length];
}
