/*
 * UDP PROXY
 *
 * Most DNS arrives as UDP.  This module owns the one UDP socket bbal listens
 * on and moves datagrams between it and the backends:
 *
 *   datagram in -> ACL -> remote (by source address) -> size check
 *               -> DNS header check -> per-remote rate limit -> its backend
 *               -> INBOUND_UDP frame queued on that backend's control session
 *   OUTBOUND_UDP frame from a backend -> datagram out, from the DNS port
 *
 * Each step that refuses a datagram counts it, on the remote where one
 * exists and here.  The ACL comes first so that a stranger creates no state
 * at all.  When no backend is ok the query is answered SERVFAIL at once
 * (dns.ts; at most SYNTH_ANSWERS_PER_SEC per remote), unless the operator
 * chose --no-backend=drop; a query over --max-qps-per-remote gets REFUSED
 * (or is dropped, with --rate-limit-action=drop) under the same per-remote
 * limit on synthesized answers.
 *
 * It keeps no state per query: the backend's answer carries the destination
 * address and port, so an answer needs no lookup at all on its way out.
 *
 * This is the hot path, so it is written to allocate nothing per datagram
 * beyond what Node itself does: the handlers are bound once, the remote is a
 * hash lookup, the frame is written straight into the backend's outgoing
 * buffer, and a log object is built only when a line will really be written.
 *
 * Conditions that repeat per datagram (oversized, no backend ok, session
 * stuck) are counted every time, on the remote and here, and logged at most
 * once per 5 seconds per kind, with the number of occurrences that were not
 * logged.  A flood of bad datagrams must not turn into a flood of log lines.
 *
 * What it does not do: decode DNS (that belongs to the backends), or hold a
 * datagram for a backend that cannot take it (a stuck session drops; see
 * backends.ts for why).
 */

import dgram from 'node:dgram';
import type { Logger } from 'pino';
import type { Backend } from './backends.js';
import {
	Acl, buildErrorAnswer, checkQueryHeader, describeQuery, HEADER_OK, HEADER_PROBLEMS, RCODE_REFUSED,
	RCODE_SERVFAIL,
} from './dns.js';
import { ipv4ToU32, MAX_UDP_PAYLOAD_BYTES, u32ToIpv4 } from './protocol.js';
import type { Remote, Remotes } from './remotes.js';
import { LogGate, type TimeoutWheel } from './timeouts.js';

/* Room for bursts while the event loop is busy elsewhere. */
const RECV_BUFFER_BYTES = 4 * 1024 * 1024;
const SEND_BUFFER_BYTES = 4 * 1024 * 1024;
/* Slots in the direct-mapped cache of destination address texts. */
const ADDR_CACHE_MASK = 4095;
/* Synthesized answers (SERVFAIL, REFUSED) per remote per second. */
export const SYNTH_ANSWERS_PER_SEC = 10;

export type NoBackendAction = 'servfail' | 'drop';
export type RateLimitAction = 'refuse' | 'drop';

export interface UdpEdgeOptions {
	/** Who may query; empty allows everyone. */
	acl?: Acl;
	noBackend?: NoBackendAction;
	/** Queries per second per remote; 0 means no limit. */
	maxQpsPerRemote?: number;
	rateLimitAction?: RateLimitAction;
}

export interface UdpProxyStats {
	/** Datagrams received from remotes. */
	received: number;
	/** Datagrams handed to a backend. */
	forwarded: number;
	/** Dropped: over MAX_UDP_PAYLOAD_BYTES. */
	oversize: number;
	/** Dropped: no backend was ok. */
	noBackend: number;
	/** Dropped: the chosen backend's session was stuck. */
	stuck: number;
	/** Answers sent back to remotes. */
	sent: number;
	/** Answers that could not be sent (socket error, bad address or port). */
	sendErrors: number;
	/** Dropped: failed the DNS header check. */
	invalid: number;
	/** Dropped: source outside --allow. */
	aclDropped: number;
	/** Over --max-qps-per-remote (answered REFUSED or dropped). */
	rateLimited: number;
	/** SERVFAIL answers bbal sent itself (no backend ok). */
	servfail: number;
	/** REFUSED answers bbal sent itself (rate limit). */
	refused: number;
}

/*
 * dgram resolves every destination with dns.lookup() before sending, which
 * for an address literal still costs a regex and a deferred callback per
 * answer.  Every address bbal sends to is a dotted quad it built itself, so
 * the lookup hands it straight back.
 */
function literalLookup(address: string, _family: unknown, callback: (err: Error | null, address: string, family: number) => void): void {
	callback(null, address, 4);
}

export class UdpProxy {
	readonly stats: UdpProxyStats = {
		received: 0, forwarded: 0, oversize: 0, noBackend: 0, stuck: 0, sent: 0, sendErrors: 0,
		invalid: 0, aclDropped: 0, rateLimited: 0, servfail: 0, refused: 0,
	};
	private readonly socket: dgram.Socket;
	private readonly remotes: Remotes;
	private readonly log: Logger;
	private readonly oversizeGate: LogGate;
	private readonly noBackendGate: LogGate;
	private readonly stuckGate: LogGate;
	private readonly sendErrorGate: LogGate;
	private readonly invalidGate: LogGate;
	private readonly aclGate: LogGate;
	private readonly rateGate: LogGate;
	private readonly acl: Acl | null;
	private readonly servfailOnNoBackend: boolean;
	private readonly maxQps: number;
	private readonly refuseOverRate: boolean;
	/* Read once: the level is fixed for the life of the process. */
	private readonly trace: boolean;
	private state: 'new' | 'listening' | 'closed' = 'new';
	private readonly addrCacheKey = new Uint32Array(ADDR_CACHE_MASK + 1);
	private readonly addrCacheText: Array<string | undefined> = new Array<string | undefined>(ADDR_CACHE_MASK + 1);

	constructor(opts: { remotes: Remotes; log: Logger; wheel: TimeoutWheel } & UdpEdgeOptions) {
		this.remotes = opts.remotes;
		this.log = opts.log;
		this.acl = opts.acl === undefined || opts.acl.open ? null : opts.acl;
		this.servfailOnNoBackend = (opts.noBackend ?? 'servfail') === 'servfail';
		this.maxQps = opts.maxQpsPerRemote ?? 0;
		this.refuseOverRate = (opts.rateLimitAction ?? 'refuse') === 'refuse';
		this.trace = opts.log.isLevelEnabled('trace');
		this.invalidGate = new LogGate(opts.wheel);
		this.aclGate = new LogGate(opts.wheel);
		this.rateGate = new LogGate(opts.wheel);
		this.oversizeGate = new LogGate(opts.wheel);
		this.noBackendGate = new LogGate(opts.wheel);
		this.stuckGate = new LogGate(opts.wheel);
		this.sendErrorGate = new LogGate(opts.wheel);
		this.socket = dgram.createSocket({ type: 'udp4', reuseAddr: true, lookup: literalLookup });
	}

	/** Bind; rejects with the socket error (EADDRINUSE, EACCES ...). */
	listen(address: string, port: number): Promise<void> {
		return new Promise((resolve, reject) => {
			const onError = (err: Error): void => {
				this.socket.close();
				this.state = 'closed';
				reject(err);
			};
			this.socket.once('error', onError);
			this.socket.bind({ address, port, exclusive: true }, () => {
				this.socket.removeListener('error', onError);
				this.socket.on('error', this.socketOnError);
				this.socket.on('message', this.socketOnMessage);
				try {
					this.socket.setRecvBufferSize(RECV_BUFFER_BYTES);
					this.socket.setSendBufferSize(SEND_BUFFER_BYTES);
				} catch (err) {
					this.log.debug({ err }, 'could not enlarge UDP socket buffers');
				}
				this.state = 'listening';
				resolve();
			});
		});
	}

	/** An answer from a backend: send it to the remote it names. */
	sendOutbound(addr: number, port: number, payload: Buffer, from: Backend): void {
		if (this.state !== 'listening') {
			return;
		}
		/* dgram wants the address as text: keep the texts of recent ones. */
		const slot = addr & ADDR_CACHE_MASK;
		let ip: string;
		if (this.addrCacheKey[slot] === addr && this.addrCacheText[slot] !== undefined) {
			ip = this.addrCacheText[slot] as string;
		} else {
			ip = u32ToIpv4(addr);
			this.addrCacheKey[slot] = addr;
			this.addrCacheText[slot] = ip;
		}
		try {
			this.socket.send(payload, port, ip);
			this.stats.sent++;
		} catch (err) {
			/* A port of 0 or over 65535 throws at once. */
			this.stats.sendErrors++;
			if (this.sendErrorGate.open() >= 0) {
				from.log.warn({ err, dest_ip: u32ToIpv4(addr), dest_port: port }, 'outbound UDP packet error');
			}
		}
	}

	private readonly socketOnMessage = (msg: Buffer, rinfo: dgram.RemoteInfo): void => {
		this.stats.received++;
		const addr = ipv4ToU32(rinfo.address);
		if (addr < 0) {
			return;
		}
		if (this.acl !== null && !this.acl.allows(addr)) {
			this.stats.aclDropped++;
			const skipped = this.aclGate.open();
			if (skipped >= 0) {
				this.log.warn({ remote_ip: rinfo.address, not_logged: skipped }, 'query from outside --allow (dropped)');
			}
			return;
		}
		const rem = this.remotes.lookup(addr);
		if (msg.length > MAX_UDP_PAYLOAD_BYTES) {
			/*
			 * Resolvers have no reason to send a query this large; it can
			 * only be reassembled fragments or junk, and the protocol cannot
			 * carry it anyway.
			 */
			rem.stats.udpDrop++;
			this.stats.oversize++;
			const skipped = this.oversizeGate.open();
			if (skipped >= 0) {
				rem.log.warn({ len: msg.length, max: MAX_UDP_PAYLOAD_BYTES, not_logged: skipped },
					'dropping oversized UDP packet');
			}
			return;
		}
		const problem = checkQueryHeader(msg);
		if (problem !== HEADER_OK) {
			rem.stats.udpInvalid++;
			this.stats.invalid++;
			const skipped = this.invalidGate.open();
			if (skipped >= 0) {
				rem.log.warn({ len: msg.length, problem: HEADER_PROBLEMS[problem], not_logged: skipped },
					'dropping UDP packet that is not a DNS query');
			}
			return;
		}
		if (this.maxQps > 0 && !rem.admitQuery(this.maxQps)) {
			rem.stats.rateLimited++;
			this.stats.rateLimited++;
			const skipped = this.rateGate.open();
			if (skipped >= 0) {
				rem.log.warn({ max_qps: this.maxQps, not_logged: skipped }, 'remote over its query rate limit');
			}
			if (this.refuseOverRate && this.answer(rem, msg, rinfo, RCODE_REFUSED)) {
				this.stats.refused++;
			}
			return;
		}
		const be = rem.backend();
		if (be === null) {
			rem.stats.udpDrop++;
			this.stats.noBackend++;
			const skipped = this.noBackendGate.open();
			if (skipped >= 0) {
				rem.log.warn({ not_logged: skipped, answer: this.servfailOnNoBackend ? 'SERVFAIL' : 'none' },
					'no backend for remote');
			}
			if (this.servfailOnNoBackend && this.answer(rem, msg, rinfo, RCODE_SERVFAIL)) {
				this.stats.servfail++;
			}
			return;
		}
		if (!be.sendUdp(addr, rinfo.port, msg)) {
			rem.stats.udpDrop++;
			this.stats.stuck++;
			const skipped = this.stuckGate.open();
			if (skipped >= 0) {
				be.log.warn({ remote_ip: rinfo.address, not_logged: skipped },
					'stuck backend write queue (dropping UDP packet)');
			}
			return;
		}
		rem.stats.udp++;
		this.stats.forwarded++;
		if (this.trace) {
			rem.log.trace({ be_id: be.id, remote_port: rinfo.port, query: describeQuery(msg) }, 'forwarded UDP query');
		}
	};

	/*
	 * Answer a query from bbal itself (SERVFAIL, REFUSED), within the
	 * remote's allowance of synthesized answers.  True when one was sent.
	 */
	private answer(rem: Remote, msg: Buffer, rinfo: dgram.RemoteInfo, rcode: number): boolean {
		if (!rem.admitSynthesized(SYNTH_ANSWERS_PER_SEC)) {
			return false;
		}
		const out = buildErrorAnswer(msg, rcode);
		if (out === null) {
			return false;
		}
		if (this.trace) {
			rem.log.trace({ rcode, remote_port: rinfo.port, query: describeQuery(msg) }, 'answered UDP query itself');
		}
		this.socket.send(out, rinfo.port, rinfo.address);
		return true;
	}

	private readonly socketOnError = (err: Error): void => {
		this.stats.sendErrors++;
		if (this.sendErrorGate.open() >= 0) {
			this.log.warn({ err }, 'UDP socket error');
		}
	};

	close(): Promise<void> {
		if (this.state !== 'listening') {
			this.state = 'closed';
			return Promise.resolve();
		}
		this.state = 'closed';
		return new Promise((resolve) => this.socket.close(() => resolve()));
	}
}
