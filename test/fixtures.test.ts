/*
 * The test fixtures, tested without bbal.
 *
 * Every integration test leans on test/fixtures/mname_backend.cjs and the
 * test support (test/support/), so this file proves them against the real
 * thing first: it speaks the balancer protocol to an unmodified mname by
 * hand, with a frame builder of its own (deliberately not src/protocol.ts,
 * so a bug there cannot hide behind a matching bug here), and it cuts DNS
 * over TCP streams at every point for the support's one length-prefix
 * splitter.  If this file fails, bbal's integration failures mean nothing
 * until it is fixed.
 */

import fs from 'node:fs/promises';
import dgram from 'node:dgram';
import net from 'node:net';
import dnsPacket from 'dns-packet';
import fc from 'fast-check';
import t, { type Test } from 'tap';
import { backendOf, encodeQuery, framed, LengthPrefixReader } from './support/dns_messages.js';
import { makeSocketDir, startBackend } from './support/fleet.js';
import { freePort } from './support/ports.js';
import { waitFor } from './support/wait.js';

const CLIENT_HELLO = 1;
const INBOUND_UDP = 2;
const CLIENT_HEARTBEAT = 4;
const SERVER_HELLO = 1001;
const OUTBOUND_UDP = 1002;
const SERVER_HEARTBEAT = 1004;

function u32(...values: number[]): Buffer {
	const buf = Buffer.alloc(4 * values.length);
	values.forEach((v, i) => buf.writeUInt32LE(v, 4 * i));
	return buf;
}

function ipv4ToU32(addr: string): number {
	return addr.split('.').reduce((acc, oct) => acc * 256 + Number(oct), 0);
}

function inboundUdp(srcAddr: string, srcPort: number, dns: Buffer): Buffer {
	return Buffer.concat([
		u32(INBOUND_UDP, ipv4ToU32(srcAddr), srcPort, dns.length), dns]);
}

/*
 * Reads whole frames off a stream socket, however the bytes were split:
 * mname writes OUTBOUND_UDP as two writes (header, then payload), and a read
 * may also merge frames.
 */
class FrameStream {
	#buf = Buffer.alloc(0);
	#waiters: Array<() => void> = [];
	#ended = false;

	constructor(sock: net.Socket) {
		sock.on('data', (chunk: Buffer) => {
			this.#buf = Buffer.concat([this.#buf, chunk]);
			this.#wake();
		});
		sock.on('close', () => {
			this.#ended = true;
			this.#wake();
		});
	}

	#wake(): void {
		for (const w of this.#waiters.splice(0)) {
			w();
		}
	}

	async #need(n: number, timeoutMs: number): Promise<void> {
		const deadline = Date.now() + timeoutMs;
		while (this.#buf.length < n) {
			if (this.#ended) {
				throw new Error(`stream closed with ${this.#buf.length} of ` +
					`${n} bytes`);
			}
			const left = deadline - Date.now();
			if (left <= 0) {
				throw new Error(`timed out with ${this.#buf.length} of ${n} bytes`);
			}
			await new Promise<void>((resolve) => {
				const timer = setTimeout(resolve, left);
				this.#waiters.push(() => { clearTimeout(timer); resolve(); });
			});
		}
	}

	#take(n: number): Buffer {
		const out = this.#buf.subarray(0, n);
		this.#buf = this.#buf.subarray(n);
		return out;
	}

	async readType(timeoutMs = 2000): Promise<number> {
		await this.#need(4, timeoutMs);
		return this.#take(4).readUInt32LE(0);
	}

	/* The rest of an OUTBOUND_UDP frame, after its type. */
	async readUdpBody(timeoutMs = 2000):
	Promise<{ addr: number; port: number; payload: Buffer }> {
		await this.#need(12, timeoutMs);
		const addr = this.#buf.readUInt32LE(0);
		const port = this.#buf.readUInt32LE(4);
		const len = this.#buf.readUInt32LE(8);
		await this.#need(12 + len, timeoutMs);
		this.#take(12);
		return { addr, port, payload: Buffer.from(this.#take(len)) };
	}

	get buffered(): number {
		return this.#buf.length;
	}
}

async function connect(t: Test,
	socketPath: string): Promise<{ sock: net.Socket; frames: FrameStream }> {
	const sock = net.createConnection({ path: socketPath });
	const frames = new FrameStream(sock);
	t.teardown(() => { sock.destroy(); });
	await new Promise<void>((resolve, reject) => {
		sock.once('connect', resolve);
		sock.once('error', reject);
	});
	sock.on('error', () => {});
	return { sock, frames };
}

t.test('fixture backend speaks the balancer protocol', async (t) => {
	const dir = await makeSocketDir(t);
	const be = await startBackend(t, dir, '5301', 'alpha');
	t.equal(be.path, `${dir}/5301`, 'socket path is dir/name');
	t.equal(be.label, 'alpha', 'label as given');
	t.ok((await fs.stat(be.path)).isSocket(), 'socket file exists');

	const { sock, frames } = await connect(t, be.path);

	sock.write(u32(CLIENT_HELLO));
	t.equal(await frames.readType(), SERVER_HELLO, 'CLIENT_HELLO → SERVER_HELLO');

	sock.write(u32(CLIENT_HEARTBEAT));
	t.equal(await frames.readType(), SERVER_HEARTBEAT,
		'CLIENT_HEARTBEAT → SERVER_HEARTBEAT');

	const query = encodeQuery('www.example.com', 'A', 0x4242);
	/* Dribble the frame in three pieces to exercise mname's reassembly too. */
	const frame = inboundUdp('127.0.0.5', 40053, query);
	sock.write(frame.subarray(0, 3));
	sock.write(frame.subarray(3, 20));
	sock.write(frame.subarray(20));

	t.equal(await frames.readType(), OUTBOUND_UDP, 'INBOUND_UDP → OUTBOUND_UDP');
	const { addr, port, payload } = await frames.readUdpBody();
	t.equal(addr, 0x7f000005, 'dst address echoes the source, 127.0.0.5');
	t.equal(port, 40053, 'dst port echoes the source port');
	const reply = dnsPacket.decode(payload);
	t.equal(reply.id, 0x4242, 'reply id matches the query');
	t.equal(reply.type, 'response', 'it is a response');
	t.equal(backendOf(reply), 'alpha', 'TXT be=<label> names the backend');
	const a = reply.answers?.find((r): r is dnsPacket.StringAnswer =>
		r.type === 'A');
	t.equal(a?.data, '192.0.2.1', 'type A also gets 192.0.2.1');
	t.equal(reply.answers?.length, 2, 'TXT and A, nothing else');
	t.ok(reply.answers?.every((r) => r.type !== 'OPT' && r.ttl === 0),
		'every answer has TTL 0');
	t.equal(frames.buffered, 0, 'nothing left over after the reply');
});

t.test('fixture backend: big. answers, truncation and EDNS', async (t) => {
	const dir = await makeSocketDir(t);
	const be = await startBackend(t, dir, 'big');
	const { sock, frames } = await connect(t, be.path);
	sock.write(u32(CLIENT_HELLO));
	t.equal(await frames.readType(), SERVER_HELLO, 'hello');

	/* Two frames in one write: both must be answered, in order. */
	sock.write(Buffer.concat([
		inboundUdp('127.0.0.6', 1000, encodeQuery('big.example.com', 'A', 1)),
		inboundUdp('127.0.0.7', 2000,
			encodeQuery('big.example.com', 'A', 2, { edns: 4096 })),
	]));

	t.equal(await frames.readType(), OUTBOUND_UDP, 'first reply');
	const plain = await frames.readUdpBody();
	const truncated = dnsPacket.decode(plain.payload);
	t.equal(truncated.id, 1, 'first reply answers the first query');
	t.ok(plain.payload.length <= 512, 'plain UDP answer fits 512 bytes');
	t.ok(truncated.flag_tc, 'and is truncated (TC set)');

	t.equal(await frames.readType(), OUTBOUND_UDP, 'second reply');
	const edns = await frames.readUdpBody();
	t.equal(edns.addr, 0x7f000007, 'second reply goes to 127.0.0.7');
	t.equal(edns.port, 2000, 'port 2000');
	const full = dnsPacket.decode(edns.payload);
	t.equal(full.id, 2, 'second reply answers the second query');
	t.ok(edns.payload.length > 512 && edns.payload.length <= 1500,
		`EDNS answer is past 512 bytes and within 1500 (${edns.payload.length})`);
	t.equal(full.answers?.filter((r) => r.type === 'A').length, 60,
		'sixty A records');
	t.equal(backendOf(full), 'big', 'label defaults to the socket name');
});

t.test('backend kill and restart', async (t) => {
	const dir = await makeSocketDir(t);
	const be = await startBackend(t, dir, 's');
	const first = be.proc.pid;

	await be.kill('SIGTERM');
	t.not(be.proc.exitCode, null, 'SIGTERM: process has exited');
	t.equal(be.proc.exitCode, 0, 'SIGTERM: exit code 0');
	await t.rejects(fs.stat(be.path), { code: 'ENOENT' },
		'SIGTERM removes the socket file');

	await be.restart();
	t.not(be.proc.pid, first, 'restart starts a new process');
	await be.kill();
	t.equal(be.proc.signalCode, 'SIGKILL', 'default kill is SIGKILL');
	t.ok((await fs.stat(be.path)).isSocket(), 'SIGKILL leaves the socket file');
	const refused = net.createConnection({ path: be.path });
	const err = await new Promise<NodeJS.ErrnoException>((resolve) =>
		refused.once('error', resolve));
	t.equal(err.code, 'ECONNREFUSED', 'a stale socket file refuses connects');

	await be.restart();
	const { sock, frames } = await connect(t, be.path);
	sock.write(u32(CLIENT_HELLO));
	t.equal(await frames.readType(), SERVER_HELLO,
		'restarted backend takes over the stale socket path');
});

t.test('startBackend rejects when the fixture cannot listen', async (t) => {
	await t.rejects(startBackend(t, '/nonexistent-bbal-dir', 'x'),
		/exited before ready/, 'reports the early exit');
});

t.test('makeSocketDir and freePort', async (t) => {
	let dir = '';
	await t.test('socket dir', async (t) => {
		dir = await makeSocketDir(t);
		t.match(dir, /^\/tmp\/bbal-[A-Za-z0-9]{6}$/, 'short path under /tmp');
		t.ok((await fs.stat(dir)).isDirectory(), 'is a directory');
		await fs.writeFile(`${dir}/junk`, 'x');
	});
	await t.rejects(fs.stat(dir), { code: 'ENOENT' },
		'removed, contents and all, on teardown');

	const port = await freePort();
	t.ok(port > 0 && port < 65536, `port ${port} in range`);
	const udp = dgram.createSocket('udp4');
	await new Promise<void>((resolve, reject) => {
		udp.once('error', reject);
		udp.bind(port, '127.0.0.1', () => resolve());
	});
	const tcp = net.createServer();
	await new Promise<void>((resolve, reject) => {
		tcp.once('error', reject);
		tcp.listen(port, '127.0.0.1', () => resolve());
	});
	t.pass('both UDP and TCP can bind it');
	udp.close();
	tcp.close();
});

t.test('waitFor polls and then times out with a message', async (t) => {
	let n = 0;
	await waitFor(() => ++n >= 3, 1000, 10);
	t.equal(n, 3, 'polled until true');
	await t.rejects(waitFor(() => false, 100, 10, 'the moon is blue'),
		/the moon is blue not true within 100 ms/,
		'times out naming the condition');
});

t.test('LengthPrefixReader: every message, whole and in order, however the stream is cut', async (t) => {
	fc.assert(fc.property(
		fc.array(fc.uint8Array({ maxLength: 300 }), { maxLength: 8 }),
		fc.array(fc.nat(), { maxLength: 10 }),
		(msgs, cutAt) => {
			const stream = Buffer.concat(msgs.map((m) => framed(m)));
			const cuts = [...new Set(cutAt.map((c) => c % (stream.length + 1)))].sort((a, b) => a - b);
			const reader = new LengthPrefixReader();
			const got: Buffer[] = [];
			let from = 0;
			for (const to of [...cuts, stream.length]) {
				got.push(...reader.feed(stream.subarray(from, to)));
				from = to;
			}
			return got.length === msgs.length && got.every((m, i) => m.equals(msgs[i])) && reader.pending === 0;
		}), { numRuns: 500, seed: 1 });
	t.pass('any split gives back exactly the messages framed');
	const reader = new LengthPrefixReader();
	t.same(reader.feed(Buffer.from([0x00])), [], 'half a length prefix: no message yet');
	t.equal(reader.pending, 1, 'and the byte is held');
});
