// Broflake v1 for the browser (and Node >= 20): frame codec, the relay's upstream link to
// an egress (client side), a pool of pre-opened upstream links, and the server side for
// downstream consumer links with label switching (docs/PROTOCOL.md §12.2).
//
// Dependency-free ES module. Normative reference: docs/PROTOCOL.md.
//
// Integers: varints carry values up to 2^62-1. Decoded values are JavaScript numbers when
// they are <= Number.MAX_SAFE_INTEGER (2^53-1) and BigInts above that; the encoder accepts
// either. Labels this module allocates itself are numbers (a link would need 2^53 routes to
// run out). Compare decoded values with < and > (which work across number and BigInt), not
// with ===.

// ---------------------------------------------------------------------------------------
// Constants (§5, §7.3, §8)

export const PROTOCOL_VERSION = 1;
export const SUBPROTOCOLS = Object.freeze(['broflake.v1', 'broflake']);

export const FrameType = Object.freeze({
  PADDING: 0x00,
  HELLO: 0x01,
  WELCOME: 0x02,
  REFUSE: 0x03,
  PING: 0x04,
  PONG: 0x05,
  GOAWAY: 0x06,
  ERROR: 0x07,
  DATA: 0x08,
  ROUTE_CLOSE: 0x09,
});

const TYPE_NAMES = ['padding', 'hello', 'welcome', 'refuse', 'ping', 'pong', 'goaway', 'error', 'data', 'route_close'];
const TYPE_BY_NAME = Object.fromEntries(TYPE_NAMES.map((n, i) => [n, i]));

export const Cap = Object.freeze({ PING: 0x01, ROUTES: 0x02, GOAWAY: 0x04, SERVER_PING: 0x08 });
export const Role = Object.freeze({ RELAY: 1, CONSUMER: 2, PROBE: 3 });

export const Code = Object.freeze({
  NO_ERROR: 0x00,
  UNSUPPORTED_VERSION: 0x01,
  FRAME_ENCODING: 0x02,
  PROTOCOL_VIOLATION: 0x03,
  UNKNOWN_FRAME: 0x04,
  FRAME_TOO_LARGE: 0x05,
  HANDSHAKE_TIMEOUT: 0x06,
  IDLE_TIMEOUT: 0x07,
  SERVER_FULL: 0x08,
  PER_IP_LIMIT: 0x09,
  DRAINING: 0x0a,
  BAD_ROLE: 0x0b,
  RATE_LIMITED: 0x0c,
  ROUTE_LIMIT: 0x0d,
  INTERNAL: 0x0e,
  ROUTE_UNKNOWN: 0x0f,
});
const CODE_NAMES = Object.fromEntries(Object.entries(Code).map(([k, v]) => [v, k]));

/** Registry name of a code ("UNSUPPORTED_VERSION"), or "CODE_<n>" for unregistered ones. */
export function codeName(code) {
  return CODE_NAMES[Number(code)] ?? `CODE_${code}`;
}

/** WebSocket close code for a registry code: 0 -> 1000, n <= 999 -> 4000 + n, else INTERNAL. */
export function closeCodeFor(code) {
  if (code === 0 || code === 0n) return 1000;
  if (code > 0 && code <= 999) return 4000 + Number(code);
  return 4000 + Code.INTERNAL;
}

export const PRE_HANDSHAKE_LIMIT = 4096;
export const DEFAULT_MAX_FRAME_SIZE = 16384;
export const MIN_MAX_FRAME_SIZE = 1500;
export const MAX_PING_PAYLOAD = 64;
export const MAX_REASON_BYTES = 123;
export const MAX_RECONNECT_BYTES = 256;
export const MAX_USER_AGENT_BYTES = 64;
export const EXT_USER_AGENT = 0x01;
export const MAX_VARINT = (1n << 62n) - 1n;

/** The first few grease values 0x1f*N + 0x21 (frame types and extension types, §13). */
export function greaseValue(n) {
  return 0x1f * n + 0x21;
}

/** True for the grease frame / extension types 0x21, 0x40, 0x5f, ... */
export function isGrease(v) {
  const b = BigInt(v);
  return b >= 0x21n && (b - 0x21n) % 0x1fn === 0n;
}

// ---------------------------------------------------------------------------------------
// Errors

/** A message that does not decode (§4.4). `kind` is the vector error name. */
export class DecodeError extends Error {
  constructor(kind, detail) {
    super(detail ? `${kind}: ${detail}` : kind);
    this.name = 'DecodeError';
    this.kind = kind;
    this.code = DECODE_ERROR_CODES[kind] ?? Code.FRAME_ENCODING;
  }
}

const DECODE_ERROR_CODES = {
  truncated: Code.FRAME_ENCODING,
  bad_varint: Code.FRAME_ENCODING,
  frame_too_large: Code.FRAME_TOO_LARGE,
  reserved_flags: Code.FRAME_ENCODING,
  unknown_frame: Code.UNKNOWN_FRAME,
  malformed: Code.FRAME_ENCODING,
};

/**
 * A link that was refused or closed. `code` is the registry code (null when the close
 * carried none), `closeCode` the WebSocket close code (4000 + code), `reason` the text.
 */
export class BroflakeError extends Error {
  constructor({ code = null, closeCode = null, reason = '', retryAfterMs = 0, refused = false, message } = {}) {
    const what = code === null ? `closed (${closeCode ?? 'no close code'})` : `${refused ? 'refused' : 'closed'}: ${codeName(code)} (${closeCode})`;
    super(message ?? (reason ? `${what}: ${reason}` : what));
    this.name = 'BroflakeError';
    this.code = code;
    this.closeCode = closeCode;
    this.reason = reason;
    this.retryAfterMs = retryAfterMs;
    this.refused = refused;
  }
}

// ---------------------------------------------------------------------------------------
// Varints (§2.2), canonical encoding enforced

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

// ---------------------------------------------------------------------------------------
// Text and bytes helpers

const utf8Decoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
const utf8Encoder = new TextEncoder();

export function utf8(s) {
  return utf8Encoder.encode(s);
}

function decodeUtf8(bytes, what) {
  try {
    return utf8Decoder.decode(bytes);
  } catch {
    throw new DecodeError('malformed', `${what} is not valid UTF-8`);
  }
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

function bytesEqual(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function randomBytes(n) {
  const out = new Uint8Array(n);
  if (n) globalThis.crypto.getRandomValues(out);
  return out;
}

function concat(parts) {
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

function isZero(bytes) {
  for (const b of bytes) if (b) return false;
  return true;
}

// ---------------------------------------------------------------------------------------
// Frame decoding (§4.4, §6)

class PayloadReader {
  constructor(buf, start, end) {
    this.buf = buf;
    this.p = start;
    this.end = end;
  }
  varint() {
    const [v, next] = readVarint(this.buf, this.p, this.end, 'malformed');
    this.p = next;
    return v;
  }
  byte(what) {
    if (this.p >= this.end) throw new DecodeError('malformed', `${what} missing`);
    return this.buf[this.p++];
  }
  bytes(n, what) {
    if (typeof n === 'bigint' || this.p + n > this.end) throw new DecodeError('malformed', `${what} runs past the payload`);
    const out = this.buf.subarray(this.p, this.p + n);
    this.p += n;
    return out;
  }
  rest() {
    const out = this.buf.subarray(this.p, this.end);
    this.p = this.end;
    return out;
  }
  done() {
    return this.p >= this.end;
  }
}

function readExtensions(r) {
  const exts = [];
  while (!r.done()) {
    const type = r.varint();
    const len = r.varint();
    const value = r.bytes(len, 'extension value');
    exts.push({ type, value });
  }
  return exts;
}

function checkNoDuplicateExtensions(exts) {
  const seen = new Set();
  for (const e of exts) {
    const k = String(e.type);
    if (seen.has(k)) throw new DecodeError('malformed', `extension ${k} twice`);
    seen.add(k);
  }
}

function checkText(bytes, max, what) {
  if (bytes.length > max) throw new DecodeError('malformed', `${what} longer than ${max} bytes`);
  return decodeUtf8(bytes, what);
}

function parsePayload(type, flags, buf, start, end) {
  const r = new PayloadReader(buf, start, end);
  switch (type) {
    case FrameType.PADDING:
      return { type: 'padding', flags, payload: r.rest() };
    case FrameType.HELLO: {
      // Step 8: the whole structure first, then the constraints (step 9, vector 88).
      const min_version = r.varint();
      const max_version = r.varint();
      const role = r.byte('role');
      const capabilities = r.varint();
      const previous_session = r.bytes(16, 'previous session');
      const extensions = readExtensions(r);
      if (min_version < 1) throw new DecodeError('malformed', 'min_version 0');
      if (min_version > max_version) throw new DecodeError('malformed', 'min_version > max_version');
      checkNoDuplicateExtensions(extensions);
      return { type: 'hello', flags, min_version, max_version, role, capabilities, previous_session, extensions };
    }
    case FrameType.WELCOME: {
      const version = r.varint();
      const session_id = r.bytes(16, 'session id');
      const capabilities = r.varint();
      const keepalive_ms = r.varint();
      const idle_timeout_ms = r.varint();
      const max_frame_size = r.varint();
      const max_routes = r.varint();
      const extensions = readExtensions(r);
      if (version < 1) throw new DecodeError('malformed', 'version 0');
      if (keepalive_ms < 1000) throw new DecodeError('malformed', 'keepalive_ms < 1000');
      if (BigInt(idle_timeout_ms) < 2n * BigInt(keepalive_ms)) throw new DecodeError('malformed', 'idle_timeout_ms < 2 x keepalive_ms');
      if (max_frame_size < MIN_MAX_FRAME_SIZE) throw new DecodeError('malformed', 'max_frame_size < 1500');
      checkNoDuplicateExtensions(extensions);
      return { type: 'welcome', flags, version, session_id, capabilities, keepalive_ms, idle_timeout_ms, max_frame_size, max_routes, extensions };
    }
    case FrameType.REFUSE: {
      const code = r.varint();
      const retry_after_ms = r.varint();
      const reason = checkText(r.rest(), MAX_REASON_BYTES, 'reason');
      return { type: 'refuse', flags, code, retry_after_ms, reason };
    }
    case FrameType.PING:
    case FrameType.PONG: {
      const payload = r.rest();
      if (payload.length > MAX_PING_PAYLOAD) throw new DecodeError('malformed', 'ping payload longer than 64 bytes');
      return { type: TYPE_NAMES[type], flags, payload };
    }
    case FrameType.GOAWAY: {
      const grace_ms = r.varint();
      const reconnect = checkText(r.rest(), MAX_RECONNECT_BYTES, 'reconnect');
      return { type: 'goaway', flags, grace_ms, reconnect };
    }
    case FrameType.ERROR: {
      const code = r.varint();
      const reason = checkText(r.rest(), MAX_REASON_BYTES, 'reason');
      return { type: 'error', flags, code, reason };
    }
    case FrameType.DATA: {
      const label = r.varint();
      const packet = r.rest();
      if (packet.length === 0) throw new DecodeError('malformed', 'empty packet');
      return { type: 'data', flags, label, packet };
    }
    case FrameType.ROUTE_CLOSE: {
      const label = r.varint();
      const code = r.varint();
      if (!r.done()) throw new DecodeError('malformed', 'trailing bytes after ROUTE_CLOSE');
      return { type: 'route_close', flags, label, code };
    }
    default:
      throw new Error('unreachable');
  }
}

/**
 * Decodes one WebSocket message into frames, all or nothing (§3.1 atomicity, §4.4).
 * `limit` is the receiver's frame size limit (4096 before the handshake). Byte fields are
 * Uint8Array views into `data` (no copy). Throws DecodeError.
 */
export function decodeMessage(data, limit = DEFAULT_MAX_FRAME_SIZE) {
  const buf = toBytes(data);
  const n = buf.length;
  const frames = [];
  let p = 0;
  while (p < n) {
    const start = p;
    const [type, afterType] = readVarint(buf, p, n, 'truncated');
    p = afterType;
    if (p >= n) throw new DecodeError('truncated', 'flags missing');
    const flags = buf[p++];
    const [len, afterLen] = readVarint(buf, p, n, 'truncated');
    p = afterLen;
    const header = p - start;
    if (typeof len === 'bigint' || header + len > limit) {
      throw new DecodeError('frame_too_large', `frame of ${BigInt(header) + BigInt(len)} bytes over the limit ${limit}`);
    }
    if (p + len > n) throw new DecodeError('truncated', 'payload cut short');
    const payloadStart = p;
    p += len;
    const known = typeof type === 'number' && type < TYPE_NAMES.length;
    if (!known) {
      if (flags & 0x80) {
        frames.push({ type: 'unknown', flags, frame_type: type, payload: buf.subarray(payloadStart, p) });
        continue;
      }
      throw new DecodeError('unknown_frame', `type ${type}`);
    }
    if (flags & 0x7f) throw new DecodeError('reserved_flags', `flags 0x${flags.toString(16)} on ${TYPE_NAMES[type]}`);
    frames.push(parsePayload(type, flags, buf, payloadStart, p));
  }
  return frames;
}

// ---------------------------------------------------------------------------------------
// Frame encoding

function extensionsBytes(exts = []) {
  const parts = [];
  for (const e of exts) {
    const value = toBytes(e.value);
    parts.push(encodeVarint(e.type), encodeVarint(value.length), value);
  }
  return parts;
}

function fixed16(bytes, what) {
  const b = bytes == null ? new Uint8Array(16) : toBytes(bytes);
  if (b.length !== 16) throw new RangeError(`${what} must be 16 bytes`);
  return b;
}

function payloadParts(f) {
  switch (f.type) {
    case 'padding':
    case 'ping':
    case 'pong':
      return [toBytes(f.payload)];
    case 'hello':
      return [
        encodeVarint(f.min_version),
        encodeVarint(f.max_version),
        Uint8Array.of(f.role & 0xff),
        encodeVarint(f.capabilities ?? 0),
        fixed16(f.previous_session, 'previous_session'),
        ...extensionsBytes(f.extensions),
      ];
    case 'welcome':
      return [
        encodeVarint(f.version),
        fixed16(f.session_id, 'session_id'),
        encodeVarint(f.capabilities ?? 0),
        encodeVarint(f.keepalive_ms),
        encodeVarint(f.idle_timeout_ms),
        encodeVarint(f.max_frame_size),
        encodeVarint(f.max_routes),
        ...extensionsBytes(f.extensions),
      ];
    case 'refuse':
      return [encodeVarint(f.code), encodeVarint(f.retry_after_ms ?? 0), utf8(f.reason ?? '')];
    case 'goaway':
      return [encodeVarint(f.grace_ms), utf8(f.reconnect ?? '')];
    case 'error':
      return [encodeVarint(f.code), utf8(f.reason ?? '')];
    case 'data':
      return [encodeVarint(f.label), toBytes(f.packet)];
    case 'route_close':
      return [encodeVarint(f.label), encodeVarint(f.code ?? 0)];
    case 'unknown':
      return [toBytes(f.payload)];
    default:
      throw new TypeError(`unknown frame type ${f.type}`);
  }
}

/** Encodes one frame object (the shape decodeMessage returns) to bytes. */
export function encodeFrame(f) {
  const type = f.type === 'unknown' ? f.frame_type : TYPE_BY_NAME[f.type];
  if (type === undefined) throw new TypeError(`unknown frame type ${f.type}`);
  const flags = f.flags ?? (f.type === 'unknown' ? 0x80 : 0);
  const payload = concat(payloadParts(f));
  return concat([encodeVarint(type), Uint8Array.of(flags), encodeVarint(payload.length), payload]);
}

/** Encodes frames into one message. */
export function encodeMessage(frames) {
  return concat(frames.map(encodeFrame));
}

/** Encodes one DATA frame with a single allocation and copy (the hot path of a relay). */
export function encodeData(label, packet) {
  const payloadLen = varintLength(label) + packet.length;
  const out = new Uint8Array(2 + varintLength(payloadLen) + payloadLen);
  out[0] = FrameType.DATA;
  out[1] = 0;
  let off = writeVarint(out, 2, payloadLen);
  off = writeVarint(out, off, label);
  out.set(packet, off);
  return out;
}

/** Encoded size of a DATA frame (for size-limit checks without encoding). */
export function dataFrameSize(label, packetLength) {
  const payload = varintLength(label) + packetLength;
  return 1 + 1 + varintLength(payload) + payload;
}

// ---------------------------------------------------------------------------------------
// Version negotiation (§7.2)

/** Returns {version} or {code: 1, reason} (REFUSE UNSUPPORTED_VERSION). */
export function negotiate(serverMin, serverMax, clientMin, clientMax) {
  const lo = clientMin > serverMin ? clientMin : serverMin;
  const hi = clientMax < serverMax ? clientMax : serverMax;
  if (lo > hi) {
    return {
      code: Code.UNSUPPORTED_VERSION,
      reason: `unsupported version: client ${clientMin}-${clientMax}, server ${serverMin}-${serverMax}`,
    };
  }
  return { version: hi };
}

// ---------------------------------------------------------------------------------------
// Timers that keep running in hidden tabs
//
// Browsers throttle main-thread timers of hidden pages (to one wake-up per second at
// once, and in Chromium to one per minute after some minutes: "intensive throttling").
// A dedicated Worker's timers are not throttled, so the keepalive timers run in a tiny
// Worker built from a Blob URL that posts a message back when a timer fires. Where no
// Worker can be made (Node, a CSP that forbids blob: workers) the main-thread setTimeout
// is used instead; if the Worker fails later, pending timers are re-armed on the main
// thread.

const WORKER_SOURCE =
  'const t=new Map();onmessage=e=>{const[o,i,ms]=e.data;' +
  'if(o===1){t.set(i,setTimeout(()=>{t.delete(i);postMessage(i)},ms))}' +
  'else{clearTimeout(t.get(i));t.delete(i)}}';

class MainTimers {
  constructor() {
    this.kind = 'main';
  }
  setTimeout(fn, ms) {
    return setTimeout(fn, ms);
  }
  clearTimeout(h) {
    clearTimeout(h);
  }
}

class WorkerTimers {
  constructor() {
    this.kind = 'worker';
    this.next = 1;
    this.pending = new Map(); // id -> {fn, due}
    this.fallback = null;
    const url = URL.createObjectURL(new Blob([WORKER_SOURCE], { type: 'text/javascript' }));
    this.worker = new Worker(url);
    URL.revokeObjectURL(url);
    this.worker.onmessage = (e) => {
      const p = this.pending.get(e.data);
      if (!p) return;
      this.pending.delete(e.data);
      p.fn();
    };
    this.worker.onerror = () => this._degrade();
  }
  _degrade() {
    if (this.fallback) return;
    this.kind = 'main (worker failed)';
    this.fallback = new MainTimers();
    try {
      this.worker.terminate();
    } catch {
      /* already gone */
    }
    const now = performance.now();
    for (const [id, p] of this.pending) {
      p.main = this.fallback.setTimeout(() => {
        if (this.pending.delete(id)) p.fn();
      }, Math.max(0, p.due - now));
    }
  }
  setTimeout(fn, ms) {
    const id = this.next++;
    const p = { fn, due: performance.now() + ms, main: null };
    this.pending.set(id, p);
    if (this.fallback) {
      p.main = this.fallback.setTimeout(() => {
        if (this.pending.delete(id)) fn();
      }, ms);
    } else {
      this.worker.postMessage([1, id, ms]);
    }
    return id;
  }
  clearTimeout(id) {
    const p = this.pending.get(id);
    if (!p) return;
    this.pending.delete(id);
    if (p.main !== null) this.fallback.clearTimeout(p.main);
    else if (!this.fallback) this.worker.postMessage([0, id]);
  }
}

let sharedTimers = null;

/**
 * The timer service: 'auto' (a Worker where possible, else main thread), 'worker' or
 * 'main'. Returns an object with setTimeout(fn, ms), clearTimeout(h) and `kind`.
 */
export function getTimers(mode = 'auto') {
  if (mode === 'main') return new MainTimers();
  if (sharedTimers) return sharedTimers;
  const canWorker = typeof Worker === 'function' && typeof Blob === 'function' && typeof URL?.createObjectURL === 'function';
  if (canWorker) {
    try {
      sharedTimers = new WorkerTimers();
      return sharedTimers;
    } catch {
      /* CSP or no Worker support: fall through */
    }
  }
  if (mode === 'worker') throw new Error('no Worker available for timers');
  sharedTimers = new MainTimers();
  return sharedTimers;
}

// ---------------------------------------------------------------------------------------
// A minimal event emitter (works the same in browsers and Node)

export class Emitter {
  constructor() {
    this._listeners = new Map();
  }
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return this;
  }
  off(type, fn) {
    this._listeners.get(type)?.delete(fn);
    return this;
  }
  once(type, fn) {
    const w = (...a) => {
      this.off(type, w);
      fn(...a);
    };
    return this.on(type, w);
  }
  emit(type, detail) {
    for (const fn of [...(this._listeners.get(type) ?? [])]) {
      try {
        fn(detail);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }
}

const now = () => performance.now();
const WS_OPEN = 1;
const SEND_HIGH_WATER = 4 * 1024 * 1024; // drop DATA (like UDP) above this much buffered

function trySend(ws, bytes) {
  if (!ws || ws.readyState !== WS_OPEN) return false;
  ws.send(bytes);
  return true;
}

function tryClose(ws, code, reason) {
  if (!ws) return;
  if (ws.readyState !== undefined && ws.readyState > WS_OPEN) return;
  try {
    ws.close(code, reason);
  } catch {
    // Browsers only let scripts send 1000 and 3000-4999 (not 1003): use the closest
    // Broflake code with the same reason.
    try {
      ws.close(code === 1003 ? 4000 + Code.PROTOCOL_VIOLATION : 1000, reason);
    } catch {
      /* nothing more to do */
    }
  }
}

function validReconnect(url) {
  return /^wss?:\/\/[^\s/]+/.test(url) ? url : '';
}

// ---------------------------------------------------------------------------------------
// Routes

/** One route on an EgressLink: send(packet), onmessage(packet), onclose(code, remote), close(). */
export class Route {
  constructor(link, label) {
    this.link = link;
    this.label = label;
    this.open = true;
    this.onmessage = null;
    /** (code, remote): remote ROUTE_CLOSE (remote=true, code set) or link loss (remote=false, code=null). */
    this.onclose = null;
    this.packetsIn = 0;
    this.packetsOut = 0;
  }
  /** Sends one QUIC datagram; false when dropped (route/link closed, too large, backed up). */
  send(packet) {
    if (!this.open) return false;
    const ok = this.link._sendData(this.label, toBytes(packet));
    if (ok) this.packetsOut++;
    return ok;
  }
  /** Closes the route with ROUTE_CLOSE(label, code). */
  close(code = Code.NO_ERROR) {
    if (!this.open) return;
    this.open = false;
    this.link._routeClosedLocally(this, code);
  }
  _deliver(packet) {
    this.packetsIn++;
    this.onmessage?.(packet);
  }
  _closed(code, remote) {
    if (!this.open) return;
    this.open = false;
    this.onclose?.(code, remote);
  }
}

// ---------------------------------------------------------------------------------------
// EgressLink: the client side of one upstream connection (§7.1, §9.2, §10.1)

const LINK_DEFAULTS = {
  protocols: SUBPROTOCOLS,
  minVersion: 1,
  maxVersion: 1,
  role: Role.RELAY,
  capabilities: Cap.PING | Cap.ROUTES | Cap.GOAWAY,
  ping: true,
  userAgent: 'broflake-web/0.1',
  grease: true,
  handshakeTimeoutMs: 10000,
  pongTimeoutMs: null, // default min(keepalive/2, 10 s)
  idleTimeout: true, // client idle timer (MAY, §9.4) at WELCOME.idle_timeout_ms
  previousSession: null,
  timers: 'auto',
  WebSocket: null,
};

/**
 * The relay's connection to an egress (or upstream relay), client side.
 *
 * Events (link.on(type, fn)): 'open' (welcome info), 'ping' ({seq}), 'pong' ({seq, rttMs}),
 * 'goaway' ({grace_ms, reconnect}), 'close' (closeInfo), 'state' (state).
 * `link.ready` resolves with the welcome info or rejects with a BroflakeError.
 */
export class EgressLink extends Emitter {
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.opts = { ...LINK_DEFAULTS, ...options };
    this.timers = typeof this.opts.timers === 'object' ? this.opts.timers : getTimers(this.opts.timers);
    this.state = 'connecting';
    this.ws = null;
    this.protocol = null;
    this.welcome = null;
    this.sessionId = null;
    this.refusal = null;
    this.closeInfo = null;
    this.wsClose = null;
    this.routes = new Map();
    this.nextLabel = 0;
    this.limit = PRE_HANDSHAKE_LIMIT;
    this.stats = {
      pingsSent: 0,
      pongs: 0,
      serverPings: 0,
      lastRttMs: null,
      maxPingGapMs: 0,
      messagesIn: 0,
      messagesOut: 0,
      bytesIn: 0,
      bytesOut: 0,
      packetsIn: 0,
      packetsOut: 0,
      packetsDropped: 0,
      routesOpened: 0,
    };
    this._seq = 0;
    this._outstanding = null;
    this._lastPingAt = null;
    this._lastRx = now();
    this._t = {};
    this._out = null;
    this.startedAt = now();
    this.ready = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this.ready.catch(() => {});
    this._connect();
  }

  get keepaliveMs() {
    return this.welcome ? Number(this.welcome.keepalive_ms) : null;
  }

  /** Whether this link sends PINGs (client-driven keepalive in effect and enabled). */
  get pinging() {
    return !!(this.welcome && this.welcome.pingInEffect && this.opts.ping);
  }

  _setState(s) {
    this.state = s;
    this.emit('state', s);
  }

  _timer(name, ms, fn) {
    this._clear(name);
    this._t[name] = this.timers.setTimeout(() => {
      delete this._t[name];
      fn();
    }, ms);
  }

  _clear(name) {
    if (this._t[name] !== undefined) {
      this.timers.clearTimeout(this._t[name]);
      delete this._t[name];
    }
  }

  _connect() {
    const WS = this.opts.WebSocket ?? globalThis.WebSocket;
    this._timer('handshake', this.opts.handshakeTimeoutMs, () => {
      this._fail(4000 + Code.HANDSHAKE_TIMEOUT, 'handshake timeout', {
        error: new BroflakeError({ code: Code.HANDSHAKE_TIMEOUT, closeCode: 4006, reason: 'handshake timeout' }),
        sendError: this.state === 'await_welcome',
      });
    });
    let ws;
    try {
      ws = new WS(this.url, [...this.opts.protocols]);
    } catch (e) {
      queueMicrotask(() => this._finish(null, String(e?.message ?? e), { remote: false, error: new BroflakeError({ message: `cannot connect: ${e?.message ?? e}` }) }));
      return;
    }
    this.ws = ws;
    ws.binaryType = 'arraybuffer';
    ws.onopen = () => this._onOpen();
    ws.onmessage = (ev) => this._onMessage(ev.data);
    ws.onclose = (ev) => this._onWsClose(ev);
    ws.onerror = () => {};
  }

  _helloFrame() {
    const o = this.opts;
    let caps = BigInt(o.capabilities);
    const extensions = [];
    if (o.userAgent) {
      let ua = utf8(o.userAgent);
      if (ua.length > MAX_USER_AGENT_BYTES) {
        // Cut at a character boundary so that the value stays valid UTF-8.
        let n = MAX_USER_AGENT_BYTES;
        while (n > 0 && (ua[n] & 0xc0) === 0x80) n--;
        ua = ua.subarray(0, n);
      }
      extensions.push({ type: EXT_USER_AGENT, value: ua });
    }
    if (o.grease) {
      caps |= 1n << BigInt(48 + Math.floor(Math.random() * 14));
      extensions.push({ type: greaseValue(1 + Math.floor(Math.random() * 6)), value: randomBytes(Math.floor(Math.random() * 9)) });
    }
    return {
      type: 'hello',
      min_version: o.minVersion,
      max_version: o.maxVersion,
      role: o.role,
      capabilities: caps,
      previous_session: o.previousSession ?? new Uint8Array(16),
      extensions,
    };
  }

  _onOpen() {
    if (this.state !== 'connecting') return;
    this.protocol = this.ws.protocol;
    this._setState('await_welcome');
    this._sendFrames([this._helloFrame()]);
  }

  _onMessage(data) {
    if (this.state === 'closed') return;
    this._lastRx = now();
    if (typeof data === 'string') {
      this._fail(1003, 'text messages are not allowed');
      return;
    }
    const bytes = toBytes(data);
    this.stats.messagesIn++;
    this.stats.bytesIn += bytes.length;
    let frames;
    try {
      frames = decodeMessage(bytes, this.limit);
    } catch (e) {
      if (!(e instanceof DecodeError)) throw e;
      this._fatal(e.code, e.kind);
      return;
    }
    this._out = [];
    try {
      for (const f of frames) {
        this._handle(f);
        if (this.state === 'closed') return;
      }
    } finally {
      const out = this._out;
      this._out = null;
      if (out && out.length && this.state !== 'closed') this._sendFrames(out);
    }
  }

  _queue(frame) {
    if (this._out) this._out.push(frame);
    else this._sendFrames([frame]);
  }

  _sendFrames(frames) {
    return this._sendBytes(encodeMessage(frames));
  }

  _sendBytes(bytes) {
    if (trySend(this.ws, bytes)) {
      this.stats.messagesOut++;
      this.stats.bytesOut += bytes.length;
      return true;
    }
    return false;
  }

  _handle(f) {
    if (f.type === 'padding' || f.type === 'unknown') return;
    if (f.type === 'error') {
      // Fatal: stop sending and close with the code mapped from the received one.
      this._finish(closeCodeFor(f.code), f.reason, {
        remote: true,
        closeWs: true,
        error: new BroflakeError({ code: f.code, closeCode: closeCodeFor(f.code), reason: f.reason }),
      });
      return;
    }
    if (this.state === 'await_welcome') {
      if (f.type === 'welcome') return this._onWelcome(f);
      if (f.type === 'refuse') return this._onRefuse(f);
      return this._fatal(Code.PROTOCOL_VIOLATION, `${f.type} before WELCOME`);
    }
    switch (f.type) {
      case 'ping':
        this.stats.serverPings++;
        this._queue({ type: 'pong', payload: f.payload });
        return;
      case 'pong':
        return this._onPong(f.payload);
      case 'data': {
        const route = this.routes.get(f.label);
        if (route) {
          this.stats.packetsIn++;
          route._deliver(f.packet);
        } else {
          this._queue({ type: 'route_close', label: f.label, code: Code.ROUTE_UNKNOWN });
        }
        return;
      }
      case 'route_close': {
        const route = this.routes.get(f.label);
        if (route) {
          this.routes.delete(f.label);
          route._closed(f.code, true);
          this.emit('routes', this.routes.size);
        }
        return;
      }
      case 'goaway':
        return this._onGoaway(f);
      default:
        return this._fatal(Code.PROTOCOL_VIOLATION, `unexpected ${f.type}`);
    }
  }

  _onWelcome(f) {
    if (f.version < this.opts.minVersion || f.version > this.opts.maxVersion) {
      return this._fatal(Code.PROTOCOL_VIOLATION, 'WELCOME version outside the offered range');
    }
    const caps = Number(BigInt(f.capabilities) & 0xffn);
    const mff = f.max_frame_size > Number.MAX_SAFE_INTEGER ? Number.MAX_SAFE_INTEGER : Number(f.max_frame_size);
    this.welcome = {
      version: Number(f.version),
      session_id: hex(f.session_id),
      capabilities: f.capabilities,
      keepalive_ms: Number(f.keepalive_ms),
      idle_timeout_ms: Number(f.idle_timeout_ms),
      max_frame_size: mff,
      max_routes: f.max_routes,
      pingInEffect: !!(caps & Cap.PING),
      serverPing: !!(caps & Cap.SERVER_PING),
      routesInEffect: !!(caps & Cap.ROUTES),
      goawayInEffect: !!(caps & Cap.GOAWAY),
      protocol: this.protocol,
    };
    this.sessionId = f.session_id.slice();
    this.limit = mff;
    this._clear('handshake');
    this._setState('open');
    this.openedAt = now();
    this._lastRx = now();
    if (this.pinging) this._scheduleKeepalive();
    if (this.opts.idleTimeout) this._armIdle(this.welcome.idle_timeout_ms);
    if (this.opts.grease) {
      this._queue({ type: 'unknown', frame_type: greaseValue(Math.floor(Math.random() * 6)), flags: 0x80, payload: randomBytes(Math.floor(Math.random() * 17)) });
    }
    this._resolve(this.welcome);
    this.emit('open', this.welcome);
  }

  _onRefuse(f) {
    const closeCode = closeCodeFor(f.code);
    this.refusal = { code: f.code, retry_after_ms: f.retry_after_ms, reason: f.reason };
    const error = new BroflakeError({ code: f.code, closeCode, reason: f.reason, retryAfterMs: Number(f.retry_after_ms), refused: true });
    this._finish(closeCode, f.reason, { remote: true, error, refused: true });
  }

  // -- keepalive (§10.1)

  _scheduleKeepalive() {
    const j = Math.random() * 0.2;
    this._timer('keepalive', this.welcome.keepalive_ms * (1 - j), () => {
      if (this.state !== 'open' && this.state !== 'going_away') return;
      if (!this._outstanding) this._sendPing();
      this._scheduleKeepalive();
    });
  }

  _pongTimeoutMs() {
    return this.opts.pongTimeoutMs ?? Math.min(this.welcome.keepalive_ms / 2, 10000);
  }

  _sendPing() {
    const seq = ++this._seq;
    const payload = new Uint8Array(8);
    const dv = new DataView(payload.buffer);
    dv.setUint32(0, Math.floor(seq / TWO32));
    dv.setUint32(4, seq >>> 0);
    const t = now();
    if (this._lastPingAt !== null) this.stats.maxPingGapMs = Math.max(this.stats.maxPingGapMs, t - this._lastPingAt);
    this._lastPingAt = t;
    this._outstanding = { seq, payload, sentAt: t };
    this._queue({ type: 'ping', payload });
    this.stats.pingsSent++;
    this.emit('ping', { seq });
    this._timer('pong', this._pongTimeoutMs(), () => {
      if (this._outstanding && this._outstanding.seq === seq) {
        this._fail(4000 + Code.IDLE_TIMEOUT, 'pong timeout', { dead: true });
      }
    });
  }

  _onPong(payload) {
    const o = this._outstanding;
    if (!o || !bytesEqual(o.payload, payload)) return; // unmatched PONG: ignored (§6.6)
    this._outstanding = null;
    this._clear('pong');
    const rttMs = now() - o.sentAt;
    this.stats.pongs++;
    this.stats.lastRttMs = rttMs;
    this.emit('pong', { seq: o.seq, rttMs });
  }

  _armIdle(ms) {
    this._timer('idle', ms, () => {
      if (this.state !== 'open' && this.state !== 'going_away') return;
      const idle = now() - this._lastRx;
      if (idle >= this.welcome.idle_timeout_ms - 1) {
        this._fail(4000 + Code.IDLE_TIMEOUT, 'idle timeout', { dead: true });
      } else {
        this._armIdle(this.welcome.idle_timeout_ms - idle);
      }
    });
  }

  // -- GOAWAY (§11)

  _onGoaway(f) {
    if (this.state !== 'open') return; // further GOAWAY frames are ignored
    this._setState('going_away');
    const grace = f.grace_ms > Number.MAX_SAFE_INTEGER ? Number.MAX_SAFE_INTEGER : Number(f.grace_ms);
    this.goaway = { grace_ms: grace, reconnect: validReconnect(f.reconnect), at: now() };
    // Close before the grace period ends, whether or not the routes have moved.
    const closeIn = Math.max(0, Math.min(grace * 0.9, grace - 1000));
    if (closeIn < 2 ** 31) this._timer('grace', closeIn, () => this.close(1000, 'going away'));
    this.emit('goaway', this.goaway);
  }

  // -- routes (§12.1)

  /** Opens a route: allocates the next label. Throws when the link cannot take one. */
  openRoute() {
    if (this.state !== 'open') throw new Error(this.state === 'going_away' ? 'link is going away' : `link is ${this.state}`);
    if (this.routes.size >= this.welcome.max_routes) throw new Error('route limit reached');
    const label = this.nextLabel++;
    const route = new Route(this, label);
    this.routes.set(label, route);
    this.stats.routesOpened++;
    this.emit('routes', this.routes.size);
    return route;
  }

  _sendData(label, packet) {
    if ((this.state !== 'open' && this.state !== 'going_away') || packet.length === 0) return false;
    if (dataFrameSize(label, packet.length) > this.limit || (this.ws.bufferedAmount ?? 0) > SEND_HIGH_WATER) {
      this.stats.packetsDropped++;
      return false;
    }
    if (this._sendBytes(encodeData(label, packet))) {
      this.stats.packetsOut++;
      return true;
    }
    return false;
  }

  _routeClosedLocally(route, code) {
    if (this.routes.get(route.label) !== route) return;
    this.routes.delete(route.label);
    if (this.state === 'open' || this.state === 'going_away') this._queue({ type: 'route_close', label: route.label, code });
    this.emit('routes', this.routes.size);
  }

  // -- ending

  /** Closes the link (WebSocket close `code`, default 1000). */
  close(code = 1000, reason = '') {
    this._finish(code, reason, { remote: false, local: true });
  }

  _fatal(code, reason) {
    this._fail(closeCodeFor(code), reason, { sendError: true, errorCode: code });
  }

  _fail(closeCode, reason, extra = {}) {
    if (extra.sendError) {
      const code = extra.errorCode ?? closeCode - 4000;
      try {
        this._sendFrames([{ type: 'error', code, reason }]);
      } catch {
        /* best effort */
      }
    }
    const code = closeCode >= 4000 ? closeCode - 4000 : null;
    this._finish(closeCode, reason, {
      remote: false,
      local: true,
      dead: !!extra.dead,
      error: extra.error ?? new BroflakeError({ code, closeCode, reason }),
    });
  }

  _onWsClose(ev) {
    this.wsClose = { code: ev.code, reason: ev.reason, wasClean: ev.wasClean };
    if (this.state === 'closed') return;
    let error;
    if (this.state === 'await_welcome' && ev.code >= 4000 && ev.code <= 4999) {
      // Refused, and only the close frame tells (e.g. the REFUSE frame never arrived).
      error = new BroflakeError({ code: ev.code - 4000, closeCode: ev.code, reason: ev.reason, refused: true });
      this.refusal = { code: ev.code - 4000, retry_after_ms: 0, reason: ev.reason };
    } else if (this.state === 'connecting') {
      error = new BroflakeError({ closeCode: ev.code, reason: ev.reason, message: `cannot connect to ${this.url} (close ${ev.code})` });
    } else {
      error = new BroflakeError({ code: ev.code >= 4000 ? ev.code - 4000 : null, closeCode: ev.code, reason: ev.reason });
    }
    this._finish(ev.code, ev.reason, { remote: true, error, refused: !!this.refusal });
  }

  _finish(code, reason, { remote = false, local = false, dead = false, error = null, refused = false, closeWs = false } = {}) {
    if (this.state === 'closed') return;
    const wasOpen = this.state === 'open' || this.state === 'going_away';
    for (const name of Object.keys(this._t)) this._clear(name);
    this._setState('closed');
    this.closedAt = now();
    this.closeInfo = {
      code,
      reason,
      local,
      remote,
      dead,
      refused,
      wasOpen,
      refusal: this.refusal,
      openForMs: wasOpen ? this.closedAt - this.openedAt : 0,
    };
    const ws = this.ws;
    if (ws) {
      ws.onmessage = null;
      ws.onopen = null;
      // The socket may stay CLOSING for a long time when the path is black-holed; this
      // link is closed now, whatever the socket does later.
      if (local || closeWs) tryClose(ws, code ?? 1000, reason);
      else if (refused) tryClose(ws, 1000, '');
    }
    for (const route of this.routes.values()) route._closed(null, false);
    this.routes.clear();
    this._reject(error ?? new BroflakeError({ code: code >= 4000 ? code - 4000 : null, closeCode: code, reason }));
    this.emit('close', this.closeInfo);
  }

  /** Plain-object view for pages and tests. */
  snapshot() {
    return {
      url: this.url,
      state: this.state,
      protocol: this.protocol,
      session: this.welcome?.session_id ?? null,
      keepaliveMs: this.keepaliveMs,
      pinging: this.pinging,
      routes: this.routes.size,
      stats: { ...this.stats },
      closeInfo: this.closeInfo,
    };
  }
}

// ---------------------------------------------------------------------------------------
// RelayPool: N pre-opened upstream links with reconnects and GOAWAY migration (§9.3, §11)

const POOL_DEFAULTS = {
  size: 3,
  backoffBaseMs: 500,
  backoffCapMs: 30000,
  autoStart: true,
};

/** Codes after which retrying the same server is pointless (§7.1). */
const NO_RETRY = new Set([Code.UNSUPPORTED_VERSION, Code.BAD_ROLE]);

/**
 * Keeps `size` EgressLinks open to one egress. Events: 'change' (after any state change),
 * 'open' / 'close' ({slot, link}), 'migrate' ({from, to}) when a GOAWAY replacement opened.
 */
export class RelayPool extends Emitter {
  constructor(url, options = {}) {
    super();
    this.url = url;
    const { size, backoffBaseMs, backoffCapMs, autoStart, ...linkOptions } = { ...POOL_DEFAULTS, ...options };
    this.size = size;
    this.backoffBaseMs = backoffBaseMs;
    this.backoffCapMs = backoffCapMs;
    this.linkOptions = linkOptions;
    this.timers = typeof linkOptions.timers === 'object' ? linkOptions.timers : getTimers(linkOptions.timers ?? 'auto');
    this.linkOptions.timers = this.timers;
    this.slots = [];
    this.stopped = false;
    this.started = false;
    this._rr = 0;
    this.stats = {
      connects: 0, // links that reached OPEN
      reconnects: 0, // connection attempts made to replace a lost or failed link
      attempts: 0, // all connection attempts
      pongs: 0,
      pingsSent: 0,
      deadLinks: 0, // links this side declared dead (pong or idle timeout)
      lostLinks: 0, // open links that ended without us closing them on purpose
      refusals: 0,
      goaways: 0,
      migrations: 0,
      failures: 0, // attempts that never reached OPEN
    };
    this.events = []; // recent notable events (bounded), for pages and debugging
    if (autoStart) this.start();
  }

  get timerKind() {
    return this.timers.kind;
  }

  _log(what, detail = {}) {
    this.events.push({ t: Math.round(now()), what, ...detail });
    if (this.events.length > 200) this.events.splice(0, this.events.length - 200);
  }

  start() {
    if (this.started) return this;
    this.started = true;
    for (let i = 0; i < this.size; i++) {
      const slot = { index: i, link: null, state: 'idle', attempt: 0, connects: 0, reconnects: 0, pongs: 0, draining: new Set(), retryTimer: null, retryInMs: null, lastClose: null, failed: null };
      this.slots.push(slot);
      this._connectSlot(slot, {});
    }
    this._changed();
    return this;
  }

  _changed() {
    this.emit('change', this);
  }

  _connectSlot(slot, { url = this.url, previousSession = null } = {}) {
    if (this.stopped) return;
    this.stats.attempts++;
    const link = new EgressLink(url, { ...this.linkOptions, previousSession });
    slot.link = link;
    slot.state = 'connecting';
    slot.retryInMs = null;
    link.on('open', () => {
      if (slot.link !== link) return;
      slot.state = 'open';
      slot.attempt = 0; // n resets once a connection reaches OPEN
      slot.connects++;
      this.stats.connects++;
      this._log('open', { slot: slot.index, session: link.welcome.session_id });
      // A replacement after GOAWAY: existing routes move over lazily.
      for (const old of slot.draining) {
        if (!old._migrated) {
          old._migrated = true;
          this.stats.migrations++;
          this.emit('migrate', { from: old, to: link });
          if (old.routes.size === 0) old.close(1000, 'moved');
        }
      }
      this.emit('open', { slot: slot.index, link });
      this._changed();
    });
    link.on('ping', () => {
      this.stats.pingsSent++;
    });
    link.on('pong', () => {
      slot.pongs++;
      this.stats.pongs++;
      this._changed();
    });
    link.on('routes', (n) => {
      if (link.state === 'going_away' && link._migrated && n === 0) link.close(1000, 'moved');
    });
    link.on('goaway', (g) => {
      this.stats.goaways++;
      this._log('goaway', { slot: slot.index, grace_ms: g.grace_ms });
      if (slot.link !== link) return;
      slot.draining.add(link);
      // Not delayed by backoff (§9.3).
      this._connectSlot(slot, { url: g.reconnect || this.url, previousSession: link.sessionId });
      this._changed();
    });
    link.on('close', (info) => {
      slot.lastClose = { code: info.code, reason: info.reason, dead: info.dead, wasOpen: info.wasOpen, openForMs: Math.round(info.openForMs) };
      if (info.dead) this.stats.deadLinks++;
      if (info.refused) this.stats.refusals++;
      if (!info.wasOpen) this.stats.failures++;
      this._log('close', { slot: slot.index, code: info.code, reason: info.reason, dead: info.dead });
      if (slot.draining.delete(link)) {
        this._changed();
        return;
      }
      if (slot.link !== link || this.stopped) {
        this._changed();
        return;
      }
      if (info.wasOpen && (!info.local || info.dead)) this.stats.lostLinks++;
      slot.link = null;
      this.emit('close', { slot: slot.index, link });
      this._scheduleReconnect(slot, info);
      this._changed();
    });
  }

  _scheduleReconnect(slot, info) {
    const refusal = info.refusal;
    if (refusal && NO_RETRY.has(Number(refusal.code))) {
      slot.state = 'failed';
      slot.failed = `${codeName(refusal.code)}: ${refusal.reason}`;
      return;
    }
    const n = slot.attempt++;
    let delay = Math.random() * Math.min(this.backoffCapMs, this.backoffBaseMs * 2 ** n);
    const retry = refusal ? Number(refusal.retry_after_ms) : 0;
    if (retry > delay) delay = retry;
    slot.state = 'backoff';
    slot.retryInMs = Math.round(delay);
    this.emit('retry', { slot: slot.index, attempt: n, delayMs: delay });
    slot.retryTimer = this.timers.setTimeout(() => {
      slot.retryTimer = null;
      if (this.stopped) return;
      slot.reconnects++;
      this.stats.reconnects++;
      this._connectSlot(slot, {});
      this._changed();
    }, delay);
  }

  /** Links that can take new routes. */
  openLinks() {
    return this.slots.map((s) => s.link).filter((l) => l && l.state === 'open');
  }

  /** The WELCOME of an open link (for downstream parameters), or null. */
  upstreamWelcome() {
    return this.openLinks()[0]?.welcome ?? null;
  }

  /** Opens a route on an open link (round robin over the least loaded); null if none. */
  openRoute() {
    const links = this.openLinks();
    if (!links.length) return null;
    const min = Math.min(...links.map((l) => l.routes.size));
    const candidates = links.filter((l) => l.routes.size === min);
    const link = candidates[this._rr++ % candidates.length];
    try {
      return link.openRoute();
    } catch {
      return null;
    }
  }

  /** Resolves when `n` links (default: all) are open. */
  whenOpen(n = this.size) {
    return new Promise((resolve) => {
      const check = () => {
        if (this.openLinks().length >= n) {
          this.off('change', check);
          resolve(this);
        }
      };
      this.on('change', check);
      check();
    });
  }

  stop() {
    this.stopped = true;
    for (const slot of this.slots) {
      if (slot.retryTimer !== null) this.timers.clearTimeout(slot.retryTimer);
      slot.link?.close(1000, 'relay stopping');
      for (const l of slot.draining) l.close(1000, 'relay stopping');
      slot.state = 'stopped';
    }
    this._changed();
  }

  /** Plain-object view for pages and tests. */
  snapshot() {
    return {
      url: this.url,
      size: this.size,
      timers: this.timers.kind,
      ping: this.linkOptions.ping !== false,
      open: this.openLinks().length,
      stats: { ...this.stats },
      links: this.slots.map((s) => ({
        slot: s.index,
        state: s.link ? s.link.state : s.state,
        slotState: s.state,
        session: s.link?.welcome?.session_id ?? null,
        connects: s.connects,
        reconnects: s.reconnects,
        pongs: s.pongs,
        pings: s.link?.stats.pingsSent ?? 0,
        rttMs: s.link?.stats.lastRttMs ?? null,
        maxPingGapMs: s.link ? Math.round(s.link.stats.maxPingGapMs) : null,
        routes: s.link?.routes.size ?? 0,
        draining: s.draining.size,
        retryInMs: s.retryInMs,
        lastClose: s.lastClose,
        failed: s.failed,
      })),
    };
  }
}

// ---------------------------------------------------------------------------------------
// DownstreamLink: the server side for one consumer link, relaying by label switching

const DOWNSTREAM_DEFAULTS = {
  serverMinVersion: 1,
  serverMaxVersion: 1,
  allowedRoles: [Role.RELAY, Role.CONSUMER, Role.PROBE],
  maxRoutes: 256,
  keepaliveMs: null, // default: the upstream WELCOME's, else 20000
  idleTimeoutMs: null, // default: the upstream WELCOME's, else 60000
  handshakeTimeoutMs: 10000,
  pingBurst: 16,
  pingRefillPerSec: 2,
  grease: true,
  timers: null, // default: the pool's
};

function key(label) {
  return label; // decoded labels are normalized: numbers up to 2^53-1, BigInts above
}

/**
 * Serves one downstream link (any WebSocket-like object: send(), onmessage, onclose,
 * close()) and relays its routes over `pool`:
 * (this link, downstream label) <-> (upstream link, upstream label).
 * Events: 'open' (hello info), 'close' ({code, reason}), 'route' ({label, upstream}).
 */
export class DownstreamLink extends Emitter {
  constructor(socket, pool, options = {}) {
    super();
    this.socket = socket;
    this.pool = pool;
    this.opts = { ...DOWNSTREAM_DEFAULTS, ...options };
    this.timers = this.opts.timers ?? pool?.timers ?? getTimers('auto');
    this.state = 'await_hello';
    this.limit = PRE_HANDSHAKE_LIMIT;
    this.routes = new Map(); // downstream label -> {label, up: Route|null, stale}
    this.highestSeen = -1;
    this.hello = null;
    this.params = null;
    this.closeInfo = null;
    this.stats = { messagesIn: 0, messagesOut: 0, packetsUp: 0, packetsDown: 0, dropped: 0, pings: 0, routesOpened: 0, routeLimit: 0 };
    this._t = {};
    this._out = null;
    this._lastRx = now();
    this._tokens = this.opts.pingBurst;
    this._tokensAt = now();
    this._serverPing = null;
    this._onMigrate = ({ from }) => {
      for (const e of this.routes.values()) if (e.up && e.up.link === from) e.stale = true;
    };
    pool?.on('migrate', this._onMigrate);
    if ('binaryType' in socket) socket.binaryType = 'arraybuffer';
    socket.onmessage = (ev) => this._onMessage(ev && typeof ev === 'object' && 'data' in ev ? ev.data : ev);
    socket.onclose = (ev) => this._onSocketClose(ev ?? {});
    this._timer('handshake', this.opts.handshakeTimeoutMs, () => {
      if (this.state !== 'await_hello') return;
      this._send([{ type: 'refuse', code: Code.HANDSHAKE_TIMEOUT, retry_after_ms: 0, reason: 'handshake timeout' }]);
      this._end(4000 + Code.HANDSHAKE_TIMEOUT, 'handshake timeout', true);
    });
  }

  _timer(name, ms, fn) {
    this._clear(name);
    this._t[name] = this.timers.setTimeout(() => {
      delete this._t[name];
      fn();
    }, ms);
  }

  _clear(name) {
    if (this._t[name] !== undefined) {
      this.timers.clearTimeout(this._t[name]);
      delete this._t[name];
    }
  }

  _send(frames) {
    return this._sendBytes(encodeMessage(frames));
  }

  _sendBytes(bytes) {
    if (this.state === 'closed') return false;
    const s = this.socket;
    if (s.readyState !== undefined && s.readyState !== WS_OPEN) return false;
    s.send(bytes);
    this.stats.messagesOut++;
    return true;
  }

  _queue(frame) {
    if (this._out) this._out.push(frame);
    else this._send([frame]);
  }

  _onMessage(data) {
    if (this.state === 'closed') return;
    this._lastRx = now();
    if (typeof data === 'string') {
      this._end(1003, 'text messages are not allowed', true);
      return;
    }
    const bytes = toBytes(data);
    this.stats.messagesIn++;
    let frames;
    try {
      frames = decodeMessage(bytes, this.limit);
    } catch (e) {
      if (!(e instanceof DecodeError)) throw e;
      this._fatal(e.code, e.kind);
      return;
    }
    this._out = [];
    try {
      for (const f of frames) {
        this._handle(f);
        if (this.state === 'closed') return;
      }
    } finally {
      const out = this._out;
      this._out = null;
      if (out && out.length) this._send(out);
    }
  }

  _handle(f) {
    if (f.type === 'padding' || f.type === 'unknown') return;
    if (f.type === 'error') {
      this._end(closeCodeFor(f.code), f.reason, true);
      return;
    }
    if (this.state === 'await_hello') {
      if (f.type === 'hello') return this._onHello(f);
      return this._fatal(Code.PROTOCOL_VIOLATION, `${f.type} before HELLO`);
    }
    switch (f.type) {
      case 'ping': {
        const t = now();
        this._tokens = Math.min(this.opts.pingBurst, this._tokens + ((t - this._tokensAt) / 1000) * this.opts.pingRefillPerSec);
        this._tokensAt = t;
        if (this._tokens < 1) return this._fatal(Code.RATE_LIMITED, 'ping flood');
        this._tokens -= 1;
        this.stats.pings++;
        this._queue({ type: 'pong', payload: f.payload });
        return;
      }
      case 'pong':
        if (this._serverPing && bytesEqual(this._serverPing, f.payload)) this._serverPing = null;
        return;
      case 'data':
        if (this.hello.role === Role.PROBE) return this._fatal(Code.PROTOCOL_VIOLATION, 'DATA from a probe');
        return this._onData(f.label, f.packet);
      case 'route_close': {
        const e = this.routes.get(key(f.label));
        if (!e) return;
        this.routes.delete(key(f.label));
        e.up?.close(f.code);
        return;
      }
      default:
        return this._fatal(Code.PROTOCOL_VIOLATION, `unexpected ${f.type}`);
    }
  }

  _onHello(f) {
    const o = this.opts;
    const neg = negotiate(o.serverMinVersion, o.serverMaxVersion, f.min_version, f.max_version);
    const refuse = (code, reason, retry = 0) => {
      this._send([{ type: 'refuse', code, retry_after_ms: retry, reason }]);
      this._end(closeCodeFor(code), reason, true);
    };
    if (neg.code) return refuse(neg.code, neg.reason);
    if (this.pool?.stopped) return refuse(Code.DRAINING, 'relay stopping', 5000);
    if (!o.allowedRoles.includes(f.role)) return refuse(Code.BAD_ROLE, `role ${f.role} not allowed`);
    const up = this.pool?.upstreamWelcome?.() ?? null;
    const keepalive = o.keepaliveMs ?? up?.keepalive_ms ?? 20000;
    const idle = Math.max(o.idleTimeoutMs ?? up?.idle_timeout_ms ?? 60000, 2 * keepalive);
    // Leave room for a longer upstream label (up to 7 more bytes in a DATA header).
    const upLimit = up?.max_frame_size ?? DEFAULT_MAX_FRAME_SIZE;
    const mff = Math.max(MIN_MAX_FRAME_SIZE, Math.min(DEFAULT_MAX_FRAME_SIZE, upLimit - 8));
    const clientCaps = Number(BigInt(f.capabilities) & 0xffn);
    let caps = clientCaps & (Cap.PING | Cap.ROUTES | Cap.GOAWAY);
    if (!(caps & Cap.PING)) caps |= Cap.SERVER_PING;
    const extensions = [];
    let wireCaps = BigInt(caps);
    if (o.grease) {
      wireCaps |= 1n << BigInt(48 + Math.floor(Math.random() * 14));
      extensions.push({ type: greaseValue(Math.floor(Math.random() * 6)), value: randomBytes(Math.floor(Math.random() * 9)) });
    }
    let session = randomBytes(16);
    while (isZero(session)) session = randomBytes(16);
    const ua = f.extensions.find((e) => e.type === EXT_USER_AGENT);
    let userAgent = null;
    if (ua && ua.value.length <= MAX_USER_AGENT_BYTES) {
      try {
        userAgent = utf8Decoder.decode(ua.value);
      } catch {
        userAgent = null; // invalid USER_AGENT: treated as absent
      }
    }
    this.hello = { role: f.role, version: Number(neg.version), capabilities: f.capabilities, userAgent, previous_session: hex(f.previous_session) };
    this.params = { keepalive_ms: keepalive, idle_timeout_ms: idle, max_frame_size: mff, max_routes: o.maxRoutes, capabilities: caps, session_id: hex(session) };
    this._send([
      {
        type: 'welcome',
        version: neg.version,
        session_id: session,
        capabilities: wireCaps,
        keepalive_ms: keepalive,
        idle_timeout_ms: idle,
        max_frame_size: mff,
        max_routes: o.maxRoutes,
        extensions,
      },
    ]);
    this.state = 'open';
    this.limit = mff;
    this._clear('handshake');
    this._armIdle(idle);
    if (caps & Cap.SERVER_PING) this._scheduleServerPing();
    this.emit('open', this.hello);
  }

  _armIdle(ms) {
    this._timer('idle', ms, () => {
      if (this.state !== 'open') return;
      const idle = now() - this._lastRx;
      if (idle >= this.params.idle_timeout_ms - 1) this._fatal(Code.IDLE_TIMEOUT, 'idle timeout');
      else this._armIdle(this.params.idle_timeout_ms - idle);
    });
  }

  _scheduleServerPing() {
    this._timer('serverPing', this.params.keepalive_ms, () => {
      if (this.state !== 'open') return;
      if (!this._serverPing) {
        this._serverPing = randomBytes(8);
        this._send([{ type: 'ping', payload: this._serverPing }]);
      }
      this._scheduleServerPing();
    });
  }

  _onData(label, packet) {
    const k = key(label);
    let e = this.routes.get(k);
    if (!e) {
      if (label <= this.highestSeen) {
        this.stats.dropped++; // late packet on a closed or refused label
        return;
      }
      this.highestSeen = label;
      if (this.routes.size >= this.opts.maxRoutes) {
        this.stats.routeLimit++;
        this._queue({ type: 'route_close', label, code: Code.ROUTE_LIMIT });
        return;
      }
      e = { label, up: null, stale: false };
      this.routes.set(k, e);
      this.stats.routesOpened++;
    }
    if (!e.up || !e.up.open || e.stale) this._attachUpstream(e);
    if (e.up && e.up.send(packet)) this.stats.packetsUp++;
    else this.stats.dropped++;
  }

  _attachUpstream(e) {
    const old = e.up && e.up.open ? e.up : null;
    const r = this.pool?.openRoute() ?? null;
    if (!r) return; // no upstream now: keep the old route if it still works, else drop
    e.up = r;
    e.stale = false;
    old?.close(Code.NO_ERROR); // moved to the current upstream link (QUIC migrates)
    r.onmessage = (packet) => {
      if (this.routes.get(key(e.label)) !== e) return;
      if (dataFrameSize(e.label, packet.length) > this.limit || (this.socket.bufferedAmount ?? 0) > SEND_HIGH_WATER) {
        this.stats.dropped++;
        return;
      }
      if (this._sendBytes(encodeData(e.label, packet))) this.stats.packetsDown++;
    };
    r.onclose = (code, remote) => {
      if (e.up !== r) return;
      if (remote) {
        // ROUTE_CLOSE from upstream: forward with the same code, release the entry.
        if (this.routes.get(key(e.label)) === e) {
          this.routes.delete(key(e.label));
          this._send([{ type: 'route_close', label: e.label, code }]);
        }
      } else {
        e.up = null; // upstream link lost: re-mapped on the next DATA (§12.2)
      }
    };
    this.emit('route', { label: e.label, upstream: { session: r.link.welcome?.session_id, label: r.label } });
  }

  _fatal(code, reason) {
    this._send([{ type: 'error', code, reason }]);
    this._end(closeCodeFor(code), reason, true);
  }

  /** Closes this downstream link and releases its routes. */
  close(code = 1000, reason = '') {
    this._end(code, reason, true);
  }

  _onSocketClose(ev) {
    this._end(ev.code ?? 1006, ev.reason ?? '', false);
  }

  _end(code, reason, closeSocket) {
    if (this.state === 'closed') return;
    this.state = 'closed';
    for (const name of Object.keys(this._t)) this._clear(name);
    this.pool?.off('migrate', this._onMigrate);
    // Downstream link closed: ROUTE_CLOSE(upstream label, NO_ERROR) for each of its routes.
    for (const e of this.routes.values()) e.up?.close(Code.NO_ERROR);
    this.routes.clear();
    this.closeInfo = { code, reason };
    if (closeSocket) tryClose(this.socket, code, reason);
    this.emit('close', this.closeInfo);
  }

  snapshot() {
    return { state: this.state, hello: this.hello, params: this.params, routes: this.routes.size, stats: { ...this.stats }, closeInfo: this.closeInfo };
  }
}
