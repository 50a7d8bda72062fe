/*
 * BENCH LOAD GENERATORS
 *
 * The two programs that send the queries, run once per measured run as
 * children of the session, and what their output says.
 *
 * DNSPERF (Debian's, 2.x) does every UDP run and the TCP runs over
 * persistent connections: `dnsperf -s 127.0.0.1 -p PORT -d QUERIES -c 4
 * -q 200 -l SECONDS -t 1 -v`, plus -Q for a fixed rate, -a for a source
 * address and -m tcp.  Four clients with 200 queries outstanding saturate
 * any path on a 2-core machine; a query unanswered after 1 s is lost.  The
 * queries are four names of type A in a loop (QUERY_NAMES).
 *
 * With -v, dnsperf prints one line per query with its latency, which is
 * every sample the percentiles need: nothing is estimated.  At saturation
 * that is a few hundred thousand lines per run, so the output goes to a
 * file in the session's directory, not through a pipe into our heap as
 * one string per chunk, and the file is read once after dnsperf exits:
 * the summary (sent, completed, lost, run time, queries per second,
 * average latency) by pattern, then each per-query line ("> ..." but not
 * the "> T..." timeout lines) for its last field, the latency in seconds,
 * into a growing Float64Array of milliseconds.  A run dnsperf did not
 * finish (no summary, non-zero status) fails the run with the last lines it
 * printed.  A dnsperf that runs 15 s past its -l is killed.
 *
 * TWO SOURCES AT ONCE.  bbal is sticky per source address, so the
 * two-backend configuration runs two dnsperf at once from two sources bbal
 * put on different backends, and mergeDnsperf() sums them: counts and qps
 * added, latencies pooled, the average weighted by answers, the run time
 * the longer one; each dnsperf's own figures are kept in perProcess.
 *
 * TCP_CONNS (tcp_conns.ts, run from its compiled file in dist/bench/) does
 * the new-connections-per-second runs, which dnsperf cannot: it keeps its
 * TCP connections open.  8 workers, each connect -> one query -> the whole
 * answer -> close, in a loop; it prints one JSON line with its counts and
 * its own p50/p99, which are taken as they are.
 *
 * STUB LOAD (bench/stub.c, `stub load`) does the cache scenario's runs:
 * dnsperf's saturation mode (a window of 200 queries outstanding for the
 * whole run, lost after 1 s) from 50 source addresses instead of one,
 * since bbal keeps each source on one backend.  It prints one line (sent,
 * answered, lost, its run time and qps, p50 and p99 in µs from its own
 * histogram), which is taken as it is, like tcp_conns's percentiles.
 *
 * THE CACHE WORKLOAD is a datacenter's DNS as Binder sees it: a few hundred
 * service names asked over and over with a Zipf popularity, and a tail of
 * names asked once.  cacheQueries() writes it once per session, the same
 * for every run of every configuration (a fixed seed): CACHE_QUERY_LINES
 * lines, each `svcNNN.binder.test A` with NNN drawn from CACHE_NAMES names
 * with P(rank k) proportional to 1/k^CACHE_ZIPF_S (rank 1 is svc000), or,
 * with probability CACHE_UNIQUE_SHARE, `*.uniq.binder.test A`, whose "*"
 * the generator replaces with a label it never uses twice (a random number
 * drawn per run and a counter).  The generator starts over at the end of
 * the file, which repeats the popular names' sample, never a unique name.
 *
 * Every generator reports in one LoadResult shape, so measure.ts need not
 * know which one ran: for tcp_conns, "sent" is connections attempted,
 * "completed" connections that got their answer and "lost" those that
 * failed or timed out.
 */

import { closeSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { seededRandom } from '../test/support/random.js';
import type { BenchSession } from './session.js';
import type { TcpConnsResult } from './tcp_conns.js';
import { STUB_BIN } from './tools.js';

/** The names dnsperf asks for, in a loop (every one type A). */
const QUERY_NAMES = ['www.example.com', 'mail.example.com', 'ns1.example.org', 'host7.example.net'];
/** dnsperf's clients and outstanding queries per client, and its loss deadline in seconds. */
const DNSPERF_CLIENTS = 4;
const DNSPERF_OUTSTANDING = 200;
const DNSPERF_TIMEOUT_SECS = 1;
/** tcp_conns's workers. */
const TCP_CONNS_WORKERS = 8;
/** How long past its own run length a generator may take before it is killed. */
const OVERRUN_MS = 15_000;

const TCP_CONNS_JS = path.join(path.dirname(fileURLToPath(import.meta.url)), 'tcp_conns.js');

/** The cache workload: how many names, their Zipf exponent, the share of unique names, the file's length, its seed. */
const CACHE_NAMES = 300;
const CACHE_ZIPF_S = 1.0;
const CACHE_UNIQUE_SHARE = 0.1;
const CACHE_QUERY_LINES = 100_000;
const CACHE_SEED = 0x5eed_cac4;
/** stub load's window of outstanding queries (dnsperf's -q). */
const STUB_LOAD_OUTSTANDING = 200;

export interface LoadResult {
	sent: number;
	completed: number;
	lost: number;
	/** Seconds the generator says it ran. */
	runtime: number;
	/** Answers (or connections) per second. */
	qps: number;
	avgLatencyMs?: number;
	/** dnsperf: every answered query's latency in ms, in arrival order. */
	latencies?: Float64Array;
	/** tcp_conns: its own percentiles, in ms. */
	p50?: number | null;
	p99?: number | null;
	/** Two dnsperf at once: each one's figures. */
	perProcess?: Array<{ qps: number; completed: number; lost: number }>;
	/** stub load: answers with a non-zero RCODE (counted as completed too), and answers that matched no query. */
	rcodeErrors?: number;
	stray?: number;
}

export interface DnsperfRun {
	port: number;
	seconds: number;
	/** A fixed rate (-Q); saturation when absent. */
	qps?: number;
	/** A source address in 127.0.0.0/8 (-a). */
	src?: string;
	tcp?: boolean;
}

let dnsperfSeq = 0;
let queriesFile: string | null = null;

/* The query file in the session's directory, written on first use. */
function queries(session: BenchSession): string {
	if (queriesFile === null) {
		queriesFile = path.join(session.tmp, 'queries.txt');
		writeFileSync(queriesFile, [...QUERY_NAMES.map((n) => `${n} A`), ''].join('\n'));
	}
	return queriesFile;
}

/* The workload's files, by share of unique names (0: the hits-only variant). */
const cacheQueriesFiles = new Map<number, string>();

/**
 * The cache workload's query file in the session's directory, written on
 * first use; with `uniqueShare` 0, the same popular names with no unique
 * one (every query a hit once warm: the cost of a hit alone).
 */
export function cacheQueries(session: BenchSession, uniqueShare = CACHE_UNIQUE_SHARE): string {
	let file = cacheQueriesFiles.get(uniqueShare);
	if (file === undefined) {
		const rand = seededRandom(CACHE_SEED);
		/* The cumulative Zipf distribution over the ranks, searched by bisection for each draw. */
		const cdf = new Float64Array(CACHE_NAMES);
		let total = 0;
		for (let k = 0; k < CACHE_NAMES; k++) {
			total += 1 / (k + 1) ** CACHE_ZIPF_S;
			cdf[k] = total;
		}
		const lines: string[] = [];
		for (let i = 0; i < CACHE_QUERY_LINES; i++) {
			if (rand() < uniqueShare) {
				lines.push('*.uniq.binder.test A');
				continue;
			}
			const u = rand() * total;
			let lo = 0;
			let hi = CACHE_NAMES - 1;
			while (lo < hi) {
				const mid = (lo + hi) >> 1;
				if (cdf[mid] < u) {
					lo = mid + 1;
				} else {
					hi = mid;
				}
			}
			lines.push(`svc${String(lo).padStart(3, '0')}.binder.test A`);
		}
		file = path.join(session.tmp, `cache-queries-${uniqueShare}.txt`);
		writeFileSync(file, `${lines.join('\n')}\n`);
		cacheQueriesFiles.set(uniqueShare, file);
	}
	return file;
}

export interface StubLoadRun {
	port: number;
	seconds: number;
	queryFile: string;
	/** Round-robin over this many source addresses, from firstSource up. */
	sources: number;
	firstSource: string;
}

/** One `stub load` run: the query file from many sources at saturation, its summary line parsed. */
export async function stubLoad(session: BenchSession, run: StubLoadRun): Promise<LoadResult> {
	const args = ['load', String(run.port), String(run.seconds), run.queryFile, String(run.sources), run.firstSource,
		String(STUB_LOAD_OUTSTANDING)];
	const child = session.children.start('stub load', STUB_BIN, args, { expectExit: true });
	const status = await child.waitExit(run.seconds * 1000 + OVERRUN_MS);
	const m = /sent (\d+) answered (\d+) lost (\d+) rcode_errors (\d+) stray (\d+) runtime_s ([\d.]+) qps ([\d.]+) p50_us (-?\d+) p99_us (-?\d+)/
		.exec(child.output);
	if (status.code !== 0 || m === null) {
		throw new Error(`stub ${args.join(' ')} failed (code ${status.code}, signal ${status.signal}): ${child.output.slice(-1000)}`);
	}
	const [sent, completed, lost, rcodeErrors, stray, runtime, qps, p50us, p99us] = m.slice(1).map(Number);
	return {
		sent, completed, lost, runtime, qps, rcodeErrors, stray,
		p50: p50us < 0 ? null : p50us / 1000, p99: p99us < 0 ? null : p99us / 1000,
	};
}

/* Every per-query latency in a dnsperf -v output, in ms ("> ..." lines but the "> T" timeouts). */
function parseLatencies(text: string, expected: number): Float64Array {
	let lat = new Float64Array(Math.max(1024, expected + 16));
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
	return lat.subarray(0, n);
}

/** One dnsperf run, its output parsed: the summary, and every query's latency. */
export async function dnsperf(session: BenchSession, run: DnsperfRun): Promise<LoadResult> {
	const file = path.join(session.tmp, `dnsperf-${++dnsperfSeq}.out`);
	const fd = openSync(file, 'w');
	const args = ['-s', '127.0.0.1', '-p', String(run.port), '-d', queries(session), '-c', String(DNSPERF_CLIENTS),
		'-q', String(DNSPERF_OUTSTANDING), '-l', String(run.seconds), '-t', String(DNSPERF_TIMEOUT_SECS), '-v'];
	if (run.qps !== undefined) {
		args.push('-Q', String(run.qps));
	}
	if (run.src !== undefined) {
		args.push('-a', run.src);
	}
	if (run.tcp === true) {
		args.push('-m', 'tcp');
	}
	const child = session.children.start('dnsperf', 'dnsperf', args, { stdout: fd, stderr: fd, expectExit: true });
	closeSync(fd);
	const status = await child.waitExit(run.seconds * 1000 + OVERRUN_MS);
	const text = readFileSync(file, 'utf8');
	rmSync(file, { force: true });
	const num = (re: RegExp): number | null => {
		const m = re.exec(text);
		return m ? Number(m[1]) : null;
	};
	const sent = num(/Queries sent:\s+(\d+)/);
	const completed = num(/Queries completed:\s+(\d+)/);
	const lost = num(/Queries lost:\s+(\d+)/);
	const runtime = num(/Run time \(s\):\s+([\d.]+)/);
	const qps = num(/Queries per second:\s+([\d.]+)/);
	if (status.code !== 0 || sent === null || completed === null || lost === null || runtime === null || qps === null) {
		throw new Error(`dnsperf ${args.join(' ')} failed (code ${status.code}, signal ${status.signal}):\n`
			+ text.split('\n').filter((l) => !l.startsWith('> ')).slice(-15).join('\n'));
	}
	return {
		sent, completed, lost, runtime, qps,
		avgLatencyMs: (num(/Average Latency \(s\):\s+([\d.]+)/) ?? NaN) * 1000,
		latencies: parseLatencies(text, completed),
	};
}

/** Two (or more) dnsperf that ran at once, as one. */
export function mergeDnsperf(rs: LoadResult[]): LoadResult {
	const lat = new Float64Array(rs.reduce((a, r) => a + (r.latencies?.length ?? 0), 0));
	let o = 0;
	for (const r of rs) {
		if (r.latencies !== undefined) {
			lat.set(r.latencies, o);
			o += r.latencies.length;
		}
	}
	const completed = rs.reduce((a, r) => a + r.completed, 0);
	return {
		sent: rs.reduce((a, r) => a + r.sent, 0),
		completed,
		lost: rs.reduce((a, r) => a + r.lost, 0),
		runtime: Math.max(...rs.map((r) => r.runtime)),
		qps: rs.reduce((a, r) => a + r.qps, 0),
		avgLatencyMs: rs.reduce((a, r) => a + (r.avgLatencyMs ?? NaN) * r.completed, 0) / Math.max(1, completed),
		latencies: lat,
		perProcess: rs.map((r) => ({ qps: r.qps, completed: r.completed, lost: r.lost })),
	};
}

/** One tcp_conns run: new TCP connections per second to 127.0.0.1:port, one query each. */
export async function tcpConns(session: BenchSession, run: { port: number; seconds: number }): Promise<LoadResult> {
	const child = session.children.start('tcp_conns', process.execPath, [TCP_CONNS_JS, '--port', String(run.port),
		'--seconds', String(run.seconds), '--workers', String(TCP_CONNS_WORKERS)], { expectExit: true });
	const status = await child.waitExit(run.seconds * 1000 + OVERRUN_MS);
	const line = child.output.trim().split('\n').pop() ?? '';
	let j: TcpConnsResult;
	try {
		j = JSON.parse(line) as TcpConnsResult;
	} catch {
		throw new Error(`tcp_conns failed (code ${status.code}): ${child.output.slice(-1000)}`);
	}
	const failed = j.errors + j.timeouts;
	return {
		sent: j.completed + failed, completed: j.completed, lost: failed, runtime: j.seconds, qps: j.rate,
		p50: j.p50_ms, p99: j.p99_ms,
	};
}
