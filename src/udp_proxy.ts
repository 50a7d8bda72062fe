/*
 * UDP PROXY
 *
 * Most DNS arrives as UDP.  This module owns the one UDP socket bbal listens
 * on and moves datagrams between it and the backends:
 *
 *   datagram in -> size check -> remote (by source address) -> its backend
 *               -> INBOUND_UDP frame queued on that backend's control session
 *   OUTBOUND_UDP frame from a backend -> datagram out, from the DNS port
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
import { ipv4ToU32, MAX_UDP_PAYLOAD_BYTES, u32ToIpv4 } from './protocol.js';
import type { Remotes } from './remotes.js';
import { LogGate, type TimeoutWheel } from './timeouts.js';

/* Room for bursts while the event loop is busy elsewhere. */
const RECV_BUFFER_BYTES = 4 * 1024 * 1024;
const SEND_BUFFER_BYTES = 4 * 1024 * 1024;

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
}

export class UdpProxy {
	readonly stats: UdpProxyStats = {
		received: 0, forwarded: 0, oversize: 0, noBackend: 0, stuck: 0, sent: 0, sendErrors: 0,
	};
	private readonly socket: dgram.Socket;
	private readonly remotes: Remotes;
	private readonly log: Logger;
	private readonly oversizeGate: LogGate;
	private readonly noBackendGate: LogGate;
	private readonly stuckGate: LogGate;
	private readonly sendErrorGate: LogGate;
	private state: 'new' | 'listening' | 'closed' = 'new';

	constructor(opts: { remotes: Remotes; log: Logger; wheel: TimeoutWheel }) {
		this.remotes = opts.remotes;
		this.log = opts.log;
		this.oversizeGate = new LogGate(opts.wheel);
		this.noBackendGate = new LogGate(opts.wheel);
		this.stuckGate = new LogGate(opts.wheel);
		this.sendErrorGate = new LogGate(opts.wheel);
		this.socket = dgram.createSocket({ type: 'udp4', reuseAddr: true });
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
		try {
			this.socket.send(payload, port, u32ToIpv4(addr));
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
		const be = rem.backend();
		if (be === null) {
			rem.stats.udpDrop++;
			this.stats.noBackend++;
			const skipped = this.noBackendGate.open();
			if (skipped >= 0) {
				rem.log.warn({ not_logged: skipped }, 'no backend for remote (dropping UDP packet)');
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
	};

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
