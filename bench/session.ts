/*
 * BENCH SESSION
 *
 * One run of the benchmark from the machine's point of view: the processes
 * it has started, the ports it has taken and the temporary directory it
 * works in, and the promise that the processes and the directory are gone
 * however the run ends.
 *
 * EVERY WAY OUT.  A run ends in one of five ways, and each stops every
 * process the run started (a ChildSet, test/support/process.ts: SIGTERM,
 * then SIGKILL after 3 s) and removes the directory:
 *
 *   the end        run.ts stops the servers itself and removes the directory;
 *   an error       run.ts prints it and calls abort('failed', 1);
 *   a signal       SIGINT, SIGTERM, SIGHUP: abort with 128 + the signal's
 *                  number, as a shell would report it;
 *   the watchdog   9 minutes after the start, abort('took over 9 minutes'):
 *                  a full run takes about 3.5, so a run this long is stuck
 *                  (a server that stopped answering, a dnsperf that never
 *                  ends) and is not going to produce figures;
 *   process exit   whatever is still running (a process.exit() elsewhere, an
 *                  abort's own exit) is SIGKILLed synchronously from the
 *                  'exit' handler, where nothing asynchronous runs any more,
 *                  and the directory is removed there too.
 *
 * Once an abort has begun, servers that exit are no longer reported as
 * having died (they are being stopped), and a second abort (a second Ctrl-C
 * while the first is stopping things) does nothing.
 *
 * THE DIRECTORY is made under os.tmpdir() as bbal-bench-XXXXXX and holds
 * the backends' AF_UNIX sockets, bbal's stats sockets, dnsdist's
 * configuration, the query file and dnsperf's per-run output.
 *
 * PORTS.  Every server listens on a port found free on 127.0.0.1 for both
 * UDP and TCP (freePort, the integration tests' helper).  Several are found
 * before the servers that use them start, and the kernel may offer a port
 * again once the socket that found it is closed, so the session never hands
 * out the same port twice.
 *
 * LOGGING.  Progress goes to stderr, one line each, prefixed "bench: ";
 * stdout carries only the report, so `npm run bench > report.md` works.
 */

import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { freePort } from '../test/support/ports.js';
import { ChildSet, projectRoot } from '../test/support/process.js';

/** A run that is still going after this long is stuck, and is stopped. */
export const WATCHDOG_MS = 9 * 60 * 1000;

/* The signals that end a run, and the status it then exits with (128 + the signal's number). */
const EXIT_SIGNALS: Array<[NodeJS.Signals, string, number]> = [
	['SIGINT', 'interrupted', 130], ['SIGTERM', 'terminated', 143], ['SIGHUP', 'hung up', 129],
];

/** One progress line on stderr. */
export function log(msg: string): void {
	process.stderr.write(`bench: ${msg}\n`);
}

export class BenchSession {
	/* Every port handed out so far. */
	private readonly ports = new Set<number>();
	/** Every process this run has started and that is still running; all run in the repository. */
	readonly children = new ChildSet({
		cwd: projectRoot,
		onUnexpectedExit: (c) => log(c.died ?? `${c.name} exited`),
	});
	private tmpDir: string | null = null;
	private aborting = false;
	private watchdog: NodeJS.Timeout | null = null;

	/** Install the signal and exit handlers and start the watchdog. */
	constructor() {
		for (const [signal, reason, code] of EXIT_SIGNALS) {
			process.on(signal, () => {
				void this.abort(reason, code);
			});
		}
		process.on('exit', () => {
			this.children.killAllNow();
			this.removeTmp();
		});
		this.watchdog = setTimeout(() => {
			void this.abort(`took over ${WATCHDOG_MS / 60_000} minutes`, 1);
		}, WATCHDOG_MS);
	}

	/** An abort has begun: whatever fails from now on is a consequence, not news. */
	get isAborting(): boolean {
		return this.aborting;
	}

	/** The run's temporary directory, made on first use. */
	get tmp(): string {
		this.tmpDir ??= mkdtempSync(path.join(os.tmpdir(), 'bbal-bench-'));
		return this.tmpDir;
	}

	/** A port free on 127.0.0.1 for both UDP and TCP, never the same twice in one run. */
	async uniquePort(): Promise<number> {
		for (;;) {
			const port = await freePort();
			if (!this.ports.has(port)) {
				this.ports.add(port);
				return port;
			}
		}
	}

	removeTmp(): void {
		if (this.tmpDir !== null) {
			rmSync(this.tmpDir, { recursive: true, force: true });
			this.tmpDir = null;
		}
	}

	/** The run ended by itself: no more watchdog. */
	finished(): void {
		if (this.watchdog !== null) {
			clearTimeout(this.watchdog);
			this.watchdog = null;
		}
	}

	/** Stop everything, remove the directory and exit with `code`; only the first call does anything. */
	async abort(reason: string, code: number): Promise<void> {
		if (this.aborting) {
			return;
		}
		this.aborting = true;
		this.children.closing = true;
		log(`${reason}: stopping everything`);
		await this.children.stopAll();
		this.removeTmp();
		process.exit(code);
	}
}
