/*
 * INTEGRATION TEST HELPERS
 *
 * The integration tests run the built CLI the way an operator would: bbal as
 * a child process on 127.0.0.1, real node-mname backends (the fixture in
 * test/fixtures/mname_backend.cjs) on AF_UNIX sockets in a private temporary
 * directory, and DNS clients on dgram sockets bound to distinct 127.0.0.x
 * addresses, so that each client is a different "remote" to bbal.  Linux
 * routes all of 127.0.0.0/8 to loopback, so any such address can be bound
 * without setup.
 *
 * Every helper that creates something long-lived takes the tap Test and
 * registers its release with t.teardown(): processes are killed, directories
 * removed.  A failing assertion therefore never leaves a backend or a
 * balancer running to disturb the next test, and tests do not need their own
 * cleanup code.  Helpers that wait always wait with a deadline and reject
 * with what they saw (stderr, the logs, the backends that answered), because
 * a test that hangs until tap's timeout tells nobody anything.
 *
 * Child processes are spawned without tap's NODE_OPTIONS: tap injects its
 * process-info hook there, which costs a quarter of a second per start and
 * writes bookkeeping for processes that are not tests.
 */

import { spawn, type ChildProcess } from 'node:child_process';
import dgram from 'node:dgram';
import { EventEmitter } from 'node:events';
import fs from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import dnsPacket from 'dns-packet';
import type { Test } from 'tap';

/* This file runs as dist/test/helpers.js; the repository is two levels up. */
export const projectRoot = path.resolve(
	path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const bbalBin = path.join(projectRoot, 'bin', 'bbal.js');
export const backendFixture = path.join(projectRoot, 'test', 'fixtures',
	'mname_backend.cjs');

const START_TIMEOUT_MS = 10_000;
const STOP_GRACE_MS = 3_000;

/* The environment for a child: ours plus extra, minus tap's hooks. */
export function childEnv(extra?: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
	const env: NodeJS.ProcessEnv = {};
	for (const [k, v] of Object.entries(process.env)) {
		if (k === 'TAP' || k.startsWith('TAP_') || k.startsWith('_TAPJS_')) {
			continue;
		}
		env[k] = v;
	}
	const opts = (env['NODE_OPTIONS'] ?? '').split(/\s+/)
		.filter((o) => o !== '' && !o.includes('@tapjs'));
	if (opts.length > 0) {
		env['NODE_OPTIONS'] = opts.join(' ');
	} else {
		delete env['NODE_OPTIONS'];
	}
	return { ...env, ...extra };
}

function isRunning(proc: ChildProcess): boolean {
	return proc.exitCode === null && proc.signalCode === null;
}

export interface ExitStatus {
	code: number | null;
	signal: NodeJS.Signals | null;
}

/* Resolves when proc exits (at once if it has); never rejects. */
function exited(proc: ChildProcess): Promise<ExitStatus> {
	if (!isRunning(proc)) {
		return Promise.resolve({ code: proc.exitCode, signal: proc.signalCode });
	}
	return new Promise((resolve) => {
		proc.once('exit', (code, signal) => resolve({ code, signal }));
	});
}

/*
 * Send signal, then SIGKILL if the process is still there after graceMs.
 * The escalation is what keeps a hung child from outliving its test; the
 * caller sees signal 'SIGKILL' in the result and can fail on it.
 */
async function terminate(proc: ChildProcess, signal: NodeJS.Signals,
	graceMs: number): Promise<ExitStatus> {
	if (!isRunning(proc)) {
		return exited(proc);
	}
	const done = exited(proc);
	proc.kill(signal);
	if (signal === 'SIGKILL') {
		return done;
	}
	const timer = setTimeout(() => proc.kill('SIGKILL'), graceMs);
	try {
		return await done;
	} finally {
		clearTimeout(timer);
	}
}

/*
 * A private socket directory.  It lives directly under /tmp rather than
 * os.tmpdir(): a socket path must fit in 107 bytes, and TMPDIR on some CI
 * machines is long enough to break that.
 */
export async function makeSocketDir(t: Test): Promise<string> {
	const dir = await fs.mkdtemp('/tmp/bbal-');
	t.teardown(async () => {
		await fs.rm(dir, { recursive: true, force: true });
		await fs.rm(statsSocketFor(dir), { force: true });
	});
	return dir;
}

/* ------------------------------------------------------------------ */
/* Backends                                                            */
/* ------------------------------------------------------------------ */

export interface Backend {
	readonly path: string;
	readonly label: string;
	/* The current process; replaced by restart(). */
	readonly proc: ChildProcess;
	/*
	 * Stop the process and resolve once it has exited.  SIGKILL (the
	 * default) leaves the socket file behind, so connects are refused;
	 * SIGTERM lets mname close the listener, which removes the file.
	 */
	kill(signal?: NodeJS.Signals): Promise<void>;
	/* Start a fresh process at the same path (killing the old one first). */
	restart(): Promise<void>;
}

function spawnBackend(socketPath: string, label: string): Promise<ChildProcess> {
	const proc = spawn(process.execPath, [backendFixture, socketPath, label], {
		cwd: projectRoot,
		env: childEnv(),
		stdio: ['ignore', 'pipe', 'pipe'],
	});
	let stdout = '';
	let stderr = '';
	proc.stdout.setEncoding('utf8');
	proc.stderr.setEncoding('utf8');
	proc.stderr.on('data', (s: string) => { stderr += s; });

	return new Promise((resolve, reject) => {
		const fail = (why: string): void => {
			settle();
			proc.kill('SIGKILL');
			reject(new Error(`backend ${label} at ${socketPath}: ${why}\n` +
				`stderr: ${stderr}`));
		};
		const onError = (err: Error): void => fail(`spawn failed: ${err.message}`);
		const onExit = (code: number | null, signal: string | null): void =>
			fail(`exited before ready (code ${code}, signal ${signal})`);
		const onData = (s: string): void => {
			stdout += s;
			if (stdout.includes('ready\n')) {
				settle();
				resolve(proc);
			}
		};
		const settle = (): void => {
			clearTimeout(timer);
			proc.off('error', onError);
			proc.off('exit', onExit);
			proc.stdout.off('data', onData);
			/* Keep draining stdout, and keep later errors (EPIPE) harmless. */
			proc.stdout.resume();
			proc.on('error', () => {});
		};
		const timer = setTimeout(() => fail(
			`not ready after ${START_TIMEOUT_MS} ms`), START_TIMEOUT_MS);
		proc.on('error', onError);
		proc.on('exit', onExit);
		proc.stdout.on('data', onData);
	});
}

export async function startBackend(t: Test, dir: string, name: string,
	label: string = name): Promise<Backend> {
	const socketPath = path.join(dir, name);
	let proc = await spawnBackend(socketPath, label);

	const backend: Backend = {
		path: socketPath,
		label,
		get proc() { return proc; },
		async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
			await terminate(proc, signal, STOP_GRACE_MS);
		},
		async restart(): Promise<void> {
			await terminate(proc, 'SIGKILL', 0);
			proc = await spawnBackend(socketPath, label);
		},
	};
	t.teardown(() => backend.kill('SIGKILL'));
	return backend;
}

/* ------------------------------------------------------------------ */
/* Ports                                                               */
/* ------------------------------------------------------------------ */

function bindUdp(port: number): Promise<dgram.Socket | null> {
	return new Promise((resolve) => {
		const sock = dgram.createSocket('udp4');
		sock.once('error', () => { sock.close(); resolve(null); });
		sock.bind(port, '127.0.0.1', () => resolve(sock));
	});
}

function listenTcp(port: number): Promise<net.Server | null> {
	return new Promise((resolve) => {
		const srv = net.createServer();
		srv.once('error', () => resolve(null));
		srv.listen(port, '127.0.0.1', () => resolve(srv));
	});
}

/*
 * A port that is free on 127.0.0.1 for both UDP and TCP at the moment of the
 * call.  The kernel picks a free TCP port; we keep it only if UDP can bind the
 * same number too.  Another process could still take it before bbal binds,
 * which on a test machine is rare enough to accept.
 */
export async function freePort(): Promise<number> {
	for (let attempt = 0; attempt < 20; attempt++) {
		const srv = await listenTcp(0);
		if (srv === null) {
			continue;
		}
		const port = (srv.address() as net.AddressInfo).port;
		const udp = await bindUdp(port);
		await new Promise<void>((resolve) => srv.close(() => resolve()));
		if (udp !== null) {
			await new Promise<void>((resolve) => udp.close(() => resolve()));
			return port;
		}
	}
	throw new Error('freePort: no port free for both TCP and UDP in 20 tries');
}

/* ------------------------------------------------------------------ */
/* bbal                                                                */
/* ------------------------------------------------------------------ */

/* One pino line as parsed from bbal's stdout. */
export interface LogRecord {
	level?: number;
	msg?: string;
	[key: string]: unknown;
}

export interface BbalOptions {
	dir: string;
	port: number;
	args?: string[];
	env?: NodeJS.ProcessEnv;
}

export interface Bbal {
	readonly proc: ChildProcess;
	/* Every JSON object bbal has printed on stdout, in order. */
	readonly logs: LogRecord[];
	/* Everything on stdout, JSON or not. */
	stdout(): string;
	stderr(): string;
	/*
	 * The first log record at index `since` or later that satisfies pred.
	 * Pass `bbal.logs.length` taken before an action to see only what the
	 * action caused.  Rejects on timeout or if bbal exits first.
	 */
	waitForLog(pred: (rec: LogRecord) => boolean, timeoutMs?: number,
		since?: number): Promise<LogRecord>;
	/* Signal bbal, SIGKILL it after 3 s, resolve with how it exited. */
	stop(signal?: NodeJS.Signals): Promise<ExitStatus>;
}

/* The stats socket startBbal gives a bbal serving `dir`. */
export function statsSocketFor(dir: string): string {
	return `${dir}.stats.sock`;
}

export async function startBbal(t: Test, opts: BbalOptions): Promise<Bbal> {
	/*
	 * Each bbal gets its own stats socket beside (never inside) its backend
	 * directory, so no test touches the default path or another's socket.
	 */
	const extra = opts.args ?? [];
	const hasStats = extra.some((a) => a === '-S' || a.startsWith('--stats-socket'));
	const argv = [bbalBin, '-b', '127.0.0.1', '-p', String(opts.port),
		'-s', opts.dir, '-l', 'debug',
		...(hasStats ? [] : ['-S', statsSocketFor(opts.dir)]), ...extra];
	const proc = spawn(process.execPath, argv, {
		cwd: projectRoot,
		env: childEnv(opts.env),
		stdio: ['ignore', 'pipe', 'pipe'],
	});
	/* A kill after exit can report EPIPE/ESRCH here; never let it throw. */
	proc.on('error', () => {});

	const logs: LogRecord[] = [];
	const events = new EventEmitter();
	let stdout = '';
	let stderr = '';
	let partial = '';
	/*
	 * 'close' rather than 'exit': by then stdout has been read to the end, so
	 * a test that stops bbal sees its final log lines.
	 */
	let status: ExitStatus | null = null;
	const closed = new Promise<ExitStatus>((resolve) => {
		proc.once('close', (code, signal) => {
			status = { code, signal };
			events.emit('close');
			resolve(status);
		});
	});

	proc.stdout.setEncoding('utf8');
	proc.stderr.setEncoding('utf8');
	proc.stderr.on('data', (s: string) => { stderr += s; });
	proc.stdout.on('data', (s: string) => {
		stdout += s;
		const lines = (partial + s).split('\n');
		partial = lines.pop() ?? '';
		for (const line of lines) {
			let rec: unknown;
			try {
				rec = JSON.parse(line);
			} catch {
				continue;
			}
			if (rec !== null && typeof rec === 'object' && !Array.isArray(rec)) {
				logs.push(rec as LogRecord);
				events.emit('log');
			}
		}
	});

	const describe = (): string =>
		`bbal ${argv.slice(1).join(' ')}\nstderr: ${stderr}\nstdout: ${stdout}`;

	const waitForLog = (pred: (rec: LogRecord) => boolean,
		timeoutMs = 5000, since = 0): Promise<LogRecord> => {
		return new Promise((resolve, reject) => {
			let next = since;
			const finish = (err: Error | null, rec?: LogRecord): void => {
				clearTimeout(timer);
				events.off('log', check);
				events.off('close', onClose);
				if (err !== null) {
					reject(err);
				} else {
					resolve(rec as LogRecord);
				}
			};
			const check = (): void => {
				for (; next < logs.length; next++) {
					const rec = logs[next];
					if (pred(rec)) {
						finish(null, rec);
						return;
					}
				}
			};
			const onClose = (): void => {
				check();
				finish(new Error(`bbal exited (${JSON.stringify(status)}) ` +
					`before the awaited log line\n${describe()}`));
			};
			const timer = setTimeout(() => finish(new Error(
				`no matching log line within ${timeoutMs} ms\n${describe()}`)),
			timeoutMs);
			events.on('log', check);
			events.on('close', onClose);
			check();
			if (status !== null) {
				onClose();
			}
		});
	};

	const bbal: Bbal = {
		proc,
		logs,
		stdout: () => stdout,
		stderr: () => stderr,
		waitForLog,
		async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<ExitStatus> {
			if (status === null) {
				const timer = setTimeout(() => proc.kill('SIGKILL'),
					STOP_GRACE_MS);
				proc.kill(signal);
				try {
					return await closed;
				} finally {
					clearTimeout(timer);
				}
			}
			return status;
		},
	};
	t.teardown(async () => { await bbal.stop('SIGTERM'); });

	await waitForLog((rec) => rec.msg === 'listening', START_TIMEOUT_MS)
		.catch((err: Error) => {
			proc.kill('SIGKILL');
			throw new Error(`bbal did not start: ${err.message}`);
		});
	return bbal;
}

export interface RunResult {
	code: number | null;
	signal: NodeJS.Signals | null;
	stdout: string;
	stderr: string;
}

/*
 * Run the CLI to completion, for flag and startup-error tests.  It is killed
 * and the promise rejected if it is still running after 10 s, since the
 * commands tested this way are all expected to exit by themselves.
 */
export function runBbal(args: string[], env?: NodeJS.ProcessEnv):
Promise<RunResult> {
	const proc = spawn(process.execPath, [bbalBin, ...args], {
		cwd: projectRoot,
		env: childEnv(env),
		stdio: ['ignore', 'pipe', 'pipe'],
	});
	let stdout = '';
	let stderr = '';
	proc.stdout.setEncoding('utf8');
	proc.stderr.setEncoding('utf8');
	proc.stdout.on('data', (s: string) => { stdout += s; });
	proc.stderr.on('data', (s: string) => { stderr += s; });
	return new Promise((resolve, reject) => {
		const timer = setTimeout(() => {
			proc.kill('SIGKILL');
			reject(new Error(`bbal ${args.join(' ')} still running after ` +
				`${START_TIMEOUT_MS} ms\nstderr: ${stderr}\nstdout: ${stdout}`));
		}, START_TIMEOUT_MS);
		proc.once('error', (err) => {
			clearTimeout(timer);
			reject(err);
		});
		proc.once('close', (code, signal) => {
			clearTimeout(timer);
			resolve({ code, signal, stdout, stderr });
		});
	});
}

/* ------------------------------------------------------------------ */
/* DNS clients                                                         */
/* ------------------------------------------------------------------ */

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

/* The `be=<label>` TXT answer the fixture backend adds to every reply. */
export function backendOf(packet: dnsPacket.Packet): string | null {
	for (const ans of packet.answers ?? []) {
		if (ans.type !== 'TXT') {
			continue;
		}
		const parts = Array.isArray(ans.data) ? ans.data : [ans.data];
		for (const part of parts) {
			const s = part.toString();
			if (s.startsWith('be=')) {
				return s.slice(3);
			}
		}
	}
	return null;
}

export function encodeQuery(name: string, type: dnsPacket.RecordType,
	id: number, edns?: number): Buffer {
	return dnsPacket.encode({
		type: 'query',
		id,
		flags: dnsPacket.RECURSION_DESIRED,
		questions: [{ type, name, class: 'IN' }],
		additionals: edns === undefined ? [] :
			[{ type: 'OPT', name: '.', udpPayloadSize: edns, extendedRcode: 0,
			ednsVersion: 0, flags: 0, flag_do: false, options: [] }],
	});
}

/** A DNS message as it goes over TCP: a 2-byte length, then the message. */
export function framed(msg: Buffer): Buffer {
	const len = Buffer.alloc(2);
	len.writeUInt16BE(msg.length);
	return Buffer.concat([len, msg]);
}

function bindClient(source: string): Promise<dgram.Socket> {
	return new Promise((resolve, reject) => {
		const sock = dgram.createSocket('udp4');
		sock.once('error', (err) => { sock.close(); reject(err); });
		sock.bind(0, source, () => {
			sock.removeAllListeners('error');
			resolve(sock);
		});
	});
}

/*
 * One query from a fresh socket bound to `source`.  Replies whose id is not
 * ours are ignored rather than failing the query, so a stray datagram
 * cannot confuse a test; only a matching reply or the timeout ends it.
 */
export async function udpQuery(opts: UdpQueryOptions): Promise<UdpQueryResult> {
	const id = opts.id ?? Math.floor(Math.random() * 0x10000);
	const timeoutMs = opts.timeoutMs ?? 2000;
	const query = encodeQuery(opts.name, opts.type ?? 'TXT', id, opts.edns);
	const sock = await bindClient(opts.source);
	try {
		return await new Promise<UdpQueryResult>((resolve, reject) => {
			const timer = setTimeout(() => reject(new Error(
				`udpQuery ${opts.name} from ${opts.source} to port ` +
				`${opts.port}: no answer within ${timeoutMs} ms`)), timeoutMs);
			sock.on('error', (err) => {
				clearTimeout(timer);
				reject(err);
			});
			sock.on('message', (bytes, from) => {
				let packet: dnsPacket.Packet;
				try {
					packet = dnsPacket.decode(bytes);
				} catch (err) {
					clearTimeout(timer);
					reject(new Error(`udpQuery: undecodable reply: ${String(err)}`));
					return;
				}
				if (packet.id !== id) {
					return;
				}
				clearTimeout(timer);
				resolve({ packet, backend: backendOf(packet), from, bytes });
			});
			sock.send(query, opts.port, '127.0.0.1', (err) => {
				if (err) {
					clearTimeout(timer);
					reject(err);
				}
			});
		});
	} finally {
		sock.close();
	}
}

/* Send arbitrary bytes as one datagram from `source`; expect nothing back. */
export async function udpSendRaw(opts: { port: number; source: string;
	bytes: Uint8Array }): Promise<void> {
	const sock = await bindClient(opts.source);
	try {
		await new Promise<void>((resolve, reject) => {
			sock.on('error', reject);
			sock.send(opts.bytes, opts.port, '127.0.0.1',
				(err) => err ? reject(err) : resolve());
		});
	} finally {
		sock.close();
	}
}

/* ------------------------------------------------------------------ */
/* Waiting                                                             */
/* ------------------------------------------------------------------ */

export function sleep(ms: number): Promise<void> {
	return new Promise((resolve) => setTimeout(resolve, ms));
}

/*
 * Poll fn until it returns true.  An exception from fn counts as "not yet"
 * only if it is thrown before the deadline; the last one is quoted in the
 * timeout message.
 */
export async function waitFor(fn: () => boolean | Promise<boolean>,
	timeoutMs: number, intervalMs = 50, what?: string): Promise<void> {
	const deadline = Date.now() + timeoutMs;
	let lastErr: string | null = null;
	for (;;) {
		try {
			if (await fn()) {
				return;
			}
			lastErr = null;
		} catch (err) {
			lastErr = err instanceof Error ? err.message : JSON.stringify(err);
		}
		if (Date.now() >= deadline) {
			break;
		}
		await sleep(intervalMs);
	}
	throw new Error(`waitFor: ${what ?? fn.toString()} not true within ` +
		`${timeoutMs} ms` + (lastErr !== null ? ` (last error: ${lastErr})` : ''));
}

export interface QueryUntilOptions extends Omit<UdpQueryOptions, 'timeoutMs'> {
	/* Checked against each answer's backend label (null: no TXT, no answer). */
	until: (backend: string | null) => boolean;
	timeoutMs?: number;
	intervalMs?: number;
}

/*
 * Query every 100 ms until the answering backend satisfies `until`, for
 * "this remote moves to another backend within a second or two".  A query
 * that times out counts as backend null and the loop goes on.  Resolves with
 * the satisfying answer (null if `until(null)` was what held on a timeout);
 * rejects with the sequence of backends seen, which is what one wants to
 * read when it fails.
 */
export async function queryUntil(opts: QueryUntilOptions):
Promise<UdpQueryResult | null> {
	const { until, timeoutMs = 5000, intervalMs = 100, ...query } = opts;
	const deadline = Date.now() + timeoutMs;
	const seen: Array<string | null> = [];
	for (;;) {
		const remaining = deadline - Date.now();
		let res: UdpQueryResult | null = null;
		try {
			res = await udpQuery({ ...query,
				timeoutMs: Math.max(50, Math.min(1000, remaining)) });
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
/* A fleet                                                             */
/* ------------------------------------------------------------------ */

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
 * bbal in front of them, resolved once every backend is established.
 */
export async function startFleet(t: Test, labels: string[], args: string[] = []): Promise<Fleet> {
	const dir = await makeSocketDir(t);
	const backends: Backend[] = [];
	for (const l of labels) {
		backends.push(await startBackend(t, dir, l));
	}
	const port = await freePort();
	const bbal = await startBbal(t, { dir, port, args });
	await waitFor(() => bbal.logs.filter((r) => r.msg === 'backend socket established').length >= labels.length,
		5000, 20, `${labels.length} backends established`);
	return { dir, port, bbal, backends, sock: statsSocketFor(dir) };
}
