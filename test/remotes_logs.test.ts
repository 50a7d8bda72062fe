/*
 * What the remotes table tells operators, and how a pass spends a tick's
 * allowance, without I/O: a registry whose backends are driven to ok or
 * faulted through fake sockets, a clock stepped by hand, every log line kept.
 *
 * The lines: a new remote, each kind of assignment (new primary, new
 * backup, back to the primary) and an eviction at the cap, each naming the
 * remote and the backends concerned, each let through 50 (or 1) per 5 s
 * and counted after that; a pass's one summary line with its counts and
 * how it ended.  The allowance: a pass never looks at more than
 * REMOTES_SWEEP_VISITS remotes a tick, and what one pass spent is gone for
 * the other in the same tick.  Also the table's reading side (peek, slice)
 * as the stats socket and the UDP proxy use it.
 */

import t from 'tap';
import { ADDR_END, REMOTES_SWEEP_VISITS } from '../src/remotes.js';
import { fakeTable } from './support/fake_socket.js';

function setup(maxRemotes = 1_000_000) {
	const env = fakeTable(maxRemotes);
	return {
		...env,
		serve(addr: number): number {
			return env.remotes.lookup(addr).chooseBackend()?.id ?? 0;
		},
	};
}

const BASE = 0x0b000000;
const NEW_REMOTE = 'new remote peer';
const PRIMARY = 'remote assigned to new primary backend';
const BACKUP = 'remote assigned to new backup backend';
const RETURNED = 'remote assigned to original primary backend';
const EVICTED = 'remotes table full: evicted the idlest remote';

t.test('new remotes are logged 50 per 5 s, then counted in the next line', async (t) => {
	const env = setup();
	for (let i = 0; i < 60; i++) {
		env.remotes.lookup(BASE + i);
	}
	const lines = env.logged(NEW_REMOTE);
	t.equal(lines.length, 50, 'a burst of 50');
	t.match(lines[0], { level: 30, remote_ip: '11.0.0.0', not_logged: 0 });
	t.match(lines[49], { remote_ip: '11.0.0.49' });
	env.remotes.lookup(BASE);
	t.equal(env.logged(NEW_REMOTE).length, 50, 'a remote seen again is not new');
	env.tick(5);
	env.remotes.lookup(BASE + 100);
	t.match(env.logged(NEW_REMOTE).at(-1), { remote_ip: '11.0.0.100', not_logged: 10 }, 'the next window says how many were held back');
});

t.test('each assignment is logged once, naming the remote, the backend and the primary', async (t) => {
	const env = setup();
	const a = env.up('5301');
	const b = env.up('5302');
	t.equal(env.serve(BASE + 1), 5301);
	t.equal(env.serve(BASE + 1), 5301);
	t.match(env.logged(PRIMARY), [{ remote_ip: '11.0.0.1', be_id: 5301, primary_be_id: 5301 }], 'a new primary, once');
	a.fault('test');
	t.equal(env.serve(BASE + 1), 5302);
	t.equal(env.serve(BASE + 1), 5302);
	t.match(env.logged(BACKUP), [{ remote_ip: '11.0.0.1', be_id: 5302, primary_be_id: 5301 }], 'a backup, once');
	env.up('5301');
	t.equal(env.serve(BASE + 1), 5301);
	t.equal(env.serve(BASE + 1), 5301);
	t.match(env.logged(RETURNED), [{ remote_ip: '11.0.0.1', be_id: 5301, primary_be_id: 5301 }], 'the return, once');
	t.ok(env.serve(BASE + 2) > 0);
	t.equal(env.logged(RETURNED).length, 1, 'a remote that never had a backup does not "return"');
	b.fault('test');
	a.fault('test');
	t.equal(env.serve(BASE + 2), 0, 'no backend ok: none');
	t.equal(env.logged(BACKUP).length, 1, 'no backup line when there is no backup');
	t.same(env.logged(PRIMARY).map((r) => r.level), [30, 30], 'assignments are info');
});

t.test('an eviction at the cap is a warning naming the remote evicted and the cap', async (t) => {
	const env = setup(2);
	env.remotes.lookup(BASE + 1);
	env.remotes.lookup(BASE + 2);
	env.remotes.lookup(BASE + 3);
	t.match(env.logged(EVICTED), [{ level: 40, max_remotes: 2, remote_ip: '11.0.0.1', not_logged: 0 }]);
	env.remotes.lookup(BASE + 4);
	t.equal(env.logged(EVICTED).length, 1, 'one per 5 s');
	t.equal(env.remotes.evicted, 2, 'but every eviction is counted');
});

t.test('at the cap, when every remote was seen again, each gets its second chance and the oldest goes', async (t) => {
	const env = setup(3);
	for (const i of [1, 2, 3, 1, 2, 3]) {
		env.remotes.lookup(BASE + i);
	}
	env.remotes.lookup(BASE + 4);
	t.same(env.remotes.list().map((r) => r.addr - BASE), [2, 3, 4], 'one lap of the queue, then the head');
	env.remotes.lookup(BASE + 5);
	t.same(env.remotes.list().map((r) => r.addr - BASE), [3, 4, 5]);
});

t.test('a remote\'s own logger and address name it', async (t) => {
	const env = setup();
	const rem = env.remotes.lookup(BASE + 0x010203);
	t.equal(rem.ip, '11.1.2.3');
	rem.log.warn('something about it');
	t.match(env.logged('something about it'), [{ remote_ip: '11.1.2.3' }]);
	t.equal(rem.log, rem.log, 'made once');
});

t.test('a table with room for no remote is refused', async (t) => {
	t.throws(() => setup(0), /maxRemotes must be at least 1/);
});

t.test('peek reads without creating or touching; slice reads in address order from a cursor', async (t) => {
	const env = setup();
	t.equal(env.remotes.peek(BASE + 1), undefined);
	t.equal(env.remotes.size, 0, 'peek creates nothing');
	for (const i of [5, 1, 9, 3, 7]) {
		env.remotes.lookup(BASE + i);
	}
	env.tick(10);
	const rem = env.remotes.peek(BASE + 5);
	t.equal(rem?.addr, BASE + 5);
	t.equal(rem?.lastSeenSec, 0, 'not marked seen');
	const last = (rs: Array<{ addr: number }>): number[] => rs.map((r) => r.addr - BASE);
	const first = env.remotes.slice(0, 2);
	t.same([last(first.remotes), first.next], [[1, 3], BASE + 5]);
	const mid = env.remotes.slice(BASE + 4, 2);
	t.same([last(mid.remotes), mid.next], [[5, 7], BASE + 9], 'from between two addresses: the next one held');
	const end = env.remotes.slice(BASE + 9, 2);
	t.same([last(end.remotes), end.next], [[9], ADDR_END], 'the end');
	t.same(env.remotes.slice(ADDR_END, 2), { remotes: [], next: ADDR_END });
	t.same(last(env.remotes.slice(0, 10).remotes), [1, 3, 5, 7, 9]);
});

/* 5000 remotes on 5302, then n on 5301 above them (5302 faulted meanwhile), both ok. */
function sparse(n: number) {
	const env = setup();
	const b = env.up('5302');
	for (let i = 0; i < REMOTES_SWEEP_VISITS; i++) {
		env.serve(BASE + i);
	}
	b.fault('test');
	const a = env.up('5301');
	for (let i = 0; i < n; i++) {
		env.serve(BASE + REMOTES_SWEEP_VISITS + i);
	}
	env.up('5302');
	return { ...env, a };
}

t.test('a rebalance pass looks at REMOTES_SWEEP_VISITS remotes a tick, then goes on at the next', async (t) => {
	const env = sparse(10);
	t.equal(env.remotes.rebalance(env.a, 10), 0, 'a tick\'s look finds none of its remotes');
	t.equal(env.a.remoteCount, 10);
	env.tick();
	t.equal(env.a.remoteCount, 0, 'the next tick moves them');
	t.match(env.logged('rebalanced remotes'), [{ be_id: 5301, remotes: 10, planned: 10, visited: REMOTES_SWEEP_VISITS + 10, ticks: 2, ended: 'done' }]);
});

t.test('a rebalance pass planned for more than the backend holds ends at the end of the table', async (t) => {
	const env = sparse(3);
	t.equal(env.remotes.rebalance(env.a, 5), 0);
	env.tick();
	t.notOk(env.remotes.rebalancing);
	t.match(env.logged('rebalanced remotes'), [{ remotes: 3, planned: 5, visited: REMOTES_SWEEP_VISITS + 3, ended: 'end of table' }]);
});

t.test('what a rebalance pass looked at is gone for expiry in the same tick', async (t) => {
	const env = sparse(10);
	t.equal(env.a.remoteCount, 10);
	t.equal(env.remotes.rebalance(env.a, 10), 0);
	env.remotes.expire();
	t.ok(env.remotes.expiring, 'nothing left of the tick for expiry: its pass waits for the next');
	env.tick();
	t.ok(env.remotes.expiring, 'the next tick: rebalancing first, then expiry looks at the rest of the allowance');
	env.tick();
	t.notOk(env.remotes.expiring);
	t.notOk(env.remotes.rebalancing);
	t.match(env.logged('expired idle remotes'), [{ visited: REMOTES_SWEEP_VISITS + 10, ticks: 2 }],
		'the tick it had nothing is not counted as one of its ticks');
});

t.test('what an expiry pass looked at is gone for rebalancing in the same tick', async (t) => {
	const env = sparse(10);
	t.equal(env.remotes.expire(), 0, 'none idle');
	t.match(env.logged('expired idle remotes'), [], 'the pass has looked at 5,000, not all');
	t.equal(env.remotes.rebalance(env.a, 10), 0, 'nothing left of the tick for rebalancing');
	env.tick();
	t.equal(env.a.remoteCount, 10, 'the next tick: rebalancing first, looking at 5,000 of another\'s remotes');
	env.tick();
	t.match(env.logged('expired idle remotes'), [{ level: 20, expired: 0, visited: REMOTES_SWEEP_VISITS + 10, ticks: 2 }],
		'a pass that forgot nothing is a debug line');
});
