// Helpers shared by the modules but not part of the public API (broflake.js does not
// re-export this file).
import { DecodeError } from './errors.js';

export const now = () => performance.now();

const utf8Decoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/** Strict UTF-8 decoding; invalid input is a 'malformed' DecodeError naming `what`. */
export function decodeUtf8(bytes, what) {
  try {
    return utf8Decoder.decode(bytes);
  } catch {
    throw new DecodeError('malformed', `${what} is not valid UTF-8`);
  }
}

export function bytesEqual(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

export function randomBytes(n) {
  const out = new Uint8Array(n);
  if (n) globalThis.crypto.getRandomValues(out);
  return out;
}

export function concat(parts) {
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

export function isZero(bytes) {
  for (const b of bytes) if (b) return false;
  return true;
}
