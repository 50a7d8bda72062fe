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
 *   1  the rest: a DNS port, stats socket or metrics port that cannot be
 *      opened, found only when the balancer starts
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
 * An uncaught exception is a bug: it is logged at fatal level and the
 * process exits 1, leaving the restart to the service manager.  So does a
 * UDP socket that failed for good (udp_socket.ts): a process that lives on
 * without UDP would answer TCP only, and nothing would restart it.
 */

import { statSync } from 'node:fs';
import { Balancer, StartupError } from './balancer.js';
import { makeLogger } from './log.js';
import { type Options, parseArgs, UsageError } from './options.js';
import { StatsSocketError } from './stats.js';

/** Exit statuses (see the header). */
export const EXIT_USAGE = 2;
export const EXIT_FAILURE = 1;

/** The exit status for an error that stops bbal before it runs. */
export function exitStatusFor(err: unknown): number {
	return err instanceof UsageError ? EXIT_USAGE : EXIT_FAILURE;
}

/** One line for an error from Balancer.start(). */
export function describeStartError(err: unknown, opts: Pick<Options, 'bind' | 'port'>): string {
	if (err instanceof StatsSocketError || err instanceof StartupError) {
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
	checkSocketDir(opts.socketDir);

	const log = makeLogger(opts.logLevel);
	process.on('uncaughtException', (err) => {
		log.fatal({ err }, 'uncaught exception (exiting)');
		process.exit(EXIT_FAILURE);
	});

	const bal = new Balancer({
		...opts, log, statsSocketRequired: opts.statsSocketExplicit,
		onFatal: (err) => {
			log.fatal({ err }, 'UDP socket failed (exiting)');
			process.exit(EXIT_FAILURE);
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
		await bal.start();
	} catch (err) {
		const msg = describeStartError(err, opts);
		log.fatal({ err }, msg);
		await bal.close();
		die(msg, exitStatusFor(err));
	}
}
