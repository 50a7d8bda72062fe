/*
 * THE TCP PATH IN-PROCESS: A TCP LISTENER ON A STEPPED CLOCK
 *
 * Backends, remotes and a TcpListener (src/tcp_listener.ts) built the way
 * balancer.ts builds them, in the test's own process, listening on
 * 127.0.0.1 with real sockets, but driven by a clock the test steps:
 * advance(secs) moves it and runs the timeout wheel, so the 10-second
 * INBOUND_TCP_OK deadline, the idle deadline and the message deadline are
 * stepped through, never slept through.  rig() puts it in front of a
 * backend directory where backend 5301 already listens (a real mname, or a
 * FakeBackend) and waits until that backend is ok; fakeRig() makes the
 * FakeBackend too, answering INBOUND_TCP as the test says.
 *
 * Used by tcp_proxy.test.ts, tcp_lockout.test.ts and tcp_backpressure.test.ts.
 */

import type net from 'node:net';
import path from 'node:path';
import type { Test } from 'tap';
import pino, { type Logger } from 'pino';
import { type Backend, Backends } from '../../src/backends.js';
import { Acl } from '../../src/dns.js';
import { Remotes } from '../../src/remotes.js';
import { TcpListener } from '../../src/tcp_listener.js';
import { TimeoutWheel } from '../../src/timeouts.js';
import { TcpDnsClient } from './dns_client.js';
import { FakeBackend, type FakeBackendOptions } from './fake_backend.js';
import { makeSocketDir } from './fleet.js';
import { freePort } from './ports.js';
import { waitFor } from './wait.js';

export interface RigOptions {
	idleTimeoutSecs?: number;
	maxConnections?: number;
	maxPerRemote?: number;
	maxQueriesPerConn?: number;
	maxQueriesPerRemote?: number;
	/* --allow prefixes; everyone when absent. */
	allow?: string[];
	log?: Logger;
}

export type Rig = Awaited<ReturnType<typeof rig>>;

/*
 * Backends, remotes and a TCP listener on 127.0.0.1, driven by `now`, in
 * front of the backend directory `dir`; backend 5301, listening there, is
 * connected and ok.
 */
export async function rig(t: Test, dir: string, o: RigOptions = {}) {
	const { idleTimeoutSecs = 10, maxConnections = 512, maxPerRemote = 512, maxQueriesPerConn,
		maxQueriesPerRemote = 1_000_000, log = pino({ level: 'silent' }) } = o;
	const clock = { now: 10_000_000 };
	const wheel = new TimeoutWheel(() => clock.now);
	const backends = new Backends({ socketDir: dir, log, wheel, onOutboundUdp: () => {} });
	const remotes = new Remotes({ log, backends, wheel });
	const acl = o.allow === undefined ? undefined : new Acl(o.allow);
	const tcp = new TcpListener({
		remotes, backends, wheel, log, idleTimeoutSecs, maxConnections, maxPerRemote, maxQueriesPerConn, maxQueriesPerRemote,
		acl,
	});
	const port = await freePort();
	await tcp.listen('127.0.0.1', port);
	t.teardown(async () => {
		await tcp.close(0);
		backends.close();
	});
	const be = backends.trackAndConnect('5301') as Backend;
	await waitFor(() => be.ok, 3000, 10, 'backend ok');
	return {
		wheel, backends, remotes, tcp, port, be,
		advance(secs: number): void {
			clock.now += secs * 1000;
			wheel.run(clock.now);
		},
	};
}

/*
 * rig() in front of a fake backend 5301 that says hello and answers
 * heartbeats on its control session, and treats INBOUND_TCP as `onTcp`
 * says.  Half-open, so a session can answer after the client's FIN.
 */
export async function fakeRig(t: Test, onTcp: (sock: net.Socket) => void, o: RigOptions = {},
	fakeOpts: FakeBackendOptions = {}) {
	const dir = await makeSocketDir(t);
	const sockPath = path.join(dir, '5301');
	const fake = await FakeBackend.listen(t, sockPath, { allowHalfOpen: true, onTcpSession: onTcp, ...fakeOpts });
	return { ...await rig(t, dir, o), fake, sockPath };
}

export const neverAnswers = (): void => {};

/** A client from `source`, released on teardown. */
export const connect = (t: Test, port: number, source: string): Promise<TcpDnsClient> =>
	TcpDnsClient.connect(t, port, source);

/** The proxy closes a connection at once or not at all; the deadline is for a loaded machine. */
export const closed = (c: TcpDnsClient): Promise<void> => c.closedByPeer(10_000);

/** Let bytes in flight on loopback reach the other side. */
export const settle = (ms = 50): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
