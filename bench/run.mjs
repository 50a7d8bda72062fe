#!/usr/bin/env node
/*
 * npm run bench: bbal side by side with dnsdist and with its backends alone.
 *
 *   node bench/run.mjs [--quick] [--only LIST] [--rounds N] [--profile]
 *                      [--no-install] [--no-build] [--list] [--help]
 *
 * Installs what is missing (Debian dnsperf and dnsdist), builds the C stub
 * (bench/stub.c -> bench/build/stub) and bbal (when src/ is newer than dist/),
 * starts every server the chosen scenarios need on loopback, warms each path
 * up, then runs the measured configurations round-robin (so drift hits them
 * all alike), measures bbal's RSS holding 100,000 remotes, and prints a
 * Markdown report. It writes bench/results/<timestamp>.json and .md, and (a
 * full run only) bench/results/latest.md. bench/README.md says what each
 * figure means.
 *
 * Every process it starts is stopped at the end, on an error, and on
 * SIGINT/SIGTERM; every address it sends to is in 127.0.0.0/8.
 */
import { spawn, execFileSync, spawnSync } from 'node:child_process';
import dgram from 'node:dgram';
import {
	closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync,
	statSync, writeFileSync,
} from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { summarize as summarizeProfile } from './profile_summary.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..');
const BUILD = path.join(HERE, 'build');
const RESULTS = path.join(HERE, 'results');
const STUB_SRC = path.join(HERE, 'stub.c');
const STUB = path.join(BUILD, 'stub');
/* The launcher, as installed: it execs node with bbal's V8 flags. */
const BBAL = path.join(ROOT, 'bin', 'bbal');
const MNAME = path.join(HERE, 'mname_server.cjs');
const TCP_CONNS = path.join(HERE, 'tcp_conns.mjs');

/* ------------------------------------------------------------ options */

const SCENARIOS = {
	'sat-stub': 'saturation (dnsperf -c 4 -q 200): direct, dnsdist and bbal in front of the fast C stub',
	'rate-stub': 'fixed 5,000 qps (dnsperf -Q 5000): direct, dnsdist and bbal in front of the fast C stub',
	mname: 'saturation: one mname on its own UDP port, bbal -> 1 mname, bbal -> 2 mnames',
	'tcp-qps': 'dnsperf -m tcp over 4 persistent connections: mname directly vs bbal -> mname',
	'tcp-conns': 'new TCP connections per second, one query each: mname directly vs bbal -> mname',
	rss: "bbal's RSS holding 100,000 remotes",
};
const ALIASES = { stub: ['sat-stub', 'rate-stub'], tcp: ['tcp-qps', 'tcp-conns'], all: Object.keys(SCENARIOS) };

const USAGE = `usage: npm run bench -- [options]   (or: node bench/run.mjs [options])
  --quick          smoke run (~1 minute): 1 round, short runs
  --only LIST      scenarios, comma-separated (env BENCH_ONLY): ${Object.keys(SCENARIOS).join(', ')}
                   or the groups stub, tcp, all
  --rounds N       measured rounds (env BENCH_ROUNDS; default 3, quick 1)
  --seconds N      seconds per UDP run (env BENCH_SECONDS; default 5, quick 3); TCP runs take 3/5 of it
  --profile        run bbal under node --cpu-prof; profiles and a summary go to bench/build/prof/
  --wait-quiet[=S] first wait up to S seconds (default 120) until other processes use < 15% of a core
  --no-install     never apt-get install dnsperf/dnsdist
  --no-build       never rebuild bbal (dist/) even if src/ is newer
  --list           list the scenarios and exit
  -h, --help       this text`;

function parseArgs(argv) {
	const o = {
		quick: false, only: process.env.BENCH_ONLY ?? '', rounds: process.env.BENCH_ROUNDS,
		seconds: process.env.BENCH_SECONDS, profile: false, install: true, build: true, waitQuiet: 0,
	};
	for (let i = 0; i < argv.length; i++) {
		const a = argv[i];
		const [flag, inline] = a.includes('=') ? a.split(/=(.*)/s, 2) : [a, undefined];
		const value = () => inline ?? argv[++i];
		switch (flag) {
		case '--quick': o.quick = true; break;
		case '--only': o.only = value() ?? ''; break;
		case '--rounds': o.rounds = value(); break;
		case '--seconds': o.seconds = value(); break;
		case '--profile': o.profile = true; break;
		case '--wait-quiet': o.waitQuiet = Number(inline ?? 120); break;
		case '--no-install': o.install = false; break;
		case '--no-build': o.build = false; break;
		case '--list':
			for (const [k, v] of Object.entries(SCENARIOS)) {
				console.log(`${k.padEnd(10)} ${v}`);
			}
			process.exit(0);
			break;
		case '-h': case '--help': console.log(USAGE); process.exit(0); break;
		default: console.error(`bench: unknown option ${a}\n${USAGE}`); process.exit(2);
		}
	}
	const picked = new Set();
	for (const s of (o.only || 'all').split(',').map((x) => x.trim()).filter(Boolean)) {
		const list = ALIASES[s] ?? (SCENARIOS[s] ? [s] : null);
		if (!list) {
			console.error(`bench: unknown scenario "${s}" (try --list)`);
			process.exit(2);
		}
		list.forEach((x) => picked.add(x));
	}
	o.scenarios = Object.keys(SCENARIOS).filter((s) => picked.has(s)); /* canonical order */
	o.partial = o.scenarios.length !== Object.keys(SCENARIOS).length;
	o.rounds = Number(o.rounds ?? (o.quick ? 1 : 3));
	o.seconds = Number(o.seconds ?? (o.quick ? 3 : 5));
	if (!(o.rounds >= 1 && o.rounds <= 20) || !(o.seconds >= 1 && o.seconds <= 60)) {
		console.error('bench: --rounds must be 1-20 and --seconds 1-60');
		process.exit(2);
	}
	o.tcpSeconds = Math.max(1, Math.round((o.seconds * 3) / 5));
	o.warmSeconds = 1;
	return o;
}

const opts = parseArgs(process.argv.slice(2));
const started = new Date();
const t0 = performance.now();
const log = (msg) => process.stderr.write(`bench: ${msg}\n`);

/* ---------------------------------------------------------- processes */

const live = new Set();
let tmp = null;
let aborting = false;

/*
 * Starts a process. stdout/stderr are either file descriptors or kept (the
 * last 64 KiB) for error messages. `expectExit` is false for servers: one
 * that exits before we stop it fails the run.
 */
function start(name, cmd, args, { stdout = 'pipe', stderr = 'pipe', env, expectExit = false } = {}) {
	const child = spawn(cmd, args, { cwd: ROOT, stdio: ['ignore', stdout, stderr], env: env ?? process.env });
	const p = { name, child, pid: child.pid, out: '', exited: false, code: null, signal: null, expectExit, stopping: false };
	const keep = (d) => {
		p.out = (p.out + d).slice(-65536);
	};
	child.stdout?.setEncoding('utf8').on('data', keep);
	child.stderr?.setEncoding('utf8').on('data', keep);
	live.add(p);
	p.exit = new Promise((resolve) => {
		const done = (code, signal) => {
			if (p.exited) {
				return;
			}
			p.exited = true;
			p.code = code;
			p.signal = signal;
			live.delete(p);
			if (!p.expectExit && !p.stopping && !aborting) {
				p.died = `${name} exited unexpectedly (code ${code}, signal ${signal}): ${p.out.slice(-2000)}`;
				log(p.died);
			}
			resolve();
		};
		child.on('exit', done);
		child.on('error', (err) => {
			p.out += `\n${err.message}`;
			done(null, null);
		});
	});
	return p;
}

async function stop(p, graceMs = 3000) {
	if (p.exited) {
		return;
	}
	p.stopping = true;
	p.child.kill('SIGTERM');
	const ok = await Promise.race([p.exit.then(() => true), sleep(graceMs).then(() => false)]);
	if (!ok && !p.exited) {
		p.child.kill('SIGKILL');
		await p.exit;
	}
}

async function stopAll() {
	await Promise.all([...live].map((p) => stop(p)));
}

function cleanTmp() {
	if (tmp) {
		rmSync(tmp, { recursive: true, force: true });
		tmp = null;
	}
}

async function abort(reason, code) {
	if (aborting) {
		return;
	}
	aborting = true;
	log(`${reason}: stopping everything`);
	await stopAll();
	cleanTmp();
	process.exit(code);
}
process.on('SIGINT', () => abort('interrupted', 130));
process.on('SIGTERM', () => abort('terminated', 143));
process.on('SIGHUP', () => abort('hung up', 129));
process.on('exit', () => {
	for (const p of live) {
		try {
			p.child.kill('SIGKILL');
		} catch {
			/* gone already */
		}
	}
	cleanTmp();
});

function alive(p) {
	if (p.exited) {
		throw new Error(p.died ?? `${p.name} is not running`);
	}
}

async function waitFor(what, fn, timeoutMs = 15000, everyMs = 100) {
	const deadline = performance.now() + timeoutMs;
	let last;
	for (;;) {
		try {
			const v = await fn();
			if (v) {
				return v;
			}
		} catch (err) {
			last = err;
		}
		if (performance.now() > deadline) {
			throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ''}`);
		}
		await sleep(everyMs);
	}
}

/* ------------------------------------------------------ measurements */

const CLK_TCK = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim());

/* utime + stime of a whole process (every thread), in clock ticks. */
function cpuTicks(pid) {
	const s = readFileSync(`/proc/${pid}/stat`, 'utf8');
	const f = s.slice(s.lastIndexOf(')') + 2).split(' '); /* f[0] is field 3 (state) */
	return Number(f[11]) + Number(f[12]);
}

/* stime alone (time in the kernel on the process's behalf: its syscalls). */
function sysTicks(pid) {
	const s = readFileSync(`/proc/${pid}/stat`, 'utf8');
	return Number(s.slice(s.lastIndexOf(')') + 2).split(' ')[12]);
}

/*
 * Ticks of the whole machine (first line of /proc/stat): process time (user,
 * nice, system), interrupt time (irq + softirq: loopback packet processing is
 * mostly here and is charged to no process), and hypervisor steal.
 */
function systemTicks() {
	const v = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0].trim().split(/\s+/).slice(1).map(Number);
	/* user nice system idle iowait irq softirq steal (guest time is inside user) */
	return { busy: v[0] + v[1] + v[2], irq: v[5] + v[6], steal: v[7] };
}

/* This process's own CPU plus that of its reaped children (dnsperf, tcp_conns). */
function selfTicks() {
	const s = readFileSync('/proc/self/stat', 'utf8');
	const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
	return { self: Number(f[11]) + Number(f[12]), children: Number(f[13]) + Number(f[14]) };
}

function procStatusKb(pid, key) {
	const m = readFileSync(`/proc/${pid}/status`, 'utf8').match(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm'));
	return m ? Number(m[1]) : null;
}

/* The stats snapshot bbal serves on -S (what balstat --json prints). */
function snapshot(sockPath) {
	return new Promise((resolve, reject) => {
		const chunks = [];
		const s = net.connect(sockPath);
		s.setTimeout(10000, () => s.destroy(new Error('stats socket timeout')));
		s.on('data', (d) => chunks.push(d));
		s.on('error', reject);
		s.on('end', () => {
			try {
				resolve(JSON.parse(Buffer.concat(chunks).toString('utf8')));
			} catch (err) {
				reject(err);
			}
		});
	});
}

function dnsQuery(id) {
	const name = [3, ...Buffer.from('www'), 7, ...Buffer.from('example'), 3, ...Buffer.from('com'), 0];
	const q = Buffer.from([0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, ...name, 0, 1, 0, 1]);
	q.writeUInt16BE(id, 0);
	return q;
}

/* One UDP query to 127.0.0.1:port from `src`; true when answered in time. */
function probeOnce(port, src = '127.0.0.1', timeoutMs = 300) {
	return new Promise((resolve) => {
		const sock = dgram.createSocket('udp4');
		const id = (Math.random() * 65536) | 0;
		const timer = setTimeout(() => finish(false), timeoutMs);
		function finish(v) {
			clearTimeout(timer);
			sock.close();
			resolve(v);
		}
		sock.on('error', () => finish(false));
		sock.on('message', (m) => {
			if (m.length >= 12 && m.readUInt16BE(0) === id && (m[2] & 0x80)) {
				finish(true);
			}
		});
		sock.bind(0, src, () => sock.send(dnsQuery(id), port, '127.0.0.1'));
	});
}

const probe = (what, port, src) => waitFor(`${what} to answer on 127.0.0.1:${port}`, () => probeOnce(port, src), 15000, 50);

/* A port free for both UDP and TCP on 127.0.0.1. */
const usedPorts = new Set();
async function freePort() {
	for (;;) {
		const port = await new Promise((resolve, reject) => {
			const srv = net.createServer();
			srv.on('error', reject);
			srv.listen(0, '127.0.0.1', () => {
				const p = srv.address().port;
				srv.close(() => resolve(p));
			});
		});
		const udpFree = await new Promise((resolve) => {
			const s = dgram.createSocket('udp4');
			s.on('error', () => resolve(false));
			s.bind(port, '127.0.0.1', () => s.close(() => resolve(true)));
		});
		if (udpFree && !usedPorts.has(port)) {
			usedPorts.add(port);
			return port;
		}
	}
}

function percentile(sorted, p) {
	if (sorted.length === 0) {
		return null;
	}
	return sorted[Math.min(sorted.length - 1, Math.ceil(p * sorted.length) - 1)];
}

let dnsperfSeq = 0;
let queriesFile;

/*
 * One dnsperf run, verbose (-v: one line per query with its latency) into a
 * file, parsed afterwards: the summary for sent/completed/lost/qps, the
 * per-query lines for the latency percentiles.
 */
async function dnsperf({ port, seconds, qps, src, tcp = false }) {
	const file = path.join(tmp, `dnsperf-${++dnsperfSeq}.out`);
	const fd = openSync(file, 'w');
	const args = ['-s', '127.0.0.1', '-p', String(port), '-d', queriesFile, '-c', '4', '-q', '200',
		'-l', String(seconds), '-t', '1', '-v'];
	if (qps) {
		args.push('-Q', String(qps));
	}
	if (src) {
		args.push('-a', src);
	}
	if (tcp) {
		args.push('-m', 'tcp');
	}
	const p = start('dnsperf', 'dnsperf', args, { stdout: fd, stderr: fd, expectExit: true });
	closeSync(fd);
	const killer = setTimeout(() => p.child.kill('SIGKILL'), (seconds + 15) * 1000);
	await p.exit;
	clearTimeout(killer);
	const text = readFileSync(file, 'utf8');
	rmSync(file, { force: true });
	const num = (re) => {
		const m = text.match(re);
		return m ? Number(m[1]) : null;
	};
	const r = {
		sent: num(/Queries sent:\s+(\d+)/),
		completed: num(/Queries completed:\s+(\d+)/),
		lost: num(/Queries lost:\s+(\d+)/),
		runtime: num(/Run time \(s\):\s+([\d.]+)/),
		qps: num(/Queries per second:\s+([\d.]+)/),
		avgLatencyMs: (num(/Average Latency \(s\):\s+([\d.]+)/) ?? NaN) * 1000,
	};
	if (p.code !== 0 || r.completed === null || r.qps === null) {
		throw new Error(`dnsperf ${args.join(' ')} failed (code ${p.code}, signal ${p.signal}):\n`
			+ text.split('\n').filter((l) => !l.startsWith('> ')).slice(-15).join('\n'));
	}
	let lat = new Float64Array(Math.max(1024, r.completed + 16));
	let n = 0;
	let pos = 0;
	while (pos < text.length) {
		let end = text.indexOf('\n', pos);
		if (end < 0) {
			end = text.length;
		}
		if (text.charCodeAt(pos) === 62 /* > */ && text.charCodeAt(pos + 2) !== 84 /* T */) {
			const v = Number(text.slice(text.lastIndexOf(' ', end - 1) + 1, end));
			if (Number.isFinite(v)) {
				if (n === lat.length) {
					const bigger = new Float64Array(lat.length * 2);
					bigger.set(lat);
					lat = bigger;
				}
				lat[n++] = v * 1000;
			}
		}
		pos = end + 1;
	}
	r.latencies = lat.subarray(0, n);
	return r;
}

function mergeDnsperf(rs) {
	const lat = new Float64Array(rs.reduce((a, r) => a + r.latencies.length, 0));
	let o = 0;
	for (const r of rs) {
		lat.set(r.latencies, o);
		o += r.latencies.length;
	}
	return {
		sent: rs.reduce((a, r) => a + r.sent, 0),
		completed: rs.reduce((a, r) => a + r.completed, 0),
		lost: rs.reduce((a, r) => a + r.lost, 0),
		runtime: Math.max(...rs.map((r) => r.runtime)),
		qps: rs.reduce((a, r) => a + r.qps, 0),
		avgLatencyMs: rs.reduce((a, r) => a + r.avgLatencyMs * r.completed, 0)
			/ Math.max(1, rs.reduce((a, r) => a + r.completed, 0)),
		latencies: lat,
		perProcess: rs.map((r) => ({ qps: r.qps, completed: r.completed, lost: r.lost })),
	};
}

async function tcpConns({ port, seconds }) {
	const p = start('tcp_conns', process.execPath, [TCP_CONNS, '--port', String(port), '--seconds', String(seconds),
		'--workers', '8'], { expectExit: true });
	const killer = setTimeout(() => p.child.kill('SIGKILL'), (seconds + 15) * 1000);
	await p.exit;
	clearTimeout(killer);
	const line = p.out.trim().split('\n').pop();
	let j;
	try {
		j = JSON.parse(line);
	} catch {
		throw new Error(`tcp_conns failed (code ${p.code}): ${p.out.slice(-1000)}`);
	}
	const failed = j.errors + j.timeouts;
	return {
		sent: j.completed + failed, completed: j.completed, lost: failed, runtime: j.seconds, qps: j.rate,
		p50: j.p50_ms, p99: j.p99_ms,
	};
}

/* Share of a core the rest of the machine keeps busy, over `ms` (we are idle meanwhile). */
async function otherLoad(ms = 1000) {
	const a = systemTicks();
	const sa = selfTicks();
	await sleep(ms);
	const b = systemTicks();
	const sb = selfTicks();
	const mine = sb.self - sa.self + sb.children - sa.children;
	return (100 * Math.max(0, b.busy - a.busy - mine)) / ((ms / 1000) * CLK_TCK);
}

/* ------------------------------------------------------------- setup */

function which(cmd) {
	for (const dir of (process.env.PATH ?? '').split(':').concat(['/usr/sbin', '/usr/bin', '/sbin'])) {
		const f = path.join(dir, cmd);
		try {
			if (statSync(f).isFile()) {
				return f;
			}
		} catch {
			/* not here */
		}
	}
	return null;
}

function run(cmd, args, what) {
	const r = spawnSync(cmd, args, { stdio: 'inherit', cwd: ROOT });
	if (r.status !== 0) {
		throw new Error(`${what} failed (${cmd} ${args.join(' ')}: status ${r.status}${r.error ? `, ${r.error.message}` : ''})`);
	}
}

function installTools(needed) {
	const missing = needed.filter(([bin]) => !which(bin)).map(([, pkg]) => pkg);
	if (missing.length === 0) {
		return;
	}
	if (!opts.install) {
		throw new Error(`missing ${missing.join(', ')} and --no-install given: apt-get install -y ${missing.join(' ')}`);
	}
	const root = process.getuid?.() === 0;
	const apt = (args) => (root ? ['apt-get', args] : ['sudo', ['apt-get', ...args]]);
	const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
	log(`installing ${missing.join(', ')} (apt-get${root ? '' : ' via sudo'})`);
	/* dnsdist's package would start its own service where systemd runs; ours never uses it. */
	const tryInstall = () => spawnSync(...apt(['install', '-y', '-q', ...missing]), { stdio: 'inherit', env }).status === 0;
	if (!tryInstall()) {
		log('apt-get install failed; running apt-get update and trying again');
		spawnSync(...apt(['update', '-q']), { stdio: 'inherit', env });
		if (!tryInstall()) {
			throw new Error(`could not install ${missing.join(', ')}`);
		}
	}
}

function buildStub() {
	mkdirSync(BUILD, { recursive: true });
	if (existsSync(STUB) && statSync(STUB).mtimeMs >= statSync(STUB_SRC).mtimeMs) {
		return;
	}
	log('building bench/build/stub');
	run('gcc', ['-O2', '-Wall', '-Wextra', '-o', STUB, STUB_SRC], 'building the stub');
}

function buildBbal() {
	const newest = (dir, ext) => {
		let m = 0;
		for (const f of readdirSync(dir, { recursive: true })) {
			if (String(f).endsWith(ext)) {
				m = Math.max(m, statSync(path.join(dir, String(f))).mtimeMs);
			}
		}
		return m;
	};
	const distDir = path.join(ROOT, 'dist', 'src');
	const stale = !existsSync(path.join(distDir, 'main.js'))
		|| newest(path.join(ROOT, 'src'), '.ts') > newest(distDir, '.js');
	if (!stale) {
		return;
	}
	if (!opts.build) {
		log('warning: dist/ is older than src/ and --no-build was given: measuring the old build');
		return;
	}
	log('src/ is newer than dist/: npm run build');
	run('npm', ['run', '--silent', 'build'], 'building bbal (npm run build)');
}

function machineInfo() {
	const sh = (cmd, args) => {
		const r = spawnSync(cmd, args, { encoding: 'utf8', cwd: ROOT });
		return `${r.stdout ?? ''}${r.stderr ?? ''}`.trim();
	};
	const cpuinfo = readFileSync('/proc/cpuinfo', 'utf8');
	const mem = readFileSync('/proc/meminfo', 'utf8').match(/MemTotal:\s+(\d+)/);
	const dirty = sh('git', ['status', '--porcelain', '--', 'src', 'bin']);
	return {
		nproc: Number(sh('nproc', [])),
		cpu: cpuinfo.match(/^model name\s*:\s*(.*)$/m)?.[1] ?? 'unknown',
		memGiB: mem ? Number((Number(mem[1]) / 1048576).toFixed(1)) : null,
		kernel: `${os.type()} ${os.release()}`,
		node: process.version,
		dnsperf: sh('dnsperf', ['-h']).match(/Version\s+(\S+)/)?.[1] ?? 'unknown',
		dnsdist: sh('dnsdist', ['--version']).split('\n')[0].replace(/^dnsdist\s+/, ''),
		gcc: sh('gcc', ['-dumpfullversion']),
		mname: JSON.parse(readFileSync(path.join(ROOT, 'node_modules', 'mname', 'package.json'), 'utf8')).version,
		clkTck: CLK_TCK,
		bbalCommit: sh('git', ['rev-parse', '--short', 'HEAD']) + (dirty ? ' (+ uncommitted changes in src/ or bin/)' : ''),
	};
}

/* ----------------------------------------------------------- servers */

function startStubUdp(port) {
	const p = start('stub udp', STUB, ['udp', String(port)]);
	return p;
}

async function startStubFramed(sockPath) {
	const p = start('stub framed', STUB, ['framed', sockPath]);
	await waitFor(`framed stub at ${sockPath}`, () => { alive(p); return p.out.includes('ready'); });
	return p;
}

async function startMname(name, { balancer, udp, tcp }) {
	const args = ['--no-warnings', MNAME];
	if (balancer) {
		args.push('--balancer', balancer);
	}
	if (udp) {
		args.push('--udp', String(udp));
	}
	if (tcp) {
		args.push('--tcp', String(tcp));
	}
	const p = start(name, process.execPath, args);
	await waitFor(`${name} to be ready`, () => { alive(p); return p.out.includes('ready'); });
	return p;
}

async function startDnsdist(port, backendPort) {
	const conf = path.join(tmp, 'dnsdist.conf');
	writeFileSync(conf, [
		'-- written by bench/run.mjs: no cache, no console, loopback only',
		'setSecurityPollSuffix("")  -- no security-status lookups in DNS',
		`setLocal("127.0.0.1:${port}")`,
		'setACL({"127.0.0.0/8"})',
		`newServer({address="127.0.0.1:${backendPort}"})`,
		'',
	].join('\n'));
	const p = start('dnsdist', which('dnsdist') ?? 'dnsdist', ['--supervised', '--disable-syslog', '-C', conf]);
	await probe('dnsdist', port);
	return p;
}

/*
 * bbal as operators launch it: bin/bbal ... -l warn. Ready when the
 * stats snapshot shows every backend ok (and, unless noProbe, a query from
 * 127.0.0.1 is answered).
 */
async function startBbal(name, { port, dir, backends, noProbe = false, profileName, stats = `${dir}.stats.sock` }) {
	const env = { ...process.env };
	delete env.LOG_LEVEL;
	const args = ['-b', '127.0.0.1', '-p', String(port), '-s', dir, '-S', stats, '-l', 'warn'];
	let p;
	if (opts.profile && profileName) {
		/*
		 * node refuses --cpu-prof in NODE_OPTIONS, so run bin/bbal.js the way
		 * the launcher does (its V8 flags, read from its exec line), plus the
		 * profiler's.
		 */
		mkdirSync(path.join(BUILD, 'prof'), { recursive: true });
		const launcher = readFileSync(BBAL, 'utf8');
		const v8flags = (/^exec node (.*)$/m.exec(launcher)?.[1] ?? '').split(/\s+/).filter((w) => /^--[a-z0-9-]+(=\S+)?$/.test(w));
		p = start(name, process.execPath, [...v8flags, '--cpu-prof', `--cpu-prof-dir=${path.join(BUILD, 'prof')}`,
			`--cpu-prof-name=${profileName}`, `${BBAL}.js`, ...args], { env });
	} else {
		p = start(name, BBAL, args, { env });
	}
	p.stats = stats;
	await waitFor(`${name}: ${backends} backend(s) ok`, async () => {
		alive(p);
		const snap = await snapshot(stats);
		return snap.backends.length === backends && snap.backends.every((b) => b.ok);
	});
	if (!noProbe) {
		await probe(name, port);
	}
	return p;
}

/* ------------------------------------------------------ configurations */

/*
 * A configuration is one path measured under one load: run(seconds) returns
 * the load generator's figures; proxy and backends are the processes whose
 * CPU is charged to it.
 */
async function measure(cfg, seconds) {
	const procs = [cfg.proxy, ...cfg.backends].filter(Boolean);
	procs.forEach(alive);
	const before = procs.map((p) => cpuTicks(p.pid));
	const proxySysBefore = cfg.proxy ? sysTicks(cfg.proxy.pid) : 0;
	const sysBefore = systemTicks();
	const selfBefore = selfTicks();
	const snapBefore = cfg.proxy?.stats ? await snapshot(cfg.proxy.stats) : null;
	const wall0 = performance.now();
	const r = await cfg.run(seconds);
	const wallSec = (performance.now() - wall0) / 1000;
	procs.forEach(alive);
	const after = procs.map((p) => cpuTicks(p.pid));
	const proxySysAfter = cfg.proxy ? sysTicks(cfg.proxy.pid) : 0;
	const sysAfter = systemTicks();
	const selfAfter = selfTicks();
	const ticks = after.map((a, i) => a - before[i]);
	const loadTicks = selfAfter.children - selfBefore.children;
	const ours = ticks.reduce((a, b) => a + b, 0) + loadTicks + (selfAfter.self - selfBefore.self);
	const sample = {
		sent: r.sent, completed: r.completed, lost: r.lost, runtime: r.runtime, qps: r.qps,
		lossPct: r.sent > 0 ? (100 * r.lost) / r.sent : 0,
		avgLatencyMs: r.avgLatencyMs ?? null,
		proxyTicks: cfg.proxy ? ticks[0] : null,
		proxySysTicks: cfg.proxy ? proxySysAfter - proxySysBefore : null,
		backendTicks: ticks.slice(cfg.proxy ? 1 : 0).reduce((a, b) => a + b, 0),
		/* the load generator's CPU (dnsperf or tcp_conns, reaped children of this process) */
		loadTicks,
		/* CPU that other processes on the machine used meanwhile, and the hypervisor's steal */
		foreignTicks: Math.max(0, sysAfter.busy - sysBefore.busy - ours),
		stealTicks: sysAfter.steal - sysBefore.steal,
		irqTicks: sysAfter.irq - sysBefore.irq,
		wallSec,
	};
	sample.foreignCorePct = (100 * sample.foreignTicks) / (wallSec * CLK_TCK);
	if (r.latencies) {
		const sorted = Float64Array.from(r.latencies).sort();
		sample.p50 = percentile(sorted, 0.5);
		sample.p99 = percentile(sorted, 0.99);
		sample.p999 = percentile(sorted, 0.999);
		sample.latencySamples = sorted.length;
	} else {
		sample.p50 = r.p50;
		sample.p99 = r.p99;
	}
	if (r.perProcess) {
		sample.perProcess = r.perProcess;
	}
	if (snapBefore) {
		const snapAfter = await snapshot(cfg.proxy.stats);
		const delta = {};
		for (const [k, v] of Object.entries(snapAfter.udp ?? {})) {
			if (typeof v === 'number' && v - (snapBefore.udp?.[k] ?? 0) !== 0) {
				delta[k] = v - (snapBefore.udp?.[k] ?? 0);
			}
		}
		sample.bbalUdp = delta;
		sample.bbalBackendsUdp = Object.fromEntries(snapAfter.backends.map((b) => [b.id,
			b.stats.udp - (snapBefore.backends.find((x) => x.id === b.id)?.stats.udp ?? 0)]));
	}
	return sample;
}

const us = (ticks, n) => (ticks === null || !n ? null : ((ticks / CLK_TCK) * 1e6) / n);
const median = (xs) => {
	const s = [...xs].filter((x) => x !== null && x !== undefined).sort((a, b) => a - b);
	if (s.length === 0) {
		return null;
	}
	return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

function aggregate(cfg) {
	const s = cfg.samples;
	const sum = (k) => s.reduce((a, x) => a + (x[k] ?? 0), 0);
	const completed = sum('completed');
	return {
		rounds: s.length,
		qps: median(s.map((x) => x.qps)),
		qpsMin: Math.min(...s.map((x) => x.qps)),
		qpsMax: Math.max(...s.map((x) => x.qps)),
		sent: sum('sent'),
		completed,
		lost: sum('lost'),
		lossPct: sum('sent') > 0 ? (100 * sum('lost')) / sum('sent') : 0,
		p50: median(s.map((x) => x.p50)),
		p99: median(s.map((x) => x.p99)),
		proxyUsPerQuery: cfg.proxy ? us(sum('proxyTicks'), completed) : null,
		proxySysPct: cfg.proxy && sum('proxyTicks') > 0 ? (100 * sum('proxySysTicks')) / sum('proxyTicks') : null,
		backendUsPerQuery: us(sum('backendTicks'), completed),
		loadUsPerQuery: us(sum('loadTicks'), completed),
		foreignCorePct: (100 * sum('foreignTicks')) / (sum('wallSec') * CLK_TCK),
	};
}

/* ------------------------------------------------------------ report */

const f = (v, d = 1) => (v === null || v === undefined || Number.isNaN(v) ? '–' : v.toLocaleString('en-US', {
	minimumFractionDigits: d, maximumFractionDigits: d,
}));
const fInt = (v) => f(v, 0);

function report(res) {
	const { machine, configs, ratios, targets, rss, quiet } = res;
	const L = [];
	const kind = opts.quick ? 'quick smoke run (not for the record)' : opts.partial ? 'partial run' : 'full run';
	L.push(`# bbal benchmark, ${res.startedAt.slice(0, 16).replace('T', ' ')} UTC (${kind})`);
	L.push('');
	L.push(`Machine: ${machine.nproc} cores (${machine.cpu}), ${machine.memGiB} GiB, ${machine.kernel}; `
		+ `node ${machine.node}, dnsperf ${machine.dnsperf}, dnsdist ${machine.dnsdist}, mname ${machine.mname}, `
		+ `bbal ${machine.bbalCommit}.`);
	L.push(`Command: \`${res.command}\`: ${res.params.rounds} round(s) round-robin, UDP runs ${res.params.seconds} s, `
		+ `TCP runs ${res.params.tcpSeconds} s, after a ${res.params.warmSeconds} s warm-up of each path; `
		+ `total ${f(res.durationSec, 0)} s.`);
	L.push('');
	L.push('qps: median over rounds (range: lowest–highest round); loss: lost/sent over all rounds; p50/p99: median over rounds of each '
		+ "run's percentile of dnsperf's per-query latencies; CPU µs/q: utime+stime from /proc/PID/stat summed over "
		+ 'rounds ÷ queries answered (all threads of the process); proxy sys %: the share of that in the kernel (stime).');
	if (quiet) {
		L.push('');
		L.push(`Other processes used ${f(quiet.avgCorePct, 1)}% of a core on average during the measured runs `
			+ `(${f(quiet.maxCorePct, 1)}% at most in one run); hypervisor steal ${f(quiet.stealCorePct, 1)}%; `
			+ `interrupt time (mostly loopback packet processing, charged to no process) ${f(quiet.irqCorePct, 1)}%.`
			+ (quiet.maxCorePct > 10 ? ' **The machine was not quiet: treat these figures with care.**' : ''));
	}
	const table = (title, ids, unit = 'qps') => {
		const rows = ids.filter((id) => configs[id]);
		if (rows.length === 0) {
			return;
		}
		L.push('');
		L.push(`### ${title}`);
		L.push('');
		L.push(`| path | ${unit} | range | loss % | p50 ms | p99 ms | proxy CPU µs/q | proxy sys % | backend CPU µs/q |`);
		L.push('|---|---:|---:|---:|---:|---:|---:|---:|---:|');
		for (const id of rows) {
			const c = configs[id];
			const a = c.aggregate;
			L.push(`| ${c.label} | ${fInt(a.qps)} | ${fInt(a.qpsMin)}–${fInt(a.qpsMax)} | ${f(a.lossPct, 2)} | `
				+ `${f(a.p50, 3)} | ${f(a.p99, 3)} | ${f(a.proxyUsPerQuery, 2)} | ${f(a.proxySysPct, 0)} | `
				+ `${f(a.backendUsPerQuery, 2)} |`);
		}
	};
	table('UDP at saturation, fast C stub (dnsperf -c 4 -q 200)', ['sat-direct', 'sat-dnsdist', 'sat-bbal']);
	table('UDP at 5,000 qps, fast C stub (dnsperf -Q 5000)', ['rate-direct', 'rate-dnsdist', 'rate-bbal']);
	table('UDP at saturation, real mname backends', ['mname-udp', 'mname-bbal1', 'mname-bbal2']);
	table('TCP, queries over 4 persistent connections (dnsperf -m tcp -c 4 -q 200)', ['tcpq-direct', 'tcpq-bbal']);
	table('TCP, new connections per second (8 workers: connect, 1 query, close)', ['tcpc-direct', 'tcpc-bbal'], 'conn/s');
	if (rss) {
		L.push('');
		L.push('### bbal memory with 100,000 remotes');
		L.push('');
		L.push('| remotes held | RSS before | RSS after | peak RSS | spray: sent / answered / time |');
		L.push('|---:|---:|---:|---:|---:|');
		L.push(`| ${fInt(rss.remotesHeld)} | ${f(rss.rssBeforeKb / 1024)} MB | ${f(rss.rssAfterKb / 1024)} MB | `
			+ `${f(rss.hwmKb / 1024)} MB | ${fInt(rss.sent)} / ${fInt(rss.answered)} / ${f(rss.sprayMs / 1000, 2)} s |`);
	}
	if (ratios.length) {
		L.push('');
		L.push('### Ratios');
		L.push('');
		L.push('| ratio | value |');
		L.push('|---|---:|');
		for (const r of ratios) {
			L.push(`| ${r.name} | ${r.text} |`);
		}
	}
	if (targets.length) {
		L.push('');
		L.push('### Issue 6 targets');
		L.push('');
		L.push('| target | measured | bar | result |');
		L.push('|---|---:|---:|:---:|');
		for (const t of targets) {
			L.push(`| ${t.name} | ${t.measured} | ${t.bar} | ${t.pass ? 'PASS' : '**FAIL**'} |`);
		}
	}
	if (res.profile) {
		L.push('');
		L.push('### CPU profile of bbal (--profile; these runs are slower than unprofiled ones)');
		L.push('');
		L.push('```');
		L.push(res.profile);
		L.push('```');
	}
	L.push('');
	return L.join('\n');
}

function ratiosAndTargets(configs, rss) {
	const a = (id) => configs[id]?.aggregate;
	const ratios = [];
	const targets = [];
	/* value: the ratio of the aggregates; perRound: the same ratio within each round (paired in time). */
	const perRound = (idX, idY, key) => {
		const xs = configs[idX]?.samples ?? [];
		const ys = configs[idY]?.samples ?? [];
		const v = (c, smp) => (key === 'cpu' ? us(smp.proxyTicks, smp.completed) : smp[key]);
		return xs.map((sx, i) => (ys[i] ? v(configs[idX], sx) / v(configs[idY], ys[i]) : null));
	};
	const ratio = (name, x, y, pair) => {
		if (x === null || x === undefined || !y) {
			return null;
		}
		const v = x / y;
		const rounds = pair ? perRound(...pair) : [];
		ratios.push({
			name, value: v, perRound: rounds,
			text: `${f(v, 2)}×${rounds.length > 1 ? ` (rounds: ${rounds.map((r) => f(r, 2)).join(', ')})` : ''}`,
		});
		return v;
	};
	const target = (name, measured, bar, pass) => targets.push({ name, measured, bar, pass });

	if (a('sat-bbal') && a('sat-dnsdist')) {
		const cpu = ratio('saturation: bbal / dnsdist CPU per query', a('sat-bbal').proxyUsPerQuery, a('sat-dnsdist').proxyUsPerQuery, ['sat-bbal', 'sat-dnsdist', 'cpu']);
		const qps = ratio('saturation: bbal / dnsdist qps', a('sat-bbal').qps, a('sat-dnsdist').qps, ['sat-bbal', 'sat-dnsdist', 'qps']);
		target('saturation, framed stub: bbal CPU/query vs dnsdist', `${f(cpu, 2)}×`, '≤ 0.75×', cpu <= 0.75);
		target('saturation, framed stub: bbal qps vs dnsdist', `${f(qps, 2)}×`, '≥ 1.3×', qps >= 1.3);
	}
	if (a('rate-bbal') && a('rate-dnsdist')) {
		const cpu = ratio('5,000 qps: bbal / dnsdist CPU per query', a('rate-bbal').proxyUsPerQuery, a('rate-dnsdist').proxyUsPerQuery, ['rate-bbal', 'rate-dnsdist', 'cpu']);
		ratio('5,000 qps: bbal / dnsdist qps', a('rate-bbal').qps, a('rate-dnsdist').qps, ['rate-bbal', 'rate-dnsdist', 'qps']);
		target('5,000 qps: bbal CPU/query vs dnsdist', `${f(cpu, 2)}×`, '≤ 1.5×', cpu <= 1.5);
	}
	if (a('rate-bbal') && a('rate-direct')) {
		const added = a('rate-bbal').p99 - a('rate-direct').p99;
		const rounds = configs['rate-bbal'].samples.map((x, i) => x.p99 - (configs['rate-direct'].samples[i]?.p99 ?? NaN));
		ratios.push({
			name: '5,000 qps: p99 added by bbal over direct', value: added, perRound: rounds,
			text: `${f(added, 3)} ms${rounds.length > 1 ? ` (rounds: ${rounds.map((r) => f(r, 3)).join(', ')})` : ''}`,
		});
		if (a('rate-dnsdist')) {
			const dd = a('rate-dnsdist').p99 - a('rate-direct').p99;
			ratios.push({ name: '5,000 qps: p99 added by dnsdist over direct', value: dd, text: `${f(dd, 3)} ms` });
		}
		target('5,000 qps: p99 added over direct', `${f(added, 3)} ms`, '≤ 0.5 ms', added <= 0.5);
	}
	if (a('mname-bbal1') && a('mname-udp')) {
		const r = ratio('bbal → 1 mname qps / that mname\'s own UDP qps', a('mname-bbal1').qps, a('mname-udp').qps, ['mname-bbal1', 'mname-udp', 'qps']);
		const lost = a('mname-bbal1').lost;
		target('one real mname: bbal qps vs its own UDP, zero loss', `${f(r, 2)}×, ${fInt(lost)} lost`, '≥ 1.2×, 0 lost',
			r >= 1.2 && lost === 0);
	}
	if (a('mname-bbal2') && a('mname-udp')) {
		ratio('bbal → 2 mnames qps / one mname\'s own UDP qps', a('mname-bbal2').qps, a('mname-udp').qps, ['mname-bbal2', 'mname-udp', 'qps']);
	}
	if (a('tcpq-bbal') && a('tcpq-direct')) {
		ratio('TCP queries/s: bbal → mname / mname directly', a('tcpq-bbal').qps, a('tcpq-direct').qps, ['tcpq-bbal', 'tcpq-direct', 'qps']);
	}
	if (a('tcpc-bbal') && a('tcpc-direct')) {
		ratio('TCP connections/s: bbal → mname / mname directly', a('tcpc-bbal').qps, a('tcpc-direct').qps, ['tcpc-bbal', 'tcpc-direct', 'qps']);
	}
	if (rss) {
		const mb = rss.rssAfterKb / 1024;
		ratios.push({ name: `bbal RSS holding ${fInt(rss.remotesHeld)} remotes`, value: mb, text: `${f(mb)} MB` });
		target('100,000 remotes: RSS', `${f(mb)} MB (${fInt(rss.remotesHeld)} held)`, '≤ 100 MB',
			mb <= 100 && rss.remotesHeld >= 100000);
	}
	return { ratios, targets };
}

/* -------------------------------------------------------------- main */

async function main() {
	const need = opts.scenarios;
	const has = (...s) => s.some((x) => need.includes(x));
	const tools = [];
	if (has('sat-stub', 'rate-stub', 'mname', 'tcp-qps')) {
		tools.push(['dnsperf', 'dnsperf']);
	}
	if (has('sat-stub', 'rate-stub')) {
		tools.push(['dnsdist', 'dnsdist']);
	}
	installTools(tools);
	buildStub();
	buildBbal();
	const machine = machineInfo();
	log(`${machine.nproc} cores (${machine.cpu}), node ${machine.node}, dnsperf ${machine.dnsperf}, dnsdist ${machine.dnsdist}`);
	log(`scenarios: ${need.join(', ')}; ${opts.rounds} round(s), ${opts.seconds} s UDP / ${opts.tcpSeconds} s TCP runs`);

	let load = await otherLoad(1000);
	if (opts.waitQuiet > 0 && load >= 15) {
		log(`other processes use ${f(load, 0)}% of a core: waiting up to ${opts.waitQuiet} s for < 15%`);
		const until = performance.now() + opts.waitQuiet * 1000;
		while (load >= 15 && performance.now() < until) {
			load = await otherLoad(2000);
		}
	}
	if (load >= 15) {
		log(`warning: other processes use ${f(load, 0)}% of a core; the figures will be noisy`);
	}

	tmp = mkdtempSync(path.join(os.tmpdir(), 'bbal-bench-'));
	queriesFile = path.join(tmp, 'queries.txt');
	writeFileSync(queriesFile, ['www.example.com A', 'mail.example.com A', 'ns1.example.org A', 'host7.example.net A', ''].join('\n'));

	/* Servers, all up for the whole measured part (idle ones cost nothing). */
	const configs = [];
	const add = (scenario, id, label, proxy, backends, runFn) => {
		if (need.includes(scenario)) {
			configs.push({ scenario, id, label, proxy, backends, run: runFn, samples: [] });
		}
	};
	const stubDir = path.join(tmp, 'stub');
	mkdirSync(stubDir);
	let stubFramed = null;
	if (has('sat-stub', 'rate-stub', 'rss')) {
		stubFramed = await startStubFramed(path.join(stubDir, '5301'));
	}
	if (has('sat-stub', 'rate-stub')) {
		const [stubPort, ddPort, bbalPort] = [await freePort(), await freePort(), await freePort()];
		const stubUdp = startStubUdp(stubPort);
		await probe('stub', stubPort);
		const dnsdist = await startDnsdist(ddPort, stubPort);
		const bbal = await startBbal('bbal → stub', { port: bbalPort, dir: stubDir, backends: 1, profileName: 'bbal-stub.cpuprofile' });
		for (const [scenario, pre, qps, what] of [['sat-stub', 'sat', undefined, 'saturation'], ['rate-stub', 'rate', 5000, '5,000 qps']]) {
			add(scenario, `${pre}-direct`, `${what}: direct → stub`, null, [stubUdp], (s) => dnsperf({ port: stubPort, seconds: s, qps }));
			add(scenario, `${pre}-dnsdist`, `${what}: dnsdist → stub`, dnsdist, [stubUdp], (s) => dnsperf({ port: ddPort, seconds: s, qps }));
			add(scenario, `${pre}-bbal`, `${what}: bbal → framed stub`, bbal, [stubFramed], (s) => dnsperf({ port: bbalPort, seconds: s, qps }));
		}
	}
	if (has('mname', 'tcp-qps', 'tcp-conns')) {
		const [mUdp, mTcp, b1Port] = [await freePort(), await freePort(), await freePort()];
		const dir1 = path.join(tmp, 'm1');
		mkdirSync(dir1);
		const mA = await startMname('mname A', { balancer: path.join(dir1, '5301'), udp: mUdp, tcp: mTcp });
		const bbal1 = await startBbal('bbal → 1 mname', { port: b1Port, dir: dir1, backends: 1, profileName: 'bbal-mname1.cpuprofile' });
		add('mname', 'mname-udp', 'mname alone, its own UDP port', null, [mA], (s) => dnsperf({ port: mUdp, seconds: s }));
		add('mname', 'mname-bbal1', 'bbal → 1 mname', bbal1, [mA], (s) => dnsperf({ port: b1Port, seconds: s }));
		if (has('mname')) {
			const b2Port = await freePort();
			const dir2 = path.join(tmp, 'm2');
			mkdirSync(dir2);
			const mB = await startMname('mname B', { balancer: path.join(dir2, '5301') });
			const mC = await startMname('mname C', { balancer: path.join(dir2, '5302') });
			const bbal2 = await startBbal('bbal → 2 mnames', { port: b2Port, dir: dir2, backends: 2 });
			/* bbal is sticky per source address: find two that land on different backends. */
			const chosen = new Map();
			for (let i = 2; i < 40 && chosen.size < 2; i++) {
				const src = `127.0.0.${i}`;
				await probe('bbal → 2 mnames', b2Port, src);
				const snap = await snapshot(bbal2.stats);
				const be = snap.remotes.find((r) => r.ip === src)?.backend;
				if (be && !chosen.has(be)) {
					chosen.set(be, src);
				}
			}
			if (chosen.size < 2) {
				throw new Error('could not find two source addresses that bbal sends to different backends');
			}
			const srcs = [...chosen.values()];
			log(`bbal → 2 mnames: ${[...chosen].map(([be, s]) => `${s} → backend ${be}`).join(', ')}`);
			add('mname', 'mname-bbal2', `bbal → 2 mnames (dnsperf from ${srcs.join(' and ')}, summed)`, bbal2, [mB, mC],
				async (s) => mergeDnsperf(await Promise.all(srcs.map((src) => dnsperf({ port: b2Port, seconds: s, src })))));
			configs[configs.length - 1].check = (sample) => {
				const per = Object.values(sample.bbalBackendsUdp ?? {});
				const total = per.reduce((x, y) => x + y, 0);
				if (per.length !== 2 || Math.min(...per) < 0.25 * total) {
					log(`warning: bbal → 2 mnames did not split the load: ${JSON.stringify(sample.bbalBackendsUdp)}`);
				}
			};
		}
		add('tcp-qps', 'tcpq-direct', 'TCP queries: mname directly', null, [mA], (s) => dnsperf({ port: mTcp, seconds: s, tcp: true }));
		add('tcp-qps', 'tcpq-bbal', 'TCP queries: bbal → mname', bbal1, [mA], (s) => dnsperf({ port: b1Port, seconds: s, tcp: true }));
		add('tcp-conns', 'tcpc-direct', 'TCP connections: mname directly', null, [mA], (s) => tcpConns({ port: mTcp, seconds: s }));
		add('tcp-conns', 'tcpc-bbal', 'TCP connections: bbal → mname', bbal1, [mA], (s) => tcpConns({ port: b1Port, seconds: s }));
	}
	const secondsFor = (cfg) => (cfg.scenario.startsWith('tcp') ? opts.tcpSeconds : opts.seconds);

	if (configs.length > 0) {
		log(`warming up ${configs.length} path(s), ${opts.warmSeconds} s each`);
		for (const cfg of configs) {
			await measure(cfg, opts.warmSeconds);
		}
	}
	for (let round = 1; round <= opts.rounds; round++) {
		for (const cfg of configs) {
			const s = await measure(cfg, secondsFor(cfg));
			cfg.samples.push(s);
			cfg.check?.(s);
			const cpu = s.proxyTicks !== null ? `, proxy ${f(us(s.proxyTicks, s.completed), 2)} µs/q` : '';
			log(`round ${round}/${opts.rounds} ${cfg.id.padEnd(12)} ${fInt(s.qps).padStart(7)} ${cfg.scenario === 'tcp-conns' ? 'conn/s' : 'qps'}, `
				+ `loss ${f(s.lossPct, 2)}%, p50 ${f(s.p50, 3)} ms, p99 ${f(s.p99, 3)} ms${cpu}, `
				+ `backend ${f(us(s.backendTicks, s.completed), 2)} µs/q, others ${f(s.foreignCorePct, 0)}% of a core`);
		}
	}

	let rss = null;
	if (has('rss')) {
		const port = await freePort();
		const bbal = await startBbal('bbal (100k remotes)', {
			port, dir: stubDir, stats: path.join(tmp, 'rss.stats.sock'), backends: 1, noProbe: true,
		});
		await sleep(300);
		const rssBeforeKb = procStatusKb(bbal.pid, 'VmRSS');
		const count = 100000;
		log(`sending one query from each of ${fInt(count)} addresses 127.1.0.0 + i`);
		const spray = start('stub spray', STUB, ['spray', String(port), String(count), '127.1.0.0'], { expectExit: true });
		const killer = setTimeout(() => spray.child.kill('SIGKILL'), 60000);
		await spray.exit;
		clearTimeout(killer);
		const m = spray.out.match(/sent (\d+) answered (\d+) ms (\d+)/);
		if (!m) {
			throw new Error(`spray failed: ${spray.out}`);
		}
		await sleep(500);
		alive(bbal);
		const rssAfterKb = procStatusKb(bbal.pid, 'VmRSS');
		const hwmKb = procStatusKb(bbal.pid, 'VmHWM');
		const snap = await snapshot(bbal.stats);
		rss = {
			count, sent: Number(m[1]), answered: Number(m[2]), sprayMs: Number(m[3]),
			rssBeforeKb, rssAfterKb, hwmKb, remotesHeld: snap.remotes.length,
			remotesEvicted: snap.remotesEvicted, maxRemotes: snap.maxRemotes, udp: snap.udp,
		};
		log(`RSS ${f(rssBeforeKb / 1024)} MB before, ${f(rssAfterKb / 1024)} MB after; ${fInt(rss.remotesHeld)} remotes held; `
			+ `${fInt(rss.answered)}/${fInt(rss.sent)} answered in ${f(rss.sprayMs / 1000, 2)} s`);
		await stop(bbal);
	}

	await stopAll();

	let profile = null;
	if (opts.profile) {
		const dir = path.join(BUILD, 'prof');
		const parts = [];
		for (const name of ['bbal-stub.cpuprofile', 'bbal-mname1.cpuprofile']) {
			const file = path.join(dir, name);
			if (existsSync(file) && statSync(file).mtimeMs >= started.getTime()) {
				parts.push(summarizeProfile(file, 25));
			}
		}
		profile = parts.join('\n\n') || null;
		if (profile) {
			writeFileSync(path.join(dir, 'summary.txt'), `${profile}\n`);
		}
	}

	const byId = {};
	for (const cfg of configs) {
		cfg.aggregate = aggregate(cfg);
		byId[cfg.id] = cfg;
	}
	const { ratios, targets } = ratiosAndTargets(byId, rss);
	const all = configs.flatMap((c) => c.samples);
	const quiet = all.length === 0 ? null : {
		avgCorePct: (100 * all.reduce((a, x) => a + x.foreignTicks, 0)) / (all.reduce((a, x) => a + x.wallSec, 0) * CLK_TCK),
		maxCorePct: Math.max(...all.map((x) => x.foreignCorePct)),
		stealCorePct: (100 * all.reduce((a, x) => a + x.stealTicks, 0)) / (all.reduce((a, x) => a + x.wallSec, 0) * CLK_TCK),
		irqCorePct: (100 * all.reduce((a, x) => a + x.irqTicks, 0)) / (all.reduce((a, x) => a + x.wallSec, 0) * CLK_TCK),
	};
	const res = {
		startedAt: started.toISOString(),
		durationSec: (performance.now() - t0) / 1000,
		command: `npm run bench${process.argv.length > 2 ? ` -- ${process.argv.slice(2).join(' ')}` : ''}`,
		params: { rounds: opts.rounds, seconds: opts.seconds, tcpSeconds: opts.tcpSeconds, warmSeconds: opts.warmSeconds,
			quick: opts.quick, scenarios: opts.scenarios, profile: opts.profile },
		machine,
		configs: Object.fromEntries(configs.map((c) => [c.id, {
			scenario: c.scenario, label: c.label, aggregate: c.aggregate, samples: c.samples,
		}])),
		rss,
		ratios,
		targets,
		quiet,
		profile,
	};
	const md = report({ ...res, configs: byId });
	mkdirSync(RESULTS, { recursive: true });
	const stamp = res.startedAt.replace(/[:]/g, '').replace(/\.\d+Z$/, 'Z');
	writeFileSync(path.join(RESULTS, `${stamp}.json`), `${JSON.stringify(res, null, '\t')}\n`);
	writeFileSync(path.join(RESULTS, `${stamp}.md`), md);
	/* latest.md is tracked in git: only a full, unprofiled run replaces it. */
	const full = !opts.quick && !opts.partial && !opts.profile;
	if (full) {
		writeFileSync(path.join(RESULTS, 'latest.md'), md);
	}
	process.stdout.write(`${md}\n`);
	log(`wrote bench/results/${stamp}.json and bench/results/${stamp}.md${full ? ' and bench/results/latest.md' : ''} `
		+ `(${f(res.durationSec, 0)} s)`);
	cleanTmp();
}

const watchdog = setTimeout(() => abort('took over 9 minutes', 1), 9 * 60 * 1000);
try {
	await main();
	clearTimeout(watchdog);
} catch (err) {
	if (!aborting) { /* an interrupted run's in-flight failures are no news */
		process.stderr.write(`bench: ${err.stack ?? err}\n`);
		await abort('failed', 1);
	}
}
