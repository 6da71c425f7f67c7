// RelayPool: N pre-opened upstream links with reconnects and GOAWAY migration
// (docs/PROTOCOL.md §9.3, §11).
import { Code, codeName } from './constants.js';
import { Emitter } from './emitter.js';
import { getTimers } from './timers.js';
import { EgressLink } from './link.js';
import { now } from './util.js';

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
