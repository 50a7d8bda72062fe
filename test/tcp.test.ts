/*
 * The TCP path end to end: the built bbal CLI in front of real mname
 * backends, queried by real TCP clients bound to distinct 127.0.0.x source
 * addresses (DNS over TCP: 2-byte length prefix, then the message).  Covers
 * stickiness shared with UDP, pipelining before INBOUND_TCP_OK, long answers,
 * half-close, a backend killed under an open connection, dig +tcp, the
 * connection cap, the idle deadline, garbage clients, and (with a fake
 * backend) a wrong first frame on a TCP session and answer bytes glued to
 * INBOUND_TCP_OK.
 */

import { randomBytes } from 'node:crypto';
import path from 'node:path';
import dnsPacket from 'dns-packet';
import t, { type Test } from 'tap';
import { INBOUND_TCP_OK_FRAME, SERVER_HELLO_FRAME } from './support/backend_frames.js';
import { type Bbal, startBbal } from './support/bbal.js';
import { dig, needsDig } from './support/dig.js';
import { TcpDnsClient, tcpQuery, udpQuery } from './support/dns_client.js';
import { backendOf, encodeAnswer, encodeQuery, framed } from './support/dns_messages.js';
import { FakeBackend } from './support/fake_backend.js';
import { type Backend, makeSocketDir, startFleet } from './support/fleet.js';
import { freePort } from './support/ports.js';
import { waitFor } from './support/wait.js';

const src = (n: number): string => `127.0.0.${n}`;

/* Log records that fault a backend (they carry a reason). */
const faults = (bbal: Bbal) => bbal.logs.filter((r) => r.reason !== undefined);

t.test('a TCP query is answered by the backend that answers the same source over UDP', async (t) => {
	const { port } = await startFleet(t, ['5301', '5302', '5303']);
	const seen = new Set<string | null>();
	for (const s of [100, 101, 102].map(src)) {
		const c = await TcpDnsClient.connect(t, port, s);
		c.send('tcp.example', 'TXT', 4242);
		const ans = await c.answer(4242);
		t.equal(ans.id, 4242, `${s}: the answer carries the query id`);
		t.equal(ans.type, 'response', `${s}: a response`);
		const be = backendOf(ans);
		t.match(be, /^530[123]$/, `${s}: answered by ${be}`);
		seen.add(be);
		const udp = await udpQuery({ port, source: s, name: 'udp.example' });
		t.equal(udp.backend, be, `${s}: UDP goes to the same backend`);
	}
	t.equal(seen.size, 3, 'three sources spread over three backends');
});

t.test('two queries written before the session is up are both answered', async (t) => {
	const { port } = await startFleet(t, ['5301']);
	const both = Buffer.concat([framed(encodeQuery('one.example', 'TXT', 111)),
		framed(encodeQuery('two.example', 'A', 222))]);
	const c = await TcpDnsClient.connect(t, port, src(110), both);
	const [a, b] = await Promise.all([c.answer(111), c.answer(222)]);
	t.equal(a.questions?.[0]?.name, 'one.example', 'first answer is for the first question');
	t.equal(b.questions?.[0]?.name, 'two.example', 'second answer is for the second question');
	t.equal(backendOf(a), '5301');
	t.equal(c.messages.length, 2, 'exactly two answers');
	t.notOk(c.ended, 'the connection stays open for more');
});

t.test('a large answer arrives whole over TCP', async (t) => {
	const { port } = await startFleet(t, ['5301']);
	const c = await TcpDnsClient.connect(t, port, src(115));
	c.send('big.example', 'A', 515);
	const ans = await c.answer(515);
	const bytes = dnsPacket.encode(ans).length;
	t.ok(bytes > 512, `answer is ${bytes} bytes`);
	t.equal(ans.answers?.filter((r) => r.type === 'A').length, 60, 'all 60 A records');
	t.equal((ans.flags ?? 0) & dnsPacket.TRUNCATED_RESPONSE, 0, 'TC bit clear');
	t.equal(backendOf(ans), '5301');
});

t.test('a client that half-closes after its query gets the whole answer, then the end', async (t) => {
	const { port } = await startFleet(t, ['5301']);
	const c = await TcpDnsClient.connect(t, port, src(120));
	c.send('big.example', 'A', 1200);
	c.sock.end();
	const ans = await c.answer(1200);
	t.equal(ans.answers?.length, 61, 'TXT plus 60 A records');
	await c.until(() => c.ended, 2000, 'end after the answer');
	t.equal(c.messages.length, 1, 'one answer, nothing else');
});

t.test('a backend killed under an open connection: the client is closed, a new one goes elsewhere', async (t) => {
	const { port, backends } = await startFleet(t, ['5301', '5302']);
	const s = src(125);
	const c = await TcpDnsClient.connect(t, port, s);
	c.send('before.example', 'TXT', 1250);
	const home = backendOf(await c.answer(1250));
	const victim = backends.find((b) => b.label === home) as Backend;
	t.ok(victim, `${s} is on ${home}`);
	await victim.kill('SIGKILL');
	const killedAt = Date.now();
	await c.closedByPeer(2000);
	t.ok(Date.now() - killedAt < 2000, `closed ${Date.now() - killedAt} ms after the kill`);
	t.equal(c.messages.length, 1, 'no stray bytes after the kill');

	const deadline = Date.now() + 3000;
	const tried: Array<string | null> = [];
	let moved: string | null = null;
	while (moved === null && Date.now() < deadline) {
		try {
			const res = await tcpQuery({ port, source: s, name: 'after.example', timeoutMs: 1000 });
			tried.push(res.backend);
			if (res.backend !== null && res.backend !== home) {
				moved = res.backend;
			}
		} catch {
			tried.push(null);
		}
	}
	t.ok(moved, `a new connection from ${s} is served by ${moved} (tries: ${JSON.stringify(tried)})`);
});

t.test('dig +tcp reaches the source\'s UDP backend', needsDig, async (t) => {
	const { port } = await startFleet(t, ['5301', '5302', '5303']);
	/* 127.0.0.135 lands on the second backend: a TCP path that picked afresh would show. */
	await udpQuery({ port, source: src(134), name: 'warm.example' });
	const udp = await udpQuery({ port, source: src(135), name: 'u.example' });
	const out = await dig(['+tcp', '@127.0.0.1', '-p', String(port), '-b', src(135), 'd.example', 'TXT',
		'+short', '+tries=1', '+time=2']);
	t.equal(out, `"be=${udp.backend}"`, 'dig +tcp shows the same backend as UDP');
});

t.test('at --max-tcp-connections the idlest connection makes room for a new one; the rest are unaffected', async (t) => {
	const { port, bbal } = await startFleet(t, ['5301'], ['--max-tcp-connections', '2']);
	const accepted = (): number => bbal.logs.filter((r) => r.msg === 'tcp connection accepted').length;
	const a = await TcpDnsClient.connect(t, port, src(140));
	const b = await TcpDnsClient.connect(t, port, src(141));
	await waitFor(() => accepted() === 2, 2000, 20, 'two connections accepted');
	/* a has a whole query answered after b's accept: b is the idlest. */
	t.equal(backendOf(await a.ask('first.example', 'TXT', 1400)), '5301');

	const openedAt = Date.now();
	const third = await TcpDnsClient.connect(t, port, src(142));
	await b.closedByPeer(2000);
	t.ok(Date.now() - openedAt < 2000, `the idlest closed ${Date.now() - openedAt} ms after the third arrived`);
	t.equal(b.received, 0, 'with no data');
	t.notOk(a.closed || third.closed, 'the one that had been answered and the newcomer are open');
	t.equal(backendOf(await third.ask('third.example', 'TXT', 1420)), '5301', 'the newcomer is answered');
	t.equal(backendOf(await a.ask('still.example', 'TXT', 1410)), '5301', 'and so is the other');
	t.equal((await udpQuery({ port, source: src(143), name: 'u.example' })).backend, '5301', 'UDP is answered');
});

t.test('a client that stalls inside a length prefix is closed by the idle deadline', async (t) => {
	const { port, bbal } = await startFleet(t, ['5301', '5302'], ['--tcp-idle-timeout', '1']);
	const since = bbal.logs.length;
	const stalled = await TcpDnsClient.connect(t, port, src(150), Buffer.from([0x00]));
	const stalledAt = Date.now();
	/* Others are served meanwhile. */
	t.match((await udpQuery({ port, source: src(151), name: 'u.example' })).backend, /^530[12]$/,
		'concurrent UDP is answered');
	t.match((await tcpQuery({ port, source: src(152), name: 't.example' })).backend, /^530[12]$/,
		'concurrent TCP is answered');
	t.notOk(stalled.closed, 'the stalled client is not closed at once');
	/* 1 s idle on a 1 s tick: 2 s typically, 3 s if re-armed once; 4 s leaves slack for load. */
	await stalled.closedByPeer(4000);
	t.ok(Date.now() - stalledAt < 4000, `stalled client closed after ${Date.now() - stalledAt} ms`);
	t.equal(stalled.received, 0, 'it got nothing');
	const rec = await bbal.waitForLog((r) => r.msg === 'closing idle tcp connection', 1000, since);
	t.equal(rec.remote_ip, src(150), 'the log names the stalled client');
	t.equal(rec.remote_port, stalled.localPort, 'and its port');
	t.ok(rec.be_id === 5301 || rec.be_id === 5302, `and its backend, as be_id (${String(rec.be_id)})`);
	t.match(rec.be_path, /\/530[12]$/, 'and be_path');
});

t.test('garbage, instant closes and 200 rapid connections leave bbal serving', async (t) => {
	/* 200 at once from one source: over the per-source cap unless it is raised. */
	const { port, bbal } = await startFleet(t, ['5301', '5302'], ['--tcp-idle-timeout', '2', '--max-tcp-per-remote', '1000']);
	const garbage = await TcpDnsClient.connect(t, port, src(160), randomBytes(2048));
	garbage.sock.end();
	const instant = await TcpDnsClient.connect(t, port, src(161));
	instant.sock.destroy();
	const rapid: Array<Promise<void>> = [];
	for (let i = 0; i < 200; i++) {
		rapid.push(TcpDnsClient.connect(t, port, src(162)).then((c) => { c.sock.destroy(); }));
	}
	await Promise.all(rapid);

	t.match((await tcpQuery({ port, source: src(163), name: 't.example' })).backend, /^530[12]$/, 'TCP from another source');
	t.match((await udpQuery({ port, source: src(164), name: 'u.example' })).backend, /^530[12]$/,
		'UDP from another source');
	t.equal(bbal.proc.exitCode, null, 'bbal is still running');
	t.equal(bbal.proc.signalCode, null);
	/* Nothing leaks: every accepted connection is released (idle deadline 2 s at most). */
	const count = (msg: string): number => bbal.logs.filter((r) => r.msg === msg).length;
	await waitFor(() => count('tcp connection closed') === count('tcp connection accepted'), 5000, 50,
		'every accepted connection closed');
	t.equal(count('tcp connection accepted'), 203, 'all 203 connections were accepted');
	t.same(faults(bbal), [], 'no backend was faulted');
});

/*
 * A fake backend: answers the control session's hello and heartbeats, and
 * answers every INBOUND_TCP with `reply` (in one write), then ignores the
 * session.  It records the address and port of every INBOUND_TCP.
 */
async function fakeTcpBackend(t: Test, sockPath: string, reply: Buffer) {
	const fake = await FakeBackend.listen(t, sockPath, { onTcpSession: (sock) => sock.write(reply) });
	return fake.inboundTcp;
}

t.test('a backend that answers INBOUND_TCP with the wrong frame: client closed, backend not faulted', async (t) => {
	const dir = await makeSocketDir(t);
	const fakePath = path.join(dir, '5301');
	const inboundTcp = await fakeTcpBackend(t, fakePath, SERVER_HELLO_FRAME);
	const port = await freePort();
	const bbal: Bbal = await startBbal(t, { dir, port });
	await bbal.waitForLog((r) => r.msg === 'backend socket established' && r.be_id === 5301);

	for (const [n, i] of [[170, 1], [171, 2]] as const) {
		const since = bbal.logs.length;
		const c = await TcpDnsClient.connect(t, port, src(n));
		c.send('x.example', 'TXT', n);
		await c.closedByPeer(2000);
		t.equal(c.received, 0, `${src(n)}: closed with no data`);
		const rec = await bbal.waitForLog(
			(r) => r.msg === 'backend answered INBOUND_TCP with the wrong frame (closing connection)', 2000, since);
		t.equal(rec.frame_type, 1001, 'the log names the frame');
		t.equal(inboundTcp.length, i, `the fake has seen ${i} INBOUND_TCP`);
		const got = inboundTcp[i - 1];
		t.equal(got?.addr, (0x7f000000 + n) >>> 0, `address of ${src(n)} as u32`);
		t.equal(got?.port, c.localPort, 'the client\'s port');
	}
	t.same(faults(bbal), [], 'the backend was never faulted');
});

t.test('answer bytes that arrive in the same read as INBOUND_TCP_OK reach the client', async (t) => {
	const dir = await makeSocketDir(t);
	const answer = encodeAnswer(777, { type: 'TXT', name: 'glued.example', class: 'IN' }, 'glued');
	await fakeTcpBackend(t, path.join(dir, '5301'), Buffer.concat([INBOUND_TCP_OK_FRAME, framed(answer)]));
	const port = await freePort();
	const bbal = await startBbal(t, { dir, port });
	await bbal.waitForLog((r) => r.msg === 'backend socket established' && r.be_id === 5301);
	const c = await TcpDnsClient.connect(t, port, src(175));
	c.send('glued.example', 'TXT', 777);
	const ans = await c.answer(777);
	t.equal(backendOf(ans), 'glued', 'the answer glued to the OK is delivered');
	t.equal(c.received, answer.length + 2, 'and nothing of the OK frame leaks to the client');
});
