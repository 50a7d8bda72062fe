/*
 * The dashboard's sampler, on counters a test moves by hand and a clock it
 * steps: rates over the time between two reads, drops by reason, the
 * answers bbal made itself, per backend its queries, answers by rcode and
 * its latency quantiles over that second alone; the history capped at
 * fifteen minutes; the status; and the top talkers, measured only while a
 * dashboard is open, a slice of the table per turn of the loop.
 */

import t from 'tap';
import { latencyBoundMs } from '../src/answers.js';
import { quantileMs, SAMPLE_HISTORY_SECS, Sampler, TALKERS_INTERVAL_SECS, TALKERS_MAX, TALKERS_SLICE } from '../src/sampler.js';
import { fakeBackend, FakeSources } from './support/fake_sources.js';

const T0 = Date.parse('2030-01-02T04:00:00.000Z');

function rig(): { f: FakeSources; s: Sampler; advance: (ms: number) => void } {
	const f = new FakeSources();
	let now = T0;
	const s = new Sampler(f.sources(), { version: '9.9.9', transport: 'native' }, () => now, () => now);
	return { f, s, advance: (ms) => { now += ms; } };
}

const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

interface SampleJson {
	t: number;
	rx: number;
	tx: number;
	fwd: number;
	tcp: number;
	drop: Record<string, number>;
	synth: { servfail: number; refused: number };
	be: Array<{ id: number; q: number; a: number[]; p50: number | null; p99: number | null }>;
}

t.test('rates are counter differences over the clock between two reads', async (t) => {
	const { f, s, advance } = rig();
	const be = fakeBackend(1);
	f.backends = [be];
	const first = JSON.parse(s.run()) as SampleJson;
	t.same([first.rx, first.be[0].q, first.be[0].p50], [0, 0, null], 'the first read has nothing to compare with');

	advance(2000);
	f.udp.received += 300;
	f.udp.sent += 290;
	f.udp.forwarded += 296;
	f.udp.invalid += 4;
	f.udp.servfail += 2;
	f.udp.refused += 6;
	f.tcp.accepted += 3;
	f.tcp.overCap += 1;
	f.tcp.idleClosed += 9;
	be.stats.udp += 296;
	be.health.book.answers.noerror += 280;
	be.health.book.answers.refused += 10;
	be.health.book.latencyCounts[4] += 98;
	be.health.book.latencyCounts[20] += 2;
	const x = JSON.parse(s.run()) as SampleJson;
	t.equal(x.t, T0 + 2000, 'stamped with the wall clock');
	t.same([x.rx, x.tx, x.fwd, x.tcp], [150, 145, 148, 1.5], 'per second, over two seconds');
	t.same(x.drop, { oversize: 0, invalid: 2, acl: 0, no_backend: 0, stuck: 0, rate_limited: 0, send_full: 0, tcp: 0.5 },
		'drops by reason; an idle TCP close is not a drop');
	t.same(x.synth, { servfail: 1, refused: 3 });
	t.same(x.be, [{ id: 1, q: 148, a: [140, 0, 0, 5, 0], p50: latencyBoundMs(4), p99: latencyBoundMs(20) }],
		'the backend\'s queries, answers by rcode class, and this second\'s latency quantiles');

	advance(1000);
	const quiet = JSON.parse(s.run()) as SampleJson;
	t.same([quiet.rx, quiet.be[0].q, quiet.be[0].p50, quiet.be[0].p99], [0, 0, null, null], 'a quiet second: no latency');

	const b2 = fakeBackend(2);
	f.backends = [be, b2];
	advance(1000);
	b2.stats.udp = 500;
	t.same((JSON.parse(s.run()) as SampleJson).be.map((b) => b.q), [0, 0], 'a new backend starts from its first read');
	f.backends = [b2];
	advance(1000);
	t.same((JSON.parse(s.run()) as SampleJson).be.map((b) => b.id), [2], 'a backend gone is gone from the samples');
});

t.test('quantileMs: the bucket holding the q-th answer, null when empty', async (t) => {
	const c = new Float64Array(36);
	t.equal(quantileMs(c, 0.5), null);
	c[0] = 1;
	c[10] = 1;
	t.equal(quantileMs(c, 0.5), latencyBoundMs(0));
	t.equal(quantileMs(c, 0.99), latencyBoundMs(10));
});

t.test('the history holds fifteen minutes, oldest first; the hello and the status say what the page needs', async (t) => {
	const { f, s, advance } = rig();
	f.backends = [fakeBackend(1)];
	f.backends[0].lastFault = { reason: 'backend socket EOF', atMs: T0 - 60_000 };
	for (let i = 0; i < SAMPLE_HISTORY_SECS + 5; i++) {
		s.run();
		advance(1000);
	}
	const h = s.samples();
	t.equal(h.length, SAMPLE_HISTORY_SECS, 'capped');
	t.equal((JSON.parse(h[0]) as SampleJson).t, T0 + 5000, 'the oldest five went');
	t.same(JSON.parse(s.hello()), {
		version: '9.9.9', pid: process.pid, startedAt: '2030-01-02T03:04:05.000Z', listen: { address: '127.0.0.1', port: 53 },
		transport: 'native', socketDir: '/var/run/binder/sockets', historySecs: SAMPLE_HISTORY_SECS, maxEvents: 256,
	});
	const status = JSON.parse(s.status) as Record<string, unknown>;
	t.match(status, {
		uptimeSecs: Math.floor((T0 + (SAMPLE_HISTORY_SECS + 4) * 1000 - Date.parse('2030-01-02T03:04:05.000Z')) / 1000),
		remotes: 0, maxRemotes: 100_000, failOpen: false, talkers: null, takeover: null,
		backends: [{
			id: 1, path: '/var/run/binder/sockets/1.sock', state: 'ok', ok: true, health: 'healthy', healthReason: null,
			lastFault: { reason: 'backend socket EOF', at: new Date(T0 - 60_000).toISOString() },
		}],
	});
	t.equal(s.events.since(0).length, 1, 'the watcher looked: the backend was found');
});

t.test('top talkers: measured only while a dashboard is open, a slice per turn, the highest rates first', async (t) => {
	const { f, s, advance } = rig();
	const n = TALKERS_SLICE * 2 + 500;
	for (let i = 0; i < n; i++) {
		f.remotes.push({
			addr: 0x0a000000 + i, ip: `10.0.${i >> 8}.${i & 255}`, udp: 1, tcp: 0, talkMark: 0, firstSeenMs: T0 - 3_600_000,
			primary: { id: 1 + (i % 2) },
		});
	}
	s.run();
	await turn();
	t.equal(f.slices, 0, 'no dashboard: the table is not read');

	s.talkersWanted = true;
	advance(1000);
	s.run();
	t.equal(f.slices, 0, 'the pass begins on the next turn, not inside run()');
	await turn();
	t.equal(f.slices, 1, 'one slice a turn');
	for (let i = 0; i < 5; i++) {
		await turn();
	}
	t.equal(f.slices, 3, `${n} remotes: three slices`);
	t.equal((JSON.parse(s.status) as { talkers: unknown }).talkers, null, 'the first pass only marks: measuring');

	for (let i = 0; i < 12; i++) {
		f.remotes[i * 100].udp += 10 * (i + 1);
	}
	f.remotes[7].tcp += 5;
	advance(TALKERS_INTERVAL_SECS * 1000);
	s.run();
	for (let i = 0; i < 5; i++) {
		await turn();
	}
	advance(1000);
	s.run();
	const talkers = (JSON.parse(s.status) as { talkers: Array<{ ip: string; backend: number; qps: number }> }).talkers;
	t.equal(talkers.length, TALKERS_MAX);
	t.same(talkers.slice(0, 3), [
		{ ip: f.remotes[1100].ip, backend: 1, qps: 24 },
		{ ip: f.remotes[1000].ip, backend: 1, qps: 22 },
		{ ip: f.remotes[900].ip, backend: 1, qps: 20 },
	], 'queries since the last pass over the time between the passes, highest first');
	t.ok(talkers.every((x, i) => i === 0 || x.qps <= talkers[i - 1].qps), 'in order');
	t.notOk(talkers.some((x) => x.ip === f.remotes[7].ip), 'a remote of 1 q/s is not among the ten');

	s.talkersWanted = false;
	t.equal((JSON.parse(s.status) as { talkers: unknown }).talkers, null, 'the dashboard closed: the list goes, stale from now');
	const before = f.slices;
	advance(TALKERS_INTERVAL_SECS * 3000);
	s.run();
	await turn();
	t.equal(f.slices, before, 'the dashboard closed: no more passes');
	s.close();
});
