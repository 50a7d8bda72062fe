/*
 * DIG, WHEN THE MACHINE HAS IT
 *
 * A few tests ask bbal with the resolver operators use, dig, rather than
 * our own clients.  CI installs it (.ci/run: bind9-dnsutils); a developer's
 * machine may not have it, and then those tests are skipped, not failed:
 * `needsDig` is the tap option that says so.  dig() runs it with the
 * arguments given and resolves with its trimmed stdout (+short output),
 * rejecting when it fails.
 */

import { execFile } from 'node:child_process';

const hasDig = await new Promise<boolean>((resolve) => {
	execFile('dig', ['-v'], (err) => resolve(err === null));
});

/** The tap test option for a test that runs dig. */
export const needsDig = { skip: hasDig ? false : 'dig is not installed (.ci/run installs bind9-dnsutils)' };

export function dig(args: string[]): Promise<string> {
	return new Promise((resolve, reject) => {
		execFile('dig', args, (err, stdout) => (err !== null ? reject(err) : resolve(stdout.trim())));
	});
}
