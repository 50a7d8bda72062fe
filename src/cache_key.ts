/*
 * CACHE KEY
 *
 * Which entry of the packet cache (packet_cache.ts) a UDP query asks for:
 * computed for every query the cache sees, so it is written for speed --
 * the question read once, no object made, one string out -- and it says no
 * more than the answer depends on.
 *
 * THE KEY.  Two queries share a key when a backend would give them the same
 * answer: the same question (the name in ASCII lower case, qtype, qclass),
 * RD and CD bits, EDNS or not, DO bit, and size bucket.  The bucket is the
 * largest answer the query may be given over UDP: 512 bytes without EDNS or
 * with an EDNS size under 1232, 1232 up to 4095, 4096 from there.  An
 * answer is kept only when it fits its bucket (prepareAnswer's sizeLimit),
 * so any query of the bucket may be given it.  What Binder's answer does
 * not depend on stays out: the id, the other header bits, every EDNS option
 * (cookies, padding, client subnet: Binder never looks at the client's
 * address).  Only the plain shape is keyed (one question, at most one
 * additional record, an OPT of version 0); the rest is forwarded as before.
 * The key is a string of one-byte characters: the owner (below), the flags,
 * qtype and qclass, then the name's wire form in lower case, made from a
 * scratch Buffer in one native call (latin1Slice: 55 ns for a 35-byte key,
 * against 80 for String.fromCharCode over a reused array); the name's
 * length and the bucket's limit are left in `lastQnameLength` and
 * `lastSizeLimit`, so a query costs no object but its key.  Measured on a
 * busy 2-core machine (an upper bound): about 90 ns for a 25-byte name with
 * an OPT.
 *
 * OWNERS.  The key's first two bytes are its owner, the backend whose
 * answers it files (the caller's choice: udp_cache.ts passes the backend's
 * id), so each backend's answers are kept apart, as stickiness wants;
 * keyFor() gives the same question's key under another owner, for the
 * rare stale answer looked for under every backend.
 */

import { DNS_HEADER_BYTES } from './dns.js';

/** The longest name, in wire form. */
export const MAX_NAME_BYTES = 255;
/** The size buckets' limits (see THE KEY). */
export const SIZE_LIMIT_PLAIN = 512;
export const SIZE_LIMIT_EDNS_MIN = 1232;
export const SIZE_LIMIT_EDNS_LARGE = 4096;
/* The OPT pseudo-record's type. */
const TYPE_OPT = 41;

/*
 * The key's first two bytes are its owner (the backend's id, big-endian),
 * the third RD, CD, EDNS, DO, then the bucket in bits 4-5; bytes 3-6 are
 * qtype and qclass, then the name.  The owner is written in the scratch
 * with the rest, so a query's key is one string made in one call.
 */
const KEY_RD = 0x01;
const KEY_CD = 0x02;
const KEY_EDNS = 0x04;
const KEY_DO = 0x08;
const KEY_BUCKET_1232 = 0x10;
const KEY_BUCKET_4096 = 0x20;
const KEY_FLAGS_AT = 2;
const KEY_HEAD_BYTES = 7;

/*
 * Buffer's latin1Slice is the native call under toString('latin1') without
 * its argument checks and encoding switch: 55 ns against 65 for a 35-byte
 * key, and 80 for String.fromCharCode over a reused array.  It is not in
 * @types/node, hence the cast.
 */
const keyScratch = Buffer.allocUnsafeSlow(KEY_HEAD_BYTES + MAX_NAME_BYTES) as Buffer & {
	latin1Slice(start: number, end: number): string;
};

/** The last key's question name length (wire form, from offset 12) and its bucket's limit. */
export let lastQnameLength = 0;
export let lastSizeLimit = SIZE_LIMIT_PLAIN;

/**
 * The cache key of the query in msg[0, len) for `owner` (a backend's id,
 * 0-65535), or null when the query is not of the shape the cache keeps
 * (see THE KEY); also sets lastQnameLength and lastSizeLimit.
 */
export function queryKey(msg: Buffer, len: number, owner = 0): string | null {
	/* A header, the root name and qtype/qclass at least. */
	if (len < DNS_HEADER_BYTES + 5 || len > msg.length) {
		return null;
	}
	/* QR = 0 and opcode QUERY; QDCOUNT 1, ANCOUNT 0, NSCOUNT 0, ARCOUNT 0 or 1. */
	if ((msg[2] & 0xf8) !== 0 || msg[4] !== 0 || msg[5] !== 1 || msg[6] !== 0 || msg[7] !== 0 ||
		msg[8] !== 0 || msg[9] !== 0 || msg[10] !== 0 || msg[11] > 1) {
		return null;
	}
	const k = keyScratch;
	let off = DNS_HEADER_BYTES;
	let w = KEY_HEAD_BYTES;
	for (;;) {
		const n = msg[off];
		k[w++] = n;
		if (n === 0) {
			break;
		}
		/* A label type other than plain (a pointer has nothing before it to point at). */
		if (n > 63) {
			return null;
		}
		const end = off + 1 + n;
		/* Room for the root label after this one, within 255 bytes and within the message. */
		if (end - DNS_HEADER_BYTES >= MAX_NAME_BYTES || end >= len) {
			return null;
		}
		for (let i = off + 1; i < end; i++) {
			const c = msg[i];
			k[w++] = c >= 0x41 && c <= 0x5a ? c | 0x20 : c;
		}
		off = end;
	}
	off++;
	const qnameLength = off - DNS_HEADER_BYTES;
	if (off + 4 > len) {
		return null;
	}
	k[0] = owner >>> 8;
	k[1] = owner & 0xff;
	k[3] = msg[off];
	k[4] = msg[off + 1];
	k[5] = msg[off + 2];
	k[6] = msg[off + 3];
	off += 4;
	let flags = ((msg[2] & 0x01) !== 0 ? KEY_RD : 0) | ((msg[3] & 0x10) !== 0 ? KEY_CD : 0);
	let limit = SIZE_LIMIT_PLAIN;
	if (msg[11] === 1) {
		/* The OPT: root owner, type 41, class the UDP size, TTL (extended rcode, version, DO), rdlength. */
		if (off + 11 > len || msg[off] !== 0 || msg[off + 1] !== 0 || msg[off + 2] !== TYPE_OPT || msg[off + 6] !== 0 ||
			off + 11 + ((msg[off + 9] << 8) | msg[off + 10]) !== len) {
			return null;
		}
		const size = (msg[off + 3] << 8) | msg[off + 4];
		flags |= KEY_EDNS | ((msg[off + 7] & 0x80) !== 0 ? KEY_DO : 0);
		limit = size >= SIZE_LIMIT_EDNS_LARGE ? SIZE_LIMIT_EDNS_LARGE : size >= SIZE_LIMIT_EDNS_MIN ? SIZE_LIMIT_EDNS_MIN : limit;
		flags |= limit === SIZE_LIMIT_EDNS_LARGE ? KEY_BUCKET_4096 : limit === SIZE_LIMIT_EDNS_MIN ? KEY_BUCKET_1232 : 0;
	} else if (off !== len) {
		return null;
	}
	k[KEY_FLAGS_AT] = flags;
	lastQnameLength = qnameLength;
	lastSizeLimit = limit;
	return k.latin1Slice(0, w);
}

/** The same key for another owner (a stale answer looked for under every backend). */
export function keyFor(key: string, owner: number): string {
	return String.fromCharCode(owner >>> 8, owner & 0xff) + key.slice(2);
}
