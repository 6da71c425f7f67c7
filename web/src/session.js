// What both ends of a Broflake link do alike, written once (docs/PROTOCOL.md §9, §10):
// the receive path (one message decoded all or nothing, its frames handled in order, the
// replies sent together as one message), the rows every state table shares (PADDING and
// ignorable frames skipped, ERROR closes without a reply, decode errors and frames out of
// place are fatal), PING answered with PONG, one outstanding PING of our own with its
// PONG match and timeout, the keepalive and idle timers, and grease.
//
// EgressLink (client side, §9.2) and DownstreamLink (server side, §9.1) extend Session and
// add their handshake, their routes and how they end. Not re-exported by broflake.js.
//
// The transport is any object with send(bytes), close(code, reason), onmessage (called with
// an event carrying `data`, or with the data itself) and onclose (an event with `code` and
// `reason`, or nothing): a WebSocket, an RTCDataChannel or an in-memory pair. `readyState`
// and `bufferedAmount` are used when present; readyState may be a number (WebSocket) or a
// string (RTCDataChannel).
import { Code, closeCodeFor, greaseValue, PRE_HANDSHAKE_LIMIT } from './constants.js';
import { BroflakeError, DecodeError } from './errors.js';
import { toBytes } from './bytes.js';
import { dataFrameSize, decodeMessage, encodeMessage } from './codec.js';
import { Emitter } from './emitter.js';
import { bytesEqual, now, randomBytes } from './util.js';

/** DATA is dropped (like UDP) while more than this is buffered on the transport. */
const SEND_HIGH_WATER = 4 * 1024 * 1024;

function isOpen(t) {
  const s = t.readyState;
  return s === undefined || s === 1 || s === 'open';
}

function isClosing(t) {
  const s = t.readyState;
  return s === 2 || s === 3 || s === 'closing' || s === 'closed';
}

// -- grease (§13): the bit and extension vary per connection so that peers cannot come to
// depend on their absence.

/** A random capability bit from the unassigned range 48..61. */
export function greaseCapability() {
  return 1n << BigInt(48 + Math.floor(Math.random() * 14));
}

/** An extension of grease type greaseValue(first .. first + 5) with 0..8 random bytes. */
export function greaseExtension(first) {
  return { type: greaseValue(first + Math.floor(Math.random() * 6)), value: randomBytes(Math.floor(Math.random() * 9)) };
}

/** An ignorable frame of a grease type with 0..16 random bytes. */
export function greaseFrame() {
  return { type: 'unknown', frame_type: greaseValue(Math.floor(Math.random() * 6)), flags: 0x80, payload: randomBytes(Math.floor(Math.random() * 17)) };
}

/**
 * One end of a link. A subclass sets `stats` (with messagesIn, messagesOut, bytesIn,
 * bytesOut) and provides _onHandshake(f) for frames in the handshake state, _onData(f),
 * _onRouteClose(f), _onTransportClose(ev) and _end(code, reason, how) with how =
 * {local, remote, dead, refused, error, closeSocket}; to keep alive it provides
 * _keepaliveIntervalMs() and may replace _sendPing(), _onPongMatched(o), _idleTimeout().
 */
export class Session extends Emitter {
  constructor(timers, state, handshakeState) {
    super();
    this.timers = timers;
    this.state = state;
    this.socket = null;
    this.limit = PRE_HANDSHAKE_LIMIT;
    this.idleTimeoutMs = null;
    this._handshakeState = handshakeState;
    this._t = {};
    this._out = null;
    this._outstanding = null; // our PING awaiting its PONG: {payload, sentAt, ...}
    this._lastRx = now();
  }

  _setState(s) {
    this.state = s;
    this.emit('state', s);
  }

  /** Open, or open and going away: keepalive, idle timer and routes run. */
  _live() {
    return this.state === 'open' || this.state === 'going_away';
  }

  // -- named timers, one of each name at a time

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

  _clearTimers() {
    for (const name of Object.keys(this._t)) this._clear(name);
  }

  // -- transport

  _attach(socket) {
    this.socket = socket;
    if ('binaryType' in socket) socket.binaryType = 'arraybuffer';
    socket.onmessage = (ev) => this._onMessage(ev && typeof ev === 'object' && 'data' in ev ? ev.data : ev);
    socket.onclose = (ev) => this._onTransportClose(ev ?? {});
  }

  _queue(frame) {
    if (this._out) this._out.push(frame);
    else this._sendFrames([frame]);
  }

  _sendFrames(frames) {
    return this._sendBytes(encodeMessage(frames));
  }

  _sendBytes(bytes) {
    const s = this.socket;
    if (this.state === 'closed' || !s || !isOpen(s)) return false;
    s.send(bytes);
    this.stats.messagesOut++;
    this.stats.bytesOut += bytes.length;
    return true;
  }

  /** Whether DATA(label, `length` bytes) fits the peer's frame limit and the send buffer. */
  _roomForData(label, length) {
    return dataFrameSize(label, length) <= this.limit && (this.socket?.bufferedAmount ?? 0) <= SEND_HIGH_WATER;
  }

  _closeTransport(code, reason) {
    const s = this.socket;
    if (!s || isClosing(s)) return;
    try {
      s.close(code, reason);
    } catch {
      // Browsers only let scripts send 1000 and 3000-4999 (not 1003): use the closest
      // Broflake code with the same reason.
      try {
        s.close(code === 1003 ? 4000 + Code.PROTOCOL_VIOLATION : 1000, reason);
      } catch {
        /* nothing more to do */
      }
    }
  }

  // -- receiving

  _onMessage(data) {
    if (this.state === 'closed') return;
    this._lastRx = now();
    if (typeof data === 'string') {
      this._abort(1003, 'text messages are not allowed');
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

  _handle(f) {
    if (f.type === 'padding' || f.type === 'unknown') return;
    if (f.type === 'error') {
      // Fatal for the peer: stop sending and close with the code mapped from its code.
      const closeCode = closeCodeFor(f.code);
      this._end(closeCode, f.reason, {
        remote: true,
        closeSocket: true,
        error: new BroflakeError({ code: f.code, closeCode, reason: f.reason }),
      });
      return;
    }
    if (this.state === this._handshakeState) return this._onHandshake(f);
    switch (f.type) {
      case 'ping':
        return this._onPing(f);
      case 'pong':
        return this._onPong(f.payload);
      case 'data':
        return this._onData(f);
      case 'route_close':
        return this._onRouteClose(f);
      case 'goaway':
        return this._onGoaway(f);
      default:
        return this._fatal(Code.PROTOCOL_VIOLATION, `unexpected ${f.type}`);
    }
  }

  _onPing(f) {
    this._queue({ type: 'pong', payload: f.payload });
  }

  /** GOAWAY travels from server to client only; the client side replaces this. */
  _onGoaway(f) {
    this._fatal(Code.PROTOCOL_VIOLATION, `unexpected ${f.type}`);
  }

  // -- our PINGs (client §10.1, server-ping mode §10.2): at most one outstanding

  _scheduleKeepalive() {
    this._timer('keepalive', this._keepaliveIntervalMs(), () => {
      if (!this._live()) return;
      if (!this._outstanding) this._sendPing();
      this._scheduleKeepalive();
    });
  }

  _sendPing() {
    this._ping(randomBytes(8));
  }

  /** Sends PING(payload); without its PONG within `timeoutMs` (if given), _pongTimeout(). */
  _ping(payload, timeoutMs = null, extra = {}) {
    const o = { ...extra, payload, sentAt: now() };
    this._outstanding = o;
    this._queue({ type: 'ping', payload });
    if (timeoutMs !== null) {
      this._timer('pong', timeoutMs, () => {
        if (this._outstanding === o) this._pongTimeout();
      });
    }
    return o;
  }

  _onPong(payload) {
    const o = this._outstanding;
    if (!o || !bytesEqual(o.payload, payload)) return; // unmatched PONG: ignored (§6.6)
    this._outstanding = null;
    this._clear('pong');
    this._onPongMatched(o);
  }

  _onPongMatched() {}

  _pongTimeout() {
    this._abort(4000 + Code.IDLE_TIMEOUT, 'pong timeout', { dead: true });
  }

  // -- idle timer: nothing received for idleTimeoutMs (§9.4)

  _armIdle(ms = this.idleTimeoutMs) {
    this._timer('idle', ms, () => {
      if (!this._live()) return;
      const idle = now() - this._lastRx;
      if (idle >= this.idleTimeoutMs - 1) this._idleTimeout();
      else this._armIdle(this.idleTimeoutMs - idle);
    });
  }

  _idleTimeout() {
    this._fatal(Code.IDLE_TIMEOUT, 'idle timeout');
  }

  // -- ending

  /** Closes the link (close code `code`, default 1000). */
  close(code = 1000, reason = '') {
    this._abort(code, reason);
  }

  /** ERROR(code, reason), best effort, then close with the mapped close code (§8). */
  _fatal(code, reason) {
    try {
      this._sendFrames([{ type: 'error', code, reason }]);
    } catch {
      /* best effort */
    }
    this._abort(closeCodeFor(code), reason);
  }

  /** Closes from this side without sending another frame. */
  _abort(closeCode, reason, how = {}) {
    this._end(closeCode, reason, { local: true, closeSocket: true, ...how });
  }
}
