/*
 * DNS CLIENTS, OVER UDP AND TCP, FROM A CHOSEN 127.0.0.x
 *
 * bbal keys its remotes on the client's address, so every client here is
 * bound to a source address the caller chooses in 127.0.0.0/8 (Linux
 * routes all of it to loopback): each address is a different host to bbal.
 * Queries go to bbal on 127.0.0.1 (or `host`) at the port given.
 *
 * UDP.  A UdpDnsClient is one socket that keeps every datagram it receives
 * (bytes, arrival time, sender): send() a query, wait for reply(id), or
 * quiet() until nothing more arrives, for "dropped" in the edge tests.
 * udpQuery() is one query from a fresh socket: a reply whose id is not
 * ours is ignored, so a stray datagram cannot confuse a test; only a
 * matching reply or the deadline ends it.  queryUntil() queries every
 * 100 ms until the answering backend satisfies a condition ("this remote
 * moves to another backend within a second or two").
 *
 * TCP.  A TcpDnsClient is one connection: everything it receives is split
 * into messages by the tests' one LengthPrefixReader (dns_messages.ts) and
 * kept, as is the count of bytes, and its end and close are noticed.
 * answer(id) waits for the message with that id and rejects at once if the
 * connection closes or fails first; until() waits for any condition on it.
 * It takes the first bytes to write at connect (queries written before the
 * session is up, garbage, half a length prefix), and an onMessage callback
 * for a caller that reacts to each message itself (the chaos load driver).
 * tcpQuery() is one query on a fresh connection, closed afterwards; with
 * halfClose it sends the query with a FIN and waits for bbal to close, the
 * whole graceful path.  Its failures carry a code: ETIMEDOUT (no answer in
 * time), ECLOSED (closed before the answer) or the socket's own.
 *
 * Every waiting call has a deadline and rejects saying what was seen (with
 * code ETIMEDOUT when the deadline passed).
 * Clients opened with a Teardowns (tap's Test) are closed on teardown;
 * the one-shot functions close their own.
 */

import dgram from 'node:dgram';
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import dnsPacket from 'dns-packet';
import { backendOf, encodeQuery, framed, LengthPrefixReader, type QueryOptions } from './dns_messages.js';
import type { Teardowns } from './process.js';
import { Changes, sleep } from './wait.js';

const DEFAULT_HOST = '127.0.0.1';
/** How long one answer is waited for unless a test says otherwise. */
const ANSWER_TIMEOUT_MS = 2000;
/** How long a UDP client must hear nothing to be "quiet". */
const QUIET_MS = 300;

/* The id of a DNS message, or -1 for one too short to have one. */
const idOf = (msg: Buffer): number => (msg.length >= 2 ? msg.readUInt16BE(0) : -1);
const randomId = (): number => Math.floor(Math.random() * 0x10000);

/** An error a client can branch on: ETIMEDOUT, ECLOSED, or the socket's code. */
function clientError(code: string, message: string): NodeJS.ErrnoException {
	return Object.assign(new Error(message), { code });
}

/* ------------------------------------------------------------------ */
/* UDP                                                                 */
/* ------------------------------------------------------------------ */

export interface Datagram {
	bytes: Buffer;
	/** performance.now() at arrival. */
	at: number;
	from: dgram.RemoteInfo;
}

export class UdpDnsClient {
	readonly datagrams: Datagram[] = [];
	private error: Error | null = null;
	private readonly changes = new Changes();

	private constructor(readonly sock: dgram.Socket, readonly source: string, readonly port: number,
		readonly host: string) {
		sock.on('message', (bytes, from) => {
			this.datagrams.push({ bytes, at: performance.now(), from });
			this.changes.changed();
		});
		sock.on('error', (err) => {
			this.error = err;
			this.changes.changed();
		});
	}

	/** A socket bound to `source`, talking to host:port; closed on t's teardown when t is given. */
	static open(t: Teardowns | null, port: number, source: string, host = DEFAULT_HOST): Promise<UdpDnsClient> {
		return new Promise((resolve, reject) => {
			const sock = dgram.createSocket('udp4');
			sock.once('error', (err) => { sock.close(); reject(err); });
			sock.bind(0, source, () => {
				sock.removeAllListeners('error');
				const client = new UdpDnsClient(sock, source, port, host);
				t?.teardown(() => client.close());
				resolve(client);
			});
		});
	}

	/** Send one datagram; resolves with the time it went (performance.now()). */
	send(bytes: Uint8Array): Promise<number> {
		return new Promise((resolve, reject) => {
			const at = performance.now();
			this.sock.send(bytes, this.port, this.host, (err) => (err ? reject(err) : resolve(at)));
		});
	}

	/** The first datagram with this id; rejects on a socket error or after timeoutMs. */
	async reply(id: number, timeoutMs = ANSWER_TIMEOUT_MS): Promise<Datagram> {
		let found: Datagram | undefined;
		await this.changes.until(() => {
			found = this.datagrams.find((d) => idOf(d.bytes) === id);
			if (found === undefined && this.error !== null) {
				throw this.error;
			}
			return found !== undefined;
		}, timeoutMs, `${this.source}: reply ${id} to port ${this.port}`,
		() => `${this.datagrams.length} datagrams received`);
		return found as unknown as Datagram;
	}

	/* Wait until nothing has arrived for `ms`; the datagrams received. */
	async quiet(ms = QUIET_MS): Promise<Buffer[]> {
		for (let n = -1; n !== this.datagrams.length;) {
			n = this.datagrams.length;
			await sleep(ms);
		}
		return this.datagrams.map((d) => d.bytes);
	}

	/** Idempotent. */
	close(): Promise<void> {
		return new Promise((resolve) => {
			try {
				this.sock.close(() => resolve());
			} catch {
				resolve(); /* closed already */
			}
		});
	}
}

/** One query to bbal on 127.0.0.1:port; a random id and type TXT unless given. */
export interface OneQuery {
	port: number;
	/* The client's address, any 127.0.0.x; bbal keys remotes on it. */
	source: string;
	name: string;
	type?: dnsPacket.RecordType;
	id?: number;
	/* How long the answer is waited for (2 s unless given). */
	timeoutMs?: number;
}

export interface UdpQueryOptions extends OneQuery {
	/* Advertise this EDNS UDP payload size (mname answers past 512 only then). */
	edns?: number;
}

/** An answer, decoded, and the backend that gave it. */
export interface Answer {
	packet: dnsPacket.Packet;
	/* The label from the `be=` TXT answer, or null if there is none. */
	backend: string | null;
}

export interface UdpQueryResult extends Answer {
	/* Where the reply came from (bbal's address and DNS port). */
	from: dgram.RemoteInfo;
	bytes: Buffer;
}

/* One query from a fresh socket bound to `source`. */
export async function udpQuery(opts: UdpQueryOptions): Promise<UdpQueryResult> {
	const id = opts.id ?? randomId();
	const client = await UdpDnsClient.open(null, opts.port, opts.source);
	try {
		await client.send(encodeQuery(opts.name, opts.type ?? 'TXT', id, { edns: opts.edns }));
		const { bytes, from } = await client.reply(id, opts.timeoutMs ?? ANSWER_TIMEOUT_MS).catch((err: Error) => {
			throw new Error(`udpQuery ${opts.name}: ${err.message}`);
		});
		let packet: dnsPacket.Packet;
		try {
			packet = dnsPacket.decode(bytes);
		} catch (err) {
			throw new Error(`udpQuery: undecodable reply: ${String(err)}`);
		}
		return { packet, backend: backendOf(packet), from, bytes };
	} finally {
		await client.close();
	}
}

/* Send arbitrary bytes as one datagram from `source`; expect nothing back. */
export async function udpSendRaw(opts: { port: number; source: string; bytes: Uint8Array }): Promise<void> {
	const client = await UdpDnsClient.open(null, opts.port, opts.source);
	try {
		await client.send(opts.bytes);
	} finally {
		await client.close();
	}
}

export interface QueryUntilOptions extends Omit<UdpQueryOptions, 'timeoutMs'> {
	/* Checked against each answer's backend label (null: no TXT, no answer). */
	until: (backend: string | null) => boolean;
	timeoutMs?: number;
	intervalMs?: number;
}

/*
 * Query every 100 ms until the answering backend satisfies `until`.  A
 * query that times out counts as backend null and the loop goes on.
 * Resolves with the satisfying answer (null if `until(null)` was what held
 * on a timeout); rejects with the sequence of backends seen, which is what
 * one wants to read when it fails.
 */
export async function queryUntil(opts: QueryUntilOptions): Promise<UdpQueryResult | null> {
	const { until, timeoutMs = 5000, intervalMs = 100, ...query } = opts;
	const deadline = Date.now() + timeoutMs;
	const seen: Array<string | null> = [];
	for (;;) {
		const remaining = deadline - Date.now();
		let res: UdpQueryResult | null = null;
		try {
			res = await udpQuery({ ...query, timeoutMs: Math.max(50, Math.min(1000, remaining)) });
		} catch {
			res = null;
		}
		const backend = res?.backend ?? null;
		seen.push(backend);
		if (until(backend)) {
			return res;
		}
		if (Date.now() + intervalMs > deadline) {
			break;
		}
		await sleep(intervalMs);
	}
	throw new Error(`queryUntil ${opts.name} from ${opts.source}: condition ` +
		`not met within ${timeoutMs} ms; backends seen: ${JSON.stringify(seen)}`);
}

/* ------------------------------------------------------------------ */
/* TCP                                                                 */
/* ------------------------------------------------------------------ */

export interface TcpDnsOptions {
	port: number;
	source: string;
	host?: string;
	/* Written as soon as the connection is up. */
	data?: Uint8Array;
	/* And then a FIN: the client half-closes. */
	halfClose?: boolean;
	/* Each whole message as it arrives (also kept in `messages`). */
	onMessage?: (msg: Buffer) => void;
}

export class TcpDnsClient {
	readonly sock: net.Socket;
	readonly source: string;
	/** Every whole message received, in order, as bytes. */
	readonly messages: Buffer[] = [];
	/** Bytes received, whole messages or not. */
	received = 0;
	connected = false;
	ended = false;
	closed = false;
	error: NodeJS.ErrnoException | null = null;
	/* Kept at connect: the socket forgets it once closed. */
	localPort = 0;
	private readonly chunks: Buffer[] = [];
	private readonly reader = new LengthPrefixReader();
	private readonly changes = new Changes();

	/** Start connecting at once; see connect() to wait for it. */
	constructor(opts: TcpDnsOptions) {
		this.source = opts.source;
		const sock = net.connect({ host: opts.host ?? DEFAULT_HOST, port: opts.port, localAddress: opts.source });
		this.sock = sock;
		sock.on('connect', () => {
			this.connected = true;
			this.localPort = sock.localPort ?? 0;
			if (opts.halfClose === true) {
				sock.end(opts.data ?? Buffer.alloc(0));
			} else if (opts.data !== undefined) {
				sock.write(opts.data);
			}
			this.changes.changed();
		});
		sock.on('data', (d: Buffer) => {
			this.received += d.length;
			this.chunks.push(d);
			for (const msg of this.reader.feed(d)) {
				this.messages.push(msg);
				opts.onMessage?.(msg);
			}
			this.changes.changed();
		});
		sock.on('end', () => { this.ended = true; this.changes.changed(); });
		sock.on('error', (err: NodeJS.ErrnoException) => { this.error = err; this.changes.changed(); });
		sock.on('close', () => { this.closed = true; this.changes.changed(); });
	}

	/** A connection from `source`, once it is up (rejects with the socket error if it fails); closed on teardown. */
	static async connect(t: Teardowns, port: number, source: string, data?: Uint8Array): Promise<TcpDnsClient> {
		const client = new TcpDnsClient({ port, source, data });
		t.teardown(() => { client.sock.destroy(); });
		await client.changes.until(() => {
			if (client.error !== null) {
				throw client.error;
			}
			return client.connected;
		}, 10_000, `${source}: connect to port ${port}`);
		return client;
	}

	/** Everything received, as one buffer. */
	bytes(): Buffer {
		return Buffer.concat(this.chunks);
	}

	/** Write one query, length-prefixed. */
	send(name: string, type: dnsPacket.RecordType, id: number, o?: QueryOptions): void {
		this.sock.write(framed(encodeQuery(name, type, id, o)));
	}

	/** send() one query and wait for its answer(). */
	ask(name: string, type: dnsPacket.RecordType, id: number, timeoutMs = ANSWER_TIMEOUT_MS): Promise<dnsPacket.Packet> {
		this.send(name, type, id);
		return this.answer(id, timeoutMs);
	}

	/* Resolve once pred() holds; reject after timeoutMs saying what was seen. */
	until(pred: () => boolean, timeoutMs: number, what: string): Promise<void> {
		return this.changes.until(pred, timeoutMs, `${this.source}:${this.localPort}: ${what}`, () => this.describe());
	}

	/** The answer with this id, decoded; rejects if the connection fails or closes first. */
	async answer(id: number, timeoutMs = ANSWER_TIMEOUT_MS): Promise<dnsPacket.Packet> {
		let found: Buffer | undefined;
		await this.changes.until(() => {
			found = this.messages.find((m) => idOf(m) === id);
			if (found === undefined) {
				if (this.error !== null) {
					throw this.error;
				}
				if (this.closed) {
					throw clientError('ECLOSED', `${this.source}:${this.localPort}: closed before answer ${id} ` +
						`(${this.describe()})`);
				}
			}
			return found !== undefined;
		}, timeoutMs, `${this.source}:${this.localPort}: answer ${id}`, () => this.describe());
		return dnsPacket.decode(found as unknown as Buffer);
	}

	closedByPeer(timeoutMs = ANSWER_TIMEOUT_MS): Promise<void> {
		return this.until(() => this.closed, timeoutMs, 'close');
	}

	private describe(): string {
		return `received ${this.received} bytes, ${this.messages.length} messages, ` +
			`ended ${this.ended}, closed ${this.closed}${this.error === null ? '' : `, ${this.error.code ?? this.error.message}`}`;
	}
}

/* timeoutMs runs from the connect to the answer (and, with halfClose, to bbal's close). */
export interface TcpQueryOptions extends OneQuery {
	/* Send the query with a FIN and wait for bbal to close the connection after the answer. */
	halfClose?: boolean;
}

/* One query on a fresh connection from `source`; the connection is closed afterwards. */
export async function tcpQuery(opts: TcpQueryOptions): Promise<Answer> {
	const id = opts.id ?? randomId();
	const timeoutMs = opts.timeoutMs ?? ANSWER_TIMEOUT_MS;
	const c = new TcpDnsClient({ port: opts.port, source: opts.source,
		data: framed(encodeQuery(opts.name, opts.type ?? 'TXT', id)), halfClose: opts.halfClose });
	try {
		if (opts.halfClose === true) {
			await c.until(() => c.closed, timeoutMs, 'close after the answer');
		}
		const packet = await c.answer(id, timeoutMs);
		return { packet, backend: backendOf(packet) };
	} finally {
		c.sock.destroy();
	}
}
