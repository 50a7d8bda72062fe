/*
 * The timeout wheel and the log gate, driven by a clock the test steps.
 *
 * Nothing here sleeps: every test owns a variable `now`, hands the wheel a
 * clock that reads it, moves it forward and calls run(now), exactly as the
 * 1-second tick in main.ts does.  What is asserted is what the objects that
 * own timeouts would notice: whether and when a callback runs, in which
 * order, and what the stats snapshot (list()) says meanwhile.
 */

import t from 'tap';
import { monotonicClock, type Timeout, TimeoutWheel } from '../src/timeouts.js';
import { seededRandom } from './support/random.js';

/* How many timeouts are armed, and whether one is: what list(), the stats snapshot's view, shows. */
const armedCount = (wheel: TimeoutWheel): number => wheel.list().length;
const isArmed = (wheel: TimeoutWheel, to: Timeout): boolean => wheel.list().some((x) => x.id === to.id);

/* A wheel on a fake clock, plus a log of which callbacks ran. */
function fakeWheel(startMs = 1_000_000) {
	const clock = { now: startMs };
	const wheel = new TimeoutWheel(() => clock.now);
	const fired: string[] = [];
	const make = (name: string, extra?: () => void) =>
		wheel.create(name, () => {
			fired.push(name);
			extra?.();
		});
	/* Move the clock to `ms` past the start and tick, like main.ts does. */
	const tickAt = (ms: number) => {
		clock.now = startMs + ms;
		wheel.run(clock.now);
	};
	return { clock, wheel, fired, make, tickAt };
}

t.test('fires no earlier than its delay, on the first run at or after expiry', async (t) => {
	const { wheel, fired, make, tickAt } = fakeWheel();
	const hb = make('heartbeat');
	hb.set(5);
	t.equal(isArmed(wheel, hb), true);
	tickAt(0);
	tickAt(4999);
	t.same(fired, [], 'not before 5 s');
	tickAt(5000);
	t.same(fired, ['heartbeat'], 'exactly at expiry');
	t.equal(isArmed(wheel, hb), false, 'disarmed once fired');
	t.equal(armedCount(wheel), 0);
	tickAt(20000);
	t.same(fired, ['heartbeat'], 'a fired timeout does not fire again');

	/* A tick that comes late still fires it, once. */
	hb.set(1);
	tickAt(20999);
	tickAt(27000);
	t.same(fired, ['heartbeat', 'heartbeat']);
});

t.test('fires in expiry order, then creation order for equal expiry', async (t) => {
	const { fired, make, tickAt } = fakeWheel();
	const a = make('a');
	const b = make('b');
	const c = make('c');
	const d = make('d');
	/* Armed in the "wrong" order on purpose: arming order must not matter. */
	d.set(3);
	c.set(1);
	b.set(2);
	a.set(2);
	tickAt(10000);
	t.same(fired, ['c', 'a', 'b', 'd']);
});

t.test('clear() before expiry means it never fires', async (t) => {
	const { wheel, fired, make, tickAt } = fakeWheel();
	const to = make('deadline');
	to.set(15);
	tickAt(14000);
	to.clear();
	t.equal(isArmed(wheel, to), false);
	t.equal(armedCount(wheel), 0);
	tickAt(60000);
	t.same(fired, []);
	to.clear();
	t.equal(armedCount(wheel), 0, 'clearing a disarmed timeout is harmless');
});

t.test('set() on an armed timeout moves it, never duplicates it', async (t) => {
	const { wheel, fired, make, tickAt } = fakeWheel();
	const to = make('reconnect');
	to.set(10);
	to.set(2);
	t.equal(armedCount(wheel), 1, 'one entry after re-arming earlier');
	tickAt(2000);
	t.same(fired, ['reconnect'], 'fires at the earlier expiry');
	tickAt(10000);
	t.same(fired, ['reconnect'], 'and not again at the old one');

	fired.length = 0;
	to.set(2);
	tickAt(11000);
	to.set(5);
	t.equal(armedCount(wheel), 1, 'one entry after re-arming later');
	tickAt(12000);
	t.same(fired, [], 'the old, earlier expiry is gone');
	tickAt(15999);
	t.same(fired, []);
	tickAt(16000);
	t.same(fired, ['reconnect'], 'fires at the later expiry');
});

t.test('a callback re-arming with delay 0 waits for the next run', async (t) => {
	const { wheel, fired, make, tickAt } = fakeWheel();
	let rearms = 3;
	const self = make('self', () => {
		if (rearms-- > 0) {
			self.set(0);
		}
	});
	const other = make('other');
	const arming = make('arming', () => other.set(0));
	self.set(1);
	arming.set(1);
	tickAt(1000);
	t.same(fired, ['self', 'arming'], 'neither re-armed timeout fires in the same run');
	t.equal(armedCount(wheel), 2);
	tickAt(1000);
	t.same(fired, ['self', 'arming', 'self', 'other'], 'both fire on the next run, same time');
	tickAt(1000);
	tickAt(1000);
	tickAt(1000);
	t.same(fired.filter((n) => n === 'self').length, 4, 'one firing per run, then it stops');
	t.equal(armedCount(wheel), 0);
});

t.test('a callback clearing another timeout due in the same run stops it', async (t) => {
	const { fired, make, tickAt } = fakeWheel();
	/* The killer is created first so that it fires first on a tie. */
	let victim = null as unknown as ReturnType<typeof make>;
	const killer = make('killer', () => victim.clear());
	victim = make('victim');
	killer.set(1);
	victim.set(1);
	tickAt(1000);
	t.same(fired, ['killer']);
	tickAt(99000);
	t.same(fired, ['killer'], 'and it stays cleared');
});

t.test('a callback re-arming a timeout due in the same run defers it', async (t) => {
	const { fired, make, tickAt } = fakeWheel();
	let late = null as unknown as ReturnType<typeof make>;
	const mover = make('mover', () => late.set(4));
	late = make('late');
	mover.set(1);
	late.set(1);
	tickAt(1000);
	t.same(fired, ['mover']);
	tickAt(4999);
	t.same(fired, ['mover']);
	tickAt(5000);
	t.same(fired, ['mover', 'late']);
});

t.test('list() shows the armed timeouts, and only those, in firing order', async (t) => {
	const { wheel, make, tickAt } = fakeWheel();
	const hello = make('hello deadline');
	const hb = make('heartbeat');
	const rescan = make('rescan');
	make('never armed');
	t.same(wheel.list(), []);
	t.equal(armedCount(wheel), 0);
	rescan.set(5);
	hello.set(30);
	hb.set(5);
	t.equal(armedCount(wheel), 3);
	tickAt(2000);
	t.same(wheel.list(1_000_000 + 2000), [
		{ id: hb.id, name: 'heartbeat', expiresInMs: 3000 },
		{ id: rescan.id, name: 'rescan', expiresInMs: 3000 },
		{ id: hello.id, name: 'hello deadline', expiresInMs: 28000 },
	]);
	t.ok(hb.id < rescan.id, 'equal expiry listed by creation id');
	tickAt(5000);
	t.same(wheel.list(1_000_000 + 5000).map((i) => i.name), ['hello deadline']);
	t.equal(armedCount(wheel), 1);
	t.same(wheel.list(1_000_000 + 40000)[0]?.expiresInMs, 0, 'overdue shows as 0, not negative');
});

t.test('run(now) updates nowMs', async (t) => {
	const { wheel, clock } = fakeWheel(5000);
	t.equal(wheel.nowMs, 5000, 'read from the clock at construction');
	clock.now = 9000;
	t.equal(wheel.nowMs, 5000, 'the clock alone does not move it');
	wheel.run(9000);
	t.equal(wheel.nowMs, 9000);
	wheel.run(12345);
	t.equal(wheel.nowMs, 12345);
});

t.test('a throwing callback does not wedge the wheel', async (t) => {
	const { wheel, fired, make, tickAt } = fakeWheel();
	const bad = make('bad', () => {
		throw new Error('boom');
	});
	const good = make('good');
	bad.set(1);
	good.set(1);
	t.throws(() => tickAt(1000), /boom/);
	t.equal(isArmed(wheel, good), true, 'the later one is still armed');
	tickAt(1000);
	t.same(fired, ['bad', 'good'], 'and fires on the next run');
	t.equal(armedCount(wheel), 0);
});

t.test('a bad delay is refused and leaves the timeout as it was', async (t) => {
	/*
	 * A negative, NaN or infinite delay is a bug in the caller's arithmetic
	 * (a back-off gone wrong); armed, it would fire at once or never, or
	 * wedge the tree's ordering.  It must throw where it is made.
	 */
	const { wheel, fired, make, tickAt } = fakeWheel();
	const hb = make('heartbeat');
	hb.set(5);
	for (const bad of [-1, -0.001, NaN, Infinity, -Infinity]) {
		t.throws(() => hb.set(bad), /bad timeout delay/, String(bad));
	}
	t.equal(armedCount(wheel), 1, 'still armed once');
	tickAt(4999);
	t.same(fired, [], 'not fired early');
	tickAt(5000);
	t.same(fired, ['heartbeat'], 'fires at the delay it had before');

	const idle = make('idle');
	t.throws(() => idle.set(NaN), /bad timeout delay/);
	t.equal(isArmed(wheel, idle), false, 'a disarmed timeout stays disarmed');
	t.equal(armedCount(wheel), 0);
});

t.test('monotonicClock counts milliseconds from the Unix epoch, forward', async (t) => {
	const start = monotonicClock();
	t.ok(Math.abs(start - Date.now()) < 60_000, 'close to the wall clock');
	/* Spin for two milliseconds of its time (a second at most). */
	const giveUp = Date.now() + 1000;
	let later = start;
	while (later - start < 2 && Date.now() < giveUp) {
		later = monotonicClock();
	}
	t.ok(later - start >= 2 && later - start < 1000, `moved forward with time: ${later - start} ms`);
});

t.test('run() from inside a callback is refused', async (t) => {
	const { wheel, make, tickAt } = fakeWheel();
	let err: unknown = null;
	const to = make('reentrant', () => {
		try {
			wheel.run(wheel.nowMs);
		} catch (e) {
			err = e;
		}
	});
	to.set(0);
	tickAt(0);
	t.match(err, { message: /not reentrant/ });
});

t.test('matches a plain model over random set/clear/run sequences', async (t) => {
	/*
	 * The wheel sits on an AVL tree that rebalances on every insert and
	 * remove; a slip there shows as a timeout firing late, early, twice or
	 * never.  So compare against the obvious sorted-array model over many
	 * random sequences.
	 */
	const mismatches: string[] = [];
	for (let seed = 1; seed <= 200 && mismatches.length === 0; seed++) {
		const rand = seededRandom(seed);
		const { clock, wheel, fired, make } = fakeWheel(0);
		const handles = Array.from({ length: 24 }, (_, i) => make(`t${i}`));
		const model = new Map<number, number>(); // handle index -> expiresAt
		const modelFired: string[] = [];
		for (let step = 0; step < 300; step++) {
			const r = rand();
			const i = Math.floor(rand() * handles.length);
			if (r < 0.5) {
				const delay = Math.floor(rand() * 6);
				handles[i].set(delay);
				model.set(i, clock.now + delay * 1000);
			} else if (r < 0.7) {
				handles[i].clear();
				model.delete(i);
			} else {
				clock.now += Math.floor(rand() * 3) * 1000;
				const due = [...model].filter(([, at]) => at <= clock.now)
					.sort((x, y) => x[1] - y[1] || x[0] - y[0]);
				for (const [k] of due) {
					model.delete(k);
					modelFired.push(`t${k}`);
				}
				wheel.run(clock.now);
			}
			if (armedCount(wheel) !== model.size || fired.join() !== modelFired.join()) {
				mismatches.push(`seed ${seed} step ${step}: wheel size ${armedCount(wheel)} fired ` +
					`[${fired.slice(-5)}], model size ${model.size} fired [${modelFired.slice(-5)}]`);
				break;
			}
		}
	}
	t.same(mismatches, []);
});
