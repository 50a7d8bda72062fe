#!/usr/bin/env node
/*
 * A real node-mname DNS server for the benchmark: the unmodified `mname`
 * 1.5.1 from node_modules, answering every query with one A record
 * (1.2.3.4, TTL 60) and logging nothing below fatal.
 *
 *   node bench/mname_server.cjs [--balancer PATH] [--udp PORT] [--tcp PORT]
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

const opts = {};
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i += 2) {
	const k = argv[i];
	const v = argv[i + 1];
	if (!['--balancer', '--udp', '--tcp'].includes(k) || v === undefined) {
		process.stderr.write('usage: mname_server.cjs [--balancer PATH] [--udp PORT] [--tcp PORT]\n');
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

server.on('query', (query, done) => {
	query.addAnswer(query.name(), answer, 60);
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
