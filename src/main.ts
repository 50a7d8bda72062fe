/*
 * MAIN
 *
 * The bbal process: argv in, a running Balancer (balancer.ts), and an exit
 * status out.  This file owns what belongs to the process as a whole and to
 * nothing else: the command line (parsed by options.ts), the root logger,
 * the signals, the uncaught-exception policy and the exit statuses.  The
 * balancer itself never exits the process and never reads process.argv,
 * so a test can run one in-process.
 *
 * STARTUP ERRORS.  Anything wrong with the command line, or a listen address
 * that cannot be bound, ends the process with one line on stderr saying why
 * and a non-zero exit status -- never a stack trace, because the reader is
 * an operator looking at `svcs -x` or `systemctl status`, not a developer:
 *
 *   2  usage: a bad flag (UsageError), a missing or non-directory -s DIR
 *   1  the rest: a DNS port, stats socket or HTTP port that cannot be
 *      opened, found only when the balancer starts; a takeover that did
 *      not happen (TakeoverError), the running bbal serving on
 *
 * The same line is logged at fatal level first, so the log says why the
 * service stopped too.
 *
 * LOGS are bunyan-compatible JSON lines on stdout (log.ts), so `bbal ... |
 * bunyan` reads them and SMF/journald collect them as they are.  LOG_LEVEL
 * in the environment overrides -l, as in the original.
 *
 * SIGNALS are handled from the moment the balancer exists, before its
 * listeners open: a service manager may send a refresh or a stop while bbal
 * is still starting, and node's default for either is to die.
 *
 *   SIGTERM, SIGINT  close the balancer (TCP sessions drain for up to 3 s), exit 0
 *   SIGHUP           rescan the socket directory now (and the host's
 *                    addresses, when UDP listens on each: dgram, 0.0.0.0)
 *   SIGUSR2          write the stats snapshot to the log
 *
 * TAKEOVER (takeover.ts, handover.ts).  With --takeover this process
 * takes the sockets of the bbal running with the same -S before anything
 * else is started, and the balancer starts from them; once it has taken
 * over, systemd is told the new main pid (Type=notify; fd_pass.ts) and
 * only then is the old bbal let go.  A bbal that has handed over drains
 * and exits 0 (1 if its successor vanished first).  --reload runs none of
 * this: it asks the running bbal for a successor and reports.  Without
 * --takeover, READY=1 goes to systemd once bbal listens.
 *
 * An uncaught exception is a bug: it is logged at fatal level and the
 * process exits 1, leaving the restart to the service manager.  So does a
 * UDP socket that failed for good (udp_socket.ts): a process that lives on
 * without UDP would answer TCP only, and nothing would restart it.
 */

import { statSync } from 'node:fs';
import { Balancer, StartupError } from './balancer.js';
import { notifySystemd } from './fd_pass.js';
import { makeLogger } from './log.js';
import { type Options, packageVersion, parseArgs, UsageError } from './options.js';
import { StatsSocketError } from './stats.js';
import { reportStatus, requestReload, Takeover, TakeoverError } from './takeover.js';
import { controlSocketPath } from './takeover_wire.js';
import { createUdpTransport } from './udp_socket.js';

/** Exit statuses (see the header). */
export const EXIT_USAGE = 2;
export const EXIT_FAILURE = 1;

/** The exit status for an error that stops bbal before it runs. */
export function exitStatusFor(err: unknown): number {
	return err instanceof UsageError ? EXIT_USAGE : EXIT_FAILURE;
}

/** One line for an error from Balancer.start(). */
export function describeStartError(err: unknown, opts: Pick<Options, 'bind' | 'port'>): string {
	if (err instanceof StatsSocketError && err.code === 'EINUSE') {
		return `${err.message} (bbal --takeover replaces a running bbal)`;
	}
	if (err instanceof StatsSocketError || err instanceof StartupError || err instanceof TakeoverError) {
		return err.message;
	}
	const e = err as NodeJS.ErrnoException & { address?: unknown };
	/* Bound to 0.0.0.0, dgram binds each host address: name the one that failed. */
	const where = `${typeof e.address === 'string' ? e.address : opts.bind}:${opts.port}`;
	switch (e.code) {
	case 'EADDRINUSE':
		return `cannot listen on ${where}: address already in use`;
	case 'EACCES':
		return `cannot listen on ${where}: permission denied (ports below 1024 need privilege)`;
	case 'EADDRNOTAVAIL':
		return `cannot listen on ${where}: address not available on this host`;
	default:
		return `cannot listen on ${where}: ${e.message}`;
	}
}

function die(msg: string, status: number): never {
	process.stderr.write(`bbal: ${msg}\n`);
	process.exit(status);
}

/* -s DIR must be a directory now; it may be empty (backends come later). */
function checkSocketDir(dir: string): void {
	let st;
	try {
		st = statSync(dir);
	} catch {
		die(`socket directory ${dir} does not exist`, EXIT_USAGE);
	}
	if (!st.isDirectory()) {
		die(`socket directory ${dir} is not a directory`, EXIT_USAGE);
	}
}

export async function main(argv: string[]): Promise<void> {
	let opts: Options | null;
	try {
		opts = parseArgs(argv);
	} catch (err) {
		die(err instanceof Error ? err.message : String(err), exitStatusFor(err));
	}
	if (opts === null) {
		/* --help or --version, printed. */
		return;
	}
	if (opts.reload) {
		await reload(opts, argv);
		return;
	}
	checkSocketDir(opts.socketDir);

	const log = makeLogger(opts.logLevel);
	process.on('uncaughtException', (err) => {
		log.fatal({ err }, 'uncaught exception (exiting)');
		process.exit(EXIT_FAILURE);
	});

	let transport;
	try {
		transport = createUdpTransport();
	} catch (err) {
		die(`cannot make the UDP socket: ${(err as Error).message}`, EXIT_FAILURE);
	}
	/* The flags a takeover compares, its own left out. */
	const mine = { ...opts, takeover: undefined, reload: undefined, takeoverTimeoutMs: undefined };
	const settings = JSON.parse(JSON.stringify(mine)) as Record<string, unknown>;
	/* --takeover: the sockets first, before anything else is started (takeover.ts). */
	let takeover: Takeover | undefined;
	if (opts.takeover) {
		try {
			takeover = Takeover.connect({
				controlPath: controlSocketPath(opts.statsSocket), version: packageVersion(), bind: opts.bind, port: opts.port,
				transport: transport.kind, options: settings, timeoutMs: opts.takeoverTimeoutMs, log,
			});
		} catch (err) {
			const msg = describeStartError(err, opts);
			log.fatal({ err }, msg);
			reportStatus(false, msg);
			die(msg, EXIT_FAILURE);
		}
		log.info({ old_pid: takeover.old.pid, old_version: takeover.old.version, sockets: takeover.old.sockets.length },
			'takeover: sockets received');
	}

	const bal = new Balancer({
		...opts, log, transport, settings, statsSocketRequired: opts.statsSocketExplicit,
		onFatal: (err) => {
			log.fatal({ err }, 'UDP socket failed (exiting)');
			process.exit(EXIT_FAILURE);
		},
		onHandedOver: (successorGone) => {
			void bal.drain().then(() => {
				log.info({ successor_gone: successorGone }, 'exiting after handover');
				process.exit(successorGone ? EXIT_FAILURE : 0);
			});
		},
	});
	const stop = (signal: string): void => {
		log.info({ signal, tcp_open: bal.tcp.size }, 'shutting down');
		void bal.close().then(() => {
			log.info('exiting');
			process.exit(0);
		});
	};
	process.once('SIGTERM', stop);
	process.once('SIGINT', stop);
	process.on('SIGHUP', () => {
		log.info('SIGHUP: rescanning socket directory');
		void bal.backends.rescan();
		/* And the host's addresses, when UDP has a socket for each (dgram bound to 0.0.0.0). */
		void bal.udp.followAddresses();
	});
	process.on('SIGUSR2', () => bal.logSnapshot());

	try {
		await bal.start(takeover);
	} catch (err) {
		const msg = describeStartError(err, opts);
		log.fatal({ err }, msg);
		reportStatus(false, msg);
		await bal.close();
		die(msg, exitStatusFor(err));
	}
	await announce(log, takeover);
}

/*
 * Tell systemd (Type=notify) that bbal is ready; after a takeover, that
 * this process is the service's main process now -- and only once systemd
 * has taken that in may the old one exit (fd_pass.ts, SYSTEMD).  Then the
 * reload that started us, if any, is told, and the old bbal let go.
 */
async function announce(log: ReturnType<typeof makeLogger>, takeover: Takeover | undefined): Promise<void> {
	const text = takeover === undefined ? 'READY=1'
		: `MAINPID=${process.pid}\nREADY=1\nSTATUS=took over from pid ${takeover.old.pid}`;
	try {
		await notifySystemd(text, takeover !== undefined);
	} catch (err) {
		log.error({ err }, 'could not notify systemd');
	}
	if (takeover !== undefined) {
		reportStatus(true, `pid ${process.pid} took over from pid ${takeover.old.pid}`);
		takeover.finish();
	}
}

/* --reload: ask the running bbal for a successor with our flags (takeover.ts, RELOAD). */
async function reload(opts: Options, argv: string[]): Promise<void> {
	const args = argv.filter((a) => !/^--reload(=.*)?$/.test(a));
	try {
		const msg = await requestReload(controlSocketPath(opts.statsSocket), args, opts.takeoverTimeoutMs);
		process.stdout.write(`bbal: reloaded: ${msg}\n`);
	} catch (err) {
		die(`reload failed: ${(err as Error).message}`, EXIT_FAILURE);
	}
}
