/*
 * The UDP transports (src/udp_socket.ts, src/udp_dgram.ts) on real loopback sockets, each
 * kind that is available in this build: the native batching addon and
 * dgram.  Clients are plain dgram sockets bound to 127.0.9.x, with large
 * receive buffers: they run in this same process, so a burst of answers
 * waits in their kernel queue until the test's loop gets to read it.
 */

import dgram from 'node:dgram';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import t, { type Test } from 'tap';
import { ipv4ToU32 } from '../src/protocol.js';
import { DGRAM_SEND_QUEUE_MAX_ANSWERS, DGRAM_SEND_QUEUE_MAX_BYTES } from '../src/udp_dgram.js';
import { createUdpTransport } from '../src/udp_socket.js';
import type { UdpTransport, UdpTransportError, UdpTransportKind } from '../src/udp_transport.js';
import { freePort } from './support/ports.js';
import { projectRoot } from './support/process.js';
import { sleep, waitFor } from './support/wait.js';

const CLIENT_BUFFER_BYTES = 4 * 1024 * 1024;
const src = (n: number): string => `127.0.9.${n}`;

interface Seen {
	bytes: Buffer;
	addr: number;
	port: number;
	len: number;
}

interface Client {
	sock: dgram.Socket;
	port: number;
	got: Buffer[];
}

/* Why the native transport cannot be had, or null when it can: asked for by name, it throws the loader's error. */
function nativeUnavailableReason(): Error | null {
	try {
		void createUdpTransport('native').close();
		return null;
	} catch (err) {
		return err as Error;
	}
}

/* Where node-gyp builds the addon (binding.gyp's target, build/Release). */
const ADDON_FILE = path.join(projectRoot, 'build', 'Release', 'udp_batch.node');

const kinds: UdpTransportKind[] = nativeUnavailableReason() === null ? ['native', 'dgram'] : ['dgram'];

t.test('on Linux the native transport is built, loads and is the default', async (t) => {
	if (process.platform !== 'linux') {
		t.pass(`${process.platform}: dgram only`);
		return;
	}
	t.ok(existsSync(ADDON_FILE), `${ADDON_FILE} is built (npm install runs node-gyp; bbal would silently fall back to dgram)`);
	t.equal(nativeUnavailableReason(), null, 'the addon loads');
	const u = createUdpTransport();
	t.teardown(() => u.close());
	t.equal(u.kind, process.env['BBAL_UDP'] === 'dgram' ? 'dgram' : 'native', 'and is the default unless BBAL_UDP=dgram');
});

/* A transport bound to 127.0.0.1 on a free port, recording what arrives. */
async function serve(t: Test, kind: UdpTransportKind): Promise<{ u: UdpTransport; port: number; seen: Seen[] }> {
	const u = createUdpTransport(kind);
	t.equal(u.kind, kind);
	const seen: Seen[] = [];
	u.onDatagram = (msg, addr, port, len) => {
		seen.push({ bytes: Buffer.from(msg), addr, port, len });
	};
	u.onError = (err) => t.fail(`unexpected transport error: ${err.message}`);
	const port = await freePort();
	await u.bind('127.0.0.1', port);
	t.equal(u.localPort(), port, 'bound where asked');
	t.teardown(() => u.close());
	return { u, port, seen };
}

async function client(t: Test, source: string): Promise<Client> {
	const sock = dgram.createSocket('udp4');
	const got: Buffer[] = [];
	sock.on('message', (m) => got.push(m));
	await new Promise<void>((resolve) => sock.bind(0, source, resolve));
	sock.setRecvBufferSize(CLIENT_BUFFER_BYTES);
	t.teardown(() => new Promise<void>((resolve) => sock.close(() => resolve())));
	return { sock, port: sock.address().port, got };
}

function numbered(n: number, size = 24): Buffer {
	const b = Buffer.alloc(size, n & 0xff);
	b.writeUInt32BE(n, 0);
	return b;
}

for (const kind of kinds) {
	t.test(`${kind}: no other socket can bind the port, not even with SO_REUSEADDR, and a second bbal's bind fails`,
		async (t) => {
			const { port, seen } = await serve(t, kind);
			/* With SO_REUSEADDR on both, Linux let the newcomer bind and gave it the datagrams: a silent thief. */
			const thief = dgram.createSocket({ type: 'udp4', reuseAddr: true });
			t.teardown(() => thief.close());
			const err = await new Promise<NodeJS.ErrnoException | null>((resolve) => {
				thief.once('error', resolve);
				thief.bind({ address: '127.0.0.1', port }, () => resolve(null));
			});
			t.equal(err?.code, 'EADDRINUSE', 'the thief is refused');
			const second = createUdpTransport(kind);
			await t.rejects(second.bind('127.0.0.1', port), { code: 'EADDRINUSE' }, 'so is a second transport');
			await second.close();
			const c = await client(t, src(7));
			c.sock.send(Buffer.from('still mine'), port, '127.0.0.1');
			await waitFor(() => seen.length === 1, 2000);
			t.equal(seen[0].bytes.toString(), 'still mine', 'the first still gets its datagrams');
		});

	t.test(`${kind}: datagrams arrive with their source address, port and bytes`, async (t) => {
		const { port, seen } = await serve(t, kind);
		const clients = await Promise.all([1, 2, 3].map((n) => client(t, src(n))));
		for (const [i, c] of clients.entries()) {
			c.sock.send(Buffer.from(`hello from ${i}`), port, '127.0.0.1');
		}
		await waitFor(() => seen.length === 3, 2000);
		for (const [i, c] of clients.entries()) {
			const d = seen.find((s) => s.port === c.port);
			t.ok(d, `client ${i} seen`);
			t.equal(d?.addr, ipv4ToU32(src(i + 1)), `client ${i}: source address as u32`);
			t.equal(d?.bytes.toString(), `hello from ${i}`, `client ${i}: bytes`);
			t.equal(d?.len, d?.bytes.length, `client ${i}: true length`);
		}
	});

	t.test(`${kind}: a burst arrives complete and in order, batches leave room for nextTick`, async (t) => {
		const { u, port, seen } = await serve(t, kind);
		/* Datagrams seen between two nextTick runs: at most one batch. */
		let sinceTick = 0;
		let maxBetweenTicks = 0;
		let tickPending = false;
		const onTick = (): void => {
			tickPending = false;
			maxBetweenTicks = Math.max(maxBetweenTicks, sinceTick);
			sinceTick = 0;
		};
		u.onDatagram = (msg, addr, p, len) => {
			seen.push({ bytes: Buffer.from(msg), addr, port: p, len });
			sinceTick++;
			if (!tickPending) {
				tickPending = true;
				process.nextTick(onTick);
			}
		};
		const clients = await Promise.all([4, 5, 6].map((n) => client(t, src(n))));
		const PER_CLIENT = 150;
		for (let i = 0; i < PER_CLIENT; i++) {
			for (const c of clients) {
				c.sock.send(numbered(i), port, '127.0.0.1');
			}
		}
		await waitFor(() => seen.length === PER_CLIENT * clients.length, 5000);
		for (const c of clients) {
			const mine = seen.filter((s) => s.port === c.port).map((s) => s.bytes.readUInt32BE(0));
			t.same(mine, Array.from({ length: PER_CLIENT }, (_, i) => i), `${c.port}: all ${PER_CLIENT}, in order`);
		}
		t.ok(maxBetweenTicks <= 64, `nextTick ran after every batch (at most ${maxBetweenTicks} datagrams between)`);
	});

	t.test(`${kind}: answers go back to each source, many per callback`, async (t) => {
		const { u, port } = await serve(t, kind);
		const ANSWERS = 150;
		/* Each query is answered ANSWERS times from one callback: the arena fills twice. */
		let refused = 0;
		u.onDatagram = (msg, addr, p) => {
			for (let i = 0; i < ANSWERS; i++) {
				const out = numbered(i, 40);
				msg.copy(out, 4, 0, Math.min(msg.length, 36));
				refused += u.send(out, addr, p) ? 0 : 1;
			}
		};
		const clients = await Promise.all([7, 8].map((n) => client(t, src(n))));
		for (const c of clients) {
			c.sock.send(Buffer.from(`q${c.port}`), port, '127.0.0.1');
		}
		await waitFor(() => clients.every((c) => c.got.length === ANSWERS), 5000);
		t.equal(refused, 0, 'every answer queued');
		for (const c of clients) {
			t.same(c.got.map((m) => m.readUInt32BE(0)), Array.from({ length: ANSWERS }, (_, i) => i), 'in order');
			t.ok(c.got.every((m) => m.subarray(4, 4 + `q${c.port}`.length).toString() === `q${c.port}`), 'to the right source');
		}
	});

	t.test(`${kind}: send refuses what can never be sent`, async (t) => {
		const { u } = await serve(t, kind);
		const lo = ipv4ToU32('127.0.0.1');
		t.equal(u.send(Buffer.alloc(12), lo, 0), false, 'port 0');
		t.equal(u.send(Buffer.alloc(12), lo, 65536), false, 'port over 65535');
		t.equal(u.send(Buffer.alloc(1501), lo, 53), false, 'over 1500 bytes');
		t.equal(u.send(Buffer.alloc(1500), lo, 9), true, '1500 bytes is fine');
	});

	t.test(`${kind}: an oversize datagram is reported with its true length`, async (t) => {
		const { port, seen } = await serve(t, kind);
		const c = await client(t, src(9));
		const big = Buffer.alloc(2000);
		for (let i = 0; i < big.length; i++) {
			big[i] = i & 0xff;
		}
		c.sock.send(big, port, '127.0.0.1');
		c.sock.send(Buffer.from('after'), port, '127.0.0.1');
		await waitFor(() => seen.length === 2, 2000);
		const d = seen[0];
		t.equal(d.len, 2000, 'true length');
		t.ok(d.bytes.length <= 2000 && d.bytes.length >= 1501, `a view of what fits (${d.bytes.length} bytes)`);
		t.ok(d.bytes.equals(big.subarray(0, d.bytes.length)), 'the bytes that fit');
		t.equal(seen[1]?.bytes.toString(), 'after', 'the next datagram is intact');
		t.equal(seen[1]?.len, 5);
	});

	t.test(`${kind}: bind errors reject with the errno name`, async (t) => {
		const taken = dgram.createSocket('udp4');
		await new Promise<void>((resolve) => taken.bind(0, '127.0.0.1', resolve));
		t.teardown(() => taken.close());
		const u = createUdpTransport(kind);
		await t.rejects(u.bind('127.0.0.1', taken.address().port), { code: 'EADDRINUSE' }, 'port in use');
		await u.close();
		const v = createUdpTransport(kind);
		await t.rejects(v.bind('192.0.2.1', 0), { code: 'EADDRNOTAVAIL' }, 'address not on this host');
		await v.close();
	});

	t.test(`${kind}: close() stops delivery and sending, and frees the port`, async (t) => {
		const { u, port, seen } = await serve(t, kind);
		const c = await client(t, src(10));
		c.sock.send(Buffer.from('one'), port, '127.0.0.1');
		await waitFor(() => seen.length === 1, 2000);
		/* Queued before close: still sent (send() said yes). */
		t.equal(u.send(Buffer.from('bye'), ipv4ToU32(src(10)), c.port), true);
		const closing = u.close();
		t.equal(u.close(), closing, 'idempotent');
		t.equal(u.send(Buffer.from('late'), ipv4ToU32(src(10)), c.port), false, 'no sending once closed');
		await closing;
		c.sock.send(Buffer.from('two'), port, '127.0.0.1');
		await sleep(200);
		t.equal(seen.length, 1, 'nothing delivered after close');
		t.same(c.got.map((m) => m.toString()), ['bye'], 'the answer queued before close left');
		const again = createUdpTransport(kind);
		await again.bind('127.0.0.1', port);
		t.pass('the port can be bound again at once');
		await again.close();
	});

	t.test(`${kind}: closing from inside the datagram callback drops the rest of the batch`, async (t) => {
		const { u, port, seen } = await serve(t, kind);
		let closing: Promise<void> | null = null;
		u.onDatagram = (msg) => {
			seen.push({ bytes: Buffer.from(msg), addr: 0, port: 0, len: msg.length });
			closing ??= u.close();
		};
		const c = await client(t, src(11));
		for (let i = 0; i < 20; i++) {
			c.sock.send(numbered(i), port, '127.0.0.1');
		}
		await waitFor(() => closing !== null, 2000);
		await (closing as Promise<void> | null);
		await sleep(100);
		t.equal(seen.length, 1, 'one datagram, then silence');
	});
}

/*
 * dgram's send queue is capped.  A real socket's queue cannot be made to
 * fill on loopback: the loopback device takes every datagram at once (one
 * the receiver has no room for is dropped there, not held against the
 * sender), so the kernel never refuses a send and libuv never queues.  The
 * sockets here are real; only what they say about their queue is made up.
 */
t.test('dgram: over the send-queue cap, answers are dropped and reported, not queued', async (t) => {
	const proto = dgram.Socket.prototype;
	const saved = Object.getOwnPropertyDescriptors(proto);
	t.teardown(() => {
		Object.defineProperty(proto, 'getSendQueueCount', saved.getSendQueueCount);
		Object.defineProperty(proto, 'getSendQueueSize', saved.getSendQueueSize);
	});
	let queued = { count: 0, bytes: 0 };
	proto.getSendQueueCount = function () { return queued.count; };
	proto.getSendQueueSize = function () { return queued.bytes; };

	const { u, port } = await serve(t, 'dgram');
	const errors: Array<{ code?: string; dropped?: number }> = [];
	u.onError = (err) => errors.push({ code: err.code, dropped: err.dropped });
	const c = await client(t, src(12));
	let answers = 0;
	u.onDatagram = (msg, addr, p) => {
		for (let i = 0; i < 3; i++) {
			t.equal(u.send(numbered(answers++, 100), addr, p), true, 'accepted (the drop is reported, as native does)');
		}
	};
	const ask = async (): Promise<void> => {
		const before = answers;
		c.sock.send(Buffer.from('q'), port, '127.0.0.1');
		await waitFor(() => answers === before + 3, 2000);
		await sleep(100);
	};

	await ask();
	t.equal(c.got.length, 3, 'an empty queue: all three sent');
	t.same(errors, [], 'nothing reported');

	queued = { count: DGRAM_SEND_QUEUE_MAX_ANSWERS, bytes: 0 };
	await ask();
	t.equal(c.got.length, 3, `${DGRAM_SEND_QUEUE_MAX_ANSWERS} answers queued: none of the next three sent`);
	t.same(errors, [{ code: 'ENOBUFS', dropped: 3 }], 'one report for the three');

	queued = { count: 1, bytes: DGRAM_SEND_QUEUE_MAX_BYTES - 99 };
	await ask();
	t.equal(c.got.length, 3, 'a 100-byte answer would take the queue past its byte cap: dropped');
	t.same(errors[1], { code: 'ENOBUFS', dropped: 3 }, 'reported');

	queued = { count: DGRAM_SEND_QUEUE_MAX_ANSWERS - 1, bytes: DGRAM_SEND_QUEUE_MAX_BYTES - 100 };
	await ask();
	t.equal(c.got.length, 6, 'just under both caps: sent');
	t.equal(errors.length, 2, 'nothing more reported');
});

/*
 * POLLERR on the native transport's socket.  bbal never turns IP_RECVERR
 * on; the addon's recvErr() seam does, so that an answer to a port nobody
 * listens on comes back as an ICMP error on the socket, which poll()
 * reports as POLLERR -- and libuv then stops the poll handle.
 */
interface RecvErrAddon { recvErr(handle: object): void }

function recvErr(u: UdpTransport): void {
	const addon = createRequire(import.meta.url)(ADDON_FILE) as RecvErrAddon;
	addon.recvErr((u as unknown as { handle: object }).handle);
}

/* A port on `source` that nobody listens on (bound, then closed). */
async function deadPort(source: string): Promise<number> {
	const s = dgram.createSocket('udp4');
	await new Promise<void>((resolve) => s.bind(0, source, resolve));
	const port = s.address().port;
	await new Promise<void>((resolve) => s.close(() => resolve()));
	return port;
}

const nativeOnly = { skip: kinds.includes('native') ? false : 'the native transport is not built' };

t.test('native: after a poll error the socket is read again', nativeOnly, async (t) => {
	const { u, port, seen } = await serve(t, 'native');
	const errors: UdpTransportError[] = [];
	u.onError = (err) => errors.push(err);
	recvErr(u);
	const dead = await deadPort(src(13));
	t.equal(u.send(Buffer.from('to nobody'), ipv4ToU32(src(13)), dead), true);
	await waitFor(() => errors.length === 1, 2000, 5, 'the ICMP error reported');
	t.match(errors[0], { code: 'ECONNREFUSED', syscall: 'recvmmsg', fatal: false, dropped: 0 },
		'the socket\'s pending error, as a receive error that is not fatal');
	const c = await client(t, src(14));
	c.sock.send(Buffer.from('still listening?'), port, '127.0.0.1');
	await waitFor(() => seen.length === 1, 2000, 5, 'a datagram after the poll error');
	t.equal(seen[0]?.bytes.toString(), 'still listening?', 'delivered');
	t.equal(errors.length, 1, 'one error, no busy loop');
});

t.test('native: poll errors that keep coming with nothing read between are fatal', nativeOnly, async (t) => {
	const { u, port, seen } = await serve(t, 'native');
	const errors: UdpTransportError[] = [];
	u.onError = (err) => errors.push(err);
	recvErr(u);
	const dead = await deadPort(src(15));
	/* UB_MAX_POLL_ERRORS in udp_batch.c */
	const MAX = 16;
	for (let i = 0; i <= MAX; i++) {
		u.send(Buffer.from('to nobody'), ipv4ToU32(src(15)), dead);
		await waitFor(() => errors.length === i + 1, 2000, 5, `poll error ${i + 1}`);
	}
	t.ok(errors.slice(0, MAX).every((e) => e.fatal === false), `the first ${MAX} are recovered from`);
	t.match(errors[MAX], { code: 'ECONNREFUSED', fatal: true }, `number ${MAX + 1} in a row is fatal`);
	const c = await client(t, src(16));
	c.sock.send(Buffer.from('anyone?'), port, '127.0.0.1');
	await sleep(200);
	t.equal(seen.length, 0, 'the socket is no longer read');
	await u.close();
	t.pass('and closes');
});

t.test('native: a datagram read between poll errors starts the count again', nativeOnly, async (t) => {
	const { u, port, seen } = await serve(t, 'native');
	const errors: UdpTransportError[] = [];
	u.onError = (err) => errors.push(err);
	recvErr(u);
	const dead = await deadPort(src(17));
	const c = await client(t, src(18));
	for (let i = 0; i < 40; i++) {
		u.send(Buffer.from('to nobody'), ipv4ToU32(src(17)), dead);
		await waitFor(() => errors.length === i + 1, 2000, 5, `poll error ${i + 1}`);
		if (i % 10 === 9) {
			c.sock.send(Buffer.from(`ping ${i}`), port, '127.0.0.1');
			await waitFor(() => seen.length === (i + 1) / 10, 2000, 5, 'a datagram');
		}
	}
	t.ok(errors.every((e) => e.fatal === false), '40 poll errors, never more than 10 in a row: none fatal');
});

/*
 * Bound to 0.0.0.0, each datagram comes with the address it was sent to,
 * and an answer given that address leaves from it (WILDCARD BINDS in
 * udp_transport.ts and udp_dgram.ts).  dgram listens on the addresses its lister gives, here
 * 127.0.0.x addresses that Linux's loopback answers to though
 * os.networkInterfaces() lists only 127.0.0.1.
 */
interface Heard { bytes: string; addr: number; port: number; local: number }

async function serveAny(t: Test, kind: UdpTransportKind, addresses?: () => string[]):
Promise<{ u: UdpTransport; port: number; heard: Heard[]; errors: UdpTransportError[] }> {
	const u = createUdpTransport(kind, { listAddresses: addresses });
	const heard: Heard[] = [];
	const errors: UdpTransportError[] = [];
	u.onDatagram = (msg, addr, port, _len, local) => {
		heard.push({ bytes: msg.toString(), addr, port, local });
	};
	u.onError = (err) => errors.push(err);
	const port = await freePort();
	await u.bind('0.0.0.0', port);
	t.teardown(() => u.close());
	return { u, port, heard, errors };
}

/* Send `text` to dest:port from c; resolve with what was heard of it. */
async function sendTo(c: Client, heard: Heard[], text: string, dest: string, port: number): Promise<Heard> {
	c.sock.send(Buffer.from(text), port, dest);
	await waitFor(() => heard.some((h) => h.bytes === text), 2000, 5, `${text} to ${dest}`);
	return heard.find((h) => h.bytes === text) as Heard;
}

/* Each answer from client c's socket, with the address it came from. */
async function answersFrom(t: Test, source: string): Promise<{ c: Client; from: Array<{ text: string; from: string }> }> {
	const c = await client(t, source);
	const from: Array<{ text: string; from: string }> = [];
	c.sock.on('message', (m, rinfo) => from.push({ text: m.toString(), from: rinfo.address }));
	return { c, from };
}

t.test('native: bound to 0.0.0.0, the destination comes with each datagram and answers leave from it', nativeOnly,
	async (t) => {
		const { u, port, heard } = await serveAny(t, 'native');
		const { c, from } = await answersFrom(t, src(20));
		for (const dest of ['127.0.0.5', '127.0.0.6', '127.0.0.1']) {
			const h = await sendTo(c, heard, `to ${dest}`, dest, port);
			t.equal(h.local, ipv4ToU32(dest), `a datagram to ${dest} says so`);
			t.equal(u.send(Buffer.from(`from ${dest}`), h.addr, h.port, h.local), true);
		}
		t.equal(u.send(Buffer.from('from nowhere'), ipv4ToU32(src(20)), c.port, 0), true, 'no local address given');
		await waitFor(() => from.length === 4, 2000);
		t.same(from, [
			{ text: 'from 127.0.0.5', from: '127.0.0.5' },
			{ text: 'from 127.0.0.6', from: '127.0.0.6' },
			{ text: 'from 127.0.0.1', from: '127.0.0.1' },
			{ text: 'from nowhere', from: '127.0.0.1' },
		], 'each from the address given; with none, from the kernel\'s choice (127.0.0.1 on loopback)');
	});

t.test('native: bound to one address, no destination is reported (none is needed)', nativeOnly, async (t) => {
	const { port } = await serve(t, 'native');
	const u2 = createUdpTransport('native');
	t.teardown(() => u2.close());
	const heard: Heard[] = [];
	u2.onDatagram = (msg, addr, p, _len, local) => heard.push({ bytes: msg.toString(), addr, port: p, local });
	await u2.bind('127.0.0.5', port);
	const c = await client(t, src(21));
	t.equal((await sendTo(c, heard, 'hi', '127.0.0.5', port)).local, 0);
});

t.test('dgram: bound to 0.0.0.0, one socket per listed address, each answering from its own', async (t) => {
	let listed = ['127.0.0.1', '127.0.0.5', '127.0.0.6'];
	const { u, port, heard, errors } = await serveAny(t, 'dgram', () => listed);
	const { c, from } = await answersFrom(t, src(22));
	for (const dest of listed) {
		const h = await sendTo(c, heard, `to ${dest}`, dest, port);
		t.equal(h.local, ipv4ToU32(dest), `a datagram to ${dest} comes from that address's socket`);
		u.send(Buffer.from(`from ${dest}`), h.addr, h.port, h.local);
	}
	await waitFor(() => from.length === 3, 2000);
	t.same(from.map((f) => f.from), listed, 'each answer from the address queried');

	/* The host's addresses change: one goes, one comes. */
	listed = ['127.0.0.1', '127.0.0.5', '127.0.0.7'];
	t.same(await u.followAddresses?.(), { added: ['127.0.0.7'], removed: ['127.0.0.6'], failed: [] }, 'followed');
	const h7 = await sendTo(c, heard, 'to 127.0.0.7', '127.0.0.7', port);
	t.equal(h7.local, ipv4ToU32('127.0.0.7'), 'the new address is listened on');
	u.send(Buffer.from('from 127.0.0.7'), h7.addr, h7.port, h7.local);
	await waitFor(() => from.length === 4, 2000);
	t.same(from[3], { text: 'from 127.0.0.7', from: '127.0.0.7' }, 'and answers from itself');

	t.equal(u.send(Buffer.from('from 127.0.0.6'), ipv4ToU32(src(22)), c.port, ipv4ToU32('127.0.0.6')), true);
	t.equal(u.send(Buffer.from('from 0'), ipv4ToU32(src(22)), c.port, 0), true);
	await waitFor(() => errors.length === 1, 2000);
	t.match(errors[0], { code: 'EADDRNOTAVAIL', dropped: 2 }, 'answers for an address with no socket: dropped, reported');
	c.sock.send(Buffer.from('to 127.0.0.6 again'), port, '127.0.0.6');
	await sleep(200);
	t.notOk(heard.some((h) => h.bytes === 'to 127.0.0.6 again'), 'the gone address is no longer listened on');
	t.equal(from.length, 4, 'nothing else sent');
	t.same(await u.followAddresses?.(), { added: [], removed: [], failed: [] }, 'nothing changed since');
});

t.test('dgram: an address that cannot be bound fails the bind, or is reported once when it appears later', async (t) => {
	const port = await freePort();
	const u = createUdpTransport('dgram', { listAddresses: () => ['127.0.0.1', '192.0.2.77'] });
	await t.rejects(u.bind('0.0.0.0', port), { code: 'EADDRNOTAVAIL', address: '192.0.2.77' }, 'at bind: rejected');
	await u.close();
	let listed = ['127.0.0.1'];
	const { u: v } = await serveAny(t, 'dgram', () => listed);
	t.pass('and 127.0.0.1 was let go: it binds again');
	listed = ['127.0.0.1', '192.0.2.77'];
	const first = await v.followAddresses?.();
	t.equal(first?.failed.length, 1, 'later: reported');
	t.match(first?.failed[0], { address: '192.0.2.77', err: { code: 'EADDRNOTAVAIL' } });
	t.same(await v.followAddresses?.(), { added: [], removed: [], failed: [] }, 'once, though it is tried at each call');
	listed = ['127.0.0.1'];
	await v.followAddresses?.();
	listed = ['127.0.0.1', '192.0.2.77'];
	t.equal((await v.followAddresses?.())?.failed.length, 1, 'again after it went and came back');
});

t.test('dgram: bound to one address, there are no addresses to follow', async (t) => {
	const { u } = await serve(t, 'dgram');
	t.equal(await u.followAddresses?.(), null);
});
