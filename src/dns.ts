/*
 * DNS EDGE
 *
 * bbal is not a DNS server: the backends answer every query they can.  But
 * it faces every host in the datacenter on port 53, so it knows just enough
 * DNS to refuse what is not a query, to answer at once what no backend can,
 * and to keep strangers out.  This module holds that knowledge as pure
 * functions over bytes; the proxies decide when to apply it.
 *
 * THE HEADER CHECK runs on every datagram (and on the first message of a TCP
 * connection) and reads four bytes of the 12-byte header, never decoding the
 * message:
 *
 *   shorter than 12 bytes       not DNS at all
 *   QR = 1                      a response: reflection or a confused peer
 *   opcode not QUERY (0),       IQUERY and STATUS are obsolete or unused
 *     NOTIFY (4) or UPDATE (5)  here; the rest are unassigned
 *   QDCOUNT != 1                no real query asks zero or several questions
 *                               (NOTIFY and UPDATE carry exactly one zone)
 *
 * A malformed question section passes: parsing names is the backend's job,
 * and its FORMERR is a better answer than silence.
 *
 * SYNTHESIZED ANSWERS.  When no backend is ok bbal answers SERVFAIL itself,
 * so a resolver fails over to another Binder at once instead of waiting out
 * its timeout; a rate-limited query may get REFUSED.  The answer is built
 * from the query: same id, opcode and RD, QR set, AA/TC/RA clear, the one
 * question echoed and nothing else (no EDNS record, no answers).  It is
 * therefore never longer than the query, so bbal cannot be used as an
 * amplifier; callers also limit how many each remote gets per second.  A
 * query whose question cannot be walked gets no synthesized answer.
 *
 * THE ACL (--allow CIDR,...) is a list of IPv4 prefixes checked against the
 * u32 source address: a handful of mask-and-compare operations, cheap
 * enough for every datagram.  An empty list allows everyone, as the
 * original did.
 */

import { createRequire } from 'node:module';
import { ipv4ToU32, u32ToIpv4 } from './protocol.js';

/*
 * dns-packet is needed only to name queries in trace logs, so it is loaded
 * on first use: at any other level bbal never pays its memory.
 */
const requireLazily = createRequire(import.meta.url);
let decodePacket: ((b: Buffer) => { id?: number; questions?: Array<{ name: string; type: string }> }) | null = null;

export const DNS_HEADER_BYTES = 12;
export const OPCODE_QUERY = 0;
export const OPCODE_NOTIFY = 4;
export const OPCODE_UPDATE = 5;
export const RCODE_SERVFAIL = 2;
export const RCODE_REFUSED = 5;

/** Why a message failed the header check; 0 means it passed. */
export const HEADER_OK = 0;
export const HEADER_SHORT = 1;
export const HEADER_RESPONSE = 2;
export const HEADER_OPCODE = 3;
export const HEADER_QDCOUNT = 4;
export const HEADER_PROBLEMS = ['ok', 'shorter than a DNS header', 'a response (QR=1)',
	'unsupported opcode', 'QDCOUNT is not 1'] as const;

/** The cheap check of a query's header; see the file comment. */
export function checkQueryHeader(msg: Uint8Array, off = 0, len = msg.length - off): number {
	if (len < DNS_HEADER_BYTES) {
		return HEADER_SHORT;
	}
	const flags = msg[off + 2];
	if ((flags & 0x80) !== 0) {
		return HEADER_RESPONSE;
	}
	const opcode = (flags >> 3) & 0x0f;
	if (opcode !== OPCODE_QUERY && opcode !== OPCODE_NOTIFY && opcode !== OPCODE_UPDATE) {
		return HEADER_OPCODE;
	}
	if (msg[off + 4] !== 0 || msg[off + 5] !== 1) {
		return HEADER_QDCOUNT;
	}
	return HEADER_OK;
}

/**
 * The offset just past the first question (name, type, class), or -1 when
 * it runs off the end, uses compression (nothing precedes it to point at)
 * or breaks the 255-byte name limit.
 */
export function questionEnd(msg: Uint8Array): number {
	let off = DNS_HEADER_BYTES;
	let nameBytes = 0;
	for (;;) {
		if (off >= msg.length) {
			return -1;
		}
		const n = msg[off];
		if (n === 0) {
			off += 1;
			break;
		}
		if (n > 63) {
			return -1;
		}
		nameBytes += n + 1;
		if (nameBytes > 254) {
			return -1;
		}
		off += n + 1;
	}
	off += 4;
	return off <= msg.length ? off : -1;
}

/**
 * An error answer (SERVFAIL, REFUSED) to `query`, or null when its question
 * cannot be echoed.  The caller has checked the header.
 */
export function buildErrorAnswer(query: Uint8Array, rcode: number): Buffer | null {
	const end = questionEnd(query);
	if (end < 0) {
		return null;
	}
	const out = Buffer.allocUnsafe(end);
	out.set(query.subarray(0, end));
	/* QR=1, opcode and RD kept, AA=0, TC=0; RA=0, Z=0, AD=0, CD kept. */
	out[2] = 0x80 | ((query[2]) & 0x79);
	out[3] = ((query[3]) & 0x10) | (rcode & 0x0f);
	out.writeUInt16BE(1, 4);
	out.writeUInt32BE(0, 6);
	out.writeUInt16BE(0, 10);
	return out;
}

/** qname, qtype and id for a trace log line; only called when trace is on. */
export function describeQuery(msg: Uint8Array): { qname: string; qtype: string; id: number } | null {
	try {
		decodePacket ??= (requireLazily('dns-packet') as typeof import('dns-packet')).decode;
		const p = decodePacket(Buffer.from(msg.buffer, msg.byteOffset, msg.byteLength));
		const q = p.questions?.[0];
		return { qname: q?.name ?? '', qtype: String(q?.type ?? ''), id: p.id ?? 0 };
	} catch {
		return null;
	}
}

export interface Cidr {
	text: string;
	net: number;
	mask: number;
}

/** "10.0.0.0/8" (or a bare address, /32); throws a one-line Error. */
export function parseCidr(text: string): Cidr {
	const m = /^([0-9.]+)(?:\/(\d{1,2}))?$/.exec(text.trim());
	const addr = m === null ? -1 : ipv4ToU32(m[1]);
	const bits = m?.[2] === undefined ? 32 : Number(m[2]);
	if (addr < 0 || bits > 32) {
		throw new Error(`"${text}" is not an IPv4 address or CIDR prefix (like 10.0.0.0/8)`);
	}
	const mask = bits === 0 ? 0 : (0xffffffff << (32 - bits)) >>> 0;
	if (((addr & mask) >>> 0) !== addr) {
		throw new Error(`"${text}" has host bits set: did you mean ${u32ToIpv4((addr & mask) >>> 0)}/${bits}?`);
	}
	return { text: text.trim(), net: addr, mask };
}

export class Acl {
	readonly cidrs: readonly Cidr[];

	/** Each entry may hold several prefixes separated by commas. */
	constructor(entries: readonly string[]) {
		this.cidrs = entries.flatMap((e) => e.split(',')).filter((s) => s.trim() !== '').map(parseCidr);
	}

	get open(): boolean {
		return this.cidrs.length === 0;
	}

	allows(addr: number): boolean {
		const list = this.cidrs;
		if (list.length === 0) {
			return true;
		}
		for (let i = 0; i < list.length; i++) {
			const c = list[i];
			if (((addr & c.mask) >>> 0) === c.net) {
				return true;
			}
		}
		return false;
	}
}

/** Query types a --health-query may name. */
export const QTYPES: Readonly<Record<string, number>> = {
	A: 1, NS: 2, CNAME: 5, SOA: 6, PTR: 12, MX: 15, TXT: 16, AAAA: 28, SRV: 33,
};

/**
 * A query of our own (health.ts's probe): one question, RD clear, no EDNS.
 * Null for a name no DNS message can carry (a label over 63 bytes, the
 * whole over 255, an empty label inside).
 */
export function encodeQuestion(name: string, qtype: number, id: number): Buffer | null {
	const labels = name.replace(/\.$/, '').split('.');
	const parts: Buffer[] = [];
	for (const label of labels) {
		const b = Buffer.from(label, 'ascii');
		if (b.length === 0 || b.length > 63) {
			return null;
		}
		parts.push(Buffer.from([b.length]), b);
	}
	const qname = Buffer.concat([...parts, Buffer.from([0])]);
	if (qname.length > 255) {
		return null;
	}
	const msg = Buffer.alloc(DNS_HEADER_BYTES + qname.length + 4);
	msg.writeUInt16BE(id, 0);
	msg.writeUInt16BE(1, 4);
	qname.copy(msg, DNS_HEADER_BYTES);
	msg.writeUInt16BE(qtype, DNS_HEADER_BYTES + qname.length);
	msg.writeUInt16BE(1, DNS_HEADER_BYTES + qname.length + 2);
	return msg;
}
