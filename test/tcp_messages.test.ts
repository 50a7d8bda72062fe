/*
 * The DNS-over-TCP message follower, without sockets: streams written out
 * by hand (2-byte big-endian length, then the message), fed whole, cut at
 * every point and one byte at a time.  The fast-check properties in
 * fuzz.test.ts compare it with a reference model on any bytes; these tests
 * pin down each rule by name, and the phrases the log carries.
 */

import t from 'tap';
import { HEADER_OPCODE, HEADER_QDCOUNT, HEADER_RESPONSE } from '../src/dns.js';
import {
	DEFAULT_MAX_TCP_MESSAGE_BYTES, describeProblem, MessageFollower, type StreamProblem,
} from '../src/tcp_messages.js';

/*
 * A query for "a.example" type A: id 0x1234, RD set, one question.  `flags`
 * and `qdcount` can be spoiled to fail the header check.
 */
function query(flags = 0x0100, qdcount = 1): Buffer {
	const header = Buffer.from([0x12, 0x34, flags >> 8, flags & 255, qdcount >> 8, qdcount & 255, 0, 0, 0, 0, 0, 0]);
	const question = Buffer.from('0161076578616d706c650000010001', 'hex');
	return Buffer.concat([header, question]);
}

function framed(msg: Buffer): Buffer {
	const b = Buffer.alloc(2 + msg.length);
	b.writeUInt16BE(msg.length, 0);
	msg.copy(b, 2);
	return b;
}

/* Feed the chunks; the count and the first problem (or null). */
function follow(chunks: Buffer[], max?: number): { messages: number; problem: StreamProblem | null } {
	const f = new MessageFollower(max);
	let problem: StreamProblem | null = null;
	for (const c of chunks) {
		problem = f.feed(c);
		if (problem !== null) {
			break;
		}
	}
	return { messages: f.messages, problem };
}

function cuts(buf: Buffer, points: number[]): Buffer[] {
	const edges = [0, ...points, buf.length];
	return edges.slice(1).map((end, i) => Buffer.from(buf.subarray(edges[i], end)));
}

/* Any message after the first: never checked beyond its length. */
const ANSWERISH = Buffer.alloc(40, 0xff);
const STREAM = Buffer.concat([framed(query()), framed(ANSWERISH), framed(query(0x2800))]);

t.test('well-formed messages are counted, whole or cut anywhere', async (t) => {
	t.same(follow([STREAM]), { messages: 3, problem: null });
	t.same(follow([]), { messages: 0, problem: null }, 'nothing yet');
	const wrong: string[] = [];
	for (let i = 0; i <= STREAM.length; i++) {
		for (let j = i; j <= STREAM.length; j++) {
			const got = follow(cuts(STREAM, [i, j]));
			if (got.messages !== 3 || got.problem !== null) {
				wrong.push(`${i},${j}: ${JSON.stringify(got)}`);
			}
		}
	}
	t.same(wrong.slice(0, 5), [], 'every pair of cut points');
	t.same(follow(cuts(STREAM, Array.from({ length: STREAM.length }, (_, i) => i))),
		{ messages: 3, problem: null }, 'one byte at a time');
});

t.test('the count moves only when a message is whole', async (t) => {
	const f = new MessageFollower();
	const one = framed(query());
	t.equal(f.feed(one.subarray(0, 1)), null, 'half a length prefix');
	t.equal(f.messages, 0);
	t.equal(f.feed(one.subarray(1, one.length - 1)), null);
	t.equal(f.messages, 0, 'one byte short');
	t.equal(f.feed(one.subarray(one.length - 1)), null);
	t.equal(f.messages, 1, 'whole');
	t.equal(f.feed(Buffer.from([0x00])), null, 'the next prefix, half of it');
	t.equal(f.messages, 1);
});

t.test('a length shorter than a DNS header is refused at its prefix', async (t) => {
	for (const len of [0, 1, 11]) {
		const stream = Buffer.concat([framed(query()), Buffer.from([0, len]), Buffer.alloc(len)]);
		t.same(follow([stream]), { messages: 1, problem: { code: 'short', length: len } }, `length ${len}`);
		t.same(follow(cuts(stream, [stream.length - len - 1])).problem, { code: 'short', length: len },
			`length ${len}, its prefix split`);
	}
	t.same(follow([Buffer.from([0, 12])]), { messages: 0, problem: null }, '12 bytes is a header: allowed');
});

t.test('a length over the limit is refused at its prefix, before any body', async (t) => {
	t.same(follow([Buffer.from([0x40, 0x01])]),
		{ messages: 0, problem: { code: 'long', length: 0x4001, max: DEFAULT_MAX_TCP_MESSAGE_BYTES } },
		'the default limit is 16 KiB');
	t.same(follow([Buffer.from([0x40, 0x00])]).problem, null, 'exactly 16 KiB is allowed');
	t.same(follow([Buffer.from([0xff]), Buffer.from([0xff])], 512).problem, { code: 'long', length: 65535, max: 512 });
	const q = query();
	t.same(follow([framed(q)], q.length).problem, null, 'a message of exactly the limit');
	t.same(follow([framed(q)], q.length - 1).problem, { code: 'long', length: q.length, max: q.length - 1 });
});

t.test('the first message must pass the header check; later ones are not checked', async (t) => {
	const cases: Array<[string, Buffer, number]> = [
		['a response', query(0x8180), HEADER_RESPONSE],
		['opcode STATUS', query(0x1000), HEADER_OPCODE],
		['no question', query(0x0100, 0), HEADER_QDCOUNT],
		['two questions', query(0x0100, 2), HEADER_QDCOUNT],
	];
	for (const [what, msg, header] of cases) {
		const stream = framed(msg);
		t.same(follow([stream]), { messages: 0, problem: { code: 'not_query', header } }, what);
		/* Cut inside the header: the verdict comes with its twelfth byte, not with the message's end. */
		for (let cutAt = 3; cutAt < 14; cutAt++) {
			const f = new MessageFollower();
			t.equal(f.feed(stream.subarray(0, cutAt)), null, `${what}: ${cutAt - 2} header bytes, no verdict yet`);
			t.same(f.feed(stream.subarray(cutAt, 14)), { code: 'not_query', header }, `${what}: cut at ${cutAt}`);
		}
	}
	t.same(follow([framed(query(0x2000)), framed(query(0x2800))]).problem, null, 'NOTIFY, then UPDATE');
	t.same(follow([framed(query()), framed(query(0x8180))]), { messages: 2, problem: null },
		'a response after a good first query passes');
});

t.test('the first problem is final', async (t) => {
	const f = new MessageFollower();
	const p = f.feed(Buffer.concat([framed(query()), Buffer.from([0, 5])]));
	t.same(p, { code: 'short', length: 5 });
	t.equal(f.feed(framed(query())), p, 'the same problem again, nothing read');
	t.equal(f.messages, 1, 'and no more counted');
});

t.test('the chunk is only read', async (t) => {
	const copy = Buffer.from(STREAM);
	follow([copy]);
	t.same(copy, STREAM);
});

t.test('describeProblem gives the phrases the log carries', async (t) => {
	t.equal(describeProblem({ code: 'short', length: 3 }), 'message of 3 bytes is shorter than a DNS header');
	t.equal(describeProblem({ code: 'long', length: 20000, max: 16384 }),
		'message of 20000 bytes is over the 16384-byte limit');
	t.equal(describeProblem({ code: 'not_query', header: HEADER_RESPONSE }), 'first message is a response (QR=1)');
	t.equal(describeProblem({ code: 'not_query', header: HEADER_OPCODE }), 'first message is unsupported opcode');
	t.equal(describeProblem({ code: 'not_query', header: HEADER_QDCOUNT }), 'first message is QDCOUNT is not 1');
});

t.test('feed() with stopAt stops at the end of the message that reaches the count, at any split', async (t) => {
	const stream = Buffer.concat([framed(query()), framed(query()), framed(query()), framed(query())]);
	const one = framed(query()).length;
	for (let cut = 0; cut <= stream.length; cut++) {
		const f = new MessageFollower();
		t.equal(f.feed(stream.subarray(0, cut), 2), null);
		const firstUsed = f.consumed;
		if (cut < 2 * one) {
			t.equal(firstUsed, cut, `cut ${cut}: the whole first chunk followed`);
			f.feed(stream.subarray(cut), 2);
			t.equal(f.consumed, 2 * one - cut, `cut ${cut}: the second stops at the second message's end`);
		} else {
			t.equal(firstUsed, 2 * one, `cut ${cut}: stopped at the second message's end`);
		}
		t.equal(f.messages, 2, `cut ${cut}: two messages`);
		t.notOk(f.midMessage, `cut ${cut}: between messages`);
		t.equal(f.feed(stream.subarray(2 * one)), null, 'the rest, fed later, follows on');
		t.equal(f.messages, 4);
	}
});

t.test('midMessage: from the first byte of a prefix to the last byte of the message', async (t) => {
	const m = framed(query());
	const f = new MessageFollower();
	t.notOk(f.midMessage, 'not before anything');
	f.feed(m.subarray(0, 1));
	t.ok(f.midMessage, 'half a prefix');
	f.feed(m.subarray(1, m.length - 1));
	t.ok(f.midMessage, 'all but the last byte');
	f.feed(m.subarray(m.length - 1));
	t.notOk(f.midMessage, 'whole');
});

t.test('the answers\' follower checks only the upper bound, and counts empty messages', async (t) => {
	const f = new MessageFollower(0xffff, false);
	const response = query(0x8180);
	t.equal(f.feed(Buffer.concat([framed(response), framed(Buffer.from([1, 2])), Buffer.from([0, 0])])), null,
		'a response first, a 2-byte message, an empty one: all fine');
	t.equal(f.messages, 3);
});
