/*
 * AN IN-PROCESS FAKE BACKEND, FOR WHAT A REAL MNAME NEVER DOES
 *
 * Most tests put real mname backends behind bbal (fleet.ts).  Some need a
 * backend that misbehaves on cue: one that breaks the protocol (a frame
 * before the hello, a hello twice, an unknown type), one that stops reading,
 * one that answers INBOUND_TCP with the wrong frame, with nothing, or with
 * the OK split in two and answer bytes glued behind it.  A FakeBackend is a
 * plain net.Server on an AF_UNIX socket in the backend directory whose
 * behaviour a test gives as two callbacks.
 *
 * Every connection bbal opens is told apart by its first frame, read with
 * bbal's own FrameReader (src/protocol.ts):
 *
 *   INBOUND_TCP   a TCP session.  The client's address and port (as u32s)
 *                 are recorded in `inboundTcp`, the reader stops, and
 *                 onTcpSession gets the socket, that address and port, and
 *                 whatever followed the frame in the same read (with bbal,
 *                 nothing: it sends the client's bytes only after the OK).
 *                 Later bytes are the callback's to read.  By default a
 *                 session is never answered.
 *   anything else a control session.  Every frame, the first included, goes
 *                 to onControlFrame; by default answerControl(), which says
 *                 SERVER_HELLO to CLIENT_HELLO and SERVER_HEARTBEAT to each
 *                 CLIENT_HEARTBEAT.  A test that replaces it calls
 *                 answerControl() itself for the part it keeps.
 *
 * stopReading() pauses every connection, and every new one until
 * resumeReading(): a backend whose event loop is wedged, seen from bbal.
 * flood() writes OUTBOUND_UDP frames on every control session (and on each
 * later one, right after its hello) as fast as the socket takes them, until
 * stopFlood(): a backend gone wild, which mname never is.  floodFrames
 * counts the frames handed to the sockets.
 * close() (run on teardown when a Teardowns is given) destroys the
 * connections and closes the listener.
 *
 * The chaos harness runs one of these as a process of its own
 * (test/chaos/fake_backend.ts), serving DNS until told to misbehave.
 */

import { unlinkSync } from 'node:fs';
import net from 'node:net';
import {
	FRAME_CLIENT_HEARTBEAT, FRAME_CLIENT_HELLO, FRAME_INBOUND_TCP, FRAME_OUTBOUND_UDP, FrameReader,
} from '../../src/protocol.js';
import { encodeUdpFrame, SERVER_HEARTBEAT_FRAME, SERVER_HELLO_FRAME } from './backend_frames.js';
import type { Teardowns } from './process.js';

/** Far above any frame bbal sends: the fake judges nothing by size. */
const MAX_FRAME_PAYLOAD_BYTES = 65_535;
/* A flood is written in blocks of about 64 KiB of whole frames, at most this many blocks a turn. */
const FLOOD_BLOCK_BYTES = 65_536;
const FLOOD_BLOCKS_PER_TURN = 16;

/** One frame from bbal on a control session; payload is null for frames without one. */
export interface Frame {
	type: number;
	addr: number;
	port: number;
	payload: Buffer | null;
}

/** The client a TCP session is for, as INBOUND_TCP gave it. */
export interface InboundTcp {
	addr: number;
	port: number;
}

export interface FakeBackendOptions {
	/** Each frame of a control session; answerControl by default. */
	onControlFrame?: (sock: net.Socket, frame: Frame) => void;
	/** A TCP session once its INBOUND_TCP is in; never answered by default. */
	onTcpSession?: (sock: net.Socket, inbound: InboundTcp, rest: Buffer) => void;
	/** Keep a connection open for writing after bbal's FIN (a TCP session answering after the client's end). */
	allowHalfOpen?: boolean;
}

/** What a healthy backend says on a control session: hello for hello, a heartbeat reply for a heartbeat. */
export function answerControl(sock: net.Socket, frame: Frame): void {
	if (frame.type === FRAME_CLIENT_HELLO) {
		sock.write(SERVER_HELLO_FRAME);
	} else if (frame.type === FRAME_CLIENT_HEARTBEAT) {
		sock.write(SERVER_HEARTBEAT_FRAME);
	}
}

export class FakeBackend {
	/** Every INBOUND_TCP received, in order. */
	readonly inboundTcp: InboundTcp[] = [];
	/** The control sessions open now. */
	readonly controlSessions = new Set<net.Socket>();
	private readonly connections = new Set<net.Socket>();
	private readonly server: net.Server;
	private reading = true;
	/* While flooding: the block of frames written again and again; its frame count. */
	private floodBlock: Buffer | null = null;
	private floodBlockFrames = 0;
	/** Frames handed to the sockets by flood(). */
	floodFrames = 0;

	private constructor(private readonly opts: FakeBackendOptions) {
		this.server = net.createServer({ allowHalfOpen: opts.allowHalfOpen ?? false }, this.serverOnConnection);
	}

	/** A fake listening at socketPath (a stale socket file there is replaced); closed on t's teardown if given. */
	static async listen(t: Teardowns | null, socketPath: string, opts: FakeBackendOptions = {}): Promise<FakeBackend> {
		const fake = new FakeBackend(opts);
		try {
			unlinkSync(socketPath);
		} catch (err) {
			if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
				throw err;
			}
		}
		await new Promise<void>((resolve, reject) => {
			fake.server.once('error', reject);
			fake.server.listen(socketPath, () => {
				fake.server.off('error', reject);
				resolve();
			});
		});
		t?.teardown(() => fake.close());
		return fake;
	}

	/** Stop reading every connection, and every new one, until resumeReading(). */
	stopReading(): void {
		this.reading = false;
		for (const sock of this.connections) {
			sock.pause();
		}
	}

	resumeReading(): void {
		this.reading = true;
		for (const sock of this.connections) {
			sock.resume();
		}
	}

	/** Write OUTBOUND_UDP frames carrying `payload` to addr:port on every control session, as fast as each takes them. */
	flood(addr: number, port: number, payload: Buffer): void {
		const frame = encodeUdpFrame(FRAME_OUTBOUND_UDP, addr, port, payload);
		this.floodBlockFrames = Math.max(1, Math.floor(FLOOD_BLOCK_BYTES / frame.length));
		this.floodBlock = Buffer.concat(Array.from({ length: this.floodBlockFrames }, () => frame));
		for (const sock of this.controlSessions) {
			this.floodOn(sock);
		}
	}

	stopFlood(): void {
		this.floodBlock = null;
	}

	/* Blocks until the socket refuses more (then on 'drain'), yielding to the loop every few. */
	private floodOn(sock: net.Socket): void {
		const more = (): void => {
			for (let i = 0; i < FLOOD_BLOCKS_PER_TURN; i++) {
				const block = this.floodBlock;
				if (block === null || sock.destroyed) {
					return;
				}
				this.floodFrames += this.floodBlockFrames;
				if (!sock.write(block)) {
					sock.once('drain', more);
					return;
				}
			}
			setImmediate(more);
		};
		more();
	}

	/** Destroy every connection and close the listener (which removes the socket file). */
	close(): Promise<void> {
		this.floodBlock = null;
		for (const sock of this.connections) {
			sock.destroy();
		}
		return new Promise((resolve) => this.server.close(() => resolve()));
	}

	private readonly serverOnConnection = (sock: net.Socket): void => {
		this.connections.add(sock);
		sock.on('error', () => {});
		sock.on('close', () => {
			this.connections.delete(sock);
			this.controlSessions.delete(sock);
		});
		let kind: 'new' | 'control' | 'tcp' = 'new';
		let inbound: InboundTcp = { addr: 0, port: 0 };
		const onControlFrame = this.opts.onControlFrame ?? answerControl;
		const reader = new FrameReader({
			onFrame: (type, addr, port, payload) => {
				if (kind === 'new' && type === FRAME_INBOUND_TCP) {
					kind = 'tcp';
					inbound = { addr, port };
					this.inboundTcp.push(inbound);
					return false;
				}
				if (kind === 'new') {
					kind = 'control';
					this.controlSessions.add(sock);
				}
				onControlFrame(sock, { type, addr, port, payload });
				if (type === FRAME_CLIENT_HELLO && this.floodBlock !== null) {
					this.floodOn(sock);
				}
				return true;
			},
			onFrameError: () => sock.destroy(),
		}, MAX_FRAME_PAYLOAD_BYTES);
		const sockOnData = (d: Buffer): void => {
			const used = reader.feed(d);
			if (kind === 'tcp') {
				sock.off('data', sockOnData);
				this.opts.onTcpSession?.(sock, inbound, d.subarray(used));
			}
		};
		sock.on('data', sockOnData);
		if (!this.reading) {
			sock.pause();
		}
	};
}
