/*
 * BACKEND
 *
 * DNS service is provided by a pool of backend processes (node-mname
 * servers), each listening on its own AF_UNIX socket inside one directory.
 * A Backend is bbal's side of one such socket path: the standing control
 * session to the process behind it, that session's life from connect to
 * fault and back, and the counters operators read.  The registry
 * (backends.ts) creates a Backend when a rescan first sees the path, keeps
 * it while its process comes and goes, and forgets it (closed) only once
 * its socket file has been gone a minute and no remote points to it: the
 * remotes' count of it as primary and as backup is kept here.
 *
 * IDENTITY.  Binder names each socket after the high port its backend also
 * serves DNS on directly (5301, 5302, ...).  When the name is such an integer
 * in 5300-5399 and free, it becomes the backend id, so the logs of bbal and of
 * the backend speak of the same number.  Any other name gets one more than the
 * highest id in use.  Id 0 means "no backend".  The registry chooses the id;
 * every log line a backend writes carries it (be_id) and the path (be_path).
 *
 * THE CONTROL SESSION.  Each backend has one standing connection that carries
 * the hello, the heartbeats and every UDP query and answer.  Its life:
 *
 *        new
 *         | socket seen (the rescan that first lists it)
 *         v
 *     connecting <------------------+--------------------------+
 *      |   |   |                    |                          |
 *      |   |   +--- fault ------+   | delay over, or socket    | socket seen
 *      |   | SERVER_HELLO       |   | file re-created          | again
 *      |   v                    v   |                          |
 *      |   ok ---- fault ----> waiting (delaySecs)             |
 *      |   |  heartbeat: scheduled <-> outstanding             |
 *      |   |  writes:    flowing   <-> stuck                   |
 *      |   |                         |                         |
 *      |   +- socket file gone -+    | socket file gone        |
 *      |                        v    v                         |
 *      +- ENOENT on connect, -> removed -----------------------+
 *         or socket file gone
 *
 *     close(), from any state ---> closed (for good)
 *
 * `new` is a backend that has never connected; it leaves that state as soon
 * as the registry tells it its socket is there.  Only an `ok` backend
 * receives new traffic, and only an ok backend whose writes are flowing
 * takes UDP queries (see STUCK).  A fault is not an error of bbal's: it is
 * something the world did (a backend crashed, hung or broke the protocol),
 * so it is logged, counted and repaired by reconnecting, and the backend's
 * remotes use a backup meanwhile (remotes.ts).  Every change of state or
 * sub-state goes through one method, enter(), which logs it at trace level.
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
 *
 * HEARTBEATS.  Five seconds after the hello, and five seconds after each
 * reply, bbal sends CLIENT_HEARTBEAT; a reply must come within 15 seconds.
 * That catches a backend whose process lives but whose event loop is stuck,
 * which EOF never would.  The same Timeout serves both purposes: with the
 * heartbeat `scheduled` it means "send one", with one `outstanding` it means
 * "the deadline passed".
 *
 * READS.  A ControlReader (control_reader.ts) cuts what the backend writes
 * into frames, faults it for any that breaks the protocol, hands the rest
 * here, and reads at most CONTROL_FRAMES_PER_TURN (256) a turn, so that a
 * backend flooding answers cannot starve clients and other backends.
 *
 * WRITES.  Frames for a control session are not written one by one: they are
 * appended to the backend's WriteQueue (write_queue.ts), and the registry
 * runs every pending flush once per event-loop turn (setImmediate), so a
 * turn that reads thirty datagrams makes one write per backend, not thirty.
 * When the socket refuses more (write() returned false and no 'drain' yet)
 * the session is "stuck": new UDP queries for this backend are dropped and
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
 * Who calls it: the registry (socketSeen, socketGone, close), remotes.ts
 * (ok, removed, the remote count), the UDP proxy (sendUdp), the TCP proxy
 * (fault, socketGone), and stats.ts and metrics.ts, which read it
 * through the registry's BackendView only.
 */

import assert from 'node:assert/strict';
import type net from 'node:net';
import type { Logger } from 'pino';
import { type ControlFrameHandler, ControlReader } from './control_reader.js';
import {
	CLIENT_HEARTBEAT_FRAME, CLIENT_HELLO_FRAME, FRAME_INBOUND_UDP, UDP_FRAME_HEADER_BYTES, writeUdpFrame,
} from './protocol.js';
import { ignoreError } from './log.js';
import type { BackendHealth } from './health.js';
import type { Timeout, TimeoutWheel } from './timeouts.js';
import { WriteQueue } from './write_queue.js';

export const HEARTBEAT_INTERVAL_SECS = 5;
export const HEARTBEAT_DEADLINE_SECS = 15;
export const CONNECT_DEADLINE_SECS = 30;
export const MIN_RECONNECT_DELAY_SECS = 1;
export const RECONNECT_DELAY_STEP_SECS = 2;
export const MAX_RECONNECT_DELAY_SECS = 32;
/* A session stuck this long is faulted (see STUCK). */
export const STUCK_FAULT_SECS = 2;
/* How much may wait inside bbal for one control session before it is stuck. */
export const CONTROL_HIGH_WATER_BYTES = 256 * 1024;

/** An ok session's heartbeat: the next one is scheduled, or one is out, sent at sentAtMs (performance.now()). */
export type HeartbeatState = { readonly name: 'scheduled' } | { readonly name: 'outstanding'; readonly sentAtMs: number };

/** Where a backend is in its life (see the diagram above). */
export type BackendLifecycle =
	| { readonly name: 'new' }
	| { readonly name: 'connecting' }
	| { readonly name: 'ok'; readonly heartbeat: HeartbeatState; readonly stuck: boolean }
	| { readonly name: 'waiting'; readonly delaySecs: number }
	| { readonly name: 'removed'; readonly sinceMs: number }
	| { readonly name: 'closed' };

export type BackendState = BackendLifecycle['name'];

/* The states that carry nothing, made once. */
const NEW: BackendLifecycle = { name: 'new' };
const CONNECTING: BackendLifecycle = { name: 'connecting' };
const CLOSED: BackendLifecycle = { name: 'closed' };
const HEARTBEAT_SCHEDULED: HeartbeatState = { name: 'scheduled' };

/* A state as one phrase, for the trace log. */
function describeState(s: BackendLifecycle): string {
	switch (s.name) {
	case 'ok':
		return `ok${s.heartbeat.name === 'outstanding' ? ', heartbeat outstanding' : ''}${s.stuck ? ', stuck' : ''}`;
	case 'waiting':
		return `waiting ${s.delaySecs} s`;
	default:
		return s.name;
	}
}

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
	/** Turns in which the control session used up its frame budget and was paused (control_reader.ts). */
	throttled: number;
}

/** Where OUTBOUND_UDP datagrams go; the balancer wires it to the UDP proxy. */
export type OutboundUdpHandler = (addr: number, port: number, payload: Buffer, from: Backend) => void;

/** Each answered heartbeat's round trip (for the metrics histogram). */
export type HeartbeatRttHandler = (be: Backend, ms: number) => void;

/** What the registry gives each of its backends. */
export interface BackendContext {
	readonly wheel: TimeoutWheel;
	/* The registry's connector (see Connector there); a control session asks for a larger high-water mark. */
	readonly connector: (path: string, writableHighWaterMark: number) => net.Socket;
	readonly onOutboundUdp: OutboundUdpHandler;
	readonly onHeartbeatRtt?: HeartbeatRttHandler;
	/** Call `fn` once, at the end of this event-loop turn: the write flush, the read budget's renewal. */
	readonly flushSoon: (fn: () => void) => void;
	readonly log: Logger;
	/** Its health (health.ts), made once; told when the session comes up or goes. */
	readonly health: (be: Backend) => BackendHealth;
	readonly onSessionChange: (be: Backend) => void;
}

export class Backend {
	readonly stats: BackendStats = { connStart: 0, connError: 0, udp: 0, tcp: 0, stuck: 0, faults: 0, throttled: 0 };
	readonly log: Logger;
	readonly health: BackendHealth;
	/** The last fault's reason and wall-clock time (for operators' views), null before the first. */
	lastFault: { readonly reason: string; readonly atMs: number } | null = null;

	private lifecycle: BackendLifecycle = NEW;
	/* Ok and not stuck: the one test sendUdp makes per query, kept by enter(). */
	private acceptsUdp = false;
	/* The delay the next reconnect waits (see RECONNECT BACK-OFF); 0 until the first connect. */
	private backoffSecs = 0;
	/* The socket file's identity (inode and change time) when a rescan last saw it; '' before. */
	private fileId = '';
	private remotes = 0;
	/* Remotes borrowing this backend as their backup (remote.ts keeps the count). */
	private backups = 0;
	private heartbeatRttMs = -1;

	private socket: net.Socket | null = null;
	private reader: ControlReader | null = null;
	private readonly queue = new WriteQueue();
	private flushPending = false;

	private readonly connectTimeout: Timeout;
	private readonly reconnectTimeout: Timeout;
	private readonly heartbeatTimeout: Timeout;
	private readonly stuckTimeout: Timeout;

	constructor(
		private readonly ctx: BackendContext,
		readonly id: number,
		readonly path: string,
	) {
		this.log = ctx.log.child({ be_id: id, be_path: path });
		this.health = ctx.health(this);
		const wheel = ctx.wheel;
		this.connectTimeout = wheel.create(`backend ${id} connect deadline`, () => this.fault('timed out connecting to backend'));
		this.reconnectTimeout = wheel.create(`backend ${id} reconnect`, () => this.connect());
		this.heartbeatTimeout = wheel.create(`backend ${id} heartbeat`, () => this.heartbeatDue());
		this.stuckTimeout = wheel.create(`backend ${id} stuck deadline`,
			() => this.fault('session stuck: the backend stopped reading', { stuck_secs: STUCK_FAULT_SECS }));
	}

	/* ---- what operators read (BackendView in backends.ts) ---- */

	get state(): BackendState { return this.lifecycle.name; }

	get ok(): boolean { return this.lifecycle.name === 'ok'; }

	/** Ok, and healthy or failing open: what remotes and selection ask (health.ts). */
	get usable(): boolean { return this.lifecycle.name === 'ok' && this.health.serving; }

	get removed(): boolean { return this.lifecycle.name === 'removed'; }

	get stuck(): boolean { return this.lifecycle.name === 'ok' && this.lifecycle.stuck; }

	get heartbeatOutstanding(): boolean {
		return this.lifecycle.name === 'ok' && this.lifecycle.heartbeat.name === 'outstanding';
	}

	get remoteCount(): number { return this.remotes; }

	get backupCount(): number { return this.backups; }

	/** The clock (ms) when it was removed, or -1 when it is not (backends.ts forgets it a while after). */
	get removedSinceMs(): number { return this.lifecycle.name === 'removed' ? this.lifecycle.sinceMs : -1; }

	get reconnectDelaySecs(): number { return this.backoffSecs; }

	get lastHeartbeatRttMs(): number { return this.heartbeatRttMs; }

	/** Which control session this is (one more per connect): a TCP session can tell it was replaced. */
	get sessionGeneration(): number { return this.stats.connStart; }

	/** One more remote has this backend as its primary (remotes.ts keeps the count). */
	addRemote(): void {
		this.remotes++;
	}

	/** A remote whose primary this was has left it. */
	removeRemote(): void {
		assert(this.remotes > 0, `backend ${this.id} remote count would go negative`);
		this.remotes--;
	}

	addBackup(): void {
		this.backups++;
	}

	removeBackup(): void {
		assert(this.backups > 0, `backend ${this.id} backup count would go negative`);
		this.backups--;
	}

	/**
	 * Forward one UDP query.  False means it was dropped (the session is
	 * stuck) and counted here; the caller counts the remote's drop.  Only an
	 * ok backend is ever handed traffic.  This is the hot path: one test,
	 * and the frame is written straight into the write queue.
	 */
	sendUdp(addr: number, port: number, msg: Buffer): boolean {
		if (!this.acceptsUdp) {
			return this.refuseUdp();
		}
		const q = this.queue;
		const buf = q.reserve(UDP_FRAME_HEADER_BYTES + msg.length);
		q.commit(writeUdpFrame(buf, q.end, FRAME_INBOUND_UDP, addr, port, msg));
		this.flushThisTurn();
		this.stats.udp++;
		return true;
	}

	private refuseUdp(): false {
		assert(this.lifecycle.name === 'ok', 'UDP sent to a backend that is not ok');
		this.stats.stuck++;
		return false;
	}

	private flushThisTurn(): void {
		if (!this.flushPending) {
			this.flushPending = true;
			this.ctx.flushSoon(this.flush);
		}
	}

	/* Write what this turn queued, in one write; run by the registry at the end of the turn. */
	private readonly flush = (): void => {
		this.flushPending = false;
		const sock = this.socket;
		if (sock === null || this.queue.byteLength === 0) {
			this.queue.discard();
			return;
		}
		/* The copies now belong to the socket; the queue keeps its staging buffer. */
		const out = this.queue.take();
		let accepted = true;
		if (out.length === 1) {
			accepted = sock.write(out[0]);
		} else {
			/* Corked writes leave as one writev(). */
			sock.cork();
			for (const c of out) {
				accepted = sock.write(c);
			}
			sock.uncork();
		}
		if (!accepted) {
			this.becomeStuck();
		}
	};

	/* ---- lifecycle ---- */

	/**
	 * The registry saw this backend's socket file (with identity `fileId`,
	 * when known).  A new backend connects now, and so does a removed one
	 * whose file is back, or one waiting out its back-off whose file was
	 * created anew; any other is left alone.
	 */
	socketSeen(fileId = ''): void {
		const recreated = fileId !== '' && this.fileId !== '' && fileId !== this.fileId;
		if (fileId !== '') {
			this.fileId = fileId;
		}
		switch (this.lifecycle.name) {
		case 'new':
			break;
		case 'removed':
			this.log.info('backend socket returned (connecting)');
			break;
		case 'waiting':
			if (!recreated) {
				return;
			}
			this.log.info('backend socket re-created (connecting now)');
			this.reconnectTimeout.clear();
			break;
		default:
			return;
		}
		/* Tried at once, and the first failure waits the shortest delay. */
		this.backoffSecs = MIN_RECONNECT_DELAY_SECS;
		this.connect();
	}

	/**
	 * The socket file is gone (a rescan no longer lists it, or a TCP
	 * session's connect got ENOENT) while the control session may still be
	 * up.  Nothing new can reach this backend -- every TCP session would
	 * fail -- so it is removed now, rather than when its process finally
	 * dies, and its remotes choose afresh.
	 */
	socketGone(): void {
		const from = this.lifecycle.name;
		if (from === 'removed' || from === 'closed') {
			return;
		}
		if (from === 'ok') {
			this.stats.faults++;
		}
		this.log.warn({ state: from }, 'backend socket file is gone');
		this.markRemoved();
	}

	/**
	 * Tear the session down and schedule a reconnect.  Does nothing unless a
	 * session exists (connecting or ok), so every path that notices trouble
	 * may call it without checking whether another path already did.
	 */
	fault(reason: string, extra?: Record<string, unknown>): void {
		const from = this.lifecycle.name;
		if (from !== 'ok' && from !== 'connecting') {
			return;
		}
		this.stats.faults++;
		this.lastFault = { reason, atMs: Date.now() };
		if (from === 'ok') {
			this.log.error({ reason, ...extra }, 'backend faulted (reset and reconnect)');
		} else {
			this.log.warn({ reason, ...extra, delay_secs: this.backoffSecs }, 'backend connect failed');
		}
		this.dropSession();
		this.waitToReconnect();
	}

	/** Stop for good: no session, no reconnect.  Idempotent. */
	close(): void {
		if (this.lifecycle.name === 'closed') {
			return;
		}
		this.dropSession();
		this.reconnectTimeout.clear();
		this.enter(CLOSED);
	}

	/* The one place the state changes. */
	private enter(next: BackendLifecycle): void {
		const prev = this.lifecycle;
		this.lifecycle = next;
		this.acceptsUdp = next.name === 'ok' && !next.stuck;
		if ((prev.name === 'ok') !== (next.name === 'ok')) {
			this.ctx.onSessionChange(this);
		}
		if (this.log.isLevelEnabled('trace')) {
			this.log.trace({ from: describeState(prev), to: describeState(next) }, 'backend state');
		}
	}

	/* Open the control session now (from new, waiting or removed). */
	private connect(): void {
		const from = this.lifecycle.name;
		assert(from === 'new' || from === 'waiting' || from === 'removed', `connect() while ${from}`);
		this.enter(CONNECTING);
		this.stats.connStart++;
		this.log.debug('connecting to backend');
		const sock = this.ctx.connector(this.path, CONTROL_HIGH_WATER_BYTES);
		this.socket = sock;
		sock.on('error', this.controlOnError);
		sock.on('connect', this.controlOnConnect);
		/* It reads the frames ('data'), at most CONTROL_FRAMES_PER_TURN a turn. */
		this.reader = new ControlReader(sock, this.frameHandler, this.ctx.flushSoon);
		sock.on('end', this.controlOnEnd);
		sock.on('close', this.controlOnClose);
		sock.on('drain', this.controlOnDrain);
		this.connectTimeout.set(CONNECT_DEADLINE_SECS);
	}

	private helloReceived(): void {
		this.connectTimeout.clear();
		this.enter({ name: 'ok', heartbeat: HEARTBEAT_SCHEDULED, stuck: false });
		this.backoffSecs = MIN_RECONNECT_DELAY_SECS;
		this.heartbeatTimeout.set(HEARTBEAT_INTERVAL_SECS);
		this.log.info('backend socket established');
	}

	/* After a fault: wait out the back-off's current delay, and lengthen it for next time. */
	private waitToReconnect(): void {
		const delaySecs = this.backoffSecs;
		assert(delaySecs >= MIN_RECONNECT_DELAY_SECS, 'a session existed, so the back-off has begun');
		this.backoffSecs = Math.min(delaySecs + RECONNECT_DELAY_STEP_SECS, MAX_RECONNECT_DELAY_SECS);
		this.enter({ name: 'waiting', delaySecs });
		this.log.debug({ delay_secs: delaySecs }, 'reconnect scheduled');
		this.reconnectTimeout.set(delaySecs);
	}

	private markRemoved(): void {
		this.dropSession();
		this.reconnectTimeout.clear();
		this.enter({ name: 'removed', sinceMs: this.ctx.wheel.clock() });
		this.log.info('backend socket removed');
	}

	/* Forget the socket and everything tied to it; the next state is the caller's. */
	private dropSession(): void {
		this.connectTimeout.clear();
		this.heartbeatTimeout.clear();
		this.stuckTimeout.clear();
		this.queue.discard();
		this.reader?.close();
		this.reader = null;
		const sock = this.socket;
		if (sock !== null) {
			this.socket = null;
			sock.removeAllListeners();
			sock.on('error', ignoreError);
			sock.destroy();
		}
	}

	/* ---- sub-states of ok ---- */

	private heartbeatDue(): void {
		const s = this.lifecycle;
		if (s.name !== 'ok') {
			return;
		}
		if (s.heartbeat.name === 'outstanding') {
			this.fault('no heartbeat from backend', { deadline_secs: HEARTBEAT_DEADLINE_SECS });
			return;
		}
		this.queue.append(CLIENT_HEARTBEAT_FRAME);
		this.flushThisTurn();
		this.enter({ ...s, heartbeat: { name: 'outstanding', sentAtMs: performance.now() } });
		this.heartbeatTimeout.set(HEARTBEAT_DEADLINE_SECS);
	}

	private becomeStuck(): void {
		const s = this.lifecycle;
		if (s.name !== 'ok' || s.stuck) {
			return;
		}
		this.enter({ ...s, stuck: true });
		this.stuckTimeout.set(STUCK_FAULT_SECS);
		this.log.warn('backend session stuck (write queue full): dropping new UDP queries');
	}

	/* ---- control socket events ---- */

	private readonly controlOnConnect = (): void => {
		this.log.debug('backend socket connected');
		(this.socket as net.Socket).write(CLIENT_HELLO_FRAME);
	};

	private readonly controlOnEnd = (): void => {
		this.fault('backend socket EOF');
	};

	private readonly controlOnClose = (): void => {
		this.fault('backend socket closed');
	};

	private readonly controlOnDrain = (): void => {
		const s = this.lifecycle;
		if (s.name === 'ok' && s.stuck) {
			this.enter({ ...s, stuck: false });
			this.stuckTimeout.clear();
			this.log.info('backend session writable again');
		}
	};

	private readonly controlOnError = (err: NodeJS.ErrnoException): void => {
		this.stats.connError++;
		if (err.code === 'ENOENT' && this.lifecycle.name === 'connecting') {
			this.markRemoved();
			return;
		}
		this.fault('backend socket error', { err });
	};

	/* ---- frames from the backend (judged by control_reader.ts) ---- */

	private readonly frameHandler: ControlFrameHandler = {
		helloDone: () => this.lifecycle.name === 'ok',
		hello: () => this.helloReceived(),
		outboundUdp: (addr, port, payload) => this.ctx.onOutboundUdp(addr, port, payload, this),
		heartbeatReply: () => this.heartbeatReplied(),
		violation: (reason, extra) => this.fault(reason, extra),
		budgetSpent: () => {
			this.stats.throttled++;
		},
	};

	private heartbeatReplied(): void {
		const s = this.lifecycle;
		if (s.name !== 'ok' || s.heartbeat.name !== 'outstanding') {
			this.fault('unexpected heartbeat reply from backend');
			return;
		}
		this.heartbeatRttMs = performance.now() - s.heartbeat.sentAtMs;
		this.enter({ ...s, heartbeat: HEARTBEAT_SCHEDULED });
		this.ctx.onHeartbeatRtt?.(this, this.heartbeatRttMs);
		this.heartbeatTimeout.set(HEARTBEAT_INTERVAL_SECS);
	}
}
