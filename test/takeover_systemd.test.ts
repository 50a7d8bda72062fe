/*
 * Issue 14, item 4, as far as a test can go without systemd as PID 1: what
 * bbal says on NOTIFY_SOCKET under the unit's Type=notify, read by a
 * stand-in for systemd's socket (test/fixtures/notify_socket.py).  A bbal
 * says READY=1 once it listens; a bbal that took over says MAINPID=<its
 * pid> and READY=1 from its own pid, then waits on a barrier until systemd
 * has handled that -- and only then may the old process exit, or systemd
 * would take its exit for the service's and stop the new one with it.
 */

import { spawnSync } from 'node:child_process';
import path from 'node:path';
import t from 'tap';
import { startBbal } from './support/bbal.js';
import { startFleet } from './support/fleet.js';
import { projectRoot, startChild } from './support/process.js';
import { waitFor } from './support/wait.js';

const python = spawnSync('python3', ['--version']).status === 0;
const fixture = path.join(projectRoot, 'test', 'fixtures', 'notify_socket.py');
/* How long the stand-in holds a barrier before releasing it. */
const HOLD_MS = 600;

interface Note {
	text?: string;
	pid?: number;
	fds?: number;
	released?: boolean;
	at: number;
}

t.test('Type=notify: READY=1 at start; after a takeover MAINPID from the new pid, and the old exits only once systemd has it',
	{ skip: python ? false : 'python3 is not installed' }, async (t) => {
		const dir = `/tmp/bbal-notify-${process.pid}`;
		const socketPath = `${dir}.sock`;
		const notify = startChild('notify socket', 'python3', [fixture, socketPath, String(HOLD_MS)], { stdin: 'pipe' });
		t.teardown(async () => {
			notify.proc.stdin?.end();
			await notify.stop('SIGTERM');
			spawnSync('rm', ['-f', socketPath]);
		});
		await notify.waitOutput((o) => o.includes('ready\n'), 5000, 'ready');
		const notes = (): Note[] => notify.stdout.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Note);
		const env = { NOTIFY_SOCKET: socketPath };

		const f = await startFleet(t, ['a'], [], env);
		await waitFor(() => notes().some((n) => n.text === 'READY=1'), 3000, 20, 'READY=1');
		t.equal(notes().find((n) => n.text === 'READY=1')?.pid, f.bbal.proc.pid, 'READY=1 from bbal once it listens');

		let oldExitAt = 0;
		f.bbal.proc.once('exit', () => { oldExitAt = Date.now(); });
		const next = await startBbal(t, { dir: f.dir, port: f.port, args: ['--takeover'], env });
		await waitFor(() => oldExitAt > 0, 10_000, 20, 'the old bbal to exit');
		const main = notes().find((n) => n.text?.startsWith('MAINPID=') === true);
		t.equal(main?.text?.split('\n')[0], `MAINPID=${next.proc.pid}`, 'the new bbal names itself the main process');
		t.equal(main?.pid, next.proc.pid, 'from its own pid (NotifyAccess=all lets it)');
		t.match(main?.text ?? '', /\nREADY=1\n/, 'and says it is ready');
		const barrier = notes().find((n) => n.text === 'BARRIER=1');
		t.equal(barrier?.fds, 1, 'then a barrier, with the descriptor systemd closes once it has handled what came before');
		const released = notes().find((n) => n.released === true);
		t.ok(released !== undefined && oldExitAt >= released.at,
			`the old bbal exits after the barrier is released (${Math.round(oldExitAt - (released?.at ?? 0))} ms after)`);
		t.equal(next.logs.some((l) => l.msg === 'could not notify systemd'), false, 'no complaint from the new bbal');
	});
