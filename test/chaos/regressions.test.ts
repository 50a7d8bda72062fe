/*
 * Regression tests for what the chaos suite found in bbal, each reduced to
 * the smallest fleet that shows it.
 *
 * 1. A removed socket file is never noticed while the backend's control
 *    session stays up.  README ("The socket directory"): "A socket whose
 *    file disappears is marked *removed* and not retried until the file is
 *    back."  In fact Backends.rescan() only looks at the sockets that exist,
 *    and a backend is marked removed only when connecting its control
 *    session fails with ENOENT, which never happens while the session it has
 *    stays open.  So when a backend's socket file is unlinked while its
 *    process runs on, bbal keeps it ok and keeps its remotes on it; every TCP
 *    connection from those remotes then fails (the per-connection session's
 *    connect gets ENOENT and the client is reset), for as long as the
 *    process lives, and UDP keeps going to a backend nobody can reach any
 *    more.  The chaos "remove" scenario lost every TCP query of the
 *    backend's remotes from 6 s after the unlink until the process died.
 *    (Fixed in 939bb51.)
 *
 * 2. A backend that stalls and then resumes is first handed everything bbal
 *    queued for it during the stall.  A session is "stuck" only once 256 KiB
 *    wait in bbal (CONTROL_HIGH_WATER_BYTES) on top of the socket buffer;
 *    both are delivered when the backend reads again, so it first answers
 *    thousands of queries whose clients gave up long ago, and the fresh
 *    queries of its remotes wait behind them.  The chaos "stuck" scenario
 *    (14-s stall at 2,000 qps) lost up to 5,543 queries after bbal had
 *    logged the session writable again, all timeouts of the stalled
 *    backend's remotes; meanwhile those remotes got no failover at all
 *    until the heartbeat deadline (up to 22 s), because a stuck session
 *    drops rather than faults.  This test shows the stale delivery in a few
 *    seconds with padded queries: after a 4-s stall the backend received,
 *    on the session bbal kept, 425 queries up to 4 s old before any new one.
 *    (Fixed in 939bb51: a session stuck for 2 s is faulted.)
 *
 * 3. A TCP connection waiting for its backend's INBOUND_TCP_OK holds its
 *    slot until the 10-s OK deadline even after its client has hung up: the
 *    client socket is accepted paused (pauseOnConnect) and not read until
 *    the OK, so bbal never sees the client's FIN.  A stalled backend that
 *    gets TCP connections therefore fills --max-tcp-connections with dead
 *    ones, and then bbal refuses TCP from every remote, those of healthy
 *    backends too.  The chaos "stuck" scenario (14-s stall) counted
 *    tcp.overCap +208 and lost 84 TCP queries of remotes served by healthy
 *    backends, outside any window.  Each of those connections also logs its
 *    own "no INBOUND_TCP_OK from backend" error line, unthrottled.
 */

import type net from 'node:net';
import { unlink } from 'node:fs/promises';
import path from 'node:path';
import t from 'tap';
import dnsPacket from 'dns-packet';
import { FRAME_CLIENT_HELLO, FRAME_INBOUND_UDP } from '../../src/protocol.js';
import { startBbal } from '../support/bbal.js';
import { tcpQuery, UdpDnsClient, udpQuery } from '../support/dns_client.js';
import { encodeQuery } from '../support/dns_messages.js';
import { answerControl, FakeBackend } from '../support/fake_backend.js';
import { makeSocketDir, startBackend, startFleet } from '../support/fleet.js';
import { freePort } from '../support/ports.js';
import { sleep, waitFor } from '../support/wait.js';

/* One TCP query from `source`; resolves with the answering backend's label, or what went wrong. */
function tcpLabel(port: number, source: string, name: string, timeoutMs = 2000): Promise<string> {
	return tcpQuery({ port, source, name, id: 4242, timeoutMs }).then((res) => res.backend ?? 'no label',
		(err: NodeJS.ErrnoException) => {
			switch (err.code) {
			case 'ETIMEDOUT':
				return 'timeout';
			case 'ECLOSED':
				return 'closed before the answer';
			default:
				return `error ${err.code ?? err.message}`;
			}
		});
}

t.test('a backend whose socket file is removed while its session is up is marked removed at the next rescan',
	async (t) => {
		const { bbal, port, backends } = await startFleet(t, ['5301', '5302']);
		const gone = backends[1];
		t.ok(gone, 'the second backend exists');
		/* A source that 5302 serves. */
		let source = '';
		for (let n = 1; n <= 8 && source === ''; n++) {
			const s = `127.0.3.${n}`;
			if ((await udpQuery({ port, source: s, name: 'who.example' })).backend === '5302') {
				source = s;
			}
		}
		t.not(source, '', 'some source is served by 5302');
		t.equal(await tcpLabel(port, source, 'before.example'), '5302', 'TCP from it reaches 5302 before');

		const since = bbal.logs.length;
		await unlink(gone?.path);
		/* The directory is watched, and read every 5 s in any case; the wheel may fire a tick late. */
		const removed = await bbal.waitForLog((r) => r.be_id === 5302 && r.msg === 'backend socket removed', 7000, since)
			.then(() => true, () => false);
		t.ok(removed, 'bbal logs 5302 removed within 7 s of its socket file disappearing (README: "The socket directory")');
		t.equal(await tcpLabel(port, source, 'after.example'), '5301',
			'a TCP query from a remote of the removed backend is then served by another backend');
	});

t.test('a backend that resumes after a stall is not handed queries older than a resolver waits', async (t) => {
	const dir = await makeSocketDir(t);
	/* A backend that says hello, answers heartbeats, and notes when each query reaches it. */
	const arrivals: Array<{ sentAt: number; at: number; session: { ended: boolean } }> = [];
	let conn: net.Socket | null = null;
	/* Whether bbal has closed a session: queries on a session bbal gave up on go nowhere. */
	const sessions = new Map<net.Socket, { ended: boolean }>();
	await FakeBackend.listen(t, path.join(dir, '5301'), {
		onControlFrame(sock, frame) {
			if (frame.type === FRAME_CLIENT_HELLO) {
				conn = sock;
				const session = { ended: false };
				sessions.set(sock, session);
				sock.on('end', () => {
					session.ended = true;
				});
			}
			const session = sessions.get(sock);
			if (frame.type === FRAME_INBOUND_UDP && frame.payload !== null && session !== undefined) {
				const m = /t(\d+)\.stale/.exec(dnsPacket.decode(frame.payload).questions?.[0]?.name ?? '');
				if (m !== null) {
					arrivals.push({ sentAt: Number(m[1]), at: Date.now(), session });
				}
			}
			answerControl(sock, frame);
		},
	});
	const port = await freePort();
	const bbal = await startBbal(t, { dir, port });
	await bbal.waitForLog((r) => r.msg === 'backend socket established');
	const client = await UdpDnsClient.open(t, port, '127.0.4.1');
	/* 1,200-byte queries (a valid question, then padding bbal does not read): 256 KiB is 220 of them. */
	const send = (): void => {
		const q = Buffer.alloc(1200);
		encodeQuery(`t${Date.now()}.stale.example`, 'A', 7).copy(q);
		client.send(q).catch(() => {});
	};
	const stalledAt = Date.now();
	(conn as net.Socket | null)?.pause();
	/* 250 queries a second for 4 s: bbal finds the session stuck on the way and drops the rest. */
	for (let i = 0; i < 40; i++) {
		for (let j = 0; j < 25; j++) {
			send();
		}
		await sleep(100);
	}
	const stuck = bbal.logs.some((r) => r.msg === 'backend session stuck (write queue full): dropping new UDP queries');
	t.ok(stuck, 'bbal found the session stuck during the stall');
	const resumedAt = Date.now();
	arrivals.length = 0;
	(conn as net.Socket | null)?.resume();
	/* The stall is over for bbal when the session drains, or when bbal gave up on it and faulted it. */
	await waitFor(() => bbal.logs.some((r) => r.msg === 'backend session writable again'
		|| r.msg === 'backend faulted (reset and reconnect)'), 5000, 50, 'the session writable again, or faulted');
	await sleep(500);
	/*
	 * What sat in the backend's own receive queue when bbal closed the
	 * session cannot be taken back, and is harmless: its answers go nowhere.
	 * What counts is a session bbal keeps: its old queries come before every
	 * new one.
	 */
	const live = arrivals.filter((a) => !a.session.ended);
	const ages = live.map((a) => a.at - a.sentAt);
	const stale = ages.filter((a) => a > 1000).length;
	t.comment(`stall ${resumedAt - stalledAt} ms: after it, the backend received ${arrivals.length} queries, `
		+ `${live.length} on a session bbal kept, ${stale} of those over 1 s old, the oldest ${Math.max(0, ...ages)} ms`);
	t.equal(stale, 0, 'no query that waited over 1 s in bbal reaches the backend on a live session after the stall');
});

t.test('a client that hangs up while its backend has not sent INBOUND_TCP_OK frees its TCP slot', async (t) => {
	const dir = await makeSocketDir(t);
	await startBackend(t, dir, '5301');
	/* 5302 serves its control session (hello, heartbeats) but never answers INBOUND_TCP. */
	await FakeBackend.listen(t, path.join(dir, '5302'));
	const port = await freePort();
	const cap = 10;
	const bbal = await startBbal(t, { dir, port, args: ['--max-tcp-connections', String(cap)] });
	await waitFor(() => bbal.logs.filter((r) => r.msg === 'backend socket established').length >= 2, 5000, 20,
		'both backends established');
	/* One source that 5301 serves, one that the stalled 5302 serves (round-robin gives them in turn). */
	const ok = '127.0.6.1';
	const stalled = '127.0.6.2';
	t.equal(await tcpLabel(port, ok, 'first.example'), '5301', `${ok} is served by 5301`);
	/* Clients of the stalled backend give up after 300 ms, as resolvers do. */
	const gone = await Promise.all(Array.from({ length: cap }, (_, i) => tcpLabel(port, stalled, `gone${i}.example`, 300)));
	t.same([...new Set(gone)], ['timeout'], `${stalled} is served by the stalled 5302: none of its ${cap} queries answered`);
	await sleep(700);
	t.equal(await tcpLabel(port, ok, 'after.example'), '5301',
		`with ${cap} clients of a stalled backend gone, a remote of a healthy backend still gets TCP service`);
});
