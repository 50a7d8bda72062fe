/*
 * A FLEET: REAL MNAME BACKENDS IN A SOCKET DIRECTORY, BBAL IN FRONT
 *
 * The integration tests run bbal against real node-mname backends: the
 * fixture in test/fixtures/mname_backend.cjs, one process per backend,
 * listening on an AF_UNIX socket in a private directory.  This file makes
 * the directory, starts and restarts backends in it, and puts them and a
 * bbal together (startFleet).
 *
 * THE DIRECTORY lives directly under /tmp rather than os.tmpdir(): a socket
 * path must fit in 107 bytes, and TMPDIR on some CI machines is long enough
 * to break that.  It is removed on teardown, with the stats socket bbal.ts
 * puts beside it.
 *
 * A BACKEND is started as a child (process.ts) and is ready once it prints
 * "ready"; kill() stops it (SIGKILL by default, which leaves the socket file
 * behind so connects are refused; SIGTERM lets mname close the listener,
 * which removes the file), restart() starts a fresh process at the same
 * path.  Every backend is killed on teardown.
 *
 * ANSWERING MODES.  Every backend is started with an IPC channel, and
 * command() switches how it answers (normal, servfail, refused, nxdomain,
 * blackhole: the fixture's header says what each does), resolving with the
 * moment the backend says the mode took effect.  A restarted backend is a
 * new process with a new channel, and starts normal.  The channel is
 * unref()ed on our side, so a backend never keeps a test process alive;
 * the fixture exits when the channel closes, so a test process that dies
 * leaves no backend behind.
 */

import fs from 'node:fs/promises';
import path from 'node:path';
import { type Bbal, startBbal, statsSocketFor } from './bbal.js';
import { type Child, childEnv, projectRoot, startChild, type Teardowns } from './process.js';
import { freePort } from './ports.js';
import { waitFor } from './wait.js';

export const backendFixture = path.join(projectRoot, 'test', 'fixtures', 'mname_backend.cjs');

/** How long a backend has to print "ready". */
const READY_TIMEOUT_MS = 10_000;
/** How long a backend has to acknowledge a command. */
const COMMAND_TIMEOUT_MS = 5000;

/** How a backend answers (test/fixtures/mname_backend.cjs, ANSWERING MODES). */
export type BackendMode = 'normal' | 'servfail' | 'blackhole' | 'refused' | 'nxdomain';

/** A private socket directory under /tmp, removed (with its stats socket) on teardown. */
export async function makeSocketDir(t: Teardowns): Promise<string> {
	const dir = await fs.mkdtemp('/tmp/bbal-');
	t.teardown(async () => {
		await fs.rm(dir, { recursive: true, force: true });
		await fs.rm(statsSocketFor(dir), { force: true });
	});
	return dir;
}

export interface Backend {
	readonly path: string;
	readonly label: string;
	/* The current process; replaced by restart(). */
	readonly proc: Child['proc'];
	/*
	 * Stop the process and resolve once it has exited.  SIGKILL (the
	 * default) leaves the socket file behind, so connects are refused;
	 * SIGTERM lets mname close the listener, which removes the file.
	 */
	kill(signal?: NodeJS.Signals): Promise<void>;
	/* Start a fresh process at the same path (killing the old one first); it answers normally. */
	restart(): Promise<void>;
	/* Switch how it answers; resolves with the backend's Date.now() when the mode took effect. */
	command(cmd: BackendMode): Promise<number>;
	/* How many queries it has been asked so far (probes included). */
	queries(): Promise<number>;
}

async function spawnBackend(socketPath: string, label: string): Promise<Child> {
	const child = startChild(`backend ${label} at ${socketPath}`, process.execPath, [backendFixture, socketPath, label],
		{ env: childEnv(), ipc: true });
	child.proc.channel?.unref();
	try {
		await child.waitOutput((out) => out.includes('ready\n'), READY_TIMEOUT_MS, 'ready');
	} catch (err) {
		child.proc.kill('SIGKILL');
		throw new Error(`${(err as Error).message}\nstderr: ${child.stderr}`);
	}
	return child;
}

/*
 * Send a command on the child's IPC channel and wait for its acknowledgement
 * `{ done: cmd, at }`.  Rejects when the backend refuses the command, exits
 * first, or says nothing for 5 s.
 */
function commandChild(child: Child, label: string, cmd: BackendMode | 'count'): Promise<{ at: number; queries?: number }> {
	const proc = child.proc;
	return new Promise((resolve, reject) => {
		const finish = (err: Error | null, reply: { at: number; queries?: number } = { at: NaN }): void => {
			clearTimeout(timer);
			proc.off('message', procOnMessage);
			proc.off('exit', procOnExit);
			if (err !== null) {
				reject(err);
			} else {
				resolve(reply);
			}
		};
		const procOnMessage = (msg: unknown): void => {
			const m = msg as { done?: unknown; at?: unknown; error?: unknown; queries?: unknown };
			if (typeof m.error === 'string') {
				finish(new Error(`backend ${label}: ${m.error}`));
			} else if (m.done === cmd && typeof m.at === 'number') {
				finish(null, { at: m.at, queries: typeof m.queries === 'number' ? m.queries : undefined });
			}
		};
		const procOnExit = (): void => finish(new Error(`backend ${label}: exited before acknowledging ${cmd}`));
		const timer = setTimeout(() => finish(new Error(`backend ${label}: ${cmd} not acknowledged within `
			+ `${COMMAND_TIMEOUT_MS / 1000} s`)), COMMAND_TIMEOUT_MS);
		if (child.exited || !proc.connected) {
			finish(new Error(`backend ${label}: not running, cannot take ${cmd}`));
			return;
		}
		proc.on('message', procOnMessage);
		proc.once('exit', procOnExit);
		proc.send({ cmd }, (err) => {
			if (err !== null) {
				finish(err);
			}
		});
	});
}

/** A real mname backend at dir/name, answering with TXT `be=<label>`; killed on teardown. */
export async function startBackend(t: Teardowns, dir: string, name: string,
	label: string = name): Promise<Backend> {
	const socketPath = path.join(dir, name);
	let child = await spawnBackend(socketPath, label);
	const backend: Backend = {
		path: socketPath,
		label,
		get proc() { return child.proc; },
		async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
			await child.stop(signal);
		},
		async restart(): Promise<void> {
			await child.stop('SIGKILL');
			child = await spawnBackend(socketPath, label);
		},
		async command(cmd: BackendMode): Promise<number> {
			return (await commandChild(child, label, cmd)).at;
		},
		async queries(): Promise<number> {
			return (await commandChild(child, label, 'count')).queries ?? NaN;
		},
	};
	t.teardown(() => backend.kill('SIGKILL'));
	return backend;
}

export interface Fleet {
	dir: string;
	port: number;
	bbal: Bbal;
	backends: Backend[];
	/* bbal's stats socket. */
	sock: string;
}

/*
 * Real mname backends named after `labels` in a fresh socket directory and
 * bbal in front of them (with `args` and `env` added), resolved once every
 * backend is established.
 */
export async function startFleet(t: Teardowns, labels: string[], args: string[] = [],
	env?: NodeJS.ProcessEnv): Promise<Fleet> {
	const dir = await makeSocketDir(t);
	const backends: Backend[] = [];
	for (const l of labels) {
		backends.push(await startBackend(t, dir, l));
	}
	const port = await freePort();
	const bbal = await startBbal(t, { dir, port, args, env });
	await waitFor(() => bbal.logs.filter((r) => r.msg === 'backend socket established').length >= labels.length,
		5000, 20, `${labels.length} backends established`);
	return { dir, port, bbal, backends, sock: statsSocketFor(dir) };
}
