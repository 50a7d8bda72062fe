/*
 * The takeover's wire, without sockets (src/takeover_wire.ts): the line
 * parser in any split and at its bound, remotes carried from one table to
 * another exactly (backends by path, counters, ages), a delta that picks
 * what it is asked for, junk that never throws, and the running bbal's
 * judgement of a newcomer.  Plus the remotes table's side, restore().
 */

import fc from 'fast-check';
import t from 'tap';
import {
	checkHello, decodeRemote, type Hello, LineReader, remoteMessages, REMOTES_PER_MESSAGE, TAKEOVER_PROTOCOL,
} from '../src/takeover_wire.js';
import { fakeTable } from './support/fake_socket.js';

t.test('LineReader gives back the lines in any split', (t) => {
	const text = fc.string({ maxLength: 40 }).map((s) => s.replace(/\n/g, ' '));
	fc.assert(fc.property(fc.array(text, { maxLength: 12 }), fc.array(fc.integer({ min: 1, max: 17 }), { minLength: 1 }),
		(lines, cuts) => {
			const bytes = Buffer.from(lines.map((l) => `${l}\n`).join(''));
			const r = new LineReader(1000);
			const out: string[] = [];
			for (let at = 0, i = 0; at < bytes.length; i++) {
				const n = cuts[i % cuts.length];
				out.push(...r.push(bytes.subarray(at, at + n)));
				at += n;
			}
			t.same(out, lines);
		}), { numRuns: 300 });
	t.end();
});

t.test('LineReader refuses a line over its bound, wherever it is cut', (t) => {
	const r = new LineReader(10);
	t.same(r.push(Buffer.from('0123456789\n')), ['0123456789'], 'a line of exactly the bound is fine');
	t.throws(() => {
		r.push(Buffer.from('01234'));
		r.push(Buffer.from('567890'));
	}, /longer than 10 bytes/, 'eleven bytes without a newline are too many');
	t.end();
});

t.test('remotes travel from one table to another with their backends, counters and ages', (t) => {
	const old = fakeTable(100);
	const a = old.up('/s/a');
	const b = old.up('/s/b');
	const r1 = old.remotes.lookup(0x0a000001);
	r1.chooseBackend();
	r1.udp = 7;
	r1.tcpDrop = 2;
	old.tick(30);
	const r2 = old.remotes.lookup(0x0a000002);
	r2.chooseBackend();
	r2.rateLimited = 3;
	old.tick(5);
	const primaries = new Map([[r1.addr, r1.primary?.path], [r2.addr, r2.primary?.path]]);
	t.same(new Set(primaries.values()), new Set([a.path, b.path]), 'two remotes on two backends (round robin)');

	const fresh = fakeTable(100);
	fresh.up('/s/b');
	fresh.up('/s/a');
	let messages = 0;
	for (const m of remoteMessages(old.remotes, () => old.wheel.nowMs)) {
		if (m === null) {
			continue;
		}
		messages++;
		for (const rec of m.remotes) {
			const d = decodeRemote(JSON.parse(JSON.stringify(rec)) as unknown, m.backends,
				(p) => fresh.backends.lookupPath(p) ?? null);
			t.not(d, null, 'a record it wrote, it reads');
			if (d !== null) {
				fresh.remotes.restore(d.addr, d.remote);
			}
		}
	}
	t.equal(messages, 1, 'two remotes, one message');
	const n1 = fresh.remotes.peek(r1.addr);
	const n2 = fresh.remotes.peek(r2.addr);
	t.equal(n1?.primary?.path, primaries.get(r1.addr), 'the first keeps its backend, found by path');
	t.equal(n2?.primary?.path, primaries.get(r2.addr), 'and so does the second');
	t.same([n1?.udp, n1?.tcpDrop, n2?.rateLimited], [7, 2, 3], 'counters carried');
	const nowMs = fresh.wheel.nowMs;
	t.equal(Math.round((nowMs - (n1?.lastSeenMs ?? 0)) / 1000), 35, 'last seen 35 s ago there, 35 s ago here');
	t.equal(Math.round((nowMs - (n2?.firstSeenMs ?? 0)) / 1000), 5, 'first seen 5 s ago');
	t.equal(fresh.logged('new remote peer').length, 0, 'restored remotes are not logged as new');
	t.equal(fresh.backends.lookupPath(a.path)?.remoteCount, 1, 'the backends count their remotes');
	t.end();
});

t.test('restore() moves a remote the new table already has, keeps the larger counters, honours the cap', (t) => {
	const tb = fakeTable(2);
	const a = tb.up('/s/a');
	const b = tb.up('/s/b');
	const rem = tb.remotes.lookup(1);
	rem.chooseBackend();
	const other = rem.primary === a ? b : a;
	rem.udp = 10;
	const base = { udpDrop: 0, tcp: 0, tcpDrop: 0, udpInvalid: 0, rateLimited: 0, firstSeenAgoSecs: 0, lastSeenAgoSecs: 0 };
	tb.remotes.restore(1, { ...base, primary: other, backup: null, udp: 4 });
	t.equal(rem.primary, other, 'moved to the backend the old process gave it');
	t.equal(rem.udp, 10, 'the larger count kept');
	t.equal(a.remoteCount + b.remoteCount, 1, 'counted once');
	tb.remotes.restore(2, { ...base, primary: a, backup: null, udp: 1 });
	tb.remotes.restore(3, { ...base, primary: a, backup: null, udp: 1 });
	t.equal(tb.remotes.size, 2, 'the cap holds');
	tb.remotes.restore(4, { ...base, primary: null, backup: b, udp: 1 });
	t.equal(tb.remotes.peek(4)?.backup, null, 'no backup without a primary');
	t.end();
});

t.test('a delta carries only what it is asked for and the table still holds, REMOTES_PER_MESSAGE at a time', (t) => {
	const tb = fakeTable(10_000);
	tb.up('/s/a');
	for (let i = 0; i < 2_500; i++) {
		tb.remotes.lookup(i).chooseBackend();
	}
	const sizes: number[] = [];
	const even = Array.from({ length: 1_250 }, (_, i) => 2 * i).concat([9_999_999]);
	const gen = remoteMessages(tb.remotes, () => tb.wheel.nowMs, even);
	let r = gen.next();
	for (; r.done !== true; r = gen.next()) {
		if (r.value !== null) {
			sizes.push(r.value.remotes.length);
			t.ok(r.value.remotes.every((rec) => rec[0] % 2 === 0), 'only the remotes wanted');
		}
	}
	t.equal(r.value, 1_250, 'the count of what was sent');
	t.ok(sizes.every((n) => n <= REMOTES_PER_MESSAGE), 'no message over the bound');
	t.equal(sizes.length, 2, 'in two messages');
	t.equal(sizes.reduce((x, y) => x + y, 0), 1_250, 'each once');
	t.end();
});

t.test('the table notes what changes while a takeover is under way, up to its cap', (t) => {
	const tb = fakeTable(3);
	const a = tb.up('/s/a');
	tb.remotes.lookup(1).chooseBackend();
	t.equal(tb.remotes.takeChanges(), null, 'nothing noted when no takeover is under way');
	tb.remotes.trackChanges();
	tb.remotes.lookup(1).chooseBackend();
	t.same(tb.remotes.takeChanges(), [], 'a query from a remote that keeps its backend is no change');
	tb.remotes.trackChanges();
	tb.remotes.lookup(7).chooseBackend();
	tb.remotes.peek(1)?.clearPrimary();
	t.same(tb.remotes.takeChanges(), [7, 1], 'a new remote and a reassigned one, in the order noted');
	tb.remotes.trackChanges();
	for (const addr of [10, 11, 12, 13]) {
		tb.remotes.lookup(addr).chooseBackend();
	}
	t.equal(tb.remotes.takeChanges(), null, 'more than the cap: null, send everything');
	t.ok(a.remoteCount > 0, 'the remotes were served meanwhile');
	t.end();
});

t.test('junk for a remote is refused, never thrown', (t) => {
	fc.assert(fc.property(fc.anything(), fc.array(fc.string(), { maxLength: 3 }), (junk, paths) => {
		const d = decodeRemote(junk, paths, () => null);
		t.ok(d === null || (d.addr >= 0 && d.addr < 2 ** 32), 'null, or an address in range');
	}), { numRuns: 300 });
	t.equal(decodeRemote([1, 5, -1, 0, 0, 0, 0, 0, 0, 0, 0], ['/s/a'], () => null), null, 'an index past the list');
	t.equal(decodeRemote([2 ** 32, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0], [], () => null), null, 'an address past IPv4');
	t.equal(decodeRemote([1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0.5], [], () => null), null, 'a fraction');
	t.end();
});

t.test('checkHello: the same protocol, -b, -p and transport, or why not', (t) => {
	const me = { bind: '0.0.0.0', port: 53, transport: 'native' };
	const hello: Hello = {
		type: 'hello', protocol: TAKEOVER_PROTOCOL, version: '9', pid: 1, bind: '0.0.0.0', port: 53, transport: 'native', options: {},
	};
	t.equal(checkHello(hello, me), null, 'welcome');
	t.match(checkHello({ ...hello, protocol: 2 }, me), /protocol 1, this one 2/, 'another protocol');
	t.match(checkHello({ ...hello, port: 5353 }, me), /0\.0\.0\.0:53, this one was asked for 0\.0\.0\.0:5353/, 'another port');
	t.match(checkHello({ ...hello, bind: '10.0.0.1' }, me), /-b and -p cannot change/, 'another address');
	t.match(checkHello({ ...hello, transport: 'dgram' }, me), /native, this one's dgram/, 'another transport');
	t.end();
});
