/*
 * What operators see of answer accounting and health (issue 13): the
 * snapshot's per-backend answers, latency, probe and health and its
 * failOpen, balstat's BACKEND HEALTH table, and the /metrics families, end
 * to end with the built CLI.  Healthy: real mname backends answering TXT
 * queries from several sources.  Sick: an in-process fake backend that
 * answers every query SERVFAIL (once twice), alone, so bbal fails open.
 * The conversion of an answer book's counts to Prometheus buckets and the
 * table's layout are tested as the pure functions they are; the streamed
 * snapshot against takeSnapshot() in-process, on a clock that stands still.
 * Clients use 127.0.13.x.
 */

import type net from 'node:net';
import path from 'node:path';
import t from 'tap';
import { LATENCY_BUCKETS, latencyBoundMs } from '../src/answers.js';
import { Balancer } from '../src/balancer.js';
import { formatSnapshot, readSnapshot } from '../src/balstat.js';
import { makeLogger } from '../src/log.js';
import { latencyHistogram } from '../src/metrics.js';
import { FRAME_INBOUND_UDP, FRAME_OUTBOUND_UDP, ipv4ToU32 } from '../src/protocol.js';
import { type BackendSnapshot, type Snapshot, takeSnapshot } from '../src/stats.js';
import { runBalstat, startBbal, statsSnapshot, statsSocketFor } from './support/bbal.js';
import { udpQuery } from './support/dns_client.js';
import { encodeQuery } from './support/dns_messages.js';
import { encodeUdpFrame } from './support/backend_frames.js';
import { answerControl, FakeBackend, type Frame } from './support/fake_backend.js';
import { FakeTransport } from './support/fake_transport.js';
import { makeSocketDir, startBackend, startFleet } from './support/fleet.js';
import { freePort } from './support/ports.js';
import { type Sample, scrape, value } from './support/prom_text.js';
import { waitFor } from './support/wait.js';

/* The fields issue 13 added to each backend, in the order the snapshot writes them. */
const HEALTH_FIELDS = ['health', 'healthReason', 'answers', 'outstanding', 'unanswered', 'late', 'unsolicited',
	'droppedInflight', 'latencyMs', 'probe', 'healthTransitions'];
const RCODES = ['noerror', 'nxdomain', 'servfail', 'refused', 'other'];
const HISTOGRAM = 'bbal_backend_answer_latency_seconds';

const rcodeOf = (msg: Buffer): number => msg[3] & 0x0f;
const answeredBy = (b: BackendSnapshot): number => RCODES.reduce((n, k) => n + b.answers[k as keyof BackendSnapshot['answers']], 0);

/* The lines of balstat's BACKEND HEALTH table: its header and a row per backend. */
function healthTable(out: string): string[] {
	const lines = out.split('\n');
	const at = lines.indexOf('BACKEND HEALTH');
	const end = lines.indexOf('', at);
	return at < 0 ? [] : lines.slice(at + 1, end);
}

/*
 * One backend's latency histogram on the page: its buckets in page order,
 * and its _sum and _count.  Every sample carries the backend's id and path.
 */
function histogramOf(samples: Sample[], be: { id: number; path: string }) {
	const labels = { backend: String(be.id), path: be.path };
	const buckets = samples.filter((s) => s.name === `${HISTOGRAM}_bucket` && s.labels.backend === labels.backend);
	return {
		buckets, labels,
		sum: value(samples, `${HISTOGRAM}_sum`, labels),
		count: value(samples, `${HISTOGRAM}_count`, labels),
	};
}

t.test('latencyHistogram: the book\'s even bounds in seconds, cumulative, the open last bucket under +Inf alone', (t) => {
	const counts = new Float64Array(LATENCY_BUCKETS);
	counts[0] = 1; /* at most 1/16 ms */
	counts[1] = 2; /* an odd bucket: counted at the next even bound */
	counts[2] = 3;
	counts[9] = 4; /* over 2^(8/2)/16 = 1 ms, at most 1.41 ms: under le 2 ms */
	counts[LATENCY_BUCKETS - 1] = 5; /* slower than every bound */
	const h = latencyHistogram(counts, 1234);
	t.equal(h.buckets.length, LATENCY_BUCKETS / 2, 'one bucket per even bound below the open last one');
	t.same(h.buckets.map((b) => b.le), Array.from({ length: LATENCY_BUCKETS / 2 }, (_, i) => latencyBoundMs(2 * i) / 1000),
		'the bounds, in seconds');
	t.same(h.buckets.map((b) => Math.log2(b.le * 1000)), Array.from({ length: LATENCY_BUCKETS / 2 }, (_, i) => i - 4),
		'powers of two of a millisecond, 1/16 ms up');
	t.same(h.buckets.slice(0, 7).map((b) => b.count), [1, 6, 6, 6, 6, 10, 10], 'cumulative: 0; 0-2; 0-2; ...; 0-10');
	t.equal(h.buckets.at(-1)?.count, 10, 'the last bound does not count the open bucket');
	t.equal(h.count, 15, 'the count: every answer, +Inf');
	t.equal(h.sumSecs, 1.234, 'the sum, in seconds');
	t.ok(h.buckets.every((b, i) => i === 0 || b.count >= h.buckets[i - 1].count), 'never decreasing');

	const none = latencyHistogram(new Float64Array(LATENCY_BUCKETS), 0);
	t.same([none.count, none.sumSecs, none.buckets.every((b) => b.count === 0)], [0, 0, true], 'no answers: all zero');
	t.end();
});

/* A snapshot's backend, healthy or not, with everything issue 13 added; `over` replaces fields. */
function backendSnap(id: number, over: Partial<BackendSnapshot> = {}): BackendSnapshot {
	return {
		id, path: `/var/run/binder/sockets/${id}`, ok: true, removed: false, state: 'ok', remotes: 2,
		heartbeatOutstanding: false, reconnectDelay: 1, stuck: false, lastHeartbeatRttMs: 0.2,
		stats: { connStart: 1, connError: 0, udp: 1_234_567, tcp: 12, stuck: 0, faults: 0, throttled: 0 },
		health: 'healthy', healthReason: null,
		answers: { noerror: 1_200_000, nxdomain: 30_000, servfail: 4_567, refused: 0, other: 0 },
		outstanding: 3, unanswered: 0, late: 0, unsolicited: 0, droppedInflight: 0, inflightTableBytes: 25_600,
		latencyMs: { p50: 0.177, p99: 11.314 }, lastFault: null,
		probe: { ok: true, rcode: 3, ms: 0.4123, at: '2030-01-02T03:04:05.000Z' }, healthTransitions: 0,
		...over,
	};
}

t.test('balstat\'s BACKEND HEALTH table: health and reason, SERVFAIL share, p50/p99, probe; under 100 columns', (t) => {
	const snap = {
		version: 1, pid: 1, time: '', startedAt: '2030-01-02T03:04:05.000Z', listen: { address: '0.0.0.0', port: 53 },
		socketDir: '/var/run/binder/sockets', failOpen: false, remotes: [], timeouts: [], udp: {}, tcp: {},
		backends: [
			backendSnap(5301),
			backendSnap(5302, {
				health: 'sick', healthReason: 'timeouts', latencyMs: { p50: null, p99: null },
				answers: { noerror: 0, nxdomain: 0, servfail: 0, refused: 0, other: 0 }, probe: { ok: false, rcode: null, ms: null, at: '' },
			}),
			backendSnap(5303, { health: 'sick', healthReason: 'servfail', probe: { ok: false, rcode: 2, ms: 1, at: '' } }),
			backendSnap(5304, { probe: null }),
		],
	} as unknown as Snapshot;
	const rows = healthTable(formatSnapshot(snap));
	t.same(rows[0].trim().split(/\s+/), ['ID', 'HEALTH', 'ANSWERS', 'SERVFAIL%', 'P50MS', 'P99MS', 'OUTSTANDING', 'UNANSWERED', 'PROBE']);
	t.same(rows.slice(1).map((r) => r.split(/\s{2,}/)), [
		['5301', 'healthy', '1234567', '0.4', '0.18', '11', '3', '0', 'ok 0.41ms'],
		['5302', 'sick:timeouts', '0', '-', '-', '-', '3', '0', 'fail:timeout'],
		['5303', 'sick:servfail', '1234567', '0.4', '0.18', '11', '3', '0', 'fail:servfail'],
		['5304', 'healthy', '1234567', '0.4', '0.18', '11', '3', '0', '-'],
	], 'one row per backend');
	const col = (s: string): number => rows[0].indexOf(s) + s.length;
	t.ok(rows.every((r) => r.length <= 100), `every line within 100 columns (${Math.max(...rows.map((r) => r.length))})`);
	t.equal(rows[2].indexOf('-', rows[0].indexOf('SERVFAIL%')) + 1, col('SERVFAIL%'), 'a missing share is right-aligned');
	t.equal(rows[1].indexOf('0.18') + 4, col('P50MS'), 'numbers right-aligned');
	t.notMatch(formatSnapshot(snap), /failing open/, 'no fail-open line unless failing open');
	t.match(formatSnapshot({ ...snap, failOpen: true }), /\nevery connected backend is sick: failing open/, 'said when it is');
	const old = { ...snap, backends: snap.backends.map(({ answers: _a, ...b }) => b) } as unknown as Snapshot;
	t.notMatch(formatSnapshot(old), /BACKEND HEALTH/, 'a bbal without answer accounting: no table');
	t.end();
});

t.test('healthy mname backends: answers, latency, probes in the snapshot, balstat and /metrics', async (t) => {
	const metricsPort = await freePort();
	const { port, sock } = await startFleet(t, ['5301', '5302', '5303'], ['--metrics', `127.0.0.1:${metricsPort}`]);
	const sources = [1, 2, 3, 4, 5, 6].map((n) => `127.0.13.${n}`);
	const perSource = 4;
	for (const s of sources) {
		for (let i = 0; i < perSource; i++) {
			const res = await udpQuery({ port, source: s, name: `h${i}.example`, type: 'TXT' });
			t.equal(rcodeOf(res.bytes), 0, 'NOERROR');
		}
	}
	const n = sources.length * perSource;

	/* Probes go every second from the first backend's session on: each has passed one within about 1.5 s. */
	let snap = await statsSnapshot(sock);
	await waitFor(async () => {
		snap = await statsSnapshot(sock);
		return snap.backends.every((b) => b.probe?.ok === true);
	}, 4000, 100, 'a passed probe on every backend');
	for (const b of snap.backends) {
		t.same(Object.keys(b).filter((k) => HEALTH_FIELDS.includes(k)), HEALTH_FIELDS, `backend ${b.id}: the new fields`);
		t.same(Object.keys(b.answers), RCODES, 'answers by rcode class');
		t.equal(b.health, 'healthy', `backend ${b.id} healthy`);
		t.equal(b.healthReason, null);
		t.equal(b.healthTransitions, 0);
		t.equal(b.outstanding, 0, 'every query answered: none outstanding');
		t.same([b.unanswered, b.late, b.unsolicited, b.droppedInflight], [0, 0, 0, 0], 'nothing unanswered, late, unmatched or dropped');
		t.equal(answeredBy(b), b.answers.noerror, 'only NOERROR');
		t.equal(b.answers.noerror, b.stats.udp, 'one answer per query forwarded (probes are neither)');
		t.ok(b.answers.noerror > 0, `backend ${b.id} served (round-robin over six sources)`);
		const { p50, p99 } = b.latencyMs;
		t.ok(typeof p50 === 'number' && typeof p99 === 'number' && p50 > 0 && p50 <= p99 && p99 < 2000,
			`p50 ${p50} ms <= p99 ${p99} ms`);
		const probe = b.probe;
		t.equal(probe?.rcode, 0, 'mname answers the probe NOERROR');
		t.ok(typeof probe?.ms === 'number' && probe.ms >= 0 && probe.ms < 1000, `the probe took ${probe?.ms} ms`);
		const at = Date.parse(probe?.at ?? '');
		t.equal(new Date(at).toISOString(), probe?.at, 'probe.at is an ISO time');
		t.ok(Math.abs(Date.now() - at) < 5000, `and a recent one (${probe?.at})`);
	}
	t.equal(snap.backends.reduce((s, b) => s + b.answers.noerror, 0), n, `the ${n} answers, over the backends`);
	t.equal(snap.failOpen, false, 'not failing open');
	t.equal(snap.udp.unsolicited, 0);

	const out = await runBalstat(['-S', sock]);
	t.equal(out.code, 0, `balstat exits 0 (${out.stderr})`);
	const rows = healthTable(out.stdout);
	t.match(rows[0], /^\s*ID\s+HEALTH\s+ANSWERS\s+SERVFAIL%\s+P50MS\s+P99MS\s+OUTSTANDING\s+UNANSWERED\s+PROBE$/, 'the header');
	t.equal(rows.length, 4, 'a row per backend');
	for (const [i, b] of snap.backends.entries()) {
		const cells = rows[i + 1].trim().split(/\s+/);
		t.same(cells.slice(0, 4), [String(b.id), 'healthy', String(answeredBy(b)), '0'], `backend ${b.id}: healthy, 0% SERVFAIL`);
		t.ok(cells.slice(4, 6).every((c) => Number(c) > 0), `p50 and p99 in ms: ${cells.slice(4, 6)}`);
		t.same(cells.slice(6, 9), ['0', '0', 'ok'], 'nothing outstanding or unanswered, the probe ok');
	}
	t.ok(out.stdout.split('\n').every((l) => l.length <= 100 || /^(udp|tcp|remotes): /.test(l)),
		'the tables within 100 columns');
	t.notMatch(out.stdout, /failing open/);

	const page = await scrape(metricsPort);
	t.equal(value(page, 'bbal_health_fail_open'), 0, 'bbal_health_fail_open 0');
	t.equal(value(page, 'bbal_udp_unsolicited_answers_total'), 0);
	let total = 0;
	for (const b of snap.backends) {
		const labels = { backend: String(b.id), path: b.path };
		t.equal(value(page, 'bbal_backend_healthy', labels), 1, `backend ${b.id} healthy, with its id and path`);
		t.equal(value(page, 'bbal_backend_outstanding', labels), 0);
		t.equal(value(page, 'bbal_backend_unanswered_total', labels), 0);
		t.equal(value(page, 'bbal_backend_health_transitions_total', labels), 0);
		t.same(RCODES.map((rcode) => value(page, 'bbal_backend_answers_total', { ...labels, rcode })),
			[b.answers.noerror, 0, 0, 0, 0], 'answers by rcode, as in the snapshot');
		const h = histogramOf(page, b);
		t.ok(h.buckets.every((s) => s.labels.path === b.path), 'every bucket has the path');
		t.equal(h.count, b.answers.noerror, `${HISTOGRAM}_count: the backend's answers`);
		t.ok(h.sum > 0 && h.sum < h.count * 2, `_sum ${h.sum} s`);
		const les = h.buckets.map((s) => s.labels.le);
		t.equal(les.at(-1), '+Inf', 'the buckets end at +Inf');
		t.equal(h.buckets.at(-1)?.value, h.count, '+Inf is the count');
		const bounds = les.slice(0, -1).map(Number);
		t.same(bounds.map((le) => Math.log2(le * 1000)), bounds.map((_, i) => i - 4), 'the bounds: 1/16 ms, doubling');
		t.ok(h.buckets.every((s, i) => i === 0 || s.value >= h.buckets[i - 1].value), 'cumulative');
		total += h.count;
	}
	t.equal(total, n, `the histograms count the ${n} answers`);
});

t.test('in-process, on a still clock: the streamed snapshot is takeSnapshot()\'s byte for byte, latencies on the balancer\'s clock',
	async (t) => {
		const dir = await makeSocketDir(t);
		await startBackend(t, dir, '5301');
		await startBackend(t, dir, '5302');
		/* Years before the real clock: a snapshot that read latencies at Date.now() would find the minute long gone. */
		const now = Date.parse('2020-01-02T03:04:05.000Z');
		const udp = new FakeTransport();
		const sock = statsSocketFor(dir);
		const bal = new Balancer({
			bind: '127.0.0.1', port: 0, socketDir: dir, log: makeLogger('fatal'), clock: () => now, transport: udp,
			watchDir: false, statsSocket: sock,
		});
		t.teardown(() => bal.close());
		await bal.start();
		for (let i = 0; i < 6; i++) {
			udp.deliver(encodeQuery(`v${i}.example`, 'TXT', i + 1), ipv4ToU32(`127.0.13.${40 + i}`), 4000 + i);
		}
		await waitFor(() => udp.sent.length === 6, 3000, 5, 'six answers');
		const text = await readSnapshot(sock);
		const streamed = JSON.parse(text) as Snapshot;
		const whole = takeSnapshot(bal.statsSources);
		t.equal(text, `${JSON.stringify({ ...whole, time: streamed.time, statsSocket: streamed.statsSocket })}\n`,
			'the same bytes but for the time and the stats socket\'s own counts');
		t.equal(whole.backends.reduce((n, b) => n + b.answers.noerror, 0), 6, 'the six answers');
		for (const b of whole.backends) {
			t.same(b.latencyMs, { p50: 0.063, p99: 0.063 }, `backend ${b.id}: 0 ms on a still clock, the first bucket (1/16 ms)`);
		}
		t.equal(whole.failOpen, false);
	});

/* An answer to `query`: the same message with QR set and this rcode. */
function answerOf(query: Buffer, rcode: number): Buffer {
	const a = Buffer.from(query);
	a[2] |= 0x80;
	a[3] = (a[3] & 0xf0) | rcode;
	return a;
}

t.test('a backend that answers SERVFAIL: sick:servfail, failing open, in the snapshot, balstat and /metrics', async (t) => {
	const dir = await makeSocketDir(t);
	let duplicated = false;
	await FakeBackend.listen(t, path.join(dir, '5301'), {
		onControlFrame: (sock: net.Socket, frame: Frame) => {
			if (frame.type !== FRAME_INBOUND_UDP || frame.payload === null) {
				answerControl(sock, frame);
				return;
			}
			const answer = encodeUdpFrame(FRAME_OUTBOUND_UDP, frame.addr, frame.port, answerOf(frame.payload, 2));
			sock.write(answer);
			/* The first client query is answered twice: the second matches nothing. */
			if (!duplicated && frame.port !== 0) {
				duplicated = true;
				sock.write(answer);
			}
		},
	});
	const port = await freePort();
	const metricsPort = await freePort();
	/* Probes every minute: the first may fail, none comes back; passive accounting alone judges it. */
	const bbal = await startBbal(t, { dir, port, args: ['--metrics', `127.0.0.1:${metricsPort}`, '--health-interval', '60'] });
	await waitFor(() => bbal.logs.some((r) => r.msg === 'backend socket established'), 5000, 20, 'the fake established');
	const sock = statsSocketFor(dir);

	const n = 30;
	const answers = await Promise.all(Array.from({ length: n }, (_, i) =>
		udpQuery({ port, source: `127.0.13.${20 + (i % 3)}`, name: `s${i}.example` })));
	t.ok(answers.every((a) => rcodeOf(a.bytes) === 2), 'the clients get the backend\'s SERVFAIL');
	let snap = await statsSnapshot(sock);
	await waitFor(async () => {
		snap = await statsSnapshot(sock);
		return snap.backends[0]?.health === 'sick';
	}, 3000, 50, 'the backend sick');
	const [b] = snap.backends;
	t.equal(b.healthReason, 'servfail', 'sick for its SERVFAILs');
	t.equal(b.answers.servfail, n, `its ${n} SERVFAILs counted`);
	t.equal(answeredBy(b), n, 'and nothing else');
	t.equal(b.unsolicited, 1, 'the duplicate answer: unsolicited, on this backend');
	t.equal(snap.udp.unsolicited, 1, 'and in the UDP proxy\'s count');
	t.equal(b.healthTransitions, 1, 'one transition');
	t.ok(b.probe === null || (b.probe.ok === false && b.probe.rcode === 2), `the probe, if any, failed: ${JSON.stringify(b.probe)}`);
	t.equal(snap.failOpen, true, 'the only backend is sick: failing open');

	const out = await runBalstat(['-S', sock]);
	const row = healthTable(out.stdout)[1]?.trim().split(/\s+/);
	t.same(row?.slice(0, 4), ['5301', 'sick:servfail', String(n), '100'], 'balstat: sick:servfail, 100% SERVFAIL');
	t.match(out.stdout, /\nevery connected backend is sick: failing open/, 'and says it fails open');
	t.match(out.stdout, /backend answers matching no query \(dropped\) 1; /, 'and the unmatched answer on the udp line');

	const page = await scrape(metricsPort);
	const labels = { backend: '5301', path: path.join(dir, '5301') };
	t.equal(value(page, 'bbal_backend_healthy', labels), 0, 'bbal_backend_healthy 0');
	t.equal(value(page, 'bbal_health_fail_open'), 1, 'bbal_health_fail_open 1');
	t.equal(value(page, 'bbal_backend_answers_total', { ...labels, rcode: 'servfail' }), n);
	t.equal(value(page, 'bbal_backend_answers_total', { ...labels, rcode: 'noerror' }), 0);
	t.equal(value(page, 'bbal_backend_health_transitions_total', labels), 1);
	t.equal(value(page, 'bbal_udp_unsolicited_answers_total'), 1);
	t.equal(histogramOf(page, { id: 5301, path: labels.path }).count, n, 'the histogram counts the SERVFAILs too');
});
