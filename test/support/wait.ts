/*
 * WAITING, WITH A DEADLINE
 *
 * Tests and harnesses wait for two kinds of things.  Some can only be asked
 * (a log line count, a snapshot field, whether a process is gone): waitFor()
 * asks again every few milliseconds.  Others announce themselves (a client's
 * socket received bytes, a child printed a line): a Changes is told of every
 * such event, and until() checks its condition at once and after each one,
 * so nothing is slept through and nothing is polled.
 *
 * withDeadline() gives any promise one (a process's exit after a signal).
 *
 * All of them wait with a deadline and reject with what they saw, because a
 * test that hangs until tap's timeout tells nobody anything.  A condition
 * that throws means "this can no longer happen" (a connection closed before
 * the answer came): until() rejects with that error at once, while waitFor()
 * takes it as "not yet" and quotes the last one if the deadline passes.
 */

export function sleep(ms: number): Promise<void> {
	return new Promise((resolve) => setTimeout(resolve, ms));
}

/*
 * Poll fn until it returns true.  An exception from fn counts as "not yet"
 * only if it is thrown before the deadline; the last one is quoted in the
 * timeout message.
 */
export async function waitFor(fn: () => boolean | Promise<boolean>,
	timeoutMs: number, intervalMs = 50, what?: string): Promise<void> {
	const deadline = Date.now() + timeoutMs;
	let lastErr: string | null = null;
	for (;;) {
		try {
			if (await fn()) {
				return;
			}
			lastErr = null;
		} catch (err) {
			lastErr = err instanceof Error ? err.message : JSON.stringify(err);
		}
		if (Date.now() >= deadline) {
			break;
		}
		await sleep(intervalMs);
	}
	throw new Error(`waitFor: ${what ?? fn.toString()} not true within ` +
		`${timeoutMs} ms` + (lastErr !== null ? ` (last error: ${lastErr})` : ''));
}

/** p, or a rejection `${what}: not within ${ms} ms` (code ETIMEDOUT) if it takes longer; p itself runs on. */
export async function withDeadline<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
	let timer: NodeJS.Timeout | undefined;
	const late = new Promise<never>((_, reject) => {
		timer = setTimeout(() => reject(Object.assign(new Error(`${what}: not within ${ms} ms`), { code: 'ETIMEDOUT' })), ms);
	});
	try {
		return await Promise.race([p, late]);
	} finally {
		clearTimeout(timer);
	}
}

/** Something that changes by events; until() waits for a condition on it. */
export class Changes {
	private readonly waiters = new Set<() => void>();

	/** Call on every event that may make a condition true (or impossible). */
	changed(): void {
		for (const w of [...this.waiters]) {
			w();
		}
	}

	/**
	 * Resolve once pred() is true, checked now and after every change.  If
	 * pred throws, reject with that at once; after timeoutMs, reject with
	 * `${what} not within ${timeoutMs} ms` and what describe() says, an
	 * error whose code is ETIMEDOUT.
	 */
	until(pred: () => boolean, timeoutMs: number, what: string, describe?: () => string): Promise<void> {
		return new Promise((resolve, reject) => {
			const settle = (err: unknown): void => {
				this.waiters.delete(check);
				clearTimeout(timer);
				if (err === null) {
					resolve();
				} else {
					reject(err instanceof Error ? err : new Error(JSON.stringify(err)));
				}
			};
			const check = (): void => {
				try {
					if (pred()) {
						settle(null);
					}
				} catch (err) {
					settle(err);
				}
			};
			const timer = setTimeout(() => settle(Object.assign(new Error(
				`${what} not within ${timeoutMs} ms${describe === undefined ? '' : ` (${describe()})`}`),
			{ code: 'ETIMEDOUT' })), timeoutMs);
			this.waiters.add(check);
			check();
		});
	}
}
