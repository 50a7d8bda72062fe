#!/usr/bin/env node
/*
 * The demo fleet behind `npm start`: three real node-mname backends in a
 * temporary socket directory and bbal in front of them on 127.0.0.1:5353.
 * bbal serves its stats socket at <dir>.stats.sock for balstat.
 * It prints the commands to try, passes bbal's log through, and on Ctrl-C
 * (or SIGTERM) stops every process it started and removes the directory.
 *
 * The backends are the same mname program the integration tests use
 * (test/fixtures/mname_backend.cjs): every answer carries a TXT record
 * "be=<id>" naming the backend that served it, so stickiness is visible.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const backendScript = path.join(root, 'test', 'fixtures', 'mname_backend.cjs');
const port = Number(process.env.BBAL_DEMO_PORT ?? 5353);
const dir = mkdtempSync('/tmp/bbal-demo-');
const statsSocket = `${dir}.stats.sock`;
const children = [];
let stopping = false;

function stop(code) {
	if (stopping) {
		return;
	}
	stopping = true;
	for (const c of children) {
		c.kill('SIGTERM');
	}
	setTimeout(() => {
		rmSync(dir, { recursive: true, force: true });
		rmSync(statsSocket, { force: true });
		process.exit(code);
	}, 300);
}
process.on('SIGINT', () => stop(0));
process.on('SIGTERM', () => stop(0));

function start(args, name, onLine) {
	const c = spawn(process.execPath, args, { cwd: root, stdio: ['ignore', 'pipe', 'inherit'] });
	children.push(c);
	c.stdout.setEncoding('utf8');
	c.stdout.on('data', onLine);
	c.on('exit', (code, signal) => {
		if (!stopping) {
			console.error(`demo: ${name} exited (code ${code}, signal ${signal}); stopping`);
			stop(1);
		}
	});
	return c;
}

function startBackend(id) {
	return new Promise((resolve) => {
		start([backendScript, path.join(dir, String(id)), String(id)], `backend ${id}`, (s) => {
			if (s.includes('ready')) {
				resolve();
			}
		});
	});
}

await Promise.all([5301, 5302, 5303].map(startBackend));
const bbalArgs = [path.join(root, 'bin', 'bbal.js'), '-b', '127.0.0.1', '-p', String(port), '-s', dir, '-S', statsSocket];
/* The banner waits until bbal listens and every backend has said hello, so
 * a dig run the moment it appears is answered by a backend.  Both: bbal
 * connects to its backends before it binds the DNS port (for up to 1 s), so
 * the hellos alone come before a query could be heard. */
let announced = false;
/* Whole lines only: a chunk may end in the middle of one. */
let partial = '';
let established = 0;
let listening = false;
start(bbalArgs, 'bbal', (s) => {
	process.stdout.write(s);
	const lines = (partial + s).split('\n');
	partial = lines.pop() ?? '';
	for (const line of lines) {
		established += line.includes('"msg":"backend socket established"') ? 1 : 0;
		listening ||= line.includes('"msg":"listening"');
	}
	if (!announced && established >= 3 && listening) {
		announced = true;
		console.log([
			'',
			`demo: bbal listens on 127.0.0.1:${port}; backends 5301-5303 in ${dir}`,
			'demo: try (each source address sticks to one backend, named in the TXT answer):',
			`  dig @127.0.0.1 -p ${port} -b 127.0.0.7 example.com TXT +short`,
			`  dig @127.0.0.1 -p ${port} -b 127.0.0.8 example.com TXT +short`,
			`  dig @127.0.0.1 -p ${port} -b 127.0.0.7 big.example.com A +tcp`,
			`  npx --no-install balstat -S ${statsSocket}`,
			`  kill -HUP ${children[children.length - 1].pid}    # rescan ${dir} now`,
			'demo: Ctrl-C stops everything.',
			'',
		].join('\n'));
	}
});
