/*
 * /METRICS, READ AS PROMETHEUS READS IT
 *
 * The tests that start bbal with --metrics scrape its page over HTTP
 * (scrape) and parse it strictly enough to catch a malformed line
 * (parseMetrics): every line is a comment (# HELP, # TYPE) or a sample,
 * `name{label="value",...} number`, with NaN and Inf in any case as Go's
 * ParseFloat reads them.  value() finds one sample by name and labels and
 * throws when there is none, so a missing series fails the test that asked.
 */

import http from 'node:http';

export interface Sample {
	name: string;
	labels: Record<string, string>;
	value: number;
}

/* The Prometheus text format, strictly enough to catch a malformed page. */
export function parseMetrics(text: string): Sample[] {
	const samples: Sample[] = [];
	for (const line of text.split('\n')) {
		if (line === '' || line.startsWith('# HELP ') || line.startsWith('# TYPE ')) {
			continue;
		}
		/* Values as Go's ParseFloat reads them: NaN and Inf in any case. */
		const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (-?[0-9.eE+-]+|[nN][aA][nN]|[+-]?[iI][nN][fF])$/.exec(line);
		if (m === null) {
			throw new Error(`not Prometheus text: ${JSON.stringify(line)}`);
		}
		const labels: Record<string, string> = {};
		for (const l of (m[3] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
			labels[l[1]] = l[2];
		}
		samples.push({ name: m[1], labels, value: Number(m[4]) });
	}
	return samples;
}

/** GET a path of the HTTP server on 127.0.0.1:port. */
export function get(port: number, path: string): Promise<{ status: number; type: string; body: string }> {
	return new Promise((resolve, reject) => {
		http.get({ host: '127.0.0.1', port, path }, (res) => {
			let body = '';
			res.setEncoding('utf8');
			res.on('data', (d: string) => {
				body += d;
			});
			res.on('end', () => resolve({ status: res.statusCode ?? 0, type: String(res.headers['content-type']), body }));
		}).on('error', reject);
	});
}

/** /metrics, parsed. */
export async function scrape(port: number): Promise<Sample[]> {
	return parseMetrics((await get(port, '/metrics')).body);
}

/** The value of the one sample with this name and (at least) these labels; throws when there is none. */
export function value(samples: Sample[], name: string, labels: Record<string, string> = {}): number {
	const s = samples.find((x) => x.name === name && Object.entries(labels).every(([k, v]) => x.labels[k] === v));
	if (s === undefined) {
		throw new Error(`no sample ${name} ${JSON.stringify(labels)}`);
	}
	return s.value;
}
