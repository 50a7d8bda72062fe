/*
 * The DNS edge as pure functions: the header check, synthesized error
 * answers (decoded back with dns-packet), and CIDR ACLs.
 */

import t from 'tap';
import dnsPacket from 'dns-packet';
import {
	Acl, buildErrorAnswer, checkQueryHeader, describeQuery, HEADER_OK, HEADER_OPCODE, HEADER_QDCOUNT,
	HEADER_RESPONSE, HEADER_SHORT, parseCidr, questionEnd, RCODE_REFUSED, RCODE_SERVFAIL,
} from '../src/dns.js';

const OPCODES: Record<string, number> = { QUERY: 0, IQUERY: 1, STATUS: 2, NOTIFY: 4, UPDATE: 5 };

function query(opts: { id?: number; rd?: boolean; opcode?: string; edns?: boolean; name?: string } = {}): Buffer {
	const b = dnsPacket.encode({
		type: 'query',
		id: opts.id ?? 4660,
		flags: opts.rd === false ? 0 : dnsPacket.RECURSION_DESIRED,
		questions: [{ type: 'AAAA', name: opts.name ?? 'svc.dc.example.com', class: 'IN' }],
		additionals: opts.edns ? [{ type: 'OPT', name: '.', udpPayloadSize: 4096 } as dnsPacket.Answer] : [],
	});
	b[2] = ((b[2]) & 0x87) | ((OPCODES[opts.opcode ?? 'QUERY']) << 3);
	return b;
}

/* dns-packet decodes opcode and rcode, but its types do not declare them. */
function decode(b: Buffer): dnsPacket.DecodedPacket & { opcode: string; rcode: string } {
	return dnsPacket.decode(b) as dnsPacket.DecodedPacket & { opcode: string; rcode: string };
}

t.test('header check: what passes and what does not', async (t) => {
	t.equal(checkQueryHeader(query()), HEADER_OK, 'a query');
	t.equal(checkQueryHeader(query({ opcode: 'NOTIFY' })), HEADER_OK, 'NOTIFY');
	t.equal(checkQueryHeader(query({ opcode: 'UPDATE' })), HEADER_OK, 'UPDATE');
	for (const n of [0, 1, 11]) {
		t.equal(checkQueryHeader(Buffer.alloc(n)), HEADER_SHORT, `${n} bytes`);
	}
	const resp = query();
	resp[2] = (resp[2]) | 0x80;
	t.equal(checkQueryHeader(resp), HEADER_RESPONSE, 'QR=1');
	t.equal(checkQueryHeader(query({ opcode: 'STATUS' })), HEADER_OPCODE, 'STATUS');
	t.equal(checkQueryHeader(query({ opcode: 'IQUERY' })), HEADER_OPCODE, 'IQUERY');
	const q0 = query();
	q0.writeUInt16BE(0, 4);
	t.equal(checkQueryHeader(q0), HEADER_QDCOUNT, 'QDCOUNT 0');
	q0.writeUInt16BE(2, 4);
	t.equal(checkQueryHeader(q0), HEADER_QDCOUNT, 'QDCOUNT 2');
	q0.writeUInt16BE(257, 4);
	t.equal(checkQueryHeader(q0), HEADER_QDCOUNT, 'QDCOUNT 257 (low byte 1)');
	const framed = Buffer.concat([Buffer.from([0, 0]), query()]);
	t.equal(checkQueryHeader(framed, 2), HEADER_OK, 'at an offset');
	t.equal(checkQueryHeader(framed, 2, 11), HEADER_SHORT, 'a length shorter than the buffer');
	t.equal(checkQueryHeader(framed.subarray(0, 13), 2), HEADER_SHORT, 'at an offset, only what follows it counts');
	t.equal(checkQueryHeader(Buffer.alloc(12)), HEADER_QDCOUNT, 'twelve zero bytes');
});

t.test('SERVFAIL and REFUSED are built from the query and never outgrow it', async (t) => {
	for (const rd of [true, false]) {
		for (const edns of [false, true]) {
			const q = query({ id: 0xbeef, rd, edns });
			const a = buildErrorAnswer(q, RCODE_SERVFAIL) as Buffer;
			t.ok(a.length <= q.length, `rd=${rd} edns=${edns}: ${a.length} bytes for a ${q.length}-byte query`);
			const p = decode(a);
			t.equal(p.id, 0xbeef, 'same id');
			t.equal(p.type, 'response');
			t.equal(p.rcode, 'SERVFAIL');
			t.equal(Boolean(p.flag_rd), rd, 'RD copied');
			t.equal(Boolean(p.flag_ra), false, 'RA clear');
			t.equal(Boolean(p.flag_aa), false, 'AA clear');
			t.equal(Boolean(p.flag_tc), false, 'TC clear');
			t.same(p.questions, [{ name: 'svc.dc.example.com', type: 'AAAA', class: 'IN' }], 'question echoed');
			t.same([p.answers?.length, p.authorities?.length, p.additionals?.length], [0, 0, 0], 'nothing else');
		}
	}
	const r = decode(buildErrorAnswer(query({ opcode: 'UPDATE' }), RCODE_REFUSED) as Buffer);
	t.equal(r.rcode, 'REFUSED');
	t.equal(r.opcode, 'UPDATE', 'opcode kept');
});

t.test('a question that cannot be walked gets no synthesized answer', async (t) => {
	const q = query();
	const end = questionEnd(q);
	t.equal(end, 12 + 'svc.dc.example.com'.length + 2 + 4, 'the question ends after name, type, class');
	t.equal(buildErrorAnswer(q.subarray(0, end - 1), RCODE_SERVFAIL), null, 'truncated question');
	const pointer = Buffer.from(q);
	pointer[12] = 0xc0;
	t.equal(questionEnd(pointer), -1, 'a compression pointer');
	const labels = Buffer.from(Array.from({ length: 5 }, () => [63, ...Buffer.alloc(63, 97)]).flat());
	const long = Buffer.concat([q.subarray(0, 12), labels, Buffer.from([0, 0, 1, 0, 1])]);
	t.equal(questionEnd(long), -1, 'a name over 255 bytes');
	t.equal(questionEnd(Buffer.alloc(12)), -1, 'no question at all');
});

t.test('describeQuery names the query for trace logs, and never throws', async (t) => {
	t.same(describeQuery(query({ id: 77 })), { qname: 'svc.dc.example.com', qtype: 'AAAA', id: 77 });
	t.equal(describeQuery(Buffer.from([1, 2, 3])), null);
	const bare = Buffer.alloc(12);
	bare.writeUInt16BE(4242, 0);
	t.same(describeQuery(bare), { qname: '', qtype: '', id: 4242 }, 'no question: still named by its id');
});

t.test('ACLs: prefixes, bare addresses, lists, and clear errors', async (t) => {
	const ip = (s: string): number => s.split('.').reduce((a, o) => a * 256 + Number(o), 0);
	const acl = new Acl(['10.0.0.0/8,192.168.1.0/24', '172.16.5.5']);
	t.ok(acl.allows(ip('10.200.3.4')));
	t.ok(acl.allows(ip('192.168.1.255')));
	t.notOk(acl.allows(ip('192.168.2.1')));
	t.ok(acl.allows(ip('172.16.5.5')), 'a bare address is /32');
	t.notOk(acl.allows(ip('172.16.5.6')));
	t.notOk(acl.allows(ip('11.0.0.1')));
	t.ok(new Acl([]).open, 'no entries: open');
	t.ok(new Acl([]).allows(ip('8.8.8.8')), 'open allows everyone');
	t.ok(new Acl(['0.0.0.0/0']).allows(ip('255.255.255.255')), '/0 allows everyone');
	t.ok(new Acl(['255.255.255.255/32']).allows(ip('255.255.255.255')), 'the top address');
	t.throws(() => parseCidr('10.0.0.1/8'), /host bits set: did you mean 10\.0\.0\.0\/8\?/);
	t.throws(() => parseCidr('10.0.0.0/33'), /not an IPv4 address or CIDR/);
	t.throws(() => parseCidr('fe80::/10'), /not an IPv4 address or CIDR/);
	t.throws(() => parseCidr('example.com'), /not an IPv4 address or CIDR/);
});

t.test('parseCidr: the whole text is one prefix, /0 to /32, spaces around it allowed', async (t) => {
	t.same(parseCidr('10.0.0.0/8'), { text: '10.0.0.0/8', net: 0x0a000000, mask: 0xff000000 });
	t.same(parseCidr(' 192.168.1.0/24\t'), { text: '192.168.1.0/24', net: 0xc0a80100, mask: 0xffffff00 },
		'spaces around are trimmed, as in --allow "10.0.0.0/8, 192.168.1.0/24"');
	t.same(parseCidr('172.16.5.5'), { text: '172.16.5.5', net: 0xac100505, mask: 0xffffffff }, 'a bare address is /32');
	t.same(parseCidr('10.1.2.3/32'), { text: '10.1.2.3/32', net: 0x0a010203, mask: 0xffffffff }, '/32 spelled out');
	t.same(parseCidr('0.0.0.0/0'), { text: '0.0.0.0/0', net: 0, mask: 0 }, '/0 matches every address');
	t.same(parseCidr('128.0.0.0/1'), { text: '128.0.0.0/1', net: 0x80000000, mask: 0x80000000 });
	t.same(parseCidr('255.255.255.254/31'), { text: '255.255.255.254/31', net: 0xfffffffe, mask: 0xfffffffe });
	t.same(parseCidr('010.000.000.000/08'), { text: '010.000.000.000/08', net: 0x0a000000, mask: 0xff000000 },
		'leading zeros are decimal, as everywhere bbal reads a dotted quad (never octal)');

	t.throws(() => parseCidr('10.0.0.0/0'), { message: '"10.0.0.0/0" has host bits set: did you mean 0.0.0.0/0?' });
	t.throws(() => parseCidr('10.1.2.3/31'), { message: '"10.1.2.3/31" has host bits set: did you mean 10.1.2.2/31?' });
	t.throws(() => parseCidr('192.168.1.77/24'), /did you mean 192\.168\.1\.0\/24\?/);

	for (const bad of [
		'', ' ', '/8', '10.0.0.0/', '10.0.0.0/33', '10.0.0.0/99', '10.0.0.0/008', '10.0.0.0/-1', '10.0.0.0/8.0',
		'x10.0.0.0/8', '10.0.0.0/8x', '10.0.0.0/8/8', '10.0.0.0//8', '10.0.0.0 /8', '10.0.0.0/ 8', '10 .0.0.0/8',
		'1.2.3/24', '1.2.3.4.5', '256.0.0.0/8', '10.0.0.0/8,', 'a10.0.0.0', '10.0.0.0a',
	]) {
		t.throws(() => parseCidr(bad), { message: `"${bad}" is not an IPv4 address or CIDR prefix (like 10.0.0.0/8)` },
			JSON.stringify(bad));
	}
});

t.test('Acl: comma-separated entries with spaces, empty pieces skipped', async (t) => {
	const ip = (s: string): number => s.split('.').reduce((a, o) => a * 256 + Number(o), 0);
	const acl = new Acl([' 10.0.0.0/8 , ,192.168.1.0/24,', '', ' 172.16.0.1 ']);
	t.same(acl.cidrs.map((c) => c.text), ['10.0.0.0/8', '192.168.1.0/24', '172.16.0.1']);
	t.equal(acl.open, false, 'a list with prefixes is not open');
	t.ok(acl.allows(ip('10.0.0.0')), 'the first address of a prefix');
	t.ok(acl.allows(ip('10.255.255.255')), 'the last address of a prefix');
	t.notOk(acl.allows(ip('9.255.255.255')), 'just below');
	t.notOk(acl.allows(ip('11.0.0.0')), 'just above');
	t.ok(acl.allows(ip('172.16.0.1')));
	t.notOk(acl.allows(ip('172.16.0.0')));
	t.ok(new Acl(['', ' , ']).open, 'only empty pieces: open');
	t.throws(() => new Acl(['10.0.0.0/8,nonsense']), /"nonsense" is not an IPv4 address/, 'one bad piece fails the list');
	t.notOk(new Acl(['10.0.0.0/8']).allows(ip('192.168.0.1')), 'a single prefix refuses the rest');
});
