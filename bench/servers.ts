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
 * for 127.0.0.0/8, one backend, no security polling in public DNS, no
 * packet cache and no console; its health checks stay on, as in production.
 * It runs in the foreground (--supervised) and logs to stderr.
 */

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
	const child = session.children.start(name, process.execPath, args);
	await readyLine(child, `${name} to be ready`);
	return { child, statsSocket: null };
}

/** dnsdist on 127.0.0.1:port in front of the UDP stub on backendPort. */
export async function startDnsdist(session: BenchSession, port: number, backendPort: number): Promise<Server> {
	const conf = path.join(session.tmp, 'dnsdist.conf');
	writeFileSync(conf, [
		'-- written by bench/servers.ts: no cache, no console, loopback only',
		'setSecurityPollSuffix("")  -- no security-status lookups in DNS',
		`setLocal("127.0.0.1:${port}")`,
		'setACL({"127.0.0.0/8"})',
		`newServer({address="127.0.0.1:${backendPort}"})`,
		'',
	].join('\n'));
	const child = session.children.start('dnsdist', which('dnsdist') ?? 'dnsdist',
		['--supervised', '--disable-syslog', '-C', conf]);
	await probe('dnsdist', port);
	return { child, statsSocket: null };
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
