/*
 * TCP PROXY
 *
 * DNS over TCP (RFC 7766) is how large answers, zone transfers and retries
 * after a truncated UDP answer reach Binder.  bbal proxies it at layer 4:
 * every client connection gets its own AF_UNIX connection to the backend
 * that serves the client's address -- the same sticky primary/backup choice
 * as UDP, so `dig +tcp` from a host lands where the host's UDP does.  The
 * listener (tcp_listener.ts) decides who gets a connection; a TcpProxy
 * owns one connection from then on: the client's socket (the front) and
 * its backend session (the back).  Its lifecycle is one explicit state,
 * changed only by advance(), which logs each step at trace:
 *
 *              back connected       INBOUND_TCP_OK       a socket closed
 *   connecting -------------> awaiting OK ----------> flowing ------------> closing
 *    {client}                  {client}         {front, back, paused}       {open}
 *       |                         |                       |                    | the other
 *       |                         |                       |                    | closes too
 *       +-------------------------+-----------------------+--------------------+--> closed
 *         teardown(), from any state, once: error, a deadline, a wrong first
 *         frame, not DNS, the client gone, evicted, shutdown
 *
 *   client       reading --a maximal message, or the query cap, held---> paused
 *   (before OK)  reading --FIN after a whole query--> ended (kept, but evictable)
 *                reading --FIN before one-----------> closed (abandoned)
 *   front, back  open --FIN seen and passed on--> ended
 *   paused       null (reading the client) or why not: see BACKPRESSURE
 *   open         the side still open once the other has closed
 *
 * Connecting: INBOUND_TCP goes out once the back is connected.  Awaiting
 * OK: INBOUND_TCP_OK is due within 10 s, or the backend is faulted (one that
 * cannot take a TCP session in ten seconds is not healthy) -- unless its
 * control session has been replaced since this proxy began
 * (Backend.sessionGeneration): the new session is not to blame for the old.
 * Any other first frame closes this proxy without faulting the backend.
 * Meanwhile the client is read into a small buffer (at most one maximal
 * message, or the query cap), passed on in order once the session flows.
 * Flowing: bytes pass both ways verbatim; a FIN is passed on after the bytes
 * before it.  Closing: the other side is ended gently, and the idle
 * deadline cuts it if its peer never closes.
 *
 * A CLIENT THAT HANGS UP FIRST before the OK: with no whole query, closed at
 * once; after one, it may be waiting or may have given up, so it is kept
 * but goes first at the cap.  Both count as `abandoned`.
 *
 * WATCHING BOTH DIRECTIONS.  Two MessageFollowers (tcp_messages.ts) follow
 * message boundaries as the bytes go by.  The client's: the first message
 * gets a datagram's header check, and every one must be 12 bytes to
 * --max-tcp-message (a violator is closed and counted).  The backend's: its
 * boundaries only, so queries in minus answers out (`outstanding`) is what
 * the backend still owes this client.
 *
 * BACKPRESSURE.  Nothing is read faster than it can be passed on, and a
 * client cannot make its backend hold more than a few answers for it: mname
 * buffers every answer it cannot write, without bound.  The client is not
 * read (`paused`, counted per reason) while any of these holds, and resumes
 * where it stopped when none does; nothing is dropped:
 *
 *   client not reading    its socket is over its high-water mark (write()
 *                         said false, no 'drain' yet): it is not reading its
 *                         answers.  The backend is not read either meanwhile.
 *   backend not reading   the backend's socket is over its high-water mark.
 *   query cap             `outstanding` is --max-tcp-queries-per-conn (32 by
 *                         default: RFC 7766 6.2.1.1 lets a client pipeline, a
 *                         stub resolver has a handful in flight).  The follower
 *                         stops at the query that reaches the cap even inside
 *                         one read; the rest goes back to the socket (unshift).
 *   source query cap      the source's connections together have
 *                         --max-tcp-queries-per-remote outstanding (8): the
 *                         listener counts them and wakes the others when one
 *                         is answered.  A backend then owes one host's burst
 *                         8 answers, not 16 connections times 32: a
 *                         newcomer's query waits behind that, not hundreds.
 *
 * DEADLINES.  The idle deadline (10 s by default, `--tcp-idle-timeout`;
 * RFC 7766 6.2.3 asks for seconds, not minutes) counts from the last whole
 * message either way, or from accept, never from a stray byte: a client
 * that trickles a byte every few seconds is idle.  Once a query's first
 * byte is in, the whole query must be within TCP_MESSAGE_DEADLINE_SECS (5;
 * a constant: no real client takes seconds to write a few hundred bytes),
 * counted only while bbal reads the client.  Both close the connection,
 * counted; neither faults the backend.
 *
 * LOGS.  A child of the backend's logger (be_id, be_path) with conn_id,
 * remote_ip and remote_port; repeated conditions use the listener's gates.
 */

import type net from 'node:net';
import type { Logger } from 'pino';
import type { Backend, Backends } from './backends.js';
import { encodeInboundTcp, FirstFrameSink, FRAME_INBOUND_TCP_OK, FRAME_NAMES, FrameReader } from './protocol.js';
import type { Remote } from './remotes.js';
import { type GatedLog, ignoreError } from './log.js';
import { describeProblem, MessageFollower, TCP_LENGTH_PREFIX_BYTES, TCP_MAX_MESSAGE_BYTES } from './tcp_messages.js';
import type { Timeout, TimeoutWheel } from './timeouts.js';

export const TCP_OK_DEADLINE_SECS = 10;
export const DEFAULT_TCP_IDLE_TIMEOUT_SECS = 10;
/** Once a query's first byte is in, the whole of it must be within this (see DEADLINES). */
export const TCP_MESSAGE_DEADLINE_SECS = 5;
/** The default for --max-tcp-queries-per-conn (see BACKPRESSURE). */
export const DEFAULT_MAX_TCP_QUERIES_PER_CONN = 32;

/** The client's side before the session flows; see the file comment. */
export type EarlyClient = 'reading' | 'paused' | 'ended';
/** One socket's side while flowing: open, or its FIN seen and passed on. */
export type FlowSide = 'open' | 'ended';
type Side = 'front' | 'back';
/** Why the client is not being read while flowing (see BACKPRESSURE). */
export type PauseReason = 'client not reading' | 'backend not reading' | 'query cap' | 'source query cap';
const PAUSE_COUNTERS = {
	'client not reading': 'pausedClientNotReading', 'backend not reading': 'pausedBackendNotReading', 'query cap': 'pausedQueryCap',
	'source query cap': 'pausedSourceQueryCap',
} as const;

export type TcpProxyState =
	| { readonly name: 'connecting'; readonly client: EarlyClient }
	| { readonly name: 'awaiting OK'; readonly client: EarlyClient }
	| { readonly name: 'flowing'; readonly front: FlowSide; readonly back: FlowSide; readonly paused: PauseReason | null }
	| { readonly name: 'closing'; readonly open: Side }
	| { readonly name: 'closed' };

/** The counters a proxy adds to (the listener's TcpListenerStats, which says what each counts). */
export type TcpProxyCounter = 'established' | 'idleClosed' | 'badFirstFrame' | 'okTimeouts' | 'abandoned' | 'invalid'
	| 'messageTimeouts' | (typeof PAUSE_COUNTERS)[PauseReason];

/**
 * What a proxy needs from the listener that accepted it (tcp_listener.ts),
 * so that the arrow goes one way: the listener knows proxies, a proxy knows
 * only this.
 */
export interface TcpSessionHost {
	readonly stats: Record<TcpProxyCounter, number>;
	readonly wheel: TimeoutWheel;
	readonly backends: Backends;
	readonly idleTimeoutSecs: number;
	readonly maxMessageBytes: number;
	readonly maxQueriesPerConn: number;
	/** How many more queries the proxy's source may have outstanding, all its connections together. */
	sourceRoom(proxy: TcpProxy): number;
	/* One gate per condition, so that a frequent one cannot silence another. */
	readonly okTimeoutLog: GatedLog;
	readonly invalidLog: GatedLog;
	readonly messageDeadlineLog: GatedLog;
	/** The client half-closed after a whole query, before the OK: the first to go at the cap. */
	clientGone(proxy: TcpProxy): void;
	/** The session flows: it is no longer one to close first. */
	flowing(proxy: TcpProxy): void;
	/** A whole query or answer went by: `outstanding` and `lastProgressMs` may have changed. */
	progressed(proxy: TcpProxy): void;
	/** The proxy has closed both sockets (or is closed). */
	released(proxy: TcpProxy): void;
}

export class TcpProxy {
	readonly log: Logger;
	private current: TcpProxyState = { name: 'connecting', client: 'reading' };
	private readonly back: net.Socket;
	/* The INBOUND_TCP_OK deadline, then the idle deadline. */
	private readonly deadline: Timeout;
	/* A query begun must be whole in time. */
	private readonly messageDeadline: Timeout;
	private readonly firstFrame = new FirstFrameSink(FRAME_INBOUND_TCP_OK);
	/* No frame on a TCP session has a payload: a UDP frame is refused on its header. */
	private readonly okReader = new FrameReader(this.firstFrame, 0);
	private readonly queries: MessageFollower;
	private readonly answers = new MessageFollower(TCP_MAX_MESSAGE_BYTES, false);
	/* The control session this proxy began under (see Awaiting OK). */
	private readonly backendSession: number;
	/** Of `outstanding`, what the listener has counted for the source (the listener owns it). */
	sourceCounted = 0;
	/* The last whole query or answer, or the accept: where the idle deadline counts from. */
	private lastProgress: number;
	/* The number of whole queries when the message deadline was armed for the next one. */
	private messageArmedAt = -1;
	/* What the client sent before the session flowed. */
	private early: Buffer[] = [];
	private earlyBytes = 0;

	constructor(
		private readonly host: TcpSessionHost,
		readonly id: number,
		private readonly front: net.Socket,
		readonly remote: Remote,
		readonly backend: Backend,
		private readonly remotePort: number,
	) {
		this.log = backend.log.child({ conn_id: id, remote_ip: remote.ip, remote_port: remotePort });
		this.queries = new MessageFollower(host.maxMessageBytes);
		this.backendSession = backend.sessionGeneration;
		const wheel = host.wheel;
		this.lastProgress = wheel.nowMs;
		this.deadline = wheel.create(`tcp ${id} deadline`, () => this.deadlineDue());
		this.messageDeadline = wheel.create(`tcp ${id} message deadline`, () => this.messageDeadlineDue());
		this.deadline.set(TCP_OK_DEADLINE_SECS);

		front.on('error', this.frontOnError);
		front.on('close', this.frontOnClose);
		front.on('data', this.frontOnEarlyData);
		front.on('end', this.frontOnEarlyEnd);
		front.setNoDelay(true);
		front.resume();

		this.back = host.backends.connector(backend.path);
		this.back.on('error', this.backOnError);
		this.back.on('close', this.backOnClose);
		this.back.on('connect', this.backOnConnect);
		this.back.on('data', this.backOnFirstData);
		this.back.on('end', this.backOnEarlyEnd);
		this.log.debug('tcp connection accepted');
	}

	get state(): TcpProxyState {
		return this.current;
	}

	/** Queries forwarded (or held for the backend) that it has not answered yet. */
	get outstanding(): number {
		return this.queries.messages - this.answers.messages;
	}

	/* ---- transitions ---- */

	private advance(next: TcpProxyState): void {
		if (this.log.isLevelEnabled('trace')) {
			this.log.trace({ from: this.current, to: next }, 'tcp proxy state');
		}
		this.current = next;
	}

	/* Before the session flows: what the client's side is doing. */
	private clientNow(client: EarlyClient): void {
		const s = this.current;
		if (s.name === 'connecting' || s.name === 'awaiting OK') {
			this.advance({ name: s.name, client });
		}
	}

	/* While flowing: one side's FIN has been seen (and is passed on). */
	private sideEnded(side: Side): void {
		const s = this.current;
		if (s.name === 'flowing') {
			this.advance(side === 'front' ? { ...s, front: 'ended' } : { ...s, back: 'ended' });
		}
	}

	/* One socket has closed for good. */
	private socketClosed(side: Side): void {
		const name = this.current.name;
		if (name === 'flowing') {
			/* Nothing more can reach the closed side: end the other gently, and read it to its end. */
			const open = side === 'front' ? 'back' : 'front';
			this.advance({ name: 'closing', open });
			this.messageDeadline.clear();
			const other = open === 'front' ? this.front : this.back;
			other.resume();
			/* Already ended or closing: end() again would only build an error. */
			if (!other.writableEnded && !other.destroyed) {
				other.end();
			}
		} else if (name === 'closing') {
			this.release();
		} else {
			/* Before the session flows one socket is no use without the other (and closed stays closed). */
			this.teardown();
		}
	}

	/* ---- connecting, awaiting OK ---- */

	private readonly backOnConnect = (): void => {
		const s = this.current;
		if (s.name === 'connecting') {
			this.back.write(encodeInboundTcp(this.remote.addr, this.remotePort));
			this.advance({ name: 'awaiting OK', client: s.client });
		}
	};

	private readonly backOnFirstData = (chunk: Buffer): void => {
		const used = this.okReader.feed(chunk);
		const first = this.firstFrame;
		if (first.verdict === 'waiting') {
			return;
		}
		if (first.verdict === 'bad') {
			this.host.stats.badFirstFrame++;
			this.log.warn({ frame_type: first.type, frame_name: FRAME_NAMES[first.type], frame_error: first.error },
				'backend answered INBOUND_TCP with the wrong frame (closing connection)');
			this.teardown();
			return;
		}
		this.flow(chunk.subarray(used));
	};

	private readonly backOnEarlyEnd = (): void => {
		this.log.warn('backend closed the TCP session before INBOUND_TCP_OK');
		this.teardown();
	};

	private readonly frontOnEarlyData = (chunk: Buffer): void => {
		const taken = this.followClient(chunk);
		if (taken === null) {
			return;
		}
		this.early.push(taken);
		this.earlyBytes += taken.length;
		if (taken !== chunk || this.earlyBytes >= this.host.maxMessageBytes + TCP_LENGTH_PREFIX_BYTES) {
			this.pauseClient();
			this.clientNow('paused');
		}
	};

	private readonly frontOnEarlyEnd = (): void => {
		if (this.queries.messages === 0) {
			this.log.debug('client hung up before sending a whole query');
			this.host.stats.abandoned++;
			this.teardown();
			return;
		}
		this.clientNow('ended');
		this.host.clientGone(this);
	};

	/** Closed to make room at the cap (the listener counts why). */
	evict(): void {
		this.log.debug('closing tcp connection to make room');
		this.teardown();
	}

	/* The OK is in: join the two sockets; `rest` is the start of the answer. */
	private flow(rest: Buffer): void {
		const { front, back } = this;
		const early = this.current.name === 'awaiting OK' ? this.current.client : 'reading';
		const clientEnded = early === 'ended';
		back.removeListener('data', this.backOnFirstData);
		back.removeListener('end', this.backOnEarlyEnd);
		front.removeListener('data', this.frontOnEarlyData);
		front.removeListener('end', this.frontOnEarlyEnd);
		this.host.flowing(this);
		this.advance({ name: 'flowing', front: clientEnded ? 'ended' : 'open', back: 'open', paused: null });
		this.backend.stats.tcp++;
		this.host.stats.established++;
		this.deadline.set(this.host.idleTimeoutSecs);
		back.on('data', this.backOnData);
		back.on('end', this.backOnEnd);
		back.on('drain', this.backOnDrain);
		front.on('drain', this.frontOnDrain);
		if (rest.length > 0) {
			this.backOnData(rest);
		}
		for (const chunk of this.early) {
			back.write(chunk);
		}
		this.early = [];
		if (clientEnded) {
			back.end();
		} else {
			front.on('data', this.frontOnData);
			front.on('end', this.frontOnEnd);
			if (early === 'paused') {
				/* The state says unpaused, so must the socket: regulate() pauses it again if a cap still holds. */
				this.resumeClient();
			}
		}
		this.regulate();
	}

	/* ---- flowing ---- */

	/*
	 * Follow a chunk from the client: the part of it to pass on (all of it
	 * unless the query cap fell inside it, the rest then handed back to the
	 * socket), or null when the connection was closed for it.
	 */
	private followClient(chunk: Buffer): Buffer | null {
		const before = this.queries.messages;
		const stopAt = Math.min(this.answers.messages + this.host.maxQueriesPerConn,
			this.queries.messages + this.host.sourceRoom(this));
		const problem = this.queries.feed(chunk, stopAt);
		if (problem !== null) {
			this.host.stats.invalid++;
			this.host.invalidLog.report(this.log, () => ({ problem: describeProblem(problem) }));
			this.teardown();
			return null;
		}
		let taken = chunk;
		const used = this.queries.consumed;
		if (used < chunk.length) {
			taken = chunk.subarray(0, used);
			this.pauseClient();
			this.front.unshift(chunk.subarray(used));
		}
		if (this.queries.messages !== before) {
			this.progress();
		}
		this.watchMessage();
		return taken;
	}

	private readonly frontOnData = (chunk: Buffer): void => {
		if (this.current.name !== 'flowing') {
			return; /* closing: the backend is gone, nothing to pass on */
		}
		const taken = this.followClient(chunk);
		if (taken === null) {
			return;
		}
		if (taken.length > 0) {
			this.back.write(taken);
		}
		this.regulate();
	};

	private readonly backOnData = (chunk: Buffer): void => {
		if (this.current.name !== 'flowing') {
			return; /* closing: the client is gone */
		}
		const before = this.answers.messages;
		const problem = this.answers.feed(chunk);
		if (problem !== null) {
			this.log.warn({ problem: describeProblem(problem) }, 'backend answer stream is not DNS (closing connection)');
			this.teardown();
			return;
		}
		this.front.write(chunk);
		if (this.answers.messages !== before) {
			this.progress();
		}
		this.regulate();
	};

	private readonly backOnDrain = (): void => this.regulate();
	private readonly frontOnDrain = (): void => this.regulate();

	/**
	 * Read the client only while it reads its answers, the backend reads
	 * its queries, and fewer than the caps are outstanding; read the backend
	 * only while the client reads (see BACKPRESSURE).  The listener calls it
	 * when the source has room again.
	 */
	regulate(): void {
		const s = this.current;
		if (s.name !== 'flowing') {
			return;
		}
		const clientNotReading = this.front.writableNeedDrain;
		if (clientNotReading !== this.back.isPaused()) {
			if (clientNotReading) {
				this.back.pause();
			} else {
				this.back.resume();
			}
		}
		if (s.front === 'ended') {
			return;
		}
		let why: PauseReason | null = null;
		if (clientNotReading) {
			why = 'client not reading';
		} else if (this.back.writableNeedDrain) {
			why = 'backend not reading';
		} else if (this.outstanding >= this.host.maxQueriesPerConn) {
			why = 'query cap';
		} else if (this.host.sourceRoom(this) <= 0) {
			why = 'source query cap';
		}
		if (why === s.paused) {
			return;
		}
		this.advance({ ...s, paused: why });
		if (why === null) {
			this.resumeClient();
		} else {
			this.host.stats[PAUSE_COUNTERS[why]]++;
			this.pauseClient();
		}
	}

	/* The message deadline counts only while bbal reads the client. */
	private pauseClient(): void {
		this.front.pause();
		this.messageDeadline.clear();
	}

	private resumeClient(): void {
		this.front.resume();
		this.messageArmedAt = -1;
		this.watchMessage();
	}

	private readonly frontOnEnd = (): void => {
		this.sideEnded('front');
		this.messageDeadline.clear();
		this.back.end();
	};

	private readonly backOnEnd = (): void => {
		this.sideEnded('back');
		this.front.end();
	};

	/* ---- deadlines ---- */

	private progress(): void {
		this.lastProgress = this.host.wheel.nowMs;
		this.host.progressed(this);
	}

	/* A query has begun and not ended: it has TCP_MESSAGE_DEADLINE_SECS from its first byte. */
	private watchMessage(): void {
		if (!this.queries.midMessage) {
			this.messageDeadline.clear();
			return;
		}
		const count = this.queries.messages;
		if (this.messageArmedAt !== count || this.messageDeadline.expiresAt === null) {
			this.messageArmedAt = count;
			this.messageDeadline.set(TCP_MESSAGE_DEADLINE_SECS);
		}
	}

	/* Never after release(), which clears it. */
	private messageDeadlineDue(): void {
		this.host.stats.messageTimeouts++;
		this.host.messageDeadlineLog.report(this.log, { deadline_secs: TCP_MESSAGE_DEADLINE_SECS });
		this.teardown();
	}

	private deadlineDue(): void {
		const name = this.current.name;
		if (name === 'connecting' || name === 'awaiting OK') {
			this.host.stats.okTimeouts++;
			if (this.backend.sessionGeneration === this.backendSession) {
				this.host.okTimeoutLog.report(this.log, { deadline_secs: TCP_OK_DEADLINE_SECS });
				this.backend.fault('TCP session: no INBOUND_TCP_OK in time', { conn_id: this.id });
			} else {
				/* The backend has reconnected since: its new session is not to blame. */
				this.host.okTimeoutLog.report(this.log, { deadline_secs: TCP_OK_DEADLINE_SECS, session_replaced: true });
			}
			this.teardown();
			return;
		}
		if (name === 'closed') {
			return;
		}
		const idleSecs = (this.host.wheel.nowMs - this.lastProgress) / 1000;
		const limit = this.host.idleTimeoutSecs;
		if (idleSecs < limit) {
			/* A whole message since arming: wait for the rest of the period. */
			this.deadline.set(Math.max(1, Math.ceil(limit - idleSecs)));
			return;
		}
		this.host.stats.idleClosed++;
		this.log.info({ idle_secs: limit }, 'closing idle tcp connection');
		this.teardown();
	}

	/* ---- closing ---- */

	private readonly frontOnError = (err: Error): void => {
		this.log.debug({ err }, 'tcp client connection error');
		this.teardown();
	};

	private readonly backOnError = (err: NodeJS.ErrnoException): void => {
		this.log.warn({ err }, 'backend tcp session error');
		if (err.code === 'ENOENT' && this.current.name === 'connecting') {
			/* The socket file is gone: the next connection should go elsewhere. */
			this.backend.socketGone();
		}
		this.teardown();
	};

	private readonly frontOnClose = (): void => this.socketClosed('front');
	private readonly backOnClose = (): void => this.socketClosed('back');

	/** Destroy both sockets at once (errors, deadlines, shutdown); idempotent. */
	teardown(): void {
		if (this.current.name === 'closed') {
			return;
		}
		this.front.destroy();
		this.back.destroy();
		this.release();
	}

	private release(): void {
		if (this.current.name === 'closed') {
			return;
		}
		this.advance({ name: 'closed' });
		this.deadline.clear();
		this.messageDeadline.clear();
		this.front.on('error', ignoreError);
		this.back.on('error', ignoreError);
		this.host.released(this);
		this.log.debug('tcp connection closed');
	}
}
