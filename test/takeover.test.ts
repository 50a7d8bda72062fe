/*
 * Issue 14 end to end: a running bbal replaced by `bbal --takeover` (and by
 * `bbal --reload`) with real mname backends behind it and real clients on
 * 127.0.9.x.  What a user sees: under steady UDP load from 20 sources not
 * one query goes unanswered, every source keeps its backend, the stats
 * socket answers at the same path from the new pid, a TCP query in flight
 * on the old process is answered and a connection opened meanwhile is
 * served, and the old process exits 0.  The dgram transport does the same.
 * The failures (test/takeover_failures.test.ts) leave the old one serving.
 */

import os from 'node:os';
import dnsPacket from 'dns-packet';
import t, { type Test } from 'tap';
import { type Bbal, remoteBackendPaths, runBbal, startBbal, statsSnapshot } from './support/bbal.js';
import { TcpDnsClient, UdpDnsClient, udpQuery } from './support/dns_client.js';
import { backendOf, encodeQuery } from './support/dns_messages.js';
import { type Fleet, startFleet } from './support/fleet.js';
import { freePort, hostAddress } from './support/ports.js';
import { get, parseMetrics, value } from './support/prom_text.js';
import type { Teardowns } from './support/process.js';
import { sleep, waitFor } from './support/wait.js';

/* Each source's queries and who answered them. */
interface SourceLoad {
	client: UdpDnsClient;
	sent: number;
	/* id -> the backend's label, once answered. */
	answered: Map<number, string>;
}

/*
 * Every source sends a query every `everyMs` (ids counting up) until stop();
 * the answers are matched by id.  1,000 queries a second from 20 sources at
 * the default, well inside what two mname backends answer.
 */
class SteadyLoad {
	readonly sources: SourceLoad[] = [];
	private running = true;
	private loops: Array<Promise<void>> = [];

	static async start(t: Teardowns, port: number, count: number, everyMs = 20): Promise<SteadyLoad> {
		const load = new SteadyLoad();
		for (let i = 0; i < count; i++) {
			const client = await UdpDnsClient.open(t, port, `127.0.9.${10 + i}`);
			const s: SourceLoad = { client, sent: 0, answered: new Map() };
			client.sock.on('message', (bytes: Buffer) => {
				const p = dnsPacket.decode(bytes);
				s.answered.set(p.id ?? -1, backendOf(p) ?? '?');
			});
			load.sources.push(s);
		}
		load.loops = load.sources.map(async (s, i) => {
			await sleep((i * everyMs) / count);
			while (load.running) {
				await s.client.send(encodeQuery(`q${s.sent}.example`, 'TXT', s.sent & 0xffff));
				s.sent++;
				await sleep(everyMs);
			}
		});
		return load;
	}

	async stop(): Promise<void> {
		this.running = false;
		await Promise.all(this.loops);
		/* The last answers, then nothing more. */
		await waitFor(() => this.lost() === 0, 2000, 20, 'the last answers').catch(() => {});
	}

	get sent(): number {
		return this.sources.reduce((n, s) => n + s.sent, 0);
	}

	lost(): number {
		return this.sources.reduce((n, s) => n + (s.sent - s.answered.size), 0);
	}

	/* Sources answered by more than one backend over the whole run. */
	moved(): string[] {
		return this.sources.filter((s) => new Set(s.answered.values()).size > 1).map((s) => s.client.source);
	}
}

/* `bbal --takeover` with the fleet's address, port and stats socket; resolves once it listens. */
function takeOver(t: Teardowns, f: Fleet, args: string[] = [], env?: NodeJS.ProcessEnv): Promise<Bbal> {
	return startBbal(t, { dir: f.dir, port: f.port, args: [...args, '--takeover'], env });
}

async function takeoverUnderLoad(t: Test, env?: NodeJS.ProcessEnv): Promise<void> {
	const f = await startFleet(t, ['a', 'b'], [], env);
	const load = await SteadyLoad.start(t, f.port, 20);
	await waitFor(() => load.sources.every((s) => s.answered.size >= 5), 5000, 20, 'every source answered');
	const before = await statsSnapshot(f.sock);

	const next = await takeOver(t, f, [], env);
	const took = await next.waitForLog((r) => r.msg === 'took over', 5000);
	const old = await f.bbal.exit;
	await sleep(300);
	await load.stop();
	const after = await statsSnapshot(f.sock);

	t.equal(old.code, 0, 'the old bbal exits 0');
	t.equal(took['old_pid'], before.pid, 'the new bbal took over from the one that was running');
	t.equal(after.pid, next.proc.pid, 'the stats socket at the same path answers from the new bbal');
	t.match(after.takeover, { fromPid: before.pid, remotes: before.remotes.length }, 'and its snapshot says whom it took over from');
	t.ok(load.sent > 1000, `steady load went on through the takeover (${load.sent} queries)`);
	t.equal(load.lost(), 0, `no query lost of ${load.sent}`);
	t.same(load.moved(), [], 'every source answered by one backend throughout');
	const was = remoteBackendPaths(before);
	const now = remoteBackendPaths(after);
	t.same([...was].filter(([ip, p]) => now.get(ip) !== p), [], 'balstat: every remote on the same backend after as before');
	t.ok(after.remotes.every((r) => r.stats.udp > 0), 'counters carried over');
}

t.test('a takeover under UDP load from 20 sources loses no query and keeps every remote on its backend', (t) =>
	takeoverUnderLoad(t));

t.test('the dgram transport takes over the same way', (t) => takeoverUnderLoad(t, { BBAL_UDP: 'dgram' }));

for (const tr of [
	{ name: 'native', env: {}, dests: ['127.0.0.5', '127.0.0.1'] },
	{ name: 'dgram', env: { BBAL_UDP: 'dgram' }, dests: ['127.0.0.1', ...(hostAddress === undefined ? [] : [hostAddress])] },
]) {
	t.test(`${tr.name}, bound to 0.0.0.0: after a takeover each answer still comes from the address queried`, async (t) => {
		const f = await startFleet(t, ['a'], ['-b', '0.0.0.0'], tr.env);
		const next = await startBbal(t, { dir: f.dir, port: f.port, args: ['-b', '0.0.0.0', '--takeover'], env: tr.env });
		const got = await next.waitForLog((r) => r.msg === 'takeover: sockets received', 5000);
		await next.waitForLog((r) => r.msg === 'took over', 5000);
		const ipv4 = Object.values(os.networkInterfaces()).flat().filter((a) => a?.family === 'IPv4').length;
		t.equal(got['sockets'], (tr.name === 'dgram' ? ipv4 : 1) + 3,
			`the UDP socket${tr.name === 'dgram' ? ' of each address' : ''}, TCP, stats and control`);
		let id = 1;
		for (const dest of tr.dests) {
			const client = await UdpDnsClient.open(t, f.port, '127.0.0.10', dest);
			await client.send(encodeQuery(`w${id}.example`, 'TXT', id));
			const d = await client.reply(id++, 2000);
			t.equal(d.from.address, dest, `a query to ${dest} is answered from ${dest}`);
		}
	});
}

t.test('TCP: a query in flight on the old bbal is answered; a connection opened meanwhile is served; none is reset', async (t) => {
	const f = await startFleet(t, ['a', 'b']);
	const early = await TcpDnsClient.connect(t, f.port, '127.0.9.40');
	/* `slow.` names are answered 400 ms late (the fixture): still in flight when the takeover is done. */
	early.send('slow.inflight.example', 'TXT', 1);
	await sleep(20);
	const next = await takeOver(t, f);
	await next.waitForLog((r) => r.msg === 'took over', 5000);
	const fresh = await TcpDnsClient.connect(t, f.port, '127.0.9.41');
	const freshAnswer = await fresh.ask('fresh.example', 'TXT', 2);
	const inflight = await early.answer(1, 3000);
	/* The old process still serves the connection it has, until its drain ends it. */
	const again = await early.ask('again.example', 'TXT', 3);
	early.sock.end();
	fresh.sock.end();
	const old = await f.bbal.exit;

	t.equal(backendOf(inflight) !== null, true, 'the query in flight at the takeover is answered');
	t.equal(backendOf(again) !== null, true, 'the old connection goes on being served while it drains');
	t.equal(backendOf(freshAnswer) !== null, true, 'a connection opened during the takeover is served');
	t.equal(early.error, null, 'the old connection is not reset');
	t.equal(fresh.error, null, 'the new connection is not reset');
	t.equal(old.code, 0, 'the old bbal exits 0 once its connection is done');
});

t.test('--metrics: the new bbal serves /metrics on the port passed over, with the remotes it took', async (t) => {
	const metricsPort = await freePort();
	const f = await startFleet(t, ['a'], ['--metrics', `127.0.0.1:${metricsPort}`]);
	await udpQuery({ port: f.port, source: '127.0.9.70', name: 'm.example' });
	const next = await takeOver(t, f, ['--metrics', `127.0.0.1:${metricsPort}`]);
	await next.waitForLog((r) => r.msg === 'took over', 5000);
	t.equal((await f.bbal.exit).code, 0, 'the old bbal exits 0');
	const m = parseMetrics((await get(metricsPort, '/metrics')).body);
	t.equal(value(m, 'bbal_remotes'), 1, 'the remote it took over is counted');
	t.equal(value(m, 'process_start_time_seconds') > 0, true, 'from a live process');
});

t.test('bbal --reload starts the successor from the running bbal, which takes over; the reload says so and exits 0', async (t) => {
	const f = await startFleet(t, ['a']);
	const oldPid = f.bbal.proc.pid;
	const r = await runBbal(['-b', '127.0.0.1', '-p', String(f.port), '-s', f.dir, '-S', f.sock, '-l', 'debug', '--reload']);
	const m = /took over from pid (\d+)/.exec(r.stdout);
	const newPid = Number(/pid (\d+) took over/.exec(r.stdout)?.[1] ?? 0);
	/* The successor is the old bbal's child, not ours: stop it ourselves. */
	t.teardown(() => {
		try {
			process.kill(newPid, 'SIGTERM');
		} catch {
			/* gone */
		}
	});
	t.equal(r.code, 0, `the reload exits 0 (${r.stderr.trim()})`);
	t.equal(Number(m?.[1]), oldPid, 'it names the bbal that was running');
	/* Not bbal.exit: that waits for the end of its stdout, which the successor inherited. */
	const proc = f.bbal.proc;
	const code = proc.exitCode ?? await new Promise((resolve) => proc.once('exit', resolve));
	t.equal(code, 0, 'the old bbal exits 0');
	const snap = await statsSnapshot(f.sock);
	t.equal(snap.pid, newPid, 'the successor serves the stats socket');
	const answer = await udpQuery({ port: f.port, source: '127.0.9.50', name: 'after.example' });
	t.equal(backendOf(answer.packet), 'a', 'and answers queries');
});

t.test('a reload whose successor cannot take over fails with its reason; the running bbal serves on', async (t) => {
	const f = await startFleet(t, ['a']);
	const r = await runBbal(['-b', '127.0.0.2', '-p', String(f.port), '-s', f.dir, '-S', f.sock, '--reload']);
	t.equal(r.code, 1, 'the reload exits 1');
	t.match(r.stderr, /^bbal: reload failed: .*127\.0\.0\.1.*127\.0\.0\.2.*-b and -p cannot change/m, 'saying why in one line');
	const answer = await udpQuery({ port: f.port, source: '127.0.9.51', name: 'still.example' });
	t.equal(backendOf(answer.packet), 'a', 'the running bbal still answers');
	t.equal(f.bbal.logs.some((l) => l.msg?.startsWith('handed over') === true), false, 'and never handed over');
});
