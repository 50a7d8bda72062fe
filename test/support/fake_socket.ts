/*
 * A FAKE BACKEND SOCKET, FOR THE STATE MACHINES WITHOUT I/O
 *
 * The backend registry opens every connection through a Connector
 * (src/backends.ts), its one documented seam for tests.  A FakeConnector is
 * such a connector: each connection it is asked for is a FakeSocket, kept in
 * `sockets` in the order asked, so a test reaches the last one and drives
 * it by emitting what a real socket would ('connect', 'data', 'end',
 * 'error'), with a stepped clock instead of waiting.
 *
 * A FakeSocket records every write (and how many each cork() .. uncork()
 * held) and answers write() with `accept`, so a test can make the session
 * refuse writes the way a full socket buffer does.  establish() is the usual
 * start: connected, then the backend's SERVER_HELLO.  connectError() fails
 * it as a refused or missing socket file would.  destroy(), pause() and
 * resume() only note it (a paused FakeSocket emits whatever the test emits).
 */

import { EventEmitter } from 'node:events';
import type net from 'node:net';
import pino, { type Logger } from 'pino';
import { type Backend, Backends, type Connector } from '../../src/backends.js';
import { Remotes } from '../../src/remotes.js';
import { TimeoutWheel } from '../../src/timeouts.js';
import { SERVER_HELLO_FRAME } from './backend_frames.js';

export class FakeSocket extends EventEmitter {
	readonly writes: Buffer[] = [];
	/* How many writes each cork()..uncork() held. */
	readonly corkedWrites: number[] = [];
	destroyed = false;
	/* pause() .. resume(): the control reader stops the socket when its budget is spent. */
	paused = false;
	/* What write() returns: false is a socket whose buffer is full. */
	accept = true;
	private corked = -1;

	constructor(readonly path: string, readonly highWaterMark?: number) {
		super();
	}

	write(b: Uint8Array): boolean {
		this.writes.push(Buffer.from(b));
		if (this.corked >= 0) {
			this.corked++;
		}
		return this.accept;
	}

	cork(): void {
		this.corked = 0;
	}

	uncork(): void {
		this.corkedWrites.push(this.corked);
		this.corked = -1;
	}

	pause(): this {
		this.paused = true;
		return this;
	}

	resume(): this {
		this.paused = false;
		return this;
	}

	destroy(): this {
		this.destroyed = true;
		return this;
	}

	/** Everything written, as one buffer. */
	all(): Buffer {
		return Buffer.concat(this.writes);
	}

	/** Connected, then the backend's hello: the session becomes ok. */
	establish(): void {
		this.emit('connect');
		this.emit('data', SERVER_HELLO_FRAME);
	}

	/** The connect fails with `code` (ECONNREFUSED: nobody listens; ENOENT: no socket file). */
	connectError(code: 'ECONNREFUSED' | 'ENOENT'): void {
		this.emit('error', Object.assign(new Error(`connect ${code}`), { code }));
	}
}

export class FakeConnector {
	/** Every socket asked for, oldest first. */
	readonly sockets: FakeSocket[] = [];

	/** The Connector to hand to Backends. */
	readonly connect: Connector = (path, writableHighWaterMark) => {
		const s = new FakeSocket(path, writableHighWaterMark);
		this.sockets.push(s);
		/* The one place a FakeSocket passes for a net.Socket: it has every member the registry uses. */
		return s as unknown as net.Socket;
	};

	/** The socket asked for last. */
	last(): FakeSocket {
		const s = this.sockets.at(-1);
		if (s === undefined) {
			throw new Error('no socket has been asked for yet');
		}
		return s;
	}
}

/**
 * A backend registry over fake sockets, and up(name): that backend found,
 * connected and its hello answered, so it is ok.  What the remotes table's
 * tests build on.
 */
export function fakeRegistry(log: Logger, wheel: TimeoutWheel): { backends: Backends; up: (name: string) => Backend } {
	const connector = new FakeConnector();
	const backends = new Backends({ socketDir: '/s', log, wheel, onOutboundUdp: () => {}, connector: connector.connect });
	/* Bring a backend (back) to ok: its socket found bound afresh (a restart connects at once), then hello. */
	let generation = 0;
	const up = (name: string): Backend => {
		const be = backends.trackAndConnect(name, `1/${++generation}`) as Backend;
		connector.last().establish();
		return be;
	};
	return { backends, up };
}

/**
 * A remotes table over a fake registry, on a stepped clock, with every log
 * line kept: tick() moves the clock and runs the wheel as the balancer's
 * interval does; logged(msg) gives the records with that message.
 */
export function fakeTable(maxRemotes: number) {
	let now = 5_000_000;
	const wheel = new TimeoutWheel(() => now);
	const logs: Array<Record<string, unknown>> = [];
	const log = pino({ level: 'debug' }, { write: (line: string) => { logs.push(JSON.parse(line) as Record<string, unknown>); } });
	const { backends, up } = fakeRegistry(log, wheel);
	const remotes = new Remotes({ log, backends, wheel, maxRemotes });
	return {
		wheel, backends, remotes, logs, up, log,
		tick(secs = 1): void {
			now += secs * 1000;
			wheel.run(now);
		},
		logged: (msg: string) => logs.filter((r) => r.msg === msg),
	};
}
