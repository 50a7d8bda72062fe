/*
 * TAKEOVER WIRE
 *
 * What a takeover says on the control socket (handover.ts serves it, the
 * new bbal's takeover.ts connects to it): the messages, the one parser of
 * the format, and the form a remote travels in.  Pure: no socket here.
 *
 * THE CONVERSATION is JSON lines, each at most MAX_CONTROL_LINE_BYTES:
 *
 *   new -> old  hello       protocol, version, pid, -b, -p, UDP transport, flags
 *   old -> new  ready       + the descriptors (SCM_RIGHTS): UDP (one, or one
 *                           per address for dgram's wildcard), TCP, stats,
 *                           control, metrics; and the old one's flags
 *            or error       why not (protocol, -b/-p, transport, busy ...)
 *   new -> old  remotes     (after connecting to the backends)
 *   old -> new  remotes...  REMOTES_PER_MESSAGE at a time, in address
 *               remotes-end order, with backpressure; the old one serves on
 *   new -> old  handover    (the new one is reading now)
 *   old -> new  remotes...  stops reading UDP and accepting TCP, lets go of
 *               released    the stats, control and metrics listeners; then
 *                           the remotes made or given another backend since
 *                           the table was sent (Remotes.trackChanges())
 *   new -> old  exit        (systemd told; see fd_pass.ts) the old one drains
 *                           and exits 0
 *
 * A REMOTE travels as an array of numbers: its address, its primary's and
 * backup's index in the message's list of backend socket paths (-1 for
 * none), its six counters, and how many seconds ago it was first and last
 * seen (ages, because the two processes' clocks have different origins).
 * The new bbal finds the backends by path: a remote whose backend it does
 * not have is assigned afresh by its next query.  Its counters are those of
 * the moment its message was written: what the old process counts after
 * that is not carried over (one message a turn of the loop, so 100,000
 * remotes take about a second).
 *
 * checkHello() is the running bbal's whole judgement of a newcomer: the
 * same protocol, the same -b and -p (the sockets themselves), the same UDP
 * transport (they lay the sockets out differently).  Other flags may
 * differ; the new bbal logs each difference.
 */

import type { Backend } from './backends.js';
import { ADDR_END, type Remotes, type RestoredRemote } from './remotes.js';
import type { Remote } from './remote.js';

/** The version of this conversation; both sides must speak the same one. */
export const TAKEOVER_PROTOCOL = 1;
/** The longest line either side accepts. */
export const MAX_CONTROL_LINE_BYTES = 1024 * 1024;
/** Remotes per `remotes` message (about 60 KB of JSON). */
export const REMOTES_PER_MESSAGE = 1_000;
/** The environment variable naming the successor's status descriptor (RELOAD). */
export const STATUS_FD_ENV = 'BBAL_TAKEOVER_STATUS_FD';

/** The control socket's path, beside the stats socket's. */
export function controlSocketPath(statsSocket: string): string {
	return `${statsSocket}.control`;
}

/* 'metrics' is the --http port: the name it had when it served /metrics alone, kept so that old and new bbals agree. */
export type SocketKind = 'udp' | 'tcp' | 'stats' | 'control' | 'metrics';
/** One descriptor in `ready`, in the order they travel. */
export interface SocketSpec {
	kind: SocketKind;
	/** The UDP socket's address (dgram's wildcard bind passes one per address). */
	address?: string;
}

export interface Hello {
	type: 'hello';
	protocol: number;
	version: string;
	pid: number;
	bind: string;
	port: number;
	transport: string;
	options: Record<string, unknown>;
}

export interface Ready {
	type: 'ready';
	protocol: number;
	version: string;
	pid: number;
	sockets: SocketSpec[];
	options: Record<string, unknown>;
	remotes: number;
}

export interface SpawnRequest {
	type: 'spawn';
	protocol: number;
	execPath: string;
	execArgv: string[];
	argv: string[];
}

/** A remote on the wire (A REMOTE above). */
export type RemoteRecord = [number, number, number, number, number, number, number, number, number, number, number];

/** What the running bbal is, for checkHello(). */
export interface Running {
	bind: string;
	port: number;
	transport: string;
}

/**
 * Why a new bbal cannot take over from this one, in one line, or null.
 * The listening address and port are the sockets themselves, and the UDP
 * transports lay them out differently (one socket, or one per address).
 */
export function checkHello(h: Hello, me: Running): string | null {
	if (h.protocol !== TAKEOVER_PROTOCOL) {
		return `it speaks takeover protocol ${TAKEOVER_PROTOCOL}, this one ${String(h.protocol)}`;
	}
	if (h.bind !== me.bind || h.port !== me.port) {
		return `it listens on ${me.bind}:${me.port}, this one was asked for ${h.bind}:${h.port}`
			+ ' (-b and -p cannot change in a takeover; restart instead)';
	}
	if (h.transport !== me.transport) {
		return `its UDP transport is ${me.transport}, this one's ${h.transport}`
			+ ' (they lay out their sockets differently: start it with the same BBAL_UDP)';
	}
	return null;
}

/** One remote as it travels; `index` gives a backend's place in the message's list. */
export function encodeRemote(rem: Remote, nowMs: number, index: (be: Backend) => number): RemoteRecord {
	const ago = (ms: number): number => Math.max(0, Math.round((nowMs - ms) / 1000));
	return [
		rem.addr, rem.primary === null ? -1 : index(rem.primary), rem.backup === null ? -1 : index(rem.backup),
		rem.udp, rem.udpDrop, rem.tcp, rem.tcpDrop, rem.udpInvalid, rem.rateLimited,
		ago(rem.firstSeenMs), ago(rem.lastSeenMs),
	];
}

/** A remote from the wire, its backends looked up by path; null if it is not a well-formed record. */
export function decodeRemote(
	rec: unknown, paths: string[], lookup: (path: string) => Backend | null,
): { addr: number; remote: RestoredRemote } | null {
	if (!Array.isArray(rec) || rec.length !== 11 || !rec.every((x) => Number.isSafeInteger(x) && (x as number) >= -1)) {
		return null;
	}
	const r = rec as RemoteRecord;
	if (r[0] < 0 || r[0] >= ADDR_END || r[1] >= paths.length || r[2] >= paths.length) {
		return null;
	}
	const be = (i: number): Backend | null => (i < 0 ? null : lookup(paths[i]));
	return {
		addr: r[0],
		remote: {
			primary: be(r[1]), backup: be(r[2]),
			udp: Math.max(0, r[3]), udpDrop: Math.max(0, r[4]), tcp: Math.max(0, r[5]), tcpDrop: Math.max(0, r[6]),
			udpInvalid: Math.max(0, r[7]), rateLimited: Math.max(0, r[8]),
			firstSeenAgoSecs: Math.max(0, r[9]), lastSeenAgoSecs: Math.max(0, r[10]),
		},
	};
}

/**
 * The one parser of the control socket's format: bytes in, whole lines
 * out, in any split.  A line longer than `max` bytes is an error (thrown):
 * the peer is not a bbal, or a broken one.
 */
export class LineReader {
	private parts: Buffer[] = [];
	private held = 0;

	constructor(private readonly max = MAX_CONTROL_LINE_BYTES) {}

	push(chunk: Buffer): string[] {
		const lines: string[] = [];
		let from = 0;
		for (let nl = chunk.indexOf(10); nl >= 0; nl = chunk.indexOf(10, from)) {
			this.hold(chunk.subarray(from, nl));
			lines.push(Buffer.concat(this.parts).toString('utf8'));
			this.parts = [];
			this.held = 0;
			from = nl + 1;
		}
		this.hold(chunk.subarray(from));
		return lines;
	}

	private hold(b: Buffer): void {
		this.held += b.length;
		if (this.held > this.max) {
			throw new Error(`control line longer than ${this.max} bytes`);
		}
		if (b.length > 0) {
			this.parts.push(Buffer.from(b));
		}
	}
}

/** One message as a line. */
export function line(msg: object): string {
	return `${JSON.stringify(msg)}\n`;
}

/**
 * The `remotes` messages for a table (every remote, in address order), or
 * for the addresses of `only` that it still holds (a delta), at most
 * REMOTES_PER_MESSAGE each; null between messages for the sender to give
 * the loop a turn (a generator the sender drives).  Returns the count.
 */
export function* remoteMessages(
	remotes: Remotes, nowMs: () => number, only: number[] | null = null,
): Generator<{ backends: string[]; remotes: RemoteRecord[] } | null, number> {
	let sent = 0;
	let cursor = 0;
	for (let i = 0; only === null ? cursor !== ADDR_END : i < only.length; i += REMOTES_PER_MESSAGE) {
		let batch: Remote[];
		if (only === null) {
			const s = remotes.slice(cursor, REMOTES_PER_MESSAGE);
			batch = s.remotes;
			cursor = s.next;
		} else {
			batch = only.slice(i, i + REMOTES_PER_MESSAGE).map((a) => remotes.peek(a))
				.filter((r): r is Remote => r !== undefined);
		}
		const paths: string[] = [];
		const index = new Map<Backend, number>();
		const at = (be: Backend): number => {
			let k = index.get(be);
			if (k === undefined) {
				k = paths.push(be.path) - 1;
				index.set(be, k);
			}
			return k;
		};
		const now = nowMs();
		const recs = batch.map((rem) => encodeRemote(rem, now, at));
		sent += recs.length;
		if (recs.length > 0) {
			yield { backends: paths, remotes: recs };
		}
		yield null;
	}
	return sent;
}
