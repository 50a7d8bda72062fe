/*
 * TCP LISTENER
 *
 * The TCP port, and the policy of who may hold one of its connections.
 * Each accepted connection becomes a TcpProxy (tcp_proxy.ts), which owns
 * that one proxied session from then on; this file decides whether a
 * connection becomes one at all, and which proxy goes when room is needed.
 *
 * ADMISSION.  A new connection is checked in this order, and the first
 * check it fails closes it at once, counted under its own reason: bbal is
 * shutting down; the source is outside --allow; no backend is ok for the
 * source's remote.  Only then is the remote looked up and a proxy made.
 *
 * THE CAP.  At most --max-tcp-connections (512 by default) are open at
 * once.  A connection whose client half-closed after a whole query, before
 * its backend's INBOUND_TCP_OK, is the first to go to make room (see "A
 * CLIENT THAT HANGS UP FIRST" in tcp_proxy.ts); with none such, a newcomer
 * over the cap is closed at once and counted.
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
import { GatedLog, ignoreError } from './log.js';
import { ipv4ToU32 } from './protocol.js';
import type { Remotes } from './remotes.js';
import { DEFAULT_MAX_TCP_MESSAGE_BYTES } from './tcp_messages.js';
import { DEFAULT_TCP_IDLE_TIMEOUT_SECS, TcpProxy, type TcpSessionHost, type TcpStats } from './tcp_proxy.js';
import type { TimeoutWheel } from './timeouts.js';

export { DEFAULT_MAX_TCP_MESSAGE_BYTES } from './tcp_messages.js';
export { DEFAULT_TCP_IDLE_TIMEOUT_SECS, TCP_OK_DEADLINE_SECS } from './tcp_proxy.js';
export const TCP_BACKLOG = 1000;
export const DEFAULT_MAX_TCP_CONNECTIONS = 512;
/* How long close() lets flowing sessions finish before cutting them. */
export const TCP_DRAIN_MS = 3000;

export type TcpListenerStats = TcpStats;

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

export class TcpListener implements TcpSessionHost {
	readonly stats: TcpStats = {
		accepted: 0, overCap: 0, noBackend: 0, established: 0, idleClosed: 0, badFirstFrame: 0, okTimeouts: 0,
		abandoned: 0, aclDropped: 0, invalid: 0,
	};
	readonly log: Logger;
	readonly wheel: TimeoutWheel;
	readonly backends: Backends;
	readonly idleTimeoutSecs: number;
	readonly maxConnections: number;
	readonly maxMessageBytes: number;
	/* One gate per condition, so that a frequent one cannot silence another. */
	readonly okTimeoutLog: GatedLog;
	readonly invalidLog: GatedLog;
	private readonly overCapLog: GatedLog;
	private readonly noBackendLog: GatedLog;
	private readonly aclLog: GatedLog;
	private readonly acl: Acl | null;
	private readonly remotes: Remotes;
	private readonly server: net.Server;
	private readonly proxies = new Set<TcpProxy>();
	/* Proxies whose client half-closed after a whole query, before the OK; oldest first. */
	readonly evictable = new Set<TcpProxy>();
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
		const wheel = opts.wheel;
		this.okTimeoutLog = new GatedLog(wheel, 'error', 'no INBOUND_TCP_OK from backend');
		this.invalidLog = new GatedLog(wheel, 'warn', 'closing tcp connection that is not DNS');
		this.overCapLog = new GatedLog(wheel, 'warn', 'too many tcp connections (closing new connection)');
		this.noBackendLog = new GatedLog(wheel, 'warn', 'no backend for remote (closing tcp connection)');
		this.aclLog = new GatedLog(wheel, 'warn', 'tcp connection from outside --allow (closed)');
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
			const oldest = this.evictable.values().next();
			if (!oldest.done) {
				oldest.value.evict();
			}
		}
		if (this.state !== 'listening' || this.proxies.size >= this.maxConnections) {
			this.stats.overCap++;
			this.overCapLog.report(this.log, { max: this.maxConnections });
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
			this.aclLog.report(this.log, () => ({ remote_ip: front.remoteAddress }));
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
		front.removeListener('error', ignoreError);
		rem.tcp++;
		const proxy = new TcpProxy(this, this.nextConnId++, front, rem, be, front.remotePort ?? 0);
		this.proxies.add(proxy);
	};

	private readonly serverOnError = (err: Error): void => {
		this.log.error({ err }, 'tcp listener error');
	};

	clientGone(proxy: TcpProxy): void {
		this.evictable.add(proxy);
	}

	flowing(proxy: TcpProxy): void {
		this.evictable.delete(proxy);
	}

	released(proxy: TcpProxy): void {
		this.proxies.delete(proxy);
		this.evictable.delete(proxy);
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
