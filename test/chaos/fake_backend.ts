/*
 * A HAND-WRITTEN BACKEND PROCESS, for the faults a real mname never commits.
 *
 * Usage: node dist/test/chaos/fake_backend.js <socketPath> <label>
 *
 * It serves like the mname fixture (test/fixtures/mname_backend.cjs) until it
 * is told to misbehave: it says SERVER_HELLO to CLIENT_HELLO, answers every
 * heartbeat, answers every INBOUND_UDP with an OUTBOUND_UDP whose DNS answer
 * carries the TXT record `be=<label>` (so the load driver sees who answered),
 * and serves TCP sessions (INBOUND_TCP_OK, then 2-byte length-prefixed DNS
 * both ways).  It runs as its own process, so its work does not disturb the
 * load driver's timing and a fault in it is a fault of another process, as
 * in production.
 *
 * Commands, one per line on stdin; each is acknowledged on stdout with
 * `done <command> <Date.now()>` at the moment it took effect:
 *
 *   stuck    stop reading, everywhere: every open connection is paused and
 *            new ones are accepted (the kernel would anyway) but never read.
 *            That is a backend whose event loop is wedged, seen from bbal:
 *            writes pile up in the socket until it refuses more, heartbeats
 *            go unanswered.
 *   resume   read again: the backlog is served (late) and service goes on.
 *   violate  write bytes that are no frame at all ("garbage!", an unknown
 *            frame type) on every control session, mid-stream between two
 *            answers, and ignore those sessions from then on.  New sessions
 *            are served normally: the backend is healthy, its old session is
 *            not.
 *
 * "ready" is printed once the socket listens.  SIGTERM closes the listener
 * (removing the socket file) and exits.
 */

import fs from 'node:fs';
import net from 'node:net';
import readline from 'node:readline';
import dnsPacket from 'dns-packet';
import {
	FRAME_CLIENT_HEARTBEAT, FRAME_CLIENT_HELLO, FRAME_INBOUND_TCP, FRAME_INBOUND_UDP, FRAME_OUTBOUND_UDP, FrameReader,
} from '../../src/protocol.js';
import {
	encodeUdpFrame, INBOUND_TCP_OK_FRAME, SERVER_HEARTBEAT_FRAME, SERVER_HELLO_FRAME,
} from '../support/backend_frames.js';

const [socketPath, label] = process.argv.slice(2);
if (socketPath === undefined || label === undefined) {
	process.stderr.write('usage: fake_backend.js <socketPath> <label>\n');
	process.exit(2);
}

/* The DNS answer to one query, or null when it is not worth answering. */
function answerTo(msg: Buffer): Buffer | null {
	let q: dnsPacket.Packet;
	try {
		q = dnsPacket.decode(msg);
	} catch {
		return null;
	}
	const question = q.questions?.[0];
	if (question === undefined) {
		return null;
	}
	return dnsPacket.encode({
		type: 'response',
		id: q.id ?? 0,
		flags: dnsPacket.AUTHORITATIVE_ANSWER | ((q.flags ?? 0) & dnsPacket.RECURSION_DESIRED),
		questions: [question],
		answers: [{ type: 'TXT', name: question.name, ttl: 0, class: 'IN', data: `be=${label}` }],
	});
}

type Kind = 'new' | 'control' | 'tcp' | 'violated';

interface Conn {
	sock: net.Socket;
	kind: Kind;
	reader: FrameReader;
	/* TCP session: the client's stream after the OK. */
	tcpBuf: Buffer;
}

const conns = new Set<Conn>();
let stuck = false;

function serveTcpBytes(c: Conn, data: Buffer): void {
	c.tcpBuf = c.tcpBuf.length === 0 ? data : Buffer.concat([c.tcpBuf, data]);
	while (c.tcpBuf.length >= 2) {
		const len = c.tcpBuf.readUInt16BE(0);
		if (c.tcpBuf.length < 2 + len) {
			return;
		}
		const ans = answerTo(c.tcpBuf.subarray(2, 2 + len));
		c.tcpBuf = c.tcpBuf.subarray(2 + len);
		if (ans !== null) {
			const framed = Buffer.allocUnsafe(2 + ans.length);
			framed.writeUInt16BE(ans.length, 0);
			ans.copy(framed, 2);
			c.sock.write(framed);
		}
	}
}

function onConnection(sock: net.Socket): void {
	const c: Conn = {
		sock,
		kind: 'new',
		tcpBuf: Buffer.alloc(0),
		reader: new FrameReader({
			onFrame(type, addr, port, payload) {
				if (c.kind === 'violated') {
					return false;
				}
				if (c.kind === 'new' && type === FRAME_INBOUND_TCP) {
					c.kind = 'tcp';
					sock.write(INBOUND_TCP_OK_FRAME);
					return false;
				}
				if (c.kind === 'new' && type === FRAME_CLIENT_HELLO) {
					c.kind = 'control';
					sock.write(SERVER_HELLO_FRAME);
					return true;
				}
				if (c.kind !== 'control') {
					sock.destroy();
					return false;
				}
				if (type === FRAME_CLIENT_HEARTBEAT) {
					sock.write(SERVER_HEARTBEAT_FRAME);
				} else if (type === FRAME_INBOUND_UDP) {
					const ans = answerTo(payload as Buffer);
					if (ans !== null) {
						sock.write(encodeUdpFrame(FRAME_OUTBOUND_UDP, addr, port, ans));
					}
				}
				return true;
			},
			onFrameError() {
				sock.destroy();
			},
		}, 65535),
	};
	conns.add(c);
	sock.on('error', () => {});
	sock.on('close', () => conns.delete(c));
	sock.on('data', (d: Buffer) => {
		if (c.kind === 'tcp') {
			serveTcpBytes(c, d);
			return;
		}
		const used = c.reader.feed(d);
		if ((c.kind as Kind) === 'tcp' && used < d.length) {
			serveTcpBytes(c, d.subarray(used));
		}
	});
	if (stuck) {
		sock.pause();
	}
}

function command(line: string): void {
	const cmd = line.trim();
	if (cmd === 'stuck') {
		stuck = true;
		for (const c of conns) {
			c.sock.pause();
		}
	} else if (cmd === 'resume') {
		stuck = false;
		for (const c of conns) {
			c.sock.resume();
		}
	} else if (cmd === 'violate') {
		for (const c of conns) {
			if (c.kind === 'control') {
				c.kind = 'violated';
				c.sock.write('garbage!');
			}
		}
	} else if (cmd === '') {
		return;
	} else {
		process.stderr.write(`fake_backend ${label}: unknown command ${JSON.stringify(cmd)}\n`);
		return;
	}
	process.stdout.write(`done ${cmd} ${Date.now()}\n`);
}

try {
	fs.unlinkSync(socketPath);
} catch (err) {
	if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
		throw err;
	}
}
const server = net.createServer({ allowHalfOpen: false }, onConnection);
server.on('error', (err) => {
	process.stderr.write(`fake_backend ${label}: ${err.stack ?? String(err)}\n`);
	process.exit(1);
});
server.listen(socketPath, () => {
	process.stdout.write('ready\n');
});
/* Commands come from the parent; when it goes, so do we. */
const rl = readline.createInterface({ input: process.stdin });
rl.on('line', command);
rl.on('close', () => process.exit(0));
const stop = (): void => {
	server.close();
	for (const c of conns) {
		c.sock.destroy();
	}
	setTimeout(() => process.exit(0), 50).unref();
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
