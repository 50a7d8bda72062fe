/*
 * Bulk work on the remotes table is sliced, without I/O: the table over a
 * registry whose backends are driven to ok through fake sockets, and a
 * clock stepped by hand.
 *
 * Expiry and rebalancing are passes that look at REMOTES_SWEEP_VISITS and
 * change REMOTES_SWEEP_CHANGES remotes a tick at most, the two together
 * (remotes.ts, PASSES): 100,000 idle remotes go over a hundred ticks, none
 * forgetting more than its share, with one summary line for the pass and
 * none per remote; a pass that finds nothing to do looks at 5,000 a tick;
 * a rebalance pass moves the lowest addresses first and resumes where it
 * stopped, not from the start, and ends early when its backend is no
 * longer ok; running together, the passes take turns.
 */

import t from 'tap';
import { REMOTE_IDLE_EXPIRY_SECS, REMOTES_SWEEP_CHANGES, REMOTES_SWEEP_VISITS } from '../src/remotes.js';
import { fakeTable } from './support/fake_socket.js';

/* A table over fake backends that are ok; every log line kept. */
function setup(names: string[], maxRemotes = 1_000_000) {
	const env = fakeTable(maxRemotes);
	const bes = names.map(env.up);
	return {
		...env, bes,
		serve(addr: number): number {
			return env.remotes.lookup(addr).chooseBackend()?.id ?? 0;
		},
	};
}

const BASE = 0x0b000000;
const C = REMOTES_SWEEP_CHANGES;

t.test('100,000 idle remotes expire over a hundred ticks, none forgetting more than its share, with one summary line', async (t) => {
	const env = setup(['5301', '5302']);
	const n = 100_000;
	for (let i = 0; i < n; i++) {
		env.serve(BASE + i);
	}
	const keep = BASE + n + 1;
	env.tick(REMOTE_IDLE_EXPIRY_SECS - 5);
	env.serve(keep);
	env.tick(6);
	t.equal(env.remotes.size, n + 1);

	const first = env.remotes.expire();
	t.equal(first, C, 'the job\'s own tick expires its share');
	t.ok(env.remotes.expiring, 'the pass goes on');
	t.ok(env.wheel.list().some((to) => to.name === 'remotes sweep'), 'the sweep is armed for the next tick');
	t.equal(env.remotes.expire(), 0, 'asked again in the same tick: the tick\'s share is spent, nothing more');

	const perTick: number[] = [first];
	let ticks = 1;
	while (env.remotes.expiring && ticks < 1000) {
		const before = env.remotes.size;
		env.tick();
		perTick.push(before - env.remotes.size);
		ticks++;
	}
	t.equal(ticks, n / C + 1, `${ticks} ticks (the last only looks at the active remote)`);
	t.ok(perTick.every((k) => k <= C), `no tick expired more than ${C}`);
	t.same(env.remotes.list().map((r) => r.addr), [keep], 'every idle remote gone, the active one kept');
	t.equal(env.remotes.expired, n);
	t.equal(env.bes[0].remoteCount + env.bes[1].remoteCount, env.remotes.list().filter((r) => r.primary !== null).length,
		'the backends\' counts released');
	t.notOk(env.wheel.list().some((to) => to.name === 'remotes sweep'), 'the sweep disarmed once the pass is over');
	t.same(env.logged('expiring remote entry'), [], 'no line per remote');
	t.match(env.logged('expired idle remotes'), [{ expired: n, visited: n + 1, remotes: 1, ticks, level: 30 }],
		'one summary line for the pass');
});

t.test('a pass that finds nothing to forget looks at REMOTES_SWEEP_VISITS remotes a tick', async (t) => {
	const env = setup(['5301']);
	const n = 100_000;
	for (let i = 0; i < n; i++) {
		env.serve(BASE + i);
	}
	let ticks = 1;
	t.equal(env.remotes.expire(), 0);
	while (env.remotes.expiring && ticks < 1000) {
		env.tick();
		ticks++;
	}
	t.equal(ticks, n / REMOTES_SWEEP_VISITS, `${n} remotes looked at in ${ticks} ticks, within the 30 s between expiry jobs`);
	t.match(env.logged('expired idle remotes'), [{ expired: 0, visited: n, remotes: n, ticks, level: 20 }],
		'the summary at debug when nothing expired');
});

t.test('a rebalance pass moves the lowest addresses first, a share a tick, and resumes where it stopped', async (t) => {
	const env = setup(['5301']);
	const n = 3 * C + 100;
	for (let i = 0; i < n; i++) {
		env.serve(BASE + i);
	}
	const [a] = env.bes;
	env.up('5302');
	const plan = env.backends.rebalancePlan();
	t.equal(plan?.count, n - 2);
	const cleared = (): number[] => env.remotes.list().filter((r) => r.primary === null).map((r) => r.addr - BASE);
	const range = (from: number, to: number): number[] => Array.from({ length: to - from }, (_, i) => from + i);

	t.equal(env.remotes.rebalance(a, n - 2), C, 'one slice in the job\'s tick');
	t.same(cleared(), range(0, C), 'the lowest addresses');
	t.ok(env.remotes.rebalancing);
	/*
	 * Those moved choose afresh, and round-robin gives half of them the same
	 * backend again: behind the cursor, they stay (a pass that started over
	 * would move them again).
	 */
	const moved = env.remotes.list().slice(0, C);
	for (const r of moved) {
		r.chooseBackend();
	}
	const backOnA = moved.filter((r) => r.primary === a).length;
	t.ok(backOnA > 0, `${backOnA} of them chose ${a.id} again`);
	const aBefore = a.remoteCount;
	env.tick();
	t.equal(aBefore - a.remoteCount, C, 'the next tick moves one slice more');
	t.same(cleared(), range(C, 2 * C), 'the next addresses, not the first ones again');
	env.tick();
	env.tick();
	t.notOk(env.remotes.rebalancing, 'over in four ticks');
	t.same(env.logged('rebalancing to reduce spread'), [], 'no line per remote');
	t.match(env.logged('rebalanced remotes'), [{ be_id: 5301, remotes: n - 2, planned: n - 2, ticks: 4, ended: 'done' }],
		'one summary line for the pass');
	t.equal(env.remotes.list().at(-1)?.primary, a, 'beyond the planned count, the last addresses stay');
});

t.test('a rebalance pass ends when its backend is no longer ok; asking again while one runs starts nothing', async (t) => {
	const env = setup(['5301']);
	const n = 2 * C + 10;
	for (let i = 0; i < n; i++) {
		env.serve(BASE + i);
	}
	const [a] = env.bes;
	const b = env.up('5302');
	t.equal(env.remotes.rebalance(a, n - 2), C);
	t.equal(env.remotes.rebalance(b, 5), 0, 'a second plan while one runs: nothing (the running pass had this tick\'s slice)');
	a.fault('test');
	env.tick();
	t.notOk(env.remotes.rebalancing, 'the pass is over');
	t.match(env.logged('rebalanced remotes'), [{ be_id: 5301, remotes: C, planned: n - 2, ended: 'backend not ok' }]);
	t.equal(a.remoteCount, n - C, 'a faulted backend\'s remotes wait for it');
	t.equal(b.remoteCount, 0, 'nothing moved off the other backend');
});

t.test('close() ends the passes and disarms the sweep', async (t) => {
	const env = setup(['5301']);
	for (let i = 0; i < C + 1; i++) {
		env.serve(BASE + i);
	}
	env.tick(REMOTE_IDLE_EXPIRY_SECS + 1);
	env.remotes.expire();
	t.ok(env.remotes.expiring);
	env.remotes.close();
	t.notOk(env.remotes.expiring);
	t.notOk(env.wheel.list().some((to) => to.name === 'remotes sweep'));
	env.remotes.close();
	t.pass('close() twice');
});

t.test('expiry and rebalancing share a tick\'s allowance, taking turns at going first', async (t) => {
	const env = setup(['5301']);
	const [a] = env.bes;
	for (let i = 0; i < 4 * C; i++) {
		env.serve(BASE + i);
	}
	env.tick(REMOTE_IDLE_EXPIRY_SECS + 1);
	env.up('5302');
	t.equal(env.remotes.expire(), C, 'tick 1, expiry first: its share');
	t.equal(env.remotes.rebalance(a, 4 * C - 2), 0, 'nothing left for rebalancing in this tick');
	t.same([env.remotes.size, a.remoteCount], [3 * C, 3 * C]);
	env.tick();
	t.same([env.remotes.size, a.remoteCount], [3 * C, 2 * C], 'tick 2, rebalancing first: it moves its share, nothing expires');
	env.tick();
	t.same([env.remotes.size, a.remoteCount], [2 * C, 2 * C], 'tick 3, expiry first again');
});
