/*
 * /metrics end to end: the built CLI with --metrics in front of real mname
 * backends.  The page must parse as Prometheus text, and its counters must
 * move with the traffic a test sends.
 */

import { existsSync } from 'node:fs';
import net from 'node:net';
import t from 'tap';
import { runBbal, startBbal } from './support/bbal.js';
import { tcpQuery, udpQuery, udpSendRaw } from './support/dns_client.js';
import { makeSocketDir, startBackend } from './support/fleet.js';
import { freePort } from './support/ports.js';
import { get, parseMetrics, value } from './support/prom_text.js';
import { waitFor } from './support/wait.js';

t.test('/metrics parses as Prometheus text and its counters move with traffic', async (t) => {
	const dir = await makeSocketDir(t);
	await startBackend(t, dir, '5301');
	await startBackend(t, dir, '5302');
	const port = await freePort();
	const metricsPort = await freePort();
	const bbal = await startBbal(t, { dir, port, args: ['--metrics', `127.0.0.1:${metricsPort}`] });
	await waitFor(() => bbal.logs.filter((r) => r.msg === 'backend socket established').length === 2, 5000);

	const first = await get(metricsPort, '/metrics');
	t.equal(first.status, 200);
	t.match(first.type, /^text\/plain/);
	const before = parseMetrics(first.body);
	t.equal(value(before, 'bbal_backend_up', { backend: '5301' }), 1, 'backend 5301 up');
	t.equal(value(before, 'bbal_backend_up', { backend: '5302' }), 1, 'backend 5302 up');
	for (const name of ['process_cpu_seconds_total', 'process_resident_memory_bytes', 'nodejs_eventloop_lag_seconds']) {
		t.ok(before.some((s) => s.name === name), `${name}: prom-client's default under its standard name`);
	}
	t.same(before.map((s) => s.name).filter((n) => /^bbal_(process|nodejs)_/.test(n)), [],
		'no default metric under the bbal_ prefix');
	t.same([...new Set(before.map((s) => s.name).filter((n) => !/^(bbal|process|nodejs)_/.test(n)))], [],
		'every metric is bbal_, process_ or nodejs_');
	const fwd0 = value(before, 'bbal_udp_forwarded_total');

	for (let n = 1; n <= 4; n++) {
		await udpQuery({ port, source: `127.0.2.${n}`, name: `m${n}.example` });
	}
	await udpSendRaw({ port, source: '127.0.2.9', bytes: Buffer.alloc(1600) });
	await tcpQuery({ port, source: '127.0.2.1', name: 'tcp.example', id: 7, halfClose: true });
	await waitFor(async () => value(parseMetrics((await get(metricsPort, '/metrics')).body), 'bbal_tcp_established_total') === 1, 2000);

	const after = parseMetrics((await get(metricsPort, '/metrics')).body);
	t.equal(value(after, 'bbal_udp_forwarded_total') - fwd0, 4, 'four UDP queries forwarded');
	t.equal(value(after, 'bbal_udp_answers_total'), 4, 'four answers sent');
	t.equal(value(after, 'bbal_udp_send_queue_full_total'), 0, 'no answer dropped for want of room');
	t.equal(value(after, 'bbal_udp_dropped_total', { reason: 'oversize' }), 1, 'the oversized datagram');
	t.equal(value(after, 'bbal_backend_udp_forwarded_total', { backend: '5301' })
		+ value(after, 'bbal_backend_udp_forwarded_total', { backend: '5302' }), 4, 'per backend, summed');
	t.equal(value(after, 'bbal_backend_remotes', { backend: '5301' })
		+ value(after, 'bbal_backend_remotes', { backend: '5302' }), 4, 'the four querying remotes are assigned');
	t.equal(value(after, 'bbal_remotes'), 4, 'the oversize sender is not held: junk makes no remote');
	t.equal(value(after, 'bbal_tcp_accepted_total'), 1);
	t.equal(value(after, 'bbal_tcp_established_total'), 1);

	t.equal((await get(metricsPort, '/nothing-here')).status, 404, 'anything else is not found');
});

t.test('heartbeat round trips are observed in the histogram', async (t) => {
	const dir = await makeSocketDir(t);
	await startBackend(t, dir, '5301');
	const metricsPort = await freePort();
	await startBbal(t, { dir, port: await freePort(), args: ['--metrics', `127.0.0.1:${metricsPort}`] });
	/* The first heartbeat goes out 5 s after the hello. */
	await waitFor(async () => {
		const s = parseMetrics((await get(metricsPort, '/metrics')).body);
		return value(s, 'bbal_backend_heartbeat_rtt_seconds_count', { backend: '5301' }) >= 1;
	}, 8000, 250, 'a heartbeat round trip');
	const s = parseMetrics((await get(metricsPort, '/metrics')).body);
	t.ok(value(s, 'bbal_backend_heartbeat_rtt_seconds_sum', { backend: '5301' }) < 1, 'well under a second on loopback');
});

t.test('--metrics that cannot be served is a one-line startup error', async (t) => {
	const dir = await makeSocketDir(t);
	const bad = await runBbal(['-s', dir, '-b', '127.0.0.1', '-p', String(await freePort()), '--metrics', 'nowhere']);
	t.equal(bad.code, 2);
	t.match(bad.stderr, /^bbal: --metrics "nowhere" is not HOST:PORT/);
	t.equal(bad.stderr.trim().split('\n').length, 1);
	const holder = net.createServer();
	const taken = await freePort();
	await new Promise<void>((resolve) => holder.listen(taken, '127.0.0.1', resolve));
	t.teardown(() => holder.close());
	const busy = await runBbal(['-s', dir, '-b', '127.0.0.1', '-p', String(await freePort()), '-S', `${dir}.m.sock`,
		'--metrics', `127.0.0.1:${taken}`]);
	t.equal(busy.code, 1);
	t.equal(busy.stderr, `bbal: cannot serve http on 127.0.0.1:${taken}: EADDRINUSE\n`);
	t.notOk(existsSync(`${dir}.m.sock`), 'the stats socket it had opened is removed on the way out');
});
