#!/usr/bin/env node
/*
 * A real node-mname DNS server for the benchmark: the unmodified `mname`
 * 1.5.1 from node_modules, answering every query with one A record
 * (1.2.3.4, TTL 60) and logging nothing below fatal.
 *
 *   node bench/mname_server.cjs [--balancer PATH] [--udp PORT] [--tcp PORT] [--binder]
 *
 * --binder answers the way Binder (Triton's service discovery, the mname
 * server bbal was made for) does: a service name stands for its instances,
 * so every A query is answered with 3 to 5 A records, TTL 30, in an order
 * shuffled afresh for each answer (clients spread over the instances by
 * taking the first).  How many and which addresses is a function of the
 * name (10.x.y.1 ... 10.x.y.n, x and y and n from a hash of it), so two
 * processes answer a name with the same set, as two Binders of one
 * datacenter would.  Other types get an empty NOERROR.  The sets of the
 * MEMO_NAMES names asked most recently are kept (a Map in least recently
 * used order), so the names asked all the time stay made, and a name asked
 * once (the cache scenario's unique names) costs a few records made and,
 * later, dropped.
 *
 * Any combination of listeners in one process (one mname Server): the
 * balancer socket bbal connects to, and the process's own UDP and TCP DNS
 * ports on 127.0.0.1, so "bbal -> this mname" and "this mname directly" are
 * the same process. Prints "ready" on stdout once every listener is up.
 * SIGTERM/SIGINT close it (removing the balancer socket file) and exit 0.
 */
'use strict';

process.noDeprecation = true; /* mname 1.5 calls new Buffer() */

const fs = require('node:fs');
const bunyan = require('bunyan');
const mname = require('mname');

const USAGE = 'usage: mname_server.cjs [--balancer PATH] [--udp PORT] [--tcp PORT] [--binder]\n';
/* --binder: the TTL of its answers, and how many names' record sets are kept. */
const BINDER_TTL = 30;
const MEMO_NAMES = 10000;

const opts = {};
let binder = false;
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i += 2) {
	const k = argv[i];
	const v = argv[i + 1];
	if (k === '--binder') {
		binder = true;
		i--;
		continue;
	}
	if (!['--balancer', '--udp', '--tcp'].includes(k) || v === undefined) {
		process.stderr.write(USAGE);
		process.exit(2);
	}
	opts[k.slice(2)] = v;
}

process.on('uncaughtException', (err) => {
	process.stderr.write(`mname_server: ${err.stack || err}\n`);
	process.exit(1);
});

const log = bunyan.createLogger({ name: 'bench-mname', level: 'fatal' });
const server = mname.createServer({ name: 'bench', log });
const answer = new mname.ARecord('1.2.3.4');

/* --binder: a name's instances, 3 to 5 A records from a hash of the name (FNV-1a); the last MEMO_NAMES names' kept. */
const instances = new Map();
function instancesOf(name) {
	let recs = instances.get(name);
	if (recs !== undefined) {
		instances.delete(name); /* to the most recently used end */
	} else {
		let h = 0x811c9dc5;
		for (let i = 0; i < name.length; i++) {
			h = Math.imul(h ^ name.charCodeAt(i), 0x01000193) >>> 0;
		}
		recs = [];
		for (let n = 3 + (h % 3), k = 1; k <= n; k++) {
			recs.push(new mname.ARecord(`10.${(h >>> 8) & 0xff}.${(h >>> 16) & 0xff}.${k}`));
		}
		if (instances.size >= MEMO_NAMES) {
			instances.delete(instances.keys().next().value);
		}
	}
	instances.set(name, recs);
	return recs;
}

/* One answer's order: a Fisher-Yates shuffle of a copy. */
function shuffled(recs) {
	const out = recs.slice();
	for (let i = out.length - 1; i > 0; i--) {
		const j = Math.floor(Math.random() * (i + 1));
		[out[i], out[j]] = [out[j], out[i]];
	}
	return out;
}

server.on('query', (query, done) => {
	const name = query.name();
	if (!binder) {
		query.addAnswer(name, answer, 60);
	} else if (query.type() === 'A') {
		for (const rec of shuffled(instancesOf(name))) {
			query.addAnswer(name, rec, BINDER_TTL);
		}
	} else {
		query.setError('NOERROR'); /* mname's default for an answer without records is NOTIMP */
	}
	query.respond();
	done();
});
server.on('error', (err) => {
	process.stderr.write(`mname_server: ${err.stack || err}\n`);
	process.exit(1);
});

const pending = [];
if (opts.balancer !== undefined) {
	try {
		fs.unlinkSync(opts.balancer);
	} catch (err) {
		if (err.code !== 'ENOENT') {
			throw err;
		}
	}
	pending.push(new Promise((resolve) => server.listenBalancer({ path: opts.balancer }, resolve)));
}
if (opts.udp !== undefined) {
	pending.push(new Promise((resolve) => server.listenUdp(
		{ port: Number(opts.udp), address: '127.0.0.1', family: 'udp4' }, resolve)));
}
if (opts.tcp !== undefined) {
	pending.push(new Promise((resolve) => server.listenTcp(
		{ port: Number(opts.tcp), address: '127.0.0.1' }, resolve)));
}
if (pending.length === 0) {
	process.stderr.write('mname_server: nothing to listen on\n');
	process.exit(2);
}
Promise.all(pending).then(() => process.stdout.write('ready\n'));

let closing = false;
function onSignal() {
	if (closing) {
		return;
	}
	closing = true;
	/* close() waits for open connections (bbal keeps one): don't wait long. */
	server.close(() => process.exit(0));
	setTimeout(() => process.exit(0), 200).unref();
}
process.on('SIGTERM', onSignal);
process.on('SIGINT', onSignal);
