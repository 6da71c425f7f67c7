// The volunteer page: a person opens it, names an egress and a signaling service (or the
// query string does), presses Start, and the tab serves censored users' consumers over
// WebRTC until Stop or until the tab goes away. window.broflake is the RelayPool,
// window.broflakePage holds {volunteer, visibility} for tests and the curious.
import { RelayPool, Volunteer } from './broflake.js';

const q = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);

const page = {
  volunteer: null,
  visibility: [{ t: Math.round(performance.now()), state: document.visibilityState }],
};
window.broflakePage = page;
window.broflake = null;

document.addEventListener('visibilitychange', () => {
  page.visibility.push({ t: Math.round(performance.now()), state: document.visibilityState });
  render();
});

function flag(name, fallback) {
  const v = q.get(name);
  if (v === null) return fallback;
  return !(v === '0' || v === 'false' || v === 'no');
}

function cell(text, cls) {
  const td = document.createElement('td');
  td.textContent = text ?? '';
  if (cls) td.className = cls;
  return td;
}

function mib(n) {
  return n < 1 << 20 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / (1 << 20)).toFixed(1)} MiB`;
}

let scheduled = false;
function soon() {
  if (scheduled) return;
  scheduled = true;
  queueMicrotask(() => {
    scheduled = false;
    render();
  });
}

function start() {
  if (window.broflake) return;
  const egress = $('f-egress').value.trim();
  const signal = $('f-signal').value.trim();
  if (!egress) {
    $('f-error').textContent = 'name the egress WebSocket URL (ws:// or wss://)';
    return;
  }
  $('f-error').textContent = '';
  const size = Math.max(1, Number($('f-pool').value) || 3);
  const opts = { size, ping: flag('ping', true), timers: q.get('timers') ?? 'auto' };
  if (q.get('pong_timeout_ms')) opts.pongTimeoutMs = Number(q.get('pong_timeout_ms'));
  const pool = new RelayPool(egress, opts);
  window.broflake = pool;
  pool.on('change', soon);
  if (signal) {
    const slots = Math.max(1, Number($('f-slots').value) || 4);
    const downstream = {};
    if (q.get('consumer_keepalive_ms')) downstream.keepaliveMs = Number(q.get('consumer_keepalive_ms'));
    const v = new Volunteer(signal, pool, { slots, downstream });
    page.volunteer = v;
    v.on('change', soon);
    // Announce only once a link to the egress is open: before that there is nothing to relay to.
    pool.whenOpen(1).then(() => v.start(), () => {});
  }
  $('status').hidden = false;
  $('start').disabled = true;
  $('stop').disabled = false;
  render();
}

function stop() {
  page.volunteer?.stop();
  window.broflake?.stop();
  page.volunteer = null;
  window.broflake = null;
  $('start').disabled = false;
  $('stop').disabled = true;
  render();
}

// Closing the tab: reset the consumers' channels so that they move to another volunteer at
// once instead of after their PONG timeout (PROTOCOL.md §17.9).
window.addEventListener('pagehide', () => page.volunteer?.stop());

function renderVolunteer(v) {
  if (!v) {
    $('v-state').textContent = 'not volunteering (no signaling service)';
    $('consumers').replaceChildren();
    return;
  }
  const s = v.snapshot();
  $('v-state').textContent = s.state + (s.id ? ` as ${s.id}` : '') + (s.state !== 'registered' && s.lastError ? ` (${s.lastError})` : '');
  $('helping').textContent = s.consumers.filter((c) => c.state === 'open').length;
  $('helped').textContent = s.stats.connected;
  $('free').textContent = `${s.free}/${s.slots}`;
  $('relayed').textContent = mib(s.bytes.in + s.bytes.out);
  const rows = [...s.consumers, ...s.ended.slice().reverse()].slice(0, 20).map((c) => {
    const tr = document.createElement('tr');
    const path = c.path ? `${c.path.local} → ${c.path.remote}` : '';
    tr.append(cell(c.session.slice(0, 8) + '…', 'mono'), cell(c.state, c.state), cell(path), cell(c.routes), cell(mib(c.bytesIn)), cell(mib(c.bytesOut)), cell(c.pings), cell(c.reason ?? ''));
    return tr;
  });
  $('consumers').replaceChildren(...rows);
}

function render() {
  $('visibility').textContent = document.visibilityState;
  const pool = window.broflake;
  if (!pool) return;
  const snap = pool.snapshot();
  $('egress').textContent = pool.url;
  $('ping').textContent = pool.linkOptions.ping === false ? 'off' : 'on';
  $('open').textContent = snap.open;
  $('size').textContent = snap.size;
  $('connects').textContent = snap.stats.connects;
  $('reconnects').textContent = snap.stats.reconnects;
  $('pings').textContent = snap.stats.pingsSent;
  $('pongs').textContent = snap.stats.pongs;
  $('dead').textContent = snap.stats.deadLinks;
  $('timers').textContent = snap.timers;
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
  renderVolunteer(page.volunteer);
  const events = [...pool.events.map((e) => ({ ...e, what: `egress link: ${e.what} slot ${e.slot}` })), ...(page.volunteer?.events ?? [])].sort((a, b) => a.t - b.t);
  $('events').textContent = events
    .slice(-30)
    .map((e) => `${(e.t / 1000).toFixed(1)}s ${e.what}${e.code ? ` ${e.code} ${e.reason}` : ''}${e.session ? ` ${e.session.slice(0, 8)}` : ''}`)
    .join('\n');
}

$('f-egress').value = q.get('egress') ?? '';
$('f-signal').value = q.get('signal') ?? '';
$('f-slots').value = q.get('slots') ?? '4';
$('f-pool').value = q.get('pool') ?? '3';
$('start').addEventListener('click', start);
$('stop').addEventListener('click', stop);
setInterval(render, 1000);
if (q.get('egress') && flag('autostart', true)) start();
render();
