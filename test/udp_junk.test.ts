/*
 * Junk makes no state: the UDP edge checks a datagram's size and DNS
 * header before it looks a remote up, so a 3-byte datagram or an oversized
 * one from a new source is counted by the proxy and creates nothing -- and,
 * at the --max-remotes cap, evicts no real host to make room.  From a
 * remote already held it is counted on that remote too, without marking it
 * seen.  No I/O: the proxy over a fake transport, the table over backends
 * on fake sockets, a clock stepped by hand.
 */

import t from 'tap';
import { MAX_UDP_PAYLOAD_BYTES } from '../src/protocol.js';
import { UdpProxy } from '../src/udp_proxy.js';
import { fakeTable } from './support/fake_socket.js';
import { FakeTransport } from './support/fake_transport.js';
import { encodeQuery } from './support/dns_messages.js';

/* A table of at most maxRemotes over fake backends that are ok; every log line kept. */
function setup(names: string[], maxRemotes: number) {
	const env = fakeTable(maxRemotes);
	for (const name of names) {
		t.ok(env.up(name).ok, `${name} is ok`);
	}
	return env;
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
		transport.deliver(encodeQuery('real.example', 'A', 1), addr, 5353);
	}
	t.equal(env.remotes.size, cap, 'the real hosts fill the table');
	for (let i = 0; i < 1000; i++) {
		transport.deliver(Buffer.from([1, 2, 3]), 0x0c000000 + i, 5353);
	}
	transport.deliver(Buffer.alloc(MAX_UDP_PAYLOAD_BYTES + 1), 0x0d000001, 5353);
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
	transport.deliver(encodeQuery('real.example', 'A', 1), src, 5353);
	const rem = env.remotes.peek(src);
	t.ok(rem);
	env.tick(10);
	transport.deliver(Buffer.from([1, 2, 3]), src, 5353);
	transport.deliver(Buffer.alloc(8), src, 5353, MAX_UDP_PAYLOAD_BYTES + 100);
	t.match(rem, { udpInvalid: 1, udpDrop: 1, udp: 1 });
	t.equal(rem?.lastSeenSec, rem?.firstSeenSec, 'last seen is still the query\'s second');
	t.equal(rem?.referenced, false, 'and no second chance at eviction');
	t.match(udp.stats, { invalid: 1, oversize: 1, forwarded: 1 });
});
