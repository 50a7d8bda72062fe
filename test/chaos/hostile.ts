/*
 * THE HOSTILE SCENARIO
 *
 * Issue 12: four attacks on bbal at once while the chaos load (load.ts)
 * goes on, and the verdict that well-behaved clients never noticed.  The
 * attackers -- a TCP lockout trickling bytes on more connections than
 * bbal's cap, clients that pipeline big queries and never read, hogs of the
 * stats socket, junk datagrams from thousands of new sources -- run in a
 * process of their own (hostile_clients.ts, which describes each), from
 * sources disjoint from the load's; this file starts them, watches bbal
 * meanwhile, stops them and judges.
 *
 * THE VERDICT, beyond the suite's usual ones (report.ts: nothing lost --
 * there is no fault window here, so every loss is "outside" -- RSS and
 * descriptors back within 10% once the attackers are gone, no untold exit):
 *
 *   - every well-behaved query answered by a backend, UDP and TCP counted
 *     apart, from the scenario's start to its end;
 *   - bbal's event loop never held up longer than EVENT_LOOP_MAX_MS:
 *     /metrics scraped every second during the attack, the largest
 *     nodejs_eventloop_lag_max_seconds kept (each scrape resets it);
 *   - bbal's RSS, read from /proc every second during the attack (no GC
 *     first, so V8's ordinary swing is in it), never more than
 *     RSS_GROWTH_MAX_MB above its value just before;
 *   - the attacks were in effect, so the scenario cannot pass vacuously:
 *     each attacker connected at least as often as it planned connections,
 *     the unread queries all reached the kernel, the junk came from 80% of
 *     the planned sources and bbal counted at least half of it as invalid
 *     (it is all invalid; loopback loses datagrams only when a socket
 *     buffer overflows), and the event loop was read at least every two
 *     seconds.
 *
 * What each attacker saw (connections held at most and at the end, the
 * longest-lived one, how many bbal closed), bbal's own counters and when
 * the well-behaved losses happened are printed as notes, so a failure says
 * which defence gave way.  BBAL_HOSTILE_ATTACKS=lockout,unread (any
 * subset of lockout, unread, stats, junk) runs only those, to tell which
 * one hurts; such a run fails by design, saying so.
 */

import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { type Child, childEnv, startChild } from '../support/process.js';
import { sleep } from '../support/wait.js';
import { eventLoopMaxMs, FLEET_MAX_TCP_CONNECTIONS, procSample } from './fleet.js';
import type { HostileCounts, HostilePlan } from './hostile_clients.js';
import type { QueryRecord } from './load.js';
import type { Ctx, Injected } from './scenarios.js';

/*
 * The longest event-loop delay allowed while under attack.  STYLE asks for
 * single-digit milliseconds of bbal's own work per turn, but
 * monitorEventLoopDelay also counts the time bbal waits for a core, and on
 * this shared 2-core machine (load average 6-10 from other work, the load
 * driver, three mnames and the attackers) that alone reached 78 ms between
 * two scrapes under the chaos load before any attack, and 118 ms during
 * one (measured).  100 ms would fail on the machine, not on bbal.  200 ms
 * is over that and still under what bbal's own stalls used to cost: a
 * 100,000-remote snapshot serialised in one go held it up "a quarter of a
 * second or more" per reader (stats.ts), a flooding backend 0.4-1.6 s
 * (README, the control read budget).  The note gives the figure before
 * the attack too, to tell the machine from bbal.
 */
export const EVENT_LOOP_MAX_MS = 200;
/*
 * The most bbal's RSS may rise above its "before" sample during the
 * attack.  Sampled without a GC, RSS swings with V8's young generation
 * (8 MiB under the launcher's flags) and old-generation fill, some 10 MB
 * here; 700 connections' objects and buffers add a few MB.  The unread
 * answers alone are 26 MB: a bbal that kept them would go over it.
 */
export const RSS_GROWTH_MAX_MB = 24;

/* How often the event loop and the RSS are read during the attack. */
const WATCH_MS = 1000;
/* How long the attackers' process has to start, and to stop and close every socket. */
const CLIENTS_TIMEOUT_MS = 10_000;
const CLIENTS_SCRIPT = path.join(path.dirname(fileURLToPath(import.meta.url)), 'hostile_clients.js');

/* The attackers' process (hostile_clients.ts): started, told to start and stop, killed on teardown. */
class HostileProcess {
	private constructor(private readonly child: Child, readonly plan: HostilePlan) {}

	static async start(ctx: Ctx): Promise<HostileProcess> {
		const child = startChild('hostile clients', process.execPath,
			[CLIENTS_SCRIPT, String(ctx.fleet.port), ctx.fleet.statsSocket, String(FLEET_MAX_TCP_CONNECTIONS),
				...(process.env['BBAL_HOSTILE_ATTACKS'] !== undefined ? [process.env['BBAL_HOSTILE_ATTACKS']] : [])],
			{ env: childEnv(), stdin: 'pipe', expectExit: true });
		ctx.fleet.t.teardown(() => child.stop('SIGKILL'));
		const line = await HostileProcess.line(child, 'ready ');
		return new HostileProcess(child, JSON.parse(line) as HostilePlan);
	}

	get pid(): number {
		return this.child.pid;
	}

	/* What follows `prefix` on the first stdout line that starts with it. */
	private static async line(child: Child, prefix: string): Promise<string> {
		const find = (): string | undefined => child.stdout.split('\n').slice(0, -1).find((l) => l.startsWith(prefix));
		await child.waitOutput(() => find() !== undefined, CLIENTS_TIMEOUT_MS, JSON.stringify(prefix.trim()));
		return (find() as string).slice(prefix.length);
	}

	/** Every attack started; resolves with when. */
	async attack(): Promise<number> {
		this.child.proc.stdin?.write('start\n');
		return Number(await HostileProcess.line(this.child, 'done start '));
	}

	/** Every attack stopped and its sockets closed; what each did.  The process then exits. */
	async stop(): Promise<HostileCounts> {
		this.child.proc.stdin?.write('stop\n');
		const counts = JSON.parse(await HostileProcess.line(this.child, 'done stop ')) as HostileCounts;
		this.child.proc.stdin?.end();
		await this.child.waitExit(CLIENTS_TIMEOUT_MS);
		return counts;
	}
}

function describePool(what: string, c: HostileCounts['stats'], extra: string): string {
	return `${what}: ${c.opened} opened, ${c.connected} connected, at most ${c.maxHeld} at once, the longest `
		+ `${(c.longestMs / 1000).toFixed(1)} s, ${c.closedByPeer} closed by bbal; ${extra}`;
}

/* Well-behaved queries that a backend did not answer, by transport, and when (from the attack's start). */
function judgeLoad(attackAt: number, recs: QueryRecord[]): string[] {
	const out: string[] = [];
	for (const tcp of [false, true]) {
		const mine = recs.filter((r) => r.tcp === tcp);
		const bad = mine.filter((r) => r.fate !== 'ok');
		if (mine.length === 0 && tcp) {
			out.push('no well-behaved TCP query was sent: nothing shows TCP was served');
		} else if (bad.length > 0) {
			const why = new Map<string, number>();
			for (const r of bad) {
				const k = r.fate === 'lost' ? (r.error ?? 'timeout') : r.fate;
				why.set(k, (why.get(k) ?? 0) + 1);
			}
			const at = (r: QueryRecord): string => `${((r.sentAt - attackAt) / 1000).toFixed(1)} s`;
			out.push(`well-behaved ${tcp ? 'TCP' : 'UDP'} queries not answered: ${bad.length} of ${mine.length} (`
				+ [...why].sort((a, b) => b[1] - a[1]).map(([k, n]) => `${k} ${n}`).join(', ')
				+ `), sent from ${at(bad[0])} to ${at(bad[bad.length - 1])} after the attack began`);
		}
	}
	return out;
}

/** The hostile scenario's inject(): the attacks for ctx.timing.hostileMs, watched, then stopped. */
export async function injectHostile(ctx: Ctx): Promise<Injected> {
	const { fleet, timing } = ctx;
	const metricsUrl = fleet.metricsUrl;
	if (metricsUrl === null) {
		throw new Error('the hostile scenario reads bbal\'s /metrics: the fleet must start bbal with --metrics');
	}
	const attackers = await HostileProcess.start(ctx);
	fleet.helperPids.add(attackers.pid);
	const plan = attackers.plan;
	const before = await fleet.snapshot();
	const rssBefore = procSample(fleet.bbalPid).rssKb;
	/* Reset the event loop's maximum, so the first reading covers the attack only; what it read is the baseline. */
	const lagBefore = await eventLoopMaxMs(metricsUrl);
	const attackAt = await attackers.attack();
	const lags: number[] = [];
	let scrapesFailed = 0;
	let rssPeak = rssBefore;
	while (Date.now() - attackAt < timing.hostileMs) {
		await sleep(WATCH_MS - ((Date.now() - attackAt) % WATCH_MS));
		const lag = await eventLoopMaxMs(metricsUrl);
		if (Number.isNaN(lag)) {
			scrapesFailed++;
		} else {
			lags.push(lag);
		}
		rssPeak = Math.max(rssPeak, procSample(fleet.bbalPid).rssKb);
	}
	const attackMs = Date.now() - attackAt;
	const counts = await attackers.stop();
	/* The stats socket is free again once the hogs are gone; bbal may need a moment to see them go. */
	let after = null;
	for (let i = 0; i < 20 && after === null; i++) {
		after = await fleet.snapshot().catch(() => null);
		if (after === null) {
			await sleep(250);
		}
	}

	const failures: string[] = [];
	const notes: string[] = [];
	const lagMax = lags.length === 0 ? NaN : Math.max(...lags);
	const sorted = [...lags].sort((a, b) => a - b);
	notes.push(`event loop (nodejs_eventloop_lag_max_seconds, /metrics scraped every ${WATCH_MS / 1000} s): longest `
		+ `${lagMax.toFixed(1)} ms, median of the per-second maxima ${(sorted[sorted.length >> 1] ?? NaN).toFixed(1)} ms, `
		+ `${lags.length} scrapes (${scrapesFailed} failed) over ${(attackMs / 1000).toFixed(1)} s; before the attack `
		+ `(since the previous scrape, under the load alone) ${lagBefore.toFixed(1)} ms`);
	if (!(lagMax <= EVENT_LOOP_MAX_MS)) {
		failures.push(`bbal's event loop was held up ${lagMax.toFixed(1)} ms (bound ${EVENT_LOOP_MAX_MS} ms)`);
	}
	if (lags.length < attackMs / WATCH_MS / 2) {
		failures.push(`only ${lags.length} event-loop readings in ${(attackMs / 1000).toFixed(1)} s: the bound was not watched`);
	}
	const growthMb = (rssPeak - rssBefore) / 1024;
	notes.push(`RSS during the attack (/proc, every ${WATCH_MS / 1000} s, no GC): ${(rssBefore / 1024).toFixed(1)} MB `
		+ `before, at most ${(rssPeak / 1024).toFixed(1)} MB (+${growthMb.toFixed(1)} MB)`);
	if (growthMb > RSS_GROWTH_MAX_MB) {
		failures.push(`bbal's RSS rose ${growthMb.toFixed(1)} MB under attack (bound ${RSS_GROWTH_MAX_MB} MB)`);
	}

	const { lockout, unread, stats, junk } = counts;
	notes.push(describePool(`lockout from ${plan.lockoutSource}`, lockout,
		`${lockout.written} bytes trickled, ${lockout.held} open at the end`));
	notes.push(describePool(`unread from ${plan.unreadSources} sources`, unread,
		`${unread.written} big queries written, ${unread.flushed} taken by the kernel, ${unread.held} open at the end`));
	notes.push(describePool('stats hogs', stats, `${stats.held} open at the end`));
	const invalid = after === null ? NaN : after.udp.invalid - before.udp.invalid;
	notes.push(`junk: ${junk.sent} datagrams from ${junk.sources} new sources (${junk.errors} send errors); `
		+ `bbal counted ${invalid} invalid (udp.invalid); remotes held ${before.remotes.length} -> `
		+ `${after?.remotes.length ?? '?'} (the load's, and the TCP attackers' sources bbal admitted)`);
	if (after !== null) {
		const tcp = (k: keyof typeof before.tcp): string => `${k} +${after.tcp[k] - before.tcp[k]}`;
		const ss = (k: 'served' | 'overCap' | 'timedOut'): string =>
			`${k} +${(after.statsSocket?.[k] ?? 0) - (before.statsSocket?.[k] ?? 0)}`;
		notes.push(`bbal's TCP counters meanwhile: ${(['accepted', 'overCap', 'idleClosed', 'invalid', 'abandoned'] as const)
			.map(tcp).join(', ')}; stats socket: ${(['served', 'overCap', 'timedOut'] as const).map(ss).join(', ')}`);
	} else {
		failures.push('no stats snapshot after the attack (the stats socket stayed unusable)');
	}

	/* The attacks were in effect. */
	const ran = new Set(plan.attacks);
	if (ran.size < 4) {
		failures.push(`only ${plan.attacks.join(', ')} ran (BBAL_HOSTILE_ATTACKS): a diagnostic run, not the scenario`);
	}
	if (ran.has('lockout') && lockout.connected < plan.lockoutConnections) {
		failures.push(`the lockout connected ${lockout.connected} times, fewer than its ${plan.lockoutConnections}`);
	}
	const unreadWant = plan.unreadConnections * plan.unreadQueries;
	if (ran.has('unread') && (unread.connected < plan.unreadConnections || unread.flushed < unreadWant)) {
		failures.push(`the unread attack connected ${unread.connected} times and got ${unread.flushed} queries to the `
			+ `kernel (want ${plan.unreadConnections} and ${unreadWant})`);
	}
	if (ran.has('stats') && stats.connected < plan.statsHogs) {
		failures.push(`the stats hogs connected ${stats.connected} times, fewer than ${plan.statsHogs}`);
	}
	const junkWant = Math.floor(plan.junkSourcesPerSec * timing.hostileMs / 1000 * 0.8);
	if (ran.has('junk') && (junk.sources < junkWant || !(invalid >= junk.sent / 2))) {
		failures.push(`the junk came from ${junk.sources} sources (want ${junkWant}) and bbal counted ${invalid} `
			+ `of ${junk.sent} as invalid (want half at least)`);
	}
	return {
		windows: [],
		attackAt,
		recovery: null,
		rehome: false,
		failures,
		notes,
		judge: (recs) => judgeLoad(attackAt, recs),
	};
}
