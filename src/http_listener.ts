/*
 * HTTP LISTENER
 *
 * The operators' HTTP port, `--http HOST:PORT` (`--metrics` is its old
 * name, and still works): off by default, bound to the address given, and
 * read-only -- GET and HEAD, nothing that changes bbal.  It serves:
 *
 *   /                 the dashboard (dashboard/index.html)
 *   /assets/NAME      the page's script, style and icon, and uPlot from
 *                     node_modules: every byte from bbal's own package, read
 *                     once at start, since the hosts that run bbal often
 *                     have no internet
 *   /live             the dashboard's live feed, Server-Sent Events: on
 *                     connect the hello, the status, the history (up to
 *                     fifteen minutes of samples) and the events; then every
 *                     second a sample, the status, and any new events
 *                     (sampler.ts takes them; the JSON is its)
 *   /metrics          Prometheus (metrics.ts)
 *   /snapshot.json    the stats snapshot, streamed as the stats socket
 *                     streams it (stats.ts, SnapshotStream)
 *   /remote?ip=A      one remote: its backend, backup, counters and times,
 *                     or "held": false (a 200 either way: a remote not held
 *                     is an answer, not a missing page, and the browser
 *                     would log a 404 as an error)
 *
 * Every response carries a Content-Security-Policy that lets the page load
 * its own script, style and feed from this origin and nothing else, with no
 * inline script or style, and may not be framed.
 *
 * THE SAMPLER'S SECOND.  The listener arms a wheel timeout that runs the
 * sampler at every tick of the wheel (once a second) and writes what it took
 * to every open stream: one string, built once, written N times.  It is
 * armed for half a second, not one: a timeout armed during a tick waits for
 * a later one, and one second after a moment just past this tick can fall
 * just after the next tick, which would make every other sample two
 * seconds apart.  The sampler runs whether or not a
 * dashboard is open, so a page that opens finds fifteen minutes of history.
 *
 * BOUNDS.  At most HTTP_MAX_CONNECTIONS (32) connections are open at once:
 * a new connection over the cap closes the oldest idle one (one that never
 * sent a request before one that did, so a scraper's kept-alive connection
 * goes last), and is itself closed only if every connection is busy; both
 * are counted.  A request must bring its headers within
 * HTTP_HEADERS_TIMEOUT_MS (5 s) and be whole within HTTP_REQUEST_TIMEOUT_MS
 * (10 s); a kept-alive connection idle HTTP_KEEP_ALIVE_MS (5 s) is closed.
 * Streams are busy for as long as they are open, so they have a cap of
 * their own below the connections': HTTP_MAX_STREAMS (16) dashboards; the
 * next is answered 503, so that a scrape always finds room.  A stream whose
 * reader has not caught up for HTTP_STREAM_STALL_SECS (30) -- the socket
 * took no more and has not drained since -- is closed and counted: the
 * page's EventSource reconnects and starts afresh.  What a stream can hold
 * in bbal is therefore its first write (the history, bounded by its 900
 * samples) and thirty seconds of samples.  At most
 * HTTP_MAX_SNAPSHOTS (4) /snapshot.json are streamed at once (503 beyond),
 * each within the stats socket's deadline.  close() closes everything.
 */

import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import { createRequire } from 'node:module';
import type net from 'node:net';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import type { Logger } from 'pino';
import { handleFd } from './fd_pass.js';
import { GatedLog } from './log.js';
import { Metrics } from './metrics.js';
import { packageRoot } from './options.js';
import { ipv4ToU32 } from './protocol.js';
import type { Sampler } from './sampler.js';
import { SnapshotStream, type SnapshotHost, type StatsSources } from './stats.js';
import type { Timeout } from './timeouts.js';

/** Connections open at once. */
export const HTTP_MAX_CONNECTIONS = 32;
/** Dashboards following /live at once. */
export const HTTP_MAX_STREAMS = 16;
/** /snapshot.json streamed at once. */
export const HTTP_MAX_SNAPSHOTS = 4;
/** A stream whose socket has not drained for this long is closed. */
export const HTTP_STREAM_STALL_SECS = 30;
/** From a connection (or the previous response) to a request's last header. */
export const HTTP_HEADERS_TIMEOUT_MS = 5_000;
/** From a connection to a whole request. */
export const HTTP_REQUEST_TIMEOUT_MS = 10_000;
/** An idle kept-alive connection is closed after this. */
export const HTTP_KEEP_ALIVE_MS = 5_000;
/* How often Node checks the two request deadlines. */
const HTTP_TIMEOUT_CHECK_MS = 1_000;
/* What the sampler's timeout is armed for: due by the wheel's next tick (see THE SAMPLER'S SECOND). */
const SAMPLE_ARM_SECS = 0.5;
/* How long a page's EventSource waits before it reconnects. */
const STREAM_RETRY_MS = 1_000;

export const CONTENT_SECURITY_POLICY = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
	+ "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const SECURITY_HEADERS: Readonly<Record<string, string>> = {
	'content-security-policy': CONTENT_SECURITY_POLICY,
	'x-content-type-options': 'nosniff',
	'referrer-policy': 'no-referrer',
};

/** The listener's own counts (also in /metrics). */
export interface HttpListenerStats {
	/** Idle connections closed to make room for a new one. */
	evicted: number;
	/** New connections closed at once: every one open was busy. */
	overCap: number;
	/** /live answered 503: HTTP_MAX_STREAMS were open. */
	streamsOverCap: number;
	/** Streams closed: their reader did not catch up for HTTP_STREAM_STALL_SECS. */
	streamsTooSlow: number;
	/** /snapshot.json answered 503: HTTP_MAX_SNAPSHOTS were being streamed. */
	snapshotsOverCap: number;
}

/** One file the listener serves: its bytes, gzipped, and its tag. */
interface Asset {
	type: string;
	body: Buffer;
	gzip: Buffer;
	etag: string;
}

/* What a connection is doing: a new one has sent no request yet. */
type ConnectionState = 'new' | 'busy' | 'idle';

/* URL path -> file, relative to the package's root. */
const ASSET_FILES: ReadonlyArray<[string, string, string]> = [
	['/', 'dashboard/index.html', 'text/html; charset=utf-8'],
	['/assets/app.js', 'dashboard/app.js', 'text/javascript; charset=utf-8'],
	['/assets/style.css', 'dashboard/style.css', 'text/css; charset=utf-8'],
	['/assets/favicon.svg', 'dashboard/favicon.svg', 'image/svg+xml'],
];
/* URL path -> file, resolved as a module from bbal's dependencies. */
const MODULE_FILES: ReadonlyArray<[string, string, string]> = [
	['/assets/uPlot.iife.min.js', 'uplot/dist/uPlot.iife.min.js', 'text/javascript; charset=utf-8'],
	['/assets/uPlot.min.css', 'uplot/dist/uPlot.min.css', 'text/css; charset=utf-8'],
];

/** Read the dashboard's files (once, at start); throws when one is missing. */
export function loadAssets(): Map<string, Asset> {
	const root = packageRoot();
	if (root === null) {
		throw new Error('cannot find bbal\'s package (its package.json) for the dashboard\'s files');
	}
	const require = createRequire(import.meta.url);
	const assets = new Map<string, Asset>();
	const add = (url: string, file: string, type: string): void => {
		const body = readFileSync(file);
		const etag = `"${createHash('sha256').update(body).digest('base64url').slice(0, 22)}"`;
		assets.set(url, { type, body, gzip: gzipSync(body), etag });
	};
	for (const [url, file, type] of ASSET_FILES) {
		add(url, path.join(root, file), type);
	}
	for (const [url, mod, type] of MODULE_FILES) {
		add(url, require.resolve(mod), type);
	}
	return assets;
}

export class HttpListener implements SnapshotHost {
	readonly stats: HttpListenerStats = { evicted: 0, overCap: 0, streamsOverCap: 0, streamsTooSlow: 0, snapshotsOverCap: 0 };
	readonly metrics: Metrics;
	private server: http.Server | null = null;
	private readonly assets: Map<string, Asset>;
	/* The open connections, oldest first. */
	private readonly connections = new Map<net.Socket, ConnectionState>();
	/* Each open stream, and since when (the wheel's ms) it has not drained; -1 while it keeps up. */
	private readonly liveStreams = new Map<http.ServerResponse, { stalledSinceMs: number }>();
	private readonly snapshots = new Set<SnapshotStream>();
	private nextSnapshotId = 1;
	/* The newest event every stream has been sent. */
	private sentSeq = 0;
	private readonly sampleTimeout: Timeout;
	private readonly slowStreamLog: GatedLog;
	private readonly slowSnapshotLog: GatedLog;

	constructor(readonly sources: StatsSources, private readonly sampler: Sampler, readonly log: Logger) {
		this.assets = loadAssets();
		this.slowStreamLog = new GatedLog(sources.wheel, 'warn', 'dashboard stream too slow (closed)');
		this.slowSnapshotLog = new GatedLog(sources.wheel, 'warn', 'snapshot.json reader too slow (closed)');
		this.metrics = new Metrics(sources, this);
		this.sampleTimeout = sources.wheel.create('dashboard sample', this.sampleDue);
	}

	/** Dashboards following /live now. */
	get streams(): number {
		return this.liveStreams.size;
	}

	/** The listening socket's descriptor, for a takeover to pass on (-1 when not listening). */
	get fd(): number {
		return this.server === null ? -1 : handleFd(this.server);
	}

	/** Serve on host:port or, given `fd` (a takeover's), on that socket; rejects with the listen error. */
	listen(host: string, port: number, fd?: number): Promise<void> {
		const server = http.createServer({
			headersTimeout: HTTP_HEADERS_TIMEOUT_MS,
			requestTimeout: HTTP_REQUEST_TIMEOUT_MS,
			keepAliveTimeout: HTTP_KEEP_ALIVE_MS,
			connectionsCheckingInterval: HTTP_TIMEOUT_CHECK_MS,
		}, this.serverOnRequest);
		server.on('connection', this.serverOnConnection);
		return new Promise((resolve, reject) => {
			server.once('error', reject);
			server.listen(fd === undefined ? { host, port } : { fd }, () => {
				server.removeListener('error', reject);
				server.on('error', (err) => this.log.error({ err }, 'http listener error'));
				this.server = server;
				this.sampler.run();
				this.sentSeq = this.sampler.events.lastSeq;
				this.sampleTimeout.set(SAMPLE_ARM_SECS);
				resolve();
			});
		});
	}

	/* ---- the sampler's second ---- */

	private readonly sampleDue = (): void => {
		this.sampleTimeout.set(SAMPLE_ARM_SECS);
		const sample = this.sampler.run();
		let frame = `event: sample\ndata: ${sample}\n\nevent: status\ndata: ${this.sampler.status}\n\n`;
		const events = this.sampler.events;
		if (events.lastSeq !== this.sentSeq) {
			frame += `event: events\ndata: ${JSON.stringify(events.since(this.sentSeq))}\n\n`;
			this.sentSeq = events.lastSeq;
		}
		const now = this.sources.wheel.nowMs;
		for (const [res, stream] of this.liveStreams) {
			if (stream.stalledSinceMs >= 0 && now - stream.stalledSinceMs >= HTTP_STREAM_STALL_SECS * 1000) {
				this.stats.streamsTooSlow++;
				this.slowStreamLog.report(this.log, { buffered: res.writableLength, stall_secs: HTTP_STREAM_STALL_SECS });
				res.destroy();
			} else {
				this.writeStream(res, stream, frame, now);
			}
		}
	};

	/* Write to a stream; note when its socket takes no more. */
	private writeStream(res: http.ServerResponse, stream: { stalledSinceMs: number }, frame: string, now: number): void {
		if (!res.write(frame) && stream.stalledSinceMs < 0) {
			stream.stalledSinceMs = now;
		}
	}

	/* ---- connections (see BOUNDS) ---- */

	private readonly serverOnConnection = (sock: net.Socket): void => {
		if (this.connections.size >= HTTP_MAX_CONNECTIONS) {
			const victim = this.oldest('new') ?? this.oldest('idle');
			if (victim === null) {
				this.stats.overCap++;
				sock.destroy();
				return;
			}
			this.stats.evicted++;
			this.connections.delete(victim);
			victim.destroy();
		}
		this.connections.set(sock, 'new');
		sock.once('close', () => this.connections.delete(sock));
	};

	private oldest(state: ConnectionState): net.Socket | null {
		for (const [sock, s] of this.connections) {
			if (s === state) {
				return sock;
			}
		}
		return null;
	}

	/* ---- requests ---- */

	private readonly serverOnRequest = (req: http.IncomingMessage, res: http.ServerResponse): void => {
		const sock = req.socket;
		if (this.connections.has(sock)) {
			this.connections.set(sock, 'busy');
			res.once('close', () => {
				if (this.connections.has(sock)) {
					this.connections.set(sock, 'idle');
				}
			});
		}
		if (req.method !== 'GET' && req.method !== 'HEAD') {
			this.reply(res, 405, 'text/plain', 'read-only: GET and HEAD only\n', { allow: 'GET, HEAD' });
			return;
		}
		const url = req.url ?? '/';
		const q = url.indexOf('?');
		const route = q < 0 ? url : url.slice(0, q);
		const asset = this.assets.get(route);
		if (asset !== undefined) {
			this.serveAsset(req, res, asset);
		} else if (route === '/live') {
			this.serveLive(req, res);
		} else if (route === '/metrics') {
			this.serveMetrics(req, res);
		} else if (route === '/snapshot.json') {
			this.serveSnapshot(req, res);
		} else if (route === '/remote') {
			this.serveRemote(res, new URLSearchParams(q < 0 ? '' : url.slice(q + 1)).get('ip') ?? '');
		} else {
			this.reply(res, 404, 'text/plain', 'not found: try /, /metrics, /snapshot.json\n');
		}
	};

	private reply(res: http.ServerResponse, status: number, type: string, body: string | Buffer,
		extra?: Record<string, string>): void {
		res.writeHead(status, { ...SECURITY_HEADERS, 'content-type': type, 'cache-control': 'no-store', ...extra });
		res.end(res.req.method === 'HEAD' ? undefined : body);
	}

	private serveAsset(req: http.IncomingMessage, res: http.ServerResponse, a: Asset): void {
		const headers: Record<string, string> = {
			...SECURITY_HEADERS, 'content-type': a.type, 'cache-control': 'no-cache', etag: a.etag, vary: 'accept-encoding',
		};
		if (req.headers['if-none-match'] === a.etag) {
			res.writeHead(304, headers).end();
			return;
		}
		const gzip = /\bgzip\b/.test(req.headers['accept-encoding'] ?? '');
		const body = gzip ? a.gzip : a.body;
		headers['content-length'] = String(body.length);
		if (gzip) {
			headers['content-encoding'] = 'gzip';
		}
		res.writeHead(200, headers).end(req.method === 'HEAD' ? undefined : body);
	}

	private serveLive(req: http.IncomingMessage, res: http.ServerResponse): void {
		if (this.liveStreams.size >= HTTP_MAX_STREAMS) {
			this.stats.streamsOverCap++;
			this.reply(res, 503, 'text/plain', `too many dashboards open (${HTTP_MAX_STREAMS})\n`, { 'retry-after': '10' });
			return;
		}
		res.writeHead(200, {
			...SECURITY_HEADERS, 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-store',
			'x-accel-buffering': 'no',
		});
		if (req.method === 'HEAD') {
			res.end();
			return;
		}
		const s = this.sampler;
		/* The status before the history, so that the page knows the backends' names when it draws the charts. */
		let first = `retry: ${STREAM_RETRY_MS}\nevent: hello\ndata: ${s.hello()}\n\nevent: status\ndata: ${s.status}\n\n`;
		for (const sample of s.samples()) {
			first += `event: sample\ndata: ${sample}\n\n`;
		}
		first += `event: events\ndata: ${JSON.stringify(s.events.since(0))}\n\n`;
		const stream = { stalledSinceMs: -1 };
		res.on('drain', () => {
			stream.stalledSinceMs = -1;
		});
		this.writeStream(res, stream, first, this.sources.wheel.nowMs);
		this.liveStreams.set(res, stream);
		s.talkersWanted = true;
		res.once('close', () => {
			this.liveStreams.delete(res);
			s.talkersWanted = this.liveStreams.size > 0;
		});
	}

	private serveMetrics(req: http.IncomingMessage, res: http.ServerResponse): void {
		this.metrics.render().then(({ contentType, body }) => {
			this.reply(res, 200, contentType, body);
		}, (err: unknown) => {
			this.log.error({ err }, 'could not collect metrics');
			this.reply(res, 500, 'text/plain', 'could not collect metrics\n');
		});
	}

	private serveSnapshot(req: http.IncomingMessage, res: http.ServerResponse): void {
		if (this.snapshots.size >= HTTP_MAX_SNAPSHOTS) {
			this.stats.snapshotsOverCap++;
			this.reply(res, 503, 'text/plain', `too many snapshots being sent (${HTTP_MAX_SNAPSHOTS})\n`, { 'retry-after': '1' });
			return;
		}
		res.writeHead(200, { ...SECURITY_HEADERS, 'content-type': 'application/json', 'cache-control': 'no-store' });
		if (req.method === 'HEAD') {
			res.end();
			return;
		}
		res.on('error', () => undefined);
		const stream = new SnapshotStream(this, res, this.nextSnapshotId++);
		this.snapshots.add(stream);
		stream.start();
	}

	/** SnapshotHost: a /snapshot.json ran out of time. */
	timedOut(): void {
		this.slowSnapshotLog.report(this.log, {});
	}

	/** SnapshotHost: a /snapshot.json is over. */
	released(stream: SnapshotStream): void {
		this.snapshots.delete(stream);
	}

	private serveRemote(res: http.ServerResponse, ip: string): void {
		const addr = ipv4ToU32(ip);
		if (addr < 0) {
			this.reply(res, 400, 'application/json', '{"error":"not an IPv4 address (a.b.c.d)"}');
			return;
		}
		const rem = this.sources.remotes.peek(addr);
		if (rem === undefined) {
			this.reply(res, 200, 'application/json', JSON.stringify({ ip, held: false }));
			return;
		}
		const be = (b: typeof rem.primary): { id: number; path: string } | null => (b === null ? null
			: { id: b.id, path: b.path });
		this.reply(res, 200, 'application/json', JSON.stringify({
			ip: rem.ip, held: true, backend: be(rem.primary), backup: be(rem.backup),
			stats: {
				udp: rem.udp, udpDrop: rem.udpDrop, tcp: rem.tcp, tcpDrop: rem.tcpDrop, udpInvalid: rem.udpInvalid,
				rateLimited: rem.rateLimited,
			},
			firstSeen: new Date(rem.firstSeenMs).toISOString(), lastSeen: new Date(rem.lastSeenMs).toISOString(),
		}));
	}

	/* ---- close ---- */

	/** Stop serving: every connection and stream closed; resolves once the port is. */
	async close(): Promise<void> {
		const server = this.server;
		if (server === null) {
			return;
		}
		this.server = null;
		this.sampleTimeout.clear();
		this.sampler.close();
		const closed = new Promise<void>((resolve) => server.close(() => resolve()));
		server.closeAllConnections();
		for (const sock of this.connections.keys()) {
			sock.destroy();
		}
		this.connections.clear();
		await closed;
	}
}
