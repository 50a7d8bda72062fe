/*
 * BBAL SEEN FROM A TEST OR A HARNESS
 *
 * The integration tests, the chaos harness and the benchmark all run the
 * built CLI the way an operator would, and read it the way an operator's
 * tools do.  This file is how.
 *
 * A RUNNING BBAL.  startBbal() starts bin/bbal.js on 127.0.0.1 as a child
 * (process.ts), at debug level, with its stats socket beside its backend
 * directory (statsSocketFor: never inside it, and never the default path,
 * so no two tests share one), and resolves once bbal logs "listening".
 * Every JSON line bbal prints is kept, in order, in `logs`; waitForLog()
 * waits for the first one from a given index on that satisfies a
 * predicate, so a test that takes `logs.length` before an action sees only
 * what the action caused.  It rejects on its deadline or when bbal exits
 * first, quoting bbal's stderr and stdout.  stop() signals bbal and
 * SIGKILLs it after 3 s; the Teardowns given (tap's Test) stop it too, so
 * a failing assertion never leaves a bbal running.
 *
 * A COMMAND THAT ENDS.  runBbal() and runBalstat() run the CLI to
 * completion, for flags, startup errors and balstat's output: both are
 * killed and the promise rejected if still running after 10 s, since every
 * command run this way is expected to exit by itself.
 *
 * THE LAUNCHER'S V8 FLAGS.  Operators start bbal through bin/bbal, a shell
 * script whose last line is `exec node FLAGS bin/bbal.js "$@"`; the flags
 * bound V8's young generation, which is most of bbal's resident memory.  A
 * harness that starts bin/bbal.js itself (the chaos fleet, through
 * NODE_OPTIONS; the benchmark's profiled runs, which need --cpu-prof and
 * node refuses that in NODE_OPTIONS) hands it the same flags, read from that
 * line, so memory and profiles are those of production.  Only flags of the
 * form --name or --name=value are taken; a launcher without the line gives
 * none.
 *
 * THE STATS SNAPSHOT.  What `balstat --json` prints: bbal's whole state as
 * one JSON document on its stats socket (src/stats.ts has the fields, which
 * are never renamed).  It is read with balstat's own reader, so a harness
 * sees exactly what an operator sees, and given up after timeoutMs: a bbal
 * too busy to answer its stats socket must not hang the harness.  Its
 * counter groups (udp, tcp) are read as plain tables with counters(), its
 * remotes' backends by socket path with remoteBackendPaths() (to compare
 * two processes' tables, as the takeover tests do).
 */

import { readFileSync } from 'node:fs';
import path from 'node:path';
import { readSnapshot } from '../../src/balstat.js';
import type { Snapshot } from '../../src/stats.js';
import { type Child, childEnv, type ExitStatus, projectRoot, startChild, type Teardowns } from './process.js';
import { Changes, withDeadline } from './wait.js';

export type { Snapshot };

export const bbalBin = path.join(projectRoot, 'bin', 'bbal.js');
export const balstatBin = path.join(projectRoot, 'bin', 'balstat.js');

/** How long bbal has to log "listening", and a command run to completion to exit. */
const START_TIMEOUT_MS = 10_000;

/** How long a snapshot may take before the read is given up. */
export const SNAPSHOT_TIMEOUT_MS = 10_000;

/* The V8 flags on the production launcher's `exec node ...` line. */
export const LAUNCHER_V8_FLAGS: string[] = (() => {
	try {
		const text = readFileSync(path.join(projectRoot, 'bin', 'bbal'), 'utf8');
		const line = /^exec node (.*)$/m.exec(text)?.[1] ?? '';
		return line.split(/\s+/).filter((w) => /^--[a-z0-9-]+(=\S+)?$/.test(w));
	} catch {
		return [];
	}
})();

/** A counter group of a snapshot (udp, tcp) as a plain table of numbers, for diffs and listings. */
export function counters(group: object): Record<string, number> {
	const out: Record<string, number> = {};
	for (const [k, v] of Object.entries(group)) {
		if (typeof v === 'number') {
			out[k] = v;
		}
	}
	return out;
}

/**
 * Each remote's primary by its backend's socket path ('-' for none): what
 * stays the same across processes (backend ids are each process's own).
 */
export function remoteBackendPaths(snap: Snapshot): Map<string, string> {
	const paths = new Map(snap.backends.map((b) => [b.id, b.path]));
	return new Map(snap.remotes.map((r) => [r.ip, paths.get(r.backend) ?? '-']));
}

/** bbal's stats snapshot, read from its stats socket (what balstat --json prints). */
export async function statsSnapshot(socketPath: string, timeoutMs = SNAPSHOT_TIMEOUT_MS): Promise<Snapshot> {
	const text = await withDeadline(readSnapshot(socketPath), timeoutMs, `stats socket ${socketPath}: a snapshot`);
	return JSON.parse(text) as Snapshot;
}

/* ------------------------------------------------------------------ */
/* A running bbal                                                      */
/* ------------------------------------------------------------------ */

/* One pino line as parsed from bbal's stdout. */
export interface LogRecord {
	level?: number;
	msg?: string;
	[key: string]: unknown;
}

export interface BbalOptions {
	dir: string;
	port: number;
	args?: string[];
	env?: NodeJS.ProcessEnv;
	/** Told when bbal exits without being stopped (the chaos fleet records it). */
	onUnexpectedExit?: (child: Child) => void;
}

export interface Bbal {
	readonly proc: Child['proc'];
	/* Every JSON object bbal has printed on stdout, in order. */
	readonly logs: LogRecord[];
	/* Everything on stdout, JSON or not. */
	stdout(): string;
	stderr(): string;
	/*
	 * The first log record at index `since` or later that satisfies pred.
	 * Pass `bbal.logs.length` taken before an action to see only what the
	 * action caused.  Rejects on timeout or if bbal exits first.
	 */
	waitForLog(pred: (rec: LogRecord) => boolean, timeoutMs?: number,
		since?: number): Promise<LogRecord>;
	/* Signal bbal, SIGKILL it after 3 s, resolve with how it exited. */
	stop(signal?: NodeJS.Signals): Promise<ExitStatus>;
	/* Resolves with how bbal exited, by itself or not (stdout read to the end); never rejects. */
	readonly exit: Promise<ExitStatus>;
}

/* The stats socket startBbal gives a bbal serving `dir`. */
export function statsSocketFor(dir: string): string {
	return `${dir}.stats.sock`;
}

class BbalChild implements Bbal {
	readonly logs: LogRecord[] = [];
	private out = '';
	private partial = '';
	private readonly changes = new Changes();

	constructor(private readonly child: Child, private readonly argv: string[]) {
		child.proc.stdout?.on('data', this.stdoutOnData);
		/* The exit is awaited by waitForLog: by then stdout has been read to the end. */
		void child.exit.then(() => this.changes.changed());
	}

	get proc(): Child['proc'] {
		return this.child.proc;
	}

	get exit(): Promise<ExitStatus> {
		return this.child.exit;
	}

	stdout(): string {
		return this.out;
	}

	stderr(): string {
		return this.child.stderr;
	}

	async waitForLog(pred: (rec: LogRecord) => boolean, timeoutMs = 5000, since = 0): Promise<LogRecord> {
		let next = since;
		let found: LogRecord | null = null;
		await this.changes.until(() => {
			for (; next < this.logs.length; next++) {
				if (pred(this.logs[next])) {
					found = this.logs[next];
					return true;
				}
			}
			if (this.child.status !== null) {
				throw new Error(`bbal exited (${JSON.stringify(this.child.status)}) before the awaited log line\n` +
					this.describe());
			}
			return false;
		}, timeoutMs, 'a matching log line', () => this.describe());
		return found as unknown as LogRecord;
	}

	stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<ExitStatus> {
		return this.child.stop(signal);
	}

	private describe(): string {
		return `bbal ${this.argv.slice(1).join(' ')}\nstderr: ${this.child.stderr}\nstdout: ${this.out}`;
	}

	private readonly stdoutOnData = (s: string): void => {
		this.out += s;
		const lines = (this.partial + s).split('\n');
		this.partial = lines.pop() ?? '';
		for (const line of lines) {
			let rec: unknown;
			try {
				rec = JSON.parse(line);
			} catch {
				continue;
			}
			if (rec !== null && typeof rec === 'object' && !Array.isArray(rec)) {
				this.logs.push(rec as LogRecord);
				this.changes.changed();
			}
		}
	};
}

/** bbal on 127.0.0.1:port in front of opts.dir, once it logs "listening"; stopped by t's teardown. */
export async function startBbal(t: Teardowns, opts: BbalOptions): Promise<Bbal> {
	const extra = opts.args ?? [];
	const hasStats = extra.some((a) => a === '-S' || a.startsWith('--stats-socket'));
	const argv = [bbalBin, '-b', '127.0.0.1', '-p', String(opts.port),
		'-s', opts.dir, '-l', 'debug',
		...(hasStats ? [] : ['-S', statsSocketFor(opts.dir)]), ...extra];
	const child = startChild('bbal', process.execPath, argv, {
		env: childEnv(opts.env), onUnexpectedExit: opts.onUnexpectedExit,
	});
	const bbal = new BbalChild(child, argv);
	t.teardown(async () => { await bbal.stop('SIGTERM'); });
	await bbal.waitForLog((rec) => rec.msg === 'listening', START_TIMEOUT_MS)
		.catch((err: Error) => {
			child.proc.kill('SIGKILL');
			throw new Error(`bbal did not start: ${err.message}`);
		});
	return bbal;
}

/* ------------------------------------------------------------------ */
/* Commands that end                                                   */
/* ------------------------------------------------------------------ */

export interface RunResult {
	code: number | null;
	signal: NodeJS.Signals | null;
	stdout: string;
	stderr: string;
}

/* Run `node script args` to completion; reject if it cannot start or is still running after 10 s. */
async function runToEnd(script: string, args: string[], env?: NodeJS.ProcessEnv): Promise<RunResult> {
	const name = `${path.basename(script, '.js')} ${args.join(' ')}`;
	const child = startChild(name, process.execPath, [script, ...args], { env: childEnv(env), expectExit: true });
	/* Only the deadline SIGKILLs it. */
	const { code, signal } = await child.waitExit(START_TIMEOUT_MS);
	if (signal === 'SIGKILL') {
		throw new Error(`${name} still running after ${START_TIMEOUT_MS} ms\nstderr: ${child.stderr}\nstdout: ${child.stdout}`);
	}
	if (code === null && signal === null) {
		throw new Error(`${name} could not be started: ${child.output}`);
	}
	return { code, signal, stdout: child.stdout, stderr: child.stderr };
}

/* Run the CLI to completion, for flag and startup-error tests. */
export function runBbal(args: string[], env?: NodeJS.ProcessEnv): Promise<RunResult> {
	return runToEnd(bbalBin, args, env);
}

/* Run balstat to completion, as an operator would. */
export function runBalstat(args: string[]): Promise<RunResult> {
	return runToEnd(balstatBin, args);
}
