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
 * This file is the table (remotes.ts); one remote, its choice of backend,
 * its counters and its rate window, is remote.ts's Remote.
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
 * PASSES.  Expiry and rebalancing each walk the whole table, and the table
 * may hold a hundred thousand remotes: a burst from spoofed sources expires
 * all at once 300 s later, and a backend that returns after an outage may
 * have fifty thousand remotes to give away.  Done in one call, either
 * stalled every query for half a second.  So each is a pass, done in
 * slices: one sweep per tick of the wheel visits at most
 * REMOTES_SWEEP_VISITS remotes and changes (forgets, or clears the primary
 * of) at most REMOTES_SWEEP_CHANGES of them, the two passes together, then
 * arms the sweep timeout for the next tick if either has more to do.  Two
 * bounds, because looking at a remote costs a tenth of changing one: a
 * pass over 100,000 remotes that finds nothing to do takes 20 ticks, well
 * inside the 30 s between expiry jobs, while 100,000 idle ones are
 * forgotten a thousand a tick, each tick a millisecond or two once V8 has
 * compiled the walk (bench/stalls.ts measures it).  When both passes run,
 * they take turns at going first, so neither waits for the other to end.
 * A pass remembers where it stopped as an
 * address, not a tree node (remotes come and go between ticks), and
 * resumes at the first remote at or after it, so both walk in address
 * order, as PROTOCOL.md asks of rebalancing.  What changes behind a pass's
 * cursor waits for the next pass: a remote created there, or one that goes
 * idle after it was looked at.
 *
 *   expiry pass     idle --expire()----> running --end of the table--> idle
 *   rebalance pass  idle --rebalance()-> running --moved enough, end of the
 *                                                  table, or its backend is
 *                                                  no longer ok-----------> idle
 *
 * The expiry pass forgets the remotes idle for more than
 * REMOTE_IDLE_EXPIRY_SECS when it began; the rebalance pass clears the
 * primary of up to `count` remotes of one backend, and stops early if that
 * backend is no longer ok (the plan was made over ok backends; a faulted
 * one's remotes wait for it on a backup).  Asking for a pass while one of
 * its kind is running does not start another: the running one goes on.
 * Each pass logs one line when it ends, with its counts, never a line per
 * remote.  Work that fits in one slice is done in the call that asked.
 *
 * THE CAP.  Expiry alone does not bound the table against a flood of
 * datagrams with spoofed sources: two hundred thousand fake hosts in five
 * minutes would all be "recently active".  So the table also has a cap
 * (--max-remotes, 100,000 by default).  At the cap, making a new remote
 * evicts an old one, the one idle longest first, so the hosts that really
 * talk to us keep their place while the flood churns through the rest.
 * Finding the idlest must not cost a scan per datagram, so the remotes also
 * form a queue, in the order they were created, linked through the Remote
 * objects themselves, with a second chance (the CLOCK algorithm): every
 * query sets the remote's reference bit; the remote at the head is evicted
 * unless its bit is set, in which case the bit is cleared, the remote moves
 * to the tail and the next one is considered.  A bit rather than comparing
 * times, because the coarse clock cannot tell "seen since it was queued"
 * from "queued this second": a flood of new sources within one second
 * would otherwise evict hosts that are talking.  Each remote is moved
 * at most once per pass, so an eviction is O(1) amortised.  (A Map's
 * insertion order would look like the same queue for free, but V8 leaves a
 * tombstone for every deleted entry until the table is rebuilt, and
 * iterating from the front walks over all of them: under constant churn
 * that turns each eviction into a long scan.)
 *
 * LOGS.  New remotes and their assignments are logged, as the original did,
 * but each kind of line through a gate of its own (log.ts's GatedLog) that
 * lets a burst through every 5 seconds and counts the rest: under a flood of
 * new sources, or when a backend with thirty thousand remotes faults, the
 * log says how many, not each one.
 *
 * Times are taken from the timeout wheel's tick ("now" to the nearest
 * second), so a datagram costs no clock read.
 */

import assert from 'node:assert/strict';
import type { Logger } from 'pino';
import { type AVLNode, AVLTree } from 'avl';
import type { Backend, Backends } from './backends.js';
import { u32ToIpv4 } from './protocol.js';
import { GatedLog } from './log.js';
import { type Assignment, Remote, type RemoteStats } from './remote.js';
import type { Timeout, TimeoutWheel } from './timeouts.js';

export { type Assignment, Remote, type RemoteStats } from './remote.js';

/** A remote as the bbal handing over held it (restore()): times as ages, in seconds before now. */
export interface RestoredRemote extends RemoteStats {
	primary: Backend | null;
	backup: Backend | null;
	firstSeenAgoSecs: number;
	lastSeenAgoSecs: number;
}

export const REMOTE_IDLE_EXPIRY_SECS = 300;
export const REMOTE_EXPIRY_CHECK_SECS = 30;
export const DEFAULT_MAX_REMOTES = 100_000;
/** Remotes the passes look at per tick, both together (see PASSES). */
export const REMOTES_SWEEP_VISITS = 5_000;
/** Remotes the passes forget or move per tick, both together. */
export const REMOTES_SWEEP_CHANGES = 1_000;
/** An address past every IPv4 address: where a walk of the table ends. */
export const ADDR_END = 2 ** 32;
/* Remote log lines let through per gate interval before counting instead. */
const REMOTE_LOG_BURST = 50;

/* What is left of a tick's allowance (see PASSES). */
interface SweepBudget {
	visits: number;
	changes: number;
}

/* A running expiry pass (see PASSES); none while idle. */
interface ExpiryPass {
	/** Remotes last seen before this second (of the table's life) go. */
	readonly idleBeforeSec: number;
	/** The address to resume at. */
	cursor: number;
	visited: number;
	expired: number;
	ticks: number;
}

/* A running rebalance pass: clear the primary of `count` remotes of `be`. */
interface RebalancePass {
	readonly be: Backend;
	readonly count: number;
	cursor: number;
	visited: number;
	moved: number;
	ticks: number;
}

export class Remotes {
	readonly log: Logger;
	readonly backends: Backends;
	private readonly wheel: TimeoutWheel;
	private readonly byAddr = new Map<number, Remote>();
	private readonly ordered = new AVLTree<number, Remote>((a, b) => a - b, true);
	/** Remotes forgotten after idling (a running total for operators). */
	expired = 0;
	/** Remotes evicted to make room at the cap. */
	evicted = 0;
	/** Rebalance passes ended, and the last one's outcome (the dashboard's events read them). */
	rebalances = 0;
	lastRebalance: { backend: number; moved: number; planned: number } | null = null;
	readonly maxRemotes: number;
	/** Zero of the remotes' second counts (the wheel's time at creation). */
	readonly epochMs: number;
	private queueHead: Remote | null = null;
	private queueTail: Remote | null = null;
	private readonly newRemoteLog: GatedLog;
	private readonly assignmentLogs: Record<Assignment, GatedLog>;
	private readonly evictLog: GatedLog;
	private expiryPass: ExpiryPass | null = null;
	private rebalancePass: RebalancePass | null = null;
	private readonly sweepTimeout: Timeout;
	/* This tick's allowance (the tick is the wheel's time), and how many ticks have had one. */
	private sweepTickMs = -1;
	private readonly sweepLeft: SweepBudget = { visits: 0, changes: 0 };
	private sweepTicks = 0;
	/* TAKEOVER: remotes made or reassigned since trackChanges(), by address; null when not tracking. */
	private changed: Set<number> | null = null;
	private changedOverflow = false;

	constructor(opts: { log: Logger; backends: Backends; wheel: TimeoutWheel; maxRemotes?: number }) {
		this.log = opts.log;
		this.backends = opts.backends;
		this.wheel = opts.wheel;
		this.maxRemotes = opts.maxRemotes ?? DEFAULT_MAX_REMOTES;
		this.epochMs = opts.wheel.nowMs;
		assert(this.maxRemotes >= 1, 'maxRemotes must be at least 1');
		const burst = { burst: REMOTE_LOG_BURST };
		this.newRemoteLog = new GatedLog(opts.wheel, 'info', 'new remote peer', burst);
		this.assignmentLogs = {
			primary: new GatedLog(opts.wheel, 'info', 'remote assigned to new primary backend', burst),
			backup: new GatedLog(opts.wheel, 'info', 'remote assigned to new backup backend', burst),
			returned: new GatedLog(opts.wheel, 'info', 'remote assigned to original primary backend', burst),
		};
		this.evictLog = new GatedLog(opts.wheel, 'warn', 'remotes table full: evicted the idlest remote');
		this.sweepTimeout = opts.wheel.create('remotes sweep', this.sweepDue);
	}

	/*
	 * Through the table's logger with remote_ip as a field, not through
	 * rem.log: that would make a child logger for every remote assigned,
	 * logged or not.
	 */
	logAssignment(rem: Remote, be: Backend, what: Assignment): void {
		this.assignmentLogs[what].report(this.log, () => ({
			remote_ip: rem.ip, be_id: be.id, primary_be_id: rem.primary?.id ?? 0,
		}));
	}

	get size(): number {
		return this.byAddr.size;
	}

	/** The remote for this address, created on first sight; marks it seen. */
	lookup(addr: number): Remote {
		const now = Math.floor((this.wheel.nowMs - this.epochMs) / 1000);
		let rem = this.byAddr.get(addr);
		if (rem === undefined) {
			if (this.byAddr.size >= this.maxRemotes) {
				this.evictIdlest();
			}
			rem = new Remote(this, addr, now);
			this.byAddr.set(addr, rem);
			this.ordered.insert(addr, rem);
			this.enqueue(rem);
			this.noteChange(addr);
			this.newRemoteLog.report(this.log, () => ({ remote_ip: u32ToIpv4(addr) }));
		} else {
			rem.lastSeenSec = now;
			rem.referenced = true;
		}
		return rem;
	}

	/**
	 * Take over a remote from the bbal handing over (takeover.ts), as it
	 * was there: its backends, counters and times.  It is created without a
	 * "new remote peer" line (it is not new) and counts against the cap like
	 * any other.  If this table has it already (it sent a query here while
	 * both processes read the socket), it is moved to the backends the old
	 * process gave it, and keeps the larger of each counter.
	 */
	restore(addr: number, r: RestoredRemote): void {
		const now = Math.floor((this.wheel.nowMs - this.epochMs) / 1000);
		const lastSeenSec = now - Math.max(0, r.lastSeenAgoSecs);
		let rem = this.byAddr.get(addr);
		if (rem === undefined) {
			if (this.byAddr.size >= this.maxRemotes) {
				this.evictIdlest();
			}
			rem = new Remote(this, addr, now - Math.max(0, r.firstSeenAgoSecs));
			rem.lastSeenSec = lastSeenSec;
			this.byAddr.set(addr, rem);
			this.ordered.insert(addr, rem);
			this.enqueue(rem);
		} else {
			rem.lastSeenSec = Math.max(rem.lastSeenSec, lastSeenSec);
		}
		rem.udp = Math.max(rem.udp, r.udp);
		rem.udpDrop = Math.max(rem.udpDrop, r.udpDrop);
		rem.tcp = Math.max(rem.tcp, r.tcp);
		rem.tcpDrop = Math.max(rem.tcpDrop, r.tcpDrop);
		rem.udpInvalid = Math.max(rem.udpInvalid, r.udpInvalid);
		rem.rateLimited = Math.max(rem.rateLimited, r.rateLimited);
		rem.restoreBackends(r.primary, r.backup);
	}

	/**
	 * TAKEOVER (handover.ts): the table has been sent to the new bbal; from
	 * now on note every remote made or given another backend, for the delta
	 * sent at the handover.  At most maxRemotes are noted: past that the
	 * delta is the whole table.
	 */
	trackChanges(): void {
		this.changed = new Set();
		this.changedOverflow = false;
	}

	/**
	 * Stop noting: the addresses noted, in the order first noted (not
	 * sorted: a hundred thousand would take a sort longer than a turn
	 * should), or null when there were too many to note (send everything).
	 */
	takeChanges(): number[] | null {
		const c = this.changed;
		this.changed = null;
		return c === null || this.changedOverflow ? null : [...c];
	}

	/** A remote was made or reassigned (remote.ts calls it; nothing unless a takeover is under way). */
	noteChange(addr: number): void {
		const c = this.changed;
		if (c === null || this.changedOverflow) {
			return;
		}
		if (c.size >= this.maxRemotes) {
			this.changedOverflow = true;
			c.clear();
		} else {
			c.add(addr);
		}
	}

	/** Every remote in address order (all at once: for tests and small tables; see slice()). */
	list(): Remote[] {
		return this.ordered.values();
	}

	/** The remote held for addr, if any, without creating it or marking it seen. */
	peek(addr: number): Remote | undefined {
		return this.byAddr.get(addr);
	}

	/*
	 * The tree node of the first remote at or after addr: one descent, where
	 * the tree's own range() would walk every node below addr.
	 */
	private firstAtOrAfter(addr: number): AVLNode<number, Remote> | null {
		let node = this.ordered.root;
		let best: AVLNode<number, Remote> | null = null;
		while (node !== null) {
			if (node.key >= addr) {
				best = node;
				node = node.left;
			} else {
				node = node.right;
			}
		}
		return best;
	}

	/**
	 * Up to `max` remotes from address `from` on, in address order, and the
	 * address to continue at (ADDR_END when there are no more): the table
	 * read a slice at a time, by the stats socket and the log snapshot.
	 */
	slice(from: number, max: number): { remotes: Remote[]; next: number } {
		const remotes: Remote[] = [];
		let node = this.firstAtOrAfter(from);
		while (node !== null && remotes.length < max) {
			remotes.push(node.data as Remote);
			node = this.ordered.next(node);
		}
		return { remotes, next: node === null ? ADDR_END : node.key };
	}

	/* ---- passes (see PASSES) ---- */

	/** Is a rebalance pass running? (The balancer plans no other until it ends.) */
	get rebalancing(): boolean {
		return this.rebalancePass !== null;
	}

	/** Is an expiry pass running? */
	get expiring(): boolean {
		return this.expiryPass !== null;
	}

	/**
	 * Forget the remotes idle for more than REMOTE_IDLE_EXPIRY_SECS at
	 * `nowMs`: begin an expiry pass (unless one is running, which goes on)
	 * and do this tick's share of it.  Returns how many this call expired.
	 */
	expire(nowMs: number = this.wheel.nowMs): number {
		if (this.expiryPass === null) {
			this.expiryPass = {
				idleBeforeSec: (nowMs - this.epochMs) / 1000 - REMOTE_IDLE_EXPIRY_SECS,
				cursor: 0, visited: 0, expired: 0, ticks: 0,
			};
		}
		const before = this.expired;
		this.sweep();
		return this.expired - before;
	}

	/**
	 * Clear the primary of `count` remotes of `be`, in address order, so
	 * they choose afresh on their next query: begin a rebalance pass (unless
	 * one is running, which goes on) and do this tick's share of it.
	 * Returns how many this call moved.
	 */
	rebalance(be: Backend, count: number): number {
		if (this.rebalancePass === null) {
			this.rebalancePass = { be, count, cursor: 0, visited: 0, moved: 0, ticks: 0 };
		}
		const pass = this.rebalancePass;
		const before = pass.moved;
		this.sweep();
		return pass.moved - before;
	}

	/** Stop: end the passes where they are and disarm the sweep (idempotent). */
	close(): void {
		this.expiryPass = null;
		this.rebalancePass = null;
		this.sweepTimeout.clear();
	}

	private readonly sweepDue = (): void => {
		this.sweep();
	};

	/* This tick's share, the passes taking turns at going first; again next tick if unfinished. */
	private sweep(): void {
		const left = this.sweepLeft;
		if (this.wheel.nowMs !== this.sweepTickMs) {
			this.sweepTickMs = this.wheel.nowMs;
			left.visits = REMOTES_SWEEP_VISITS;
			left.changes = REMOTES_SWEEP_CHANGES;
			this.sweepTicks++;
		}
		for (const expiryTurn of (this.sweepTicks & 1) === 1 ? [true, false] : [false, true]) {
			if (left.visits === 0 || left.changes === 0) {
				break;
			}
			if (expiryTurn && this.expiryPass !== null) {
				this.expirySlice(this.expiryPass, left);
			} else if (!expiryTurn && this.rebalancePass !== null) {
				this.rebalanceSlice(this.rebalancePass, left);
			}
		}
		if ((this.expiryPass !== null || this.rebalancePass !== null) && this.sweepTimeout.expiresAt === null) {
			/* Delay 0: the next tick (a timeout armed during a run waits for the next one). */
			this.sweepTimeout.set(0);
		}
	}

	/*
	 * From the cursor, within the budget: find the idle remotes, then forget
	 * them (after the walk: removing rearranges the tree).
	 */
	private expirySlice(pass: ExpiryPass, left: SweepBudget): void {
		const stale: Remote[] = [];
		let visited = 0;
		let node = this.firstAtOrAfter(pass.cursor);
		while (node !== null && visited < left.visits && stale.length < left.changes) {
			const rem = node.data as Remote;
			if (rem.lastSeenSec < pass.idleBeforeSec) {
				stale.push(rem);
			}
			visited++;
			node = this.ordered.next(node);
		}
		pass.cursor = node === null ? ADDR_END : node.key;
		for (const rem of stale) {
			this.remove(rem);
		}
		left.visits -= visited;
		left.changes -= stale.length;
		this.expired += stale.length;
		pass.expired += stale.length;
		pass.visited += visited;
		pass.ticks++;
		if (pass.cursor === ADDR_END) {
			this.expiryPass = null;
			const fields = { expired: pass.expired, visited: pass.visited, remotes: this.size, ticks: pass.ticks };
			if (pass.expired > 0) {
				this.log.info(fields, 'expired idle remotes');
			} else {
				this.log.debug(fields, 'expired idle remotes');
			}
		}
	}

	private rebalanceSlice(pass: RebalancePass, left: SweepBudget): void {
		let visited = 0;
		let moved = 0;
		let node: AVLNode<number, Remote> | null = null;
		if (pass.be.usable) {
			node = this.firstAtOrAfter(pass.cursor);
			while (node !== null && visited < left.visits && moved < left.changes && pass.moved + moved < pass.count) {
				const rem = node.data as Remote;
				if (rem.primary === pass.be) {
					rem.clearPrimary();
					moved++;
				}
				visited++;
				node = this.ordered.next(node);
			}
		}
		pass.cursor = node === null ? ADDR_END : node.key;
		left.visits -= visited;
		left.changes -= moved;
		pass.moved += moved;
		pass.visited += visited;
		pass.ticks++;
		if (pass.cursor === ADDR_END || pass.moved >= pass.count) {
			this.rebalancePass = null;
			this.rebalances++;
			this.lastRebalance = { backend: pass.be.id, moved: pass.moved, planned: pass.count };
			this.log.info({
				be_id: pass.be.id, remotes: pass.moved, planned: pass.count, visited: pass.visited, ticks: pass.ticks,
				ended: pass.moved >= pass.count ? 'done' : pass.be.usable ? 'end of table' : 'backend not ok',
			}, 'rebalanced remotes');
		}
	}

	/* Make room: the second-chance walk described in the file comment. */
	private evictIdlest(): void {
		/*
		 * Ends within one lap of the queue: a remote moved to the back has
		 * its bit cleared, so it is evicted when it reaches the head again.
		 */
		for (let rem = this.queueHead; rem !== null; rem = this.queueHead) {
			if (rem.referenced) {
				/* Seen since it was last here: a second chance, at the back. */
				rem.referenced = false;
				this.dequeue(rem);
				this.enqueue(rem);
				continue;
			}
			this.remove(rem);
			this.evicted++;
			this.evictLog.report(this.log, () => ({ max_remotes: this.maxRemotes, remote_ip: rem.ip }));
			return;
		}
	}

	private enqueue(rem: Remote): void {
		rem.queuePrev = this.queueTail;
		rem.queueNext = null;
		if (this.queueTail === null) {
			this.queueHead = rem;
		} else {
			this.queueTail.queueNext = rem;
		}
		this.queueTail = rem;
	}

	private dequeue(rem: Remote): void {
		if (rem.queuePrev === null) {
			this.queueHead = rem.queueNext;
		} else {
			rem.queuePrev.queueNext = rem.queueNext;
		}
		if (rem.queueNext === null) {
			this.queueTail = rem.queuePrev;
		} else {
			rem.queueNext.queuePrev = rem.queuePrev;
		}
		rem.queuePrev = null;
		rem.queueNext = null;
	}

	private remove(rem: Remote): void {
		this.dequeue(rem);
		rem.clearPrimary();
		this.byAddr.delete(rem.addr);
		this.ordered.remove(rem.addr);
	}
}
