// The two errors the module throws or rejects with.
import { Code, codeName } from './constants.js';

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

