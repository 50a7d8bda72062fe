/*
 * BALANCER
 *
 * One running bbal, without the process around it: every subsystem built
 * and wired together, the 1-second tick that drives the timeout wheel, and
 * the periodic jobs that span modules.  main.ts makes one from the command
 * line; a test makes one in-process, with its own clock and a UDP transport
 * it can feed by hand, against real backends in a temporary directory.
 *
 * WIRING.  The arrows go one way: the proxies ask remotes for a backend,
 * and remotes ask the backends registry to select one; backends never call
 * up.  Where a lower module must hand something upwards (an OUTBOUND_UDP
 * frame that the UDP socket must send, a heartbeat's round trip for the
 * metrics) the balancer passes it a callback.  No module keeps state in
 * globals: everything a subsystem needs is handed to it here.
 *
 * PERIODIC JOBS.  Three timeouts on the wheel, re-armed each time they fire:
 *
 *   rescan     every RESCAN_INTERVAL_SECS (5)       read the socket directory; and
 *                                                   the host's addresses, when UDP
 *                                                   has a socket for each (dgram)
 *   rebalance  every REBALANCE_INTERVAL_SECS (15)   ask the registry for a plan,
 *                                                   tell remotes to carry it out
 *   expiry     every REMOTE_EXPIRY_CHECK_SECS (30)  forget idle remotes
 *
 * Rebalancing lives here rather than in either module it touches, which
 * breaks the backends <-> remotes circle of the C original.  Expiry and
 * rebalancing are passes over the remotes table that remotes.ts carries
 * out a slice per tick (see its PASSES); a job that comes round while its
 * pass is still running lets it run rather than starting another (the
 * rebalance job makes no new plan).  The jobs are armed when the balancer
 * is built, so a test driving the wheel with run() gets them without
 * start(); close() disarms them and ends the passes.
 *
 * LIFECYCLE.
 *
 *   new --start()--> starting --(backends settled, ports bound)--> running
 *    |                  |                                             |
 *    +------------------+------------- close() ----------------------+
 *                                        |
 *                                     closing --(all closed)--> closed
 *
 * start() finds the backends and gives them a moment to say hello before it
 * binds the DNS ports (see start()).  close() may come at any point, even
 * while start() is waiting; start() then returns without binding.  close()
 * is idempotent: every call returns the same promise, which resolves once
 * the listeners have closed (TCP sessions drained for up to 3 s), the
 * backends' sessions are gone and no timeout is left armed on the wheel.
 *
 * STARTUP ERRORS are thrown from start(): a listen error from the UDP or
 * TCP socket as it is (main describes it), a stats socket that cannot be
 * opened as a StatsSocketError, an HTTP port as a StartupError; each
 * carries enough for one line on stderr.
 */

import type { Logger } from 'pino';
import {
	type Backend, Backends, REBALANCE_INTERVAL_SECS, RESCAN_INTERVAL_SECS,
} from './backends.js';
import { Acl } from './dns.js';
import { fdPass } from './fd_pass.js';
import { ControlServer, type HandoverHost } from './handover.js';
import { DEFAULT_HEALTH_OPTIONS, HEALTH_RUN_MS, HealthMonitor } from './health.js';
import type { HttpListener } from './http_listener.js';
import type { Options } from './options.js';
import { Remotes, REMOTE_EXPIRY_CHECK_SECS } from './remotes.js';
import { logSnapshot, StatsServer, type StatsSources, type TakeoverRecord } from './stats.js';
import { type RemotesMessage, type Takeover, TakeoverError } from './takeover.js';
import { controlSocketPath, decodeRemote, type Running, type SocketSpec } from './takeover_wire.js';
import { TcpListener } from './tcp_listener.js';
import { type Clock, monotonicClock, type Timeout, TimeoutWheel } from './timeouts.js';
import { DEFAULT_CACHE_MAX_TTL_SECS, PacketCache } from './packet_cache.js';
import { UdpProxy, type UdpProxyOptions } from './udp_proxy.js';
import { createUdpTransport } from './udp_socket.js';
import type { UdpTransport } from './udp_transport.js';

export const TICK_MS = 1000;
/* How long start() waits for the backends it finds to connect before it opens the DNS ports. */
export const STARTUP_BACKEND_WAIT_MS = 1000;
/* How often start() looks whether they have. */
const STARTUP_POLL_MS = 5;
/* How often a drain after a handover looks whether answers are still outstanding. */
const DRAIN_POLL_MS = 50;
/* How long a drain waits for a reload's client to be told how it went. */
const CONTROL_SESSIONS_DONE_MS = 1000;

/** A listener other than DNS could not start: reported in one line, exit 1. */
export class StartupError extends Error {
	readonly code = 'ESTARTUP';
}

/**
 * What a Balancer is built from: the parsed options (all but the address,
 * port and socket directory optional, defaulting as on the command line),
 * a logger, and optionally a clock and a UDP transport.
 */
export type BalancerOptions = Pick<Options, 'bind' | 'port' | 'socketDir'>
	& Partial<Omit<Options, 'bind' | 'port' | 'socketDir' | 'logLevel' | 'statsSocket' | 'statsSocketExplicit'>>
	& {
		log: Logger;
		clock?: Clock;
		/** The UDP socket, unbound (default: createUdpTransport()); the balancer owns it from now on. */
		transport?: UdpTransport;
		/** Serve the stats snapshot here (none when absent). */
		statsSocket?: string;
		/** When false, a stats socket that cannot be opened is only a warning. */
		statsSocketRequired?: boolean;
		/**
		 * The UDP socket failed for good and will deliver no more queries.
		 * main exits non-zero, so that the service manager restarts bbal;
		 * without it, the balancer logs the error and closes itself.
		 */
		onFatal?: (err: Error) => void;
		/** The flags as given, for a takeover to compare (handover.ts); JSON. */
		settings?: Record<string, unknown>;
		/**
		 * A takeover has handed everything over: drain() and exit, non-zero
		 * if the new bbal vanished first.  Without it the balancer drains and
		 * closes itself.
		 */
		onHandedOver?: (successorGone: boolean) => void;
	};

export type BalancerState = 'new' | 'starting' | 'running' | 'handing over' | 'closing' | 'closed';

export class Balancer implements HandoverHost {
	readonly wheel: TimeoutWheel;
	/** Every backend's answers and health (health.ts); run() every HEALTH_RUN_MS. */
	readonly health: HealthMonitor;
	readonly backends: Backends;
	readonly remotes: Remotes;
	readonly udp: UdpProxy;
	readonly tcp: TcpListener;
	readonly log: Logger;
	readonly startedAt = new Date();
	private lifecycle: BalancerState = 'new';
	private stats: StatsServer | null = null;
	private control: ControlServer | null = null;
	private http: HttpListener | null = null;
	/* The takeover this process began with (the snapshot shows it). */
	private tookOver: TakeoverRecord | null = null;
	/* The TCP listener's close() begun by a handover: its sessions drain meanwhile. */
	private tcpDrained: Promise<void> | null = null;
	private tick: NodeJS.Timeout | null = null;
	private healthTick: NodeJS.Timeout | null = null;
	private readonly clock: Clock;
	private closing: Promise<void> | null = null;
	private readonly rescanTimeout: Timeout;
	private readonly rebalanceTimeout: Timeout;
	private readonly expiryTimeout: Timeout;

	constructor(private readonly opts: BalancerOptions) {
		this.log = opts.log;
		this.clock = opts.clock ?? monotonicClock;
		this.wheel = new TimeoutWheel(this.clock);
		const ho = DEFAULT_HEALTH_OPTIONS;
		this.health = new HealthMonitor({
			queryTimeoutMs: opts.queryTimeoutMs ?? ho.queryTimeoutMs, maxInflight: opts.maxInflightPerBackend ?? ho.maxInflight,
			probes: opts.healthCheck ?? ho.probes, intervalSecs: opts.healthIntervalSecs ?? ho.intervalSecs,
			timeoutMs: opts.healthTimeoutMs ?? ho.timeoutMs, rise: opts.healthRise ?? ho.rise, fall: opts.healthFall ?? ho.fall,
			queryName: opts.healthQuery?.name ?? ho.queryName, queryType: opts.healthQuery?.type ?? ho.queryType,
		}, this.log, () => this.backends.list());
		this.backends = new Backends({
			health: this.health,
			socketDir: opts.socketDir,
			log: this.log,
			wheel: this.wheel,
			onOutboundUdp: (addr, port, payload, be) => this.udp.sendOutbound(addr, port, payload, be),
			onHeartbeatRtt: (be, ms) => this.http?.metrics.observeHeartbeatRtt(be, ms),
			onForget: (be) => this.http?.metrics.forgetBackend(be),
		});
		this.remotes = new Remotes({
			log: this.log, backends: this.backends, wheel: this.wheel, maxRemotes: opts.maxRemotes,
		});
		/* One ACL for both proxies: the same prefixes, parsed once. */
		const acl = new Acl(opts.allow ?? []);
		this.udp = new UdpProxy({
			remotes: this.remotes,
			log: this.log,
			wheel: this.wheel,
			transport: opts.transport ?? createUdpTransport(),
			acl,
			noBackend: opts.noBackend,
			maxQpsPerRemote: opts.maxQpsPerRemote,
			rateLimitAction: opts.rateLimitAction,
			onFatal: opts.onFatal ?? this.udpFailed,
			health: this.health,
			accounting: opts.answerAccounting !== false,
			clock: this.clock,
			cache: this.makeCache(),
		});
		this.tcp = new TcpListener({
			remotes: this.remotes,
			backends: this.backends,
			wheel: this.wheel,
			log: this.log,
			maxConnections: opts.maxTcpConnections,
			maxPerRemote: opts.maxTcpPerRemote,
			maxQueriesPerConn: opts.maxTcpQueriesPerConn,
			maxQueriesPerRemote: opts.maxTcpQueriesPerRemote,
			idleTimeoutSecs: opts.tcpIdleTimeoutSecs,
			maxMessageBytes: opts.maxTcpMessageBytes,
			acl,
		});

		this.rescanTimeout = this.wheel.create('rescan socket directory', this.rescanDue);
		this.rebalanceTimeout = this.wheel.create('rebalance', this.rebalanceDue);
		this.expiryTimeout = this.wheel.create('expire remotes', this.expiryDue);
		this.rescanTimeout.set(RESCAN_INTERVAL_SECS);
		this.rebalanceTimeout.set(REBALANCE_INTERVAL_SECS);
		this.expiryTimeout.set(REMOTE_EXPIRY_CHECK_SECS);
	}

	get state(): BalancerState {
		return this.lifecycle;
	}

	/* The packet cache, with --cache-size (which needs answer accounting: options.ts refuses it without). */
	private makeCache(): UdpProxyOptions['cache'] {
		const o = this.opts;
		if (!o.cacheSize || o.answerAccounting === false) {
			return null;
		}
		const maxTtlSecs = o.cacheMaxTtlSecs ?? DEFAULT_CACHE_MAX_TTL_SECS;
		const serveStaleSecs = o.serveStaleSecs ?? 0;
		return {
			cache: new PacketCache({ maxEntries: o.cacheSize, maxTtlSecs, staleSecs: serveStaleSecs }),
			maxTtlSecs, serveStaleSecs, backends: () => this.backends.list(),
		};
	}

	private readonly udpFailed = (err: Error): void => {
		this.log.fatal({ err }, 'UDP socket failed (closing)');
		void this.close();
	};

	/* ---- periodic jobs (see the header) ---- */

	private readonly rescanDue = (): void => {
		this.rescanTimeout.set(RESCAN_INTERVAL_SECS);
		void this.backends.rescan();
		void this.udp.followAddresses();
	};

	private readonly rebalanceDue = (): void => {
		this.rebalanceTimeout.set(REBALANCE_INTERVAL_SECS);
		this.rebalance();
	};

	private readonly expiryDue = (): void => {
		this.expiryTimeout.set(REMOTE_EXPIRY_CHECK_SECS);
		this.remotes.expire();
	};

	/**
	 * Begin a rebalance pass (remotes.ts logs it when it ends): move remotes
	 * off the fullest backend when the spread is too wide.  Nothing while a
	 * pass is running: its plan is being carried out.
	 */
	rebalance(): void {
		if (this.remotes.rebalancing) {
			return;
		}
		const plan = this.backends.rebalancePlan();
		if (plan !== null) {
			this.remotes.rebalance(plan.backend, plan.count);
		}
	}

	/* ---- start ---- */

	/**
	 * Find the backends, give them a moment to connect, then bind the DNS
	 * listeners and start the tick.  Binding first would answer SERVFAIL to
	 * every query of the few hundred milliseconds the backends take to say
	 * hello -- on each restart, with healthy backends behind it; a resolver
	 * retries a query that got no answer, while a SERVFAIL may be cached.
	 */
	async start(takeover?: Takeover): Promise<void> {
		if (this.lifecycle === 'closing' || this.lifecycle === 'closed') {
			return;
		}
		if (this.lifecycle !== 'new') {
			throw new Error(`Balancer.start() while ${this.lifecycle}`);
		}
		this.lifecycle = 'starting';
		if (takeover !== undefined) {
			await this.startFrom(takeover);
			return;
		}
		await this.openStatsSocket();
		if (this.opts.http) {
			await this.openHttp(this.opts.http);
		}
		await this.findBackends();
		if (this.lifecycle !== 'starting') {
			/* Told to stop while the backends were connecting. */
			return;
		}
		await this.udp.listen(this.opts.bind, this.opts.port);
		await this.tcp.listen(this.opts.bind, this.opts.port);
		if (this.lifecycle !== 'starting') {
			/* close() came while the ports were being bound: let go of what bound after it. */
			await Promise.all([this.udp.close(), this.tcp.close()]);
			return;
		}
		this.enterRunning();
	}

	private async findBackends(): Promise<void> {
		await this.backends.rescan();
		if (this.opts.watchDir !== false) {
			this.backends.watch();
		}
		await this.backendsSettled(STARTUP_BACKEND_WAIT_MS);
	}

	/* A takeover logs "listening" when it starts reading, before the handover: logListening false here. */
	private enterRunning(logListening = true): void {
		this.lifecycle = 'running';
		this.tick = setInterval(this.tickOnInterval, TICK_MS);
		this.tick.unref();
		this.healthTick = setInterval(() => this.health.run(this.clock()), HEALTH_RUN_MS);
		this.healthTick.unref();
		if (logListening) {
			this.logListening();
		}
	}

	private logListening(): void {
		this.log.info({
			address: this.opts.bind, port: this.opts.port, socket_dir: this.opts.socketDir,
			allow: this.opts.allow?.length ? this.opts.allow : 'everyone',
		}, 'listening');
	}

	/*
	 * TAKEOVER, the new bbal's part (takeover.ts draws it): backends first,
	 * as at any start, then the remote table; then read the sockets passed
	 * over and tell the old process to stop.  Until that last step a failure
	 * is a TakeoverError and the old bbal serves on; the descriptors not yet
	 * taken up are closed, the rest close with their owners.  The stats and
	 * control files become ours (removed at our clean exit) only once the
	 * old process has let go of them.
	 */
	private async startFrom(t: Takeover): Promise<void> {
		const s = t.sockets;
		const unused = new Set([...s.udp.map((u) => u.fd), s.tcp, s.stats, s.control, s.metrics]
			.filter((fd): fd is number => fd !== undefined && fd >= 0));
		const take = (fd: number): number => {
			unused.delete(fd);
			return fd;
		};
		let remotes = 0;
		try {
			for (const d of t.differences()) {
				this.log.info(d, 'takeover: option differs from the running bbal');
			}
			await this.findBackends();
			remotes = await t.fetchRemotes(this.restoreRemotes);
			if (this.lifecycle !== 'starting') {
				throw new TakeoverError(`stopped while taking over (${this.lifecycle})`);
			}
			/* From here this process reads the DNS sockets too. */
			t.beginReading();
			await this.udp.listen(this.opts.bind, this.opts.port, s.udp.map((u) => ({ fd: take(u.fd), address: u.address })));
			await this.tcp.listen(this.opts.bind, this.opts.port, take(s.tcp));
			const statsPath = this.opts.statsSocket;
			if (statsPath !== undefined && s.stats !== undefined) {
				const server = new StatsServer(statsPath, this.statsSources, this.log);
				await server.listen(take(s.stats));
				this.stats = server;
			}
			if (statsPath !== undefined && s.control !== undefined) {
				const control = new ControlServer(controlSocketPath(statsPath), this);
				await control.listen(take(s.control));
				this.control = control;
			}
			if (this.opts.http) {
				await this.openHttp(this.opts.http, s.metrics === undefined ? undefined : take(s.metrics));
			}
		} catch (err) {
			t.abandon([...unused]);
			throw err instanceof TakeoverError ? err
				: new TakeoverError(`takeover failed: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
		}
		/* A socket the old bbal had and we do not want (--http dropped). */
		for (const fd of unused) {
			fdPass()?.closeFd(fd);
		}
		this.logListening();
		const changed = await t.handOver(this.restoreRemotes);
		this.tookOver = {
			fromPid: t.old.pid, fromVersion: t.old.version, at: new Date().toISOString(), remotes, remotesChanged: changed,
		};
		this.stats?.own();
		this.control?.own();
		this.enterRunning(false);
		this.log.info({ old_pid: t.old.pid, old_version: t.old.version, remotes, remotes_changed: changed }, 'took over');
	}

	/* A `remotes` message of a takeover, applied at once: a thousand remotes at most. */
	private readonly restoreRemotes = (m: RemotesMessage): void => {
		const lookup = (p: string): Backend | null => {
			const be = this.backends.lookupPath(p);
			return be === undefined || be.removed ? null : be;
		};
		let bad = 0;
		for (const rec of Array.isArray(m.remotes) ? m.remotes : []) {
			const d = decodeRemote(rec, Array.isArray(m.backends) ? m.backends : [], lookup);
			if (d === null) {
				bad++;
			} else {
				this.remotes.restore(d.addr, d.remote);
			}
		}
		if (bad > 0) {
			this.log.warn({ bad }, 'takeover: remotes that could not be read (skipped)');
		}
	};

	/* The one clock read per second: the wheel reads its clock in run(). */
	private readonly tickOnInterval = (): void => {
		this.wheel.run();
	};

	/*
	 * Until no backend is still connecting (each is ok or has failed), or
	 * `ms`.  Real time, not the wheel's clock: this waits for sockets, and a
	 * test's clock may stand still.
	 */
	private async backendsSettled(ms: number): Promise<void> {
		const until = Date.now() + ms;
		while (Date.now() < until && this.backends.list().some((be) => be.state === 'connecting')) {
			await new Promise((resolve) => setTimeout(resolve, STARTUP_POLL_MS));
		}
	}

	private async openStatsSocket(): Promise<void> {
		const p = this.opts.statsSocket;
		if (p === undefined) {
			return;
		}
		const server = new StatsServer(p, this.statsSources, this.log);
		try {
			await server.listen();
			this.stats = server;
			this.log.info({ stats_socket: p }, 'stats socket listening');
		} catch (err) {
			if (this.opts.statsSocketRequired !== false) {
				throw err;
			}
			this.log.warn({ stats_socket: p, reason: (err as Error).message },
				'no stats socket (balstat will not reach this bbal; use -S PATH)');
			return;
		}
		/* Beside it, the control socket a takeover connects to (handover.ts); only where sockets can be passed. */
		if (fdPass() === null) {
			return;
		}
		const control = new ControlServer(controlSocketPath(p), this);
		try {
			await control.listen();
			this.control = control;
		} catch (err) {
			this.log.warn({ control_socket: control.socketPath, reason: (err as Error).message },
				'no control socket (this bbal cannot be taken over)');
		}
	}

	/* The operators' HTTP port: the dashboard, /metrics, the snapshot (http_listener.ts). */
	private async openHttp({ host, port }: { host: string; port: number }, fd?: number): Promise<void> {
		/* Loaded only when asked for: prom-client is ~10 MB of RSS. */
		const [{ HttpListener }, { Sampler }, { packageVersion }] = await Promise.all([
			import('./http_listener.js'), import('./sampler.js'), import('./options.js'),
		]);
		const sources = this.statsSources;
		const sampler = new Sampler(sources, { version: packageVersion(), transport: this.udp.transportKind }, this.clock);
		const listener = new HttpListener(sources, sampler, this.log);
		await listener.listen(host, port, fd).catch((err: NodeJS.ErrnoException) => {
			throw new StartupError(`cannot serve http on ${host}:${port}: ${err.code ?? err.message}`);
		});
		this.http = listener;
		this.log.info({ http: `http://${host}:${port}/` }, 'dashboard and metrics listening');
	}

	/* ---- operators ---- */

	/** The live objects a stats snapshot reads. */
	get statsSources(): StatsSources {
		return {
			backends: this.backends,
			remotes: this.remotes,
			udp: this.udp,
			tcp: this.tcp,
			wheel: this.wheel,
			health: this.health,
			listen: { address: this.opts.bind, port: this.opts.port },
			socketDir: this.opts.socketDir,
			startedAt: this.startedAt,
			takeover: () => this.tookOver,
			statsServer: this.stats,
		};
	}

	/** SIGUSR2: a summary of the snapshot into the log (the remotes counted, the first 100 listed). */
	logSnapshot(): void {
		this.log.info({ snapshot: logSnapshot(this.statsSources) }, 'stats snapshot');
	}

	/* ---- TAKEOVER, the running bbal's part (handover.ts) ---- */

	running(): Running & { options: Record<string, unknown> } {
		const o = this.opts;
		return { bind: o.bind, port: o.port, transport: this.udp.transportKind, options: o.settings ?? {} };
	}

	busy(): string | null {
		return this.lifecycle === 'running' ? null : `it is ${this.lifecycle}`;
	}

	sockets(): Array<SocketSpec & { fd: number }> {
		const out: Array<SocketSpec & { fd: number }> = this.udp.sockets().map((u) => ({ kind: 'udp', address: u.address, fd: u.fd }));
		const add = (kind: SocketSpec['kind'], fd: number | undefined): void => {
			if (fd !== undefined && fd >= 0) {
				out.push({ kind, fd });
			}
		};
		add('tcp', this.tcp.fd);
		add('stats', this.stats?.fd);
		add('control', this.control?.fd);
		add('metrics', this.http?.fd);
		return out;
	}

	/* The new bbal reads the sockets now: stop reading and accepting, let go of the listeners, keep the rest to drain. */
	async handOver(): Promise<void> {
		this.lifecycle = 'handing over';
		this.rescanTimeout.clear();
		this.rebalanceTimeout.clear();
		this.expiryTimeout.clear();
		this.udp.stopReading();
		this.tcpDrained = this.tcp.close();
		await Promise.all([this.stats?.release(), this.control?.close(true), this.http?.close()]);
		this.log.info({ tcp_open: this.tcp.size }, 'handed over: no longer reading or accepting, draining');
	}

	handedOver(successorGone: boolean): void {
		if (this.opts.onHandedOver !== undefined) {
			this.opts.onHandedOver(successorGone);
		} else {
			void this.drain();
		}
	}

	/**
	 * After a handover: let the TCP sessions finish (up to the listener's
	 * drain limit) and the answers to forwarded UDP queries come back (up to
	 * --query-timeout; all of it when answers are not accounted), tell a
	 * reload how it went, then close.
	 */
	async drain(): Promise<void> {
		await this.tcpDrained;
		const waitMs = this.opts.queryTimeoutMs ?? DEFAULT_HEALTH_OPTIONS.queryTimeoutMs;
		const until = Date.now() + waitMs;
		const accounted = this.opts.answerAccounting !== false;
		const outstanding = (): number => this.backends.list().reduce((n, be) => n + be.health.book.outstanding, 0);
		while (Date.now() < until && (!accounted || outstanding() > 0)) {
			await new Promise((resolve) => setTimeout(resolve, DRAIN_POLL_MS));
		}
		await this.control?.sessionsDone(CONTROL_SESSIONS_DONE_MS);
		await this.close();
	}

	/* ---- close ---- */

	/** Stop everything (see LIFECYCLE); every call returns the same promise. */
	close(): Promise<void> {
		if (this.closing === null) {
			this.closing = this.closeAll();
		}
		return this.closing;
	}

	private async closeAll(): Promise<void> {
		this.lifecycle = 'closing';
		clearInterval(this.tick ?? undefined);
		clearInterval(this.healthTick ?? undefined);
		this.tick = null;
		this.healthTick = null;
		this.rescanTimeout.clear();
		this.rebalanceTimeout.clear();
		this.expiryTimeout.clear();
		this.remotes.close();
		this.control?.destroyAll();
		await Promise.all([
			this.udp.close(), this.tcp.close(), this.stats?.close(), this.control?.close(), this.http?.close(),
		]);
		this.backends.close();
		this.lifecycle = 'closed';
	}
}
