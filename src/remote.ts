/*
 * REMOTE
 *
 * A remote is one peer that sends us DNS, identified by its IPv4 address
 * alone (not the port: a resolver's source port changes with every query).
 * bbal keeps a Remote for each address it has heard from recently and
 * associates it with one backend, so that every query from a host is
 * answered by the same backend process.  That stickiness is what makes the
 * service debuggable: run dig on a host and you exercise the same backend,
 * with the same cache and the same logs, as the host's own software.
 *
 * A Remote object is one such peer: which backend serves it, what it has
 * been counted for, and its per-second rate window.  The table that holds
 * them, finds them by address, expires, evicts and rebalances them is
 * remotes.ts; a Remote reaches the backends registry and the assignment
 * log lines through it.
 *
 * PRIMARY AND BACKUP.  A remote has a primary backend, chosen round-robin by
 * the registry the first time it needs one.  While the primary is not ok
 * (faulted, reconnecting), the remote borrows a backup, also chosen
 * round-robin; as soon as the primary is ok again the backup is dropped and
 * traffic returns home.  If the backup fails in turn, another is chosen.  A
 * primary whose socket was removed from the directory is not waited for: the
 * remote forgets it and chooses a new primary.  Only the primary counts
 * towards a backend's load (Backend.remoteCount), because a backup is a
 * temporary arrangement that ends by itself.
 *
 *   chooseBackend() -> primary ok?         yes: primary (drop any backup)
 *                      primary removed?    yes: forget it, choose afresh
 *                      backup ok?          yes: backup
 *                      otherwise           choose a new backup (or none)
 *
 * RATE WINDOWS.  A remote can be limited to N queries a second
 * (--max-qps-per-remote), and the answers bbal synthesizes for it (SERVFAIL,
 * REFUSED) are limited likewise.  Each limit is a counter per remote over
 * the current second of the coarse clock: no timer, one comparison per
 * datagram.  The two counters share one window (the second they count in),
 * opened by whichever of them is asked first in a new second, so a remote
 * carries one second field rather than one per limit.
 *
 * COUNTERS.  A remote's counters (RemoteStats: udp, udpDrop, tcp ...) are
 * plain fields of the Remote itself, incremented by the proxies and read by
 * the stats snapshot, rather than an object of their own: one object fewer
 * per remote, about 40 bytes, or 4 MB at the 100,000-remote cap.
 *
 * Times are taken from the timeout wheel's tick ("now" to the nearest
 * second), so a datagram costs no clock read.  Each remote's child logger
 * is made on first use: most remotes never log anything after "new remote
 * peer", and a hundred thousand idle child loggers would be memory for
 * nothing.
 */

import assert from 'node:assert/strict';
import type { Logger } from 'pino';
import type { Backend } from './backends.js';
import { u32ToIpv4 } from './protocol.js';
import type { Remotes } from './remotes.js';

/** A remote's counters, as the stats snapshot shows them (fields of the Remote itself). */
export interface RemoteStats {
	udp: number;
	udpDrop: number;
	tcp: number;
	tcpDrop: number;
	/** Datagrams that failed the DNS header check. */
	udpInvalid: number;
	/** Queries over --max-qps-per-remote. */
	rateLimited: number;
}

export class Remote implements RemoteStats {
	primary: Backend | null = null;
	/* Set through setBackup(), which keeps the backends' counts. */
	backup: Backend | null = null;
	/* The counters live here, not in an object of their own (see COUNTERS above). */
	udp = 0;
	udpDrop = 0;
	tcp = 0;
	tcpDrop = 0;
	udpInvalid = 0;
	rateLimited = 0;
	/** udp + tcp when the dashboard's last talkers pass read this remote (sampler.ts: TOP TALKERS). */
	talkMark = 0;
	/*
	 * Times are whole seconds since the table was made: small integers that
	 * V8 stores in the object itself, where milliseconds since 1970 would
	 * each need a boxed double (16 bytes per field per remote).
	 */
	lastSeenSec: number;
	readonly firstSeenSec: number;
	/**
	 * The local address (u32, stored as an int32: `>>> 0` to read it) this
	 * remote last sent a query to, for a wildcard bind to answer from; 0
	 * when bound to one address.  See udp_proxy.ts for why per remote.
	 */
	localAddr = 0;
	/** Seen since it last reached the head of the eviction queue. */
	referenced = false;
	/** Neighbours in the eviction queue (Remotes owns the links). */
	queuePrev: Remote | null = null;
	queueNext: Remote | null = null;
	private logger: Logger | null = null;
	/* The rate window: the second it counts in, and what was counted in it. */
	private windowSec = -1;
	private windowQueries = 0;
	private windowSynthesized = 0;

	constructor(
		private readonly table: Remotes,
		readonly addr: number,
		nowSec: number,
	) {
		this.firstSeenSec = nowSec;
		this.lastSeenSec = nowSec;
	}

	get lastSeenMs(): number {
		return this.table.epochMs + this.lastSeenSec * 1000;
	}

	get firstSeenMs(): number {
		return this.table.epochMs + this.firstSeenSec * 1000;
	}

	/** Count a query against the per-second limit; false when over it. */
	admitQuery(limit: number): boolean {
		this.windowAt(this.lastSeenSec);
		return ++this.windowQueries <= limit;
	}

	/** May bbal send this remote another synthesized answer this second? */
	admitSynthesized(limit: number): boolean {
		this.windowAt(this.lastSeenSec);
		return ++this.windowSynthesized <= limit;
	}

	/*
	 * Move the rate window to second `sec`, emptying it when that is a new
	 * second.  lastSeenSec is the second of the datagram being handled: a
	 * remote is looked up (and so marked seen) before it is admitted.
	 */
	private windowAt(sec: number): void {
		if (sec !== this.windowSec) {
			this.windowSec = sec;
			this.windowQueries = 0;
			this.windowSynthesized = 0;
		}
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
	 * Choose the backend that serves this remote now (the diagram above),
	 * assigning a primary or a backup and logging it when that changes;
	 * null when no backend is ok.  Called for every query and connection.
	 */
	chooseBackend(): Backend | null {
		const p = this.primary;
		if (p !== null) {
			if (p.usable) {
				if (this.backup !== null) {
					this.setBackup(null);
					this.table.logAssignment(this, p, 'returned');
				}
				return p;
			}
			if (p.removed) {
				this.clearPrimary();
			} else {
				return this.backupBackend();
			}
		}
		const be = this.table.backends.select();
		this.setBackup(null);
		if (be === null) {
			return null;
		}
		this.setPrimary(be);
		this.table.logAssignment(this, be, 'primary');
		return be;
	}

	private backupBackend(): Backend | null {
		const b = this.backup;
		if (b !== null && b.usable) {
			return b;
		}
		const be = this.table.backends.select();
		this.setBackup(be);
		if (be !== null) {
			this.table.logAssignment(this, be, 'backup');
		}
		return be;
	}

	private setPrimary(be: Backend): void {
		assert(this.primary === null, 'primary already set');
		this.primary = be;
		be.addRemote();
		this.table.noteChange(this.addr);
	}

	/**
	 * Serve this remote from the backends another bbal gave it (a takeover:
	 * remotes.ts restore()); a backup only with a primary to stand in for.
	 */
	restoreBackends(primary: Backend | null, backup: Backend | null): void {
		if (this.primary !== primary) {
			this.clearPrimary();
			if (primary !== null) {
				this.setPrimary(primary);
			}
		}
		this.setBackup(primary === null ? null : backup);
	}

	/** Forget the primary (and so the backup); the next query chooses afresh. */
	clearPrimary(): void {
		const p = this.primary;
		if (p !== null) {
			p.removeRemote();
			this.primary = null;
			this.table.noteChange(this.addr);
		}
		this.setBackup(null);
	}

	/*
	 * Backends count the remotes that borrow them as well as those they
	 * serve, so the registry forgets a removed backend only when no remote
	 * points to it at all (backends.ts, FORGETTING).
	 */
	private setBackup(be: Backend | null): void {
		if (this.backup === be) {
			return;
		}
		this.backup?.removeBackup();
		this.backup = be;
		be?.addBackup();
		this.table.noteChange(this.addr);
	}
}

/* What a remote was just assigned: each is a log condition of its own. */
export type Assignment = 'primary' | 'backup' | 'returned';
