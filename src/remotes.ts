/*
 * REMOTES
 *
 * A remote is one peer that sends us DNS, identified by its IPv4 address
 * alone (not the port: a resolver's source port changes with every query).
 * bbal keeps a Remote for each address it has heard from recently and
 * associates it with one backend, so that every query from a host is
 * answered by the same backend process.  That stickiness is what makes the
 * service debuggable: run dig on a host and you exercise the same backend,
 * with the same cache and the same logs, as the host's own software.
 *
 * PRIMARY AND BACKUP.  A remote has a primary backend, chosen round-robin by
 * the registry the first time it needs one.  While the primary is not ok
 * (faulted, reconnecting), the remote borrows a backup, also chosen
 * round-robin; as soon as the primary is ok again the backup is dropped and
 * traffic returns home.  If the backup fails in turn, another is chosen.  A
 * primary whose socket was removed from the directory is not waited for: the
 * remote forgets it and chooses a new primary.  Only the primary counts
 * towards a backend's load (Backend.remotes), because a backup is a
 * temporary arrangement that ends by itself.
 *
 *      backend()  ->  primary ok?          yes: primary (drop any backup)
 *                     primary removed?     yes: forget it, choose afresh
 *                     backup ok?           yes: backup
 *                     otherwise            choose a new backup (or none)
 *
 * INDEXING.  Remotes are kept in two structures.  An AVL tree keyed by the
 * address as a u32 gives the address order that rebalancing walks (so the
 * same remotes move on every balancer given the same history) and that
 * operators read in balstat.  A Map from the same key serves the hot path:
 * one hash lookup per datagram instead of a tree descent.
 *
 * EXPIRY.  A remote not heard from for 300 seconds is forgotten (checked
 * every 30).  This bounds the table by the set of recently active hosts and
 * means a host that comes back later is simply assigned afresh.
 *
 * Times are taken from the timeout wheel's tick ("now" to the nearest
 * second), so a datagram costs no clock read.  Each remote's child logger
 * is made on first use: most remotes never log anything after "new remote
 * peer", and a hundred thousand idle child loggers would be memory for
 * nothing.
 */

import assert from 'node:assert/strict';
import type { Logger } from 'pino';
import { AVLTree } from 'avl';
import type { Backend, Backends } from './backends.js';
import { u32ToIpv4 } from './protocol.js';
import type { TimeoutWheel } from './timeouts.js';

export const REMOTE_IDLE_EXPIRY_SECS = 300;
export const REMOTE_EXPIRY_CHECK_SECS = 30;

export interface RemoteStats {
	udp: number;
	udpDrop: number;
	tcp: number;
	tcpDrop: number;
}

export class Remote {
	primary: Backend | null = null;
	backup: Backend | null = null;
	readonly stats: RemoteStats = { udp: 0, udpDrop: 0, tcp: 0, tcpDrop: 0 };
	lastSeenMs: number;
	readonly firstSeenMs: number;
	private logger: Logger | null = null;

	constructor(
		private readonly table: Remotes,
		readonly addr: number,
		nowMs: number,
	) {
		this.firstSeenMs = nowMs;
		this.lastSeenMs = nowMs;
	}

	get ip(): string {
		return u32ToIpv4(this.addr);
	}

	get log(): Logger {
		if (this.logger === null) {
			this.logger = this.table.log.child({ remote_ip: this.ip });
		}
		return this.logger;
	}

	/**
	 * The backend that should serve this remote now, or null when no
	 * backend is ok.  May assign a primary or a backup on the way.
	 */
	backend(): Backend | null {
		const p = this.primary;
		if (p !== null) {
			if (p.ok) {
				if (this.backup !== null) {
					this.backup = null;
					this.log.info({ be_id: p.id }, 'remote assigned to original primary backend');
				}
				return p;
			}
			if (p.removed) {
				this.clearPrimary();
				this.backup = null;
			} else {
				return this.backupBackend();
			}
		}
		const be = this.table.backends.select();
		this.backup = null;
		if (be === null) {
			return null;
		}
		this.setPrimary(be);
		this.log.info({ be_id: be.id }, 'remote assigned to new primary backend');
		return be;
	}

	private backupBackend(): Backend | null {
		const b = this.backup;
		if (b !== null && b.ok) {
			return b;
		}
		const be = this.table.backends.select();
		this.backup = be;
		if (be !== null) {
			this.log.info({ be_id: be.id, primary_be_id: this.primary?.id ?? 0 },
				'remote assigned to new backup backend');
		}
		return be;
	}

	private setPrimary(be: Backend): void {
		assert(this.primary === null, 'primary already set');
		this.primary = be;
		be.remotes++;
	}

	/** Forget the primary (and so the backup); the next query chooses afresh. */
	clearPrimary(): void {
		const p = this.primary;
		if (p !== null) {
			assert(p.remotes > 0, `backend ${p.id} remote count would go negative`);
			p.remotes--;
			this.primary = null;
		}
		this.backup = null;
	}
}

export class Remotes {
	readonly log: Logger;
	readonly backends: Backends;
	private readonly wheel: TimeoutWheel;
	private readonly byAddr = new Map<number, Remote>();
	private readonly ordered = new AVLTree<number, Remote>((a, b) => a - b, true);
	/** Remotes forgotten after idling (a running total for operators). */
	expired = 0;

	constructor(opts: { log: Logger; backends: Backends; wheel: TimeoutWheel }) {
		this.log = opts.log;
		this.backends = opts.backends;
		this.wheel = opts.wheel;
	}

	get size(): number {
		return this.byAddr.size;
	}

	/** The remote for this address, created on first sight; marks it seen. */
	lookup(addr: number): Remote {
		const now = this.wheel.nowMs;
		let rem = this.byAddr.get(addr);
		if (rem === undefined) {
			rem = new Remote(this, addr, now);
			this.byAddr.set(addr, rem);
			this.ordered.insert(addr, rem);
			this.log.info({ remote_ip: rem.ip }, 'new remote peer');
		} else {
			rem.lastSeenMs = now;
		}
		return rem;
	}

	/** Without creating or touching: for tests and the stats snapshot. */
	peek(addr: number): Remote | undefined {
		return this.byAddr.get(addr);
	}

	/** Every remote in address order. */
	list(): Remote[] {
		return this.ordered.values();
	}

	/** Forget remotes idle for more than REMOTE_IDLE_EXPIRY_SECS. */
	expire(nowMs: number = this.wheel.nowMs): number {
		const limit = nowMs - REMOTE_IDLE_EXPIRY_SECS * 1000;
		const stale: Remote[] = [];
		for (const rem of this.byAddr.values()) {
			if (rem.lastSeenMs < limit) {
				stale.push(rem);
			}
		}
		for (const rem of stale) {
			rem.log.info('expiring remote entry');
			this.remove(rem);
		}
		this.expired += stale.length;
		return stale.length;
	}

	private remove(rem: Remote): void {
		rem.clearPrimary();
		this.byAddr.delete(rem.addr);
		this.ordered.remove(rem.addr);
	}

	/**
	 * Clear the primary of `count` remotes of `be`, in address order, so
	 * they choose afresh on their next query.  Returns how many moved.
	 */
	rebalance(be: Backend, count: number): number {
		let moved = 0;
		let node = this.ordered.minNode();
		while (node !== null && moved < count) {
			const rem = node.data as Remote;
			if (rem.primary === be) {
				rem.log.info({ be_id: be.id }, 'rebalancing to reduce spread');
				rem.clearPrimary();
				moved++;
			}
			node = this.ordered.next(node);
		}
		return moved;
	}
}
