#!/usr/bin/env node
// balstat: print the backends and remote peers of a running bbal.
import { main } from '../dist/src/balstat.js';

await main(process.argv.slice(2));
