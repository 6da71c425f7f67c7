import { startMiddlebox } from './middlebox.mjs';
import { startEgress, startStatic, launchBrowser, FAST_LIVENESS } from './test/helpers.mjs';
const T = 1500;
const egress = await startEgress({ config: FAST_LIVENESS });
const mb = await startMiddlebox({ upstream: `127.0.0.1:${egress.port}`, idleMs: T });
const web = await startStatic();
const browser = await launchBrowser();
const url = (x) => `${web.url}/index.html?egress=${encodeURIComponent(`ws://127.0.0.1:${mb.port}/broflake`)}&pool=3${x}`;
const pw = await browser.newPage(); await pw.goto(url(''));
const pm = await browser.newPage(); await pm.goto(url('&timers=main'));
for (const p of [pw, pm]) await p.waitForFunction(() => window.broflake?.snapshot().open === 3, null, { timeout: 15000 });
const front = await browser.newPage(); await front.bringToFront();
const t0 = Date.now();
const total = Number(process.argv[2] ?? 340) * 1000;
while (Date.now() - t0 < total) {
  await new Promise(r => setTimeout(r, 10000));
  const row = [];
  for (const [name, p] of [['worker', pw], ['main', pm]]) {
    const s = await p.evaluate(() => ({ s: window.broflake.snapshot(), v: document.visibilityState }));
    row.push(`${name}: ${s.v} timers=${s.s.timers} open=${s.s.open} reconnects=${s.s.stats.reconnects} dead=${s.s.stats.deadLinks} pongs=${s.s.stats.pongs} maxgap=${s.s.links.map(l => l.maxPingGapMs).join('/')}`);
  }
  console.log(`${Math.round((Date.now() - t0) / 1000)}s | ${row.join(' | ')} | blackholed=${mb.stats.blackholed}`);
}
await browser.close(); await web.close(); await mb.close(); await egress.stop();
