// Data through the browser relay: consumers arrive via the test bridge, the page relays
// their routes to the egress by label switching.
import test, { after, before, describe } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import { WebSocket } from 'ws';
import { startBridge } from '../bridge.mjs';
import { EgressLink, Role, Code } from '../broflake.js';
import { startFakeEgress } from './fake-egress.mjs';
import { startEgress, startStatic, launchBrowser, until, waitForLine, BROFLAKE_BIN } from './helpers.mjs';

/** Opens the relay page for `egressUrl` with the bridge, waits for the pool and the bridge. */
async function openRelayPage(browser, web, egressUrl, bridge, size = 2) {
  const page = await browser.newPage();
  await page.goto(`${web.url}/index.html?egress=${encodeURIComponent(egressUrl)}&pool=${size}&bridge=${encodeURIComponent(bridge.url)}`);
  await page.waitForFunction((n) => window.broflake?.snapshot().open === n && window.broflakePage.bridge.state === 'connected', size, { timeout: 15000 });
  return page;
}

describe('browser relay via the bridge, against a scripted egress', () => {
  let fake, bridge, web, browser, page;
  before(async () => {
    fake = await startFakeEgress({ keepaliveMs: 1000, idleTimeoutMs: 3000 });
    bridge = await startBridge();
    web = await startStatic();
    browser = await launchBrowser();
    page = await openRelayPage(browser, web, fake.url, bridge, 2);
  });
  after(async () => {
    await browser?.close();
    await web?.close();
    await bridge?.close();
    await fake?.close();
  });

  test('consumer handshake, PINGs and routes are relayed with label switching in Chromium', async () => {
    // A Broflake consumer (this module in Node) connecting through the bridge.
    const consumer = new EgressLink(`${bridge.url}/consumer`, { WebSocket, timers: 'main', role: Role.CONSUMER });
    const w = await consumer.ready;
    assert.equal(consumer.protocol, 'broflake.v1');
    assert.equal(w.keepalive_ms, 1000, 'downstream keepalive follows the upstream WELCOME');
    const routes = [0, 1, 2].map(() => consumer.openRoute());
    const got = new Map();
    for (const r of routes) r.onmessage = (p) => got.set(r.label, [...p]);
    routes.forEach((r, i) => r.send(Uint8Array.of(i, 100 + i, 200 + i)));
    await until(() => got.size === 3, { what: 'echoes through the browser relay' });
    for (let i = 0; i < 3; i++) assert.deepEqual(got.get(i), [200 + i, 100 + i, i]);
    await until(() => consumer.stats.pongs >= 1, { ms: 5000, what: 'a PONG from the browser relay' });
    // Upstream labels are allocated per upstream link from 0, spread over both links.
    const relayConns = fake.conns.filter((c) => c.hello?.role === Role.RELAY);
    const upLabels = relayConns.map((c) => c.data.map((d) => d.label));
    assert.deepEqual(upLabels.map((l) => l.length).sort(), [1, 2]);
    for (const l of upLabels) assert.deepEqual(l, l.map((_, i) => i));
    // The consumer closes: the page releases its routes upstream with NO_ERROR.
    consumer.close();
    await fake.until(() => relayConns.reduce((n, c) => n + c.routeCloses.filter((r) => r.code === Code.NO_ERROR).length, 0) === 3, 5000, 'routes released');
    const down = await page.evaluate(() => window.broflakePage.downstreams.map((d) => d.snapshot()));
    assert.equal(down.length, 1);
    assert.equal(down[0].hello.role, Role.CONSUMER);
    assert.equal(down[0].stats.packetsUp, 3);
    assert.equal(down[0].stats.packetsDown, 3);
    await until(async () => (await page.evaluate(() => window.broflakePage.downstreams[0].state)) === 'closed', { what: 'downstream closed in the page' });
  });
});

const SIZE = 8 * 1024 * 1024;

/** 8 MiB of deterministic bytes: SHA-256 in counter mode over a fixed seed. */
function makeBlob() {
  const out = Buffer.alloc(SIZE);
  for (let off = 0, i = 0; off < SIZE; off += 32, i++) {
    crypto.createHash('sha256').update(`broflake-web-${i}`).digest().copy(out, off);
  }
  return out;
}

describe('curl through native consumer -> bridge -> browser relay -> egress', () => {
  const haveConsumer = fs.existsSync(BROFLAKE_BIN);
  let egress, bridge, web, browser, page, files, consumer, consumerLog = '';
  let blob, blobSha;

  before(async () => {
    if (!haveConsumer) return;
    blob = makeBlob();
    blobSha = crypto.createHash('sha256').update(blob).digest('hex');
    files = http.createServer((req, res) => {
      if (req.url !== '/blob') {
        res.writeHead(404);
        res.end();
        return;
      }
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': blob.length });
      res.end(blob);
    });
    await new Promise((r) => files.listen(0, '127.0.0.1', r));
    egress = await startEgress();
    bridge = await startBridge();
    web = await startStatic();
    browser = await launchBrowser();
    page = await openRelayPage(browser, web, egress.url, bridge, 2);
  });

  after(async () => {
    if (consumer && consumer.exitCode === null) {
      const exited = new Promise((r) => consumer.once('exit', r));
      consumer.kill('SIGKILL');
      await exited;
    }
    await browser?.close();
    await web?.close();
    await bridge?.close();
    await egress?.stop();
    files?.close();
  });

  test('an 8 MiB file arrives intact (SHA-256 matches)', { skip: haveConsumer ? false : `native consumer not found at ${BROFLAKE_BIN} (set BROFLAKE_BIN)` }, async (t) => {
    consumer = spawn(BROFLAKE_BIN, ['consumer', '--relay', `${bridge.url}/consumer`, '--egress-cert-sha256', egress.certSha256, '--socks', '127.0.0.1:0'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    consumer.stderr.on('data', (d) => (consumerLog += d.toString().replace(/\x1b\[[0-9;]*m/g, '')));
    const [, socksPort] = await waitForLine(consumer.stderr, /socks5 listening on 127\.0\.0\.1:([0-9]+)/, 30000, 'consumer', consumer);
    const started = Date.now();
    const curl = spawn('curl', ['-sS', '--fail', '--max-time', '180', '--socks5-hostname', `127.0.0.1:${socksPort}`, `http://127.0.0.1:${files.address().port}/blob`, '-o', '-'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const hash = crypto.createHash('sha256');
    let bytes = 0;
    let curlErr = '';
    curl.stdout.on('data', (d) => {
      hash.update(d);
      bytes += d.length;
    });
    curl.stderr.on('data', (d) => (curlErr += d));
    const code = await new Promise((r) => curl.once('close', r));
    const secs = (Date.now() - started) / 1000;
    assert.equal(code, 0, `curl failed: ${curlErr}\nconsumer log:\n${consumerLog.slice(-3000)}`);
    assert.equal(bytes, SIZE);
    assert.equal(hash.digest('hex'), blobSha);
    const down = await page.evaluate(() => window.broflakePage.downstreams.map((d) => d.snapshot()));
    assert.equal(down.length, 1);
    assert.equal(down[0].hello.role, Role.CONSUMER);
    assert.ok(down[0].routes >= 1);
    assert.ok(down[0].stats.packetsDown > SIZE / 1400, `packets down ${down[0].stats.packetsDown}`);
    const pool = await page.evaluate(() => window.broflake.snapshot());
    assert.equal(pool.stats.reconnects, 0);
    t.diagnostic(`8 MiB in ${secs.toFixed(1)} s (${((SIZE / secs) * 8 / 1e6).toFixed(1)} Mbit/s) via the browser relay; packets up ${down[0].stats.packetsUp}, down ${down[0].stats.packetsDown}, dropped ${down[0].stats.dropped}`);
  });
});
