/*
 * The in-flight table and answer accounting (src/answers.ts), pure: every
 * time is a parameter.  Issue 13 item 1: answers matched to their queries by
 * (address, port, id), counted by rcode with their latency, queries left
 * unanswered, late answers sent, answers nobody asked for dropped, the
 * table bounded.  A fast-check property drives the table against a plain
 * model with random interleavings of queries, answers, retries, duplicates
 * and the clock.
 */

import fc from 'fast-check';
import t from 'tap';
import {
	ANSWER_DROP, ANSWER_LATE, ANSWER_SEND, AnswerBook, type AnswerEvent, INFLIGHT_INITIAL_SLOTS, LATENCY_BUCKETS, latencyBoundMs,
} from '../src/answers.js';

const A = 0x7f000001;
const B = 0x7f000002;
const T0 = 1_700_000_000_000;

function book(timeoutMs = 2000, cap = 65_536): { b: AnswerBook; events: AnswerEvent[] } {
	const events: AnswerEvent[] = [];
	return { b: new AnswerBook(timeoutMs, cap, (ev) => events.push(ev)), events };
}

t.test('an answer matches its query by address, port and id, and is counted by rcode with its latency', async (t) => {
	const { b, events } = book();
	b.query(A, 5000, 1, T0);
	b.query(A, 5000, 2, T0);
	b.query(B, 5000, 1, T0);
	b.query(A, 5001, 1, T0);
	t.equal(b.outstanding, 4);
	t.equal(b.answer(A, 5000, 2, 0, T0 + 3), ANSWER_SEND, 'noerror');
	t.equal(b.answer(B, 5000, 1, 3, T0 + 3), ANSWER_SEND, 'nxdomain');
	t.equal(b.answer(A, 5001, 1, 2, T0 + 3), ANSWER_SEND, 'servfail');
	t.equal(b.answer(A, 5000, 1, 5, T0 + 3), ANSWER_SEND, 'refused');
	t.same(b.answers, { noerror: 1, nxdomain: 1, servfail: 1, refused: 1, other: 0 });
	t.equal(b.outstanding, 0, 'nothing outstanding');
	t.same(events, ['answer', 'answer', 'servfail', 'answer'], 'health hears each; SERVFAIL as such');
	b.query(A, 5000, 9, T0 + 10);
	b.answer(A, 5000, 9, 4, T0 + 10);
	t.equal(b.answers.other, 1, 'NOTIMP and the rest are other');
	t.equal(b.latencyCounts.reduce((x, y) => x + y, 0), 5, 'every answer in the histogram');
	t.equal(b.latencySumMs, 12, 'the sum of the latencies');
	t.equal(b.latencyQuantileMs(0.5, T0 + 20), latencyBoundMs(12), 'p50: the bucket holding 3 ms (2.83-4 ms)');
});

t.test('answers nobody asked for are dropped, a second answer too', async (t) => {
	const { b } = book();
	b.query(A, 5000, 7, T0);
	t.equal(b.answer(A, 5000, 8, 0, T0 + 1), ANSWER_DROP, 'another id');
	t.equal(b.answer(A, 5002, 7, 0, T0 + 1), ANSWER_DROP, 'another port');
	t.equal(b.answer(B, 5000, 7, 0, T0 + 1), ANSWER_DROP, 'another address');
	t.equal(b.answer(A, 5000, 7, 0, T0 + 1), ANSWER_SEND, 'the query\'s own');
	t.equal(b.answer(A, 5000, 7, 0, T0 + 1), ANSWER_DROP, 'the same answer again');
	t.equal(b.unsolicited, 4);
	t.equal(b.answers.noerror, 1, 'only the matched answer counted by rcode');
});

t.test('no answer within the timeout: unanswered; a late answer is still sent, once, until a second timeout', async (t) => {
	const { b, events } = book(2000);
	b.query(A, 5000, 1, T0);
	b.query(A, 5000, 2, T0 + 500);
	b.sweep(T0 + 1999);
	t.equal(b.unanswered, 0, 'not before the timeout');
	b.sweep(T0 + 2000);
	t.equal(b.unanswered, 1, 'the first is unanswered at its timeout');
	t.equal(b.outstanding, 1);
	t.same(events, ['unanswered']);
	t.equal(b.answer(A, 5000, 1, 0, T0 + 2100), ANSWER_LATE, 'a late answer goes out');
	t.equal(b.late, 1);
	t.equal(b.answer(A, 5000, 1, 0, T0 + 2100), ANSWER_DROP, 'but only once');
	b.sweep(T0 + 2500);
	t.equal(b.unanswered, 2);
	b.sweep(T0 + 4500);
	t.equal(b.size, 0, 'forgotten two timeouts after it was sent');
	t.equal(b.answer(A, 5000, 2, 0, T0 + 4600), ANSWER_DROP, 'then an answer to it is nobody\'s');
	t.same(events, ['unanswered', 'unanswered'], 'a late answer is no health event: the query counted as unanswered');
});

t.test('a query records the sweep too: a busy backend needs no timer', async (t) => {
	const { b } = book(1000);
	b.query(A, 1, 1, T0);
	b.query(A, 1, 2, T0 + 1000);
	t.equal(b.unanswered, 1, 'the next query expired the first');
});

t.test('a retry with the same id and port: one entry while in flight, a new one after the timeout', async (t) => {
	const { b } = book(2000);
	b.query(A, 5000, 1, T0);
	b.query(A, 5000, 1, T0 + 100);
	t.equal(b.outstanding, 1, 'one entry');
	t.equal(b.queries, 2, 'both counted as queries');
	b.sweep(T0 + 2000);
	b.query(A, 5000, 1, T0 + 2500);
	t.equal(b.outstanding, 1, 'the retry after the timeout is a query of its own');
	t.equal(b.answer(A, 5000, 1, 0, T0 + 2510), ANSWER_SEND, 'answered in time, not late');
	t.equal(b.latencySumMs, 10, 'its latency from the retry');
});

t.test('at the cap the oldest entry goes, counted, and health hears of it as unanswered', async (t) => {
	const { b, events } = book(2000, 3);
	for (let id = 1; id <= 5; id++) {
		b.query(A, 5000, id, T0 + id);
	}
	t.equal(b.size, 3, 'never more than the cap');
	t.equal(b.dropped, 2);
	t.same(events, ['unanswered', 'unanswered']);
	t.equal(b.answer(A, 5000, 1, 0, T0 + 10), ANSWER_DROP, 'a dropped query\'s answer is not sent');
	t.equal(b.answer(A, 5000, 5, 0, T0 + 10), ANSWER_SEND);
	t.equal(b.outstanding, 2);
});

t.test('the table grows by doubling and keeps every entry, its order and its state', async (t) => {
	const { b } = book(2000, 10_000);
	const n = INFLIGHT_INITIAL_SLOTS * 3 + 7;
	for (let i = 0; i < n; i++) {
		b.query(A + (i % 50), 1024 + (i % 7), i & 0xffff, T0 + Math.floor(i / 1000));
	}
	t.equal(b.size, n);
	t.ok(b.tableBytes > 0);
	let sent = 0;
	for (let i = 0; i < n; i += 2) {
		sent += b.answer(A + (i % 50), 1024 + (i % 7), i & 0xffff, 0, T0 + 10) === ANSWER_SEND ? 1 : 0;
	}
	t.equal(sent, Math.ceil(n / 2), 'every other one found and answered');
	t.equal(b.outstanding, n - Math.ceil(n / 2));
	b.sweep(T0 + 2010);
	t.equal(b.unanswered, n - Math.ceil(n / 2), 'the rest expire');
});

t.test('a lost control session clears the table without blaming the backend', async (t) => {
	const { b, events } = book();
	b.query(A, 5000, 1, T0);
	b.query(A, 5000, 2, T0);
	b.clear();
	t.equal(b.outstanding, 0);
	t.equal(b.size, 0);
	b.sweep(T0 + 10_000);
	t.equal(b.unanswered, 0);
	t.same(events, []);
	t.equal(b.answer(A, 5000, 1, 0, T0 + 1), ANSWER_DROP);
});

t.test('p50 and p99 cover the last minute only', async (t) => {
	const { b } = book();
	t.equal(b.latencyQuantileMs(0.5, T0), null, 'no answers: null');
	for (let i = 0; i < 100; i++) {
		b.query(A, 5000, i, T0);
		b.answer(A, 5000, i, 0, T0 + (i < 98 ? 1 : 100));
	}
	t.equal(b.latencyQuantileMs(0.5, T0 + 100), 1, 'p50 1 ms');
	t.equal(b.latencyQuantileMs(0.99, T0 + 100), latencyBoundMs(22), 'p99 in the bucket of 100 ms (90.5-128 ms)');
	t.equal(b.latencyQuantileMs(0.5, T0 + 61_000), null, 'a minute later, nothing');
	t.equal(b.latencyCounts.reduce((x, y) => x + y, 0), 100, 'the histogram since start keeps them');
});

/*
 * The model: what answers.ts's header says, written the plain way -- an
 * array of entries in send order, searched linearly.
 */
interface ModelEntry { key: string; sentAt: number; expired: boolean }

class Model {
	entries: ModelEntry[] = [];
	unanswered = 0;
	late = 0;
	unsolicited = 0;
	dropped = 0;
	answered = 0;
	constructor(readonly timeoutMs: number, readonly cap: number) {}
	sweep(now: number): void {
		for (const e of this.entries) {
			if (!e.expired && e.sentAt <= now - this.timeoutMs) {
				e.expired = true;
				this.unanswered++;
			}
		}
		this.entries = this.entries.filter((e) => !(e.expired && e.sentAt <= now - 2 * this.timeoutMs));
	}
	query(key: string, now: number): void {
		this.sweep(now);
		const i = this.entries.findIndex((e) => e.key === key);
		if (i >= 0) {
			if (!this.entries[i].expired) {
				return;
			}
			this.entries.splice(i, 1);
		}
		if (this.entries.length === this.cap) {
			const old = this.entries.shift() as ModelEntry;
			if (!old.expired) {
				this.dropped++;
			}
		}
		this.entries.push({ key, sentAt: now, expired: false });
	}
	answer(key: string): number {
		const i = this.entries.findIndex((e) => e.key === key);
		if (i < 0) {
			this.unsolicited++;
			return ANSWER_DROP;
		}
		const [e] = this.entries.splice(i, 1);
		if (e.expired) {
			this.late++;
			return ANSWER_LATE;
		}
		this.answered++;
		return ANSWER_SEND;
	}
	get outstanding(): number {
		return this.entries.filter((e) => !e.expired).length;
	}
}

t.test('any interleaving of queries, answers, duplicates, late answers and time: the table is the model', async (t) => {
	/* Few addresses, ports and ids, so that retries, duplicates and collisions are common. */
	const small = (min: number, max: number): fc.Arbitrary<number> => fc.integer({ min, max });
	const key = fc.record({ a: small(0, 3), p: small(1, 3), id: small(0, 5) });
	const op = fc.oneof(
		fc.record({ kind: fc.constant('query' as const), k: key }),
		fc.record({ kind: fc.constant('answer' as const), k: key, rcode: fc.integer({ min: 0, max: 5 }) }),
		fc.record({ kind: fc.constant('wait' as const), ms: fc.integer({ min: 0, max: 1500 }) }),
		fc.record({ kind: fc.constant('sweep' as const) }),
	);
	fc.assert(fc.property(fc.array(op, { maxLength: 120 }), fc.integer({ min: 1, max: 12 }), (ops, cap) => {
		const timeout = 1000;
		const b = new AnswerBook(timeout, cap);
		const m = new Model(timeout, cap);
		let now = T0;
		let queries = 0;
		for (const o of ops) {
			if (o.kind === 'wait') {
				now += o.ms;
			} else if (o.kind === 'sweep') {
				b.sweep(now);
				m.sweep(now);
			} else if (o.kind === 'query') {
				queries++;
				b.query(A + o.k.a, o.k.p, o.k.id, now);
				m.query(`${o.k.a}/${o.k.p}/${o.k.id}`, now);
			} else {
				const got = b.answer(A + o.k.a, o.k.p, o.k.id, o.rcode, now);
				if (got !== m.answer(`${o.k.a}/${o.k.p}/${o.k.id}`)) {
					return false;
				}
			}
			if (b.outstanding !== m.outstanding || b.size !== m.entries.length) {
				return false;
			}
		}
		const a = b.answers;
		const byRcode = a.noerror + a.nxdomain + a.servfail + a.refused + a.other;
		return b.unanswered === m.unanswered && b.late === m.late && b.unsolicited === m.unsolicited
			&& b.dropped === m.dropped && byRcode === m.answered + m.late && b.queries === queries
			&& b.latencyCounts.reduce((x, y) => x + y, 0) === byRcode;
	}), { seed: 20261130, numRuns: 500 });
	t.pass('held for every interleaving');
});

t.test('what the table costs, and its growth up to a cap that is not a power of two', async (t) => {
	const { b } = book(2000, 1500);
	t.equal(b.tableBytes, 0, 'nothing before the first query');
	b.query(A, 1, 1, T0);
	t.equal(b.tableBytes, 1024 * 25 + 2048 * 4, '1,024 slots of 25 bytes and a hash index twice as long');
	for (let i = 2; i <= 1600; i++) {
		b.query(A, 1, i, T0);
	}
	t.equal(b.size, 1500, 'grown to the cap, not past it');
	t.equal(b.dropped, 100, 'then the oldest went');
	t.equal(b.tableBytes, 1500 * 25 + 4096 * 4);
	t.equal(b.answer(A, 1, 100, 0, T0 + 1), ANSWER_DROP, 'the 100th was dropped');
	t.equal(b.answer(A, 1, 101, 0, T0 + 1), ANSWER_SEND, 'the 101st is held');
});

t.test('an answer too short to carry an id is nobody\'s; latencies past the last bound land in it', async (t) => {
	const { b } = book(20_000);
	t.equal(b.nothingAsked(), ANSWER_DROP);
	t.equal(b.unsolicited, 1);
	b.query(A, 1, 1, T0);
	b.answer(A, 1, 1, 0, T0);
	t.equal(b.latencyCounts[0], 1, 'no time at all: the first bucket');
	b.query(A, 1, 2, T0);
	b.answer(A, 1, 2, 0, T0 + 15_000);
	t.equal(b.latencyCounts[LATENCY_BUCKETS - 1], 1, '15 s: the last, open-ended bucket');
	t.equal(b.latencyQuantileMs(1, T0 + 15_000), latencyBoundMs(LATENCY_BUCKETS - 1));
	t.equal(b.latencyQuantileMs(0.5, T0 + 15_000), latencyBoundMs(0), 'p50: the first');
});

t.test('the latency window keeps each of its sixty seconds and forgets each as it leaves', async (t) => {
	const { b } = book();
	b.query(A, 1, 1, T0);
	b.answer(A, 1, 1, 0, T0 + 1);
	b.query(A, 1, 2, T0 + 30_000);
	b.answer(A, 1, 2, 0, T0 + 30_100);
	t.equal(b.latencyQuantileMs(1, T0 + 59_000), latencyBoundMs(22), 'both seconds held: the slower (100 ms) is p100');
	t.equal(b.latencyQuantileMs(0, T0 + 59_000), 1, 'and the faster is p0');
	t.equal(b.latencyQuantileMs(0, T0 + 61_000), latencyBoundMs(22), 'a minute on, the first second is gone');
	t.equal(b.latencyQuantileMs(0, T0 + 91_000), null, 'then the other');
});

t.test('every entry stays findable through removals that shift its probe run, and through growth past expired ones', async (t) => {
	const { b } = book(2000, 8192);
	const n = 3000;
	for (let i = 0; i < n; i++) {
		b.query(A + (i % 97), 1024 + (i % 13), i & 0xffff, T0);
	}
	let sent = 0;
	for (let i = 0; i < n; i += 2) {
		sent += b.answer(A + (i % 97), 1024 + (i % 13), i & 0xffff, 0, T0 + 1) === ANSWER_SEND ? 1 : 0;
	}
	for (let i = 1; i < n; i += 2) {
		sent += b.answer(A + (i % 97), 1024 + (i % 13), i & 0xffff, 0, T0 + 1) === ANSWER_SEND ? 1 : 0;
	}
	t.equal(sent, n, 'all of them, in two sweeps of the index');
	/* 1,024 queries expire; more arrive and the table grows while the expired ones are still held for late answers. */
	const { b: c } = book(2000, 8192);
	for (let i = 0; i < 1024; i++) {
		c.query(B, 2000, i, T0);
	}
	for (let i = 0; i < 100; i++) {
		c.query(B, 3000, i, T0 + 2100);
	}
	t.equal(c.unanswered, 1024);
	t.equal(c.outstanding, 100);
	t.equal(c.answer(B, 2000, 5, 0, T0 + 2200), ANSWER_LATE, 'an expired one, moved by the growth, still answers late');
	t.equal(c.answer(B, 3000, 5, 0, T0 + 2200), ANSWER_SEND, 'a live one answers in time');
	c.sweep(T0 + 4100);
	t.equal(c.unanswered, 1024 + 99, 'the live ones expire in their turn after the growth');
	t.equal(c.size, 99, 'the first thousand forgotten');
});
