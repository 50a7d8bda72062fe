/*
 * PERCENTILES AND MEDIANS
 *
 * The chaos report gives p50/p99 latency per phase of a fault, the
 * benchmark p50/p99/p99.9 per run of dnsperf and of its TCP connection
 * generator, and both take medians over a few samples.  One definition
 * serves them all, so a p99 means the same thing in every table.
 *
 * A percentile is the nearest rank: the smallest value that at least p of
 * the samples do not exceed, i.e. sorted[ceil(p * n) - 1].  Nothing is
 * interpolated, so every figure reported is a latency that was measured.
 * No samples, no percentile: null, which the tables print as a dash.
 *
 * A median is the middle value, or the mean of the two middle ones; missing
 * values (null, undefined: a round that had no figure) are left out first.
 */

/** The p-th (0 < p <= 1) nearest-rank percentile of values sorted ascending; null for none. */
export function percentile(sorted: ArrayLike<number>, p: number): number | null {
	if (sorted.length === 0) {
		return null;
	}
	return sorted[Math.max(0, Math.min(sorted.length - 1, Math.ceil(p * sorted.length) - 1))];
}

/** The median of the values that are there; null when none is. */
export function median(xs: Iterable<number | null | undefined>): number | null {
	const s = [...xs].filter((x): x is number => x !== null && x !== undefined).sort((a, b) => a - b);
	if (s.length === 0) {
		return null;
	}
	return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}
