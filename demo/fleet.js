#!/usr/bin/env node
/*
 * The demo fleet behind `npm start`: three real node-mname backends in a
 * temporary socket directory and bbal in front of them on 127.0.0.1:5353,
 * with its dashboard on http://127.0.0.1:8053/ (BBAL_DEMO_PORT and
 * BBAL_DEMO_HTTP_PORT move them).  bbal serves its stats socket at
 * <dir>.stats.sock for balstat.  So that the dashboard has something to
 * show, a few hosts (127.0.0.10 to .29) ask a handful of names, a few dozen
 * queries a second that rise and fall; BBAL_DEMO_TRAFFIC=0 leaves them out.
 * The packet cache is on (--cache-size 10000 --serve-stale 60): the `svc.`
 * names are answered the way Binder answers (four members, shuffled, TTL
 * 30), so they are cached; the others have TTL 0 and never are.
 * It prints the commands to try, passes bbal's log through, and on Ctrl-C
 * (or SIGTERM) stops every process it started and removes the directory.
 *
 * The backends are the same mname program the integration tests use
 * (test/fixtures/mname_backend.cjs): every answer carries a TXT record
 * "be=<id>" naming the backend that served it, so stickiness is visible.
 */
import { spawn } from 'node:child_process';
import dgram from 'node:dgram';
import { mkdtempSync, rmSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const backendScript = path.join(root, 'test', 'fixtures', 'mname_backend.cjs');
const port = Number(process.env.BBAL_DEMO_PORT ?? 5353);
const httpPort = Number(process.env.BBAL_DEMO_HTTP_PORT ?? 8053);
const traffic = process.env.BBAL_DEMO_TRAFFIC !== '0';
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
const bbalArgs = [path.join(root, 'bin', 'bbal.js'), '-b', '127.0.0.1', '-p', String(port), '-s', dir, '-S', statsSocket,
	'--http', `127.0.0.1:${httpPort}`, '--cache-size', '10000', '--serve-stale', '60'];
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
			`demo: dashboard: http://127.0.0.1:${httpPort}/`,
			'demo: try (each source address sticks to one backend, named in the TXT answer):',
			`  dig @127.0.0.1 -p ${port} -b 127.0.0.7 example.com TXT +short`,
			`  dig @127.0.0.1 -p ${port} -b 127.0.0.8 example.com TXT +short`,
			`  dig @127.0.0.1 -p ${port} -b 127.0.0.7 big.example.com A +tcp`,
			`  dig @127.0.0.1 -p ${port} -b 127.0.0.7 svc.web.example.com A   # cached: run it twice, the TTL goes down`,
			`  npx --no-install balstat -S ${statsSocket}`,
			`  kill -HUP ${children[children.length - 1].pid}    # rescan ${dir} now`,
			traffic ? 'demo: 20 hosts (127.0.0.10-29) send a few queries a second (BBAL_DEMO_TRAFFIC=0: none)' : '',
			'demo: Ctrl-C stops everything.',
			'',
		].join('\n'));
		if (traffic) {
			startTraffic();
		}
	}
});

/*
 * The demo's hosts: one UDP socket per source address, each asking one of a
 * few names now and then, more often in some minutes than in others, so the
 * charts move.  Answers are read and thrown away.  A DNS query is written by
 * hand: a header with RD, one question, class IN.
 */
function query(name, type, id) {
	const labels = name.split('.').map((l) => Buffer.concat([Buffer.from([l.length]), Buffer.from(l)]));
	const header = Buffer.from([id >> 8, id & 255, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
	return Buffer.concat([header, ...labels, Buffer.from([0, 0, type, 0, 1])]);
}

function startTraffic() {
	const names = [['example.com', 16], ['svc.web.example.com', 1], ['svc.api.example.com', 1], ['svc.db.example.com', 1],
		['www.example.com', 1], ['nowhere.example.com', 1]];
	const sockets = [];
	for (let i = 10; i < 30; i++) {
		const sock = dgram.createSocket('udp4');
		sock.on('error', () => {});
		sock.on('message', () => {});
		sock.bind({ address: `127.0.0.${i}`, port: 0 });
		sockets.push(sock);
	}
	const begun = Date.now();
	const timer = setInterval(() => {
		const minute = (Date.now() - begun) / 60_000;
		const perTick = 2 + Math.round(3 * (1 + Math.sin(minute * Math.PI)));
		for (let n = 0; n < perTick; n++) {
			const i = Math.floor(Math.random() ** 2 * sockets.length);
			const [name, type] = names[Math.floor(Math.random() * names.length)];
			sockets[i].send(query(name, type, Math.floor(Math.random() * 65536)), port, '127.0.0.1');
		}
	}, 100);
	process.on('exit', () => clearInterval(timer));
}
