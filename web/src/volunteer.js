// The browser volunteer (docs/SIGNALING.md, PROTOCOL.md §17): registered with a signaling
// service, it answers consumers' WebRTC offers with RTCPeerConnection and serves each
// consumer's DataChannel pair with a DownstreamLink whose routes go over the RelayPool's
// egress links (label switching, §12.2). Slots are announced as consumers come and go; the
// registration is renewed with backoff when the service goes away (the consumers already
// connected do not depend on it).
//
// Events: 'change' (after anything a page shows), 'consumer' (a consumer's link opened),
// 'registered' ({id}).
import { Emitter } from './emitter.js';
import { ChannelPair } from './channels.js';
import { DownstreamLink } from './downstream.js';
import { SignalVolunteer } from './signal.js';
import { now } from './util.js';

const VOLUNTEER_DEFAULTS = {
  slots: 4,
  iceServers: null, // default: the signaling service's
  connectTimeoutMs: 20000, // ICE + DTLS + SCTP, as the native volunteer
  backoffBaseMs: 500,
  backoffCapMs: 30000,
  RTCPeerConnection: globalThis.RTCPeerConnection,
  WebSocketImpl: globalThis.WebSocket,
  downstream: {}, // DownstreamLink options
};

/** Serves consumers found through the signaling service at `url` over `pool`. */
export class Volunteer extends Emitter {
  constructor(url, pool, options = {}) {
    super();
    this.url = url;
    this.pool = pool;
    this.opts = { ...VOLUNTEER_DEFAULTS, ...options };
    this.timers = pool.timers;
    this.signal = null;
    this.state = 'idle'; // idle → connecting → registered ⇄ backoff → stopped
    this.id = null;
    this.consumers = new Map(); // session → consumer entry
    this.attempt = 0;
    this._retry = null;
    this.lastError = null;
    this.stats = { registrations: 0, offers: 0, declined: 0, answered: 0, connected: 0, failed: 0, ended: 0, bytesIn: 0, bytesOut: 0 };
    this.events = [];
    this.ended = []; // the last consumers served, for pages
  }

  _log(what, detail = {}) {
    this.events.push({ t: Math.round(now()), what, ...detail });
    if (this.events.length > 200) this.events.splice(0, this.events.length - 200);
    this.emit('change', this);
  }

  /** Consumers holding a slot (connecting or connected). */
  get active() {
    return this.consumers.size;
  }

  start() {
    if (this.state !== 'idle') return this;
    this._register();
    return this;
  }

  _register() {
    this.state = 'connecting';
    const sig = new SignalVolunteer(this.url, { slots: this._free(), timers: this.timers, WebSocketImpl: this.opts.WebSocketImpl });
    this.signal = sig;
    sig.on('registered', ({ id }) => {
      this.state = 'registered';
      this.id = id;
      this.attempt = 0;
      this.stats.registrations++;
      // Capacity may have changed while registering.
      if (sig.slots !== this._free()) sig.setSlots(this._free());
      this._log('registered', { id });
      this.emit('registered', { id });
    });
    sig.on('offer', (o) => this._onOffer(sig, o));
    sig.on('candidate', ({ session, candidate, mid }) => this.consumers.get(session)?.remoteCandidate(candidate, mid));
    sig.on('cancel', ({ session, reason }) => {
      const c = this.consumers.get(session);
      if (c && !c.link) c.fail(`cancelled: ${reason}`);
    });
    sig.on('goaway', ({ retry_after_ms, reason }) => {
      this._log('goaway', { reason });
      sig.close(1000, 'goaway');
      this._scheduleRegister(retry_after_ms);
    });
    sig.on('error', ({ code, reason }) => {
      if (code !== 'unknown_session') this.lastError = `${code}: ${reason}`;
    });
    sig.on('close', ({ code, reason }) => {
      if (this.signal !== sig) return;
      this.signal = null;
      if (this.state === 'stopped') return;
      this.lastError = this.lastError ?? `signaling closed ${code} ${reason}`;
      this._log('signaling closed', { code, reason });
      this._scheduleRegister();
    });
    this.emit('change', this);
  }

  _scheduleRegister(atLeastMs = 0) {
    if (this.state === 'stopped' || this._retry !== null) return;
    this.state = 'backoff';
    this.id = null;
    const backoff = Math.min(this.opts.backoffCapMs, this.opts.backoffBaseMs * 2 ** Math.min(this.attempt, 10));
    this.attempt++;
    const ms = Math.max(atLeastMs, Math.round(backoff * (0.5 + Math.random() / 2)));
    this._retry = this.timers.setTimeout(() => {
      this._retry = null;
      if (this.state !== 'stopped') this._register();
    }, ms);
    this.emit('change', this);
  }

  _free() {
    return Math.max(0, this.opts.slots - this.consumers.size);
  }

  _announce() {
    if (this.signal?.state === 'registered') this.signal.setSlots(this._free());
  }

  _onOffer(sig, { session, sdp }) {
    this.stats.offers++;
    // Without an open egress link there is nothing to relay to: let another volunteer answer.
    const full = this.consumers.size >= this.opts.slots;
    if (full || this.pool.openLinks().length === 0 || this.pool.stopped) {
      this.stats.declined++;
      sig.decline(session, full ? 'no free slot' : 'no egress link open');
      return;
    }
    const c = new Consumer(this, sig, session);
    this.consumers.set(session, c);
    this._log('offer', { session });
    c.run(sdp);
  }

  _consumerEnded(c, why) {
    if (this.consumers.get(c.session) !== c) return;
    this.consumers.delete(c.session);
    if (c.link) {
      this.stats.ended++;
      this.stats.bytesIn += c.link.stats.bytesIn;
      this.stats.bytesOut += c.link.stats.bytesOut;
    } else this.stats.failed++;
    this.ended.push(c.summary(why));
    if (this.ended.length > 20) this.ended.shift();
    this._log(c.link ? 'consumer left' : 'consumer failed', { session: c.session, reason: why });
    this._announce();
  }

  /** Bytes relayed for consumers, past and present: {in, out} (as counted on the DataChannels). */
  bytes() {
    let bin = this.stats.bytesIn;
    let bout = this.stats.bytesOut;
    for (const c of this.consumers.values()) {
      bin += c.link?.stats.bytesIn ?? 0;
      bout += c.link?.stats.bytesOut ?? 0;
    }
    return { in: bin, out: bout };
  }

  /** Stops volunteering: withdraws from the service and closes every consumer's connection. */
  stop() {
    if (this.state === 'stopped') return;
    this.state = 'stopped';
    if (this._retry !== null) this.timers.clearTimeout(this._retry);
    this._retry = null;
    this.signal?.close(1000, 'volunteer stopping');
    this.signal = null;
    for (const c of [...this.consumers.values()]) c.close('volunteer stopping');
    this._log('stopped');
  }

  /** Per connected consumer, the candidate pairs that carried its bytes (see Consumer.pairs). */
  async pairs() {
    const out = {};
    for (const [session, c] of this.consumers) out[session] = await c.pairs().catch(() => []);
    return out;
  }

  snapshot() {
    return {
      state: this.state,
      id: this.id,
      url: this.url,
      slots: this.opts.slots,
      free: this._free(),
      lastError: this.lastError,
      stats: { ...this.stats },
      bytes: this.bytes(),
      consumers: [...this.consumers.values()].map((c) => c.summary()),
      ended: this.ended.slice(),
    };
  }
}

/** One consumer: its peer connection, the answer, the channels, then its DownstreamLink. */
class Consumer {
  constructor(volunteer, sig, session) {
    this.v = volunteer;
    this.sig = sig;
    this.session = session;
    this.state = 'answering'; // answering → connecting → open → closed
    this.started = now();
    this.openedAt = null;
    this.link = null;
    this.pair = null;
    this.pc = null;
    this.path = null; // the selected candidate pair, once known
    this._remote = []; // candidates that came before the offer was applied
    this._applied = false;
    this._timer = null;
  }

  async run(sdp) {
    const o = this.v.opts;
    try {
      const iceServers = o.iceServers ?? this.sig.iceServers;
      const pc = new o.RTCPeerConnection({ iceServers });
      this.pc = pc;
      this.pair = new ChannelPair(pc);
      pc.onicecandidate = (ev) => {
        if (this.state === 'closed' || this.sig.state === 'closed') return;
        // Late candidates after the channels opened are useless to the consumer.
        if (this.state === 'open') return;
        this.sig.candidate(this.session, ev.candidate ? ev.candidate.candidate : '', ev.candidate?.sdpMid ?? undefined);
      };
      this._timer = this.v.timers.setTimeout(() => this.fail('ICE, DTLS and SCTP did not complete in time'), o.connectTimeoutMs);
      await pc.setRemoteDescription({ type: 'offer', sdp });
      this._applied = true;
      for (const [candidate, mid] of this._remote.splice(0)) await this._add(candidate, mid);
      const answer = await pc.createAnswer();
      await pc.setLocalDescription(answer);
      if (this.state === 'closed') return;
      // The answer first; candidates trickle after it (SIGNALING.md §3.7).
      this.sig.answer(this.session, pc.localDescription.sdp);
      this.v.stats.answered++;
      this.state = 'connecting';
      this.v.emit('change', this.v);
      await this.pair.open;
      if (this.state === 'closed') return;
      this._opened();
    } catch (e) {
      this.fail(e?.message ?? String(e));
    }
  }

  _opened() {
    this.v.timers.clearTimeout(this._timer);
    this._timer = null;
    this.state = 'open';
    this.openedAt = now();
    this.sig.done(this.session);
    const link = new DownstreamLink(this.pair, this.v.pool, { timers: this.v.timers, ...this.v.opts.downstream });
    this.link = link;
    this.v.stats.connected++;
    link.on('close', ({ code, reason }) => this.close(`link closed ${code} ${reason}`.trim()));
    link.on('open', () => this.v.emit('change', this.v));
    this.v._log('consumer connected', { session: this.session });
    this.v.emit('consumer', this);
    this._readPath();
  }

  /**
   * Every candidate pair that carried bytes, from getStats: {local, remote (candidate
   * types), bytesSent, bytesReceived, nominated}. Shows which path the traffic really took
   * (ICE may move to a better pair after the first nomination).
   */
  async pairs() {
    if (!this.pc || this.state === 'closed') return [];
    const stats = await this.pc.getStats();
    const out = [];
    stats.forEach((s) => {
      if (s.type !== 'candidate-pair' || !(s.bytesSent || s.bytesReceived)) return;
      const l = stats.get(s.localCandidateId);
      const r = stats.get(s.remoteCandidateId);
      out.push({ local: l?.candidateType ?? null, remote: r?.candidateType ?? null, bytesSent: s.bytesSent ?? 0, bytesReceived: s.bytesReceived ?? 0, nominated: !!s.nominated });
    });
    return out;
  }

  /** The selected candidate pair's types, from getStats (for pages and tests). */
  async _readPath() {
    try {
      const stats = await this.pc.getStats();
      let pair = null;
      stats.forEach((s) => {
        if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
      });
      if (!pair) stats.forEach((s) => s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded' && (pair = s));
      if (!pair) return;
      const l = stats.get(pair.localCandidateId);
      const r = stats.get(pair.remoteCandidateId);
      this.path = { local: l?.candidateType ?? null, remote: r?.candidateType ?? null, localAddress: l ? `${l.address}:${l.port}` : null, remoteAddress: r ? `${r.address}:${r.port}` : null };
      this.v.emit('change', this.v);
    } catch {
      /* the connection went away meanwhile */
    }
  }

  remoteCandidate(candidate, mid) {
    if (this.state === 'closed') return;
    if (!this._applied) this._remote.push([candidate, mid]);
    else this._add(candidate, mid);
  }

  async _add(candidate, mid) {
    try {
      // "" is the end of candidates.
      await this.pc.addIceCandidate(candidate ? { candidate, sdpMid: mid ?? '0' } : null);
    } catch {
      /* a candidate this browser cannot use (e.g. another address family): ignored */
    }
  }

  fail(why) {
    if (this.state === 'closed') return;
    // A failure before the answer went out: let the service offer the consumer elsewhere.
    if (this.state === 'answering' && this.sig.state !== 'closed') this.sig.decline(this.session, why);
    this.close(why);
  }

  close(why) {
    if (this.state === 'closed') return;
    this.state = 'closed';
    this.closedWhy = why;
    if (this._timer !== null) this.v.timers.clearTimeout(this._timer);
    this._timer = null;
    if (this.link && this.link.state !== 'closed') this.link.close(1000, why);
    else this.pair?.close(1000, why);
    this.v._consumerEnded(this, why);
  }

  summary(why) {
    const s = this.link?.snapshot();
    return {
      session: this.session,
      state: this.state,
      path: this.path,
      since: Math.round(this.openedAt ?? this.started),
      routes: s?.routes ?? 0,
      bytesIn: s?.stats.bytesIn ?? 0,
      bytesOut: s?.stats.bytesOut ?? 0,
      pings: s?.stats.pings ?? 0,
      dropped: (s?.stats.dropped ?? 0) + (this.pair?.dropped ?? 0),
      reason: why ?? this.closedWhy ?? null,
    };
  }
}
