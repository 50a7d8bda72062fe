/*
 * CHAOS LOAD DRIVER
 *
 * Sends DNS queries to bbal at a fixed rate from many source addresses in
 * 127/8 and records the fate of every one of them.  The chaos scenarios
 * (scenarios.ts) read those records to say, query by query, what a fault
 * cost.
 *
 * THE SCHEDULE.  Queries go out on a fixed schedule, not as fast as answers
 * come back: query n is due at start + n / rate.  A timer wakes every few
 * milliseconds and sends whatever is due, so a stall of the driver is caught
 * up at once rather than quietly lowering the rate, and a fault that slows
 * bbal cannot slow the load (an open-loop generator, as real resolvers
 * are).  The sources take turns, so each of the N addresses sends rate / N
 * queries a second.
 *
 * UDP AND TCP.  Every source has one UDP socket bound to its address, so to
 * bbal each address is one remote.  One query in `tcpEvery` goes over TCP
 * instead, spread over all the sources (each source's every tcpEvery-th): a
 * fresh connection from the same source address (so bbal routes it
 * like that host's UDP), one length-prefixed query, the answer, close.  A
 * refused or reset connection, or one closed before the answer, is a lost
 * query like a UDP query that got no answer.
 *
 * FATES.  Each query's name is unique (q<seq>-<src>.chaos.example), and an
 * answer counts only if it carries both our id and our name, so a very late
 * answer to an older query can never be taken for the answer to a newer one.
 * A query is:
 *   ok        answered by a backend: the answer carries the fixture's
 *             `be=<label>` TXT record, and we keep the label;
 *   backend servfail
 *             answered SERVFAIL by a backend: the fixture in its servfail
 *             mode puts its `be=<label>` in the additional section (answerLabel
 *             reads both sections), and we keep the label;
 *   servfail  answered SERVFAIL without a label: bbal's own answer when no
 *             backend is ok;
 *   lost      no answer within timeoutMs (an answer after that is ignored:
 *             a resolver would long have retried), or, over TCP, the
 *             connection failed or closed first.
 * Latency is measured on the monotonic clock; the send time is also kept on
 * the wall clock (Date.now), which is what bbal's log timestamps use, so a
 * query can be placed against the moment bbal logged a fault.
 *
 * Timeouts are found by one sweep every 20 ms over the queries in flight,
 * kept in send order, rather than by a timer per query.
 *
 * STALLS OF THE DRIVER ITSELF (a busy machine) must not be charged to bbal.
 * After one (over 100 ms between two sweeps), timers run before the answers
 * that waited in the driver's sockets are read, so no timeout is judged for
 * the next 250 ms; and the queries that fell more than 100 ms behind the
 * schedule are skipped rather than sent in one burst.  Stalls are recorded
 * (wall-clock intervals) and reported with each scenario, so a reader can
 * see when the figures were taken on a machine too busy to trust them.
 */

import dgram from 'node:dgram';
import type net from 'node:net';
import dnsPacket from 'dns-packet';
import { TcpDnsClient } from '../support/dns_client.js';
import { backendOf, encodeQuery, framed } from '../support/dns_messages.js';

export type Fate = 'ok' | 'backend servfail' | 'servfail' | 'lost';

export interface QueryRecord {
	seq: number;
	/** Index into the driver's sources. */
	src: number;
	tcp: boolean;
	/** Wall-clock send time, ms since the epoch. */
	sentAt: number;
	/** Milliseconds to the answer; -1 when lost. */
	latencyMs: number;
	fate: Fate;
	/** The answering backend's label (fate ok or backend servfail), else null. */
	backend: string | null;
	/** Why a query was lost, when something said so (ECONNREFUSED, closed). */
	error: string | null;
}

export interface LoadOptions {
	port: number;
	host?: string;
	sources: string[];
	/** Queries per second, all sources together. */
	rate: number;
	/** Every n-th query goes over TCP; 0 for none. */
	tcpEvery: number;
	timeoutMs: number;
}

interface Pending {
	rec: QueryRecord;
	startedAt: number;
	id: number;
	name: string;
	done: boolean;
	sock: net.Socket | null;
}

const RCODE_SERVFAIL = 2;
const SWEEP_MS = 20;
/* A gap between sweeps this long means the driver's own event loop stalled. */
const STALL_MS = 100;
/* After a stall, how long to let the sockets' backlog be read before judging timeouts again. */
const STALL_SETTLE_MS = 250;
const TICK_MS = 2;

export class LoadDriver {
	/* Finished queries, in the order they finished; the owner trims it. */
	records: QueryRecord[] = [];
	readonly sources: string[];
	private readonly opts: Required<LoadOptions>;
	private udp: dgram.Socket[] = [];
	/* Per source: id -> pending UDP query. */
	private byId: Array<Map<number, Pending>> = [];
	private nextId: number[] = [];
	/* Everything in flight, in send order (done entries are skipped). */
	private inflight: Pending[] = [];
	private inflightHead = 0;
	private seq = 0;
	private startMono = 0;
	private running = false;
	private paused = false;
	private tickTimer: NodeJS.Timeout | null = null;
	private sweepTimer: NodeJS.Timeout | null = null;
	private readonly tcpSockets = new Set<net.Socket>();
	/** Answers that matched nothing in flight (late, or foreign). */
	strayAnswers = 0;
	/** Most queries the schedule had to send in one wake-up (driver lag). */
	maxBurst = 0;
	/** Longest gap between two sweeps: how long the driver itself stalled (reset by the reader). */
	maxStallMs = 0;
	private lastSweep = performance.now();
	private judgeAfter = 0;
	/** Wall-clock intervals in which the driver's own event loop stalled over 100 ms (reset by the reader). */
	stalls: Array<[number, number]> = [];
	/** Queries never sent because they fell more than 100 ms behind the schedule during a stall. */
	skipped = 0;

	constructor(opts: LoadOptions) {
		this.opts = { host: '127.0.0.1', ...opts };
		this.sources = opts.sources;
	}

	get sent(): number {
		return this.seq;
	}

	get inFlight(): number {
		return this.inflight.length - this.inflightHead;
	}

	async start(): Promise<void> {
		for (let i = 0; i < this.sources.length; i++) {
			const sock = await bindUdp(this.sources[i]);
			sock.on('message', (msg) => this.udpOnMessage(i, msg));
			sock.on('error', () => {});
			this.udp.push(sock);
			this.byId.push(new Map());
			this.nextId.push(1 + Math.floor(Math.random() * 0xfff0));
		}
		this.running = true;
		this.startMono = performance.now();
		this.tickTimer = setInterval(this.tick, TICK_MS);
		this.sweepTimer = setInterval(this.sweep, SWEEP_MS);
	}

	/** Stop sending; wait for what is in flight to be answered or time out. */
	async stop(): Promise<void> {
		if (!this.running) {
			return;
		}
		this.running = false;
		if (this.tickTimer !== null) {
			clearInterval(this.tickTimer);
		}
		const deadline = performance.now() + this.opts.timeoutMs + 200;
		while (this.inFlight > 0 && performance.now() < deadline) {
			await new Promise((r) => setTimeout(r, SWEEP_MS));
		}
		if (this.sweepTimer !== null) {
			clearInterval(this.sweepTimer);
		}
		for (const s of this.tcpSockets) {
			s.destroy();
		}
		await Promise.all(this.udp.map((s) => new Promise<void>((r) => s.close(() => r()))));
		this.udp = [];
	}

	/** Resolves once every query sent before wall time `t` has a fate. */
	async settled(t: number): Promise<void> {
		for (;;) {
			this.sweep();
			const head = this.inflight[this.inflightHead];
			if (head === undefined || head.rec.sentAt >= t) {
				return;
			}
			await new Promise((r) => setTimeout(r, SWEEP_MS));
		}
	}

	/** Remove and return finished records sent before wall time t. */
	take(before = Infinity): QueryRecord[] {
		const out: QueryRecord[] = [];
		const keep: QueryRecord[] = [];
		for (const r of this.records) {
			(r.sentAt < before ? out : keep).push(r);
		}
		this.records = keep;
		return out;
	}

	/** Change the rate (and the TCP share) from now on; the schedule is re-anchored, no catch-up. */
	setRate(rate: number, tcpEvery = this.opts.tcpEvery): void {
		this.opts.tcpEvery = tcpEvery;
		this.opts.rate = rate;
		this.startMono = performance.now() - this.seq * 1000 / rate;
	}

	/*
	 * Stop sending for a moment and wait until nothing is in flight, so that
	 * bbal's descriptors can be counted at rest (a TCP query in flight holds
	 * two).  The schedule resumes where it left off, without a catch-up burst.
	 */
	async quiesce<T>(fn: () => Promise<T>): Promise<T> {
		this.paused = true;
		const pausedAt = performance.now();
		try {
			const deadline = pausedAt + this.opts.timeoutMs + 200;
			while (this.inFlight > 0 && performance.now() < deadline) {
				this.sweep();
				await new Promise((r) => setTimeout(r, 5));
			}
			return await fn();
		} finally {
			this.startMono += performance.now() - pausedAt;
			this.paused = false;
		}
	}

	private readonly tick = (): void => {
		if (!this.running || this.paused) {
			return;
		}
		const now = performance.now();
		let n = Math.floor((now - this.startMono) * this.opts.rate / 1000) - this.seq;
		if (n > this.maxBurst) {
			this.maxBurst = n;
		}
		/* After a stall, no catch-up burst bbal would have to absorb: what is 100 ms late is skipped. */
		const cap = Math.ceil(this.opts.rate / 10);
		if (n > cap) {
			this.skipped += n - cap;
			this.startMono += (n - cap) * 1000 / this.opts.rate;
			n = cap;
		}
		for (let i = 0; i < n; i++) {
			this.sendOne();
		}
	};

	private sendOne(): void {
		const seq = this.seq++;
		const src = seq % this.sources.length;
		/* Every source in turn, every tcpEvery-th round offset by the source: TCP comes from all of them. */
		const round = Math.floor(seq / this.sources.length);
		const tcp = this.opts.tcpEvery > 0 && (round + src) % this.opts.tcpEvery === 0;
		const id = this.nextId[src];
		this.nextId[src] = id >= 0xffff ? 1 : id + 1;
		const name = `q${seq}-${src}.chaos.example`;
		const rec: QueryRecord = {
			seq, src, tcp, sentAt: Date.now(), latencyMs: -1, fate: 'lost', backend: null, error: null,
		};
		const p: Pending = { rec, startedAt: performance.now(), id, name, done: false, sock: null };
		this.inflight.push(p);
		const query = encodeQuery(name, 'TXT', id);
		if (tcp) {
			this.sendTcp(p, query);
		} else {
			const map = this.byId[src];
			const old = map.get(id);
			if (old !== undefined) {
				this.finish(old, 'lost', null, 'id reused while in flight');
			}
			map.set(id, p);
			(this.udp[src]).send(query, this.opts.port, this.opts.host, (err) => {
				if (err) {
					this.finish(p, 'lost', null, `send: ${err.message}`);
				}
			});
		}
	}

	private sendTcp(p: Pending, query: Buffer): void {
		const { sock } = new TcpDnsClient({
			host: this.opts.host, port: this.opts.port, source: this.sources[p.rec.src], data: framed(query),
			/* The first message is the answer or nothing: either way the connection has done its work. */
			onMessage: (msg) => {
				if (!sock.destroyed) {
					this.answer(p, msg);
					sock.destroy();
				}
			},
		});
		p.sock = sock;
		this.tcpSockets.add(sock);
		sock.on('error', (err: NodeJS.ErrnoException) => this.finish(p, 'lost', null, err.code ?? err.message));
		sock.on('close', () => {
			this.tcpSockets.delete(sock);
			this.finish(p, 'lost', null, 'closed before the answer');
		});
	}

	private udpOnMessage(src: number, msg: Buffer): void {
		if (msg.length < 2) {
			this.strayAnswers++;
			return;
		}
		const p = (this.byId[src]).get(msg.readUInt16BE(0));
		if (p === undefined || p.done) {
			this.strayAnswers++;
			return;
		}
		this.answer(p, msg);
	}

	/* A message that may answer p: check it, then finish p. */
	private answer(p: Pending, msg: Buffer): void {
		let pkt: dnsPacket.Packet;
		try {
			pkt = dnsPacket.decode(msg);
		} catch {
			this.strayAnswers++;
			return;
		}
		const q = pkt.questions?.[0];
		if (pkt.id !== p.id || q === undefined || q.name.toLowerCase() !== p.name) {
			this.strayAnswers++;
			return;
		}
		const rcode = (pkt.flags ?? 0) & 0x0f;
		const be = backendOf(pkt);
		const erredBy = be === null ? answerLabel(pkt) : null;
		if (be !== null) {
			this.finish(p, 'ok', be, null);
		} else if (rcode === RCODE_SERVFAIL) {
			this.finish(p, erredBy !== null ? 'backend servfail' : 'servfail', erredBy, null);
		} else {
			this.finish(p, 'lost', null, erredBy !== null ? `an error from ${erredBy} (rcode ${rcode})`
				: `answer without a backend label (rcode ${rcode})`);
		}
	}

	private finish(p: Pending, fate: Fate, backend: string | null, error: string | null): void {
		if (p.done) {
			return;
		}
		p.done = true;
		const rec = p.rec;
		rec.fate = fate;
		rec.backend = backend;
		rec.error = error;
		if (fate !== 'lost') {
			rec.latencyMs = performance.now() - p.startedAt;
		}
		if (!rec.tcp) {
			const map = this.byId[rec.src];
			if (map.get(p.id) === p) {
				map.delete(p.id);
			}
		} else if (p.sock !== null) {
			p.sock.destroy();
			p.sock = null;
		}
		this.records.push(rec);
	}

	private readonly sweep = (): void => {
		const now = performance.now();
		const lag = now - this.lastSweep;
		this.lastSweep = now;
		if (lag > this.maxStallMs && this.running) {
			this.maxStallMs = lag;
		}
		/*
		 * After a stall of the driver itself, timers run before the answers
		 * waiting in its sockets are read: judge nothing until they have been.
		 */
		if (lag > STALL_MS) {
			this.judgeAfter = now + STALL_SETTLE_MS;
			this.stalls.push([Math.round(Date.now() - lag), Date.now()]);
		}
		if (now < this.judgeAfter) {
			return;
		}
		const limit = this.opts.timeoutMs;
		const q = this.inflight;
		let h = this.inflightHead;
		while (h < q.length) {
			const p = q[h];
			if (!p.done) {
				if (now - p.startedAt < limit) {
					break;
				}
				this.finish(p, 'lost', null, p.rec.error ?? 'timeout');
			}
			h++;
		}
		if (h > 4096 && h * 2 > q.length) {
			this.inflight = q.slice(h);
			h = 0;
		}
		this.inflightHead = h;
	};
}

/*
 * The label of the backend that wrote an answer: the fixture's `be=<label>`
 * TXT record, in the answer section of an answer and in the additional
 * section of an error (its servfail, refused and nxdomain modes), or null
 * when neither has one (an answer bbal made up).
 */
export function answerLabel(pkt: dnsPacket.Packet): string | null {
	return backendOf(pkt) ?? backendOf({ answers: pkt.additionals ?? [] });
}

function bindUdp(address: string): Promise<dgram.Socket> {
	return new Promise((resolve, reject) => {
		const sock = dgram.createSocket('udp4');
		sock.once('error', reject);
		sock.bind(0, address, () => {
			sock.removeListener('error', reject);
			resolve(sock);
		});
	});
}

/** n source addresses 127.0.<base>.1 .. */
export function chaosSources(n: number, base = 100): string[] {
	return Array.from({ length: n }, (_, i) => `127.${base + Math.floor(i / 250)}.0.${1 + (i % 250)}`);
}
