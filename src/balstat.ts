/*
 * BALSTAT
 *
 * The operator's view of a running bbal: connect to its stats socket, read
 * the snapshot (stats.ts) and print it as the original balstat did -- the
 * backends, then every remote peer and the backend serving it -- or, with
 * --json, the snapshot exactly as bbal sent it, for scripts and jq.
 *
 * Between the two, BACKEND HEALTH is what bbal adds to the original: per
 * backend, whether it is healthy (or sick, and why), how many answers it
 * gave and what share of them were SERVFAIL, its p50 and p99 latency over
 * the last minute, its queries outstanding and unanswered, and its last
 * probe.  It is a table of its own, keyed by ID, so that neither table
 * grows past a hundred columns.
 *
 *   balstat [-S PATH] [--json]
 *   balstat --version    (bbal's version: the two come from one package)
 *
 * When nothing listens at PATH it says so in one line and exits 1: the
 * usual causes are a bbal that is not running or one started with another
 * -S, and the message names both.  So does a document cut short (bbal
 * ends a whole one with a newline): bbal closes a reader over its cap of
 * stats connections at once, and one that has not finished in 10 s.
 */

import net from 'node:net';
import yargs from 'yargs';
import { answerTotal } from './answers.js';
import { packageVersion } from './options.js';
import { ipv4ToU32 } from './protocol.js';
import { DEFAULT_STATS_SOCKET, type Snapshot } from './stats.js';

/* A cell with no value. */
const NONE = '-';

/*
 * A fixed-width text table; numbers right-aligned, text left-aligned.  A
 * column of numbers may have '-' where there is none (no latency yet): it
 * is still a column of numbers.
 */
export function table(header: string[], rows: Array<Array<string | number>>): string {
	const cells = [header, ...rows.map((r) => r.map(String))];
	const widths = header.map((_, i) => Math.max(...cells.map((r) => (r[i] ?? '').length)));
	const numeric = header.map((_, i) => rows.some((r) => typeof r[i] === 'number')
		&& rows.every((r) => typeof r[i] === 'number' || r[i] === NONE));
	return cells.map((r) => r.map((c, i) => {
		const w = widths[i];
		if (i === r.length - 1) {
			return c;
		}
		return numeric[i] ? c.padStart(w) : c.padEnd(w);
	}).join('  ').trimEnd()).join('\n');
}

type BackendSnapshot = Snapshot['backends'][number];

/* healthy, or sick:REASON. */
function healthCell(b: BackendSnapshot): string {
	return b.health === 'sick' ? `sick:${b.healthReason ?? '?'}` : b.health;
}

/* Milliseconds to two significant digits: the latencies are bucket bounds about 41% apart. */
function msCell(ms: number | null): number | string {
	return ms === null ? NONE : Number(ms.toPrecision(2));
}

/* Its answers, every rcode. */
const answered = (b: BackendSnapshot): number => answerTotal(b.answers);

/* The share of its answers that were SERVFAIL, in percent to a tenth. */
function servfailCell(b: BackendSnapshot): number | string {
	const n = answered(b);
	return n === 0 ? NONE : Number((100 * b.answers.servfail / n).toFixed(1));
}

/* ok 0.4ms; fail:servfail, fail:timeout (no answer in time) or fail:slow (an answer, after the timeout). */
function probeCell(b: BackendSnapshot): string {
	const p = b.probe;
	if (p === null) {
		return NONE;
	}
	if (p.ok) {
		return p.ms === null ? 'ok' : `ok ${Number(p.ms.toPrecision(2))}ms`;
	}
	return p.rcode === null ? 'fail:timeout' : p.rcode === 2 ? 'fail:servfail' : 'fail:slow';
}

export function formatSnapshot(snap: Snapshot): string {
	const out: string[] = [];
	const tk = snap.takeover;
	out.push(`bbal pid ${snap.pid} on ${snap.listen.address}:${snap.listen.port}, up since ${snap.startedAt}`
		+ (tk === undefined ? '' : `; took over from pid ${tk.fromPid} (${tk.fromVersion}) with ${tk.remotes} remotes`));
	out.push('');
	out.push('BACKENDS');
	out.push(table(
		['ID', 'OK', 'STATE', 'REMOTES', 'UDP', 'TCP', 'STUCK', 'CONNERR', 'FAULTS', 'SOCKET PATH'],
		snap.backends.map((b) => [b.id, b.ok ? 'yes' : 'no', b.state, b.remotes, b.stats.udp, b.stats.tcp,
			b.stats.stuck, b.stats.connError, b.stats.faults, b.path]),
	));
	out.push('');
	/* A bbal from before answer accounting sends none of this. */
	if (snap.backends.every((b) => b.answers !== undefined)) {
		out.push('BACKEND HEALTH');
		out.push(table(
			['ID', 'HEALTH', 'ANSWERS', 'SERVFAIL%', 'P50MS', 'P99MS', 'OUTSTANDING', 'UNANSWERED', 'PROBE'],
			snap.backends.map((b) => [b.id, healthCell(b), answered(b), servfailCell(b), msCell(b.latencyMs.p50),
				msCell(b.latencyMs.p99), b.outstanding, b.unanswered, probeCell(b)]),
		));
		if (snap.failOpen) {
			out.push('every connected backend is sick: failing open (each serves its remotes as if healthy)');
		}
		out.push('');
	}
	out.push('REMOTE PEERS');
	const remotes = [...snap.remotes].sort((a, b) => ipv4ToU32(a.ip) - ipv4ToU32(b.ip));
	out.push(table(
		['ADDRESS', 'BACKEND', 'BACKUP', 'UDP', 'UDPDROP', 'INVALID', 'RATELIM', 'TCP', 'TCPDROP', 'LAST SEEN'],
		remotes.map((r) => [r.ip, r.backend === 0 ? '-' : String(r.backend), r.backup === 0 ? '-' : String(r.backup),
			r.stats.udp, r.stats.udpDrop, r.stats.udpInvalid ?? 0, r.stats.rateLimited ?? 0, r.stats.tcp,
			r.stats.tcpDrop, r.lastSeen]),
	));
	out.push('');
	const u = snap.udp;
	const c = snap.tcp;
	out.push(`remotes: ${snap.remotes.length} held (max ${snap.maxRemotes}), ${snap.remotesExpired} expired, `
		+ `${snap.remotesEvicted} evicted`);
	out.push(`udp: received ${u.received}, forwarded ${u.forwarded}, answers sent ${u.sent}; `
		+ `dropped: oversize ${u.oversize}, not DNS ${u.invalid}, outside --allow ${u.aclDropped}, `
		+ `no backend ${u.noBackend}, stuck ${u.stuck}; rate limited ${u.rateLimited}; `
		+ `bbal answered SERVFAIL ${u.servfail}, REFUSED ${u.refused}; backend answers matching no query (dropped) `
		+ `${u.unsolicited ?? 0}; socket errors: receiving `
		+ `${u.receiveErrors ?? 0}, sending ${u.sendErrors} (${u.sendQueueFull ?? 0} with the send queue full)`);
	out.push(`tcp: open ${c.open}, accepted ${c.accepted}, established ${c.established}; `
		+ `closed: over cap ${c.overCap}, outside --allow ${c.aclDropped}, no backend ${c.noBackend}, `
		+ `not DNS ${c.invalid}, idle ${c.idleClosed}, client gone before the backend ${c.abandoned}, `
		+ `over the per-source cap ${c.overRemoteCap ?? 0}, query too slow ${c.messageTimeouts ?? 0}, `
		+ `evicted idle ${c.evictedIdle ?? 0}, evicted busy ${c.evictedBusy ?? 0}; paused: client not reading `
		+ `${c.pausedClientNotReading ?? 0}, backend not reading ${c.pausedBackendNotReading ?? 0}, `
		+ `query cap ${c.pausedQueryCap ?? 0}, source query cap ${c.pausedSourceQueryCap ?? 0}`);
	const cache = snap.cache;
	if (cache !== undefined) {
		const asked = cache.hits + cache.misses;
		const rate = asked === 0 ? '-' : `${(100 * cache.hits / asked).toFixed(1)}%`;
		out.push(`cache: ${cache.entries} entries of ${cache.maxEntries} (${Math.round(cache.bytes / 1024)} KiB), `
			+ `hits ${cache.hits}, misses ${cache.misses} (hit rate ${rate}), inserts ${cache.inserts}, `
			+ `evictions ${cache.evictions}; stale answers ${cache.staleHits}; max TTL ${cache.maxTtlSecs} s, `
			+ `serve stale ${cache.serveStaleSecs > 0 ? `${cache.serveStaleSecs} s` : 'off'}`);
	}
	const ss = snap.statsSocket;
	if (ss !== undefined) {
		out.push(`stats socket: open ${ss.open}, served ${ss.served}; closed: over cap ${ss.overCap}, too slow ${ss.timedOut}`);
	}
	return out.join('\n');
}

/** Read the whole snapshot from the stats socket. */
export function readSnapshot(socketPath: string): Promise<string> {
	return new Promise((resolve, reject) => {
		const chunks: Buffer[] = [];
		const s = net.createConnection({ path: socketPath });
		s.on('data', (d: Buffer) => chunks.push(d));
		s.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
		s.on('error', reject);
	});
}

export async function main(argv: string[]): Promise<void> {
	let args;
	try {
		args = yargs(argv)
			.scriptName('balstat')
			.usage('$0 [-S PATH] [--json]\n\nShow the backends and remote peers of a running bbal.')
			/* Ours below, printed the way bbal prints it. */
			.version(false)
			.option('stats-socket', {
				alias: 'S', type: 'string', default: DEFAULT_STATS_SOCKET, describe: "bbal's stats socket",
			})
			.option('json', { type: 'boolean', default: false, describe: 'print the raw JSON snapshot' })
			.option('version', { type: 'boolean', describe: 'print the version and exit' })
			.strict()
			.help()
			.alias('help', 'h')
			.exitProcess(false)
			.fail((msg, err) => {
				throw new Error(msg ?? err?.message ?? 'bad arguments');
			})
			.parseSync();
	} catch (err) {
		process.stderr.write(`balstat: ${(err as Error).message}\n`);
		process.exit(2);
	}
	if (args.help) {
		return;
	}
	if (args.version === true) {
		process.stdout.write(`${packageVersion()}\n`);
		return;
	}
	const p = String(args['stats-socket']);
	let text: string;
	try {
		text = await readSnapshot(p);
	} catch (err) {
		const code = (err as NodeJS.ErrnoException).code;
		const why = code === 'ENOENT' || code === 'ECONNREFUSED'
			? `nothing is listening at ${p} (is bbal running, with -S ${p}?)`
			: `cannot read ${p}: ${(err as Error).message}`;
		process.stderr.write(`balstat: ${why}\n`);
		process.exit(1);
	}
	if (!text.endsWith('\n')) {
		process.stderr.write(`balstat: ${p} closed the connection before the whole snapshot `
			+ '(too many readers at once, or too slow a read); try again\n');
		process.exit(1);
	}
	if (args.json) {
		process.stdout.write(text);
		return;
	}
	let snap: Snapshot;
	try {
		snap = JSON.parse(text) as Snapshot;
	} catch {
		process.stderr.write(`balstat: ${p} did not send a bbal snapshot\n`);
		process.exit(1);
	}
	process.stdout.write(`${formatSnapshot(snap)}\n`);
}
