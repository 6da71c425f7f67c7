// The browser volunteer's signaling client (src/signal.js, src/volunteer.js) in Node:
// every message it sends has the shape of the valid vectors in signal/vectors/v1.json, and
// against the real signaling service it registers, announces slots, and turns offers away
// while it has no egress link (so that the service offers the consumer elsewhere). The
// WebRTC side runs in Chromium behind real NATs in client/tests/browser_volunteer.rs.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import WebSocket from 'ws';
import { Emitter, SignalVolunteer, SIGNAL_SUBPROTOCOL, Volunteer } from '../broflake.js';
import { once, waitForLine, WEB_DIR } from './helpers.mjs';

const SIGNAL_BIN = process.env.SIGNAL_BIN || path.resolve(WEB_DIR, '../target/debug/signal');
const VECTORS = JSON.parse(fs.readFileSync(path.resolve(WEB_DIR, '../signal/vectors/v1.json'), 'utf8'));
const SESSION = '0123456789abcdef0123456789abcdef';
const timers = { kind: 'main', setTimeout: (f, ms) => setTimeout(f, ms), clearTimeout: (h) => clearTimeout(h) };

/** A WebSocket stand-in that records what is sent. */
class Capture {
  constructor() {
    this.readyState = 1;
    this.sent = [];
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close() {}
}

test('every message the volunteer sends has the members of the valid vectors of its type', () => {
  let ws;
  const v = new SignalVolunteer('ws://unused/v1/signal', {
    slots: 4,
    timers,
    WebSocketImpl: class extends Capture {
      constructor() {
        super();
        ws = this;
      }
    },
  });
  ws.onmessage({ data: JSON.stringify({ type: 'hello', versions: [1], ice_servers: [] }) });
  ws.onmessage({ data: JSON.stringify({ type: 'registered', version: 1, id: 'v1', ping_ms: 20000, idle_ms: 60000 }) });
  v.setSlots(3);
  v.answer(SESSION, 'v=0\r\n');
  v.decline(SESSION, 'no free slot');
  v.candidate(SESSION, 'candidate:1 1 udp 2130706431 10.0.0.1 5000 typ host', '0');
  v.candidate(SESSION, '');
  v.done(SESSION);
  v.close();
  const shapes = new Map();
  for (const c of VECTORS.cases.filter((c) => c.valid)) {
    const keys = JSON.stringify(Object.keys(c.fields ?? {}).sort());
    shapes.set(c.kind, [...(shapes.get(c.kind) ?? []), keys]);
  }
  assert.deepEqual(
    ws.sent.map((m) => m.type),
    ['volunteer', 'slots', 'answer', 'decline', 'candidate', 'candidate', 'done'],
  );
  for (const m of ws.sent) {
    const { type, ...fields } = m;
    const keys = JSON.stringify(Object.keys(fields).sort());
    // A decline's reason and a candidate's mid are optional: vectors show them present and absent.
    assert.ok(shapes.get(type)?.includes(keys) || (type === 'candidate' && keys === JSON.stringify(['candidate', 'session'])), `${JSON.stringify(m)} matches no valid vector of type ${type}`);
  }
  assert.deepEqual(ws.sent[0], { type: 'volunteer', versions: [1], slots: 4 });
});

test('a service without a common version is left at hello', () => {
  let ws;
  const v = new SignalVolunteer('ws://unused/v1/signal', {
    slots: 1,
    timers,
    WebSocketImpl: class extends Capture {
      constructor() {
        super();
        ws = this;
      }
    },
  });
  const errors = [];
  v.on('error', (e) => errors.push(e));
  ws.onmessage({ data: JSON.stringify({ type: 'hello', versions: [7], ice_servers: [] }) });
  assert.equal(ws.sent.length, 0, 'no volunteer message');
  assert.equal(v.state, 'closed');
  assert.match(errors[0].reason, /no common signaling version/);
});

describeService();

function describeService() {
  let proc;
  let url;
  before(async () => {
    if (!fs.existsSync(SIGNAL_BIN)) throw new Error(`signal binary not found at ${SIGNAL_BIN} (set SIGNAL_BIN)`);
    proc = spawn(SIGNAL_BIN, ['--listen', '127.0.0.1:0', '--admin', 'off', '--stun', 'stun:127.0.0.1:3478'], { stdio: ['ignore', 'pipe', 'inherit'] });
    const [, u] = await waitForLine(proc.stdout, /signaling on (ws:\/\/\S+)/, 20000, 'signal', proc);
    url = u;
  });
  after(() => proc?.kill('SIGKILL'));

  /** A pool with no open egress link. */
  const noLinks = Object.assign(new Emitter(), { timers, stopped: false, openLinks: () => [] });

  /** A consumer asking the service, with an offer that no WebRTC stack made. */
  async function ask() {
    const ws = new WebSocket(url, [SIGNAL_SUBPROTOCOL]);
    const got = [];
    const closed = new Promise((r) => ws.on('close', (code, reason) => r({ code, reason: reason.toString() })));
    ws.on('message', (d) => {
      const m = JSON.parse(d.toString());
      got.push(m);
      if (m.type === 'hello') ws.send(JSON.stringify({ type: 'consumer', versions: [1], offer: 'v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n' }));
    });
    return { got, closed: await closed };
  }

  test('against the real service: registered, ICE servers from hello, an offer without an egress link declined', async () => {
    const v = new Volunteer(url, noLinks, { slots: 2, WebSocketImpl: WebSocket });
    v.start();
    const reg = await once(v, 'registered');
    assert.match(reg.id, /^v[0-9]+$/);
    assert.deepEqual(v.signal.iceServers, [{ urls: ['stun:127.0.0.1:3478'] }]);
    const r = await ask();
    const types = r.got.map((m) => m.type);
    assert.deepEqual(types, ['hello', 'matched', 'cancel', 'unavailable'], JSON.stringify(r.got));
    assert.equal(r.got[2].reason, 'volunteer declined');
    assert.equal(r.got[3].reason, 'no volunteer answered');
    assert.equal(r.closed.code, 1000);
    assert.equal(v.stats.offers, 1);
    assert.equal(v.stats.declined, 1);
    assert.equal(v.active, 0);
    v.stop();
    assert.equal(v.state, 'stopped');
  });

  test('against the real service: a volunteer whose service goes away registers again', async () => {
    const v = new Volunteer(url, noLinks, { slots: 1, WebSocketImpl: WebSocket, backoffBaseMs: 50 });
    v.start();
    await once(v, 'registered');
    v.signal.ws.terminate(); // the connection to the service is lost
    const again = await once(v, 'registered');
    assert.match(again.id, /^v[0-9]+$/);
    assert.equal(v.stats.registrations, 2);
    v.stop();
  });
}
