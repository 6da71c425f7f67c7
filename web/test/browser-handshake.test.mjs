// In Chromium against the real egress: the handshake, PING/PONG, and an in-band refusal
// that JavaScript can read.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { startEgress, startStatic, launchBrowser, FAST_LIVENESS } from './helpers.mjs';

let egress, web, browser, page;

before(async () => {
  egress = await startEgress({ config: FAST_LIVENESS });
  web = await startStatic();
  browser = await launchBrowser();
  page = await browser.newPage();
  await page.goto(`${web.url}/index.html`);
});

after(async () => {
  await browser?.close();
  await web?.close();
  await egress?.stop();
});

test('handshake with the real egress: WELCOME fields visible to JS, PING answered by PONG', async () => {
  const r = await page.evaluate(async (url) => {
    const m = await import('/broflake.js');
    const link = new m.EgressLink(url);
    const welcome = await link.ready;
    const pong = await new Promise((resolve) => link.once('pong', resolve));
    const out = { welcome, protocol: link.protocol, state: link.state, pong, timers: link.timers.kind, stats: { ...link.stats } };
    link.close();
    return JSON.parse(JSON.stringify(out, (k, v) => (typeof v === 'bigint' ? v.toString() : v)));
  }, egress.url);
  assert.equal(r.state, 'open');
  assert.equal(r.protocol, 'broflake.v1');
  assert.equal(r.welcome.version, 1);
  assert.match(r.welcome.session_id, /^[0-9a-f]{32}$/);
  assert.notEqual(r.welcome.session_id, '0'.repeat(32));
  assert.equal(r.welcome.keepalive_ms, 1000);
  assert.equal(r.welcome.idle_timeout_ms, 3000);
  assert.equal(r.welcome.max_frame_size, 16384);
  assert.equal(r.welcome.max_routes, 256);
  assert.equal(r.welcome.pingInEffect, true, 'client-driven keepalive in effect');
  assert.equal(r.welcome.serverPing, false);
  assert.equal(r.welcome.routesInEffect, true);
  assert.equal(r.welcome.goawayInEffect, true);
  assert.equal(r.pong.seq, 1);
  assert.ok(r.pong.rttMs >= 0 && r.pong.rttMs < 500, `rtt ${r.pong.rttMs}`);
  assert.equal(r.timers, 'worker', 'keepalive timers run in a Worker');
});

test('wrong version is refused in-band: JS sees code 1, closeCode 4001 and the exact reason', async () => {
  const r = await page.evaluate(async (url) => {
    const m = await import('/broflake.js');
    const link = new m.EgressLink(url, { minVersion: 2, maxVersion: 2, protocols: ['broflake'] });
    let err = null;
    try {
      await link.ready;
    } catch (e) {
      err = { name: e.name, code: e.code, closeCode: e.closeCode, reason: e.reason, refused: e.refused, retryAfterMs: e.retryAfterMs, isError: e instanceof Error };
    }
    // The WebSocket CloseEvent carries the same code and reason.
    for (let i = 0; i < 100 && !link.wsClose; i++) await new Promise((r) => setTimeout(r, 20));
    return { err, protocol: link.protocol, state: link.state, wsClose: link.wsClose };
  }, egress.url);
  assert.ok(r.err, 'ready rejected');
  assert.equal(r.err.isError, true);
  assert.equal(r.err.code, 1);
  assert.equal(r.err.closeCode, 4001);
  assert.equal(r.err.reason, 'unsupported version: client 2-2, server 1-1');
  assert.equal(r.err.refused, true);
  assert.equal(r.err.retryAfterMs, 0);
  assert.equal(r.protocol, 'broflake', 'the generic token was selected');
  assert.equal(r.state, 'closed');
  assert.ok(r.wsClose, 'CloseEvent seen');
  assert.equal(r.wsClose.code, 4001);
  assert.equal(r.wsClose.reason, 'unsupported version: client 2-2, server 1-1');
});

test('the demo page pre-opens its pool before any consumer arrives and exposes it on window.broflake', async () => {
  const p = await browser.newPage();
  await p.goto(`${web.url}/index.html?egress=${encodeURIComponent(egress.url)}&pool=3`);
  await p.waitForFunction(() => window.broflake && window.broflake.snapshot().open === 3, null, { timeout: 15000 });
  const snap = await p.evaluate(() => window.broflake.snapshot());
  assert.equal(snap.size, 3);
  assert.equal(snap.stats.connects, 3);
  assert.equal(snap.stats.reconnects, 0);
  assert.equal(new Set(snap.links.map((l) => l.session)).size, 3);
  await p.waitForFunction(() => window.broflake.snapshot().stats.pongs >= 3, null, { timeout: 10000 });
  const shown = await p.evaluate(() => ({ open: document.getElementById('open').textContent, rows: document.querySelectorAll('#links tr').length }));
  assert.equal(shown.open, '3');
  assert.equal(shown.rows, 3);
  await p.evaluate(() => window.broflake.stop());
  await p.close();
});
