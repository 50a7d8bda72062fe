/*
 * DNS CLIENTS OVER UDP, FROM A CHOSEN 127.0.0.x
 *
 * bbal keys its remotes on the client's address, so every client here is
 * bound to a source address the caller chooses in 127.0.0.0/8 (Linux
 * routes all of it to loopback): each address is a different host to bbal.
 * Queries go to bbal on 127.0.0.1 (or `host`) at the port given.
 *
 * A UdpDnsClient is one socket that keeps every datagram it receives
 * (bytes, arrival time, sender): send() a query, wait for reply(id), or
 * quiet() until nothing more arrives, for "dropped" in the edge tests.
 * udpQuery() is one query from a fresh socket: a reply whose id is not
 * ours is ignored, so a stray datagram cannot confuse a test; only a
 * matching reply or the deadline ends it.  queryUntil() queries every
 * 100 ms until the answering backend satisfies a condition ("this remote
 * moves to another backend within a second or two").
 *
 * Every waiting call has a deadline and rejects saying what was seen (with
 * code ETIMEDOUT when the deadline passed).  Clients opened with a
 * Teardowns (tap's Test) are closed on teardown; the one-shot functions
 * close their own.
 */

import dgram from 'node:dgram';
import { performance } from 'node:perf_hooks';
import dnsPacket from 'dns-packet';
import { backendOf, encodeQuery } from './dns_messages.js';
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

export interface UdpQueryOptions {
	port: number;
	/* The client's address, any 127.0.0.x; bbal keys remotes on it. */
	source: string;
	name: string;
	type?: dnsPacket.RecordType;
	id?: number;
	timeoutMs?: number;
	/* Advertise this EDNS UDP payload size (mname answers past 512 only then). */
	edns?: number;
}

export interface UdpQueryResult {
	packet: dnsPacket.Packet;
	/* The label from the `be=` TXT answer, or null if there is none. */
	backend: string | null;
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
