/*
 * EVENTS
 *
 * The dashboard's "recent events": what happened to the backends and the
 * table lately -- a backend faulted, went down or came back, turned sick
 * or healthy, got stuck, was found, removed or forgotten; remotes were
 * rebalanced; this process took over from another; every backend turned
 * sick and bbal failed open.  The log has all of it, but an operator
 * looking at the dashboard wants the last few minutes of it beside the
 * charts, without a log pipeline.
 *
 * The ring holds the last EVENTS_MAX (256) events, oldest dropped first,
 * each with a sequence number that grows by one per event for as long as
 * the process lives.  A reader (a dashboard's stream) remembers the last
 * number it sent and asks for what came after it (since()); one that fell
 * more than a ring behind gets what is left.  Memory is bounded by the
 * ring's size and each event's text, which bbal writes itself (a fault's
 * reason is one of backend.ts's fixed phrases, never a client's string).
 *
 * WHERE EVENTS COME FROM.  Nothing here runs per packet or per fault, and
 * no module is told to report anything: once a second the sampler
 * (sampler.ts) has the EventWatcher compare what it reads of the backends,
 * the remotes table and the health monitor with what it read the second
 * before, and push what changed:
 *
 *   a backend id not seen before            found
 *   its fault counter moved                 fault (with the last reason, and how many when more than one)
 *   ok -> not ok / not ok -> ok             down (with the last fault's reason) / up
 *   healthy -> sick / sick -> healthy       sick (with the reason) / healthy
 *   stuck / no longer stuck                 stuck / unstuck
 *   state removed / gone from the registry  removed / forgotten
 *   the remotes' rebalance count moved      rebalance (which backend, how many moved)
 *   the health monitor's fail-open          fail-open / fail-open-ended
 *   the process's takeover record appears   takeover (once)
 *
 * A backend that faulted and reconnected within one second is one "fault"
 * event with its count, and nothing is missed for good: the counters say
 * how many.  The ring cannot be flooded faster than a few events a second
 * per backend.  Times are the sampler's wall clock, to within the second
 * (a fault's own time is in the backend table: BackendView.lastFault).
 */

import path from 'node:path';
import type { BackendView } from './backends.js';
import type { TakeoverRecord } from './stats.js';

/** Events kept; the oldest goes when another comes. */
export const EVENTS_MAX = 256;

export type EventKind =
	| 'found' | 'up' | 'down' | 'fault' | 'sick' | 'healthy' | 'stuck' | 'unstuck' | 'removed' | 'forgotten'
	| 'rebalance' | 'takeover' | 'fail-open' | 'fail-open-ended';

export interface BbalEvent {
	/** 1 for the first event of the process, then one more per event. */
	readonly seq: number;
	/** Wall-clock milliseconds. */
	readonly t: number;
	readonly kind: EventKind;
	/** The backend it is about, or null. */
	readonly backend: number | null;
	/** One line for a person, e.g. "backend 2 down: backend socket EOF". */
	readonly text: string;
}

export class EventRing {
	private readonly ring: Array<BbalEvent | undefined>;
	/* The next event's sequence number; the ring's slot for seq s is s % capacity. */
	private nextSeq = 1;

	constructor(readonly capacity: number = EVENTS_MAX) {
		if (!Number.isInteger(capacity) || capacity < 1) {
			throw new RangeError(`EventRing capacity ${capacity} is not a positive integer`);
		}
		this.ring = new Array<BbalEvent | undefined>(capacity);
	}

	/** Sequence number of the newest event, 0 before the first. */
	get lastSeq(): number {
		return this.nextSeq - 1;
	}

	/** Events held now. */
	get size(): number {
		return Math.min(this.nextSeq - 1, this.capacity);
	}

	push(t: number, kind: EventKind, backend: number | null, text: string): BbalEvent {
		const ev: BbalEvent = { seq: this.nextSeq, t, kind, backend, text };
		this.ring[this.nextSeq % this.capacity] = ev;
		this.nextSeq++;
		return ev;
	}

	/** The events after sequence number `seq` still held, oldest first (all of them for 0). */
	since(seq: number): BbalEvent[] {
		const first = Math.max(seq + 1, this.nextSeq - this.capacity, 1);
		const out: BbalEvent[] = [];
		for (let s = first; s < this.nextSeq; s++) {
			out.push(this.ring[s % this.capacity] as BbalEvent);
		}
		return out;
	}
}

/** What the watcher reads each second (the balancer's live objects, read only). */
export interface WatchedSources {
	backends: { views(): BackendView[] };
	health: { readonly failOpen: boolean };
	remotes: { readonly rebalances: number; readonly lastRebalance: { backend: number; moved: number; planned: number } | null };
	takeover?: () => TakeoverRecord | null;
}

/* What the watcher remembers of a backend from the second before. */
interface Seen {
	ok: boolean;
	sick: boolean;
	stuck: boolean;
	removed: boolean;
	faults: number;
}

const name = (be: BackendView): string => `backend ${be.id} (${path.basename(be.path)})`;

/** Turns what changed since the last look into events (see WHERE EVENTS COME FROM). */
export class EventWatcher {
	private readonly seen = new Map<number, Seen>();
	private rebalances = 0;
	private failOpen = false;
	private tookOver = false;

	constructor(private readonly ring: EventRing, private readonly src: WatchedSources) {
		this.rebalances = src.remotes.rebalances;
	}

	/** Compare with the last look and push what changed, at wall-clock time `t`. */
	look(t: number): void {
		const ring = this.ring;
		const takeover = this.src.takeover?.() ?? null;
		if (takeover !== null && !this.tookOver) {
			this.tookOver = true;
			ring.push(t, 'takeover', null, `took over from pid ${takeover.fromPid} (bbal ${takeover.fromVersion}) `
				+ `with ${takeover.remotes} remotes`);
		}
		const present = new Set<number>();
		for (const be of this.src.backends.views()) {
			present.add(be.id);
			this.lookAt(t, be);
		}
		for (const id of this.seen.keys()) {
			if (!present.has(id)) {
				this.seen.delete(id);
				ring.push(t, 'forgotten', id, `backend ${id} forgotten (its socket was gone a minute)`);
			}
		}
		const r = this.src.remotes;
		if (r.rebalances !== this.rebalances) {
			this.rebalances = r.rebalances;
			const last = r.lastRebalance;
			if (last !== null) {
				ring.push(t, 'rebalance', last.backend,
					`rebalanced: ${last.moved} of ${last.planned} planned remotes moved off backend ${last.backend}`);
			}
		}
		const failOpen = this.src.health.failOpen;
		if (failOpen !== this.failOpen) {
			this.failOpen = failOpen;
			ring.push(t, failOpen ? 'fail-open' : 'fail-open-ended', null,
				failOpen ? 'every backend is sick: failing open' : 'failing open no more');
		}
	}

	private lookAt(t: number, be: BackendView): void {
		const ring = this.ring;
		const now: Seen = {
			ok: be.ok, sick: be.health.state.name === 'sick', stuck: be.stuck, removed: be.removed, faults: be.stats.faults,
		};
		const was = this.seen.get(be.id);
		this.seen.set(be.id, now);
		const reason = be.lastFault?.reason ?? 'no fault recorded';
		if (was === undefined) {
			ring.push(t, 'found', be.id, `${name(be)} found, ${be.ok ? 'up' : be.state}`);
			return;
		}
		const faults = now.faults - was.faults;
		if (faults > 0 && !(was.ok && !now.ok && faults === 1)) {
			ring.push(t, 'fault', be.id, `${name(be)} faulted: ${reason}${faults > 1 ? ` (${faults} times)` : ''}`);
		}
		if (was.ok !== now.ok) {
			ring.push(t, now.ok ? 'up' : 'down', be.id, now.ok ? `${name(be)} up`
				: `${name(be)} down: ${now.removed ? 'socket file removed' : reason}`);
		}
		if (was.sick !== now.sick) {
			const why = be.health.state.name === 'sick' ? `: ${be.health.state.reason}` : '';
			ring.push(t, now.sick ? 'sick' : 'healthy', be.id, `${name(be)} ${now.sick ? 'sick' : 'healthy'}${why}`);
		}
		if (was.stuck !== now.stuck) {
			ring.push(t, now.stuck ? 'stuck' : 'unstuck', be.id, now.stuck
				? `${name(be)} stuck: it stopped reading, its UDP queries are dropped` : `${name(be)} reading again`);
		}
		if (now.removed && !was.removed) {
			ring.push(t, 'removed', be.id, `${name(be)} removed: its socket file is gone`);
		}
	}
}
