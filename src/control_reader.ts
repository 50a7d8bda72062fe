/*
 * CONTROL READER
 *
 * The read side of one backend's control session: the bytes the backend
 * writes are cut into frames (protocol.ts's FrameReader), each frame is
 * judged against the protocol's rules for a control session and handed to
 * the Backend (backend.ts) as what it means -- the hello, an answer to send,
 * a heartbeat reply, or a violation that faults the backend -- and no more
 * of them are read in one event-loop turn than CONTROL_FRAMES_PER_TURN.
 * The Backend owns the lifecycle those frames move; this module owns how
 * the stream is read.
 *
 *   socket 'data' --> FrameReader --> onFrame: hello? answer? heartbeat?
 *                                        |               |
 *                          violation: handler.violation  +--> handler.*
 *
 * THE BUDGET.  A backend's answers are work for bbal: each OUTBOUND_UDP is a
 * datagram to send.  Node reads a socket 64 KiB at a time, and libuv up to
 * 32 times per wakeup, so one readable control session could hand bbal two
 * megabytes -- some 47,000 small answers -- in one turn, while the UDP
 * socket reads at most 256 queries a wakeup (4 recvmmsg batches of 64).  A
 * backend that writes answers as fast as it can (a bug, or a process
 * replaying garbage) then owned the event loop: every other backend's
 * answers and every client's query waited behind it, a healthy backend's
 * median answer took a second.  So each session may process
 * CONTROL_FRAMES_PER_TURN (256) frames per turn, the UDP intake's own
 * figure: one backend can cost a turn no more than all the clients together.
 * A healthy backend answers the queries it was sent, at most 256 a turn from
 * UDP; a burst above that waits a turn, it is not lost.
 *
 * When the budget is spent mid-chunk, the rest of the chunk is kept, the
 * socket is paused, and the turn's end (the registry's once-per-turn list,
 * run on setImmediate after this turn's I/O) gives the session a fresh
 * budget and reads on from the kept bytes; the socket is resumed once they
 * are used up.  Frames are never dropped or reordered.  While paused,
 * Node stops asking the kernel for more (it stops reading once its own
 * buffer is over the stream's high-water mark), so what waits inside bbal
 * for a paused session is the rest of one chunk and at most one more
 * (under 200 KiB); everything else stays in the kernel's socket buffer,
 * which fills and blocks the backend's writes: the back-pressure a stream
 * socket gives for free.  A turn in which a session used up its budget is
 * counted (BackendStats.throttled).
 *
 * Work done at a turn's end counts against the next turn's budget, which
 * is renewed at that turn's end: a session never processes more than the
 * budget between two turn ends, paused or not.
 *
 * close() (from the Backend, when its session is dropped) forgets the kept
 * bytes and makes a pending turn's end a no-op; the Backend removes the
 * socket's listeners and destroys it.  A fault while paused is therefore
 * as clean as any other: nothing is read from that socket again.
 */

import type net from 'node:net';
import {
	FRAME_INBOUND_TCP_OK, FRAME_NAMES, FRAME_OUTBOUND_UDP, FRAME_SERVER_HEARTBEAT, FRAME_SERVER_HELLO,
	FrameReader, type FrameSink,
} from './protocol.js';

/** Frames one control session may process per event-loop turn (see THE BUDGET). */
export const CONTROL_FRAMES_PER_TURN = 256;

/** What a control session's frames mean to its Backend. */
export interface ControlFrameHandler {
	/** The session has had its SERVER_HELLO (the backend is ok). */
	helloDone(): boolean;
	hello(): void;
	/** OUTBOUND_UDP: a datagram to send (payload is a view, valid for the call). */
	outboundUdp(addr: number, port: number, payload: Buffer): void;
	/** SERVER_HEARTBEAT; the Backend judges whether one was asked for. */
	heartbeatReply(): void;
	/** The backend broke the protocol: fault it (which closes this reader). */
	violation(reason: string, extra?: Record<string, unknown>): void;
	/** This turn's budget is spent and the socket paused (once per turn at most). */
	budgetSpent(): void;
}

export class ControlReader implements FrameSink {
	private readonly frames: FrameReader;
	private framesLeft = CONTROL_FRAMES_PER_TURN;
	/* The rest of a chunk the budget stopped in, while the socket is paused. */
	private unread: Buffer | null = null;
	private turnEndPending = false;
	private closed = false;

	constructor(
		private readonly sock: net.Socket,
		private readonly handler: ControlFrameHandler,
		/** Call fn once, at the end of this event-loop turn (the registry's list). */
		private readonly atTurnEnd: (fn: () => void) => void,
	) {
		this.frames = new FrameReader(this);
		sock.on('data', this.socketOnData);
	}

	/** Bytes kept while paused (0 when reading). */
	get unreadBytes(): number {
		return this.unread?.length ?? 0;
	}

	/** The session is gone: read nothing more.  Idempotent. */
	close(): void {
		this.closed = true;
		this.unread = null;
	}

	private readonly socketOnData = (chunk: Buffer): void => {
		if (this.unread !== null) {
			/* Not expected once paused; kept in order all the same. */
			this.unread = Buffer.concat([this.unread, chunk]);
			return;
		}
		this.consume(chunk);
	};

	private consume(chunk: Buffer): void {
		let off = 0;
		if (this.framesLeft > 0) {
			off = this.frames.feed(chunk);
			if (this.closed) {
				return;
			}
			if (!this.turnEndPending) {
				this.turnEndPending = true;
				this.atTurnEnd(this.turnEnded);
			}
		}
		if (off < chunk.length) {
			/* Only the budget stops the reader on a live session: keep the rest for the next turn. */
			this.unread = chunk.subarray(off);
			this.sock.pause();
			this.handler.budgetSpent();
		}
	}

	/* A fresh budget; read on from the kept bytes, and resume the socket once they are used up. */
	private readonly turnEnded = (): void => {
		this.turnEndPending = false;
		if (this.closed) {
			return;
		}
		this.framesLeft = CONTROL_FRAMES_PER_TURN;
		const rest = this.unread;
		if (rest === null) {
			return;
		}
		this.unread = null;
		this.consume(rest);
		if (this.unread === null && !this.closed) {
			this.sock.resume();
		}
	};

	/* ---- the FrameReader's sink ---- */

	onFrame(type: number, addr: number, port: number, payload: Buffer | null): boolean {
		const h = this.handler;
		if (!h.helloDone()) {
			if (type !== FRAME_SERVER_HELLO) {
				h.violation('errant frame before hello', { frame_type: type });
				return false;
			}
			h.hello();
		} else {
			switch (type) {
			case FRAME_OUTBOUND_UDP:
				h.outboundUdp(addr, port, payload as Buffer);
				break;
			case FRAME_SERVER_HEARTBEAT:
				h.heartbeatReply();
				break;
			case FRAME_SERVER_HELLO:
				h.violation('duplicate hello from backend');
				return false;
			case FRAME_INBOUND_TCP_OK:
				h.violation('TCP session frame on the control session', { frame_type: type });
				return false;
			default:
				h.violation('invalid frame type', { frame_type: type, frame_name: FRAME_NAMES[type] });
				return false;
			}
		}
		return !this.closed && --this.framesLeft > 0;
	}

	onFrameError(code: 'unknown_type' | 'oversize', type: number, length: number): void {
		if (code === 'oversize') {
			this.handler.violation('backend sent oversized UDP packet', { frame_type: type, len: length });
		} else {
			this.handler.violation('invalid frame type', { frame_type: type });
		}
	}
}
