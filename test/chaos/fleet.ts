/*
 * CHAOS FLEET
 *
 * The processes a chaos run acts on: one bbal (restartable, or replaced
 * by a takeover) in front of a socket directory holding real mname
 * backends (the test fixture, through test/support/fleet.ts) and fake
 * backends, each a process of its own (fake_backend.ts), plus the means to
 * hurt them -- signals, a removed socket file, commands to a fake,
 * answering modes of an mname (SERVFAIL for everything, no answer at all)
 * -- and to watch bbal: its log lines (every bbal started so far, for the
 * moment it noticed a fault), its resident set size, its open file
 * descriptors and, from its /metrics, its heap and its event loop's
 * longest delay.
 *
 * Everything started is registered with a Cleanup (tap's Test under
 * `npm test`, our own list under `npm run chaos`), so every process is
 * stopped and the directory removed, also when a scenario fails.
 *
 * UNEXPECTED EXITS.  bbal must never exit unless told to.  Every bbal is
 * watched (process.ts's onUnexpectedExit); an exit that did not follow our
 * own stop is recorded with its status and the tail of its stderr, and
 * every report fails on it.  One bbal is told to exit another way: the one
 * a takeover replaces (takeOverBbal()), which exits by itself once it has
 * handed over and drained.  Its exit is not recorded here; the takeover
 * scenario awaits it and judges its status.
 *
 * EVERY BBAL IS STARTED THE SAME WAY (launchBbal()): the same flags, the
 * production launcher's V8 flags, an inspector port of its own.  A bbal
 * that takes over is given the running one's flags, its metrics port
 * among them (the new process is handed that listening socket too), and
 * `--takeover`; its logs and samples are then collected as a restarted
 * bbal's are.
 */

import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
	type Bbal, counters, LAUNCHER_V8_FLAGS, type LogRecord, type Snapshot, startBbal, statsSnapshot, statsSocketFor,
} from '../support/bbal.js';
import { type Backend, type BackendMode, makeSocketDir, startBackend } from '../support/fleet.js';
import { freePort } from '../support/ports.js';
import { type Child, childEnv, type ExitStatus, startChild, type Teardowns } from '../support/process.js';
import { openFds, statusKb } from '../support/procfs.js';
import { median } from '../support/quantiles.js';
import { sleep, waitFor } from '../support/wait.js';

const FAKE_SCRIPT = path.join(path.dirname(fileURLToPath(import.meta.url)), 'fake_backend.js');

/* The young generation's ceiling: two semi-spaces of --max-semi-space-size MiB (V8's default 16 on 64-bit). */
export const YOUNG_GENERATION_MAX_KB = 2 * 1024 * Number(
	/^--max-semi-space-size=(\d+)$/.exec(LAUNCHER_V8_FLAGS.find((f) => f.startsWith('--max-semi-space-size=')) ?? '')?.[1]
	?? 16);

/*
 * bbal's cap on TCP connections open at once, given explicitly (it is also
 * bbal's default, README) so that the hostile scenario knows how many a
 * lockout must hold.
 */
export const FLEET_MAX_TCP_CONNECTIONS = 512;

export interface ProcSample {
	rssKb: number;
	/** VmRSS split: anonymous memory (heaps, buffers) and file pages (node's own code). */
	rssAnonKb: number;
	rssFileKb: number;
	fds: number;
	/** V8 heap in use and reserved, from bbal's /metrics (NaN when unavailable). */
	heapUsedKb: number;
	heapTotalKb: number;
	/** Memory outside the V8 heap that V8 knows of (Buffers), from /metrics. */
	externalKb: number;
	/** bbal's UDP and TCP totals from its stats snapshot (udp.stuck, tcp.overCap, ...). */
	counters?: Record<string, number>;
	/** Taken after a full garbage collection of bbal's V8 heap (through its inspector). */
	afterGc?: boolean;
}

/** VmRSS and the number of open descriptors of a live process. */
export function procSample(pid: number): ProcSample {
	const status = statusKb(pid);
	return {
		rssKb: status['VmRSS'] ?? NaN, rssAnonKb: status['RssAnon'] ?? NaN, rssFileKb: status['RssFile'] ?? NaN,
		fds: openFds(pid), heapUsedKb: NaN, heapTotalKb: NaN, externalKb: NaN };
}

/* The parts of a WebSocket this file uses (node 20 has one with --experimental-websocket). */
interface MinimalWebSocket {
	onopen: (() => void) | null;
	onmessage: ((ev: { data: unknown }) => void) | null;
	onerror: (() => void) | null;
	send(data: string): void;
	close(): void;
}

/*
 * A full garbage collection of bbal's V8 heap, asked for through its
 * inspector (bbal runs with --inspect on a loopback port in the chaos fleet).
 * RSS sampled without one depends on where the old generation is in its
 * fill-and-collect cycle, which swings by 15% under load; sampled after one,
 * it is what bbal retains, which is what a leak would grow.  False when the
 * inspector cannot be reached (no WebSocket in this node, say): the sample
 * is then taken as it is.
 */
export async function collectGarbage(inspectPort: number): Promise<boolean> {
	const WS = (globalThis as unknown as { WebSocket?: new (url: string) => MinimalWebSocket }).WebSocket;
	if (WS === undefined) {
		return false;
	}
	try {
		const targets = await (await fetch(`http://127.0.0.1:${inspectPort}/json/list`,
			{ signal: AbortSignal.timeout(2000) })).json() as Array<{ webSocketDebuggerUrl?: string }>;
		const url = targets[0]?.webSocketDebuggerUrl;
		if (url === undefined) {
			return false;
		}
		return await new Promise<boolean>((resolve) => {
			const ws = new WS(url);
			const done = (ok: boolean): void => {
				clearTimeout(timer);
				ws.onmessage = null;
				ws.onerror = null;
				ws.close();
				resolve(ok);
			};
			const timer = setTimeout(() => done(false), 10_000);
			/* Twice: buffers freed by the first are returned by their finalizers before the second. */
			ws.onopen = () => ws.send(JSON.stringify({ id: 1, method: 'HeapProfiler.collectGarbage' }));
			ws.onmessage = (ev) => {
				const id = (JSON.parse(String(ev.data)) as { id?: number }).id;
				if (id === 1) {
					ws.send(JSON.stringify({ id: 2, method: 'HeapProfiler.collectGarbage' }));
				} else if (id === 2) {
					done(true);
				}
			};
			ws.onerror = () => done(false);
		});
	} catch {
		return false;
	}
}

/* bbal's V8 heap figures from its Prometheus endpoint. */
export async function heapSample(
	metricsUrl: string,
): Promise<{ used: number; total: number; newSpace: number; external: number }> {
	try {
		const text = await (await fetch(metricsUrl, { signal: AbortSignal.timeout(2000) })).text();
		const get = (k: string): number => Number(new RegExp(`^${k} (\\S+)`, 'm').exec(text)?.[1] ?? NaN) / 1024;
		/* prom-client's standard names, without bbal's prefix (metrics.ts). */
		return {
			used: get('nodejs_heap_size_used_bytes'), total: get('nodejs_heap_size_total_bytes'),
			newSpace: get('nodejs_heap_space_size_total_bytes\\{space="new"\\}'),
			external: get('nodejs_external_memory_bytes'),
		};
	} catch {
		return { used: NaN, total: NaN, newSpace: NaN, external: NaN };
	}
}

/*
 * The longest event-loop delay bbal saw since the previous scrape of its
 * /metrics, in ms: prom-client's nodejs_eventloop_lag_max_seconds, which
 * perf_hooks.monitorEventLoopDelay feeds and every scrape resets (metrics.ts).
 * Whoever wants the longest over a stretch scrapes every second and keeps the
 * maximum; any other scrape meanwhile (heapSample) takes its share away.
 * NaN when the scrape failed.
 */
export async function eventLoopMaxMs(metricsUrl: string): Promise<number> {
	try {
		const text = await (await fetch(metricsUrl, { signal: AbortSignal.timeout(2000) })).text();
		return Number(/^nodejs_eventloop_lag_max_seconds (\S+)/m.exec(text)?.[1] ?? NaN) * 1000;
	} catch {
		return NaN;
	}
}

/*
 * Several samples a little apart: the median for memory, the least for
 * descriptors.  The caller samples at a quiet moment (nothing in flight),
 * but a busy bbal may not yet have closed the sockets of the last TCP
 * queries; a leaked descriptor is there in every sample.
 */
export async function procSampleMedian(pid: number, metricsUrl: string | null, n = 3, gapMs = 100):
Promise<ProcSample> {
	const rss: number[] = [];
	const anon: number[] = [];
	const file: number[] = [];
	const fds: number[] = [];
	const used: number[] = [];
	const total: number[] = [];
	const ext: number[] = [];
	for (let i = 0; i < n; i++) {
		if (i > 0) {
			await sleep(gapMs);
		}
		const s = procSample(pid);
		rss.push(s.rssKb);
		anon.push(s.rssAnonKb);
		file.push(s.rssFileKb);
		fds.push(s.fds);
		if (metricsUrl !== null) {
			const h = await heapSample(metricsUrl);
			used.push(h.used);
			total.push(h.total);
			ext.push(h.external);
		}
	}
	return {
		rssKb: median(rss) ?? NaN, rssAnonKb: median(anon) ?? NaN, rssFileKb: median(file) ?? NaN, fds: Math.min(...fds),
		heapUsedKb: median(used) ?? NaN, heapTotalKb: median(total) ?? NaN, externalKb: median(ext) ?? NaN,
	};
}

export type BackendKind = 'mname' | 'fake';

export interface ChaosBackend {
	readonly name: string;
	readonly path: string;
	readonly kind: BackendKind;
	readonly pid: number;
	signal(sig: NodeJS.Signals): void;
	/** SIGKILL and wait for the exit. */
	kill(): Promise<void>;
	/** A fresh process at the same path; resolves with the time it was ready. */
	restart(): Promise<number>;
	/**
	 * A fake's command (stuck, resume, violate, ...) or an mname's answering
	 * mode (servfail, blackhole, ..., normal); resolves with when it took effect.
	 */
	command(cmd: string): Promise<number>;
}

const MNAME_MODES: BackendMode[] = ['normal', 'servfail', 'blackhole', 'refused', 'nxdomain'];

class MnameBackend implements ChaosBackend {
	readonly kind = 'mname';
	constructor(readonly name: string, private readonly be: Backend) {}
	get path(): string {
		return this.be.path;
	}
	get pid(): number {
		return this.be.proc.pid as number;
	}
	signal(sig: NodeJS.Signals): void {
		this.be.proc.kill(sig);
	}
	kill(): Promise<void> {
		return this.be.kill('SIGKILL');
	}
	async restart(): Promise<number> {
		await this.be.restart();
		return Date.now();
	}
	/* An answering mode (test/fixtures/mname_backend.cjs): normal, servfail, refused, nxdomain, blackhole. */
	command(cmd: string): Promise<number> {
		if (!MNAME_MODES.includes(cmd as BackendMode)) {
			return Promise.reject(new Error(`mname backend ${this.name} takes no command ${cmd} `
				+ `(only ${MNAME_MODES.join(', ')})`));
		}
		return this.be.command(cmd as BackendMode);
	}
}

class FakeBackendProcess implements ChaosBackend {
	readonly kind = 'fake';
	private child!: Child;
	private lines: string[] = [];
	private waiters: Array<() => void> = [];

	constructor(readonly name: string, readonly path: string) {}

	get pid(): number {
		return this.child.pid;
	}

	async start(): Promise<number> {
		/* Its exits are the scenarios' doing (kill, restart): expected, never "died". */
		const child = startChild(`fake backend ${this.name}`, process.execPath, [FAKE_SCRIPT, this.path, this.name], {
			env: childEnv(), stdin: 'pipe', expectExit: true,
		});
		this.child = child;
		this.lines = [];
		let partial = '';
		child.proc.stdout?.on('data', (s: string) => {
			const parts = (partial + s).split('\n');
			partial = parts.pop() ?? '';
			this.lines.push(...parts);
			for (const w of this.waiters.splice(0)) {
				w();
			}
		});
		await this.waitLine((l) => l === 'ready', 10_000);
		return Date.now();
	}

	private async waitLine(pred: (l: string) => boolean, timeoutMs: number): Promise<string> {
		const deadline = Date.now() + timeoutMs;
		for (;;) {
			const i = this.lines.findIndex(pred);
			if (i >= 0) {
				return this.lines.splice(i, 1)[0];
			}
			if (Date.now() > deadline || this.child.exited) {
				throw new Error(`fake backend ${this.name}: no matching line (stderr: ${this.child.stderr})`);
			}
			await new Promise<void>((resolve) => {
				this.waiters.push(resolve);
				setTimeout(resolve, 100);
			});
		}
	}

	signal(sig: NodeJS.Signals): void {
		this.child.proc.kill(sig);
	}

	async kill(): Promise<void> {
		await this.child.stop('SIGKILL');
	}

	async restart(): Promise<number> {
		await this.kill();
		return this.start();
	}

	async command(cmd: string): Promise<number> {
		this.child.proc.stdin?.write(`${cmd}\n`);
		const line = await this.waitLine((l) => l.startsWith(`done ${cmd} `), 5000);
		return Number(line.split(' ')[2]);
	}
}

export interface UnexpectedExit {
	at: number;
	code: number | null;
	signal: string | null;
	stderr: string;
}

/* A takeover begun by takeOverBbal(). */
export interface TakeoverStart {
	/** When the new bbal was started. */
	at: number;
	/** The bbal that was live, and how it ended (it exits by itself after a handover). */
	old: Bbal;
	oldExit: Promise<ExitStatus>;
	/** The new bbal, listening; null if it did not start, and then why. */
	bbal: Bbal | null;
	error: string | null;
}

export class ChaosFleet {
	readonly backends = new Map<string, ChaosBackend>();
	/* Every bbal started, oldest first; the last is the live one. */
	private bbals: Bbal[] = [];
	readonly unexpectedExits: UnexpectedExit[] = [];
	port = 0;
	/** The live bbal's Prometheus endpoint (for its heap figures). */
	metricsUrl: string | null = null;
	/** The live bbal's inspector port (to ask for a full GC before sampling memory). */
	inspectPort = 0;
	/* The port of bbal's /metrics: every bbal of the fleet serves it there (a takeover passes the socket on). */
	private metricsPort = 0;
	/* The bbals asked to hand over to a successor: they exit by themselves. */
	private readonly handingOver = new Set<Bbal['proc']>();

	private constructor(readonly t: Teardowns, readonly dir: string) {}

	static async create(t: Teardowns): Promise<ChaosFleet> {
		const dir = await makeSocketDir(t);
		const fleet = new ChaosFleet(t, dir);
		fleet.port = await freePort();
		return fleet;
	}

	get bbal(): Bbal {
		return this.bbals[this.bbals.length - 1];
	}

	get bbalPid(): number {
		return this.bbal.proc.pid as number;
	}

	get statsSocket(): string {
		return statsSocketFor(this.dir);
	}

	async addMname(name: string): Promise<ChaosBackend> {
		const be = new MnameBackend(name, await startBackend(this.t, this.dir, name));
		this.backends.set(name, be);
		return be;
	}

	async addFake(name: string): Promise<ChaosBackend> {
		const be = new FakeBackendProcess(name, path.join(this.dir, name));
		this.t.teardown(() => be.kill());
		await be.start();
		this.backends.set(name, be);
		return be;
	}

	/** A backend's socket path, also after it left the fleet. */
	backendPath(name: string): string {
		return path.join(this.dir, name);
	}

	/** Unlink a backend's socket file (its process keeps running). */
	async removeSocket(name: string): Promise<number> {
		const be = this.backends.get(name);
		if (be === undefined) {
			throw new Error(`no backend ${name}`);
		}
		const at = Date.now();
		await fs.unlink(be.path);
		return at;
	}

	/** Start bbal and wait until every backend in the directory is established. */
	async startBbal(): Promise<Bbal> {
		this.metricsPort = await freePort();
		return this.launchBbal([]);
	}

	/*
	 * `bbal --takeover` with the live bbal's flags, through the same start
	 * path; resolves once the new one is listening (it connects to the
	 * backends and receives the remote table before that), or with why it
	 * did not start.  From the moment it is asked for, the old bbal's exit
	 * is the takeover's outcome, not an untold exit: `oldExit` resolves
	 * with its status.  A takeover that fails before the handover leaves the
	 * old one serving, and watched as before.
	 */
	async takeOverBbal(): Promise<TakeoverStart> {
		const old = this.bbal;
		this.handingOver.add(old.proc);
		const at = Date.now();
		try {
			const bbal = await this.launchBbal(['--takeover']);
			return { at, old, oldExit: old.exit, bbal, error: null };
		} catch (err) {
			if (old.proc.exitCode === null && old.proc.signalCode === null) {
				this.handingOver.delete(old.proc);
			}
			/* Its first line: the rest quotes its output, and its untold exit (recorded) says why in one line. */
			const why = (err instanceof Error ? err.message : String(err)).split('\n')[0];
			return { at, old, oldExit: old.exit, bbal: null, error: why };
		}
	}

	/* One bbal with the fleet's flags (and `extra`), once listening with every backend established. */
	private async launchBbal(extra: string[]): Promise<Bbal> {
		const inspectPort = await freePort();
		/*
		 * startBbal starts bin/bbal.js directly, so it gets the production
		 * launcher's V8 flags through NODE_OPTIONS: memory is measured as it
		 * would be in production.
		 */
		const bbal = await startBbal(this.t, {
			/* info, not startBbal's debug: two lines per TCP query would be most of the log. */
			dir: this.dir, port: this.port, args: ['--metrics', `127.0.0.1:${this.metricsPort}`, '-l', 'info',
				'--max-tcp-connections', String(FLEET_MAX_TCP_CONNECTIONS), ...extra],
			env: { NODE_OPTIONS: [...LAUNCHER_V8_FLAGS, `--inspect=127.0.0.1:${inspectPort}`].join(' ') },
			onUnexpectedExit: (child) => {
				/* A bbal that handed over exits by itself: the takeover scenario judges how. */
				if (this.handingOver.has(child.proc)) {
					return;
				}
				this.unexpectedExits.push({
					at: Date.now(), code: child.status?.code ?? null, signal: child.status?.signal ?? null,
					stderr: child.stderr.slice(-2000),
				});
			},
		});
		this.inspectPort = inspectPort;
		this.metricsUrl = `http://127.0.0.1:${this.metricsPort}/metrics`;
		this.bbals.push(bbal);
		const want = [...this.backends.values()].filter((b) => b.kind === 'mname' || b.kind === 'fake').length;
		await waitFor(() => bbal.logs.filter((r) => r.msg === 'backend socket established').length >= want,
			10_000, 20, `${want} backends established`);
		return bbal;
	}

	/** bbal's RSS, descriptors and heap now (medians of a few samples). */
	async sample(): Promise<ProcSample> {
		/* At rest means bbal's own count of open TCP connections is down to 0 too (a busy bbal lags). */
		const deadline = Date.now() + 5000;
		while (Date.now() < deadline) {
			try {
				if ((await this.snapshot()).tcp.open === 0) {
					break;
				}
			} catch {
				/* try again */
			}
			await sleep(100);
		}
		const afterGc = await collectGarbage(this.inspectPort);
		if (afterGc) {
			/* Let freed pages go back to the kernel before reading RSS. */
			await sleep(300);
		}
		const sample = await procSampleMedian(this.bbalPid, this.metricsUrl, 5, 200);
		sample.afterGc = afterGc;
		try {
			const snap = await this.snapshot();
			sample.counters = {};
			for (const [k, v] of Object.entries(counters(snap.udp))) {
				sample.counters[`udp.${k}`] = v;
			}
			for (const [k, v] of Object.entries(counters(snap.tcp))) {
				sample.counters[`tcp.${k}`] = v;
			}
		} catch {
			/* no counters this time */
		}
		return sample;
	}

	/** SIGTERM the live bbal, as an operator would; resolves with when it was sent and how it ended. */
	async stopBbal(): Promise<{ at: number; code: number | null; signal: string | null }> {
		const bbal = this.bbal;
		const at = Date.now();
		const st = await bbal.stop('SIGTERM');
		return { at, code: st.code, signal: st.signal };
	}

	/*
	 * Every log line of every bbal so far, in order, each given (once) its
	 * time in ms and which bbal wrote it.
	 */
	*logs(): Generator<LogRecord & { t: number; instance: number }> {
		for (let i = 0; i < this.bbals.length; i++) {
			for (const rec of (this.bbals[i]).logs) {
				const r = rec as LogRecord & { t: number; instance: number };
				if (r.t === undefined) {
					r.t = Date.parse(String(rec.time));
					r.instance = i;
				}
				yield r;
			}
		}
	}

	/** The first log line at or after `since` that satisfies pred. */
	findLog(since: number, pred: (r: LogRecord & { instance: number }) => boolean):
		(LogRecord & { t: number; instance: number }) | null {
		let best: (LogRecord & { t: number; instance: number }) | null = null;
		for (const r of this.logs()) {
			if (r.t >= since && pred(r) && (best === null || r.t < best.t)) {
				best = r;
			}
		}
		return best;
	}

	/*
	 * This process and every process of the fleet now: what cpuShare()
	 * (test/support/procfs.ts) takes away from the machine's busy time to
	 * tell a quiet machine from one that another workload saturates.
	 */
	get pids(): number[] {
		return [process.pid, this.bbalPid, ...[...this.backends.values()].map((b) => b.pid), ...this.helperPids];
	}

	/** Other processes of the run while they live (the hostile scenario's attackers): not a foreign workload. */
	readonly helperPids = new Set<number>();

	get bbalInstances(): number {
		return this.bbals.length;
	}

	/** The live bbal's stats snapshot, read from its stats socket. */
	snapshot(): Promise<Snapshot> {
		return statsSnapshot(this.statsSocket);
	}
}
