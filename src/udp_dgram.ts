/*
 * UDP OVER DGRAM
 *
 * The transport of udp_transport.ts over Node's dgram, as bbal always did
 * it: one recvmsg() and one sendmsg() per datagram.  udp_socket.ts's
 * createUdpTransport() picks it when the native addon is missing or does
 * not load (any platform but Linux, illumos among them), or when the
 * environment says BBAL_UDP=dgram.  What it adds to dgram is below: a cap
 * on dgram's send queue, and a wildcard bind done one address at a time.
 *
 * The send queue cap.  Node tries each answer at once and queues in libuv
 * only what the kernel refuses, without bound (libuv's send queue).  The
 * native transport drops what sendmmsg() refuses; so, to the same end, this
 * one checks the queue before each send and drops past
 * DGRAM_SEND_QUEUE_MAX_ANSWERS or _BYTES, reporting the drops once per
 * event-loop callback as an ENOBUFS error, as the native one does.
 *
 * WILDCARD BINDS as dgram does it.  The contract (udp_transport.ts) wants
 * each datagram's local address and an answer sent from the address given;
 * dgram can do neither on one socket bound to 0.0.0.0.  So when asked to
 * bind 0.0.0.0 it binds one socket per IPv4 address of the host instead, as
 * BIND does for `listen-on any`, reports each datagram with its socket's
 * address and answers from the socket of the address given.  The host's
 * addresses are os.networkInterfaces()'s, read at bind and again at each
 * followAddresses() (the balancer calls it with its 5-s directory rescan):
 * a socket is opened for each new address and closed for each address
 * gone.  An answer for an address with no socket (gone meanwhile, or 0
 * because the proxy no longer knew it) is dropped and reported.  An
 * address the host has but os.networkInterfaces() does not list is not
 * listened on: 127.0.0.5 on Linux's loopback, say, where only 127.0.0.1 is
 * configured.
 */

import dgram from 'node:dgram';
import { closeSync } from 'node:fs';
import os from 'node:os';
import { handleFd } from './fd_pass.js';
import { ignoreError } from './log.js';
import { ipv4ToU32, u32ToIpv4 } from './protocol.js';
import {
	type AddressChanges, type AddressLister, ignoreDatagram, type PassedUdpSocket, sendable, transportError,
	type UdpTransport, type UdpTransportError,
} from './udp_transport.js';

/* Room for bursts while the event loop is busy elsewhere (udp_batch.c sets the same). */
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

/* Bound to one address or, for 0.0.0.0, one socket per host address (WILDCARD BINDS above). */
export class DgramTransport implements UdpTransport {
	readonly kind = 'dgram';
	onDatagram: (msg: Buffer, addr: number, port: number, len: number, local: number) => void = ignoreDatagram;
	onError: (err: UdpTransportError) => void = ignoreError;
	private state: 'new' | 'binding' | 'open' | 'sending only' | 'closed' = 'new';
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

	bind(address: string, port: number): Promise<void> {
		return this.start(address, port, null);
	}

	/* A wildcard bind passes one socket per address; a specific one, its one socket. */
	adopt(address: string, sockets: PassedUdpSocket[]): Promise<void> {
		return this.start(address, 0, sockets);
	}

	private async start(address: string, port: number, passed: PassedUdpSocket[] | null): Promise<void> {
		if (this.state !== 'new') {
			passed?.forEach((s) => closeSync(s.fd));
			throw transportError('ERR_SOCKET_ALREADY_BOUND', 'UDP transport already bound', 0);
		}
		this.state = 'binding';
		try {
			if (passed !== null) {
				await this.adoptAll(address, passed);
			} else if (address !== '0.0.0.0') {
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

	/* Each passed socket as open() would have made it; any that cannot be taken up are closed. */
	private async adoptAll(address: string, passed: PassedUdpSocket[]): Promise<void> {
		const wildcard = address === '0.0.0.0';
		let i = 0;
		try {
			if (passed.length === 0 || (!wildcard && passed.length !== 1)) {
				throw transportError('EINVAL', `cannot take over ${passed.length} UDP sockets for ${address}`
					+ ' (was the other bbal using the native transport? both must use the same: see BBAL_UDP)', 0);
			}
			for (; i < passed.length; i++) {
				const s = passed[i];
				const local = wildcard ? ipv4ToU32(s.address) : 0;
				const ep = await this.open(s.address, 0, local, s.fd);
				if (wildcard) {
					this.byLocal.set(local, ep);
				} else {
					this.only = ep;
				}
				this.port = ep.socket.address().port;
			}
		} finally {
			for (i++; i < passed.length; i++) {
				closeSync(passed[i].fd);
			}
		}
	}

	/*
	 * A socket bound to address:port (or the one passed over as `fd`), its
	 * handlers attached; rejects with the bind error (its .address says
	 * which address), or if the transport was closed meanwhile.
	 */
	private open(address: string, port: number, local: number, fd?: number): Promise<Endpoint> {
		/* No reuseAddr: with it, another socket asking for it too could bind this port and take its datagrams (udp_batch.c). */
		const socket = dgram.createSocket({ type: 'udp4', lookup: literalLookup });
		return new Promise((resolve, reject) => {
			const onError = (err: Error): void => {
				socket.close();
				reject(err);
			};
			socket.once('error', onError);
			socket.bind(fd === undefined ? { address, port, exclusive: true } : { fd, exclusive: true }, () => {
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

	/* Every socket: the one of a specific bind, or one per address. */
	private endpoints(): Endpoint[] {
		return this.only !== null ? [this.only] : [...this.byLocal.values()];
	}

	sockets(): PassedUdpSocket[] {
		return this.endpoints().map((ep) => ({ fd: handleFd(ep.socket), address: ep.address })).filter((s) => s.fd >= 0);
	}

	/* dgram has no public way to stop reading and keep sending; its handle's recvStop() is what close() uses. */
	stopReading(): void {
		if (this.state !== 'open') {
			return;
		}
		this.state = 'sending only';
		for (const ep of this.endpoints()) {
			(ep.socket as unknown as { _handle?: { recvStop?: () => void } })._handle?.recvStop?.();
		}
	}

	private readonly socketOnError = (err: Error): void => {
		const e = err as UdpTransportError;
		e.dropped = 1;
		this.onError(e);
	};

	send(payload: Uint8Array, addr: number, port: number, local = 0): boolean {
		if ((this.state !== 'open' && this.state !== 'sending only') || !sendable(payload, port)) {
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
		const eps = this.endpoints();
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
