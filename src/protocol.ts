/*
 * PROTOCOL
 *
 * The balancer speaks a small framed protocol to every backend over an
 * AF_UNIX stream socket.  It is fixed by node-mname (lib/balancer.js), so
 * everything here must match an unmodified mname byte for byte.  Every
 * integer is an unsigned 32-bit little-endian value and every frame starts
 * with its type:
 *
 *   balancer -> backend
 *     type  name              after the type
 *        1  CLIENT_HELLO      -
 *        2  INBOUND_UDP       src addr, src port, length N, N bytes
 *        3  INBOUND_TCP       src addr, src port
 *        4  CLIENT_HEARTBEAT  -
 *
 *   backend -> balancer
 *     type  name              after the type
 *     1001  SERVER_HELLO      -
 *     1002  OUTBOUND_UDP      dst addr, dst port, length N, N bytes
 *     1003  INBOUND_TCP_OK    -   (the last frame on a TCP session)
 *     1004  SERVER_HEARTBEAT  -
 *
 * An IPv4 address travels as one u32 whose most significant byte is the
 * first octet, so 127.0.0.5 is 0x7f000005, written 05 00 00 7f.  A port is a
 * full u32.
 *
 * This module knows the layouts and nothing else: no sockets, no policy.
 * Whether a frame is allowed at a given moment (a heartbeat reply with none
 * outstanding, a hello twice) is the business of backend.ts.  The reader
 * does enforce the one rule that protects memory: a frame whose declared
 * payload exceeds the limit given to it is refused before its payload is
 * waited for, so a backend cannot make bbal buffer four gigabytes.
 *
 * FrameReader is incremental and pure.  A stream read may hold half a frame
 * or many; the reader hands every complete frame to its sink as it is found,
 * straight out of the chunk it arrived in when the frame lies whole inside
 * one chunk (the common case, no copy), and assembles only a frame that
 * straddles chunks, into a fresh buffer of exactly its size.  A payload
 * handed to the sink is therefore never overwritten later and may be passed
 * to dgram send() as it is.
 *
 * A sink may stop the reader after any frame; feed() then says where it
 * stopped.  A TCP session needs exactly that: INBOUND_TCP_OK is its only
 * frame, and what follows is the client's DNS stream.  FirstFrameSink is
 * that sink, so tcp_proxy.ts reads the OK with this reader, not by hand.
 */

export const FRAME_CLIENT_HELLO = 1;
export const FRAME_INBOUND_UDP = 2;
export const FRAME_INBOUND_TCP = 3;
export const FRAME_CLIENT_HEARTBEAT = 4;
export const FRAME_SERVER_HELLO = 1001;
export const FRAME_OUTBOUND_UDP = 1002;
export const FRAME_INBOUND_TCP_OK = 1003;
export const FRAME_SERVER_HEARTBEAT = 1004;

/** Type + address + port + length: the header of both UDP frames. */
export const UDP_FRAME_HEADER_BYTES = 16;
/** Type + address + port. */
export const INBOUND_TCP_FRAME_BYTES = 12;
/** The DNS datagram size limit, both directions. */
export const MAX_UDP_PAYLOAD_BYTES = 1500;

export const FRAME_NAMES: Readonly<Record<number, string>> = {
	[FRAME_CLIENT_HELLO]: 'CLIENT_HELLO',
	[FRAME_INBOUND_UDP]: 'INBOUND_UDP',
	[FRAME_INBOUND_TCP]: 'INBOUND_TCP',
	[FRAME_CLIENT_HEARTBEAT]: 'CLIENT_HEARTBEAT',
	[FRAME_SERVER_HELLO]: 'SERVER_HELLO',
	[FRAME_OUTBOUND_UDP]: 'OUTBOUND_UDP',
	[FRAME_INBOUND_TCP_OK]: 'INBOUND_TCP_OK',
	[FRAME_SERVER_HEARTBEAT]: 'SERVER_HEARTBEAT',
};

/* Header size of each known type; 0 marks an unknown type. */
function headerBytes(type: number): number {
	switch (type) {
	case FRAME_CLIENT_HELLO:
	case FRAME_CLIENT_HEARTBEAT:
	case FRAME_SERVER_HELLO:
	case FRAME_INBOUND_TCP_OK:
	case FRAME_SERVER_HEARTBEAT:
		return 4;
	case FRAME_INBOUND_TCP:
		return INBOUND_TCP_FRAME_BYTES;
	case FRAME_INBOUND_UDP:
	case FRAME_OUTBOUND_UDP:
		return UDP_FRAME_HEADER_BYTES;
	default:
		return 0;
	}
}

function hasPayload(type: number): boolean {
	return type === FRAME_INBOUND_UDP || type === FRAME_OUTBOUND_UDP;
}

/** A frame that is its type alone (hellos, heartbeats, INBOUND_TCP_OK). */
export function typeOnlyFrame(type: number): Buffer {
	const b = Buffer.alloc(4);
	b.writeUInt32LE(type, 0);
	return b;
}

/*
 * Fixed frames are shared, never mutated: a socket may hold them queued.
 * Only the balancer's: the frames a backend writes are built by whoever
 * plays one (the tests' fakes, test/support/backend_frames.ts).
 */
export const CLIENT_HELLO_FRAME: Buffer = typeOnlyFrame(FRAME_CLIENT_HELLO);
export const CLIENT_HEARTBEAT_FRAME: Buffer = typeOnlyFrame(FRAME_CLIENT_HEARTBEAT);

/** The 12-byte INBOUND_TCP frame that opens a TCP session. */
export function encodeInboundTcp(addr: number, port: number): Buffer {
	const b = Buffer.allocUnsafe(INBOUND_TCP_FRAME_BYTES);
	b.writeUInt32LE(FRAME_INBOUND_TCP, 0);
	b.writeUInt32LE(addr >>> 0, 4);
	b.writeUInt32LE(port, 8);
	return b;
}

/**
 * Write a UDP frame (INBOUND_UDP or OUTBOUND_UDP) at `off` in `dst`: the
 * header, then a copy of the payload.  Returns the offset after the frame.
 * The caller makes room for UDP_FRAME_HEADER_BYTES + payload.length.
 */
export function writeUdpFrame(dst: Buffer, off: number, type: number, addr: number,
	port: number, payload: Uint8Array): number {
	dst.writeUInt32LE(type, off);
	dst.writeUInt32LE(addr >>> 0, off + 4);
	dst.writeUInt32LE(port, off + 8);
	dst.writeUInt32LE(payload.length, off + 12);
	dst.set(payload, off + UDP_FRAME_HEADER_BYTES);
	return off + UDP_FRAME_HEADER_BYTES + payload.length;
}

/* Addresses: the u32 form is what travels and what keys the remotes table. */

/** "a.b.c.d" to its u32 form, or -1 when the text is not a dotted quad. */
export function ipv4ToU32(ip: string): number {
	let value = 0;
	let octet = -1;
	let dots = 0;
	for (let i = 0; i < ip.length; i++) {
		const c = ip.charCodeAt(i);
		if (c === 46 /* . */) {
			if (octet < 0 || dots === 3) {
				return -1;
			}
			value = value * 256 + octet;
			octet = -1;
			dots++;
		} else if (c >= 48 && c <= 57) {
			octet = octet < 0 ? c - 48 : octet * 10 + (c - 48);
			if (octet > 255) {
				return -1;
			}
		} else {
			return -1;
		}
	}
	if (octet < 0 || dots !== 3) {
		return -1;
	}
	return value * 256 + octet;
}

export function u32ToIpv4(addr: number): string {
	return `${(addr >>> 24) & 255}.${(addr >>> 16) & 255}.${(addr >>> 8) & 255}.${addr & 255}`;
}

/** What the reader hands over; payload is null for frames without one. */
export interface FrameSink {
	/**
	 * One whole frame.  Return false to stop reading this chunk: feed()
	 * returns at once with the offset just past this frame, and the caller
	 * decides what the rest of the stream is (a TCP session's client bytes
	 * follow INBOUND_TCP_OK) and whether to feed the reader again.
	 */
	onFrame(type: number, addr: number, port: number, payload: Buffer | null): boolean;
	/** The stream is not this protocol; the reader has stopped for good. */
	onFrameError(code: 'unknown_type' | 'oversize', type: number, length: number): void;
}

/**
 * A sink for a stream whose first frame is its only one: a TCP session
 * carries INBOUND_TCP_OK and then the client's DNS stream, which is not
 * frames.  It takes one frame and stops the reader there, so feed() returns
 * where the other stream begins; `verdict` says whether that frame was the
 * `expected` type.  Another type first, a reader error, or anything at all
 * reported after the stop makes it 'bad', for good.
 */
export class FirstFrameSink implements FrameSink {
	verdict: 'waiting' | 'ok' | 'bad' = 'waiting';
	/** The first frame's type, or the refused one's; -1 while waiting. */
	type = -1;
	error: 'unknown_type' | 'oversize' | undefined;

	constructor(readonly expected: number) {}

	onFrame(type: number): boolean {
		if (this.verdict === 'waiting') {
			this.type = type;
			this.verdict = type === this.expected ? 'ok' : 'bad';
		} else {
			this.verdict = 'bad';
		}
		return false;
	}

	onFrameError(code: 'unknown_type' | 'oversize', type: number): void {
		if (this.verdict === 'waiting') {
			this.type = type;
			this.error = code;
		}
		this.verdict = 'bad';
	}
}

export class FrameReader {
	/* A frame straddling chunks: its bytes so far (header, then whole frame). */
	private held: Buffer | null = null;
	private heldBytes = 0;
	private failed = false;

	constructor(
		private readonly sink: FrameSink,
		private readonly maxPayloadBytes: number = MAX_UDP_PAYLOAD_BYTES,
	) {}

	/**
	 * Consume a chunk.  Returns chunk.length when every byte was consumed,
	 * or the offset of the first byte not consumed when the sink asked to
	 * stop (the rest belongs to whoever reads the stream next).  After an
	 * error it consumes nothing.
	 */
	feed(chunk: Buffer): number {
		if (this.failed) {
			return 0;
		}
		let off = 0;
		if (this.held !== null) {
			off = this.fillHeld(chunk);
			if (off < 0) {
				return this.failed ? 0 : chunk.length;
			}
			const frame = this.held;
			this.held = null;
			this.heldBytes = 0;
			if (!this.emit(frame, 0)) {
				return off;
			}
		}
		const end = chunk.length;
		while (off < end) {
			const avail = end - off;
			if (avail < 4) {
				this.hold(chunk, off, 4);
				return end;
			}
			const type = chunk.readUInt32LE(off);
			const hdr = headerBytes(type);
			if (hdr === 0) {
				this.fail('unknown_type', type, 0);
				return off;
			}
			if (avail < hdr) {
				this.hold(chunk, off, hdr);
				return end;
			}
			let total = hdr;
			if (hasPayload(type)) {
				const len = chunk.readUInt32LE(off + 12);
				if (len > this.maxPayloadBytes) {
					this.fail('oversize', type, len);
					return off;
				}
				total += len;
			}
			if (avail < total) {
				this.hold(chunk, off, total);
				return end;
			}
			if (!this.emit(chunk, off)) {
				return off + total;
			}
			off += total;
		}
		return end;
	}

	/* Start holding a partial frame whose known size so far is `need`. */
	private hold(chunk: Buffer, off: number, need: number): void {
		const b = Buffer.allocUnsafe(need);
		const n = chunk.copy(b, 0, off);
		this.held = b;
		this.heldBytes = n;
	}

	/*
	 * Add bytes from the front of chunk to the held frame.  Returns the
	 * offset in chunk just past the completed frame, or -1 when the frame is
	 * still incomplete (all of chunk taken) or broken (this.failed set).
	 */
	private fillHeld(chunk: Buffer): number {
		let off = 0;
		for (;;) {
			let held = this.held as Buffer;
			const take = Math.min(held.length - this.heldBytes, chunk.length - off);
			chunk.copy(held, this.heldBytes, off, off + take);
			this.heldBytes += take;
			off += take;
			if (this.heldBytes < held.length) {
				return -1;
			}
			/* The held buffer is full: is that the whole frame, or a header? */
			const type = held.readUInt32LE(0);
			const hdr = headerBytes(type);
			if (hdr === 0) {
				this.fail('unknown_type', type, 0);
				return -1;
			}
			let total = hdr;
			if (held.length >= hdr && hasPayload(type)) {
				const len = held.readUInt32LE(12);
				if (len > this.maxPayloadBytes) {
					this.fail('oversize', type, len);
					return -1;
				}
				total += len;
			}
			if (held.length === total) {
				return off;
			}
			/* Grow to the size now known and keep filling. */
			const bigger = Buffer.allocUnsafe(held.length < hdr ? hdr : total);
			held.copy(bigger, 0, 0, this.heldBytes);
			this.held = held = bigger;
		}
	}

	/* Decode the frame at `off` (known complete) and hand it to the sink. */
	private emit(buf: Buffer, off: number): boolean {
		const type = buf.readUInt32LE(off);
		if (type === FRAME_INBOUND_UDP || type === FRAME_OUTBOUND_UDP) {
			const len = buf.readUInt32LE(off + 12);
			const start = off + UDP_FRAME_HEADER_BYTES;
			return this.sink.onFrame(type, buf.readUInt32LE(off + 4), buf.readUInt32LE(off + 8),
				buf.subarray(start, start + len));
		}
		if (type === FRAME_INBOUND_TCP) {
			return this.sink.onFrame(type, buf.readUInt32LE(off + 4), buf.readUInt32LE(off + 8), null);
		}
		return this.sink.onFrame(type, 0, 0, null);
	}

	private fail(code: 'unknown_type' | 'oversize', type: number, length: number): void {
		this.failed = true;
		this.held = null;
		this.heldBytes = 0;
		this.sink.onFrameError(code, type, length);
	}
}
