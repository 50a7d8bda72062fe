/*
 * The command line (src/options.ts) in-process: the defaults, the last of
 * a repeated flag winning, the --allow lists operators write (spaces after
 * commas, trailing commas, repeated flags, and the empty list that must not
 * mean "everyone"), the port range, and for every flag a bad value -- or no
 * value at all -- giving a UsageError of one line naming the flag, which
 * main turns into exit status 2.  A few of them run through the built CLI too, to see the line
 * on stderr and the status.
 */

import t from 'tap';
import { Acl } from '../src/dns.js';
import { exitStatusFor } from '../src/main.js';
import { type Options, parseArgs, UsageError } from '../src/options.js';
import { ipv4ToU32 } from '../src/protocol.js';
import { DEFAULT_STATS_SOCKET } from '../src/stats.js';
import { runBbal } from './support/bbal.js';

const DIR = '/var/run/binder/sockets';

/* parseArgs with -s DIR and an empty environment (no LOG_LEVEL from the test's own). */
function parse(args: string[], env: NodeJS.ProcessEnv = {}): Options {
	const opts = parseArgs(['-s', DIR, ...args], env);
	if (opts === null) {
		throw new Error('parseArgs printed help');
	}
	return opts;
}

/* The UsageError parseArgs throws for argv (no -s added), or a failure. */
function usageError(argv: string[], env: NodeJS.ProcessEnv = {}): UsageError {
	try {
		parseArgs(argv, env);
	} catch (err) {
		if (err instanceof UsageError) {
			return err;
		}
		throw err;
	}
	throw new Error(`parseArgs accepted ${JSON.stringify(argv)}`);
}

t.test('defaults: what the README says', async (t) => {
	t.same(parse([]), {
		bind: '0.0.0.0', port: 53, socketDir: DIR, logLevel: 'info', maxTcpConnections: 512, maxTcpPerRemote: 16,
		maxTcpQueriesPerConn: 32, maxTcpQueriesPerRemote: 8, tcpIdleTimeoutSecs: 10,
		statsSocket: DEFAULT_STATS_SOCKET, statsSocketExplicit: false, http: null, noBackend: 'servfail',
		maxRemotes: 100_000, maxQpsPerRemote: 0, rateLimitAction: 'refuse', allow: [], maxTcpMessageBytes: 16384,
		watchDir: true, queryTimeoutMs: 2000, maxInflightPerBackend: 65_536, answerAccounting: true, healthCheck: true,
		healthIntervalSecs: 1, healthTimeoutMs: 1000, healthRise: 2, healthFall: 2,
		healthQuery: { name: 'bbal-health-check.invalid', type: 1 },
		takeover: false, reload: false, takeoverTimeoutMs: 10_000, cacheSize: 0, cacheMaxTtlSecs: 5, serveStaleSecs: 0,
	});
});

t.test('every flag, long and short, lands in its field; a repeated flag counts once, the last winning', async (t) => {
	const o = parse(['-b', '127.0.0.1', '-p', '5353', '-l', 'debug', '-S', '/tmp/x.sock', '--metrics', '127.0.0.1:9153',
		'--no-backend', 'drop', '--max-remotes', '1', '--max-qps-per-remote', '20', '--rate-limit-action', 'drop',
		'--max-tcp-message', '512', '--max-tcp-connections', '3', '--tcp-idle-timeout', '4', '--no-watch',
		'--max-tcp-per-remote', '2', '--max-tcp-queries-per-conn', '5', '--max-tcp-queries-per-remote', '7', '-p', '5354', '-s', '/tmp/other',
		'--query-timeout', '1.5', '--max-inflight-per-backend', '100', '--no-answer-accounting', '--no-health-check',
		'--health-interval', '2', '--health-timeout', '0.25', '--health-rise', '3', '--health-fall', '4',
		'--health-query', 'probe.example.com:txt', '--takeover', '--takeover-timeout', '2.5']);
	t.same(parse(['--cache-size', '1000', '--cache-max-ttl', '30', '--serve-stale', '600']),
		{ ...parse([]), cacheSize: 1000, cacheMaxTtlSecs: 30, serveStaleSecs: 600 }, 'the cache\'s flags');
	t.same(o, {
		bind: '127.0.0.1', port: 5354, socketDir: '/tmp/other', logLevel: 'debug', maxTcpConnections: 3,
		maxTcpPerRemote: 2, maxTcpQueriesPerConn: 5, maxTcpQueriesPerRemote: 7,
		tcpIdleTimeoutSecs: 4, statsSocket: '/tmp/x.sock', statsSocketExplicit: true,
		http: { host: '127.0.0.1', port: 9153 }, noBackend: 'drop', maxRemotes: 1, maxQpsPerRemote: 20,
		rateLimitAction: 'drop', allow: [], maxTcpMessageBytes: 512, watchDir: false,
		queryTimeoutMs: 1500, maxInflightPerBackend: 100, answerAccounting: false, healthCheck: false,
		healthIntervalSecs: 2, healthTimeoutMs: 250, healthRise: 3, healthFall: 4,
		healthQuery: { name: 'probe.example.com', type: 16 }, takeover: true, reload: false, takeoverTimeoutMs: 2500,
		cacheSize: 0, cacheMaxTtlSecs: 5, serveStaleSecs: 0,
	});
	t.equal(parse(['--reload']).reload, true, '--reload');
	t.same(parse(['--health-query', 'up.example']).healthQuery, { name: 'up.example', type: 1 }, 'type A when left out');
	t.equal(parse(['-l', 'info'], { LOG_LEVEL: 'warn' }).logLevel, 'warn', 'LOG_LEVEL overrides -l');
	t.equal(parse(['-l', 'warn'], { LOG_LEVEL: '' }).logLevel, 'warn', 'an empty LOG_LEVEL does not');
	t.same(parse(['--metrics', 'localhost:9153']).http, { host: 'localhost', port: 9153 }, 'localhost as the host');
	t.same(parse(['--http', '127.0.0.1:8053']).http, { host: '127.0.0.1', port: 8053 }, '--http');
	t.same(parse(['--http', '127.0.0.1:8053', '--metrics', '127.0.0.1:8053']).http, { host: '127.0.0.1', port: 8053 },
		'--http and its old name --metrics, agreeing');
});

t.test('--takeover-timeout takes seconds from 0.1 to 600', async (t) => {
	for (const bad of ['0', '0.05', '601', 'soon', '-1']) {
		t.match(usageError(['-s', DIR, '--takeover-timeout', bad]).message,
			/^--takeover-timeout ".*" is not a number of seconds from 0\.1 to 600$/, bad);
	}
});

t.test('--allow: spaces after commas and trailing commas are forgiven; the flag repeats', async (t) => {
	const o = parse(['--allow', '10.0.0.0/8, 192.168.0.0/16', '--allow', '172.16.0.0/12,', '--allow', ' 127.0.0.1 ,,']);
	t.same(o.allow, ['10.0.0.0/8, 192.168.0.0/16', '172.16.0.0/12,', ' 127.0.0.1 ,,'], 'kept as given');
	const acl = new Acl(o.allow);
	t.same(acl.cidrs.map((c) => c.text), ['10.0.0.0/8', '192.168.0.0/16', '172.16.0.0/12', '127.0.0.1'],
		'four prefixes, trimmed, the empty pieces dropped');
	for (const [addr, allowed] of [['10.9.8.7', true], ['192.168.3.4', true], ['172.31.0.1', true], ['127.0.0.1', true],
		['127.0.0.2', false], ['11.0.0.1', false]] as const) {
		t.equal(acl.allows(ipv4ToU32(addr)), allowed, `${addr} ${allowed ? 'allowed' : 'refused'}`);
	}
	t.same(parse(['--allow=10.0.0.0/8']).allow, ['10.0.0.0/8'], '--allow=LIST');
});

t.test('--allow that names no prefix is refused, not read as "everyone"', async (t) => {
	for (const argv of [['--allow', ''], ['--allow', ','], ['--allow', ' , '], ['--allow', '10.0.0.0/8', '--allow', '']]) {
		const err = usageError(['-s', DIR, ...argv]);
		t.match(err.message, /^--allow "[ ,]*" names no prefix: give CIDR\[,CIDR\.\.\.\], or leave --allow out to allow everyone$/,
			`${JSON.stringify(argv)}: ${err.message}`);
	}
	for (const argv of [['--allow'], ['--allow='], ['--allow', '-p', '53']]) {
		t.equal(usageError(['-s', DIR, ...argv]).message, '--allow needs a value', `${JSON.stringify(argv)}`);
	}
});

t.test('--allow with a bad prefix names it', async (t) => {
	t.match(usageError(['-s', DIR, '--allow', '10.0.0.1/8']).message, /^--allow: "10\.0\.0\.1\/8" has host bits set: did you mean 10\.0\.0\.0\/8\?$/);
	t.match(usageError(['-s', DIR, '--allow', '10.0.0.0/8, bogus']).message, /^--allow: " bogus" is not an IPv4 address or CIDR prefix/);
	t.match(usageError(['-s', DIR, '--allow', '10.0.0.0/33']).message, /^--allow: "10\.0\.0\.0\/33"/);
	t.match(usageError(['-s', DIR, '--allow', '::1/128']).message, /^--allow: "::1\/128"/);
});

t.test('ports: 1 to 65535, digits only', async (t) => {
	t.equal(parse(['-p', '1']).port, 1);
	t.equal(parse(['-p', '65535']).port, 65535);
	t.equal(parse(['--port', '053']).port, 53, 'leading zeros are still decimal');
	for (const bad of ['0', '65536', '99999', '123456', '-1', '1.5', '0x35', 'dns', '', ' 53', '5e3']) {
		t.equal(usageError(['-s', DIR, '-p', bad]).message, `port "${bad}" is not a number from 1 to 65535`, `-p "${bad}"`);
	}
	t.equal(usageError(['-s', DIR, '--port=']).message, 'port "" is not a number from 1 to 65535', '--port=');
});

/* argv after -s DIR, and what the one line must say. */
const BAD: Array<[string[], RegExp]> = [
	[['-b', 'nowhere'], /^listen address "nowhere" is not an IPv4 address$/],
	[['-b', '999.0.0.1'], /^listen address "999\.0\.0\.1" is not an IPv4 address$/],
	[['-b', '::1'], /^listen address ::1 is IPv6: the backend protocol carries IPv4 addresses only$/],
	[['-l', 'loud'], /^unknown log level "loud": use one of trace, debug, info, warn, error, fatal$/],
	[['-S', ''], /^the stats socket path \(-S\) is empty$/],
	[['-S', `${DIR}/stats.sock`], /^stats socket \/var\/run\/binder\/sockets\/stats\.sock is inside the backend socket directory/],
	[['-S', DIR], /is inside the backend socket directory/],
	[['--metrics', 'nowhere'], /^--metrics "nowhere" is not HOST:PORT with an IPv4 HOST/],
	[['--metrics', '127.0.0.1:0'], /^--metrics "127\.0\.0\.1:0" is not HOST:PORT/],
	[['--metrics', 'example.com:9153'], /^--metrics "example\.com:9153" is not HOST:PORT/],
	[['--metrics', '127.0.0.1'], /^--metrics "127\.0\.0\.1" is not HOST:PORT/],
	[['--http', '127.0.0.1'], /^--http "127\.0\.0\.1" is not HOST:PORT/],
	[['--http', '127.0.0.1:8053', '--metrics', '127.0.0.1:9153'], /^--metrics is --http's old name: give one HOST:PORT/],
	[['--no-backend', 'maybe'], /^--no-backend "maybe" is not one of servfail, drop$/],
	[['--cache-size', '-1'], /^--cache-size "-1" is not a whole number of at least 1$/],
	[['--cache-size', '10000001'], /^--cache-size 10000001 is over 10000000 entries$/],
	[['--cache-max-ttl', '0'], /^--cache-max-ttl "0" is not a whole number of at least 1$/],
	[['--cache-max-ttl', '3601'], /^--cache-max-ttl 3601 is over 3600 seconds$/],
	[['--serve-stale', '86401', '--cache-size', '1'], /^--serve-stale 86401 is over 86400 seconds$/],
	[['--serve-stale', '60'], /^--serve-stale needs a cache: give --cache-size too$/],
	[['--cache-size', '10', '--no-answer-accounting'], /^--cache-size needs answer accounting/],
	[['--max-remotes', '0'], /^--max-remotes "0" is not a whole number of at least 1$/],
	[['--max-remotes', '-5'], /^--max-remotes "-5" is not a whole number of at least 1$/],
	[['--max-remotes', '1e3'], /^--max-remotes "1e3" is not a whole number of at least 1$/],
	[['--max-remotes', '1234567890'], /^--max-remotes "1234567890" is not a whole number of at least 1$/],
	[['--max-qps-per-remote', '-1'], /^--max-qps-per-remote "-1" is not a whole number of at least 1$/],
	[['--max-qps-per-remote', 'lots'], /^--max-qps-per-remote "lots" is not a whole number of at least 1$/],
	[['--rate-limit-action', 'block'], /^--rate-limit-action "block" is not one of refuse, drop$/],
	[['--max-tcp-message', '11'], /^--max-tcp-message 11 is outside 12-65535 \(a DNS message's size\)$/],
	[['--max-tcp-message', '65536'], /^--max-tcp-message 65536 is outside 12-65535/],
	[['--max-tcp-message', 'big'], /^--max-tcp-message "big" is not a whole number of at least 1$/],
	[['--max-tcp-connections', '0'], /^--max-tcp-connections "0" is not a whole number of at least 1$/],
	[['--max-tcp-per-remote', '0'], /^--max-tcp-per-remote "0" is not a whole number of at least 1$/],
	[['--max-tcp-queries-per-conn', 'x'], /^--max-tcp-queries-per-conn "x" is not a whole number of at least 1$/],
	[['--max-tcp-queries-per-remote', '0'], /^--max-tcp-queries-per-remote "0" is not a whole number of at least 1$/],
	[['--tcp-idle-timeout', '0'], /^--tcp-idle-timeout "0" is not a whole number of at least 1$/],
	[['--tcp-idle-timeout', '2.5'], /^--tcp-idle-timeout "2\.5" is not a whole number of at least 1$/],
	[['--allow', 'x'], /^--allow: "x" is not an IPv4 address or CIDR prefix/],
	[['--query-timeout', '0'], /^--query-timeout "0" is not a number of seconds from 0\.1 to 60$/],
	[['--query-timeout', '2s'], /^--query-timeout "2s" is not a number of seconds from 0\.1 to 60$/],
	[['--health-interval', '0.1'], /^--health-interval "0\.1" is not a number of seconds from 0\.5 to 3600$/],
	[['--health-timeout', '61'], /^--health-timeout "61" is not a number of seconds from 0\.1 to 60$/],
	[['--health-rise', '0'], /^--health-rise "0" is not a whole number of at least 1$/],
	[['--health-fall', 'x'], /^--health-fall "x" is not a whole number of at least 1$/],
	[['--max-inflight-per-backend', '0'], /^--max-inflight-per-backend "0" is not a whole number of at least 1$/],
	[['--health-query', 'a..b'], /^--health-query "a\.\.b": "a\.\.b" is not a DNS name/],
	[['--health-query', 'ok.example:BOGUS'], /^--health-query "ok\.example:BOGUS": the type is not one of A, NS/],
	[['--health-query', `${'x'.repeat(64)}.example`], /is not a DNS name/],
	[['--no-such-flag'], /^unknown flag --no-such-flag \(see --help\)$/],
	[['--no-such-flag=3'], /^unknown flag --no-such-flag \(see --help\)$/],
	[['-Z'], /^unknown flag -Z \(see --help\)$/],
	[['extra'], /^unexpected argument: extra$/],
];

/* Every flag that takes a value, as a user may type it. */
const VALUED = ['-b', '--bind', '-p', '--port', '-s', '--sockets', '-l', '--log-level', '-S', '--stats-socket', '--metrics', '--http',
	'--cache-size', '--cache-max-ttl', '--serve-stale', '--no-backend', '--max-remotes', '--max-qps-per-remote', '--rate-limit-action', '--allow', '--max-tcp-message',
	'--max-tcp-connections', '--tcp-idle-timeout', '--max-tcp-per-remote', '--max-tcp-queries-per-conn',
	'--max-tcp-queries-per-remote', '--query-timeout', '--max-inflight-per-backend', '--health-interval', '--health-timeout',
	'--health-query', '--health-rise', '--health-fall'];

t.test('every flag\'s bad value is one line naming it, a UsageError, exit status 2', async (t) => {
	for (const [args, want] of BAD) {
		const err = usageError(['-s', DIR, ...args]);
		t.match(err.message, want, `${args.join(' ')}: ${err.message}`);
		t.notOk(err.message.includes('\n'), `${args.join(' ')}: one line`);
		t.equal(err.code, 'EUSAGE');
		t.equal(exitStatusFor(err), 2, `${args.join(' ')}: exit 2`);
	}
	t.equal(usageError(['-s', DIR], { LOG_LEVEL: 'loud' }).message,
		'unknown log level "loud" (from LOG_LEVEL): use one of trace, debug, info, warn, error, fatal', 'LOG_LEVEL named');
	t.equal(usageError([]).message, 'the socket directory is required: -s DIR', 'no -s');
	t.equal(usageError(['-s', '']).message, 'the socket directory is required: -s DIR', 'an empty -s');
	t.equal(exitStatusFor(new Error('EADDRINUSE')), 1, 'anything else: exit 1');
});

t.test('a flag with no value after it is refused, not read as its default', async (t) => {
	for (const flag of VALUED) {
		t.equal(usageError(['-s', DIR, flag]).message, `${flag} needs a value`, `${flag} last`);
		t.equal(usageError([flag, '--no-watch', '-s', DIR]).message, `${flag} needs a value`, `${flag} before another flag`);
	}
});

t.test('--max-remotes 1 is the smallest table; 0 is refused', async (t) => {
	t.equal(parse(['--max-remotes', '1']).maxRemotes, 1);
	t.equal(parse(['--max-qps-per-remote', '0']).maxQpsPerRemote, 0, 'a rate of 0 means no limit');
});

t.test('through the CLI: one line on stderr, exit 2, nothing on stdout; --help exits 0', async (t) => {
	for (const [args, line] of [
		[['--max-remotes', '0'], 'bbal: --max-remotes "0" is not a whole number of at least 1\n'],
		[['--allow', ''], 'bbal: --allow "" names no prefix: give CIDR[,CIDR...], or leave --allow out to allow everyone\n'],
		[['-p', '65536'], 'bbal: port "65536" is not a number from 1 to 65535\n'],
		[['-p'], 'bbal: -p needs a value\n'],
	] as const) {
		const res = await runBbal(['-s', '/tmp', ...args]);
		t.same({ code: res.code, stderr: res.stderr, stdout: res.stdout }, { code: 2, stderr: line, stdout: '' }, args.join(' '));
	}
	const help = await runBbal(['--help']);
	t.equal(help.code, 0, '--help exits 0');
	for (const flag of ['--sockets', '--allow', '--max-remotes', '--version', '--help']) {
		t.ok(help.stdout.includes(flag), `--help lists ${flag}`);
	}
});
