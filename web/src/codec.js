// Frame codec (docs/PROTOCOL.md §4, §6) and version negotiation (§7.2).
//
// Integers: varints carry values up to 2^62-1. Decoded values are JavaScript numbers when
// they are <= Number.MAX_SAFE_INTEGER (2^53-1) and BigInts above that; the encoder accepts
// either. Compare decoded values with < and > (which work across number and BigInt), not
// with ===.
import { Code, DEFAULT_MAX_FRAME_SIZE, FrameType, MAX_PING_PAYLOAD, MAX_REASON_BYTES, MAX_RECONNECT_BYTES, MIN_MAX_FRAME_SIZE } from './constants.js';
import { DecodeError } from './errors.js';
import { encodeVarint, readVarint, toBytes, utf8, varintLength, writeVarint } from './bytes.js';
import { concat, decodeUtf8 } from './util.js';

const TYPE_NAMES = ['padding', 'hello', 'welcome', 'refuse', 'ping', 'pong', 'goaway', 'error', 'data', 'route_close'];
const TYPE_BY_NAME = Object.fromEntries(TYPE_NAMES.map((n, i) => [n, i]));

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

