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
 * ANSWERS AND HEALTH.  Each backend also carries what its answer book
 * (answers.ts) and its health (health.ts) hold, read and never changed:
 * `health` and `healthReason` (null when healthy), `answers` by rcode
 * class, `outstanding` (in flight now), `unanswered`, `late`,
 * `unsolicited` (its answers that matched no query), `droppedInflight` (in
 * flight when the table's cap pushed them out), `latencyMs` p50 and p99
 * over the last minute (a bucket's upper bound; null with no answer in
 * it), the last `probe` and `healthTransitions`.  The latencies are read
 * at the balancer's clock, the one the UDP proxy stamps queries with.
 * `failOpen` sits beside the backends it describes.  All of it is added to
 * version 1: fields may be added, and none was renamed.
 *
 * STREAMING.  With a hundred thousand remotes the document is 20 MB, and
 * building and serialising it in one go stalled every query for a quarter
 * of a second or more -- per reader.  So a connection is written in parts:
 * everything but the remotes is taken when the client connects (a few
 * hundred objects at most), then the remotes are read from the table
 * STATS_REMOTES_SLICE at a time, in address order, from a cursor (remotes.ts
 * slice()), each slice serialised and written only once the socket has
 * taken the previous one ('drain'), with a turn of the event loop between
 * slices.  A reader that does not read holds one slice in bbal and the
 * kernel's socket buffer, no more.  The bytes are those JSON.stringify
 * would give for the whole snapshot, so `balstat --json` and `nc -U`
 * readers see the same document; but it is no longer one instant: a remote
 * created behind the cursor while the list is being written is missed, one
 * that goes before the cursor reaches it is not listed, and the counters
 * are those of the moment the client connected.
 *
 * BOUNDS.  At most STATS_MAX_CONNECTIONS (8) connections are served at
 * once; another is closed at once, unanswered, and counted (overCap).  A
 * connection has STATS_CONNECTION_TIMEOUT_SECS (10) from accept to read the
 * whole document, on the timeout wheel (so up to a second more); then it is
 * destroyed and counted (timedOut).  A reader that never reads therefore
 * costs at most a slice and a socket buffer for ten seconds.  The counts
 * are in the snapshot itself (statsSocket) and in /metrics.
 *
 * SIGUSR2 logs a summary instead (logSnapshot()): everything but the
 * remotes, their count, and the first LOG_SNAPSHOT_MAX_REMOTES of them.
 *
 * A connection's lifecycle:
 *
 *   writing --write() refused more--> awaiting drain --'drain'--> writing
 *   writing --the last slice and the tail written--> ending --flushed--> closed
 *   any --deadline, error, the client gone, close()--> closed
 *
 * THE SOCKET FILE.  The path must not be inside the backend directory (bbal
 * would take its own stats socket for a backend).  A file left behind by a
 * bbal that crashed is replaced; a socket that some live process still
 * listens on is not -- two balancers sharing a stats path is a mistake worth
 * stopping for (bbal --takeover is the way to replace a running bbal).  On
 * a clean exit the file is removed, unless a takeover passed the socket on
 * (release()): the file is then the new process's, which goes on listening
 * on the very same socket, so balstat never finds it missing (fd_pass.ts).
 * Its mode is set to 0660 after listen, whatever the umask: connecting
 * needs write permission, so the owner and its group may read the
 * snapshot and no one else.
 */

import net from 'node:net';
import path from 'node:path';
import type { Logger } from 'pino';
import type { AnswerCounts } from './answers.js';
import type { Backends, BackendView } from './backends.js';
import { handleFd, UnixSocketFile } from './fd_pass.js';
import type { HealthMonitor, SickReason } from './health.js';
import type { PacketCacheStats } from './packet_cache.js';
import { GatedLog, ignoreError } from './log.js';
import { ADDR_END, type Remote, type Remotes } from './remotes.js';
import type { TcpListener, TcpListenerStats } from './tcp_listener.js';
import type { Timeout, TimeoutInfo, TimeoutWheel } from './timeouts.js';
import type { UdpProxy, UdpProxyStats } from './udp_proxy.js';

export const DEFAULT_STATS_SOCKET = '/var/run/bbal/stats.sock';
/** Stats connections served at once; more are closed at once. */
export const STATS_MAX_CONNECTIONS = 8;
/** A stats connection's time to read the whole snapshot, from accept. */
export const STATS_CONNECTION_TIMEOUT_SECS = 10;
/* Remotes serialised per write (about 200 KB of JSON). */
export const STATS_REMOTES_SLICE = 1_000;
/** Remotes listed in SIGUSR2's log line (all are counted). */
export const LOG_SNAPSHOT_MAX_REMOTES = 100;
/** The stats socket file's mode: owner and group. */
export const STATS_SOCKET_MODE = 0o660;

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
	stats: { connStart: number; connError: number; udp: number; tcp: number; stuck: number; faults: number; throttled: number };
	/* How it answers (answers.ts) and whether it is healthy (health.ts); see ANSWERS AND HEALTH. */
	health: 'healthy' | 'sick';
	healthReason: SickReason | null;
	answers: AnswerCounts;
	outstanding: number;
	unanswered: number;
	late: number;
	unsolicited: number;
	droppedInflight: number;
	/** Bytes held by its in-flight table's arrays (it grows by doubling up to --max-inflight-per-backend). */
	inflightTableBytes: number;
	latencyMs: { p50: number | null; p99: number | null };
	/** The last fault's reason and time; null before the first. */
	lastFault: { reason: string; at: string } | null;
	probe: { ok: boolean; rcode: number | null; ms: number | null; at: string } | null;
	healthTransitions: number;
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
	/** Every connected backend is sick, so none is treated as sick (health.ts, FAIL OPEN). */
	failOpen: boolean;
	remotes: RemoteSnapshot[];
	remotesExpired: number;
	remotesEvicted: number;
	maxRemotes: number;
	/** Backends forgotten after their socket file was gone a minute (backends.ts, FORGETTING). */
	backendsForgotten: number;
	udp: UdpProxyStats;
	tcp: TcpListenerStats & { open: number };
	timeouts: TimeoutInfo[];
	/** The stats socket's own counts; absent when bbal serves none. */
	statsSocket?: StatsSocketStats & { open: number };
	/** How this process began, when it took over from another bbal (takeover.ts); absent otherwise. */
	takeover?: TakeoverRecord;
	/** The packet cache's counts and settings (packet_cache.ts); absent without --cache-size. */
	cache?: CacheSnapshot;
}

/** The packet cache as the snapshot shows it. */
export type CacheSnapshot = PacketCacheStats & { maxEntries: number; maxTtlSecs: number; serveStaleSecs: number };

/** A takeover this bbal made: from whom, when, and how many remotes came with it. */
export interface TakeoverRecord {
	fromPid: number;
	fromVersion: string;
	at: string;
	remotes: number;
	/** Remotes made or reassigned while the table was being sent; null when the old bbal vanished first. */
	remotesChanged: number | null;
}

/** The stats socket's counters. */
export interface StatsSocketStats {
	/** Connections that were sent the whole snapshot. */
	served: number;
	/** Closed at once: STATS_MAX_CONNECTIONS were open. */
	overCap: number;
	/** Destroyed: not done after STATS_CONNECTION_TIMEOUT_SECS. */
	timedOut: number;
}

/* The snapshot around its remotes: what comes before them, and after. */
type SnapshotHead = Pick<Snapshot, 'version' | 'pid' | 'time' | 'startedAt' | 'listen' | 'socketDir' | 'backends' | 'failOpen'>;
type SnapshotTail = Omit<Snapshot, keyof SnapshotHead | 'remotes'>;

/** What the snapshot is taken from: the balancer hands over its live objects (Balancer.statsSources). */
export interface StatsSources {
	backends: Backends;
	remotes: Remotes;
	udp: UdpProxy;
	tcp: TcpListener;
	wheel: TimeoutWheel;
	/** Fail-open, read only (the monitor's state is health.ts's alone). */
	health: Readonly<Pick<HealthMonitor, 'failOpen'>>;
	listen: { address: string; port: number };
	socketDir: string;
	startedAt: Date;
	/** The stats socket, when one is served. */
	statsServer?: { readonly stats: StatsSocketStats; readonly size: number } | null;
	/** The takeover this process began with, if it did (asked each time: it is known only once started). */
	takeover?: () => TakeoverRecord | null;
}

/** A backend's last fault as operators read it (the snapshot, the dashboard's status). */
export function lastFaultJson(be: BackendView): { reason: string; at: string } | null {
	return be.lastFault === null ? null : { reason: be.lastFault.reason, at: new Date(be.lastFault.atMs).toISOString() };
}

/* Milliseconds to the microsecond, as the heartbeat's round trip is given. */
const roundMs = (ms: number): number => Math.round(ms * 1000) / 1000;

/* nowMs: the balancer's clock (the wheel's), the one the answer book's latencies are on. */
function backendSnapshot(be: BackendView, nowMs: number): BackendSnapshot {
	const h = be.health;
	const book = h.book;
	const p50 = book.latencyQuantileMs(0.5, nowMs);
	const p99 = book.latencyQuantileMs(0.99, nowMs);
	const probe = h.lastProbe;
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
		lastHeartbeatRttMs: be.lastHeartbeatRttMs < 0 ? null : roundMs(be.lastHeartbeatRttMs),
		stats: { ...be.stats },
		health: h.state.name,
		healthReason: h.state.name === 'sick' ? h.state.reason : null,
		answers: { ...book.answers },
		outstanding: book.outstanding,
		unanswered: book.unanswered,
		late: book.late,
		unsolicited: book.unsolicited,
		droppedInflight: book.dropped,
		inflightTableBytes: book.tableBytes,
		latencyMs: { p50: p50 === null ? null : roundMs(p50), p99: p99 === null ? null : roundMs(p99) },
		lastFault: lastFaultJson(be),
		probe: probe === null ? null : {
			ok: probe.ok, rcode: probe.rcode, ms: probe.ms === null ? null : roundMs(probe.ms),
			at: new Date(probe.at).toISOString(),
		},
		healthTransitions: h.transitions,
	};
}

/*
 * One remote as JSON.stringify(remoteSnapshot(rem)) would write it, without
 * the objects in between: the stats socket writes a hundred thousand of
 * these per reader.  Nothing here needs escaping (digits, dots, ISO times).
 */
function remoteJson(rem: Remote): string {
	return `{"ip":"${rem.ip}","backend":${rem.primary?.id ?? 0},"backup":${rem.backup?.id ?? 0},`
		+ `"stats":{"udp":${rem.udp},"udpDrop":${rem.udpDrop},"tcp":${rem.tcp},"tcpDrop":${rem.tcpDrop},`
		+ `"udpInvalid":${rem.udpInvalid},"rateLimited":${rem.rateLimited}},`
		+ `"firstSeen":"${new Date(rem.firstSeenMs).toISOString()}","lastSeen":"${new Date(rem.lastSeenMs).toISOString()}"}`;
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

/*
 * The fields in the order JSON.stringify writes them: the streamed document
 * is made of these two around the remotes, byte for byte what
 * takeSnapshot()'s would be.
 */
function snapshotHead(src: StatsSources): SnapshotHead {
	const nowMs = src.wheel.clock();
	return {
		version: 1,
		pid: process.pid,
		time: new Date().toISOString(),
		startedAt: src.startedAt.toISOString(),
		listen: src.listen,
		socketDir: src.socketDir,
		backends: src.backends.views().map((be) => backendSnapshot(be, nowMs)),
		failOpen: src.health.failOpen,
	};
}

function snapshotTail(src: StatsSources): SnapshotTail {
	const ss = src.statsServer;
	const takeover = src.takeover?.() ?? null;
	const cache = cacheSnapshot(src);
	return {
		remotesExpired: src.remotes.expired,
		remotesEvicted: src.remotes.evicted,
		maxRemotes: src.remotes.maxRemotes,
		backendsForgotten: src.backends.forgotten,
		udp: { ...src.udp.stats },
		tcp: { ...src.tcp.stats, open: src.tcp.size },
		timeouts: src.wheel.list(),
		statsSocket: ss ? { ...ss.stats, open: ss.size } : undefined,
		/* Only when there was one: the key must not exist otherwise, as JSON would drop it. */
		...(takeover === null ? {} : { takeover }),
		...(cache === null ? {} : { cache }),
	};
}

/** The packet cache's counts and settings, null without one. */
export function cacheSnapshot(src: StatsSources): CacheSnapshot | null {
	const front = src.udp.cache;
	if (!front) {
		return null;
	}
	const c = front.cache;
	return { ...c.stats, uncacheable: { ...c.stats.uncacheable }, maxEntries: c.maxEntries, maxTtlSecs: front.maxTtlSecs,
		serveStaleSecs: front.serveStaleSecs };
}

/** The whole snapshot at once (tests, small tables); the stats socket streams it instead. */
export function takeSnapshot(src: StatsSources): Snapshot {
	return { ...snapshotHead(src), remotes: src.remotes.list().map(remoteSnapshot), ...snapshotTail(src) };
}

/**
 * SIGUSR2's summary: the snapshot with the remotes counted (remoteCount)
 * and only the first LOG_SNAPSHOT_MAX_REMOTES listed, in address order.
 */
export function logSnapshot(src: StatsSources): Omit<Snapshot, 'remotes'> & { remoteCount: number; remotes: RemoteSnapshot[] } {
	const { remotes } = src.remotes.slice(0, LOG_SNAPSHOT_MAX_REMOTES);
	return {
		...snapshotHead(src), ...snapshotTail(src), remoteCount: src.remotes.size, remotes: remotes.map(remoteSnapshot),
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

export type SnapshotStreamState = 'writing' | 'awaiting drain' | 'ending' | 'closed';

/**
 * Where a snapshot is streamed: a stats socket connection, or an HTTP
 * response for /snapshot.json (http_listener.ts).  Both are Node writables.
 */
export interface SnapshotSink {
	write(chunk: string): boolean;
	end(chunk: string): unknown;
	destroy(): unknown;
	on(event: 'error' | 'drain' | 'close', listener: (err?: Error) => void): unknown;
	readonly writableFinished: boolean;
}

/** Who serves snapshot streams: what they are read from, and told of how each ended. */
export interface SnapshotHost {
	readonly sources: StatsSources;
	readonly log: Logger;
	/** A stream ran out of time (it is destroyed next). */
	timedOut(conn: SnapshotStream): void;
	/** A stream has closed; `served` when the whole snapshot was written. */
	released(conn: SnapshotStream, served: boolean): void;
}

/** One reader: the snapshot streamed to it (see STREAMING). */
export class SnapshotStream {
	private current: SnapshotStreamState = 'writing';
	/* Where the remotes list goes on, and how many were written. */
	private cursor = 0;
	private listed = 0;
	private tail = '';
	private readonly deadline: Timeout;

	constructor(
		private readonly server: SnapshotHost,
		private readonly sock: SnapshotSink,
		readonly id: number,
	) {
		sock.on('error', ignoreError);
		sock.on('drain', this.sockOnDrain);
		sock.on('close', this.sockOnClose);
		this.deadline = server.sources.wheel.create(`stats connection ${id} deadline`, this.deadlineDue);
	}

	/* Everything but the remotes now (this connection counted among the open ones), then the first slice. */
	start(): void {
		const src = this.server.sources;
		this.deadline.set(STATS_CONNECTION_TIMEOUT_SECS);
		try {
			this.tail = `],${JSON.stringify(snapshotTail(src)).slice(1)}\n`;
			this.sock.write(`${JSON.stringify(snapshotHead(src)).slice(0, -1)},"remotes":[`);
			this.pump();
		} catch (err) {
			/* A snapshot that cannot be taken ends its reader, whoever serves it; the close releases it. */
			this.server.log.error({ err }, 'could not take stats snapshot');
			this.sock.destroy();
		}
	}

	get state(): SnapshotStreamState {
		return this.current;
	}

	private advance(to: SnapshotStreamState): void {
		if (this.server.log.isLevelEnabled('trace')) {
			this.server.log.trace({ stats_conn: this.id, from: this.current, to, listed: this.listed }, 'stats connection state');
		}
		this.current = to;
	}

	/* One slice of the remotes; the next once the socket has taken it. */
	private readonly pump = (): void => {
		if (this.current !== 'writing') {
			return;
		}
		const { remotes, next } = this.server.sources.remotes.slice(this.cursor, STATS_REMOTES_SLICE);
		let chunk = '';
		for (const rem of remotes) {
			chunk += this.listed > 0 || chunk !== '' ? `,${remoteJson(rem)}` : remoteJson(rem);
		}
		this.listed += remotes.length;
		this.cursor = next;
		if (next === ADDR_END) {
			this.advance('ending');
			this.sock.end(chunk + this.tail);
		} else if (this.sock.write(chunk)) {
			/* Taken at once: still give the loop a turn before the next slice. */
			setImmediate(this.pump);
		} else {
			this.advance('awaiting drain');
		}
	};

	private readonly sockOnDrain = (): void => {
		if (this.current === 'awaiting drain') {
			this.advance('writing');
			this.pump();
		}
	};

	private readonly deadlineDue = (): void => {
		this.server.timedOut(this);
		this.sock.destroy();
	};

	private readonly sockOnClose = (): void => {
		const served = this.current === 'ending' && this.sock.writableFinished;
		this.deadline.clear();
		this.advance('closed');
		this.server.released(this, served);
	};

	/** Cut it (shutdown). */
	destroy(): void {
		this.sock.destroy();
	}
}

export class StatsServer implements SnapshotHost {
	readonly stats: StatsSocketStats = { served: 0, overCap: 0, timedOut: 0 };
	/** What the snapshot is read from, this server's own counts included. */
	readonly sources: StatsSources;
	private readonly server: net.Server;
	private listening = false;
	/* Whose the socket file is: ours, or another bbal's in a takeover (fd_pass.ts). */
	private readonly file: UnixSocketFile;
	private readonly connections = new Set<SnapshotStream>();
	private nextId = 1;
	private readonly overCapLog: GatedLog;
	private readonly timeoutLog: GatedLog;
	private whenEmpty: (() => void) | null = null;

	constructor(
		readonly socketPath: string,
		sources: StatsSources,
		readonly log: Logger,
	) {
		this.sources = { ...sources, statsServer: this };
		this.overCapLog = new GatedLog(sources.wheel, 'warn', 'too many stats connections (closing new connection)');
		this.timeoutLog = new GatedLog(sources.wheel, 'warn', 'stats connection too slow (closed)');
		this.file = new UnixSocketFile(socketPath, STATS_SOCKET_MODE, 'stats socket');
		this.server = net.createServer(this.serverOnConnection);
		this.server.on('error', (err) => this.log.error({ err }, 'stats socket error'));
	}

	/** Connections being served now. */
	get size(): number {
		return this.connections.size;
	}

	private readonly serverOnConnection = (sock: net.Socket): void => {
		if (!this.listening || this.connections.size >= STATS_MAX_CONNECTIONS) {
			sock.on('error', ignoreError);
			this.stats.overCap++;
			this.overCapLog.report(this.log, { max: STATS_MAX_CONNECTIONS });
			sock.destroy();
			return;
		}
		const conn = new SnapshotStream(this, sock, this.nextId++);
		this.connections.add(conn);
		conn.start();
	};

	/** A connection ran out of time (it is destroyed next). */
	timedOut(conn: SnapshotStream): void {
		this.stats.timedOut++;
		this.timeoutLog.report(this.log, { stats_conn: conn.id, state: conn.state, timeout_secs: STATS_CONNECTION_TIMEOUT_SECS });
	}

	/** A connection has closed. */
	released(conn: SnapshotStream, served: boolean): void {
		this.connections.delete(conn);
		if (served) {
			this.stats.served++;
		}
		if (this.connections.size === 0 && this.whenEmpty !== null) {
			this.whenEmpty();
		}
	}

	/**
	 * Bind, replacing a stale socket file, and set its mode; rejects with
	 * StatsSocketError.  Given `fd` (passed over by a takeover), listen on
	 * that instead: the file is already there, the old process's until now.
	 */
	async listen(fd?: number): Promise<void> {
		await this.file.listen(this.server, fd, (code, message) => new StatsSocketError(code, message),
			() => this.log.info({ stats_socket: this.socketPath }, 'replaced stale stats socket'));
		this.listening = true;
	}

	/** The listening socket's descriptor, for a takeover to pass on (-1 when not listening). */
	get fd(): number {
		return this.listening ? handleFd(this.server) : -1;
	}

	/** A takeover is through: the socket file is ours, to remove at a clean exit. */
	own(): void {
		this.file.own();
	}

	/**
	 * A takeover has passed the socket on: stop accepting and cut the
	 * connections being served, but leave the file, which is the new
	 * process's now.
	 */
	release(): Promise<void> {
		this.file.release();
		return this.close();
	}

	/** Stop listening and cut the connections being served; resolves once all are closed. */
	async close(): Promise<void> {
		if (!this.listening) {
			return;
		}
		this.listening = false;
		const drained = this.connections.size === 0
			? Promise.resolve()
			: new Promise<void>((resolve) => {
				this.whenEmpty = resolve;
			});
		/* Node removes the file of a socket it bound by path (fd_pass.ts); the rest is ours to remove. */
		const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
		for (const conn of this.connections) {
			conn.destroy();
		}
		await Promise.all([closed, drained]);
		await this.file.remove();
	}
}
