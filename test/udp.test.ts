/*
 * The UDP path end to end: the built bbal CLI in front of real mname
 * backends (separate processes) in a temp directory, queried over UDP from
 * several 127.0.0.x source addresses.
 */

import t from 'tap';
import { dig, needsDig } from './support/dig.js';
import { queryUntil, udpQuery, udpSendRaw } from './support/dns_client.js';
import { startBackend, startFleet } from './support/fleet.js';

const src = (n: number): string => `127.0.0.${n}`;

t.test('every source gets answers with its own id, always from the same backend, spread over all', async (t) => {
	const { port } = await startFleet(t, ['5301', '5302', '5303']);
	const sources = [10, 11, 12, 13, 14, 15, 16, 17, 18].map(src);
	const first = new Map<string, string | null>();
	for (const s of sources) {
		const id = 1000 + Number(s.split('.')[3]);
		const res = await udpQuery({ port, source: s, name: 'www.example.com', id });
		t.equal(res.packet.id, id, `${s}: answer carries the query id`);
		t.equal(res.from.port, port, `${s}: answer comes from the DNS port`);
		first.set(s, res.backend);
	}
	for (let round = 0; round < 3; round++) {
		for (const s of sources) {
			const res = await udpQuery({ port, source: s, name: `r${round}.example.com` });
			t.equal(res.backend, first.get(s), `${s}: sticky in round ${round}`);
		}
	}
	const counts = new Map<string, number>();
	for (const b of first.values()) {
		counts.set(String(b), (counts.get(String(b)) ?? 0) + 1);
	}
	t.same([...counts.keys()].sort(), ['5301', '5302', '5303'], 'all three backends serve');
	t.same([...counts.values()], [3, 3, 3], 'nine sources, three each');
});

t.test('a killed backend\'s sources move within two seconds and come back when it returns', async (t) => {
	const { port, bbal, backends } = await startFleet(t, ['5301', '5302', '5303']);
	const sources = [20, 21, 22, 23, 24, 25].map(src);
	const home = new Map<string, string | null>();
	for (const s of sources) {
		home.set(s, (await udpQuery({ port, source: s, name: 'a.example' })).backend);
	}
	const victim = backends[0];
	const moved = sources.filter((s) => home.get(s) === victim.label);
	t.equal(moved.length, 2, 'two sources on the victim');
	await victim.kill('SIGKILL');
	const killedAt = Date.now();
	for (const s of moved) {
		const res = await queryUntil({
			port, source: s, name: 'b.example', until: (b) => b !== null && b !== victim.label, timeoutMs: 2000,
		});
		t.ok(res?.backend, `${s} served by ${res?.backend} after the kill`);
	}
	t.ok(Date.now() - killedAt < 2500, 'within two seconds');
	for (const s of sources.filter((x) => !moved.includes(x))) {
		t.equal((await udpQuery({ port, source: s, name: 'c.example' })).backend, home.get(s), `${s} unaffected`);
	}
	const since = bbal.logs.length;
	await victim.restart();
	await bbal.waitForLog((r) => r.msg === 'backend socket established' && r.be_id === 5301, 10000, since);
	for (const s of moved) {
		const res = await udpQuery({ port, source: s, name: 'd.example' });
		t.equal(res.backend, victim.label, `${s} back on its primary`);
	}
});

t.test('a socket added to the directory is picked up by the rescan and serves new sources', async (t) => {
	const { dir, port, bbal } = await startFleet(t, ['5301']);
	await udpQuery({ port, source: src(30), name: 'x.example' });
	const since = bbal.logs.length;
	await startBackend(t, dir, 'late-comer', 'late');
	const rec = await bbal.waitForLog((r) => r.msg === 'backend socket established', 7000, since);
	t.match(rec.be_path, /late-comer$/, 'the new socket');
	t.equal(rec.be_id, 5302, 'a non-numeric name gets the next id');
	const seen = new Set<string | null>();
	for (let n = 31; n <= 34; n++) {
		seen.add((await udpQuery({ port, source: src(n), name: 'y.example' })).backend);
	}
	t.ok(seen.has('late'), 'new sources reach the new backend');
	t.ok(seen.has('5301'), 'and the old one');
});

t.test('an oversized datagram is dropped and logged; the next query is answered', async (t) => {
	const { port, bbal } = await startFleet(t, ['5301']);
	await udpSendRaw({ port, source: src(40), bytes: Buffer.alloc(1600, 0x41) });
	const rec = await bbal.waitForLog((r) => r.msg === 'dropping oversized UDP packet');
	t.equal(rec.len, 1600);
	t.equal(rec.remote_ip, src(40), 'the log names the remote');
	const res = await udpQuery({ port, source: src(40), name: 'after.example' });
	t.equal(res.backend, '5301');
});

t.test('dig from 127.0.0.7 is answered by the same backend every time', needsDig, async (t) => {
	const { port } = await startFleet(t, ['5301', '5302', '5303']);
	const answers: string[] = [];
	for (let i = 0; i < 4; i++) {
		answers.push(await dig(['@127.0.0.1', '-p', String(port), '-b', '127.0.0.7', '+short', '+tries=1', '+time=2',
			`q${i}.example`, 'TXT']));
	}
	t.match(answers[0], /^"be=530[123]"$/, 'dig shows the backend');
	t.same(new Set(answers).size, 1, `same backend for every query: ${answers.join(' ')}`);
});
