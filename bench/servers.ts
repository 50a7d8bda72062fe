/*
 * BENCH SERVERS
 *
 * Every server a configuration puts on a path, started and waited for until
 * it answers: the C stub (UDP, or the framed bbal backend protocol), a real
 * mname, dnsdist, and bbal itself.  Each is a Child of the session's
 * ChildSet (test/support/process.ts), so it is stopped on every way out, and
 * a server that exits before we stop it fails the run at the next
 * measurement rather than leaving a path that silently measures nothing.
 *
 * LOOPBACK ONLY.  Every server listens on 127.0.0.1, on a port the session
 * found free (BenchSession.uniquePort), or on an AF_UNIX socket in the
 * session's directory; every query goes to 127.0.0.1 from 127.0.0.0/8.
 *
 * READY MEANS ANSWERING.  A server counts as up when it answers a query:
 * a UDP query for www.example.com A from 127.0.0.1 (or a given source)
 * within 300 ms, tried every 50 ms for up to 15 s (udpQuery, the integration
 * tests' one-shot client).  The stub and mname say "ready" on stdout once
 * they listen, which is all a backend behind a balancer socket can show.
 * bbal is ready when its stats snapshot lists the expected number of
 * backends, every one of them ok, and (unless it is the 100,000-remotes bbal,
 * which must start with no remote at all) a probe query is answered.
 *
 * BBAL is run as operators run it: the bin/bbal launcher (which execs node
 * with bbal's V8 flags), `-b 127.0.0.1 -p P -s DIR -S DIR.stats.sock -l warn`,
 * with LOG_LEVEL removed from its environment so -l is what counts.  With
 * --profile, the instances that carry a profile name run bin/bbal.js under
 * node directly, with the launcher's V8 flags (LAUNCHER_V8_FLAGS) and
 * --cpu-prof, since node refuses --cpu-prof in NODE_OPTIONS; the profile is
 * written into bench/build/prof/ when that bbal exits.
 *
 * DNSDIST (1.7) is configured the least it takes: a local address, an ACL
 * for 127.0.0.0/8, its backends, no security polling in public DNS, no
 * packet cache and no console; its health checks stay on, as in production.
 * It runs in the foreground (--supervised) and logs to stderr.  The cache
 * scenario's dnsdist has two backends (its default policy, leastOutstanding,
 * spreads over them) and a packet cache on its default pool:
 * `newPacketCache(SIZE, {maxTTL=T, minTTL=0, temporaryFailureTTL=60,
 * staleTTL=60, dontAge=false})`, `getPool(""):setCache(pc)`; and its
 * webserver on a loopback port, with an API key, for one thing only: its
 * cache-hits and cache-misses counters (/jsonstat?command=stats), read
 * before and after each run like bbal's snapshot.
 *
 * BBAL'S FLAGS.  A flag this build of bbal does not have makes it exit 2
 * (yargs is strict), so a configuration that needs a flag that is still
 * being written asks bbalHasFlag() first: whether `bbal --help` lists it.
 */

import { spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { LAUNCHER_V8_FLAGS, statsSnapshot } from '../test/support/bbal.js';
import { udpQuery } from '../test/support/dns_client.js';
import { type Child, projectRoot } from '../test/support/process.js';
import { waitFor } from '../test/support/wait.js';
import type { BenchSession } from './session.js';
import { BENCH_DIR, BUILD_DIR, STUB_BIN, which } from './tools.js';

/* The launcher, as installed: it execs node with bbal's V8 flags. */
const BBAL_LAUNCHER = path.join(projectRoot, 'bin', 'bbal');
const MNAME_SERVER = path.join(BENCH_DIR, 'mname_server.cjs');
/** Where --profile's .cpuprofile files go. */
export const PROFILE_DIR = path.join(BUILD_DIR, 'prof');

/** How long a server may take to be ready, and how often readiness is tried. */
const READY_TIMEOUT_MS = 15_000;
const READY_POLL_MS = 100;
const PROBE_POLL_MS = 50;
const PROBE_TIMEOUT_MS = 300;

/** A server on a path: its process, and for bbal the stats socket read around each measured run. */
export interface Server {
	readonly child: Child;
	readonly statsSocket: string | null;
}

/** Wait until 127.0.0.1:port answers a query sent from `source`. */
export async function probe(what: string, port: number, source = '127.0.0.1'): Promise<void> {
	await waitFor(() => udpQuery({ port, source, name: 'www.example.com', type: 'A', timeoutMs: PROBE_TIMEOUT_MS })
		.then(() => true), READY_TIMEOUT_MS, PROBE_POLL_MS, `${what} to answer on 127.0.0.1:${port}`);
}

/* Wait for a server's "ready" line (or its death). */
async function readyLine(child: Child, what: string): Promise<void> {
	await child.waitOutput((out) => out.includes('ready'), READY_TIMEOUT_MS, what);
}

/** The stub answering UDP on 127.0.0.1:port (for the direct path and behind dnsdist); probe it yourself. */
export function startStubUdp(session: BenchSession, port: number): Server {
	return { child: session.children.start('stub udp', STUB_BIN, ['udp', String(port)]), statsSocket: null };
}

/** The stub speaking the bbal backend protocol on an AF_UNIX socket. */
export async function startStubFramed(session: BenchSession, socketPath: string): Promise<Server> {
	const child = session.children.start('stub framed', STUB_BIN, ['framed', socketPath]);
	await readyLine(child, `framed stub at ${socketPath}`);
	return { child, statsSocket: null };
}

export interface MnameListeners {
	/** The balancer socket bbal connects to. */
	balancer?: string;
	/** mname's own DNS ports on 127.0.0.1. */
	udp?: number;
	tcp?: number;
	/** Answer like Binder: 3-5 A records per name, TTL 30, shuffled (mname_server.cjs --binder). */
	binder?: boolean;
}

/** One real mname process with any of its three listeners. */
export async function startMname(session: BenchSession, name: string, listen: MnameListeners): Promise<Server> {
	const args = ['--no-warnings', MNAME_SERVER];
	if (listen.balancer !== undefined) {
		args.push('--balancer', listen.balancer);
	}
	if (listen.udp !== undefined) {
		args.push('--udp', String(listen.udp));
	}
	if (listen.tcp !== undefined) {
		args.push('--tcp', String(listen.tcp));
	}
	if (listen.binder === true) {
		args.push('--binder');
	}
	const child = session.children.start(name, process.execPath, args);
	await readyLine(child, `${name} to be ready`);
	return { child, statsSocket: null };
}

/** A dnsdist packet cache: its size in entries and its maxTTL, and the webserver port its counters are read from. */
export interface DnsdistCache {
	size: number;
	maxTtlSecs: number;
	webPort: number;
}

/* The webserver's API key (loopback only; a benchmark's dnsdist, not a secret). */
const DNSDIST_API_KEY = 'bbal-bench';

/** dnsdist on 127.0.0.1:port in front of the UDP servers on backendPorts, with a packet cache if given. */
export async function startDnsdist(session: BenchSession, port: number, backendPorts: number[], cache?: DnsdistCache):
Promise<Server> {
	const conf = path.join(session.tmp, `dnsdist-${port}.conf`);
	const lines = [
		`-- written by bench/servers.ts: ${cache ? 'a packet cache' : 'no cache'}, no console, loopback only`,
		'setSecurityPollSuffix("")  -- no security-status lookups in DNS',
		`setLocal("127.0.0.1:${port}")`,
		'setACL({"127.0.0.0/8"})',
		...backendPorts.map((p) => `newServer({address="127.0.0.1:${p}"})`),
	];
	if (cache) {
		lines.push(
			`pc = newPacketCache(${cache.size}, {maxTTL=${cache.maxTtlSecs}, minTTL=0, temporaryFailureTTL=60, staleTTL=60, `
			+ 'dontAge=false})',
			'getPool(""):setCache(pc)',
			'-- the webserver only for the cache counters (/jsonstat?command=stats)',
			`webserver("127.0.0.1:${cache.webPort}")`,
			`setWebserverConfig({password=hashPassword("${DNSDIST_API_KEY}"), apiKey=hashPassword("${DNSDIST_API_KEY}"), `
			+ 'acl="127.0.0.0/8"})',
		);
	}
	writeFileSync(conf, `${lines.join('\n')}\n`);
	const child = session.children.start(cache ? 'dnsdist (packet cache)' : 'dnsdist', which('dnsdist') ?? 'dnsdist',
		['--supervised', '--disable-syslog', '-C', conf]);
	await probe('dnsdist', port);
	return { child, statsSocket: null };
}

/** Cache hits and misses as a proxy counts them (bbal's snapshot, dnsdist's statistics). */
export interface CacheCounts {
	hits: number;
	misses: number;
}

/** A dnsdist's cache-hits and cache-misses, from its webserver on 127.0.0.1:webPort; null if it will not say. */
export async function dnsdistCacheCounts(webPort: number): Promise<CacheCounts | null> {
	try {
		const res = await fetch(`http://127.0.0.1:${webPort}/jsonstat?command=stats`, {
			headers: { 'X-API-Key': DNSDIST_API_KEY }, signal: AbortSignal.timeout(PROBE_TIMEOUT_MS * 10),
		});
		const j = await res.json() as Record<string, unknown>;
		const [hits, misses] = [j['cache-hits'], j['cache-misses']];
		return typeof hits === 'number' && typeof misses === 'number' ? { hits, misses } : null;
	} catch {
		return null;
	}
}

/** The cache counts in a bbal stats snapshot, if it has them: `cache: { hits, misses }` (read defensively). */
export function snapshotCacheCounts(snap: object): CacheCounts | null {
	const cache = (snap as { cache?: unknown }).cache;
	if (typeof cache !== 'object' || cache === null) {
		return null;
	}
	const { hits, misses } = cache as { hits?: unknown; misses?: unknown };
	return typeof hits === 'number' && typeof misses === 'number' ? { hits, misses } : null;
}

let bbalHelp: string | null = null;

/** Whether this build of bbal has a flag (its --help lists it). */
export function bbalHasFlag(flag: string): boolean {
	if (bbalHelp === null) {
		const r = spawnSync(process.execPath, [`${BBAL_LAUNCHER}.js`, '--help'], { encoding: 'utf8', cwd: projectRoot });
		bbalHelp = `${r.stdout ?? ''}${r.stderr ?? ''}`;
	}
	return new RegExp(`(^|\\s)${flag}(\\s|=|,|$)`, 'm').test(bbalHelp);
}

export interface BbalOptions {
	port: number;
	/** The backend socket directory. */
	dir: string;
	/** How many backends must be ok before it counts as ready. */
	backends: number;
	/** No probe query: the 100,000-remotes bbal must start without a remote. */
	noProbe?: boolean;
	/** Under --profile, run this one under the profiler, into this file name. */
	profileName?: string;
	stats?: string;
	/** More flags (the accounting-off comparison). */
	extraArgs?: string[];
}

/** bbal in front of `dir`, ready when every backend is ok and it answers. */
export async function startBbal(session: BenchSession, name: string, opts: BbalOptions, profile: boolean): Promise<Server> {
	const stats = opts.stats ?? `${opts.dir}.stats.sock`;
	const env = { ...process.env };
	delete env['LOG_LEVEL'];
	const args = ['-b', '127.0.0.1', '-p', String(opts.port), '-s', opts.dir, '-S', stats, '-l', 'warn', ...(opts.extraArgs ?? [])];
	let child: Child;
	if (profile && opts.profileName !== undefined) {
		mkdirSync(PROFILE_DIR, { recursive: true });
		child = session.children.start(name, process.execPath, [...LAUNCHER_V8_FLAGS, '--cpu-prof',
			`--cpu-prof-dir=${PROFILE_DIR}`, `--cpu-prof-name=${opts.profileName}`, `${BBAL_LAUNCHER}.js`, ...args], { env });
	} else {
		child = session.children.start(name, BBAL_LAUNCHER, args, { env });
	}
	await waitFor(async () => {
		child.alive();
		const snap = await statsSnapshot(stats);
		return snap.backends.length === opts.backends && snap.backends.every((b) => b.ok);
	}, READY_TIMEOUT_MS, READY_POLL_MS, `${name}: ${opts.backends} backend(s) ok`);
	if (opts.noProbe !== true) {
		await probe(name, opts.port);
	}
	return { child, statsSocket: stats };
}
