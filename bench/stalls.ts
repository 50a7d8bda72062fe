/*
 * STALLS: the figures behind bbal's bounds on bulk work
 *
 *   node dist/bench/stalls.js expiry    [N]   event-loop delay while N idle remotes expire (100,000)
 *   node dist/bench/stalls.js rebalance [N]   the same while N remotes move off one backend (50,000)
 *   node dist/bench/stalls.js stats           a UDP probe's round trip while balstat reads 100,000
 *                                             remotes; RSS with 20 stats connections that never read
 *   node dist/bench/stalls.js metrics         descriptors held by 1,000 idle connections to /metrics
 *   node dist/bench/stalls.js takeover        a UDP probe's round trip while a new bbal takes over
 *                                             100,000 remotes; how long it takes, RSS of both
 *   node dist/bench/stalls.js flood [BBAL_JS] a healthy mname's answer times through bbal while
 *                                             another backend floods OUTBOUND_UDP (BBAL_JS: another
 *                                             build's bin/bbal.js, for a before figure)
 *   node dist/bench/stalls.js tcp-lockout [ROOT] [-- FLAGS]
 *                                             512 connections from 127.0.0.2 trickling a byte of a
 *                                             query every 4 s; dig +tcp from 127.0.0.3 every 4 s
 *   node dist/bench/stalls.js tcp-unread [ROOT] [-- FLAGS]
 *                                             200 clients (127.0.2.1-200) pipelining 300 queries for a
 *                                             big answer each and never reading: the mname's RSS and CPU over 18 s
 *
 * Not part of `npm run bench` or `npm test`: a small driver that reproduces
 * the figures of the hardening issue (remote expiry and rebalance done in one
 * call, the stats socket serialising everything at once, idle HTTP
 * connections to /metrics held for a minute), so a change to any of those
 * bounds can be measured the same way again.
 *
 * expiry and rebalance build the remotes table in this process, over
 * backends on fake sockets, with a clock the driver steps: each step is one
 * tick of the wheel (a second of bbal's time), and the driver lets 10 ms of
 * real time pass between ticks, so the event loop runs between them as it
 * would between bbal's ticks.  Log lines go to /dev/null through pino, as
 * they would to a file.  The figure is the event loop's largest delay
 * (perf_hooks.monitorEventLoopDelay, 1 ms resolution) from the job's start
 * until the pass is over, beside the same loop's with nothing to do just
 * before (what the machine itself adds), and the longest tick in wall and
 * CPU time (all threads: V8's compiler and GC helpers count).
 *
 * tcp-lockout and tcp-unread run the built CLI of the bbal checkout at ROOT
 * (this one by default, so an older checkout's can be measured the same
 * way; FLAGS are passed on to it) in front of one real mname, the tests'
 * fixture (test/fixtures/mname_backend.cjs of this checkout: `huge.` names
 * get 64 TXT records, about 16 KB over TCP, so that 300 answers are more than
 * the kernel's socket buffers hold).  Each runs 15-20 s.
 *
 * stats, metrics and takeover run the built CLI (bin/bbal.js, with the launcher's
 * --max-semi-space-size=4) in front of the
 * benchmark's C stub (bench/stub.c, built with gcc into a temporary
 * directory), on 127.0.0.1, with the stub's spray filling the table from
 * 100,000 addresses of 127.1/16 and 127.2/16.  Every address used is on
 * loopback.
 *
 * flood runs the built CLI (or the one named) in front of a real mname
 * (bench/mname_server.cjs) at 5301, probes it from 127.0.0.2 for 2 s, then
 * starts the chaos suite's fake backend at 5302 and tells it to flood:
 * OUTBOUND_UDP frames of 28 bytes to 127.0.0.9:9, as fast as bbal reads
 * them.  The same probe runs for 6 s of flood (answers awaited 1.2 s more);
 * bbal's CPU over that time, the frames the flooder wrote and bbal's
 * answers sent are printed beside the probe's quantiles.  About 13 s.
 */

import { type ChildProcess, execFile, execFileSync, spawn } from 'node:child_process';
import dgram from 'node:dgram';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import dnsPacket from 'dns-packet';
import pino from 'pino';
import { Remotes } from '../src/remotes.js';
import { TimeoutWheel } from '../src/timeouts.js';
import { fakeRegistry } from '../test/support/fake_socket.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const mb = (bytes: number): string => (bytes / 1048576).toFixed(1);

/* ---- in-process: expiry and rebalance ---- */

function table(maxRemotes: number) {
	let now = 1_000_000_000;
	let logBytes = 0;
	const wheel = new TimeoutWheel(() => now);
	const sink = pino.destination({ dest: '/dev/null', sync: true });
	const log = pino({ level: 'info' }, {
		write(s: string) {
			logBytes += Buffer.byteLength(s);
			sink.write(s);
		},
	});
	const { backends, up } = fakeRegistry(log, wheel);
	const remotes = new Remotes({ log, backends, wheel, maxRemotes });
	return {
		wheel, backends, remotes, up,
		logBytes: () => logBytes,
		/* One tick of bbal's time: `ms` on the fake clock (1 ms keeps the fake backends' heartbeats from falling due). */
		tick(ms: number): void {
			now += ms;
			wheel.run(now);
		},
	};
}

interface JobFigures {
	/** The event loop's largest delay while the job ran, and its 99th percentile. */
	maxMs: number;
	p99Ms: number;
	/** The longest tick (the job's start, or one wheel.run()), in wall and in CPU time. */
	tickMaxMs: number;
	tickCpuMaxMs: number;
	ticks: number;
	wallMs: number;
	/** The same loop with nothing to do, just before: what the machine itself adds. */
	idleMaxMs: number;
}

/*
 * In bbal the table was filled minutes before it expires, and V8 has long
 * moved it out of the young generation; here it was filled a moment ago,
 * and the first scavenge during the measurement would copy all of it.  A
 * full collection before measuring puts the heap where bbal's would be.
 */
setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

/* Run `start` (the job), then a tick every 10 ms of real time until `done`; the loop's delay meanwhile. */
async function measureJob(t: ReturnType<typeof table>, tickMs: number, start: () => void,
	done: () => boolean): Promise<JobFigures> {
	const loop = async (first: () => void, until: () => boolean) => {
		const h = monitorEventLoopDelay({ resolution: 1 });
		h.enable();
		/* The histogram counts from its second sample: let it take a few first. */
		await sleep(50);
		const t0 = performance.now();
		let tickMaxMs = 0;
		let tickCpuMaxMs = 0;
		const timed = (fn: () => void): void => {
			const w0 = performance.now();
			const c0 = process.cpuUsage();
			fn();
			const c = process.cpuUsage(c0);
			tickMaxMs = Math.max(tickMaxMs, performance.now() - w0);
			tickCpuMaxMs = Math.max(tickCpuMaxMs, (c.user + c.system) / 1000);
		};
		timed(first);
		let ticks = 1;
		while (!until() && ticks < 10_000) {
			await sleep(10);
			timed(() => t.tick(tickMs));
			ticks++;
		}
		const wallMs = performance.now() - t0;
		await sleep(20);
		h.disable();
		return { maxMs: h.max / 1e6, p99Ms: h.percentile(99) / 1e6, tickMaxMs, tickCpuMaxMs, ticks, wallMs };
	};
	gc();
	gc();
	let idleTicks = 0;
	const idle = await loop(() => {}, () => ++idleTicks >= 50);
	const r = await loop(start, done);
	return { ...r, idleMaxMs: idle.maxMs };
}

const describe = (r: JobFigures): string => `event-loop delay max ${r.maxMs.toFixed(1)} ms, p99 ${r.p99Ms.toFixed(1)} ms `
	+ `(idle loop before: max ${r.idleMaxMs.toFixed(1)} ms); longest tick ${r.tickMaxMs.toFixed(1)} ms wall, `
	+ `${r.tickCpuMaxMs.toFixed(1)} ms CPU; ${r.ticks} tick(s), ${r.wallMs.toFixed(0)} ms wall`;

async function expiry(n: number): Promise<void> {
	const t = table(n);
	t.up('5301');
	t.up('5302');
	for (let i = 0; i < n; i++) {
		t.remotes.lookup(0x0b000000 + i).chooseBackend();
	}
	/*
	 * bbal's expiry job walks the whole table every 30 s, idle or not, so
	 * the walk is compiled by the time a burst expires: one pass first that
	 * expires nothing, as the job would have run it.
	 */
	t.tick(200_000);
	t.remotes.expire();
	while (t.remotes.size > 0 && 'expiring' in t.remotes && t.remotes.expiring === true) {
		t.tick(1);
	}
	t.tick(101_000);
	const logBefore = t.logBytes();
	/* As the balancer's expiry job does it. */
	const r = await measureJob(t, 1000, () => t.remotes.expire(), () => t.remotes.size === 0);
	console.log(`expiry: ${n} remotes expired; ${describe(r)}; log ${mb(t.logBytes() - logBefore)} MB`);
}

async function rebalance(n: number): Promise<void> {
	const t = table(n + 10);
	const a = t.up('5301');
	for (let i = 0; i < n + 2; i++) {
		t.remotes.lookup(0x0b000000 + i).chooseBackend();
	}
	t.up('5302');
	const plan = t.backends.rebalancePlan();
	if (plan === null) {
		throw new Error('no rebalance plan');
	}
	const logBefore = t.logBytes();
	const target = a.remoteCount - plan.count;
	const r = await measureJob(t, 1, () => t.remotes.rebalance(plan.backend, plan.count), () => a.remoteCount <= target);
	console.log(`rebalance: ${plan.count} remotes moved of ${n + 2}; ${describe(r)}; log ${mb(t.logBytes() - logBefore)} MB`);
}

/* ---- the CLI: stats socket and metrics ---- */

interface Fleet {
	dir: string;
	port: number;
	metricsPort: number;
	sock: string;
	bbal: ChildProcess;
	stub: ChildProcess;
}

function freePort(): Promise<number> {
	return new Promise((resolve) => {
		const s = net.createServer().listen(0, '127.0.0.1', () => {
			const { port } = s.address() as net.AddressInfo;
			s.close(() => resolve(port));
		});
	});
}

async function startFleet(): Promise<Fleet> {
	const dir = mkdtempSync(path.join(tmpdir(), 'bbal-stalls-'));
	const stubBin = path.join(dir, 'stub');
	execFileSync('gcc', ['-O2', '-o', stubBin, path.join(ROOT, 'bench', 'stub.c')]);
	const sockets = path.join(dir, 'sockets');
	execFileSync('mkdir', [sockets]);
	const stub = spawn(stubBin, ['framed', path.join(sockets, '5301')], { stdio: 'ignore' });
	for (let i = 0; i < 100 && !readdirSync(sockets).includes('5301'); i++) {
		await sleep(20);
	}
	const port = await freePort();
	const metricsPort = await freePort();
	const sock = path.join(dir, 'stats.sock');
	/* With the V8 flag bin/bbal (the launcher) gives it. */
	const bbal = spawn(process.execPath, ['--max-semi-space-size=4', path.join(ROOT, 'bin', 'bbal.js'), '-b', '127.0.0.1', '-p', String(port),
		'-s', sockets, '-S', sock, '--metrics', `127.0.0.1:${metricsPort}`, '--max-remotes', '200000'], { stdio: 'ignore' });
	for (let i = 0; i < 200; i++) {
		await sleep(25);
		if (await scrape(metricsPort).then(() => true, () => false)) {
			break;
		}
	}
	return { dir, port, metricsPort, sock, bbal, stub };
}

function stopFleet(f: Fleet): void {
	f.bbal.kill('SIGKILL');
	f.stub.kill('SIGTERM');
	rmSync(f.dir, { recursive: true, force: true });
}

function scrape(port: number, timeoutMs = 2000): Promise<number> {
	return new Promise((resolve, reject) => {
		const req = http.get({ host: '127.0.0.1', port, path: '/metrics', agent: false, timeout: timeoutMs }, (res) => {
			res.resume();
			res.on('end', () => resolve(res.statusCode ?? 0));
		});
		req.on('timeout', () => req.destroy(new Error('timeout')));
		req.on('error', reject);
	});
}

function rssMb(pid: number): number {
	const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
	return Number(m?.[1] ?? NaN) / 1024;
}

/* User and system CPU seconds a process has used (clock ticks of 1/100 s). */
function cpuSecs(pid: number): number {
	const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /, '').split(' ');
	return (Number(fields[11]) + Number(fields[12])) / 100;
}

function fds(pid: number): number {
	return readdirSync(`/proc/${pid}/fd`).length;
}

function spray(f: Fleet, count: number, first: string): Promise<string> {
	return new Promise((resolve, reject) => {
		execFile(path.join(f.dir, 'stub'), ['spray', String(f.port), String(count), first], (err, stdout) =>
			(err ? reject(new Error(err.message)) : resolve(stdout.trim())));
	});
}

/* A query every 5 ms from 127.0.0.2 until stop(); each answer's round trip, and how many got none. */
function probe(port: number): { answered: () => number; stop: (graceMs?: number) => Promise<number[] & { lost?: number }> } {
	const rtts: number[] = [];
	const sent = new Map<number, number>();
	const s = dgram.createSocket('udp4');
	s.bind(0, '127.0.0.2');
	s.on('message', (msg) => {
		const id = msg.readUInt16BE(0);
		const t0 = sent.get(id);
		if (t0 !== undefined) {
			rtts.push(performance.now() - t0);
			sent.delete(id);
		}
	});
	let id = 0;
	const timer = setInterval(() => {
		id = (id + 1) & 0xffff;
		sent.set(id, performance.now());
		s.send(dnsPacket.encode({ type: 'query', id, flags: dnsPacket.RECURSION_DESIRED,
			questions: [{ type: 'A', name: 'probe.example' }] }), port, '127.0.0.1');
	}, 5);
	return {
		answered: () => rtts.length,
		stop: async (graceMs = 300) => {
			clearInterval(timer);
			await sleep(graceMs);
			s.close();
			return Object.assign(rtts, { lost: sent.size });
		},
	};
}

const quantile = (xs: number[], q: number): number => {
	const s = [...xs].sort((a, b) => a - b);
	return s[Math.min(s.length - 1, Math.floor(q * s.length))] ?? NaN;
};

/* 100,000 remotes from 127.1/16 and 127.2/16, then the probe's round trips with nothing else going on. */
async function fillTable(f: Fleet): Promise<number[] & { lost?: number }> {
	console.log(`spray: ${await spray(f, 50_000, '127.1.0.0')}; ${await spray(f, 50_000, '127.2.0.0')}`);
	await sleep(500);
	const base = probe(f.port);
	await sleep(2000);
	return base.stop();
}

async function stats(): Promise<void> {
	const f = await startFleet();
	try {
		const quiet = await fillTable(f);
		const during = probe(f.port);
		const runs: Array<{ out: string; ms: number }> = [];
		for (let i = 0; i < 3; i++) {
			const t0 = performance.now();
			const out = await new Promise<string>((resolve, reject) => {
				execFile(process.execPath, [path.join(ROOT, 'bin', 'balstat.js'), '--json', '-S', f.sock],
					{ maxBuffer: 256 * 1048576 }, (err, stdout) => (err ? reject(new Error(err.message)) : resolve(stdout)));
			});
			runs.push({ out, ms: performance.now() - t0 });
		}
		const busy = await during.stop();
		/* Parsed only now: 20 MB of JSON.parse here would hold up the probe's own loop. */
		console.log(`balstat --json x3: ${runs.map(({ out, ms }) =>
			`${(JSON.parse(out) as { remotes: unknown[] }).remotes.length} remotes, ${mb(out.length)} MB in ${ms.toFixed(0)} ms`).join('; ')}`);
		console.log(`UDP probe round trip, quiet: p50 ${quantile(quiet, 0.5).toFixed(2)} ms, max ${Math.max(...quiet).toFixed(2)} ms `
			+ `(${quiet.length} answered, ${quiet.lost} lost); while balstat reads: p50 ${quantile(busy, 0.5).toFixed(2)} ms, `
			+ `p99 ${quantile(busy, 0.99).toFixed(2)} ms, max ${Math.max(...busy).toFixed(2)} ms (${busy.length} answered, ${busy.lost} lost)`);

		const pid = f.bbal.pid as number;
		const rss0 = rssMb(pid);
		const idle: net.Socket[] = [];
		for (let i = 0; i < 20; i++) {
			const c = net.createConnection({ path: f.sock });
			c.on('error', () => {});
			c.pause();
			idle.push(c);
		}
		let peak = rss0;
		for (let i = 0; i < 30; i++) {
			await sleep(100);
			peak = Math.max(peak, rssMb(pid));
		}
		console.log(`20 stats connections that never read: RSS ${rss0.toFixed(1)} MB before, peak ${peak.toFixed(1)} MB over 3 s`);
		await sleep(9000);
		for (const c of idle) {
			c.destroy();
		}
		await sleep(200);
		const snap = await new Promise<string>((resolve, reject) => {
			execFile(process.execPath, [path.join(ROOT, 'bin', 'balstat.js'), '--json', '-S', f.sock],
				{ maxBuffer: 256 * 1048576 }, (err, stdout) => (err ? reject(new Error(err.message)) : resolve(stdout)));
		});
		const ss = (JSON.parse(snap) as { statsSocket?: unknown }).statsSocket;
		console.log(`12 s later, bbal's stats socket counts: ${JSON.stringify(ss ?? 'none (no statsSocket field)')}; `
			+ `RSS ${rssMb(pid).toFixed(1)} MB`);
	} finally {
		stopFleet(f);
	}
}

/* The bbal that takes over from f's, with the same flags; resolves with it once it logs "took over" (or rejects). */
function takeOver(f: Fleet): Promise<{ proc: ChildProcess; line: Record<string, unknown> }> {
	const proc = spawn(process.execPath, ['--max-semi-space-size=4', path.join(ROOT, 'bin', 'bbal.js'), '-b', '127.0.0.1',
		'-p', String(f.port), '-s', path.join(f.dir, 'sockets'), '-S', f.sock, '--metrics', `127.0.0.1:${f.metricsPort}`,
		'--max-remotes', '200000', '--takeover'], { stdio: ['ignore', 'pipe', 'inherit'] });
	return new Promise((resolve, reject) => {
		let partial = '';
		proc.stdout?.setEncoding('utf8').on('data', (chunk: string) => {
			const lines = (partial + chunk).split('\n');
			partial = lines.pop() ?? '';
			for (const l of lines) {
				if (l.includes('"took over"')) {
					resolve({ proc, line: JSON.parse(l) as Record<string, unknown> });
				}
			}
		});
		proc.once('exit', (code) => reject(new Error(`the new bbal exited (${String(code)}) before taking over`)));
	});
}

async function takeover(): Promise<void> {
	const f = await startFleet();
	let next: ChildProcess | null = null;
	try {
		const quiet = await fillTable(f);
		const oldPid = f.bbal.pid as number;
		const oldRss = rssMb(oldPid);
		const oldExit = new Promise<number | null>((resolve) => f.bbal.once('exit', (code) => resolve(code)));
		const during = probe(f.port);
		await sleep(500);
		const t0 = performance.now();
		const took = await takeOver(f);
		next = took.proc;
		const tookMs = performance.now() - t0;
		const code = await oldExit;
		const exitMs = performance.now() - t0;
		await sleep(1500);
		const busy = await during.stop();
		const newRss = rssMb(next.pid as number);
		console.log(`takeover of ${String(took.line['remotes'])} remotes (${String(took.line['remotes_changed'])} seen meanwhile): `
			+ `"took over" ${tookMs.toFixed(0)} ms after the new bbal was started, old bbal exited ${String(code)} after `
			+ `${exitMs.toFixed(0)} ms`);
		console.log(`UDP probe round trip, quiet: p50 ${quantile(quiet, 0.5).toFixed(2)} ms, max ${Math.max(...quiet).toFixed(2)} ms `
			+ `(${quiet.length} answered, ${quiet.lost} lost); across the takeover: p50 ${quantile(busy, 0.5).toFixed(2)} ms, `
			+ `p99 ${quantile(busy, 0.99).toFixed(2)} ms, max ${Math.max(...busy).toFixed(2)} ms (${busy.length} answered, ${busy.lost} lost)`);
		console.log(`RSS: old bbal ${oldRss.toFixed(1)} MB before, new bbal ${newRss.toFixed(1)} MB after`);
	} finally {
		next?.kill('SIGKILL');
		stopFleet(f);
	}
}

async function metrics(): Promise<void> {
	const f = await startFleet();
	try {
		const pid = f.bbal.pid as number;
		const before = fds(pid);
		const conns: net.Socket[] = [];
		for (let i = 0; i < 1000; i++) {
			const c = net.createConnection({ host: '127.0.0.1', port: f.metricsPort });
			c.on('error', () => {});
			conns.push(c);
		}
		const t0 = performance.now();
		const row: string[] = [];
		for (const at of [0.5, 2, 5, 10]) {
			await sleep(at * 1000 - (performance.now() - t0));
			const status = await scrape(f.metricsPort).then(String, (err: Error) => err.message);
			row.push(`${at} s: ${fds(pid) - before} fds, scrape ${status}`);
		}
		console.log(`1,000 idle connections to /metrics (bbal had ${before} fds before): ${row.join('; ')}`);
		for (const c of conns) {
			c.destroy();
		}
	} finally {
		stopFleet(f);
	}
}

/* ---- a backend that floods ---- */

function cpuTicks(pid: number): number {
	/* utime and stime, fields 14 and 15, after the command's closing parenthesis. */
	const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
	return Number(f[11]) + Number(f[12]);
}

function lineFrom(child: ChildProcess, pattern: RegExp, timeoutMs: number): Promise<string> {
	return new Promise((resolve, reject) => {
		let out = '';
		const timer = setTimeout(() => reject(new Error(`no ${String(pattern)} within ${timeoutMs} ms: ${out}`)), timeoutMs);
		const onData = (d: Buffer): void => {
			out += d.toString();
			const m = pattern.exec(out);
			if (m !== null) {
				clearTimeout(timer);
				child.stdout?.off('data', onData);
				resolve(m[0]);
			}
		};
		child.stdout?.on('data', onData);
	});
}

async function flood(bbalJs: string): Promise<void> {
	const dir = mkdtempSync(path.join(tmpdir(), 'bbal-flood-'));
	const sockets = path.join(dir, 'sockets');
	execFileSync('mkdir', [sockets]);
	const children: ChildProcess[] = [];
	try {
		const mname = spawn(process.execPath, [path.join(ROOT, 'bench', 'mname_server.cjs'), '--balancer', path.join(sockets, '5301')],
			{ stdio: ['ignore', 'pipe', 'inherit'] });
		children.push(mname);
		await lineFrom(mname, /ready/, 10_000);
		const port = await freePort();
		const sock = path.join(dir, 'stats.sock');
		const bbal = spawn(process.execPath, ['--max-semi-space-size=4', bbalJs, '-b', '127.0.0.1', '-p', String(port),
			'-s', sockets, '-S', sock, '-l', 'warn'], { stdio: 'ignore' });
		children.push(bbal);
		const pid = bbal.pid as number;
		const first = probe(port);
		for (let i = 0; i < 100 && first.answered() === 0; i++) {
			await sleep(20);
		}
		await first.stop();
		const quiet = probe(port);
		await sleep(2000);
		const q = await quiet.stop();

		const flooder = spawn(process.execPath, [path.join(ROOT, 'dist', 'test', 'chaos', 'fake_backend.js'),
			path.join(sockets, '5302'), 'flood'], { stdio: ['pipe', 'pipe', 'inherit'] });
		children.push(flooder);
		await lineFrom(flooder, /ready/, 10_000);
		const flooded = async (): Promise<number> => {
			const counted = lineFrom(flooder, /flooded \d+/, 2000);
			flooder.stdin?.write('count\n');
			return Number((await counted).split(' ')[1]);
		};
		flooder.stdin?.write('flood\n');
		await sleep(500);
		const during = probe(port);
		const cpu0 = cpuTicks(pid);
		const frames0 = await flooded();
		const t0 = performance.now();
		await sleep(6000);
		const secs = (performance.now() - t0) / 1000;
		const cpuPct = (cpuTicks(pid) - cpu0) / secs;
		const frames = await flooded() - frames0;
		const f = await during.stop(1200);
		flooder.stdin?.write('calm\n');
		const snap = await new Promise<string>((resolve, reject) => {
			execFile(process.execPath, [path.join(ROOT, 'bin', 'balstat.js'), '--json', '-S', sock],
				{ maxBuffer: 16 * 1048576 }, (err, stdout) => (err ? reject(new Error(err.message)) : resolve(stdout)));
		});
		type Snap = { udp: { sent: number }; backends: Array<{ id: number; ok: boolean; stats: Record<string, number> }> };
		const s = JSON.parse(snap) as Snap;
		const fig = (xs: number[] & { lost?: number }): string => `p50 ${quantile(xs, 0.5).toFixed(2)} ms, `
			+ `p99 ${quantile(xs, 0.99).toFixed(2)} ms, max ${Math.max(...xs).toFixed(2)} ms (${xs.length} answered, ${xs.lost} lost)`;
		console.log(`bbal: ${bbalJs}`);
		console.log(`probe to mname 5301, quiet: ${fig(q)}`);
		console.log(`probe to mname 5301, while 5302 floods: ${fig(f)}`);
		console.log(`while flooded: bbal CPU ${cpuPct.toFixed(0)}% of a core; the flooder wrote ${frames} frames in `
			+ `${secs.toFixed(1)} s (${(frames / secs / 1000).toFixed(0)}k/s); bbal sent ${s.udp.sent} datagrams in all; backends ${s.backends.map((b) =>
				`${b.id} ${b.ok ? 'ok' : 'not ok'} faults ${b.stats.faults} throttled ${b.stats.throttled ?? '-'}`).join(', ')}`);
	} finally {
		for (const c of children.reverse()) {
			c.kill('SIGKILL');
		}
		rmSync(dir, { recursive: true, force: true });
	}
}

/* ---- the CLI over TCP: lockout and unread answers ---- */

interface TcpFleet {
	dir: string;
	port: number;
	bbal: ChildProcess;
	mname: ChildProcess;
}

async function startTcpFleet(root: string, flags: string[]): Promise<TcpFleet> {
	const dir = mkdtempSync('/tmp/bbal-stalls-');
	const sockets = path.join(dir, 'sockets');
	execFileSync('mkdir', [sockets]);
	const mname = spawn(process.execPath, [path.join(ROOT, 'test', 'fixtures', 'mname_backend.cjs'),
		path.join(sockets, '5301'), '5301'], { stdio: 'ignore' });
	for (let i = 0; i < 200 && !readdirSync(sockets).includes('5301'); i++) {
		await sleep(20);
	}
	const port = await freePort();
	const bbal = spawn(process.execPath, ['--max-semi-space-size=4', path.join(root, 'bin', 'bbal.js'), '-b', '127.0.0.1',
		'-p', String(port), '-s', sockets, '-S', path.join(dir, 'stats.sock'), '-l', 'error', ...flags], { stdio: 'ignore' });
	/* Ready once a TCP query is answered. */
	for (let i = 0; i < 200; i++) {
		await sleep(25);
		if ((await digTcp(port, '127.0.0.9', 'ready.example')).ok) {
			break;
		}
	}
	return { dir, port, bbal, mname };
}

function stopTcpFleet(f: TcpFleet): void {
	f.bbal.kill('SIGKILL');
	f.mname.kill('SIGKILL');
	rmSync(f.dir, { recursive: true, force: true });
}

/* One dig +tcp from `source`, one try, 1-s timeout: whether it got an answer, how long it took, what dig said. */
function digTcp(port: number, source: string, name: string): Promise<{ ok: boolean; ms: number; said: string }> {
	const t0 = performance.now();
	return new Promise((resolve) => {
		execFile('dig', ['+tcp', '+tries=1', '+time=1', '-b', source, '-p', String(port), '@127.0.0.1', name, 'A'],
			(err, stdout) => {
				const ms = performance.now() - t0;
				const status = /status: (\w+)/.exec(stdout)?.[1];
				const said = status ?? (stdout.split('\n').find((l) => l.includes(';;') && !l.startsWith(';; global')) ?? err?.message ?? '?').trim();
				resolve({ ok: status === 'NOERROR', ms, said });
			});
	});
}

function tcpClient(port: number, source: string): net.Socket {
	const c = net.createConnection({ host: '127.0.0.1', port, localAddress: source });
	c.on('error', () => {});
	return c;
}

async function tcpLockout(root: string, flags: string[]): Promise<void> {
	const f = await startTcpFleet(root, flags);
	try {
		const q = dnsPacket.encode({ type: 'query', id: 7, flags: dnsPacket.RECURSION_DESIRED,
			questions: [{ type: 'A', name: 'trickle.example' }] });
		const stream = Buffer.concat([Buffer.from([q.length >> 8, q.length & 255]), q]);
		const conns: Array<{ sock: net.Socket; closed: boolean }> = [];
		for (let i = 0; i < 512; i++) {
			const c = { sock: tcpClient(f.port, '127.0.0.2'), closed: false };
			c.sock.on('close', () => { c.closed = true; });
			conns.push(c);
		}
		let sent = 0;
		/* A byte of the query every 4 s on each connection (all of it takes 4 * 35 s). */
		const trickle = (): void => {
			for (const c of conns) {
				if (!c.closed && sent < stream.length) {
					c.sock.write(stream.subarray(sent, sent + 1));
				}
			}
			sent++;
		};
		await sleep(500);
		trickle();
		const timer = setInterval(trickle, 4000);
		const row: string[] = [];
		const t0 = performance.now();
		for (const at of [1, 4, 8, 12]) {
			await sleep(at * 1000 - (performance.now() - t0));
			const open = conns.filter((c) => !c.closed).length;
			const d = await digTcp(f.port, '127.0.0.3', 'probe.example');
			row.push(`${at} s: ${open} trickling connections open, dig +tcp from 127.0.0.3 ${d.ok ? 'answered' : 'failed'} `
				+ `in ${d.ms.toFixed(0)} ms (${d.said})`);
		}
		clearInterval(timer);
		console.log(`tcp-lockout (${root}${flags.length > 0 ? `, ${flags.join(' ')}` : ''}):\n  ${row.join('\n  ')}`);
		for (const c of conns) {
			c.sock.destroy();
		}
	} finally {
		stopTcpFleet(f);
	}
}

async function tcpUnread(root: string, flags: string[]): Promise<void> {
	const f = await startTcpFleet(root, flags);
	try {
		/* The issue's 200 x 300 by default; BBAL_UNREAD_CONNS and BBAL_UNREAD_QUERIES change them. */
		const nConns = Number(process.env.BBAL_UNREAD_CONNS ?? 200);
		const nQueries = Number(process.env.BBAL_UNREAD_QUERIES ?? 300);
		const queries = Buffer.concat(Array.from({ length: nQueries }, (_, i) => {
			const q = dnsPacket.encode({ type: 'query', id: i, questions: [{ type: 'TXT', name: 'huge.example' }] });
			return Buffer.concat([Buffer.from([q.length >> 8, q.length & 255]), q]);
		}));
		const mnamePid = f.mname.pid as number;
		const bbalPid = f.bbal.pid as number;
		await sleep(500);
		const mname0 = rssMb(mnamePid);
		const bbal0 = rssMb(bbalPid);
		const conns: net.Socket[] = [];
		for (let i = 1; i <= nConns; i++) {
			const c = tcpClient(f.port, `127.0.${2 + (i >> 8)}.${i & 255}`);
			c.pause(); /* never reads */
			c.write(queries);
			conns.push(c);
		}
		let mnamePeak = mname0;
		let bbalPeak = bbal0;
		const samples: string[] = [];
		let cpu = cpuSecs(mnamePid);
		for (let i = 1; i <= 36; i++) {
			await sleep(500);
			const m = rssMb(mnamePid);
			mnamePeak = Math.max(mnamePeak, m);
			bbalPeak = Math.max(bbalPeak, rssMb(bbalPid));
			if (i % 6 === 0) {
				const c = cpuSecs(mnamePid);
				samples.push(`${i / 2} s: ${m.toFixed(0)} MB, ${Math.round((c - cpu) / 3 * 100)}% CPU`);
				cpu = c;
			}
		}
		const open = conns.filter((c) => !c.destroyed && c.readyState === 'open').length;
		console.log(`tcp-unread (${root}${flags.length > 0 ? `, ${flags.join(' ')}` : ''}): ${nConns} connections x ${nQueries} queries `
			+ `for huge.example (16 KB answers), never read: mname RSS ${mname0.toFixed(1)} MB before, peak ${mnamePeak.toFixed(1)} MB over 18 s; `
			+ `every 3 s (RSS, CPU over the 3 s): ${samples.join('; ')}; bbal RSS ${bbal0.toFixed(1)} -> peak `
			+ `${bbalPeak.toFixed(1)} MB; ${open} client connections still open at 18 s`);
		for (const c of conns) {
			c.destroy();
		}
	} finally {
		stopTcpFleet(f);
	}
}

const [what, arg] = process.argv.slice(2);
switch (what) {
case 'expiry':
	await expiry(Number(arg ?? 100_000));
	break;
case 'rebalance':
	await rebalance(Number(arg ?? 50_000));
	break;
case 'stats':
	await stats();
	break;
case 'metrics':
	await metrics();
	break;
case 'takeover':
	await takeover();
	break;
case 'flood':
	await flood(path.resolve(arg ?? path.join(ROOT, 'bin', 'bbal.js')));
	break;
case 'tcp-lockout':
case 'tcp-unread': {
	/* [ROOT] [-- FLAGS]: another checkout's bbal, and flags for it. */
	const rest = process.argv.slice(3);
	const dash = rest.indexOf('--');
	const root = path.resolve((dash === 0 ? undefined : rest[0]) ?? ROOT);
	const flags = dash < 0 ? [] : rest.slice(dash + 1);
	await (what === 'tcp-lockout' ? tcpLockout(root, flags) : tcpUnread(root, flags));
	break;
}
default:
	console.error('usage: node dist/bench/stalls.js expiry|rebalance [N] | stats | metrics | takeover | flood [BBAL_JS] '
		+ '| tcp-lockout|tcp-unread [ROOT] [-- FLAGS]');
	process.exit(2);
}
