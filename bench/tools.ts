/*
 * BENCH TOOLS
 *
 * What has to be on the machine before anything is measured, and the record
 * of what was: dnsperf and dnsdist, the C stub, bbal's own build, and the
 * machine description every report starts with.
 *
 * PACKAGES.  dnsperf (the load generator) and dnsdist (the proxy bbal is
 * compared with) are Debian packages.  A run installs the ones its
 * scenarios need and the machine lacks, with `apt-get install -y` (through
 * sudo when not root, non-interactively), and if that fails, runs
 * `apt-get update` once and tries again: a fresh machine's package lists
 * are often too old to name the current versions.  --no-install turns a
 * missing tool into an error that says what to install.  On a machine that
 * runs systemd, Debian's dnsdist package also starts its own service on
 * 127.0.0.1:53; the benchmark never uses it.
 *
 * THE STUB (bench/stub.c) is built with gcc -O2 into bench/build/stub when
 * the binary is missing or older than its source.  It is the fastest backend
 * we can put behind a proxy, so that the proxy's cost is what shows.
 *
 * BBAL is measured as built in dist/.  When any src/*.ts is newer than
 * every file in dist/src/ (or dist/src/main.js is missing), `npm run build`
 * runs first; --no-build measures the old build, with a warning.  Under `npm
 * run bench` the build has already run (the script compiles the benchmark
 * itself), so this matters when the driver is run directly.
 *
 * THE MACHINE.  machineInfo() records cores, CPU model, memory, kernel, the
 * versions of node, dnsperf, dnsdist, gcc and mname, the kernel's clock
 * tick, and bbal's commit, marked when src/ or bin/ has uncommitted changes,
 * so a figure can always be traced to the code and the box it came from.
 */

import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { projectRoot } from '../test/support/process.js';
import { clockTicksPerSecond } from '../test/support/procfs.js';
import { log } from './session.js';

/** The benchmark's sources (stub.c, mname_server.cjs) and its output directories. */
export const BENCH_DIR = path.join(projectRoot, 'bench');
export const BUILD_DIR = path.join(BENCH_DIR, 'build');
export const RESULTS_DIR = path.join(BENCH_DIR, 'results');
const STUB_SRC = path.join(BENCH_DIR, 'stub.c');
export const STUB_BIN = path.join(BUILD_DIR, 'stub');

/* Where Debian puts the tools, searched after PATH (sudo's secure_path may differ from ours). */
const SYSTEM_BIN_DIRS = ['/usr/sbin', '/usr/bin', '/sbin'];

/** A tool's path: PATH first, then the system directories; null if it is nowhere. */
export function which(cmd: string): string | null {
	for (const dir of (process.env['PATH'] ?? '').split(':').concat(SYSTEM_BIN_DIRS)) {
		const f = path.join(dir, cmd);
		try {
			if (statSync(f).isFile()) {
				return f;
			}
		} catch {
			/* not here */
		}
	}
	return null;
}

/* Run a build step with its output on our terminal; throw if it fails. */
function runStep(cmd: string, args: string[], what: string): void {
	const r = spawnSync(cmd, args, { stdio: 'inherit', cwd: projectRoot });
	if (r.status !== 0) {
		throw new Error(`${what} failed (${cmd} ${args.join(' ')}: status ${r.status}${r.error ? `, ${r.error.message}` : ''})`);
	}
}

/** A program the run needs, and the Debian package it comes in. */
export interface Tool {
	bin: string;
	pkg: string;
}

/** Install the packages of the tools that are missing (apt-get; sudo unless root). */
export function installTools(needed: Tool[], allowInstall: boolean): void {
	const missing = needed.filter((t) => !which(t.bin)).map((t) => t.pkg);
	if (missing.length === 0) {
		return;
	}
	if (!allowInstall) {
		throw new Error(`missing ${missing.join(', ')} and --no-install given: apt-get install -y ${missing.join(' ')}`);
	}
	const root = process.getuid?.() === 0;
	const apt = (args: string[]): [string, string[]] => (root ? ['apt-get', args] : ['sudo', ['apt-get', ...args]]);
	const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
	log(`installing ${missing.join(', ')} (apt-get${root ? '' : ' via sudo'})`);
	const tryInstall = (): boolean => spawnSync(...apt(['install', '-y', '-q', ...missing]), { stdio: 'inherit', env }).status === 0;
	if (!tryInstall()) {
		log('apt-get install failed; running apt-get update and trying again');
		spawnSync(...apt(['update', '-q']), { stdio: 'inherit', env });
		if (!tryInstall()) {
			throw new Error(`could not install ${missing.join(', ')}`);
		}
	}
}

/** bench/build/stub, rebuilt when older than bench/stub.c. */
export function buildStub(): void {
	mkdirSync(BUILD_DIR, { recursive: true });
	if (existsSync(STUB_BIN) && statSync(STUB_BIN).mtimeMs >= statSync(STUB_SRC).mtimeMs) {
		return;
	}
	log('building bench/build/stub');
	runStep('gcc', ['-O2', '-Wall', '-Wextra', '-o', STUB_BIN, STUB_SRC], 'building the stub');
}

/* The newest modification time of the files under dir whose names end in ext. */
function newestMtimeMs(dir: string, ext: string): number {
	let m = 0;
	for (const f of readdirSync(dir, { recursive: true })) {
		if (String(f).endsWith(ext)) {
			m = Math.max(m, statSync(path.join(dir, String(f))).mtimeMs);
		}
	}
	return m;
}

/** npm run build when src/ is newer than dist/src/ (unless --no-build: then a warning). */
export function buildBbal(allowBuild: boolean): void {
	const distDir = path.join(projectRoot, 'dist', 'src');
	const stale = !existsSync(path.join(distDir, 'main.js'))
		|| newestMtimeMs(path.join(projectRoot, 'src'), '.ts') > newestMtimeMs(distDir, '.js');
	if (!stale) {
		return;
	}
	if (!allowBuild) {
		log('warning: dist/ is older than src/ and --no-build was given: measuring the old build');
		return;
	}
	log('src/ is newer than dist/: npm run build');
	runStep('npm', ['run', '--silent', 'build'], 'building bbal (npm run build)');
}

export interface MachineInfo {
	nproc: number;
	cpu: string;
	memGiB: number | null;
	kernel: string;
	node: string;
	dnsperf: string;
	dnsdist: string;
	gcc: string;
	mname: string;
	clkTck: number;
	bbalCommit: string;
}

export function machineInfo(): MachineInfo {
	const sh = (cmd: string, args: string[]): string => {
		const r = spawnSync(cmd, args, { encoding: 'utf8', cwd: projectRoot });
		return `${r.stdout ?? ''}${r.stderr ?? ''}`.trim();
	};
	const cpuinfo = readFileSync('/proc/cpuinfo', 'utf8');
	const mem = /MemTotal:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'));
	const dirty = sh('git', ['status', '--porcelain', '--', 'src', 'bin']);
	const mnamePkg = JSON.parse(readFileSync(path.join(projectRoot, 'node_modules', 'mname', 'package.json'), 'utf8')) as
		{ version: string };
	return {
		nproc: Number(sh('nproc', [])),
		cpu: /^model name\s*:\s*(.*)$/m.exec(cpuinfo)?.[1] ?? 'unknown',
		memGiB: mem ? Number((Number(mem[1]) / 1048576).toFixed(1)) : null,
		kernel: `${os.type()} ${os.release()}`,
		node: process.version,
		dnsperf: /Version\s+(\S+)/.exec(sh('dnsperf', ['-h']))?.[1] ?? 'unknown',
		dnsdist: sh('dnsdist', ['--version']).split('\n')[0].replace(/^dnsdist\s+/, ''),
		gcc: sh('gcc', ['-dumpfullversion']),
		mname: mnamePkg.version,
		clkTck: clockTicksPerSecond(),
		bbalCommit: sh('git', ['rev-parse', '--short', 'HEAD']) + (dirty ? ' (+ uncommitted changes in src/ or bin/)' : ''),
	};
}
