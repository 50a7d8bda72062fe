/*
 * CACHE MESSAGES
 *
 * The packet cache (packet_cache.ts) keeps backends' answers and replays
 * them to other clients that ask the same question.  This module holds the
 * DNS it needs, as pure functions over bytes, in three steps that run at
 * very different rates:
 *
 *   queryKey()       every UDP query          what question is this? (cache_key.ts)
 *   prepareAnswer()  an answer to a miss      may it be kept, and in what form?
 *   materialize()    every hit                the copy this client gets
 *
 * THE KEY is cache_key.ts's: a query's key, and the size bucket whose limit
 * an answer kept for it must fit.
 *
 * WHAT IS KEPT.  NOERROR with answers; NXDOMAIN and NODATA (NOERROR, no
 * answers) only with an SOA in the authority section, which gives a
 * negative answer its lifetime (RFC 2308).  Not a truncated answer, a
 * failure (SERVFAIL, REFUSED for names outside Binder's domain, any other
 * rcode or extended rcode), a record with TTL 0 (or the top bit set, which
 * RFC 2181 reads as 0), an answer longer than its bucket or than bbal's
 * 1500 bytes, nor anything that does not parse: each has a reason the
 * caller counts (UNCACHEABLE_REASONS).  An entry lives as long as its
 * shortest TTL, a negative one no longer than the SOA's MINIMUM; both
 * capped by the cache's maximum.
 *
 * THE SHUFFLE.  Binder lists a service's members in a new order on every
 * query, and clients rely on it to spread their load: a cache replaying one
 * order for a TTL would send every client to the same member.  So each hit
 * puts every RRset (consecutive records of a section with one owner, type
 * and class) in a fresh random order.  Records cannot simply be moved in
 * the backend's message: mname compresses names, and a pointer elsewhere
 * may point into a record that moves (an additional A record's owner into
 * an SRV target).  So prepareAnswer writes the message again in a form in
 * which any record can move: every name in every record, owners and the
 * names inside rdata (NS, CNAME, SOA, PTR, MX, SRV and their kin), is
 * written in full, except that a name or tail of it that equals a tail of
 * the question's name becomes a pointer into the question, which never
 * moves.  Other rdata is copied (RFC 3597: nobody compresses inside it),
 * and the OPT loses its options, which were the asking client's own.  When
 * that form is longer than the answer may be, the original is kept, not
 * shuffled; the cache counts those.
 *
 * THE HIT.  A PreparedAnswer is that message with the places a hit
 * changes: each record's TTL offset and value, each RRset's record
 * boundaries.  materialize() copies the bytes once, writes the client's id
 * and question name (so the client sees its own letter case), lowers each
 * TTL by the entry's age (or sets a stale answer's), and rewrites each
 * RRset's records in a Fisher-Yates order.  It decodes nothing and
 * allocates only the Buffer it returns.  Measured on the 2-core CI machine
 * while it was busy (so upper bounds): materialize() of a 3-record A answer,
 * 245 ns, of which the Buffer's allocation and copy are 60.
 */

import { MAX_NAME_BYTES } from './cache_key.js';
import { DNS_HEADER_BYTES, OPCODE_QUERY } from './dns.js';

/** bbal's UDP limit: no answer longer than this is kept. */
export const MAX_CACHED_ANSWER_BYTES = 1500;

export const RCODE_NOERROR = 0;
export const RCODE_NXDOMAIN = 3;
export const TYPE_SOA = 6;
export const TYPE_OPT = 41;

/** Why prepareAnswer() will not keep an answer. */
export const UNCACHEABLE_REASONS = [
	'not-response', 'opcode', 'truncated', 'rcode', 'qdcount', 'malformed', 'ttl-zero', 'oversize', 'no-soa',
] as const;
export type Uncacheable = typeof UNCACHEABLE_REASONS[number];

/** What a hit needs, prepared once when the answer is kept. */
export interface PreparedAnswer {
	/** The message in movable form (or the original, when `shuffleable` is false). */
	readonly bytes: Buffer;
	/** How long the entry is fresh: the shortest TTL (or the negative TTL), capped. */
	readonly ttlSecs: number;
	/** Where each record's 32-bit TTL sits in `bytes` (not the OPT's), and what it was. */
	readonly ttlOffsets: Uint16Array;
	readonly ttls: Uint32Array;
	/**
	 * The RRsets of two records or more, one after the other, each as
	 * [index of its first record in ttlOffsets, n, start of record 1, ...,
	 * start of record n, end of record n]: offsets in `bytes`.
	 */
	readonly rrsets: Uint16Array;
	/** False when the movable form did not fit and the original bytes are kept (no shuffle). */
	readonly shuffleable: boolean;
	readonly rcode: number;
	/** NXDOMAIN or NODATA. */
	readonly negative: boolean;
	/** The wire length of the question's name, which starts at offset 12. */
	readonly qnameLength: number;
	/** What it costs in memory, estimated: its arrays and PREPARED_OVERHEAD_BYTES. */
	readonly costBytes: number;
}

/*
 * The JS objects around a prepared answer's one ArrayBuffer: the answer
 * object, the Buffer and three typed-array views, the ArrayBuffer.
 * Measured (see packet_cache.ts's MEMORY) rather than derived.
 */
export const PREPARED_OVERHEAD_BYTES = 420;

const MAX_POINTER_HOPS = 64;
/* The fewest bytes a record takes (root owner, empty rdata): bounds the records an answer can hold. */
const MIN_RR_BYTES = 11;
const MAX_RRS = Math.floor((MAX_CACHED_ANSWER_BYTES - DNS_HEADER_BYTES - 5) / MIN_RR_BYTES);

/* ---- names (prepareAnswer only) ---- */

/*
 * The name last read, in full (uncompressed wire form), and where each of
 * its labels starts; the question's the same.  Module scratch: prepareAnswer
 * runs to its end without yielding.
 */
const nameFlat = Buffer.allocUnsafeSlow(MAX_NAME_BYTES);
const nameLabelAt = new Uint8Array(128);
let nameLength = 0;
let nameLabels = 0;
let nameHops = 0;
const questionFlat = Buffer.allocUnsafeSlow(MAX_NAME_BYTES);
const questionLabelAt = new Uint8Array(128);
let questionLength = 0;
let questionLabels = 0;
/* The previous record's owner, for telling RRsets apart. */
const prevOwnerFlat = Buffer.allocUnsafeSlow(MAX_NAME_BYTES);
let prevOwnerLength = -1;

/*
 * Read the name at msg[off] (pointers followed, each to an earlier offset)
 * into nameFlat; returns the offset just past it where it stands, or -1.
 */
function readName(msg: Buffer, off: number, len: number): number {
	let after = -1;
	let w = 0;
	nameLabels = 0;
	nameHops = 0;
	for (let n = msg[off]; n !== 0; n = msg[off]) {
		/* Any label, or a pointer, takes two bytes at least. */
		if (off + 1 >= len) {
			return -1;
		}
		if ((n & 0xc0) === 0xc0) {
			const target = ((n & 0x3f) << 8) | msg[off + 1];
			if (target >= off || ++nameHops > MAX_POINTER_HOPS) {
				return -1;
			}
			after = after < 0 ? off + 2 : after;
			off = target;
		} else {
			if (n > 63 || w + n + 2 > MAX_NAME_BYTES || off + 1 + n > len) {
				return -1;
			}
			nameLabelAt[nameLabels++] = w;
			msg.copy(nameFlat, w, off, off + 1 + n);
			w += n + 1;
			off += n + 1;
		}
	}
	if (off >= len) {
		return -1;
	}
	nameFlat[w] = 0;
	nameLength = w + 1;
	return after < 0 ? off + 1 : after;
}

function lower(c: number): number {
	return c >= 0x41 && c <= 0x5a ? c | 0x20 : c;
}

/* Two names (or tails) in wire form, equal in ASCII lower case. */
function sameName(a: Buffer, aFrom: number, aEnd: number, b: Buffer, bFrom: number, bEnd: number): boolean {
	let same = aEnd - aFrom === bEnd - bFrom;
	for (let i = 0; same && i < aEnd - aFrom; i++) {
		same = lower(a[aFrom + i]) === lower(b[bFrom + i]);
	}
	return same;
}

const pointer = Buffer.alloc(2);

/*
 * Write nameFlat to the movable form: in full, but its longest tail that
 * equals a tail of the question's name as a pointer into the question
 * (unless `plain`).
 */
function writeName(plain: boolean): void {
	const shift = questionLabels - nameLabels;
	let from = nameLabels;
	for (let i = shift < 0 ? -shift : 0; i < nameLabels && !plain; i++) {
		if (sameName(nameFlat, nameLabelAt[i], nameLength, questionFlat, questionLabelAt[i + shift], questionLength)) {
			from = i;
			break;
		}
	}
	if (from === nameLabels) {
		emit(nameFlat, 0, nameLength);
		return;
	}
	emit(nameFlat, 0, nameLabelAt[from]);
	const at = DNS_HEADER_BYTES + questionLabelAt[from + shift];
	pointer[0] = 0xc0 | (at >> 8);
	pointer[1] = at & 0xff;
	emit(pointer, 0, 2);
}

/*
 * Which types' rdata hold names, and how: fixed bytes before them, the
 * number of names, fixed bytes after them, and whether they must be written
 * in full (`plain`), as before | names << 8 | after << 16 | plain << 24.
 * RFC 1035's types and SRV (which mname compresses anyway) may point into
 * the question; DNAME, RP, AFSDB, RT and KX may not (RFC 3597, 6672).
 * Every other type's rdata is copied.
 */
const NAMES_IN_RDATA: ReadonlyArray<readonly [readonly number[], number]> = [
	[[2, 3, 4, 5, 7, 8, 9, 12], 1 << 8], /* NS MD MF CNAME MB MG MR PTR */
	[[6], 2 << 8 | 20 << 16], /* SOA: mname, rname, then serial refresh retry expire minimum */
	[[14], 2 << 8], /* MINFO */
	[[15], 2 | 1 << 8], /* MX: preference, exchange */
	[[33], 6 | 1 << 8], /* SRV: priority, weight, port, target */
	[[39], 1 << 8 | 1 << 24], /* DNAME */
	[[17], 2 << 8 | 1 << 24], /* RP */
	[[18, 21, 36], 2 | 1 << 8 | 1 << 24], /* AFSDB RT KX */
];
const rdataLayout = new Int32Array(64).fill(-1);
for (const [types, layout] of NAMES_IN_RDATA) {
	for (const type of types) {
		rdataLayout[type] = layout;
	}
}

/* ---- prepareAnswer ---- */

/*
 * Per record (the OPT aside), while preparing: its TTL's offset in the
 * original and in the movable form, its TTL, where it starts and ends in
 * the movable form, and whether it joins the previous record's RRset.
 */
const rrTtlAtOriginal = new Uint16Array(MAX_RRS);
const rrTtlAt = new Uint16Array(MAX_RRS);
const rrTtl = new Uint32Array(MAX_RRS);
const rrStart = new Uint16Array(MAX_RRS);
const rrEnd = new Uint16Array(MAX_RRS);
const rrJoins = new Uint8Array(MAX_RRS);
/* RRsets as they will be stored (see PreparedAnswer.rrsets): at most 3 + 1 per record. */
const setsScratch = new Uint16Array(MAX_RRS * 4);

/* The RRsets of two records or more, into setsScratch; returns their length there. */
function gatherSets(records: number): number {
	let length = 0;
	for (let i = 0, j = 1; i < records; i = j++) {
		while (j < records && rrJoins[j] === 1) {
			j++;
		}
		if (j - i >= 2) {
			setsScratch[length++] = i;
			setsScratch[length++] = j - i;
			setsScratch.set(rrStart.subarray(i, j), length);
			length += j - i;
			setsScratch[length++] = rrEnd[j - 1];
		}
	}
	return length;
}
/*
 * The movable form is written here first (its length is not known until
 * the end): `mw` is where the next byte goes, -1 once the form has passed
 * `movableLimit`, after which nothing more is written.
 */
const movable = Buffer.allocUnsafeSlow(MAX_CACHED_ANSWER_BYTES);
let mw = 0;
let movableLimit = 0;
const ZEROES = Buffer.alloc(2);

function emit(src: Buffer, from: number, to: number): void {
	if (mw >= 0 && mw + to - from <= movableLimit) {
		src.copy(movable, mw, from, to);
		mw += to - from;
	} else {
		mw = -1;
	}
}

/* The reasons read from the header alone, or null. */
function headerProblem(answer: Buffer, limit: number): Uncacheable | null {
	const flags = answer[2];
	const rcode = answer[3] & 0x0f;
	return answer.length < DNS_HEADER_BYTES ? 'malformed' :
		(flags & 0x80) === 0 ? 'not-response' :
		((flags >> 3) & 0x0f) !== OPCODE_QUERY ? 'opcode' :
		(flags & 0x02) !== 0 ? 'truncated' :
		rcode !== RCODE_NOERROR && rcode !== RCODE_NXDOMAIN ? 'rcode' :
		answer.readUInt16BE(4) !== 1 ? 'qdcount' :
		answer.length > limit ? 'oversize' : null;
}

/**
 * Whether a backend's answer may be kept, for a query whose bucket allows
 * `sizeLimit` bytes, and if so in what form (see WHAT IS KEPT and THE
 * SHUFFLE).  Not for the hot path: it parses every name.
 */
export function prepareAnswer(answer: Buffer, sizeLimit: number, maxTtlSecs: number): PreparedAnswer | Uncacheable {
	const len = answer.length;
	movableLimit = Math.min(sizeLimit, MAX_CACHED_ANSWER_BYTES);
	const problem = headerProblem(answer, movableLimit);
	if (problem !== null) {
		return problem;
	}
	const rcode = answer[3] & 0x0f;
	const ancount = answer.readUInt16BE(6);
	const nscount = answer.readUInt16BE(8);
	const records = ancount + nscount + answer.readUInt16BE(10);
	let off = readName(answer, DNS_HEADER_BYTES, len);
	if (off < 0 || nameHops !== 0 || off + 4 > len || records > MAX_RRS) {
		return 'malformed';
	}
	nameFlat.copy(questionFlat, 0, 0, nameLength);
	questionLabelAt.set(nameLabelAt.subarray(0, nameLabels));
	questionLength = nameLength;
	questionLabels = nameLabels;
	off += 4;
	mw = 0;
	emit(answer, 0, off);
	let minTtl = 0x7fffffff;
	let soaMinimum = -1;
	let optSeen = false;
	let optOptions = false;
	let ttlCount = 0;
	let prevType = -1;
	let prevClass = -1;
	let prevSection = -1;
	prevOwnerLength = -1;
	for (let r = 0; r < records; r++) {
		const section = r < ancount ? 0 : r < ancount + nscount ? 1 : 2;
		const recordStart = mw;
		off = readName(answer, off, len);
		if (off < 0 || off + 10 > len) {
			return 'malformed';
		}
		const type = answer.readUInt16BE(off);
		const cls = answer.readUInt16BE(off + 2);
		const ttl = answer.readUInt32BE(off + 4);
		const rdStart = off + 10;
		const rdEnd = rdStart + answer.readUInt16BE(off + 8);
		if (rdEnd > len) {
			return 'malformed';
		}
		if (type === TYPE_OPT) {
			if (section !== 2 || nameLabels !== 0 || optSeen) {
				return 'malformed';
			}
			/* The extended rcode's upper bits (BADVERS and the like). */
			if (answer[off + 4] !== 0) {
				return 'rcode';
			}
			optSeen = true;
			optOptions = rdEnd > rdStart;
			/* The OPT without its options (see THE SHUFFLE). */
			emit(ZEROES, 0, 1);
			emit(answer, off, off + 8);
			emit(ZEROES, 0, 2);
			prevSection = -1;
			off = rdEnd;
			continue;
		}
		if (ttl === 0 || ttl > 0x7fffffff) {
			return 'ttl-zero';
		}
		minTtl = Math.min(minTtl, ttl);
		/* RRsets: a record joins the previous one's when section, type, class and owner agree. */
		rrJoins[ttlCount] = section === prevSection && type === prevType && cls === prevClass &&
			sameName(nameFlat, 0, nameLength, prevOwnerFlat, 0, prevOwnerLength) ? 1 : 0;
		rrStart[ttlCount] = recordStart;
		nameFlat.copy(prevOwnerFlat, 0, 0, nameLength);
		prevOwnerLength = nameLength;
		writeName(false);
		rrTtlAt[ttlCount] = mw + 4;
		rrTtlAtOriginal[ttlCount] = off + 4;
		rrTtl[ttlCount] = ttl;
		emit(answer, off, rdStart);
		const rdataStart = mw;
		/* The rdata: names written again, the rest copied. */
		const layout = type < rdataLayout.length ? rdataLayout[type] : -1;
		if (layout < 0) {
			emit(answer, rdStart, rdEnd);
		} else {
			const after = (layout >> 16) & 0xff;
			let at = rdStart + (layout & 0xff);
			if (at > rdEnd) {
				return 'malformed';
			}
			emit(answer, rdStart, at);
			for (let i = (layout >> 8) & 0xff; i > 0; i--) {
				at = readName(answer, at, rdEnd);
				if (at < 0) {
					return 'malformed';
				}
				writeName((layout >> 24) !== 0);
			}
			if (at + after !== rdEnd) {
				return 'malformed';
			}
			emit(answer, at, rdEnd);
			if (type === TYPE_SOA && section === 1 && soaMinimum < 0) {
				soaMinimum = answer.readUInt32BE(rdEnd - 4);
			}
		}
		if (mw >= 0) {
			movable.writeUInt16BE(mw - rdataStart, rdataStart - 2);
		}
		rrEnd[ttlCount] = mw;
		prevSection = section;
		prevType = type;
		prevClass = cls;
		ttlCount++;
		off = rdEnd;
	}
	if (off !== len) {
		return 'malformed';
	}
	const negative = rcode === RCODE_NXDOMAIN || ancount === 0;
	if (negative && soaMinimum < 0) {
		return 'no-soa';
	}
	const ttl = negative ? Math.min(minTtl, soaMinimum) : minTtl;
	if (ttl === 0) {
		return 'ttl-zero';
	}
	const shuffleable = mw >= 0;
	if (!shuffleable && optOptions) {
		/* The original would hand this client's options to others. */
		return 'oversize';
	}
	return pack(shuffleable ? movable : answer, shuffleable ? mw : len, shuffleable ? rrTtlAt : rrTtlAtOriginal,
		ttlCount, shuffleable ? gatherSets(ttlCount) : 0, {
			ttlSecs: Math.min(ttl, maxTtlSecs), shuffleable, rcode, negative, qnameLength: questionLength,
		});
}

/*
 * The prepared answer in one ArrayBuffer (TTLs, TTL offsets, RRsets, then
 * the message), so that an entry holds one backing store rather than four.
 */
function pack(src: Buffer, length: number, ttlAt: Uint16Array, ttlCount: number, setsLength: number,
	facts: Pick<PreparedAnswer, 'ttlSecs' | 'shuffleable' | 'rcode' | 'negative' | 'qnameLength'>): PreparedAnswer {
	const bytesAt = (ttlCount * 6 + setsLength * 2 + 3) & ~3;
	const store = new ArrayBuffer(bytesAt + length);
	const ttls = new Uint32Array(store, 0, ttlCount);
	const ttlOffsets = new Uint16Array(store, ttlCount * 4, ttlCount);
	const rrsets = new Uint16Array(store, ttlCount * 6, setsLength);
	const bytes = Buffer.from(store, bytesAt, length);
	ttls.set(rrTtl.subarray(0, ttlCount));
	ttlOffsets.set(ttlAt.subarray(0, ttlCount));
	rrsets.set(setsScratch.subarray(0, setsLength));
	src.copy(bytes, 0, 0, length);
	return { bytes, ttlOffsets, ttls, rrsets, ...facts, costBytes: store.byteLength + PREPARED_OVERHEAD_BYTES };
}

/**
 * Whether a prepared answer answers this query's question (name in any
 * case, qtype, qclass): for the caller to check before it keeps an answer
 * under the query's key, so that a backend answering another question
 * cannot put its answer there.
 */
export function answersQuery(p: PreparedAnswer, query: Buffer, qnameLength: number): boolean {
	const end = DNS_HEADER_BYTES + qnameLength;
	return qnameLength === p.qnameLength && query.length >= end + 4 &&
		sameName(p.bytes, DNS_HEADER_BYTES, end, query, DNS_HEADER_BYTES, end) &&
		p.bytes.readUInt32BE(end) === query.readUInt32BE(end);
}

/* ---- the hit ---- */

/* A shuffle's order. */
const order = new Uint16Array(MAX_RRS);

/* By hand: Buffer's writeUInt32BE checks its arguments, and costs 8 ns against 1.5. */
function writeTtl(out: Buffer, at: number, ttl: number): void {
	out[at] = ttl >>> 24;
	out[at + 1] = (ttl >>> 16) & 0xff;
	out[at + 2] = (ttl >>> 8) & 0xff;
	out[at + 3] = ttl & 0xff;
}

/**
 * The answer a hit sends: `p` with the client's id and question name, every
 * TTL lowered by ageSecs (or ttlOverride, for a stale answer), and every
 * RRset in an order drawn with `random` (see THE HIT).
 */
export function materialize(p: PreparedAnswer, query: Buffer, qnameLength: number, ageSecs: number,
	ttlOverride: number | null, random: () => number): Buffer {
	if (qnameLength !== p.qnameLength) {
		throw new Error(`materialize: a ${qnameLength}-byte question name for an answer to a ${p.qnameLength}-byte one`);
	}
	const src = p.bytes;
	const out = Buffer.allocUnsafe(src.length);
	out.set(src);
	out[0] = query[0];
	out[1] = query[1];
	for (let i = DNS_HEADER_BYTES, end = DNS_HEADER_BYTES + qnameLength; i < end; i++) {
		out[i] = query[i];
	}
	const ttlOffsets = p.ttlOffsets;
	const ttls = p.ttls;
	for (let i = 0; i < ttls.length; i++) {
		const left = ttls[i] - ageSecs;
		writeTtl(out, ttlOffsets[i], ttlOverride ?? (left > 0 ? left : 0));
	}
	const sets = p.rrsets;
	for (let s = 0; s < sets.length;) {
		const first = sets[s];
		const n = sets[s + 1];
		const starts = s + 2;
		/* Fisher-Yates, inside out: record i lands at a random place among the first i + 1. */
		for (let i = 0; i < n; i++) {
			const j = Math.floor(random() * (i + 1));
			order[i] = order[j];
			order[j] = i;
		}
		/* Each record, from the prepared bytes, at its new place; its TTL written again there. */
		let w = sets[starts];
		for (let i = 0; i < n; i++) {
			const k = order[i];
			const from = sets[starts + k];
			const to = sets[starts + k + 1];
			const ttlAt = w + ttlOffsets[first + k] - from;
			/* A record is a few dozen bytes: a loop beats a native copy's call. */
			for (let j = from; j < to; j++) {
				out[w++] = src[j];
			}
			const left = ttls[first + k] - ageSecs;
			writeTtl(out, ttlAt, ttlOverride ?? (left > 0 ? left : 0));
		}
		s = starts + n + 1;
	}
	return out;
}
