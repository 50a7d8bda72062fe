/*
 * TAKEOVER
 *
 * The new bbal's side of a takeover (the running one's is handover.ts,
 * which draws the whole conversation), and `bbal --reload`, which asks the
 * running one to start its successor.
 *
 * `bbal ... --takeover` connects to the control socket beside its -S
 * path, says hello and is sent the listening sockets (fd_pass.ts) and the
 * running bbal's flags.  That first exchange is done before anything else
 * and synchronously, with the addon reading the one message that carries
 * descriptors; nothing else runs yet, so there is nothing to stall.  Then
 * the conversation goes on through an ordinary socket, message by message:
 * the balancer (balancer.ts, startFrom()) connects to the backends, asks
 * for the remote table and restores it as it comes, starts reading the
 * sockets, says `handover`, restores the remotes that changed meanwhile,
 * and finally says `exit` (finish()) once systemd knows the new main
 * process.
 *
 * FAILURE IS SAFE.  Every step until this process begins to read the
 * sockets has a deadline (--takeover-timeout, 10 s, for the whole; not
 * after, see beginReading()), and every failure -- nobody
 * at the control socket, a refusal (another protocol, other -b/-p, another
 * UDP transport, a takeover already under way), the running bbal going
 * away, the deadline -- is a TakeoverError with one line saying why: main
 * prints it and exits 1, and the descriptors received die with the
 * process, so the running bbal serves on as if nothing had happened.
 * After `handover` there is no going back: the old process has stopped
 * reading.  If it vanishes then, this one serves on with the remotes it
 * has, and says so in the log.
 *
 * RELOAD.  Under a service manager the new process must belong to the
 * service (its cgroup, its SMF contract), and the reload command itself
 * must return.  So `bbal ... --reload` does not take over: it sends its
 * own node binary, node flags and bbal arguments (the installed version's)
 * as a `spawn` request, the running bbal starts that with --takeover as
 * its child, and the reload waits for the successor's outcome and prints
 * it: exit 0 when it took over, 1 with the reason when not.  The successor
 * reports on the descriptor named by BBAL_TAKEOVER_STATUS_FD
 * (reportStatus()).
 */

import { closeSync, writeSync } from 'node:fs';
import net from 'node:net';
import type { Logger } from 'pino';
import { type FdPass, fdPass, fdPassMissing } from './fd_pass.js';
import {
	LineReader, line, type Ready, type RemoteRecord, type SocketSpec, STATUS_FD_ENV, TAKEOVER_PROTOCOL,
} from './takeover_wire.js';
import type { PassedUdpSocket } from './udp_transport.js';

/** --takeover-timeout's default. */
export const DEFAULT_TAKEOVER_TIMEOUT_MS = 10_000;
/* The largest first answer: `ready` with its flags. */
const READY_MAX_BYTES = 64 * 1024;

/** A takeover that did not happen, in one line; the running bbal is as it was. */
export class TakeoverError extends Error {
	readonly code = 'ETAKEOVER';
}

/** What `bbal --takeover` tells the running bbal about itself. */
export interface TakeoverRequest {
	controlPath: string;
	version: string;
	bind: string;
	port: number;
	transport: string;
	options: Record<string, unknown>;
	timeoutMs: number;
	log: Logger;
}

/** One `remotes` message: backend socket paths and the remotes that index them. */
export interface RemotesMessage {
	backends: string[];
	remotes: RemoteRecord[];
}

type Message = { type: string } & Record<string, unknown>;

/** The sockets a takeover received, by kind. */
export interface PassedSockets {
	udp: PassedUdpSocket[];
	tcp: number;
	stats?: number;
	control?: number;
	metrics?: number;
}

/** A takeover under way, from the first exchange to finish(). */
export class Takeover {
	readonly old: Ready;
	readonly sockets: PassedSockets;
	private readonly sock: net.Socket;
	private readonly reader = new LineReader();
	private readonly inbox: Message[] = [];
	private waiter: { resolve: (m: Message) => void; reject: (e: TakeoverError) => void } | null = null;
	private failure: TakeoverError | null = null;
	private readonly deadline: NodeJS.Timeout;
	private phase = 'connecting to the backends';

	/**
	 * Connect, say hello, receive the sockets (synchronously: see above).
	 * Throws TakeoverError.
	 */
	static connect(req: TakeoverRequest): Takeover {
		const fp = fdPass();
		if (fp === null) {
			throw new TakeoverError(fdPassMissing());
		}
		const started = Date.now();
		let fd: number;
		try {
			fd = fp.connectUnix(req.controlPath);
		} catch (err) {
			const code = (err as NodeJS.ErrnoException).code ?? (err as Error).message;
			throw new TakeoverError(`no running bbal to take over at ${req.controlPath} (${code})`);
		}
		try {
			writeSync(fd, line({
				type: 'hello', protocol: TAKEOVER_PROTOCOL, version: req.version, pid: process.pid,
				bind: req.bind, port: req.port, transport: req.transport, options: req.options,
			}));
			const { ready, fds } = receiveReady(fp, fd, req.timeoutMs);
			return new Takeover(fd, ready, fds, req, Date.now() - started);
		} catch (err) {
			closeSync(fd);
			throw err instanceof TakeoverError ? err
				: new TakeoverError(`takeover failed: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
		}
	}

	private constructor(fd: number, ready: Ready, fds: number[], private readonly req: TakeoverRequest, spentMs: number) {
		this.old = ready;
		this.sockets = sortSockets(ready.sockets, fds);
		this.sock = new net.Socket({ fd, readable: true, writable: true });
		this.sock.on('error', (err: NodeJS.ErrnoException) => this.fail(`the running bbal's connection failed: ${err.code ?? err.message}`));
		this.sock.on('data', this.sockOnData);
		this.sock.on('close', () => this.fail(`the running bbal (pid ${ready.pid}) went away while ${this.phase}`));
		this.deadline = setTimeout(() => {
			this.fail(`the takeover took longer than ${req.timeoutMs / 1000} s (while ${this.phase}): given up`);
			this.sock.destroy();
		}, Math.max(1, req.timeoutMs - spentMs));
		this.deadline.unref();
	}

	/** The flags of the running bbal that differ from ours, for the log. */
	differences(): Array<{ option: string; running: unknown; now: unknown }> {
		const out: Array<{ option: string; running: unknown; now: unknown }> = [];
		const keys = new Set([...Object.keys(this.old.options), ...Object.keys(this.req.options)]);
		for (const k of keys) {
			const a = this.old.options[k];
			const b = this.req.options[k];
			if (JSON.stringify(a) !== JSON.stringify(b)) {
				out.push({ option: k, running: a ?? null, now: b ?? null });
			}
		}
		return out;
	}

	/** Ask for the remote table; `apply` each message as it comes (synchronously). Resolves with the count. */
	async fetchRemotes(apply: (m: RemotesMessage) => void): Promise<number> {
		this.phase = 'receiving the remote table';
		this.sock.write(line({ type: 'remotes' }));
		for (;;) {
			const m = await this.next();
			if (m.type === 'remotes') {
				apply(m as unknown as RemotesMessage);
			} else if (m.type === 'remotes-end') {
				return Number(m['count']);
			} else {
				throw this.unexpected(m);
			}
		}
	}

	/**
	 * About to read the sockets: the deadline ends here.  Were it to fire
	 * after this process had begun reading, the old one would never hear
	 * `handover` and both would go on serving; a failure from here to
	 * handOver() is this process's own, and it exits, the old one untouched.
	 */
	beginReading(): void {
		clearTimeout(this.deadline);
		this.phase = 'starting to read the sockets';
	}

	/**
	 * We are reading the sockets now: tell the running bbal to stop, and
	 * `apply` the remotes it saw meanwhile.  No failure is thrown from here
	 * on (see FAILURE IS SAFE): resolves with the count of remotes, or null
	 * if the old process went away or misbehaved before `released`.
	 */
	async handOver(apply: (m: RemotesMessage) => void): Promise<number | null> {
		this.phase = 'handing over';
		clearTimeout(this.deadline);
		this.sock.write(line({ type: 'handover' }));
		try {
			for (;;) {
				const m = await this.next();
				if (m.type === 'remotes') {
					apply(m as unknown as RemotesMessage);
				} else if (m.type === 'released') {
					this.phase = 'released';
					return Number(m['remotes']);
				} else {
					throw this.unexpected(m);
				}
			}
		} catch (err) {
			this.req.log.warn({ old_pid: this.old.pid, reason: (err as Error).message },
				'takeover: the old bbal did not finish handing over; serving on with the remotes received');
			return null;
		}
	}

	/** Done: the old bbal may drain and exit. */
	finish(): void {
		this.phase = 'finished';
		this.sock.end(line({ type: 'exit' }));
	}

	/** Given up before handover: close the connection and whatever was not taken up. */
	abandon(unused: number[]): void {
		clearTimeout(this.deadline);
		this.phase = 'abandoned';
		this.sock.destroy();
		const fp = fdPass();
		for (const fd of unused) {
			fp?.closeFd(fd);
		}
	}

	private unexpected(m: Message): TakeoverError {
		return new TakeoverError(m.type === 'error'
			? `the running bbal refused: ${String(m['message'])}`
			: `the running bbal said ${m.type} while ${this.phase}`);
	}

	private readonly sockOnData = (chunk: Buffer): void => {
		let lines: string[];
		try {
			lines = this.reader.push(chunk);
		} catch (err) {
			this.fail((err as Error).message);
			this.sock.destroy();
			return;
		}
		for (const l of lines) {
			try {
				this.deliver(JSON.parse(l) as Message);
			} catch {
				this.fail('the running bbal sent a line that is not JSON');
				this.sock.destroy();
				return;
			}
		}
	};

	private deliver(m: Message): void {
		const w = this.waiter;
		if (w !== null) {
			this.waiter = null;
			w.resolve(m);
		} else {
			this.inbox.push(m);
		}
	}

	private fail(why: string): void {
		if (this.failure !== null || this.phase === 'finished' || this.phase === 'abandoned') {
			return;
		}
		this.failure = new TakeoverError(why);
		const w = this.waiter;
		this.waiter = null;
		w?.reject(this.failure);
	}

	private next(): Promise<Message> {
		const m = this.inbox.shift();
		if (m !== undefined) {
			return Promise.resolve(m);
		}
		if (this.failure !== null) {
			return Promise.reject(this.failure);
		}
		return new Promise((resolve, reject) => {
			this.waiter = { resolve, reject };
		});
	}
}

/* The first answer, with its descriptors: `ready`, or why not. */
function receiveReady(fp: FdPass, fd: number, timeoutMs: number): { ready: Ready; fds: number[] } {
	let got: { data: Buffer; fds: number[] };
	try {
		got = fp.recvFds(fd, READY_MAX_BYTES, timeoutMs);
	} catch (err) {
		const code = (err as NodeJS.ErrnoException).code;
		throw new TakeoverError(code === 'ETIMEDOUT'
			? `the running bbal did not answer within ${timeoutMs / 1000} s`
			: `cannot read the running bbal's answer: ${code ?? (err as Error).message}`);
	}
	const closeAll = (): void => got.fds.forEach((x) => fp.closeFd(x));
	const text = got.data.toString('utf8');
	if (got.data.length === 0) {
		throw new TakeoverError('the running bbal closed the connection without answering');
	}
	let msg: Message;
	try {
		msg = JSON.parse(text.split('\n')[0]) as Message;
	} catch {
		closeAll();
		throw new TakeoverError('the running bbal answered with something that is not a takeover message');
	}
	if (msg.type === 'error') {
		closeAll();
		throw new TakeoverError(`the running bbal refused: ${String(msg['message'])}`);
	}
	const ready = msg as unknown as Ready;
	if (msg.type !== 'ready' || !text.endsWith('\n') || text.indexOf('\n') !== text.length - 1
		|| !Array.isArray(ready.sockets) || ready.sockets.length !== got.fds.length) {
		closeAll();
		throw new TakeoverError(`the running bbal's answer is not what protocol ${TAKEOVER_PROTOCOL} expects`
			+ ` (${got.fds.length} descriptors for ${Array.isArray(ready.sockets) ? ready.sockets.length : '?'} sockets)`);
	}
	return { ready, fds: got.fds };
}

/* The descriptors by kind, as `ready` lists them. */
function sortSockets(specs: SocketSpec[], fds: number[]): PassedSockets {
	const out: PassedSockets = { udp: [], tcp: -1 };
	specs.forEach((s, i) => {
		if (s.kind === 'udp') {
			out.udp.push({ fd: fds[i], address: s.address ?? '' });
		} else {
			out[s.kind] = fds[i];
		}
	});
	return out;
}

/**
 * RELOAD: report this successor's outcome to the bbal that started it, if
 * one did (BBAL_TAKEOVER_STATUS_FD), once.
 */
export function reportStatus(ok: boolean, message: string): void {
	const fdText = process.env[STATUS_FD_ENV];
	if (fdText === undefined) {
		return;
	}
	delete process.env[STATUS_FD_ENV];
	const fd = Number(fdText);
	try {
		writeSync(fd, `${ok ? 'ok' : 'error'} ${message.replace(/\n/g, ' ')}\n`);
		closeSync(fd);
	} catch {
		/* The bbal that asked is gone: nobody to tell. */
	}
}

/**
 * RELOAD: ask the bbal at `controlPath` to start a successor with `argv`
 * (this command's, --reload left out), and wait for how it went.
 * Resolves with the successor's line, rejects with a TakeoverError.
 */
export function requestReload(controlPath: string, argv: string[], timeoutMs: number): Promise<string> {
	return new Promise((resolve, reject) => {
		const sock = net.createConnection({ path: controlPath });
		const reader = new LineReader();
		const timer = setTimeout(() => {
			sock.destroy();
			reject(new TakeoverError(`no answer from the running bbal within ${(timeoutMs + 5000) / 1000} s`));
		}, timeoutMs + 5000);
		const done = (err: TakeoverError | null, msg = ''): void => {
			clearTimeout(timer);
			sock.destroy();
			if (err === null) {
				resolve(msg);
			} else {
				reject(err);
			}
		};
		sock.on('error', (err: NodeJS.ErrnoException) => done(new TakeoverError(`no running bbal at ${controlPath} (${err.code ?? err.message})`)));
		sock.on('connect', () => {
			sock.write(line({
				type: 'spawn', protocol: TAKEOVER_PROTOCOL, execPath: process.execPath, execArgv: process.execArgv,
				argv: [process.argv[1], ...argv],
			}));
		});
		sock.on('data', (chunk: Buffer) => {
			for (const l of reader.push(chunk)) {
				const m = JSON.parse(l) as Message;
				if (m.type === 'result' && m['ok'] === true) {
					done(null, String(m['message']));
				} else {
					done(new TakeoverError(String(m['message'])));
				}
			}
		});
		sock.on('close', () => done(new TakeoverError('the running bbal closed the connection without an answer')));
	});
}
