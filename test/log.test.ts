/*
 * log.ts: the rate-limited log gates and the root logger's record shape.
 */

import { Writable } from 'node:stream';
import t from 'tap';
import { GatedLog, LogGate, makeLogger } from '../src/log.js';
import { TimeoutWheel } from '../src/timeouts.js';

/* A wheel on a fake clock; tickAt moves the clock and ticks, like the balancer does. */
function fakeWheel(startMs = 1_000_000) {
	const clock = { now: startMs };
	const wheel = new TimeoutWheel(() => clock.now);
	const tickAt = (ms: number) => {
		clock.now = startMs + ms;
		wheel.run(clock.now);
	};
	return { clock, wheel, tickAt };
}

/* A logger whose records land in an array. */
function memoryLogger() {
	const records: Array<Record<string, unknown>> = [];
	const dest = new Writable({
		write(chunk: Buffer, _enc, cb) {
			records.push(JSON.parse(chunk.toString()) as Record<string, unknown>);
			cb();
		},
	});
	return { log: makeLogger('info', dest), records };
}

t.test('LogGate opens once per interval and reports what it held back', async (t) => {
	const { wheel, tickAt } = fakeWheel();
	const gate = new LogGate(wheel);
	tickAt(0);
	t.equal(gate.open(), 0, 'the first one logs, nothing suppressed');
	t.equal(gate.open(), -1, 'at once again: suppressed');
	tickAt(1000);
	t.equal(gate.open(), -1);
	tickAt(4999);
	t.equal(gate.open(), -1, 'still within 5 s');
	tickAt(5000);
	t.equal(gate.open(), 3, '5 s later it logs and counts the three held back');
	t.equal(gate.open(), -1, 'and the interval starts again from there');
	tickAt(60000);
	t.equal(gate.open(), 1, 'only the one since the last log');
	tickAt(120000);
	t.equal(gate.open(), 0, 'nothing suppressed since then');
});

t.test('LogGate reads the tick time, not the clock, and honours its interval', async (t) => {
	const { wheel, clock, tickAt } = fakeWheel();
	const gate = new LogGate(wheel, 30);
	tickAt(0);
	t.equal(gate.open(), 0);
	clock.now += 3_600_000;
	t.equal(gate.open(), -1, 'a clock that moved without a tick changes nothing');
	tickAt(29999);
	t.equal(gate.open(), -1);
	tickAt(30000);
	t.equal(gate.open(), 2, 'a 30 s gate opens after 30 s');
});

t.test('GatedLog writes its line at its level with not_logged, and builds fields only when it writes', async (t) => {
	const { wheel, tickAt } = fakeWheel();
	const { log, records } = memoryLogger();
	const oversize = new GatedLog(wheel, 'warn', 'dropping oversized UDP packet');
	const acl = new GatedLog(wheel, 'error', 'query from outside --allow');
	let built = 0;
	const fields = () => {
		built++;
		return { len: 2000 };
	};
	tickAt(0);
	oversize.report(log, fields);
	oversize.report(log, fields);
	oversize.report(log, fields);
	acl.report(log.child({ remote_ip: '10.0.0.1' }));
	await new Promise((resolve) => setImmediate(resolve));
	t.equal(built, 1, 'the fields of held-back lines are never built');
	t.equal(records.length, 2, 'one line per condition: one gate does not silence another');
	t.match(records[0], { level: 40, msg: 'dropping oversized UDP packet', len: 2000, not_logged: 0 });
	t.match(records[1], { level: 50, msg: 'query from outside --allow', remote_ip: '10.0.0.1', not_logged: 0 });
	tickAt(5000);
	oversize.report(log, { len: 3000 });
	await new Promise((resolve) => setImmediate(resolve));
	t.match(records[2], { level: 40, len: 3000, not_logged: 2 }, 'the next line says how many were held back');
});

t.test('GatedLog with a burst lets that many through per interval', async (t) => {
	const { wheel, tickAt } = fakeWheel();
	const { log, records } = memoryLogger();
	const gl = new GatedLog(wheel, 'info', 'new remote peer', { burst: 3, intervalSecs: 10 });
	tickAt(0);
	for (let i = 0; i < 10; i++) {
		gl.report(log, { i });
	}
	tickAt(9999);
	gl.report(log, { i: 10 });
	tickAt(10000);
	gl.report(log, { i: 11 });
	await new Promise((resolve) => setImmediate(resolve));
	t.same(records.map((r) => r.i), [0, 1, 2, 11]);
	t.equal(records[3]?.not_logged, 8);
});

t.test('makeLogger writes bunyan records', async (t) => {
	const { log, records } = memoryLogger();
	log.child({ be_id: 5301 }).info({ x: 1 }, 'hello');
	await new Promise((resolve) => setImmediate(resolve));
	t.match(records[0], { name: 'bbal', pid: process.pid, v: 0, level: 30, msg: 'hello', be_id: 5301, x: 1 });
	t.match(records[0]?.time, /^\d{4}-\d\d-\d\dT/);
	t.type(records[0]?.hostname, 'string');
});
