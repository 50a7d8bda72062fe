/*
 * TCP CONNECTIONS PER SECOND
 *
 * A load generator for what dnsperf cannot measure, since it keeps its TCP
 * connections open: how many new connections a path serves.  N workers,
 * each in a loop of connect -> one DNS query (www.example.com A, RFC 1035
 * length-prefixed) -> the whole answer -> close, for S seconds.
 *
 *   node dist/bench/tcp_conns.js --port PORT [--host 127.0.0.1] [--workers 8]
 *        [--seconds 5] [--timeout-ms 2000]
 *
 * It runs as a child process of the benchmark (load_generators.ts), so that
 * its CPU is the load generator's, as dnsperf's is, and not the driver's.
 * It prints one JSON line, TcpConnsResult: {"completed", "errors",
 * "timeouts", "seconds", "rate", "p50_ms", "p99_ms"}, where rate = completed
 * / seconds and the latencies (nearest-rank percentiles,
 * test/support/quantiles.ts) run from connect() to the last byte of the
 * answer.  An answer counts only if it carries our id and the QR bit; one
 * that does not, a reset, or a close before the answer is an error; no
 * answer within the timeout is a timeout.
 *
 * The client closes first (as DNS clients do), so the TIME_WAIT states are
 * the client's: Linux reuses them for new loopback connections
 * (net.ipv4.tcp_tw_reuse=2, the default), which keeps a few thousand
 * connections a second from running out of ephemeral ports.  Only loopback
 * (127.0.0.0/8) targets are accepted; the run ends by itself after S seconds
 * plus at most the timeout.
 */

import net from 'node:net';
import { encodeQuery, framed, LengthPrefixReader } from '../test/support/dns_messages.js';
import { percentile } from '../test/support/quantiles.js';

/** What one run prints, as one JSON line (the field names are read by load_generators.ts). */
export interface TcpConnsResult {
	completed: number;
	errors: number;
	timeouts: number;
	seconds: number;
	rate: number;
	p50_ms: number | null;
	p99_ms: number | null;
}

const USAGE = 'usage: tcp_conns.js --port PORT [--host H] [--workers N] [--seconds S] [--timeout-ms MS]\n';

interface Args {
	host: string;
	port: number;
	workers: number;
	seconds: number;
	'timeout-ms': number;
}

function parseArgs(argv: string[]): Args {
	const args: Args = { host: '127.0.0.1', port: 0, workers: 8, seconds: 5, 'timeout-ms': 2000 };
	for (let i = 0; i < argv.length; i += 2) {
		const k = argv[i].replace(/^--/, '');
		const v = argv[i + 1];
		if (!Object.hasOwn(args, k) || v === undefined) {
			process.stderr.write(USAGE);
			process.exit(2);
		}
		if (k === 'host') {
			args.host = v;
		} else {
			args[k as Exclude<keyof Args, 'host'>] = Number(v);
		}
	}
	if (!/^127\.\d+\.\d+\.\d+$/.test(args.host) || !(args.port > 0 && args.port < 65536)) {
		process.stderr.write('tcp_conns: --host must be in 127.0.0.0/8 and --port given\n');
		process.exit(2);
	}
	return args;
}

type Outcome = 'ok' | 'timeout' | 'error';

const args = parseArgs(process.argv.slice(2));
/* One query, framed once; each connection copies it and writes its own id. */
const query = framed(encodeQuery('www.example.com', 'A', 0));
const deadline = performance.now() + args.seconds * 1000;
const latencies: number[] = [];
let completed = 0;
let errors = 0;
let timeouts = 0;

/* One connection: connect, one query, the whole answer, close. */
function once(): Promise<void> {
	return new Promise((resolve) => {
		const t0 = performance.now();
		const reader = new LengthPrefixReader();
		let finished = false;
		const id = (Math.random() * 65536) | 0;
		const q = Buffer.from(query);
		q.writeUInt16BE(id, 2);
		const sock = net.connect({ host: args.host, port: args.port });
		const timer = setTimeout(() => finish('timeout'), args['timeout-ms']);
		function finish(outcome: Outcome): void {
			if (finished) {
				return;
			}
			finished = true;
			clearTimeout(timer);
			sock.destroy();
			if (outcome === 'ok') {
				completed++;
				latencies.push(performance.now() - t0);
			} else if (outcome === 'timeout') {
				timeouts++;
			} else {
				errors++;
			}
			resolve();
		}
		sock.setNoDelay(true);
		sock.on('connect', () => sock.write(q));
		sock.on('data', (d: Buffer) => {
			const [answer] = reader.feed(d);
			if (answer !== undefined) {
				const ok = answer.length >= 3 && answer.readUInt16BE(0) === id && (answer[2] & 0x80) !== 0;
				finish(ok ? 'ok' : 'error');
			}
		});
		sock.on('error', () => finish('error'));
		sock.on('close', () => finish('error'));
	});
}

async function worker(): Promise<void> {
	while (performance.now() < deadline) {
		await once();
	}
}

const start = performance.now();
await Promise.all(Array.from({ length: args.workers }, worker));
const seconds = (performance.now() - start) / 1000;
latencies.sort((a, b) => a - b);
const pct = (p: number): number | null => {
	const v = percentile(latencies, p);
	return v === null ? null : Number(v.toFixed(3));
};
const result: TcpConnsResult = {
	completed, errors, timeouts, seconds: Number(seconds.toFixed(3)),
	rate: Number((completed / seconds).toFixed(1)), p50_ms: pct(0.5), p99_ms: pct(0.99),
};
process.stdout.write(`${JSON.stringify(result)}\n`);
