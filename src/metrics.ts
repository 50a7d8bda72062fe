/*
 * METRICS
 *
 * Prometheus metrics for bbal, served over HTTP at /metrics when
 * `--metrics HOST:PORT` is given (off by default: an open HTTP port on a DNS
 * host is something an operator should ask for).
 *
 * Nothing here runs per packet.  bbal already counts everything in plain
 * integer fields (Backend.stats, UdpProxy.stats, TcpListener.stats, the
 * remotes table's totals); the metrics are computed from those fields when
 * Prometheus scrapes, through prom-client's collect() hooks.  The one
 * exception is the heartbeat round-trip histogram, which must see each
 * sample: backend.ts reports every answered heartbeat (one per backend
 * every five seconds) through a callback that the balancer wires here.
 * The answer latency histogram is not one: a sample per answer would be
 * work per packet, so each backend's answer book keeps its own counts
 * (answers.ts) and bbal_backend_answer_latency_seconds is written from
 * them at scrape time, its buckets the book's power-of-two bounds
 * (latencyHistogram, ScrapedHistogram).
 *
 * Names follow Prometheus conventions: a `bbal_` prefix, `_total` on
 * counters, seconds for durations, and a `backend` label carrying the
 * backend id that logs and balstat show.  Process metrics (CPU, memory,
 * event-loop lag, handles) come from prom-client's defaults under their
 * standard names, without the prefix (`process_cpu_seconds_total`,
 * `process_resident_memory_bytes`, `nodejs_eventloop_lag_seconds` ...):
 * those are what stock dashboards and alerts query, and the job and
 * instance labels Prometheus adds already say which process they describe.
 *
 * This module is imported only when --metrics is given (balancer.ts loads
 * it with import()), because prom-client costs about 10 MB of RSS.
 *
 * A STALL is visible here without bbal doing anything per packet:
 * prom-client's default nodejs_eventloop_lag_seconds (the lag of a timer
 * at scrape time) and nodejs_eventloop_lag_{min,max,mean,stddev,p50,p90,
 * p99}_seconds, which come from perf_hooks.monitorEventLoopDelay and are
 * reset at every scrape, so nodejs_eventloop_lag_max_seconds is the longest
 * the loop was held up since the previous scrape.
 *
 * THE LISTENER'S BOUNDS.  Node keeps an HTTP connection that never sends a
 * request for a minute by default, so a few hundred idle connections used
 * up the process's descriptors.  Here a request must bring its headers
 * within METRICS_HEADERS_TIMEOUT_MS (5 s) of the connection (or of the
 * previous response) and be whole within METRICS_REQUEST_TIMEOUT_MS (10 s),
 * checked every second; a kept-alive connection idle for
 * METRICS_KEEP_ALIVE_MS (5 s) is closed.  At most METRICS_MAX_CONNECTIONS
 * (16) are open at once: a new connection over the cap closes the oldest
 * idle one (one that never sent a request before one that did, so the
 * scraper's kept-alive connection goes last), and is itself closed only if
 * every connection is busy with a request.  Both are counted.  A scrape
 * therefore gets through a flood of idle connections at once.  close()
 * closes every connection, idle or not.
 */

import http from 'node:http';
import type net from 'node:net';
import type { Logger } from 'pino';
import { collectDefaultMetrics, Counter, Gauge, Histogram, type Metric, Registry } from 'prom-client';
import { type AnswerCounts, LATENCY_BUCKETS, latencyBoundMs } from './answers.js';
import type { BackendView } from './backends.js';
import { handleFd } from './fd_pass.js';
import type { StatsSources } from './stats.js';

type BackendCounter = 'connStart' | 'connError' | 'udp' | 'tcp' | 'stuck' | 'faults' | 'throttled';

/* Each answer class of the book, as its rcode label. */
const RCODE_LABELS: ReadonlyArray<keyof AnswerCounts> = ['noerror', 'nxdomain', 'servfail', 'refused', 'other'];

/** One series of a histogram as Prometheus shows it: counts at or under each bound (seconds), all, and their sum. */
export interface PromHistogram {
	buckets: Array<{ le: number; count: number }>;
	count: number;
	sumSecs: number;
}

/**
 * An answer book's latency histogram (answers.ts: bucket k holds latencies
 * over latencyBoundMs(k - 1) and at most latencyBoundMs(k)) as Prometheus
 * buckets.  Every other bound, the even k, is a power of two of a
 * millisecond; Prometheus gets those, in seconds, each counting every
 * bucket up to it, so a bucket of the book is never split.  The last
 * bucket of the book has no upper bound (it takes everything slower), so
 * it is counted under +Inf alone.
 */
export function latencyHistogram(counts: ArrayLike<number>, sumMs: number): PromHistogram {
	const buckets: PromHistogram['buckets'] = [];
	let acc = 0;
	for (let k = 0; k < LATENCY_BUCKETS; k++) {
		acc += counts[k];
		if (k % 2 === 0 && k < LATENCY_BUCKETS - 1) {
			buckets.push({ le: latencyBoundMs(k) / 1000, count: acc });
		}
	}
	return { buckets, count: acc, sumSecs: sumMs / 1000 };
}

type HistogramValue = { metricName: string; labels: Record<string, string | number>; value: number };

/*
 * A histogram whose series are made at scrape time from counts kept
 * elsewhere.  prom-client's Histogram takes samples one observe() at a
 * time, which for answers would be work per packet; its registry takes
 * any object with a name, a help, a type and get() (registry.js reads no
 * more), so this is one, and writes the _bucket, _sum and _count lines
 * itself.  Series go when read() stops listing them.
 */
class ScrapedHistogram {
	readonly type = 'histogram';
	readonly aggregator = 'sum';

	constructor(
		readonly name: string,
		readonly help: string,
		private readonly read: () => Array<{ labels: Record<string, string | number>; hist: PromHistogram }>,
	) {}

	get(): Promise<{ name: string; help: string; type: string; aggregator: string; values: HistogramValue[] }> {
		const values: HistogramValue[] = [];
		const bucket = `${this.name}_bucket`;
		for (const { labels, hist } of this.read()) {
			for (const b of hist.buckets) {
				values.push({ metricName: bucket, labels: { ...labels, le: b.le }, value: b.count });
			}
			values.push({ metricName: bucket, labels: { ...labels, le: '+Inf' }, value: hist.count });
			values.push({ metricName: `${this.name}_sum`, labels, value: hist.sumSecs });
			values.push({ metricName: `${this.name}_count`, labels, value: hist.count });
		}
		return Promise.resolve({ name: this.name, help: this.help, type: this.type, aggregator: this.aggregator, values });
	}

	/* Registry.resetMetrics(): nothing is kept here to reset. */
	reset(): void {}
}

/** Connections to /metrics open at once. */
export const METRICS_MAX_CONNECTIONS = 16;
/** From a connection (or the previous response) to a request's last header. */
export const METRICS_HEADERS_TIMEOUT_MS = 5_000;
/** From a connection to a whole request. */
export const METRICS_REQUEST_TIMEOUT_MS = 10_000;
/** An idle kept-alive connection is closed after this. */
export const METRICS_KEEP_ALIVE_MS = 5_000;
/* How often Node checks the two request deadlines. */
const METRICS_TIMEOUT_CHECK_MS = 1_000;

/** What a connection to /metrics is doing: a new one has sent no request yet. */
type MetricsConnectionState = 'new' | 'busy' | 'idle';

export interface MetricsListenerStats {
	/** Idle connections closed to make room for a new one. */
	evicted: number;
	/** New connections closed at once: every one open was busy. */
	overCap: number;
}

export class Metrics {
	readonly registry = new Registry();
	readonly listenerStats: MetricsListenerStats = { evicted: 0, overCap: 0 };
	private readonly heartbeatRtt: Histogram<'backend'>;
	private server: http.Server | null = null;
	/* The open connections, oldest first. */
	private readonly connections = new Map<net.Socket, MetricsConnectionState>();

	constructor(src: StatsSources, private readonly log: Logger) {
		const registers = [this.registry];
		const backends = (): BackendView[] => src.backends.views();
		collectDefaultMetrics({ register: this.registry });

		new Gauge({
			name: 'bbal_backend_up', help: 'Whether the backend is ok (1) or not (0).',
			labelNames: ['backend', 'path'], registers,
			collect() {
				this.reset();
				for (const be of backends()) {
					this.set({ backend: be.id, path: be.path }, be.ok ? 1 : 0);
				}
			},
		});
		new Gauge({
			name: 'bbal_backend_remotes', help: 'Remotes whose primary is this backend.',
			labelNames: ['backend'], registers,
			collect() {
				this.reset();
				for (const be of backends()) {
					this.set({ backend: be.id }, be.remoteCount);
				}
			},
		});
		const perBackend = (name: string, help: string, field: BackendCounter): void => {
			new Counter({
				name, help, labelNames: ['backend'], registers,
				collect() {
					this.reset();
					for (const be of backends()) {
						this.inc({ backend: be.id }, be.stats[field]);
					}
				},
			});
		};
		perBackend('bbal_backend_udp_forwarded_total', 'UDP queries forwarded to the backend.', 'udp');
		perBackend('bbal_backend_tcp_sessions_total', 'TCP sessions established with the backend.', 'tcp');
		perBackend('bbal_backend_stuck_drops_total', 'UDP queries dropped because the session was stuck.', 'stuck');
		perBackend('bbal_backend_faults_total', 'Control sessions torn down by a fault.', 'faults');
		perBackend('bbal_backend_connects_total', 'Control session connection attempts (reconnects included).', 'connStart');
		perBackend('bbal_backend_connect_errors_total', 'Socket errors on control sessions.', 'connError');
		perBackend('bbal_backend_throttled_turns_total',
			'Event-loop turns in which the control session used up its frame budget and was paused.', 'throttled');

		/*
		 * Answers and health (answers.ts, health.ts), read from each
		 * backend's book at scrape time like the counters above; with the
		 * path beside the id, as on bbal_backend_up.
		 */
		const ids = (be: BackendView): { backend: number; path: string } => ({ backend: be.id, path: be.path });
		const backendGauge = (name: string, help: string, read: (be: BackendView) => number): void => {
			new Gauge({
				name, help, labelNames: ['backend', 'path'], registers,
				collect() {
					this.reset();
					for (const be of backends()) {
						this.set(ids(be), read(be));
					}
				},
			});
		};
		const backendCounter = (name: string, help: string, read: (be: BackendView) => number): void => {
			new Counter({
				name, help, labelNames: ['backend', 'path'], registers,
				collect() {
					this.reset();
					for (const be of backends()) {
						this.inc(ids(be), read(be));
					}
				},
			});
		};
		backendGauge('bbal_backend_healthy', 'Whether the backend is healthy (1) or sick (0), apart from its session.',
			(be) => (be.health.state.name === 'healthy' ? 1 : 0));
		backendGauge('bbal_backend_outstanding', 'UDP queries forwarded to the backend and neither answered nor timed out.',
			(be) => be.health.book.outstanding);
		backendCounter('bbal_backend_unanswered_total', 'UDP queries the backend did not answer within --query-timeout.',
			(be) => be.health.book.unanswered);
		backendCounter('bbal_backend_health_transitions_total', 'Times the backend turned sick or healthy.',
			(be) => be.health.transitions);
		new Counter({
			name: 'bbal_backend_answers_total', help: 'UDP answers from the backend matched to a query, by rcode.',
			labelNames: ['backend', 'path', 'rcode'], registers,
			collect() {
				this.reset();
				for (const be of backends()) {
					const a = be.health.book.answers;
					for (const rcode of RCODE_LABELS) {
						this.inc({ ...ids(be), rcode }, a[rcode]);
					}
				}
			},
		});
		this.registry.registerMetric(new ScrapedHistogram('bbal_backend_answer_latency_seconds',
			'Time from forwarding a UDP query to the backend\'s answer (late answers included).',
			() => backends().map((be) => ({
				labels: ids(be),
				hist: latencyHistogram(be.health.book.latencyCounts, be.health.book.latencySumMs),
			}))) as unknown as Metric);

		this.heartbeatRtt = new Histogram({
			name: 'bbal_backend_heartbeat_rtt_seconds', help: 'Heartbeat round trip per backend.',
			labelNames: ['backend'], registers,
			buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15],
		});

		const total = (name: string, help: string, read: () => number): void => {
			new Counter({
				name, help, registers,
				collect() {
					this.reset();
					this.inc(read());
				},
			});
		};
		/* One counter, one label, its values read at scrape time. */
		const byLabel = (name: string, help: string, label: string, read: () => Record<string, number>): void => {
			new Counter({
				name, help, labelNames: [label], registers,
				collect() {
					this.reset();
					for (const [value, n] of Object.entries(read())) {
						this.inc({ [label]: value }, n);
					}
				},
			});
		};
		const udp = src.udp.stats;
		total('bbal_udp_received_total', 'UDP datagrams received from remotes.', () => udp.received);
		total('bbal_udp_forwarded_total', 'UDP queries forwarded to a backend.', () => udp.forwarded);
		total('bbal_udp_answers_total', 'UDP answers sent to remotes.', () => udp.sent);
		total('bbal_udp_receive_errors_total', 'Errors reading the UDP socket.', () => udp.receiveErrors);
		total('bbal_udp_send_errors_total', 'UDP answers that could not be sent.', () => udp.sendErrors);
		total('bbal_udp_send_queue_full_total', 'UDP answers dropped because the socket\'s send buffer or queue was full.',
			() => udp.sendQueueFull);
		byLabel('bbal_udp_dropped_total', 'UDP queries dropped, by reason.', 'reason', () => ({
			oversize: udp.oversize, invalid: udp.invalid, acl: udp.aclDropped, no_backend: udp.noBackend, stuck: udp.stuck,
		}));
		total('bbal_udp_rate_limited_total', 'UDP queries over --max-qps-per-remote.', () => udp.rateLimited);
		total('bbal_udp_unsolicited_answers_total', 'Backend answers dropped because they matched no query forwarded.',
			() => udp.unsolicited);
		const health = src.health;
		new Gauge({
			name: 'bbal_health_fail_open', help: 'Whether every connected backend is sick, so none is treated as sick (1).',
			registers,
			collect() {
				this.set(health.failOpen ? 1 : 0);
			},
		});
		byLabel('bbal_synthesized_answers_total', 'Answers bbal sent itself instead of a backend, by rcode.', 'rcode',
			() => ({ SERVFAIL: udp.servfail, REFUSED: udp.refused }));
		const tcp = src.tcp.stats;
		total('bbal_tcp_accepted_total', 'TCP connections accepted.', () => tcp.accepted);
		total('bbal_tcp_established_total', 'TCP sessions that reached a backend.', () => tcp.established);
		byLabel('bbal_tcp_dropped_total', 'TCP connections closed by bbal before or instead of a session, by reason.',
			'reason', () => ({
				over_cap: tcp.overCap, no_backend: tcp.noBackend, idle: tcp.idleClosed, bad_first_frame: tcp.badFirstFrame,
				ok_timeout: tcp.okTimeouts, acl: tcp.aclDropped, invalid: tcp.invalid, abandoned: tcp.abandoned,
				over_remote_cap: tcp.overRemoteCap, evicted_idle: tcp.evictedIdle, evicted_busy: tcp.evictedBusy,
				message_deadline: tcp.messageTimeouts,
			}));
		byLabel('bbal_tcp_paused_total', 'Times bbal stopped reading a TCP client, by reason.', 'reason', () => ({
			client_not_reading: tcp.pausedClientNotReading, backend_not_reading: tcp.pausedBackendNotReading,
			query_cap: tcp.pausedQueryCap,
			source_query_cap: tcp.pausedSourceQueryCap,
		}));
		new Gauge({
			name: 'bbal_tcp_open', help: 'TCP connections open now.', registers,
			collect() {
				this.set(src.tcp.size);
			},
		});
		new Gauge({
			name: 'bbal_remotes', help: 'Remote peers held now.', registers,
			collect() {
				this.set(src.remotes.size);
			},
		});
		total('bbal_backends_forgotten_total', 'Backends forgotten after their socket file was gone a minute.',
			() => src.backends.forgotten);
		total('bbal_remotes_expired_total', 'Remote peers forgotten after idling.', () => src.remotes.expired);
		total('bbal_remotes_evicted_total', 'Remote peers evicted at the --max-remotes cap.', () => src.remotes.evicted);
		const ls = this.listenerStats;
		byLabel('bbal_metrics_connections_dropped_total', 'Connections to /metrics closed by bbal at its cap, by reason.',
			'reason', () => ({ idle_evicted: ls.evicted, over_cap: ls.overCap }));
		const statsServer = src.statsServer;
		if (statsServer) {
			total('bbal_stats_connections_served_total', 'Stats socket readers sent the whole snapshot.',
				() => statsServer.stats.served);
			byLabel('bbal_stats_connections_dropped_total', 'Stats socket connections closed by bbal, by reason.', 'reason',
				() => ({ over_cap: statsServer.stats.overCap, timeout: statsServer.stats.timedOut }));
		}
	}

	observeHeartbeatRtt(be: BackendView, ms: number): void {
		this.heartbeatRtt.observe({ backend: be.id }, ms / 1000);
	}

	/*
	 * A forgotten backend's series go too.  The per-backend gauges and
	 * counters and the answer latency histogram are rebuilt from the
	 * registry at every scrape, so only the heartbeat histogram, fed sample
	 * by sample, keeps series of its own.
	 */
	forgetBackend(be: BackendView): void {
		this.heartbeatRtt.remove({ backend: be.id });
	}

	/** Connections to /metrics open now. */
	get connectionCount(): number {
		return this.connections.size;
	}

	/** The listening socket's descriptor, for a takeover to pass on (-1 when not listening). */
	get fd(): number {
		return this.server === null ? -1 : handleFd(this.server);
	}

	/** Serve /metrics on host:port or, given `fd` (a takeover's), on that socket; rejects with the listen error. */
	listen(host: string, port: number, fd?: number): Promise<void> {
		const server = http.createServer({
			headersTimeout: METRICS_HEADERS_TIMEOUT_MS,
			requestTimeout: METRICS_REQUEST_TIMEOUT_MS,
			keepAliveTimeout: METRICS_KEEP_ALIVE_MS,
			connectionsCheckingInterval: METRICS_TIMEOUT_CHECK_MS,
		}, this.serverOnRequest);
		server.on('connection', this.serverOnConnection);
		return new Promise((resolve, reject) => {
			server.once('error', reject);
			server.listen(fd === undefined ? { host, port } : { fd }, () => {
				server.removeListener('error', reject);
				server.on('error', (err) => this.log.error({ err }, 'metrics server error'));
				this.server = server;
				resolve();
			});
		});
	}

	/* The cap (see THE LISTENER'S BOUNDS): make room by closing the oldest idle connection, or refuse. */
	private readonly serverOnConnection = (sock: net.Socket): void => {
		if (this.connections.size >= METRICS_MAX_CONNECTIONS) {
			const victim = this.oldest('new') ?? this.oldest('idle');
			if (victim === null) {
				this.listenerStats.overCap++;
				sock.destroy();
				return;
			}
			this.listenerStats.evicted++;
			this.connections.delete(victim);
			victim.destroy();
		}
		this.connections.set(sock, 'new');
		sock.once('close', () => this.connections.delete(sock));
	};

	private oldest(state: MetricsConnectionState): net.Socket | null {
		for (const [sock, s] of this.connections) {
			if (s === state) {
				return sock;
			}
		}
		return null;
	}

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
		if (req.method !== 'GET' || (req.url ?? '').split('?')[0] !== '/metrics') {
			res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try /metrics\n');
			return;
		}
		this.registry.metrics().then((body) => {
			res.writeHead(200, { 'content-type': this.registry.contentType }).end(body);
		}, (err: unknown) => {
			this.log.error({ err }, 'could not collect metrics');
			res.writeHead(500).end();
		});
	};

	async close(): Promise<void> {
		const server = this.server;
		if (server === null) {
			return;
		}
		this.server = null;
		const closed = new Promise<void>((resolve) => server.close(() => resolve()));
		server.closeAllConnections();
		for (const sock of this.connections.keys()) {
			sock.destroy();
		}
		this.connections.clear();
		await closed;
	}
}
