/*
 * The service files: the SMF manifest (smf/manifests/bbal.xml) and the
 * systemd unit (systemd/bbal.service).
 *
 * Neither file runs on the machine that tests it, so these tests read them
 * the way their service managers would and check what a mistake would cost
 * in production: a balancer started as root or without the privilege to
 * bind port 53, pointed at the wrong socket directory, given a flag bbal
 * does not have, stopped by something other than SIGTERM, or started in a
 * way its service model does not allow (a foreground command under SMF's
 * contract model never lets the start method return).
 *
 * The manifest is checked by xmllint when it is installed -- well-formed,
 * and valid against the SMF DTD kept beside the project in
 * ../shared/smf/service_bundle.dtd.1 -- and otherwise those two points are
 * skipped.  Everything else is done here with a small tag parser (enough
 * XML for a manifest: elements, attributes, comments, no entities beyond
 * the five predefined) and a small INI reader for the unit, so the tests
 * need no new dependency.  The command lines of both files go through bbal's
 * own parseArgs, so a flag that bbal renames or drops fails here first.
 */

import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import t from 'tap';
import { parseArgs } from '../src/options.js';
import { isInside } from '../src/stats.js';
import { DEFAULT_MAX_TCP_CONNECTIONS, TCP_DRAIN_MS } from '../src/tcp_listener.js';

/* This file runs as dist/test/service_files.test.js: the repository is two up. */
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const manifestPath = path.join(root, 'smf', 'manifests', 'bbal.xml');
const unitPath = path.join(root, 'systemd', 'bbal.service');
const dtdPath = path.resolve(root, '..', 'shared', 'smf', 'service_bundle.dtd.1');

const SOCKET_DIR = '/var/run/binder/sockets';
const ILLUMOS_DTD = '/usr/share/lib/xml/dtd/service_bundle.dtd.1';

/* ---- a command line, as sh (SMF) or systemd would split it ---- */

/* Words of a command line: whitespace-separated, with '...' and "..." quoting. */
function splitCommand(cmd: string): string[] {
	const words: string[] = [];
	const re = /"((?:[^"\\]|\\.)*)"|'([^']*)'|(\S+)/g;
	let m: RegExpExecArray | null;
	while ((m = re.exec(cmd)) !== null) {
		words.push(m[1] !== undefined ? m[1].replace(/\\(.)/g, '$1') : (m[2] ?? m[3] ?? ''));
	}
	return words;
}

interface Command {
	program: string;
	args: string[];
	background: boolean;
}

/* A start command: the program, its arguments, and whether it ends in "&". */
function parseCommand(cmd: string): Command {
	let text = cmd.trim();
	const background = /(^|[^&])&$/.test(text);
	if (background) {
		text = text.slice(0, -1);
	}
	const [program = '', ...args] = splitCommand(text);
	/* systemd's prefixes: - @ : + ! !! */
	return { program: program.replace(/^[-@:+!]+/, ''), args, background };
}

/* ---- a manifest, as a tree of elements ---- */

interface XmlElement {
	name: string;
	attrs: Record<string, string>;
	children: XmlElement[];
	text: string;
}

function decodeEntities(s: string): string {
	return s.replace(/&(amp|lt|gt|quot|apos|#\d+|#x[0-9a-fA-F]+);/g, (_, e: string) => {
		switch (e) {
		case 'amp': return '&';
		case 'lt': return '<';
		case 'gt': return '>';
		case 'quot': return '"';
		case 'apos': return '\'';
		default:
			return String.fromCodePoint(e[1] === 'x' ? parseInt(e.slice(2), 16) : parseInt(e.slice(1), 10));
		}
	});
}

/*
 * Parse the element tree of a manifest.  Throws on anything it does not
 * understand -- a stray '<', a close tag that does not match, a bare '&' --
 * so "it parsed" means something even where xmllint is missing.  Attribute
 * values are normalised as XML requires: each whitespace character becomes
 * a space, which is what turns a wrapped exec="..." into one line.
 */
function parseXml(src: string): { root: XmlElement; doctype: string | null } {
	let rest = src.replace(/^\uFEFF/, '');
	rest = rest.replace(/^\s*<\?xml[^?]*\?>/, '');
	let doctype: string | null = null;
	const dt = /^\s*<!DOCTYPE\s+([^>[]*)>/.exec(rest);
	if (dt !== null) {
		doctype = (dt[1] ?? '').trim();
		rest = rest.slice(dt[0].length);
	}
	const token = /<!--([\s\S]*?)-->|<(\/?)([A-Za-z_][\w:.-]*)((?:\s+[A-Za-z_][\w:.-]*\s*=\s*(?:"[^"<]*"|'[^'<]*'))*)\s*(\/?)>|([^<]+)/gy;
	const top: XmlElement = { name: '#document', attrs: {}, children: [], text: '' };
	const stack: XmlElement[] = [top];
	let m: RegExpExecArray | null;
	while (token.lastIndex < rest.length) {
		const at = token.lastIndex;
		m = token.exec(rest);
		if (m === null) {
			throw new Error(`unparseable XML at: ${JSON.stringify(rest.slice(at, at + 40))}`);
		}
		const cur = stack[stack.length - 1];
		if (m[1] !== undefined) {
			if (m[1].includes('--')) {
				throw new Error('"--" inside a comment');
			}
			continue;
		}
		if (m[6] !== undefined) {
			if (/&(?!(amp|lt|gt|quot|apos|#\d+|#x[0-9a-fA-F]+);)/.test(m[6])) {
				throw new Error(`bare "&" in text: ${JSON.stringify(m[6].trim().slice(0, 40))}`);
			}
			cur.text += decodeEntities(m[6]);
			continue;
		}
		const [, , close, name = '', attrText = '', selfClose] = m;
		if (close === '/') {
			if (cur.name !== name || attrText !== '' || selfClose === '/') {
				throw new Error(`</${name}> closes <${cur.name}>`);
			}
			stack.pop();
			continue;
		}
		const el: XmlElement = { name, attrs: {}, children: [], text: '' };
		const attr = /([A-Za-z_][\w:.-]*)\s*=\s*(?:"([^"]*)"|'([^']*)')/g;
		let a: RegExpExecArray | null;
		while ((a = attr.exec(attrText)) !== null) {
			const raw = a[2] ?? a[3] ?? '';
			if (/&(?!(amp|lt|gt|quot|apos|#\d+|#x[0-9a-fA-F]+);)/.test(raw)) {
				throw new Error(`bare "&" in attribute ${a[1]} of <${name}>`);
			}
			const key = a[1];
			if (key in el.attrs) {
				throw new Error(`attribute ${key} twice on <${name}>`);
			}
			el.attrs[key] = decodeEntities(raw.replace(/[\t\n\r]/g, ' '));
		}
		cur.children.push(el);
		if (selfClose !== '/') {
			stack.push(el);
		}
	}
	if (stack.length !== 1) {
		throw new Error(`<${(stack[stack.length - 1]).name}> is never closed`);
	}
	const elements = top.children;
	if (elements.length !== 1 || top.text.trim() !== '') {
		throw new Error('a document needs exactly one root element');
	}
	return { root: elements[0], doctype };
}

const kids = (el: XmlElement, name: string): XmlElement[] => el.children.filter((c) => c.name === name);

/* ---- a unit file, as sections of keys with (possibly repeated) values ---- */

type Unit = Map<string, Map<string, string[]>>;

function parseUnit(src: string): Unit {
	const unit: Unit = new Map();
	let section: Map<string, string[]> | null = null;
	/* A line ending in a backslash continues on the next one. */
	const lines = src.replace(/\\\r?\n/g, ' ').split(/\r?\n/);
	for (const [i, raw] of lines.entries()) {
		const line = raw.trim();
		if (line === '' || line.startsWith('#') || line.startsWith(';')) {
			continue;
		}
		const head = /^\[([^\]]+)\]$/.exec(line);
		if (head !== null) {
			const name = head[1];
			if (unit.has(name)) {
				throw new Error(`section [${name}] twice`);
			}
			section = new Map();
			unit.set(name, section);
			continue;
		}
		const kv = /^([A-Za-z][A-Za-z0-9]*)\s*=\s*(.*)$/.exec(line);
		if (kv === null || section === null) {
			throw new Error(`line ${i + 1} is neither a section nor Key=Value: ${line}`);
		}
		const key = kv[1];
		section.set(key, [...(section.get(key) ?? []), kv[2]]);
	}
	return unit;
}

/* The effective value of a key: the last assignment wins, as in systemd. */
function last(unit: Unit, section: string, key: string): string | undefined {
	const v = unit.get(section)?.get(key);
	return v === undefined ? undefined : v[v.length - 1];
}

/* A space-separated list key, all assignments joined; "" resets it. */
function list(unit: Unit, section: string, key: string): string[] {
	let out: string[] = [];
	for (const v of unit.get(section)?.get(key) ?? []) {
		out = v.trim() === '' ? [] : [...out, ...v.trim().split(/\s+/)];
	}
	return out;
}

/* systemd's boolean spellings. */
function isYes(v: string | undefined): boolean {
	return v !== undefined && /^(1|yes|true|on)$/i.test(v.trim());
}

/* A systemd time span in seconds: "10", "10s", "1min 30s", "500ms". */
function seconds(v: string): number {
	const units: Record<string, number> = {
		'': 1, s: 1, sec: 1, second: 1, seconds: 1, ms: 0.001, msec: 0.001,
		m: 60, min: 60, minute: 60, minutes: 60, h: 3600, hr: 3600, hour: 3600, hours: 3600,
	};
	let total = 0;
	const re = /(\d+(?:\.\d+)?)\s*([a-z]*)/gy;
	const text = v.trim();
	let m: RegExpExecArray | null;
	while (re.lastIndex < text.length && (m = re.exec(text)) !== null) {
		const u = units[m[2] ?? ''];
		if (u === undefined) {
			return NaN;
		}
		total += Number(m[1]) * u;
		while (text[re.lastIndex] === ' ') {
			re.lastIndex++;
		}
	}
	return re.lastIndex === text.length ? total : NaN;
}

function have(cmd: string): boolean {
	return spawnSync(cmd, ['--version'], { stdio: 'ignore' }).error === undefined;
}

/* ---- the manifest ---- */

const manifestText = readFileSync(manifestPath, 'utf8');
const unitText = readFileSync(unitPath, 'utf8');

t.test('SMF manifest: xmllint', async (t) => {
	const noXmllint = have('xmllint') ? false : 'xmllint is not installed (Debian: libxml2-utils)';
	t.test('well-formed', { skip: noXmllint }, async (t) => {
		const r = spawnSync('xmllint', ['--noout', manifestPath], { encoding: 'utf8' });
		t.equal(r.status, 0, 'xmllint --noout accepts it', { stderr: r.stderr });
	});
	const noDtd = noXmllint || (existsSync(dtdPath) ? false : `no SMF DTD at ${dtdPath}`);
	t.test('valid against the SMF DTD', { skip: noDtd }, async (t) => {
		/* --nowarning: the DOCTYPE names the DTD's illumos path, absent here. */
		const r = spawnSync('xmllint', ['--nowarning', '--noout', '--dtdvalid', dtdPath, manifestPath],
			{ encoding: 'utf8' });
		t.equal(r.status, 0, 'xmllint --dtdvalid accepts it', { stderr: r.stderr });
	});
});

t.test('SMF manifest: the bbal service', async (t) => {
	const { root: bundle, doctype } = parseXml(manifestText);
	t.match(doctype, new RegExp(`^service_bundle\\s+SYSTEM\\s+"${ILLUMOS_DTD.replace(/\./g, '\\.')}"$`),
		'DOCTYPE names the DTD where illumos keeps it');
	t.equal(bundle.name, 'service_bundle', 'root element is service_bundle');
	t.equal(bundle.attrs['type'], 'manifest', 'bundle type is manifest');

	const services = kids(bundle, 'service');
	const svc = services.find((s) => s.attrs['name'] === 'network/bbal');
	if (svc === undefined) {
		t.fail('a service named network/bbal');
		return;
	}
	t.equal(kids(svc, 'create_default_instance').length, 1, 'it creates the default instance');
	t.equal(kids(svc, 'instance').length, 0, 'and no other instance');

	const method = (name: string): XmlElement | undefined =>
		kids(svc, 'exec_method').find((m) => m.attrs['name'] === name && m.attrs['type'] === 'method');
	const start = method('start');
	const stop = method('stop');
	const refresh = method('refresh');
	if (start === undefined || stop === undefined) {
		t.fail('start and stop methods exist');
		return;
	}

	const cmd = parseCommand(start.attrs['exec'] ?? '');
	t.equal(path.basename(cmd.program), 'bbal', `start runs bbal (${cmd.program})`);
	t.ok(path.isAbsolute(cmd.program), 'by absolute path (SMF\'s PATH is only /usr/sbin:/usr/bin)');
	const opts = parseArgs(cmd.args, {});
	t.equal(opts?.socketDir, SOCKET_DIR, `start passes -s ${SOCKET_DIR}`);
	t.equal(opts?.port, 53, 'and listens on port 53');

	/*
	 * Under the contract model (the default) svc.startd waits for the start
	 * method to exit, so a program that stays in the foreground must be put
	 * in the background; under the child ("wait") model it must not be.
	 */
	const durations = kids(svc, 'property_group').filter((pg) => pg.attrs['name'] === 'startd')
		.flatMap((pg) => kids(pg, 'propval')).filter((p) => p.attrs['name'] === 'duration');
	const duration = durations[durations.length - 1]?.attrs['value'] ?? 'contract';
	t.not(duration, 'transient', 'bbal is a long-running service, not transient');
	t.equal(cmd.background, duration === 'contract',
		`start ${cmd.background ? 'ends' : 'does not end'} in "&" under the ${duration} model`);

	/* Credentials: on the start method, or else service-wide. */
	const cred = [start, svc].flatMap((el) => kids(el, 'method_context'))
		.flatMap((mc) => kids(mc, 'method_credential'))[0];
	t.equal(cred?.attrs['user'], 'nobody', 'start runs as nobody');
	const privs = (cred?.attrs['privileges'] ?? '').split(',').map((p) => p.trim());
	t.ok(privs.includes('net_privaddr'), `privileges include net_privaddr (${privs.join(',')})`);
	t.notOk(privs.some((p) => p === 'all' || p === 'zone'), 'and not all privileges');

	t.equal(stop.attrs['exec'], ':kill', 'stop is :kill (SIGTERM, a graceful stop)');
	/* svcadm refresh: a takeover with the installed bbal (issue 14), with start's flags and --reload. */
	const re = parseCommand(refresh?.attrs['exec'] ?? '');
	t.equal(re.program, cmd.program, 'refresh runs the installed bbal');
	t.same(re.args, [...cmd.args, '--reload'], 'with the start method\'s flags and --reload');
	t.notOk(re.background, 'in the foreground: the method ends when the successor has taken over (or not)');
	t.equal(parseArgs(re.args, {})?.reload, true, 'a command line bbal takes');
	const reCred = kids(refresh ?? svc, 'method_context').flatMap((mc) => kids(mc, 'method_credential'))[0];
	t.equal(reCred?.attrs['user'], 'nobody', 'as nobody: the control socket is its owner\'s alone');

	const deps = kids(svc, 'dependency');
	const required = (re: RegExp): boolean => deps.some((d) => d.attrs['grouping'] === 'require_all'
		&& kids(d, 'service_fmri').some((f) => re.test(f.attrs['value'] ?? '')));
	t.ok(required(/^svc:\/milestone\/network(:default)?$/), 'requires svc:/milestone/network');
	t.ok(required(/^svc:\/system\/filesystem\/local(:default)?$/), 'requires svc:/system/filesystem/local');

	/*
	 * The stats socket's directory: /var/run is root's and emptied at boot,
	 * so a required service must make it before bbal starts.
	 */
	const statsSocket = opts?.statsSocket ?? '';
	t.notOk(isInside(statsSocket, SOCKET_DIR), 'the stats socket is not among the backend sockets');
	if (opts?.statsSocketExplicit === true) {
		const statsDir = path.dirname(statsSocket);
		const maker = services.find((s) => s !== svc
			&& kids(s, 'exec_method').some((m) => m.attrs['name'] === 'start'
				&& (m.attrs['exec'] ?? '').includes(statsDir)));
		t.ok(maker !== undefined, `a service in the bundle makes ${statsDir}`);
		t.ok(maker !== undefined && required(new RegExp(`^svc:/${maker.attrs['name']}(:default)?$`)),
			'and bbal requires it');
	}

	const template = kids(svc, 'template')[0];
	t.ok(template !== undefined && kids(template, 'common_name').length === 1, 'has a template with a common_name');
});

/* ---- the unit ---- */

t.test('systemd unit', async (t) => {
	const unit = parseUnit(unitText);
	t.same([...unit.keys()].sort(), ['Install', 'Service', 'Unit'], 'sections [Unit], [Service], [Install]');

	const execStarts = unit.get('Service')?.get('ExecStart') ?? [];
	t.equal(execStarts.length, 1, 'one ExecStart');
	const cmd = parseCommand(execStarts[0] ?? '');
	t.equal(path.basename(cmd.program), 'bbal', `ExecStart runs bbal (${cmd.program})`);
	t.notOk(cmd.background, 'in the foreground');
	const opts = parseArgs(cmd.args, {});
	t.equal(opts?.socketDir, SOCKET_DIR, `ExecStart passes -s ${SOCKET_DIR}`);

	const user = last(unit, 'Service', 'User');
	const dynamic = isYes(last(unit, 'Service', 'DynamicUser'));
	t.ok(user === 'nobody' || (dynamic && user !== 'root'),
		`runs as nobody or a dynamic user (User=${user ?? '(unset)'}, DynamicUser=${dynamic ? 'yes' : 'no'})`);
	t.ok(list(unit, 'Service', 'AmbientCapabilities').includes('CAP_NET_BIND_SERVICE'),
		'AmbientCapabilities includes CAP_NET_BIND_SERVICE');
	t.same(list(unit, 'Service', 'CapabilityBoundingSet'), ['CAP_NET_BIND_SERVICE'],
		'CapabilityBoundingSet is CAP_NET_BIND_SERVICE alone');
	t.ok(isYes(last(unit, 'Service', 'NoNewPrivileges')), 'NoNewPrivileges=yes');
	t.equal(last(unit, 'Service', 'Restart'), 'on-failure', 'Restart=on-failure');

	/* systemctl reload: a takeover (issue 14); systemd follows the new main process it announces. */
	t.equal(last(unit, 'Service', 'Type'), 'notify', 'Type=notify: bbal says READY=1, and MAINPID= after a takeover');
	t.equal(last(unit, 'Service', 'NotifyAccess'), 'all', 'NotifyAccess=all: the successor is not the main process yet');
	const reload = parseCommand(last(unit, 'Service', 'ExecReload') ?? '');
	t.equal(reload.program, cmd.program, 'ExecReload runs the installed bbal');
	t.same(reload.args, [...cmd.args, '--reload'], 'with ExecStart\'s flags and --reload');
	const killSignal = last(unit, 'Service', 'KillSignal');
	t.ok(killSignal === undefined || /^(SIG)?TERM$/.test(killSignal), 'stops with SIGTERM');
	const stopSecs = seconds(last(unit, 'Service', 'TimeoutStopSec') ?? '90');
	t.ok(stopSecs > TCP_DRAIN_MS / 1000, `TimeoutStopSec (${stopSecs} s) outlasts the ${TCP_DRAIN_MS / 1000} s TCP drain`);

	/*
	 * Two descriptors per TCP client (client and backend), plus headroom.
	 * The hard limit is the one that counts: node raises its soft limit to
	 * the hard one at startup.
	 */
	const maxTcp = Number(opts?.maxTcpConnections ?? DEFAULT_MAX_TCP_CONNECTIONS);
	const nofile = Number((last(unit, 'Service', 'LimitNOFILE') ?? '').split(':').pop());
	t.ok(nofile >= 2 * maxTcp + 64, `LimitNOFILE (${nofile}) covers 2 x ${maxTcp} TCP connections and more`);

	const runtimeDirs = list(unit, 'Service', 'RuntimeDirectory');
	const statsSocket = opts?.statsSocket ?? '';
	t.ok(runtimeDirs.some((d) => isInside(statsSocket, path.join('/run', d))),
		`the stats socket ${statsSocket} is in the unit's RuntimeDirectory (${runtimeDirs.join(' ')})`);
	/*
	 * dgram's wildcard bind reads the host's addresses with getifaddrs(),
	 * over netlink (udp_dgram.ts): a unit that denies AF_NETLINK breaks it.
	 */
	const families = list(unit, 'Service', 'RestrictAddressFamilies');
	for (const family of ['AF_UNIX', 'AF_INET', 'AF_NETLINK']) {
		t.ok(families.length === 0 || families.includes(family),
			`RestrictAddressFamilies allows ${family} (${families.join(' ') || 'unset'})`);
	}
	t.notOk(isYes(last(unit, 'Service', 'MemoryDenyWriteExecute')),
		'no MemoryDenyWriteExecute (V8\'s JIT needs it off)');

	t.ok(list(unit, 'Unit', 'After').includes('network-online.target'), 'After=network-online.target');
	t.ok(list(unit, 'Install', 'WantedBy').includes('multi-user.target'), 'WantedBy=multi-user.target');
});

t.test('systemd-analyze verify', { skip: have('systemd-analyze') ? false : 'systemd-analyze is not installed' },
	async (t) => {
		/* verify insists the program exists: point a copy at a stand-in. */
		const dir = mkdtempSync(path.join(tmpdir(), 'bbal-unit-'));
		t.teardown(() => rmSync(dir, { recursive: true, force: true }));
		const stand = path.join(dir, 'bbal');
		writeFileSync(stand, '#!/bin/sh\n');
		chmodSync(stand, 0o755);
		const copy = path.join(dir, 'bbal.service');
		writeFileSync(copy, unitText.replace(/^(ExecStart|ExecReload)=\S+/gm, `$1=${stand}`));
		const r = spawnSync('systemd-analyze', ['verify', copy], { encoding: 'utf8', timeout: 30_000 });
		/* It warns about User=nobody (see the unit's header) and still passes. */
		t.equal(r.status, 0, 'systemd-analyze verify accepts it', { stderr: r.stderr });
	});

/* ---- the two together ---- */

t.test('SMF and systemd run the same balancer', async (t) => {
	const { root: bundle } = parseXml(manifestText);
	const svc = kids(bundle, 'service').find((s) => s.attrs['name'] === 'network/bbal');
	const smfExec = svc === undefined ? '' : (kids(svc, 'exec_method')
		.find((m) => m.attrs['name'] === 'start')?.attrs['exec'] ?? '');
	const smf = parseCommand(smfExec);
	const sd = parseCommand(last(parseUnit(unitText), 'Service', 'ExecStart') ?? '');
	t.equal(sd.program, smf.program, `the same installed program (${smf.program})`);
	const a = parseArgs(smf.args, {});
	const b = parseArgs(sd.args, {});
	t.same({ bind: b?.bind, port: b?.port, socketDir: b?.socketDir, logLevel: b?.logLevel },
		{ bind: a?.bind, port: a?.port, socketDir: a?.socketDir, logLevel: a?.logLevel },
		'the same address, port, socket directory and log level');
});
