/*
 * What operators see of the packet cache, end to end: the built CLI with
 * --cache-size and --http in front of real mname backends, asked over UDP
 * from several sources (and with dig where installed).  The snapshot,
 * balstat, /metrics and the dashboard's stream all count the same hits,
 * misses, inserts and entries; a bad combination of flags is refused in
 * one line.
 */

import t from 'tap';
import { runBalstat, runBbal, statsSnapshot } from './support/bbal.js';
import { dig, needsDig } from './support/dig.js';
import { udpQuery } from './support/dns_client.js';
import { startFleet } from './support/fleet.js';
import { freePort } from './support/ports.js';
import { scrape, value } from './support/prom_text.js';
import { LiveReader } from './support/sse.js';

t.test('hits, misses, inserts and entries: the same in the snapshot, balstat, /metrics and the live stream', async (t) => {
	const httpPort = await freePort();
	const f = await startFleet(t, ['a', 'b'], ['--cache-size', '100', '--serve-stale', '60', '--http', `127.0.0.1:${httpPort}`]);
	const live = new LiveReader(httpPort);
	t.teardown(() => live.close());
	const sources = ['127.0.8.1', '127.0.8.2', '127.0.8.3'];
	for (let round = 0; round < 3; round++) {
		for (const source of sources) {
			const r = await udpQuery({ port: f.port, source, name: 'svc.views.example', type: 'A' });
			t.equal(r.packet.answers?.filter((a) => a.type === 'A').length, 4, 'four members');
		}
	}
	const snap = await statsSnapshot(f.sock);
	/* Three sources over two backends: one miss per backend, the rest hits. */
	t.match(snap.cache, { hits: 7, misses: 2, inserts: 2, entries: 2, maxEntries: 100, maxTtlSecs: 5, serveStaleSecs: 60 });
	t.ok((snap.cache?.bytes ?? 0) > 0, `${snap.cache?.bytes} bytes`);

	const balstat = await runBalstat(['-S', f.sock]);
	t.match(balstat.stdout, /^cache: 2 entries of 100 \(\d+ KiB\), hits 7, misses 2 \(hit rate 77\.8%\), inserts 2, evictions 0; stale answers 0; max TTL 5 s, serve stale 60 s$/m);

	const m = await scrape(httpPort);
	t.same([value(m, 'bbal_cache_hits_total'), value(m, 'bbal_cache_misses_total'), value(m, 'bbal_cache_inserts_total'),
		value(m, 'bbal_cache_entries')], [7, 2, 2, 2], '/metrics');
	t.equal(value(m, 'bbal_cache_uncacheable_total', { reason: 'ttl-zero' }), 0);

	await live.until(() => live.of<{ cache?: { hits: number } }>('sample').some((s) => (s.cache?.hits ?? 0) > 0), 3000,
		'a sample with the hits');
	const status = live.of<{ cache: { entries: number } | null }>('status').at(-1);
	t.equal(status?.cache?.entries, 2, 'the status: two entries');
});

t.test('dig through the cache: the same members, from the cache the second time', needsDig, async (t) => {
	const f = await startFleet(t, ['a'], ['--cache-size', '100', '--cache-max-ttl', '30']);
	const ask = (): Promise<string> => dig(['@127.0.0.1', '-p', String(f.port), '-b', '127.0.8.9', 'svc.dig.example', 'A',
		'+noall', '+answer']);
	const first = await ask();
	const second = await ask();
	const members = (out: string): string[] => out.trim().split('\n').map((l) => l.split(/\s+/))
		.filter((f) => f[3] === 'A').map((f) => f[4]).sort();
	t.same(members(second), members(first), 'the same four members');
	t.equal(members(first).length, 4);
	t.equal((await statsSnapshot(f.sock)).cache?.hits, 1, 'the second from the cache');
});

t.test('bad cache flags: one line, exit 2', async (t) => {
	for (const [args, want] of [
		[['--serve-stale', '10'], /--serve-stale needs a cache/],
		[['--cache-size', '10', '--no-answer-accounting'], /--cache-size needs answer accounting/],
		[['--cache-size', 'lots'], /--cache-size "lots" is not a whole number/],
	] as Array<[string[], RegExp]>) {
		const r = await runBbal(['-s', '/tmp', ...args]);
		t.equal(r.code, 2, args.join(' '));
		t.match(r.stderr, want);
		t.equal(r.stderr.trim().split('\n').length, 1, 'one line');
	}
});
