// Codec unit tests against the normative vectors (docs/PROTOCOL.md §16).
import test from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import {
  decodeMessage,
  encodeFrame,
  encodeMessage,
  encodeVarint,
  readVarint,
  negotiate,
  DecodeError,
  hex,
  fromHex,
  closeCodeFor,
  Code,
  encodeData,
  dataFrameSize,
} from '../broflake.js';

const vectorsPath = fileURLToPath(new URL('../../proto/vectors/v1.json', import.meta.url));
const vectors = JSON.parse(fs.readFileSync(vectorsPath, 'utf8'));

/** Decoded frame -> the vector JSON shape (bytes as hex, numbers as numbers). */
function toJson(frame) {
  const out = {};
  for (const [k, v] of Object.entries(frame)) {
    if (v instanceof Uint8Array) out[k] = hex(v);
    else if (typeof v === 'bigint') out[k] = v; // must not happen for vector values (< 2^53)
    else if (k === 'extensions') out[k] = v.map((e) => ({ type: e.type, value: hex(e.value) }));
    else out[k] = v;
  }
  return out;
}

/** Vector JSON frame -> an encodable frame (hex fields to bytes). */
const BYTE_FIELDS = new Set(['payload', 'previous_session', 'session_id', 'packet']);
function fromJson(frame) {
  const out = {};
  for (const [k, v] of Object.entries(frame)) {
    if (BYTE_FIELDS.has(k)) out[k] = fromHex(v);
    else if (k === 'extensions') out[k] = v.map((e) => ({ type: e.type, value: fromHex(e.value) }));
    else out[k] = v;
  }
  return out;
}

test('the vector file has the frame and negotiation vectors', () => {
  assert.equal(vectors.version, 1);
  assert.equal(vectors.frames.length, 133);
  assert.equal(vectors.negotiation.length, 13);
});

for (const v of vectors.frames) {
  test(`frame vector ${v.id} ${v.name}`, () => {
    const limit = v.max_frame_size ?? 16384;
    const bytes = fromHex(v.hex);
    if (v.expect === 'ok') {
      const frames = decodeMessage(bytes, limit);
      assert.deepEqual(frames.map(toJson), v.frames);
      // Canonical: re-encoding reproduces the message byte for byte.
      assert.equal(hex(encodeMessage(v.frames.map(fromJson))), v.hex);
      assert.equal(hex(encodeMessage(frames)), v.hex);
    } else {
      assert.throws(
        () => decodeMessage(bytes, limit),
        (e) => e instanceof DecodeError && e.kind === v.error,
        `expected ${v.error}`,
      );
    }
  });
}

for (const v of vectors.negotiation) {
  test(`negotiation vector ${v.id} ${v.name}`, () => {
    const r = negotiate(v.server_min, v.server_max, v.client_min, v.client_max);
    if (v.expect === 'welcome') {
      assert.equal(r.code, undefined);
      assert.equal(r.version, v.version);
    } else {
      assert.equal(r.code, v.code);
      assert.equal(r.reason, v.reason);
    }
  });
}

test('varints: RFC 9000 examples, canonical check, 2^62-1 as BigInt', () => {
  const rd = (h) => readVarint(fromHex(h), 0, h.length / 2)[0];
  assert.equal(rd('25'), 37);
  assert.equal(rd('7bbd'), 15293);
  assert.equal(rd('9d7f3e7d'), 494878333);
  assert.equal(rd('c000000040000000'), 2 ** 30);
  assert.equal(rd('ffffffffffffffff'), (1n << 62n) - 1n);
  assert.equal(rd('c01fffffffffffff'), Number.MAX_SAFE_INTEGER);
  assert.equal(rd('c020000000000000'), 2n ** 53n);
  for (const bad of ['4025', '80003fff', 'c00000003fffffff']) {
    assert.throws(() => rd(bad), (e) => e.kind === 'bad_varint');
  }
  assert.throws(() => readVarint(fromHex('40'), 0, 1), (e) => e.kind === 'truncated');
  // Cut short and non-minimal: the cut wins.
  assert.throws(() => readVarint(fromHex('8000'), 0, 2), (e) => e.kind === 'truncated');
  for (const value of [0, 63, 64, 16383, 16384, 2 ** 30 - 1, 2 ** 30, Number.MAX_SAFE_INTEGER, 2n ** 53n, (1n << 62n) - 1n]) {
    const enc = encodeVarint(value);
    const [back, next] = readVarint(enc, 0, enc.length);
    assert.equal(next, enc.length);
    assert.equal(BigInt(back), BigInt(value));
  }
  assert.throws(() => encodeVarint(1n << 62n), RangeError);
  assert.throws(() => encodeVarint(-1), RangeError);
  assert.throws(() => encodeVarint(2 ** 53), RangeError); // not a safe integer: pass a BigInt
});

test('values above 2^53 decode as BigInt and round-trip', () => {
  const frame = { type: 'route_close', flags: 0, label: (1n << 62n) - 1n, code: Code.ROUTE_UNKNOWN };
  const bytes = encodeFrame(frame);
  const [back] = decodeMessage(bytes);
  assert.equal(typeof back.label, 'bigint');
  assert.equal(back.label, (1n << 62n) - 1n);
  const hello = { type: 'hello', min_version: 1, max_version: 1, role: 1, capabilities: (1n << 61n) | 7n, previous_session: new Uint8Array(16), extensions: [] };
  const [h] = decodeMessage(encodeFrame(hello));
  assert.equal(h.capabilities, (1n << 61n) | 7n);
});

test('decode errors carry the mapped fatal code', () => {
  const cases = { '0400': Code.FRAME_ENCODING, '0a0000': Code.UNKNOWN_FRAME, '004100': Code.FRAME_ENCODING };
  for (const [h, code] of Object.entries(cases)) {
    assert.throws(() => decodeMessage(fromHex(h)), (e) => e.code === code);
  }
  assert.throws(() => decodeMessage(fromHex('00004100'), 64), (e) => e.kind === 'frame_too_large' && e.code === Code.FRAME_TOO_LARGE);
  assert.equal(closeCodeFor(0), 1000);
  assert.equal(closeCodeFor(1), 4001);
  assert.equal(closeCodeFor(999), 4999);
  assert.equal(closeCodeFor(1000), 4014);
});

test('UTF-8 BOM is kept, not stripped', () => {
  const reason = '\ufeffhi';
  const [f] = decodeMessage(encodeFrame({ type: 'error', code: 3, reason }));
  assert.equal(f.reason, reason);
});

test('the DATA fast path encodes exactly like the generic encoder', () => {
  for (const label of [0, 63, 64, 16383, 16384, 2 ** 30, Number.MAX_SAFE_INTEGER, (1n << 62n) - 1n]) {
    for (const n of [1, 63, 64, 1350, 16370]) {
      const packet = Uint8Array.from({ length: n }, (_, i) => i & 0xff);
      const fast = encodeData(label, packet);
      assert.deepEqual(fast, encodeFrame({ type: 'data', label, packet }));
      assert.equal(fast.length, dataFrameSize(label, n));
    }
  }
});
