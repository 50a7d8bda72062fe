/*
 * The DNS edge end to end (src/dns.ts and its use in the proxies): the built
 * bbal CLI, real mname backends, and crafted packets over real sockets from
 * 127.0.3.x and 127.0.4.x.  Covers the UDP header check, SERVFAIL with no
 * backend (and its per-remote limit), --no-backend drop, the per-remote
 * query rate limit (refuse and drop), the --allow ACL on UDP and TCP, the
 * TCP first-message and size checks, the --max-remotes cap and its eviction,
 * and the trace log lines.
 *
 * Counters are read from the stats snapshot through `balstat --json`, as an
 * operator would.  "Dropped" means no datagram arrives on the client's own
 * socket within 300 ms.  Rate windows are the coarse clock's 1-second tick
 * (remotes.ts): a burst that straddles a tick is seen as two windows, so the
 * rate tests read the remote's firstSeen/lastSeen (both tick times) from the
 * snapshot to know which case they are in, and assert exactly for one window.
 */

import dnsPacket from 'dns-packet';
import t, { type Test } from 'tap';
import type { RemoteSnapshot, Snapshot } from '../src/stats.js';
import { runBalstat, runBbal, startBbal, statsSocketFor } from './support/bbal.js';
import { TcpDnsClient, UdpDnsClient, udpQuery } from './support/dns_client.js';
import { backendOf, encodeQuery, framed, type QueryOptions } from './support/dns_messages.js';
import { makeSocketDir, startBackend, startFleet } from './support/fleet.js';
import { freePort } from './support/ports.js';

/* The snapshot as `balstat --json` prints it. */
async function snapshot(dir: string): Promise<Snapshot> {
	const out = await runBalstat(['--json', '-S', statsSocketFor(dir)]);
	if (out.code !== 0) {
		throw new Error(`balstat: exit ${out.code} ${out.stderr}`);
	}
	return JSON.parse(out.stdout) as Snapshot;
}
const remoteOf = (snap: Snapshot, ip: string): RemoteSnapshot | undefined => snap.remotes.find((r) => r.ip === ip);

/* A query as bytes; rd defaults to on, `questions` repeats the question. */
const query = (name: string, id: number, o: QueryOptions & { type?: dnsPacket.RecordType } = {}): Buffer =>
	encodeQuery(name, o.type ?? 'TXT', id, o);
const withOpcode = (b: Buffer, op: number): Buffer => { b[2] = ((b[2]) & 0x87) | (op << 3); return b; };
const asResponse = (b: Buffer): Buffer => { b[2] = (b[2]) | 0x80; return b; };
const rcodeOf = (b: Buffer): number => (b[3]) & 0x0f;
const idOf = (b: Buffer): number => b.readUInt16BE(0);

/* One query from a fresh source; the decoded answer. */
const ask = async (port: number, source: string, name = 'ok.example', id = 4000): Promise<dnsPacket.Packet> =>
	(await udpQuery({ port, source, name, id })).packet;

t.test('what is not a DNS query is dropped and counted, and makes no remote; NOTIFY passes', async (t) => {
	const { dir, port } = await startFleet(t, ['5301']);
	const cases: Array<[string, string, Buffer]> = [
		['127.0.3.1', 'a response (QR=1)', asResponse(query('r.example', 101))],
		['127.0.3.2', 'a 0-byte datagram', Buffer.alloc(0)],
		['127.0.3.3', 'a 1-byte datagram', Buffer.from([0x42])],
		['127.0.3.4', 'an 11-byte datagram', query('s.example', 104).subarray(0, 11)],
		['127.0.3.5', 'QDCOUNT 0', query('q0.example', 105, { questions: 0 })],
		['127.0.3.6', 'QDCOUNT 2', query('q2.example', 106, { questions: 2 })],
		['127.0.3.7', 'opcode STATUS (2)', withOpcode(query('st.example', 107), 2)],
	];
	t.equal(cases[5]?.[2].readUInt16BE(4), 2, 'the QDCOUNT 2 packet really has two questions');
	const clients = await Promise.all(cases.map(async ([src, , bytes]) => {
		const c = await UdpDnsClient.open(t, port, src);
		await c.send(bytes);
		return c;
	}));
	const notify = await UdpDnsClient.open(t, port, '127.0.3.9');
	await notify.send(withOpcode(query('zone.example', 109, { type: 'SOA', rd: false }), 4));
	await Promise.all(clients.map((c) => c.quiet()));
	clients.forEach((c, i) => t.equal(c.datagrams.length, 0, `${cases[i]?.[1]}: no reply`));
	t.equal((await ask(port, '127.0.3.8')).answers?.length, 1, 'a normal query from another source is answered');

	const snap = await snapshot(dir);
	for (const [src, what] of cases) {
		t.equal(remoteOf(snap, src), undefined, `${what}: no remote made for ${src}`);
	}
	t.equal(snap.udp.invalid, cases.length, 'udp.invalid totals them');
	const n = remoteOf(snap, '127.0.3.9');
	t.equal(n?.stats.udpInvalid, 0, 'NOTIFY is not invalid');
	t.equal(n?.stats.udp, 1, 'NOTIFY was forwarded to the backend');
	t.equal(snap.udp.forwarded, 2, 'forwarded: the NOTIFY and the normal query');
	t.comment(`mname's reply to the NOTIFY: ${notify.datagrams.length ? `rcode ${rcodeOf(notify.datagrams[0].bytes)}` : 'none'}`);
});

t.test('with no backend a query gets a minimal SERVFAIL at once; --no-backend drop stays silent', async (t) => {
	const dir = await makeSocketDir(t);
	const port = await freePort();
	await startBbal(t, { dir, port });
	const cases = [
		{ src: '127.0.3.20', id: 0x1234, rd: true, edns: undefined },
		{ src: '127.0.3.21', id: 0x4321, rd: false, edns: undefined },
		{ src: '127.0.3.22', id: 0xbeef, rd: true, edns: 4096 },
	];
	for (const k of cases) {
		const c = await UdpDnsClient.open(t, port, k.src);
		const q = query('fail.example', k.id, { type: 'AAAA', rd: k.rd, edns: k.edns });
		const sentAt = await c.send(q);
		const { bytes, at } = await c.reply(k.id, 1000);
		const what = `${k.src} (RD=${k.rd ? 1 : 0}${k.edns ? ', EDNS' : ''})`;
		t.ok(at - sentAt < 50, `${what}: answered in ${(at - sentAt).toFixed(1)} ms`);
		const flags = bytes.readUInt16BE(2);
		t.equal(flags >> 15, 1, `${what}: QR=1`);
		t.equal((flags >> 11) & 0xf, 0, `${what}: opcode QUERY`);
		t.equal((flags >> 10) & 1, 0, `${what}: AA=0`);
		t.equal((flags >> 9) & 1, 0, `${what}: TC=0`);
		t.equal((flags >> 8) & 1, k.rd ? 1 : 0, `${what}: RD copied`);
		t.equal((flags >> 7) & 1, 0, `${what}: RA=0`);
		t.equal(rcodeOf(bytes), 2, `${what}: SERVFAIL`);
		t.same([2, 4, 6, 8, 10].map((o) => bytes.readUInt16BE(o)).slice(1), [1, 0, 0, 0], `${what}: counts 1/0/0/0`);
		const p = dnsPacket.decode(bytes);
		t.same(p.questions, [{ name: 'fail.example', type: 'AAAA', class: 'IN' }], `${what}: question echoed`);
		t.same([p.answers, p.authorities, p.additionals], [[], [], []], `${what}: no records, no OPT`);
		t.ok(bytes.length <= q.length, `${what}: ${bytes.length} bytes reply to a ${q.length}-byte query`);
		if (k.edns !== undefined) {
			t.equal(bytes.length, q.length - 11, `${what}: exactly the query minus its 11-byte OPT record`);
		}
	}
	let snap = await snapshot(dir);
	t.equal(snap.udp.servfail, 3, 'udp.servfail counts them');
	t.equal(snap.udp.noBackend, 3, 'udp.noBackend too');

	const dropDir = await makeSocketDir(t);
	const dropPort = await freePort();
	await startBbal(t, { dir: dropDir, port: dropPort, args: ['--no-backend', 'drop'] });
	const c = await UdpDnsClient.open(t, dropPort, '127.0.3.23');
	await c.send(query('fail.example', 77));
	t.same(await c.quiet(), [], '--no-backend drop: no reply');
	snap = await snapshot(dropDir);
	t.equal(snap.udp.noBackend, 1, 'udp.noBackend counted');
	t.equal(snap.udp.servfail, 0, 'no SERVFAIL sent');
});

/*
 * Send `n` queries in one burst from a fresh client and collect the replies.
 * `oneTick` says whether the whole burst fell in one coarse-clock tick (the
 * remote's firstSeen equals its lastSeen; the source must be new to bbal).
 */
async function burst(t: Test, port: number, dir: string, src: string, n: number) {
	const c = await UdpDnsClient.open(t, port, src);
	await Promise.all(Array.from({ length: n }, (_, i) => c.send(query(`b${i}.example`, 1000 + i))));
	const replies = await c.quiet();
	const rem = remoteOf(await snapshot(dir), src);
	return { replies, rem, oneTick: rem !== undefined && rem.firstSeen === rem.lastSeen };
}

t.test('SERVFAILs are limited per remote per second; other remotes still get theirs', async (t) => {
	const dir = await makeSocketDir(t);
	const port = await freePort();
	await startBbal(t, { dir, port });
	const { replies, rem, oneTick } = await burst(t, port, dir, '127.0.3.30', 30);
	t.ok(replies.every((b) => rcodeOf(b) === 2), 'every reply is SERVFAIL');
	/*
	 * SYNTH_ANSWERS_PER_SEC (10) per tick: exactly 10 when the burst fell in
	 * one tick; straddling a tick it may earn a second allowance, never more.
	 */
	if (oneTick) {
		t.equal(replies.length, 10, '30 queries in one second: 10 SERVFAILs');
	} else {
		t.ok(replies.length >= 10 && replies.length <= 20, `burst straddled a tick: ${replies.length} SERVFAILs`);
	}
	t.equal(rem?.stats.udpDrop, 30, 'all 30 counted as not forwarded');
	const other = await UdpDnsClient.open(t, port, '127.0.3.31');
	await other.send(query('other.example', 31));
	t.equal(rcodeOf((await other.reply(31)).bytes), 2, 'another source still gets SERVFAIL');
	t.equal((await snapshot(dir)).udp.servfail, replies.length + 1, 'udp.servfail counts what was sent');
});

t.test('--max-qps-per-remote: excess gets REFUSED (or nothing with drop); others unaffected', async (t) => {
	for (const action of ['refuse', 'drop'] as const) {
		const { dir, port } = await startFleet(t, ['5301'], ['--max-qps-per-remote', '5', '--rate-limit-action', action]);
		const k = 5;
		/* A burst that straddles a tick gets two allowances: retry from a fresh source. */
		let res = await burst(t, port, dir, '127.0.3.40', 5 + k);
		for (let i = 1; i < 3 && !res.oneTick; i++) {
			t.comment(`${action}: burst straddled a tick; again`);
			res = await burst(t, port, dir, `127.0.3.${40 + i}`, 5 + k);
		}
		t.ok(res.oneTick, `${action}: a burst of ${5 + k} fell within one tick`);
		const answered = res.replies.filter((b) => rcodeOf(b) === 0 && backendOf(dnsPacket.decode(b)) === '5301');
		const refused = res.replies.filter((b) => rcodeOf(b) === 5);
		t.equal(answered.length, 5, `${action}: 5 answered by the backend`);
		t.equal(refused.length, action === 'refuse' ? k : 0, `${action}: ${action === 'refuse' ? k : 0} REFUSED`);
		t.equal(res.replies.length, answered.length + refused.length, `${action}: nothing else`);
		for (const b of refused) {
			const p = dnsPacket.decode(b);
			t.equal(p.questions?.[0]?.name, `b${idOf(b) - 1000}.example`, `REFUSED ${idOf(b)} echoes its question`);
		}
		t.equal(res.rem?.stats.rateLimited, k, `${action}: stats.rateLimited on the remote`);
		t.equal(res.rem?.stats.udp, 5, `${action}: 5 forwarded`);
		const snap = await snapshot(dir);
		t.ok(snap.udp.rateLimited >= k, `${action}: udp.rateLimited ${snap.udp.rateLimited}`);
		t.equal(snap.udp.refused, action === 'refuse' ? snap.udp.rateLimited : 0, `${action}: udp.refused`);
		t.equal(backendOf(await ask(port, '127.0.3.49')), '5301', `${action}: another source is answered`);
	}
});

t.test('--allow: strangers get nothing on UDP or TCP and leave no trace', async (t) => {
	const { dir, port } = await startFleet(t, ['5301'],
		['--allow', '127.0.3.0/28', '--allow', '127.0.4.8/30,127.0.4.16/32']);
	const inside = ['127.0.3.1', '127.0.4.9', '127.0.4.16'];
	const outside = ['127.0.3.100', '127.0.4.12', '127.0.4.17'];
	for (const s of inside) {
		t.equal(backendOf(await ask(port, s)), '5301', `${s} (inside) is answered`);
	}
	const strangers = await Promise.all(outside.map(async (s) => {
		const c = await UdpDnsClient.open(t, port, s);
		await c.send(query('no.example', 55));
		return c;
	}));
	for (const c of strangers) {
		t.same(await c.quiet(), [], `${c.source} (outside): no UDP reply`);
	}
	const tcpOut = await TcpDnsClient.connect(t, port, '127.0.3.100', framed(query('no.example', 56)));
	await tcpOut.closedByPeer();
	t.equal(tcpOut.received, 0, '127.0.3.100: TCP closed with no data');
	const tcpIn = await TcpDnsClient.connect(t, port, '127.0.3.2', framed(query('in.example', 57)));
	t.equal(backendOf(await tcpIn.answer(57)), '5301', '127.0.3.2 (inside) is answered over TCP');

	const snap = await snapshot(dir);
	t.same(snap.remotes.map((r) => r.ip).sort(), [...inside, '127.0.3.2'].sort(), 'only insiders are remotes');
	t.equal(snap.udp.aclDropped, outside.length, 'udp.aclDropped');
	t.equal(snap.tcp.aclDropped, 1, 'tcp.aclDropped');

	const bad = await runBbal(['-s', dir, '-p', String(await freePort()), '--allow', '127.0.3.0/28',
		'--allow', '10.0.0.1/8']);
	t.equal(bad.code, 2, 'a prefix with host bits exits 2');
	t.match(bad.stderr, /^bbal: .*10\.0\.0\.1\/8.*\n$/, `one line on stderr: ${bad.stderr.trim()}`);
});

t.test('TCP: a bad first message, a bad length or an oversized message closes the connection', async (t) => {
	const { dir, port } = await startFleet(t, ['5301']);
	const closedCases: Array<[string, string, Buffer]> = [
		['127.0.4.20', 'a response first', framed(asResponse(query('r.example', 20)))],
		['127.0.4.21', 'a length of 20000 (over 16 KiB)', Buffer.concat([Buffer.from([0x4e, 0x20]), query('x.example', 21)])],
		['127.0.4.22', 'a length of 5', Buffer.concat([Buffer.from([0, 5]), Buffer.alloc(5)])],
	];
	for (const [src, what, bytes] of closedCases) {
		const c = await TcpDnsClient.connect(t, port, src, bytes);
		await c.closedByPeer();
		t.equal(c.received, 0, `${what}: closed with no data`);
	}
	const later = await TcpDnsClient.connect(t, port, '127.0.4.23',
		Buffer.concat([framed(query('first.example', 23)), framed(asResponse(query('second.example', 24)))]));
	t.equal(backendOf(await later.answer(23)), '5301', 'only the first message is header-checked: it is answered');
	const normal = await TcpDnsClient.connect(t, port, '127.0.4.24', framed(query('n.example', 25)));
	t.equal(backendOf(await normal.answer(25)), '5301', 'a normal TCP query is answered');
	t.equal((await snapshot(dir)).tcp.invalid, closedCases.length, 'tcp.invalid counts the closed ones');

	const small = await startFleet(t, ['5301'], ['--max-tcp-message', '100']);
	const long = query(`${'a'.repeat(60)}.${'b'.repeat(60)}.${'c'.repeat(60)}.example`, 26);
	t.ok(long.length >= 200, `padded query is ${long.length} bytes`);
	const big = await TcpDnsClient.connect(t, small.port, '127.0.4.25', framed(long));
	await big.closedByPeer();
	t.equal(big.received, 0, '--max-tcp-message 100: a 200-byte query is closed with no data');
	const ok = await TcpDnsClient.connect(t, small.port, '127.0.4.26', framed(query('n.example', 27)));
	t.equal(backendOf(await ok.answer(27)), '5301', 'while a normal-size query is answered');
	t.equal((await snapshot(small.dir)).tcp.invalid, 1, 'tcp.invalid');
});

t.test('--max-remotes: a flood of new sources churns the table, a host that keeps talking keeps its place', async (t) => {
	const { dir, port } = await startFleet(t, ['5301', '5302'], ['--max-remotes', '10']);
	const legit = await UdpDnsClient.open(t, port, '127.0.4.1');
	let legitQueries = 0;
	const askLegit = async (): Promise<string | null> => {
		const id = 2000 + legitQueries++;
		await legit.send(query('legit.example', id));
		return backendOf(dnsPacket.decode((await legit.reply(id)).bytes));
	};
	const home = await askLegit();
	const first = remoteOf(await snapshot(dir), '127.0.4.1');
	const seen: Array<string | null> = [];
	for (let i = 0; i < 50; i++) {
		if (i % 5 === 0) {
			seen.push(await askLegit());
		}
		t.ok(backendOf(await ask(port, `127.0.4.${100 + i}`, 'flood.example', 3000 + i)) !== null,
			`flood source ${i} answered`);
	}
	seen.push(await askLegit());
	const snap = await snapshot(dir);
	t.ok(snap.remotes.length <= 10, `${snap.remotes.length} remotes held (cap 10)`);
	t.ok(snap.remotesEvicted >= 40, `${snap.remotesEvicted} evicted`);
	t.same(seen.filter((b) => b !== home), [], `127.0.4.1 stayed on ${home} throughout: ${JSON.stringify(seen)}`);
	const rem = remoteOf(snap, '127.0.4.1');
	t.ok(rem, '127.0.4.1 is still a remote');
	t.equal(rem?.backend, first?.backend, 'with its original backend');
	/* A remote evicted and made again starts over: its count and firstSeen tell. */
	t.equal(rem?.stats.udp, legitQueries, `it was never evicted: all ${legitQueries} queries counted on it`);
	t.equal(rem?.firstSeen, first?.firstSeen, 'firstSeen unchanged');
});

t.test('-l trace logs each forwarded query and each answer bbal makes itself', async (t) => {
	const dir = await makeSocketDir(t);
	const port = await freePort();
	const bbal = await startBbal(t, { dir, port, args: ['-l', 'trace'] });
	const c = await UdpDnsClient.open(t, port, '127.0.4.50');
	let since = bbal.logs.length;
	await c.send(query('nobody.example', 501, { type: 'MX' }));
	t.equal(rcodeOf((await c.reply(501)).bytes), 2, 'SERVFAIL with no backend');
	const own = await bbal.waitForLog((r) => r.msg === 'answered UDP query itself', 2000, since);
	t.equal(own.level, 10, 'at trace level (the later -l trace wins over -l debug)');
	t.same(own.query, { qname: 'nobody.example', qtype: 'MX', id: 501 }, 'names the query');
	t.equal(own.rcode, 2, 'and the rcode');
	t.equal(own.remote_ip, '127.0.4.50', 'and the remote');

	await startBackend(t, dir, '5301');
	bbal.proc.kill('SIGHUP');
	await bbal.waitForLog((r) => r.msg === 'backend socket established', 5000, since);
	since = bbal.logs.length;
	await c.send(query('traced.example', 502, { type: 'TXT' }));
	t.equal(backendOf(dnsPacket.decode((await c.reply(502)).bytes)), '5301', 'answered by the backend');
	const fwd = await bbal.waitForLog((r) => r.msg === 'forwarded UDP query', 2000, since);
	t.same(fwd.query, { qname: 'traced.example', qtype: 'TXT', id: 502 }, 'forwarded: names the query');
	t.equal(fwd.be_id, 5301, 'and the backend');
	t.equal(fwd.remote_ip, '127.0.4.50', 'and the remote');
});
