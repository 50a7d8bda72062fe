/*
 * BENCH CONFIGURATIONS
 *
 * The scenarios of options.ts turned into running servers and the
 * configurations measured on them, and the one scenario that is not a run
 * under load: bbal's memory with 100,000 remotes.
 *
 * ONE SET OF SERVERS.  Every server the chosen scenarios need is started
 * once, before the first measurement, and stays up for the whole measured
 * part (an idle server costs nothing), so a configuration measured in
 * round 3 runs against the same processes as in round 1.  Servers are
 * shared wherever the comparison needs it:
 *
 *   sat-stub, rate-stub   one UDP stub, measured directly and behind
 *                         dnsdist; one framed stub behind bbal.  Same
 *                         servers for the saturation and the 5,000-qps runs.
 *   mname                 one mname (A) with its own UDP port and a
 *                         balancer socket: "mname alone" and "bbal -> 1
 *                         mname" are the same process; two more mnames (B,
 *                         C) behind a second bbal.
 *   tcp-qps, tcp-conns    the same mname A, through its own TCP port and
 *                         through the same bbal.
 *   dashboard             the same framed stub behind two more bbals, one
 *                         without --http and one with it, the second
 *                         measured with 0, 1 and 10 dashboards following
 *                         its /live stream (each a plain HTTP reader in the
 *                         bench's process, opened before the run and closed
 *                         after it): what the sampler and the streams cost
 *                         a query at saturation.
 *   cache                 two Binder-like mnames (mname_server.cjs --binder),
 *                         each with its own UDP port and a balancer socket,
 *                         behind three proxies at once: a bbal without a
 *                         cache, a bbal with --cache-size 100000
 *                         --cache-max-ttl 5, and dnsdist with a packet cache
 *                         of the same size and maxTTL on their UDP ports;
 *                         and a UDP stub of its own for the direct path, the
 *                         ceiling of the load generator on this machine.
 *                         The load is `stub load` (load_generators.ts): the
 *                         cache workload from 50 sources, 127.0.0.100-149.
 *
 * The configuration ids (sat-direct, rate-bbal, mname-bbal2, tcpc-direct,
 * ...) are what the ratios and targets in report.ts look for, and what the
 * JSON is keyed by.
 *
 * THE CACHE FLAGS are checked in `bbal --help` before the cache-on bbal is
 * started: a build without them (the cache is being written) would exit on
 * an unknown flag, so that bbal then runs without them, its label says so
 * in the report, and a warning says so in the log.  Both bbals get 50
 * sources round-robin over their 2 backends (bbal assigns new remotes in
 * turn), and after every run each backend must have had a quarter of the
 * queries it passed on, or a warning says the split failed.
 *
 * TWO BACKENDS, TWO SOURCES.  bbal is sticky per source address, so one
 * dnsperf would only ever reach one of two backends.  The two-backend
 * configuration looks for two addresses in 127.0.0.2-39 that bbal put on
 * different backends (a probe from each, then the owner in bbal's stats
 * snapshot), runs one dnsperf from each at once and sums them; after every
 * measured run it checks in bbal's counts that each backend took at least a
 * quarter of the queries, and warns if not.
 *
 * 100,000 REMOTES.  After the rounds, a fresh bbal (default --max-remotes
 * 100000) is started in front of the framed stub, without a probe (it must
 * start with no remote), and its VmRSS read; then `stub spray` sends one
 * query from each of 127.1.0.0 + i, from one socket with IP_PKTINFO, at
 * most 256 outstanding.  Half a second later VmRSS and VmHWM (the peak)
 * are read, then the number of remotes from the snapshot (read after the
 * RSS: a 100,000-remote snapshot is itself tens of megabytes of JSON).
 */

import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { LiveReader } from '../test/support/sse.js';
import { sleep } from '../test/support/wait.js';
import { counters, statsSnapshot } from '../test/support/bbal.js';
import { statusKb } from '../test/support/procfs.js';
import { cacheQueries, dnsperf, mergeDnsperf, stubLoad, tcpConns } from './load_generators.js';
import type { Configuration, Sample } from './measure.js';
import { type BenchOptions, type ScenarioName, wants } from './options.js';
import { fmt, fmtInt } from './report.js';
import { bbalHasFlag, dnsdistCacheCounts, probe, type Server, startBbal, startDnsdist, startMname, startStubFramed,
	startStubUdp } from './servers.js';
import { log, type BenchSession } from './session.js';
import { STUB_BIN } from './tools.js';

/** The dashboard scenario's numbers of dashboards following /live. */
const DASHBOARDS = [0, 1, 10];
/** The fixed rate of the rate-stub runs. */
const FIXED_QPS = 5000;
/** The source addresses tried for the two-backend configuration: 127.0.0.2 up to this. */
const LAST_SOURCE_OCTET = 39;
/** A backend that takes less than this share of the two-backend load means the split failed. */
const MIN_BACKEND_SHARE = 0.25;
/** The remotes scenario: how many addresses, from which one, and how long the spray may take. */
const REMOTES = 100_000;
const FIRST_REMOTE = '127.1.0.0';
const SPRAY_TIMEOUT_MS = 60_000;
/** The cache scenario: its sources, and the caches' size in entries and longest TTL (bbal's flags, dnsdist's). */
const CACHE_SOURCES = 50;
const CACHE_FIRST_SOURCE = '127.0.0.100';
const CACHE_SIZE = 100_000;
const CACHE_MAX_TTL_SECS = 5;
/** The flags of bbal's packet cache, and the one --help must list for them to be given. */
export const BBAL_CACHE_FLAGS = ['--cache-size', String(CACHE_SIZE), '--cache-max-ttl', String(CACHE_MAX_TTL_SECS)];

/* Adds a configuration if its scenario was chosen; returns it, or null. */
type AddConfiguration = (scenario: ScenarioName, id: string, label: string, proxy: Server | null, backends: Server[],
	run: Configuration['run']) => Configuration | null;

/** The configurations of the chosen scenarios, their servers started and answering. */
export async function startConfigurations(session: BenchSession, opts: BenchOptions): Promise<Configuration[]> {
	const configs: Configuration[] = [];
	const add: AddConfiguration = (scenario, id, label, proxy, backends, run) => {
		if (!opts.scenarios.includes(scenario)) {
			return null;
		}
		const cfg: Configuration = { scenario, id, label, proxy, backends, run, samples: [] };
		configs.push(cfg);
		return cfg;
	};
	const tmp = session.tmp;
	/* The framed stub is also the backend of the remotes scenario's bbal, which runs after the rounds. */
	const stubFramed = wants(opts, 'sat-stub', 'rate-stub', 'rss', 'dashboard')
		? await startStubFramed(session, path.join(stubDir(session), '5301')) : null;
	if (stubFramed !== null && wants(opts, 'sat-stub', 'rate-stub')) {
		const [stubPort, ddPort, bbalPort, plainPort] = [await session.uniquePort(), await session.uniquePort(),
			await session.uniquePort(), await session.uniquePort()];
		const stubUdp = startStubUdp(session, stubPort);
		await probe('stub', stubPort);
		const dnsdist = await startDnsdist(session, ddPort, [stubPort]);
		const bbal = await startBbal(session, 'bbal → stub',
			{ port: bbalPort, dir: stubDir(session), backends: 1, profileName: 'bbal-stub.cpuprofile' }, opts.profile);
		const loads: Array<[ScenarioName, string, number | undefined, string]> = [
			['sat-stub', 'sat', undefined, 'saturation'], ['rate-stub', 'rate', FIXED_QPS, '5,000 qps'],
		];
		for (const [scenario, pre, qps, what] of loads) {
			add(scenario, `${pre}-direct`, `${what}: direct → stub`, null, [stubUdp],
				(s) => dnsperf(session, { port: stubPort, seconds: s, qps }));
			add(scenario, `${pre}-dnsdist`, `${what}: dnsdist → stub`, dnsdist, [stubUdp],
				(s) => dnsperf(session, { port: ddPort, seconds: s, qps }));
			add(scenario, `${pre}-bbal`, `${what}: bbal → framed stub`, bbal, [stubFramed],
				(s) => dnsperf(session, { port: bbalPort, seconds: s, qps }));
		}
		if (wants(opts, 'sat-stub')) {
			/* Issue 13's bar: the same build with answer accounting and probes off, the same stub behind it. */
			const plain = await startBbal(session, 'bbal → stub, no accounting',
				{ port: plainPort, dir: stubDir(session), backends: 1, stats: `${stubDir(session)}.plain.sock`,
					extraArgs: ['--no-answer-accounting', '--no-health-check'] }, false);
			add('sat-stub', 'sat-bbal-plain', 'saturation: bbal → framed stub, accounting and probes off', plain, [stubFramed],
				(s) => dnsperf(session, { port: plainPort, seconds: s }));
		}
	}
	if (stubFramed !== null && wants(opts, 'dashboard')) {
		await addDashboards(session, add, stubFramed);
	}
	if (wants(opts, 'mname', 'tcp-qps', 'tcp-conns')) {
		const [mUdp, mTcp, b1Port] = [await session.uniquePort(), await session.uniquePort(), await session.uniquePort()];
		const dir1 = path.join(tmp, 'm1');
		mkdirSync(dir1);
		const mA = await startMname(session, 'mname A', { balancer: path.join(dir1, '5301'), udp: mUdp, tcp: mTcp });
		const bbal1 = await startBbal(session, 'bbal → 1 mname',
			{ port: b1Port, dir: dir1, backends: 1, profileName: 'bbal-mname1.cpuprofile' }, opts.profile);
		add('mname', 'mname-udp', 'mname alone, its own UDP port', null, [mA], (s) => dnsperf(session, { port: mUdp, seconds: s }));
		add('mname', 'mname-bbal1', 'bbal → 1 mname', bbal1, [mA], (s) => dnsperf(session, { port: b1Port, seconds: s }));
		if (wants(opts, 'mname')) {
			await addTwoBackends(session, opts, add);
		}
		add('tcp-qps', 'tcpq-direct', 'TCP queries: mname directly', null, [mA],
			(s) => dnsperf(session, { port: mTcp, seconds: s, tcp: true }));
		add('tcp-qps', 'tcpq-bbal', 'TCP queries: bbal → mname', bbal1, [mA],
			(s) => dnsperf(session, { port: b1Port, seconds: s, tcp: true }));
		add('tcp-conns', 'tcpc-direct', 'TCP connections: mname directly', null, [mA],
			(s) => tcpConns(session, { port: mTcp, seconds: s }));
		add('tcp-conns', 'tcpc-bbal', 'TCP connections: bbal → mname', bbal1, [mA],
			(s) => tcpConns(session, { port: b1Port, seconds: s }));
	}
	if (wants(opts, 'cache')) {
		await addCache(session, add, opts.profile);
	}
	return configs;
}

/* The cache scenario: direct → stub, bbal without and with its cache, dnsdist with its cache, all under stub load. */
async function addCache(session: BenchSession, add: AddConfiguration, profile: boolean): Promise<void> {
	const ports: number[] = [];
	for (let i = 0; i < 7; i++) {
		ports.push(await session.uniquePort());
	}
	const [stubPort, udpA, udpB, offPort, onPort, ddPort, webPort] = ports;
	const dir = path.join(session.tmp, 'cache');
	mkdirSync(dir);
	const stub = startStubUdp(session, stubPort);
	await probe('stub (cache scenario)', stubPort);
	const mA = await startMname(session, 'mname binder A', { balancer: path.join(dir, '5301'), udp: udpA, binder: true });
	const mB = await startMname(session, 'mname binder B', { balancer: path.join(dir, '5302'), udp: udpB, binder: true });
	const mnames = [mA, mB];
	const off = await startBbal(session, 'bbal → 2 binders, no cache', { port: offPort, dir, backends: 2, stats: `${dir}.off.sock` },
		false);
	const hasCache = bbalHasFlag(BBAL_CACHE_FLAGS[0]);
	if (!hasCache) {
		log(`warning: this bbal has no ${BBAL_CACHE_FLAGS[0]}: cache-on runs WITHOUT its cache (the same as cache-off)`);
	}
	const on = await startBbal(session, 'bbal → 2 binders, cache', { port: onPort, dir, backends: 2, stats: `${dir}.on.sock`,
		extraArgs: hasCache ? BBAL_CACHE_FLAGS : [], profileName: 'bbal-cache.cpuprofile' }, profile);
	const dnsdist = await startDnsdist(session, ddPort, [udpA, udpB],
		{ size: CACHE_SIZE, maxTtlSecs: CACHE_MAX_TTL_SECS, webPort });
	const queryFile = cacheQueries(session);
	const hotFile = cacheQueries(session, 0);
	const load = (port: number, file = queryFile) => (s: number) => stubLoad(session, {
		port, seconds: s, queryFile: file, sources: CACHE_SOURCES, firstSource: CACHE_FIRST_SOURCE,
	});
	add('cache', 'cache-direct', 'direct → stub (the generator\'s ceiling)', null, [stub], load(stubPort));
	const bbalOff = add('cache', 'cache-off', 'bbal → 2 mnames, no cache', off, mnames, load(offPort));
	const bbalOn = add('cache', 'cache-on', hasCache ? `bbal → 2 mnames, ${BBAL_CACHE_FLAGS.join(' ')}`
		: `bbal → 2 mnames, **no ${BBAL_CACHE_FLAGS[0]} in this build: no cache**`, on, mnames, load(onPort));
	const dd = add('cache', 'cache-dnsdist', `dnsdist → 2 mnames, packet cache ${fmtInt(CACHE_SIZE)} entries, maxTTL `
		+ `${CACHE_MAX_TTL_SECS} s`, dnsdist, mnames, load(ddPort));
	/* The same two caches on the popular names alone: nearly every query a hit, so CPU per query is per hit. */
	add('cache', 'cache-on-hits', 'bbal → 2 mnames, the cache, popular names only (hits)', on, mnames,
		load(onPort, hotFile));
	const ddHits = add('cache', 'cache-dnsdist-hits', 'dnsdist → 2 mnames, its packet cache, popular names only (hits)', dnsdist,
		mnames, load(ddPort, hotFile));
	for (const d of [dd, ddHits]) {
		if (d !== null) {
			d.cacheCounts = () => dnsdistCacheCounts(webPort);
		}
	}

	for (const cfg of [bbalOff, bbalOn]) {
		if (cfg !== null) {
			cfg.check = (sample) => checkSplit(cfg.id, sample);
		}
	}
}

/* Warn unless each of a bbal's backends took at least MIN_BACKEND_SHARE of what it passed on in a run. */
function checkSplit(id: string, sample: Sample): void {
	const per = Object.values(sample.bbalBackendsUdp ?? {});
	const total = per.reduce((x, y) => x + y, 0);
	if (per.length !== 2 || Math.min(...per) < MIN_BACKEND_SHARE * total) {
		log(`warning: ${id} did not split the load over its backends: ${JSON.stringify(sample.bbalBackendsUdp)}`);
	}
}

/* The framed stub's socket directory, shared by the stub paths and the remotes scenario. */
function stubDir(session: BenchSession): string {
	const dir = path.join(session.tmp, 'stub');
	mkdirSync(dir, { recursive: true });
	return dir;
}

/* The dashboard scenario: bbal without --http, and with it followed by 0, 1 and 10 dashboards. */
async function addDashboards(session: BenchSession, add: AddConfiguration, stub: Server): Promise<void> {
	const [offPort, onPort, httpPort] = [await session.uniquePort(), await session.uniquePort(), await session.uniquePort()];
	const dir = stubDir(session);
	const off = await startBbal(session, 'bbal → stub, no --http',
		{ port: offPort, dir, backends: 1, stats: `${dir}.dash-off.sock` }, false);
	const on = await startBbal(session, 'bbal → stub, --http',
		{ port: onPort, dir, backends: 1, stats: `${dir}.dash-on.sock`, extraArgs: ['--http', `127.0.0.1:${httpPort}`] }, false);
	add('dashboard', 'dash-off', 'saturation: bbal → framed stub, no --http', off, [stub],
		(s) => dnsperf(session, { port: offPort, seconds: s }));
	for (const n of DASHBOARDS) {
		add('dashboard', `dash-${n}`, `saturation: bbal → framed stub, --http, ${n} dashboard${n === 1 ? '' : 's'} open`, on, [stub],
			async (s) => {
				const readers = Array.from({ length: n }, () => new LiveReader(httpPort));
				try {
					await Promise.all(readers.map((r) => r.until(() => r.of('events').length > 0, 5000, 'the dashboard\'s history')));
					return await dnsperf(session, { port: onPort, seconds: s });
				} finally {
					readers.forEach((r) => r.close());
				}
			});
	}
}

/* bbal → 2 mnames, measured with one dnsperf from each of two sources bbal put on different backends. */
async function addTwoBackends(session: BenchSession, opts: BenchOptions, add: AddConfiguration): Promise<void> {
	const port = await session.uniquePort();
	const dir = path.join(session.tmp, 'm2');
	mkdirSync(dir);
	const mB = await startMname(session, 'mname B', { balancer: path.join(dir, '5301') });
	const mC = await startMname(session, 'mname C', { balancer: path.join(dir, '5302') });
	const bbal = await startBbal(session, 'bbal → 2 mnames', { port, dir, backends: 2 }, opts.profile);
	const statsSocket = bbal.statsSocket as string;
	const chosen = new Map<number, string>();
	for (let i = 2; i <= LAST_SOURCE_OCTET && chosen.size < 2; i++) {
		const src = `127.0.0.${i}`;
		await probe('bbal → 2 mnames', port, src);
		const snap = await statsSnapshot(statsSocket);
		const be = snap.remotes.find((r) => r.ip === src)?.backend;
		if (be !== undefined && !chosen.has(be)) {
			chosen.set(be, src);
		}
	}
	if (chosen.size < 2) {
		throw new Error('could not find two source addresses that bbal sends to different backends');
	}
	const srcs = [...chosen.values()];
	log(`bbal → 2 mnames: ${[...chosen].map(([be, s]) => `${s} → backend ${be}`).join(', ')}`);
	const cfg = add('mname', 'mname-bbal2', `bbal → 2 mnames (dnsperf from ${srcs.join(' and ')}, summed)`, bbal, [mB, mC],
		async (s) => mergeDnsperf(await Promise.all(srcs.map((src) => dnsperf(session, { port, seconds: s, src })))));
	if (cfg !== null) {
		cfg.check = (sample) => checkSplit(cfg.id, sample);
	}
}

export interface RemotesResult {
	count: number;
	sent: number;
	answered: number;
	sprayMs: number;
	rssBeforeKb: number | null;
	rssAfterKb: number | null;
	hwmKb: number | null;
	remotesHeld: number;
	remotesEvicted: number;
	maxRemotes: number;
	udp: Record<string, number>;
}

/** The 100,000-remotes scenario: a fresh bbal's RSS before and after one query from each address. */
export async function measureRemotes(session: BenchSession): Promise<RemotesResult> {
	const port = await session.uniquePort();
	const bbal = await startBbal(session, 'bbal (100k remotes)', {
		port, dir: stubDir(session), stats: path.join(session.tmp, 'rss.stats.sock'), backends: 1, noProbe: true,
	}, false);
	await sleep(300);
	const rssBeforeKb = statusKb(bbal.child.pid)['VmRSS'] ?? null;
	log(`sending one query from each of ${fmtInt(REMOTES)} addresses ${FIRST_REMOTE} + i`);
	const spray = session.children.start('stub spray', STUB_BIN, ['spray', String(port), String(REMOTES), FIRST_REMOTE],
		{ expectExit: true });
	await spray.waitExit(SPRAY_TIMEOUT_MS);
	const m = /sent (\d+) answered (\d+) ms (\d+)/.exec(spray.output);
	if (!m) {
		throw new Error(`spray failed: ${spray.output}`);
	}
	await sleep(500);
	bbal.child.alive();
	const status = statusKb(bbal.child.pid);
	const snap = await statsSnapshot(bbal.statsSocket as string);
	const rss: RemotesResult = {
		count: REMOTES, sent: Number(m[1]), answered: Number(m[2]), sprayMs: Number(m[3]),
		rssBeforeKb, rssAfterKb: status['VmRSS'] ?? null, hwmKb: status['VmHWM'] ?? null, remotesHeld: snap.remotes.length,
		remotesEvicted: snap.remotesEvicted, maxRemotes: snap.maxRemotes, udp: counters(snap.udp),
	};
	log(`RSS ${fmt((rss.rssBeforeKb ?? NaN) / 1024)} MB before, ${fmt((rss.rssAfterKb ?? NaN) / 1024)} MB after; `
		+ `${fmtInt(rss.remotesHeld)} remotes held; `
		+ `${fmtInt(rss.answered)}/${fmtInt(rss.sent)} answered in ${fmt(rss.sprayMs / 1000, 2)} s`);
	await bbal.child.stop();
	return rss;
}
