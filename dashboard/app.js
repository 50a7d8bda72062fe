// bbal dashboard: the page bbal serves on --http (the README's Dashboard section has the
// contract: the URLs, and the JSON of the /live stream and of /remote).
//
// One EventSource on /live feeds one `state`: `hello` resets it, `sample`
// appends to the history (at most hello.historySecs), `status` replaces the
// latest state, and `events` go straight into the event list. A message marks
// the page dirty; one render, coalesced on a short timer, then redraws:
//   header     renderHeader()        version, uptime, listen, transport, counts, takeover
//   charts     renderCharts()        five uPlot charts, each described by a spec (series +
//                                    columns); a chart is rebuilt when its series change
//   backends   renderBackendTable()  one row per backend, updated in place
//   remotes    renderDistribution(), renderTalkers(); the search form asks /remote?ip=
// The live/lost indicator follows the EventSource itself (setLive()).
//
// Text from the server goes into the page only through textContent (text
// nodes); styling only through classes and el.style (the CSP forbids inline
// styles and scripts). Sections are in that order below, helpers last.

const CHART_HEIGHT = 160;
const RCODE_WINDOW = 60;
const RENDER_DELAY_MS = 40;
const RECONNECT_MS = 3000;
const RCODE_NAMES = ['ok', 'nx', 'sf', 'ref', 'other'];
const SERVFAIL = 2;
const DROP_ORDER = ['oversize', 'invalid', 'acl', 'no_backend', 'stuck', 'rate_limited', 'send_full', 'tcp'];
const PALETTE = ['#3b82f6', '#f59e0b', '#10b981', '#ec4899', '#8b5cf6', '#06b6d4', '#ef4444', '#84cc16', '#f97316', '#64748b'];
const EVENT_TONES = {
	found: 'info', up: 'good', healthy: 'good', unstuck: 'good', 'fail-open-ended': 'good',
	down: 'bad', fault: 'bad', 'fail-open': 'bad', removed: 'neutral', forgotten: 'neutral',
	sick: 'warn', stuck: 'warn', rebalance: 'info', takeover: 'info',
};
const BACKEND_CELLS = {
	id: (b) => [String(b.id)],
	path: (b) => [{ text: basename(b.path), title: b.path, cls: 'mono' }],
	state: (b) => stateBits(b),
	remotes: (b) => [String(b.remotes)],
	qps: (b, be) => [be ? fmtRate(be.q) : '—'],
	latency: (b, be) => [be && be.p50 != null ? `${fmtMs(be.p50)} / ${fmtMs(be.p99)}` : '—'],
	rcodes: (b, be, totals) => rcodeBits(totals),
	outstanding: (b) => [String(b.outstanding)],
	stuck: (b) => [b.stuck ? { text: 'stuck', cls: 'badge warn' } : '—'],
	faults: (b) => [String(b.faults)],
	fault: (b) => faultBits(b.lastFault),
};
const NUMERIC_CELLS = new Set(['id', 'remotes', 'qps', 'latency', 'outstanding', 'faults']);

const state = {
	hello: null, // the last hello
	samples: [], // the history, oldest first; each with byId: Map backend id → its `be` entry
	status: null, // the last status
	clockSkew: 0, // status.t − Date.now() when it came: "ago" is measured on the server's clock
	lastSeq: -1, // the newest event shown
	paths: new Map(), // backend id → socket path, for every backend seen since hello
};
const charts = new Map(); // container id → { plot, key }
const filled = new WeakMap(); // element → the key of what fill() last put in it
let theme = null;
let renderPending = false;
let searchSeq = 0;

// ---- start -----------------------------------------------------------------

function start() {
	theme = readTheme();
	window.matchMedia('(prefers-color-scheme: dark)').addEventListener('change', onSchemeChange);
	$('search').addEventListener('submit', onSearch);
	$('talkers').addEventListener('click', onTalkerClick);
	watchChartSizes();
	connect();
}

function onSchemeChange() {
	theme = readTheme();
	destroyCharts();
	render();
}

// ---- the /live stream ------------------------------------------------------

function connect() {
	const source = new EventSource('live');
	source.addEventListener('open', () => setLive('live'));
	source.addEventListener('error', () => {
		setLive('lost');
		// EventSource retries by itself unless the server refused it outright.
		if (source.readyState === EventSource.CLOSED) setTimeout(connect, RECONNECT_MS);
	});
	listen(source, 'hello', onHello);
	listen(source, 'sample', onSample);
	listen(source, 'events', showEvents);
	listen(source, 'status', onStatus);
}

function listen(source, name, handler) {
	source.addEventListener(name, (message) => {
		let data;
		try {
			data = JSON.parse(message.data);
		} catch {
			console.warn(`bbal: /live sent a ${name} that is not JSON`);
			return;
		}
		handler(data);
	});
}

function setLive(connection) {
	const el = $('live');
	el.dataset.state = connection;
	el.textContent = connection;
	document.body.dataset.live = connection;
}

function onHello(hello) {
	state.hello = hello;
	state.samples = [];
	state.lastSeq = -1;
	state.paths.clear();
	$('events').replaceChildren();
	scheduleRender();
}

function onSample(sample) {
	sample.byId = new Map((sample.be ?? []).map((be) => [be.id, be]));
	state.samples.push(sample);
	const excess = state.samples.length - historySecs();
	if (excess > 0) state.samples.splice(0, excess);
	scheduleRender();
}

function onStatus(status) {
	state.status = status;
	state.clockSkew = status.t - Date.now();
	for (const b of status.backends) state.paths.set(b.id, b.path);
	scheduleRender();
}

function historySecs() {
	return state.hello?.historySecs ?? 900;
}

function scheduleRender() {
	if (renderPending) return;
	renderPending = true;
	setTimeout(() => {
		renderPending = false;
		render();
	}, RENDER_DELAY_MS);
}

function render() {
	renderHeader();
	renderCharts();
	renderBackendTable();
	renderDistribution();
	renderTalkers();
}

// ---- header ----------------------------------------------------------------

function renderHeader() {
	const { hello, status } = state;
	if (hello) {
		setText($('hdr-version'), `v${hello.version}`);
		setText($('hdr-listen'), hostPort(hello.listen.address, hello.listen.port));
		setText($('hdr-transport'), hello.transport);
		document.title = `bbal ${hostPort(hello.listen.address, hello.listen.port)}`;
	}
	if (!status) return;
	setText($('hdr-uptime'), fmtDuration(status.uptimeSecs));
	setText($('hdr-remotes'), `${fmtInt(status.remotes)} / ${fmtInt(status.maxRemotes)}`);
	setText($('hdr-tcp'), fmtInt(status.tcpOpen));
	$('hdr-fail-open').hidden = !status.failOpen;
	renderBackendCounts(status.backends);
	renderTakeover(status.takeover);
	renderCache(status.cache);
}

// The packet cache (--cache-size): its hit rate over the last 60 samples and what it holds.
function renderCache(cache) {
	$('hdr-cache-item').hidden = !cache;
	if (!cache) return;
	let hits = 0;
	let asked = 0;
	for (const s of state.samples.slice(-RCODE_WINDOW)) {
		hits += s.cache?.hits ?? 0;
		asked += (s.cache?.hits ?? 0) + (s.cache?.misses ?? 0);
	}
	const rate = asked > 0 ? `${Math.round((100 * hits) / asked)}% hits` : 'no queries';
	setText($('hdr-cache'), `${rate} · ${fmtInt(cache.entries)} entries`);
}

function renderBackendCounts(backends) {
	const counts = { up: 0, sick: 0, down: 0 };
	for (const b of backends) counts[upSickDown(b)]++;
	const el = $('hdr-backends');
	for (const [name, n] of Object.entries(counts)) el.dataset[name] = String(n);
	fill(el, [
		{ text: `${counts.up} up`, cls: counts.up ? 'good' : '' }, ' · ',
		{ text: `${counts.sick} sick`, cls: counts.sick ? 'warn' : '' }, ' · ',
		{ text: `${counts.down} down`, cls: counts.down ? 'bad' : '' },
	]);
}

function renderTakeover(takeover) {
	const el = $('takeover');
	el.hidden = !takeover;
	if (!takeover) return;
	setText(el, `Took over from pid ${takeover.fromPid} (v${takeover.fromVersion}) at ${fmtDateTime(takeover.at)}`
		+ ` (${ago(takeover.at)}): ${fmtInt(takeover.remotes)} remotes carried over, ${fmtInt(takeover.remotesChanged)} moved.`);
}

// ---- charts ----------------------------------------------------------------

function renderCharts() {
	const samples = state.samples;
	const el = $('chart-queries');
	el.dataset.rx = String(samples.at(-1)?.rx ?? 0);
	el.dataset.points = String(samples.length);
	if (typeof uPlot === 'undefined') {
		$('charts-missing').hidden = false;
		return;
	}
	const xs = samples.map((s) => s.t / 1000);
	for (const spec of chartSpecs(samples)) drawChart(spec, xs);
}

function chartSpecs(samples) {
	const specs = [queriesChart, dropsChart, synthChart, backendQpsChart, backendLatencyChart];
	const cached = samples.some((s) => s.cache);
	$('cache-panel').hidden = !cached;
	if (cached) specs.push(cacheChart);
	return specs.map((spec) => spec(samples));
}

function cacheChart(samples) {
	return {
		id: 'chart-cache',
		key: 'cache',
		series: [line('hits', PALETTE[2]), line('misses', PALETTE[1]), line('stale', PALETTE[6])],
		columns: [column(samples, (s) => s.cache?.hits ?? 0), column(samples, (s) => s.cache?.misses ?? 0),
			column(samples, (s) => s.cache?.stale ?? 0)],
	};
}

function queriesChart(samples) {
	return {
		id: 'chart-queries',
		key: 'queries',
		series: [
			line('received', PALETTE[0]),
			line('answered', PALETTE[2]),
			line('tcp conn', 'rgba(100, 116, 139, 0.65)', { scale: 'tcp', width: 1 }), // quieter: a second axis
		],
		columns: [column(samples, (s) => s.rx), column(samples, (s) => s.tx), column(samples, (s) => s.tcp)],
		scales: { tcp: { range: fromZero } },
		axes: [valueAxis('y'), valueAxis('tcp', { side: 1, size: 36, grid: { show: false } })],
	};
}

function dropsChart(samples) {
	const reasons = dropReasonsSeen(samples);
	return {
		id: 'chart-drops',
		key: `drops:${reasons.join()}`,
		series: [line('total', theme.muted, { dash: [4, 3], width: 1 }), ...reasons.map((r) => line(r, dropColour(r)))],
		columns: [column(samples, sumDrops), ...reasons.map((r) => column(samples, (s) => s.drop?.[r] ?? 0))],
	};
}

function synthChart(samples) {
	return {
		id: 'chart-synth',
		key: 'synth',
		series: [line('SERVFAIL', PALETTE[6]), line('REFUSED', PALETTE[1])],
		columns: [column(samples, (s) => s.synth?.servfail ?? 0), column(samples, (s) => s.synth?.refused ?? 0)],
	};
}

function backendQpsChart(samples) {
	const ids = backendIdsSeen(samples);
	return {
		id: 'chart-backend-qps',
		key: `qps:${ids.map(backendLabel).join()}`,
		series: ids.map((id) => line(backendLabel(id), backendColour(id))),
		columns: ids.map((id) => column(samples, (s) => s.byId.get(id)?.q ?? null)),
	};
}

function backendLatencyChart(samples) {
	const ids = backendIdsSeen(samples);
	const latency = (id, p) => column(samples, (s) => positive(s.byId.get(id)?.[p]));
	return {
		id: 'chart-backend-latency',
		key: `latency:${ids.join()}`,
		series: ids.flatMap((id) => [
			line(`#${id} p50`, backendColour(id), { dash: [3, 3], width: 1, value: legendValue(fmtMs) }),
			line(`#${id} p99`, backendColour(id), { value: legendValue(fmtMs) }),
		]),
		columns: ids.flatMap((id) => [latency(id, 'p50'), latency(id, 'p99')]),
		scales: { y: { distr: 3, log: 10, range: logRange } },
		axes: [valueAxis('y', { splits: decades })],
	};
}

function drawChart(spec, xs) {
	const target = $(spec.id);
	const data = [xs, ...spec.columns];
	let chart = charts.get(spec.id);
	if (chart && chart.key !== spec.key) {
		chart.plot.destroy();
		chart = null;
	}
	if (chart) {
		chart.plot.setData(data);
		return;
	}
	const plot = new uPlot(chartOptions(spec, target.clientWidth), data, target);
	charts.set(spec.id, { plot, key: spec.key });
}

function chartOptions(spec, width) {
	return {
		width: Math.max(200, Math.floor(width)),
		height: CHART_HEIGHT,
		cursor: { drag: { x: false, y: false, setScale: false } }, // no zooming: the window slides every second
		legend: { live: true },
		scales: { x: { time: true, range: slidingWindow }, y: { range: fromZero }, ...spec.scales },
		axes: [timeAxis(), ...(spec.axes ?? [valueAxis('y')])],
		series: [{ label: 'time', value: legendValue((secs) => fmtClock(secs * 1000)) }, ...spec.series],
	};
}

function destroyCharts() {
	for (const chart of charts.values()) chart.plot.destroy();
	charts.clear();
}

function watchChartSizes() {
	const observer = new ResizeObserver((entries) => {
		for (const entry of entries) {
			const plot = charts.get(entry.target.id)?.plot;
			const width = Math.floor(entry.contentRect.width);
			if (plot && width > 0 && width !== plot.width) plot.setSize({ width, height: CHART_HEIGHT });
		}
	});
	for (const el of document.querySelectorAll('.plot')) observer.observe(el);
}

function line(label, stroke, extra = {}) {
	return { label, stroke, width: 1.5, points: { show: false }, value: legendValue(fmtRate), ...extra };
}

// The legend shows the hovered second, or the latest one when the cursor is elsewhere.
function legendValue(format) {
	return (u, value, seriesIdx, idx) => format(idx == null ? u.data[seriesIdx].at(-1) : value);
}

function timeAxis() {
	return {
		...axisColours(),
		size: 26,
		space: 60,
		incrs: [10, 15, 30, 60, 120, 180, 300, 600, 900, 1800, 3600],
		values: (u, splits, axisIdx, space, incr) => splits.map((secs) => fmtClock(secs * 1000, incr < 60)),
	};
}

function valueAxis(scale, extra = {}) {
	return { ...axisColours(), scale, size: 44, values: (u, splits) => splits.map(fmtAxis), ...extra };
}

function axisColours() {
	return {
		stroke: theme.muted,
		font: theme.axisFont,
		grid: { stroke: theme.grid, width: 1 },
		ticks: { stroke: theme.grid, width: 1, size: 4 },
	};
}

function slidingWindow(u, min, max) {
	const end = max ?? Date.now() / 1000;
	return [end - historySecs(), end];
}

function fromZero(u, min, max) {
	return [0, max > 0 ? max * 1.1 : 1];
}

function logRange(u, min, max) {
	return min > 0 && max > 0 ? uPlot.rangeLog(min, max, 10, true) : [0.1, 10];
}

// Grid lines at 0.1, 1, 10, … only: a log axis' default 2…9 lines crowd a short chart.
function decades(u, axisIdx, min, max) {
	const splits = [];
	for (let e = Math.ceil(Math.log10(min) - 1e-9); 10 ** e <= max * (1 + 1e-9); e++) splits.push(+(10 ** e).toPrecision(1));
	return splits;
}

function column(samples, pick) {
	return samples.map(pick);
}

function dropReasonsSeen(samples) {
	const seen = new Set();
	for (const s of samples) {
		for (const [reason, rate] of Object.entries(s.drop ?? {})) if (rate > 0) seen.add(reason);
	}
	return [...seen].sort((a, b) => dropRank(a) - dropRank(b) || a.localeCompare(b));
}

function dropRank(reason) {
	const rank = DROP_ORDER.indexOf(reason);
	return rank < 0 ? DROP_ORDER.length : rank;
}

function dropColour(reason) {
	return PALETTE[dropRank(reason) % PALETTE.length];
}

function sumDrops(sample) {
	return Object.values(sample.drop ?? {}).reduce((a, b) => a + b, 0);
}

function backendIdsSeen(samples) {
	const ids = new Set();
	for (const s of samples) for (const id of s.byId.keys()) ids.add(id);
	return [...ids].sort((a, b) => a - b);
}

function backendColour(id) {
	const n = PALETTE.length;
	return PALETTE[(((id - 1) % n) + n) % n];
}

function backendLabel(id) {
	if (id == null) return 'none';
	const path = state.paths.get(id);
	return path ? `#${id} ${basename(path)}` : `#${id}`;
}

// ---- backend table ---------------------------------------------------------

function renderBackendTable() {
	const tbody = $('backends').tBodies[0];
	const backends = state.status?.backends ?? [];
	const recent = state.samples.slice(-RCODE_WINDOW);
	const latest = state.samples.at(-1);
	const old = new Map([...tbody.rows].map((row) => [row.dataset.backend, row]));
	backends.forEach((b, i) => {
		const row = old.get(String(b.id)) ?? backendRow(b.id);
		old.delete(String(b.id));
		updateBackendRow(row, b, latest?.byId.get(b.id), rcodeTotals(recent, b.id));
		if (tbody.rows[i] !== row) tbody.insertBefore(row, tbody.rows[i] ?? null);
	});
	for (const row of old.values()) row.remove();
	$('backends-empty').hidden = backends.length > 0;
}

function backendRow(id) {
	const row = h('tr', { 'data-backend': String(id) });
	for (const col of Object.keys(BACKEND_CELLS)) row.append(h('td', { 'data-col': col, class: NUMERIC_CELLS.has(col) ? 'num' : '' }));
	return row;
}

function updateBackendRow(row, b, be, totals) {
	row.dataset.up = String(b.ok);
	row.dataset.health = b.health;
	row.classList.toggle('down', !b.ok);
	Object.values(BACKEND_CELLS).forEach((bits, i) => fill(row.cells[i], bits(b, be, totals)));
}

function upSickDown(b) {
	if (!b.ok) return 'down';
	return b.health === 'sick' ? 'sick' : 'up';
}

function stateBits(b) {
	const badge = upSickDown(b);
	const tone = { up: 'good', sick: 'warn', down: 'bad' }[badge];
	const notes = [b.state === 'ok' ? null : b.state, b.health === 'sick' ? b.healthReason : null, b.removed ? 'removed' : null];
	const note = notes.filter(Boolean).join(' · ');
	return [{ text: badge, cls: `badge ${tone}` }, ...(note ? [' ', { text: note, cls: 'muted' }] : [])];
}

function rcodeTotals(samples, id) {
	const totals = [0, 0, 0, 0, 0];
	for (const s of samples) {
		const answers = s.byId.get(id)?.a ?? [];
		answers.forEach((n, i) => { totals[i] += n; });
	}
	return totals;
}

function rcodeBits(totals) {
	const sum = totals.reduce((a, b) => a + b, 0);
	if (sum === 0) return ['—'];
	const bits = [];
	totals.forEach((n, i) => {
		if (n === 0 && i !== 0) return;
		if (bits.length) bits.push(' · ');
		const text = `${fmtShare(n / sum)} ${RCODE_NAMES[i]}`;
		bits.push(i === SERVFAIL ? { text, cls: 'servfail', title: 'SERVFAIL' } : text);
	});
	return bits;
}

function faultBits(fault) {
	if (!fault) return ['—'];
	return [{ text: fault.reason, title: fmtDateTime(fault.at) }, { text: ` · ${ago(fault.at)}`, cls: 'muted' }];
}

// ---- remotes -----------------------------------------------------------------

function renderDistribution() {
	const box = $('distribution');
	const backends = state.status?.backends ?? [];
	const most = Math.max(1, ...backends.map((b) => b.remotes));
	const total = backends.reduce((sum, b) => sum + b.remotes, 0);
	const key = JSON.stringify(backends.map((b) => [b.id, b.path, b.remotes, b.ok]));
	if (filled.get(box) === key) return;
	filled.set(box, key);
	box.replaceChildren(...backends.map((b) => distributionRow(b, most, total)));
}

function distributionRow(b, most, total) {
	const bar = h('div', { class: b.ok ? 'dist-bar' : 'dist-bar down' });
	bar.style.width = `${(100 * b.remotes) / most}%`;
	return h('div', { class: 'dist', 'data-backend': String(b.id) },
		h('span', { class: 'dist-name', title: b.path, text: backendLabel(b.id) }),
		h('div', { class: 'dist-track' }, bar),
		h('span', { class: 'dist-count', text: fmtInt(b.remotes) }, h('span', { class: 'muted', text: ` ${fmtShare(b.remotes / (total || 1))}` })),
	);
}

function renderTalkers() {
	const tbody = $('talkers').tBodies[0];
	const talkers = state.status?.talkers;
	const key = JSON.stringify([talkers, talkers?.map((t) => backendLabel(t.backend))]);
	if (filled.get(tbody) === key) return;
	filled.set(tbody, key);
	if (!talkers?.length) {
		const note = talkers ? 'no queries' : 'measuring…';
		tbody.replaceChildren(h('tr', {}, h('td', { colSpan: 3, class: 'muted', text: note })));
		return;
	}
	tbody.replaceChildren(...talkers.map(talkerRow));
}

function talkerRow(talker) {
	return h('tr', { 'data-ip': talker.ip },
		h('td', {}, h('button', { type: 'button', class: 'link mono', title: 'look it up', text: talker.ip, 'data-ip': talker.ip })),
		h('td', {}, h('span', { class: 'clip', title: state.paths.get(talker.backend), text: backendLabel(talker.backend) })),
		h('td', { class: 'num', text: fmtRate(talker.qps) }),
	);
}

// One listener for the table, whose rows are replaced every second.
function onTalkerClick(event) {
	const ip = event.target.closest('button[data-ip]')?.dataset.ip;
	if (!ip) return;
	$('search-ip').value = ip;
	lookUpRemote(ip);
}

function onSearch(event) {
	event.preventDefault();
	const ip = $('search-ip').value.trim();
	if (ip) lookUpRemote(ip);
}

async function lookUpRemote(ip) {
	const mine = ++searchSeq;
	showSearchResult(null, [{ text: `looking up ${ip}…`, cls: 'muted' }]);
	let response;
	let body;
	try {
		response = await fetch(`remote?ip=${encodeURIComponent(ip)}`, { headers: { accept: 'application/json' } });
		body = await response.json();
	} catch (err) {
		if (mine === searchSeq) showSearchResult(false, [{ text: `${ip}: ${response ? 'bad answer' : err.message}`, cls: 'bad' }]);
		return;
	}
	if (mine !== searchSeq) return;
	// A remote not held is a 200 {"held":false}: a 4xx would be logged by the browser as an error.
	if (response.ok && body?.held === false) showSearchResult(false, [{ text: ip, cls: 'mono' }, ' is not held']);
	else if (response.ok) showRemote(body);
	else showSearchResult(false, [{ text: `${ip}: ${body?.error ?? response.statusText}`, cls: 'bad' }]);
}

function showRemote(remote) {
	const s = remote.stats ?? {};
	const rows = [
		['backend', backendRef(remote.backend)],
		['backup', backendRef(remote.backup)],
		['queries', [`udp ${fmtInt(s.udp)} · tcp ${fmtInt(s.tcp)}`]],
		['dropped', [`udp ${fmtInt(s.udpDrop)} · tcp ${fmtInt(s.tcpDrop)} · invalid ${fmtInt(s.udpInvalid)}`
			+ ` · rate-limited ${fmtInt(s.rateLimited)}`]],
		['first seen', seenBits(remote.firstSeen)],
		['last seen', seenBits(remote.lastSeen)],
	];
	const list = h('dl', {}, ...rows.flatMap(([name, bits]) => [h('dt', { text: name }), h('dd', {}, ...bits.map(bitNode))]));
	showSearchResult(true, [{ text: remote.ip, cls: 'mono strong' }], remote.backend ? String(remote.backend.id) : 'none');
	$('search-result').append(list);
}

function showSearchResult(found, bits, backend) {
	const out = $('search-result');
	out.hidden = false;
	if (found == null) delete out.dataset.found;
	else out.dataset.found = String(found);
	if (backend == null) delete out.dataset.backend;
	else out.dataset.backend = backend;
	out.replaceChildren(h('p', {}, ...bits.map(bitNode)));
}

function backendRef(backend) {
	return backend ? [`#${backend.id} `, { text: backend.path, cls: 'mono' }] : [{ text: 'none', cls: 'muted' }];
}

function seenBits(iso) {
	return iso ? [fmtDateTime(iso), { text: ` · ${ago(iso)}`, cls: 'muted' }] : ['—'];
}

// ---- events ------------------------------------------------------------------

function showEvents(events) {
	const list = $('events');
	for (const event of events) {
		if (event.seq <= state.lastSeq) continue;
		state.lastSeq = event.seq;
		list.prepend(eventItem(event));
	}
	const max = state.hello?.maxEvents ?? 256;
	while (list.children.length > max) list.lastElementChild.remove();
	$('events-empty').hidden = list.children.length > 0;
}

function eventItem(event) {
	return h('li', { 'data-kind': event.kind, 'data-seq': String(event.seq) },
		h('time', { text: fmtClock(event.t), title: fmtDateTime(event.t) }),
		h('span', { class: `badge ${EVENT_TONES[event.kind] ?? 'neutral'}`, text: event.kind }),
		h('span', { class: 'event-text', text: event.text }),
	);
}

// ---- helpers -----------------------------------------------------------------

function $(id) {
	return document.getElementById(id);
}

// h('td', { class, text, title, 'data-x': … }, ...children): children are nodes or strings (text nodes).
function h(tag, props, ...children) {
	const node = document.createElement(tag);
	for (const [name, value] of Object.entries(props)) {
		if (value == null || value === '') continue;
		if (name === 'class') node.className = value;
		else if (name === 'text') node.textContent = value;
		else if (name.startsWith('data-')) node.setAttribute(name, value);
		else node[name] = value;
	}
	node.append(...children);
	return node;
}

// A "bit" is a string (a text node) or { text, cls, title } (a span).
function bitNode(bit) {
	return typeof bit === 'string' ? document.createTextNode(bit) : h('span', { class: bit.cls, title: bit.title, text: bit.text });
}

// Replaces the element's content with these bits unless it already shows them.
function fill(el, bits) {
	const key = JSON.stringify(bits);
	if (filled.get(el) === key) return;
	filled.set(el, key);
	el.replaceChildren(...bits.map(bitNode));
}

function setText(el, text) {
	if (el.textContent !== text) el.textContent = text;
}

function readTheme() {
	const css = getComputedStyle(document.documentElement);
	const value = (name) => css.getPropertyValue(name).trim();
	return { muted: value('--muted'), grid: value('--grid'), axisFont: `11px ${value('--font')}` };
}

function basename(path) {
	return path ? path.slice(path.lastIndexOf('/') + 1) : '';
}

function hostPort(address, port) {
	return address.includes(':') ? `[${address}]:${port}` : `${address}:${port}`;
}

function positive(value) {
	return value == null ? null : Math.max(value, 0.001);
}

function serverNow() {
	return Date.now() + state.clockSkew;
}

function ago(time) {
	return `${fmtDuration((serverNow() - new Date(time).getTime()) / 1000)} ago`;
}

function fmtDuration(secs) {
	const s = Math.max(0, Math.floor(secs));
	const [d, hr, m, sec] = [Math.floor(s / 86400), Math.floor((s % 86400) / 3600), Math.floor((s % 3600) / 60), s % 60];
	if (d) return `${d}d ${hr}h`;
	if (hr) return `${hr}h ${m}m`;
	if (m) return `${m}m ${sec}s`;
	return `${sec}s`;
}

function fmtClock(time, withSeconds = true) {
	const date = new Date(time);
	const parts = [date.getHours(), date.getMinutes(), ...(withSeconds ? [date.getSeconds()] : [])];
	return parts.map((n) => String(n).padStart(2, '0')).join(':');
}

function fmtDateTime(time) {
	const date = new Date(time);
	const day = [date.getFullYear(), date.getMonth() + 1, date.getDate()].map((n) => String(n).padStart(2, '0')).join('-');
	return `${day} ${fmtClock(date)}`;
}

function fmtInt(n) {
	return n == null ? '—' : Math.round(n).toLocaleString('en-US');
}

function fmtRate(v) {
	if (v == null) return '—';
	if (v >= 100) return fmtInt(v);
	return Number.isInteger(v) ? String(v) : v.toFixed(1);
}

function fmtMs(v) {
	if (v == null) return '—';
	if (v < 10) return v.toFixed(2);
	return v < 100 ? v.toFixed(1) : fmtInt(v);
}

function fmtShare(fraction) {
	const pct = fraction * 100;
	if (pct === 0 || pct === 100) return `${pct}%`;
	if (pct < 10 || pct > 99) return `${+pct.toFixed(1)}%`;
	return `${Math.round(pct)}%`;
}

function fmtAxis(v) {
	if (v == null) return ''; // a log axis leaves out some of its ticks' labels
	const abs = Math.abs(v);
	if (abs >= 1e6) return `${+(v / 1e6).toFixed(1)}M`;
	if (abs >= 1e3) return `${+(v / 1e3).toFixed(1)}k`;
	return String(+v.toFixed(3));
}

start();
