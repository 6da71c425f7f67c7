// The egress's own status page (its admin listener's `/`), in real Chromium, with the egress
// under load from the load generator: the page loads, draws its charts, and the figures it
// shows are the ones /metrics reports. Keeps a screenshot.
import test, { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { startEgress, launchBrowser, until, WEB_DIR, EGRESS_BIN, FAST_LIVENESS } from './helpers.mjs';

const LOADGEN = process.env.LOADGEN_BIN || path.join(path.dirname(EGRESS_BIN), 'loadgen');
export const SCREENSHOT = path.resolve(WEB_DIR, '../target/screenshots/status-page.png');
const CONNS = 150;

let egress, browser, page, load;

/** The sum of a metric's series in a Prometheus exposition (optionally filtered by a label). */
function metric(text, name, label) {
  let sum = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const m = /^([a-z_]+)(\{[^}]*\})? (\S+)$/.exec(line);
    if (m && m[1] === name && (!label || (m[2] ?? '').includes(label))) sum += Number(m[3]);
  }
  return sum;
}

before(async () => {
  if (!fs.existsSync(LOADGEN)) throw new Error(`loadgen not found at ${LOADGEN}: cargo build -p bench (cargo xtask test builds it)`);
  egress = await startEgress({ config: FAST_LIVENESS, admin: true });
  // Steady load: handshaked connections that PING every second, held for the whole test.
  load = spawn(LOADGEN, ['--target', `127.0.0.1:${egress.port}`, '--conns', String(CONNS), '--ping-ms', '1000', '--hold-secs', '60'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  await new Promise((resolve, reject) => {
    let buf = '';
    load.stdout.on('data', (d) => {
      buf += d;
      if (buf.includes('handshaked')) resolve();
    });
    load.once('exit', (c) => reject(new Error(`loadgen exited ${c}`)));
  });
  browser = await launchBrowser();
  page = await browser.newPage();
});

after(async () => {
  load?.kill('SIGKILL');
  await browser?.close();
  await egress?.stop();
});

test('the status page shows what /metrics says, live, as charts', async () => {
  await page.setViewportSize({ width: 1200, height: 900 });
  await page.goto(`${egress.adminUrl}/`);
  assert.equal(await page.title(), 'Broflake egress');
  // A few samples (one every 2 s), so rates and charts have something to draw.
  await until(async () => Number(await page.evaluate(() => document.body.dataset.samples ?? 0)) >= 3, { ms: 20000, what: '3 samples on the page' });
  const shown = await page.evaluate(() => ({
    connections: document.getElementById('connections').textContent,
    liveness: document.getElementById('liveness').textContent,
    backend: document.getElementById('backend').textContent,
    handshakesRate: document.getElementById('handshakes-rate').textContent,
    memPerConn: document.getElementById('mem-per-conn').textContent,
    charts: [...document.querySelectorAll('svg path')].length,
  }));
  const text = await (await fetch(`${egress.adminUrl}/metrics`)).text();
  // The load is steady, so the page's last sample and the scrape agree.
  assert.equal(Number(shown.connections.replace(/,/g, '')), metric(text, 'broflake_connections'));
  assert.equal(metric(text, 'broflake_connections'), CONNS);
  assert.equal(shown.liveness, 'userspace');
  assert.ok(['tokio', 'uring'].includes(shown.backend), shown.backend);
  assert.ok(shown.charts >= 5, `charts drawn: ${shown.charts}`);
  assert.ok(Number(shown.memPerConn.replace(/,/g, '')) > 0, `memory per connection: ${shown.memPerConn}`);
  // The data behind the page is the exposition's: the status JSON's last sample equals it.
  const status = await (await fetch(`${egress.adminUrl}/status.json`)).json();
  const last = status.samples.at(-1);
  assert.equal(last.connections, CONNS);
  assert.equal(last.handshakes, metric(text, 'broflake_handshakes_total', 'result="accepted"'));
  fs.mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
  await page.screenshot({ path: SCREENSHOT, fullPage: true });
  assert.ok(fs.statSync(SCREENSHOT).size > 10000);
});
