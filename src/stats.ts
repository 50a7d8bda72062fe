/*
 * STATS
 *
 * The C balancer was debugged by walking its AVL trees with mdb.  bbal
 * offers the same view without a debugger: a read-only snapshot of every
 * backend, every remote and every armed timeout, served as one JSON document
 * on an AF_UNIX stats socket.  `balstat` (balstat.ts) connects, reads it and
 * prints tables; anything else that speaks JSON may read it too
 * (`nc -U /var/run/bbal/stats.sock`).
 *
 * The protocol is the simplest there is: connect, and bbal writes the
 * snapshot followed by a newline and closes.  Nothing is read from the
 * client, so the socket cannot be used to change anything.
 *
 * The field names below are an interface for operators' scripts: fields may
 * be added, never renamed.  Times are ISO strings; counters are the
 * original's, in camelCase (conn_start -> connStart, udp_drop -> udpDrop).
 *
 * THE SOCKET FILE.  The path must not be inside the backend directory (bbal
 * would take its own stats socket for a backend).  A file left behind by a
 * bbal that crashed is replaced; a socket that some live process still
 * listens on is not -- two balancers sharing a stats path is a mistake worth
 * stopping for.  On a clean exit the file is removed.
 */

import { lstat, unlink } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import type { Logger } from 'pino';
import type { Backends, BackendView } from './backends.js';
import type { Remote, Remotes } from './remotes.js';
import type { TcpListener, TcpListenerStats } from './tcp_proxy.js';
import type { TimeoutInfo, TimeoutWheel } from './timeouts.js';
import type { UdpProxy, UdpProxyStats } from './udp_proxy.js';

export const DEFAULT_STATS_SOCKET = '/var/run/bbal/stats.sock';

export interface BackendSnapshot {
	id: number;
	path: string;
	ok: boolean;
	removed: boolean;
	state: string;
	remotes: number;
	heartbeatOutstanding: boolean;
	reconnectDelay: number;
	stuck: boolean;
	lastHeartbeatRttMs: number | null;
	stats: { connStart: number; connError: number; udp: number; tcp: number; stuck: number; faults: number };
}

export interface RemoteSnapshot {
	ip: string;
	backend: number;
	backup: number;
	stats: { udp: number; udpDrop: number; tcp: number; tcpDrop: number; udpInvalid: number; rateLimited: number };
	firstSeen: string;
	lastSeen: string;
}

export interface Snapshot {
	version: 1;
	pid: number;
	time: string;
	startedAt: string;
	listen: { address: string; port: number };
	socketDir: string;
	backends: BackendSnapshot[];
	remotes: RemoteSnapshot[];
	remotesExpired: number;
	remotesEvicted: number;
	maxRemotes: number;
	udp: UdpProxyStats;
	tcp: TcpListenerStats & { open: number };
	timeouts: TimeoutInfo[];
}

/** What the snapshot is taken from: the balancer hands over its live objects (Balancer.statsSources). */
export interface StatsSources {
	backends: Backends;
	remotes: Remotes;
	udp: UdpProxy;
	tcp: TcpListener;
	wheel: TimeoutWheel;
	listen: { address: string; port: number };
	socketDir: string;
	startedAt: Date;
}

function backendSnapshot(be: BackendView): BackendSnapshot {
	return {
		id: be.id,
		path: be.path,
		ok: be.ok,
		removed: be.removed,
		state: be.state,
		remotes: be.remoteCount,
		heartbeatOutstanding: be.heartbeatOutstanding,
		reconnectDelay: be.reconnectDelaySecs,
		stuck: be.stuck,
		lastHeartbeatRttMs: be.lastHeartbeatRttMs < 0 ? null : Math.round(be.lastHeartbeatRttMs * 1000) / 1000,
		stats: { ...be.stats },
	};
}

function remoteSnapshot(rem: Remote): RemoteSnapshot {
	return {
		ip: rem.ip,
		backend: rem.primary?.id ?? 0,
		backup: rem.backup?.id ?? 0,
		stats: {
			udp: rem.udp, udpDrop: rem.udpDrop, tcp: rem.tcp, tcpDrop: rem.tcpDrop, udpInvalid: rem.udpInvalid,
			rateLimited: rem.rateLimited,
		},
		firstSeen: new Date(rem.firstSeenMs).toISOString(),
		lastSeen: new Date(rem.lastSeenMs).toISOString(),
	};
}

export function takeSnapshot(src: StatsSources): Snapshot {
	return {
		version: 1,
		pid: process.pid,
		time: new Date().toISOString(),
		startedAt: src.startedAt.toISOString(),
		listen: src.listen,
		socketDir: src.socketDir,
		backends: src.backends.views().map(backendSnapshot),
		remotes: src.remotes.list().map(remoteSnapshot),
		remotesExpired: src.remotes.expired,
		remotesEvicted: src.remotes.evicted,
		maxRemotes: src.remotes.maxRemotes,
		udp: { ...src.udp.stats },
		tcp: { ...src.tcp.stats, open: src.tcp.size },
		timeouts: src.wheel.list(),
	};
}

/** True when `file` would sit inside `dir` (or be `dir` itself). */
export function isInside(file: string, dir: string): boolean {
	const rel = path.relative(path.resolve(dir), path.resolve(file));
	return rel === '' || (!rel.startsWith('..') && !path.isAbsolute(rel));
}

/** Why a stats socket could not be opened; carries a stable code. */
export class StatsSocketError extends Error {
	constructor(readonly code: 'EINUSE' | 'ENOTSOCK' | 'ELISTEN', message: string) {
		super(message);
	}
}

export class StatsServer {
	private readonly server: net.Server;
	private listening = false;

	constructor(
		readonly socketPath: string,
		private readonly sources: StatsSources,
		private readonly log: Logger,
	) {
		this.server = net.createServer(this.serverOnConnection);
		this.server.on('error', (err) => this.log.error({ err }, 'stats socket error'));
	}

	private readonly serverOnConnection = (sock: net.Socket): void => {
		sock.on('error', () => {});
		let body: string;
		try {
			body = JSON.stringify(takeSnapshot(this.sources));
		} catch (err) {
			this.log.error({ err }, 'could not take stats snapshot');
			sock.destroy();
			return;
		}
		sock.end(`${body}\n`);
	};

	/** Bind, replacing a stale socket file; rejects with StatsSocketError. */
	async listen(): Promise<void> {
		const p = this.socketPath;
		const st = await lstat(p).catch(() => null);
		if (st !== null) {
			if (!st.isSocket()) {
				throw new StatsSocketError('ENOTSOCK', `stats socket path ${p} exists and is not a socket`);
			}
			if (await someoneListens(p)) {
				throw new StatsSocketError('EINUSE', `another process is listening on stats socket ${p}`);
			}
			await unlink(p);
			this.log.info({ stats_socket: p }, 'replaced stale stats socket');
		}
		await new Promise<void>((resolve, reject) => {
			const onError = (err: NodeJS.ErrnoException): void => {
				reject(new StatsSocketError('ELISTEN', `cannot listen on stats socket ${p}: ${err.code ?? err.message}`));
			};
			this.server.once('error', onError);
			this.server.listen(p, () => {
				this.server.removeListener('error', onError);
				resolve();
			});
		});
		this.listening = true;
	}

	async close(): Promise<void> {
		if (!this.listening) {
			return;
		}
		this.listening = false;
		/* Closing a listening AF_UNIX server removes its file in Node. */
		await new Promise<void>((resolve) => this.server.close(() => resolve()));
		await unlink(this.socketPath).catch(() => {});
	}
}

function someoneListens(p: string): Promise<boolean> {
	return new Promise((resolve) => {
		const s = net.createConnection({ path: p });
		s.on('connect', () => {
			s.destroy();
			resolve(true);
		});
		s.on('error', () => resolve(false));
	});
}
