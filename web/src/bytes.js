// Varints (docs/PROTOCOL.md §2.2), canonical encoding enforced, and the byte and text
// helpers of the public API.
import { MAX_VARINT } from './constants.js';
import { DecodeError } from './errors.js';

const TWO30 = 0x40000000;
const TWO32 = 0x100000000;

function checkVarintValue(v) {
  if (typeof v === 'bigint') {
    if (v < 0n || v > MAX_VARINT) throw new RangeError(`varint out of range: ${v}`);
    return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
  }
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > Number.MAX_SAFE_INTEGER) {
    throw new RangeError(`varint must be a non-negative safe integer or a BigInt: ${v}`);
  }
  return v;
}

/** Encoded length of a varint (1, 2, 4 or 8). */
export function varintLength(value) {
  const v = checkVarintValue(value);
  if (typeof v === 'bigint') return 8;
  if (v < 64) return 1;
  if (v < 16384) return 2;
  if (v < TWO30) return 4;
  return 8;
}

/** Writes the minimal encoding of `value` into `out` at `off`; returns the new offset. */
export function writeVarint(out, off, value) {
  const v = checkVarintValue(value);
  if (typeof v === 'bigint') {
    const hi = Number(v >> 32n);
    const lo = Number(v & 0xffffffffn);
    return write8(out, off, hi, lo);
  }
  if (v < 64) {
    out[off] = v;
    return off + 1;
  }
  if (v < 16384) {
    out[off] = 0x40 | (v >> 8);
    out[off + 1] = v & 0xff;
    return off + 2;
  }
  if (v < TWO30) {
    out[off] = 0x80 | (v >>> 24);
    out[off + 1] = (v >>> 16) & 0xff;
    out[off + 2] = (v >>> 8) & 0xff;
    out[off + 3] = v & 0xff;
    return off + 4;
  }
  return write8(out, off, Math.floor(v / TWO32), v >>> 0);
}

function write8(out, off, hi, lo) {
  out[off] = 0xc0 | (hi >>> 24);
  out[off + 1] = (hi >>> 16) & 0xff;
  out[off + 2] = (hi >>> 8) & 0xff;
  out[off + 3] = hi & 0xff;
  out[off + 4] = lo >>> 24;
  out[off + 5] = (lo >>> 16) & 0xff;
  out[off + 6] = (lo >>> 8) & 0xff;
  out[off + 7] = lo & 0xff;
  return off + 8;
}

/** The minimal encoding of `value`. */
export function encodeVarint(value) {
  const out = new Uint8Array(varintLength(value));
  writeVarint(out, 0, value);
  return out;
}

/**
 * Reads a varint at `off` (bytes available up to `end`). Returns [value, nextOffset].
 * Throws DecodeError(cutKind) when the length announced by the first byte is not
 * available, and DecodeError('bad_varint') for a non-minimal encoding (§2.2: the cut is
 * reported before the non-minimality).
 */
export function readVarint(buf, off, end, cutKind = 'truncated') {
  if (off >= end) throw new DecodeError(cutKind, 'varint missing');
  const b0 = buf[off];
  const len = 1 << (b0 >> 6);
  if (off + len > end) throw new DecodeError(cutKind, `varint needs ${len} bytes`);
  const first = b0 & 0x3f;
  switch (len) {
    case 1:
      return [first, off + 1];
    case 2: {
      const v = (first << 8) | buf[off + 1];
      if (v < 64) throw new DecodeError('bad_varint', `${v} in 2 bytes`);
      return [v, off + 2];
    }
    case 4: {
      const v = ((first << 24) | (buf[off + 1] << 16) | (buf[off + 2] << 8) | buf[off + 3]) >>> 0;
      if (v < 16384) throw new DecodeError('bad_varint', `${v} in 4 bytes`);
      return [v, off + 4];
    }
    default: {
      const hi = ((first << 24) | (buf[off + 1] << 16) | (buf[off + 2] << 8) | buf[off + 3]) >>> 0;
      const lo = ((buf[off + 4] << 24) | (buf[off + 5] << 16) | (buf[off + 6] << 8) | buf[off + 7]) >>> 0;
      if (hi === 0 && lo < TWO30) throw new DecodeError('bad_varint', `${lo} in 8 bytes`);
      // hi < 2^21 keeps hi * 2^32 + lo below 2^53.
      const v = hi < 0x200000 ? hi * TWO32 + lo : (BigInt(hi) << 32n) | BigInt(lo);
      return [v, off + 8];
    }
  }
}

const utf8Encoder = new TextEncoder();

export function utf8(s) {
  return utf8Encoder.encode(s);
}

export function toBytes(data) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (typeof data === 'string') return utf8(data);
  if (data == null) return new Uint8Array(0);
  throw new TypeError('expected bytes');
}

export function hex(bytes) {
  let s = '';
  for (const b of bytes) s += b.toString(16).padStart(2, '0');
  return s;
}

export function fromHex(s) {
  if (s.length % 2) throw new TypeError('odd hex length');
  const out = new Uint8Array(s.length / 2);
  for (let i = 0; i < out.length; i++) {
    const v = parseInt(s.substr(i * 2, 2), 16);
    if (Number.isNaN(v)) throw new TypeError('bad hex');
    out[i] = v;
  }
  return out;
}
