/*
 * FD PASS
 *
 * What a takeover needs from the kernel beyond what Node offers, through
 * the native addon native/fd_pass.c (fd_pass.node; any Unix, unlike the
 * Linux-only UDP transport): descriptors passed between two unrelated
 * processes, Unix-domain listeners that outlive the process that made
 * them, and sd_notify(3) for systemd.  handover.ts (the running bbal's
 * side) and takeover.ts (the new one's) are its callers; nothing on the
 * query path touches it.
 *
 * WHY THE ADDON, NOT HANDLE PASSING.  Node passes a server or socket to
 * another process only over the IPC channel between a parent and a child
 * it forked.  The bbal taking over is started by an operator or a service
 * manager, not by the running one, so there is no such channel; and a
 * plain AF_UNIX stream in Node reads with read(2), which throws away the
 * SCM_RIGHTS a sender attaches.  The addon sends and receives that one
 * message itself.  Without the addon (not built: no compiler at install,
 * or Windows) a takeover is refused with one line saying so; everything
 * else works as before.
 *
 * SOCKET FILES THAT SURVIVE A TAKEOVER.  The stats and control sockets are
 * passed over like the DNS ports, so that balstat never finds the path
 * missing.  But a Unix socket Node binds by path is unlinked by Node when
 * it is closed -- and after a takeover the file is the new process's.  So
 * UnixSocketFile binds through the addon and hands Node only the
 * descriptor: Node never learns the path.  It keeps whose the file is --
 * ours when we bound it or a takeover we made is through, the other
 * bbal's otherwise -- and removes it at a clean exit only when ours, for
 * the stats socket (stats.ts) and the control socket (handover.ts) alike.
 * Without the addon it binds by path, as it always did.
 *
 * A file left behind by a crashed process is replaced; one that a live
 * process listens on is not (EINUSE): two processes sharing a path is a
 * mistake worth stopping for, and a bbal started without --takeover while
 * another runs stops here.
 */

import { chmod, lstat, unlink } from 'node:fs/promises';
import { createRequire } from 'node:module';
import net from 'node:net';

/* What native/fd_pass.c adds to the addon (see its header). */
export interface FdPass {
	listenUnix(path: string, backlog: number): number;
	connectUnix(path: string): number;
	sendFds(fd: number, data: Buffer, fds: number[]): number;
	recvFds(fd: number, maxBytes: number, timeoutMs: number): { data: Buffer; fds: number[] };
	closeFd(fd: number): void;
	notify(path: string, text: string, barrier: boolean): number;
}

/* Connections waiting to be accepted on a Unix listener made here. */
const UNIX_BACKLOG = 64;
/* From dist/src/ (or src/ under a loader) to the package root. */
const ADDON_PATH = '../../build/Release/fd_pass.node';

let loaded: FdPass | null | undefined;
let loadError = '';

/** The addon's descriptor functions, or null (fdPassMissing() says why). */
export function fdPass(): FdPass | null {
	if (loaded === undefined) {
		loaded = null;
		try {
			const a = createRequire(import.meta.url)(ADDON_PATH) as Partial<FdPass>;
			if (typeof a.sendFds === 'function') {
				loaded = a as FdPass;
			} else {
				loadError = 'it is not the one this bbal expects: rebuild it with npm rebuild';
			}
		} catch (err) {
			loadError = (err as Error).message.split('\n')[0];
		}
	}
	return loaded;
}

/** One line: why descriptors cannot be passed on this host. */
export function fdPassMissing(): string {
	fdPass();
	return `a takeover needs the native addon build/Release/fd_pass.node (${loadError})`;
}

/* Node's servers and sockets keep their libuv handle here; on Unix it has the descriptor. */
interface WithHandle {
	_handle?: { fd?: number } | null;
}

/** The descriptor under a listening server or a socket (-1 when it has none). */
export function handleFd(x: net.Server | net.Socket | object): number {
	const fd = (x as WithHandle)._handle?.fd;
	return typeof fd === 'number' && fd >= 0 ? fd : -1;
}

/** Start a server on a descriptor passed over by a takeover (or made by listenUnix). */
function listenOnFd(server: net.Server, fd: number): Promise<void> {
	return new Promise((resolve, reject) => {
		server.once('error', reject);
		server.listen({ fd }, () => {
			server.removeListener('error', reject);
			resolve();
		});
	});
}

/** Why a Unix socket could not be opened; `code` for callers to branch on. */
export type UnixSocketErrorCode = 'EINUSE' | 'ENOTSOCK' | 'ELISTEN';

/**
 * Listen on a Unix socket at `path` with file mode `mode` (see SOCKET
 * FILES THAT SURVIVE A TAKEOVER): a stale file is replaced, a live one
 * refused.  `fail` makes the caller's error from a code and a message; the
 * messages name the socket as `what` ("stats socket").  Resolves true when
 * the addon made the socket (Node will not unlink it), false when Node
 * bound the path.
 */
async function listenUnixSocket(
	server: net.Server, path: string, mode: number, what: string,
	fail: (code: UnixSocketErrorCode, message: string) => Error,
	onReplaced?: () => void,
): Promise<boolean> {
	const st = await lstat(path).catch(() => null);
	if (st !== null) {
		if (!st.isSocket()) {
			throw fail('ENOTSOCK', `${what} path ${path} exists and is not a socket`);
		}
		if (await someoneListens(path)) {
			throw fail('EINUSE', `another process is listening on ${what} ${path}`);
		}
		await unlink(path);
		onReplaced?.();
	}
	const fp = fdPass();
	try {
		if (fp !== null) {
			const fd = fp.listenUnix(path, UNIX_BACKLOG);
			await listenOnFd(server, fd).catch((err: unknown) => {
				fp.closeFd(fd);
				throw err;
			});
		} else {
			await new Promise<void>((resolve, reject) => {
				server.once('error', reject);
				server.listen(path, () => {
					server.removeListener('error', reject);
					resolve();
				});
			});
		}
	} catch (err) {
		const e = err as NodeJS.ErrnoException;
		throw fail('ELISTEN', `cannot listen on ${what} ${path}: ${e.code ?? e.message}`);
	}
	try {
		await chmod(path, mode);
	} catch (err) {
		await new Promise<void>((resolve) => server.close(() => resolve()));
		await unlink(path).catch(() => {});
		const e = err as NodeJS.ErrnoException;
		throw fail('ELISTEN', `cannot set the mode of ${what} ${path}: ${e.code ?? e.message}`);
	}
	return fp !== null;
}

/**
 * The file of a Unix listener that a takeover may pass on (SOCKET FILES
 * THAT SURVIVE A TAKEOVER), and whether it is this process's to remove:
 * the same rule for the stats and the control socket.
 */
export class UnixSocketFile {
	/* Ours to remove at a clean exit: we bound it, or took it over and the takeover is through. */
	private ours = false;

	constructor(readonly path: string, private readonly mode: number, private readonly what: string) {}

	/**
	 * Listen at the path (listenUnixSocket(), the file ours), or on `fd`
	 * passed over by a takeover: the file is then the old process's until
	 * own().
	 */
	async listen(server: net.Server, fd: number | undefined,
		fail: (code: UnixSocketErrorCode, message: string) => Error, onReplaced?: () => void): Promise<void> {
		if (fd !== undefined) {
			await listenOnFd(server, fd);
			return;
		}
		await listenUnixSocket(server, this.path, this.mode, this.what, fail, onReplaced);
		this.ours = true;
	}

	/** A takeover is through: the file is ours. */
	own(): void {
		this.ours = true;
	}

	/** Passed on to a bbal that took over: the file is its now. */
	release(): void {
		this.ours = false;
	}

	/** At close: remove the file if it is ours (Node removes only what it bound by path, the fallback). */
	async remove(): Promise<void> {
		if (this.ours) {
			this.ours = false;
			await unlink(this.path).catch(() => {});
		}
	}
}

/** Does a live process accept connections on the Unix socket at `path`? */
export function someoneListens(path: string): Promise<boolean> {
	return new Promise((resolve) => {
		const s = net.createConnection({ path });
		s.on('connect', () => {
			s.destroy();
			resolve(true);
		});
		s.on('error', () => resolve(false));
	});
}

/*
 * SYSTEMD.  Under Type=notify (systemd/bbal.service) bbal says READY=1 once
 * it listens, and a bbal that took over says MAINPID=<its pid>, so that
 * systemd follows the new process instead of taking the old one's exit
 * for the service's.  The old process may exit only once systemd has
 * handled that: the message is followed by a barrier (sd_notify_barrier(3)),
 * a pipe whose write end systemd closes when it has read everything before
 * it.  Without NOTIFY_SOCKET (not under systemd) these do nothing.
 */

/** How long to wait for systemd to handle a notification. */
export const NOTIFY_BARRIER_TIMEOUT_MS = 5_000;

/**
 * Send `text` ("READY=1", "MAINPID=123\nREADY=1") to systemd.  Resolves
 * once systemd has read it when `barrier`, at once otherwise; resolves
 * false when there is no NOTIFY_SOCKET, rejects when it cannot be sent
 * or the barrier times out.
 */
export async function notifySystemd(text: string, barrier: boolean): Promise<boolean> {
	const socketPath = process.env['NOTIFY_SOCKET'];
	if (socketPath === undefined || socketPath === '') {
		return false;
	}
	const fp = fdPass();
	if (fp === null) {
		throw new Error(`cannot notify systemd: ${fdPassMissing()}`);
	}
	const fd = fp.notify(socketPath, text, barrier);
	if (fd < 0) {
		return true;
	}
	/* The pipe's read end reaches EOF once systemd closed the write end it was sent. */
	const pipe = new net.Socket({ fd, readable: true, writable: false });
	pipe.on('data', () => {});
	await new Promise<void>((resolve, reject) => {
		const timer = setTimeout(() => {
			pipe.destroy();
			reject(new Error(`systemd did not confirm "${text.split('\n')[0]}" within ${NOTIFY_BARRIER_TIMEOUT_MS} ms`));
		}, NOTIFY_BARRIER_TIMEOUT_MS);
		pipe.once('close', () => {
			clearTimeout(timer);
			resolve();
		});
		pipe.once('error', () => pipe.destroy());
	});
	return true;
}
