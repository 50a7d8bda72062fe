/*
 * BENCH OPTIONS
 *
 * What `npm run bench -- ...` was asked to do: which scenarios, how many
 * rounds, how long each run, and what the driver may do to the machine
 * (install packages, rebuild bbal, wait for quiet).  parseOptions() reads
 * the command line once, at start, and hands back one BenchOptions that the
 * rest of the run only reads.
 *
 * THE SCENARIOS are named here, because the command line names them: each
 * is a set of configurations (configurations.ts builds them) measured under
 * one load.  `--only` takes scenario names and the groups `stub`, `tcp` and
 * `all`, comma-separated, in any order; they always run in the canonical
 * order below, so two partial runs that share a scenario measure it at the
 * same place in the round.  A run that leaves any scenario out is
 * `partial`, and only a full run (not partial, not --quick, not --profile)
 * replaces the tracked bench/results/latest.md.
 *
 * THE ENVIRONMENT.  BENCH_ONLY, BENCH_ROUNDS and BENCH_SECONDS give the
 * defaults of --only, --rounds and --seconds, for CI and for scripts that
 * call npm run bench without flags; a flag wins over its variable.
 *
 * RUN LENGTHS.  --seconds is the length of a UDP run (dnsperf -l); TCP runs
 * take three fifths of it, rounded, at least 1 s, since a TCP run at the same
 * length costs the machine far more and its figures settle sooner; every
 * configuration is warmed up once for 1 s before the rounds.  --quick is the
 * smoke run: one round of 3-s runs unless --rounds or --seconds say
 * otherwise.
 *
 * Bad input (an unknown flag or scenario, a count out of range) exits 2 with
 * one line and the usage; --list and --help print and exit 0, before
 * anything is installed or started.
 */

export const SCENARIOS = {
	'sat-stub': 'saturation (dnsperf -c 4 -q 200): direct, dnsdist and bbal in front of the fast C stub',
	'rate-stub': 'fixed 5,000 qps (dnsperf -Q 5000): direct, dnsdist and bbal in front of the fast C stub',
	mname: 'saturation: one mname on its own UDP port, bbal -> 1 mname, bbal -> 2 mnames',
	'tcp-qps': 'dnsperf -m tcp over 4 persistent connections: mname directly vs bbal -> mname',
	'tcp-conns': 'new TCP connections per second, one query each: mname directly vs bbal -> mname',
	rss: "bbal's RSS holding 100,000 remotes",
	dashboard: 'saturation, bbal -> fast C stub: without --http, and with --http and 0, 1 and 10 dashboards following /live',
	cache: 'saturation, a datacenter\'s DNS (300 names, Zipf, 10% unique, 50 sources) -> 2 Binder-like mnames: direct stub, '
		+ 'bbal cache off and on, dnsdist with its packet cache',
} as const;

export type ScenarioName = keyof typeof SCENARIOS;

const SCENARIO_NAMES = Object.keys(SCENARIOS) as ScenarioName[];

const ALIASES: Record<string, ScenarioName[]> = {
	stub: ['sat-stub', 'rate-stub'], tcp: ['tcp-qps', 'tcp-conns'], all: SCENARIO_NAMES,
};

/* The limits of --rounds and --seconds: beyond them a run would outlast the 9-minute watchdog. */
const MAX_ROUNDS = 20;
const MAX_SECONDS = 60;
/** The warm-up run of each configuration, not counted. */
const WARM_SECONDS = 1;
/** --wait-quiet without a value: wait up to this long for a quiet machine. */
const DEFAULT_WAIT_QUIET_SECS = 120;

const USAGE = `usage: npm run bench -- [options]   (or: node dist/bench/run.js [options])
  --quick          smoke run (~1 minute): 1 round, short runs
  --only LIST      scenarios, comma-separated (env BENCH_ONLY): ${SCENARIO_NAMES.join(', ')}
                   or the groups stub, tcp, all
  --rounds N       measured rounds (env BENCH_ROUNDS; default 3, quick 1)
  --seconds N      seconds per UDP run (env BENCH_SECONDS; default 5, quick 3); TCP runs take 3/5 of it
  --profile        run bbal under node --cpu-prof; profiles and a summary go to bench/build/prof/
  --wait-quiet[=S] first wait up to S seconds (default 120) until other processes use < 15% of a core
  --no-install     never apt-get install dnsperf/dnsdist
  --no-build       never rebuild bbal (dist/) even if src/ is newer
  --list           list the scenarios and exit
  -h, --help       this text`;

export interface BenchOptions {
	quick: boolean;
	/** The scenarios to run, in canonical order. */
	scenarios: ScenarioName[];
	/** Some scenario left out. */
	partial: boolean;
	rounds: number;
	/** Length of a UDP run, and of a TCP run (three fifths of it). */
	seconds: number;
	tcpSeconds: number;
	warmSeconds: number;
	profile: boolean;
	/** Seconds to wait for a quiet machine first; 0: don't. */
	waitQuietSecs: number;
	install: boolean;
	build: boolean;
}

function fail(msg: string): never {
	console.error(msg);
	process.exit(2);
}

/** The options of this run, from argv (without node and the script) and the BENCH_* variables. */
export function parseOptions(argv: string[], env: NodeJS.ProcessEnv = process.env): BenchOptions {
	let quick = false;
	let only = env['BENCH_ONLY'] ?? '';
	let rounds = env['BENCH_ROUNDS'];
	let seconds = env['BENCH_SECONDS'];
	let profile = false;
	let waitQuietSecs = 0;
	let install = true;
	let build = true;
	for (let i = 0; i < argv.length; i++) {
		const a = argv[i];
		/* --flag=value and --flag value alike, for the flags that take one. */
		const [flag, inline] = a.includes('=') ? a.split(/=(.*)/s, 2) : [a, undefined];
		const value = (): string | undefined => inline ?? argv[++i];
		switch (flag) {
		case '--quick': quick = true; break;
		case '--only': only = value() ?? ''; break;
		case '--rounds': rounds = value(); break;
		case '--seconds': seconds = value(); break;
		case '--profile': profile = true; break;
		/* Only --wait-quiet=S takes a value: a bare --wait-quiet must not eat the next flag. */
		case '--wait-quiet': waitQuietSecs = Number(inline ?? DEFAULT_WAIT_QUIET_SECS); break;
		case '--no-install': install = false; break;
		case '--no-build': build = false; break;
		case '--list':
			for (const [k, v] of Object.entries(SCENARIOS)) {
				console.log(`${k.padEnd(10)} ${v}`);
			}
			process.exit(0);
			break;
		case '-h': case '--help': console.log(USAGE); process.exit(0); break;
		default: fail(`bench: unknown option ${a}\n${USAGE}`);
		}
	}
	const picked = new Set<ScenarioName>();
	for (const s of (only || 'all').split(',').map((x) => x.trim()).filter(Boolean)) {
		const list = Object.hasOwn(ALIASES, s) ? ALIASES[s] : Object.hasOwn(SCENARIOS, s) ? [s as ScenarioName] : null;
		if (list === null) {
			fail(`bench: unknown scenario "${s}" (try --list)`);
		}
		list.forEach((x) => picked.add(x));
	}
	const scenarios = SCENARIO_NAMES.filter((s) => picked.has(s));
	const nRounds = Number(rounds ?? (quick ? 1 : 3));
	const nSeconds = Number(seconds ?? (quick ? 3 : 5));
	if (!(nRounds >= 1 && nRounds <= MAX_ROUNDS) || !(nSeconds >= 1 && nSeconds <= MAX_SECONDS)) {
		fail(`bench: --rounds must be 1-${MAX_ROUNDS} and --seconds 1-${MAX_SECONDS}`);
	}
	return {
		quick, scenarios, partial: scenarios.length !== SCENARIO_NAMES.length, rounds: nRounds, seconds: nSeconds,
		tcpSeconds: Math.max(1, Math.round((nSeconds * 3) / 5)), warmSeconds: WARM_SECONDS, profile, waitQuietSecs,
		install, build,
	};
}

/** Whether any of the given scenarios is to run. */
export function wants(opts: BenchOptions, ...names: ScenarioName[]): boolean {
	return names.some((n) => opts.scenarios.includes(n));
}
