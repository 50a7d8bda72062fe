/*
 * Issue 14, item 3: a takeover that cannot happen leaves the running bbal
 * as it was.  Each case runs the built `bbal --takeover` against a real
 * bbal with a real mname backend (or, for an old process that dies half
 * way, against a stand-in that passes two sockets and hangs up, which no
 * bbal does on purpose) and asserts what an operator sees: exit 1 with one
 * line saying why, and the running bbal still answering and never having
 * handed anything over.
 */

import dgram from 'node:dgram';
import { closeSync, statSync, writeSync } from 'node:fs';
import net from 'node:net';
import t, { type Test } from 'tap';
import { fdPass, handleFd } from '../src/fd_pass.js';
import { controlSocketPath, LineReader, line, TAKEOVER_PROTOCOL } from '../src/takeover_wire.js';
import { type RunResult, runBbal, startBbal } from './support/bbal.js';
import { udpQuery } from './support/dns_client.js';
import { backendOf } from './support/dns_messages.js';
import { type Fleet, makeSocketDir, startBackend, startFleet } from './support/fleet.js';
import { freePort } from './support/ports.js';

const fp = fdPass();
const needsAddon = { skip: fp === null ? 'the native addon is not built' : false };

/* `bbal --takeover` (with `extra`) against the fleet, run to its end. */
function takeover(f: Fleet, extra: string[] = [], env?: NodeJS.ProcessEnv): Promise<RunResult> {
	return runBbal(['-b', '127.0.0.1', '-p', String(f.port), '-s', f.dir, '-S', f.sock, ...extra, '--takeover'], env);
}

/* One line on stderr, and nothing else there. */
function oneLine(t: Test, r: RunResult, re: RegExp): void {
	t.equal(r.code, 1, 'the new bbal exits 1');
	t.equal(r.stderr.trim().split('\n').length, 1, 'with one line on stderr');
	t.match(r.stderr, re, `saying why: ${r.stderr.trim()}`);
}

/* The running bbal answers, and has handed nothing over. */
async function servesOn(t: Test, f: Fleet, source: string): Promise<void> {
	const answer = await udpQuery({ port: f.port, source, name: 'still-there.example' });
	t.equal(backendOf(answer.packet), 'a', 'the running bbal still answers');
	t.equal(f.bbal.logs.some((l) => l.msg?.startsWith('handed over') === true), false, 'and has handed nothing over');
	t.equal(f.bbal.proc.exitCode, null, 'and is still running');
}

/* A takeover begun by hand, as a new bbal would: the connection's descriptor and the first answer, with the sockets. */
function helloByHand(f: Fleet): { fd: number; got: { data: Buffer; fds: number[] } } {
	const addon = fp as NonNullable<typeof fp>;
	const fd = addon.connectUnix(controlSocketPath(f.sock));
	writeSync(fd, line({
		type: 'hello', protocol: TAKEOVER_PROTOCOL, version: 'test', pid: process.pid, bind: '127.0.0.1', port: f.port,
		transport: 'native', options: {},
	}));
	return { fd, got: addon.recvFds(fd, 65536, 5000) };
}

t.test('nothing to take over: exit 1, one line', async (t) => {
	const dir = await makeSocketDir(t);
	const r = await runBbal(['-b', '127.0.0.1', '-p', String(await freePort()), '-s', dir, '-S', `${dir}.stats.sock`, '--takeover']);
	oneLine(t, r, /^bbal: no running bbal to take over at .*\.stats\.sock\.control \(ENOENT\)$/m);
});

t.test('another -b or -p is refused; the running bbal serves on', needsAddon, async (t) => {
	const f = await startFleet(t, ['a']);
	const r = await runBbal(['-b', '127.0.0.2', '-p', String(f.port), '-s', f.dir, '-S', f.sock, '--takeover']);
	oneLine(t, r, /refused: it listens on 127\.0\.0\.1:\d+, this one was asked for 127\.0\.0\.2:\d+ \(-b and -p cannot change/);
	await servesOn(t, f, '127.0.9.60');
});

t.test('another UDP transport is refused; the running bbal serves on', needsAddon, async (t) => {
	const f = await startFleet(t, ['a']);
	const r = await takeover(f, [], { BBAL_UDP: 'dgram' });
	oneLine(t, r, /refused: its UDP transport is native, this one's dgram/);
	await servesOn(t, f, '127.0.9.61');
});

t.test('a second takeover while one is in progress is refused; the first one\'s end frees the way', needsAddon, async (t) => {
	const f = await startFleet(t, ['a']);
	const addon = fp as NonNullable<typeof fp>;
	/* A takeover begun by hand: hello sent, sockets received, then held. */
	const { fd, got } = helloByHand(f);
	t.match(got.data.toString(), /^\{"type":"ready"/, 'the first takeover is given the sockets');
	t.equal(got.fds.length, 4, 'UDP, TCP, stats and control');

	const r = await takeover(f);
	oneLine(t, r, /refused: a takeover is already in progress \(pid \d+\)/);
	await servesOn(t, f, '127.0.9.62');

	got.fds.forEach((x) => addon.closeFd(x));
	closeSync(fd);
	await f.bbal.waitForLog((l) => l.msg === 'takeover abandoned by the new bbal: serving on', 3000);
	await servesOn(t, f, '127.0.9.63');
	const next = await startBbal(t, { dir: f.dir, port: f.port, args: ['--takeover'] });
	await next.waitForLog((l) => l.msg === 'took over', 5000);
	t.pass('a takeover after the abandoned one goes through');
});

t.test('a running bbal that does not answer: the takeover gives up at --takeover-timeout; the old one serves on', needsAddon, async (t) => {
	const f = await startFleet(t, ['a']);
	f.bbal.proc.kill('SIGSTOP');
	const r = await takeover(f, ['--takeover-timeout', '1']).finally(() => f.bbal.proc.kill('SIGCONT'));
	oneLine(t, r, /the running bbal did not answer within 1 s/);
	await servesOn(t, f, '127.0.9.64');
});

/*
 * A stand-in for the running bbal, for what no bbal does on purpose: it
 * passes a UDP and a TCP socket of its own on the port, then hangs up,
 * says nothing more, or hangs up at the handover.
 */
async function fakeOld(t: Test, behaviour: 'hang up' | 'silent' | 'hang up at handover'): Promise<{ dir: string; port: number; sock: string }> {
	const addon = fp as NonNullable<typeof fp>;
	const dir = await makeSocketDir(t);
	await startBackend(t, dir, 'a');
	const port = await freePort();
	const sock = `${dir}.stats.sock`;
	const udp = dgram.createSocket('udp4');
	await new Promise<void>((resolve) => udp.bind(port, '127.0.0.1', resolve));
	const tcp = net.createServer();
	await new Promise<void>((resolve) => tcp.listen(port, '127.0.0.1', resolve));
	const control = net.createServer((c) => {
		const reader = new LineReader();
		c.on('error', () => {});
		c.on('data', (chunk: Buffer) => {
			for (const l of reader.push(chunk)) {
				const type = (JSON.parse(l) as { type: string }).type;
				if (type === 'hello') {
					addon.sendFds(handleFd(c), Buffer.from(line({
						type: 'ready', protocol: TAKEOVER_PROTOCOL, version: 'test', pid: process.pid, remotes: 0, options: {},
						sockets: [{ kind: 'udp', address: '127.0.0.1' }, { kind: 'tcp' }],
					})), [handleFd(udp), handleFd(tcp)]);
					if (behaviour === 'hang up') {
						c.destroy();
					}
				} else if (type === 'remotes' && behaviour === 'hang up at handover') {
					c.write(line({ type: 'remotes-end', count: 0 }));
				} else if (type === 'handover') {
					/* It stops reading, as a bbal handing over does (a dgram socket reads, listened to or not), then is gone. */
					udp.close();
					tcp.close();
					c.destroy();
				}
			}
		});
	});
	await new Promise<void>((resolve) => control.listen(controlSocketPath(sock), resolve));
	t.teardown(() => {
		try {
			udp.close();
		} catch {
			/* closed at the handover */
		}
		tcp.close();
		control.close();
	});
	return { dir, port, sock };
}

t.test('an old process that dies half way: the new one exits 1 and never reads the sockets', needsAddon, async (t) => {
	const old = await fakeOld(t, 'hang up');
	const r = await runBbal(['-b', '127.0.0.1', '-p', String(old.port), '-s', old.dir, '-S', old.sock, '--takeover']);
	oneLine(t, r, /the running bbal \(pid \d+\) went away while (connecting to the backends|receiving the remote table)/);
	t.equal(statSync(old.sock, { throwIfNoEntry: false }), undefined, 'it made no stats socket of its own');
});

t.test('an old process that says nothing more after the sockets: given up at --takeover-timeout', needsAddon, async (t) => {
	const old = await fakeOld(t, 'silent');
	const r = await runBbal(['-b', '127.0.0.1', '-p', String(old.port), '-s', old.dir, '-S', old.sock,
		'--takeover-timeout', '1', '--takeover']);
	oneLine(t, r, /the takeover took longer than 1 s \(while receiving the remote table\): given up/);
});

t.test('an old process that vanishes at the handover: the new one serves on with what it has', needsAddon, async (t) => {
	const old = await fakeOld(t, 'hang up at handover');
	const next = await startBbal(t, { dir: old.dir, port: old.port, args: ['-S', old.sock, '--takeover'] });
	const warn = await next.waitForLog((l) => l.msg?.startsWith('takeover: the old bbal did not finish') === true, 5000);
	t.match(warn['reason'], /went away while handing over/, 'it says so');
	await next.waitForLog((l) => l.msg === 'took over', 5000);
	const answer = await udpQuery({ port: old.port, source: '127.0.9.67', name: 'served.example' });
	t.equal(backendOf(answer.packet), 'a', 'and answers on the socket it was given');
});

t.test('a new bbal that vanishes after the handover: the old one drains and exits 1, for its manager to restart it',
	needsAddon, async (t) => {
		const addon = fp as NonNullable<typeof fp>;
		const f = await startFleet(t, ['a']);
		const { fd, got } = helloByHand(f);
		got.fds.forEach((x) => addon.closeFd(x));
		const conn = new net.Socket({ fd, readable: true, writable: true });
		const reader = new LineReader();
		const seen: string[] = [];
		conn.on('data', (chunk: Buffer) => {
			for (const l of reader.push(chunk)) {
				const type = (JSON.parse(l) as { type: string }).type;
				seen.push(type);
				if (type === 'remotes-end') {
					conn.write(line({ type: 'handover' }));
				} else if (type === 'released') {
					conn.destroy();
				}
			}
		});
		conn.write(line({ type: 'remotes' }));
		const status = await f.bbal.exit;
		t.ok(seen.includes('released'), 'the old bbal handed over');
		t.equal(status.code, 1, 'and exits 1 once drained, the new one gone without a word');
		t.ok(f.bbal.logs.some((l) => l.msg === 'new bbal went away during the takeover: draining, will exit 1'), 'saying why');
	});

t.test('flags that may differ are logged, one line each', needsAddon, async (t) => {
	const f = await startFleet(t, ['a']);
	const next = await startBbal(t, { dir: f.dir, port: f.port, args: ['--max-remotes', '500', '--takeover'] });
	const line = await next.waitForLog((l) => l.msg === 'takeover: option differs from the running bbal', 5000);
	t.same([line['option'], line['running'], line['now']], ['maxRemotes', 100000, 500], 'the option, as it was and as it is');
	await next.waitForLog((l) => l.msg === 'took over', 5000);
});

t.test('without --takeover, a second bbal on the same stats socket refuses to start and says how to replace it', async (t) => {
	const f = await startFleet(t, ['a']);
	const r = await runBbal(['-b', '127.0.0.1', '-p', String(f.port), '-s', f.dir, '-S', f.sock]);
	t.equal(r.code, 1, 'exit 1');
	t.match(r.stderr, /another process is listening on stats socket .* \(bbal --takeover replaces a running bbal\)/, r.stderr.trim());
	await servesOn(t, f, '127.0.9.65');
});

t.test('the control socket is bbal\'s own user\'s only, and a stranger on it changes nothing', needsAddon, async (t) => {
	const f = await startFleet(t, ['a']);
	const path = controlSocketPath(f.sock);
	t.equal(statSync(path).mode & 0o777, 0o600, 'mode 0600');
	const reply = await new Promise<string>((resolve) => {
		const c = net.createConnection({ path });
		let got = '';
		c.on('data', (d) => { got += d.toString(); });
		c.on('close', () => resolve(got));
		c.on('connect', () => c.write('GET / HTTP/1.0\r\n\r\n'));
	});
	t.match(reply, /"type":"error"/, 'a line that is not JSON gets an error and the connection closed');
	await servesOn(t, f, '127.0.9.66');
});

t.test('--takeover and --reload together is a usage error', async (t) => {
	const r = await runBbal(['-s', '/tmp', '--takeover', '--reload']);
	t.equal(r.code, 2, 'exit 2');
	t.match(r.stderr, /--takeover and --reload do not go together/, 'one line');
});
