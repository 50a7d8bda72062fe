/*
 * The dashboard in a real browser: Debian's headless Chromium, driven by
 * playwright-core, opens bbal's page while bbal stands in front of real
 * mname backends, and the test asserts what a person would see -- a row
 * for every backend with the remote counts balstat reports, the queries
 * chart rising under traffic, a killed backend's row turning down within
 * 2 s and up again when it returns, the search box finding a remote's
 * backend, the page at phone width without sideways scrolling -- with no
 * console error (a CSP violation is one) and no request leaving bbal's own
 * address.  And `npm start`'s demo: the URL it prints shows its fleet live.
 * Each test saves a screenshot under test/artifacts/ (ignored by git).
 *
 * Chromium is /usr/bin/chromium (.ci/run installs Debian's package); with
 * none, the tests are skipped, except under CI, where that is a failure.
 */

import { existsSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { type Browser, chromium, type Page } from 'playwright-core';
import t, { type Test } from 'tap';
import { runBalstat, statsSnapshot } from './support/bbal.js';
import { udpQuery } from './support/dns_client.js';
import { startFleet } from './support/fleet.js';
import { freePort } from './support/ports.js';
import { projectRoot, startChild } from './support/process.js';
import { waitFor } from './support/wait.js';

const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const ARTIFACTS = path.join(projectRoot, 'test', 'artifacts');
const haveChromium = existsSync(CHROMIUM);
const skip = haveChromium || process.env.CI ? false : `no Chromium at ${CHROMIUM} (.ci/run installs Debian's chromium)`;

/* Started once for the file; each test opens its own page. */
let browser: Browser | null = null;

async function launch(): Promise<Browser> {
	if (browser === null) {
		browser = await chromium.launch({
			executablePath: CHROMIUM,
			args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
				'--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
		});
	}
	return browser;
}
t.teardown(async () => {
	await browser?.close();
});

/** A page on bbal's dashboard, with every console error and every request it makes recorded. */
async function openDashboard(t: Test, url: string, viewport = { width: 1280, height: 800 }): Promise<{
	page: Page; errors: string[]; foreign: string[];
}> {
	const context = await (await launch()).newContext({ viewport });
	t.teardown(() => context.close());
	const page = await context.newPage();
	const errors: string[] = [];
	const foreign: string[] = [];
	const origin = new URL(url).origin;
	page.on('console', (msg) => {
		if (msg.type() === 'error') {
			errors.push(msg.text());
		}
	});
	page.on('pageerror', (err) => errors.push(String(err)));
	page.on('request', (req) => {
		if (new URL(req.url()).origin !== origin) {
			foreign.push(req.url());
		}
	});
	await page.goto(url);
	await page.locator('#live[data-state="live"]').waitFor({ timeout: 5000 });
	return { page, errors, foreign };
}

async function screenshot(page: Page, name: string): Promise<void> {
	mkdirSync(ARTIFACTS, { recursive: true });
	await page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`), fullPage: true });
}

/* The remote count a backend's row shows, by socket path. */
async function rowRemotes(page: Page, id: number): Promise<number> {
	return Number(await page.locator(`#backends tbody tr[data-backend="${id}"] td[data-col="remotes"]`).textContent());
}

t.test('the dashboard shows the fleet as it is, and follows it', { skip }, async (t) => {
	t.ok(haveChromium, `Chromium at ${CHROMIUM}`);
	const httpPort = await freePort();
	const f = await startFleet(t, ['a', 'b', 'c'], ['--http', `127.0.0.1:${httpPort}`]);
	const url = `http://127.0.0.1:${httpPort}/`;
	const sources = Array.from({ length: 12 }, (_, i) => `127.0.0.${30 + i}`);
	for (const source of sources) {
		await udpQuery({ port: f.port, source, name: 'x.example', type: 'A' });
	}
	const { page, errors, foreign } = await openDashboard(t, url);

	/* A row per backend, with balstat's remote counts. */
	const snap = await statsSnapshot(f.sock);
	t.equal(await page.locator('#backends tbody tr[data-backend]').count(), 3, 'a row for every backend');
	await waitFor(async () => {
		for (const be of snap.backends) {
			if (await rowRemotes(page, be.id) !== be.remotes) {
				return false;
			}
		}
		return true;
	}, 3000, 50, 'the rows\' remote counts');
	const balstat = await runBalstat(['-S', f.sock]);
	for (const be of snap.backends) {
		t.match(balstat.stdout, new RegExp(`^\\s*${be.id}\\s.*\\s${be.remotes}\\s`, 'm'), `balstat: backend ${be.id}, ${be.remotes} remotes`);
		t.equal(await rowRemotes(page, be.id), be.remotes, `the page: backend ${be.id}, ${be.remotes} remotes`);
	}
	t.equal(await page.locator('#hdr-backends').getAttribute('data-up'), '3', 'the header: 3 up');

	/* The queries chart rises under traffic. */
	const rx = async (): Promise<number> => Number(await page.locator('#chart-queries').getAttribute('data-rx'));
	const stop = Date.now() + 2500;
	for (let i = 0; Date.now() < stop; i++) {
		await udpQuery({ port: f.port, source: sources[i % sources.length], name: 'x.example', type: 'A' });
	}
	await waitFor(async () => await rx() > 0, 3000, 50, 'the queries chart above zero');
	t.ok(await rx() > 0, `the queries chart shows ${await rx()} q/s`);
	await screenshot(page, 'dashboard');

	/* A killed backend turns down within 2 s, and up again when it returns. */
	const victim = snap.backends.find((b) => b.path === f.backends[1].path);
	const row = page.locator(`#backends tbody tr[data-backend="${victim?.id}"]`);
	t.equal(await row.getAttribute('data-up'), 'true');
	const killedAt = Date.now();
	await f.backends[1].kill();
	await row.and(page.locator('[data-up="false"]')).waitFor({ timeout: 2000 });
	t.ok(Date.now() - killedAt <= 2000, `down on the page ${Date.now() - killedAt} ms after the kill`);
	t.equal(await page.locator('#hdr-backends').getAttribute('data-down'), '1', 'the header: 1 down');
	await screenshot(page, 'dashboard-backend-down');
	await f.backends[1].restart();
	await row.and(page.locator('[data-up="true"]')).waitFor({ timeout: 10_000 });
	t.pass('up again when it returns');
	t.ok(await page.locator('#events li[data-kind="down"]').count() >= 1, 'the events list the backend going down');

	/* The search box finds a remote's backend, as balstat has it. */
	const probe = sources[5];
	const want = (await statsSnapshot(f.sock)).remotes.find((r) => r.ip === probe)?.backend;
	await page.fill('#search-ip', probe);
	await page.press('#search-ip', 'Enter');
	await page.locator('#search-result[data-found="true"]').waitFor({ timeout: 3000 });
	t.equal(await page.locator('#search-result').getAttribute('data-backend'), String(want), `${probe} is on backend ${want}`);
	await page.fill('#search-ip', '127.0.0.250');
	await page.press('#search-ip', 'Enter');
	await page.locator('#search-result[data-found="false"]').waitFor({ timeout: 3000 });
	t.pass('an address not held: not found');
	await screenshot(page, 'dashboard-search');

	t.same(errors, [], 'no console errors');
	t.same(foreign, [], 'no request leaves bbal\'s address');
});

t.test('at phone width: every part shown, nothing scrolls sideways', { skip }, async (t) => {
	const httpPort = await freePort();
	await startFleet(t, ['a', 'b'], ['--http', `127.0.0.1:${httpPort}`]);
	const { page, errors, foreign } = await openDashboard(t, `http://127.0.0.1:${httpPort}/`, { width: 390, height: 844 });
	await page.locator('#backends tbody tr[data-backend]').nth(1).waitFor({ timeout: 3000 });
	for (const id of ['#chart-queries', '#chart-backend-latency', '#backends', '#distribution', '#talkers', '#search', '#events']) {
		t.ok(await page.locator(id).isVisible(), `${id} visible`);
	}
	const widths = await page.evaluate(() => [document.documentElement.scrollWidth, window.innerWidth]);
	t.ok(widths[0] <= widths[1], `the page is ${widths[0]} px wide in a ${widths[1]} px window`);
	await screenshot(page, 'dashboard-phone');
	t.same(errors, [], 'no console errors');
	t.same(foreign, [], 'no request leaves bbal\'s address');
});

t.test('npm start: the demo prints a URL whose page shows its fleet live', { skip }, async (t) => {
	const [dnsPort, httpPort] = [await freePort(), await freePort()];
	const demo = startChild('demo', process.execPath, [path.join(projectRoot, 'demo', 'fleet.js')], {
		env: { ...process.env, BBAL_DEMO_PORT: String(dnsPort), BBAL_DEMO_HTTP_PORT: String(httpPort) },
	});
	t.teardown(() => demo.stop('SIGTERM'));
	await demo.waitOutput((out) => /demo: dashboard: http:\/\/\S+\//.test(out), 15_000, 'the dashboard URL');
	const url = /demo: dashboard: (http:\/\/\S+\/)/.exec(demo.stdout)?.[1] ?? '';
	t.equal(url, `http://127.0.0.1:${httpPort}/`, 'the URL printed');
	const { page, errors, foreign } = await openDashboard(t, url);
	await page.locator('#backends tbody tr[data-up="true"]').nth(2).waitFor({ timeout: 5000 });
	t.equal(await page.locator('#backends tbody tr[data-backend]').count(), 3, 'the three backends');
	await waitFor(async () => Number(await page.locator('#chart-queries').getAttribute('data-rx')) > 0, 5000, 100,
		'the demo\'s traffic on the chart');
	await waitFor(async () => await page.locator('#talkers tbody tr[data-ip]').count() > 0, 15_000, 100, 'the demo\'s top talkers');
	t.pass('its traffic and its talkers shown');
	await screenshot(page, 'demo');
	t.same(errors, [], 'no console errors');
	t.same(foreign, [], 'no request leaves bbal\'s address');
});
