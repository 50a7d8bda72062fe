/*
 * The packet cache in the UDP path, in-process: the Balancer with a clock
 * the test steps and a fake UDP transport, in front of real mname backends
 * that answer the way Binder does (test/fixtures/mname_backend.cjs,
 * CACHEABLE NAMES: `svc.` names get four A records in a fresh order every
 * time, TTL 30) and say how many queries they were asked.  A repeated
 * query is answered from the cache (the backend's count does not move)
 * with the client's id and letter case and an aged TTL; the order of the
 * records varies across hits; SERVFAIL, REFUSED, truncated and TTL-0
 * answers are not cached; qtype, RD, CD, DO and class make different
 * entries while a cookie does not; entries expire at --cache-max-ttl; two
 * hosts on two backends each get their own backend's answer; with every
 * backend down, or answering SERVFAIL, or not at all, an expired answer
 * is served with TTL 30 for --serve-stale seconds and never while a
 * healthy backend answers; a flood of unique names keeps the cache at its
 * cap.
 */

import dnsPacket from 'dns-packet';
import t from 'tap';
import { ipv4ToU32 } from '../src/protocol.js';
import { type Rig, startBalancer } from './support/balancer_rig.js';
import { backendOf } from './support/dns_messages.js';
import { type Backend, makeSocketDir, startBackend } from './support/fleet.js';
import { waitFor } from './support/wait.js';

const dir = await makeSocketDir(t);
const backends = [await startBackend(t, dir, '5301'), await startBackend(t, dir, '5302')];
const CACHE = { cacheSize: 1000, cacheMaxTtlSecs: 30, serveStaleSecs: 0, healthCheck: false };

const A = ipv4ToU32('127.0.7.1');
const B = ipv4ToU32('127.0.7.2');

interface Q {
	name: string;
	type?: dnsPacket.RecordType;
	id: number;
	rd?: boolean;
	cd?: boolean;
	edns?: number;
	do?: boolean;
	cookie?: boolean;
	klass?: 'IN' | 'CH';
}

function encode(q: Q): Buffer {
	return dnsPacket.encode({
		type: 'query', id: q.id,
		flags: (q.rd === false ? 0 : dnsPacket.RECURSION_DESIRED) | (q.cd === true ? dnsPacket.CHECKING_DISABLED : 0),
		questions: [{ type: q.type ?? 'A', name: q.name, class: q.klass ?? 'IN' }],
		additionals: q.edns === undefined ? [] : [{
			type: 'OPT', name: '.', udpPayloadSize: q.edns, extendedRcode: 0, ednsVersion: 0, flags: q.do === true ? 0x8000 : 0,
			options: q.cookie === true ? [{ code: 10, data: Buffer.from(`${q.id}`.padEnd(8, 'c')) }] : [],
		} as unknown as dnsPacket.Answer],
	});
}

/* Ask from addr:port and wait for the answer; the answer decoded, and its raw bytes. */
async function ask(rig: Rig, q: Q, addr = A, port = 5000): Promise<{ p: dnsPacket.Packet; bytes: Buffer }> {
	const before = rig.udp.sent.length;
	rig.udp.deliver(encode(q), addr, port);
	await waitFor(() => rig.udp.sent.slice(before).some((s) => s.addr === addr && s.port === port), 3000, 2, `an answer to ${q.name}`);
	const sent = rig.udp.sent.slice(before).find((s) => s.addr === addr && s.port === port);
	return { p: dnsPacket.decode(sent?.bytes as Buffer), bytes: sent?.bytes as Buffer };
}

const total = async (): Promise<number> => (await Promise.all(backends.map((b) => b.queries()))).reduce((x, y) => x + y, 0);
type Rr = { type: string; data?: unknown; ttl?: number };
const aRecords = (p: dnsPacket.Packet): string[] => ((p.answers ?? []) as Rr[]).filter((r) => r.type === 'A').map((r) => String(r.data));
const ttls = (p: dnsPacket.Packet): number[] => ((p.answers ?? []) as Rr[]).map((r) => r.ttl ?? -1);

t.test('a repeated query is answered from the cache: the client\'s id and case, aged TTLs, the backend not asked', async (t) => {
	const rig = await startBalancer(t, dir, CACHE);
	const first = await ask(rig, { name: 'svc.one.example', id: 1 });
	t.same(new Set(aRecords(first.p)), new Set(['10.0.0.1', '10.0.0.2', '10.0.0.3', '10.0.0.4']));
	t.same(ttls(first.p), [30, 30, 30, 30, 30], 'TTL 30 from the backend');
	const asked = await total();

	rig.advance(7);
	const hit = await ask(rig, { name: 'SVC.One.Example', id: 2 });
	t.equal(await total(), asked, 'the backend was not asked');
	t.equal(hit.p.id, 2, 'the client\'s id');
	t.equal(hit.p.questions?.[0].name, 'SVC.One.Example', 'the client\'s letter case in the question');
	t.ok(hit.bytes.includes(Buffer.from('\x03SVC\x03One\x07Example')), 'the very bytes the client sent');
	t.same(ttls(hit.p), [23, 23, 23, 23, 23], 'TTLs aged by the 7 s the answer spent in the cache');
	t.same(new Set(aRecords(hit.p)), new Set(aRecords(first.p)), 'the same records');
	t.equal(backendOf(hit.p), backendOf(first.p), 'the same backend\'s answer');
	t.match(rig.bal.udp.cache?.cache.stats, { hits: 1, inserts: 1 });
});

t.test('the records of an RRset come in a fresh order on every hit, and every answer parses', async (t) => {
	const rig = await startBalancer(t, dir, CACHE);
	await ask(rig, { name: 'svc.order.example', id: 1 });
	const asked = await total();
	const orders = new Set<string>();
	for (let i = 0; i < 60; i++) {
		const { p } = await ask(rig, { name: 'svc.order.example', id: 100 + i });
		t.equal(aRecords(p).length, 4);
		orders.add(aRecords(p).join(','));
	}
	t.equal(await total(), asked, 'all 60 from the cache');
	t.ok(orders.size >= 8, `${orders.size} of the 24 orders seen in 60 hits: not frozen`);
});

t.test('SERVFAIL, REFUSED, truncated and TTL-0 answers are not cached', async (t) => {
	const rig = await startBalancer(t, dir, { ...CACHE, healthCheck: false });
	const twice = async (q: Omit<Q, 'id'>, what: string, addr = A): Promise<void> => {
		const before = await total();
		await ask(rig, { ...q, id: 1 }, addr);
		await ask(rig, { ...q, id: 2 }, addr);
		t.equal(await total() - before, 2, `${what}: both asked of the backend`);
	};
	await twice({ name: 'plain.example' }, 'TTL 0');
	await twice({ name: 'ttl30.big.example' }, 'truncated (TC, no EDNS)');
	for (const mode of ['servfail', 'refused'] as const) {
		await Promise.all(backends.map((b) => b.command(mode)));
		await twice({ name: 'svc.bad.example' }, mode.toUpperCase());
		await Promise.all(backends.map((b) => b.command('normal')));
	}
	t.equal(rig.bal.udp.cache?.cache.stats.inserts, 0, 'nothing filed');
});

t.test('qtype, RD, CD, DO, EDNS size, class: different entries; id, a cookie and case: the same one', async (t) => {
	const rig = await startBalancer(t, dir, CACHE);
	const base: Q = { name: 'svc.keys.example', id: 1 };
	await ask(rig, base);
	const misses: Array<[string, Q]> = [
		['qtype', { ...base, type: 'TXT' }], ['RD', { ...base, rd: false }], ['CD', { ...base, cd: true }],
		['EDNS', { ...base, edns: 1232 }], ['DO', { ...base, edns: 1232, do: true }], ['EDNS size', { ...base, edns: 4096 }],
		['class', { ...base, klass: 'CH' }],
	];
	for (const [what, q] of misses) {
		const before = await total();
		await ask(rig, { ...q, id: 50 });
		t.equal(await total() - before, 1, `${what}: a different entry, asked of the backend`);
	}
	const before = await total();
	await ask(rig, { ...base, id: 77, edns: 1232, cookie: true });
	await ask(rig, { ...base, name: 'Svc.KEYS.example', id: 78 });
	t.equal(await total(), before, 'a cookie and another case: hits on the entries already there');
});

t.test('entries expire at --cache-max-ttl', async (t) => {
	const rig = await startBalancer(t, dir, { ...CACHE, cacheMaxTtlSecs: 5 });
	const first = await ask(rig, { name: 'svc.short.example', id: 1 });
	t.same(ttls(first.p), [30, 30, 30, 30, 30], 'the backend says 30');
	const asked = await total();
	rig.advance(2);
	const hit = await ask(rig, { name: 'svc.short.example', id: 2 });
	t.equal(await total(), asked, 'a hit within 5 s');
	t.same(ttls(hit.p), [28, 28, 28, 28, 28], 'aged from what the backend gave, not from the cap');
	rig.advance(4);
	await ask(rig, { name: 'svc.short.example', id: 3 });
	t.equal(await total(), asked + 1, 'after 5 s: asked again');
});

t.test('two hosts on two backends each get their own backend\'s answer from the cache', async (t) => {
	const rig = await startBalancer(t, dir, CACHE);
	const a1 = await ask(rig, { name: 'svc.mine.example', type: 'TXT', id: 1 }, A);
	const b1 = await ask(rig, { name: 'svc.mine.example', type: 'TXT', id: 2 }, B);
	t.not(backendOf(a1.p), backendOf(b1.p), 'two hosts, two backends');
	const asked = await total();
	const a2 = await ask(rig, { name: 'svc.mine.example', type: 'TXT', id: 3 }, A);
	const b2 = await ask(rig, { name: 'svc.mine.example', type: 'TXT', id: 4 }, B);
	t.equal(await total(), asked, 'both from the cache');
	t.equal(backendOf(a2.p), backendOf(a1.p), 'A still sees its backend');
	t.equal(backendOf(b2.p), backendOf(b1.p), 'B still sees its backend');
});

t.test('a flood of unique names keeps the cache at its cap', async (t) => {
	const rig = await startBalancer(t, dir, { ...CACHE, cacheSize: 50 });
	for (let i = 0; i < 300; i++) {
		rig.udp.deliver(encode({ name: `svc.u${i}.example`, id: i }), A, 6000);
	}
	await waitFor(() => rig.udp.sent.length === 300, 10_000, 5, '300 answers');
	const s = rig.bal.udp.cache?.cache.stats;
	t.equal(s?.entries, 50, 'entries at the cap');
	t.equal(s?.inserts, 300);
	t.equal(s?.evictions, 250, 'the rest evicted');
	t.ok((s?.bytes ?? Infinity) < 50 * 2048, `${s?.bytes} bytes for 50 entries`);
});

t.test('serve stale: every backend down, SERVFAIL, or no answer -- TTL 30, for --serve-stale seconds, never while one is healthy',
	async (t) => {
		const local = await makeSocketDir(t);
		const fleet: Backend[] = [await startBackend(t, local, '5301'), await startBackend(t, local, '5302')];
		const rig = await startBalancer(t, local, { ...CACHE, cacheMaxTtlSecs: 5, serveStaleSecs: 60, queryTimeoutMs: 1000 });
		const first = await ask(rig, { name: 'svc.stale.example', id: 1 }, A);
		const mine = backendOf(first.p);
		rig.advance(10);

		/* Its backend answers SERVFAIL: the expired answer instead, TTL 30. */
		await Promise.all(fleet.map((b) => b.command('servfail')));
		const sf = await ask(rig, { name: 'svc.stale.example', id: 2 }, A);
		t.equal((sf.p.flags ?? 0) & 0x0f, 0, 'NOERROR, not SERVFAIL');
		t.same(ttls(sf.p), [30, 30, 30, 30, 30], 'TTL 30');
		t.equal(backendOf(sf.p), mine, 'its own backend\'s answer');

		/* No answer within --query-timeout: the expired answer once it passes. */
		await Promise.all(fleet.map((b) => b.command('blackhole')));
		const before = rig.udp.sent.length;
		rig.udp.deliver(encode({ name: 'svc.stale.example', id: 3 }), A, 5000);
		await new Promise((resolve) => setTimeout(resolve, 50));
		t.equal(rig.udp.sent.length, before, 'nothing yet');
		rig.advance(1);
		rig.bal.health.run(rig.now());
		await waitFor(() => rig.udp.sent.length > before, 2000, 5, 'the stale answer');
		t.equal(dnsPacket.decode(rig.udp.sent[before].bytes).id, 3, 'to the query that went unanswered');

		/* A healthy backend answers: never stale. */
		await Promise.all(fleet.map((b) => b.command('normal')));
		const fresh = await ask(rig, { name: 'svc.stale.example', id: 4 }, A);
		t.same(ttls(fresh.p), [30, 30, 30, 30, 30]);
		t.equal(rig.bal.udp.cache?.cache.stats.staleHits, 2, 'the two above, and not this one');

		/* Every backend down: stale for --serve-stale seconds, then SERVFAIL. */
		rig.advance(10);
		await Promise.all(fleet.map((b) => b.kill()));
		await waitFor(() => rig.bal.backends.list().every((b) => !b.ok), 3000, 5, 'both down');
		const down = await ask(rig, { name: 'svc.stale.example', id: 5 }, A);
		t.same([(down.p.flags ?? 0) & 0x0f, ttls(down.p)], [0, [30, 30, 30, 30, 30]], 'no backend: the stale answer');
		const other = await ask(rig, { name: 'svc.stale.example', id: 6 }, B);
		t.equal((other.p.flags ?? 0) & 0x0f, 0, 'another host too: any backend\'s answer beats SERVFAIL');
		rig.advance(60);
		const late = await ask(rig, { name: 'svc.stale.example', id: 7 }, A);
		t.equal((late.p.flags ?? 0) & 0x0f, 2, `${5 + 60} s and more past its TTL: SERVFAIL`);
	});
