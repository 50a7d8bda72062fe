/*
 * The mname fixture's answering modes, through bbal.
 *
 * The chaos scenarios servfail, blackhole and allservfail switch real mname
 * backends into answering badly (test/fixtures/mname_backend.cjs, ANSWERING
 * MODES) and judge bbal by what its clients then get.  That judgement is
 * only as good as the modes, so this file checks each one end to end: one
 * backend behind the built bbal, queried over UDP (and TCP for servfail)
 * from a 127.0.0.x source, switched through its IPC channel
 * (test/support/fleet.ts, Backend.command).
 *
 * With one backend bbal has nothing better to send a query to: if it finds
 * the backend sick (issue 13's health) it fails open, and every query still
 * reaches it, so the answers here are the backend's own whatever bbal
 * thinks of it.  A blackholed backend must still answer heartbeats (mname's
 * lib/balancer.js does that below the query handler): bbal keeps it ok,
 * and this file waits for the first heartbeat after the switch to show it.
 * bbal sends that one 5 s after the hello, so the blackhole test runs beside
 * the others (each with a fleet of its own) to keep the file under 10 s.
 */

import dnsPacket from 'dns-packet';
import t from 'tap';
import { statsSnapshot } from './support/bbal.js';
import { backendOf } from './support/dns_messages.js';
import { tcpQuery, udpQuery } from './support/dns_client.js';
import { startFleet } from './support/fleet.js';
import { waitFor } from './support/wait.js';
import { answerLabel } from './chaos/load.js';

const SOURCE = '127.0.0.21';
/* How long a blackholed query is given: the answers of a working backend take a millisecond or two. */
const SILENCE_MS = 1000;

const rcodeOf = (p: dnsPacket.Packet): number => (p.flags ?? 0) & 0x0f;

/* Subtests marked buffered run side by side, two at a time. */
t.jobs = 2;

t.test('blackhole: no answer, heartbeats pass, bbal keeps it ok; normal restores', { buffered: true }, async (t) => {
	const { port, bbal, backends: [be], sock } = await startFleet(t, ['m1']);
	const switchedAt = await be.command('blackhole');
	await t.rejects(udpQuery({ port, source: SOURCE, name: 'hole1.modes.example', timeoutMs: SILENCE_MS }),
		/reply/, `no answer within ${SILENCE_MS / 1000} s`);
	/*
	 * bbal sends its first heartbeat 5 s after the hello; a reply sets the
	 * round trip in its snapshot.  The hello came before the switch, so the
	 * reply came from the blackholed backend.
	 */
	await waitFor(async () => {
		const b = (await statsSnapshot(sock)).backends[0];
		return b.ok && b.lastHeartbeatRttMs !== null;
	}, 7000, 100, 'a heartbeat answered by the blackholed backend');
	t.pass('a heartbeat went out and was answered');
	const snap = (await statsSnapshot(sock)).backends[0];
	t.ok(snap.ok, `bbal shows the backend ok (${snap.state}), ${((Date.now() - switchedAt) / 1000).toFixed(1)} s `
		+ 'after the switch');
	await t.rejects(udpQuery({ port, source: SOURCE, name: 'hole2.modes.example', timeoutMs: SILENCE_MS / 2 }),
		/reply/, `still no answer after the heartbeat (within ${SILENCE_MS / 2000} s)`);
	t.equal(bbal.logs.filter((r) => r.msg === 'backend faulted (reset and reconnect)').length, 0,
		'bbal never faulted the backend');

	await be.command('normal');
	const back = await udpQuery({ port, source: SOURCE, name: 'back.modes.example' });
	t.equal(back.backend, 'm1', 'normal again: answered');
});

t.test('each answering mode answers as the fixture says, and normal restores', { buffered: true }, async (t) => {
	const { port, bbal, backends: [be], sock } = await startFleet(t, ['m1']);
	let n = 0;
	const ask = (timeoutMs?: number): ReturnType<typeof udpQuery> =>
		udpQuery({ port, source: SOURCE, name: `q${n++}.modes.example`, timeoutMs });

	const normal = await ask();
	t.equal(rcodeOf(normal.packet), 0, 'normal: NOERROR');
	t.equal(normal.backend, 'm1', 'normal: the be= label in the answer section');

	for (const [mode, rcode] of [['servfail', 2], ['refused', 5], ['nxdomain', 3]] as const) {
		const before = Date.now();
		const at = await be.command(mode);
		t.ok(at >= before && at <= Date.now(), `${mode}: acknowledged with the time it took effect`);
		const res = await ask();
		t.equal(rcodeOf(res.packet), rcode, `${mode}: rcode ${rcode}`);
		t.same(res.packet.answers, [], `${mode}: no answer records`);
		t.equal(res.backend, null, `${mode}: no be= label in the answer section`);
		t.equal(answerLabel(res.packet), 'm1', `${mode}: the be= label in the additional section`);
	}

	await be.command('servfail');
	const overTcp = await tcpQuery({ port, source: SOURCE, name: 'tcp.modes.example' });
	t.equal(rcodeOf(overTcp.packet), 2, 'servfail over TCP: SERVFAIL too');
	t.equal(answerLabel(overTcp.packet), 'm1', 'servfail over TCP: labelled in the additional section');

	await be.command('normal');
	const back = await ask();
	t.equal(rcodeOf(back.packet), 0, 'normal again: NOERROR');
	t.equal(backendOf(back.packet), 'm1', 'normal again: labelled in the answer section');

	await t.rejects(be.command('sideways' as 'normal'), /unknown command/, 'an unknown command is refused');
	t.equal(bbal.logs.filter((r) => r.msg === 'backend faulted (reset and reconnect)').length, 0,
		'bbal never faulted the backend');
	t.ok(be.proc.connected, 'the IPC channel is still up');
	const snap = await statsSnapshot(sock);
	t.ok(snap.backends.length === 1 && snap.backends[0].ok, 'bbal shows the backend ok');
});

t.test('a restarted backend starts normal and takes commands on its new channel', { buffered: true }, async (t) => {
	const { port, backends: [be] } = await startFleet(t, ['m1']);
	await be.command('servfail');
	const oldProc = be.proc;
	await be.restart();
	t.not(be.proc, oldProc, 'a new process');
	t.ok(oldProc.exitCode !== null || oldProc.signalCode !== null, 'the old process has exited');
	/* bbal reconnects to the new process at once (the socket file was bound afresh). */
	let q = 0;
	await waitFor(async () => rcodeOf((await udpQuery({ port, source: SOURCE, name: `r${q++}.modes.example`,
		timeoutMs: 500 })).packet) === 0, 5000, 100, 'a NOERROR answer from the restarted backend');
	t.pass('the restarted backend answers normally');
	await be.command('nxdomain');
	const nx = await udpQuery({ port, source: SOURCE, name: 'nx.modes.example' });
	t.equal(rcodeOf(nx.packet), 3, 'the new channel switches the new process');
});
