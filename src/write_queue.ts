/*
 * WRITE QUEUE
 *
 * A control session carries every UDP query its backend serves, and writing
 * each INBOUND_UDP frame to the socket on its own would cost one write
 * system call per query.  So a backend does not write frames: it appends
 * them to a WriteQueue, and once per event-loop turn the queue is emptied
 * into the socket in one (corked) write.  This module is only the queue:
 * it knows nothing of sockets, timers or turns.  Who flushes it, and when,
 * is the backend's business (backend.ts) and the registry's (backends.ts,
 * which runs every pending flush once per turn).
 *
 * THE STAGING BUFFER.  Frames are packed into one staging buffer of
 * WRITE_CHUNK_BYTES, allocated on the first append and kept for the queue's
 * whole life.  A frame that does not fit closes the staging buffer's
 * contents off as a full chunk -- a copy of exactly the bytes used -- and
 * starts again at the front.  A frame larger than the staging buffer gets a
 * staging buffer of its own size (which then stays, being no less reusable
 * than the smaller one).
 *
 * take() hands out everything queued as right-sized copies: the full chunks
 * in order, then a copy of the staging buffer's used bytes.  Handing the
 * staging buffer itself to the socket would cost a fresh 16 KiB allocation
 * every turn, and each one would stay pinned while the socket holds it: a
 * stopped backend's 256 KiB of queued frames, written ~60 bytes a turn at
 * light load, held some 70 MB of them.  Small copies come from Node's shared
 * pool, so the common turn (a few frames) allocates almost nothing.
 *
 * THE HOT PATH.  An INBOUND_UDP frame is written into the queue in place,
 * with no intermediate buffer: reserve(n) makes room for n bytes and returns
 * the staging buffer, the caller writes the frame at `end`, and commit()
 * takes the new end.  append() does the same for a frame that already
 * exists as a buffer (a heartbeat).
 *
 * The staging buffer comes from allocUnsafeSlow, never from Node's shared
 * pool: it lives as long as its backend, and must not keep alive a pool
 * slab that short-lived buffers share.  A frame bigger than a chunk is
 * rare (an INBOUND_UDP frame is at most 1516 bytes), but the queue does
 * not assume it never happens.
 *
 * WHAT IT DOES NOT DO.  It does not bound itself: it holds what one turn
 * queued and no more, because every turn ends with a take() or a discard().
 * The bound on what waits for a backend is the socket's (the control
 * session's high-water mark), and the backend stops appending queries when
 * the socket says it is full (STUCK in backend.ts).  Nor does it decide
 * when to flush: a pure object is one that a test can drive byte by byte.
 *
 * GUARANTEES.  The bytes that take() hands out, concatenated, are exactly
 * the bytes appended since the last take() or discard(), in order, however
 * the frames fall across the chunk boundary.  No piece handed out shares
 * memory with the staging buffer, so later appends never change it.
 * discard() forgets everything queued (a session that was torn down: its
 * queries are not wanted any more).
 */

import assert from 'node:assert/strict';

/* The staging buffer's size: a few hundred typical queries. */
export const WRITE_CHUNK_BYTES = 16 * 1024;

/* A right-sized copy of buf's first len bytes (small ones come from Node's shared pool). */
function copyOut(buf: Buffer, len: number): Buffer {
	const out = Buffer.allocUnsafe(len);
	buf.copy(out, 0, 0, len);
	return out;
}

export class WriteQueue {
	/* Full chunks, right-sized copies, oldest first. */
	private chunks: Buffer[] = [];
	private chunkBytes = 0;
	/* The staging buffer; its first `used` bytes are queued. */
	private staging: Buffer | null = null;
	private used = 0;
	/* How far the last reserve() allows commit() to go. */
	private reservedEnd = 0;

	/** Bytes queued since the last take() or discard(). */
	get byteLength(): number {
		return this.chunkBytes + this.used;
	}

	/** Where the next bytes go in the buffer that reserve() returned. */
	get end(): number {
		return this.used;
	}

	/**
	 * Make room for n more bytes and return the buffer to write them into,
	 * starting at `end`; then call commit() with where the writing stopped.
	 */
	reserve(n: number): Buffer {
		let buf = this.staging;
		if (buf === null) {
			buf = Buffer.allocUnsafeSlow(Math.max(WRITE_CHUNK_BYTES, n));
			this.staging = buf;
		} else if (this.used + n > buf.length) {
			if (this.used > 0) {
				this.chunks.push(copyOut(buf, this.used));
				this.chunkBytes += this.used;
				this.used = 0;
			}
			if (n > buf.length) {
				buf = Buffer.allocUnsafeSlow(n);
				this.staging = buf;
			}
		}
		this.reservedEnd = this.used + n;
		return buf;
	}

	/** The bytes up to `end` of the reserved room are written and queued. */
	commit(end: number): void {
		/* Tested before calling assert: this runs once per query, and assert() gathers its arguments. */
		if (end < this.used || end > this.reservedEnd) {
			assert.fail('commit() outside the room reserve() made');
		}
		this.used = end;
	}

	/** Queue a copy of `frame`. */
	append(frame: Uint8Array): void {
		const buf = this.reserve(frame.length);
		buf.set(frame, this.used);
		this.commit(this.used + frame.length);
	}

	/**
	 * Everything queued, in order, as right-sized copies that belong to the
	 * caller; the queue is empty afterwards and keeps its staging buffer.
	 * Empty when nothing is queued.
	 */
	take(): Buffer[] {
		const out = this.chunks;
		if (this.used > 0) {
			out.push(copyOut(this.staging as Buffer, this.used));
		}
		this.chunks = [];
		this.chunkBytes = 0;
		this.used = 0;
		this.reservedEnd = 0;
		return out;
	}

	/** Forget everything queued. */
	discard(): void {
		this.chunks = [];
		this.chunkBytes = 0;
		this.used = 0;
		this.reservedEnd = 0;
	}
}
