/*
 * A FAKE UDP TRANSPORT, FOR THE BALANCER IN-PROCESS
 *
 * The Balancer and UdpProxy take their UDP transport as an option (the
 * seam src/balancer.ts documents), so a test builds them without a socket:
 * it hands datagrams in with deliver() and reads what the proxy sent from
 * `sent`.  send() makes the same checks as the real transports (bound,
 * port 1-65535, at most MAX_UDP_PAYLOAD_BYTES), so what it accepts is what
 * a real socket would have been asked to send.
 */

import dnsPacket from 'dns-packet';
import { MAX_UDP_PAYLOAD_BYTES } from '../../src/protocol.js';
import type { PassedUdpSocket, UdpTransport, UdpTransportError, UdpTransportKind } from '../../src/udp_transport.js';

export interface Sent {
	bytes: Buffer;
	addr: number;
	port: number;
	/* The local address to send from, as the proxy gave it (0: none). */
	local: number;
}

/*
 * A UdpTransport with no socket: the test hands it datagrams (deliver) and
 * reads what the proxy sends (sent), with send()'s checks as the real ones.
 */
export class FakeTransport implements UdpTransport {
	/* Not a kind the real ones have: it names the transport in a debug line only. */
	readonly kind = 'fake' as unknown as UdpTransportKind;
	onDatagram: (msg: Buffer, addr: number, port: number, len: number, local: number) => void = () => {};
	onError: (err: UdpTransportError) => void = () => {};
	readonly sent: Sent[] = [];
	state: 'new' | 'bound' | 'closed' = 'new';
	closeCalls = 0;

	/* Delivered datagrams are dropped once stopReading() is called, as a real socket nobody reads. */
	reading = true;

	bind(): Promise<void> {
		this.state = 'bound';
		return Promise.resolve();
	}

	adopt(): Promise<void> {
		return this.bind();
	}

	sockets(): PassedUdpSocket[] {
		return [];
	}

	stopReading(): void {
		this.reading = false;
	}

	send(payload: Uint8Array, addr: number, port: number, local = 0): boolean {
		if (this.state !== 'bound' || port < 1 || port > 65535 || payload.length > MAX_UDP_PAYLOAD_BYTES) {
			return false;
		}
		this.sent.push({ bytes: Buffer.from(payload), addr, port, local });
		return true;
	}

	localPort(): number {
		return this.state === 'bound' ? 53 : 0;
	}

	close(): Promise<void> {
		this.closeCalls++;
		this.state = 'closed';
		return Promise.resolve();
	}

	/*
	 * One datagram from addr:port; len as the real transports give it (the
	 * true length), local the address it was sent to (as a wildcard bind
	 * reports it; 0 otherwise).
	 */
	deliver(bytes: Buffer, addr: number, port: number, len = bytes.length, local = 0): void {
		if (this.reading) {
			this.onDatagram(bytes, addr, port, len, local);
		}
	}

	/* What went to addr:port, decoded. */
	answersTo(addr: number, port: number): dnsPacket.Packet[] {
		return this.sent.filter((s) => s.addr === addr && s.port === port).map((s) => dnsPacket.decode(s.bytes));
	}
}
