/*
 * CHAOS FLEET
 *
 * The processes a chaos run acts on: one bbal (restartable) in front of a
 * socket directory holding real mname backends (the test fixture, through
 * the integration helpers) and hand-written fake backends
 * (fake_backend.ts), plus the means to hurt them -- signals, a removed
 * socket file, commands to a fake -- and to watch bbal: its log lines
 * (every bbal started so far, for the moment it noticed a fault), its
 * resident set size and its open file descriptors.
 *
 * Everything started is registered with a Cleanup (tap's Test under
 * `npm test`, our own list under `npm run chaos`), so every process is
 * stopped and the directory removed, also when a scenario fails.
 *
 * UNEXPECTED EXITS.  bbal must never exit unless told to.  Every bbal is
 * watched; an exit that did not follow our own SIGTERM is recorded with its
 * status and the tail of its stderr, and every report fails on it.
 */

import { type ChildProcess, spawn } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Test } from 'tap';
import {
	type Backend, type Bbal, childEnv, freePort, type LogRecord, makeSocketDir, projectRoot, sleep, startBackend,
	startBbal, statsSocketFor, waitFor,
} from '../helpers.js';

const FAKE_SCRIPT = path.join(path.dirname(fileURLToPath(import.meta.url)), 'fake_backend.js');

/*
 * The V8 flags the production launcher (bin/bbal, a shell script) runs
 * bin/bbal.js with, read from its `exec node ...` line.  The helpers start
 * bin/bbal.js directly, so the chaos fleet hands these to bbal through
 * NODE_OPTIONS: memory is measured as it would be in production.
 */
export const LAUNCHER_V8_FLAGS: string[] = (() => {
	try {
		const text = readFileSync(path.join(projectRoot, 'bin', 'bbal'), 'utf8');
		const line = /^exec node (.*)$/m.exec(text)?.[1] ?? '';
		return line.split(/\s+/).filter((w) => /^--[a-z0-9-]+(=\S+)?$/.test(w));
	} catch {
		return [];
	}
})();

/* The young generation's ceiling: two semi-spaces of --max-semi-space-size MiB (V8's default 16 on 64-bit). */
export const YOUNG_GENERATION_MAX_KB = 2 * 1024 * Number(
	/^--max-semi-space-size=(\d+)$/.exec(LAUNCHER_V8_FLAGS.find((f) => f.startsWith('--max-semi-space-size=')) ?? '')?.[1]
	?? 16);

/** The part of tap's Test the helpers use; our own when not under tap. */
export interface Teardowns {
	teardown(fn: () => unknown): void;
}

export class Cleanup implements Teardowns {
	private fns: Array<() => unknown> = [];

	teardown(fn: () => unknown): void {
		this.fns.push(fn);
	}

	/** Run every teardown, newest first; errors are reported, not thrown. */
	async run(): Promise<void> {
		const fns = this.fns.reverse();
		this.fns = [];
		for (const fn of fns) {
			try {
				await fn();
			} catch (err) {
				process.stderr.write(`chaos cleanup: ${String(err)}\n`);
			}
		}
	}
}

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
	const status = readFileSync(`/proc/${pid}/status`, 'utf8');
	const field = (k: string): number => Number(new RegExp(`${k}:\\s+(\\d+)`).exec(status)?.[1] ?? NaN);
	return {
		rssKb: field('VmRSS'), rssAnonKb: field('RssAnon'), rssFileKb: field('RssFile'), fds: readdirSync(`/proc/${pid}/fd`).length, heapUsedKb: NaN, heapTotalKb: NaN, externalKb: NaN };
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
		return {
			used: get('bbal_nodejs_heap_size_used_bytes'), total: get('bbal_nodejs_heap_size_total_bytes'),
			newSpace: get('bbal_nodejs_heap_space_size_total_bytes\\{space="new"\\}'),
			external: get('bbal_nodejs_external_memory_bytes'),
		};
	} catch {
		return { used: NaN, total: NaN, newSpace: NaN, external: NaN };
	}
}

function median(xs: number[]): number {
	const s = [...xs].sort((a, b) => a - b);
	return s[Math.floor(s.length / 2)];
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
		rssKb: median(rss), rssAnonKb: median(anon), rssFileKb: median(file), fds: Math.min(...fds),
		heapUsedKb: used.length > 0 ? median(used) : NaN, heapTotalKb: total.length > 0 ? median(total) : NaN,
		externalKb: ext.length > 0 ? median(ext) : NaN,
	};
}

/*
 * How busy the machine was, and how much of that was not the chaos fleet:
 * /proc/stat's busy time, less the CPU time of this process (the load
 * driver) and its children (bbal, the backends).  Processes that exit in
 * between take their share with them, so "foreign" is an upper bound, close
 * enough to tell a quiet machine from one another workload saturates.
 */
export interface CpuSample {
	totalTicks: number;
	busyTicks: number;
	/* CPU ticks used so far by each process of the fleet (and the driver). */
	fleetTicks: Map<number, number>;
}

function procTicks(pid: number): number | undefined {
	try {
		const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
		const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
		return Number(fields[11]) + Number(fields[12]);
	} catch {
		return undefined;
	}
}

export function cpuSample(pids: number[]): CpuSample {
	const cpu = (readFileSync('/proc/stat', 'utf8').split('\n')[0] ?? '').trim().split(/\s+/).slice(1).map(Number);
	const total = cpu.reduce((a, b) => a + b, 0);
	const idle = (cpu[3] ?? 0) + (cpu[4] ?? 0);
	const fleetTicks = new Map<number, number>();
	for (const pid of pids) {
		const t = procTicks(pid);
		if (t !== undefined) {
			fleetTicks.set(pid, t);
		}
	}
	return { totalTicks: total, busyTicks: total - idle, fleetTicks };
}

/*
 * Percent of all cores busy, and busy with something other than the fleet,
 * between two samples.  A process started in between counts from zero; one
 * that exited in between counts nothing (so "foreign" errs high).
 */
export function cpuShare(a: CpuSample, b: CpuSample): { busy: number; foreign: number } {
	const total = Math.max(1, b.totalTicks - a.totalTicks);
	const busy = b.busyTicks - a.busyTicks;
	let fleet = 0;
	for (const [pid, t] of b.fleetTicks) {
		fleet += Math.max(0, t - (a.fleetTicks.get(pid) ?? 0));
	}
	return { busy: busy / total * 100, foreign: Math.max(0, busy - fleet) / total * 100 };
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
	/** A fake's command (stuck, resume, violate); resolves with when it took effect. */
	command(cmd: string): Promise<number>;
}

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
	command(cmd: string): Promise<number> {
		throw new Error(`mname backend ${this.name} takes no command (${cmd})`);
	}
}

class FakeBackend implements ChaosBackend {
	readonly kind = 'fake';
	private proc!: ChildProcess;
	private lines: string[] = [];
	private waiters: Array<() => void> = [];
	private stderr = '';

	constructor(readonly name: string, readonly path: string) {}

	get pid(): number {
		return this.proc.pid as number;
	}

	async start(): Promise<number> {
		const proc = spawn(process.execPath, [FAKE_SCRIPT, this.path, this.name], {
			cwd: projectRoot, env: childEnv(), stdio: ['pipe', 'pipe', 'pipe'],
		});
		this.proc = proc;
		this.lines = [];
		proc.on('error', () => {});
		proc.stdin?.on('error', () => {});
		proc.stdout?.setEncoding('utf8');
		proc.stderr?.setEncoding('utf8');
		proc.stderr?.on('data', (s: string) => {
			this.stderr += s;
		});
		let partial = '';
		proc.stdout?.on('data', (s: string) => {
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
			if (Date.now() > deadline || this.proc.exitCode !== null) {
				throw new Error(`fake backend ${this.name}: no matching line (stderr: ${this.stderr})`);
			}
			await new Promise<void>((resolve) => {
				this.waiters.push(resolve);
				setTimeout(resolve, 100);
			});
		}
	}

	signal(sig: NodeJS.Signals): void {
		this.proc.kill(sig);
	}

	async kill(): Promise<void> {
		if (this.proc.exitCode !== null || this.proc.signalCode !== null) {
			return;
		}
		const done = new Promise((r) => this.proc.once('exit', r));
		this.proc.kill('SIGKILL');
		await done;
	}

	async restart(): Promise<number> {
		await this.kill();
		return this.start();
	}

	async command(cmd: string): Promise<number> {
		this.proc.stdin?.write(`${cmd}\n`);
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

export class ChaosFleet {
	readonly backends = new Map<string, ChaosBackend>();
	/* Every bbal started, oldest first; the last is the live one. */
	private bbals: Bbal[] = [];
	private stopping = new Set<Bbal>();
	readonly unexpectedExits: UnexpectedExit[] = [];
	port = 0;
	/** The live bbal's Prometheus endpoint (for its heap figures). */
	metricsUrl: string | null = null;
	/** The live bbal's inspector port (to ask for a full GC before sampling memory). */
	inspectPort = 0;

	private constructor(readonly t: Teardowns, readonly dir: string) {}

	static async create(t: Teardowns): Promise<ChaosFleet> {
		const dir = await makeSocketDir(t as unknown as Test);
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
		const be = new MnameBackend(name, await startBackend(this.t as unknown as Test, this.dir, name));
		this.backends.set(name, be);
		return be;
	}

	async addFake(name: string): Promise<ChaosBackend> {
		const be = new FakeBackend(name, path.join(this.dir, name));
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
		const metricsPort = await freePort();
		this.inspectPort = await freePort();
		const bbal = await startBbal(this.t as unknown as Test, {
			/* info, not the helpers' debug: two lines per TCP query would be most of the log. */
			dir: this.dir, port: this.port, args: ['--metrics', `127.0.0.1:${metricsPort}`, '-l', 'info'],
			env: { NODE_OPTIONS: [...LAUNCHER_V8_FLAGS, `--inspect=127.0.0.1:${this.inspectPort}`].join(' ') },
		});
		this.metricsUrl = `http://127.0.0.1:${metricsPort}/metrics`;
		this.bbals.push(bbal);
		bbal.proc.once('exit', (code, signal) => {
			if (!this.stopping.has(bbal)) {
				this.unexpectedExits.push({ at: Date.now(), code, signal, stderr: bbal.stderr().slice(-2000) });
			}
		});
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
			for (const [k, v] of Object.entries(snap.udp)) {
				sample.counters[`udp.${k}`] = v;
			}
			for (const [k, v] of Object.entries(snap.tcp)) {
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
		this.stopping.add(bbal);
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

	/** This process and every process of the fleet now. */
	get pids(): number[] {
		return [process.pid, this.bbalPid, ...[...this.backends.values()].map((b) => b.pid)];
	}

	get bbalInstances(): number {
		return this.bbals.length;
	}

	/** The live bbal's stats snapshot, read from its stats socket. */
	async snapshot(): Promise<Snapshot> {
		const net = await import('node:net');
		return new Promise((resolve, reject) => {
			const sock = net.connect(this.statsSocket);
			let buf = '';
			sock.setEncoding('utf8');
			sock.on('data', (s: string) => {
				buf += s;
			});
			sock.on('error', reject);
			sock.on('end', () => {
				try {
					resolve(JSON.parse(buf) as Snapshot);
				} catch (err) {
					reject(err);
				}
			});
		});
	}
}

/* The few snapshot fields the chaos suite reads (README: fields are never renamed). */
export interface Snapshot {
	backends: Array<{ id: number; path: string; ok: boolean; removed: boolean; remotes: number; stuck?: boolean }>;
	remotes: Array<{ ip: string; backend: number; backup: number }>;
	udp: Record<string, number>;
	tcp: Record<string, number> & { open: number };
}
