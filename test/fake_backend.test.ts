/*
 * What a real mname never does, played by the tests' fake backend
 * (test/support/fake_backend.ts) next to a real mname:
 * protocol violations must fault the fake exactly as PROTOCOL.md says, a
 * backend that stops reading must make bbal drop (not queue), and through
 * all of it the real backend keeps every source served.
 */

import { readFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import t from 'tap';
import { FRAME_CLIENT_HEARTBEAT, FRAME_CLIENT_HELLO, FRAME_OUTBOUND_UDP } from '../src/protocol.js';
import {
	encodeUdpFrame, INBOUND_TCP_OK_FRAME, SERVER_HEARTBEAT_FRAME, SERVER_HELLO_FRAME,
} from './support/backend_frames.js';
import { type LogRecord, startBbal } from './support/bbal.js';
import { queryUntil, udpQuery, udpSendRaw } from './support/dns_client.js';
import { encodeQuery } from './support/dns_messages.js';
import { answerControl, FakeBackend, type FakeBackendOptions } from './support/fake_backend.js';
import { makeSocketDir, startBackend } from './support/fleet.js';
import { freePort } from './support/ports.js';
import { waitFor } from './support/wait.js';

/* A fake backend that calls fn once a control session has sent CLIENT_HELLO, and answers nothing itself. */
function afterHello(fn: (sock: net.Socket) => void): FakeBackendOptions {
	return {
		onControlFrame: (sock, frame) => {
			if (frame.type === FRAME_CLIENT_HELLO) {
				fn(sock);
			}
		},
	};
}

const violations: Array<[string, string, FakeBackendOptions]> = [
	['frames before the hello', 'errant frame before hello', afterHello((s) => s.write(SERVER_HEARTBEAT_FRAME))],
	['a duplicate hello', 'duplicate hello from backend',
		afterHello((s) => s.write(Buffer.concat([SERVER_HELLO_FRAME, SERVER_HELLO_FRAME])))],
	['an unsolicited heartbeat reply', 'unexpected heartbeat reply from backend',
		afterHello((s) => s.write(Buffer.concat([SERVER_HELLO_FRAME, SERVER_HEARTBEAT_FRAME])))],
	['an unknown frame type', 'invalid frame type',
		afterHello((s) => s.write(Buffer.concat([SERVER_HELLO_FRAME, Buffer.from([0xef, 0xbe, 0xad, 0xde])])))],
	['OUTBOUND_UDP over 1500 bytes', 'backend sent oversized UDP packet',
		afterHello((s) => s.write(Buffer.concat([SERVER_HELLO_FRAME,
			encodeUdpFrame(FRAME_OUTBOUND_UDP, 0x7f000001, 53, Buffer.alloc(1501))])))],
	['INBOUND_TCP_OK on the control session', 'TCP session frame on the control session',
		afterHello((s) => s.write(Buffer.concat([SERVER_HELLO_FRAME, INBOUND_TCP_OK_FRAME])))],
];

for (const [what, reason, behave] of violations) {
	t.test(`a backend that sends ${what} is faulted; the real one serves everyone`, async (t) => {
		const dir = await makeSocketDir(t);
		await startBackend(t, dir, '5301');
		const fakePath = path.join(dir, '5302');
		await FakeBackend.listen(t, fakePath, behave);
		const port = await freePort();
		const bbal = await startBbal(t, { dir, port });
		const rec = await bbal.waitForLog((r: LogRecord) => r.be_path === fakePath && r.reason === reason);
		t.equal(rec.be_id, 5302, 'the fault names the fake backend');
		await bbal.waitForLog((r) => r.msg === 'backend socket established' && r.be_id === 5301);
		t.notOk(bbal.logs.some((r) => r.reason !== undefined && r.be_id === 5301), 'the real backend never faults');
		for (let n = 60; n < 64; n++) {
			const res = await udpQuery({ port, source: `127.0.0.${n}`, name: 'q.example' });
			t.equal(res.backend, '5301', `127.0.0.${n} served by the real backend`);
		}
	});
}

t.test('a backend that stops reading: UDP for it is dropped and counted, memory stays bounded', async (t) => {
	const dir = await makeSocketDir(t);
	const fakePath = path.join(dir, '5301');
	/* Says hello, answers nothing, and never reads again. */
	await FakeBackend.listen(t, fakePath, afterHello((s) => {
		s.write(SERVER_HELLO_FRAME);
		s.pause();
	}));
	const port = await freePort();
	const bbal = await startBbal(t, { dir, port });
	await bbal.waitForLog((r) => r.msg === 'backend socket established');
	const source = '127.0.0.70';
	/* Well-formed queries padded to 1400 bytes, so only the stuck session drops them. */
	const junk = Buffer.alloc(1400);
	encodeQuery('stuck.example', 'A', 1).copy(junk);
	for (let burst = 0; burst < 40; burst++) {
		await Promise.all(Array.from({ length: 500 }, () => udpSendRaw({ port, source, bytes: junk })));
		if (bbal.logs.some((r) => r.msg === 'stuck backend write queue (dropping UDP packet)')) {
			break;
		}
	}
	const stuck = await bbal.waitForLog((r) => r.msg === 'backend session stuck (write queue full): dropping new UDP queries');
	t.equal(stuck.be_id, 5301);
	const drop = await bbal.waitForLog((r) => r.msg === 'stuck backend write queue (dropping UDP packet)');
	t.equal(drop.remote_ip, source);
	t.ok(bbal.logs.filter((r) => r.msg === 'stuck backend write queue (dropping UDP packet)').length <= 2,
		'the per-packet condition is logged at most once per 5 s');
	const rssKb = Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${bbal.proc.pid}/status`, 'utf8'))?.[1]);
	t.ok(rssKb < 200 * 1024, `RSS ${rssKb} kB after ~${28} MB offered to a stuck backend`);

	/* A real backend joins; new sources reach it while the stuck one drops. */
	await startBackend(t, dir, '5302');
	bbal.proc.kill('SIGHUP');
	await bbal.waitForLog((r) => r.msg === 'backend socket established' && r.be_id === 5302);
	const seen = new Set<string | null>();
	for (let n = 71; n <= 74; n++) {
		const res = await queryUntil({ port, source: `127.0.0.${n}`, name: 'ok.example', until: () => true, timeoutMs: 1000 });
		seen.add(res?.backend ?? null);
	}
	t.ok(seen.has('5302'), 'new sources are served by the healthy backend');
});

t.test('heartbeats reach a fake backend and its replies keep it ok', async (t) => {
	const dir = await makeSocketDir(t);
	let beats = 0;
	await FakeBackend.listen(t, path.join(dir, '5301'), {
		onControlFrame: (s, frame) => {
			if (frame.type === FRAME_CLIENT_HEARTBEAT) {
				beats++;
			}
			answerControl(s, frame);
		},
	});
	const port = await freePort();
	const bbal = await startBbal(t, { dir, port });
	await bbal.waitForLog((r) => r.msg === 'backend socket established');
	await waitFor(() => beats >= 1, 7000, 100, 'a heartbeat within 5 s of the hello');
	t.ok(beats >= 1);
	t.notOk(bbal.logs.some((r) => r.reason !== undefined), 'no fault');
});
