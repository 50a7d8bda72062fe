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
	/* Start a fresh process at the same path (killing the old one first). */
	restart(): Promise<void>;
}

async function spawnBackend(socketPath: string, label: string): Promise<Child> {
	const child = startChild(`backend ${label} at ${socketPath}`, process.execPath, [backendFixture, socketPath, label],
		{ env: childEnv() });
	try {
		await child.waitOutput((out) => out.includes('ready\n'), READY_TIMEOUT_MS, 'ready');
	} catch (err) {
		child.proc.kill('SIGKILL');
		throw new Error(`${(err as Error).message}\nstderr: ${child.stderr}`);
	}
	return child;
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
