/*
 * UDP TRANSPORT
 *
 * The contract between the UDP proxy and the one UDP socket bbal listens
 * on, so that the proxy does not care how datagrams cross the kernel
 * boundary.  Two transports honour it: the native one (udp_socket.ts,
 * which drives the addon native/udp_batch.c: recvmmsg() and sendmmsg() in
 * batches, Linux only) and Node's dgram (udp_dgram.ts, one recvmsg() and
 * one sendmsg() per datagram).  udp_socket.ts's createUdpTransport()
 * chooses between them.  This file holds what both share: the interface,
 * its error and option types, and the few helpers both use.  It imports
 * neither transport; both import it.
 *
 * Both hand the proxy the same thing: for each datagram, its bytes, the
 * source address as a u32 (protocol.ts's form, the key of the remotes
 * table) and port, its true length, and -- when bound to the wildcard
 * address -- the local address it was sent to.  The bytes are a view of a buffer
 * that is reused: valid during the call only.  The proxy copies what it
 * keeps (the backend writes the payload into its own frame buffer).  The
 * true length is passed apart because the native transport's slots are
 * 1536 bytes: a longer datagram is cut to its slot, yet bbal must still see
 * it as oversize and log how big it was.
 *
 * Sending: send() queues an answer, which leaves at the latest at the end
 * of the current event-loop callback (how each transport queues is its
 * own: SENDING in udp_socket.ts, the send queue cap in udp_dgram.ts).  send()
 * returns false only for what can never be sent (closed transport, port 0
 * or over 65535, payload over MAX_UDP_PAYLOAD_BYTES: sendable() below);
 * what the kernel refuses (EAGAIN, ENOBUFS when the send buffer is full)
 * is dropped and reported through onError with the number dropped, never
 * held beyond a small bounded cushion: UDP is lossy, and a queue here would
 * grow under exactly the load that fills it.
 *
 * WILDCARD BINDS.  Bound to 0.0.0.0, a socket hears every address of the
 * host, but a plain send leaves from the address the kernel picks for the
 * route back, which need not be the one the client asked: in a multi-homed
 * Binder zone, or for a query to 127.0.0.5 answered from 127.0.0.1, the
 * client discards the answer.  So each datagram comes with the local
 * address it was sent to (a u32, 0 when bound to one address, where the
 * question does not arise), and send() takes the local address to answer
 * from.  How each transport does it: IP_PKTINFO in udp_batch.c for the
 * native one, one socket per host address for dgram (WILDCARD BINDS in
 * udp_dgram.ts, followAddresses() below).
 *
 * Neither transport allocates per datagram in JavaScript beyond the Buffer
 * view itself (dgram also makes its own Buffer and rinfo object).  Errors
 * after bind go to onError, never thrown.  One is fatal: a socket that will
 * never be read again says so (err.fatal; the native transport's, see
 * udp_socket.ts), for bbal to exit and be restarted.  close() is idempotent
 * and resolves once the socket is closed; after it no callback is called.
 */

import { MAX_UDP_PAYLOAD_BYTES } from './protocol.js';

export type UdpTransportKind = 'native' | 'dgram';

export interface UdpTransport {
	readonly kind: UdpTransportKind;
	/** Bind; rejects with an Error whose .code is the errno name (EADDRINUSE, EACCES, EADDRNOTAVAIL...). */
	bind(address: string, port: number): Promise<void>;
	/**
	 * Called for each datagram; `msg` is only valid during the call (a view
	 * of a reused buffer).  addr is the IPv4 source as ipv4ToU32 gives it.
	 * `len` is the datagram's true length, which exceeds msg.length when a
	 * datagram longer than a receive slot was cut.  `local` is the address
	 * it was sent to, as a u32, when bound to 0.0.0.0; 0 otherwise.
	 */
	onDatagram: (msg: Buffer, addr: number, port: number, len: number, local: number) => void;
	/**
	 * Queue an answer, from `local` (a u32 as onDatagram gave it; ignored
	 * unless bound to 0.0.0.0); sent at the latest at the end of the current
	 * event-loop callback.
	 */
	send(payload: Uint8Array, addr: number, port: number, local?: number): boolean;
	/**
	 * Bound to 0.0.0.0 with one socket per address (dgram): open sockets for
	 * the host's new addresses and close those of addresses gone.  Resolves
	 * with what changed, or null when there is nothing to follow.
	 */
	followAddresses?(): Promise<AddressChanges | null>;
	/** Errors after bind (sendmmsg failures etc.); `dropped` says how many answers were lost. */
	onError: (err: UdpTransportError) => void;
	/** The bound port (after bind with port 0); 0 before. */
	localPort(): number;
	/**
	 * TAKEOVER.  The bound sockets, for a takeover to pass on (their
	 * descriptors stay this transport's); empty before bind.
	 */
	sockets(): PassedUdpSocket[];
	/**
	 * Start from sockets another bbal bound and passed over, instead of
	 * bind(address, port): `address` is what bind would have been given.
	 * The descriptors are the transport's from now on, even if it rejects.
	 */
	adopt(address: string, sockets: PassedUdpSocket[]): Promise<void>;
	/**
	 * Stop reading for good (a takeover has passed the sockets on), while
	 * send() still works: the answers to queries already forwarded still
	 * go out.  Datagrams then wait in the socket for the new process.
	 */
	stopReading(): void;
	close(): Promise<void>;
}

/** One UDP socket passed between two bbal processes: its descriptor and the address it is bound to. */
export interface PassedUdpSocket {
	fd: number;
	address: string;
}

export interface UdpTransportError extends Error {
	code?: string;
	/** 'recvmsg' or 'recvmmsg' for an error on the receiving side (it drops no answer), else a send. */
	syscall?: string;
	/** Answers lost to this error; 1 for any other socket error, as dgram reports one per event. */
	dropped?: number;
	/**
	 * The socket will never deliver another datagram (the native transport's
	 * poll stopped and could not be restarted): bbal must exit and be
	 * restarted rather than live on without UDP.
	 */
	fatal?: boolean;
}

/** What one followAddresses() changed: addresses as dotted quads. */
export interface AddressChanges {
	added: string[];
	removed: string[];
	/** Addresses that could not be bound (and were not failing at the previous call), with the error. */
	failed: Array<{ address: string; err: Error }>;
}

/** The host's IPv4 addresses, as dgram listens on them for a wildcard bind. */
export type AddressLister = () => string[];

export interface UdpTransportOptions {
	/** Where dgram finds the host's addresses for a wildcard bind (default udp_dgram.ts's hostIpv4Addresses). */
	listAddresses?: AddressLister;
}

/* The default onDatagram: a transport nobody listens to drops what it hears. */
export function ignoreDatagram(): void {}

/* An error with the stable code callers branch on and the answers it lost. */
export function transportError(code: string, message: string, dropped: number): UdpTransportError {
	const err: UdpTransportError = new Error(message);
	err.code = code;
	err.dropped = dropped;
	return err;
}

/* What send() accepts, the same for both transports. */
export function sendable(payload: Uint8Array, port: number): boolean {
	return port > 0 && port <= 65535 && payload.length <= MAX_UDP_PAYLOAD_BYTES;
}
