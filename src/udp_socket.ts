/*
 * UDP SOCKET
 *
 * The one UDP socket bbal listens on, made by createUdpTransport() below
 * behind the transport interface of udp_transport.ts, so that the proxy
 * does not care how datagrams cross the kernel boundary.  There are two
 * transports:
 *
 *   native  native/udp_batch.c (built by `npm install` into
 *           build/Release/udp_batch.node), driven by NativeTransport here:
 *           the addon owns the socket and moves datagrams in batches, one
 *           recvmmsg() for up to 64 queries and one sendmmsg() for every
 *           answer queued in one event-loop callback.  Linux only.
 *   dgram   Node's dgram, as bbal always did (udp_dgram.ts): one recvmsg()
 *           and one sendmsg() per datagram.  Used when the addon is missing
 *           or does not load, or when the environment says BBAL_UDP=dgram.
 *
 * The addon is loaded once, on first use, and its arena geometry checked
 * against ours (SLOTS, SLOT_BYTES, META_WORDS): both sides index the same
 * ArrayBuffers.  Each of the native transport's slots is 1536 bytes, so a
 * longer datagram is cut to its slot and handed over with its true length.
 *
 * SENDING.  An answer is copied into the send arena at once (so the caller
 * may reuse its buffer) and the whole arena goes out in one sendmmsg() on
 * process.nextTick, or at once when the arena fills.  Since the addon calls
 * JavaScript through napi_make_callback(), the nextTick runs as soon as the
 * batch callback (or the backend's data callback) returns.  What the kernel
 * refuses (EAGAIN, ENOBUFS when the send buffer is full) is dropped and
 * reported through onError with the number dropped, never queued.
 *
 * Bound to 0.0.0.0, the addon reads each datagram's local address with
 * IP_PKTINFO and sets the one send() was given on each answer (WILDCARD
 * BINDS in udp_transport.ts; udp_batch.c).  A socket whose poll libuv
 * stopped and the addon could not restart (POLL ERRORS in udp_batch.c)
 * will never be read again: its error says so (err.fatal), for bbal to exit
 * and be restarted.
 */

import { createRequire } from 'node:module';
import { closeSync } from 'node:fs';
import { ignoreError } from './log.js';
import { ipv4ToU32 } from './protocol.js';
import { DgramTransport, hostIpv4Addresses } from './udp_dgram.js';
import {
	ignoreDatagram, type PassedUdpSocket, sendable, transportError, type UdpTransport, type UdpTransportError,
	type UdpTransportKind, type UdpTransportOptions,
} from './udp_transport.js';

/* The addon's arena geometry; it exports its own and load() compares. */
const SLOTS = 64;
const SLOT_BYTES = 1536;
const META_WORDS = 4;
/* From dist/src/udp_socket.js (or src/ under a loader) to the package root. */
const ADDON_PATH = '../../build/Release/udp_batch.node';

interface Addon {
	SLOTS: number;
	SLOT_BYTES: number;
	META_WORDS: number;
	open(addr: number, port: number, recvData: ArrayBuffer, recvMeta: ArrayBuffer,
		sendData: ArrayBuffer, sendMeta: ArrayBuffer, onBatch: (count: number, fatal?: boolean) => void, fd?: number): object;
	recvErr(handle: object): void;
	send(handle: object, count: number): number;
	sendErrno(handle: object): string;
	errName(code: number): string;
	localPort(handle: object): number;
	close(handle: object, onClosed: () => void): boolean;
	fd(handle: object): number;
	stopReading(handle: object): void;
}

let addon: Addon | null = null;
let addonError: Error | null = null;
let addonLoaded = false;

function load(): Addon | null {
	if (addonLoaded) {
		return addon;
	}
	addonLoaded = true;
	if (process.platform !== 'linux') {
		addonError = new Error(`native UDP batching needs Linux (this is ${process.platform})`);
		return null;
	}
	try {
		const a = createRequire(import.meta.url)(ADDON_PATH) as Addon;
		if (a.SLOTS !== SLOTS || a.SLOT_BYTES !== SLOT_BYTES || a.META_WORDS !== META_WORDS) {
			throw new Error(`udp_batch.node has arenas of ${a.SLOTS} x ${a.SLOT_BYTES}, expected ${SLOTS} x ${SLOT_BYTES}: rebuild it`);
		}
		addon = a;
	} catch (err) {
		addonError = err as Error;
	}
	return addon;
}

/**
 * The native transport when the addon loads, else dgram; BBAL_UDP=dgram
 * forces dgram.  A kind asked for explicitly must be available.
 */
export function createUdpTransport(kind?: UdpTransportKind, opts: UdpTransportOptions = {}): UdpTransport {
	if (kind === undefined) {
		kind = process.env['BBAL_UDP'] !== 'dgram' && load() !== null ? 'native' : 'dgram';
	}
	if (kind === 'dgram') {
		return new DgramTransport(opts.listAddresses ?? hostIpv4Addresses);
	}
	const a = load();
	if (a === null) {
		throw addonError ?? new Error('native UDP transport unavailable');
	}
	return new NativeTransport(a);
}

class NativeTransport implements UdpTransport {
	readonly kind = 'native';
	onDatagram: (msg: Buffer, addr: number, port: number, len: number, local: number) => void = ignoreDatagram;
	onError: (err: UdpTransportError) => void = ignoreError;
	private readonly addon: Addon;
	private state: 'new' | 'open' | 'closing' | 'closed' = 'new';
	private handle: object | null = null;
	private port = 0;
	private address = '';
	private readonly recvData = new ArrayBuffer(SLOTS * SLOT_BYTES);
	private readonly recvMeta = new ArrayBuffer(SLOTS * META_WORDS * 4);
	private readonly sendData = new ArrayBuffer(SLOTS * SLOT_BYTES);
	private readonly sendMeta = new ArrayBuffer(SLOTS * META_WORDS * 4);
	private readonly recvBuf = Buffer.from(this.recvData);
	private readonly recvWords = new Uint32Array(this.recvMeta);
	private readonly sendBuf = new Uint8Array(this.sendData);
	private readonly sendWords = new Uint32Array(this.sendMeta);
	/* Answers in the send arena, and whether a flush is on nextTick. */
	private queued = 0;
	private flushScheduled = false;
	private closed: Promise<void> | null = null;

	constructor(a: Addon) {
		this.addon = a;
	}

	bind(address: string, port: number): Promise<void> {
		return this.open(address, port);
	}

	/* One socket, whatever the address: IP_PKTINFO does for the wildcard what dgram needs a socket per address for. */
	adopt(address: string, sockets: PassedUdpSocket[]): Promise<void> {
		if (sockets.length !== 1) {
			sockets.forEach((s) => closeSync(s.fd));
			return Promise.reject(transportError('EINVAL',
				`the native transport takes over one UDP socket, not ${sockets.length} (was the other bbal using dgram?)`, 0));
		}
		return this.open(address, 0, sockets[0].fd);
	}

	private open(address: string, port: number, fd?: number): Promise<void> {
		if (this.state !== 'new') {
			return Promise.reject(transportError('ERR_SOCKET_ALREADY_BOUND', 'UDP transport already bound', 0));
		}
		const addr = ipv4ToU32(address);
		if (addr < 0) {
			return Promise.reject(transportError('EINVAL', `"${address}" is not an IPv4 address`, 0));
		}
		try {
			/* The addon takes a descriptor as an eighth argument, and refuses undefined there: leave it out. */
			this.handle = this.addon.open(addr, port, this.recvData, this.recvMeta, this.sendData, this.sendMeta,
				this.addonOnBatch, ...(fd === undefined ? [] : [fd]));
		} catch (err) {
			this.state = 'closed';
			return Promise.reject(err);
		}
		this.port = this.addon.localPort(this.handle);
		this.address = address;
		this.state = 'open';
		return Promise.resolve();
	}

	localPort(): number {
		return this.port;
	}

	sockets(): PassedUdpSocket[] {
		const fd = this.state === 'open' ? this.addon.fd(this.handle as object) : -1;
		return fd < 0 ? [] : [{ fd, address: this.address }];
	}

	stopReading(): void {
		if (this.state === 'open') {
			this.addon.stopReading(this.handle as object);
		}
	}

	/*
	 * One call per recvmmsg() batch: count datagrams in slots 0..count-1,
	 * or a negative libuv error code.  The handler may close the transport
	 * halfway; the rest of the batch is then dropped.  An error is a failed
	 * recvmmsg() or a poll error the addon has recovered from (the socket
	 * is read again), unless `fatal`: then the poll could not be restarted
	 * and no datagram will ever arrive (see POLL ERRORS in udp_batch.c).
	 */
	private readonly addonOnBatch = (count: number, fatal?: boolean): void => {
		if (count < 0) {
			if (this.state === 'open') {
				const code = this.addon.errName(count);
				const err = fatal === true
					? transportError(code, `UDP socket failed: ${code} (it cannot be read again)`, 0)
					: transportError(code, `UDP receive failed: ${code} (reading goes on)`, 0);
				err.syscall = 'recvmmsg';
				err.fatal = fatal === true;
				this.onError(err);
			}
			return;
		}
		const meta = this.recvWords;
		for (let i = 0; i < count && this.state === 'open'; i++) {
			const m = i * META_WORDS;
			const len = meta[m];
			const off = i * SLOT_BYTES;
			this.onDatagram(this.recvBuf.subarray(off, off + (len < SLOT_BYTES ? len : SLOT_BYTES)),
				meta[m + 1], meta[m + 2], len, meta[m + 3]);
		}
	};

	send(payload: Uint8Array, addr: number, port: number, local = 0): boolean {
		if (this.state !== 'open' || !sendable(payload, port)) {
			return false;
		}
		const k = this.queued;
		this.sendBuf.set(payload, k * SLOT_BYTES);
		const m = k * META_WORDS;
		this.sendWords[m] = payload.length;
		this.sendWords[m + 1] = addr;
		this.sendWords[m + 2] = port;
		this.sendWords[m + 3] = local;
		this.queued = k + 1;
		if (this.queued === SLOTS) {
			this.flush();
		} else if (!this.flushScheduled) {
			this.flushScheduled = true;
			process.nextTick(this.flushOnTick);
		}
		return true;
	}

	private readonly flushOnTick = (): void => {
		this.flushScheduled = false;
		this.flush();
	};

	private flush(): void {
		const n = this.queued;
		this.queued = 0;
		if (n === 0 || this.state !== 'open') {
			return;
		}
		const sent = this.addon.send(this.handle as object, n);
		if (sent < n) {
			const code = this.addon.sendErrno(this.handle as object) || 'EIO';
			this.onError(transportError(code, `UDP send failed: ${code} (${n - sent} of ${n} answers dropped)`, n - sent));
		}
	}

	close(): Promise<void> {
		if (this.closed !== null) {
			return this.closed;
		}
		if (this.state !== 'open') {
			this.state = 'closed';
			this.closed = Promise.resolve();
			return this.closed;
		}
		/* Answers already accepted still leave: send() promised them. */
		this.flush();
		this.state = 'closing';
		this.closed = new Promise((resolve) => {
			this.addon.close(this.handle as object, () => {
				this.state = 'closed';
				this.handle = null;
				resolve();
			});
		});
		return this.closed;
	}
}
