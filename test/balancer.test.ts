/*
 * The Balancer in-process: real mname backends (test/fixtures) on AF_UNIX
 * sockets in a temporary directory, a clock the test steps by hand, and a
 * fake UDP transport in place of the socket, so that the UDP hot path is
 * driven datagram by datagram and every answer is caught as the proxy hands
 * it over: forwarded and answered, dropped by the ACL, oversized, not DNS,
 * over the rate (REFUSED), no backend (SERVFAIL, a limited number a
 * second), a stuck backend session, and the snapshot's times.  And close():
 * idempotent, and no timeout left armed on the wheel.
 *
 * The backends' control sessions are real sockets, so answers arrive on
 * the event loop: the tests wait for them (with a deadline) rather than
 * step the clock.  The clock only moves when a test moves it, so no
 * heartbeat or rescan interferes unless asked for.
 */

import dnsPacket from 'dns-packet';
import t from 'tap';
import { Balancer } from '../src/balancer.js';
import { makeLogger } from '../src/log.js';
import { ipv4ToU32, MAX_UDP_PAYLOAD_BYTES } from '../src/protocol.js';
import { REMOTE_IDLE_EXPIRY_SECS } from '../src/remotes.js';
import { takeSnapshot } from '../src/stats.js';
import { SYNTH_ANSWERS_PER_SEC } from '../src/udp_proxy.js';
import type { UdpTransport } from '../src/udp_transport.js';
import { RESCAN_INTERVAL_SECS } from '../src/backends.js';
import { type LogRecord } from './support/bbal.js';
import { backendOf, encodeQuery } from './support/dns_messages.js';
import { startBalancer, RIG_START_MS } from './support/balancer_rig.js';
import { FakeTransport } from './support/fake_transport.js';
import { makeSocketDir, startBackend } from './support/fleet.js';
import { waitFor } from './support/wait.js';

const RCODE_SERVFAIL = 2;
const RCODE_REFUSED = 5;
const START = RIG_START_MS;

const addr = (ip: string): number => ipv4ToU32(ip);
const query = (id: number, name = 'q.example'): Buffer => encodeQuery(name, 'TXT', id);
const remoteOf = (bal: Balancer, ip: string) => bal.remotes.list().find((r) => r.addr === addr(ip));
const rcodeOf = (p: dnsPacket.Packet): number => (p.flags ?? 0) & 0x0f;
const logged = (logs: LogRecord[], msg: string): LogRecord[] => logs.filter((r) => r.msg === msg);

/* Two real mname backends, shared by the tests that need answers. */
const dir = await makeSocketDir(t);
await startBackend(t, dir, '5301');
await startBackend(t, dir, '5302');

t.test('a query is forwarded to a backend and its answer handed to the transport, sticky per remote', async (t) => {
	const { bal, udp } = await startBalancer(t, dir);
	t.same(bal.backends.list().map((be) => [be.id, be.ok]), [[5301, true], [5302, true]], 'both backends ok at start');
	t.equal(bal.state, 'running');
	t.equal(udp.state, 'bound', 'the injected transport was bound');

	const a = addr('127.0.5.1');
	const b = addr('127.0.5.2');
	udp.deliver(query(101), a, 4001);
	udp.deliver(query(102), b, 4002);
	await waitFor(() => udp.sent.length === 2, 3000, 5, 'two answers');
	const [ansA] = udp.answersTo(a, 4001);
	const [ansB] = udp.answersTo(b, 4002);
	t.equal(ansA?.id, 101, 'the answer to A carries its id and goes to its port');
	t.equal(ansB?.id, 102);
	t.not(backendOf(ansA), backendOf(ansB), 'two remotes, two backends (round-robin)');
	t.equal(String(remoteOf(bal, '127.0.5.1')?.primary?.id), backendOf(ansA), 'answered by its primary');

	for (let i = 0; i < 3; i++) {
		udp.deliver(query(200 + i), a, 4001);
	}
	await waitFor(() => udp.answersTo(a, 4001).length === 4, 3000, 5, 'three more answers');
	t.same(new Set(udp.answersTo(a, 4001).map((p) => backendOf(p))).size, 1, 'every answer to A from the same backend');
	t.match(bal.udp.stats, { received: 5, forwarded: 5, sent: 5, oversize: 0, invalid: 0, aclDropped: 0 });
	t.equal(remoteOf(bal, '127.0.5.1')?.udp, 4, 'counted on the remote');
});

t.test('outside --allow: dropped before a remote exists, counted, logged once per interval', async (t) => {
	const { bal, udp, logs, advance } = await startBalancer(t, dir, { allow: ['127.0.5.0/24'] });
	const stranger = addr('127.0.6.1');
	udp.deliver(query(1), stranger, 5000);
	udp.deliver(query(2), stranger, 5000);
	udp.deliver(query(3), addr('127.0.5.9'), 5000);
	await waitFor(() => udp.sent.length === 1, 3000, 5, 'the allowed query answered');
	t.equal(udp.answersTo(stranger, 5000).length, 0, 'nothing to the stranger');
	t.equal(remoteOf(bal, '127.0.6.1'), undefined, 'no remote made for it');
	t.equal(bal.udp.stats.aclDropped, 2);
	t.match(logged(logs, 'query from outside --allow (dropped)'), [{ remote_ip: '127.0.6.1', not_logged: 0, level: 40 }],
		'one line for two drops');
	advance(5);
	udp.deliver(query(4), stranger, 5000);
	t.match(logged(logs, 'query from outside --allow (dropped)')[1], { remote_ip: '127.0.6.1', not_logged: 1 },
		'five seconds on, the next line says how many were held back');
});

t.test('oversized and not-DNS datagrams are dropped and counted, on the remote too when it is held', async (t) => {
	const { bal, udp, logs } = await startBalancer(t, dir);
	const src = addr('127.0.5.20');
	/* The query first: junk from a source not yet held makes no remote (bounds.test.ts). */
	udp.deliver(query(8), src, 6000);
	udp.deliver(Buffer.alloc(1536, 0x41), src, 6000, 2000);
	udp.deliver(Buffer.alloc(MAX_UDP_PAYLOAD_BYTES + 1, 0x41), src, 6000);
	const response = query(7);
	response[2] |= 0x80;
	udp.deliver(response, src, 6000);
	udp.deliver(Buffer.from([1, 2, 3, 4, 5]), src, 6000);
	await waitFor(() => udp.sent.length === 1, 3000, 5, 'the good query answered');
	t.equal(udp.answersTo(src, 6000)[0]?.id, 8, 'only the good query');
	t.match(bal.udp.stats, { received: 5, oversize: 2, invalid: 2, forwarded: 1 });
	t.match(remoteOf(bal, '127.0.5.20'), { udpDrop: 2, udpInvalid: 2, udp: 1 }, 'on the remote');
	t.match(logged(logs, 'dropping oversized UDP packet'), [{ remote_ip: '127.0.5.20', len: 2000, max: MAX_UDP_PAYLOAD_BYTES }],
		'the true length of a datagram cut to its slot is logged, once');
	t.match(logged(logs, 'dropping UDP packet that is not a DNS query'), [{ remote_ip: '127.0.5.20', problem: String }]);
});

t.test('over --max-qps-per-remote: REFUSED at once, within the remote\'s synthesized allowance; a new second admits again', async (t) => {
	const { bal, udp, logs, advance } = await startBalancer(t, dir, { maxQpsPerRemote: 3 });
	const src = addr('127.0.5.30');
	for (let id = 1; id <= 5; id++) {
		udp.deliver(query(id), src, 7000);
	}
	const refused = udp.answersTo(src, 7000);
	t.same(refused.map((p) => [p.id, rcodeOf(p)]), [[4, RCODE_REFUSED], [5, RCODE_REFUSED]],
		'the fourth and fifth refused at once');
	await waitFor(() => udp.answersTo(src, 7000).length === 5, 3000, 5, 'the three admitted answered');
	t.match(bal.udp.stats, { forwarded: 3, rateLimited: 2, refused: 2 });
	t.equal(remoteOf(bal, '127.0.5.30')?.rateLimited, 2);
	t.match(logged(logs, 'remote over its query rate limit'), [{ remote_ip: '127.0.5.30', max_qps: 3 }]);
	advance(1);
	udp.deliver(query(6), src, 7000);
	await waitFor(() => udp.answersTo(src, 7000).length === 6, 3000, 5, 'answered');
	t.equal(bal.udp.stats.forwarded, 4, 'the next second: admitted again');

	const dropper = await startBalancer(t, dir, { maxQpsPerRemote: 1, rateLimitAction: 'drop' });
	dropper.udp.deliver(query(1), src, 7001);
	dropper.udp.deliver(query(2), src, 7001);
	await waitFor(() => dropper.udp.sent.length === 1, 3000, 5, 'one answer');
	t.same(dropper.udp.answersTo(src, 7001).map((p) => [p.id, rcodeOf(p)]), [[1, 0]],
		'--rate-limit-action drop: the excess gets nothing');
	t.match(dropper.bal.udp.stats, { rateLimited: 1, refused: 0 });
});

t.test('no backend ok: SERVFAIL at once, ten a second per remote, and again the next second', async (t) => {
	const empty = await makeSocketDir(t);
	const { bal, udp, logs, advance } = await startBalancer(t, empty);
	const src = addr('127.0.5.40');
	for (let id = 1; id <= SYNTH_ANSWERS_PER_SEC + 2; id++) {
		udp.deliver(query(id), src, 8000);
	}
	const answers = udp.answersTo(src, 8000);
	t.equal(answers.length, SYNTH_ANSWERS_PER_SEC, `${SYNTH_ANSWERS_PER_SEC} answers in one second`);
	t.ok(answers.every((p) => rcodeOf(p) === RCODE_SERVFAIL), 'each a SERVFAIL');
	t.same(answers.map((p) => p.id), Array.from({ length: SYNTH_ANSWERS_PER_SEC }, (_, i) => i + 1), 'to the first ones');
	t.match(bal.udp.stats, { noBackend: SYNTH_ANSWERS_PER_SEC + 2, servfail: SYNTH_ANSWERS_PER_SEC, forwarded: 0 });
	t.equal(remoteOf(bal, '127.0.5.40')?.udpDrop, SYNTH_ANSWERS_PER_SEC + 2);
	t.match(logged(logs, 'no backend for remote'), [{ remote_ip: '127.0.5.40', answer: 'SERVFAIL' }]);
	advance(1);
	udp.deliver(query(99), src, 8000);
	t.equal(udp.answersTo(src, 8000).at(-1)?.id, 99, 'the next second, a quick SERVFAIL again');

	const dropper = await startBalancer(t, empty, { noBackend: 'drop' });
	dropper.udp.deliver(query(1), src, 8001);
	t.equal(dropper.udp.sent.length, 0, '--no-backend drop: nothing');
	t.equal(dropper.bal.udp.stats.noBackend, 1);
});

t.test('a backend that stops reading: its queries are dropped and counted, not queued', async (t) => {
	const own = await makeSocketDir(t);
	const be = await startBackend(t, own, '5309');
	const { bal, udp, logs } = await startBalancer(t, own);
	t.ok(bal.backends.lookup(5309)?.ok, 'ok at start');
	be.proc.kill('SIGSTOP');
	t.teardown(() => { be.proc.kill('SIGCONT'); });
	const src = addr('127.0.5.50');
	const q = query(1);
	let batches = 0;
	while (bal.udp.stats.stuck === 0 && batches < 200) {
		for (let i = 0; i < 1000; i++) {
			udp.deliver(q, src, 9000);
		}
		batches++;
		/* The registry flushes on setImmediate; the socket fills as the kernel refuses more. */
		await new Promise((resolve) => setImmediate(resolve));
		await new Promise((resolve) => setImmediate(resolve));
	}
	t.ok(bal.udp.stats.stuck > 0, `stuck after ${batches * 1000} queries`);
	t.ok(bal.backends.lookup(5309)?.stuck, 'the backend says it is stuck');
	const stuckBefore = bal.udp.stats.stuck;
	udp.deliver(q, src, 9000);
	t.equal(bal.udp.stats.stuck, stuckBefore + 1, 'the next query is dropped at once');
	t.equal(bal.backends.lookup(5309)?.stats.stuck, bal.udp.stats.stuck, 'counted on the backend');
	t.equal(remoteOf(bal, '127.0.5.50')?.udpDrop, bal.udp.stats.stuck, 'and on the remote');
	t.match(logged(logs, 'stuck backend write queue (dropping UDP packet)'), [{ be_id: 5309, remote_ip: '127.0.5.50' }],
		'logged once, on the backend\'s logger');
});

t.test('answers the socket could not take are counted: a full send buffer or queue apart from other errors', async (t) => {
	const { bal, udp } = await startBalancer(t, dir);
	udp.onError(Object.assign(new Error('UDP send queue full'), { code: 'ENOBUFS', dropped: 3 }));
	udp.onError(Object.assign(new Error('UDP send failed'), { code: 'EAGAIN', dropped: 2 }));
	udp.onError(Object.assign(new Error('UDP send failed'), { code: 'EPERM', dropped: 1 }));
	t.match(bal.udp.stats, { sendErrors: 6, sendQueueFull: 5 }, 'all six in sendErrors, the five dropped for room in sendQueueFull');
	t.equal(takeSnapshot(bal.statsSources).udp.sendQueueFull, 5, 'in the snapshot');
});

t.test('a receive error is counted apart; a fatal socket error goes to onFatal (main exits on it)', async (t) => {
	const fatal: Error[] = [];
	const { bal, udp } = await startBalancer(t, dir, { onFatal: (err) => fatal.push(err) });
	udp.onError(Object.assign(new Error('UDP receive failed'), { code: 'ECONNREFUSED', syscall: 'recvmmsg', dropped: 0 }));
	t.match(bal.udp.stats, { receiveErrors: 1, sendErrors: 0 }, 'a receive error drops no answer');
	t.same(fatal, [], 'and is not fatal');
	const err = Object.assign(new Error('UDP socket failed'), { code: 'EBADF', syscall: 'recvmmsg', dropped: 0, fatal: true });
	udp.onError(err);
	t.same(fatal, [err], 'the fatal one handed to onFatal');
	t.equal(bal.state, 'running', 'the balancer leaves the decision to its owner');
});

t.test('without onFatal, a fatal socket error is logged and the balancer closes itself', async (t) => {
	const { bal, udp, logs } = await startBalancer(t, dir);
	udp.onError(Object.assign(new Error('UDP socket failed'), { code: 'EBADF', dropped: 0, fatal: true }));
	await bal.close();
	t.equal(logged(logs, 'UDP socket failed (closing)').length, 1, 'one fatal line');
	t.equal(logged(logs, 'UDP socket failed (closing)')[0]?.level, 60, 'at fatal level');
	t.equal(udp.state, 'closed');
});

t.test('bound to 0.0.0.0: each answer goes from the local address its remote last queried', async (t) => {
	const { bal, udp } = await startBalancer(t, dir, { bind: '0.0.0.0' });
	const [a, b] = [addr('127.0.6.1'), addr('127.0.6.2')];
	const [l5, l6, high] = [addr('127.0.0.5'), addr('127.0.0.6'), addr('203.0.113.9')];
	udp.deliver(query(1), a, 4001, undefined, l5);
	await waitFor(() => udp.sent.length === 1, 3000, 5, 'answer 1');
	udp.deliver(query(2), b, 4002, undefined, high);
	await waitFor(() => udp.sent.length === 2, 3000, 5, 'answer 2');
	udp.deliver(query(3), a, 4001, undefined, l6);
	await waitFor(() => udp.sent.length === 3, 3000, 5, 'answer 3');
	t.same(udp.sent.map((s) => [dnsPacket.decode(s.bytes).id, s.addr, s.local]),
		[[1, a, l5], [2, b, high], [3, a, l6]], 'each from the address asked (one above 2^31 too)');
	t.equal(remoteOf(bal, '127.0.6.1')?.localAddr, l6 | 0, 'kept on the remote, as an int32');
});

t.test('bound to one address: no local address is passed on', async (t) => {
	const { udp } = await startBalancer(t, dir);
	udp.deliver(query(1), addr('127.0.6.3'), 4001, undefined, addr('127.0.0.5'));
	await waitFor(() => udp.sent.length === 1, 3000, 5, 'the answer');
	t.equal(udp.sent[0]?.local, 0);
});

t.test('bound to 0.0.0.0, a SERVFAIL bbal makes itself goes from the address asked too', async (t) => {
	const empty = await makeSocketDir(t);
	const { udp, bal } = await startBalancer(t, empty, { bind: '0.0.0.0' });
	udp.deliver(query(7), addr('127.0.6.4'), 4001, undefined, addr('127.0.0.5'));
	t.equal(bal.udp.stats.servfail, 1);
	t.same(udp.sent.map((s) => s.local), [addr('127.0.0.5')]);
});

t.test('the rescan follows the host\'s addresses when the transport has a socket per address, and logs the changes', async (t) => {
	const { udp, logs, advance } = await startBalancer(t, dir, { bind: '0.0.0.0' });
	let calls = 0;
	(udp as UdpTransport).followAddresses = () => {
		calls++;
		return Promise.resolve({
			added: ['127.0.0.7'], removed: ['127.0.0.6'],
			failed: [{ address: '192.0.2.7', err: Object.assign(new Error('bind EADDRNOTAVAIL'), { code: 'EADDRNOTAVAIL' }) }],
		});
	};
	advance(RESCAN_INTERVAL_SECS);
	await waitFor(() => logged(logs, 'cannot listen on a new address (tried again at each rescan)').length === 1, 2000);
	t.equal(calls, 1, 'once per rescan');
	t.equal(logged(logs, 'UDP listening on a new address')[0]?.address, '127.0.0.7');
	t.equal(logged(logs, 'UDP address gone (socket closed)')[0]?.address, '127.0.0.6');
	t.equal(logged(logs, 'cannot listen on a new address (tried again at each rescan)')[0]?.address, '192.0.2.7');
});

t.test('the snapshot: first and last seen are the clock\'s times, to the second', async (t) => {
	const { bal, udp, advance } = await startBalancer(t, dir);
	const src = addr('127.0.5.60');
	udp.deliver(query(1), src, 4000);
	advance(7.4);
	udp.deliver(query(2), src, 4000);
	const snap = takeSnapshot(bal.statsSources);
	const rem = snap.remotes.find((r) => r.ip === '127.0.5.60');
	t.equal(rem?.firstSeen, '2030-01-02T03:04:05.000Z', 'first seen: the clock at the first query');
	t.equal(rem?.lastSeen, '2030-01-02T03:04:12.000Z', 'last seen: 7.4 s later, in whole seconds');
	t.same(rem?.stats, { udp: 2, udpDrop: 0, tcp: 0, tcpDrop: 0, udpInvalid: 0, rateLimited: 0 }, 'the stats shape');
	t.equal(snap.socketDir, dir);
});

t.test('the periodic jobs run on the wheel: an idle remote is expired by the expiry job', async (t) => {
	const { bal, udp, advance } = await startBalancer(t, dir);
	udp.deliver(query(1), addr('127.0.5.70'), 4000);
	t.ok(bal.wheel.list().some((to) => to.name === 'expire remotes'), 'the expiry job is armed');
	/* Ten seconds a step, each time letting the backends answer the heartbeats it sent. */
	const step = async (secs: number): Promise<void> => {
		for (let s = 0; s < secs; s += 10) {
			advance(10);
			await waitFor(() => bal.backends.list().every((be) => !be.heartbeatOutstanding), 3000, 2, 'heartbeats answered');
		}
	};
	await step(REMOTE_IDLE_EXPIRY_SECS);
	t.equal(bal.remotes.size, 1, 'idle 300 s when the job ran: kept');
	await step(20);
	t.equal(bal.remotes.size, 1, '320 s: the job has not run again');
	await step(10);
	t.equal(bal.remotes.size, 0, '330 s: expired by the job');
	t.equal(bal.remotes.expired, 1);
	t.ok(bal.backends.list().every((be) => be.ok), 'the backends stayed ok through 330 s of heartbeats');
});

t.test('close(): idempotent, the transport closed, no timeout left armed on the wheel', async (t) => {
	const { bal, udp } = await startBalancer(t, dir);
	const names = bal.wheel.list().map((to) => to.name);
	for (const n of ['rescan socket directory', 'rebalance', 'expire remotes', 'backend 5301 heartbeat']) {
		t.ok(names.includes(n), `${n} armed while running`);
	}
	const first = bal.close();
	t.equal(bal.close(), first, 'every call returns the same promise');
	await first;
	t.equal(bal.state, 'closed');
	t.same(bal.wheel.list(), [], 'nothing armed on the wheel');
	t.equal(bal.wheel.list().length, 0);
	t.equal(udp.state, 'closed', 'the transport closed');
	t.ok(bal.backends.list().every((be) => be.state === 'closed'), 'every backend closed');
	await bal.close();
	t.pass('a third close() resolves too');

	const neverStarted = new Balancer({
		bind: '127.0.0.1', port: 0, socketDir: dir, log: makeLogger('fatal'), transport: new FakeTransport(), clock: () => START,
	});
	t.equal(neverStarted.wheel.list().length, 3, 'the periodic jobs are armed from construction');
	await neverStarted.close();
	t.equal(neverStarted.wheel.list().length, 0, 'and disarmed by close() without start()');
	await neverStarted.start();
	t.equal(neverStarted.state, 'closed', 'start() after close() binds nothing');
});
