/*
 * THE BACKEND'S HALF OF THE PROTOCOL
 *
 * bbal is the client of the balancer protocol (src/protocol.ts): it writes
 * CLIENT_HELLO, INBOUND_UDP, INBOUND_TCP and CLIENT_HEARTBEAT, and only
 * reads what a backend sends.  The frames a backend writes are built here,
 * for the fake sockets and fake backends that play one, from src's frame
 * types and its UDP frame writer, so a test cannot disagree with bbal about
 * a layout.  Fixed frames are shared and never mutated.
 */

import {
	FRAME_INBOUND_TCP_OK, FRAME_SERVER_HEARTBEAT, FRAME_SERVER_HELLO, typeOnlyFrame, UDP_FRAME_HEADER_BYTES, writeUdpFrame,
} from '../../src/protocol.js';

export const SERVER_HELLO_FRAME: Buffer = typeOnlyFrame(FRAME_SERVER_HELLO);
export const SERVER_HEARTBEAT_FRAME: Buffer = typeOnlyFrame(FRAME_SERVER_HEARTBEAT);
export const INBOUND_TCP_OK_FRAME: Buffer = typeOnlyFrame(FRAME_INBOUND_TCP_OK);

/** A whole UDP frame (OUTBOUND_UDP from a backend; INBOUND_UDP to compare with what bbal wrote). */
export function encodeUdpFrame(type: number, addr: number, port: number, payload: Uint8Array): Buffer {
	const b = Buffer.allocUnsafe(UDP_FRAME_HEADER_BYTES + payload.length);
	writeUdpFrame(b, 0, type, addr, port, payload);
	return b;
}
