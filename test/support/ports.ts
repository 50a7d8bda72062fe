/*
 * FREE PORTS ON LOOPBACK
 *
 * Every bbal a test or harness starts listens on 127.0.0.1 on a port of its
 * own, for DNS over both UDP and TCP, and some also serve /metrics or an
 * inspector.  freePort() finds one number free for both protocols at the
 * moment of the call: the kernel picks a free TCP port, and it is kept only
 * if UDP can bind the same number too.  Another process could still take it
 * before bbal binds, which on a test machine is rare enough to accept.
 *
 * Clients need no such search: Linux routes all of 127.0.0.0/8 to loopback,
 * so a client binds any 127.0.0.x address without setup, and each address
 * is a different remote to bbal.  hostAddress is the one address off
 * loopback the wildcard-bind tests ask as well, when the host has one.
 */

import dgram from 'node:dgram';
import net from 'node:net';
import os from 'node:os';

/** The host's first IPv4 address off loopback, if it has one. */
export const hostAddress: string | undefined = Object.values(os.networkInterfaces()).flat()
	.find((a) => a !== undefined && a.family === 'IPv4' && !a.internal)?.address;

function bindUdp(port: number): Promise<dgram.Socket | null> {
	return new Promise((resolve) => {
		const sock = dgram.createSocket('udp4');
		sock.once('error', () => { sock.close(); resolve(null); });
		sock.bind(port, '127.0.0.1', () => resolve(sock));
	});
}

function listenTcp(port: number): Promise<net.Server | null> {
	return new Promise((resolve) => {
		const srv = net.createServer();
		srv.once('error', () => resolve(null));
		srv.listen(port, '127.0.0.1', () => resolve(srv));
	});
}

/* A port free on 127.0.0.1 for both UDP and TCP at the moment of the call. */
export async function freePort(): Promise<number> {
	for (let attempt = 0; attempt < 20; attempt++) {
		const srv = await listenTcp(0);
		if (srv === null) {
			continue;
		}
		const port = (srv.address() as net.AddressInfo).port;
		const udp = await bindUdp(port);
		await new Promise<void>((resolve) => srv.close(() => resolve()));
		if (udp !== null) {
			await new Promise<void>((resolve) => udp.close(() => resolve()));
			return port;
		}
	}
	throw new Error('freePort: no port free for both TCP and UDP in 20 tries');
}
