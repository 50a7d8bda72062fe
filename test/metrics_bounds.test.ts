/*
 * The /metrics listener's bounds, end to end: the built CLI with --metrics,
 * its descriptors counted in /proc.  A flood of connections that never send
 * a request holds at most HTTP_MAX_CONNECTIONS descriptors (each new one
 * closes the oldest idle), a scrape gets through it at once, and the idle
 * ones left are closed after HTTP_HEADERS_TIMEOUT_MS rather than Node's
 * minute; so is a request whose headers never end.  The event loop's delay
 * is on the page under prom-client's standard names.
 */

import { existsSync, readdirSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import t from 'tap';
import { HTTP_HEADERS_TIMEOUT_MS, HTTP_MAX_CONNECTIONS } from '../src/http_listener.js';
import { startBbal } from './support/bbal.js';
import { makeSocketDir } from './support/fleet.js';
import { freePort } from './support/ports.js';
import { waitFor } from './support/wait.js';

function scrape(port: number): Promise<{ status: number; body: string }> {
	return new Promise((resolve, reject) => {
		const req = http.get({ host: '127.0.0.1', port, path: '/metrics', agent: false, timeout: 2000 }, (res) => {
			let body = '';
			res.setEncoding('utf8');
			res.on('data', (d: string) => {
				body += d;
			});
			res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
		});
		req.on('timeout', () => req.destroy(new Error('scrape timed out')));
		req.on('error', reject);
	});
}

const sample = (body: string, line: RegExp): number => Number(line.exec(body)?.[1] ?? NaN);

t.test('idle connections to /metrics: at most the cap held, a scrape gets through, the rest closed within seconds', {
	skip: existsSync('/proc/self/fd') ? false : 'needs /proc to count descriptors',
}, async (t) => {
	const dir = await makeSocketDir(t);
	const metricsPort = await freePort();
	const bbal = await startBbal(t, { dir, port: await freePort(), args: ['--metrics', `127.0.0.1:${metricsPort}`] });
	await waitFor(async () => (await scrape(metricsPort)).status === 200, 5000, 50, 'metrics served');
	const pid = bbal.proc.pid as number;
	const fds = (): number => readdirSync(`/proc/${pid}/fd`).length;
	const before = fds();

	const clients: net.Socket[] = [];
	t.teardown(() => {
		for (const c of clients) {
			c.destroy();
		}
	});
	const open = (): Promise<net.Socket> => new Promise((resolve) => {
		const c = net.connect({ host: '127.0.0.1', port: metricsPort }, () => resolve(c));
		c.on('error', () => {});
		clients.push(c);
	});
	await Promise.all(Array.from({ length: 300 }, open));
	const slow = await open();
	slow.write('GET /metrics HTTP/1.1\r\nHost: bbal\r\n');
	const opened = Date.now();
	await waitFor(() => fds() - before <= HTTP_MAX_CONNECTIONS, 3000, 20, 'bbal down to the cap');
	t.pass(`301 connections opened: bbal holds ${fds() - before} descriptors for them (cap ${HTTP_MAX_CONNECTIONS})`);

	const page = await scrape(metricsPort);
	t.equal(page.status, 200, 'a scrape at the cap is served at once');
	t.ok(sample(page.body, /^bbal_metrics_connections_dropped_total\{reason="idle_evicted"\} (\d+)$/m) >= 300 - HTTP_MAX_CONNECTIONS,
		'the idle connections closed to make room are counted');
	for (const name of ['nodejs_eventloop_lag_seconds', 'nodejs_eventloop_lag_max_seconds', 'nodejs_eventloop_lag_p99_seconds']) {
		t.ok(Number.isFinite(sample(page.body, new RegExp(`^${name} ([0-9.e+-]+)$`, 'm'))), `${name} is on the page`);
	}

	await waitFor(() => fds() <= before, HTTP_HEADERS_TIMEOUT_MS + 3000, 100, 'the idle connections closed');
	const secs = (Date.now() - opened) / 1000;
	t.ok(secs <= HTTP_HEADERS_TIMEOUT_MS / 1000 + 2.5, `every one closed ${secs.toFixed(1)} s after it opened`);
	t.equal((await scrape(metricsPort)).status, 200, 'and scrapes go on');
});
