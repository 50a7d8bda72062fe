/*
 * BACKENDS
 *
 * The registry of backends: every socket path bbal has seen in the backend
 * directory, each with its Backend (backend.ts), which tracks that path for
 * the life of the balancer.  The registry indexes them by id (the order
 * round-robin walks) and by path (the order discovery checks), finds them,
 * chooses their ids, picks one for a new remote, and decides when remotes
 * should be rebalanced.  What happens on a backend's control session --
 * hello, heartbeats, faults, back-off -- is the Backend's own business.
 *
 * DISCOVERY.  rescan() reads the socket directory: at start, every
 * RESCAN_INTERVAL_SECS (5), and on SIGHUP.  A socket not seen before gets a
 * Backend and is connected at once; one that was removed and is back, or
 * one that was bound afresh (another inode or change time at the same path:
 * its process restarted), is connected at once too.  A Backend whose socket
 * file is no longer listed is told so, and is removed even while its
 * control session is up (see backend.ts).  The registry also watches the
 * directory (fs.watch, inotify or event ports) and rescans as soon as
 * anything in it changes, so a new or restarted backend is connected within
 * milliseconds rather than at the next 5-second rescan, which stays as the
 * safety net.  A path longer than sun_path can hold is reported once and
 * skipped, never truncated: a truncated path would name another file.
 *
 * FORGETTING.  A Backend whose socket file is gone is kept, removed, so
 * that a backend that restarts -- unlinks its socket and binds it again,
 * within a second or two -- finds the same Backend: the same id (which
 * matters for names outside 5300-5399, whose id is the next free one), the
 * same counters, the same remotes.  But socket names come and go (a
 * backend renamed, a test fleet, a directory shared by mistake), and a
 * registry that kept every name ever seen would grow without bound, and
 * with it every selection scan, the snapshot and the metrics' label series.
 * So each rescan forgets the backends that have been removed for
 * BACKEND_FORGET_SECS (60) or more and that no remote points to, as
 * primary or as backup (Backend counts both): a minute is far longer than
 * a restart, and what it costs is one closed Backend per vanished name for
 * a minute.  A removed backend that remotes still point to is kept until
 * they leave it (a remote leaves a removed primary on its next query, an
 * idle one when it expires).  Forgetting closes the Backend, drops it from
 * both indexes, counts it (`forgotten`) and tells onForget (the metrics
 * drop its label series); a socket of that name found later is a new
 * backend, with its id chosen afresh (the same one for 5300-5399).
 *
 * IDS.  A socket named after a port in NAMED_ID_MIN..NAMED_ID_MAX takes that
 * number as its id when it is free; any other name gets one more than the
 * highest id in use (why: IDENTITY in backend.ts).
 *
 * SELECTION AND REBALANCING.  The registry picks a backend for a new remote
 * round-robin over the ok ones, and works out the rebalance plan; it never
 * touches remotes itself (the balancer asks for the plan and hands it to
 * remotes.ts), and it never touches the UDP socket: OUTBOUND_UDP frames go
 * to a callback that the balancer provides.
 *
 * COALESCED WRITES.  A backend that queues a frame asks the registry to
 * flush it at the end of this turn.  The registry keeps one list of pending
 * flushes for all its backends and one setImmediate for the lot, so a turn
 * that forwards queries to five backends costs one scheduled callback and
 * five writes, however many queries it carried.
 *
 * READERS AND THE SEAM.  Operators' views (stats.ts, metrics.ts) read the
 * backends through views(), as BackendView: what a backend is and how it
 * is doing, and nothing that would change it.  How a session to a backend
 * is opened is an option (Connector, connectUnix by default), which the
 * TCP proxy uses for its own sessions too; it is the one seam where tests
 * put fake sockets in place of AF_UNIX connections.
 *
 * LOGS.  Two conditions can repeat on every rescan or every packet: the
 * socket directory cannot be read, and no backend is ok to take a new
 * remote.  Each has its own GatedLog, so neither silences the other.
 */

import { type FSWatcher, watch } from 'node:fs';
import { lstat, readdir } from 'node:fs/promises';
import net from 'node:net';
import type { Logger } from 'pino';
import { AVLTree } from 'avl';
import {
	Backend, type BackendContext, type BackendState, type BackendStats, type HeartbeatRttHandler,
	type OutboundUdpHandler,
} from './backend.js';
import type { AnswerCounts } from './answers.js';
import { DEFAULT_HEALTH_OPTIONS, HealthMonitor, type HealthState, type ProbeOutcome } from './health.js';
import { GatedLog } from './log.js';
import type { TimeoutWheel } from './timeouts.js';

/*
 * The registry is the way into the backends subsystem: the types of
 * backend.ts that users of the registry handle are exported here too.
 */
export type { Backend, BackendState, BackendStats, HeartbeatRttHandler, OutboundUdpHandler } from './backend.js';

export const RESCAN_INTERVAL_SECS = 5;
/* After a change in the watched directory, rescan this much later: one rescan for a burst of changes
 * (a restarting backend unlinks its old socket and binds a new one). */
export const WATCH_RESCAN_DELAY_MS = 100;
export const REBALANCE_INTERVAL_SECS = 15;
/* sun_path holds 108 bytes on Linux, one of them the terminating NUL. */
export const MAX_SOCKET_PATH_BYTES = 107;
/* A backend removed this long, with no remote pointing to it, is forgotten at the next rescan (FORGETTING). */
export const BACKEND_FORGET_SECS = 60;
export const NAMED_ID_MIN = 5300;
export const NAMED_ID_MAX = 5399;

/**
 * What operators' views (stats.ts, metrics.ts) may read of a backend:
 * nothing they could change, nothing that opens or closes a session.
 * Every Backend is one.
 */
export interface BackendView {
	readonly id: number;
	readonly path: string;
	/** The lifecycle state's name (the diagram in backend.ts). */
	readonly state: BackendState;
	readonly ok: boolean;
	readonly removed: boolean;
	/** Ok, but the session refuses writes and UDP for it is dropped. */
	readonly stuck: boolean;
	readonly heartbeatOutstanding: boolean;
	/** Remotes whose primary this is. */
	readonly remoteCount: number;
	/** The back-off's next delay: what the next reconnect will wait (0 before the first connect). */
	readonly reconnectDelaySecs: number;
	/** Round trip of the last answered heartbeat, or -1 before the first. */
	readonly lastHeartbeatRttMs: number;
	readonly stats: Readonly<BackendStats>;
	/** The last fault's reason and wall-clock time, null before the first. */
	readonly lastFault: { readonly reason: string; readonly atMs: number } | null;
	/** How it answers and whether it is healthy (answers.ts, health.ts). */
	readonly health: BackendHealthView;
}

/**
 * What operators' views may read of a backend's health and answer book:
 * every BackendHealth is one.  Nothing here can record, judge or clear;
 * latencyQuantileMs only moves the book's one-minute window on to `nowMs`,
 * as the next answer would.
 */
export interface BackendHealthView {
	readonly state: HealthState;
	readonly transitions: number;
	readonly lastProbe: Readonly<ProbeOutcome> | null;
	readonly book: {
		readonly answers: Readonly<AnswerCounts>;
		readonly outstanding: number;
		readonly unanswered: number;
		readonly late: number;
		readonly unsolicited: number;
		readonly dropped: number;
		readonly tableBytes: number;
		readonly latencyCounts: ArrayLike<number>;
		readonly latencySumMs: number;
		latencyQuantileMs(q: number, nowMs: number): number | null;
	};
}

/**
 * How a connection to a backend is opened: control sessions and TCP
 * sessions alike, so the TCP proxy opens its sessions with the registry's.
 * This is the one seam for tests: they pass a connector that returns a
 * fake socket and drive it by emitting its events.  Half-open is allowed
 * so a TCP session can pass a FIN through in each direction on its own.
 * A control session passes a larger write high-water mark (STUCK in
 * backend.ts).
 */
export type Connector = (path: string, writableHighWaterMark?: number) => net.Socket;

export const connectUnix: Connector = (path, writableHighWaterMark) =>
	/* net.Socket passes stream options through; @types/node omits them here. */
	net.createConnection({ path, allowHalfOpen: true, writableHighWaterMark } as net.NetConnectOpts);

export interface BackendsOptions {
	/** The directory of backend sockets. */
	socketDir: string;
	log: Logger;
	wheel: TimeoutWheel;
	onOutboundUdp: OutboundUdpHandler;
	onHeartbeatRtt?: HeartbeatRttHandler;
	/** A backend was forgotten (FORGETTING): whatever is kept per backend id may go. */
	onForget?: (be: BackendView) => void;
	/** How backends are reached; connectUnix unless a test passes its own. */
	connector?: Connector;
	/** Every backend's health (health.ts): the balancer's, made with this registry's list; by default one with the defaults. */
	health?: Pick<HealthMonitor, 'attach' | 'sessionChanged'>;
}

export interface RebalancePlan {
	backend: Backend;
	count: number;
}

export class Backends {
	/** How every session to a backend is opened (the TCP proxy opens its own with it). */
	readonly connector: Connector;
	private readonly socketDir: string;
	private readonly log: Logger;
	private readonly context: BackendContext;
	private readonly byId = new AVLTree<number, Backend>((a, b) => a - b, true);
	private readonly byPath = new AVLTree<string, Backend>((a, b) => (a < b ? -1 : a > b ? 1 : 0), true);
	private lastAssignedId = 0;
	private readonly wheel: TimeoutWheel;
	private readonly onForget: ((be: BackendView) => void) | undefined;
	private forgottenCount = 0;
	private readonly dirReadError: GatedLog;
	private readonly noBackend: GatedLog;
	/* Paths already reported as unusable, so each is logged once. */
	private readonly reportedPaths = new Set<string>();
	private pendingFlushes: Array<() => void> = [];
	private flushScheduled = false;
	private rescanning = false;
	private closed = false;
	private watcher: FSWatcher | null = null;
	private watchRescan: NodeJS.Timeout | null = null;

	constructor(opts: BackendsOptions) {
		this.socketDir = opts.socketDir.replace(/\/+$/, '') || '/';
		this.log = opts.log;
		this.connector = opts.connector ?? connectUnix;
		this.wheel = opts.wheel;
		this.onForget = opts.onForget;
		const health = opts.health ?? new HealthMonitor(DEFAULT_HEALTH_OPTIONS, opts.log, () => this.list());
		this.context = {
			wheel: opts.wheel,
			connector: this.connector,
			onOutboundUdp: opts.onOutboundUdp,
			onHeartbeatRtt: opts.onHeartbeatRtt,
			flushSoon: this.flushSoon,
			log: opts.log,
			health: health.attach,
			onSessionChange: health.sessionChanged,
		};
		this.dirReadError = new GatedLog(opts.wheel, 'error', 'error reading socket directory');
		this.noBackend = new GatedLog(opts.wheel, 'error', 'no backends available');
	}

	/** Every backend in id order. */
	list(): Backend[] {
		return this.byId.values();
	}

	/** Every backend in id order, as operators' views read them. */
	views(): BackendView[] {
		return this.list();
	}

	lookup(id: number): Backend | undefined {
		return this.byId.find(id)?.data;
	}

	lookupPath(path: string): Backend | undefined {
		return this.byPath.find(path)?.data;
	}

	/** Backends in the registry now. */
	get size(): number {
		return this.byId.size;
	}

	/** Backends forgotten so far (FORGETTING). */
	get forgotten(): number {
		return this.forgottenCount;
	}

	/* ---- discovery ---- */

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
				entries = await readdir(this.socketDir, { withFileTypes: true });
			} catch (err) {
				this.dirReadError.report(this.log, { err, socket_dir: this.socketDir });
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
				present.add(this.trackAndConnect(name, ids[i])?.path ?? '');
			});
			for (const be of this.list()) {
				if (!present.has(be.path)) {
					be.socketGone();
				}
			}
			this.forgetGone();
		} finally {
			this.rescanning = false;
		}
	}

	/**
	 * Forget every backend removed for BACKEND_FORGET_SECS or more that no
	 * remote points to (FORGETTING).  Each rescan ends with it.
	 */
	forgetGone(): void {
		const now = this.wheel.clock();
		for (const be of this.list()) {
			const since = be.removedSinceMs;
			if (since >= 0 && now - since >= BACKEND_FORGET_SECS * 1000 && be.remoteCount === 0 && be.backupCount === 0) {
				this.byId.remove(be.id);
				this.byPath.remove(be.path);
				be.close();
				this.forgottenCount++;
				be.log.info({ removed_secs: Math.round((now - since) / 1000) }, 'backend forgotten');
				this.onForget?.(be);
			}
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
			this.watcher = watch(this.socketDir, { persistent: false }, this.watcherOnChange);
			this.watcher.on('error', this.watcherOnError);
		} catch (err) {
			this.log.warn({ err, socket_dir: this.socketDir }, 'cannot watch socket directory (rescanning every 5 s only)');
		}
	}

	private readonly watcherOnChange = (): void => {
		if (this.watchRescan !== null || this.closed) {
			return;
		}
		this.watchRescan = setTimeout(() => {
			this.watchRescan = null;
			void this.rescan();
		}, WATCH_RESCAN_DELAY_MS);
	};

	private readonly watcherOnError = (err: Error): void => {
		this.log.warn({ err, socket_dir: this.socketDir }, 'stopped watching socket directory (rescanning every 5 s only)');
		this.watcher?.close();
	};

	private pathOf(name: string): string {
		return this.socketDir === '/' ? `/${name}` : `${this.socketDir}/${name}`;
	}

	/**
	 * A socket named `name` is in the directory (with identity `fileId`,
	 * when known).  Track it -- find its Backend, or create one -- and tell
	 * the Backend its socket is there, which connects it at once when it is
	 * new, returning or re-created (Backend.socketSeen).  Null when the path
	 * cannot be used.
	 */
	trackAndConnect(name: string, fileId = ''): Backend | null {
		const be = this.track(name);
		be?.socketSeen(fileId);
		return be;
	}

	/* The Backend for socket `name`, created if it is new; null when its path is too long. */
	private track(name: string): Backend | null {
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
			be = new Backend(this.context, this.chooseId(name), path);
			this.byId.insert(be.id, be);
			this.byPath.insert(path, be);
			be.log.info('new backend');
		}
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

	/* ---- selection and rebalancing ---- */

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
			if (be.usable) {
				this.lastAssignedId = be.id;
				return be;
			}
		}
		this.noBackend.report(this.log, { backends: n });
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
			if (!be.usable) {
				return;
			}
			nOk++;
			if (max === null || be.remoteCount > max.remoteCount) {
				max = be;
			}
			min = Math.min(min, be.remoteCount);
		});
		if (max === null) {
			return null;
		}
		const fullest = max as Backend;
		const spread = fullest.remoteCount - min;
		this.log.trace({ max_count: fullest.remoteCount, min_count: min, max_be_id: fullest.id, spread },
			'balancer spread statistics');
		if (spread <= nOk) {
			return null;
		}
		return { backend: fullest, count: spread - nOk };
	}

	/* ---- coalesced writes ---- */

	/* A backend's flush, to run once at the end of this turn (each backend asks once per turn). */
	private readonly flushSoon = (flush: () => void): void => {
		this.pendingFlushes.push(flush);
		if (!this.flushScheduled) {
			this.flushScheduled = true;
			setImmediate(this.flushAll);
		}
	};

	private readonly flushAll = (): void => {
		this.flushScheduled = false;
		const flushes = this.pendingFlushes;
		this.pendingFlushes = [];
		for (const flush of flushes) {
			flush();
		}
	};

	/** Stop watching and close every backend.  Idempotent. */
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
