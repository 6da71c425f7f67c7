// EgressLink, RelayPool and DownstreamLink in Node, against a scriptable fake server.
import test from 'node:test';
import assert from 'node:assert/strict';
import { WebSocket, WebSocketServer } from 'ws';
import { EgressLink, RelayPool, DownstreamLink, Code, Cap, Role, BroflakeError, decodeMessage, encodeMessage, hex, isGrease } from '../broflake.js';
import { startFakeEgress, echoPacket } from './fake-egress.mjs';
import { until } from './helpers.mjs';

const linkOpts = { WebSocket, timers: 'main' };
const seqOf = (payload) => Number(new DataView(payload.buffer, payload.byteOffset, 8).getBigUint64(0));

async function withFake(options, fn) {
  const fake = await startFakeEgress(options);
  try {
    await fn(fake);
  } finally {
    await fake.close();
  }
}

test('handshake: subprotocols, HELLO as a relay with grease, WELCOME fields', () =>
  withFake({ keepaliveMs: 20000, idleTimeoutMs: 60000, maxRoutes: 7 }, async (fake) => {
    const link = new EgressLink(fake.url, linkOpts);
    const w = await link.ready;
    assert.equal(link.state, 'open');
    assert.equal(link.protocol, 'broflake.v1');
    assert.equal(w.version, 1);
    assert.equal(w.keepalive_ms, 20000);
    assert.equal(w.idle_timeout_ms, 60000);
    assert.equal(w.max_routes, 7);
    assert.equal(w.pingInEffect, true);
    assert.match(w.session_id, /^[0-9a-f]{32}$/);
    const c = fake.conns[0];
    assert.deepEqual(c.offered.split(',').map((t) => t.trim()), ['broflake.v1', 'broflake']);
    const h = c.hello;
    assert.equal(h.role, Role.RELAY);
    assert.equal(h.min_version, 1);
    assert.equal(h.max_version, 1);
    const caps = BigInt(h.capabilities);
    assert.equal(caps & 0xffn, BigInt(Cap.PING | Cap.ROUTES | Cap.GOAWAY));
    const greaseBits = caps >> 48n;
    assert.ok(greaseBits > 0n && greaseBits < 1n << 14n, 'one grease capability bit in 48-61');
    assert.equal(hex(h.previous_session), '0'.repeat(32));
    const ua = h.extensions.find((e) => e.type === 1);
    assert.equal(new TextDecoder().decode(ua.value), 'broflake-web/0.1');
    assert.ok(h.extensions.some((e) => isGrease(e.type)), 'a grease extension');
    // One grease frame (I bit set) after WELCOME.
    await fake.until(() => c.frames.some((f) => f.type === 'unknown'), 2000, 'grease frame');
    const g = c.frames.find((f) => f.type === 'unknown');
    assert.equal(g.flags, 0x80);
    assert.ok(isGrease(g.frame_type));
    link.close();
    await fake.until(() => c.closed, 2000, 'close');
    assert.equal(c.closed.code, 1000);
  }));

test('PING: 8-byte big-endian sequence from 1, every keepalive x (1 - j), PONGs counted', () =>
  withFake({ keepaliveMs: 1000, idleTimeoutMs: 3000 }, async (fake) => {
    const link = new EgressLink(fake.url, linkOpts);
    await link.ready;
    const c = fake.conns[0];
    const openedAt = performance.now();
    await fake.until(() => c.pings.length >= 4, 6000, '4 pings');
    assert.deepEqual(c.pings.slice(0, 4).map((p) => seqOf(p.payload)), [1, 2, 3, 4]);
    for (const p of c.pings) assert.equal(p.payload.length, 8);
    const gaps = [c.pings[0].at - openedAt, ...c.pings.slice(1, 4).map((p, i) => p.at - c.pings[i].at)];
    for (const g of gaps) assert.ok(g >= 780 && g <= 1150, `interval ${g.toFixed(0)} ms outside keepalive x [0.8, 1.0]`);
    await until(() => link.stats.pongs >= 4, { ms: 2000, what: 'pongs' });
    assert.ok(link.stats.lastRttMs >= 0 && link.stats.lastRttMs < 500);
    link.close();
  }));

test('dead link: no PONG within min(keepalive/2, 10 s) closes with 4007 "pong timeout"', () =>
  withFake({ keepaliveMs: 1000, idleTimeoutMs: 3000, answerPings: false }, async (fake) => {
    const link = new EgressLink(fake.url, linkOpts);
    await link.ready;
    const closed = new Promise((r) => link.once('close', r));
    const info = await closed;
    const c = fake.conns[0];
    assert.equal(info.code, 4007);
    assert.equal(info.reason, 'pong timeout');
    assert.equal(info.dead, true);
    assert.equal(c.pings.length, 1);
    const waited = link.closedAt - (c.pings[0].at);
    assert.ok(waited >= 450 && waited < 800, `closed ${waited.toFixed(0)} ms after the PING (expected ~500)`);
    await fake.until(() => c.closed, 2000, 'server sees the close');
    assert.equal(c.closed.code, 4007);
    assert.equal(c.closed.reason, 'pong timeout');
  }));

test('at most one PING outstanding: a due PING is skipped while one waits for its PONG', () =>
  withFake({ keepaliveMs: 1000, idleTimeoutMs: 3000, answerPings: false }, async (fake) => {
    const link = new EgressLink(fake.url, { ...linkOpts, pongTimeoutMs: 2600, idleTimeout: false });
    await link.ready;
    const info = await new Promise((r) => link.once('close', r));
    assert.equal(info.reason, 'pong timeout');
    assert.equal(fake.conns[0].pings.length, 1, 'no second PING while the first is outstanding');
    assert.ok(link.closeInfo.openForMs > 3000);
  }));

test('server PINGs are answered with identical PONGs; unmatched PONGs are ignored', () =>
  withFake({ keepaliveMs: 20000, idleTimeoutMs: 60000 }, async (fake) => {
    const link = new EgressLink(fake.url, linkOpts);
    await link.ready;
    const c = fake.conns[0];
    const payload = Uint8Array.of(9, 8, 7, 6, 5);
    fake.send(c, [{ type: 'ping', payload }, { type: 'pong', payload: Uint8Array.of(1) }, { type: 'ping', payload: new Uint8Array(64) }]);
    await fake.until(() => c.frames.filter((f) => f.type === 'pong').length >= 2, 2000, 'pongs');
    const pongs = c.frames.filter((f) => f.type === 'pong');
    assert.deepEqual([...pongs[0].payload], [9, 8, 7, 6, 5]);
    assert.equal(pongs[1].payload.length, 64);
    assert.equal(link.stats.pongs, 0);
    assert.equal(link.state, 'open');
    link.close();
  }));

test('REFUSE frame: Error with code, closeCode 4000+code, reason and retry_after_ms', () =>
  withFake({ refuse: { code: Code.SERVER_FULL, retryAfterMs: 5000, reason: 'server full' } }, async (fake) => {
    const link = new EgressLink(fake.url, linkOpts);
    const err = await link.ready.then(
      () => null,
      (e) => e,
    );
    assert.ok(err instanceof BroflakeError);
    assert.equal(err.code, 8);
    assert.equal(err.closeCode, 4008);
    assert.equal(err.reason, 'server full');
    assert.equal(err.retryAfterMs, 5000);
    assert.equal(err.refused, true);
  }));

test('refusal carried only by the CloseEvent still gives code, closeCode and reason', () =>
  withFake({ refuse: { code: Code.UNSUPPORTED_VERSION, reason: 'unsupported version: client 2-3, server 1-1', frame: false } }, async (fake) => {
    const link = new EgressLink(fake.url, { ...linkOpts, minVersion: 2, maxVersion: 3 });
    const err = await link.ready.then(
      () => null,
      (e) => e,
    );
    assert.equal(err.code, 1);
    assert.equal(err.closeCode, 4001);
    assert.equal(err.reason, 'unsupported version: client 2-3, server 1-1');
    assert.equal(fake.conns[0].hello.min_version, 2);
    assert.equal(fake.conns[0].hello.max_version, 3);
  }));

test('handshake timeout: no WELCOME within the limit closes with 4006', () =>
  withFake({ silent: true }, async (fake) => {
    const link = new EgressLink(fake.url, { ...linkOpts, handshakeTimeoutMs: 400 });
    const err = await link.ready.then(
      () => null,
      (e) => e,
    );
    assert.equal(err.code, Code.HANDSHAKE_TIMEOUT);
    assert.equal(err.closeCode, 4006);
    await fake.until(() => fake.conns[0].closed, 2000, 'close');
    assert.equal(fake.conns[0].closed.code, 4006);
  }));

test('routes: monotonic labels, DATA both ways, ROUTE_CLOSE both ways, unknown label -> ROUTE_UNKNOWN', () =>
  withFake({}, async (fake) => {
    const link = new EgressLink(fake.url, linkOpts);
    await link.ready;
    const c = fake.conns[0];
    const r0 = link.openRoute();
    const r1 = link.openRoute();
    assert.deepEqual([r0.label, r1.label], [0, 1]);
    const got = [];
    r1.onmessage = (p) => got.push([...p]);
    assert.equal(r1.send(Uint8Array.of(1, 2, 3)), true);
    await until(() => got.length === 1, { what: 'echo' });
    assert.deepEqual(got[0], [3, 2, 1]);
    assert.deepEqual(c.data.map((d) => d.label), [1]);
    // Server closes route 1.
    let closed = null;
    r1.onclose = (code, remote) => (closed = { code, remote });
    fake.send(c, [{ type: 'route_close', label: 1, code: Code.ROUTE_LIMIT }]);
    await until(() => closed, { what: 'route close' });
    assert.deepEqual(closed, { code: Code.ROUTE_LIMIT, remote: true });
    assert.equal(r1.send(Uint8Array.of(1)), false);
    // Client closes route 0.
    r0.close();
    await fake.until(() => c.routeCloses.length === 1, 2000, 'ROUTE_CLOSE');
    assert.deepEqual(c.routeCloses[0], { label: 0, code: Code.NO_ERROR });
    // Labels are never reused.
    assert.equal(link.openRoute().label, 2);
    // DATA on a label that is not open here.
    fake.send(c, [{ type: 'data', label: 77, packet: Uint8Array.of(1) }]);
    await fake.until(() => c.routeCloses.length === 2, 2000, 'ROUTE_UNKNOWN');
    assert.deepEqual(c.routeCloses[1], { label: 77, code: Code.ROUTE_UNKNOWN });
    link.close();
  }));

test('protocol errors: undecodable message -> ERROR + close 4000+code; text -> 1003', () =>
  withFake({}, async (fake) => {
    const a = new EgressLink(fake.url, linkOpts);
    await a.ready;
    fake.conns[0].ws.send(Buffer.from([0x0a, 0x00, 0x00])); // unknown type, I clear
    await fake.until(() => fake.conns[0].closed, 2000, 'close');
    assert.equal(fake.conns[0].closed.code, 4004);
    assert.equal(fake.conns[0].closed.reason, 'unknown_frame');
    const err = fake.conns[0].frames.find((f) => f.type === 'error');
    assert.equal(err.code, Code.UNKNOWN_FRAME);
    const b = new EgressLink(fake.url, linkOpts);
    await b.ready;
    fake.conns[1].ws.send('hello', { binary: false });
    await fake.until(() => fake.conns[1].closed, 2000, 'close');
    assert.equal(fake.conns[1].closed.code, 1003);
    assert.equal(fake.conns[1].closed.reason, 'text messages are not allowed');
    const c = new EgressLink(fake.url, linkOpts);
    await c.ready;
    fake.send(fake.conns[2], [{ type: 'hello', min_version: 1, max_version: 1, role: 1, capabilities: 0, extensions: [] }]);
    await fake.until(() => fake.conns[2].closed, 2000, 'close');
    assert.equal(fake.conns[2].closed.code, 4003);
  }));

test('ping:false sends no PING; the client idle timer then declares the link dead', () =>
  withFake({ keepaliveMs: 1000, idleTimeoutMs: 2000 }, async (fake) => {
    const link = new EgressLink(fake.url, { ...linkOpts, ping: false });
    await link.ready;
    const info = await new Promise((r) => link.once('close', r));
    assert.equal(info.code, 4007);
    assert.equal(info.reason, 'idle timeout');
    assert.equal(fake.conns[0].pings.length, 0);
    // HELLO still announced PING, so the server did not switch to server-ping mode.
    assert.equal(Number(BigInt(fake.conns[0].hello.capabilities) & 1n), 1);
    assert.ok(link.closeInfo.openForMs >= 1950 && link.closeInfo.openForMs < 2600, `${link.closeInfo.openForMs}`);
  }));

test('pool: pre-opens N links, replaces a lost one with backoff and counts it', () =>
  withFake({ keepaliveMs: 20000, idleTimeoutMs: 60000 }, async (fake) => {
    const pool = new RelayPool(fake.url, { ...linkOpts, size: 3 });
    await pool.whenOpen(3);
    assert.equal(pool.stats.connects, 3);
    assert.equal(fake.conns.length, 3);
    assert.equal(new Set(pool.snapshot().links.map((l) => l.session)).size, 3);
    const retries = [];
    pool.on('retry', (r) => retries.push(r));
    fake.conns[1].ws.terminate();
    await until(() => pool.stats.connects === 4, { what: 'replacement' });
    assert.equal(pool.stats.reconnects, 1);
    assert.equal(pool.stats.lostLinks, 1);
    assert.equal(retries.length, 1);
    assert.ok(retries[0].delayMs <= 500, 'first retry within uniform(0, 500 ms)');
    assert.equal(pool.openLinks().length, 3);
    pool.stop();
  }));

test('pool: capped exponential backoff with full jitter; retry_after_ms honoured; no retry for UNSUPPORTED_VERSION', async () => {
  await withFake({ refuse: { code: Code.SERVER_FULL, retryAfterMs: 0, reason: 'full' } }, async (fake) => {
    const pool = new RelayPool(fake.url, { ...linkOpts, size: 1, backoffBaseMs: 10, backoffCapMs: 60 });
    const retries = [];
    pool.on('retry', (r) => retries.push(r));
    await until(() => retries.length >= 6, { what: '6 retries' });
    pool.stop();
    retries.slice(0, 6).forEach((r, n) => {
      assert.equal(r.attempt, n);
      assert.ok(r.delayMs >= 0 && r.delayMs <= Math.min(60, 10 * 2 ** n), `attempt ${n}: ${r.delayMs}`);
    });
    assert.ok(pool.stats.refusals >= 6);
    assert.equal(pool.stats.connects, 0);
  });
  await withFake({ refuse: { code: Code.SERVER_FULL, retryAfterMs: 700, reason: 'full' } }, async (fake) => {
    const pool = new RelayPool(fake.url, { ...linkOpts, size: 1 });
    const retries = [];
    pool.on('retry', (r) => retries.push({ ...r, at: performance.now() }));
    await fake.until(() => fake.conns.length >= 2, 5000, 'second attempt');
    const secondAt = performance.now();
    pool.stop();
    assert.equal(retries[0].delayMs, 700);
    assert.ok(secondAt - retries[0].at >= 690, `retried after ${(secondAt - retries[0].at).toFixed(0)} ms`);
  });
  await withFake({ refuse: { code: Code.UNSUPPORTED_VERSION, reason: 'unsupported version: client 2-2, server 1-1' } }, async (fake) => {
    const pool = new RelayPool(fake.url, { ...linkOpts, size: 1, minVersion: 2, maxVersion: 2 });
    await until(() => pool.snapshot().links[0].slotState === 'failed', { what: 'failed slot' });
    await new Promise((r) => setTimeout(r, 600));
    assert.equal(fake.conns.length, 1, 'not retried');
    assert.match(pool.snapshot().links[0].failed, /UNSUPPORTED_VERSION/);
    pool.stop();
  });
});

/** A relay in Node: a downstream WebSocket server whose connections become DownstreamLinks. */
async function startRelay(pool) {
  const wss = new WebSocketServer({ port: 0, host: '127.0.0.1', handleProtocols: (p) => (p.has('broflake.v1') ? 'broflake.v1' : false) });
  await new Promise((r) => wss.once('listening', r));
  const downs = [];
  wss.on('connection', (ws) => downs.push(new DownstreamLink(ws, pool, { timers: pool.timers })));
  return {
    url: `ws://127.0.0.1:${wss.address().port}/`,
    downs,
    close: () => new Promise((r) => wss.close(r)),
  };
}

test('relay: label switching, ROUTE_CLOSE both ways, release on downstream close, ROUTE_UNKNOWN upstream', () =>
  withFake({ keepaliveMs: 1000, idleTimeoutMs: 3000 }, async (fake) => {
    const pool = new RelayPool(fake.url, { ...linkOpts, size: 2 });
    await pool.whenOpen(2);
    const relay = await startRelay(pool);
    const consumer = new EgressLink(relay.url, { ...linkOpts, role: Role.CONSUMER });
    const w = await consumer.ready;
    // Downstream parameters follow the upstream WELCOME.
    assert.equal(w.keepalive_ms, 1000);
    assert.equal(w.idle_timeout_ms, 3000);
    assert.ok(w.pingInEffect);
    const [c0, c1, c2] = [consumer.openRoute(), consumer.openRoute(), consumer.openRoute()];
    const got = new Map();
    for (const r of [c0, c1, c2]) r.onmessage = (p) => got.set(r.label, [...p]);
    c0.send(Uint8Array.of(10, 11));
    c1.send(Uint8Array.of(20, 21));
    c2.send(Uint8Array.of(30, 31));
    await until(() => got.size === 3, { what: 'echoes' });
    assert.deepEqual(Object.fromEntries(got), { 0: [11, 10], 1: [21, 20], 2: [31, 30] });
    // Upstream: routes spread over both links, labels allocated per link from 0.
    const up = fake.conns.filter((c) => c.hello.role === Role.RELAY);
    const seen = up.flatMap((c) => c.data.map((d) => `${c.id}:${d.label}:${[...d.packet]}`)).sort();
    assert.equal(seen.length, 3);
    const perLink = up.map((c) => c.data.map((d) => d.label));
    assert.deepEqual(perLink.map((l) => l.length).sort(), [1, 2]);
    for (const labels of perLink) assert.deepEqual(labels, labels.map((_, i) => i));
    const mapping = relay.downs[0].routes;
    const upOf = (label) => mapping.get(label).up;
    // Upstream closes the route of c1: forwarded downstream with the same code.
    let closed = null;
    c1.onclose = (code, remote) => (closed = { code, remote });
    const u1 = upOf(1);
    const u1conn = up.find((c) => c.sessionId && hex(c.sessionId) === u1.link.welcome.session_id);
    fake.send(u1conn, [{ type: 'route_close', label: u1.label, code: Code.ROUTE_LIMIT }]);
    await until(() => closed, { what: 'ROUTE_CLOSE downstream' });
    assert.deepEqual(closed, { code: Code.ROUTE_LIMIT, remote: true });
    // Consumer closes c0: forwarded upstream with the upstream label.
    const u0 = upOf(0);
    const u0conn = up.find((c) => hex(c.sessionId) === u0.link.welcome.session_id);
    c0.close(Code.NO_ERROR);
    await fake.until(() => u0conn.routeCloses.some((r) => r.label === u0.label), 2000, 'ROUTE_CLOSE upstream');
    // DATA from upstream on a label the relay does not know.
    fake.send(u0conn, [{ type: 'data', label: 999, packet: Uint8Array.of(1) }]);
    await fake.until(() => u0conn.routeCloses.some((r) => r.label === 999 && r.code === Code.ROUTE_UNKNOWN), 2000, 'ROUTE_UNKNOWN');
    // Downstream link closes: its remaining route (c2) is closed upstream with NO_ERROR.
    const u2 = upOf(2);
    const u2conn = up.find((c) => hex(c.sessionId) === u2.link.welcome.session_id);
    const beforeClose = u2conn.routeCloses.length;
    consumer.close();
    await fake.until(() => u2conn.routeCloses.length > beforeClose, 2000, 'release on close');
    assert.deepEqual(u2conn.routeCloses.at(-1), { label: u2.label, code: Code.NO_ERROR });
    await until(() => relay.downs[0].state === 'closed', { what: 'downstream closed' });
    assert.equal(relay.downs[0].routes.size, 0);
    pool.stop();
    await relay.close();
  }));

test('relay: consumer PINGs answered, bad version refused with 4001, probe DATA is a violation', () =>
  withFake({ keepaliveMs: 1000, idleTimeoutMs: 3000 }, async (fake) => {
    const pool = new RelayPool(fake.url, { ...linkOpts, size: 1 });
    await pool.whenOpen(1);
    const relay = await startRelay(pool);
    const consumer = new EgressLink(relay.url, { ...linkOpts, role: Role.CONSUMER });
    await consumer.ready;
    await until(() => consumer.stats.pongs >= 2, { ms: 5000, what: 'consumer pongs from the relay' });
    consumer.close();
    const old = new EgressLink(relay.url, { ...linkOpts, role: Role.CONSUMER, minVersion: 2, maxVersion: 3 });
    const err = await old.ready.then(
      () => null,
      (e) => e,
    );
    assert.equal(err.code, 1);
    assert.equal(err.closeCode, 4001);
    assert.equal(err.reason, 'unsupported version: client 2-3, server 1-1');
    const probe = new EgressLink(relay.url, { ...linkOpts, role: Role.PROBE });
    await probe.ready;
    probe.openRoute().send(Uint8Array.of(1));
    const info = await new Promise((r) => probe.once('close', r));
    assert.equal(info.code, 4003);
    pool.stop();
    await relay.close();
  }));

test('GOAWAY: replacement link with previous_session, routes move to it, old link closed with 1000', () =>
  withFake({ keepaliveMs: 20000, idleTimeoutMs: 60000 }, async (fake) => {
    const pool = new RelayPool(fake.url, { ...linkOpts, size: 1 });
    await pool.whenOpen(1);
    const relay = await startRelay(pool);
    const consumer = new EgressLink(relay.url, { ...linkOpts, role: Role.CONSUMER });
    await consumer.ready;
    const route = consumer.openRoute();
    const got = [];
    route.onmessage = (p) => got.push([...p]);
    route.send(Uint8Array.of(1, 2));
    await until(() => got.length === 1, { what: 'first echo' });
    const old = fake.conns.find((c) => c.hello.role === Role.RELAY);
    fake.goaway(old, 10000);
    await fake.until(() => fake.conns.filter((c) => c.hello?.role === Role.RELAY).length === 2, 3000, 'replacement');
    const repl = fake.conns.filter((c) => c.hello?.role === Role.RELAY)[1];
    assert.equal(hex(repl.hello.previous_session), hex(old.sessionId));
    await until(() => pool.stats.migrations === 1, { what: 'migration' });
    // The existing route's next packet goes over the replacement, on a fresh label.
    route.send(Uint8Array.of(3, 4));
    await until(() => got.length === 2, { what: 'echo via replacement' });
    assert.deepEqual(got[1], [4, 3]);
    assert.deepEqual(repl.data.map((d) => [d.label, [...d.packet]]), [[0, [3, 4]]]);
    // Routes moved: the old link is closed with 1000 before the grace period ends.
    await fake.until(() => old.closed, 3000, 'old link closed');
    assert.equal(old.closed.code, 1000);
    assert.deepEqual(old.routeCloses, [{ label: 0, code: Code.NO_ERROR }]);
    // New routes open on the replacement.
    const r2 = consumer.openRoute();
    r2.send(Uint8Array.of(5));
    await fake.until(() => repl.data.length === 2, 2000, 'new route upstream');
    assert.equal(repl.data[1].label, 1);
    assert.equal(pool.stats.goaways, 1);
    assert.equal(pool.stats.reconnects, 0);
    assert.equal(pool.openLinks().length, 1);
    consumer.close();
    pool.stop();
    await relay.close();
  }));

test('a raw downstream socket object works (send/onmessage/onclose/close)', async () => {
  // Any WebSocket-like object is accepted: here an in-memory one.
  const sent = [];
  const sock = { readyState: 1, send: (b) => sent.push(b), close: (code, reason) => sock.onclose?.({ code, reason }) };
  const d = new DownstreamLink(sock, null, { timers: { kind: 'main', setTimeout, clearTimeout } });
  sock.onmessage({ data: encodeMessage([{ type: 'hello', min_version: 1, max_version: 4, role: 2, capabilities: 7, extensions: [] }]).buffer });
  assert.equal(d.state, 'open');
  assert.equal(sent.length, 1);
  const { decodeMessage } = await import('../broflake.js');
  const [welcome] = decodeMessage(sent[0]);
  assert.equal(welcome.type, 'welcome');
  assert.equal(welcome.version, 1);
  assert.equal(Number(BigInt(welcome.capabilities) & 0xffn), Cap.PING | Cap.ROUTES | Cap.GOAWAY);
  assert.ok(welcome.max_frame_size >= 1500);
  // No upstream: the packet is dropped, not an error.
  sock.onmessage({ data: encodeMessage([{ type: 'data', label: 0, packet: Uint8Array.of(1) }]) });
  assert.equal(d.stats.dropped, 1);
  sock.onclose({ code: 1000, reason: '' });
  assert.equal(d.state, 'closed');
});

test('a data-channel-like downstream transport works (string readyState, plain close event)', () => {
  // RTCDataChannel's shape: readyState is a string, close() takes no arguments and the
  // close event carries no code.
  const sent = [];
  const ch = {
    readyState: 'open',
    binaryType: 'blob',
    bufferedAmount: 0,
    send: (b) => sent.push(b),
    close: () => {
      ch.readyState = 'closed';
      ch.onclose?.(new Event('close'));
    },
  };
  const d = new DownstreamLink(ch, null, { timers: { kind: 'main', setTimeout, clearTimeout } });
  assert.equal(ch.binaryType, 'arraybuffer');
  ch.onmessage({ data: encodeMessage([{ type: 'hello', min_version: 1, max_version: 1, role: 2, capabilities: 7, extensions: [] }]).buffer });
  assert.equal(d.state, 'open');
  assert.equal(decodeMessage(sent[0])[0].type, 'welcome');
  ch.onmessage({ data: encodeMessage([{ type: 'ping', payload: Uint8Array.of(1, 2) }]).buffer });
  const [pong] = decodeMessage(sent[1]);
  assert.equal(pong.type, 'pong');
  assert.deepEqual([...pong.payload], [1, 2]);
  ch.readyState = 'closing';
  ch.onmessage({ data: encodeMessage([{ type: 'ping', payload: Uint8Array.of(3) }]).buffer });
  assert.equal(sent.length, 2, 'nothing is sent on a closing channel');
  ch.readyState = 'open';
  d.close(1000, 'bye');
  assert.equal(ch.readyState, 'closed');
  assert.equal(d.state, 'closed');
  assert.deepEqual(d.closeInfo, { code: 1000, reason: 'bye' });
  // A channel that closes by itself: the link ends with 1006 and no code of its own.
  const ch2 = { readyState: 'open', send: () => {}, close: () => {} };
  const d2 = new DownstreamLink(ch2, null, { timers: { kind: 'main', setTimeout, clearTimeout } });
  ch2.onclose(new Event('close'));
  assert.deepEqual(d2.closeInfo, { code: 1006, reason: '' });
});
