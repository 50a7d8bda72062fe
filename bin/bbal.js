#!/usr/bin/env node
// The bbal launcher: the balancer itself is compiled TypeScript under dist/.
import { main } from '../dist/src/main.js';

await main(process.argv.slice(2));
