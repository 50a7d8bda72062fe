/*
 * Issue 13 end to end: real mname backends behind a real bbal, switched over
 * their IPC channel to answer SERVFAIL, REFUSED or NXDOMAIN to everything or
 * to swallow queries (test/fixtures/mname_backend.cjs), and clients on
 * several 127.0.8.x sources.  What a user sees: a backend that fails its
 * queries loses its hosts to healthy backends within 3 s and gets them back
 * within 5 s of recovering; a quiet one is judged by probes; REFUSED and
 * NXDOMAIN are answers, not sickness; when all fail, bbal fails open; probe
 * answers never reach anyone; and a backend's answers to addresses nobody
 * asked about are not sent.  The timings waited for are bbal's own
 * (probes every 1 s, a 2-s query timeout), polled, not slept.
 */

import dgram from 'node:dgram';
import path from 'node:path';
import dnsPacket from 'dns-packet';
import t from 'tap';
import { ipv4ToU32 } from '../src/protocol.js';
import { statsSnapshot } from './support/bbal.js';
import type { Teardowns } from './support/process.js';
import { udpQuery } from './support/dns_client.js';
import { FakeBackend } from './support/fake_backend.js';
import { type Fleet, startFleet } from './support/fleet.js';
import { sleep, waitFor } from './support/wait.js';

interface Seen {
	/* The label of the backend that answered (answer or additional section), or null: none, or no answer. */
	backend: string | null;
	rcode: string | null;
	at: number;
}

const RCODES: Record<number, string> = { 0: 'NOERROR', 2: 'SERVFAIL', 3: 'NXDOMAIN', 5: 'REFUSED' };

function labelOf(p: dnsPacket.Packet): string | null {
	for (const rr of [...(p.answers ?? []), ...(p.additionals ?? [])]) {
		if (rr.type === 'TXT') {
			for (const part of (Array.isArray(rr.data) ? rr.data : [rr.data])) {
				const s = part.toString();
				if (s.startsWith('be=')) {
					return s.slice(3);
				}
			}
		}
	}
	return null;
}

/* Each source asks a fresh name every `everyMs`, one at a time; every answer is kept. */
class Traffic {
	readonly seen = new Map<string, Seen[]>();
	private running = true;
	private readonly loops: Array<Promise<void>>;

	constructor(readonly port: number, readonly sources: string[], everyMs = 40) {
		this.loops = sources.map(async (src) => {
			this.seen.set(src, []);
			for (let n = 0; this.running; n++) {
				let s: Seen;
				try {
					const r = await udpQuery({ port, source: src, name: `h${n}-${src}.example`, timeoutMs: 600 });
					s = { backend: labelOf(r.packet), rcode: RCODES[(r.packet.flags ?? 0) & 0x0f] ?? 'other', at: Date.now() };
				} catch {
					s = { backend: null, rcode: null, at: Date.now() };
				}
				this.seen.get(src)?.push(s);
				await sleep(everyMs);
			}
		});
	}

	last(src: string): Seen | undefined {
		return this.seen.get(src)?.at(-1);
	}

	/* Sources whose latest answer came from `label`. */
	on(label: string): string[] {
		return this.sources.filter((s) => this.last(s)?.backend === label);
	}

	async stop(): Promise<void> {
		this.running = false;
		await Promise.all(this.loops);
	}
}

const sources = (n: number, third: number): string[] => Array.from({ length: n }, (_, i) => `127.0.${third}.${i + 1}`);

async function withTraffic(t: Teardowns, fleet: Fleet, srcs: string[]): Promise<Traffic> {
	const tr = new Traffic(fleet.port, srcs);
	t.teardown(() => tr.stop());
	await waitFor(() => srcs.every((s) => tr.last(s)?.rcode === 'NOERROR'), 5000, 20, 'every source answered');
	return tr;
}

const healthLine = (fleet: Fleet, be: string, health: string, since = 0) => fleet.bbal.waitForLog(
	(r) => r.msg === 'backend health changed' && r['be_path'] === path.join(fleet.dir, be) && r['health'] === health,
	8000, since);

t.test('a backend answering SERVFAIL to everything loses its hosts within 3 s and gets them back within 5 s', async (t) => {
	const fleet = await startFleet(t, ['5301', '5302', '5303']);
	const srcs = sources(12, 8);
	const tr = await withTraffic(t, fleet, srcs);
	const mine = tr.on('5301');
	const others = srcs.filter((s) => !mine.includes(s)).map((s) => [s, tr.last(s)?.backend]);
	t.ok(mine.length > 0, `${mine.length} sources on 5301`);
	const since = fleet.bbal.logs.length;
	const t0 = await fleet.backends[0].command('servfail');
	await waitFor(() => mine.every((s) => {
		const l = tr.last(s);
		return l !== undefined && l.at > t0 && l.rcode === 'NOERROR' && l.backend !== '5301';
	}), 4000, 20, 'the hosts of 5301 answered by healthy backends');
	const moved = Date.now() - t0;
	t.ok(moved <= 3000, `moved ${moved} ms after the switch`);
	const sick = await healthLine(fleet, '5301', 'sick', since);
	t.match(sick, { level: 40, be_id: 5301, health_reason: 'servfail' }, 'one warn line, judged by its answers');
	t.same(others.filter(([s, be]) => tr.last(s as string)?.backend !== be), [], 'no other host moved');
	t.equal([...tr.seen.values()].flat().filter((x) => x.rcode === 'SERVFAIL' && x.backend === null).length, 0,
		'no SERVFAIL of bbal\'s own');
	const t1 = await fleet.backends[0].command('normal');
	await waitFor(() => mine.every((s) => {
		const l = tr.last(s);
		return l !== undefined && l.at > t1 && l.backend === '5301';
	}), 6000, 20, 'its hosts back on 5301');
	const back = Date.now() - t1;
	t.ok(back <= 5000, `back ${back} ms after it recovered`);
	t.match(await healthLine(fleet, '5301', 'healthy', since), { level: 30, be_id: 5301, health_reason: null });
});

t.test('a backend with no traffic turns sick by probe and recovers by probe; no probe answer reaches a client', async (t) => {
	const fleet = await startFleet(t, ['5301', '5302']);
	const since = fleet.bbal.logs.length;
	await fleet.backends[1].command('servfail');
	t.match(await healthLine(fleet, '5302', 'sick', since), { be_id: 5302, health_reason: 'probe', probe_failures: 2 });
	await fleet.backends[1].command('normal');
	await healthLine(fleet, '5302', 'healthy', since);
	const snap = await statsSnapshot(fleet.sock);
	t.ok(snap.udp.probeAnswers >= 8, `${snap.udp.probeAnswers} probe answers taken`);
	t.equal(snap.udp.sent, 0, 'not one datagram sent: there was no client');
	t.equal(snap.udp.sendErrors, 0);
	t.equal(snap.udp.unsolicited, 0);
	t.same(snap.backends.map((b) => b.stats.udp), [0, 0], 'probes are not counted as client queries');
});

t.test('REFUSED-only and NXDOMAIN-only answers never make a backend sick', async (t) => {
	const fleet = await startFleet(t, ['5301', '5302']);
	const srcs = sources(8, 9);
	const tr = await withTraffic(t, fleet, srcs);
	const where = new Map(srcs.map((s) => [s, tr.last(s)?.backend]));
	const since = fleet.bbal.logs.length;
	const t0 = Math.max(await fleet.backends[0].command('refused'), await fleet.backends[1].command('nxdomain'));
	await waitFor(() => srcs.every((s) => (tr.seen.get(s) ?? []).filter((x) => x.at > t0 + 3000).length > 0), 6000, 50,
		'three seconds of it');
	t.same(fleet.bbal.logs.slice(since).filter((r) => r.msg === 'backend health changed'), [], 'no health change');
	for (const s of srcs) {
		const after = (tr.seen.get(s) ?? []).filter((x) => x.at > t0 + 100);
		const rcode = where.get(s) === '5301' ? 'REFUSED' : 'NXDOMAIN';
		t.ok(after.every((x) => x.backend === where.get(s) && x.rcode === rcode), `${s}: ${rcode} from ${where.get(s)} throughout`);
	}
});

t.test('every backend SERVFAIL: bbal fails open, the backends\' own answers, each host on its own backend', async (t) => {
	const fleet = await startFleet(t, ['5301', '5302']);
	const srcs = sources(8, 10);
	const tr = await withTraffic(t, fleet, srcs);
	const where = new Map(srcs.map((s) => [s, tr.last(s)?.backend]));
	const since = fleet.bbal.logs.length;
	await Promise.all(fleet.backends.map((b) => b.command('servfail')));
	const open = await fleet.bbal.waitForLog((r) => r.msg === 'every backend is sick: failing open', 5000, since);
	t.equal(open.level, 40);
	await sleep(1000);
	for (const s of srcs) {
		const after = (tr.seen.get(s) ?? []).filter((x) => x.at > Date.now() - 800);
		t.ok(after.length > 0 && after.every((x) => x.rcode === 'SERVFAIL' && x.backend === where.get(s)),
			`${s}: its own backend's SERVFAIL (${where.get(s)})`);
	}
	t.equal([...tr.seen.values()].flat().filter((x) => x.rcode === 'SERVFAIL' && x.backend === null).length, 0,
		'never a SERVFAIL of bbal\'s own');
	await Promise.all(fleet.backends.map((b) => b.command('normal')));
	await fleet.bbal.waitForLog((r) => r.msg === 'failing open no more', 5000, since);
	await waitFor(() => srcs.every((s) => tr.last(s)?.rcode === 'NOERROR' && tr.last(s)?.backend === where.get(s)), 5000, 20,
		'every host answered by its own backend again');
});

t.test('a blackholed backend is caught by its unanswered queries (no probes), tried again after its hold-down', async (t) => {
	const fleet = await startFleet(t, ['5301', '5302'], ['--no-health-check']);
	/*
	 * Each source waits for its answer (600 ms at most), so a blackholed
	 * backend hears from each of its hosts under twice a second: 24 hosts give
	 * it the 20 samples in 2 s that a passive verdict needs.
	 */
	const srcs = sources(24, 11);
	const tr = await withTraffic(t, fleet, srcs);
	const mine = tr.on('5301');
	const since = fleet.bbal.logs.length;
	const t0 = await fleet.backends[0].command('blackhole');
	t.match(await healthLine(fleet, '5301', 'sick', since), { health_reason: 'timeouts' });
	const caught = Date.now() - t0;
	t.ok(caught <= 3000, `sick ${caught} ms after it stopped answering (query timeout 2 s)`);
	await waitFor(() => mine.every((s) => tr.last(s)?.backend === '5302'), 2000, 20, 'its hosts on 5302');
	const t1 = await fleet.backends[0].command('normal');
	await waitFor(() => mine.every((s) => tr.last(s)?.backend === '5301'), 8000, 20, 'back after the 5-s hold-down');
	t.ok(Date.now() - t1 <= 7000);
});

t.test('a backend\'s answers to addresses nobody asked about are dropped and counted, not sent', async (t) => {
	for (const accounting of [true, false]) {
		const fleet = await startFleet(t, ['5301'], accounting ? [] : ['--no-answer-accounting']);
		const victim = dgram.createSocket('udp4');
		let hits = 0;
		victim.on('message', () => hits++);
		await new Promise<void>((resolve) => victim.bind(0, '127.0.0.99', resolve));
		t.teardown(() => victim.close());
		const flooder = await FakeBackend.listen(t, path.join(fleet.dir, '5310'));
		await waitFor(async () => (await statsSnapshot(fleet.sock)).backends.length === 2, 8000, 50, 'the flooder connected');
		await waitFor(async () => (await statsSnapshot(fleet.sock)).backends.every((b) => b.ok), 8000, 50, 'both ok');
		const answer = dnsPacket.encode({ id: 7, type: 'response', questions: [{ type: 'A', name: 'victim.example' }] });
		flooder.flood(ipv4ToU32('127.0.0.99'), victim.address().port, Buffer.from(answer));
		await waitFor(() => flooder.floodFrames > 5000, 5000, 20, 'the flood under way');
		await sleep(300);
		flooder.stopFlood();
		const snap = await statsSnapshot(fleet.sock);
		const r = await udpQuery({ port: fleet.port, source: '127.0.12.1', name: 'still.example' });
		t.ok(r.backend !== null, 'clients are still answered');
		if (accounting) {
			t.equal(hits, 0, 'not one reached the address it named');
			t.ok(snap.udp.unsolicited > 5000, `${snap.udp.unsolicited} counted unsolicited`);
		} else {
			t.ok(hits > 0, `with --no-answer-accounting, as before: ${hits} sent`);
			/* Probes still run, and their answers are still bbal's, not datagrams to 0.0.0.0. */
			await waitFor(async () => (await statsSnapshot(fleet.sock)).udp.probeAnswers >= 3, 5000, 100, 'probe answers');
			const after = await statsSnapshot(fleet.sock);
			t.equal(after.udp.sendErrors, 0, 'no probe answer was sent');
			t.equal(after.backends.find((b) => b.id === 5301)?.health, 'healthy', 'the mname is healthy by its probes');
		}
	}
});

t.test('a probe goes to no client even when a client uses the probe\'s id', async (t) => {
	const fleet = await startFleet(t, ['5301']);
	const snap0 = await statsSnapshot(fleet.sock);
	await waitFor(async () => (await statsSnapshot(fleet.sock)).udp.probeAnswers >= snap0.udp.probeAnswers + 3, 5000, 100, 'probes');
	for (let id = 1; id <= 20; id++) {
		const r = await udpQuery({ port: fleet.port, source: '127.0.13.1', name: 'bbal-health-check.invalid', type: 'A', id });
		t.equal(r.backend, '5301', `id ${id}: the client's own answer`);
	}
	const snap = await statsSnapshot(fleet.sock);
	t.equal(snap.udp.sent, 20, 'twenty answers sent, to the client; the probes\' never');
});
