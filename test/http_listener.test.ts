/*
 * The operators' HTTP port end to end: the built CLI with --http in front
 * of real mname backends.  Every file of the page is served from the
 * package with a Content-Security-Policy, gzipped when asked and tagged;
 * the whole page is under 250 KB; nothing but GET and HEAD is taken;
 * /snapshot.json is balstat's snapshot; /remote finds a remote's backend;
 * /live sends the hello, the status, the history and the events, then a
 * sample a second whose rates follow the traffic; the streams' cap answers
 * 503 and a scrape still gets through.  In-process, on a clock the test
 * steps: the sampler's second, and a stream whose reader stopped reading
 * cut once it has not caught up for 30 s.
 */

import http from 'node:http';
import { gunzipSync } from 'node:zlib';
import t from 'tap';
import { CONTENT_SECURITY_POLICY, HTTP_MAX_STREAMS, HTTP_STREAM_STALL_SECS, HttpListener } from '../src/http_listener.js';
import { makeLogger } from '../src/log.js';
import { SAMPLE_HISTORY_SECS, Sampler } from '../src/sampler.js';
import { statsSnapshot } from './support/bbal.js';
import { udpQuery } from './support/dns_client.js';
import { fakeBackend, FakeSources } from './support/fake_sources.js';
import { startFleet } from './support/fleet.js';
import { freePort } from './support/ports.js';
import { get, scrape, value } from './support/prom_text.js';
import { LiveReader } from './support/sse.js';
import { waitFor } from './support/wait.js';

interface Reply {
	status: number;
	headers: http.IncomingHttpHeaders;
	body: Buffer;
}

function request(port: number, path: string, opts: { method?: string; headers?: Record<string, string> } = {}): Promise<Reply> {
	return new Promise((resolve, reject) => {
		const req = http.request({ host: '127.0.0.1', port, path, method: opts.method ?? 'GET', headers: opts.headers, agent: false },
			(res) => {
				const chunks: Buffer[] = [];
				res.on('data', (c: Buffer) => chunks.push(c));
				res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }));
			});
		req.on('error', reject);
		req.end();
	});
}

const PAGE = ['/', '/assets/app.js', '/assets/style.css', '/assets/favicon.svg', '/assets/uPlot.iife.min.js', '/assets/uPlot.min.css'];

t.test('the page: every file from the package, with the CSP, gzipped and tagged, under 250 KB in all; read-only', async (t) => {
	const httpPort = await freePort();
	const f = await startFleet(t, ['a', 'b'], ['--http', `127.0.0.1:${httpPort}`]);
	t.ok(f.bbal.logs.some((r) => r.msg === 'dashboard and metrics listening' && r.http === `http://127.0.0.1:${httpPort}/`),
		'the URL is logged');
	let total = 0;
	for (const path of PAGE) {
		const r = await request(httpPort, path);
		t.equal(r.status, 200, `${path} served`);
		t.equal(r.headers['content-security-policy'], CONTENT_SECURITY_POLICY, `${path}: the CSP`);
		t.equal(r.headers['x-content-type-options'], 'nosniff');
		total += r.body.length;
		const z = await request(httpPort, path, { headers: { 'accept-encoding': 'gzip, br' } });
		t.equal(z.headers['content-encoding'], 'gzip', `${path}: gzipped when asked`);
		t.same(gunzipSync(z.body), r.body, 'the same bytes');
		const again = await request(httpPort, path, { headers: { 'if-none-match': String(r.headers.etag) } });
		t.equal(again.status, 304, `${path}: not sent again while unchanged`);
	}
	t.ok(total < 250 * 1024, `the whole page is ${total} bytes, under 250 KB`);
	const html = (await request(httpPort, '/')).body.toString();
	t.notMatch(html, /(src|href)="(https?:)?\/\//, 'the page names no other host');
	t.notMatch(html, /<script>|<style|style="| on[a-z]+="/i, 'no inline script, style or handler');

	const post = await request(httpPort, '/metrics', { method: 'POST' });
	t.same([post.status, post.headers.allow], [405, 'GET, HEAD'], 'POST refused');
	t.equal((await request(httpPort, '/live', { method: 'DELETE' })).status, 405, 'DELETE refused');
	t.equal((await request(httpPort, '/admin')).status, 404);
	const head = await request(httpPort, '/', { method: 'HEAD' });
	t.same([head.status, head.body.length], [200, 0], 'HEAD: headers only');
});

t.test('/snapshot.json is the snapshot; /remote finds a remote\'s backend', async (t) => {
	const httpPort = await freePort();
	const f = await startFleet(t, ['a', 'b'], ['--http', `127.0.0.1:${httpPort}`]);
	for (const source of ['127.0.0.11', '127.0.0.12', '127.0.0.13']) {
		await udpQuery({ port: f.port, source, name: 'x.example', type: 'A' });
	}
	const web = JSON.parse((await get(httpPort, '/snapshot.json')).body) as { backends: Array<{ id: number }>; remotes: unknown[] };
	const sock = await statsSnapshot(f.sock);
	t.same(web.backends.map((b) => b.id), sock.backends.map((b) => b.id), 'the same backends as the stats socket');
	t.equal(web.remotes.length, 3, 'and the three remotes');

	const r = await get(httpPort, '/remote?ip=127.0.0.12');
	t.equal(r.status, 200);
	type Held = { ip: string; held: boolean; backend: { id: number; path: string }; stats: { udp: number } };
	const rem = JSON.parse(r.body) as Held;
	const want = sock.remotes.find((x) => x.ip === '127.0.0.12');
	const path = sock.backends.find((b) => b.id === want?.backend)?.path;
	t.same([rem.ip, rem.held, rem.backend.id, rem.backend.path, rem.stats.udp], ['127.0.0.12', true, want?.backend, path, 1],
		'its backend, as balstat has it, and its counters');
	const none = await get(httpPort, '/remote?ip=127.0.0.99');
	t.same([none.status, JSON.parse(none.body)], [200, { ip: '127.0.0.99', held: false }], 'not held: an answer, not a 404');
	t.equal((await get(httpPort, '/remote?ip=nonsense')).status, 400);
	t.equal((await get(httpPort, '/remote')).status, 400);
});

t.test('/live: hello, history, events and status, then a sample a second that follows the traffic', async (t) => {
	const httpPort = await freePort();
	const f = await startFleet(t, ['a', 'b'], ['--http', `127.0.0.1:${httpPort}`]);
	const live = new LiveReader(httpPort);
	t.teardown(() => live.close());
	await live.until(() => live.of('events').length >= 1, 5000, 'the first messages');
	t.equal(live.status, 200);
	const first = live.messages.map((m) => m.event);
	t.equal(first[0], 'hello', 'hello first');
	const hello = live.of('hello')[0];
	t.match(hello, { pid: f.bbal.proc.pid, listen: { address: '127.0.0.1', port: f.port }, historySecs: 900, maxEvents: 256 });
	t.ok(['native', 'dgram'].includes(String(hello.transport)), 'the transport named');
	t.equal(first[1], 'status', 'then the status');
	t.equal(first.at(-1), 'events', 'the history, then the events');
	type Status = { backends: Array<{ id: number; ok: boolean }> };
	await live.until(() => live.of<Status>('status').some((s) => s.backends.length === 2), 3000, 'both backends');
	const found = live.of<Array<{ kind: string; backend: number }>>('events').flat().filter((e) => e.kind === 'found');
	t.equal(found.length, 2, 'both backends found, as events');
	t.same(live.of<Status>('status').at(-1)?.backends.map((b) => b.ok), [true, true], 'both up in the status');

	/* A second reader gets the history and every event at once. */
	const late = new LiveReader(httpPort);
	t.teardown(() => late.close());
	await late.until(() => late.of('events').length >= 1, 5000, 'the late reader\'s first messages');
	t.ok(late.of('sample').length >= 1, `the history: ${late.of('sample').length} samples`);
	t.equal(late.of<unknown[]>('events')[0].length, live.of<unknown[]>('events').flat().length, 'every event so far');
	late.close();

	t.equal(value(await scrape(httpPort), 'bbal_http_streams'), 1, 'the stream counted in /metrics');
	const stop = Date.now() + 3000;
	let sent = 0;
	while (Date.now() < stop) {
		await udpQuery({ port: f.port, source: `127.0.0.${20 + (sent % 10)}`, name: 'x.example', type: 'A' });
		sent++;
	}
	await live.until(() => live.of<{ rx: number }>('sample').filter((s) => s.rx > 0).length >= 2, 3000, 'samples with traffic');
	const busy = live.of<{ rx: number; be: Array<{ q: number }> }>('sample').filter((s) => s.rx > 0);
	const perBackend = busy.reduce((n, s) => n + s.be.reduce((m, b) => m + b.q, 0), 0);
	t.ok(busy.length >= 2, `${busy.length} samples with traffic`);
	const times = live.of<{ t: number }>('sample').map((s) => s.t).slice(-6);
	const gaps = times.slice(1).map((x, i) => x - times[i]);
	t.ok(gaps.every((g) => g > 500 && g < 1500), `one a second: ${gaps.join(', ')} ms apart`);
	t.ok(perBackend > 0, 'spread over the backends');

	const f2 = f.backends[1];
	await f2.kill();
	await live.until(() => live.of<Array<{ kind: string; backend: number }>>('events').flat()
		.some((e) => e.kind === 'down'), 3000, 'the backend down');
	t.pass('a killed backend is a "down" event within the stream\'s next second');
});

t.test('at most HTTP_MAX_STREAMS dashboards; the next is told 503, and /metrics still answers', async (t) => {
	const httpPort = await freePort();
	await startFleet(t, ['a'], ['--http', `127.0.0.1:${httpPort}`]);
	const readers = Array.from({ length: HTTP_MAX_STREAMS }, () => new LiveReader(httpPort));
	t.teardown(() => readers.forEach((r) => r.close()));
	await waitFor(() => readers.every((r) => r.of('status').length > 0), 5000, 20, 'every stream open');
	const over = new LiveReader(httpPort);
	t.teardown(() => over.close());
	await over.until(() => over.ended, 3000, 'the refusal');
	t.equal(over.status, 503, 'one too many');
	const m = await scrape(httpPort);
	t.equal(value(m, 'bbal_http_streams'), HTTP_MAX_STREAMS);
	t.equal(value(m, 'bbal_metrics_connections_dropped_total', { reason: 'streams_over_cap' }), 1, 'counted');
	readers[0].close();
	await waitFor(async () => value(await scrape(httpPort), 'bbal_http_streams') === HTTP_MAX_STREAMS - 1, 3000, 20,
		'a closed stream frees its place');
});

t.test('in-process: the sampler runs each second of the wheel; a stream that stops reading is cut after 30 s', async (t) => {
	const f = new FakeSources();
	f.backends = [fakeBackend(1)];
	const sampler = new Sampler(f.sources(), { version: '9.9.9', transport: 'dgram' }, () => f.nowMs, () => f.nowMs);
	const listener = new HttpListener(f.sources(), sampler, makeLogger('fatal'));
	const port = await freePort();
	await listener.listen('127.0.0.1', port);
	t.teardown(() => listener.close());
	const tick = (): void => {
		f.nowMs += 1000;
		f.wheel.run(f.nowMs);
	};

	const live = new LiveReader(port);
	t.teardown(() => live.close());
	await live.until(() => live.of('events').length === 1, 3000, 'the first messages');
	t.equal(live.of('sample').length, 1, 'one sample, taken when the listener began');
	f.udp.received += 50;
	tick();
	await live.until(() => live.of('sample').length === 2, 3000, 'the next sample');
	t.equal(live.of<{ rx: number }>('sample')[1].rx, 50, 'taken at the wheel\'s second, over its clock');
	tick();
	await live.until(() => live.of('sample').length === 3, 3000, 'and the next');

	/* A reader that stops reading: a history of 36 MB, more than the kernel's buffers take, so the backlog passes the limit. */
	const big = JSON.stringify({ t: 0, pad: 'x'.repeat(40_000) });
	const history = sampler.samples() as string[];
	history.splice(0, history.length, ...Array.from({ length: SAMPLE_HISTORY_SECS }, () => big));
	const stalled = await new Promise<http.IncomingMessage>((resolve) => {
		http.get({ host: '127.0.0.1', port, path: '/live', agent: false }, (res) => {
			res.pause();
			resolve(res);
		});
	});
	t.teardown(() => stalled.destroy());
	await waitFor(() => listener.streams === 2, 3000, 20, 'the stalled stream open');
	for (let i = 1; i < HTTP_STREAM_STALL_SECS; i++) {
		tick();
	}
	await live.until(() => live.of('sample').length === 2 + HTTP_STREAM_STALL_SECS, 3000, 'the samples meanwhile');
	t.equal(listener.streams, 2, 'not cut before 30 s');
	tick();
	await waitFor(() => listener.streams === 1, 3000, 20, 'the stalled stream cut');
	t.equal(listener.stats.streamsTooSlow, 1, 'and counted');
	tick();
	await live.until(() => live.of('sample').length === 4 + HTTP_STREAM_STALL_SECS, 3000, 'the reader that reads');
	t.pass('the reader that reads is served on');
});
