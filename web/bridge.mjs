#!/usr/bin/env node
// Test bridge standing in for WebRTC data channels between native consumers and a browser
// relay page.
//
//   native consumer ──ws──> /consumer      (speaks Broflake, client side)
//   relay page      ──ws──> /control       (told {"type":"consumer","id":N} per consumer)
//   relay page      ──ws──> /attach/N      (then piped 1:1 with consumer N)
//
// Messages are forwarded unchanged, one WebSocket message for one, binary or text as sent,
// so the page sees exactly what a data channel would deliver. Messages from a consumer that
// arrive before the page has attached are queued. A close on either side closes the other.
//
// CLI: node web/bridge.mjs [--listen 127.0.0.1:9001]   prints "listening on HOST:PORT".

import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { WebSocketServer } from 'ws';

/** Subprotocol selection of PROTOCOL.md §3.2, for the consumer side. */
function selectProtocol(offered) {
  let best = null;
  for (const p of offered) {
    const m = /^broflake\.v([1-9][0-9]*)$/.exec(p);
    if (m && Number(m[1]) === 1) best = p; // this bridge's relay speaks v1
  }
  if (best) return best;
  if (offered.has('broflake')) return 'broflake';
  return false;
}

/** A close code that may be sent in a Close frame (1005/1006 and friends may not). */
function sendableCode(code) {
  if ((code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) || (code >= 3000 && code <= 4999)) return code;
  return 1001;
}

function safeClose(ws, code, reason) {
  try {
    ws.close(sendableCode(code), String(reason ?? '').slice(0, 123));
  } catch {
    ws.terminate();
  }
}

/**
 * Starts the bridge. Returns {host, port, url, close(), stats, consumers}.
 * `log` (optional) receives one line per notable event.
 */
export async function startBridge({ host = '127.0.0.1', port = 0, log = () => {} } = {}) {
  const server = http.createServer((req, res) => {
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('not found\n');
  });
  const wss = new WebSocketServer({ noServer: true, maxPayload: 1 << 20, handleProtocols: (protocols) => selectProtocol(protocols) });
  const controls = new Set();
  const consumers = new Map(); // id -> {id, ws, queue, page, ended}
  const stats = { consumers: 0, attached: 0, toPage: 0, toConsumer: 0, bytesToPage: 0, bytesToConsumer: 0 };
  let nextId = 1;

  const announce = (entry) => {
    const msg = JSON.stringify({ type: 'consumer', id: entry.id });
    for (const c of controls) c.send(msg);
  };

  const onConsumer = (ws) => {
    const entry = { id: nextId++, ws, queue: [], page: null, ended: null };
    consumers.set(entry.id, entry);
    stats.consumers++;
    log(`consumer ${entry.id} connected (protocol ${ws.protocol || 'none'})`);
    ws.on('message', (data, isBinary) => {
      if (entry.page) {
        stats.toPage++;
        stats.bytesToPage += data.length;
        entry.page.send(data, { binary: isBinary });
      } else entry.queue.push([data, isBinary]);
    });
    ws.on('close', (code, reason) => {
      entry.ended = { code, reason: reason.toString() };
      log(`consumer ${entry.id} closed ${code}`);
      if (entry.page) safeClose(entry.page, code, reason.toString());
      else consumers.delete(entry.id);
    });
    ws.on('error', () => {});
    announce(entry);
  };

  const onControl = (ws) => {
    controls.add(ws);
    log('control connected');
    ws.on('close', () => controls.delete(ws));
    ws.on('error', () => {});
    for (const e of consumers.values()) if (!e.page && !e.ended) ws.send(JSON.stringify({ type: 'consumer', id: e.id }));
  };

  const onAttach = (ws, id) => {
    const entry = consumers.get(id);
    if (!entry || entry.page || entry.ended) {
      safeClose(ws, 4404, 'no such consumer');
      return;
    }
    entry.page = ws;
    stats.attached++;
    log(`consumer ${id} attached`);
    for (const [data, isBinary] of entry.queue) {
      stats.toPage++;
      stats.bytesToPage += data.length;
      ws.send(data, { binary: isBinary });
    }
    entry.queue = [];
    ws.on('message', (data, isBinary) => {
      stats.toConsumer++;
      stats.bytesToConsumer += data.length;
      if (entry.ws.readyState === entry.ws.OPEN) entry.ws.send(data, { binary: isBinary });
    });
    ws.on('close', (code, reason) => {
      log(`page side of consumer ${id} closed ${code}`);
      consumers.delete(id);
      if (entry.ws.readyState === entry.ws.OPEN) safeClose(entry.ws, code, reason.toString());
    });
    ws.on('error', () => {});
  };

  server.on('upgrade', (req, socket, head) => {
    const url = new URL(req.url, 'http://bridge');
    let handler = null;
    if (url.pathname === '/consumer') handler = onConsumer;
    else if (url.pathname === '/control') handler = onControl;
    else {
      const m = /^\/attach\/([0-9]+)$/.exec(url.pathname);
      if (m) handler = (ws) => onAttach(ws, Number(m[1]));
    }
    if (!handler) {
      socket.end('HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n');
      return;
    }
    wss.handleUpgrade(req, socket, head, handler);
  });

  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, resolve);
  });
  const addr = server.address();
  return {
    host: addr.address,
    port: addr.port,
    url: `ws://${addr.address}:${addr.port}`,
    stats,
    consumers,
    async close() {
      for (const c of wss.clients) c.terminate();
      wss.close();
      await new Promise((r) => server.close(r));
    },
  };
}

function parseHostPort(s) {
  const i = s.lastIndexOf(':');
  return { host: s.slice(0, i), port: Number(s.slice(i + 1)) };
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const args = process.argv.slice(2);
  let listen = '127.0.0.1:9001';
  for (let i = 0; i < args.length; i++) {
    if (args[i] === '--listen') listen = args[++i];
    else if (args[i] === '--help' || args[i] === '-h') {
      console.log('usage: node bridge.mjs [--listen HOST:PORT]   (default 127.0.0.1:9001)');
      process.exit(0);
    } else {
      console.error(`unknown argument ${args[i]}`);
      process.exit(2);
    }
  }
  const { host, port } = parseHostPort(listen);
  const bridge = await startBridge({ host, port, log: (l) => console.error(l) });
  console.log(`listening on ${bridge.host}:${bridge.port}`);
}
