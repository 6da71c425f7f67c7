// The relay's downstream side: DownstreamLink, the server end of one consumer link
// (docs/PROTOCOL.md §7.2, §9.1, §10.4), relaying its routes by label switching (§12.2).
// Nothing here depends on the transport: frames come and go through Session, which takes
// a WebSocket, an RTCDataChannel or any object with the same four members.
import { Cap, Code, closeCodeFor, DEFAULT_MAX_FRAME_SIZE, EXT_USER_AGENT, MAX_USER_AGENT_BYTES, MIN_MAX_FRAME_SIZE, Role } from './constants.js';
import { hex } from './bytes.js';
import { encodeData, negotiate } from './codec.js';
import { getTimers } from './timers.js';
import { greaseCapability, greaseExtension, Session } from './session.js';
import { decodeUtf8, isZero, now, randomBytes } from './util.js';

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
 * Serves one downstream link (a WebSocket, an RTCDataChannel or any object with send(),
 * close(), onmessage and onclose) and relays its routes over `pool`:
 * (this link, downstream label) <-> (upstream link, upstream label).
 * Events: 'open' (hello info), 'close' ({code, reason}), 'route' ({label, upstream}).
 */
export class DownstreamLink extends Session {
  constructor(socket, pool, options = {}) {
    const opts = { ...DOWNSTREAM_DEFAULTS, ...options };
    super(opts.timers ?? pool?.timers ?? getTimers('auto'), 'await_hello', 'await_hello');
    this.pool = pool;
    this.opts = opts;
    this.routes = new Map(); // downstream label -> {label, up: Route|null, stale}
    this.highestSeen = -1;
    this.hello = null;
    this.params = null;
    this.closeInfo = null;
    this.stats = { messagesIn: 0, messagesOut: 0, bytesIn: 0, bytesOut: 0, packetsUp: 0, packetsDown: 0, dropped: 0, pings: 0, routesOpened: 0, routeLimit: 0 };
    this._tokens = opts.pingBurst;
    this._tokensAt = now();
    this._onMigrate = ({ from }) => {
      for (const e of this.routes.values()) if (e.up && e.up.link === from) e.stale = true;
    };
    pool?.on('migrate', this._onMigrate);
    this._attach(socket);
    this._timer('handshake', opts.handshakeTimeoutMs, () => {
      if (this.state !== 'await_hello') return;
      this._sendFrames([{ type: 'refuse', code: Code.HANDSHAKE_TIMEOUT, retry_after_ms: 0, reason: 'handshake timeout' }]);
      this._abort(4000 + Code.HANDSHAKE_TIMEOUT, 'handshake timeout');
    });
  }

  // -- handshake (§7.2, §7.4)

  _onHandshake(f) {
    if (f.type === 'hello') return this._onHello(f);
    return this._fatal(Code.PROTOCOL_VIOLATION, `${f.type} before HELLO`);
  }

  _onHello(f) {
    const o = this.opts;
    const neg = negotiate(o.serverMinVersion, o.serverMaxVersion, f.min_version, f.max_version);
    const refuse = (code, reason, retry = 0) => {
      this._sendFrames([{ type: 'refuse', code, retry_after_ms: retry, reason }]);
      this._abort(closeCodeFor(code), reason);
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
      wireCaps |= greaseCapability();
      extensions.push(greaseExtension(0));
    }
    let session = randomBytes(16);
    while (isZero(session)) session = randomBytes(16);
    const ua = f.extensions.find((e) => e.type === EXT_USER_AGENT);
    let userAgent = null;
    if (ua && ua.value.length <= MAX_USER_AGENT_BYTES) {
      try {
        userAgent = decodeUtf8(ua.value, 'user agent');
      } catch {
        userAgent = null; // invalid USER_AGENT: treated as absent
      }
    }
    this.hello = { role: f.role, version: Number(neg.version), capabilities: f.capabilities, userAgent, previous_session: hex(f.previous_session) };
    this.params = { keepalive_ms: keepalive, idle_timeout_ms: idle, max_frame_size: mff, max_routes: o.maxRoutes, capabilities: caps, session_id: hex(session) };
    this._sendFrames([
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
    this._setState('open');
    this.limit = mff;
    this.idleTimeoutMs = idle;
    this._clear('handshake');
    this._armIdle();
    if (caps & Cap.SERVER_PING) this._scheduleKeepalive();
    this.emit('open', this.hello);
  }

  // -- keepalive: PING rate limit (§10.4), server pings for clients without PING (§10.2)

  _onPing(f) {
    const t = now();
    this._tokens = Math.min(this.opts.pingBurst, this._tokens + ((t - this._tokensAt) / 1000) * this.opts.pingRefillPerSec);
    this._tokensAt = t;
    if (this._tokens < 1) return this._fatal(Code.RATE_LIMITED, 'ping flood');
    this._tokens -= 1;
    this.stats.pings++;
    super._onPing(f);
  }

  _keepaliveIntervalMs() {
    return this.params.keepalive_ms;
  }

  // -- routes: (this link, label) <-> (upstream link, upstream label) (§12.2)

  _onData(f) {
    if (this.hello.role === Role.PROBE) return this._fatal(Code.PROTOCOL_VIOLATION, 'DATA from a probe');
    const { label, packet } = f;
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

  _onRouteClose(f) {
    const e = this.routes.get(key(f.label));
    if (!e) return;
    this.routes.delete(key(f.label));
    e.up?.close(f.code);
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
      if (!this._roomForData(e.label, packet.length)) {
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
          this._sendFrames([{ type: 'route_close', label: e.label, code }]);
        }
      } else {
        e.up = null; // upstream link lost: re-mapped on the next DATA (§12.2)
      }
    };
    this.emit('route', { label: e.label, upstream: { session: r.link.welcome?.session_id, label: r.label } });
  }

  // -- ending

  _onTransportClose(ev) {
    this._end(ev.code ?? 1006, ev.reason ?? '', { remote: true });
  }

  _end(code, reason, { closeSocket = false } = {}) {
    if (this.state === 'closed') return;
    this._setState('closed');
    this._clearTimers();
    this.pool?.off('migrate', this._onMigrate);
    // Downstream link closed: ROUTE_CLOSE(upstream label, NO_ERROR) for each of its routes.
    for (const e of this.routes.values()) e.up?.close(Code.NO_ERROR);
    this.routes.clear();
    this.closeInfo = { code, reason };
    if (closeSocket) this._closeTransport(code, reason);
    this.emit('close', this.closeInfo);
  }

  snapshot() {
    return { state: this.state, hello: this.hello, params: this.params, routes: this.routes.size, stats: { ...this.stats }, closeInfo: this.closeInfo };
  }
}
