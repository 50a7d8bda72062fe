/*
 * THE TAKEOVER SCENARIO
 *
 * Issue 14: the running bbal replaced by `bbal --takeover` while the chaos
 * load (load.ts) goes on.  The new process is handed the listening sockets
 * and the remote table over the control socket beside -S, connects to the
 * backends and starts reading; only then does the old one stop reading and
 * accepting, pass on the remotes that changed meanwhile, let its open TCP
 * sessions finish, deliver the answers to the queries it had forwarded,
 * and exit 0 (src/handover.ts draws the conversation).  That is a promise
 * that nobody notices, so unlike `restart`, whose gap is the operator's,
 * this scenario has no fault window: every query that goes unanswered,
 * over UDP or TCP, counts against it, and a reset connection is a lost
 * query.
 *
 * WHAT IT DOES.  It opens SLOW_SESSIONS TCP connections from sources of
 * the load that bbal routes to an mname backend, each asking for a `slow.`
 * name, which the mname fixture answers SLOW_ANSWER_MS (400 ms) late (the
 * fake backend answers it at once), and asking again the moment its
 * answer comes: each connection has a query in flight almost all the time,
 * as a resolver's long-lived connection may.  Once every one has had its
 * first answer (so the old bbal has accepted and serves them), it reads
 * bbal's stats snapshot, starts the new bbal through the fleet's start path
 * (fleet.ts, takeOverBbal(): the running one's flags and `--takeover`, its
 * logs and memory samples collected as a restarted bbal's are), waits for
 * it to log "took over", reads the snapshot again at the same path, lets
 * each connection receive the answer it was waiting for and close, and
 * waits for the old process to exit by itself.
 *
 * THE VERDICT, beyond the suite's usual ones (report.ts: with no window any
 * loss fails; RSS and descriptors of the new process against the old one's,
 * RSS held to PROC_TOLERANCE_NEW_PROCESS as after a restart, since the new
 * process has not been through the old one's bursts; no untold exit):
 *
 *   - every slow query answered by the backend its source was on, and no
 *     slow connection reset, closed before its answer, or left without an
 *     answer past SLOW_ANSWER_TIMEOUT_MS;
 *   - each slow connection had a query in flight at the moment the old bbal
 *     logged that it no longer read or accepted, and the old bbal counted
 *     them among its open sessions then (its tcp_open): otherwise the
 *     scenario did not test what it claims to;
 *   - every remote in the snapshot before on the same backend in the
 *     snapshot after, compared by the backend's socket path (backend ids
 *     are each process's own), none of the load's sources missing, and the
 *     snapshot after served by the new process, which says whom it took
 *     over from;
 *   - every source of the load answered, from the start of the takeover to
 *     the end of the scenario, by the backend that last answered it before;
 *   - the old process exited by itself, with status 0, within
 *     OLD_EXIT_WAIT_MS of the start.
 *
 * BALANCE FIRST.  Every REBALANCE_INTERVAL_SECS (15) bbal moves remotes off
 * a backend that has more than its share, takeover or not.  So the scenario
 * first waits, up to BALANCE_WAIT_MS, for the spread to be what rebalancing
 * leaves alone (waitBalanced(), scenarios.ts).  After `restart` and
 * `remove`, which reassign remotes, `npm run chaos` waits for that anyway,
 * and the short form runs the takeover before them.  A remote that moves
 * during the takeover then fails it, and any "rebalanced remotes" line
 * either bbal logged meanwhile is quoted beside the failure.
 */

import { TcpDnsClient } from '../support/dns_client.js';
import { backendOf } from '../support/dns_messages.js';
import { remoteBackendPaths, type Snapshot } from '../support/bbal.js';
import { waitFor, withDeadline } from '../support/wait.js';
import type { TakeoverStart } from './fleet.js';
import type { QueryRecord } from './load.js';
import { type Ctx, type Injected, waitBalanced } from './scenarios.js';

/* TCP connections held open, mid-query, across the takeover. */
const SLOW_SESSIONS = 4;
/* How late the mname fixture answers a `slow.` name (test/fixtures/mname_backend.cjs). */
const SLOW_ANSWER_MS = 400;
/* A slow query not answered by then is lost: its answer is 400 ms late, not seconds. */
const SLOW_ANSWER_TIMEOUT_MS = 3000;
/* How long a slow connection, once it has sent its FIN, waits for bbal's. */
const SLOW_CLOSE_WAIT_MS = 3000;
/* How long the spread over the backends may take to even out before the takeover begins. */
const BALANCE_WAIT_MS = 30_000;
/* How long the new bbal has to log "took over" after it logged "listening". */
const TOOK_OVER_WAIT_MS = 5000;
/*
 * How long the old bbal has, from the start of the takeover, to exit: the
 * takeover itself (--takeover-timeout is 10 s, but it takes about a second
 * here), its TCP drain limit (3 s) and the wait for the answers to the UDP
 * queries it forwarded (the 2-s query timeout), with room to spare.
 */
const OLD_EXIT_WAIT_MS = 20_000;

/* bbal's log lines that mark the takeover, old and new (src/balancer.ts, src/handover.ts, src/main.ts). */
const SOCKETS_PASSED = 'takeover: sockets passed';
const HANDED_OVER = 'handed over: no longer reading or accepting, draining';
const TOOK_OVER = 'took over';
const EXITING_AFTER_HANDOVER = 'exiting after handover';
const REBALANCED = 'rebalanced remotes';

interface SlowQuery {
	id: number;
	sentAt: number;
	answeredAt: number | null;
	backend: string | null;
}

/*
 * One TCP connection asking for a `slow.` name again and again, each query
 * sent the moment the previous one is answered, until finish().
 */
class SlowSession {
	readonly queries: SlowQuery[] = [];
	/** Why the connection failed (reset, closed before an answer, no answer in time), or null. */
	error: string | null = null;
	/** Whether bbal answered our FIN with its own. */
	closedByBbal = false;
	private stopping = false;
	private loop: Promise<void> = Promise.resolve();

	private constructor(readonly client: TcpDnsClient, readonly path: string, private readonly n: number) {}

	/* A connection from `source`, whose remote is on the mname at `path`. */
	static async open(ctx: Ctx, source: string, path: string, n: number): Promise<SlowSession> {
		const s = new SlowSession(await TcpDnsClient.connect(ctx.fleet.t, ctx.fleet.port, source), path, n);
		s.loop = s.run();
		return s;
	}

	get source(): string {
		return this.client.source;
	}

	get answered(): number {
		return this.queries.filter((q) => q.answeredAt !== null).length;
	}

	/** The query in flight at wall time t, if any. */
	inFlightAt(t: number): SlowQuery | undefined {
		return this.queries.find((q) => q.sentAt <= t && (q.answeredAt === null || q.answeredAt >= t));
	}

	private async run(): Promise<void> {
		for (let id = 1; !this.stopping; id++) {
			const q: SlowQuery = { id, sentAt: Date.now(), answeredAt: null, backend: null };
			this.queries.push(q);
			try {
				const answer = await this.client.ask(`slow.t${this.n}-${id}.chaos.example`, 'TXT', id, SLOW_ANSWER_TIMEOUT_MS);
				q.answeredAt = Date.now();
				q.backend = backendOf(answer);
			} catch (err) {
				const e = err as NodeJS.ErrnoException;
				this.error = `query ${id}: ${e.code ?? e.message}`;
				return;
			}
			if (q.backend === null) {
				this.error = `query ${id}: answered without a backend label`;
				return;
			}
		}
	}

	/** Ask no more; wait for the answer in flight, send our FIN and wait for bbal's. */
	async finish(): Promise<void> {
		this.stopping = true;
		await this.loop;
		this.client.sock.end();
		try {
			await this.client.until(() => this.client.closed, SLOW_CLOSE_WAIT_MS, 'bbal\'s FIN');
			this.closedByBbal = this.client.error === null;
		} catch {
			/* Still open: the note counts the connections bbal closed, and this one is cut below. */
		}
		if (this.client.error !== null && this.error === null) {
			this.error = `after the last answer: ${this.client.error.code ?? this.client.error.message}`;
		}
		this.client.sock.destroy();
	}
}

function secs(ms: number): string {
	return `${(ms / 1000).toFixed(3)} s`;
}

/* A field of a log line as it was written, or '?' when the line or the field is missing. */
function field(rec: Record<string, unknown> | null | undefined, key: string): string {
	const v = rec?.[key];
	return v === undefined ? '?' : JSON.stringify(v);
}

function shortPath(p: string | undefined): string {
	return p === undefined ? 'none' : p.split('/').pop() ?? p;
}

function listSome(items: string[], n = 5): string {
	return items.slice(0, n).join(', ') + (items.length > n ? `, ... (${items.length})` : '');
}

/*
 * The remotes of the snapshot before against those of the snapshot after.
 * A remote gone after is a failure only if it is one of the load's sources,
 * which send all the time; another may have expired meanwhile.
 */
function compareRemotes(before: Snapshot, after: Snapshot, sources: string[], rebalances: string[], failures: string[],
	notes: string[]): void {
	const was = remoteBackendPaths(before);
	const now = remoteBackendPaths(after);
	const moved: string[] = [];
	const gone: string[] = [];
	for (const [ip, p] of was) {
		const q = now.get(ip);
		if (q === undefined) {
			gone.push(ip);
		} else if (q !== p) {
			moved.push(`${ip} (${shortPath(p)} -> ${shortPath(q)})`);
		}
	}
	const goneSources = gone.filter((ip) => sources.includes(ip));
	notes.push(`remotes by backend socket path: ${was.size} in the snapshot before (pid ${before.pid}), ${now.size} `
		+ `after (pid ${after.pid}); ${moved.length} on another backend, ${gone.length} gone`
		+ (gone.length > goneSources.length ? ` (${gone.length - goneSources.length} not the load's: expired)` : ''));
	if (moved.length > 0) {
		failures.push(`${moved.length} remotes on another backend after the takeover than before: ${listSome(moved)}`
			+ (rebalances.length > 0 ? `; meanwhile ${rebalances.join('; ')}` : ''));
	}
	if (goneSources.length > 0) {
		failures.push(`${goneSources.length} of the load's sources missing from the remote table after the takeover: `
			+ listSome(goneSources));
	}
	const missing = sources.filter((ip) => !was.has(ip));
	if (missing.length > 0) {
		notes.push(`${missing.length} of the load's sources not in the snapshot before: ${listSome(missing)}`);
	}
}

/*
 * The judge on the load's records: which sources were answered, from the
 * start of the takeover on, by another backend than the one that last
 * answered them before; and the losses by transport, for the notes.
 */
function judgeLoad(ctx: Ctx, startAt: number, recs: QueryRecord[], rebalances: string[], notes: string[]): string[] {
	const out: string[] = [];
	const n = ctx.driver.sources.length;
	const last: Array<string | null> = Array.from({ length: n }, () => null);
	const away = new Map<number, string>();
	for (const r of [...recs].sort((a, b) => a.sentAt - b.sentAt)) {
		if (r.fate !== 'ok') {
			continue;
		}
		if (r.sentAt < startAt) {
			last[r.src] = r.backend;
		} else if (last[r.src] !== null && r.backend !== last[r.src] && !away.has(r.src)) {
			away.set(r.src, `${ctx.driver.sources[r.src]} (${last[r.src] ?? '?'} -> ${r.backend ?? '?'} `
				+ `at +${secs(r.sentAt - startAt)})`);
		}
	}
	if (away.size > 0) {
		out.push(`${away.size} sources answered by another backend after the takeover began: ${listSome([...away.values()])}`
			+ (rebalances.length > 0 ? `; meanwhile ${rebalances.join('; ')}` : ''));
	}
	for (const tcp of [false, true]) {
		const mine = recs.filter((r) => r.tcp === tcp && r.sentAt >= startAt);
		const lost = mine.filter((r) => r.fate !== 'ok');
		const reset = lost.filter((r) => r.error === 'ECONNRESET' || r.error === 'closed before the answer'
			|| r.error === 'EPIPE').length;
		notes.push(`from the start of the takeover: ${tcp ? 'TCP' : 'UDP'} ${mine.length} sent, ${lost.length} not `
			+ `answered${tcp ? `, ${reset} connections reset or closed by bbal` : ''}`);
	}
	return out;
}

/*
 * SLOW_SESSIONS of the load's sources, and their backends' paths, taken in
 * turn from each mname backend: only the mname fixture answers `slow.`
 * names late (the fake answers everything at once), and bbal routes a TCP
 * connection like its source's UDP.
 */
function slowSources(ctx: Ctx, snap: Snapshot): Array<[string, string]> {
	const mnames = new Set([...ctx.fleet.backends.values()].filter((b) => b.kind === 'mname').map((b) => b.path));
	const paths = remoteBackendPaths(snap);
	const byBackend = new Map<string, string[]>();
	for (const ip of ctx.driver.sources) {
		const p = paths.get(ip);
		if (p !== undefined && mnames.has(p)) {
			byBackend.set(p, [...(byBackend.get(p) ?? []), ip]);
		}
	}
	const out: Array<[string, string]> = [];
	for (let i = 0; out.length < SLOW_SESSIONS && [...byBackend.values()].some((ips) => ips.length > i); i++) {
		for (const [p, ips] of [...byBackend].sort((a, b) => a[0].localeCompare(b[0]))) {
			if (ips[i] !== undefined && out.length < SLOW_SESSIONS) {
				out.push([ips[i], p]);
			}
		}
	}
	return out;
}

/* The new bbal never came up: the old one must still serve, and the scenario fails saying why. */
async function notTakenOver(ctx: Ctx, start: TakeoverStart, slow: SlowSession[]): Promise<Injected> {
	await Promise.all(slow.map((s) => s.finish()));
	return {
		windows: [], attackAt: start.at, recovery: null, rehome: false,
		failures: [`the new bbal did not take over: ${start.error ?? 'no reason given'}`],
		notes: [`the old bbal (pid ${start.old.proc.pid}) ${start.old.proc.exitCode === null ? 'serves on' : 'exited'}`],
	};
}

/** The takeover scenario's inject(): replace bbal by `bbal --takeover` under load, TCP sessions mid-query. */
export async function injectTakeover(ctx: Ctx): Promise<Injected> {
	const { fleet } = ctx;
	const failures: string[] = [];
	const notes: string[] = [];
	notes.push(`before the takeover: ${await waitBalanced(ctx, BALANCE_WAIT_MS)}`);

	const picked = slowSources(ctx, await fleet.snapshot());
	if (picked.length < SLOW_SESSIONS) {
		failures.push(`only ${picked.length} of the load's sources are on an mname backend, for ${SLOW_SESSIONS} slow `
			+ 'TCP connections');
	}
	const slow = await Promise.all(picked.map(([src, path], i) => SlowSession.open(ctx, src, path, i)));
	await waitFor(() => slow.every((s) => s.answered > 0 || s.error !== null), SLOW_ANSWER_TIMEOUT_MS, 20,
		'a first slow answer on every connection').catch(() => {});
	const before = await fleet.snapshot();
	const oldLogsFrom = fleet.bbal.logs.length;
	const start = await fleet.takeOverBbal();
	let oldExitedAt = NaN;
	void start.oldExit.then(() => {
		oldExitedAt = Date.now();
	});
	if (start.bbal === null) {
		return notTakenOver(ctx, start, slow);
	}
	const next = start.bbal;
	const took = await next.waitForLog((r) => r.msg === TOOK_OVER, TOOK_OVER_WAIT_MS).catch(() => null);
	let after: Snapshot | null = null;
	try {
		after = await fleet.snapshot();
	} catch (err) {
		failures.push(`no stats snapshot after the takeover: ${String(err)}`);
	}
	await Promise.all(slow.map((s) => s.finish()));
	const exit = await withDeadline(start.oldExit, Math.max(0, OLD_EXIT_WAIT_MS - (Date.now() - start.at)),
		'the old bbal\'s exit').catch(() => null);

	/* The old bbal's lines and the new one's, placed against the start. */
	const oldLine = (msg: string): { t: number; rec: Record<string, unknown> } | null => {
		const rec = start.old.logs.slice(oldLogsFrom).find((r) => r.msg === msg);
		return rec === undefined ? null : { t: Date.parse(String(rec['time'])), rec };
	};
	const at = (t: number | undefined): string => (t === undefined || Number.isNaN(t) ? '?' : `+${secs(t - start.at)}`);
	const passed = oldLine(SOCKETS_PASSED);
	const handed = oldLine(HANDED_OVER);
	const exiting = oldLine(EXITING_AFTER_HANDOVER);
	const listening = next.logs.find((r) => r.msg === 'listening');
	if (took === null) {
		failures.push(`the new bbal did not log "${TOOK_OVER}" within ${TOOK_OVER_WAIT_MS / 1000} s of listening`);
	}
	notes.push(`takeover: the new bbal (pid ${next.proc.pid}) started at +0; the old (pid ${start.old.proc.pid}) `
		+ `passed its sockets ${at(passed?.t)}; the old no longer read or accepted ${at(handed?.t)} `
		+ `(tcp_open ${field(handed?.rec, 'tcp_open')}); the new listening ${at(Date.parse(String(listening?.['time'])))}, `
		+ `took over ${at(took === null ? undefined : Date.parse(String(took['time'])))} (remotes `
		+ `${field(took, 'remotes')}, remotes_changed ${field(took, 'remotes_changed')}); the old `
		+ `logged "${EXITING_AFTER_HANDOVER}" ${at(exiting?.t)} and exited `
		+ (exit === null ? `not at all by +${secs(Date.now() - start.at)}` : `${exit.code ?? exit.signal} ${at(oldExitedAt)}`));

	if (exit === null) {
		failures.push(`the old bbal had not exited ${OLD_EXIT_WAIT_MS / 1000} s after the takeover began`);
	} else if (exit.code !== 0) {
		failures.push(`the old bbal exited with code ${exit.code}, signal ${exit.signal} after the handover (not 0)`);
	}
	if (exiting !== null && exiting.rec['successor_gone'] !== false) {
		failures.push(`the old bbal says its successor was gone (successor_gone ${String(exiting.rec['successor_gone'])})`);
	}

	/* The slow connections: every query answered, none reset, each caught mid-query by the handover. */
	const bad = slow.filter((s) => s.error !== null);
	if (bad.length > 0) {
		failures.push(`slow TCP connections that failed: ${bad.map((s) => `${s.source} ${s.error}`).join('; ')}`);
	}
	const strays = slow.flatMap((s) => s.queries.filter((q) => q.backend !== null && q.backend !== shortPath(s.path))
		.map((q) => `${s.source} query ${q.id} by ${q.backend ?? '?'}, not ${shortPath(s.path)}`));
	if (strays.length > 0) {
		failures.push(`slow queries answered by another backend than their source's: ${listSome(strays)}`);
	}
	if (handed === null) {
		failures.push(`the old bbal never logged "${HANDED_OVER}"`);
	} else {
		const caught = slow.filter((s) => s.inFlightAt(handed.t) !== undefined);
		if (caught.length < slow.length) {
			failures.push(`only ${caught.length} of ${slow.length} slow TCP connections had a query in flight when the `
				+ 'old bbal stopped accepting: the scenario did not catch them mid-query');
		}
		const open = Number(handed.rec['tcp_open']);
		if (!(open >= slow.length)) {
			failures.push(`the old bbal had ${String(handed.rec['tcp_open'])} TCP sessions open when it stopped `
				+ `accepting, fewer than the ${slow.length} slow connections it served`);
		}
		const straddled = slow.reduce((k, s) => k + s.queries.filter((q) => q.sentAt <= handed.t && q.answeredAt !== null
			&& q.answeredAt >= handed.t).length, 0);
		const ms = slow.flatMap((s) => s.queries.flatMap((q) => (q.answeredAt === null ? [] : [q.answeredAt - q.sentAt])));
		notes.push(`slow TCP connections: ${slow.map((s) => `${s.source} (${shortPath(s.path)})`).join(', ')}; `
			+ `${ms.length} \`slow.\` queries answered in ${Math.min(...ms)}-${Math.max(...ms)} ms (${SLOW_ANSWER_MS} ms `
			+ `late by design), ${straddled} of them in flight when the old bbal stopped accepting; `
			+ `${slow.filter((s) => s.closedByBbal).length} closed by bbal after our FIN`);
	}

	/* Rebalance passes either bbal ended since the takeover began, to quote beside a move. */
	const rebalances = (): string[] => [...fleet.logs()].filter((r) => r.msg === REBALANCED && r.t >= start.at)
		.map((r) => `bbal #${r.instance + 1} logged "${REBALANCED}" at +${secs(r.t - start.at)} `
			+ `(be_id ${String(r['be_id'])}, ${String(r['remotes'])} remotes)`);
	/* The remote table, old against new, by backend path. */
	if (after !== null) {
		if (after.pid !== next.proc.pid) {
			failures.push(`the stats socket answered from pid ${after.pid} after the takeover, not the new bbal's `
				+ `${next.proc.pid}`);
		} else if (after.takeover?.fromPid !== start.old.proc.pid) {
			failures.push(`the new bbal's snapshot does not say it took over from pid ${start.old.proc.pid} `
				+ `(takeover ${JSON.stringify(after.takeover ?? null)})`);
		}
		compareRemotes(before, after, ctx.driver.sources, rebalances(), failures, notes);
	}
	return {
		windows: [],
		attackAt: start.at,
		recovery: null,
		rehome: false,
		bbalReplaced: true,
		failures,
		notes,
		judge: (recs, judgeNotes) => judgeLoad(ctx, start.at, recs, rebalances(), judgeNotes),
	};
}
