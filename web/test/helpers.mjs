// Shared test fixtures: the real egress, a static file server for web/, Chromium, polling.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const WEB_DIR = fileURLToPath(new URL('..', import.meta.url));
export const EGRESS_BIN = process.env.EGRESS_BIN || path.resolve(WEB_DIR, '../target/debug/egress');
export const BROFLAKE_BIN = process.env.BROFLAKE_BIN || path.resolve(WEB_DIR, '../target/debug/broflake');
export const EGRESS_BACKEND = process.env.EGRESS_BACKEND ?? 'tokio';
export const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';

export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-quic',
];

const ANSI = /\x1b\[[0-9;]*m/g;

export function tmpDir(prefix) {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** Resolves with the first match of `re` in a stream's text, or rejects after `ms`. */
export function waitForLine(stream, re, ms, what, proc) {
  return new Promise((resolve, reject) => {
    let buf = '';
    const onData = (d) => {
      buf += d.toString().replace(ANSI, '');
      const m = re.exec(buf);
      if (m) {
        cleanup();
        resolve(m);
      }
    };
    const onExit = (code) => {
      cleanup();
      reject(new Error(`${what} exited (${code}) before printing ${re}:\n${buf.slice(-2000)}`));
    };
    const timer = setTimeout(() => {
      cleanup();
      reject(new Error(`${what} did not print ${re} within ${ms} ms:\n${buf.slice(-2000)}`));
    }, ms);
    const cleanup = () => {
      clearTimeout(timer);
      stream.off('data', onData);
      proc?.off('exit', onExit);
    };
    stream.on('data', onData);
    proc?.on('exit', onExit);
  });
}

/** Starts the real egress on a free port. `config` is TOML text (optional). */
export async function startEgress({ config, admin = false } = {}) {
  if (!fs.existsSync(EGRESS_BIN)) throw new Error(`egress binary not found at ${EGRESS_BIN} (set EGRESS_BIN)`);
  const dir = tmpDir('egress-');
  // The admin listener on a free port when asked for, else none: tests run egresses side by
  // side and its default port is fixed.
  // Userspace liveness: with none configured, the egress would attach XDP to the host's
  // loopback, and tests stay off the host's interfaces.
  const args = ['--ws', '127.0.0.1:0', '--no-wss', '--admin', admin ? '127.0.0.1:0' : 'off', '--liveness', 'userspace', '--allow', '127.0.0.0/8', '--state-dir', path.join(dir, 'state')];
  // The tokio backend unless EGRESS_BACKEND says otherwise ("auto", "uring"): these tests
  // are about the relay, not the egress's I/O backend.
  if (EGRESS_BACKEND) args.push('--backend', EGRESS_BACKEND);
  if (config) {
    fs.writeFileSync(path.join(dir, 'egress.toml'), config);
    args.push('--config', path.join(dir, 'egress.toml'));
  }
  const proc = spawn(EGRESS_BIN, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const log = [];
  proc.stderr.on('data', (d) => {
    log.push(d.toString().replace(ANSI, ''));
    if (log.length > 2000) log.splice(0, 1000);
  });
  const [certMatch, listenMatch, adminMatch] = await Promise.all([
    waitForLine(proc.stdout, /certificate sha256 ([0-9a-f]{64})/, 20000, 'egress', proc),
    waitForLine(proc.stderr, /listening on ws:\/\/127\.0\.0\.1:([0-9]+)/, 20000, 'egress', proc),
    admin ? waitForLine(proc.stdout, /status page\s+(http:\/\/127\.0\.0\.1:[0-9]+)\//, 20000, 'egress', proc) : null,
  ]);
  const port = Number(listenMatch[1]);
  return {
    port,
    adminUrl: adminMatch?.[1],
    url: `ws://127.0.0.1:${port}/broflake`,
    certSha256: certMatch[1],
    proc,
    log: () => log.join(''),
    async stop() {
      if (proc.exitCode === null) {
        const exited = new Promise((r) => proc.once('exit', r));
        proc.kill('SIGKILL');
        await exited;
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

export const FAST_LIVENESS = '[liveness]\nkeepalive = "1s"\nidle_timeout = "3s"\n';

const TYPES = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript', '.mjs': 'text/javascript', '.css': 'text/css', '.json': 'application/json' };

/** Serves web/ over HTTP on a free port. */
export async function startStatic(root = WEB_DIR) {
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://static');
    let rel = decodeURIComponent(url.pathname);
    if (rel.endsWith('/')) rel += 'index.html';
    const file = path.join(root, path.normalize(rel));
    if (!file.startsWith(root) || file.includes(`${path.sep}node_modules${path.sep}`) || !fs.existsSync(file) || !fs.statSync(file).isFile()) {
      res.writeHead(404);
      res.end('not found');
      return;
    }
    res.writeHead(200, { 'content-type': TYPES[path.extname(file)] ?? 'application/octet-stream', 'cache-control': 'no-store' });
    fs.createReadStream(file).pipe(res);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}`,
    close: () => new Promise((r) => server.close(r)),
  };
}

/**
 * Launches Debian's Chromium with a fresh user-data dir and connects over CDP.
 *
 * Why not chromium.launch(): the automation library turns on focus emulation for every
 * page it creates, and in Chromium that counts as the page being captured, which keeps it
 * "visible" even as a background tab. Attached over CDP without the library's default
 * overrides, tabs behave like a user's: bringing another tab to the front hides this one
 * (document.visibilityState === 'hidden') and its main-thread timers are throttled.
 */
export async function launchBrowser() {
  const { chromium } = await import('playwright-core');
  if (!fs.existsSync(CHROMIUM)) throw new Error(`Chromium not found at ${CHROMIUM}: apt-get install -y chromium`);
  const userDataDir = tmpDir('chromium-profile-');
  // Its own process group, so that its helper processes can be ended with it.
  const proc = spawn(CHROMIUM, [...CHROMIUM_ARGS, '--remote-debugging-port=0', `--user-data-dir=${userDataDir}`, 'about:blank'], {
    stdio: ['ignore', 'ignore', 'pipe'],
    detached: true,
  });
  const exited = new Promise((r) => proc.once('exit', r));
  const [, endpoint] = await waitForLine(proc.stderr, /DevTools listening on (ws:\/\/\S+)/, 30000, 'chromium', proc);
  const browser = await chromium.connectOverCDP(endpoint, { noDefaults: true });
  const context = browser.contexts()[0];
  return {
    browser,
    context,
    pid: proc.pid,
    async newPage() {
      const existing = context.pages().find((p) => p.url() === 'about:blank' && !p.__used);
      const p = existing ?? (await context.newPage());
      p.__used = true;
      return p;
    },
    async close() {
      await browser.close().catch(() => {});
      const timeout = new Promise((r) => setTimeout(r, 5000, 'timeout'));
      if (proc.exitCode === null && (await Promise.race([exited, timeout])) === 'timeout') {
        try {
          process.kill(-proc.pid, 'SIGKILL');
        } catch {
          proc.kill('SIGKILL');
        }
        await exited;
      }
      try {
        process.kill(-proc.pid, 'SIGKILL'); // helpers still running after the browser exited
      } catch {
        /* none left */
      }
      fs.rmSync(userDataDir, { recursive: true, force: true, maxRetries: 10, retryDelay: 100 });
    },
  };
}

/** Polls `fn` until it returns a truthy value; returns it. Throws after `ms`. */
export async function until(fn, { ms = 10000, every = 50, what = 'condition' } = {}) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, every));
  }
}

/** Waits for an event emitted once by an emitter with once(). */
export function once(emitter, event, ms = 10000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`no ${event} within ${ms} ms`)), ms);
    emitter.once(event, (v) => {
      clearTimeout(t);
      resolve(v);
    });
  });
}
