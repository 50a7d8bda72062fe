/*
 * MAIN
 *
 * The bbal command: parse the command line, make the root logger, build the
 * subsystems and wire them together, then drive everything with one coarse
 * 1-second tick.  Nothing else in bbal reads flags, owns a process-wide
 * timer or handles signals.
 *
 * WIRING.  The arrows go one way: the proxies ask remotes for a backend, and
 * remotes ask the backends registry to select one; backends never call up.
 * Where a lower module must hand something upwards (an OUTBOUND_UDP frame
 * that the UDP socket must send) main passes it a callback.  The periodic
 * jobs that span modules live here too: every 15 seconds main asks the
 * registry for a rebalance plan and tells remotes to carry it out, which
 * breaks the backends <-> remotes circle of the C original.
 *
 * STARTUP ERRORS.  Anything wrong with the command line, or a listen address
 * that cannot be bound, ends the process with one line on stderr saying why
 * and a non-zero exit status (2 for usage, 1 for the rest) -- never a stack
 * trace, because the reader is an operator looking at `svcs -x` or
 * `systemctl status`, not a developer.
 *
 * LOGS are bunyan-compatible JSON lines on stdout (name, hostname, pid,
 * numeric level, msg, ISO time, v: 0), so `bbal ... | bunyan` reads them and
 * SMF/journald collect them as they are.  LOG_LEVEL in the environment
 * overrides -l, as in the original.
 *
 * SIGNALS.  SIGTERM and SIGINT close everything and exit 0; SIGHUP rescans
 * the socket directory at once.
 */

import { statSync } from 'node:fs';
import net from 'node:net';
import type { Logger } from 'pino';
import yargs from 'yargs';
import {
	Backends, REBALANCE_INTERVAL_SECS, RESCAN_INTERVAL_SECS,
} from './backends.js';
import { Acl } from './dns.js';
import { LOG_LEVELS, type LogLevel, makeLogger } from './log.js';
import { DEFAULT_MAX_REMOTES, Remotes, REMOTE_EXPIRY_CHECK_SECS } from './remotes.js';
import { type Clock, monotonicClock, TimeoutWheel } from './timeouts.js';
import type { Metrics } from './metrics.js';
import { DEFAULT_STATS_SOCKET, isInside, StatsServer, StatsSocketError, type StatsSources, takeSnapshot } from './stats.js';
import {
	DEFAULT_MAX_TCP_CONNECTIONS, DEFAULT_MAX_TCP_MESSAGE_BYTES, DEFAULT_TCP_IDLE_TIMEOUT_SECS, TcpListener,
} from './tcp_proxy.js';
import { type NoBackendAction, type RateLimitAction, UdpProxy } from './udp_proxy.js';

export const TICK_MS = 1000;
/* How long start() waits for the backends it finds to connect before it opens the DNS ports. */
export const STARTUP_BACKEND_WAIT_MS = 1000;

export interface Options {
	bind: string;
	port: number;
	sockets: string;
	logLevel: LogLevel;
	maxTcpConnections: number;
	tcpIdleTimeoutSecs: number;
	statsSocket: string;
	/** -S was given: failing to open it is fatal rather than a warning. */
	statsSocketExplicit: boolean;
	/** --metrics HOST:PORT, or null when off. */
	metrics: { host: string; port: number } | null;
	noBackend: NoBackendAction;
	maxRemotes: number;
	/** 0: no limit. */
	maxQpsPerRemote: number;
	rateLimitAction: RateLimitAction;
	/** The --allow prefixes as given (validated); empty allows everyone. */
	allow: string[];
	maxTcpMessageBytes: number;
	/** Watch the socket directory for changes (off with --no-watch). */
	watchDir: boolean;
}

/** A listener other than DNS could not start: reported in one line, exit 1. */
export class StartupError extends Error {
	readonly code = 'ESTARTUP';
}

/** A problem with how bbal was invoked: reported in one line, exit 2. */
export class UsageError extends Error {
	readonly code = 'EUSAGE';
}

/**
 * Parse and check argv (without the node and script words).  Returns null
 * when --help was printed.  Throws UsageError.
 */
export function parseArgs(argv: string[], env: NodeJS.ProcessEnv = process.env): Options | null {
	const parser = yargs(argv)
		.scriptName('bbal')
		.usage('$0 -s DIR [-b ADDR] [-p PORT] [-l LEVEL]\n\n'
			+ 'DNS load balancer for node-mname backends listening on AF_UNIX sockets in DIR.')
		.option('bind', { alias: 'b', type: 'string', default: '0.0.0.0', describe: 'IPv4 address to listen on (UDP and TCP)' })
		.option('port', { alias: 'p', type: 'string', default: '53', describe: 'port to listen on' })
		.option('sockets', { alias: 's', type: 'string', describe: 'directory of backend sockets (required)' })
		.option('log-level', {
			alias: 'l', type: 'string', default: 'info',
			describe: 'trace|debug|info|warn|error|fatal (LOG_LEVEL in the environment overrides)',
		})
		.option('stats-socket', {
			alias: 'S', type: 'string',
			describe: `AF_UNIX socket serving the stats snapshot for balstat (default ${DEFAULT_STATS_SOCKET})`,
		})
		.option('metrics', {
			type: 'string', describe: 'serve Prometheus metrics at http://HOST:PORT/metrics (off by default)',
		})
		.option('no-backend', {
			type: 'string', default: 'servfail', describe: 'when no backend is ok: servfail (answer at once) or drop',
		})
		.option('max-remotes', {
			type: 'string', default: String(DEFAULT_MAX_REMOTES),
			describe: 'remote peers held at most; the idlest are evicted beyond',
		})
		.option('max-qps-per-remote', {
			type: 'string', default: '0', describe: 'queries per second per remote address (0: no limit)',
		})
		.option('rate-limit-action', {
			type: 'string', default: 'refuse', describe: 'over --max-qps-per-remote: refuse (answer REFUSED) or drop',
		})
		.option('allow', {
			type: 'string', array: true, default: [],
			describe: 'CIDR[,CIDR...] allowed to query (repeatable; default: everyone)',
		})
		.option('max-tcp-message', {
			type: 'string', default: String(DEFAULT_MAX_TCP_MESSAGE_BYTES),
			describe: 'largest DNS message a TCP client may send, in bytes',
		})
		.option('max-tcp-connections', {
			type: 'string', default: String(DEFAULT_MAX_TCP_CONNECTIONS),
			describe: 'TCP connections open at once; more are closed at accept',
		})
		.option('tcp-idle-timeout', {
			type: 'string', default: String(DEFAULT_TCP_IDLE_TIMEOUT_SECS),
			describe: 'seconds a TCP connection may pass no bytes before it is closed',
		})
		.option('no-watch', {
			type: 'boolean', default: false,
			describe: 'do not watch the socket directory; find changes by the 5-s rescan and SIGHUP only',
		})
		/* --no-backend is an option of its own, not "backend = false". */
		.parserConfiguration({ 'boolean-negation': false })
		.strict()
		.help()
		.alias('help', 'h')
		.version(false)
		.wrap(null)
		.exitProcess(false)
		.fail((msg, err) => {
			throw new UsageError(msg ?? err?.message ?? 'bad arguments');
		});
	const args = parser.parseSync();
	if (args.help) {
		return null;
	}
	if (args._.length > 0) {
		throw new UsageError(`unexpected argument: ${String(args._[0])}`);
	}

	const bind = lastOf(args.bind);
	if (net.isIPv6(bind)) {
		throw new UsageError(`listen address ${bind} is IPv6: the backend protocol carries IPv4 addresses only`);
	}
	if (!net.isIPv4(bind)) {
		throw new UsageError(`listen address "${bind}" is not an IPv4 address`);
	}
	const portText = lastOf(args.port);
	const port = /^\d{1,5}$/.test(portText) ? Number(portText) : NaN;
	if (!(port >= 1 && port <= 65535)) {
		throw new UsageError(`port "${portText}" is not a number from 1 to 65535`);
	}
	if (args.sockets === undefined) {
		throw new UsageError('the socket directory is required: -s DIR');
	}
	const sockets = lastOf(args.sockets);
	if (sockets === '') {
		throw new UsageError('the socket directory is required: -s DIR');
	}
	const level = env.LOG_LEVEL !== undefined && env.LOG_LEVEL !== '' ? env.LOG_LEVEL : lastOf(args['log-level']);
	if (!(LOG_LEVELS as readonly string[]).includes(level)) {
		throw new UsageError(`unknown log level "${level}"${env.LOG_LEVEL ? ' (from LOG_LEVEL)' : ''}: `
			+ `use one of ${LOG_LEVELS.join(', ')}`);
	}
	const maxTcpConnections = positiveInt(lastOf(args['max-tcp-connections']), '--max-tcp-connections');
	const tcpIdleTimeoutSecs = positiveInt(lastOf(args['tcp-idle-timeout']), '--tcp-idle-timeout');
	const statsSocketExplicit = args['stats-socket'] !== undefined;
	const statsSocket = statsSocketExplicit ? lastOf(args['stats-socket'] as string | string[]) : DEFAULT_STATS_SOCKET;
	if (statsSocket === '') {
		throw new UsageError('the stats socket path (-S) is empty');
	}
	if (isInside(statsSocket, sockets)) {
		throw new UsageError(`stats socket ${statsSocket} is inside the backend socket directory ${sockets}: `
			+ 'bbal would take it for a backend');
	}
	const metrics = args.metrics === undefined ? null : parseHostPort(lastOf(args.metrics));
	const noBackend = oneOf(lastOf(args['no-backend']), ['servfail', 'drop'] as const, '--no-backend');
	const rateLimitAction = oneOf(lastOf(args['rate-limit-action']), ['refuse', 'drop'] as const, '--rate-limit-action');
	const maxRemotes = positiveInt(lastOf(args['max-remotes']), '--max-remotes');
	const qpsText = lastOf(args['max-qps-per-remote']);
	const maxQpsPerRemote = qpsText === '0' ? 0 : positiveInt(qpsText, '--max-qps-per-remote');
	const maxTcpMessageBytes = positiveInt(lastOf(args['max-tcp-message']), '--max-tcp-message');
	if (maxTcpMessageBytes < 12 || maxTcpMessageBytes > 65535) {
		throw new UsageError(`--max-tcp-message ${maxTcpMessageBytes} is outside 12-65535 (a DNS message's size)`);
	}
	const allow = (args.allow as string[]).map(String);
	try {
		new Acl(allow);
	} catch (err) {
		throw new UsageError(`--allow: ${(err as Error).message}`);
	}
	return {
		bind, port, sockets, logLevel: level as LogLevel, maxTcpConnections, tcpIdleTimeoutSecs,
		statsSocket, statsSocketExplicit, metrics, noBackend, maxRemotes, maxQpsPerRemote, rateLimitAction, allow,
		maxTcpMessageBytes, watchDir: args['no-watch'] !== true,
	};
}

function oneOf<T extends string>(text: string, choices: readonly T[], flag: string): T {
	if (!(choices as readonly string[]).includes(text)) {
		throw new UsageError(`${flag} "${text}" is not one of ${choices.join(', ')}`);
	}
	return text as T;
}

function parseHostPort(text: string): { host: string; port: number } {
	const m = /^(.+):(\d{1,5})$/.exec(text);
	const port = m === null ? NaN : Number(m[2]);
	if (m === null || !(port >= 1 && port <= 65535) || !(net.isIPv4(m[1]) || m[1] === 'localhost')) {
		throw new UsageError(`--metrics "${text}" is not HOST:PORT with an IPv4 HOST (e.g. 127.0.0.1:9153)`);
	}
	return { host: m[1], port };
}

function positiveInt(text: string, flag: string): number {
	if (!/^\d{1,9}$/.test(text) || Number(text) < 1) {
		throw new UsageError(`${flag} "${text}" is not a whole number of at least 1`);
	}
	return Number(text);
}

/* A flag given twice arrives as an array: the last one wins. */
function lastOf(v: string | string[]): string {
	return Array.isArray(v) ? String(v[v.length - 1]) : String(v);
}

/**
 * What a Balancer is built from: the parsed options (all but the address,
 * port and directory optional, defaulting as on the command line), a
 * logger, and optionally a clock.
 */
export type BalancerOptions = Pick<Options, 'bind' | 'port' | 'sockets'>
	& Partial<Omit<Options, 'bind' | 'port' | 'sockets' | 'logLevel' | 'statsSocket' | 'statsSocketExplicit'>>
	& {
		log: Logger;
		clock?: Clock;
		/** Serve the stats snapshot here (none when absent). */
		statsSocket?: string;
		/** When false, a stats socket that cannot be opened is only a warning. */
		statsSocketRequired?: boolean;
	};

/**
 * One running balancer: every subsystem, wired, plus the periodic jobs.
 * The tick is not started here (see start()), so a test may drive the
 * wheel by hand with its own clock.
 */
export class Balancer {
	readonly wheel: TimeoutWheel;
	readonly backends: Backends;
	readonly remotes: Remotes;
	readonly udp: UdpProxy;
	readonly tcp: TcpListener;
	readonly log: Logger;
	readonly startedAt = new Date();
	private stats: StatsServer | null = null;
	private metrics: Metrics | null = null;
	private tick: NodeJS.Timeout | null = null;
	private closed = false;

	constructor(private readonly opts: BalancerOptions) {
		this.log = opts.log;
		this.wheel = new TimeoutWheel(opts.clock ?? monotonicClock);
		this.backends = new Backends({
			socketDir: opts.sockets,
			log: this.log,
			wheel: this.wheel,
			onOutboundUdp: (addr, port, payload, be) => this.udp.sendOutbound(addr, port, payload, be),
			onHeartbeatRtt: (be, ms) => this.metrics?.observeHeartbeatRtt(be, ms),
		});
		this.remotes = new Remotes({
			log: this.log, backends: this.backends, wheel: this.wheel, maxRemotes: opts.maxRemotes,
		});
		const acl = new Acl(opts.allow ?? []);
		this.udp = new UdpProxy({
			remotes: this.remotes,
			log: this.log,
			wheel: this.wheel,
			acl,
			noBackend: opts.noBackend,
			maxQpsPerRemote: opts.maxQpsPerRemote,
			rateLimitAction: opts.rateLimitAction,
		});
		this.tcp = new TcpListener({
			remotes: this.remotes,
			backends: this.backends,
			wheel: this.wheel,
			log: this.log,
			maxConnections: opts.maxTcpConnections,
			idleTimeoutSecs: opts.tcpIdleTimeoutSecs,
			maxMessageBytes: opts.maxTcpMessageBytes,
			acl,
		});

		const rescan = this.wheel.create('rescan socket directory', () => {
			rescan.set(RESCAN_INTERVAL_SECS);
			void this.backends.rescan();
		});
		const rebalance = this.wheel.create('rebalance', () => {
			rebalance.set(REBALANCE_INTERVAL_SECS);
			this.rebalance();
		});
		const expire = this.wheel.create('expire remotes', () => {
			expire.set(REMOTE_EXPIRY_CHECK_SECS);
			this.remotes.expire();
		});
		rescan.set(RESCAN_INTERVAL_SECS);
		rebalance.set(REBALANCE_INTERVAL_SECS);
		expire.set(REMOTE_EXPIRY_CHECK_SECS);
	}

	/**
	 * Find the backends, give them a moment to connect, then bind the DNS
	 * listeners and start the tick.  Binding first would answer SERVFAIL to
	 * every query of the few hundred milliseconds the backends take to say
	 * hello -- on each restart, with healthy backends behind it; a resolver
	 * retries a query that got no answer, while a SERVFAIL may be cached.
	 */
	async start(): Promise<void> {
		await this.openStatsSocket();
		if (this.opts.metrics) {
			/* Loaded only when asked for: prom-client is ~10 MB of RSS. */
			const { Metrics } = await import('./metrics.js');
			const m = new Metrics(this.statsSources, this.log);
			const { host, port } = this.opts.metrics;
			await m.listen(host, port).catch((err: NodeJS.ErrnoException) => {
				throw new StartupError(`cannot serve metrics on ${host}:${port}: ${err.code ?? err.message}`);
			});
			this.metrics = m;
			this.log.info({ metrics: `http://${host}:${port}/metrics` }, 'metrics listening');
		}
		await this.backends.rescan();
		if (this.opts.watchDir !== false) {
			this.backends.watch();
		}
		await this.backendsSettled(STARTUP_BACKEND_WAIT_MS);
		if (this.closed) {
			/* Told to stop while the backends were connecting. */
			return;
		}
		await this.udp.listen(this.opts.bind, this.opts.port);
		await this.tcp.listen(this.opts.bind, this.opts.port);
		this.tick = setInterval(() => this.wheel.run(), TICK_MS);
		this.tick.unref();
		this.log.info({
			address: this.opts.bind, port: this.opts.port, socket_dir: this.opts.sockets,
			allow: this.opts.allow?.length ? this.opts.allow : 'everyone',
		}, 'listening');
	}

	/* Until no backend is still connecting (each is ok or has failed), or `ms`. */
	private async backendsSettled(ms: number): Promise<void> {
		const until = Date.now() + ms;
		while (Date.now() < until && this.backends.list().some((be) => be.state === 'connecting')) {
			await new Promise((resolve) => setTimeout(resolve, 5));
		}
	}

	/** The live objects a stats snapshot reads. */
	get statsSources(): StatsSources {
		return {
			backends: this.backends,
			remotes: this.remotes,
			udp: this.udp,
			tcp: this.tcp,
			wheel: this.wheel,
			listen: { address: this.opts.bind, port: this.opts.port },
			socketDir: this.opts.sockets,
			startedAt: this.startedAt,
		};
	}

	private async openStatsSocket(): Promise<void> {
		const p = this.opts.statsSocket;
		if (p === undefined) {
			return;
		}
		const server = new StatsServer(p, this.statsSources, this.log);
		try {
			await server.listen();
			this.stats = server;
			this.log.info({ stats_socket: p }, 'stats socket listening');
		} catch (err) {
			if (this.opts.statsSocketRequired !== false) {
				throw err;
			}
			this.log.warn({ stats_socket: p, reason: (err as Error).message },
				'no stats socket (balstat will not reach this bbal; use -S PATH)');
		}
	}

	/** SIGUSR2: the snapshot into the log (remotes listed up to 1,000). */
	logSnapshot(): void {
		const snap = takeSnapshot(this.statsSources);
		const { remotes, ...rest } = snap;
		this.log.info({
			snapshot: { ...rest, remoteCount: remotes.length, remotes: remotes.length <= 1000 ? remotes : undefined },
		}, 'stats snapshot');
	}

	rebalance(): void {
		const plan = this.backends.rebalancePlan();
		if (plan !== null) {
			const moved = this.remotes.rebalance(plan.backend, plan.count);
			this.log.info({ be_id: plan.backend.id, remotes: moved }, 'rebalanced remotes');
		}
	}

	async close(): Promise<void> {
		if (this.closed) {
			return;
		}
		this.closed = true;
		if (this.tick !== null) {
			clearInterval(this.tick);
			this.tick = null;
		}
		await Promise.all([this.udp.close(), this.tcp.close(), this.stats?.close(), this.metrics?.close()]);
		this.backends.close();
	}
}

function describeListenError(err: NodeJS.ErrnoException, opts: Options): string {
	const where = `${opts.bind}:${opts.port}`;
	switch (err.code) {
	case 'EADDRINUSE':
		return `cannot listen on ${where}: address already in use`;
	case 'EACCES':
		return `cannot listen on ${where}: permission denied (ports below 1024 need privilege)`;
	case 'EADDRNOTAVAIL':
		return `cannot listen on ${where}: address not available on this host`;
	default:
		return `cannot listen on ${where}: ${err.message}`;
	}
}

function die(msg: string, status: number): never {
	process.stderr.write(`bbal: ${msg}\n`);
	process.exit(status);
}

export async function main(argv: string[]): Promise<void> {
	let opts: Options | null;
	try {
		opts = parseArgs(argv);
	} catch (err) {
		die(err instanceof Error ? err.message : String(err), 2);
	}
	if (opts === null) {
		return;
	}
	let st;
	try {
		st = statSync(opts.sockets);
	} catch {
		die(`socket directory ${opts.sockets} does not exist`, 2);
	}
	if (!st.isDirectory()) {
		die(`socket directory ${opts.sockets} is not a directory`, 2);
	}

	const log = makeLogger(opts.logLevel);
	process.on('uncaughtException', (err) => {
		log.fatal({ err }, 'uncaught exception (exiting)');
		process.exit(1);
	});

	const bal = new Balancer({ ...opts, log, statsSocketRequired: opts.statsSocketExplicit });
	/*
	 * Signals are handled from the start: a service manager may send a
	 * refresh (SIGHUP) or a stop while the listeners are still opening, and
	 * node's default for either is to die.
	 */
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
	});
	process.on('SIGUSR2', () => bal.logSnapshot());

	try {
		await bal.start();
	} catch (err) {
		const msg = err instanceof StatsSocketError || err instanceof StartupError ? err.message
			: describeListenError(err as NodeJS.ErrnoException, opts);
		log.fatal({ err }, msg);
		await bal.close();
		die(msg, 1);
	}
}
