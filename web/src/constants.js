// Broflake v1 registries (docs/PROTOCOL.md §5, §7.3, §8, §13): frame types, capabilities,
// roles, codes and their close codes, size limits, grease values.

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
