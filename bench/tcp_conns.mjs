#!/usr/bin/env node
/*
 * New TCP connections per second: N workers, each in a loop of
 * connect -> one DNS query (www.example.com A, RFC 1035 length-prefixed)
 * -> the whole answer -> close, for S seconds.  dnsperf keeps its TCP
 * connections open, so it cannot measure this.
 *
 *   node bench/tcp_conns.mjs --port PORT [--host 127.0.0.1] [--workers 8]
 *        [--seconds 5] [--timeout-ms 2000]
 *
 * Prints one JSON line: {"completed","errors","timeouts","seconds","rate",
 * "p50_ms","p99_ms"} where rate = completed / seconds and the latencies run
 * from connect() to the last byte of the answer.  The client closes first
 * (as DNS clients do), so the TIME_WAIT states are the client's: Linux
 * reuses them for new loopback connections (net.ipv4.tcp_tw_reuse=2, the
 * default), which keeps a few thousand connections a second from running
 * out of ephemeral ports.  Only loopback (127.0.0.0/8) targets are accepted;
 * the run ends by itself after S seconds plus at most the timeout.
 */
import net from 'node:net';

const args = { host: '127.0.0.1', port: 0, workers: 8, seconds: 5, 'timeout-ms': 2000 };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i += 2) {
	const k = argv[i].replace(/^--/, '');
	if (!(k in args) || argv[i + 1] === undefined) {
		process.stderr.write('usage: tcp_conns.mjs --port PORT [--host H] [--workers N] [--seconds S] [--timeout-ms MS]\n');
		process.exit(2);
	}
	args[k] = k === 'host' ? argv[i + 1] : Number(argv[i + 1]);
}
if (!/^127\.\d+\.\d+\.\d+$/.test(args.host) || !(args.port > 0 && args.port < 65536)) {
	process.stderr.write('tcp_conns: --host must be in 127.0.0.0/8 and --port given\n');
	process.exit(2);
}

/* www.example.com A IN, RD, behind its 2-byte length. */
const name = [3, ...Buffer.from('www'), 7, ...Buffer.from('example'), 3, ...Buffer.from('com'), 0];
const dns = Buffer.from([0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, ...name, 0, 1, 0, 1]);
const query = Buffer.alloc(2 + dns.length);
query.writeUInt16BE(dns.length, 0);
dns.copy(query, 2);

const deadline = performance.now() + args.seconds * 1000;
const latencies = [];
let completed = 0;
let errors = 0;
let timeouts = 0;

function once() {
	return new Promise((resolve) => {
		const t0 = performance.now();
		let got = Buffer.alloc(0);
		let finished = false;
		const id = (Math.random() * 65536) | 0;
		const q = Buffer.from(query);
		q.writeUInt16BE(id, 2);
		const sock = net.connect({ host: args.host, port: args.port });
		const timer = setTimeout(() => finish('timeout'), args['timeout-ms']);
		function finish(outcome) {
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
		sock.on('data', (d) => {
			got = got.length === 0 ? d : Buffer.concat([got, d]);
			if (got.length >= 2 && got.length >= 2 + got.readUInt16BE(0)) {
				const ok = got.length >= 4 && got.readUInt16BE(2) === id && (got[4] & 0x80) !== 0;
				finish(ok ? 'ok' : 'error');
			}
		});
		sock.on('error', () => finish('error'));
		sock.on('close', () => finish('error'));
	});
}

async function worker() {
	while (performance.now() < deadline) {
		await once();
	}
}

const start = performance.now();
await Promise.all(Array.from({ length: args.workers }, worker));
const seconds = (performance.now() - start) / 1000;
latencies.sort((a, b) => a - b);
const pct = (p) => (latencies.length === 0 ? null
	: Number(latencies[Math.min(latencies.length - 1, Math.floor(p * latencies.length))].toFixed(3)));
process.stdout.write(`${JSON.stringify({
	completed, errors, timeouts, seconds: Number(seconds.toFixed(3)),
	rate: Number((completed / seconds).toFixed(1)), p50_ms: pct(0.5), p99_ms: pct(0.99),
})}\n`);
