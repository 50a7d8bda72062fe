/*
 * TCP LISTENER
 *
 * The TCP port, and the policy of who may hold one of its connections.
 * Each accepted connection becomes a TcpProxy (tcp_proxy.ts), which owns
 * that one proxied session from then on; this file decides whether a
 * connection becomes one at all, and which proxy goes when room is needed.
 *
 * ADMISSION.  A new connection is checked in this order, and the first
 * check it fails closes it at once, counted under its own reason:
 *
 *   shutting down      bbal is closing.
 *   --allow            the source is outside it.  First, so that an outsider
 *                      creates nothing (no remote) and evicts nobody.
 *   per source         the source already holds --max-tcp-per-remote
 *                      connections (16 by default).  Binder's clients are
 *                      stub resolvers, one or two connections each; one host
 *                      holding dozens is hoarding the pool, and must not be
 *                      able to make room for itself by evicting others, so
 *                      this comes before the global cap.
 *   no backend         none is ok for the source's remote.  The remote is
 *                      looked up (and made) here, before any eviction, so a
 *                      newcomer that cannot be served evicts nobody.  (TCP
 *                      sources have finished a handshake, so they cannot be
 *                      sprayed from spoofed addresses as datagrams can; that
 *                      is why a remote is made at accept rather than after
 *                      the first valid query.)
 *   the global cap     --max-tcp-connections (512 by default) are open: one
 *                      is closed to make room (below) and the newcomer kept.
 *
 * MAKING ROOM (RFC 7766 6.2.3: close idle connections first, then slow
 * ones).  Every proxy is in exactly one of three queues, each kept in the
 * order its members last made progress (a whole query in or answer out),
 * because a proxy is moved to the tail of its queue whenever it makes
 * progress, at the wheel's current time, which only grows:
 *
 *   abandoned   the client half-closed after a query, before the backend's
 *               OK (it may have given up).  Oldest first.
 *   idle        nothing outstanding: the backend owes it no answer.  A
 *               client that trickles a byte now and then never completes a
 *               message, so it stays where its accept put it, and goes first.
 *   busy        queries outstanding: closed only when no idle one is left,
 *               the one whose last progress is oldest (the slowest).
 *
 * The victim is the head of the first non-empty queue: O(1) per accept
 * (JavaScript Sets keep insertion order; delete and add move a member to
 * the tail in O(1)), and O(1) per whole message to keep the queues.
 *
 * LOGS.  Every condition that can repeat per connection has a GatedLog of
 * its own here, so that a frequent one cannot silence another; the proxies
 * report theirs through the same listener.
 *
 * close() stops accepting, lets flowing sessions finish for TCP_DRAIN_MS
 * and then cuts what is left.  Who calls it: balancer.ts builds one and
 * stats.ts and metrics.ts read its counters.
 */

import type net from 'node:net';
import { createServer } from 'node:net';
import type { Logger } from 'pino';
import type { Backends } from './backends.js';
import type { Acl } from './dns.js';
import { handleFd } from './fd_pass.js';
import { GatedLog, ignoreError } from './log.js';
import { ipv4ToU32 } from './protocol.js';
import type { Remotes } from './remotes.js';
import { DEFAULT_MAX_TCP_MESSAGE_BYTES } from './tcp_messages.js';
import {
	DEFAULT_MAX_TCP_QUERIES_PER_CONN, DEFAULT_TCP_IDLE_TIMEOUT_SECS, TcpProxy, type TcpSessionHost,
} from './tcp_proxy.js';
import type { TimeoutWheel } from './timeouts.js';

export { DEFAULT_MAX_TCP_MESSAGE_BYTES } from './tcp_messages.js';
export {
	DEFAULT_MAX_TCP_QUERIES_PER_CONN, DEFAULT_TCP_IDLE_TIMEOUT_SECS, TCP_MESSAGE_DEADLINE_SECS, TCP_OK_DEADLINE_SECS,
} from './tcp_proxy.js';
export const TCP_BACKLOG = 1000;
export const DEFAULT_MAX_TCP_CONNECTIONS = 512;
/** The default for --max-tcp-per-remote (see ADMISSION). */
export const DEFAULT_MAX_TCP_PER_REMOTE = 16;
/** The default for --max-tcp-queries-per-remote (BACKPRESSURE in tcp_proxy.ts). */
export const DEFAULT_MAX_TCP_QUERIES_PER_REMOTE = 8;
/* How long close() lets flowing sessions finish before cutting them. */
export const TCP_DRAIN_MS = 3000;

/** The TCP path's counters: the listener's totals, counted by it and by its proxies. */
export interface TcpListenerStats {
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
	overRemoteCap: number; /* closed at once: the source holds --max-tcp-per-remote */
	evictedIdle: number; /* closed to make room at the cap: nothing outstanding, idle longest */
	evictedBusy: number; /* closed to make room at the cap: none idle, this one slowest */
	messageTimeouts: number; /* a query not whole within TCP_MESSAGE_DEADLINE_SECS of its first byte */
	pausedClientNotReading: number; /* times the client was paused: it was not reading its answers */
	pausedBackendNotReading: number; /* times the client was paused: the backend was not reading */
	pausedQueryCap: number; /* times the client was paused: --max-tcp-queries-per-conn outstanding */
	pausedSourceQueryCap: number; /* ... its source's connections had --max-tcp-queries-per-remote outstanding */
}

export interface TcpOptions {
	remotes: Remotes;
	backends: Backends;
	wheel: TimeoutWheel;
	log: Logger;
	idleTimeoutSecs?: number;
	maxConnections?: number;
	maxMessageBytes?: number;
	maxPerRemote?: number;
	maxQueriesPerConn?: number;
	maxQueriesPerRemote?: number;
	acl?: Acl;
}

/* One source address's open connections and what the backends owe them all. */
interface Source {
	readonly proxies: Set<TcpProxy>;
	outstanding: number;
}

export class TcpListener implements TcpSessionHost {
	readonly stats: TcpListenerStats = {
		accepted: 0, overCap: 0, noBackend: 0, established: 0, idleClosed: 0, badFirstFrame: 0, okTimeouts: 0,
		abandoned: 0, aclDropped: 0, invalid: 0, overRemoteCap: 0, evictedIdle: 0, evictedBusy: 0, messageTimeouts: 0,
		pausedClientNotReading: 0, pausedBackendNotReading: 0, pausedQueryCap: 0,
		pausedSourceQueryCap: 0,
	};
	readonly log: Logger;
	readonly wheel: TimeoutWheel;
	readonly backends: Backends;
	readonly idleTimeoutSecs: number;
	readonly maxConnections: number;
	readonly maxMessageBytes: number;
	readonly maxPerRemote: number;
	readonly maxQueriesPerConn: number;
	readonly maxQueriesPerRemote: number;
	/* One gate per condition, so that a frequent one cannot silence another. */
	readonly okTimeoutLog: GatedLog;
	readonly invalidLog: GatedLog;
	readonly messageDeadlineLog: GatedLog;
	private readonly overCapLog: GatedLog;
	private readonly overRemoteCapLog: GatedLog;
	private readonly noBackendLog: GatedLog;
	private readonly aclLog: GatedLog;
	private readonly acl: Acl | null;
	private readonly remotes: Remotes;
	private readonly server: net.Server;
	private readonly proxies = new Set<TcpProxy>();
	/* The queues of MAKING ROOM; every proxy is in exactly one, least recent progress first. */
	private readonly abandoned = new Set<TcpProxy>();
	private readonly idle = new Set<TcpProxy>();
	private readonly busy = new Set<TcpProxy>();
	/* The open connections of each source address (u32); a source with none has no entry. */
	private readonly perSource = new Map<number, Source>();
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
		this.maxPerRemote = opts.maxPerRemote ?? DEFAULT_MAX_TCP_PER_REMOTE;
		this.maxQueriesPerConn = opts.maxQueriesPerConn ?? DEFAULT_MAX_TCP_QUERIES_PER_CONN;
		this.maxQueriesPerRemote = opts.maxQueriesPerRemote ?? DEFAULT_MAX_TCP_QUERIES_PER_REMOTE;
		this.acl = opts.acl === undefined || opts.acl.open ? null : opts.acl;
		const wheel = opts.wheel;
		this.okTimeoutLog = new GatedLog(wheel, 'error', 'no INBOUND_TCP_OK from backend');
		this.invalidLog = new GatedLog(wheel, 'warn', 'closing tcp connection that is not DNS');
		this.messageDeadlineLog = new GatedLog(wheel, 'warn', 'tcp query not whole in time (closing connection)');
		this.overCapLog = new GatedLog(wheel, 'warn', 'too many tcp connections (closing new connection)');
		this.overRemoteCapLog = new GatedLog(wheel, 'warn', 'too many tcp connections from one source (closing new connection)');
		this.noBackendLog = new GatedLog(wheel, 'warn', 'no backend for remote (closing tcp connection)');
		this.aclLog = new GatedLog(wheel, 'warn', 'tcp connection from outside --allow (closed)');
		this.server = createServer({ allowHalfOpen: true, pauseOnConnect: true });
		this.server.on('connection', this.serverOnConnection);
	}

	/** The listening socket's descriptor, for a takeover to pass on (-1 when not listening). */
	get fd(): number {
		return this.state === 'listening' ? handleFd(this.server) : -1;
	}

	/** Open TCP connections right now. */
	get size(): number {
		return this.proxies.size;
	}

	/** Listen on host:port or, given `fd` (a takeover's), on that listening socket. */
	listen(host: string, port: number, fd?: number): Promise<void> {
		return new Promise((resolve, reject) => {
			const onError = (err: Error): void => {
				this.state = 'closed';
				reject(err);
			};
			this.server.once('error', onError);
			const where = fd === undefined ? { host, port, backlog: TCP_BACKLOG, exclusive: true } : { fd, backlog: TCP_BACKLOG };
			this.server.listen(where, () => {
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
		const addr = ipv4ToU32(front.remoteAddress ?? '');
		if (this.state !== 'listening' || addr < 0) {
			front.destroy();
			return;
		}
		if (this.acl !== null && !this.acl.allows(addr)) {
			this.stats.aclDropped++;
			this.aclLog.report(this.log, () => ({ remote_ip: front.remoteAddress }));
			front.destroy();
			return;
		}
		const held = this.perSource.get(addr)?.proxies.size ?? 0;
		if (held >= this.maxPerRemote) {
			this.stats.overRemoteCap++;
			this.overRemoteCapLog.report(this.log, () => ({ remote_ip: front.remoteAddress, max: this.maxPerRemote }));
			front.destroy();
			return;
		}
		const rem = this.remotes.lookup(addr);
		const be = rem.chooseBackend();
		if (be === null) {
			rem.tcpDrop++;
			this.stats.noBackend++;
			this.noBackendLog.report(rem.log);
			front.destroy();
			return;
		}
		if (this.proxies.size >= this.maxConnections && !this.makeRoom()) {
			this.stats.overCap++;
			this.overCapLog.report(this.log, { max: this.maxConnections });
			front.destroy();
			return;
		}
		front.removeListener('error', ignoreError);
		rem.tcp++;
		const proxy = new TcpProxy(this, this.nextConnId++, front, rem, be, front.remotePort ?? 0);
		let source = this.perSource.get(addr);
		if (source === undefined) {
			source = { proxies: new Set(), outstanding: 0 };
			this.perSource.set(addr, source);
		}
		source.proxies.add(proxy);
		this.proxies.add(proxy);
		if (proxy.state.name !== 'closed') {
			this.idle.add(proxy);
		}
	};

	/* Close one connection to make room (see MAKING ROOM); false if there was none to close. */
	private makeRoom(): boolean {
		for (const [queue, why] of [[this.abandoned, 'abandoned'], [this.idle, 'idle'], [this.busy, 'busy']] as const) {
			const head = queue.values().next();
			if (!head.done) {
				if (why === 'abandoned') {
					this.stats.abandoned++;
				} else if (why === 'idle') {
					this.stats.evictedIdle++;
				} else {
					this.stats.evictedBusy++;
				}
				head.value.evict();
				return true;
			}
		}
		return false;
	}

	private readonly serverOnError = (err: Error): void => {
		this.log.error({ err }, 'tcp listener error');
	};

	clientGone(proxy: TcpProxy): void {
		this.idle.delete(proxy);
		this.busy.delete(proxy);
		this.abandoned.add(proxy);
	}

	flowing(proxy: TcpProxy): void {
		if (this.abandoned.delete(proxy)) {
			this.progressed(proxy);
		}
	}

	sourceRoom(proxy: TcpProxy): number {
		return this.maxQueriesPerRemote - (this.perSource.get(proxy.remote.addr)?.outstanding ?? 0);
	}

	progressed(proxy: TcpProxy): void {
		if (!this.proxies.has(proxy)) {
			return;
		}
		this.countOutstanding(proxy, proxy.outstanding);
		if (this.abandoned.has(proxy)) {
			return;
		}
		/* To the tail of its queue: the queues stay in order of last progress. */
		this.idle.delete(proxy);
		this.busy.delete(proxy);
		(proxy.outstanding === 0 ? this.idle : this.busy).add(proxy);
	}

	released(proxy: TcpProxy): void {
		if (!this.proxies.delete(proxy)) {
			return;
		}
		this.abandoned.delete(proxy);
		this.idle.delete(proxy);
		this.busy.delete(proxy);
		this.countOutstanding(proxy, 0);
		const addr = proxy.remote.addr;
		const source = this.perSource.get(addr);
		source?.proxies.delete(proxy);
		if (source?.proxies.size === 0) {
			this.perSource.delete(addr);
		}
		if (this.proxies.size === 0 && this.whenEmpty !== null) {
			this.whenEmpty();
		}
	}

	/*
	 * Count what the proxy's source is owed (BACKPRESSURE in
	 * tcp_proxy.ts): the proxy's share is now `now`.  When that makes room
	 * at a source that had none, its other connections may read again.
	 */
	private countOutstanding(proxy: TcpProxy, now: number): void {
		const source = this.perSource.get(proxy.remote.addr);
		const delta = now - proxy.sourceCounted;
		if (source === undefined || delta === 0) {
			return;
		}
		const wasFull = source.outstanding >= this.maxQueriesPerRemote;
		source.outstanding += delta;
		proxy.sourceCounted = now;
		if (wasFull && source.outstanding < this.maxQueriesPerRemote) {
			for (const other of source.proxies) {
				if (other !== proxy) {
					other.regulate();
				}
			}
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
