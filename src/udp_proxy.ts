/*
 * UDP PROXY
 *
 * Most DNS arrives as UDP.  This module owns the one UDP socket bbal listens
 * on and moves datagrams between it and the backends:
 *
 *   datagram in -> ACL -> size check -> DNS header check
 *               -> remote (by source address) -> per-remote rate limit
 *               -> its backend -> INBOUND_UDP frame queued on that
 *               backend's control session
 *   OUTBOUND_UDP frame from a backend -> datagram out, from the DNS port
 *
 * Each step that refuses a datagram counts it, on the remote where one
 * exists and here.  The ACL, the size and the header checks come before the
 * remote is looked up, so that neither a stranger nor junk creates state:
 * a remote costs a place in a table capped at --max-remotes, and making one
 * for a 3-byte datagram from a spoofed source would evict a real host to
 * make room.  Such a datagram is counted here (oversize, invalid) and, when
 * its source is already held, on that remote too (udpDrop, udpInvalid),
 * without marking the remote seen: junk keeps no remote alive.  When no
 * backend is ok the query is answered SERVFAIL at once
 * (dns.ts; at most SYNTH_ANSWERS_PER_SEC per remote), unless the operator
 * chose --no-backend=drop; a query over --max-qps-per-remote gets REFUSED
 * (or is dropped, with --rate-limit-action=drop) under the same per-remote
 * limit on synthesized answers.
 *
 * ANSWERS.  The backend's answer carries the destination address and port.
 * Each query forwarded is recorded in its backend's in-flight table and
 * each answer matched against it (answers.ts): that is how bbal counts how
 * each backend answers and judges its health (health.ts), and it decides
 * which answers go out at all -- one a backend sends to an address, port
 * and id nobody asked it about is dropped (`unsolicited`).  An answer to
 * 0.0.0.0 port 0 is a health probe's and is handed to the monitor, never
 * sent.  With --no-answer-accounting none of this happens: every answer
 * goes out as it comes.  One more lookup: the address to answer from.  Bound to 0.0.0.0, bbal must
 * answer from the address the query was sent to (a client discards an
 * answer from any other; see WILDCARD BINDS in udp_transport.ts), and the
 * backend protocol carries only the client's address and port, not ours.
 * So each remote keeps the local address it last queried (Remote.localAddr,
 * set on every query that reaches a remote), and an answer on its way out
 * looks its remote up for it.  That costs one field per remote and one map
 * lookup per answer, needs no table, timer or bound of its own (the remotes
 * table has --max-remotes and expiry), and is right whenever a client host
 * talks to one of our addresses at a time, which is what a host does when
 * each of its networks reaches us at our address on that network.  It is
 * wrong in one case: a client that asks two of our addresses at once gets
 * the answer to the first from the second if its second query came in
 * before the first answer went out, and retries it.  An answer whose
 * remote is gone (evicted, expired) goes with no local address: from the
 * kernel's choice (native) or not at all (dgram, counted in sendErrors).
 *
 * This is the hot path, so it is written to allocate nothing per datagram
 * beyond what the transport itself does: the handlers are bound once, the
 * source arrives as a u32 (no address text is parsed or built unless a line
 * is logged), the remote is a hash lookup, the frame is written straight
 * into the backend's outgoing buffer, and a log object is built only when a
 * line will really be written.  The socket itself is a UdpTransport
 * (udp_transport.ts), handed in by whoever builds the proxy: the balancer
 * passes createUdpTransport()'s (the native recvmmsg/sendmmsg batches when
 * the addon is built, Node's dgram otherwise), a test may pass a fake that
 * it feeds datagrams by hand.  From then on the proxy owns it: listen()
 * binds it, close() closes it.  Either way the datagram handed over is a
 * view of a buffer that is reused, so nothing here keeps it past the call:
 * the backend copies it into its frame, a synthesized answer is a new buffer.
 *
 * Conditions that repeat per datagram (outside --allow, oversized, not DNS,
 * over the rate, no backend ok, session stuck, a failed send) are counted
 * every time, on the remote and here, and each is logged through a GatedLog
 * of its own (log.ts): at most once per 5 seconds per kind, with the number
 * of occurrences that were not logged.  A flood of bad datagrams must not
 * turn into a flood of log lines.  Their fields are built by a function
 * that runs only when a line is written; the remote's address is logged as
 * a field rather than through the remote's child logger, which would make
 * a logger for every remote that merely hit a condition.
 *
 * THE CACHE.  With --cache-size, a query whose backend has a fresh answer
 * for it is answered here (udp_cache.ts says when, packet_cache.ts keeps
 * them); a miss is forwarded with a tag that files its answer; with
 * --serve-stale, a query no backend can answer may get an expired one in
 * place of SERVFAIL.  Without it none of this runs: one null test a query.
 *
 * What it does not do: decode DNS (that belongs to the backends and the
 * cache's own module), or hold a
 * datagram for a backend that cannot take it (a stuck session drops; see
 * backend.ts for why).
 */

import type { Logger } from 'pino';
import type { Backend } from './backends.js';
import {
	Acl, buildErrorAnswer, checkQueryHeader, describeQuery, HEADER_OK, HEADER_PROBLEMS, RCODE_REFUSED,
	RCODE_SERVFAIL,
} from './dns.js';
import { MAX_UDP_PAYLOAD_BYTES, u32ToIpv4 } from './protocol.js';
import type { Remote, Remotes } from './remotes.js';
import { GatedLog } from './log.js';
import { ANSWER_DROP } from './answers.js';
import type { HealthMonitor } from './health.js';
import { type Clock, monotonicClock, type TimeoutWheel } from './timeouts.js';
import { type CacheTag, UdpCache, type UdpCacheOptions } from './udp_cache.js';
import type { PassedUdpSocket, UdpTransport, UdpTransportError } from './udp_transport.js';

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
	/** Errors reading the socket (a recvmsg failure, a poll error the native transport recovered from). */
	receiveErrors: number;
	/** Answers that could not be sent (socket error, bad address or port). */
	sendErrors: number;
	/**
	 * Of sendErrors, answers dropped because the socket could take no more:
	 * the kernel's send buffer full (native) or dgram's send queue at its cap.
	 */
	sendQueueFull: number;
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
	/** Answers dropped: they matched no query bbal forwarded (answers.ts: WHICH ANSWERS GO OUT). */
	unsolicited: number;
	/** Answers to health probes, taken by bbal (health.ts), never sent. */
	probeAnswers: number;
}

export interface UdpProxyOptions extends UdpEdgeOptions {
	remotes: Remotes;
	log: Logger;
	wheel: TimeoutWheel;
	/** The socket, not yet bound; the proxy binds it in listen() and closes it in close(). */
	transport: UdpTransport;
	/**
	 * The socket failed for good (err.fatal): it will never deliver another
	 * query.  main exits so that the service manager restarts bbal; by
	 * default the error is only logged.
	 */
	onFatal?: (err: UdpTransportError) => void;
	/** Probes and answer accounting (health.ts); none in tests that need neither. */
	health?: HealthMonitor | null;
	/** False: --no-answer-accounting (answers are not matched; probe answers are still taken). */
	accounting?: boolean;
	/** The clock answer latencies are measured with (the balancer's). */
	clock?: Clock;
	/** The packet cache and its settings (udp_cache.ts); none without --cache-size. */
	cache?: Omit<UdpCacheOptions, 'send' | 'clock'> | null;
}

export class UdpProxy {
	readonly stats: UdpProxyStats = {
		received: 0, forwarded: 0, oversize: 0, noBackend: 0, stuck: 0, sent: 0, receiveErrors: 0, sendErrors: 0,
		sendQueueFull: 0, invalid: 0, aclDropped: 0, rateLimited: 0, servfail: 0, refused: 0, unsolicited: 0, probeAnswers: 0,
	};
	private readonly transport: UdpTransport;
	private readonly remotes: Remotes;
	private readonly log: Logger;
	private readonly aclLog: GatedLog;
	private readonly oversizeLog: GatedLog;
	private readonly invalidLog: GatedLog;
	private readonly rateLog: GatedLog;
	private readonly noBackendLog: GatedLog;
	private readonly stuckLog: GatedLog;
	private readonly outboundErrorLog: GatedLog;
	private readonly socketErrorLog: GatedLog;
	private readonly acl: Acl | null;
	private readonly servfailOnNoBackend: boolean;
	private readonly maxQps: number;
	private readonly refuseOverRate: boolean;
	private readonly onFatal: (err: UdpTransportError) => void;
	private readonly health: HealthMonitor | null;
	private readonly accounting: boolean;
	private readonly clock: Clock;
	private readonly unsolicitedLog: GatedLog;
	/** The packet cache's front, null without --cache-size. */
	readonly cache: UdpCache | null;
	/* Bound to 0.0.0.0: answers go from the address their query was sent to. */
	private wildcard = false;
	/* Read once: the level is fixed for the life of the process. */
	private readonly trace: boolean;
	private state: 'new' | 'listening' | 'sending only' | 'closed' = 'new';

	constructor(opts: UdpProxyOptions) {
		this.remotes = opts.remotes;
		this.log = opts.log;
		this.acl = opts.acl === undefined || opts.acl.open ? null : opts.acl;
		this.servfailOnNoBackend = (opts.noBackend ?? 'servfail') === 'servfail';
		this.maxQps = opts.maxQpsPerRemote ?? 0;
		this.refuseOverRate = (opts.rateLimitAction ?? 'refuse') === 'refuse';
		this.trace = opts.log.isLevelEnabled('trace');
		const w = opts.wheel;
		this.aclLog = new GatedLog(w, 'warn', 'query from outside --allow (dropped)');
		this.oversizeLog = new GatedLog(w, 'warn', 'dropping oversized UDP packet');
		this.invalidLog = new GatedLog(w, 'warn', 'dropping UDP packet that is not a DNS query');
		this.rateLog = new GatedLog(w, 'warn', 'remote over its query rate limit');
		this.noBackendLog = new GatedLog(w, 'warn', 'no backend for remote');
		this.stuckLog = new GatedLog(w, 'warn', 'stuck backend write queue (dropping UDP packet)');
		this.outboundErrorLog = new GatedLog(w, 'warn', 'outbound UDP packet error');
		this.socketErrorLog = new GatedLog(w, 'warn', 'UDP socket error');
		this.unsolicitedLog = new GatedLog(w, 'warn', 'answer from backend matches no query (dropped)');
		this.transport = opts.transport;
		this.health = opts.health ?? null;
		this.accounting = this.health !== null && opts.accounting !== false;
		this.clock = opts.clock ?? monotonicClock;
		const clock = this.clock;
		this.cache = opts.cache ? new UdpCache({
			...opts.cache, clock, send: (payload, addr, port) => this.sendAnswer(payload, addr, port, null),
		}) : null;
		this.onFatal = opts.onFatal ?? ((err) => this.log.fatal({ err }, 'UDP socket failed'));
	}

	/**
	 * Bind; rejects with the socket error (EADDRINUSE, EACCES ...).  Given
	 * `passed` (a takeover's), start reading those sockets instead.
	 */
	async listen(address: string, port: number, passed?: PassedUdpSocket[]): Promise<void> {
		/* Handlers first: no datagram or error may arrive before them. */
		this.transport.onDatagram = this.socketOnMessage;
		this.transport.onError = this.socketOnError;
		try {
			await (passed === undefined ? this.transport.bind(address, port) : this.transport.adopt(address, passed));
		} catch (err) {
			this.state = 'closed';
			throw err;
		}
		this.state = 'listening';
		this.wildcard = address === '0.0.0.0';
		this.log.debug({ udp_transport: this.transport.kind }, 'UDP socket bound');
	}

	/** native or dgram: a takeover needs the same on both sides (handover.ts). */
	get transportKind(): string {
		return this.transport.kind;
	}

	/** The bound sockets, for a takeover to pass on. */
	sockets(): PassedUdpSocket[] {
		return this.transport.sockets();
	}

	/**
	 * A takeover has passed the sockets on: read no more queries, but
	 * still send the answers to those already forwarded, until close().
	 */
	stopReading(): void {
		if (this.state === 'listening') {
			this.state = 'sending only';
			this.transport.stopReading();
		}
	}

	/*
	 * Bound to 0.0.0.0 through dgram, one socket per host address: follow
	 * the host's addresses (the balancer calls this with each rescan).
	 */
	async followAddresses(): Promise<void> {
		if (this.state !== 'listening' || this.transport.followAddresses === undefined) {
			return;
		}
		let changes;
		try {
			changes = await this.transport.followAddresses();
		} catch (err) {
			this.socketErrorLog.report(this.log, { err });
			return;
		}
		if (changes === null) {
			return;
		}
		for (const address of changes.added) {
			this.log.info({ address }, 'UDP listening on a new address');
		}
		for (const address of changes.removed) {
			this.log.info({ address }, 'UDP address gone (socket closed)');
		}
		for (const { address, err } of changes.failed) {
			this.log.warn({ address, err }, 'cannot listen on a new address (tried again at each rescan)');
		}
	}

	/** An answer from a backend: send it to the remote it names, from the address it queried. */
	sendOutbound(addr: number, port: number, payload: Buffer, from: Backend): void {
		if (this.state !== 'listening' && this.state !== 'sending only') {
			return;
		}
		if (addr === 0 && port === 0 && this.health !== null) {
			this.stats.probeAnswers++;
			this.health.probeAnswer(from, payload, this.clock());
			return;
		}
		if (this.accounting) {
			/* A payload too short to carry an id and an rcode matches nothing. */
			const book = from.health.book;
			const now = this.clock();
			const verdict = payload.length < 4 ? book.nothingAsked()
				: book.answer(addr, port, payload.readUInt16BE(0), payload[3] & 0x0f, now);
			if (verdict === ANSWER_DROP) {
				this.stats.unsolicited++;
				this.unsolicitedLog.report(from.log, () => ({ dest_ip: u32ToIpv4(addr), dest_port: port, len: payload.length }));
				return;
			}
			const tag = book.matchedTag as CacheTag | undefined;
			if (tag !== undefined && this.cache !== null && this.cache.answered(from, tag, payload, addr, port, now)) {
				return;
			}
		}
		this.sendAnswer(payload, addr, port, from);
	}

	/** Send an answer to addr:port from the address that remote queried (bound to 0.0.0.0); counted. */
	private sendAnswer(payload: Buffer, addr: number, port: number, from: Backend | null): void {
		let local = 0;
		if (this.wildcard) {
			const rem = this.remotes.peek(addr);
			local = rem === undefined ? 0 : rem.localAddr >>> 0;
		}
		if (this.transport.send(payload, addr, port, local)) {
			this.stats.sent++;
		} else {
			/* A port of 0 or over 65535, or a payload too big for UDP. */
			this.stats.sendErrors++;
			this.outboundErrorLog.report(from?.log ?? this.log, () => ({
				err: new Error(`cannot send ${payload.length} bytes to port ${port}`), dest_ip: u32ToIpv4(addr), dest_port: port,
			}));
		}
	}

	/*
	 * msg is a view of the transport's buffer, valid during this call only;
	 * len is the datagram's true length (msg is cut to the receive slot when
	 * the datagram was longer).
	 */
	private readonly socketOnMessage = (msg: Buffer, addr: number, port: number, len: number, local: number): void => {
		this.stats.received++;
		if (this.acl !== null && !this.acl.allows(addr)) {
			this.stats.aclDropped++;
			this.aclLog.report(this.log, () => ({ remote_ip: u32ToIpv4(addr) }));
			return;
		}
		if (len > MAX_UDP_PAYLOAD_BYTES) {
			/*
			 * Resolvers have no reason to send a query this large; it can
			 * only be reassembled fragments or junk, and the protocol cannot
			 * carry it anyway.
			 */
			const held = this.remotes.peek(addr);
			if (held !== undefined) {
				held.udpDrop++;
			}
			this.stats.oversize++;
			this.oversizeLog.report(this.log, () => ({ remote_ip: u32ToIpv4(addr), len, max: MAX_UDP_PAYLOAD_BYTES }));
			return;
		}
		const problem = checkQueryHeader(msg);
		if (problem !== HEADER_OK) {
			const held = this.remotes.peek(addr);
			if (held !== undefined) {
				held.udpInvalid++;
			}
			this.stats.invalid++;
			this.invalidLog.report(this.log, () => ({
				remote_ip: u32ToIpv4(addr), len: msg.length, problem: HEADER_PROBLEMS[problem],
			}));
			return;
		}
		/* Only a datagram that may be a query gets (or makes) a remote. */
		const rem = this.remotes.lookup(addr);
		/* Kept as an int32, which V8 stores in the object itself. */
		rem.localAddr = local | 0;
		if (this.maxQps > 0 && !rem.admitQuery(this.maxQps)) {
			rem.rateLimited++;
			this.stats.rateLimited++;
			this.rateLog.report(this.log, () => ({ remote_ip: rem.ip, max_qps: this.maxQps }));
			if (this.refuseOverRate && this.answer(rem, msg, addr, port, local, RCODE_REFUSED)) {
				this.stats.refused++;
			}
			return;
		}
		const be = rem.chooseBackend();
		if (be === null) {
			if (this.cache !== null && this.cache.noBackend(rem.primary, msg, len, addr, port, this.clock())) {
				rem.udp++;
				return;
			}
			rem.udpDrop++;
			this.stats.noBackend++;
			this.noBackendLog.report(this.log, () => ({
				remote_ip: rem.ip, answer: this.servfailOnNoBackend ? 'SERVFAIL' : 'none',
			}));
			if (this.servfailOnNoBackend && this.answer(rem, msg, addr, port, local, RCODE_SERVFAIL)) {
				this.stats.servfail++;
			}
			return;
		}
		/* One clock read a query, for the cache and the in-flight table both. */
		const now = this.accounting ? this.clock() : 0;
		let tag: CacheTag | undefined;
		if (this.cache !== null) {
			if (this.cache.hit(be, msg, len, addr, port, now)) {
				rem.udp++;
				return;
			}
			tag = this.cache.tagFor(be, msg);
		}
		if (!be.sendUdp(addr, port, msg)) {
			rem.udpDrop++;
			this.stats.stuck++;
			this.stuckLog.report(be.log, () => ({ remote_ip: u32ToIpv4(addr) }));
			return;
		}
		rem.udp++;
		this.stats.forwarded++;
		if (this.accounting) {
			be.health.book.query(addr, port, (msg[0] << 8) | msg[1], now, tag);
		}
		if (this.trace) {
			rem.log.trace({ be_id: be.id, remote_port: port, query: describeQuery(msg) }, 'forwarded UDP query');
		}
	};

	/*
	 * Answer a query from bbal itself (SERVFAIL, REFUSED), within the
	 * remote's allowance of synthesized answers.  True when one was sent
	 * (queued: the transport sends it when this callback returns).
	 */
	private answer(rem: Remote, msg: Buffer, addr: number, port: number, local: number, rcode: number): boolean {
		if (!rem.admitSynthesized(SYNTH_ANSWERS_PER_SEC)) {
			return false;
		}
		const out = buildErrorAnswer(msg, rcode);
		if (out === null) {
			return false;
		}
		if (this.trace) {
			rem.log.trace({ rcode, remote_port: port, query: describeQuery(msg) }, 'answered UDP query itself');
		}
		/* False only for a source port of 0, which no answer can reach. */
		return this.transport.send(out, addr, port, local);
	}

	/*
	 * The native transport reports a failed sendmmsg() once for all the
	 * answers it dropped (a full send buffer refuses the rest of a batch);
	 * dgram reports the answers its capped send queue dropped the same way.
	 */
	private readonly socketOnError = (err: UdpTransportError): void => {
		if (err.fatal === true) {
			this.onFatal(err);
			return;
		}
		if (err.syscall === 'recvmsg' || err.syscall === 'recvmmsg') {
			this.stats.receiveErrors++;
			this.socketErrorLog.report(this.log, { err });
			return;
		}
		const dropped = err.dropped ?? 1;
		this.stats.sendErrors += dropped;
		if (err.code === 'EAGAIN' || err.code === 'EWOULDBLOCK' || err.code === 'ENOBUFS') {
			this.stats.sendQueueFull += dropped;
		}
		this.socketErrorLog.report(this.log, { err });
	};

	/** Stop: close the transport (bound or not); idempotent, as the transport's own close(). */
	close(): Promise<void> {
		this.state = 'closed';
		return this.transport.close();
	}
}
