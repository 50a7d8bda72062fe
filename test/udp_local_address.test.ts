/*
 * Answers leave from the address the query was sent to.  bbal bound to
 * 0.0.0.0 (the default, and what the service files run) in front of a real
 * mname backend, queried from 127.0.0.10 at several of the host's
 * addresses: each answer must come from the address asked, or the client
 * (dig, any resolver) discards it.  Before, every answer left from the
 * address the kernel picks for the route back to 127.0.0.10 -- 127.0.0.1 --
 * and a query to any other address failed.
 *
 * Both transports.  The native one reads the destination with IP_PKTINFO,
 * so any 127.0.0.x will do.  dgram (BBAL_UDP=dgram) listens on each address
 * os.networkInterfaces() lists, which on Linux's loopback is 127.0.0.1
 * alone; it is tested here against the host's first address off loopback
 * (skipped when there is none), and with 127.0.0.x addresses of its own
 * choosing in test/udp_socket.test.ts.
 */

import t, { type Test } from 'tap';
import { encodeQuery, backendOf } from './support/dns_messages.js';
import { UdpDnsClient } from './support/dns_client.js';
import { dig, needsDig } from './support/dig.js';
import { startFleet } from './support/fleet.js';
import { hostAddress } from './support/ports.js';
import dnsPacket from 'dns-packet';
import { createUdpTransport } from '../src/udp_socket.js';

const CLIENT = '127.0.0.10';

function nativeBuilt(): boolean {
	try {
		void createUdpTransport('native').close();
		return true;
	} catch {
		return false;
	}
}

/* One query from CLIENT to dest:port; the answer's source and backend. */
async function ask(t: Test, client: UdpDnsClient, id: number): Promise<{ from: string; backend: string | null }> {
	await client.send(encodeQuery(`q${id}.example`, 'TXT', id));
	const d = await client.reply(id, 2000);
	t.equal(d.from.port, client.port, 'from the DNS port');
	return { from: d.from.address, backend: backendOf(dnsPacket.decode(d.bytes)) };
}

const transports: Array<{ name: string; env: NodeJS.ProcessEnv; dests: string[]; skip: string | false }> = [
	{
		name: 'native', env: {},
		dests: ['127.0.0.5', '127.0.0.6', '127.0.0.1', ...(hostAddress === undefined ? [] : [hostAddress])],
		skip: nativeBuilt() ? false : 'the native transport is not built',
	},
	{
		name: 'dgram', env: { BBAL_UDP: 'dgram' },
		dests: ['127.0.0.1', ...(hostAddress === undefined ? [] : [hostAddress])],
		skip: hostAddress === undefined ? 'no IPv4 address off loopback to listen on besides 127.0.0.1' : false,
	},
];

for (const tr of transports) {
	t.test(`${tr.name}: bound to 0.0.0.0, each answer comes from the address queried`, { skip: tr.skip }, async (t) => {
		const { port, bbal } = await startFleet(t, ['5301'], ['-b', '0.0.0.0'], tr.env);
		const bound = await bbal.waitForLog((r) => r.msg === 'UDP socket bound');
		t.equal(bound.udp_transport, tr.name, `the ${tr.name} transport`);
		let id = 100;
		for (const dest of tr.dests) {
			const client = await UdpDnsClient.open(t, port, CLIENT, dest);
			const res = await ask(t, client, id++);
			t.equal(res.from, dest, `a query to ${dest} is answered from ${dest}`);
			t.equal(res.backend, '5301', 'by the backend');
		}
		/* One remote asking two addresses in turn: each answer from the one asked. */
		const [a, b] = tr.dests;
		const toA = await UdpDnsClient.open(t, port, CLIENT, a);
		const toB = await UdpDnsClient.open(t, port, CLIENT, b);
		for (let i = 0; i < 3; i++) {
			t.equal((await ask(t, toA, id++)).from, a, `round ${i}: ${a}`);
			t.equal((await ask(t, toB, id++)).from, b, `round ${i}: ${b}`);
		}
	});
}

t.test('native: dig @127.0.0.5 -b 127.0.0.10 gets its answer', { skip: transports[0].skip || needsDig.skip },
	async (t) => {
		const { port } = await startFleet(t, ['5301'], ['-b', '0.0.0.0']);
		const out = await dig(['@127.0.0.5', '-p', String(port), '-b', CLIENT, '+short', '+tries=1', '+time=2',
			'q.example', 'TXT']);
		t.equal(out, '"be=5301"', 'dig accepts the answer (it drops one from another address)');
	});
