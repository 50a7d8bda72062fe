/*
 * TCP MESSAGES
 *
 * Over TCP a DNS message travels as a 2-byte big-endian length and then that
 * many bytes (RFC 1035 4.2.2), back to back, as many as the client likes on
 * one connection (RFC 7766 6.2.1).  bbal does not reframe that stream: the
 * client's bytes reach the backend exactly as they were sent, in the chunks
 * the socket happened to deliver.  But it does follow the message
 * boundaries as the bytes go by, because that is the only way to tell a DNS
 * client from something else that found port 53 open, and to know whether a
 * client that hung up early had sent anything worth answering.
 *
 * A MessageFollower is that follower for one connection's client-to-backend
 * direction.  It is fed every chunk the client sends, of any size, split
 * anywhere (a length prefix may arrive one byte in one read and one in the
 * next; a message may span a hundred reads), and it keeps only what it must
 * to continue: how many bytes of the current message are still to come, the
 * high byte of a length prefix cut in two, and, until the first message's
 * header has been seen, the part of that header that has arrived.  It never
 * holds a message, never copies one, and never touches a socket: the caller
 * passes the same chunk on to the backend untouched.  This is what makes it
 * pure, and what lets the fuzz tests cut a stream at every point and ask
 * that the answer not change.
 *
 * WHAT IT CHECKS, and why each check is there:
 *
 *   every length   at least a DNS header (12 bytes).  Nothing shorter can
 *                  be a DNS message; a stream that claims one is not DNS,
 *                  or has lost its framing, and every later boundary would
 *                  be a guess.
 *   every length   at most the limit (--max-tcp-message, 16 KiB by
 *                  default).  Real queries, even UPDATEs, are far smaller;
 *                  a client announcing 65535 bytes and trickling them is
 *                  holding a connection, not asking a question.
 *   the first      the same header check a datagram gets (dns.ts): a query,
 *   message        not a response; opcode QUERY, NOTIFY or UPDATE; exactly
 *                  one question.  Only the first, because by then the peer
 *                  has shown that it speaks DNS, and checking every message
 *                  would cost a copy of every header that straddles reads
 *                  for little more assurance.
 *
 * The checks run as early as the bytes allow: a bad length as soon as its
 * prefix is whole, a bad first header as soon as its twelfth byte arrives,
 * without waiting for the rest of the message.  A connection sending
 * garbage is refused on its first chunk, before anything has reached a
 * backend for it.
 *
 * PROBLEMS ARE VALUES.  feed() returns null while the stream is well formed
 * (the common case pays no allocation and builds no text), or a
 * StreamProblem naming what is wrong and the number that made it so.  The
 * first problem is final: the follower stops reading, and every later
 * feed() returns the same problem, so a caller that feeds once more by
 * mistake cannot be told that all is well.  describeProblem() turns a
 * problem into the phrase a log line carries, and is called only when a
 * line is actually written.
 *
 * COUNTING.  `messages` is the number of whole messages seen so far.  The
 * TCP proxy reads it when a client hangs up before its backend has
 * accepted: with no whole message, there is nothing to answer and the
 * connection can be closed at once; with one, the client may be waiting.
 * The proxy follows the answers too, with a second follower that checks
 * nothing but the upper bound (a backend is trusted to speak DNS; only its
 * message boundaries are wanted), so that queries forwarded minus answers returned
 * is what the backend still owes the connection.  `midMessage` says that a
 * message has begun and not ended, which starts the proxy's deadline for
 * the whole message.
 *
 * STOPPING AT A COUNT.  feed() may be told to stop once `messages` reaches
 * a number: it then follows the chunk only up to the end of that message
 * and says how far it went (`consumed`), so that the caller can forward
 * exactly that much and hand the rest back to the socket for later.  This
 * is how a connection's queries in flight are capped even when a client
 * pipelines hundreds of them into one read.
 *
 * What it does not do: decode names or match answers to queries.
 *
 * Who calls it: tcp_proxy.ts, two followers per client connection, from the
 * moment the connection is accepted until it closes.
 */

import { checkQueryHeader, DNS_HEADER_BYTES, HEADER_OK, HEADER_PROBLEMS } from './dns.js';

/** The default for --max-tcp-message: far above any real query. */
export const DEFAULT_MAX_TCP_MESSAGE_BYTES = 16 * 1024;

/** The most a length prefix can say: the answers' direction is followed with this limit. */
export const TCP_MAX_MESSAGE_BYTES = 0xffff;

/** Bytes of the length prefix in front of every DNS message over TCP. */
export const TCP_LENGTH_PREFIX_BYTES = 2;

/** What makes a client's stream not DNS; see the file comment. */
export type StreamProblem =
	| { readonly code: 'short'; readonly length: number }
	| { readonly code: 'long'; readonly length: number; readonly max: number }
	/* `header` is the HEADER_* verdict of dns.ts's checkQueryHeader. */
	| { readonly code: 'not_query'; readonly header: number };

/** The phrase for a log line; built only when one is written. */
export function describeProblem(p: StreamProblem): string {
	switch (p.code) {
	case 'short':
		return `message of ${p.length} bytes is shorter than a DNS header`;
	case 'long':
		return `message of ${p.length} bytes is over the ${p.max}-byte limit`;
	case 'not_query':
		return `first message is ${HEADER_PROBLEMS[p.header] ?? 'not a query'}`;
	}
}

export class MessageFollower {
	/* Whole messages seen so far. */
	private count = 0;
	/* Bytes of the current message still to come; 0 between messages. */
	private remaining = 0;
	/* The high byte of a length prefix whose low byte is in the next chunk, or -1. */
	private prefixHi = -1;
	/*
	 * The first message's header: how much of it has gone by (-1 once it
	 * has been checked), and, only when it straddles chunks, its bytes so
	 * far.  A header whole inside one chunk is checked where it lies.
	 */
	private headerSeen = 0;
	private headerBytes: Buffer | null = null;
	private problem: StreamProblem | null = null;
	private followed = 0;

	/*
	 * checksQueries false: the answers' direction, where only the boundaries
	 * matter -- no header check, no lower bound on a length.
	 */
	constructor(readonly maxMessageBytes: number = DEFAULT_MAX_TCP_MESSAGE_BYTES, readonly checksQueries = true) {
		if (!checksQueries) {
			this.headerSeen = -1;
		}
	}

	/** Whole messages seen so far. */
	get messages(): number {
		return this.count;
	}

	/** A message has begun (some of its prefix or body has gone by) and not ended. */
	get midMessage(): boolean {
		return this.remaining > 0 || this.prefixHi >= 0;
	}

	/** Bytes of the last chunk fed that were followed: all of it, unless feed() stopped at its count. */
	get consumed(): number {
		return this.followed;
	}

	/**
	 * Follow one chunk of the client's stream.  Null while the stream is
	 * well formed so far; otherwise the problem, now and on every later
	 * call.  The chunk is only read.  With stopAt, stop at the end of the
	 * message that makes `messages` reach it (see `consumed`).
	 */
	feed(chunk: Uint8Array, stopAt = Infinity): StreamProblem | null {
		if (this.problem !== null) {
			return this.problem;
		}
		const n = chunk.length;
		let off = 0;
		this.followed = n;
		while (off < n) {
			if (this.count >= stopAt && this.remaining === 0 && this.prefixHi < 0) {
				this.followed = off;
				return null;
			}
			if (this.remaining === 0) {
				let len: number;
				if (this.prefixHi >= 0) {
					len = (this.prefixHi << 8) | chunk[off];
					this.prefixHi = -1;
					off += 1;
				} else if (n - off >= TCP_LENGTH_PREFIX_BYTES) {
					len = (chunk[off] << 8) | chunk[off + 1];
					off += TCP_LENGTH_PREFIX_BYTES;
				} else {
					this.prefixHi = chunk[off];
					return null;
				}
				if (len < DNS_HEADER_BYTES && this.checksQueries) {
					return this.fail({ code: 'short', length: len });
				}
				if (len === 0) {
					this.count++; /* only when not checking: nothing to wait for */
					continue;
				}
				if (len > this.maxMessageBytes) {
					return this.fail({ code: 'long', length: len, max: this.maxMessageBytes });
				}
				this.remaining = len;
				continue;
			}
			const take = Math.min(this.remaining, n - off);
			if (this.headerSeen >= 0) {
				const verdict = this.followHeader(chunk, off, take);
				if (verdict !== HEADER_OK) {
					return this.fail({ code: 'not_query', header: verdict });
				}
			}
			this.remaining -= take;
			off += take;
			if (this.remaining === 0) {
				this.count++;
			}
		}
		return null;
	}

	/*
	 * Some bytes of the first message, `take` of them at `off`: check its
	 * header once all twelve have gone by.  HEADER_OK until then.
	 */
	private followHeader(chunk: Uint8Array, off: number, take: number): number {
		const seen = this.headerSeen;
		if (seen === 0 && take >= DNS_HEADER_BYTES) {
			/* The usual case: the whole header in one chunk, checked in place. */
			this.headerSeen = -1;
			return checkQueryHeader(chunk, off, DNS_HEADER_BYTES);
		}
		const header = this.headerBytes ??= Buffer.alloc(DNS_HEADER_BYTES);
		const h = Math.min(DNS_HEADER_BYTES - seen, take);
		header.set(chunk.subarray(off, off + h), seen);
		if (seen + h < DNS_HEADER_BYTES) {
			this.headerSeen = seen + h;
			return HEADER_OK;
		}
		this.headerSeen = -1;
		this.headerBytes = null;
		return checkQueryHeader(header);
	}

	private fail(p: StreamProblem): StreamProblem {
		this.problem = p;
		this.headerBytes = null;
		return p;
	}
}
