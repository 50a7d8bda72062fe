/*
 * DNS MESSAGES AS THE TESTS WRITE AND READ THEM
 *
 * Queries and answers are built with dns-packet; this file holds the few
 * shapes every test client and fake server agrees on.
 *
 * A QUERY (encodeQuery) asks one question with RD set, optionally with an
 * EDNS OPT record (mname answers past 512 bytes over UDP only then); the
 * edge tests also clear RD or repeat the question.  AN ANSWER from a fake
 * server (encodeAnswer) is authoritative and carries the one record every
 * test reads: a TXT `be=<label>` naming the backend that answered, as the
 * mname fixture adds to every reply.  backendOf() reads that label back.
 *
 * OVER TCP a DNS message travels as a 2-byte big-endian length and then
 * the message (RFC 1035 4.2.2).  framed() adds the prefix; a
 * LengthPrefixReader takes a byte stream in chunks of any size, split
 * anywhere, and hands back every message as soon as it is whole.  It is the
 * one splitter of the tests: every TCP client, the chaos load driver and the
 * fake backends' TCP sessions read through it.  It is pure (no socket) and
 * does not judge lengths: bbal's own follower (src/tcp_messages.ts) does
 * that, and never holds a message, which a client must.
 */

import dnsPacket from 'dns-packet';

/** Bytes of the length prefix in front of every DNS message over TCP. */
const PREFIX_BYTES = 2;

export interface QueryOptions {
	/* Advertise this EDNS UDP payload size. */
	edns?: number;
	/* Recursion desired; on unless false. */
	rd?: boolean;
	/* How many times the question is asked (an edge case: DNS allows one). */
	questions?: number;
}

export function encodeQuery(name: string, type: dnsPacket.RecordType, id: number, o: QueryOptions = {}): Buffer {
	const q = { type, name, class: 'IN' as const };
	return dnsPacket.encode({
		type: 'query',
		id,
		flags: o.rd === false ? 0 : dnsPacket.RECURSION_DESIRED,
		questions: Array.from({ length: o.questions ?? 1 }, () => q),
		additionals: o.edns === undefined ? [] :
			[{ type: 'OPT', name: '.', udpPayloadSize: o.edns, extendedRcode: 0,
				ednsVersion: 0, flags: 0, flag_do: false, options: [] }],
	});
}

/** A fake server's answer: authoritative, one TXT `be=<label>` for the question, RD copied when asked. */
export function encodeAnswer(id: number, question: dnsPacket.Question, label: string, rd = false): Buffer {
	return dnsPacket.encode({
		type: 'response',
		id,
		flags: dnsPacket.AUTHORITATIVE_ANSWER | (rd ? dnsPacket.RECURSION_DESIRED : 0),
		questions: [question],
		answers: [{ type: 'TXT', name: question.name, ttl: 0, class: 'IN', data: `be=${label}` }],
	});
}

/* The `be=<label>` TXT answer the fixture backend adds to every reply, or null. */
export function backendOf(packet: dnsPacket.Packet): string | null {
	for (const ans of packet.answers ?? []) {
		if (ans.type !== 'TXT') {
			continue;
		}
		const parts = Array.isArray(ans.data) ? ans.data : [ans.data];
		for (const part of parts) {
			const s = part.toString();
			if (s.startsWith('be=')) {
				return s.slice(3);
			}
		}
	}
	return null;
}

/** A DNS message as it goes over TCP: a 2-byte length, then the message. */
export function framed(msg: Uint8Array): Buffer {
	const out = Buffer.allocUnsafe(PREFIX_BYTES + msg.length);
	out.writeUInt16BE(msg.length, 0);
	out.set(msg, PREFIX_BYTES);
	return out;
}

/** Splits a DNS-over-TCP byte stream into its messages, however the chunks fall. */
export class LengthPrefixReader {
	/* Bytes of a message (or prefix) not yet whole. */
	private held: Buffer = Buffer.alloc(0);

	/** Bytes held towards the next message. */
	get pending(): number {
		return this.held.length;
	}

	/** Take one chunk; the messages it completes, in order (views of the stream's bytes). */
	feed(chunk: Buffer): Buffer[] {
		const buf = this.held.length === 0 ? chunk : Buffer.concat([this.held, chunk]);
		const out: Buffer[] = [];
		let off = 0;
		while (buf.length - off >= PREFIX_BYTES) {
			const end = off + PREFIX_BYTES + buf.readUInt16BE(off);
			if (buf.length < end) {
				break;
			}
			out.push(buf.subarray(off + PREFIX_BYTES, end));
			off = end;
		}
		this.held = buf.subarray(off);
		return out;
	}
}
