/*
 * The Balancer in-process, as test/balancer.test.ts and test/cache.test.ts
 * drive it: real backends in a directory, a clock the test steps by hand
 * (advance() moves it and runs the wheel, as the tick would), a fake UDP
 * transport that datagrams are handed to and answers caught from, and the
 * log lines kept in memory.  Closed at teardown.
 */

import type { Test } from 'tap';
import { Balancer, type BalancerOptions } from '../../src/balancer.js';
import { makeLogger } from '../../src/log.js';
import type { LogRecord } from './bbal.js';
import { FakeTransport } from './fake_transport.js';

/** Where the rig's clock starts. */
export const RIG_START_MS = Date.parse('2030-01-02T03:04:05.000Z');

export interface Rig {
	bal: Balancer;
	udp: FakeTransport;
	logs: LogRecord[];
	/** Move the clock forward and run the wheel, as the tick would. */
	advance: (secs: number) => void;
	/** The clock now. */
	now: () => number;
}

/** A started Balancer over dir, closed at teardown. */
export async function startBalancer(t: Test, dir: string, extra: Partial<BalancerOptions> = {}): Promise<Rig> {
	let now = RIG_START_MS;
	const logs: LogRecord[] = [];
	const log = makeLogger('info', { write: (line: string) => { logs.push(JSON.parse(line) as LogRecord); } });
	const udp = new FakeTransport();
	const bal = new Balancer({
		bind: '127.0.0.1', port: 0, socketDir: dir, log, clock: () => now, transport: udp, watchDir: false, ...extra,
	});
	t.teardown(() => bal.close());
	await bal.start();
	return {
		bal, udp, logs,
		advance: (secs: number): void => {
			now += secs * 1000;
			bal.wheel.run(now);
		},
		now: () => now,
	};
}
