/*
 * CHILD PROCESSES OF THE TESTS AND HARNESSES
 *
 * The integration tests, the chaos harness (test/chaos/) and the benchmark
 * (bench/) all live by running other programs: bbal, mname backends, a fake
 * backend, the C stub, dnsdist, dnsperf, the TCP connection generator.  This
 * file is how any of them starts one, watches it and stops it, and how it
 * remembers to.  bbal.ts and fleet.ts build bbal and mname on it.
 *
 * A Child is one program started by name.  Its stdout and stderr are either
 * handed to file descriptors (dnsperf writes a line per query into a file)
 * or read and kept: the last 64 KiB of both together in `output`, which is
 * where a server's "ready" line and a generator's result are read from and
 * what an error message quotes, and the last 64 KiB of each alone.
 * waitOutput() waits for a line to appear there, rejecting if the child
 * exits first.  Its
 * `exit` promise resolves once the process has exited and its pipes are
 * drained (the 'close' event, not 'exit': a generator's last line is read
 * by then), and never rejects; a program that could not be started at all
 * (no such file) resolves it too, with no code and no signal.
 *
 * SERVERS AND PROGRAMS THAT END.  A child is started either as a server,
 * which must run until we stop it, or with `expectExit`, as a program that
 * ends by itself.  A server that exits on its own is a failure of the run:
 * `died` says so with its status and the tail of its output, the owner is
 * told at once (onUnexpectedExit), and `alive()` throws that message, so
 * a measurement that starts or ends with `alive()` never reports figures for
 * a path whose server had gone.
 *
 * STOPPING.  stop() sends SIGTERM (or the signal given), waits up to 3 s
 * and then sends SIGKILL, so a hung child never outlives its owner; a child
 * being stopped is not "died".  waitExit() is for programs that end by
 * themselves: it waits, and SIGKILLs one that runs past its deadline.
 *
 * THE REGISTRIES.  A ChildSet holds the children that are still running,
 * for an owner that must stop them all on any way out (the benchmark: the
 * end, an error, a signal, its watchdog): stopAll() stops them in parallel,
 * killAllNow() SIGKILLs them synchronously from a process 'exit' handler,
 * where nothing asynchronous runs any more.  Once `closing` is set, exits
 * are no longer reported: what an interrupted run's servers do while being
 * torn down is no news.  A Cleanup is the more general list of things to
 * undo (processes, directories, load drivers), run newest first; tap's Test
 * plays that part under `npm test`, and both satisfy Teardowns.
 *
 * THE ENVIRONMENT.  childEnv() is ours without tap's hooks: tap injects its
 * process-info hook through NODE_OPTIONS, which costs a quarter of a second
 * per start and writes bookkeeping for processes that are not tests.
 * Children run in projectRoot unless told otherwise.
 */

import { type ChildProcess, spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Changes } from './wait.js';

/* This file runs as dist/test/support/process.js; the repository is three levels up. */
export const projectRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

/* The environment for a child: ours plus extra, minus tap's hooks. */
export function childEnv(extra?: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
	const env: NodeJS.ProcessEnv = {};
	for (const [k, v] of Object.entries(process.env)) {
		if (k === 'TAP' || k.startsWith('TAP_') || k.startsWith('_TAPJS_')) {
			continue;
		}
		env[k] = v;
	}
	const opts = (env['NODE_OPTIONS'] ?? '').split(/\s+/)
		.filter((o) => o !== '' && !o.includes('@tapjs'));
	if (opts.length > 0) {
		env['NODE_OPTIONS'] = opts.join(' ');
	} else {
		delete env['NODE_OPTIONS'];
	}
	return { ...env, ...extra };
}

/** How much of a child's output is kept for its "ready" line, its result and error messages. */
const OUTPUT_TAIL_CHARS = 65_536;
/** How long a child has to exit after SIGTERM before it is SIGKILLed. */
export const STOP_GRACE_MS = 3000;

/** The part of tap's Test that harness code uses to register an undo; Cleanup outside tap. */
export interface Teardowns {
	teardown(fn: () => unknown): void;
}

/** Things to undo, run newest first (what was started last may depend on what came before). */
export class Cleanup implements Teardowns {
	private fns: Array<() => unknown> = [];

	/** `who` prefixes the line that reports a failed teardown. */
	constructor(private readonly who = 'cleanup') {}

	teardown(fn: () => unknown): void {
		this.fns.push(fn);
	}

	/** Run every teardown, newest first; errors are reported, not thrown, so the rest still run. */
	async run(): Promise<void> {
		const fns = this.fns.reverse();
		this.fns = [];
		for (const fn of fns) {
			try {
				await fn();
			} catch (err) {
				process.stderr.write(`${this.who} cleanup: ${String(err)}\n`);
			}
		}
	}
}

export interface ExitStatus {
	code: number | null;
	signal: NodeJS.Signals | null;
}

export interface ChildOptions {
	/** 'pipe' for a child that takes commands on stdin (the chaos fake backend). */
	stdin?: 'ignore' | 'pipe';
	/** 'pipe' (the default) keeps the output; a file descriptor sends it there instead. */
	stdout?: 'pipe' | 'inherit' | number;
	stderr?: 'pipe' | 'inherit' | number;
	/** Open an IPC channel as well (proc.send, 'message'): the mname fixture takes its commands there. */
	ipc?: boolean;
	env?: NodeJS.ProcessEnv;
	/** projectRoot unless given. */
	cwd?: string;
	/** A program that ends by itself; false (the default) for a server, whose own exit is a failure. */
	expectExit?: boolean;
	/** Told when a server exits without being stopped. */
	onUnexpectedExit?: (child: Child) => void;
}

export class Child {
	readonly proc: ChildProcess;
	/** The last 64 KiB of stdout and stderr together, as they came. */
	output = '';
	/** The last 64 KiB of stdout alone. */
	stdout = '';
	/** The last 64 KiB of stderr alone. */
	stderr = '';
	/** How it ended; null while it runs. */
	status: ExitStatus | null = null;
	/** Why a server is gone when nobody stopped it; null otherwise. */
	died: string | null = null;
	/** Resolves once the process has exited and its pipes are drained; never rejects. */
	readonly exit: Promise<ExitStatus>;
	/**
	 * Resolves once the process itself has exited, pipes or not: a program
	 * whose own children inherited its pipes (the demo) has them closed only
	 * when those children are gone too.  Never rejects.
	 */
	readonly processExit: Promise<ExitStatus>;
	private stopping = false;
	private readonly changes = new Changes();

	constructor(readonly name: string, cmd: string, args: string[], private readonly opts: ChildOptions = {}) {
		this.proc = spawn(cmd, args, {
			cwd: opts.cwd ?? projectRoot, env: opts.env ?? process.env,
			stdio: [opts.stdin ?? 'ignore', opts.stdout ?? 'pipe', opts.stderr ?? 'pipe', ...(opts.ipc ? ['ipc' as const] : [])],
		});
		this.proc.stdout?.setEncoding('utf8').on('data', this.stdoutOnData);
		this.proc.stderr?.setEncoding('utf8').on('data', this.stderrOnData);
		/* A command written after the child died fails with EPIPE: that is the exit's news, not an exception. */
		this.proc.stdin?.on('error', () => {});
		this.exit = new Promise((resolve) => {
			const done = (code: number | null, signal: NodeJS.Signals | null): void => {
				if (this.status !== null) {
					return;
				}
				this.status = { code, signal };
				if (!this.opts.expectExit && !this.stopping) {
					this.died = `${name} exited unexpectedly (code ${code}, signal ${signal}): ${this.output.slice(-2000)}`;
					this.opts.onUnexpectedExit?.(this);
				}
				resolve(this.status);
				this.changes.changed();
			};
			this.proc.on('close', done);
			this.proc.on('error', (err) => {
				this.output += `\n${err.message}`;
				done(null, null);
			});
		});
		this.processExit = new Promise((resolve) => {
			this.proc.once('exit', (code, signal) => resolve({ code, signal }));
			this.proc.once('error', () => resolve({ code: null, signal: null }));
		});
	}

	/** The process id; a child that could not be started has none, and asking is a bug. */
	get pid(): number {
		if (this.proc.pid === undefined) {
			throw new Error(`${this.name} has no pid: it did not start (${this.output.trim()})`);
		}
		return this.proc.pid;
	}

	get exited(): boolean {
		return this.status !== null;
	}

	/** Throws unless the child is still running: why it died, or that it was stopped. */
	alive(): void {
		if (this.status !== null) {
			throw new Error(this.died ?? `${this.name} is not running`);
		}
	}

	/** Send `signal`; SIGKILL after graceMs if the child is still there; resolve when it has exited. */
	stop(signal: NodeJS.Signals = 'SIGTERM', graceMs = STOP_GRACE_MS): Promise<ExitStatus> {
		if (this.status !== null) {
			return Promise.resolve(this.status);
		}
		this.stopping = true;
		this.proc.kill(signal);
		return signal === 'SIGKILL' ? this.exit : this.waitExit(graceMs);
	}

	/**
	 * Resolve once pred(output) holds (a "ready" line); reject if the child
	 * exits first or after timeoutMs, quoting the tail of its output.
	 */
	waitOutput(pred: (output: string) => boolean, timeoutMs: number, what: string): Promise<void> {
		return this.changes.until(() => {
			if (pred(this.output)) {
				return true;
			}
			if (this.status !== null) {
				throw new Error(`${this.name}: exited before ${what} (code ${this.status.code}, signal ` +
					`${this.status.signal}): ${this.output.slice(-2000)}`);
			}
			return false;
		}, timeoutMs, `${this.name}: ${what}`, () => this.output.slice(-2000));
	}

	/** For a program that ends by itself: wait for it, and SIGKILL it once it runs past timeoutMs. */
	async waitExit(timeoutMs: number): Promise<ExitStatus> {
		const timer = setTimeout(() => this.proc.kill('SIGKILL'), timeoutMs);
		try {
			return await this.exit;
		} finally {
			clearTimeout(timer);
		}
	}

	private readonly stdoutOnData = (s: string): void => {
		this.output = (this.output + s).slice(-OUTPUT_TAIL_CHARS);
		this.stdout = (this.stdout + s).slice(-OUTPUT_TAIL_CHARS);
		this.changes.changed();
	};

	private readonly stderrOnData = (s: string): void => {
		this.output = (this.output + s).slice(-OUTPUT_TAIL_CHARS);
		this.stderr = (this.stderr + s).slice(-OUTPUT_TAIL_CHARS);
		this.changes.changed();
	};
}

/** Start a program on its own, outside any set (its owner registers the stop). */
export function startChild(name: string, cmd: string, args: string[], opts: ChildOptions = {}): Child {
	return new Child(name, cmd, args, opts);
}

/*
 * The children of one owner that are still running.  A child leaves the set
 * when it exits, whoever ended it.
 */
export class ChildSet {
	private readonly live = new Set<Child>();
	/** Set once the owner tears everything down: exits are then expected, and not reported. */
	closing = false;

	/**
	 * `defaults` apply to every child started here (a working directory);
	 * onUnexpectedExit hears of every server that exits untold, until closing.
	 */
	constructor(private readonly defaults: { cwd?: string; onUnexpectedExit?: (child: Child) => void } = {}) {}

	get size(): number {
		return this.live.size;
	}

	start(name: string, cmd: string, args: string[], opts: ChildOptions = {}): Child {
		const child = new Child(name, cmd, args, {
			cwd: this.defaults.cwd, ...opts,
			onUnexpectedExit: (c) => {
				if (!this.closing) {
					this.defaults.onUnexpectedExit?.(c);
				}
			},
		});
		this.live.add(child);
		void child.exit.then(() => this.live.delete(child));
		return child;
	}

	/** Stop every running child (SIGTERM, then SIGKILL after the grace), all at once. */
	async stopAll(): Promise<void> {
		await Promise.all([...this.live].map((c) => c.stop()));
	}

	/** SIGKILL every running child now, synchronously: for a process 'exit' handler. */
	killAllNow(): void {
		for (const c of this.live) {
			try {
				c.proc.kill('SIGKILL');
			} catch {
				/* gone already */
			}
		}
	}
}
