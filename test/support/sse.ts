/*
 * A reader of bbal's /live stream (Server-Sent Events) over a plain HTTP
 * request: each message parsed into its event name and JSON data as it
 * arrives, for the tests (and the bench's dashboards) that follow the
 * stream without a browser.
 */

import http from 'node:http';

export interface LiveMessage {
	event: string;
	data: unknown;
}

export class LiveReader {
	readonly messages: LiveMessage[] = [];
	status = 0;
	ended = false;
	private readonly req: http.ClientRequest;
	private buffered = '';
	private readonly waiters = new Set<() => void>();

	constructor(port: number, host = '127.0.0.1') {
		this.req = http.get({ host, port, path: '/live', agent: false }, (res) => {
			this.status = res.statusCode ?? 0;
			res.setEncoding('utf8');
			res.on('data', this.resOnData);
			res.on('end', () => this.finish());
			res.on('error', () => this.finish());
		});
		this.req.on('error', () => this.finish());
	}

	private readonly resOnData = (chunk: string): void => {
		this.buffered += chunk;
		let end: number;
		while ((end = this.buffered.indexOf('\n\n')) >= 0) {
			const block = this.buffered.slice(0, end);
			this.buffered = this.buffered.slice(end + 2);
			let event = 'message';
			let data = '';
			for (const line of block.split('\n')) {
				if (line.startsWith('event: ')) {
					event = line.slice(7);
				} else if (line.startsWith('data: ')) {
					data += line.slice(6);
				}
			}
			if (data !== '') {
				this.messages.push({ event, data: JSON.parse(data) as unknown });
			}
		}
		this.wake();
	};

	private finish(): void {
		this.ended = true;
		this.wake();
	}

	private wake(): void {
		for (const w of this.waiters) {
			w();
		}
	}

	/** Messages of one kind, in order. */
	of<T = Record<string, unknown>>(event: string): T[] {
		return this.messages.filter((m) => m.event === event).map((m) => m.data as T);
	}

	/** Until pred holds (checked at once and after every chunk), or reject after timeoutMs. */
	until(pred: () => boolean, timeoutMs: number, what: string): Promise<void> {
		return new Promise((resolve, reject) => {
			const check = (): void => {
				if (pred()) {
					clearTimeout(timer);
					this.waiters.delete(check);
					resolve();
				}
			};
			const timer = setTimeout(() => {
				this.waiters.delete(check);
				reject(new Error(`live stream: ${what} not seen within ${timeoutMs} ms (${this.messages.length} messages)`));
			}, timeoutMs);
			this.waiters.add(check);
			check();
		});
	}

	close(): void {
		this.req.destroy();
	}
}
