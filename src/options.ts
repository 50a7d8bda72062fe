/*
 * OPTIONS
 *
 * The command line of bbal, and nothing else: the flags (yargs), their help
 * text, and the checks that turn argv into an Options object every other
 * module can trust.  Nothing here opens a socket or reads the socket
 * directory; whether DIR exists is the process's business (main.ts), and
 * whether a port can be bound is found out by binding it.
 *
 * ONE LINE PER MISTAKE.  Every flag arrives as a string and is checked here,
 * so that a bad value is reported as one sentence naming the flag and what
 * it accepts ("--max-remotes "0" is not a whole number of at least 1"),
 * thrown as a UsageError, which main turns into one line on stderr and exit
 * status 2.  yargs's own complaints (an unknown flag, a missing value) are
 * rethrown as UsageErrors too, reworded to name the flag as it was typed.
 * A flag given with no value after it is one of those: it is refused, not
 * read as its default (`-p $PORT` with PORT unset must not listen on 53).
 * A flag given twice counts once, the last one winning, as in most Unix
 * tools.
 *
 * --allow.  Each --allow may hold several prefixes separated by commas, and
 * the flag may be repeated.  Spaces around a prefix and empty pieces (a
 * trailing comma, a doubled one) are forgiven, because such lists are often
 * pasted or built by a shell.  An --allow that names no prefix at all
 * (`--allow ""`, or an empty variable expanded into it) is refused: read as
 * "no list", it would let everyone query -- the opposite of what whoever
 * wrote the flag meant.
 *
 * Defaults live with the module that owns each limit (DEFAULT_MAX_REMOTES
 * in remotes.ts, the TCP limits in tcp_proxy.ts ...); this file only
 * repeats them in the help text.  --help and --version print and make
 * parseArgs return null, so the process exits 0 having started nothing.
 */

import { readFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import yargs from 'yargs';
import { DEFAULT_MAX_INFLIGHT_PER_BACKEND, DEFAULT_QUERY_TIMEOUT_MS } from './answers.js';
import { Acl, encodeQuestion, QTYPES } from './dns.js';
import {
	DEFAULT_HEALTH_FALL, DEFAULT_HEALTH_INTERVAL_SECS, DEFAULT_HEALTH_QUERY, DEFAULT_HEALTH_RISE, DEFAULT_HEALTH_TIMEOUT_MS,
} from './health.js';
import { LOG_LEVELS, type LogLevel } from './log.js';
import { DEFAULT_CACHE_MAX_TTL_SECS, MAX_CACHE_SIZE, MAX_CACHE_TTL_SECS, MAX_SERVE_STALE_SECS } from './packet_cache.js';
import { DEFAULT_MAX_REMOTES } from './remotes.js';
import { DEFAULT_STATS_SOCKET, isInside } from './stats.js';
import { DEFAULT_TAKEOVER_TIMEOUT_MS } from './takeover.js';
import {
	DEFAULT_MAX_TCP_CONNECTIONS, DEFAULT_MAX_TCP_MESSAGE_BYTES, DEFAULT_MAX_TCP_PER_REMOTE, DEFAULT_MAX_TCP_QUERIES_PER_CONN,
	DEFAULT_MAX_TCP_QUERIES_PER_REMOTE, DEFAULT_TCP_IDLE_TIMEOUT_SECS,
} from './tcp_listener.js';
import type { NoBackendAction, RateLimitAction } from './udp_proxy.js';

export interface Options {
	bind: string;
	port: number;
	/** -s/--sockets: the directory of backend sockets. */
	socketDir: string;
	logLevel: LogLevel;
	maxTcpConnections: number;
	/** --max-tcp-per-remote: TCP connections one source address may hold. */
	maxTcpPerRemote: number;
	/** --max-tcp-queries-per-conn: queries outstanding on one TCP connection before it is paused. */
	maxTcpQueriesPerConn: number;
	/** --max-tcp-queries-per-remote: the same over all of one source's connections. */
	maxTcpQueriesPerRemote: number;
	tcpIdleTimeoutSecs: number;
	statsSocket: string;
	/** -S was given: failing to open it is fatal rather than a warning. */
	statsSocketExplicit: boolean;
	/** --http HOST:PORT (or its old name, --metrics): the dashboard, /metrics and the snapshot; null when off. */
	http: { host: string; port: number } | null;
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
	/** --query-timeout: a UDP query with no answer after this is counted unanswered (health.ts). */
	queryTimeoutMs: number;
	maxInflightPerBackend: number;
	/** Off with --no-answer-accounting: no matching, every answer sent, no passive health. */
	answerAccounting: boolean;
	/** Probes (off with --no-health-check) and their settings. */
	healthCheck: boolean;
	healthIntervalSecs: number;
	healthTimeoutMs: number;
	healthRise: number;
	healthFall: number;
	healthQuery: { name: string; type: number };
	/** --takeover: take the sockets and remotes of the bbal running with the same -S (takeover.ts). */
	takeover: boolean;
	/** --reload: ask that bbal to start its successor (with these flags, --takeover added), and report. */
	reload: boolean;
	/** --takeover-timeout: how long either may take. */
	takeoverTimeoutMs: number;
	/** --cache-size: packet cache entries (packet_cache.ts); 0, the default, turns the cache off. */
	cacheSize: number;
	/** --cache-max-ttl: the longest an answer is served from the cache. */
	cacheMaxTtlSecs: number;
	/** --serve-stale: how long past its TTL an answer may be served when no backend can answer; 0: never. */
	serveStaleSecs: number;
}

/** A problem with how bbal was invoked: reported in one line, exit 2. */
export class UsageError extends Error {
	readonly code = 'EUSAGE';
}

/**
 * The directory of bbal's package.json, found by walking up from this
 * module: dist/src/ in a checkout or an installed package, src/ under a
 * TypeScript loader; null when there is none.  The dashboard's files are
 * read from under it (http_listener.ts).
 */
export function packageRoot(): string | null {
	let dir = path.dirname(fileURLToPath(import.meta.url));
	for (;;) {
		try {
			const pkg = JSON.parse(readFileSync(path.join(dir, 'package.json'), 'utf8')) as { name?: unknown; version?: unknown };
			if (pkg.name === 'bbal') {
				return dir;
			}
		} catch {
			/* No package.json here (or not a readable one): look further up. */
		}
		const up = path.dirname(dir);
		if (up === dir) {
			return null;
		}
		dir = up;
	}
}

/** The version in bbal's package.json, read when asked, not at import, so nothing pays for it otherwise. */
export function packageVersion(): string {
	const root = packageRoot();
	if (root === null) {
		return 'unknown';
	}
	const pkg = JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8')) as { version?: unknown };
	return typeof pkg.version === 'string' ? pkg.version : 'unknown';
}

/**
 * Parse and check argv (without the node and script words).  Returns null
 * when --help or --version was printed.  Throws UsageError.
 */
export function parseArgs(argv: string[], env: NodeJS.ProcessEnv = process.env): Options | null {
	const parser = yargs(argv)
		.scriptName('bbal')
		.usage('$0 -s DIR [-b ADDR] [-p PORT] [-l LEVEL]\n\n'
			+ 'DNS load balancer for node-mname backends listening on AF_UNIX sockets in DIR.')
		/* Ours below (printed by parseArgs, like --help), checked for strays like the rest. */
		.version(false)
		.option('bind', { alias: 'b', type: 'string', requiresArg: true, default: '0.0.0.0', describe: 'IPv4 address to listen on (UDP and TCP)' })
		.option('port', { alias: 'p', type: 'string', requiresArg: true, default: '53', describe: 'port to listen on' })
		.option('sockets', { alias: 's', type: 'string', requiresArg: true, describe: 'directory of backend sockets (required)' })
		.option('log-level', {
			alias: 'l', type: 'string', requiresArg: true, default: 'info',
			describe: 'trace|debug|info|warn|error|fatal (LOG_LEVEL in the environment overrides)',
		})
		.option('stats-socket', {
			alias: 'S', type: 'string', requiresArg: true,
			describe: `AF_UNIX socket serving the stats snapshot for balstat (default ${DEFAULT_STATS_SOCKET})`,
		})
		.option('http', {
			type: 'string', requiresArg: true,
			describe: 'serve the dashboard at http://HOST:PORT/, with /metrics and /snapshot.json (off by default)',
		})
		.option('metrics', { type: 'string', requiresArg: true, describe: '--http\'s old name' })
		.option('no-backend', {
			type: 'string', requiresArg: true, default: 'servfail', describe: 'when no backend is ok: servfail (answer at once) or drop',
		})
		.option('max-remotes', {
			type: 'string', requiresArg: true, default: String(DEFAULT_MAX_REMOTES),
			describe: 'remote peers held at most; the idlest are evicted beyond',
		})
		.option('max-qps-per-remote', {
			type: 'string', requiresArg: true, default: '0', describe: 'queries per second per remote address (0: no limit)',
		})
		.option('rate-limit-action', {
			type: 'string', requiresArg: true, default: 'refuse', describe: 'over --max-qps-per-remote: refuse (answer REFUSED) or drop',
		})
		.option('allow', {
			type: 'string', requiresArg: true, array: true, default: [],
			describe: 'CIDR[,CIDR...] allowed to query (repeatable; default: everyone)',
		})
		.option('max-tcp-message', {
			type: 'string', requiresArg: true, default: String(DEFAULT_MAX_TCP_MESSAGE_BYTES),
			describe: 'largest DNS message a TCP client may send, in bytes',
		})
		.option('max-tcp-connections', {
			type: 'string', requiresArg: true, default: String(DEFAULT_MAX_TCP_CONNECTIONS),
			describe: 'TCP connections open at once; at the cap the idlest is closed to make room',
		})
		.option('max-tcp-per-remote', {
			type: 'string', requiresArg: true, default: String(DEFAULT_MAX_TCP_PER_REMOTE),
			describe: 'TCP connections one source address may hold; more are closed at accept',
		})
		.option('max-tcp-queries-per-conn', {
			type: 'string', requiresArg: true, default: String(DEFAULT_MAX_TCP_QUERIES_PER_CONN),
			describe: 'queries a TCP connection may have unanswered; beyond, bbal stops reading it until answers return',
		})
		.option('max-tcp-queries-per-remote', {
			type: 'string', requiresArg: true, default: String(DEFAULT_MAX_TCP_QUERIES_PER_REMOTE),
			describe: 'the same, all of one source address\'s connections together',
		})
		.option('tcp-idle-timeout', {
			type: 'string', requiresArg: true, default: String(DEFAULT_TCP_IDLE_TIMEOUT_SECS),
			describe: 'seconds a TCP connection may pass no bytes before it is closed',
		})
		.option('no-watch', {
			type: 'boolean', default: false,
			describe: 'do not watch the socket directory; find changes by the 5-s rescan and SIGHUP only',
		})
		.option('query-timeout', {
			type: 'string', requiresArg: true, default: String(DEFAULT_QUERY_TIMEOUT_MS / 1000),
			describe: 'seconds after which a UDP query a backend has not answered counts as unanswered',
		})
		.option('max-inflight-per-backend', {
			type: 'string', requiresArg: true, default: String(DEFAULT_MAX_INFLIGHT_PER_BACKEND),
			describe: 'UDP queries followed per backend for answer accounting; beyond, the oldest is dropped',
		})
		.option('no-answer-accounting', {
			type: 'boolean', default: false,
			describe: 'do not match answers to queries: send every answer, judge backends by probes only',
		})
		.option('cache-size', {
			type: 'string', requiresArg: true, default: '0',
			describe: 'packet cache entries, per backend\'s answers (0: no cache)',
		})
		.option('cache-max-ttl', {
			type: 'string', requiresArg: true, default: String(DEFAULT_CACHE_MAX_TTL_SECS),
			describe: 'seconds at most an answer is served from the cache',
		})
		.option('serve-stale', {
			type: 'string', requiresArg: true, default: '0',
			describe: 'seconds past its TTL a cached answer may be served when no backend can answer (0: never)',
		})
		.option('no-health-check', { type: 'boolean', default: false, describe: 'send no health probes (answers still judge backends)' })
		.option('health-interval', {
			type: 'string', requiresArg: true, default: String(DEFAULT_HEALTH_INTERVAL_SECS), describe: 'seconds between health probes',
		})
		.option('health-timeout', {
			type: 'string', requiresArg: true, default: String(DEFAULT_HEALTH_TIMEOUT_MS / 1000),
			describe: 'seconds a health probe may take before it fails',
		})
		.option('health-query', {
			type: 'string', requiresArg: true, default: `${DEFAULT_HEALTH_QUERY}:A`,
			describe: 'NAME[:TYPE] the probes ask; SERVFAIL or no answer fails, any other rcode passes',
		})
		.option('health-rise', {
			type: 'string', requiresArg: true, default: String(DEFAULT_HEALTH_RISE), describe: 'passing probes in a row that make a sick backend healthy',
		})
		.option('health-fall', {
			type: 'string', requiresArg: true, default: String(DEFAULT_HEALTH_FALL), describe: 'failed probes in a row that make a healthy backend sick',
		})
		.option('takeover', {
			type: 'boolean', default: false,
			describe: 'take over the listening sockets and remotes of the bbal running with the same -S, then let it drain and exit',
		})
		.option('reload', {
			type: 'boolean', default: false,
			describe: 'ask the bbal running with the same -S to start a successor with these flags (--takeover); report how it went',
		})
		.option('takeover-timeout', {
			type: 'string', requiresArg: true, default: String(DEFAULT_TAKEOVER_TIMEOUT_MS / 1000),
			describe: 'seconds a takeover (or a reload) may take before it is given up, leaving the running bbal as it was',
		})
		.option('version', { type: 'boolean', describe: 'print the version and exit' })
		/* --no-backend is an option of its own, not "backend = false". */
		.parserConfiguration({ 'boolean-negation': false })
		.strict()
		.help()
		.alias('help', 'h')
		.wrap(null)
		.exitProcess(false)
		.fail((msg, err) => {
			throw new UsageError(plainYargsMessage(msg ?? err?.message ?? 'bad arguments', argv));
		});
	const args = parser.parseSync();
	if (args.help) {
		return null;
	}
	if (args.version === true) {
		process.stdout.write(`${packageVersion()}\n`);
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
	const socketDir = args.sockets === undefined ? '' : lastOf(args.sockets);
	if (socketDir === '') {
		throw new UsageError('the socket directory is required: -s DIR');
	}
	const level = env.LOG_LEVEL !== undefined && env.LOG_LEVEL !== '' ? env.LOG_LEVEL : lastOf(args['log-level']);
	if (!(LOG_LEVELS as readonly string[]).includes(level)) {
		throw new UsageError(`unknown log level "${level}"${env.LOG_LEVEL ? ' (from LOG_LEVEL)' : ''}: `
			+ `use one of ${LOG_LEVELS.join(', ')}`);
	}
	const maxTcpConnections = positiveInt(lastOf(args['max-tcp-connections']), '--max-tcp-connections');
	const maxTcpPerRemote = positiveInt(lastOf(args['max-tcp-per-remote']), '--max-tcp-per-remote');
	const maxTcpQueriesPerConn = positiveInt(lastOf(args['max-tcp-queries-per-conn']), '--max-tcp-queries-per-conn');
	const maxTcpQueriesPerRemote = positiveInt(lastOf(args['max-tcp-queries-per-remote']), '--max-tcp-queries-per-remote');
	const tcpIdleTimeoutSecs = positiveInt(lastOf(args['tcp-idle-timeout']), '--tcp-idle-timeout');
	const statsSocketExplicit = args['stats-socket'] !== undefined;
	const statsSocket = statsSocketExplicit ? lastOf(args['stats-socket'] as string | string[]) : DEFAULT_STATS_SOCKET;
	if (statsSocket === '') {
		throw new UsageError('the stats socket path (-S) is empty');
	}
	if (isInside(statsSocket, socketDir)) {
		throw new UsageError(`stats socket ${statsSocket} is inside the backend socket directory ${socketDir}: `
			+ 'bbal would take it for a backend');
	}
	const http = httpOption(args.http, args.metrics);
	const noBackend = oneOf(lastOf(args['no-backend']), ['servfail', 'drop'] as const, '--no-backend');
	const rateLimitAction = oneOf(lastOf(args['rate-limit-action']), ['refuse', 'drop'] as const, '--rate-limit-action');
	const maxRemotes = positiveInt(lastOf(args['max-remotes']), '--max-remotes');
	const qpsText = lastOf(args['max-qps-per-remote']);
	const maxQpsPerRemote = qpsText === '0' ? 0 : positiveInt(qpsText, '--max-qps-per-remote');
	const maxTcpMessageBytes = positiveInt(lastOf(args['max-tcp-message']), '--max-tcp-message');
	if (maxTcpMessageBytes < 12 || maxTcpMessageBytes > 65535) {
		throw new UsageError(`--max-tcp-message ${maxTcpMessageBytes} is outside 12-65535 (a DNS message's size)`);
	}
	const allow = parseAllow((args.allow as unknown[]).map(String));
	const queryTimeoutMs = secondsAsMs(lastOf(args['query-timeout']), '--query-timeout', 0.1, 60);
	const healthIntervalSecs = secondsAsMs(lastOf(args['health-interval']), '--health-interval', 0.5, 3600) / 1000;
	const healthTimeoutMs = secondsAsMs(lastOf(args['health-timeout']), '--health-timeout', 0.1, 60);
	const health = {
		queryTimeoutMs, maxInflightPerBackend: positiveInt(lastOf(args['max-inflight-per-backend']), '--max-inflight-per-backend'),
		answerAccounting: args['no-answer-accounting'] !== true, healthCheck: args['no-health-check'] !== true, healthIntervalSecs,
		healthTimeoutMs, healthRise: positiveInt(lastOf(args['health-rise']), '--health-rise'),
		healthFall: positiveInt(lastOf(args['health-fall']), '--health-fall'), healthQuery: parseHealthQuery(lastOf(args['health-query'])),
	};
	const cache = cacheOptions(lastOf(args['cache-size']), lastOf(args['cache-max-ttl']), lastOf(args['serve-stale']),
		health.answerAccounting);
	if (args.takeover === true && args.reload === true) {
		throw new UsageError('--takeover and --reload do not go together: --reload starts a bbal with --takeover');
	}
	const takeover = {
		takeover: args.takeover === true, reload: args.reload === true,
		takeoverTimeoutMs: secondsAsMs(lastOf(args['takeover-timeout']), '--takeover-timeout', 0.1, 600),
	};
	return {
		...health, ...takeover, ...cache,
		bind, port, socketDir, logLevel: level as LogLevel, maxTcpConnections, maxTcpPerRemote, maxTcpQueriesPerConn,
		maxTcpQueriesPerRemote, tcpIdleTimeoutSecs,
		statsSocket, statsSocketExplicit, http, noBackend, maxRemotes, maxQpsPerRemote, rateLimitAction, allow,
		maxTcpMessageBytes, watchDir: args['no-watch'] !== true,
	};
}

/*
 * yargs says "Not enough arguments following: p" and "Unknown arguments:
 * no-such-flag, noSuchFlag" (every spelling it tried); an operator wants
 * the flag as typed.
 */
function plainYargsMessage(msg: string, argv: string[]): string {
	const missing = /^Not enough arguments following: (\S+)$/.exec(msg);
	if (missing !== null) {
		return `${missing[1].length === 1 ? '-' : '--'}${missing[1]} needs a value`;
	}
	const unknown = /^Unknown arguments?: ([^,]+)/.exec(msg);
	if (unknown !== null) {
		const name = unknown[1];
		const typed = argv.find((a) => a.startsWith('-') && a.replace(/^-+/, '').split('=')[0] === name);
		return typed === undefined ? `unexpected argument: ${name}` : `unknown flag ${typed.split('=')[0]} (see --help)`;
	}
	return msg;
}

/*
 * Each --allow as given, once every prefix in it is known to parse (see the
 * header).  An --allow with nothing after it at all is yargs's to refuse.
 */
function parseAllow(entries: string[]): string[] {
	const empty = entries.find((e) => e.split(',').every((piece) => piece.trim() === ''));
	if (empty !== undefined) {
		throw new UsageError(`--allow "${empty}" names no prefix: give CIDR[,CIDR...], `
			+ 'or leave --allow out to allow everyone');
	}
	try {
		new Acl(entries);
	} catch (err) {
		throw new UsageError(`--allow: ${(err as Error).message}`);
	}
	return entries;
}

function oneOf<T extends string>(text: string, choices: readonly T[], flag: string): T {
	if (!(choices as readonly string[]).includes(text)) {
		throw new UsageError(`${flag} "${text}" is not one of ${choices.join(', ')}`);
	}
	return text as T;
}

/* --http, or --metrics, its old name; both only when they agree. */
function httpOption(http: string | string[] | undefined, metrics: string | string[] | undefined): Options['http'] {
	const h = http === undefined ? null : parseHostPort(lastOf(http), '--http');
	const m = metrics === undefined ? null : parseHostPort(lastOf(metrics), '--metrics');
	if (h !== null && m !== null && (h.host !== m.host || h.port !== m.port)) {
		throw new UsageError('--metrics is --http\'s old name: give one HOST:PORT (the dashboard serves /metrics too)');
	}
	return h ?? m;
}

function parseHostPort(text: string, flag: string): { host: string; port: number } {
	const m = /^(.+):(\d{1,5})$/.exec(text);
	const port = m === null ? NaN : Number(m[2]);
	if (m === null || !(port >= 1 && port <= 65535) || !(net.isIPv4(m[1]) || m[1] === 'localhost')) {
		throw new UsageError(`${flag} "${text}" is not HOST:PORT with an IPv4 HOST (e.g. 127.0.0.1:9153)`);
	}
	return { host: m[1], port };
}

/* A number of seconds (decimals allowed) from min to max, in ms. */
function secondsAsMs(text: string, flag: string, min: number, max: number): number {
	const secs = /^\d{1,6}(\.\d{1,3})?$/.test(text) ? Number(text) : NaN;
	if (!(secs >= min && secs <= max)) {
		throw new UsageError(`${flag} "${text}" is not a number of seconds from ${min} to ${max}`);
	}
	return Math.round(secs * 1000);
}

/* --health-query NAME[:TYPE]: a name a DNS message can carry, and a type of QTYPES (A when left out). */
function parseHealthQuery(text: string): { name: string; type: number } {
	const [name, typeText = 'A'] = text.split(':');
	const type = QTYPES[typeText.toUpperCase()];
	if (type === undefined || text.split(':').length > 2) {
		throw new UsageError(`--health-query "${text}": the type is not one of ${Object.keys(QTYPES).join(', ')}`);
	}
	if (!/^[\x21-\x7e]+$/.test(name) || encodeQuestion(name, type, 0) === null) {
		throw new UsageError(`--health-query "${text}": "${name}" is not a DNS name (labels of 1-63 bytes, 255 in all)`);
	}
	return { name, type };
}

function positiveInt(text: string, flag: string): number {
	if (!/^\d{1,9}$/.test(text) || Number(text) < 1) {
		throw new UsageError(`${flag} "${text}" is not a whole number of at least 1`);
	}
	return Number(text);
}

/* The cache's three flags, checked together. */
type CacheFlags = Pick<Options, 'cacheSize' | 'cacheMaxTtlSecs' | 'serveStaleSecs'>;
function cacheOptions(sizeText: string, maxTtlText: string, staleText: string, accounting: boolean): CacheFlags {
	const cacheSize = sizeText === '0' ? 0 : positiveInt(sizeText, '--cache-size');
	if (cacheSize > MAX_CACHE_SIZE) {
		throw new UsageError(`--cache-size ${cacheSize} is over ${MAX_CACHE_SIZE} entries`);
	}
	const cacheMaxTtlSecs = positiveInt(maxTtlText, '--cache-max-ttl');
	if (cacheMaxTtlSecs > MAX_CACHE_TTL_SECS) {
		throw new UsageError(`--cache-max-ttl ${cacheMaxTtlSecs} is over ${MAX_CACHE_TTL_SECS} seconds`);
	}
	const serveStaleSecs = staleText === '0' ? 0 : positiveInt(staleText, '--serve-stale');
	if (serveStaleSecs > MAX_SERVE_STALE_SECS) {
		throw new UsageError(`--serve-stale ${serveStaleSecs} is over ${MAX_SERVE_STALE_SECS} seconds`);
	}
	if (cacheSize > 0 && !accounting) {
		throw new UsageError('--cache-size needs answer accounting (drop --no-answer-accounting): '
			+ 'it is how an answer is matched to the query it is cached for');
	}
	if (serveStaleSecs > 0 && cacheSize === 0) {
		throw new UsageError('--serve-stale needs a cache: give --cache-size too');
	}
	return { cacheSize, cacheMaxTtlSecs, serveStaleSecs };
}

/* A flag given twice arrives as an array: the last one wins. */
function lastOf(v: string | string[]): string {
	return Array.isArray(v) ? String(v[v.length - 1]) : String(v);
}
