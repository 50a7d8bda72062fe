/*
 * TIMEOUTS
 *
 * Every timing in the balancer protocol is a whole number of seconds: a
 * heartbeat every 5, a reply within 15, a hello within 30, a reconnect after
 * 1, 3, 5 ... 32.  None of them needs millisecond precision, and a process
 * that may hold a hundred thousand remotes and thousands of TCP proxies must
 * not pay for a kernel timer per object.  So bbal keeps one coarse timeout
 * wheel: every long-lived object allocates its Timeout handles once, when it
 * is created, and re-arms them as its state changes.  The wheel is driven by
 * one 1-second tick in balancer.ts, which reads the clock once and calls run().
 *
 * Armed timeouts live in an AVL tree ordered by expiry time and then by id,
 * so run() pops them in a stable order: two timeouts that expire in the same
 * tick always fire in the order they were created.  A timeout fires no
 * earlier than its delay, and at most one tick later.
 *
 * A timeout that is (re-)armed from inside a callback during run() waits for
 * the next tick even when its delay is zero.  That keeps run() bounded: a
 * callback that re-arms itself for "now" cannot spin the loop.  Objects that
 * want to act at once (a newly found backend socket) do so directly instead
 * of going through the wheel.
 *
 * Arming a timeout reads the clock afresh rather than the tick's cached
 * time, so a deadline is never shortened by up to a second because it was set
 * late in a tick; arming happens on state changes, never per packet.
 *
 * The clock is injected.  Production passes a monotonic millisecond clock;
 * unit tests pass a variable they step forward, then call run(now), so no
 * test ever sleeps to watch a 15-second heartbeat deadline pass.
 *
 * The wheel's cached tick time (nowMs) is also the coarse "now" that the
 * hot path reads: remotes' last-seen seconds and the log gates (log.ts)
 * never read a clock per packet.
 */

import assert from 'node:assert/strict';
import { AVLTree } from 'avl';

/** Milliseconds on a monotonic clock whose zero is the Unix epoch. */
export type Clock = () => number;

export const monotonicClock: Clock = () => performance.timeOrigin + performance.now();

export interface TimeoutInfo {
	id: number;
	name: string;
	expiresInMs: number;
}

export class Timeout {
	/** Expiry in clock milliseconds, or null while disarmed. */
	expiresAt: number | null = null;
	/** The run() generation in which this was last armed (see run()). */
	armedInRun = 0;

	constructor(
		private readonly wheel: TimeoutWheel,
		readonly id: number,
		readonly name: string,
		readonly fn: () => void,
	) {}

	/** Arm (or re-arm) to fire after delaySecs whole seconds. */
	set(delaySecs: number): void {
		this.wheel.arm(this, delaySecs);
	}

	clear(): void {
		this.wheel.disarm(this);
	}
}

function compareTimeouts(a: Timeout, b: Timeout): number {
	const ea = a.expiresAt as number;
	const eb = b.expiresAt as number;
	if (ea !== eb) {
		return ea < eb ? -1 : 1;
	}
	return a.id - b.id;
}

export class TimeoutWheel {
	private readonly tree = new AVLTree<Timeout, undefined>(compareTimeouts, true);
	private nextId = 1;
	private runGeneration = 0;
	private running = false;
	/** The time of the last tick: the coarse "now" that the hot path reads. */
	nowMs: number;

	constructor(readonly clock: Clock) {
		this.nowMs = clock();
	}

	/** A new, disarmed timeout.  Allocate once per object, re-arm at will. */
	create(name: string, fn: () => void): Timeout {
		return new Timeout(this, this.nextId++, name, fn);
	}

	arm(to: Timeout, delaySecs: number): void {
		assert(delaySecs >= 0 && Number.isFinite(delaySecs), 'bad timeout delay');
		this.disarm(to);
		to.expiresAt = this.clock() + delaySecs * 1000;
		to.armedInRun = this.running ? this.runGeneration : 0;
		this.tree.insert(to);
	}

	disarm(to: Timeout): void {
		if (to.expiresAt === null) {
			return;
		}
		const removed = this.tree.remove(to);
		assert(removed === to, `timeout ${to.name} missing from the wheel`);
		to.expiresAt = null;
	}

	/**
	 * Fire every timeout that has expired by `now`, in expiry-then-id order.
	 * Called by the tick in production and directly by tests.
	 */
	run(now: number = this.clock()): void {
		assert(!this.running, 'TimeoutWheel.run() is not reentrant');
		this.nowMs = now;
		this.running = true;
		this.runGeneration++;
		try {
			for (;;) {
				/*
				 * A timeout armed by a callback of this very run waits for the
				 * next tick, so step past those; anything else due now fires.
				 */
				let node = this.tree.minNode();
				while (node !== null && (node.key).armedInRun === this.runGeneration &&
					((node.key).expiresAt as number) <= now) {
					node = this.tree.next(node);
				}
				if (node === null || ((node.key).expiresAt as number) > now) {
					break;
				}
				const to = node.key;
				this.tree.remove(to);
				to.expiresAt = null;
				to.fn();
			}
		} finally {
			this.running = false;
		}
	}

	/** Armed timeouts in firing order, for the stats snapshot. */
	list(now: number = this.clock()): TimeoutInfo[] {
		const out: TimeoutInfo[] = [];
		this.tree.forEach((node) => {
			const to = node.key;
			out.push({ id: to.id, name: to.name, expiresInMs: Math.max(0, Math.round((to.expiresAt as number) - now)) });
		});
		return out;
	}
}
