// Demo page logic: pre-open a pool of upstream links to an egress, show it live, and relay
// consumers that arrive through the test bridge. window.broflake is the RelayPool.
import { RelayPool, DownstreamLink } from './broflake.js';

const q = new URLSearchParams(location.search);
const egress = q.get('egress');
const $ = (id) => document.getElementById(id);

const page = {
  downstreams: [],
  bridge: { url: q.get('bridge'), state: 'off', consumersSeen: 0 },
  visibility: [{ t: Math.round(performance.now()), state: document.visibilityState }],
};
window.broflakePage = page;

document.addEventListener('visibilitychange', () => {
  page.visibility.push({ t: Math.round(performance.now()), state: document.visibilityState });
  render();
});

function flag(name, fallback) {
  const v = q.get(name);
  if (v === null) return fallback;
  return !(v === '0' || v === 'false' || v === 'no');
}

function connectBridge(pool, base) {
  const ctl = new WebSocket(`${base}/control`);
  page.bridge.state = 'connecting';
  ctl.onopen = () => {
    page.bridge.state = 'connected';
    render();
  };
  ctl.onmessage = (ev) => {
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (msg.type !== 'consumer') return;
    page.bridge.consumersSeen++;
    const s = new WebSocket(`${base}/attach/${msg.id}`);
    s.binaryType = 'arraybuffer';
    const d = new DownstreamLink(s, pool);
    d.id = msg.id;
    page.downstreams.push(d);
    d.on('open', render);
    d.on('close', render);
    render();
  };
  ctl.onclose = () => {
    page.bridge.state = 'disconnected';
    render();
    if (!pool.stopped) setTimeout(() => connectBridge(pool, base), 1000);
  };
}

function cell(text, cls) {
  const td = document.createElement('td');
  td.textContent = text ?? '';
  if (cls) td.className = cls;
  return td;
}

function render() {
  const pool = window.broflake;
  if (!pool) return;
  const snap = pool.snapshot();
  $('open').textContent = snap.open;
  $('size').textContent = snap.size;
  $('connects').textContent = snap.stats.connects;
  $('reconnects').textContent = snap.stats.reconnects;
  $('pings').textContent = snap.stats.pingsSent;
  $('pongs').textContent = snap.stats.pongs;
  $('dead').textContent = snap.stats.deadLinks;
  $('consumers').textContent = page.downstreams.filter((d) => d.state !== 'closed').length;
  $('visibility').textContent = document.visibilityState;
  $('timers').textContent = snap.timers;
  $('bridge').textContent = page.bridge.url ? `${page.bridge.url} (${page.bridge.state})` : 'none';
  const rows = snap.links.map((l) => {
    const tr = document.createElement('tr');
    tr.append(
      cell(l.slot),
      cell(l.state + (l.retryInMs !== null && l.slotState === 'backoff' ? ` (retry in ${l.retryInMs} ms)` : ''), l.slotState === 'failed' ? 'failed' : l.state),
      cell(l.session ? l.session.slice(0, 12) + '…' : '', 'mono'),
      cell(l.pings),
      cell(l.pongs),
      cell(l.rttMs === null ? '' : l.rttMs.toFixed(1)),
      cell(l.maxPingGapMs ?? ''),
      cell(l.routes),
      cell(l.reconnects),
      cell(l.failed ?? (l.lastClose ? `${l.lastClose.code} ${l.lastClose.reason}` : '')),
    );
    return tr;
  });
  $('links').replaceChildren(...rows);
  $('downstreams').replaceChildren(
    ...page.downstreams.slice(-20).map((d) => {
      const s = d.snapshot();
      const tr = document.createElement('tr');
      tr.append(cell(d.id), cell(s.state, s.state), cell(s.hello?.role ?? ''), cell(s.routes), cell(s.stats.packetsUp), cell(s.stats.packetsDown), cell(s.stats.pings));
      return tr;
    }),
  );
  $('events').textContent = pool.events
    .slice(-30)
    .map((e) => `${(e.t / 1000).toFixed(1)}s ${e.what} slot ${e.slot}${e.code ? ` ${e.code} ${e.reason}` : ''}${e.session ? ` ${e.session.slice(0, 8)}` : ''}`)
    .join('\n');
}

if (!egress) {
  $('usage').hidden = false;
  window.broflake = null;
} else {
  const size = Math.max(1, Number(q.get('pool') ?? 3) || 3);
  const opts = { size, ping: flag('ping', true), timers: q.get('timers') ?? 'auto' };
  if (q.get('pong_timeout_ms')) opts.pongTimeoutMs = Number(q.get('pong_timeout_ms'));
  const pool = new RelayPool(egress, opts);
  window.broflake = pool;
  $('status').hidden = false;
  $('egress').textContent = egress;
  $('ping').textContent = opts.ping ? 'on' : 'off';
  let scheduled = false;
  pool.on('change', () => {
    if (scheduled) return;
    scheduled = true;
    queueMicrotask(() => {
      scheduled = false;
      render();
    });
  });
  if (page.bridge.url) connectBridge(pool, page.bridge.url.replace(/\/+$/, ''));
  setInterval(render, 1000);
  render();
}
