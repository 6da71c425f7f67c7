// The data-channel pair's send rules (docs/PROTOCOL.md §17.4, §17.5, §14.4), on stand-in
// channels: what goes to which channel, and what is dropped.
import test from 'node:test';
import assert from 'node:assert/strict';
import { ChannelPair, DATA_CHANNEL_MAX_FRAME } from '../src/channels.js';
import { encodeData, encodeFrame } from '../src/codec.js';

function channel() {
  return { readyState: 'open', bufferedAmount: 0, sent: [], send(b) { this.sent.push(b); } };
}

async function openPair() {
  const pc = { addEventListener() {}, close() {} };
  const pair = new ChannelPair(pc, { control: channel(), data: channel() });
  await pair.open;
  return pair;
}

test('a base-size packet on the longest label goes on the data channel', async () => {
  const pair = await openPair();
  const frame = encodeData(2n ** 62n - 1n, new Uint8Array(1350));
  assert.equal(frame.length, DATA_CHANNEL_MAX_FRAME);
  pair.send(frame);
  assert.deepEqual([pair.data.sent.length, pair.control.sent.length, pair.tooLarge], [1, 0, 0]);
});

test('a larger packet is dropped and counted, as a datagram above the path MTU', async () => {
  const pair = await openPair();
  pair.send(encodeData(0, new Uint8Array(1358))); // 1363 bytes encoded
  pair.send(encodeData(0, new Uint8Array(16000)));
  assert.deepEqual([pair.data.sent.length, pair.control.sent.length, pair.tooLarge], [0, 0, 2]);
  assert.equal(pair.readyState, 'open', 'dropping a packet closes nothing');
});

test('control frames still go on the control channel, whatever their size', async () => {
  const pair = await openPair();
  pair.send(encodeFrame({ type: 'ping', payload: new Uint8Array(8) }));
  const two = new Uint8Array([...encodeData(0, new Uint8Array(900)), ...encodeData(1, new Uint8Array(900))]);
  pair.send(two);
  assert.deepEqual([pair.data.sent.length, pair.control.sent.length, pair.tooLarge], [0, 2, 0]);
});
