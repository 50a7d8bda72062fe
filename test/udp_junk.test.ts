/*
 * Junk makes no state: the UDP edge checks a datagram's size and DNS
 * header before it looks a remote up, so a 3-byte datagram or an oversized
 * one from a new source is counted by the proxy and creates nothing -- and,
 * at the --max-remotes cap, evicts no real host to make room.  From a
 * remote already held it is counted on that remote too, without marking it
 * seen.  No I/O: the proxy over a fake transport, the table over backends
 * on fake sockets, a clock stepped by hand.
 */

import { EventEmitter } from 'node:events';
import type net from 'node:net';
import t from 'tap';
import pino from 'pino';
import { type Backend, Backends } from '../src/backends.js';
import { MAX_UDP_PAYLOAD_BYTES } from '../src/protocol.js';
import { SERVER_HELLO_FRAME } from './support/backend_frames.js';
import { Remotes } from '../src/remotes.js';
import { TimeoutWheel } from '../src/timeouts.js';
import { UdpProxy } from '../src/udp_proxy.js';
import type { UdpTransport, UdpTransportError, UdpTransportKind } from '../src/udp_socket.js';
import type { LogRecord } from './support/bbal.js';
import { encodeQuery } from './support/dns_messages.js';

class FakeSocket extends EventEmitter {
	write(): boolean {
		return true;
	}
	cork(): void {}
	uncork(): void {}
	destroy(): this {
		return this;
	}
}

/* A table of at most maxRemotes over fake backends that are ok; every log line kept. */
function setup(names: string[], maxRemotes: number) {
	let now = 5_000_000;
	const wheel = new TimeoutWheel(() => now);
	const logs: LogRecord[] = [];
	const log = pino({ level: 'debug' }, { write: (line: string) => { logs.push(JSON.parse(line) as LogRecord); } });
	let sock = new FakeSocket();
	const backends = new Backends({
		socketDir: '/s', log, wheel, onOutboundUdp: () => {},
		connector: () => {
			sock = new FakeSocket();
			return sock as unknown as net.Socket;
		},
	});
	const remotes = new Remotes({ log, backends, wheel, maxRemotes });
	for (const name of names) {
		const be = backends.trackAndConnect(name, `1/${name}`) as Backend;
		sock.emit('connect');
		sock.emit('data', SERVER_HELLO_FRAME);
		t.ok(be.ok, `${name} is ok`);
	}
	return {
		wheel, remotes, log,
		tick(secs = 1): void {
			now += secs * 1000;
			wheel.run(now);
		},
		logged: (msg: string): LogRecord[] => logs.filter((r) => r.msg === msg),
	};
}

class FakeTransport implements UdpTransport {
	readonly kind = 'fake' as unknown as UdpTransportKind;
	onDatagram: (msg: Buffer, addr: number, port: number, len: number) => void = () => {};
	onError: (err: UdpTransportError) => void = () => {};
	bind(): Promise<void> {
		return Promise.resolve();
	}
	send(): boolean {
		return true;
	}
	localPort(): number {
		return 53;
	}
	close(): Promise<void> {
		return Promise.resolve();
	}
	deliver(bytes: Buffer, addr: number, len = bytes.length): void {
		this.onDatagram(bytes, addr, 4000, len);
	}
}

async function proxyOver(env: ReturnType<typeof setup>): Promise<{ udp: UdpProxy; transport: FakeTransport }> {
	const transport = new FakeTransport();
	const udp = new UdpProxy({ remotes: env.remotes, log: env.log, wheel: env.wheel, transport });
	await udp.listen('127.0.0.1', 53);
	return { udp, transport };
}

t.test('at the --max-remotes cap, 1,000 junk datagrams from new sources evict nobody and create nothing', async (t) => {
	const cap = 10;
	const env = setup(['5301', '5302'], cap);
	const { udp, transport } = await proxyOver(env);
	const real = Array.from({ length: cap }, (_, i) => 0x0a000001 + i);
	for (const addr of real) {
		transport.deliver(encodeQuery('real.example', 'A', 1), addr);
	}
	t.equal(env.remotes.size, cap, 'the real hosts fill the table');
	for (let i = 0; i < 1000; i++) {
		transport.deliver(Buffer.from([1, 2, 3]), 0x0c000000 + i);
	}
	transport.deliver(Buffer.alloc(MAX_UDP_PAYLOAD_BYTES + 1), 0x0d000001);
	t.same(env.remotes.list().map((r) => r.addr), real, 'the same ten remotes');
	t.equal(env.remotes.evicted, 0, 'nobody evicted');
	t.match(udp.stats, { received: cap + 1001, forwarded: cap, invalid: 1000, oversize: 1 }, 'counted by the proxy');
	t.match(env.logged('dropping UDP packet that is not a DNS query'), [{ remote_ip: '12.0.0.0', len: 3 }],
		'logged with the source\'s address');
});

t.test('junk from a remote already held is counted on it too, and does not mark it seen', async (t) => {
	const env = setup(['5301'], 100);
	const { udp, transport } = await proxyOver(env);
	const src = 0x0a000001;
	transport.deliver(encodeQuery('real.example', 'A', 1), src);
	const rem = env.remotes.peek(src);
	t.ok(rem);
	env.tick(10);
	transport.deliver(Buffer.from([1, 2, 3]), src);
	transport.deliver(Buffer.alloc(8), src, MAX_UDP_PAYLOAD_BYTES + 100);
	t.match(rem, { udpInvalid: 1, udpDrop: 1, udp: 1 });
	t.equal(rem?.lastSeenSec, rem?.firstSeenSec, 'last seen is still the query\'s second');
	t.equal(rem?.referenced, false, 'and no second chance at eviction');
	t.match(udp.stats, { invalid: 1, oversize: 1, forwarded: 1 });
});
