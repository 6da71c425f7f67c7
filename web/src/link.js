// The relay's upstream side: EgressLink, the client end of one connection to an egress
// (docs/PROTOCOL.md §7.1, §9.2, §10.1, §11), and the routes it carries (§12.1).
import { Cap, Code, closeCodeFor, EXT_USER_AGENT, MAX_USER_AGENT_BYTES, Role, SUBPROTOCOLS } from './constants.js';
import { BroflakeError } from './errors.js';
import { hex, toBytes, utf8 } from './bytes.js';
import { encodeData } from './codec.js';
import { getTimers } from './timers.js';
import { greaseCapability, greaseExtension, greaseFrame, Session } from './session.js';
import { now } from './util.js';

const TWO32 = 0x100000000;

function validReconnect(url) {
  return /^wss?:\/\/[^\s/]+/.test(url) ? url : '';
}

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
// EgressLink

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
export class EgressLink extends Session {
  constructor(url, options = {}) {
    const opts = { ...LINK_DEFAULTS, ...options };
    super(typeof opts.timers === 'object' ? opts.timers : getTimers(opts.timers), 'connecting', 'await_welcome');
    this.url = url;
    this.opts = opts;
    this.protocol = null;
    this.welcome = null;
    this.sessionId = null;
    this.refusal = null;
    this.closeInfo = null;
    this.wsClose = null;
    this.routes = new Map();
    this.nextLabel = 0;
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
    this._lastPingAt = null;
    this.startedAt = now();
    this.ready = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this.ready.catch(() => {});
    this._connect();
  }

  /** The WebSocket (null until connecting, or when it could not be created). */
  get ws() {
    return this.socket;
  }

  get keepaliveMs() {
    return this.welcome ? Number(this.welcome.keepalive_ms) : null;
  }

  /** Whether this link sends PINGs (client-driven keepalive in effect and enabled). */
  get pinging() {
    return !!(this.welcome && this.welcome.pingInEffect && this.opts.ping);
  }

  _connect() {
    const WS = this.opts.WebSocket ?? globalThis.WebSocket;
    this._timer('handshake', this.opts.handshakeTimeoutMs, () => {
      // ERROR(HANDSHAKE_TIMEOUT) is optional (§9.4): sent once there is a socket to carry it.
      if (this.state === 'await_welcome') this._fatal(Code.HANDSHAKE_TIMEOUT, 'handshake timeout');
      else this._abort(4000 + Code.HANDSHAKE_TIMEOUT, 'handshake timeout');
    });
    let ws;
    try {
      ws = new WS(this.url, [...this.opts.protocols]);
    } catch (e) {
      queueMicrotask(() => this._end(null, String(e?.message ?? e), { remote: false, error: new BroflakeError({ message: `cannot connect: ${e?.message ?? e}` }) }));
      return;
    }
    this._attach(ws);
    ws.onopen = () => this._onOpen();
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
      caps |= greaseCapability();
      extensions.push(greaseExtension(1));
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
    this.protocol = this.socket.protocol;
    this._setState('await_welcome');
    this._sendFrames([this._helloFrame()]);
  }

  // -- handshake (§7.1)

  _onHandshake(f) {
    if (f.type === 'welcome') return this._onWelcome(f);
    if (f.type === 'refuse') return this._onRefuse(f);
    return this._fatal(Code.PROTOCOL_VIOLATION, `${f.type} before WELCOME`);
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
    this.idleTimeoutMs = this.welcome.idle_timeout_ms;
    this._clear('handshake');
    this._setState('open');
    this.openedAt = now();
    this._lastRx = now();
    if (this.pinging) this._scheduleKeepalive();
    if (this.opts.idleTimeout) this._armIdle();
    if (this.opts.grease) this._queue(greaseFrame());
    this._resolve(this.welcome);
    this.emit('open', this.welcome);
  }

  _onRefuse(f) {
    const closeCode = closeCodeFor(f.code);
    this.refusal = { code: f.code, retry_after_ms: f.retry_after_ms, reason: f.reason };
    const error = new BroflakeError({ code: f.code, closeCode, reason: f.reason, retryAfterMs: Number(f.retry_after_ms), refused: true });
    this._end(closeCode, f.reason, { remote: true, error, refused: true });
  }

  // -- keepalive (§10.1)

  _onPing(f) {
    this.stats.serverPings++;
    super._onPing(f);
  }

  _keepaliveIntervalMs() {
    return this.welcome.keepalive_ms * (1 - Math.random() * 0.2);
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
    this._ping(payload, this._pongTimeoutMs(), { seq });
    this.stats.pingsSent++;
    this.emit('ping', { seq });
  }

  _onPongMatched(o) {
    const rttMs = now() - o.sentAt;
    this.stats.pongs++;
    this.stats.lastRttMs = rttMs;
    this.emit('pong', { seq: o.seq, rttMs });
  }

  // The link is taken for dead (no ERROR sent): the pool replaces it.
  _idleTimeout() {
    this._abort(4000 + Code.IDLE_TIMEOUT, 'idle timeout', { dead: true });
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

  _onData(f) {
    const route = this.routes.get(f.label);
    if (route) {
      this.stats.packetsIn++;
      route._deliver(f.packet);
    } else {
      this._queue({ type: 'route_close', label: f.label, code: Code.ROUTE_UNKNOWN });
    }
  }

  _onRouteClose(f) {
    const route = this.routes.get(f.label);
    if (route) {
      this.routes.delete(f.label);
      route._closed(f.code, true);
      this.emit('routes', this.routes.size);
    }
  }

  _sendData(label, packet) {
    if (!this._live() || packet.length === 0) return false;
    if (!this._roomForData(label, packet.length)) {
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
    if (this._live()) this._queue({ type: 'route_close', label: route.label, code });
    this.emit('routes', this.routes.size);
  }

  // -- ending

  _onTransportClose(ev) {
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
    this._end(ev.code, ev.reason, { remote: true, error, refused: !!this.refusal });
  }

  _end(code, reason, { remote = false, local = false, dead = false, error = null, refused = false, closeSocket = false } = {}) {
    if (this.state === 'closed') return;
    const wasOpen = this._live();
    this._clearTimers();
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
    const ws = this.socket;
    if (ws) {
      ws.onmessage = null;
      ws.onopen = null;
      // The socket may stay CLOSING for a long time when the path is black-holed; this
      // link is closed now, whatever the socket does later.
      if (closeSocket) this._closeTransport(code ?? 1000, reason);
      else if (refused) this._closeTransport(1000, '');
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
