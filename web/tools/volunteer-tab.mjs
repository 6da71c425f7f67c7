#!/usr/bin/env node
// A browser volunteer under remote control, for tests and the bench that run it inside a
// network namespace: serves web/ on the namespace's loopback, launches Debian's Chromium,
// opens the volunteer page on the given egress and signaling service, and then obeys one
// JSON command per stdin line, answering one JSON line per command on stdout (events, such
// as a consumer connecting, are lines too). Exits when stdin closes.
//
//   node web/tools/volunteer-tab.mjs --egress ws://…/broflake --signal ws://…/v1/signal
//       [--slots 4] [--pool 2] [--middlebox-idle-ms T] [--pong-timeout-ms MS]
//       [--consumer-keepalive-ms MS]
//
// With --middlebox-idle-ms the page reaches the egress through web/middlebox.mjs, which
// silently cuts flows idle longer than T (as the middleboxes in the mission statement do).
//
// Commands: {"cmd":"snapshot"} → {"snapshot":{volunteer, pool, visibility, cpu}};
// {"cmd":"pairs"} → {"pairs":{SESSION:[{local, remote, bytesSent, bytesReceived, nominated}]}};
// {"cmd":"hide"} / {"cmd":"show"} → {"visibility":"hidden"|"visible"} (another tab brought
// to the front, the volunteer tab made a real background tab); {"cmd":"screenshot","path":P}
// → {"screenshot":P}; {"cmd":"close"} → {"closed":true} (the tab closed as a user would).
// Lines: {"ready":{…, chromium_pgid}} once registered; {"consumer":{session, path}} per connected consumer.
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { startMiddlebox } from '../middlebox.mjs';
import { launchBrowser, startStatic, until } from '../test/helpers.mjs';

function args() {
  const a = { slots: '4', pool: '2' };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i].replace(/^--/, '');
    a[k] = argv[++i];
  }
  for (const need of ['egress', 'signal']) if (!a[need]) throw new Error(`--${need} is required`);
  return a;
}

const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

/** CPU seconds (user + system) of every process in Chromium's process group. */
function chromiumCpuSeconds(pgid) {
  let ticks = 0;
  for (const pid of fs.readdirSync('/proc')) {
    if (!/^[0-9]+$/.test(pid)) continue;
    let stat;
    try {
      stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    } catch {
      continue;
    }
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (Number(f[2]) !== pgid) continue; // field 5: pgrp
    ticks += Number(f[11]) + Number(f[12]); // fields 14, 15: utime, stime
  }
  return ticks / 100; // USER_HZ
}

const a = args();
const web = await startStatic();
let mb = null;
let egress = a.egress;
if (a['middlebox-idle-ms']) {
  const u = new URL(a.egress);
  mb = await startMiddlebox({ upstream: `${u.hostname}:${u.port || 80}`, idleMs: Number(a['middlebox-idle-ms']) });
  egress = `ws://127.0.0.1:${mb.port}${u.pathname}`;
}
const browser = await launchBrowser();
let front = null;
const page = await browser.newPage();
const shutdown = async () => {
  await browser.close();
  await web.close();
  await mb?.close();
  process.exit(0);
};
try {
  const q = new URLSearchParams({ egress, signal: a.signal, slots: a.slots, pool: a.pool });
  if (a['pong-timeout-ms']) q.set('pong_timeout_ms', a['pong-timeout-ms']);
  if (a['consumer-keepalive-ms']) q.set('consumer_keepalive_ms', a['consumer-keepalive-ms']);
  await page.goto(`${web.url}/index.html?${q}`);
  await page.bringToFront();
  await page.waitForFunction(() => window.broflakePage.volunteer?.state === 'registered', null, { timeout: 30000 });
  await page.exposeFunction('__consumer', (c) => out({ consumer: c }));
  await page.evaluate(() =>
    window.broflakePage.volunteer.on('consumer', (c) => {
      // The path is read from getStats a moment after the channels open.
      const report = (n) => (c.path || n === 0 ? window.__consumer({ session: c.session, path: c.path }) : setTimeout(report, 50, n - 1));
      report(40);
    }),
  );
  // Chromium runs in a process group of its own: whoever kills this script without letting
  // it shut down (SIGKILL) must end that group too.
  out({ ready: { volunteer: await page.evaluate(() => window.broflakePage.volunteer.snapshot()), middlebox: mb ? mb.port : null, chromium_pgid: browser.pid } });
} catch (e) {
  out({ error: `the volunteer page did not start: ${e.message}` });
  await shutdown();
}

const snapshot = async () => {
  const s = page.isClosed()
    ? {}
    : await page.evaluate(() => ({
        volunteer: window.broflakePage.volunteer?.snapshot() ?? null,
        pool: window.broflake?.snapshot() ?? null,
        events: [...(window.broflake?.events ?? []), ...(window.broflakePage.volunteer?.events ?? [])].sort((a, b) => a.t - b.t).slice(-20),
        visibility: window.broflakePage.visibility,
        state: document.visibilityState,
      }));
  return { ...s, cpu: chromiumCpuSeconds(browser.pid), middlebox: mb ? { ...mb.stats } : null };
};

const commands = {
  snapshot: async () => ({ snapshot: await snapshot() }),
  pairs: async () => ({ pairs: await page.evaluate(() => window.broflakePage.volunteer.pairs()) }),
  // A CPU profile of the page's JavaScript for `ms`: the functions with the most self time.
  profile: async (c) => {
    const cdp = await page.context().newCDPSession(page);
    await cdp.send('Profiler.enable');
    await cdp.send('Profiler.start');
    await new Promise((r) => setTimeout(r, c.ms ?? 5000));
    const { profile } = await cdp.send('Profiler.stop');
    const byNode = new Map(profile.nodes.map((n) => [n.id, n]));
    const self = new Map();
    const dt = profile.timeDeltas;
    profile.samples.forEach((id, i) => {
      const f = byNode.get(id).callFrame;
      const k = `${f.functionName || '(anonymous)'} ${f.url.split('/').pop()}:${f.lineNumber + 1}`;
      self.set(k, (self.get(k) ?? 0) + (dt[i] ?? 0) / 1000);
    });
    const total = [...self.values()].reduce((a, b) => a + b, 0);
    const top = [...self.entries()].sort((a, b) => b[1] - a[1]).slice(0, 25).map(([k, ms]) => `${ms.toFixed(0).padStart(6)} ms ${k}`);
    await cdp.detach();
    return { profile: { totalMs: Math.round(total), top } };
  },
  hide: async () => {
    front ??= await browser.newPage();
    await front.bringToFront();
    await page.waitForFunction(() => document.visibilityState === 'hidden', null, { timeout: 5000 });
    return { visibility: 'hidden' };
  },
  show: async () => {
    await page.bringToFront();
    await page.waitForFunction(() => document.visibilityState === 'visible', null, { timeout: 5000 });
    return { visibility: 'visible' };
  },
  screenshot: async (c) => {
    fs.mkdirSync(path.dirname(c.path), { recursive: true });
    await page.screenshot({ path: c.path, fullPage: true });
    return { screenshot: c.path };
  },
  close: async () => {
    await page.close({ runBeforeUnload: false });
    await until(() => page.isClosed(), { what: 'the tab closed' });
    return { closed: true };
  },
};

for await (const line of readline.createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  let c;
  try {
    c = JSON.parse(line);
    const f = commands[c.cmd];
    if (!f) throw new Error(`unknown command ${c.cmd}`);
    out(await f(c));
  } catch (e) {
    out({ error: `${c?.cmd ?? line}: ${e.message}` });
  }
}
await shutdown();
