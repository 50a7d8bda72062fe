/*
 * CHAOS REPORT
 *
 * Turns one scenario's query records (load.ts) and fault windows
 * (scenarios.ts) into the figures the issue asks for, the pass/fail verdict
 * and a printed table.
 *
 * WHICH LOSSES A FAULT EXCUSES.  A query that got no real answer (lost, a
 * SERVFAIL that bbal made up, or a SERVFAIL from a backend told to give
 * them) is "inside" a fault window only when both hold:
 *
 *   1. it was in flight at some moment of the window: sent no later than the
 *      window's end, and not given up (timeoutMs) before the fault began.
 *      A query sent just before a SIGKILL and not yet answered died with the
 *      backend; one sent after bbal noticed had every chance;
 *   2. its source was routed to the faulty backend: the last answer that
 *      source received before sending it came from that backend (or, for a
 *      source with no answer yet, its primary).  A fault of backend B
 *      excuses nothing for a host that B was not serving.  A restart of bbal
 *      itself concerns every source.
 *
 * Everything else is "outside", and the pass criterion is that there is
 * none.  A window's end is never a tuned constant: it is the moment bbal's
 * own log says it acted (scenarios.ts says which line per fault), capped by
 * the latest moment bbal's documented timings let it know.  If bbal logs
 * later than that bound, or never, the queries after the bound count as
 * outside, which is the point.
 *
 * A backend's SERVFAIL is a failure to serve everywhere but in the
 * scenario where every backend gives them (allservfail): there nothing
 * better exists, bbal must fail open and pass them on, and the run says so
 * (backendServfailAnswers) -- a SERVFAIL bbal made up is still a loss.
 *
 * MOVES.  A source's primary is the backend that answered most of its
 * queries before the fault.  It "moved" when another backend answered it
 * after the fault began; it "returned" at the send time of the first answer
 * from its primary after which its primary answered every query.  The
 * return delay is counted from the primary's recovery (the moment the
 * backend could serve again: restarted and listening, SIGCONT, resumed, or
 * for a protocol violation the violation itself, since the backend serves a
 * new session at once, or back to answering normally), and must be at most
 * 10 s (RETURN_LIMIT_MS; 5 s where the scenario asks for less: a backend
 * that was only sick is probed back to health in about 2 s).  Where the
 * primary is gone for good (its socket removed) or bbal was restarted (it
 * forgets every assignment), moves are reassignments and are only counted.
 */

import { percentile } from '../support/quantiles.js';
import type { ProcSample, UnexpectedExit } from './fleet.js';
import type { QueryRecord } from './load.js';

export const RETURN_LIMIT_MS = 10_000;
/** For a backend that was sick and never disconnected: two passing probes, a second apart, and the move back. */
export const SICK_RETURN_LIMIT_MS = 5000;
export const PROC_TOLERANCE = 0.10;
export const PROC_TOLERANCE_NEW_PROCESS = 0.25;

export interface FaultWindow {
	label: string;
	/** The backend whose remotes the fault hurts; null: every remote. */
	target: string | null;
	faultAt: number;
	/** The first log line showing bbal saw the fault, and what it said. */
	noticedAt: number | null;
	noticedBy: string | null;
	/** The window's end, and why it ends there. */
	end: number;
	endBy: string;
	definition: string;
}

export interface ScenarioRun {
	name: string;
	description: string;
	sources: string[];
	timeoutMs: number;
	start: number;
	faultAt: number;
	settledAt: number;
	end: number;
	windows: FaultWindow[];
	/** The primary that must win its remotes back, and when it could. */
	recovery: { target: string; recoveredAt: number } | null;
	/** The primary is gone for good, or bbal forgot every assignment. */
	rehome: boolean;
	/** How soon after its recovery a primary must have its remotes back (RETURN_LIMIT_MS unless less). */
	returnLimitMs: number;
	/** A backend's SERVFAIL counts as an answer (every backend gives them, bbal fails open). */
	backendServfailAnswers: boolean;
	procBefore: ProcSample;
	procAfter: ProcSample;
	/** A new bbal process serves "after" (the restart scenario). */
	bbalReplaced: boolean;
	/** Descriptors the scenario added on purpose (a new backend's session). */
	expectedFdDelta: number;
	unexpectedExits: UnexpectedExit[];
	failures: string[];
	notes: string[];
	/** bbal's log lines about the hurt backend (or itself), relative to the fault. */
	bbalSaid: string[];
	/** When the load driver's own event loop stalled 250 ms or more (wall clock). */
	driverStalls: Array<[number, number]>;
}

export interface PhaseLatency {
	n: number;
	p50: number;
	p99: number;
}

export interface Analysis {
	sent: number;
	tcp: number;
	ok: number;
	/** SERVFAIL made up by bbal (no backend label). */
	servfail: number;
	/** SERVFAIL from a backend (its label in the additional section). */
	backendServfail: number;
	lost: number;
	inside: number;
	insideInFlightAtFault: number;
	/** Inside losses by transport and cause. */
	insideKinds: Array<[string, number]>;
	outside: number;
	/** Of those, how many were in flight while the load driver itself stalled 250 ms or more. */
	outsideDuringStalls: number;
	outsideExamples: Array<QueryRecord & { route: string | null }>;
	/** Outside losses by transport and cause. */
	outsideKinds: Array<[string, number]>;
	latency: { before: PhaseLatency; during: PhaseLatency; after: PhaseLatency };
	affected: string[];
	moved: string[];
	returned: number;
	maxReturnMs: number | null;
	notReturned: string[];
	lateReturns: string[];
	othersMoved: string[];
	reassigned: number;
	pass: boolean;
	failures: string[];
}

function phaseLatency(recs: QueryRecord[], from: number, to: number): PhaseLatency {
	const lat = recs.filter((r) => r.fate === 'ok' && r.sentAt >= from && r.sentAt < to)
		.map((r) => r.latencyMs).sort((a, b) => a - b);
	return { n: lat.length, p50: percentile(lat, 0.5) ?? NaN, p99: percentile(lat, 0.99) ?? NaN };
}

function majority(labels: string[]): string | null {
	const counts = new Map<string, number>();
	let best: string | null = null;
	let bestN = 0;
	for (const l of labels) {
		const n = (counts.get(l) ?? 0) + 1;
		counts.set(l, n);
		if (n > bestN) {
			best = l;
			bestN = n;
		}
	}
	return best;
}

/** The backend that served each source most before the fault. */
export function primaries(recs: QueryRecord[], from: number, to: number, nSources: number): Array<string | null> {
	const labels: string[][] = Array.from({ length: nSources }, () => []);
	for (const r of recs) {
		if (r.fate === 'ok' && r.sentAt >= from && r.sentAt < to) {
			(labels[r.src]).push(r.backend as string);
		}
	}
	return labels.map(majority);
}

export function analyze(run: ScenarioRun, all: QueryRecord[]): Analysis {
	const recs = all.filter((r) => r.sentAt >= run.start && r.sentAt < run.end).sort((a, b) => a.sentAt - b.sentAt);
	const n = run.sources.length;
	const primary = primaries(recs, run.start, run.faultAt, n);
	const lastLabel = [...primary];
	let inside = 0;
	let insideInFlight = 0;
	const insideRecs: QueryRecord[] = [];
	const outsideRecs: QueryRecord[] = [];
	const routes = new Map<QueryRecord, string | null>();
	for (const r of recs) {
		if (r.fate === 'ok' || (run.backendServfailAnswers && r.fate === 'backend servfail')) {
			lastLabel[r.src] = r.backend;
			continue;
		}
		const route = lastLabel[r.src];
		const w = run.windows.find((w) => r.sentAt <= w.end && r.sentAt + run.timeoutMs >= w.faultAt
			&& (w.target === null || route === w.target));
		if (w === undefined) {
			outsideRecs.push(r);
			routes.set(r, route ?? null);
		} else {
			inside++;
			insideRecs.push(r);
			if (r.sentAt < w.faultAt) {
				insideInFlight++;
			}
		}
	}

	/* Moves and returns. */
	const targets = new Set(run.windows.map((w) => w.target));
	const affected: string[] = [];
	const moved: string[] = [];
	const othersMoved: string[] = [];
	const notReturned: string[] = [];
	const lateReturns: string[] = [];
	let returned = 0;
	let maxReturnMs: number | null = null;
	let reassigned = 0;
	for (let src = 0; src < n; src++) {
		const p = primary[src];
		const ip = run.sources[src];
		if (p === null || p === undefined) {
			continue;
		}
		const after = recs.filter((r) => r.src === src && r.fate === 'ok' && r.sentAt >= run.faultAt);
		const isAffected = targets.has(p) || targets.has(null);
		if (isAffected) {
			affected.push(ip);
		}
		const left = after.some((r) => r.backend !== p);
		if (left) {
			(isAffected ? moved : othersMoved).push(ip);
		}
		const last = after[after.length - 1];
		if (last !== undefined && last.backend !== p) {
			reassigned++;
		}
		if (!left || run.recovery === null || run.recovery.target !== p || run.rehome) {
			continue;
		}
		let lastAway = -1;
		after.forEach((r, i) => {
			if (r.backend !== p) {
				lastAway = i;
			}
		});
		const back = after[lastAway + 1];
		if (back === undefined) {
			notReturned.push(ip);
			continue;
		}
		returned++;
		const delay = Math.max(0, back.sentAt - run.recovery.recoveredAt);
		maxReturnMs = Math.max(maxReturnMs ?? 0, delay);
		if (delay > run.returnLimitMs) {
			lateReturns.push(`${ip} (${(delay / 1000).toFixed(1)} s)`);
		}
	}

	const failures = [...run.failures];
	if (outsideRecs.length > 0) {
		failures.push(`${outsideRecs.length} queries lost outside the fault windows`);
	}
	if (notReturned.length > 0) {
		failures.push(`remotes never back on their primary: ${notReturned.join(', ')}`);
	}
	if (lateReturns.length > 0) {
		failures.push(`remotes back on their primary more than ${run.returnLimitMs / 1000} s after its recovery: `
			+ lateReturns.join(', '));
	}
	const { procBefore: pb, procAfter: pa } = run;
	/*
	 * A leak shows in one process.  After a restart "after" is another
	 * process, which has not yet been through the old one's bursts (its JIT
	 * code and malloc arenas differ by megabytes either way: +3% to +12% in
	 * runs that lost nothing), so it is held only to a looser bound.
	 */
	const rssTolerance = run.bbalReplaced ? PROC_TOLERANCE_NEW_PROCESS : PROC_TOLERANCE;
	if (pa.rssKb > pb.rssKb * (1 + rssTolerance)) {
		failures.push(`bbal RSS grew more than ${rssTolerance * 100}%: ${pb.rssKb} kB -> ${pa.rssKb} kB`);
	}
	const fdWant = pb.fds + run.expectedFdDelta;
	if (Math.abs(pa.fds - fdWant) > Math.max(1, pb.fds * PROC_TOLERANCE)) {
		failures.push(`bbal open descriptors not back within ${PROC_TOLERANCE * 100}%: ${pb.fds} -> ${pa.fds}`
			+ (run.expectedFdDelta !== 0 ? ` (expected ${fdWant})` : ''));
	}
	for (const x of run.unexpectedExits) {
		failures.push(`bbal exited untold (code ${x.code}, signal ${x.signal}): ${x.stderr.trim().split('\n').pop() ?? ''}`);
	}
	const count = (f: string): number => recs.filter((r) => r.fate === f).length;
	const kinds = (rs: QueryRecord[]): Array<[string, number]> => [...rs.reduce((m, r) => {
		const k = `${r.tcp ? 'TCP' : 'UDP'} ${r.fate === 'lost' ? (r.error ?? 'timeout') : r.fate}`;
		return m.set(k, (m.get(k) ?? 0) + 1);
	}, new Map<string, number>())].sort((x, y) => y[1] - x[1]);
	return {
		sent: recs.length,
		tcp: recs.filter((r) => r.tcp).length,
		ok: count('ok'),
		servfail: count('servfail'),
		backendServfail: count('backend servfail'),
		lost: count('lost'),
		inside,
		insideInFlightAtFault: insideInFlight,
		insideKinds: kinds(insideRecs),
		outside: outsideRecs.length,
		outsideDuringStalls: outsideRecs.filter((r) => run.driverStalls.some(([a, b]) =>
			r.sentAt <= b && r.sentAt + run.timeoutMs >= a)).length,
		outsideExamples: outsideRecs.slice(0, 3).map((r) => ({ ...r, route: routes.get(r) ?? null })),
		outsideKinds: kinds(outsideRecs),
		latency: {
			before: phaseLatency(recs, run.start, run.faultAt),
			during: phaseLatency(recs, run.faultAt, run.settledAt),
			after: phaseLatency(recs, run.settledAt, run.end),
		},
		affected,
		moved,
		returned,
		maxReturnMs,
		notReturned,
		lateReturns,
		othersMoved,
		reassigned,
		pass: failures.length === 0,
		failures,
	};
}

/* ---- printing ---- */

function hms(t: number): string {
	return new Date(t).toISOString().slice(11, 23);
}

function secs(ms: number): string {
	return `${(ms / 1000).toFixed(3)} s`;
}

function lat(p: PhaseLatency): string {
	return p.n === 0 ? '-' : `${p.p50.toFixed(1)} / ${p.p99.toFixed(1)} ms`;
}

function mb(kb: number): string {
	return `${(kb / 1024).toFixed(1)} MB`;
}

function pct(a: number, b: number): string {
	const d = (b - a) / a * 100;
	return `${d >= 0 ? '+' : ''}${d.toFixed(1)}%`;
}

/** One scenario's table. */
export function formatScenario(run: ScenarioRun, a: Analysis): string {
	const rows: Array<[string, string]> = [];
	rows.push(['phases', `before ${hms(run.start)}, fault ${hms(run.faultAt)}, settled ${hms(run.settledAt)}, `
		+ `end ${hms(run.end)} (${secs(run.end - run.start)})`]);
	for (const w of run.windows) {
		const noticed = w.noticedAt === null ? 'bbal never logged it'
			: `bbal noticed after ${secs(w.noticedAt - w.faultAt)} (${w.noticedBy})`;
		rows.push(['window', `${w.label} at ${hms(w.faultAt)}: ${noticed}; window ${secs(w.end - w.faultAt)}, `
			+ `ends ${w.endBy}`]);
		rows.push(['', `  = ${w.definition}`]);
	}
	rows.push(['queries', `sent ${a.sent} (${a.tcp} over TCP), answered ${a.ok}, SERVFAIL by bbal ${a.servfail}, `
		+ `SERVFAIL by a backend ${a.backendServfail}${run.backendServfailAnswers ? ' (counted as answered)' : ''}, `
		+ `lost ${a.lost}`]);
	rows.push(['not served', `inside fault windows ${a.inside + 0} (${a.insideInFlightAtFault} of them in flight `
		+ `when the fault began), outside ${a.outside}`
		+ (a.outsideDuringStalls > 0 ? ` (${a.outsideDuringStalls} of them in flight while the load driver itself `
			+ 'stalled 250 ms or more: the machine was overloaded)' : '')]);
	if (a.insideKinds.length > 0) {
		rows.push(['', `  inside by kind: ${a.insideKinds.map(([k, n]) => `${k} ${n}`).join(', ')}`]);
	}
	if (a.outsideKinds.length > 0) {
		rows.push(['', `  outside by kind: ${a.outsideKinds.map(([k, n]) => `${k} ${n}`).join(', ')}`]);
	}
	for (const r of a.outsideExamples) {
		rows.push(['', `  outside: ${r.tcp ? 'TCP' : 'UDP'} from ${run.sources[r.src]} (served by ${r.route ?? '?'}) `
			+ `at ${hms(r.sentAt)}: `
			+ `${r.fate}${r.error !== null ? ` (${r.error})` : ''}`]);
	}
	rows.push(['latency', `p50 / p99: before ${lat(a.latency.before)}, during ${lat(a.latency.during)}, `
		+ `after ${lat(a.latency.after)}`]);
	if (run.rehome) {
		rows.push(['remotes', `${a.affected.length} affected, ${a.moved.length} moved, ${a.reassigned} of `
			+ `${run.sources.length} end on another backend than before (reassigned, no primary to return to); `
			+ `others moved: ${a.othersMoved.length}`]);
	} else {
		const ret = run.recovery === null ? ''
			: `, ${a.returned} back on their primary, slowest ${a.maxReturnMs === null ? '-'
				: secs(a.maxReturnMs)} after its recovery at ${hms(run.recovery.recoveredAt)}`
				+ (a.notReturned.length > 0 ? `, NOT back: ${a.notReturned.length}` : '');
		rows.push(['remotes', `${a.affected.length} on the faulty backend, ${a.moved.length} moved${ret}; `
			+ `other remotes moved: ${a.othersMoved.length}`]);
	}
	rows.push(['bbal', `RSS ${mb(run.procBefore.rssKb)} -> ${mb(run.procAfter.rssKb)} `
		+ `(${pct(run.procBefore.rssKb, run.procAfter.rssKb)}), open fds ${run.procBefore.fds} -> ${run.procAfter.fds}`
		+ `${run.bbalReplaced ? ' (a new bbal process after)' : ''}, untold exits ${run.unexpectedExits.length}`
		+ `${run.procBefore.afterGc && run.procAfter.afterGc ? '; memory sampled after a full GC' : '; memory sampled without a GC'}`]);
	rows.push(['', `RSS anonymous ${mb(run.procBefore.rssAnonKb)} -> ${mb(run.procAfter.rssAnonKb)}, file-backed `
		+ `${mb(run.procBefore.rssFileKb)} -> ${mb(run.procAfter.rssFileKb)}; V8 heap used `
		+ `${mb(run.procBefore.heapUsedKb)} -> ${mb(run.procAfter.heapUsedKb)}, `
		+ `reserved ${mb(run.procBefore.heapTotalKb)} -> ${mb(run.procAfter.heapTotalKb)}, external `
		+ `${mb(run.procBefore.externalKb)} -> ${mb(run.procAfter.externalKb)} (from /metrics; not criteria)`]);
	const cb = run.procBefore.counters;
	const ca = run.procAfter.counters;
	if (cb !== undefined && ca !== undefined && !run.bbalReplaced) {
		const moved = Object.keys(ca).filter((k) => k !== 'tcp.open' && k !== 'udp.received' && k !== 'udp.forwarded'
			&& k !== 'udp.sent' && k !== 'tcp.accepted' && k !== 'tcp.established' && k !== 'udp.probeAnswers'
			&& (ca[k] ?? 0) !== (cb[k] ?? 0));
		rows.push(['', `bbal's own counts of what it refused or dropped meanwhile: ${moved.length === 0 ? 'none'
			: moved.map((k) => `${k} +${(ca[k] ?? 0) - (cb[k] ?? 0)}`).join(', ')}`]);
	}
	run.bbalSaid.forEach((line, i) => {
		rows.push([i === 0 ? 'bbal said' : '', line]);
	});
	for (const note of run.notes) {
		rows.push(['note', note]);
	}
	rows.push(['result', a.pass ? 'PASS' : `FAIL: ${a.failures.join('; ')}`]);
	const width = Math.max(...rows.map(([k]) => k.length));
	const title = `== ${run.name}: ${run.description} ==`;
	return [title, ...rows.map(([k, v]) => `${k.padEnd(width)}  ${v}`)].join('\n');
}

/** The summary table over scenarios. */
export function formatSummary(results: Array<{ run: ScenarioRun; a: Analysis }>): string {
	const head = ['scenario', 'sent', 'answered', 'lost in', 'lost out', 'p99 before/during/after ms',
		'moved/back (slowest)', 'RSS', 'fds', 'result'];
	const rows = results.map(({ run, a }) => [
		run.name,
		String(a.sent),
		String(a.ok + (run.backendServfailAnswers ? a.backendServfail : 0)),
		String(a.inside),
		String(a.outside),
		[a.latency.before, a.latency.during, a.latency.after].map((p) => (p.n === 0 ? '-' : p.p99.toFixed(1))).join('/'),
		run.rehome ? `${a.moved.length}/reassigned ${a.reassigned}`
		: `${a.moved.length}/${a.returned}${a.maxReturnMs === null ? '' : ` (${(a.maxReturnMs / 1000).toFixed(1)} s)`}`,
		pct(run.procBefore.rssKb, run.procAfter.rssKb),
		`${run.procBefore.fds}->${run.procAfter.fds}`,
		a.pass ? 'PASS' : 'FAIL',
	]);
	const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i]).length)));
	const line = (cells: string[]): string => cells.map((c, i) => c.padEnd(widths[i])).join('  ');
	return [line(head), line(widths.map((w) => '-'.repeat(w))), ...rows.map(line)].join('\n');
}
