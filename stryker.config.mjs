// npm run mutation: StrykerJS mutation testing of the pure modules, to
// measure that their unit tests can fail (MUTATION.md has the last score and
// why each surviving mutant is equivalent).
//
// Mutant switching: Stryker copies the project into a sandbox under
// .stryker-tmp/, writes every mutant of the files below into those files at
// once (each behind a check of the active mutant's id), and runs ONE tsc
// build there.  The tap runner then runs each compiled test file as
// `node -r <hook> dist/test/<file>.test.js` with the mutant to switch on in
// the environment, so no mutant costs a rebuild.  With per-test coverage a
// mutant is tried only against the test files that reach it, and a run
// stops at the first file that fails.
//
// Only the unit tests of the pure modules run: no test here spawns the CLI
// or opens a socket, so a run takes minutes rather than the whole suite's.  It
// is not part of CI.  Scope a run to one file while working on its tests:
//   npm run mutation -- --mutate src/dns.ts

/** The pure modules and the unit-test files that cover them. */
const modules = [
	['src/timeouts.ts', 'dist/test/timeouts.test.js'],
	['src/protocol.ts', 'dist/test/protocol.test.js'],
	['src/dns.ts', 'dist/test/dns.test.js'],
	['src/log.ts', 'dist/test/log.test.js'],
	['src/remote.ts', 'dist/test/remotes.test.js'],
	['src/remote.ts', 'dist/test/remotes_logs.test.js'],
	['src/remotes.ts', 'dist/test/remotes.test.js'],
	['src/remotes.ts', 'dist/test/remotes_logs.test.js'],
	// The sliced expiry and rebalance passes are tested here.
	['src/remotes.ts', 'dist/test/bounds.test.js'],
	['src/write_queue.ts', 'dist/test/write_queue.test.js'],
	['src/tcp_messages.ts', 'dist/test/tcp_messages.test.js'],
	['src/answers.ts', 'dist/test/answers.test.js'],
	['src/health.ts', 'dist/test/health.test.js'],
];

/** Property tests over the same parsers (protocol, dns). */
const sharedTests = ['dist/test/fuzz.test.js'];

/*
 * A tap file run by plain node gives up after 30 s of its own accord, and
 * under load the fuzz file can take that long: its failure would count as
 * a mutant killed.  Leave hangs to Stryker's timeout below instead.
 */
process.env.TAP_TIMEOUT ??= '0';

/** @type {import('@stryker-mutator/api/core').PartialStrykerOptions} */
export default {
	packageManager: 'npm',
	plugins: ['@stryker-mutator/tap-runner'],
	testRunner: 'tap',
	tap: {
		testFiles: [...new Set([...modules.map(([, test]) => test), ...sharedTests])],
		// A tap 21 test file prints TAP when run by plain node; the default
		// arguments are for node:test.
		nodeArgs: ['-r', '{{hookFile}}', '{{testFile}}'],
	},
	coverageAnalysis: 'perTest',
	mutate: [...new Set(modules.map(([src]) => src))],
	buildCommand: 'npx tsc -p tsconfig.json',
	// The sandbox is rebuilt from src/ and test/; the rest is not needed.
	ignorePatterns: ['dist', 'build', 'coverage', '.tap', 'bench/results', 'bench/build'],
	tempDirName: '.stryker-tmp',
	// The machine is small and shared: two workers, and a generous margin
	// before a slow run counts as a mutant's infinite loop (a mutant's run
	// may take timeoutFactor times the unmutated one, plus timeoutMS).
	// Most loops are caught sooner, by Stryker's count of executed mutants.
	concurrency: 2,
	timeoutFactor: 3,
	timeoutMS: 20000,
	reporters: ['clear-text', 'progress-append-only', 'html', 'json'],
	clearTextReporter: { allowColor: false, logTests: false, reportTests: false, reportScoreTable: true, reportMutants: true },
	htmlReporter: { fileName: 'reports/mutation/mutation.html' },
	jsonReporter: { fileName: 'reports/mutation/mutation.json' },
};
