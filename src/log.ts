/*
 * LOG
 *
 * bbal writes one kind of log: JSON lines on stdout in bunyan's record shape
 * (name, hostname, pid, numeric level, msg, ISO time, v: 0), so that the
 * `bunyan` CLI reads them, filters them (`bunyan -c 'this.be_id === 5301'`)
 * and SMF or journald collect them as they are.  This module makes the one
 * root logger; every subsystem takes a child of it bound to what it speaks
 * of (`be_id` and `be_path` for a backend, `remote_ip` for a remote,
 * `conn_id` for a TCP connection), so a record always names its subject
 * under the same key whichever module wrote it.
 *
 * RATE-LIMITED CONDITIONS.  Some conditions repeat once per packet: an
 * oversized datagram, a query from outside --allow, no backend ok, a stuck
 * session.  Each is counted every time (the counters are the caller's, in
 * its stats, where balstat and /metrics read them) but logged at most once
 * per interval, with `not_logged` saying how many were held back since the
 * last line, because a flood of bad packets must not become a flood of log
 * lines.  A GatedLog is one such condition: its own gate, its own level
 * and message.  One gate per condition matters: when two unrelated
 * conditions share a gate, a frequent one silences the other (an unreadable
 * socket directory would hide "no backend available", or the reverse).
 *
 * The gate reads the timeout wheel's tick time, never the clock, so the
 * per-packet path pays one comparison to decide that it will not log.  The
 * fields of a line are built only when the line is written: callers whose
 * fields cost something (an address turned into text) pass a function.
 *
 * Who calls it: main makes the root logger; the proxies, remotes and
 * backends each hold a GatedLog per condition they report.
 */

import { hostname } from 'node:os';
import pino, { type Logger } from 'pino';
import type { TimeoutWheel } from './timeouts.js';

export const LOG_LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

/* How often a repeated condition may be logged, by default. */
export const LOG_GATE_INTERVAL_SECS = 5;

/** The root logger: bunyan's record shape, pino's speed. */
export function makeLogger(level: LogLevel, dest?: pino.DestinationStream): Logger {
	const opts: pino.LoggerOptions = {
		level,
		base: { name: 'bbal', hostname: hostname(), pid: process.pid, v: 0 },
		timestamp: () => `,"time":"${new Date().toISOString()}"`,
		messageKey: 'msg',
	};
	return dest === undefined ? pino(opts) : pino(opts, dest);
}

/**
 * Lets a condition through at most `burst` times per intervalSecs (once, by
 * default), reading the wheel's tick time.  open() answers whether to log
 * now; how many times the condition was held back since the last log is
 * handed back so the next line can say so.
 */
export class LogGate {
	private windowStartMs = -Infinity;
	private passed = 0;
	private suppressed = 0;

	constructor(
		private readonly wheel: TimeoutWheel,
		private readonly intervalSecs = LOG_GATE_INTERVAL_SECS,
		private readonly burst = 1,
	) {}

	/** -1 when the log must be skipped, else how many were skipped before it. */
	open(): number {
		const now = this.wheel.nowMs;
		if (now - this.windowStartMs >= this.intervalSecs * 1000) {
			this.windowStartMs = now;
			this.passed = 0;
		}
		if (this.passed >= this.burst) {
			this.suppressed++;
			return -1;
		}
		this.passed++;
		const n = this.suppressed;
		this.suppressed = 0;
		return n;
	}
}

export type LogFields = Record<string, unknown>;
export type GatedLevel = 'info' | 'warn' | 'error';

/**
 * One repeated condition's log line: a level, a message and a gate of its
 * own.  report() writes the line to `log` (a child logger naming the
 * subject) when the gate allows, with `not_logged` added; otherwise it only
 * counts the line as held back.  The caller counts the condition itself.
 */
export class GatedLog {
	private readonly gate: LogGate;

	constructor(
		wheel: TimeoutWheel,
		readonly level: GatedLevel,
		readonly msg: string,
		opts: { intervalSecs?: number; burst?: number } = {},
	) {
		this.gate = new LogGate(wheel, opts.intervalSecs ?? LOG_GATE_INTERVAL_SECS, opts.burst ?? 1);
	}

	/** Log now if the gate allows; a function for `fields` is called only then. */
	report(log: Logger, fields?: LogFields | (() => LogFields)): void {
		const skipped = this.gate.open();
		if (skipped < 0) {
			return;
		}
		const base = typeof fields === 'function' ? fields() : fields;
		log[this.level]({ ...base, not_logged: skipped }, this.msg);
	}
}

/*
 * For a socket being torn down: an 'error' it emits afterwards has nothing
 * left to tell (the teardown was decided and logged already), but an
 * 'error' with no listener would be an uncaught exception.
 */
export function ignoreError(): void {}
