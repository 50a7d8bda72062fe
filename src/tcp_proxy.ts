/*
 * TCP PROXY
 *
 * DNS over TCP (RFC 7766) is how large answers, zone transfers and retries
 * after a truncated UDP answer reach Binder.  bbal proxies it at layer 4:
 * every client connection gets its own AF_UNIX connection to the backend
 * that serves the client's address -- the same sticky primary/backup choice
 * as UDP, so `dig +tcp` from a host lands where the host's UDP does.
 *
 * A TcpProxy object owns one client connection (the front) and its backend
 * session (the back).  Its lifecycle is one explicit state, changed only by
 * advance(), which logs each step at trace:
 *
 *              back connected       INBOUND_TCP_OK       a socket closed
 *   connecting -------------> awaiting OK ----------> flowing ------------> closing
 *    {client}                  {client}              {front, back}          {open}
 *       |                         |                       |                    | the other
 *       |                         |                       |                    | closes too
 *       +-------------------------+-----------------------+--------------------+--> closed
 *         teardown(), from any state, once: error, a deadline, a wrong first
 *         frame, not DNS, the client gone, evicted, shutdown
 *
 *   client       reading --a maximal message held---> paused
 *   (before OK)  reading --FIN after a whole query--> ended (kept, but evictable)
 *                reading --FIN before one-----------> closed (abandoned)
 *   front, back  open --FIN seen and passed on--> ended
 *   open         the side still open once the other has closed
 *
 * Connecting: INBOUND_TCP (client address and port) goes out as soon as the
 * back is connected.  Awaiting OK: the backend must answer INBOUND_TCP_OK
 * within 10 seconds; missing that faults the backend, for one that cannot
 * take a TCP session in ten seconds is not healthy.  Any other first frame
 * (protocol.ts's FrameReader, stopped by a FirstFrameSink after one frame)
 * tears this proxy down but does not fault the backend, whose control
 * session may be perfectly fine.  Meanwhile the client is read into a small
 * buffer, at most one maximal message (beyond that it is paused and the rest
 * waits in the kernel), which goes to the backend, in order, the moment the
 * session flows; bytes that follow the OK in the same read are the start of
 * the answer and reach the client before anything else.  Flowing: bytes pass
 * both ways verbatim with backpressure (pipe), so a slow reader on either
 * side pauses the other and bbal never buffers an unbounded answer; a FIN is
 * passed on once the bytes before it have gone.  Closing: nothing more can
 * reach the closed side, so the other is ended gently, and the idle deadline
 * cuts it if its peer never closes.
 *
 * A CLIENT THAT HANGS UP FIRST.  Reading early is what lets bbal see a client
 * leave while its backend is slow to accept: resolvers give up on a TCP
 * query within a second or two, and a stalled backend (whose 10-s OK deadline
 * has not yet run out) would otherwise keep every such dead connection and
 * fill --max-tcp-connections, so that remotes of healthy backends were
 * refused.  A client that ends its stream before sending one whole message
 * can never be answered: the connection is closed at once.  One that sent a
 * whole query and then half-closed may be a legitimate client waiting for
 * its answer, or one that gave up; TCP cannot tell the two apart, so it is
 * kept, but marked: when the cap is reached, the oldest such connection is
 * closed to make room rather than refusing the newcomer.  Both count as
 * `abandoned`; neither faults the backend (the deadline still does).
 *
 * WATCHING THE CLIENT.  The client's bytes pass through unchanged, but a
 * MessageFollower (tcp_messages.ts) follows its message boundaries as they
 * go, which costs a few comparisons per chunk: the first message must pass
 * the same header check as a datagram, and no message may be shorter than a
 * DNS header or longer than --max-tcp-message.  A violator's connection is
 * closed and counted.  Connections from outside --allow are closed at accept.
 *
 * BOUNDS.  A connection with no bytes in either direction for the idle
 * deadline (10 s by default, `--tcp-idle-timeout`; RFC 7766 6.2.3 asks for
 * seconds, not minutes) is closed, which also disposes of clients that send
 * half a length prefix and stall.  At most `--max-tcp-connections` (512 by
 * default) are open at once; over the cap a new connection is closed at once
 * and counted.  Every condition stays local to its connection: UDP and the
 * other TCP clients never notice.
 *
 * LOGS.  A proxy logs through a child of its backend's logger, so every line
 * carries be_id and be_path as the backend's own lines do, plus conn_id,
 * remote_ip and remote_port.  Conditions that can repeat per connection
 * (over the cap, outside --allow, no backend, not DNS, no OK in time) each
 * have a GatedLog of their own on the listener.
 */

import type net from 'node:net';
import type { Logger } from 'pino';
import type { Backend, Backends } from './backends.js';
import { encodeInboundTcp, FirstFrameSink, FRAME_INBOUND_TCP_OK, FRAME_NAMES, FrameReader } from './protocol.js';
import type { Remote } from './remotes.js';
import { type GatedLog, ignoreError } from './log.js';
import { describeProblem, MessageFollower, TCP_LENGTH_PREFIX_BYTES } from './tcp_messages.js';
import type { Timeout, TimeoutWheel } from './timeouts.js';

export const TCP_OK_DEADLINE_SECS = 10;
export const DEFAULT_TCP_IDLE_TIMEOUT_SECS = 10;

/** The client's side before the session flows; see the file comment. */
export type EarlyClient = 'reading' | 'paused' | 'ended';
/** One socket's side while flowing: open, or its FIN seen and passed on. */
export type FlowSide = 'open' | 'ended';
type Side = 'front' | 'back';

export type TcpProxyState =
	| { readonly name: 'connecting'; readonly client: EarlyClient }
	| { readonly name: 'awaiting OK'; readonly client: EarlyClient }
	| { readonly name: 'flowing'; readonly front: FlowSide; readonly back: FlowSide }
	| { readonly name: 'closing'; readonly open: Side }
	| { readonly name: 'closed' };

/** The TCP path's counters: the listener's totals, counted by it and by its proxies. */
export interface TcpStats {
	accepted: number; /* connections accepted */
	overCap: number; /* closed at once: over --max-tcp-connections */
	noBackend: number; /* closed at once: no backend ok */
	established: number; /* sessions that reached the flowing state */
	idleClosed: number; /* closed by the idle deadline */
	badFirstFrame: number; /* the backend's first frame was not INBOUND_TCP_OK */
	okTimeouts: number; /* the backend missed the INBOUND_TCP_OK deadline */
	abandoned: number; /* the client hung up before the backend's INBOUND_TCP_OK */
	aclDropped: number; /* closed at accept: source outside --allow */
	invalid: number; /* not a DNS query first, or a message too short or too long */
}

/**
 * What a proxy needs from the listener that accepted it (tcp_listener.ts),
 * so that the arrow goes one way: the listener knows proxies, a proxy knows
 * only this.
 */
export interface TcpSessionHost {
	readonly stats: TcpStats;
	readonly wheel: TimeoutWheel;
	readonly backends: Backends;
	readonly idleTimeoutSecs: number;
	readonly maxMessageBytes: number;
	/* One gate per condition, so that a frequent one cannot silence another. */
	readonly okTimeoutLog: GatedLog;
	readonly invalidLog: GatedLog;
	/** The client half-closed after a whole query, before the OK: the first to go at the cap. */
	clientGone(proxy: TcpProxy): void;
	/** The session flows: it is no longer one to close first. */
	flowing(proxy: TcpProxy): void;
	/** The proxy has closed both sockets (or is closed). */
	released(proxy: TcpProxy): void;
}

export class TcpProxy {
	readonly log: Logger;
	private current: TcpProxyState = { name: 'connecting', client: 'reading' };
	private readonly back: net.Socket;
	private readonly deadline: Timeout;
	private readonly firstFrame = new FirstFrameSink(FRAME_INBOUND_TCP_OK);
	/* No frame on a TCP session has a payload: a UDP frame is refused on its header. */
	private readonly okReader = new FrameReader(this.firstFrame, 0);
	private readonly follower: MessageFollower;
	private lastActivityMs: number;
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
		this.follower = new MessageFollower(host.maxMessageBytes);
		const wheel = host.wheel;
		this.lastActivityMs = wheel.nowMs;
		this.deadline = wheel.create(`tcp ${id} deadline`, () => this.deadlineDue());
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
			/* Nothing more can reach the closed side: end the other gently. */
			const open = side === 'front' ? 'back' : 'front';
			this.advance({ name: 'closing', open });
			const other = open === 'front' ? this.front : this.back;
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
		if (!this.followClient(chunk)) {
			return;
		}
		this.early.push(chunk);
		this.earlyBytes += chunk.length;
		if (this.earlyBytes >= this.host.maxMessageBytes + TCP_LENGTH_PREFIX_BYTES) {
			this.front.pause();
			this.clientNow('paused');
		}
	};

	private readonly frontOnEarlyEnd = (): void => {
		if (this.follower.messages === 0) {
			this.log.debug('client hung up before sending a whole query');
			this.host.stats.abandoned++;
			this.teardown();
			return;
		}
		this.clientNow('ended');
		this.host.clientGone(this);
	};

	/** Closed to make room: the client half-closed before the session flowed. */
	evict(): void {
		this.log.debug('closing connection whose client hung up before INBOUND_TCP_OK (making room)');
		this.host.stats.abandoned++;
		this.teardown();
	}

	/* The OK is in: join the two sockets; `rest` is the start of the answer. */
	private flow(rest: Buffer): void {
		const { front, back } = this;
		const clientEnded = this.current.name === 'awaiting OK' && this.current.client === 'ended';
		back.removeListener('data', this.backOnFirstData);
		back.removeListener('end', this.backOnEarlyEnd);
		front.removeListener('data', this.frontOnEarlyData);
		front.removeListener('end', this.frontOnEarlyEnd);
		this.host.flowing(this);
		this.advance({ name: 'flowing', front: clientEnded ? 'ended' : 'open', back: 'open' });
		this.backend.stats.tcp++;
		this.host.stats.established++;
		this.touch();
		this.deadline.set(this.host.idleTimeoutSecs);
		if (rest.length > 0) {
			front.write(rest);
		}
		/* Backend to client: pipe() carries backpressure and the FIN. */
		back.on('data', this.touch);
		back.on('end', this.backOnEnd);
		back.pipe(front);
		/* Client to backend: by hand, the same way, following messages. */
		let more = true;
		for (const chunk of this.early) {
			more = back.write(chunk);
		}
		this.early = [];
		if (clientEnded) {
			back.end();
			return;
		}
		front.on('data', this.frontOnData);
		front.on('end', this.frontOnEnd);
		back.on('drain', this.backOnDrain);
		if (more) {
			front.resume();
		} else {
			front.pause();
		}
	}

	/* ---- flowing ---- */

	/* Follow a chunk from the client; false when the connection was closed for it. */
	private followClient(chunk: Buffer): boolean {
		this.touch();
		const problem = this.follower.feed(chunk);
		if (problem === null) {
			return true;
		}
		this.host.stats.invalid++;
		this.host.invalidLog.report(this.log, () => ({ problem: describeProblem(problem) }));
		this.teardown();
		return false;
	}

	private readonly frontOnData = (chunk: Buffer): void => {
		if (this.followClient(chunk) && !this.back.write(chunk)) {
			this.front.pause();
		}
	};

	private readonly backOnDrain = (): void => {
		this.front.resume();
	};

	private readonly frontOnEnd = (): void => {
		this.sideEnded('front');
		this.back.end();
	};

	/* pipe() passes the backend's FIN to the client; this only notes it. */
	private readonly backOnEnd = (): void => {
		this.sideEnded('back');
	};

	/* ---- deadlines ---- */

	private readonly touch = (): void => {
		this.lastActivityMs = this.host.wheel.nowMs;
	};

	private deadlineDue(): void {
		const name = this.current.name;
		if (name === 'connecting' || name === 'awaiting OK') {
			this.host.stats.okTimeouts++;
			this.host.okTimeoutLog.report(this.log, { deadline_secs: TCP_OK_DEADLINE_SECS });
			this.backend.fault('TCP session: no INBOUND_TCP_OK in time', { conn_id: this.id });
			this.teardown();
			return;
		}
		if (name === 'closed') {
			return;
		}
		const idleSecs = (this.host.wheel.nowMs - this.lastActivityMs) / 1000;
		const limit = this.host.idleTimeoutSecs;
		if (idleSecs < limit) {
			/* Activity since arming: wait for the rest of the period. */
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

	private readonly frontOnClose = (): void => {
		this.socketClosed('front');
	};

	private readonly backOnClose = (): void => {
		this.socketClosed('back');
	};

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
		this.front.on('error', ignoreError);
		this.back.on('error', ignoreError);
		this.host.released(this);
		this.log.debug('tcp connection closed');
	}
}
