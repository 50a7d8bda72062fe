/*
 * The balancer protocol: constants, encoders, addresses and the reader.
 *
 * The expected bytes are written out by hand from PROTOCOL.md rather than
 * built with the encoders under test, so a wrong encoder cannot agree with
 * itself.  The reader is fed the same stream cut every way a socket might
 * cut it (every single split point, many pairs, one byte at a time); the
 * frames it hands over must be the same each time, and must stay intact
 * after later reads, because the UDP path passes them straight to send().
 */

import t from 'tap';
import {
	CLIENT_HEARTBEAT_FRAME, CLIENT_HELLO_FRAME, encodeInboundTcp, FirstFrameSink, FRAME_CLIENT_HEARTBEAT,
	FRAME_CLIENT_HELLO, FRAME_INBOUND_TCP, FRAME_INBOUND_TCP_OK, FRAME_INBOUND_UDP, FRAME_NAMES, FRAME_OUTBOUND_UDP,
	FRAME_SERVER_HEARTBEAT, FRAME_SERVER_HELLO, FrameReader, ipv4ToU32, u32ToIpv4, writeUdpFrame,
} from '../src/protocol.js';
import { encodeUdpFrame, INBOUND_TCP_OK_FRAME, SERVER_HEARTBEAT_FRAME, SERVER_HELLO_FRAME } from './support/backend_frames.js';

/* Little-endian u32s, the wire's only integer. */
function u32(...values: number[]): Buffer {
	const b = Buffer.alloc(4 * values.length);
	values.forEach((v, i) => b.writeUInt32LE(v, 4 * i));
	return b;
}

function payloadOf(len: number, seed: number): Buffer {
	return Buffer.from(Array.from({ length: len }, (_, i) => (i * 7 + seed) & 255));
}

/* `copy` is the payload's hex taken on arrival, to prove it was not changed later. */
type Seen = { type: number; addr: number; port: number; payload: Buffer | null; copy: string | null };

/* A sink that records everything; `stopAt` names a frame type to stop on. */
function recorder(stopAt?: number) {
	const frames: Seen[] = [];
	const errors: Array<[string, number, number]> = [];
	const sink = {
		onFrame(type: number, addr: number, port: number, payload: Buffer | null): boolean {
			frames.push({ type, addr, port, payload, copy: payload === null ? null : payload.toString('hex') });
			return type !== stopAt;
		},
		onFrameError(code: 'unknown_type' | 'oversize', type: number, length: number): void {
			errors.push([code, type, length]);
		},
	};
	return { sink, frames, errors };
}

type Expected = [type: number, addr: number, port: number, payload: Buffer | null];

/*
 * Whether the reader holds part of a frame, asked through what it does: a
 * SERVER_HEARTBEAT fed now must be taken whole and handed over as exactly
 * one frame.  Held bytes would join it into some other frame (no prefix of
 * a frame plus these four bytes spells a lone heartbeat), or swallow it.
 * The probe frame, when delivered, stays in `frames`.
 */
function holdsNothing(reader: FrameReader, frames: Seen[]): boolean {
	const before = frames.length;
	const used = reader.feed(u32(FRAME_SERVER_HEARTBEAT));
	return used === 4 && frames.length === before + 1 && frames[before]?.type === FRAME_SERVER_HEARTBEAT;
}

/*
 * Feed `chunks` (copied, so nothing shares memory with the source buffer)
 * to a fresh reader; describe the first way the result differs from
 * `expected`, or return null.
 */
function check(chunks: Buffer[], expected: Expected[], max?: number): string | null {
	const { sink, frames, errors } = recorder();
	const reader = new FrameReader(sink, max);
	for (const c of chunks) {
		const n = reader.feed(Buffer.from(c));
		if (n !== c.length) {
			return `feed consumed ${n} of ${c.length}`;
		}
	}
	if (errors.length > 0 || frames.length !== expected.length) {
		return `errors ${JSON.stringify(errors)}, ${frames.length} frames`;
	}
	if (!holdsNothing(reader, frames)) {
		return 'part of a frame is still held after the whole stream';
	}
	frames.pop();
	for (let i = 0; i < frames.length; i++) {
		const f = frames[i];
		const [type, addr, port, payload] = expected[i];
		const want = payload === null ? null : payload.toString('hex');
		if (f.type !== type || f.addr !== addr || f.port !== port) {
			return `frame ${i}: got ${f.type}/${f.addr}/${f.port}, expected ${type}/${addr}/${port}`;
		}
		if (f.copy !== want) {
			return `frame ${i}: payload wrong on arrival`;
		}
		if ((f.payload === null ? null : f.payload.toString('hex')) !== want) {
			return `frame ${i}: payload changed after later feeds`;
		}
	}
	return null;
}

/* Every frame type, both directions, with payloads of 0, 1 and 1500 bytes. */
const BIG = payloadOf(1500, 3);
const ONE = Buffer.from([0xa5]);
const EMPTY = Buffer.alloc(0);
const STREAM: Array<[Buffer, Expected]> = [
	[u32(1001), [FRAME_SERVER_HELLO, 0, 0, null]],
	[Buffer.concat([u32(1002, 0x7f000005, 53, 0)]), [FRAME_OUTBOUND_UDP, 0x7f000005, 53, EMPTY]],
	[Buffer.concat([u32(1002, 0xc0a80001, 65535, 1), ONE]), [FRAME_OUTBOUND_UDP, 0xc0a80001, 65535, ONE]],
	[u32(1004), [FRAME_SERVER_HEARTBEAT, 0, 0, null]],
	[Buffer.concat([u32(1002, 0xffffffff, 0xdeadbeef, 1500), BIG]), [FRAME_OUTBOUND_UDP, 0xffffffff, 0xdeadbeef, BIG]],
	[u32(1003), [FRAME_INBOUND_TCP_OK, 0, 0, null]],
	[u32(1), [FRAME_CLIENT_HELLO, 0, 0, null]],
	[Buffer.concat([u32(2, 0x0a000001, 5353, 3), Buffer.from('abc')]), [FRAME_INBOUND_UDP, 0x0a000001, 5353, Buffer.from('abc')]],
	[u32(3, 0x7f000009, 40000), [FRAME_INBOUND_TCP, 0x7f000009, 40000, null]],
	[u32(4), [FRAME_CLIENT_HEARTBEAT, 0, 0, null]],
	[u32(1004), [FRAME_SERVER_HEARTBEAT, 0, 0, null]],
];
const WIRE = Buffer.concat(STREAM.map(([b]) => b));
const FRAMES = STREAM.map(([, f]) => f);
/* The same stream without the 1500-byte frame, small enough to cut at every pair of points. */
const SMALL_STREAM = STREAM.filter(([, f]) => f[3] !== BIG);
const SMALL_WIRE = Buffer.concat(SMALL_STREAM.map(([b]) => b));
const SMALL_FRAMES = SMALL_STREAM.map(([, f]) => f);

function cut(buf: Buffer, points: number[]): Buffer[] {
	const edges = [0, ...points, buf.length];
	return edges.slice(1).map((end, i) => buf.subarray(edges[i], end));
}

t.test('frame constants match PROTOCOL.md', async (t) => {
	t.same([FRAME_CLIENT_HELLO, FRAME_INBOUND_UDP, FRAME_INBOUND_TCP, FRAME_CLIENT_HEARTBEAT], [1, 2, 3, 4]);
	t.same([FRAME_SERVER_HELLO, FRAME_OUTBOUND_UDP, FRAME_INBOUND_TCP_OK, FRAME_SERVER_HEARTBEAT],
		[1001, 1002, 1003, 1004]);
	t.equal(CLIENT_HELLO_FRAME.toString('hex'), '01000000');
	t.equal(CLIENT_HEARTBEAT_FRAME.toString('hex'), '04000000');
	t.equal(SERVER_HELLO_FRAME.toString('hex'), 'e9030000');
	t.equal(INBOUND_TCP_OK_FRAME.toString('hex'), 'eb030000');
	t.equal(SERVER_HEARTBEAT_FRAME.toString('hex'), 'ec030000');
	/* The names a log line gives a frame type (a backend sending the wrong one). */
	t.same(Object.entries(FRAME_NAMES), [
		['1', 'CLIENT_HELLO'], ['2', 'INBOUND_UDP'], ['3', 'INBOUND_TCP'], ['4', 'CLIENT_HEARTBEAT'],
		['1001', 'SERVER_HELLO'], ['1002', 'OUTBOUND_UDP'], ['1003', 'INBOUND_TCP_OK'], ['1004', 'SERVER_HEARTBEAT'],
	]);
});

t.test('encoders write the exact bytes', async (t) => {
	t.equal(encodeInboundTcp(0x7f000005, 53).toString('hex'), '030000000500007f35000000');
	t.equal(encodeInboundTcp(0xc0a80001, 0x12345678).toString('hex'), '030000000100a8c078563412');
	t.equal(encodeInboundTcp(0xc0a80001 | 0, 1).toString('hex'), '030000000100a8c001000000',
		'an address that went negative through int32 arithmetic is written as its u32');

	t.equal(encodeUdpFrame(FRAME_INBOUND_UDP, 0x7f000005, 53, Buffer.from([0xaa, 0xbb])).toString('hex'),
		'02000000' + '0500007f' + '35000000' + '02000000' + 'aabb');
	t.equal(encodeUdpFrame(FRAME_OUTBOUND_UDP, 0xffffffff, 65535, new Uint8Array(0)).toString('hex'),
		'ea030000' + 'ffffffff' + 'ffff0000' + '00000000', 'empty payload: header only');

	const dst = Buffer.alloc(48, 0xee);
	const payload = Uint8Array.from([1, 2, 3]);
	const end = writeUdpFrame(dst, 5, FRAME_OUTBOUND_UDP, 0x0a000102, 5301, payload);
	t.equal(end, 5 + 16 + 3, 'returns the offset after the frame');
	t.equal(dst.toString('hex'),
		'eeeeeeeeee' + 'ea030000' + '0201000a' + 'b5140000' + '03000000' + '010203' + 'ee'.repeat(24),
		'writes at the offset and touches nothing else');
	payload[0] = 99;
	t.equal(dst[21], 1, 'the payload is copied, not referenced');
	const second = writeUdpFrame(dst, end, FRAME_INBOUND_UDP, 1, 2, Uint8Array.from([7]));
	t.equal(second, end + 17, 'frames can be written back to back');
	t.equal(dst.subarray(end, second).toString('hex'), '02000000' + '01000000' + '02000000' + '01000000' + '07');
});

t.test('ipv4ToU32 parses dotted quads and refuses anything else', async (t) => {
	t.equal(ipv4ToU32('127.0.0.5'), 0x7f000005);
	t.equal(ipv4ToU32('0.0.0.0'), 0);
	t.equal(ipv4ToU32('255.255.255.255'), 0xffffffff, 'positive, not -1');
	t.equal(ipv4ToU32('192.168.0.1'), 0xc0a80001);
	for (const bad of ['1.2.3', '1.2.3.4.5', '256.1.1.1', '1.2.3.256', '', 'a.b.c.d', '1..2.3',
		' 1.2.3.4', '1.2.3.4 ', '.1.2.3', '1.2.3.', '1.2.3.-4', '4294967295', '1.2.3.4/32', '::1']) {
		t.equal(ipv4ToU32(bad), -1, JSON.stringify(bad));
	}
});

t.test('u32ToIpv4 and ipv4ToU32 round-trip', async (t) => {
	t.equal(u32ToIpv4(0x7f000005), '127.0.0.5');
	for (const ip of ['0.0.0.0', '127.0.0.5', '10.1.2.3', '128.0.0.0', '192.168.0.1', '255.255.255.255']) {
		t.equal(u32ToIpv4(ipv4ToU32(ip)), ip);
	}
	for (const n of [0, 1, 0x7fffffff, 0x80000000, 0xc0a80001, 0xfffffffe, 0xffffffff]) {
		t.equal(ipv4ToU32(u32ToIpv4(n)), n, n.toString(16));
	}
});

t.test('reader: the stream whole, and cut in two at every point', async (t) => {
	t.equal(check([WIRE], FRAMES), null);
	const failures: string[] = [];
	for (let i = 0; i <= WIRE.length; i++) {
		const why = check(cut(WIRE, [i]), FRAMES);
		if (why !== null) {
			failures.push(`cut at ${i}: ${why}`);
		}
	}
	t.same(failures.slice(0, 5), []);
});

t.test('reader: the stream cut in three', async (t) => {
	const failures: string[] = [];
	/* Every pair of points over the small stream... */
	for (let i = 0; i <= SMALL_WIRE.length; i++) {
		for (let j = i; j <= SMALL_WIRE.length; j++) {
			const why = check(cut(SMALL_WIRE, [i, j]), SMALL_FRAMES);
			if (why !== null) {
				failures.push(`small cut at ${i},${j}: ${why}`);
			}
		}
	}
	/* ...and over the full one, every pair of points near a frame boundary. */
	const near: number[] = [];
	let at = 0;
	for (const [b] of STREAM) {
		for (let d = -5; d <= 17; d++) {
			near.push(at + d);
		}
		at += b.length;
	}
	const points = [...new Set([...near, 700, 1000, WIRE.length])].filter((p) => p >= 0 && p <= WIRE.length);
	for (const i of points) {
		for (const j of points) {
			if (j >= i) {
				const why = check(cut(WIRE, [i, j]), FRAMES);
				if (why !== null) {
					failures.push(`cut at ${i},${j}: ${why}`);
				}
			}
		}
	}
	t.same(failures.slice(0, 5), []);
});

t.test('reader: one byte at a time, payloads intact afterwards', async (t) => {
	const bytes = Array.from(WIRE, (_, i) => WIRE.subarray(i, i + 1));
	t.equal(check(bytes, FRAMES), null);

	/* The same with one reused read buffer, as a socket library might do. */
	const { sink, frames } = recorder();
	const reader = new FrameReader(sink);
	const scratch = Buffer.alloc(1);
	for (let i = 0; i < WIRE.length; i++) {
		scratch[0] = WIRE[i]!;
		reader.feed(scratch);
	}
	t.same(frames.map((f) => f.payload?.toString('hex') ?? null),
		FRAMES.map((f) => f[3]?.toString('hex') ?? null),
		'frames assembled across reads own their bytes');
});

t.test('reader: an unknown type stops it for good', async (t) => {
	const bad = Buffer.concat([u32(1001), u32(999, 1, 2, 3), u32(1004)]);
	const { sink, frames, errors } = recorder();
	const reader = new FrameReader(sink);
	t.equal(reader.feed(bad), 4, 'returns the offset of the bad frame');
	t.same(frames.map((f) => f.type), [1001], 'frames before it are delivered');
	t.same(errors, [['unknown_type', 999, 0]]);
	t.equal(reader.feed(u32(1001)), 0, 'later feeds consume nothing');
	t.equal(reader.feed(Buffer.concat([u32(1002, 1, 2, 1), ONE])), 0);
	t.equal(frames.length, 1, 'and deliver nothing');
	t.equal(errors.length, 1, 'the error is reported once');

	for (const type of [0, 5, 1000, 1005, 0xffffffff]) {
		const r = recorder();
		new FrameReader(r.sink).feed(u32(type));
		t.same(r.errors, [['unknown_type', type, 0]], `type ${type}`);
	}
});

t.test('reader: an unknown type split across chunks', async (t) => {
	const bad = Buffer.concat([u32(1001), u32(999), u32(1004)]);
	for (let cutAt = 5; cutAt <= 7; cutAt++) {
		const { sink, frames, errors } = recorder();
		const reader = new FrameReader(sink);
		t.equal(reader.feed(bad.subarray(0, cutAt)), cutAt, `cut at ${cutAt}: first part taken`);
		t.same(errors, [], 'the bad type is not known yet: its bytes are held');
		t.equal(reader.feed(bad.subarray(cutAt)), 0, 'nothing of the rest consumed');
		t.same(errors, [['unknown_type', 999, 0]]);
		t.same(frames.map((f) => f.type), [1001]);
		t.equal(reader.feed(u32(1004)), 0);
		t.equal(frames.length + errors.length, 2, 'nothing more after the error');
	}
});

t.test('reader: oversize UDP refused on the header alone', async (t) => {
	const cases: Array<[number, number, number | undefined]> = [
		[FRAME_OUTBOUND_UDP, 1501, undefined],
		[FRAME_INBOUND_UDP, 1501, undefined],
		[FRAME_OUTBOUND_UDP, 0xffffffff, undefined],
		[FRAME_OUTBOUND_UDP, 513, 512],
	];
	for (const [type, len, max] of cases) {
		const header = u32(type, 0x7f000001, 53, len);
		for (const cutAt of [16, 4, 13]) {
			const { sink, frames, errors } = recorder();
			const reader = new FrameReader(sink, max);
			const first = Buffer.concat([u32(1001), header.subarray(0, cutAt)]);
			if (cutAt === 16) {
				t.equal(reader.feed(first), 4, 'feed returns the offset of the oversize frame');
			} else {
				t.equal(reader.feed(first), first.length, 'a partial header is taken');
				t.equal(reader.feed(header.subarray(cutAt)), 0, 'the rest of the header is refused');
			}
			t.same(errors, [['oversize', type, len]], `type ${type} length ${len} max ${max} cut ${cutAt}`);
			t.same(frames.map((f) => f.type), [1001]);
			t.equal(reader.feed(Buffer.alloc(100)), 0, 'stopped for good');
		}
	}
	const ok = Buffer.concat([u32(1002, 1, 2, 512), payloadOf(512, 1)]);
	t.equal(check([ok], [[FRAME_OUTBOUND_UDP, 1, 2, payloadOf(512, 1)]], 512), null,
		'a payload of exactly the limit is accepted');
});

t.test('reader: a sink returning false leaves the rest to the caller', async (t) => {
	/* The TCP session case: the OK, then the client's stream in the same read. */
	const clientBytes = Buffer.from('001d' + 'ab'.repeat(29), 'hex');
	const wire = Buffer.concat([u32(1003), clientBytes]);
	{
		const { sink, frames } = recorder(FRAME_INBOUND_TCP_OK);
		const n = new FrameReader(sink).feed(wire);
		t.equal(n, 4, 'offset just past the OK');
		t.same(wire.subarray(n), clientBytes);
		t.equal(frames.length, 1);
	}
	{
		/* The OK itself split across reads. */
		const { sink, frames } = recorder(FRAME_INBOUND_TCP_OK);
		const reader = new FrameReader(sink);
		t.equal(reader.feed(wire.subarray(0, 1)), 1);
		const rest = wire.subarray(1);
		const n = reader.feed(rest);
		t.equal(n, 3, 'offset just past the end of the OK in the second read');
		t.same(rest.subarray(n), clientBytes);
		t.equal(frames.length, 1);
	}
	{
		/*
		 * The OK split 2+2, the client's bytes after it in the second read:
		 * the OK is completed from held bytes, and the reader must stop
		 * there too, not go on to read the client's stream as frames.
		 */
		const { sink, frames, errors } = recorder(FRAME_INBOUND_TCP_OK);
		const reader = new FrameReader(sink);
		t.equal(reader.feed(wire.subarray(0, 2)), 2, 'half the OK taken and held');
		t.same(frames, [], 'nothing handed over yet');
		const rest = wire.subarray(2);
		const n = reader.feed(rest);
		t.equal(n, 2, 'offset just past the held-over OK');
		t.same(rest.subarray(n), clientBytes, 'the rest is the client\'s, untouched');
		t.same(frames.map((f) => f.type), [FRAME_INBOUND_TCP_OK], 'one frame, the OK');
		t.same(errors, [], 'the client\'s bytes were never read as frames');
	}
	{
		/* Stopping mid-stream: frames after the stop are not delivered. */
		const { sink, frames } = recorder(FRAME_OUTBOUND_UDP);
		const mixed = Buffer.concat([u32(1001), u32(1002, 1, 2, 1), ONE, u32(1004)]);
		t.equal(new FrameReader(sink).feed(mixed), 4 + 17);
		t.same(frames.map((f) => f.type), [1001, 1002]);
	}
});

t.test('FirstFrameSink: one frame, then the reader stops; anything else is a bad start', async (t) => {
	const clientBytes = Buffer.from('001d' + 'ab'.repeat(29), 'hex');
	{
		const sink = new FirstFrameSink(FRAME_INBOUND_TCP_OK);
		const wire = Buffer.concat([u32(1003), clientBytes]);
		t.equal(new FrameReader(sink, 0).feed(wire), 4, 'the OK, and the offset where the client\'s stream begins');
		t.equal(sink.verdict, 'ok');
		t.equal(sink.type, FRAME_INBOUND_TCP_OK);
	}
	{
		const sink = new FirstFrameSink(FRAME_INBOUND_TCP_OK);
		const reader = new FrameReader(sink, 0);
		t.equal(reader.feed(u32(1003).subarray(0, 2)), 2);
		t.equal(sink.verdict, 'waiting', 'half an OK: waiting');
		t.equal(reader.feed(Buffer.concat([u32(1003).subarray(2), clientBytes])), 2, 'the OK completed from held bytes');
		t.equal(sink.verdict, 'ok');
	}
	const bad: Array<[string, Buffer, number, string | undefined]> = [
		['another known frame', u32(1001), FRAME_SERVER_HELLO, undefined],
		['an unknown type', u32(999), 999, 'unknown_type'],
		['a UDP frame, refused on its header with a limit of 0', u32(1002, 1, 2, 5), FRAME_OUTBOUND_UDP, 'oversize'],
	];
	for (const [what, wire, type, error] of bad) {
		const sink = new FirstFrameSink(FRAME_INBOUND_TCP_OK);
		new FrameReader(sink, 0).feed(Buffer.concat([wire, clientBytes]));
		t.equal(sink.verdict, 'bad', what);
		t.equal(sink.type, type, `${what}: its type`);
		t.equal(sink.error, error, `${what}: the reader's error`);
	}
	{
		/* A reader that went on past the stop would report again: that is a bad start too. */
		const sink = new FirstFrameSink(FRAME_INBOUND_TCP_OK);
		t.equal(sink.onFrame(FRAME_INBOUND_TCP_OK), false, 'the sink always stops the reader');
		sink.onFrameError('unknown_type', 999);
		t.equal(sink.verdict, 'bad');
		t.equal(sink.type, FRAME_INBOUND_TCP_OK, 'the first frame is what the log names');
	}
});

t.test('reader: a frame completed from held bytes whose sink stops ends the feed there', async (t) => {
	/*
	 * The TCP session case again, with the OK cut anywhere inside it: the
	 * read that completes it carries the client's first bytes, which belong
	 * to the DNS stream, not to the balancer protocol.  They must be handed
	 * back, neither parsed as frames nor refused as an unknown type --
	 * whatever they happen to look like.
	 */
	const looksLikeFrames = Buffer.concat([u32(1004), u32(1002, 1, 2, 1), ONE]);
	const dnsStream = Buffer.from('001d' + 'ab'.repeat(29), 'hex');
	for (const client of [looksLikeFrames, dnsStream]) {
		for (let cutAt = 1; cutAt <= 3; cutAt++) {
			const { sink, frames, errors } = recorder(FRAME_INBOUND_TCP_OK);
			const reader = new FrameReader(sink);
			const what = `OK cut ${cutAt}+${4 - cutAt}, client ${client === dnsStream ? 'DNS' : 'frame-like'} bytes`;
			t.equal(reader.feed(u32(1003).subarray(0, cutAt)), cutAt, `${what}: the start of the OK is taken`);
			t.same(frames, [], `${what}: nothing delivered yet`);
			const second = Buffer.concat([u32(1003).subarray(cutAt), client]);
			const n = reader.feed(second);
			t.equal(n, 4 - cutAt, `${what}: feed stops just past the OK`);
			t.same(second.subarray(n), client, `${what}: the client's bytes are left to the caller`);
			t.same(frames.map((f) => f.type), [FRAME_INBOUND_TCP_OK], `${what}: only the OK reaches the sink`);
			t.same(errors, [], `${what}: and no error`);
		}
	}

	/* The same for a UDP frame completed from held bytes: what follows waits for the next feed. */
	const { sink, frames, errors } = recorder(FRAME_OUTBOUND_UDP);
	const reader = new FrameReader(sink);
	const udp = Buffer.concat([u32(1002, 0x7f000001, 53, 3), Buffer.from('xyz')]);
	t.equal(reader.feed(udp.subarray(0, 10)), 10);
	const rest = Buffer.concat([udp.subarray(10), u32(1004)]);
	t.equal(reader.feed(rest), udp.length - 10, 'stops after the UDP frame');
	t.same(frames.map((f) => [f.type, f.copy]), [[FRAME_OUTBOUND_UDP, Buffer.from('xyz').toString('hex')]]);
	t.equal(reader.feed(rest.subarray(udp.length - 10)), 4, 'the caller feeds the rest back');
	t.same(frames.map((f) => f.type), [FRAME_OUTBOUND_UDP, FRAME_SERVER_HEARTBEAT]);
	t.same(errors, []);
});
