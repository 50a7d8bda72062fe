/*
 * HOSTILE CLIENTS, A PROCESS OF THEIR OWN
 *
 * Usage: node dist/test/chaos/hostile_clients.js <port> <statsSocket> <maxTcpConnections> [ATTACKS]
 *
 * ATTACKS is a comma-separated subset of lockout,unread,stats,junk (all
 * four by default), to tell which one hurts when the scenario fails.
 *
 * The attackers of the hostile chaos scenario (hostile.ts has the plan and
 * the verdict).  They run in a process of their own, as the fake backend
 * does, so that opening hundreds of connections and binding thousands of
 * sockets does not stall the load driver, whose queries would then be
 * charged to bbal.  Each attacker keeps its attack going for as long as it
 * runs, counts what it did, and closes every socket it opened on stop; a
 * killed process closes them too (the scenario's teardown).
 *
 *   lockout   one source (127.200.0.1) opens bbal's TCP cap and more
 *             (maxTcpConnections + 88) and trickles one byte of a valid
 *             query on each every 3 s, under the 10-s idle deadline, never
 *             completing it.  A connection bbal closes is opened again (200
 *             a second at most): an attacker does not give up, so whatever
 *             bbal does about it must hold for the whole attack.
 *   unread    128 clients from 8 sources (127.201.0.1-8, 16 each) pipeline
 *             200 queries each for `big.` (sixty A records, about 1 KB an
 *             answer, from every backend of the fleet) and never read a
 *             byte: 25,600 answers, 26 MB, that nobody takes; then one more
 *             query every 3 s.  Closed ones are opened again, as above.
 *   stats     20 connections to bbal's stats socket that never read (bbal
 *             serves 8 at once), each writing a newline every 3 s; closed
 *             ones opened again.  (A socket that never reads notices its
 *             close only when it writes: hence the writes.)
 *   junk      200 new source addresses a second (127.202.0.1 upwards, one
 *             UDP socket bound to each, then closed), each sending four
 *             datagrams: 3 bytes, a response (QR set), a query with no
 *             question, an IQUERY.  None passes bbal's header check.
 *
 * The sources are disjoint from the load's (load.ts chaosSources:
 * 127.100.0.x and up, one /16 per 250 sources).
 *
 * Protocol, one line each way: it prints `ready <plan as JSON>` once
 * started; `start` on stdin starts every attack (`done start <Date.now()>`),
 * `stop` stops them and closes every socket (`done stop <counts as JSON>`,
 * with how many connections each attacker held just before).  stdin closed
 * or SIGTERM: stop and exit.
 */

import dgram from 'node:dgram';
import net from 'node:net';
import readline from 'node:readline';
import { encodeQuery, framed } from '../support/dns_messages.js';
import { sleep } from '../support/wait.js';

const ATTACKS = ['lockout', 'unread', 'stats', 'junk'];
const [portArg, statsSocket, maxTcpArg, attacksArg = ATTACKS.join(',')] = process.argv.slice(2);
const port = Number(portArg);
const maxTcp = Number(maxTcpArg);
const attacks = new Set(attacksArg.split(',').filter((a) => a !== ''));
if (!(port > 0) || statsSocket === undefined || !(maxTcp > 0) || [...attacks].some((a) => !ATTACKS.includes(a))) {
	process.stderr.write('usage: hostile_clients.js <port> <statsSocket> <maxTcpConnections> [lockout,unread,stats,junk]\n');
	process.exit(2);
}

const LOCKOUT_SOURCE = '127.200.0.1';
/* More than the cap, so that the cap is reached whatever else is open. */
const LOCKOUT_CONNECTIONS = maxTcp + 88;
/* Under the 10-s idle deadline (README, --tcp-idle-timeout). */
const LOCKOUT_TRICKLE_MS = 3000;
const UNREAD_SOURCES = 8;
const UNREAD_PER_SOURCE = 16;
const UNREAD_QUERIES = 200;
const STATS_HOGS = 20;
const JUNK_SOURCES_PER_SEC = 200;
const JUNK_TICK_MS = 50;
/* Connections opened again per 100 ms, per attacker, at most. */
const REOPEN_PER_TICK = 20;
const REOPEN_TICK_MS = 100;

/* Four datagrams bbal's header check refuses (dns.ts): short, a response, no question, IQUERY. */
function junkDatagrams(): Buffer[] {
	const header = (flags: number, qd: number): Buffer => {
		const b = Buffer.alloc(12);
		b.writeUInt16BE(0x4a4b, 0);
		b.writeUInt16BE(flags, 2);
		b.writeUInt16BE(qd, 4);
		return b;
	};
	return [Buffer.from([0x4a, 0x4b, 0x00]), header(0x8000, 1), header(0x0100, 0), header(0x0800, 1)];
}

/* Counts one attacker keeps. */
interface AttackCounts {
	/** Connections (or datagram sockets) opened. */
	opened: number;
	/** Of those, handshakes completed (connect event). */
	connected: number;
	/** Closed by the other side (bbal, or the kernel for it), not by us. */
	closedByPeer: number;
	/** Most connected at one moment. */
	maxHeld: number;
	/** The longest a connection stayed open, ms. */
	longestMs: number;
	/** Bytes or datagrams written, whatever the attacker counts in. */
	written: number;
}

/*
 * A pool of stream connections kept at `want` open: one lost is opened
 * again on the next reopen tick, REOPEN_PER_TICK at most per tick.
 */
class ConnectionPool {
	readonly counts: AttackCounts = { opened: 0, connected: 0, closedByPeer: 0, maxHeld: 0, longestMs: 0, written: 0 };
	private readonly open = new Map<net.Socket, { connectedAt: number }>();
	private held = 0;
	private stopping = false;
	private timer: NodeJS.Timeout | null = null;
	private n = 0;

	constructor(private readonly want: number, private readonly connect: (i: number) => net.Socket,
		private readonly onConnect: (sock: net.Socket) => void) {}

	get size(): number {
		return this.open.size;
	}

	sockets(): IterableIterator<net.Socket> {
		return this.open.keys();
	}

	start(): void {
		this.fill(this.want);
		this.timer = setInterval(() => this.fill(REOPEN_PER_TICK), REOPEN_TICK_MS);
	}

	private fill(max: number): void {
		for (let k = 0; k < max && this.open.size < this.want && !this.stopping; k++) {
			const sock = this.connect(this.n++);
			const st = { connectedAt: 0 };
			this.open.set(sock, st);
			this.counts.opened++;
			sock.on('error', () => {});
			sock.on('connect', () => {
				st.connectedAt = Date.now();
				this.counts.connected++;
				this.held++;
				this.counts.maxHeld = Math.max(this.counts.maxHeld, this.held);
				this.onConnect(sock);
			});
			sock.on('close', () => {
				this.open.delete(sock);
				if (st.connectedAt > 0) {
					this.held--;
					this.counts.longestMs = Math.max(this.counts.longestMs, Date.now() - st.connectedAt);
				}
				if (!this.stopping) {
					this.counts.closedByPeer++;
				}
			});
		}
	}

	/** Stop reopening, destroy every socket, resolve once all have closed. */
	async stop(): Promise<void> {
		this.stopping = true;
		if (this.timer !== null) {
			clearInterval(this.timer);
		}
		const now = Date.now();
		for (const [sock, st] of this.open) {
			if (st.connectedAt > 0) {
				this.counts.longestMs = Math.max(this.counts.longestMs, now - st.connectedAt);
			}
			sock.destroy();
		}
		while (this.open.size > 0) {
			await sleep(20);
		}
	}
}

/* The junk flood: fresh sources, four bad datagrams each. */
class JunkFlood {
	sources = 0;
	sent = 0;
	errors = 0;
	private timer: NodeJS.Timeout | null = null;
	private readonly pending = new Set<dgram.Socket>();
	private readonly datagrams = junkDatagrams();

	constructor(private readonly port: number) {}

	/* On a schedule, as the load driver's: a tick that comes late sends what fell due meanwhile (a second's worth at most). */
	start(): void {
		const startedAt = performance.now();
		this.timer = setInterval(() => {
			const due = Math.floor((performance.now() - startedAt) * JUNK_SOURCES_PER_SEC / 1000);
			for (let k = Math.min(due - this.sources, JUNK_SOURCES_PER_SEC); k > 0; k--) {
				this.one(this.sources++);
			}
		}, JUNK_TICK_MS);
	}

	/* Source i: 127.202.0.1, ... 127.202.0.250, 127.202.1.1, ... (64,000 before it wraps). */
	private one(i: number): void {
		const j = i % 64_000;
		const source = `127.202.${Math.floor(j / 250)}.${1 + (j % 250)}`;
		const sock = dgram.createSocket('udp4');
		this.pending.add(sock);
		const done = (): void => {
			if (this.pending.delete(sock)) {
				sock.close();
			}
		};
		sock.on('error', () => {
			this.errors++;
			done();
		});
		sock.bind(0, source, () => {
			let left = this.datagrams.length;
			for (const d of this.datagrams) {
				sock.send(d, this.port, '127.0.0.1', (err) => {
					if (err) {
						this.errors++;
					} else {
						this.sent++;
					}
					if (--left === 0) {
						done();
					}
				});
			}
		});
	}

	async stop(): Promise<void> {
		if (this.timer !== null) {
			clearInterval(this.timer);
		}
		for (let i = 0; i < 100 && this.pending.size > 0; i++) {
			await sleep(20);
		}
		for (const sock of this.pending) {
			sock.close();
		}
		this.pending.clear();
	}
}

/** The four attacks together. */
class HostileClients {
	readonly lockout: ConnectionPool;
	readonly unread: ConnectionPool;
	readonly stats: ConnectionPool;
	readonly junk: JunkFlood;
	/** Unread queries the kernel took (their write callbacks). */
	unreadQueriesFlushed = 0;
	private readonly lockoutQuery: Buffer;
	private readonly unreadPoke: Buffer;
	private trickleTimer: NodeJS.Timeout | null = null;
	private readonly trickled = new WeakMap<net.Socket, number>();
	private stopped: Promise<void> | null = null;

	constructor(port: number, statsSocket: string) {
		const lockoutQuery = framed(encodeQuery('lockout.chaos.example', 'A', 0x4c4b));
		this.lockout = new ConnectionPool(LOCKOUT_CONNECTIONS,
			() => net.connect({ host: '127.0.0.1', port, localAddress: LOCKOUT_SOURCE }),
			(sock) => {
				sock.pause();
				this.trickle(sock, lockoutQuery);
			});
		const unreadQueries = Buffer.concat(Array.from({ length: UNREAD_QUERIES },
			(_, i) => framed(encodeQuery('big.unread.chaos.example', 'A', i + 1))));
		this.unread = new ConnectionPool(UNREAD_SOURCES * UNREAD_PER_SOURCE,
			(i) => net.connect({ host: '127.0.0.1', port, localAddress: `127.201.0.${1 + (i % UNREAD_SOURCES)}` }),
			(sock) => {
				/* Never read: paused before the first byte comes, no 'data' listener. */
				sock.pause();
				this.unread.counts.written += UNREAD_QUERIES;
				sock.write(unreadQueries, (err) => {
					if (!err) {
						this.unreadQueriesFlushed += UNREAD_QUERIES;
					}
				});
			});
		this.stats = new ConnectionPool(STATS_HOGS, () => net.connect({ path: statsSocket }), (sock) => sock.pause());
		this.junk = new JunkFlood(port);
		this.lockoutQuery = lockoutQuery;
		this.unreadPoke = framed(encodeQuery('big.unread.chaos.example', 'A', UNREAD_QUERIES + 1));
	}

	/* One more byte of the query on a lockout connection; never the last, so it is never whole. */
	private trickle(sock: net.Socket, query: Buffer): void {
		const at = this.trickled.get(sock) ?? 0;
		if (at < query.length - 1 && !sock.destroyed) {
			sock.write(query.subarray(at, at + 1));
			this.trickled.set(sock, at + 1);
			this.lockout.counts.written++;
		}
	}

	start(which: Set<string>): void {
		if (which.has('lockout')) {
			this.lockout.start();
		}
		if (which.has('unread')) {
			this.unread.start();
		}
		if (which.has('stats')) {
			this.stats.start();
		}
		if (which.has('junk')) {
			this.junk.start();
		}
		/*
		 * Every 3 s each connection writes: the lockout its next byte, the
		 * unread clients one more query, the stats hogs a newline (bbal reads
		 * nothing there).  A socket we never read notices that bbal closed it
		 * only when it writes, so this is also how a closed one is found and
		 * opened again.
		 */
		this.trickleTimer = setInterval(() => {
			for (const sock of this.lockout.sockets()) {
				if (this.trickled.has(sock)) {
					this.trickle(sock, this.lockoutQuery);
				}
			}
			for (const sock of this.unread.sockets()) {
				if (!sock.connecting && !sock.destroyed) {
					this.unread.counts.written++;
					sock.write(this.unreadPoke, (err) => {
						if (!err) {
							this.unreadQueriesFlushed++;
						}
					});
				}
			}
			for (const sock of this.stats.sockets()) {
				if (!sock.connecting && !sock.destroyed) {
					sock.write('\n');
				}
			}
		}, LOCKOUT_TRICKLE_MS);
	}

	/** Idempotent: every attacker socket closed. */
	stop(): Promise<void> {
		this.stopped ??= (async () => {
			if (this.trickleTimer !== null) {
				clearInterval(this.trickleTimer);
			}
			await Promise.all([this.lockout.stop(), this.unread.stop(), this.stats.stop(), this.junk.stop()]);
		})();
		return this.stopped;
	}
}

/** What hostile.ts judges by: the plan, and after stop, what each attacker did. */
export interface HostilePlan {
	lockoutSource: string;
	lockoutConnections: number;
	unreadSources: number;
	unreadConnections: number;
	unreadQueries: number;
	statsHogs: number;
	junkSourcesPerSec: number;
	/** The attacks that run: all four unless told otherwise (a diagnostic run). */
	attacks: string[];
}

export interface HostileCounts {
	lockout: AttackCounts & { held: number };
	unread: AttackCounts & { held: number; flushed: number };
	stats: AttackCounts & { held: number };
	junk: { sources: number; sent: number; errors: number };
}

const plan: HostilePlan = {
	lockoutSource: LOCKOUT_SOURCE, lockoutConnections: LOCKOUT_CONNECTIONS, unreadSources: UNREAD_SOURCES,
	unreadConnections: UNREAD_SOURCES * UNREAD_PER_SOURCE, unreadQueries: UNREAD_QUERIES, statsHogs: STATS_HOGS,
	junkSourcesPerSec: JUNK_SOURCES_PER_SEC, attacks: [...attacks],
};

const clients = new HostileClients(port, statsSocket);

async function stop(): Promise<HostileCounts> {
	const held = { lockout: clients.lockout.size, unread: clients.unread.size, stats: clients.stats.size };
	await clients.stop();
	return {
		lockout: { ...clients.lockout.counts, held: held.lockout },
		unread: { ...clients.unread.counts, held: held.unread, flushed: clients.unreadQueriesFlushed },
		stats: { ...clients.stats.counts, held: held.stats },
		junk: { sources: clients.junk.sources, sent: clients.junk.sent, errors: clients.junk.errors },
	};
}

function command(line: string): void {
	const cmd = line.trim();
	if (cmd === 'start') {
		clients.start(attacks);
		process.stdout.write(`done start ${Date.now()}\n`);
	} else if (cmd === 'stop') {
		void stop().then((counts) => process.stdout.write(`done stop ${JSON.stringify(counts)}\n`));
	} else if (cmd !== '') {
		process.stderr.write(`hostile_clients: unknown command ${JSON.stringify(cmd)}\n`);
	}
}

process.stdout.write(`ready ${JSON.stringify(plan)}\n`);
/* Commands come from the parent; when it goes, so do we. */
const rl = readline.createInterface({ input: process.stdin });
rl.on('line', command);
const quit = (): void => {
	void clients.stop().then(() => process.exit(0));
	setTimeout(() => process.exit(0), 2000).unref();
};
rl.on('close', quit);
process.on('SIGTERM', quit);
