/*
 * METRICS
 *
 * Prometheus metrics for bbal, served over HTTP at /metrics when
 * `--http HOST:PORT` is given (off by default: an open HTTP port on a DNS
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
 * This module is imported only when --http is given (balancer.ts loads
 * it with import()), because prom-client costs about 10 MB of RSS.
 *
 * A STALL is visible here without bbal doing anything per packet:
 * prom-client's default nodejs_eventloop_lag_seconds (the lag of a timer
 * at scrape time) and nodejs_eventloop_lag_{min,max,mean,stddev,p50,p90,
 * p99}_seconds, which come from perf_hooks.monitorEventLoopDelay and are
 * reset at every scrape, so nodejs_eventloop_lag_max_seconds is the longest
 * the loop was held up since the previous scrape.
 *
 * The HTTP listener that serves /metrics is http_listener.ts's (with the
 * dashboard, --http; --metrics is its old name).
 */

import { collectDefaultMetrics, Counter, Gauge, Histogram, type Metric, Registry } from 'prom-client';
import { type AnswerCounts, LATENCY_BUCKETS, latencyBoundMs } from './answers.js';
import type { BackendView } from './backends.js';
import type { HttpListenerStats } from './http_listener.js';
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

export class Metrics {
	readonly registry = new Registry();
	private readonly heartbeatRtt: Histogram<'backend'>;

	/** `listener`: the HTTP listener's own counts (http_listener.ts), read at scrape time. */
	constructor(src: StatsSources, listener: { readonly stats: HttpListenerStats; readonly streams: number }) {
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
		/* The HTTP listener's (the name is from when it served /metrics alone). */
		const ls = listener.stats;
		byLabel('bbal_metrics_connections_dropped_total', 'Connections to the HTTP listener closed by bbal, by reason.',
			'reason', () => ({
				idle_evicted: ls.evicted, over_cap: ls.overCap, streams_over_cap: ls.streamsOverCap,
				stream_too_slow: ls.streamsTooSlow, snapshots_over_cap: ls.snapshotsOverCap,
			}));
		new Gauge({
			name: 'bbal_http_streams', help: 'Dashboards following the live stream now.', registers,
			collect() {
				this.set(listener.streams);
			},
		});
		const front = src.udp.cache;
		if (front) {
			const c = front.cache.stats;
			total('bbal_cache_hits_total', 'UDP queries answered from the packet cache.', () => c.hits);
			total('bbal_cache_misses_total', 'Cacheable UDP queries the packet cache had no fresh answer for.', () => c.misses);
			total('bbal_cache_inserts_total', 'Answers filed in the packet cache.', () => c.inserts);
			total('bbal_cache_evictions_total', 'Packet cache entries evicted at --cache-size.', () => c.evictions);
			total('bbal_cache_stale_answers_total', 'Expired answers served because no backend could answer (--serve-stale).',
				() => c.staleHits);
			byLabel('bbal_cache_uncacheable_total', 'Answers to cacheable queries that were not filed, by reason.', 'reason',
				() => c.uncacheable);
			new Gauge({
				name: 'bbal_cache_entries', help: 'Answers held in the packet cache.', registers,
				collect() {
					this.set(c.entries);
				},
			});
			new Gauge({
				name: 'bbal_cache_bytes', help: 'Bytes the packet cache\'s answers take (with a per-entry estimate).', registers,
				collect() {
					this.set(c.bytes);
				},
			});
		}
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

	/** The exposition text and its content type. */
	async render(): Promise<{ contentType: string; body: string }> {
		return { contentType: this.registry.contentType, body: await this.registry.metrics() };
	}
}
