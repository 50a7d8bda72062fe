/*
 * WHAT /proc SAYS ABOUT OUR PROCESSES AND THE MACHINE
 *
 * The chaos harness and the benchmark both judge bbal partly by what the
 * kernel counts for it: CPU time, resident memory, open descriptors; and
 * both have to say how busy the rest of the machine was meanwhile, because
 * the project's machines are shared and a neighbour's test suite moves
 * every figure.  This file is the one reader of those counters.
 *
 * CPU TIME comes in clock ticks (getconf CLK_TCK, 100 on Linux), from
 * /proc/PID/stat fields 14-17: utime and stime of every thread of the
 * process, and cutime and cstime of the children it has reaped (the
 * benchmark's load generators, once they have exited).  The fields are
 * counted from after the command name's closing parenthesis, since the name
 * itself may hold spaces.
 *
 * THE MACHINE's ticks come from the first line of /proc/stat: user, nice,
 * system, idle, iowait, irq, softirq, steal (guest time is already inside
 * user).  Two views of "busy" are in use and both are kept:
 *
 *   process time   user + nice + system: what processes were charged.  The
 *                  benchmark's "others" is this less what ours used, and it
 *                  reports interrupt time (irq + softirq, where most loopback
 *                  packet processing runs, charged to no process) and the
 *                  hypervisor's steal beside it.
 *   not idle       everything but idle and iowait, interrupts and steal
 *                  included: the chaos harness's "% of all cores busy".
 *
 * A CpuSample takes the machine's ticks, those of a list of processes and
 * this process's own (with its reaped children) at one moment; cpuDelta()
 * turns two samples into ticks spent in between.  A process that started in
 * between counts from zero and one that exited in between counts nothing,
 * so "foreign" time errs high rather than low; the benchmark checks that its
 * servers are alive around every measurement, so for it the per-process
 * figures are exact.
 *
 * MEMORY comes from /proc/PID/status, every "kB" line by name (VmRSS, VmHWM,
 * RssAnon, RssFile, ...), and descriptors from counting /proc/PID/fd.
 */

import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';

export interface ProcessTicks {
	/** utime and stime of every thread. */
	user: number;
	system: number;
	/** cutime and cstime: the children this process has waited for. */
	childrenUser: number;
	childrenSystem: number;
}

/** A process's CPU ticks; throws when it is gone. */
export function readProcessTicks(pid: number | 'self'): ProcessTicks {
	const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
	/* f[0] is field 3 (state), so utime (field 14) is f[11]. */
	const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
	return { user: Number(f[11]), system: Number(f[12]), childrenUser: Number(f[13]), childrenSystem: Number(f[14]) };
}

/** utime + stime of a whole process (every thread); throws when it is gone. */
export function processTicks(pid: number | 'self'): number {
	const t = readProcessTicks(pid);
	return t.user + t.system;
}

export interface MachineTicks {
	user: number;
	nice: number;
	system: number;
	idle: number;
	iowait: number;
	irq: number;
	softirq: number;
	steal: number;
	/** Every field of the line added up. */
	total: number;
}

/** The first line of /proc/stat: every core together. */
export function readMachineTicks(): MachineTicks {
	const v = (readFileSync('/proc/stat', 'utf8').split('\n', 1)[0] ?? '').trim().split(/\s+/).slice(1).map(Number);
	const at = (i: number): number => v[i] ?? 0;
	return {
		user: at(0), nice: at(1), system: at(2), idle: at(3), iowait: at(4), irq: at(5), softirq: at(6), steal: at(7),
		total: v.reduce((a, b) => a + b, 0),
	};
}

let clockTicks: number | null = null;

/** The kernel's clock ticks per second (CLK_TCK), asked for once. */
export function clockTicksPerSecond(): number {
	clockTicks ??= Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim());
	return clockTicks;
}

export interface CpuSample {
	machine: MachineTicks;
	/** utime and stime of each listed process that was there to read. */
	processes: Map<number, { user: number; system: number }>;
	/** This process, and the children it has reaped. */
	self: ProcessTicks;
}

export function cpuSample(pids: number[]): CpuSample {
	const machine = readMachineTicks();
	const processes = new Map<number, { user: number; system: number }>();
	for (const pid of pids) {
		try {
			const t = readProcessTicks(pid);
			processes.set(pid, { user: t.user, system: t.system });
		} catch {
			/* exited: it counts nothing from here on */
		}
	}
	return { machine, processes, self: readProcessTicks('self') };
}

export interface CpuDelta {
	/** Every tick of every core that passed. */
	totalTicks: number;
	/** What processes were charged: user + nice + system. */
	processTimeTicks: number;
	/** Everything but idle and iowait. */
	nonIdleTicks: number;
	/** Interrupt time (irq + softirq) and the hypervisor's steal. */
	irqTicks: number;
	stealTicks: number;
	/** Per process of the later sample (one that started in between counts from zero). */
	processes: Map<number, { user: number; system: number }>;
	/** The listed processes together. */
	listedTicks: number;
	/** This process's own CPU, and that of the children it reaped in between. */
	selfTicks: number;
	reapedTicks: number;
}

export function cpuDelta(a: CpuSample, b: CpuSample): CpuDelta {
	const m0 = a.machine;
	const m1 = b.machine;
	const processes = new Map<number, { user: number; system: number }>();
	let listed = 0;
	for (const [pid, t] of b.processes) {
		const t0 = a.processes.get(pid) ?? { user: 0, system: 0 };
		const d = { user: Math.max(0, t.user - t0.user), system: Math.max(0, t.system - t0.system) };
		processes.set(pid, d);
		listed += d.user + d.system;
	}
	return {
		totalTicks: m1.total - m0.total,
		processTimeTicks: (m1.user + m1.nice + m1.system) - (m0.user + m0.nice + m0.system),
		nonIdleTicks: (m1.total - m1.idle - m1.iowait) - (m0.total - m0.idle - m0.iowait),
		irqTicks: (m1.irq + m1.softirq) - (m0.irq + m0.softirq),
		stealTicks: m1.steal - m0.steal,
		processes,
		listedTicks: listed,
		selfTicks: (b.self.user + b.self.system) - (a.self.user + a.self.system),
		reapedTicks: (b.self.childrenUser + b.self.childrenSystem) - (a.self.childrenUser + a.self.childrenSystem),
	};
}

/*
 * Percent of all cores not idle between two samples, and not idle with
 * something other than the listed processes (the chaos fleet, which lists
 * this process too).
 */
export function cpuShare(a: CpuSample, b: CpuSample): { busy: number; foreign: number } {
	const d = cpuDelta(a, b);
	const total = Math.max(1, d.totalTicks);
	return { busy: d.nonIdleTicks / total * 100, foreign: Math.max(0, d.nonIdleTicks - d.listedTicks) / total * 100 };
}

/** Every "NAME: N kB" line of /proc/PID/status (VmRSS, VmHWM, RssAnon, RssFile, ...), by name. */
export function statusKb(pid: number): Record<string, number> {
	const out: Record<string, number> = {};
	for (const m of readFileSync(`/proc/${pid}/status`, 'utf8').matchAll(/^(\w+):\s+(\d+) kB$/gm)) {
		out[m[1]] = Number(m[2]);
	}
	return out;
}

/** How many descriptors a process has open. */
export function openFds(pid: number): number {
	return readdirSync(`/proc/${pid}/fd`).length;
}
