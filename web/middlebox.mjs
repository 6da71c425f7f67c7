#!/usr/bin/env node
// A TCP forwarder that silently black-holes idle flows, like a NAT or firewall whose
// connection-tracking entry expired: once a flow has carried no bytes in either direction
// for longer than idleMs, it stops forwarding in both directions. Nothing is closed or
// reset; bytes sent afterwards just vanish (they are read and dropped), and FIN or RST
// from either end is not passed on either. Each endpoint keeps believing its connection
// is up until its own timers notice.
//
// CLI: node web/middlebox.mjs --listen 127.0.0.1:0 --upstream 127.0.0.1:8080 --idle-ms 2000
// prints "listening on 127.0.0.1:PORT" on stdout and one line per flow event on stderr.

import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

function parseHostPort(s) {
  const i = s.lastIndexOf(':');
  if (i < 0) throw new Error(`expected HOST:PORT, got ${s}`);
  return { host: s.slice(0, i).replace(/^\[|\]$/g, ''), port: Number(s.slice(i + 1)) };
}

/**
 * Starts a middlebox. `listen` and `upstream` are "HOST:PORT" strings.
 * Returns {host, port, stats, flows, close()}; stats counts flows, black-holed flows and
 * bytes forwarded or dropped.
 */
export async function startMiddlebox({ listen = '127.0.0.1:0', upstream, idleMs, log = () => {} }) {
  if (!upstream) throw new Error('upstream is required');
  if (!(idleMs > 0)) throw new Error('idleMs must be positive');
  const up = parseHostPort(upstream);
  const at = parseHostPort(listen);
  const stats = { flows: 0, active: 0, blackholed: 0, bytesForwarded: 0, bytesDropped: 0 };
  const flows = new Set();
  let nextId = 1;

  const server = net.createServer({ allowHalfOpen: true }, (client) => {
    const flow = { id: nextId++, blackholed: false, startedAt: Date.now(), lastActivity: Date.now(), client, upstream: null, closed: 0 };
    flows.add(flow);
    stats.flows++;
    stats.active++;
    const upstreamSocket = net.connect({ host: up.host, port: up.port, allowHalfOpen: true });
    flow.upstream = upstreamSocket;
    client.setNoDelay(true);
    upstreamSocket.setNoDelay(true);

    const timer = setTimeout(() => {
      flow.blackholed = true;
      stats.blackholed++;
      log(`flow ${flow.id} black-holed after ${idleMs} ms idle`);
    }, idleMs);

    const pending = []; // client bytes before the upstream connection is up
    let upConnected = false;
    upstreamSocket.on('connect', () => {
      upConnected = true;
      for (const b of pending) upstreamSocket.write(b);
      pending.length = 0;
    });

    const pipe = (from, to, toReady) => {
      from.on('data', (chunk) => {
        if (flow.blackholed) {
          stats.bytesDropped += chunk.length;
          return;
        }
        flow.lastActivity = Date.now();
        timer.refresh();
        stats.bytesForwarded += chunk.length;
        if (!toReady()) {
          pending.push(chunk);
          return;
        }
        if (!to.write(chunk)) {
          from.pause();
          to.once('drain', () => from.resume());
        }
      });
      from.on('end', () => {
        if (!flow.blackholed) to.end();
      });
    };
    pipe(client, upstreamSocket, () => upConnected);
    pipe(upstreamSocket, client, () => true);

    // A flow that is still forwarded passes a close on; a black-holed one does not (the
    // other end keeps its socket until its own timers give up, or until close()).
    const onClose = (other) => () => {
      flow.closed++;
      if (!flow.blackholed) other.destroy();
      if (flow.closed === 1 && !flow.blackholed) clearTimeout(timer);
      if (flow.closed === 2) {
        clearTimeout(timer);
        flows.delete(flow);
        stats.active--;
        log(`flow ${flow.id} ended`);
      }
    };
    client.on('close', onClose(upstreamSocket));
    upstreamSocket.on('close', onClose(client));
    client.on('error', () => {});
    upstreamSocket.on('error', () => {});
    log(`flow ${flow.id} opened`);
  });

  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(at.port, at.host, resolve);
  });
  const addr = server.address();
  return {
    host: addr.address,
    port: addr.port,
    stats,
    flows,
    async close() {
      for (const f of flows) {
        f.client.destroy();
        f.upstream?.destroy();
      }
      await new Promise((r) => server.close(r));
    },
  };
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const args = process.argv.slice(2);
  const opts = { listen: '127.0.0.1:0', upstream: null, idleMs: null };
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === '--listen') opts.listen = args[++i];
    else if (a === '--upstream') opts.upstream = args[++i];
    else if (a === '--idle-ms') opts.idleMs = Number(args[++i]);
    else if (a === '--help' || a === '-h') {
      console.log('usage: node middlebox.mjs --listen HOST:PORT --upstream HOST:PORT --idle-ms MS');
      process.exit(0);
    } else {
      console.error(`unknown argument ${a}`);
      process.exit(2);
    }
  }
  if (!opts.upstream || !(opts.idleMs > 0)) {
    console.error('usage: node middlebox.mjs --listen HOST:PORT --upstream HOST:PORT --idle-ms MS');
    process.exit(2);
  }
  const mb = await startMiddlebox({ ...opts, log: (l) => console.error(l) });
  console.log(`listening on ${mb.host}:${mb.port}`);
}
