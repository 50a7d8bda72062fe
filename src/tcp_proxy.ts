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
 * session (the back) and walks them through four states:
 *
 *   connecting ---> awaiting OK ---> flowing ---> closed
 *       |                |              |
 *       +----------------+--------------+--> closed  (error, deadline, bad frame)
 *
 *   connecting   the back is being connected; INBOUND_TCP (client address
 *                and port) goes out as soon as it is.
 *   awaiting OK  the backend must answer INBOUND_TCP_OK within 10 seconds.
 *                Missing that faults the backend: a backend that cannot take
 *                a TCP session in ten seconds is not healthy.  Any other first
 *                frame tears this proxy down but does not fault the backend,
 *                whose control session may be perfectly fine.
 *   flowing      bytes pass both ways verbatim, with backpressure (pipe): a
 *                slow reader on either side pauses the other, so bbal never
 *                buffers an unbounded answer.  A FIN from one side is passed
 *                to the other once its bytes have gone; the proxy is done
 *                when both sockets have closed.
 *   closed       both sockets destroyed, the timeout cleared, the object
 *                forgotten by the listener.
 *
 * Until the OK arrives the client is read into a small buffer, at most one
 * maximal message (beyond that it is paused and the rest waits in the
 * kernel); the buffer goes to the backend, in order, the moment the session
 * flows.  Bytes that follow the OK in the same read from the backend are the
 * start of the answer and go to the client before anything else.
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
 * WATCHING THE CLIENT.  The client's bytes pass through unchanged, but bbal
 * follows its message boundaries as they go (each DNS message over TCP is a
 * 2-byte length and that many bytes), which costs a few comparisons per
 * chunk.  The first message must pass the same header check as a datagram
 * (dns.ts), and no message may be shorter than a DNS header or longer than
 * --max-tcp-message (16 KiB by default; real queries, even UPDATEs, are far
 * smaller).  A violator's connection is closed and counted.  Connections
 * from outside --allow are closed at accept.
 *
 * BOUNDS.  A connection with no bytes in either direction for the idle
 * deadline (10 s by default, `--tcp-idle-timeout`; RFC 7766 6.2.3 asks for
 * seconds, not minutes) is closed, which also disposes of clients that send
 * half a length prefix and stall.  At most `--max-tcp-connections` (512 by
 * default) are open at once; over the cap a new connection is closed at once
 * and counted.  Every condition stays local to its connection: UDP and the
 * other TCP clients never notice.
 */

import type net from 'node:net';
import { createServer } from 'node:net';
import type { Logger } from 'pino';
import type { Backend, Backends } from './backends.js';
import { type Acl, checkQueryHeader, DNS_HEADER_BYTES, HEADER_OK, HEADER_PROBLEMS } from './dns.js';
import { encodeInboundTcp, FRAME_INBOUND_TCP_OK, FRAME_NAMES, ipv4ToU32 } from './protocol.js';
import type { Remote, Remotes } from './remotes.js';
import { ignoreError, LogGate } from './log.js';
import type { Timeout, TimeoutWheel } from './timeouts.js';

export const TCP_BACKLOG = 1000;
export const TCP_OK_DEADLINE_SECS = 10;
export const DEFAULT_TCP_IDLE_TIMEOUT_SECS = 10;
export const DEFAULT_MAX_TCP_CONNECTIONS = 512;
export const DEFAULT_MAX_TCP_MESSAGE_BYTES = 16 * 1024;
/* How long close() lets flowing sessions finish before cutting them. */
export const TCP_DRAIN_MS = 3000;

export type TcpProxyState = 'connecting' | 'awaiting OK' | 'flowing' | 'closed';

export interface TcpListenerStats {
	/** Connections accepted. */
	accepted: number;
	/** Closed at once: over --max-tcp-connections. */
	overCap: number;
	/** Closed at once: no backend ok. */
	noBackend: number;
	/** Sessions that reached the flowing state. */
	established: number;
	/** Closed by the idle deadline. */
	idleClosed: number;
	/** Torn down because the backend's first frame was not INBOUND_TCP_OK. */
	badFirstFrame: number;
	/** The backend missed the INBOUND_TCP_OK deadline. */
	okTimeouts: number;
	/** Closed because the client hung up before the backend's INBOUND_TCP_OK. */
	abandoned: number;
	/** Closed at accept: source outside --allow. */
	aclDropped: number;
	/** Closed: not a DNS query first, or a message too short or too long. */
	invalid: number;
}

export interface TcpOptions {
	remotes: Remotes;
	backends: Backends;
	wheel: TimeoutWheel;
	log: Logger;
	idleTimeoutSecs?: number;
	maxConnections?: number;
	maxMessageBytes?: number;
	acl?: Acl;
}

export class TcpProxy {
	state: TcpProxyState = 'connecting';
	readonly log: Logger;
	private readonly back: net.Socket;
	private readonly deadline: Timeout;
	/* Bytes of the OK frame read so far (it may arrive split). */
	private okBytes = Buffer.alloc(4);
	private okLen = 0;
	private lastActivityMs: number;
	private frontClosed = false;
	private backClosed = false;
	/* Following the client's messages: bytes left of the current one, a
	 * length prefix split across chunks, the first message's header. */
	private msgRemaining = 0;
	private prefixHi = -1;
	private header: Buffer | null = Buffer.alloc(DNS_HEADER_BYTES);
	private headerLen = 0;
	/* Whole messages seen from the client so far. */
	private messagesIn = 0;
	/* What the client sent before the session flowed, and whether it ended. */
	private early: Buffer[] = [];
	private earlyBytes = 0;
	private frontEnded = false;

	constructor(
		private readonly listener: TcpListener,
		readonly id: number,
		private readonly front: net.Socket,
		readonly remote: Remote,
		readonly backend: Backend,
		private readonly remotePort: number,
	) {
		this.log = listener.log.child({
			conn_id: id, remote_ip: remote.ip, remote_port: remotePort, backend: backend.id,
		});
		const wheel = listener.wheel;
		this.lastActivityMs = wheel.nowMs;
		this.deadline = wheel.create(`tcp ${id} deadline`, () => this.deadlineDue());
		this.deadline.set(TCP_OK_DEADLINE_SECS);

		front.on('error', this.frontOnError);
		front.on('close', this.frontOnClose);
		front.on('data', this.frontOnEarlyData);
		front.on('end', this.frontOnEarlyEnd);
		front.setNoDelay(true);
		front.resume();

		this.back = listener.backends.connector(backend.path);
		this.back.on('error', this.backOnError);
		this.back.on('close', this.backOnClose);
		this.back.on('connect', this.backOnConnect);
		this.back.on('data', this.backOnFirstData);
		this.back.on('end', this.backOnEarlyEnd);
		this.log.debug('tcp connection accepted');
	}

	private setState(next: TcpProxyState): void {
		if (this.log.isLevelEnabled('trace')) {
			this.log.trace({ from: this.state, to: next }, 'tcp proxy state');
		}
		this.state = next;
	}

	/* ---- connecting, awaiting OK ---- */

	private readonly backOnConnect = (): void => {
		this.back.write(encodeInboundTcp(this.remote.addr, this.remotePort));
		this.setState('awaiting OK');
	};

	private readonly backOnFirstData = (chunk: Buffer): void => {
		const take = Math.min(4 - this.okLen, chunk.length);
		chunk.copy(this.okBytes, this.okLen, 0, take);
		this.okLen += take;
		if (this.okLen < 4) {
			return;
		}
		const type = this.okBytes.readUInt32LE(0);
		if (type !== FRAME_INBOUND_TCP_OK) {
			this.listener.stats.badFirstFrame++;
			this.log.warn({ frame_type: type, frame_name: FRAME_NAMES[type] },
				'backend answered INBOUND_TCP with the wrong frame (closing connection)');
			this.teardown();
			return;
		}
		this.flow(chunk.subarray(take));
	};

	private readonly backOnEarlyEnd = (): void => {
		this.log.warn('backend closed the TCP session before INBOUND_TCP_OK');
		this.teardown();
	};

	private readonly frontOnEarlyData = (chunk: Buffer): void => {
		if (!this.acceptFromClient(chunk)) {
			return;
		}
		this.early.push(chunk);
		this.earlyBytes += chunk.length;
		if (this.earlyBytes >= this.listener.maxMessageBytes + 2) {
			this.front.pause();
		}
	};

	private readonly frontOnEarlyEnd = (): void => {
		this.frontEnded = true;
		if (this.messagesIn === 0) {
			this.log.debug('client hung up before sending a whole query');
			this.listener.stats.abandoned++;
			this.teardown();
			return;
		}
		this.listener.hungUp(this);
	};

	/** Closed to make room: the client half-closed before the session flowed. */
	evict(): void {
		this.log.debug('closing connection whose client hung up before INBOUND_TCP_OK (making room)');
		this.listener.stats.abandoned++;
		this.teardown();
	}

	/* The OK is in: join the two sockets. */
	private flow(rest: Buffer): void {
		const { front, back } = this;
		back.removeListener('data', this.backOnFirstData);
		back.removeListener('end', this.backOnEarlyEnd);
		front.removeListener('data', this.frontOnEarlyData);
		front.removeListener('end', this.frontOnEarlyEnd);
		this.listener.notHungUp(this);
		this.setState('flowing');
		this.backend.stats.tcp++;
		this.listener.stats.established++;
		this.touch();
		this.deadline.set(this.listener.idleTimeoutSecs);
		if (rest.length > 0) {
			front.write(rest);
		}
		/* Backend to client: pipe() carries backpressure and the FIN. */
		back.on('data', this.touch);
		back.pipe(front);
		/* Client to backend: by hand, the same way, watching messages. */
		let more = true;
		for (const chunk of this.early) {
			more = back.write(chunk);
		}
		this.early = [];
		if (this.frontEnded) {
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

	/* Check a chunk from the client; false when the connection was closed for it. */
	private acceptFromClient(chunk: Buffer): boolean {
		this.touch();
		const problem = this.followMessages(chunk);
		if (problem === null) {
			return true;
		}
		this.listener.stats.invalid++;
		this.listener.logInvalid(this, problem);
		this.teardown();
		return false;
	}

	private readonly frontOnData = (chunk: Buffer): void => {
		if (this.acceptFromClient(chunk) && !this.back.write(chunk)) {
			this.front.pause();
		}
	};

	private readonly backOnDrain = (): void => {
		this.front.resume();
	};

	private readonly frontOnEnd = (): void => {
		this.back.end();
	};

	/*
	 * Walk the message boundaries in this chunk of the client's stream.
	 * Returns what is wrong, or null when all is well so far.
	 */
	private followMessages(chunk: Buffer): string | null {
		const n = chunk.length;
		let off = 0;
		while (off < n) {
			if (this.msgRemaining === 0) {
				let len: number;
				if (this.prefixHi >= 0) {
					len = (this.prefixHi << 8) | (chunk[off]);
					this.prefixHi = -1;
					off += 1;
				} else if (n - off >= 2) {
					len = chunk.readUInt16BE(off);
					off += 2;
				} else {
					this.prefixHi = chunk[off];
					return null;
				}
				if (len < DNS_HEADER_BYTES) {
					return `message of ${len} bytes is shorter than a DNS header`;
				}
				if (len > this.listener.maxMessageBytes) {
					return `message of ${len} bytes is over the ${this.listener.maxMessageBytes}-byte limit`;
				}
				this.msgRemaining = len;
				continue;
			}
			const take = Math.min(this.msgRemaining, n - off);
			const header = this.header;
			if (header !== null) {
				const h = Math.min(DNS_HEADER_BYTES - this.headerLen, take);
				chunk.copy(header, this.headerLen, off, off + h);
				this.headerLen += h;
				if (this.headerLen === DNS_HEADER_BYTES) {
					this.header = null;
					const problem = checkQueryHeader(header);
					if (problem !== HEADER_OK) {
						return `first message is ${HEADER_PROBLEMS[problem]}`;
					}
				}
			}
			this.msgRemaining -= take;
			off += take;
			if (this.msgRemaining === 0) {
				this.messagesIn++;
			}
		}
		return null;
	}

	/* ---- deadlines ---- */

	private readonly touch = (): void => {
		this.lastActivityMs = this.listener.wheel.nowMs;
	};

	private deadlineDue(): void {
		if (this.state === 'connecting' || this.state === 'awaiting OK') {
			this.listener.stats.okTimeouts++;
			const skipped = this.listener.okTimeoutGate.open();
			if (skipped >= 0) {
				this.log.error({ deadline_secs: TCP_OK_DEADLINE_SECS, not_logged: skipped }, 'no INBOUND_TCP_OK from backend');
			}
			this.backend.fault('TCP session: no INBOUND_TCP_OK in time', { conn_id: this.id });
			this.teardown();
			return;
		}
		if (this.state !== 'flowing') {
			return;
		}
		const idleSecs = (this.listener.wheel.nowMs - this.lastActivityMs) / 1000;
		const limit = this.listener.idleTimeoutSecs;
		if (idleSecs < limit) {
			/* Activity since arming: wait for the rest of the period. */
			this.deadline.set(Math.max(1, Math.ceil(limit - idleSecs)));
			return;
		}
		this.listener.stats.idleClosed++;
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
		if (err.code === 'ENOENT' && this.state === 'connecting') {
			/* The socket file is gone: the next connection should go elsewhere. */
			this.backend.socketGone();
		}
		this.teardown();
	};

	private readonly frontOnClose = (): void => {
		this.frontClosed = true;
		if (!this.backClosed && this.state !== 'flowing') {
			/* The client gave up before the session flowed. */
			this.back.destroy();
		}
		this.closedOne();
	};

	private readonly backOnClose = (): void => {
		this.backClosed = true;
		if (!this.frontClosed && this.state !== 'flowing') {
			this.front.destroy();
		}
		this.closedOne();
	};

	private closedOne(): void {
		if (this.frontClosed && this.backClosed) {
			this.release();
		} else if (this.state === 'flowing' && (this.frontClosed || this.backClosed)) {
			/*
			 * One side is fully closed (not merely half-closed): nothing more
			 * can be delivered to it, so finish the other side gently; the
			 * idle deadline cuts it if the peer never closes.
			 */
			const other = this.frontClosed ? this.back : this.front;
			/* Already ended or closing: end() again would only build an error. */
			if (!other.writableEnded && !other.destroyed) {
				other.end();
			}
		}
	}

	/** Destroy both sockets at once (errors, deadlines, shutdown). */
	teardown(): void {
		if (this.state === 'closed') {
			return;
		}
		this.front.destroy();
		this.back.destroy();
		this.release();
	}

	private release(): void {
		if (this.state === 'closed') {
			return;
		}
		this.setState('closed');
		this.deadline.clear();
		this.front.on('error', ignoreError);
		this.back.on('error', ignoreError);
		this.listener.released(this);
		this.log.debug('tcp connection closed');
	}
}

export class TcpListener {
	readonly stats: TcpListenerStats = {
		accepted: 0, overCap: 0, noBackend: 0, established: 0, idleClosed: 0, badFirstFrame: 0, okTimeouts: 0,
		abandoned: 0, aclDropped: 0, invalid: 0,
	};
	readonly log: Logger;
	readonly wheel: TimeoutWheel;
	readonly backends: Backends;
	readonly idleTimeoutSecs: number;
	readonly maxConnections: number;
	readonly maxMessageBytes: number;
	private readonly acl: Acl | null;
	private readonly remotes: Remotes;
	private readonly server: net.Server;
	private readonly proxies = new Set<TcpProxy>();
	/* Proxies whose client half-closed before the OK, oldest first. */
	private readonly hungUpProxies = new Set<TcpProxy>();
	readonly okTimeoutGate: LogGate;
	private readonly overCapGate: LogGate;
	private readonly noBackendGate: LogGate;
	private readonly aclGate: LogGate;
	private readonly invalidGate: LogGate;
	private nextConnId = 1;
	private state: 'new' | 'listening' | 'closing' | 'closed' = 'new';
	private whenEmpty: (() => void) | null = null;

	constructor(opts: TcpOptions) {
		this.remotes = opts.remotes;
		this.backends = opts.backends;
		this.wheel = opts.wheel;
		this.log = opts.log;
		this.idleTimeoutSecs = opts.idleTimeoutSecs ?? DEFAULT_TCP_IDLE_TIMEOUT_SECS;
		this.maxConnections = opts.maxConnections ?? DEFAULT_MAX_TCP_CONNECTIONS;
		this.maxMessageBytes = opts.maxMessageBytes ?? DEFAULT_MAX_TCP_MESSAGE_BYTES;
		this.acl = opts.acl === undefined || opts.acl.open ? null : opts.acl;
		this.aclGate = new LogGate(opts.wheel);
		this.invalidGate = new LogGate(opts.wheel);
		this.overCapGate = new LogGate(opts.wheel);
		this.noBackendGate = new LogGate(opts.wheel);
		this.okTimeoutGate = new LogGate(opts.wheel);
		this.server = createServer({ allowHalfOpen: true, pauseOnConnect: true });
		this.server.on('connection', this.serverOnConnection);
	}

	/** Open TCP connections right now. */
	get size(): number {
		return this.proxies.size;
	}

	listen(host: string, port: number): Promise<void> {
		return new Promise((resolve, reject) => {
			const onError = (err: Error): void => {
				this.state = 'closed';
				reject(err);
			};
			this.server.once('error', onError);
			this.server.listen({ host, port, backlog: TCP_BACKLOG, exclusive: true }, () => {
				this.server.removeListener('error', onError);
				this.server.on('error', this.serverOnError);
				this.state = 'listening';
				resolve();
			});
		});
	}

	private readonly serverOnConnection = (front: net.Socket): void => {
		front.on('error', ignoreError);
		this.stats.accepted++;
		if (this.proxies.size >= this.maxConnections) {
			/* Room taken by a client that has already gone is given back first. */
			const oldest = this.hungUpProxies.values().next();
			if (!oldest.done) {
				oldest.value.evict();
			}
		}
		if (this.state !== 'listening' || this.proxies.size >= this.maxConnections) {
			this.stats.overCap++;
			const skipped = this.overCapGate.open();
			if (skipped >= 0) {
				this.log.warn({ max: this.maxConnections, not_logged: skipped },
					'too many tcp connections (closing new connection)');
			}
			front.destroy();
			return;
		}
		const addr = ipv4ToU32(front.remoteAddress ?? '');
		if (addr < 0) {
			front.destroy();
			return;
		}
		if (this.acl !== null && !this.acl.allows(addr)) {
			this.stats.aclDropped++;
			const skipped = this.aclGate.open();
			if (skipped >= 0) {
				this.log.warn({ remote_ip: front.remoteAddress, not_logged: skipped },
					'tcp connection from outside --allow (closed)');
			}
			front.destroy();
			return;
		}
		const rem = this.remotes.lookup(addr);
		const be = rem.chooseBackend();
		if (be === null) {
			rem.tcpDrop++;
			this.stats.noBackend++;
			const skipped = this.noBackendGate.open();
			if (skipped >= 0) {
				rem.log.warn({ not_logged: skipped }, 'no backend for remote (closing tcp connection)');
			}
			front.destroy();
			return;
		}
		front.removeListener('error', ignoreError);
		rem.tcp++;
		const proxy = new TcpProxy(this, this.nextConnId++, front, rem, be, front.remotePort ?? 0);
		this.proxies.add(proxy);
	};

	private readonly serverOnError = (err: Error): void => {
		this.log.error({ err }, 'tcp listener error');
	};

	logInvalid(proxy: TcpProxy, problem: string): void {
		const skipped = this.invalidGate.open();
		if (skipped >= 0) {
			proxy.log.warn({ problem, not_logged: skipped }, 'closing tcp connection that is not DNS');
		}
	}

	/** A proxy's client half-closed before the session flowed. */
	hungUp(proxy: TcpProxy): void {
		this.hungUpProxies.add(proxy);
	}

	notHungUp(proxy: TcpProxy): void {
		this.hungUpProxies.delete(proxy);
	}

	/** A proxy has closed both sockets. */
	released(proxy: TcpProxy): void {
		this.proxies.delete(proxy);
		this.hungUpProxies.delete(proxy);
		if (this.proxies.size === 0 && this.whenEmpty !== null) {
			this.whenEmpty();
		}
	}

	/**
	 * Stop accepting; let flowing sessions finish (the client's FIN ends
	 * each) for up to drainMs, then cut whatever is left.
	 */
	async close(drainMs = TCP_DRAIN_MS): Promise<void> {
		if (this.state === 'closing' || this.state === 'closed') {
			return;
		}
		const wasListening = this.state === 'listening';
		this.state = 'closing';
		const closed = wasListening
			? new Promise<void>((resolve) => this.server.close(() => resolve()))
			: Promise.resolve();
		if (this.proxies.size > 0) {
			const empty = new Promise<void>((resolve) => {
				this.whenEmpty = resolve;
			});
			const timer = setTimeout(() => {
				for (const p of [...this.proxies]) {
					p.teardown();
				}
			}, drainMs);
			await empty;
			clearTimeout(timer);
		}
		await closed;
		this.state = 'closed';
	}
}
