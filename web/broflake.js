// Broflake v1 for the browser (and Node >= 20): frame codec, the relay's upstream link to
// an egress (client side), a pool of pre-opened upstream links, and the server side for
// downstream consumer links with label switching (docs/PROTOCOL.md §12.2).
//
// Dependency-free ES modules under src/, one concern each; this file is the public API
// and re-exports them, so that pages, the bridge and the tests import one path.
// Normative reference: docs/PROTOCOL.md.
//
// Integers: varints carry values up to 2^62-1. Decoded values are JavaScript numbers when
// they are <= Number.MAX_SAFE_INTEGER (2^53-1) and BigInts above that; the encoder accepts
// either. Labels this module allocates itself are numbers (a link would need 2^53 routes to
// run out). Compare decoded values with < and > (which work across number and BigInt), not
// with ===.

export * from './src/constants.js';
export * from './src/errors.js';
export * from './src/bytes.js';
export * from './src/codec.js';
export * from './src/timers.js';
export * from './src/emitter.js';
export * from './src/link.js';
export * from './src/pool.js';
export * from './src/downstream.js';
export * from './src/channels.js';
export * from './src/signal.js';
export * from './src/volunteer.js';
