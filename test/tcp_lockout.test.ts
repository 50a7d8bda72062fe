/*
 * Issue 12 item 1, the TCP lockout, in-process with real sockets and a
 * stepped clock (support/tcp_rig.ts): one source trickling a byte of a
 * query every few seconds on hundreds of connections used to hold every
 * slot, because the idle timer restarted on any byte, nothing bounded how
 * long a message might take, nor how many connections one source might
 * hold, and the cap refused newcomers instead of making room.  Each test
 * here failed on the code before the fix (4dc3c32).  Also: an address
 * outside --allow evicts nobody, and a missed INBOUND_TCP_OK does not
 * fault a backend whose control session was replaced meanwhile.
 */

import type net from 'node:net';
import t from 'tap';
import { INBOUND_TCP_OK_FRAME } from './support/backend_frames.js';
import { encodeQuery, framed } from './support/dns_messages.js';
import { closed, connect, fakeRig, neverAnswers, settle } from './support/tcp_rig.js';
import { waitFor } from './support/wait.js';

const acceptAll = (sock: net.Socket): void => {
	sock.write(INBOUND_TCP_OK_FRAME);
};

const query = (id: number): Buffer => framed(encodeQuery('lockout.example', 'A', id));

t.test('one source holds at most --max-tcp-per-remote connections; others are not affected', async (t) => {
	/* Not half-open: the backend ends its side when a client leaves, so the connection is released. */
	const env = await fakeRig(t, acceptAll, { maxPerRemote: 3 }, { allowHalfOpen: false });
	const held = [];
	for (let i = 0; i < 3; i++) {
		held.push(await connect(t, env.port, '127.0.0.40'));
	}
	await waitFor(() => env.tcp.size === 3, 2000, 10, 'three held');
	const fourth = await connect(t, env.port, '127.0.0.40');
	await closed(fourth);
	t.equal(env.tcp.stats.overRemoteCap, 1, 'the fourth from one source is closed at accept and counted');
	t.equal(env.tcp.stats.evictedIdle + env.tcp.stats.evictedBusy, 0, 'and evicts nobody');
	const other = await connect(t, env.port, '127.0.0.41');
	await settle();
	t.notOk(other.closed, 'another source still gets in');
	held[0].sock.destroy();
	await waitFor(() => env.tcp.size === 3, 2000, 10, 'one of the three released');
	const again = await connect(t, env.port, '127.0.0.40');
	await settle();
	t.notOk(again.closed, 'a released connection gives its source room again');
	t.equal(env.tcp.stats.overRemoteCap, 1);
});

t.test('a query trickled a byte at a time is closed by the message deadline', async (t) => {
	const env = await fakeRig(t, acceptAll);
	const slow = await connect(t, env.port, '127.0.0.42');
	const fine = await connect(t, env.port, '127.0.0.43');
	await waitFor(() => env.tcp.stats.established === 2, 2000, 10, 'sessions flowing');
	const q = query(42);
	/* A whole query in two pieces a second apart is fine. */
	fine.sock.write(q.subarray(0, 5));
	await settle();
	env.advance(1);
	fine.sock.write(q.subarray(5));
	for (let i = 0; i < 3; i++) {
		slow.sock.write(q.subarray(i, i + 1));
		await settle();
		env.advance(2);
	}
	await closed(slow);
	t.equal(env.tcp.stats.messageTimeouts, 1, 'the trickler closed within 5-6 s of its first byte, counted');
	t.notOk(fine.closed, 'the query that arrived whole in time is not');
	t.equal(env.tcp.stats.idleClosed, 0, 'by the message deadline, not the idle one');
});

t.test('the idle deadline runs from the last whole message: stray bytes do not restart it', async (t) => {
	const env = await fakeRig(t, acceptAll, { idleTimeoutSecs: 3 });
	const client = await connect(t, env.port, '127.0.0.44');
	await waitFor(() => env.tcp.stats.established === 1, 2000, 10, 'session flowing');
	env.advance(2);
	client.sock.write(Buffer.from([0x00])); /* half a length prefix at 2 s */
	await settle();
	env.advance(1);
	await closed(client);
	t.equal(env.tcp.stats.idleClosed, 1, 'closed 3 s after accept, the byte at 2 s notwithstanding');
});

t.test('at the cap the connection idle longest makes room; one with a query outstanding only when none is idle',
	async (t) => {
		const env = await fakeRig(t, acceptAll, { maxConnections: 2 });
		const trickler = await connect(t, env.port, '127.0.0.45');
		trickler.sock.write(query(1).subarray(0, 3)); /* never finished */
		const busy = await connect(t, env.port, '127.0.0.46');
		busy.sock.write(query(2)); /* the backend never answers: outstanding */
		await waitFor(() => env.tcp.stats.established === 2, 2000, 10, 'both flowing');
		await settle();
		const newcomer = await connect(t, env.port, '127.0.0.47');
		await closed(trickler);
		t.equal(env.tcp.stats.evictedIdle, 1, 'the trickler (no query outstanding, no message since accept) goes');
		t.equal(env.tcp.stats.overCap, 0, 'the newcomer is not refused');
		t.notOk(busy.closed, 'the connection with a query in flight is kept');
		newcomer.send('newcomer.example', 'A', 3);
		await settle();
		const last = await connect(t, env.port, '127.0.0.48');
		await closed(busy);
		t.equal(env.tcp.stats.evictedBusy, 1, 'with none idle, the busy one whose last progress is oldest goes');
		t.notOk(newcomer.closed, 'the more recent one stays');
		t.notOk(last.closed);
		t.equal(env.tcp.size, 2);
	});

t.test('at the cap, a source outside --allow is refused before anything else: it evicts nobody, makes no remote',
	async (t) => {
		const env = await fakeRig(t, neverAnswers, { maxConnections: 1, allow: ['127.0.0.0/25'] });
		const gone = await connect(t, env.port, '127.0.0.50');
		gone.sock.end(query(5)); /* half-closed before the OK: the first to go at the cap */
		await waitFor(() => env.tcp.size === 1, 2000, 10, 'held');
		await settle();
		const remotesBefore = env.remotes.size;
		const outsider = await connect(t, env.port, '127.0.0.200');
		await closed(outsider);
		t.equal(env.tcp.stats.aclDropped, 1, 'the outsider is closed, counted');
		t.equal(env.tcp.stats.abandoned, 0, 'and did not evict the allowed connection');
		t.notOk(gone.closed, 'which is still open');
		t.equal(env.remotes.size, remotesBefore, 'no remote made for the outsider');
	});

t.test('a missed INBOUND_TCP_OK does not fault a backend whose control session was replaced since', async (t) => {
	const env = await fakeRig(t, neverAnswers);
	const { be, fake } = env;
	const client = await connect(t, env.port, '127.0.0.51');
	await waitFor(() => fake.inboundTcp.length === 1, 2000, 10, 'INBOUND_TCP at the backend');
	for (const s of fake.controlSessions) {
		s.destroy();
	}
	await waitFor(() => be.state === 'waiting', 2000, 10, 'the backend faulted by its control session\'s EOF');
	const faultsBefore = be.stats.faults;
	env.advance(1);
	await waitFor(() => be.ok, 2000, 10, 'reconnected: a new control session');
	env.advance(9);
	await closed(client);
	t.equal(env.tcp.stats.okTimeouts, 1, 'the TCP session still times out and is closed');
	t.ok(be.ok, 'but the new control session is not faulted for it');
	t.equal(be.stats.faults, faultsBefore, 'no fault counted');
});
