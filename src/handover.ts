/*
 * HANDOVER
 *
 * The running bbal's side of a takeover: the control socket, and what goes
 * over it.  A new bbal started with --takeover (takeover.ts) connects, is
 * sent the listening sockets and the remote table, starts reading, and
 * only then does this one stop reading, hand over the remotes that changed
 * meanwhile, and drain.  At no moment does nobody read the DNS port: for
 * a millisecond or so both do, and the kernel gives each datagram and each
 * connection to one of them.
 *
 * THE CONTROL SOCKET sits beside the stats socket, at its path plus
 * ".control" (/run/bbal/stats.sock.control), made with mode 0600.  Not the
 * stats socket itself: that one writes a snapshot to whoever connects and
 * reads nothing (balstat, `nc -U`), and its group may read it; this one is
 * read, and what it gives away is port 53, so only bbal's own user may
 * connect.  It is served only when the stats socket is, and only with the
 * native addon, which passes the descriptors (fd_pass.ts).  A connection
 * that says nothing for CONTROL_IDLE_SECS is closed; CONTROL_MAX_CONNECTIONS
 * are served at once, and one takeover at a time.
 *
 * THE CONVERSATION is drawn in takeover_wire.ts, with its messages.
 *
 * Until `handover` arrives the old process has changed nothing: a new one
 * that fails, times out or goes away leaves it serving as before, and the
 * descriptors it holds die with it.  After `released` the old process only
 * drains: its TCP sessions finish (up to the drain limit), answers to the
 * queries it forwarded still go out from the same socket, and it exits 0 --
 * or 1 if the new one vanished before saying `exit`, so that a service
 * manager restarts the service rather than take it for stopped.
 *
 * RELOAD.  `bbal --reload` (takeover.ts) asks over the same socket for a
 * successor: `spawn` names the node binary, its flags and bbal's arguments
 * as the reloading command has them (the installed version's), and this
 * process starts it with --takeover as its own child, so that it stays in
 * the service's cgroup (systemd) or process contract (SMF).  The successor
 * reports on a pipe (fd 3, BBAL_TAKEOVER_STATUS_FD) and that outcome is
 * passed back as `result`.
 *
 * A control connection's lifecycle (ControlSession):
 *
 *   hello --hello, accepted: the sockets sent--> ready --remotes--> sending remotes
 *         --the table written--> remotes sent --handover--> handing over
 *         --listeners let go, the delta written--> released --exit--> closed
 *                                                   (the balancer drains and exits 0)
 *   hello --spawn--> spawning --the successor's outcome, as `result`--> closed
 *   any --refused, a line that is not JSON or too long, idle, the peer gone--> closed
 *
 * The peer gone while `handing over` or `released` is the new bbal gone
 * after the handover: drain and exit 1.  Gone before, the takeover is
 * abandoned and nothing changes.
 */

import { spawn } from 'node:child_process';
import net from 'node:net';
import type { Logger } from 'pino';
import { fdPass, handleFd, UnixSocketFile } from './fd_pass.js';
import { ignoreError } from './log.js';
import { packageVersion } from './options.js';
import type { Remotes } from './remotes.js';
import type { Timeout, TimeoutWheel } from './timeouts.js';
import {
	checkHello, type Hello, LineReader, line, type Ready, remoteMessages, type Running, type SocketSpec, type SpawnRequest,
	STATUS_FD_ENV, TAKEOVER_PROTOCOL,
} from './takeover_wire.js';

/** The control socket's file mode: bbal's own user only. */
export const CONTROL_SOCKET_MODE = 0o600;
/** Control connections served at once; more are closed at once. */
export const CONTROL_MAX_CONNECTIONS = 4;
/** A control connection that sends nothing for this long is closed (a takeover is one exchange after another). */
export const CONTROL_IDLE_SECS = 30;

/* ---- the running bbal's side ---- */

/** What the balancer gives the control server (Balancer implements it). */
export interface HandoverHost {
	readonly log: Logger;
	readonly wheel: TimeoutWheel;
	readonly remotes: Remotes;
	/** This bbal's address, port and transport, and its flags for the new one to compare. */
	running(): Running & { options: Record<string, unknown> };
	/** Null when a takeover may begin now, else why not (still starting, closing ...). */
	busy(): string | null;
	/** The listening sockets to pass, in order (this control socket among them). */
	sockets(): Array<SocketSpec & { fd: number }>;
	/** Stop reading UDP and accepting TCP; let go of the stats, control and HTTP listeners. */
	handOver(): Promise<void>;
	/** The takeover is over: drain and exit (non-zero if the new bbal vanished first). */
	handedOver(successorGone: boolean): void;
}

type SessionState = 'hello' | 'ready' | 'sending remotes' | 'remotes sent' | 'handing over' | 'released'
	| 'spawning' | 'closed';

export class ControlServer {
	private readonly server: net.Server;
	private readonly sessions = new Set<ControlSession>();
	private listening = false;
	/* Whose the socket file is: ours, or another bbal's in a takeover (fd_pass.ts). */
	private readonly file: UnixSocketFile;
	/** The session of the takeover under way (one at a time). */
	active: ControlSession | null = null;
	/** The session of a reload under way: its successor's takeover is `active` meanwhile. */
	reloading: ControlSession | null = null;
	private nextId = 1;
	private whenEmpty: (() => void) | null = null;

	constructor(readonly socketPath: string, readonly host: HandoverHost) {
		this.file = new UnixSocketFile(socketPath, CONTROL_SOCKET_MODE, 'control socket');
		this.server = net.createServer(this.serverOnConnection);
		this.server.on('error', (err) => host.log.error({ err }, 'control socket error'));
	}

	/** Listen at socketPath (mode 0600), or on `fd` passed over by a takeover (the file is not ours until own()). */
	async listen(fd?: number): Promise<void> {
		await this.file.listen(this.server, fd, (code, message) => Object.assign(new Error(message), { code }));
		this.listening = true;
	}

	/** The listening socket's descriptor, for a takeover to pass on (-1 when not listening). */
	get fd(): number {
		return this.listening ? handleFd(this.server) : -1;
	}

	/** A takeover is through: the socket file is ours, to remove at a clean exit. */
	own(): void {
		this.file.own();
	}

	private readonly serverOnConnection = (sock: net.Socket): void => {
		sock.on('error', ignoreError);
		if (!this.listening || this.sessions.size >= CONTROL_MAX_CONNECTIONS) {
			sock.destroy();
			return;
		}
		this.sessions.add(new ControlSession(this, sock, this.nextId++));
	};

	released(s: ControlSession): void {
		this.sessions.delete(s);
		if (this.active === s) {
			this.active = null;
		}
		if (this.reloading === s) {
			this.reloading = null;
		}
		if (this.sessions.size === 0) {
			this.whenEmpty?.();
		}
	}

	/**
	 * Stop accepting and close the connections, but those of the takeover
	 * and the reload under way, which finish by themselves (see
	 * sessionsDone()).  The file stays when a takeover passed the socket on.
	 */
	async close(handedOver = false): Promise<void> {
		if (handedOver) {
			this.file.release();
		}
		if (!this.listening) {
			return;
		}
		this.listening = false;
		/* Not awaited: the server's close waits for every connection, the takeover's among them. */
		this.server.close();
		for (const s of this.sessions) {
			if (s !== this.active && s !== this.reloading) {
				s.destroy();
			}
		}
		await this.file.remove();
	}

	/** Resolves once every connection has closed, or after `ms`: a reload's client is told how it went before bbal exits. */
	sessionsDone(ms: number): Promise<void> {
		if (this.sessions.size === 0) {
			return Promise.resolve();
		}
		return new Promise((resolve) => {
			const timer = setTimeout(resolve, ms);
			this.whenEmpty = () => {
				clearTimeout(timer);
				resolve();
			};
		});
	}

	/** Cut every connection (bbal is exiting). */
	destroyAll(): void {
		for (const s of this.sessions) {
			s.destroy();
		}
	}
}

/* One connection to the control socket: a takeover, a reload request, or a stranger. */
class ControlSession {
	private state: SessionState = 'hello';
	private readonly reader = new LineReader();
	private readonly idle: Timeout;
	private readonly log: Logger;
	/** The pid of the bbal taking over through this connection. */
	newPid = 0;

	constructor(private readonly server: ControlServer, private readonly sock: net.Socket, readonly id: number) {
		this.log = server.host.log.child({ control_conn: id });
		this.idle = server.host.wheel.create(`control connection ${id} idle`, this.idleDue);
		this.idle.set(CONTROL_IDLE_SECS);
		sock.on('data', this.sockOnData);
		sock.on('close', this.sockOnClose);
	}

	private advance(to: SessionState): void {
		this.log.debug({ from: this.state, to }, 'control connection state');
		this.state = to;
	}

	private readonly sockOnData = (chunk: Buffer): void => {
		this.idle.set(CONTROL_IDLE_SECS);
		let lines: string[];
		try {
			lines = this.reader.push(chunk);
		} catch (err) {
			this.fail((err as Error).message);
			return;
		}
		for (const l of lines) {
			let msg: { type?: unknown };
			try {
				msg = JSON.parse(l) as { type?: unknown };
			} catch {
				this.fail('not a JSON line');
				return;
			}
			this.onMessage(msg);
		}
	};

	private onMessage(msg: { type?: unknown }): void {
		const host = this.server.host;
		switch (`${this.state}/${String(msg.type)}`) {
		case 'hello/hello':
			this.hello(msg as Hello);
			return;
		case 'hello/spawn':
			this.spawn(msg as SpawnRequest);
			return;
		case 'ready/remotes':
			this.advance('sending remotes');
			host.remotes.trackChanges();
			void this.sendRemotes(null, 'remotes-end');
			return;
		case 'remotes sent/handover':
			void this.handOver();
			return;
		case 'released/exit':
			this.log.info('new bbal has taken over: draining');
			this.advance('closed');
			this.sock.end();
			host.handedOver(false);
			return;
		default:
			this.fail(`unexpected ${String(msg.type)} while ${this.state}`);
		}
	}

	private hello(h: Hello): void {
		const host = this.server.host;
		const me = host.running();
		const why = checkHello(h, me) ?? host.busy()
			?? (this.server.active !== null ? `a takeover is already in progress (pid ${this.server.active.newPid})` : null);
		if (why !== null) {
			this.log.warn({ new_pid: h.pid, reason: why }, 'takeover refused');
			this.fail(why);
			return;
		}
		const fp = fdPass();
		const socks = host.sockets();
		const fd = handleFd(this.sock);
		if (fp === null || fd < 0) {
			this.fail('this bbal cannot pass its sockets');
			return;
		}
		const ready: Ready = {
			type: 'ready', protocol: TAKEOVER_PROTOCOL, version: packageVersion(), pid: process.pid,
			sockets: socks.map(({ kind, address }) => (address === undefined ? { kind } : { kind, address })),
			options: me.options, remotes: host.remotes.size,
		};
		try {
			fp.sendFds(fd, Buffer.from(line(ready)), socks.map((s) => s.fd));
		} catch (err) {
			this.fail(`cannot pass the sockets: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
			return;
		}
		this.server.active = this;
		this.newPid = h.pid;
		this.advance('ready');
		this.log.info({ new_pid: h.pid, new_version: h.version, sockets: socks.length }, 'takeover: sockets passed');
	}

	/* Write the remotes (all, or those of `only`), with backpressure and a turn of the loop between messages; then `end`. */
	private async sendRemotes(only: number[] | null, end: 'remotes-end' | 'released'): Promise<void> {
		const host = this.server.host;
		const gen = remoteMessages(host.remotes, () => host.wheel.nowMs, only);
		for (let r = gen.next(); this.state !== 'closed'; r = gen.next()) {
			if (r.done === true) {
				this.sock.write(line(end === 'remotes-end' ? { type: end, count: r.value } : { type: end, remotes: r.value }));
				if (end === 'remotes-end') {
					this.advance('remotes sent');
				}
				return;
			}
			if (r.value === null) {
				await new Promise((resolve) => setImmediate(resolve));
			} else if (!this.sock.write(line({ type: 'remotes', ...r.value }))) {
				await new Promise((resolve) => this.sock.once('drain', resolve));
			}
		}
	}

	private async handOver(): Promise<void> {
		const host = this.server.host;
		this.advance('handing over');
		await host.handOver();
		this.advance('released');
		const changed = host.remotes.takeChanges();
		await this.sendRemotes(changed, 'released');
		this.log.info({ remotes_changed: changed?.length ?? 'all' }, 'takeover: listeners released, remotes changed meanwhile sent');
	}

	/* RELOAD: start the successor as our child; tell the client how it went. */
	private spawn(req: SpawnRequest): void {
		const host = this.server.host;
		const why = req.protocol !== TAKEOVER_PROTOCOL
			? `it speaks takeover protocol ${TAKEOVER_PROTOCOL}, the reload ${String(req.protocol)}`
			: host.busy() ?? (this.server.active !== null || this.server.reloading !== null
				? 'a takeover is already in progress' : null);
		if (why !== null || !Array.isArray(req.argv) || !Array.isArray(req.execArgv) || typeof req.execPath !== 'string') {
			this.fail(why ?? 'a spawn request needs execPath, execArgv and argv');
			return;
		}
		this.server.reloading = this;
		this.advance('spawning');
		/* The successor's own timeout bounds the wait; its exit always ends it. */
		this.idle.clear();
		const child = spawn(req.execPath, [...req.execArgv, ...req.argv, '--takeover'], {
			detached: true,
			stdio: ['ignore', 'inherit', 'inherit', 'pipe'],
			env: { ...process.env, [STATUS_FD_ENV]: '3' },
		});
		child.unref();
		this.log.info({ new_pid: child.pid, argv: req.argv }, 'reload: successor started');
		let outcome: { ok: boolean; message: string } | null = null;
		const status = child.stdio[3] as net.Socket | null;
		const reader = new LineReader(4096);
		status?.on('error', ignoreError);
		status?.on('data', (chunk: Buffer) => {
			for (const l of reader.push(chunk)) {
				const ok = l.startsWith('ok ');
				if (outcome === null && (ok || l.startsWith('error '))) {
					outcome = { ok, message: l.slice(ok ? 3 : 6) };
					this.result(outcome);
				}
			}
		});
		child.once('error', (err) => this.result({ ok: false, message: `cannot start ${req.execPath}: ${err.message}` }));
		child.once('exit', (code, signal) => {
			if (outcome === null) {
				outcome = { ok: false, message: `the new bbal exited (${signal ?? `status ${String(code)}`}) before taking over` };
				this.result(outcome);
			}
		});
	}

	private result(r: { ok: boolean; message: string }): void {
		if (this.state === 'closed') {
			return;
		}
		this.advance('closed');
		this.sock.end(line({ type: 'result', ...r }));
	}

	private fail(message: string): void {
		if (this.state === 'closed') {
			return;
		}
		this.advance('closed');
		this.sock.end(line({ type: 'error', message }));
	}

	private readonly idleDue = (): void => {
		this.log.warn({ state: this.state }, 'control connection idle (closed)');
		this.destroy();
	};

	private readonly sockOnClose = (): void => {
		const was = this.state;
		const active = this.server.active === this;
		this.state = 'closed';
		this.idle.clear();
		this.server.released(this);
		if (was === 'released' || was === 'handing over') {
			this.log.warn('new bbal went away during the takeover: draining, will exit 1');
			this.server.host.handedOver(true);
		} else if (active && was !== 'closed') {
			this.server.host.remotes.takeChanges();
			this.log.warn({ state: was }, 'takeover abandoned by the new bbal: serving on');
		} else if (active) {
			/* Ended by fail(): said why already. */
			this.server.host.remotes.takeChanges();
		}
	};

	destroy(): void {
		this.sock.destroy();
	}
}
