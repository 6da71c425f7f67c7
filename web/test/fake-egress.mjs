// A scriptable Broflake server for tests, built on the module's own codec: answers HELLO,
// PING and DATA (echo), records everything it receives, and can refuse, stay silent,
// send GOAWAY or ROUTE_CLOSE on demand.
import http from 'node:http';
import { WebSocketServer } from 'ws';
import { Code, Cap, closeCodeFor } from '../src/constants.js';
import { decodeMessage, encodeMessage } from '../src/codec.js';

export async function startFakeEgress(options = {}) {
  const opts = {
    keepaliveMs: 20000,
    idleTimeoutMs: 60000,
    maxFrameSize: 16384,
    maxRoutes: 256,
    answerPings: true,
    echo: true,
    refuse: null, // {code, retryAfterMs, reason, frame: true|false}
    silent: false, // never answer HELLO
    ...options,
  };
  const server = http.createServer((req, res) => {
    res.writeHead(404);
    res.end();
  });
  const wss = new WebSocketServer({
    server,
    path: '/broflake',
    handleProtocols: (p) => (p.has('broflake.v1') ? 'broflake.v1' : p.has('broflake') ? 'broflake' : false),
  });
  const conns = [];
  let nextId = 1;
  const listeners = new Set();
  const notify = () => {
    for (const fn of [...listeners]) fn();
  };

  wss.on('connection', (ws, req) => {
    const c = {
      id: nextId++,
      ws,
      protocol: ws.protocol,
      offered: req.headers['sec-websocket-protocol'],
      state: 'await_hello',
      hello: null,
      sessionId: null,
      frames: [], // every frame received, in order
      data: [], // {label, packet}
      routeCloses: [], // {label, code}
      pings: [], // {at, payload}
      closed: null, // {code, reason}
      answerPings: opts.answerPings,
    };
    conns.push(c);
    ws.on('message', (buf, isBinary) => {
      if (!isBinary) {
        c.frames.push({ type: 'text' });
        notify();
        return;
      }
      let frames;
      try {
        frames = decodeMessage(new Uint8Array(buf), c.state === 'await_hello' ? 4096 : opts.maxFrameSize);
      } catch (e) {
        c.decodeError = e.kind;
        ws.close(closeCodeFor(e.code), e.kind);
        notify();
        return;
      }
      const out = [];
      for (const f of frames) {
        c.frames.push(f);
        if (f.type === 'hello') {
          c.hello = f;
          if (opts.silent) continue;
          if (opts.refuse) {
            const r = opts.refuse;
            if (r.frame !== false) out.push({ type: 'refuse', code: r.code, retry_after_ms: r.retryAfterMs ?? 0, reason: r.reason });
            if (out.length) ws.send(encodeMessage(out));
            ws.close(closeCodeFor(r.code), r.reason);
            c.state = 'closed';
            notify();
            return;
          }
          const session = new Uint8Array(16);
          globalThis.crypto.getRandomValues(session);
          session[0] |= 1;
          c.sessionId = session;
          const caps = Number(BigInt(f.capabilities) & 7n);
          out.push({
            type: 'welcome',
            version: 1,
            session_id: session,
            capabilities: caps & Cap.PING ? caps : caps | Cap.SERVER_PING,
            keepalive_ms: opts.keepaliveMs,
            idle_timeout_ms: opts.idleTimeoutMs,
            max_frame_size: opts.maxFrameSize,
            max_routes: opts.maxRoutes,
            extensions: [],
          });
          c.state = 'open';
        } else if (f.type === 'ping') {
          c.pings.push({ at: performance.now(), payload: f.payload.slice() });
          if (c.answerPings) out.push({ type: 'pong', payload: f.payload });
        } else if (f.type === 'data') {
          c.data.push({ label: f.label, packet: f.packet.slice() });
          if (opts.echo) out.push({ type: 'data', label: f.label, packet: echoPacket(f.packet) });
        } else if (f.type === 'route_close') {
          c.routeCloses.push({ label: f.label, code: f.code });
        }
      }
      if (out.length) ws.send(encodeMessage(out));
      notify();
    });
    ws.on('close', (code, reason) => {
      c.closed = { code, reason: reason.toString() };
      c.state = 'closed';
      notify();
    });
    ws.on('error', () => {});
    notify();
  });

  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address();
  return {
    url: `ws://127.0.0.1:${port}/broflake`,
    conns,
    opts,
    send(conn, frames) {
      conn.ws.send(encodeMessage(frames));
    },
    goaway(conn, graceMs = 5000, reconnect = '') {
      conn.ws.send(encodeMessage([{ type: 'goaway', grace_ms: graceMs, reconnect }]));
    },
    /** Resolves when fn() is truthy, re-checked on every server event (and every 20 ms). */
    until(fn, ms = 10000, what = 'condition') {
      return new Promise((resolve, reject) => {
        const check = () => {
          let v;
          try {
            v = fn();
          } catch {
            v = null;
          }
          if (v) {
            listeners.delete(check);
            clearInterval(iv);
            clearTimeout(t);
            resolve(v);
          }
        };
        const iv = setInterval(check, 20);
        const t = setTimeout(() => {
          listeners.delete(check);
          clearInterval(iv);
          reject(new Error(`fake egress: timed out waiting for ${what}`));
        }, ms);
        listeners.add(check);
        check();
      });
    },
    async close() {
      for (const c of wss.clients) c.terminate();
      wss.close();
      await new Promise((r) => server.close(r));
    },
  };
}

/** The echo: the packet with its bytes reversed, so that a reply is distinguishable. */
export function echoPacket(p) {
  return Uint8Array.from(p).reverse();
}

export { Code };
