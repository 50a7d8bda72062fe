/*
 * Property-based fuzzing of everything in bbal that parses bytes it does not
 * trust: the frame reader (a backend's stream), the DNS header check and the
 * question walk behind the synthesized answers (any host's datagram), the
 * trace-level query description, the address parser, and the follower of a
 * TCP client's DNS messages (any host's stream).
 *
 * Each property is checked against a straightforward reference written here
 * (whole-buffer, no cleverness), on inputs built to reach the interesting
 * paths -- valid frames mixed with mutated and random ones, headers with
 * hand-picked flag and count bytes, names near the 255-byte limit -- not
 * only on uniform random bytes, which would almost never pass a length
 * check.
 *
 * "Never loops": a reader that keeps emitting is caught at once, because
 * the sink refuses more calls than the input could hold frames (one per 4
 * bytes); a loop that emits nothing would hang until tap's timeout, which
 * fails the file.
 *
 * Under `npm test` every property runs a bounded number of cases with a
 * fixed seed, so a failure is reproducible and the run is a few seconds.
 * BBAL_FUZZ_RUNS=N (as `npm run chaos` does, with 100,000) runs N cases per
 * property with a random seed, printed, that BBAL_FUZZ_SEED repeats.
 */

import fc from 'fast-check';
import t, { type Test } from 'tap';
import {
	buildErrorAnswer, checkQueryHeader, describeQuery, HEADER_OK, HEADER_OPCODE, HEADER_QDCOUNT, HEADER_RESPONSE,
	HEADER_SHORT, questionEnd,
} from '../src/dns.js';
import {
	FRAME_CLIENT_HEARTBEAT, FRAME_CLIENT_HELLO, FRAME_INBOUND_TCP, FRAME_INBOUND_TCP_OK, FRAME_INBOUND_UDP,
	FRAME_OUTBOUND_UDP, FRAME_SERVER_HEARTBEAT, FRAME_SERVER_HELLO, FrameReader, ipv4ToU32, MAX_UDP_PAYLOAD_BYTES,
	u32ToIpv4,
} from '../src/protocol.js';
import { DEFAULT_MAX_TCP_MESSAGE_BYTES, MessageFollower, type StreamProblem } from '../src/tcp_messages.js';

const LONG_RUNS = Number(process.env['BBAL_FUZZ_RUNS'] ?? 0);
const SEED = process.env['BBAL_FUZZ_SEED'] !== undefined ? Number(process.env['BBAL_FUZZ_SEED'])
	: LONG_RUNS > 0 ? Date.now() % 2 ** 31 : 20251121;
if (LONG_RUNS > 0) {
	t.comment(`fuzz: ${LONG_RUNS} runs per property, seed ${SEED} (repeat with BBAL_FUZZ_SEED=${SEED})`);
}

/* Cases per property: `n` in npm test, BBAL_FUZZ_RUNS (scaled for the costly ones) in the long mode. */
function params(n: number, longShare = 1): fc.Parameters<unknown> {
	return { numRuns: LONG_RUNS > 0 ? Math.max(n, Math.round(LONG_RUNS * longShare)) : n, seed: SEED };
}

function check(t: Test, name: string, run: () => void): void {
	try {
		run();
		t.pass(name);
	} catch (err) {
		const cause = (err as Error).cause;
		t.fail(`${name}\n${(err as Error).message}${cause !== undefined ? `\ncause: ${JSON.stringify(cause)}` : ''}`);
	}
}

/* ------------------------------------------------------------------ */
/* The frame reader                                                    */
/* ------------------------------------------------------------------ */

const TYPE_ONLY = [FRAME_CLIENT_HELLO, FRAME_CLIENT_HEARTBEAT, FRAME_SERVER_HELLO, FRAME_INBOUND_TCP_OK,
	FRAME_SERVER_HEARTBEAT];

type Event = ['frame', number, number, number, string | null] | ['error', string, number, number];

function headerBytes(type: number): number {
	if (TYPE_ONLY.includes(type)) {
		return 4;
	}
	if (type === FRAME_INBOUND_TCP) {
		return 12;
	}
	if (type === FRAME_INBOUND_UDP || type === FRAME_OUTBOUND_UDP) {
		return 16;
	}
	return 0;
}

/*
 * The reference: parse the whole stream at once.  Frames until the first
 * incomplete one (which waits) or the first error (which ends everything).
 */
function referenceParse(stream: Buffer, max: number): { events: Event[]; complete: boolean } {
	const events: Event[] = [];
	let off = 0;
	while (stream.length - off >= 4) {
		const type = stream.readUInt32LE(off);
		const hdr = headerBytes(type);
		if (hdr === 0) {
			events.push(['error', 'unknown_type', type, 0]);
			return { events, complete: true };
		}
		if (stream.length - off < hdr) {
			return { events, complete: false };
		}
		let total = hdr;
		let payload: string | null = null;
		if (hdr === 16) {
			const len = stream.readUInt32LE(off + 12);
			if (len > max) {
				events.push(['error', 'oversize', type, len]);
				return { events, complete: true };
			}
			total += len;
			if (stream.length - off < total) {
				return { events, complete: false };
			}
			payload = stream.subarray(off + 16, off + total).toString('hex');
		}
		const addr = hdr >= 12 ? stream.readUInt32LE(off + 4) : 0;
		const port = hdr >= 12 ? stream.readUInt32LE(off + 8) : 0;
		events.push(['frame', type, addr, port, payload]);
		off += total;
	}
	return { events, complete: off === stream.length };
}

/* One valid frame of any type, with its payload from a few sizes up to the limit. */
const validFrame: fc.Arbitrary<Buffer> = fc.oneof(
	fc.constantFrom(...TYPE_ONLY).map((type) => {
		const b = Buffer.alloc(4);
		b.writeUInt32LE(type, 0);
		return b;
	}),
	fc.tuple(fc.nat({ max: 0xffffffff }), fc.nat({ max: 0xffffffff })).map(([addr, port]) => {
		const b = Buffer.alloc(12);
		b.writeUInt32LE(FRAME_INBOUND_TCP, 0);
		b.writeUInt32LE(addr, 4);
		b.writeUInt32LE(port, 8);
		return b;
	}),
	fc.tuple(
		fc.constantFrom(FRAME_INBOUND_UDP, FRAME_OUTBOUND_UDP),
		fc.nat({ max: 0xffffffff }),
		fc.nat({ max: 0xffffffff }),
		fc.oneof(
			fc.uint8Array({ maxLength: 64 }),
			fc.uint8Array({ minLength: 1400, maxLength: MAX_UDP_PAYLOAD_BYTES }),
		),
	).map(([type, addr, port, payload]) => {
		const b = Buffer.alloc(16 + payload.length);
		b.writeUInt32LE(type, 0);
		b.writeUInt32LE(addr, 4);
		b.writeUInt32LE(port, 8);
		b.writeUInt32LE(payload.length, 12);
		b.set(payload, 16);
		return b;
	}),
);

/* Junk: random bytes, a bad type, a length over the limit, a header cut short. */
const junk: fc.Arbitrary<Buffer> = fc.oneof(
	fc.uint8Array({ minLength: 1, maxLength: 40 }).map((u) => Buffer.from(u)),
	fc.nat({ max: 0xffffffff }).map((type) => {
		const b = Buffer.alloc(4);
		b.writeUInt32LE(type, 0);
		return b;
	}),
	fc.tuple(fc.constantFrom(FRAME_INBOUND_UDP, FRAME_OUTBOUND_UDP), fc.integer({ min: MAX_UDP_PAYLOAD_BYTES + 1 }))
		.map(([type, len]) => {
			const b = Buffer.alloc(16);
			b.writeUInt32LE(type, 0);
			b.writeUInt32LE(len >>> 0, 12);
			return b;
		}),
);

/* Cut a stream at the given fractions of its length (sorted, deduplicated). */
function cut(stream: Buffer, cuts: number[]): Buffer[] {
	const points = [...new Set(cuts.map((c) => Math.floor(c * stream.length)))].sort((a, b) => a - b);
	const chunks: Buffer[] = [];
	let prev = 0;
	for (const p of [...points, stream.length]) {
		if (p > prev) {
			/* A copy, as a socket would hand over fresh memory. */
			chunks.push(Buffer.from(stream.subarray(prev, p)));
			prev = p;
		}
	}
	return chunks;
}

const PROBE = Buffer.from([0xec, 0x03, 0x00, 0x00]); /* SERVER_HEARTBEAT */

interface Fed {
	events: Event[];
	/* Payloads as handed over, compared again at the end: nothing may overwrite them. */
	payloads: Array<[Buffer, string]>;
	partial: boolean;
}

/*
 * Feed the chunks to a fresh reader.  `stopEvery` makes the sink ask to
 * stop after some frames; the driver then feeds the rest of that chunk again,
 * as a caller that takes over the stream and hands it back would.
 */
function feedAll(chunks: Buffer[], max: number, stopEvery = 0): Fed {
	const events: Event[] = [];
	const payloads: Array<[Buffer, string]> = [];
	const totalBytes = chunks.reduce((n, c) => n + c.length, 0) + PROBE.length;
	let frames = 0;
	let errored = false;
	/* The sink said stop: nothing more until the next feed(). */
	let stopped = false;
	const reader = new FrameReader({
		onFrame(type, addr, port, payload) {
			if (errored) {
				throw new Error('a frame after an error');
			}
			if (stopped) {
				throw new Error('a frame after the sink asked to stop, in the same feed()');
			}
			if (++frames > totalBytes / 4) {
				throw new Error(`more frames (${frames}) than ${totalBytes} bytes could hold: the reader loops`);
			}
			const hex = payload === null ? null : payload.toString('hex');
			if (payload !== null) {
				payloads.push([payload, hex as string]);
			}
			events.push(['frame', type, addr, port, hex]);
			stopped = stopEvery !== 0 && frames % stopEvery === 0;
			return !stopped;
		},
		onFrameError(code, type, length) {
			if (errored) {
				throw new Error('a second error');
			}
			if (stopped) {
				throw new Error('an error after the sink asked to stop, in the same feed()');
			}
			errored = true;
			events.push(['error', code, type, length]);
		},
	}, max);
	for (const chunk of chunks) {
		let rest = chunk;
		for (let guard = 0; rest.length > 0; guard++) {
			if (guard > chunk.length) {
				throw new Error('feed() makes no progress on a stopped sink');
			}
			stopped = false;
			const used = reader.feed(rest);
			if (!Number.isInteger(used) || used < 0 || used > rest.length) {
				throw new Error(`feed() returned ${used} for a chunk of ${rest.length}`);
			}
			if (errored) {
				if (reader.feed(Buffer.from([1, 0, 0, 0])) !== 0) {
					throw new Error('feed() consumed bytes after an error');
				}
				break;
			}
			if (used === rest.length) {
				break;
			}
			/* The sink stopped: the caller feeds the rest back. */
			if (stopEvery === 0) {
				throw new Error(`feed() stopped at ${used} of ${rest.length} with no reason`);
			}
			rest = rest.subarray(used);
		}
		if (errored) {
			break;
		}
	}
	if (errored) {
		return { events, payloads, partial: false };
	}
	/*
	 * Does the reader hold part of a frame?  Asked through feed(): a
	 * SERVER_HEARTBEAT fed now comes back as exactly that one frame only when
	 * nothing was held (held bytes would make it part of another frame).
	 */
	const before = events.length;
	stopped = false;
	const used = reader.feed(PROBE);
	const partial = used !== 4 || events.length !== before + 1
		|| events[before][0] !== 'frame' || events[before][1] !== FRAME_SERVER_HEARTBEAT;
	events.length = before;
	return { events, payloads, partial };
}

/* Throw, showing both, unless the reader's events are the reference's. */
function mustAgree(got: Event[], want: Event[]): void {
	const g = JSON.stringify(got);
	const w = JSON.stringify(want);
	if (g !== w) {
		throw new Error(`reader:    ${g.slice(0, 600)}\nreference: ${w.slice(0, 600)}`);
	}
}

t.test('FrameReader: valid frames, any split points, reproduced exactly', (t) => {
	check(t, 'frames match the reference and payloads are never overwritten', () => fc.assert(fc.property(
		fc.array(validFrame, { minLength: 1, maxLength: 12 }),
		fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 20 }),
		(frames, cuts) => {
			const stream = Buffer.concat(frames);
			const fed = feedAll(cut(stream, cuts), MAX_UDP_PAYLOAD_BYTES);
			const ref = referenceParse(stream, MAX_UDP_PAYLOAD_BYTES);
			mustAgree(fed.events, ref.events);
			if (fed.events.length !== frames.length || fed.partial) {
				throw new Error(`${fed.events.length} of ${frames.length} frames, partial ${fed.partial}`);
			}
			for (const [buf, hex] of fed.payloads) {
				if (buf.toString('hex') !== hex) {
					throw new Error('a payload changed after it was handed over');
				}
			}
		}), params(2000, 0.3)));
	t.end();
});

t.test('FrameReader: one byte at a time', (t) => {
	check(t, 'byte-by-byte feeding gives the same frames', () => fc.assert(fc.property(
		fc.array(validFrame, { minLength: 1, maxLength: 4 }),
		(frames) => {
			const stream = Buffer.concat(frames);
			const chunks = [...stream].map((b) => Buffer.from([b]));
			mustAgree(feedAll(chunks, MAX_UDP_PAYLOAD_BYTES).events,
				referenceParse(stream, MAX_UDP_PAYLOAD_BYTES).events);
		}), params(200, 0.02)));
	t.end();
});

t.test('FrameReader: garbage mixed in, any limit, never throws, agrees with the reference', (t) => {
	check(t, 'garbage: same frames, then the same error, nothing after', () => fc.assert(fc.property(
		fc.array(fc.oneof({ arbitrary: validFrame, weight: 3 }, { arbitrary: junk, weight: 1 }), { maxLength: 10 }),
		fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 12 }),
		fc.oneof(fc.constant(MAX_UDP_PAYLOAD_BYTES), fc.nat({ max: 2000 })),
		(parts, cuts, max) => {
			const stream = Buffer.concat(parts);
			const fed = feedAll(cut(stream, cuts), max);
			const ref = referenceParse(stream, max);
			mustAgree(fed.events, ref.events);
			const refErrored = ref.events.some((e) => e[0] === 'error');
			if (!refErrored && fed.partial === ref.complete) {
				throw new Error(`partial ${fed.partial}, but the reference says complete ${ref.complete}`);
			}
		}), params(3000, 0.5)));
	t.end();
});

t.test('FrameReader: a sink that stops, and the rest fed back', (t) => {
	check(t, 'stopping after every k-th frame loses and repeats nothing', () => fc.assert(fc.property(
		fc.array(fc.oneof({ arbitrary: validFrame, weight: 5 }, { arbitrary: junk, weight: 1 }), { maxLength: 10 }),
		fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 8 }),
		fc.integer({ min: 1, max: 3 }),
		(parts, cuts, every) => {
			const stream = Buffer.concat(parts);
			mustAgree(feedAll(cut(stream, cuts), MAX_UDP_PAYLOAD_BYTES, every).events,
				referenceParse(stream, MAX_UDP_PAYLOAD_BYTES).events);
		}), params(2000, 0.3)));
	t.end();
});

t.test('FrameReader: uniform random bytes never throw', (t) => {
	check(t, 'random bytes, random splits', () => fc.assert(fc.property(
		fc.uint8Array({ maxLength: 200 }),
		fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 10 }),
		(bytes, cuts) => {
			const stream = Buffer.from(bytes);
			mustAgree(feedAll(cut(stream, cuts), MAX_UDP_PAYLOAD_BYTES).events,
				referenceParse(stream, MAX_UDP_PAYLOAD_BYTES).events);
		}), params(3000)));
	t.end();
});

/* ------------------------------------------------------------------ */
/* The DNS edge                                                        */
/* ------------------------------------------------------------------ */

/* RFC 1035 4.1.1, read the long way round. */
function referenceHeaderCheck(msg: Uint8Array, off: number, len: number): number {
	if (len < 12) {
		return HEADER_SHORT;
	}
	const bits = Array.from({ length: 8 }, (_, i) => ((msg[off + 2]) >> (7 - i)) & 1);
	const qr = bits[0];
	const opcode = (bits[1]) * 8 + (bits[2]) * 4 + (bits[3]) * 2 + (bits[4]);
	const qdcount = (msg[off + 4]) * 256 + (msg[off + 5]);
	if (qr === 1) {
		return HEADER_RESPONSE;
	}
	if (!['QUERY', 'NOTIFY', 'UPDATE'].includes(['QUERY', 'IQUERY', 'STATUS', '3', 'NOTIFY', 'UPDATE'][opcode] ?? '')) {
		return HEADER_OPCODE;
	}
	if (qdcount !== 1) {
		return HEADER_QDCOUNT;
	}
	return HEADER_OK;
}

/* A header whose interesting bytes are drawn from the values that matter, then the rest. */
const headerish: fc.Arbitrary<Uint8Array> = fc.tuple(
	fc.uint8Array({ minLength: 2, maxLength: 2 }),
	fc.oneof(fc.nat({ max: 255 }), fc.constantFrom(0x00, 0x01, 0x20, 0x21, 0x28, 0x80, 0x81, 0x08, 0x78)),
	fc.nat({ max: 255 }),
	fc.oneof(fc.constantFrom(0, 1, 2, 256, 257), fc.nat({ max: 0xffff })),
	fc.uint8Array({ maxLength: 30 }),
).map(([id, flags1, flags2, qd, rest]) => {
	const b = new Uint8Array(6 + rest.length);
	b.set(id, 0);
	b[2] = flags1;
	b[3] = flags2;
	b[4] = qd >> 8;
	b[5] = qd & 255;
	b.set(rest, 6);
	return b;
});

t.test('checkQueryHeader agrees with the reference on any bytes, offset and length', (t) => {
	check(t, 'checkQueryHeader', () => fc.assert(fc.property(
		fc.oneof(headerish, fc.uint8Array({ maxLength: 40 })),
		fc.nat({ max: 20 }),
		fc.nat({ max: 40 }),
		(bytes, pre, lenHint) => {
			/* The message at `pre` in a bigger buffer, as a TCP stream holds it. */
			const buf = new Uint8Array(pre + bytes.length);
			buf.fill(0xff, 0, pre);
			buf.set(bytes, pre);
			const whole = checkQueryHeader(bytes);
			if (whole !== referenceHeaderCheck(bytes, 0, bytes.length)) {
				throw new Error(`whole: ${whole} vs ${referenceHeaderCheck(bytes, 0, bytes.length)}`);
			}
			const len = Math.min(lenHint, bytes.length);
			const got = checkQueryHeader(buf, pre, len);
			const want = referenceHeaderCheck(buf, pre, len);
			if (got !== want) {
				throw new Error(`checkQueryHeader(${Buffer.from(buf).toString('hex')}, ${pre}, ${len}) = ${got}, `
					+ `reference ${want}`);
			}
		}), params(5000)));
	t.end();
});

/* The question's end by the book: labels of 1-63 bytes, a zero, at most 255 bytes of name, type and class. */
function referenceQuestionEnd(msg: Uint8Array): number {
	const labels: number[] = [];
	let off = 12;
	for (;;) {
		if (off >= msg.length) {
			return -1;
		}
		const n = msg[off];
		if (n === 0) {
			break;
		}
		if ((n & 0xc0) !== 0) {
			return -1; /* a pointer (0xc0) or a reserved label type */
		}
		labels.push(n);
		off += 1 + n;
	}
	const nameWire = labels.reduce((s, n) => s + n + 1, 0) + 1;
	if (nameWire > 255) {
		return -1;
	}
	const end = off + 1 + 4;
	return end <= msg.length ? end : -1;
}

/* A query-like message: a header, then labels (some long, some bad), then a tail. */
const queryish: fc.Arbitrary<Uint8Array> = fc.tuple(
	headerish.map((h) => h.subarray(0, Math.min(h.length, 12))),
	fc.array(fc.oneof(
		fc.integer({ min: 1, max: 63 }).map((n) => [n, ...Array<number>(n).fill(0x61)]),
		fc.constantFrom([0xc0, 0x0c], [64], [0x80, 1], [63, ...Array<number>(63).fill(0x62)]),
	), { maxLength: 6 }),
	fc.boolean(),
	fc.uint8Array({ maxLength: 8 }),
).map(([hdr, labels, terminate, tail]) => {
	const head = new Uint8Array(12);
	head.set(hdr);
	return Uint8Array.from([...head, ...labels.flat(), ...(terminate ? [0] : []), ...tail]);
});

/* A well-formed question whose name's labels add up to `total` bytes, around the 255-byte limit. */
const nearLimit: fc.Arbitrary<Uint8Array> = fc.tuple(headerish, fc.integer({ min: 248, max: 262 }), fc.nat({ max: 6 }))
	.map(([hdr, total, tail]) => {
		const head = new Uint8Array(12);
		head.set(hdr.subarray(0, 12));
		const name: number[] = [];
		let left = total;
		while (left > 0) {
			const n = Math.min(63, left - 1);
			if (n < 1) {
				break;
			}
			name.push(n, ...Array<number>(n).fill(0x63));
			left -= n + 1;
		}
		return Uint8Array.from([...head, ...name, 0, ...Array<number>(tail).fill(1)]);
	});

t.test('questionEnd and buildErrorAnswer on any bytes: never throw, never amplify', (t) => {
	check(t, 'questionEnd agrees with the reference; the answer is the question echoed, no longer than the query',
		() => fc.assert(fc.property(
			fc.oneof(queryish, nearLimit, fc.uint8Array({ maxLength: 300 })),
			fc.constantFrom(2, 5),
			(bytes, rcode) => {
				const end = questionEnd(bytes);
				const refEnd = referenceQuestionEnd(bytes);
				if (end !== refEnd) {
					throw new Error(`questionEnd(${Buffer.from(bytes).toString('hex')}) = ${end}, reference ${refEnd}`);
				}
				const ans = buildErrorAnswer(bytes, rcode);
				if (ans === null) {
					if (end >= 0) {
						throw new Error('no answer for a walkable question');
					}
					return;
				}
				if (ans.length > bytes.length || ans.length !== end) {
					throw new Error(`answer of ${ans.length} bytes to a query of ${bytes.length} (question ends at ${end})`);
				}
				const q = Buffer.from(bytes);
				const problems = [
					ans.readUInt16BE(0) !== q.readUInt16BE(0) && 'id',
					((ans[2]) & 0x80) === 0 && 'QR',
					((ans[2]) & 0x78) !== ((q[2]) & 0x78) && 'opcode',
					((ans[2]) & 0x01) !== ((q[2]) & 0x01) && 'RD',
					((ans[2]) & 0x06) !== 0 && 'AA/TC',
					((ans[3]) & 0x0f) !== rcode && 'rcode',
					((ans[3]) & 0x80) !== 0 && 'RA',
					ans.readUInt16BE(4) !== 1 && 'QDCOUNT',
					(ans.readUInt16BE(6) | ans.readUInt16BE(8) | ans.readUInt16BE(10)) !== 0 && 'AN/NS/ARCOUNT',
					!ans.subarray(12).equals(q.subarray(12, end)) && 'question',
				].filter((p) => p !== false);
				if (problems.length > 0) {
					throw new Error(`answer differs in ${problems.join(', ')}: ${ans.toString('hex')} to ${q.toString('hex')}`);
				}
			}), params(5000)));
	t.end();
});

t.test('describeQuery (trace logs) never throws on any bytes', (t) => {
	check(t, 'describeQuery', () => fc.assert(fc.property(
		fc.oneof(queryish, fc.uint8Array({ maxLength: 300 })),
		(bytes) => {
			const d = describeQuery(bytes);
			if (d !== null && (typeof d.qname !== 'string' || typeof d.id !== 'number')) {
				throw new Error(`odd description ${JSON.stringify(d)}`);
			}
		}), params(2000, 0.1)));
	t.end();
});

t.test('ipv4ToU32: every u32 round-trips, any string gives -1 or a canonical address', (t) => {
	check(t, 'ipv4ToU32', () => fc.assert(fc.property(
		fc.nat({ max: 0xffffffff }),
		fc.oneof(
			fc.string({ maxLength: 20 }),
			fc.array(fc.oneof(fc.nat({ max: 300 }).map(String), fc.constantFrom('', '00', '-1', '1e2', ' 1')),
				{ minLength: 1, maxLength: 5 }).map((p) => p.join('.')),
		),
		(n, s) => {
			if (ipv4ToU32(u32ToIpv4(n)) !== n) {
				throw new Error(`${n} -> ${u32ToIpv4(n)} -> ${ipv4ToU32(u32ToIpv4(n))}`);
			}
			const v = ipv4ToU32(s);
			const parts = s.split('.');
			const valid = parts.length === 4 && parts.every((p) => /^\d+$/.test(p) && Number(p) <= 255);
			if (valid !== (v >= 0)) {
				throw new Error(`ipv4ToU32(${JSON.stringify(s)}) = ${v}`);
			}
			if (v >= 0 && (v > 0xffffffff || !Number.isInteger(v)
				|| u32ToIpv4(v) !== parts.map((p) => String(Number(p))).join('.'))) {
				throw new Error(`ipv4ToU32(${JSON.stringify(s)}) = ${v}, not ${s}`);
			}
		}), params(5000)));
	t.end();
});

/* ------------------------------------------------------------------ */
/* The DNS-over-TCP message follower                                   */
/* ------------------------------------------------------------------ */

type Followed = { messages: number; problem: StreamProblem | null };

/*
 * The reference: walk the whole stream at once.  A length is judged as
 * soon as its two bytes are there, the first message's header as soon as
 * its twelve bytes are, whether or not the message is whole yet.
 */
function referenceFollow(stream: Buffer, max: number): Followed {
	let off = 0;
	let messages = 0;
	while (stream.length - off >= 2) {
		const len = stream.readUInt16BE(off);
		if (len < 12) {
			return { messages, problem: { code: 'short', length: len } };
		}
		if (len > max) {
			return { messages, problem: { code: 'long', length: len, max } };
		}
		const body = stream.subarray(off + 2, off + 2 + len);
		if (messages === 0 && body.length >= 12) {
			const header = referenceHeaderCheck(body, 0, 12);
			if (header !== HEADER_OK) {
				return { messages, problem: { code: 'not_query', header } };
			}
		}
		if (body.length < len) {
			break;
		}
		messages++;
		off += 2 + len;
	}
	return { messages, problem: null };
}

function framedMessage(msg: Uint8Array): Buffer {
	const b = Buffer.alloc(2 + msg.length);
	b.writeUInt16BE(msg.length, 0);
	b.set(msg, 2);
	return b;
}

/* A first message that passes the header check: QR 0, QUERY/NOTIFY/UPDATE, one question. */
const goodFirst: fc.Arbitrary<Buffer> = fc.tuple(
	fc.uint8Array({ minLength: 2, maxLength: 2 }),
	fc.constantFrom(0, 4, 5),
	fc.nat({ max: 7 }),
	fc.nat({ max: 255 }),
	fc.uint8Array({ minLength: 6, maxLength: 200 }),
).map(([id, opcode, low, flags2, rest]) => framedMessage(Buffer.concat([
	id, Buffer.from([(opcode << 3) | low, flags2, 0, 1]), rest,
])));

/* Any later message: its bytes are not looked at, only its length. */
const laterMessage: fc.Arbitrary<Buffer> = fc.uint8Array({ minLength: 12, maxLength: 300 }).map(framedMessage);

/* Pieces that may break a stream: any header first, a short or long length, a torn prefix, noise. */
const streamJunk: fc.Arbitrary<Buffer> = fc.oneof(
	headerish.map((h) => framedMessage(h.length >= 12 ? h : Buffer.concat([h, Buffer.alloc(12 - h.length)]))),
	fc.nat({ max: 11 }).map((len) => framedMessage(Buffer.alloc(len, 0x5a))),
	fc.nat({ max: 0xffff }).map((len) => Buffer.from([len >> 8, len & 255])),
	fc.uint8Array({ minLength: 1, maxLength: 30 }).map((u) => Buffer.from(u)),
);

/* Feed the chunks to a fresh follower; after each, it must agree with the reference on the prefix. */
function followAll(chunks: Buffer[], max: number): Followed {
	const f = new MessageFollower(max);
	let problem: StreamProblem | null = null;
	let fed = 0;
	const whole = Buffer.concat(chunks);
	for (const chunk of chunks) {
		const before = Buffer.from(chunk);
		problem = f.feed(chunk);
		fed += chunk.length;
		if (!chunk.equals(before)) {
			throw new Error('feed() changed the chunk');
		}
		const got = JSON.stringify({ messages: f.messages, problem });
		const want = JSON.stringify(referenceFollow(whole.subarray(0, fed), max));
		if (got !== want) {
			throw new Error(`after ${fed} of ${whole.length} bytes: follower ${got}, reference ${want}`);
		}
	}
	return { messages: f.messages, problem };
}

t.test('MessageFollower: valid streams, any split, the same count and verdict as whole', (t) => {
	check(t, 'every message counted, no problem, wherever the stream is cut', () => fc.assert(fc.property(
		goodFirst,
		fc.array(laterMessage, { maxLength: 6 }),
		fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 20 }),
		(first, later, cuts) => {
			const stream = Buffer.concat([first, ...later]);
			const whole = followAll([stream], DEFAULT_MAX_TCP_MESSAGE_BYTES);
			const split = followAll(cut(stream, cuts), DEFAULT_MAX_TCP_MESSAGE_BYTES);
			if (whole.problem !== null || whole.messages !== 1 + later.length) {
				throw new Error(`whole: ${JSON.stringify(whole)} for ${1 + later.length} messages`);
			}
			if (JSON.stringify(split) !== JSON.stringify(whole)) {
				throw new Error(`split ${JSON.stringify(split)}, whole ${JSON.stringify(whole)}`);
			}
		}), params(2000, 0.3)));
	t.end();
});

t.test('MessageFollower: one byte at a time', (t) => {
	check(t, 'byte-by-byte agrees with the reference after every byte', () => fc.assert(fc.property(
		fc.oneof(goodFirst, streamJunk),
		fc.array(fc.oneof(laterMessage, streamJunk), { maxLength: 3 }),
		fc.integer({ min: 12, max: 400 }),
		(first, later, max) => {
			const stream = Buffer.concat([first, ...later]);
			followAll([...stream].map((b) => Buffer.from([b])), max);
		}), params(300, 0.02)));
	t.end();
});

t.test('MessageFollower: garbage mixed in, any limit, never throws, agrees with the reference', (t) => {
	check(t, 'same count and same first problem as the reference, chunk by chunk', () => fc.assert(fc.property(
		fc.oneof({ arbitrary: goodFirst, weight: 3 }, { arbitrary: streamJunk, weight: 1 }),
		fc.array(fc.oneof({ arbitrary: laterMessage, weight: 3 }, { arbitrary: streamJunk, weight: 1 }), { maxLength: 8 }),
		fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 12 }),
		fc.oneof(fc.constant(DEFAULT_MAX_TCP_MESSAGE_BYTES), fc.integer({ min: 12, max: 400 })),
		(first, later, cuts, max) => {
			followAll(cut(Buffer.concat([first, ...later]), cuts), max);
		}), params(3000, 0.5)));
	t.end();
});

t.test('MessageFollower: uniform random bytes never throw', (t) => {
	check(t, 'random bytes, random splits, any limit', () => fc.assert(fc.property(
		fc.uint8Array({ maxLength: 200 }),
		fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 10 }),
		fc.oneof(fc.constant(DEFAULT_MAX_TCP_MESSAGE_BYTES), fc.nat({ max: 0xffff })),
		(bytes, cuts, max) => {
			followAll(cut(Buffer.from(bytes), cuts), max);
		}), params(3000)));
	t.end();
});
