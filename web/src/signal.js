// The volunteer role of the signaling protocol (docs/SIGNALING.md): one WebSocket to the
// service, `volunteer` once `hello` came, `ping` at the announced interval, offers and
// candidates in, answers, declines, candidates, `done` and `slots` out.
//
// Events: 'hello' ({versions, ice_servers}), 'registered' ({id, ping_ms, idle_ms}),
// 'offer' ({session, sdp, ttl_ms}), 'candidate' ({session, candidate, mid}),
// 'cancel' ({session, reason}), 'goaway' ({retry_after_ms, reason}),
// 'error' ({code, reason}), 'close' ({code, reason, registered}).
import { Emitter } from './emitter.js';

export const SIGNAL_SUBPROTOCOL = 'broflake-signal.v1';
export const SIGNAL_VERSIONS = [1];
/** The service's message limit (§2.2); a larger message from it is a broken service. */
const MAX_MESSAGE = 32768;
const SESSION = /^[0-9a-f]{32}$/;

/** One registration with a signaling service; make a new one to register again. */
export class SignalVolunteer extends Emitter {
  constructor(url, { slots, timers, WebSocketImpl = globalThis.WebSocket } = {}) {
    super();
    this.url = url;
    this.slots = slots;
    this.timers = timers;
    this.state = 'connecting'; // connecting → hello → registered → closed
    this.id = null;
    this.iceServers = [];
    this.pingMs = 20000;
    this.stats = { sent: 0, received: 0, offers: 0, candidatesIn: 0, candidatesOut: 0 };
    this._pingTimer = null;
    this.ws = new WebSocketImpl(url, [SIGNAL_SUBPROTOCOL]);
    this.ws.onmessage = (ev) => this._onMessage(ev.data);
    this.ws.onclose = (ev) => this._closed(ev.code ?? 1006, ev.reason ?? '');
    this.ws.onerror = () => {}; // the close that follows says what happened
  }

  _send(msg) {
    if (this.state === 'closed' || this.ws.readyState !== 1) return false;
    this.ws.send(JSON.stringify(msg));
    this.stats.sent++;
    this._armPing(); // any message counts as activity (§3.9)
    return true;
  }

  _armPing() {
    if (this.state !== 'registered') return;
    if (this._pingTimer !== null) this.timers.clearTimeout(this._pingTimer);
    this._pingTimer = this.timers.setTimeout(() => {
      this._pingTimer = null;
      this._send({ type: 'ping' });
    }, this.pingMs);
  }

  _onMessage(data) {
    if (this.state === 'closed') return;
    if (typeof data !== 'string' || data.length > MAX_MESSAGE) return this._fail('the service sent a message that is not text of at most 32 KiB');
    let m;
    try {
      m = JSON.parse(data);
    } catch {
      return this._fail('the service sent a message that is not JSON');
    }
    if (!m || typeof m !== 'object' || typeof m.type !== 'string') return this._fail('the service sent a message without a type');
    this.stats.received++;
    switch (m.type) {
      case 'hello':
        return this._onHello(m);
      case 'registered':
        this.state = 'registered';
        this.id = String(m.id ?? '');
        // Ping a little more often than asked: timers and the network add delay.
        if (Number.isSafeInteger(m.ping_ms) && m.ping_ms > 0) this.pingMs = Math.max(1000, Math.floor(m.ping_ms * 0.8));
        this._armPing();
        return this.emit('registered', { id: this.id, ping_ms: m.ping_ms, idle_ms: m.idle_ms });
      case 'offer':
        if (!SESSION.test(m.session) || typeof m.sdp !== 'string') return;
        this.stats.offers++;
        return this.emit('offer', { session: m.session, sdp: m.sdp, ttl_ms: m.ttl_ms });
      case 'candidate':
        if (!SESSION.test(m.session) || typeof m.candidate !== 'string') return;
        this.stats.candidatesIn++;
        return this.emit('candidate', { session: m.session, candidate: m.candidate, mid: typeof m.mid === 'string' ? m.mid : null });
      case 'cancel':
        return this.emit('cancel', { session: m.session, reason: String(m.reason ?? '') });
      case 'goaway':
        return this.emit('goaway', { retry_after_ms: Number(m.retry_after_ms) || 0, reason: String(m.reason ?? '') });
      case 'error':
        // unknown_session is not fatal (§6); a fatal error is followed by the service's close.
        return this.emit('error', { code: String(m.code ?? ''), reason: String(m.reason ?? '') });
      default:
        return; // pong, and types of later versions: ignored (§9)
    }
  }

  _onHello(m) {
    if (this.state !== 'connecting') return;
    const versions = Array.isArray(m.versions) ? m.versions : [];
    this.iceServers = Array.isArray(m.ice_servers) ? m.ice_servers : [];
    this.emit('hello', { versions, ice_servers: this.iceServers });
    if (!versions.some((v) => SIGNAL_VERSIONS.includes(v))) return this._fail(`no common signaling version (service: ${versions.join(', ')})`);
    this.state = 'hello';
    this._send({ type: 'volunteer', versions: SIGNAL_VERSIONS, slots: this.slots });
  }

  answer(session, sdp) {
    return this._send({ type: 'answer', session, sdp });
  }

  decline(session, reason) {
    return this._send({ type: 'decline', session, reason: String(reason).slice(0, 200) });
  }

  /** One local candidate (`candidate` without "a="), or "" for the end of candidates. */
  candidate(session, candidate, mid) {
    this.stats.candidatesOut++;
    const msg = { type: 'candidate', session, candidate };
    if (typeof mid === 'string' && mid.length <= 16) msg.mid = mid;
    return this._send(msg);
  }

  done(session) {
    return this._send({ type: 'done', session });
  }

  setSlots(free) {
    this.slots = free;
    return this._send({ type: 'slots', free });
  }

  _fail(reason) {
    this.emit('error', { code: 'client', reason });
    this.close(1000, reason);
  }

  close(code = 1000, reason = '') {
    if (this.state === 'closed') return;
    try {
      this.ws.close(code, reason.slice(0, 123));
    } catch {
      this.ws.close();
    }
    this._closed(code, reason);
  }

  _closed(code, reason) {
    if (this.state === 'closed') return;
    const registered = this.state === 'registered';
    this.state = 'closed';
    if (this._pingTimer !== null) this.timers.clearTimeout(this._pingTimer);
    this._pingTimer = null;
    this.emit('close', { code, reason, registered });
  }
}
