/*
 * write_queue.ts: the coalescing write queue, pure.  Whatever is appended,
 * take() must hand back exactly those bytes, in order, as right-sized
 * pieces that share no memory with the staging buffer; the pieces must fall
 * where the chunk boundary says; discard() must forget; and the queue must
 * work the same after any number of takes.
 */

import fc from 'fast-check';
import t from 'tap';
import { WRITE_CHUNK_BYTES, WriteQueue } from '../src/write_queue.js';

/* A frame of n bytes whose content tells it apart from its neighbours. */
function frame(n: number, seed: number): Buffer {
	const b = Buffer.alloc(n);
	for (let i = 0; i < n; i++) {
		b[i] = (seed * 31 + i * 7) & 0xff;
	}
	return b;
}

/*
 * The reference model: the pieces take() should return for these frame
 * sizes, appended to a fresh queue (or one just taken from whose staging
 * buffer is `staging` bytes).
 */
function expectedPieces(sizes: number[], staging = 0): number[] {
	const pieces: number[] = [];
	let cap = staging;
	let used = 0;
	for (const n of sizes) {
		if (cap === 0) {
			cap = Math.max(WRITE_CHUNK_BYTES, n);
		} else if (used + n > cap) {
			if (used > 0) {
				pieces.push(used);
				used = 0;
			}
			cap = Math.max(cap, n);
		}
		used += n;
	}
	if (used > 0) {
		pieces.push(used);
	}
	return pieces;
}

t.test('an empty queue hands out nothing', async (t) => {
	const q = new WriteQueue();
	t.equal(q.byteLength, 0);
	t.same(q.take(), []);
	q.append(Buffer.from([1, 2, 3]));
	q.take();
	t.same(q.take(), [], 'nothing after a take either');
});

t.test('small frames come out as one right-sized piece, in order', async (t) => {
	const q = new WriteQueue();
	const frames = [frame(4, 1), frame(21, 2), frame(4, 3), frame(1, 4)];
	for (const f of frames) {
		q.append(f);
	}
	t.equal(q.byteLength, 30);
	const out = q.take();
	t.equal(out.length, 1);
	t.equal(out[0].length, 30, 'exactly the bytes queued, not the staging buffer');
	t.same(out[0], Buffer.concat(frames));
	t.equal(q.byteLength, 0, 'empty after take');
});

t.test('reserve and commit write a frame in place', async (t) => {
	const q = new WriteQueue();
	q.append(Buffer.from('ab'));
	const buf = q.reserve(5);
	t.equal(q.end, 2, 'the next bytes go after what is queued');
	buf.write('cdefg', q.end);
	q.commit(q.end + 5);
	t.equal(q.byteLength, 7);
	t.same(Buffer.concat(q.take()), Buffer.from('abcdefg'));
	t.equal(q.end, 0, 'a take starts again at the front');
});

t.test('commit outside the reserved room is a bug', async (t) => {
	const q = new WriteQueue();
	q.append(Buffer.from('xyz'));
	q.reserve(4);
	t.throws(() => q.commit(8), 'past the room');
	t.throws(() => q.commit(2), 'before the queued bytes');
	q.commit(3);
	t.equal(q.byteLength, 3, 'committing nothing is allowed');
	q.reserve(4);
	q.commit(7);
	t.equal(q.byteLength, 7);
});

t.test('frames that cross the chunk boundary close a chunk exactly where the next does not fit', async (t) => {
	const q = new WriteQueue();
	const a = frame(WRITE_CHUNK_BYTES - 10, 1);
	const b = frame(10, 2);
	const c = frame(11, 3);
	q.append(a);
	q.append(b);
	t.equal(q.byteLength, WRITE_CHUNK_BYTES, 'a full staging buffer');
	q.append(c);
	const out = q.take();
	t.same(out.map((p) => p.length), [WRITE_CHUNK_BYTES, 11], 'the full chunk, then the rest');
	t.same(Buffer.concat(out), Buffer.concat([a, b, c]));

	q.append(frame(WRITE_CHUNK_BYTES - 10, 4));
	q.append(frame(11, 5));
	t.same(q.take().map((p) => p.length), [WRITE_CHUNK_BYTES - 10, 11], 'one byte too many starts a new chunk');
});

t.test('a frame larger than a chunk is queued whole, after what came before', async (t) => {
	const q = new WriteQueue();
	const small = frame(100, 1);
	const big = frame(WRITE_CHUNK_BYTES * 2 + 5, 2);
	const after = frame(50, 3);
	q.append(small);
	q.append(big);
	q.append(after);
	t.equal(q.byteLength, 150 + big.length);
	const out = q.take();
	t.same(out.map((p) => p.length), [100, big.length, 50]);
	t.same(Buffer.concat(out), Buffer.concat([small, big, after]));
	t.same(out[1], big);

	/* The enlarged staging buffer stays: a second big frame fits beside a small one. */
	q.append(frame(10, 4));
	q.append(frame(WRITE_CHUNK_BYTES * 2 - 5, 5));
	t.same(q.take().map((p) => p.length), [WRITE_CHUNK_BYTES * 2 + 5]);
});

t.test('frames of exactly a chunk, and of one byte more', async (t) => {
	const q = new WriteQueue();
	const whole = frame(WRITE_CHUNK_BYTES, 1);
	const over = frame(WRITE_CHUNK_BYTES + 1, 2);
	q.append(whole);
	q.append(over);
	q.append(whole);
	const out = q.take();
	t.same(out.map((p) => p.length), [WRITE_CHUNK_BYTES, WRITE_CHUNK_BYTES + 1, WRITE_CHUNK_BYTES]);
	t.same(Buffer.concat(out), Buffer.concat([whole, over, whole]));
});

t.test('pieces handed out share no memory with the queue', async (t) => {
	const q = new WriteQueue();
	const first = frame(40, 1);
	q.append(first);
	const [out] = q.take();
	q.append(frame(40, 2));
	q.append(frame(40, 3));
	t.same(out, first, 'later appends do not touch a piece already handed out');
	const [second] = q.take();
	q.discard();
	q.append(frame(80, 4));
	t.same(second, Buffer.concat([frame(40, 2), frame(40, 3)]), 'nor does a discard and another append');
});

t.test('discard forgets everything queued, full chunks included', async (t) => {
	const q = new WriteQueue();
	q.append(frame(WRITE_CHUNK_BYTES - 1, 1));
	q.append(frame(10, 2));
	t.equal(q.byteLength, WRITE_CHUNK_BYTES + 9);
	q.discard();
	t.equal(q.byteLength, 0);
	t.equal(q.end, 0);
	t.same(q.take(), []);
	const f = frame(30, 3);
	q.append(f);
	t.same(q.take(), [f], 'and the queue goes on as before');
});

t.test('any sequence of appends, takes and discards: exact bytes out, pieces where the model puts them', async (t) => {
	const op = fc.oneof(
		{ weight: 8, arbitrary: fc.integer({ min: 1, max: 3000 }).map((n) => ({ kind: 'append' as const, n })) },
		{ weight: 1, arbitrary: fc.oneof(fc.constantFrom(WRITE_CHUNK_BYTES, WRITE_CHUNK_BYTES + 1),
			fc.integer({ min: WRITE_CHUNK_BYTES - 64, max: WRITE_CHUNK_BYTES * 2 }))
			.map((n) => ({ kind: 'append' as const, n })) },
		{ weight: 2, arbitrary: fc.constant({ kind: 'take' as const, n: 0 }) },
		{ weight: 1, arbitrary: fc.constant({ kind: 'discard' as const, n: 0 }) },
		{ weight: 1, arbitrary: fc.integer({ min: 0, max: 1600 }).map((n) => ({ kind: 'inPlace' as const, n })) },
	);
	fc.assert(fc.property(fc.array(op, { maxLength: 60 }), (ops) => {
		const q = new WriteQueue();
		let pending: Buffer[] = [];
		let sizes: number[] = [];
		let staging = 0;
		const handedOut: Array<[Buffer, Buffer]> = [];
		const check = (): void => {
			const expected = Buffer.concat(pending);
			const pieces = q.take();
			const got = Buffer.concat(pieces);
			if (!got.equals(expected)) {
				throw new Error(`bytes differ: ${got.length} out for ${expected.length} in`);
			}
			const lengths = pieces.map((p) => p.length);
			const model = expectedPieces(sizes, staging);
			if (JSON.stringify(lengths) !== JSON.stringify(model)) {
				throw new Error(`pieces ${JSON.stringify(lengths)}, expected ${JSON.stringify(model)}`);
			}
			for (const p of pieces) {
				handedOut.push([p, Buffer.from(p)]);
			}
			staging = Math.max(staging, ...sizes.map((n) => Math.max(WRITE_CHUNK_BYTES, n)));
			pending = [];
			sizes = [];
		};
		ops.forEach((o, i) => {
			switch (o.kind) {
			case 'append': {
				const f = frame(o.n, i);
				q.append(f);
				pending.push(f);
				sizes.push(o.n);
				break;
			}
			case 'inPlace': {
				const f = frame(o.n, i);
				const buf = q.reserve(o.n);
				f.copy(buf, q.end);
				q.commit(q.end + o.n);
				pending.push(f);
				sizes.push(o.n);
				break;
			}
			case 'take':
				check();
				break;
			case 'discard':
				q.discard();
				staging = Math.max(staging, ...sizes.map((n) => Math.max(WRITE_CHUNK_BYTES, n)));
				pending = [];
				sizes = [];
				break;
			}
			if (q.byteLength !== pending.reduce((s, b) => s + b.length, 0)) {
				throw new Error('byteLength is not what was queued');
			}
		});
		check();
		for (const [piece, copy] of handedOut) {
			if (!piece.equals(copy)) {
				throw new Error('a piece handed out changed afterwards');
			}
		}
	}), { seed: 20251121, numRuns: 300 });
	t.pass('held for every sequence');
});
