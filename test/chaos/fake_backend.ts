/*
 * A FAKE BACKEND PROCESS, for the faults a real mname never commits.
 *
 * Usage: node dist/test/chaos/fake_backend.js <socketPath> <label>
 *
 * It is the tests' in-process fake backend (test/support/fake_backend.ts)
 * in a process of its own, given the callbacks of a healthy backend.  It
 * serves like the mname fixture (test/fixtures/mname_backend.cjs) until it
 * is told to misbehave: it says SERVER_HELLO to CLIENT_HELLO, answers every
 * heartbeat, answers every INBOUND_UDP with an OUTBOUND_UDP whose DNS answer
 * carries the TXT record `be=<label>` (so the load driver sees who answered;
 * a name starting with `big.` also gets sixty A records, about 1 KB, as from
 * the fixture), and serves TCP sessions (INBOUND_TCP_OK, then 2-byte length-prefixed DNS
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
 *   flood    write OUTBOUND_UDP frames (28 bytes to 127.0.0.9:9, where
 *            nothing listens) on every control session as fast as bbal
 *            takes them, and on each new one after its hello: a backend
 *            gone wild.  `calm` stops it; `count` prints `flooded N`, the
 *            frames written so far.
 *
 * "ready" is printed once the socket listens.  SIGTERM closes the listener
 * (removing the socket file) and exits.
 */

import type net from 'node:net';
import readline from 'node:readline';
import dnsPacket from 'dns-packet';
import { FRAME_INBOUND_UDP, FRAME_OUTBOUND_UDP } from '../../src/protocol.js';
import { encodeUdpFrame, INBOUND_TCP_OK_FRAME } from '../support/backend_frames.js';
import { encodeAnswer, framed, LengthPrefixReader } from '../support/dns_messages.js';
import { answerControl, FakeBackend } from '../support/fake_backend.js';

const [socketPath, label] = process.argv.slice(2);
if (socketPath === undefined || label === undefined) {
	process.stderr.write('usage: fake_backend.js <socketPath> <label>\n');
	process.exit(2);
}

/* As many A records as the fixture gives a `big.` name. */
const BIG_A_RECORDS = 60;

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
	const rd = ((q.flags ?? 0) & dnsPacket.RECURSION_DESIRED) !== 0;
	if (!question.name.toLowerCase().startsWith('big.')) {
		return encodeAnswer(q.id ?? 0, question, label, rd);
	}
	/* The fixture's big answer (test/fixtures/mname_backend.cjs): what the hostile scenario asks for and never reads. */
	const answer = dnsPacket.decode(encodeAnswer(q.id ?? 0, question, label, rd));
	for (let i = 1; i <= BIG_A_RECORDS; i++) {
		answer.answers?.push({ type: 'A', name: question.name, ttl: 0, class: 'IN', data: `192.0.2.${i}` });
	}
	return dnsPacket.encode(answer);
}

/* What a flood sends: 28 bytes that are not an answer to anything. */
const FLOOD_PAYLOAD = Buffer.alloc(28, 0x5a);

/* Control sessions told to violate: ignored from then on. */
const violated = new WeakSet<net.Socket>();

/* A TCP session: the OK, then every length-prefixed query answered in kind. */
function serveTcp(sock: net.Socket, rest: Buffer): void {
	sock.write(INBOUND_TCP_OK_FRAME);
	const reader = new LengthPrefixReader();
	const serve = (data: Buffer): void => {
		for (const msg of reader.feed(data)) {
			const ans = answerTo(msg);
			if (ans !== null) {
				sock.write(framed(ans));
			}
		}
	};
	serve(rest);
	sock.on('data', serve);
}

function command(line: string): void {
	const cmd = line.trim();
	if (cmd === 'stuck') {
		fake.stopReading();
	} else if (cmd === 'resume') {
		fake.resumeReading();
	} else if (cmd === 'violate') {
		for (const sock of fake.controlSessions) {
			if (!violated.has(sock)) {
				violated.add(sock);
				sock.write('garbage!');
			}
		}
	} else if (cmd === 'flood') {
		fake.flood(0x7f000009, 9, FLOOD_PAYLOAD);
	} else if (cmd === 'calm') {
		fake.stopFlood();
	} else if (cmd === 'count') {
		process.stdout.write(`flooded ${fake.floodFrames}\n`);
	} else if (cmd === '') {
		return;
	} else {
		process.stderr.write(`fake_backend ${label}: unknown command ${JSON.stringify(cmd)}\n`);
		return;
	}
	process.stdout.write(`done ${cmd} ${Date.now()}\n`);
}

const fake = await FakeBackend.listen(null, socketPath, {
	onControlFrame(sock, frame) {
		if (violated.has(sock)) {
			return;
		}
		if (frame.type === FRAME_INBOUND_UDP) {
			const ans = answerTo(frame.payload as Buffer);
			if (ans !== null) {
				sock.write(encodeUdpFrame(FRAME_OUTBOUND_UDP, frame.addr, frame.port, ans));
			}
		} else {
			answerControl(sock, frame);
		}
	},
	onTcpSession: (sock, _inbound, rest) => serveTcp(sock, rest),
}).catch((err: Error) => {
	process.stderr.write(`fake_backend ${label}: ${err.stack ?? String(err)}\n`);
	process.exit(1);
});
process.stdout.write('ready\n');
/* Commands come from the parent; when it goes, so do we. */
const rl = readline.createInterface({ input: process.stdin });
rl.on('line', command);
rl.on('close', () => process.exit(0));
const stop = (): void => {
	void fake.close();
	setTimeout(() => process.exit(0), 50).unref();
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
