/*
 * UDP SOCKET
 *
 * The one UDP socket bbal listens on, behind a small transport interface so
 * that the proxy does not care how datagrams cross the kernel boundary.
 * There are two transports:
 *
 *   native  native/udp_batch.c (built by `npm install` into
 *           build/Release/udp_batch.node): the addon owns the socket and
 *           moves datagrams in batches, one recvmmsg() for up to 64 queries
 *           and one sendmmsg() for every answer queued in one event-loop
 *           callback.  Linux only.
 *   dgram   Node's dgram, as bbal always did: one recvmsg() and one
 *           sendmsg() per datagram.  Used when the addon is missing or
 *           does not load, or when the environment says BBAL_UDP=dgram.
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
 * Sending queues: an answer is copied into the send arena at once (so the
 * caller may reuse its buffer) and the whole arena goes out in one
 * sendmmsg() on process.nextTick, or at once when the arena fills.  Since
 * the addon calls JavaScript through napi_make_callback(), the nextTick runs
 * as soon as the batch callback (or the backend's data callback) returns.
 * send() returns false only for what can never be sent (closed transport,
 * port 0 or over 65535, payload over MAX_UDP_PAYLOAD_BYTES); what the kernel
 * refuses (EAGAIN, ENOBUFS when the send buffer is full) is dropped and
 * reported through onError with the number dropped, never queued: UDP is
 * lossy, and a queue here would grow under exactly the load that fills it.
 * dgram queues what the kernel refuses, without bound (libuv's send queue):
 * that transport checks the queue before each send and drops past
 * DGRAM_SEND_QUEUE_MAX_ANSWERS or _BYTES, reporting the drops once per
 * event-loop callback as an ENOBUFS error, as the native one does.
 *
 * WILDCARD BINDS.  Bound to 0.0.0.0, a socket hears every address of the
 * host, but a plain send leaves from the address the kernel picks for the
 * route back, which need not be the one the client asked: in a multi-homed
 * Binder zone, or for a query to 127.0.0.5 answered from 127.0.0.1, the
 * client discards the answer.  So each datagram comes with the local
 * address it was sent to (a u32, 0 when bound to one address, where the
 * question does not arise), and send() takes the local address to answer
 * from.  The native transport reads it with IP_PKTINFO and sets it on each
 * answer (udp_batch.c).  dgram can do neither, so when asked to bind
 * 0.0.0.0 it binds one socket per IPv4 address of the host instead, as BIND
 * does for `listen-on any`, reports each datagram with its socket's address
 * and answers from the socket of the address given.  The host's addresses
 * are os.networkInterfaces()'s, read at bind and again at each
 * followAddresses() (the balancer calls it with its 5-s directory rescan):
 * a socket is opened for each new address and closed for each address
 * gone.  An answer for an address with no socket (gone meanwhile, or 0
 * because the proxy no longer knew it) is dropped and reported.  An
 * address the host has but os.networkInterfaces() does not list is not
 * listened on: 127.0.0.5 on Linux's loopback, say, where only 127.0.0.1 is
 * configured.
 *
 * Neither transport allocates per datagram in JavaScript beyond the Buffer
 * view itself (dgram also makes its own Buffer and rinfo object).  Errors
 * after bind go to onError, never thrown.  One is fatal: a native socket
 * whose poll libuv stopped and the addon could not restart (POLL ERRORS in
 * udp_batch.c) will never be read again, and says so (err.fatal), for bbal
 * to exit and be restarted.  close() is idempotent and
 * resolves once the socket is closed; after it no callback is called.
 */

import dgram from 'node:dgram';
import { createRequire } from 'node:module';
import os from 'node:os';
import { ignoreError } from './log.js';
import { ipv4ToU32, MAX_UDP_PAYLOAD_BYTES, u32ToIpv4 } from './protocol.js';

/* Room for bursts while the event loop is busy elsewhere. */
const RECV_BUFFER_BYTES = 4 * 1024 * 1024;
const SEND_BUFFER_BYTES = 4 * 1024 * 1024;
/*
 * dgram's send queue, per socket.  Node tries each answer at once and only
 * queues it in libuv when the kernel refuses it (the socket's send buffer,
 * up to SEND_BUFFER_BYTES, is full); libuv's queue has no bound of its own.
 * Past either limit an answer is dropped, as the native transport drops what
 * sendmmsg() refuses.  The queue is only a cushion above the kernel's
 * buffer: 512 answers is about what one 64 KiB read of a backend's session
 * carries (answers of ~130 bytes), so a burst that lands while the kernel
 * buffer drains is still sent, while a socket that stays full holds at most
 * 512 KiB of answers instead of growing with the load.
 */
export const DGRAM_SEND_QUEUE_MAX_ANSWERS = 512;
export const DGRAM_SEND_QUEUE_MAX_BYTES = 512 * 1024;
/* Slots in the direct-mapped cache of destination address texts (dgram). */
const ADDR_CACHE_MASK = 4095;
/* The addon's arena geometry; it exports its own and load() compares. */
const SLOTS = 64;
const SLOT_BYTES = 1536;
const META_WORDS = 4;
/* From dist/src/udp_socket.js (or src/ under a loader) to the package root. */
const ADDON_PATH = '../../build/Release/udp_batch.node';

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
	close(): Promise<void>;
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

/* os.networkInterfaces()'s IPv4 addresses, each once (getifaddrs() on Linux, which opens a netlink socket). */
export function hostIpv4Addresses(): string[] {
	const out = new Set<string>();
	for (const list of Object.values(os.networkInterfaces())) {
		for (const a of list ?? []) {
			if (a.family === 'IPv4') {
				out.add(a.address);
			}
		}
	}
	return [...out];
}

export interface UdpTransportOptions {
	/** Where dgram finds the host's addresses for a wildcard bind (default hostIpv4Addresses). */
	listAddresses?: AddressLister;
}

interface Addon {
	SLOTS: number;
	SLOT_BYTES: number;
	META_WORDS: number;
	open(addr: number, port: number, recvData: ArrayBuffer, recvMeta: ArrayBuffer,
		sendData: ArrayBuffer, sendMeta: ArrayBuffer, onBatch: (count: number, fatal?: boolean) => void): object;
	recvErr(handle: object): void;
	send(handle: object, count: number): number;
	sendErrno(handle: object): string;
	errName(code: number): string;
	localPort(handle: object): number;
	close(handle: object, onClosed: () => void): boolean;
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

function ignoreDatagram(): void {}
function transportError(code: string, message: string, dropped: number): UdpTransportError {
	const err: UdpTransportError = new Error(message);
	err.code = code;
	err.dropped = dropped;
	return err;
}

/* What send() accepts, the same for both transports. */
function sendable(payload: Uint8Array, port: number): boolean {
	return port > 0 && port <= 65535 && payload.length <= MAX_UDP_PAYLOAD_BYTES;
}

class NativeTransport implements UdpTransport {
	readonly kind = 'native';
	onDatagram: (msg: Buffer, addr: number, port: number, len: number, local: number) => void = ignoreDatagram;
	onError: (err: UdpTransportError) => void = ignoreError;
	private readonly addon: Addon;
	private state: 'new' | 'open' | 'closing' | 'closed' = 'new';
	private handle: object | null = null;
	private port = 0;
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
		if (this.state !== 'new') {
			return Promise.reject(transportError('ERR_SOCKET_ALREADY_BOUND', 'UDP transport already bound', 0));
		}
		const addr = ipv4ToU32(address);
		if (addr < 0) {
			return Promise.reject(transportError('EINVAL', `"${address}" is not an IPv4 address`, 0));
		}
		try {
			this.handle = this.addon.open(addr, port, this.recvData, this.recvMeta, this.sendData,
				this.sendMeta, this.addonOnBatch);
		} catch (err) {
			this.state = 'closed';
			return Promise.reject(err);
		}
		this.port = this.addon.localPort(this.handle);
		this.state = 'open';
		return Promise.resolve();
	}

	localPort(): number {
		return this.port;
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

/*
 * dgram resolves every destination with dns.lookup() before sending, which
 * for an address literal still costs a regex and a deferred callback per
 * answer.  Every address bbal sends to is a dotted quad it built itself, so
 * the lookup hands it straight back.
 */
function literalLookup(
	address: string, _family: unknown, callback: (err: Error | null, address: string, family: number) => void,
): void {
	callback(null, address, 4);
}

/* One dgram socket and the local address it is bound to (0 for the one socket of a specific bind). */
interface Endpoint {
	readonly address: string;
	readonly local: number;
	readonly socket: dgram.Socket;
}

class DgramTransport implements UdpTransport {
	readonly kind = 'dgram';
	onDatagram: (msg: Buffer, addr: number, port: number, len: number, local: number) => void = ignoreDatagram;
	onError: (err: UdpTransportError) => void = ignoreError;
	private state: 'new' | 'binding' | 'open' | 'closed' = 'new';
	private port = 0;
	/* Bound to one address: its socket.  Bound to 0.0.0.0: null, and one socket per address in `byLocal`. */
	private only: Endpoint | null = null;
	private readonly byLocal = new Map<number, Endpoint>();
	/* Addresses whose bind failed at the last followAddresses(), reported once until they bind. */
	private readonly failing = new Set<number>();
	private following = false;
	private closed: Promise<void> | null = null;
	/* Answers dropped since the last report (see dropReport): send queue full, no socket for the address. */
	private queueFullDrops = 0;
	private noSocketDrops = 0;
	private readonly addrCacheKey = new Uint32Array(ADDR_CACHE_MASK + 1);
	private readonly addrCacheText: Array<string | undefined> = new Array<string | undefined>(ADDR_CACHE_MASK + 1);

	constructor(private readonly listAddresses: AddressLister) {}

	async bind(address: string, port: number): Promise<void> {
		if (this.state !== 'new') {
			throw transportError('ERR_SOCKET_ALREADY_BOUND', 'UDP transport already bound', 0);
		}
		this.state = 'binding';
		try {
			if (address !== '0.0.0.0') {
				this.only = await this.open(address, port, 0);
				this.port = this.only.socket.address().port;
			} else {
				const addresses = this.listAddresses();
				if (addresses.length === 0) {
					throw transportError('EADDRNOTAVAIL', 'no IPv4 address on this host to listen on', 0);
				}
				for (const a of addresses) {
					/* The first fixes the port when asked for port 0; the rest take the same. */
					const ep = await this.open(a, this.port === 0 ? port : this.port, ipv4ToU32(a));
					if (this.state !== 'binding') {
						ep.socket.close();
						throw transportError('ERR_SOCKET_DGRAM_NOT_RUNNING', 'UDP transport closed while binding', 0);
					}
					this.byLocal.set(ep.local, ep);
					this.port = ep.socket.address().port;
				}
			}
		} catch (err) {
			if (this.state === 'binding') {
				this.state = 'closed';
				await this.closeSockets();
			}
			throw err;
		}
		this.state = 'open';
	}

	/*
	 * A socket bound to address:port, its handlers attached; rejects with
	 * the bind error (its .address says which address), or if the transport
	 * was closed meanwhile.
	 */
	private open(address: string, port: number, local: number): Promise<Endpoint> {
		const socket = dgram.createSocket({ type: 'udp4', reuseAddr: true, lookup: literalLookup });
		return new Promise((resolve, reject) => {
			const onError = (err: Error): void => {
				socket.close();
				reject(err);
			};
			socket.once('error', onError);
			socket.bind({ address, port, exclusive: true }, () => {
				socket.removeListener('error', onError);
				if (this.state === 'closed') {
					socket.close();
					reject(transportError('ERR_SOCKET_DGRAM_NOT_RUNNING', 'UDP transport closed while binding', 0));
					return;
				}
				socket.on('error', this.socketOnError);
				socket.on('message', (msg: Buffer, rinfo: dgram.RemoteInfo) => {
					/* A udp4 socket only reports dotted quads; anything else is dropped. */
					const addr = ipv4ToU32(rinfo.address);
					if (addr >= 0 && this.state === 'open') {
						this.onDatagram(msg, addr, rinfo.port, msg.length, local);
					}
				});
				/* Best effort, as the native transport: capped by net.core.[rw]mem_max. */
				try {
					socket.setRecvBufferSize(RECV_BUFFER_BYTES);
					socket.setSendBufferSize(SEND_BUFFER_BYTES);
				} catch {
					/* Keep the defaults. */
				}
				resolve({ address, local, socket });
			});
		});
	}

	localPort(): number {
		return this.port;
	}

	private readonly socketOnError = (err: Error): void => {
		const e = err as UdpTransportError;
		e.dropped = 1;
		this.onError(e);
	};

	send(payload: Uint8Array, addr: number, port: number, local = 0): boolean {
		if (this.state !== 'open' || !sendable(payload, port)) {
			return false;
		}
		/*
		 * Accepted even when it is then dropped, as the native transport
		 * accepts what sendmmsg() refuses: drops are reported through onError.
		 */
		const ep = this.only ?? this.byLocal.get(local);
		if (ep === undefined) {
			this.dropped(0, 1);
			return true;
		}
		const socket = ep.socket;
		if (socket.getSendQueueCount() >= DGRAM_SEND_QUEUE_MAX_ANSWERS
			|| socket.getSendQueueSize() + payload.length > DGRAM_SEND_QUEUE_MAX_BYTES) {
			this.dropped(1, 0);
			return true;
		}
		/* dgram wants the address as text: keep the texts of recent ones. */
		const slot = addr & ADDR_CACHE_MASK;
		let ip = this.addrCacheText[slot];
		if (ip === undefined || this.addrCacheKey[slot] !== addr) {
			ip = u32ToIpv4(addr);
			this.addrCacheKey[slot] = addr;
			this.addrCacheText[slot] = ip;
		}
		socket.send(payload, port, ip);
		return true;
	}

	private dropped(queueFull: number, noSocket: number): void {
		if (this.queueFullDrops + this.noSocketDrops === 0) {
			process.nextTick(this.dropReport);
		}
		this.queueFullDrops += queueFull;
		this.noSocketDrops += noSocket;
	}

	/* One error per kind for all the answers dropped during one callback. */
	private readonly dropReport = (): void => {
		const full = this.queueFullDrops;
		const none = this.noSocketDrops;
		this.queueFullDrops = 0;
		this.noSocketDrops = 0;
		if (this.state !== 'open') {
			return;
		}
		if (full > 0) {
			this.onError(transportError('ENOBUFS',
				`UDP send queue full (over ${DGRAM_SEND_QUEUE_MAX_ANSWERS} answers or ${DGRAM_SEND_QUEUE_MAX_BYTES} bytes): `
				+ `${full} answers dropped`, full));
		}
		if (none > 0) {
			this.onError(transportError('EADDRNOTAVAIL',
				`no UDP socket for the address the query was sent to: ${none} answers dropped`, none));
		}
	};

	async followAddresses(): Promise<AddressChanges | null> {
		if (this.only !== null || this.state !== 'open' || this.following) {
			return null;
		}
		this.following = true;
		try {
			return await this.follow();
		} finally {
			this.following = false;
		}
	}

	private async follow(): Promise<AddressChanges> {
		const changes: AddressChanges = { added: [], removed: [], failed: [] };
		const want = new Map<number, string>();
		for (const a of this.listAddresses()) {
			want.set(ipv4ToU32(a), a);
		}
		for (const [local, ep] of this.byLocal) {
			if (!want.has(local)) {
				this.byLocal.delete(local);
				ep.socket.close();
				changes.removed.push(ep.address);
			}
		}
		for (const local of this.failing) {
			if (!want.has(local)) {
				this.failing.delete(local);
			}
		}
		for (const [local, address] of want) {
			if (this.byLocal.has(local)) {
				continue;
			}
			try {
				const ep = await this.open(address, this.port, local);
				if (this.state !== 'open') {
					ep.socket.close();
					break;
				}
				this.byLocal.set(local, ep);
				this.failing.delete(local);
				changes.added.push(address);
			} catch (err) {
				if (this.state !== 'open') {
					break;
				}
				if (!this.failing.has(local)) {
					this.failing.add(local);
					changes.failed.push({ address, err: err as Error });
				}
			}
		}
		return changes;
	}

	private closeSockets(): Promise<void> {
		const eps = this.only !== null ? [this.only] : [...this.byLocal.values()];
		this.byLocal.clear();
		return Promise.all(eps.map((ep) => new Promise<void>((resolve) => ep.socket.close(() => resolve()))))
			.then(() => undefined);
	}

	close(): Promise<void> {
		if (this.closed !== null) {
			return this.closed;
		}
		/* A bind still under way sees the state and closes what it opens. */
		this.state = 'closed';
		this.closed = this.closeSockets();
		return this.closed;
	}
}
