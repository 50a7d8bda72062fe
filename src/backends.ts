/*
 * BACKENDS
 *
 * DNS service is provided by a pool of backend processes (node-mname
 * servers), each listening on its own AF_UNIX socket inside one directory.
 * A Backend object tracks one socket path for the life of the balancer: it
 * is created when the path is first seen and never destroyed, so remotes may
 * hold a reference to it while it comes and goes.  The Backends registry
 * indexes them by id (the order round-robin walks) and by path (the order
 * discovery checks).
 *
 * IDENTITY.  Binder names each socket after the high port its backend also
 * serves DNS on directly (5301, 5302, ...).  When the name is such an integer
 * in 5300-5399 and free, it becomes the backend id, so the logs of bbal and of
 * the backend speak of the same number.  Any other name gets one more than the
 * highest id in use.  Id 0 means "no backend".
 *
 * THE CONTROL SESSION.  Each backend has one standing connection that carries
 * the hello, the heartbeats and every UDP query and answer.  Its life:
 *
 *              found by a rescan (delay 0)
 *                        |
 *                        v
 *     +-----------> connecting ----- ENOENT on connect ----> removed
 *     |                  |                                      |
 *     |      SERVER_HELLO|   (any fault: EOF, error,            | socket file
 *     |                  v    bad frame, missed deadline)       | seen again
 *     |                 ok ---------------------+               |
 *     |      (heartbeat outstanding or not)     |               |
 *     |                                         v               |
 *     +--- delay expires --------------- waiting (delay) <------+
 *
 * Only an `ok` backend receives new traffic.  A fault is not an error of
 * bbal's: it is something the world did (a backend crashed, hung or broke the
 * protocol), so it is logged, counted and repaired by reconnecting, and the
 * backend's remotes use a backup meanwhile (remotes.ts).
 *
 * RECONNECT BACK-OFF.  A newly found socket is tried at once.  After that the
 * delay starts at 1 second and grows by 2 with each failure, up to 32: a
 * backend that is restarting comes back within a second or two, while one
 * that is gone for good costs one connect attempt every half minute rather
 * than a busy loop of log lines.  A hello puts the delay back to 1.  A
 * connect that fails with ENOENT means the socket file is gone: the backend is
 * marked removed and not retried until a rescan sees the file again; its
 * remotes choose a new primary rather than wait for it.  A rescan that no
 * longer finds the file does the same even while the control session is up,
 * since no new connection (no TCP session) could reach the backend.
 *
 * A socket file that a rescan finds re-created (another inode or change
 * time at the same path -- filesystems reuse a freed inode number at once:
 * the backend restarted and bound afresh) is a newly found socket: a
 * backend waiting out its back-off is tried at once.  Otherwise a backend
 * down for half a minute would wait up to 32 s more after it came back.
 * The registry also watches the directory (fs.watch, inotify or event
 * ports) and rescans as soon as anything in it changes, so a new or
 * restarted backend is connected within milliseconds rather than at the
 * next 5-second rescan, which stays as the safety net.
 *
 * HEARTBEATS.  Five seconds after the hello, and five seconds after each
 * reply, bbal sends CLIENT_HEARTBEAT; a reply must come within 15 seconds.
 * That catches a backend whose process lives but whose event loop is stuck,
 * which EOF never would.  The same Timeout serves both purposes: with no
 * heartbeat outstanding it means "send one", with one outstanding it means
 * "the deadline passed".
 *
 * WRITES.  Frames for a control session are not written one by one: they are
 * appended to a per-backend buffer and the registry flushes every backend
 * that has anything queued once per event-loop turn (setImmediate), so a turn
 * that reads thirty datagrams makes one write per backend, not thirty.  When
 * the socket refuses more (write() returned false and no 'drain' yet) the
 * session is "stuck": new UDP queries for this backend are dropped and
 * counted instead of queued.  Queueing would only trade a visible drop for
 * unbounded memory and answers that arrive after the client gave up.
 *
 * STUCK means more than CONTROL_HIGH_WATER_BYTES (256 KiB, about five
 * thousand queries) waiting inside bbal for one backend, on top of what the
 * kernel's socket buffer holds.  Node's default of 16 KiB would call a
 * healthy but momentarily slower backend stuck under a burst (a resolver
 * with 800 queries in flight is enough); 256 KiB is a few hundred
 * milliseconds of a busy backend's work, short of any resolver's timeout,
 * and bounds the memory a dead-but-connected backend can cost.  A session
 * that stays stuck for STUCK_FAULT_SECS (2) is faulted: a backend that has
 * not drained a quarter of a megabyte in two seconds has stopped, and its
 * remotes are better served by a backup now than after the 15-second
 * heartbeat deadline; closing the session also throws away the queries
 * queued for it, which nobody would want answered any more.
 *
 * The registry also owns round-robin selection of a backend for a new remote
 * and the rebalance decision; it never touches remotes itself (main asks for
 * the plan and hands it to remotes.ts), and it never touches the UDP socket:
 * OUTBOUND_UDP frames go to a callback that main provides.
 */

import assert from 'node:assert/strict';
import { type FSWatcher, watch } from 'node:fs';
import { lstat, readdir } from 'node:fs/promises';
import net from 'node:net';
import type { Logger } from 'pino';
import { AVLTree } from 'avl';
import {
	CLIENT_HEARTBEAT_FRAME, CLIENT_HELLO_FRAME, FRAME_INBOUND_UDP, FRAME_INBOUND_TCP_OK,
	FRAME_NAMES, FRAME_OUTBOUND_UDP, FRAME_SERVER_HEARTBEAT, FRAME_SERVER_HELLO, FrameReader,
	type FrameSink, UDP_FRAME_HEADER_BYTES, writeUdpFrame,
} from './protocol.js';
import { ignoreError, LogGate } from './log.js';
import type { Timeout, TimeoutWheel } from './timeouts.js';

export const HEARTBEAT_INTERVAL_SECS = 5;
export const HEARTBEAT_DEADLINE_SECS = 15;
export const CONNECT_DEADLINE_SECS = 30;
export const MIN_RECONNECT_DELAY_SECS = 1;
export const RECONNECT_DELAY_STEP_SECS = 2;
export const MAX_RECONNECT_DELAY_SECS = 32;
export const RESCAN_INTERVAL_SECS = 5;
/* After a change in the watched directory, rescan this much later: one rescan for a burst of changes
 * (a restarting backend unlinks its old socket and binds a new one). */
export const WATCH_RESCAN_DELAY_MS = 100;
export const REBALANCE_INTERVAL_SECS = 15;
/* sun_path holds 108 bytes on Linux, one of them the terminating NUL. */
export const MAX_SOCKET_PATH_BYTES = 107;
export const NAMED_ID_MIN = 5300;
export const NAMED_ID_MAX = 5399;

/* A session stuck this long is faulted (see STUCK). */
export const STUCK_FAULT_SECS = 2;
/* How much may wait inside bbal for one control session before it is stuck. */
export const CONTROL_HIGH_WATER_BYTES = 256 * 1024;
/*
 * Frames queued in one turn are packed into a staging buffer of this size,
 * one per backend for its whole life, and copied out at the flush into a
 * buffer of exactly their size.  Handing the staging buffer itself to the
 * socket would cost a fresh 16 KiB allocation every turn, and each one would
 * stay pinned while queued: a stopped backend's 256 KiB of queued frames,
 * written ~60 bytes a turn at light load, held some 70 MB of them.
 */
const OUT_CHUNK_BYTES = 16 * 1024;

/* A right-sized copy of buf's first len bytes (small ones come from Node's shared pool). */
function copyOut(buf: Buffer, len: number): Buffer {
	const out = Buffer.allocUnsafe(len);
	buf.copy(out, 0, 0, len);
	return out;
}

export type BackendState = 'connecting' | 'ok' | 'waiting' | 'removed' | 'closed';

export interface BackendStats {
	/** Connection attempts (control sessions). */
	connStart: number;
	/** Socket errors, connect failures included. */
	connError: number;
	/** UDP queries forwarded. */
	udp: number;
	/** TCP sessions established. */
	tcp: number;
	/** UDP queries dropped because the control session was stuck. */
	stuck: number;
	/** Times an established or connecting session was torn down. */
	faults: number;
}

/** Where OUTBOUND_UDP datagrams go; main wires it to the UDP proxy. */
export type OutboundUdpHandler = (addr: number, port: number, payload: Buffer, from: Backend) => void;

/**
 * How a connection to a backend is opened (control sessions and TCP
 * sessions alike); tests substitute their own.  Half-open is allowed so a
 * TCP session can pass a FIN through in each direction on its own.  A
 * control session passes a larger write high-water mark (see STUCK).
 */
export type Connector = (path: string, writableHighWaterMark?: number) => net.Socket;

export const connectUnix: Connector = (path, writableHighWaterMark) =>
	/* net.Socket passes stream options through; @types/node omits them here. */
	net.createConnection({ path, allowHalfOpen: true, writableHighWaterMark } as net.NetConnectOpts);

export class Backend implements FrameSink {
	state: BackendState = 'waiting';
	heartbeatOutstanding = false;
	reconnectDelaySecs = 0;
	/* The socket file's identity (inode and change time) when a rescan last saw it; '' before. */
	private fileId = '';
	/** Remotes whose primary this is (kept by remotes.ts). */
	remotes = 0;
	/** Round trip of the last answered heartbeat, or -1 before the first. */
	lastHeartbeatRttMs = -1;
	readonly stats: BackendStats = { connStart: 0, connError: 0, udp: 0, tcp: 0, stuck: 0, faults: 0 };
	readonly log: Logger;

	private socket: net.Socket | null = null;
	private reader: FrameReader | null = null;
	private stuck = false;
	private heartbeatSentAt = 0;
	/* Frames waiting for this turn's flush: full chunks, then the staging buffer's first outLen bytes. */
	private outChunks: Buffer[] = [];
	private outBuf: Buffer | null = null;
	private outLen = 0;
	queuedForFlush = false;

	private readonly connectTimeout: Timeout;
	private readonly reconnectTimeout: Timeout;
	private readonly heartbeatTimeout: Timeout;
	private readonly stuckTimeout: Timeout;

	constructor(
		private readonly registry: Backends,
		readonly id: number,
		readonly path: string,
		parentLog: Logger,
	) {
		this.log = parentLog.child({ be_id: id, be_path: path });
		const wheel = registry.wheel;
		this.connectTimeout = wheel.create(`backend ${id} connect deadline`, () => {
			this.fault('timed out connecting to backend');
		});
		this.reconnectTimeout = wheel.create(`backend ${id} reconnect`, () => this.connect());
		this.heartbeatTimeout = wheel.create(`backend ${id} heartbeat`, () => this.heartbeatDue());
		this.stuckTimeout = wheel.create(`backend ${id} stuck deadline`, () => {
			this.fault('session stuck: the backend stopped reading', { stuck_secs: STUCK_FAULT_SECS });
		});
	}

	get ok(): boolean {
		return this.state === 'ok';
	}

	get removed(): boolean {
		return this.state === 'removed';
	}

	/** True while the session refuses writes and UDP for it is dropped. */
	get isStuck(): boolean {
		return this.stuck;
	}

	/**
	 * Forward one UDP query.  False means it was dropped (the session is
	 * stuck) and counted here; the caller counts the remote's drop.  Only an
	 * ok backend is ever handed traffic.
	 */
	sendUdp(addr: number, port: number, msg: Buffer): boolean {
		assert(this.state === 'ok', 'UDP sent to a backend that is not ok');
		if (this.stuck) {
			this.stats.stuck++;
			return false;
		}
		const off = this.reserve(UDP_FRAME_HEADER_BYTES + msg.length);
		this.outLen = writeUdpFrame(this.outBuf as Buffer, off, FRAME_INBOUND_UDP, addr, port, msg);
		this.stats.udp++;
		return true;
	}

	/* Room for n more bytes in the open chunk; returns where they go. */
	private reserve(n: number): number {
		if (this.outBuf === null) {
			this.outBuf = Buffer.allocUnsafeSlow(Math.max(OUT_CHUNK_BYTES, n));
		} else if (this.outLen + n > this.outBuf.length) {
			if (this.outLen > 0) {
				this.outChunks.push(copyOut(this.outBuf, this.outLen));
				this.outLen = 0;
			}
			if (n > this.outBuf.length) {
				this.outBuf = Buffer.allocUnsafeSlow(n);
			}
		}
		if (!this.queuedForFlush) {
			this.registry.queueFlush(this);
		}
		return this.outLen;
	}

	private queueFrame(frame: Buffer): void {
		const off = this.reserve(frame.length);
		frame.copy(this.outBuf as Buffer, off);
		this.outLen = off + frame.length;
	}

	/** Write what this turn queued, in one write.  Called by the registry. */
	flush(): void {
		this.queuedForFlush = false;
		const sock = this.socket;
		if (sock === null || (this.outLen === 0 && this.outChunks.length === 0)) {
			this.discardQueued();
			return;
		}
		let ok = true;
		const last = this.outLen > 0 ? copyOut(this.outBuf as Buffer, this.outLen) : null;
		if (this.outChunks.length === 0) {
			ok = sock.write(last as Buffer);
		} else {
			/* Corked writes leave as one writev(). */
			sock.cork();
			for (const c of this.outChunks) {
				ok = sock.write(c);
			}
			if (last !== null) {
				ok = sock.write(last);
			}
			sock.uncork();
		}
		/* The copies now belong to the socket; the staging buffer is reused. */
		this.outLen = 0;
		this.outChunks = [];
		if (!ok && !this.stuck) {
			this.stuck = true;
			this.stuckTimeout.set(STUCK_FAULT_SECS);
			this.log.warn('backend session stuck (write queue full): dropping new UDP queries');
		}
	}

	private discardQueued(): void {
		this.outLen = 0;
		this.outChunks = [];
	}

	/* ---- lifecycle ---- */

	/** Open the control session now. */
	connect(): void {
		assert(this.state === 'waiting', `connect() while ${this.state}`);
		this.setState('connecting');
		this.stats.connStart++;
		this.log.debug('connecting to backend');
		const sock = this.registry.connector(this.path, CONTROL_HIGH_WATER_BYTES);
		this.socket = sock;
		this.reader = new FrameReader(this);
		sock.on('error', this.controlOnError);
		sock.on('connect', this.controlOnConnect);
		sock.on('data', this.controlOnData);
		sock.on('end', this.controlOnEnd);
		sock.on('close', this.controlOnClose);
		sock.on('drain', this.controlOnDrain);
		this.connectTimeout.set(CONNECT_DEADLINE_SECS);
	}

	/**
	 * Tear the session down and schedule a reconnect.  Does nothing unless a
	 * session exists (connecting or ok), so every path that notices trouble
	 * may call it without checking whether another path already did.
	 */
	fault(reason: string, extra?: Record<string, unknown>): void {
		if (this.state !== 'ok' && this.state !== 'connecting') {
			return;
		}
		this.stats.faults++;
		if (this.state === 'ok') {
			this.log.error({ reason, ...extra }, 'backend faulted (reset and reconnect)');
		} else {
			this.log.warn({ reason, ...extra, delay_secs: this.reconnectDelaySecs }, 'backend connect failed');
		}
		this.dropSession();
		this.scheduleReconnect();
	}

	/**
	 * A rescan found this path: a new backend, a removed one returning, or
	 * (another file identity than last time) one that bound its socket afresh.
	 */
	found(fileId = ''): void {
		const renewed = fileId !== '' && this.fileId !== '' && fileId !== this.fileId;
		if (fileId !== '') {
			this.fileId = fileId;
		}
		if (this.state === 'removed') {
			this.log.info('backend socket returned (connecting)');
		} else if (renewed && this.state === 'waiting') {
			this.log.info('backend socket re-created (connecting now)');
			this.reconnectTimeout.clear();
		} else if (this.state !== 'waiting' || this.reconnectTimeout.armed) {
			return;
		}
		this.setState('waiting');
		this.reconnectDelaySecs = 0;
		this.scheduleReconnect();
	}

	private scheduleReconnect(): void {
		this.setState('waiting');
		const delay = this.reconnectDelaySecs;
		this.reconnectDelaySecs = delay === 0 ? MIN_RECONNECT_DELAY_SECS
			: Math.min(delay + RECONNECT_DELAY_STEP_SECS, MAX_RECONNECT_DELAY_SECS);
		if (delay === 0) {
			this.connect();
		} else {
			this.log.debug({ delay_secs: delay }, 'reconnect scheduled');
			this.reconnectTimeout.set(delay);
		}
	}

	private markRemoved(): void {
		this.dropSession();
		this.reconnectTimeout.clear();
		this.setState('removed');
		this.log.info('backend socket removed');
	}

	/**
	 * The socket file is gone (a rescan no longer lists it, or a TCP
	 * session's connect got ENOENT) while the control session may still be
	 * up.  Nothing new can reach this backend -- every TCP session would
	 * fail -- so it is removed now, rather than when its process finally
	 * dies, and its remotes choose afresh.
	 */
	socketGone(): void {
		if (this.state === 'removed' || this.state === 'closed') {
			return;
		}
		if (this.state === 'ok') {
			this.stats.faults++;
		}
		this.log.warn({ state: this.state }, 'backend socket file is gone');
		this.markRemoved();
	}

	/* Forget the socket and everything tied to it; the state is the caller's. */
	private dropSession(): void {
		this.connectTimeout.clear();
		this.heartbeatTimeout.clear();
		this.stuckTimeout.clear();
		this.heartbeatOutstanding = false;
		this.stuck = false;
		this.discardQueued();
		this.reader = null;
		const sock = this.socket;
		if (sock !== null) {
			this.socket = null;
			sock.removeAllListeners();
			sock.on('error', ignoreError);
			sock.destroy();
		}
	}

	close(): void {
		if (this.state === 'closed') {
			return;
		}
		this.dropSession();
		this.reconnectTimeout.clear();
		this.setState('closed');
	}

	private setState(next: BackendState): void {
		if (this.state !== next) {
			this.log.trace({ from: this.state, to: next }, 'backend state');
			this.state = next;
		}
	}

	/* ---- heartbeats ---- */

	private heartbeatDue(): void {
		if (this.state !== 'ok') {
			return;
		}
		if (this.heartbeatOutstanding) {
			this.fault('no heartbeat from backend', { deadline_secs: HEARTBEAT_DEADLINE_SECS });
			return;
		}
		this.queueFrame(CLIENT_HEARTBEAT_FRAME);
		this.heartbeatOutstanding = true;
		this.heartbeatSentAt = performance.now();
		this.heartbeatTimeout.set(HEARTBEAT_DEADLINE_SECS);
	}

	/* ---- control socket events ---- */

	private readonly controlOnConnect = (): void => {
		this.log.debug('backend socket connected');
		(this.socket as net.Socket).write(CLIENT_HELLO_FRAME);
	};

	private readonly controlOnData = (chunk: Buffer): void => {
		(this.reader as FrameReader).feed(chunk);
	};

	private readonly controlOnEnd = (): void => {
		this.fault('backend socket EOF');
	};

	private readonly controlOnClose = (): void => {
		this.fault('backend socket closed');
	};

	private readonly controlOnDrain = (): void => {
		if (this.stuck) {
			this.stuck = false;
			this.stuckTimeout.clear();
			this.log.info('backend session writable again');
		}
	};

	private readonly controlOnError = (err: NodeJS.ErrnoException): void => {
		this.stats.connError++;
		if (err.code === 'ENOENT' && this.state === 'connecting') {
			this.markRemoved();
			return;
		}
		this.fault('backend socket error', { err });
	};

	/* ---- frames from the backend (FrameSink) ---- */

	onFrame(type: number, addr: number, port: number, payload: Buffer | null): boolean {
		if (this.state === 'connecting') {
			if (type !== FRAME_SERVER_HELLO) {
				this.fault('errant frame before hello', { frame_type: type });
				return false;
			}
			this.helloReceived();
			return true;
		}
		if (this.state !== 'ok') {
			return false;
		}
		switch (type) {
		case FRAME_OUTBOUND_UDP:
			this.registry.onOutboundUdp(addr, port, payload as Buffer, this);
			return true;
		case FRAME_SERVER_HEARTBEAT:
			if (!this.heartbeatOutstanding) {
				this.fault('unexpected heartbeat reply from backend');
				return false;
			}
			this.heartbeatOutstanding = false;
			this.lastHeartbeatRttMs = performance.now() - this.heartbeatSentAt;
			this.registry.onHeartbeatRtt?.(this, this.lastHeartbeatRttMs);
			this.heartbeatTimeout.set(HEARTBEAT_INTERVAL_SECS);
			return true;
		case FRAME_SERVER_HELLO:
			this.fault('duplicate hello from backend');
			return false;
		case FRAME_INBOUND_TCP_OK:
			this.fault('TCP session frame on the control session', { frame_type: type });
			return false;
		default:
			this.fault('invalid frame type', { frame_type: type, frame_name: FRAME_NAMES[type] });
			return false;
		}
	}

	onFrameError(code: 'unknown_type' | 'oversize', type: number, length: number): void {
		if (code === 'oversize') {
			this.fault('backend sent oversized UDP packet', { frame_type: type, len: length });
		} else {
			this.fault('invalid frame type', { frame_type: type });
		}
	}

	private helloReceived(): void {
		this.connectTimeout.clear();
		this.setState('ok');
		this.heartbeatOutstanding = false;
		this.reconnectDelaySecs = MIN_RECONNECT_DELAY_SECS;
		this.heartbeatTimeout.set(HEARTBEAT_INTERVAL_SECS);
		this.log.info('backend socket established');
	}
}

export interface BackendsOptions {
	dir: string;
	log: Logger;
	wheel: TimeoutWheel;
	onOutboundUdp: OutboundUdpHandler;
	/** Each answered heartbeat's round trip (for the metrics histogram). */
	onHeartbeatRtt?: (be: Backend, ms: number) => void;
	connector?: Connector;
}

export interface RebalancePlan {
	backend: Backend;
	count: number;
}

export class Backends {
	readonly wheel: TimeoutWheel;
	readonly connector: Connector;
	readonly onOutboundUdp: OutboundUdpHandler;
	readonly onHeartbeatRtt?: (be: Backend, ms: number) => void;
	private readonly dir: string;
	private readonly log: Logger;
	private readonly byId = new AVLTree<number, Backend>((a, b) => a - b, true);
	private readonly byPath = new AVLTree<string, Backend>((a, b) => (a < b ? -1 : a > b ? 1 : 0), true);
	private lastAssignedId = 0;
	private readonly noBackendGate: LogGate;
	/* Paths already reported as unusable, so each is logged once. */
	private readonly reportedPaths = new Set<string>();
	private flushQueue: Backend[] = [];
	private flushScheduled = false;
	private rescanning = false;
	private closed = false;
	private watcher: FSWatcher | null = null;
	private watchRescan: NodeJS.Timeout | null = null;

	constructor(opts: BackendsOptions) {
		this.dir = opts.dir.replace(/\/+$/, '') || '/';
		this.log = opts.log;
		this.wheel = opts.wheel;
		this.onOutboundUdp = opts.onOutboundUdp;
		this.onHeartbeatRtt = opts.onHeartbeatRtt;
		this.connector = opts.connector ?? connectUnix;
		this.noBackendGate = new LogGate(opts.wheel);
	}

	get size(): number {
		return this.byId.size;
	}

	/** Every backend in id order. */
	list(): Backend[] {
		return this.byId.values();
	}

	lookup(id: number): Backend | undefined {
		return this.byId.find(id)?.data;
	}

	lookupPath(path: string): Backend | undefined {
		return this.byPath.find(path)?.data;
	}

	/**
	 * Read the socket directory and start on every new or returning socket.
	 * Runs at start, every RESCAN_INTERVAL_SECS and on SIGHUP; a scan that
	 * is still reading when the next is due makes the next a no-op.
	 */
	async rescan(): Promise<void> {
		if (this.rescanning || this.closed) {
			return;
		}
		this.rescanning = true;
		try {
			let entries;
			try {
				entries = await readdir(this.dir, { withFileTypes: true });
			} catch (err) {
				if (this.noBackendGate.open() >= 0) {
					this.log.error({ err, socket_dir: this.dir }, 'error reading socket directory');
				}
				return;
			}
			if (this.closed) {
				return;
			}
			const names = entries.filter((de) => de.isSocket()).map((de) => de.name).sort();
			/* Inode and change time tell a socket bound afresh from the one bbal knew. */
			const ids = await Promise.all(names.map((name) => lstat(this.pathOf(name))
				.then((st) => `${st.ino}/${st.ctimeMs}`, () => '')));
			if (this.closed) {
				return;
			}
			const present = new Set<string>();
			names.forEach((name, i) => {
				present.add(this.foundPath(name, ids[i])?.path ?? '');
			});
			for (const be of this.list()) {
				if (!present.has(be.path)) {
					be.socketGone();
				}
			}
		} finally {
			this.rescanning = false;
		}
	}

	/**
	 * Watch the directory and rescan soon after anything in it changes
	 * (several events of one change make one rescan).  Best effort: where
	 * watching fails, the periodic rescan still finds everything.
	 */
	watch(): void {
		if (this.watcher !== null || this.closed) {
			return;
		}
		try {
			this.watcher = watch(this.dir, { persistent: false }, this.dirChanged);
			this.watcher.on('error', (err) => {
				this.log.warn({ err, socket_dir: this.dir }, 'stopped watching socket directory (rescanning every 5 s only)');
				this.watcher?.close();
			});
		} catch (err) {
			this.log.warn({ err, socket_dir: this.dir }, 'cannot watch socket directory (rescanning every 5 s only)');
		}
	}

	private readonly dirChanged = (): void => {
		if (this.watchRescan !== null || this.closed) {
			return;
		}
		this.watchRescan = setTimeout(() => {
			this.watchRescan = null;
			void this.rescan();
		}, WATCH_RESCAN_DELAY_MS);
	};

	private pathOf(name: string): string {
		return this.dir === '/' ? `/${name}` : `${this.dir}/${name}`;
	}

	/** A socket named `name` exists in the directory (with identity `fileId`, when known). */
	foundPath(name: string, fileId = ''): Backend | null {
		const path = this.pathOf(name);
		if (Buffer.byteLength(path) > MAX_SOCKET_PATH_BYTES) {
			if (!this.reportedPaths.has(path)) {
				this.reportedPaths.add(path);
				this.log.error({ socket_path: path, max_bytes: MAX_SOCKET_PATH_BYTES },
					'backend socket path is too long (skipped)');
			}
			return null;
		}
		let be = this.lookupPath(path);
		if (be === undefined) {
			be = new Backend(this, this.chooseId(name), path, this.log);
			this.byId.insert(be.id, be);
			this.byPath.insert(path, be);
			be.log.info('new backend');
		}
		be.found(fileId);
		return be;
	}

	private chooseId(name: string): number {
		if (/^\d{4}$/.test(name)) {
			const n = Number(name);
			if (n >= NAMED_ID_MIN && n <= NAMED_ID_MAX && this.lookup(n) === undefined) {
				return n;
			}
		}
		return (this.byId.max() ?? 0) + 1;
	}

	/**
	 * Round-robin over ok backends in id order, starting after the one last
	 * assigned, so that new remotes spread evenly even when they arrive in a
	 * burst.  Faulted and removed backends are skipped: a remote is only ever
	 * assigned to a backend that could answer it right now.
	 */
	select(): Backend | null {
		const n = this.byId.size;
		let node = this.lastAssignedId === 0 ? null : this.byId.find(this.lastAssignedId);
		for (let i = 0; i < n; i++) {
			node = node === null ? this.byId.minNode() : this.byId.next(node);
			if (node === null) {
				node = this.byId.minNode();
			}
			const be = (node as { data?: Backend }).data as Backend;
			if (be.ok) {
				this.lastAssignedId = be.id;
				return be;
			}
		}
		if (this.noBackendGate.open() >= 0) {
			this.log.error({ backends: n }, 'no backends available');
		}
		return null;
	}

	/**
	 * The rebalance decision, made every REBALANCE_INTERVAL_SECS.  Over the
	 * ok backends, when the spread between the fullest and the emptiest is
	 * more than the number of ok backends, the fullest should give up
	 * (spread - count) remotes, which then choose afresh.  Allowing a spread
	 * of one per backend keeps remotes from churning over a difference that
	 * round-robin will smooth out by itself.
	 */
	rebalancePlan(): RebalancePlan | null {
		let max: Backend | null = null;
		let min = Infinity;
		let nOk = 0;
		this.byId.forEach((node) => {
			const be = node.data as Backend;
			if (!be.ok) {
				return;
			}
			nOk++;
			if (max === null || be.remotes > max.remotes) {
				max = be;
			}
			min = Math.min(min, be.remotes);
		});
		if (max === null) {
			return null;
		}
		const fullest = max as Backend;
		const spread = fullest.remotes - min;
		this.log.trace({ max_count: fullest.remotes, min_count: min, max_be_id: fullest.id, spread },
			'balancer spread statistics');
		if (spread <= nOk) {
			return null;
		}
		return { backend: fullest, count: spread - nOk };
	}

	/* ---- coalesced writes ---- */

	queueFlush(be: Backend): void {
		be.queuedForFlush = true;
		this.flushQueue.push(be);
		if (!this.flushScheduled) {
			this.flushScheduled = true;
			setImmediate(this.flushAll);
		}
	}

	private readonly flushAll = (): void => {
		this.flushScheduled = false;
		const q = this.flushQueue;
		this.flushQueue = [];
		for (const be of q) {
			be.flush();
		}
	};

	close(): void {
		if (this.closed) {
			return;
		}
		this.closed = true;
		this.watcher?.close();
		if (this.watchRescan !== null) {
			clearTimeout(this.watchRescan);
		}
		for (const be of this.list()) {
			be.close();
		}
	}
}
