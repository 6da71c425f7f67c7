// The WebRTC binding of a Broflake connection (docs/PROTOCOL.md §17): the two negotiated
// DataChannels of one RTCPeerConnection presented as one transport that Session drives
// like a WebSocket (send, close, onmessage, onclose, readyState, bufferedAmount).
//
// Channel 0 "broflake" (reliable, ordered) carries every message that is not a single DATA
// frame; channel 1 "broflake-data" (unordered, maxRetransmits 0) carries one DATA frame,
// one QUIC packet, per message (§17.4, §17.5). Messages of both channels go to the one
// session in the order they arrive.
import { FrameType } from './constants.js';
import { readVarint } from './bytes.js';

/** DATA messages are dropped, as by a full UDP socket, above this much buffered (§17.4). */
export const DATA_HIGH_WATER = 512 * 1024;
/**
 * The largest DATA frame on the data channel: one base-size (1350-byte) QUIC packet with the
 * longest label, so it travels in one SCTP chunk (§17.5). Larger packets are dropped like a
 * datagram above a path's MTU, which is what the QUIC endpoints' path MTU discovery expects
 * (§14.4).
 */
export const DATA_CHANNEL_MAX_FRAME = 1362;
/** How long the peer connection stays up after the channels' reset, so that it arrives (§17.9). */
const CLOSE_LINGER_MS = 300;

/** The channel options of §17.2, for createDataChannel. */
export const CHANNELS = [
  ['broflake', { negotiated: true, id: 0, ordered: true, protocol: 'broflake' }],
  ['broflake-data', { negotiated: true, id: 1, ordered: false, maxRetransmits: 0, protocol: 'broflake' }],
];

/** Creates both channels on `pc` (before the offer or answer is made). */
export function createChannels(pc) {
  const [control, data] = CHANNELS.map(([label, opts]) => pc.createDataChannel(label, opts));
  control.binaryType = data.binaryType = 'arraybuffer';
  return { control, data };
}

/** Whether `bytes` is exactly one DATA frame (and may go on the data channel). */
export function isSingleData(bytes) {
  if (bytes.length < 3 || bytes[0] !== FrameType.DATA) return false;
  try {
    const [length, next] = readVarint(bytes, 2, bytes.length);
    return next + Number(length) === bytes.length;
  } catch {
    return false;
  }
}

/**
 * Both channels of one peer connection as one transport. `open` resolves when both are
 * open (or rejects when either closes first or the connection fails).
 */
export class ChannelPair {
  constructor(pc, { control, data } = createChannels(pc)) {
    this.pc = pc;
    this.control = control;
    this.data = data;
    this.onmessage = null;
    this.onclose = null;
    this.readyState = 'connecting';
    this.dropped = 0; // DATA messages dropped because the data channel was backed up
    this.tooLarge = 0; // DATA messages dropped because they exceed DATA_CHANNEL_MAX_FRAME
    this.closeInfo = null;
    const deliver = (ev) => this.onmessage?.(ev.data);
    control.onmessage = deliver;
    data.onmessage = deliver;
    this.open = new Promise((resolve, reject) => {
      const check = () => {
        if (this.readyState !== 'connecting') return;
        if (control.readyState === 'open' && data.readyState === 'open') {
          this.readyState = 'open';
          resolve(this);
        }
      };
      control.onopen = check;
      data.onopen = check;
      this._reject = reject;
      check();
    });
    this.open.catch(() => {}); // a pair that never opens is reported by _ended
    const lost = (why) => () => this._ended(why);
    control.onclose = lost('the control channel closed');
    data.onclose = lost('the data channel closed');
    pc.addEventListener('connectionstatechange', () => {
      if (pc.connectionState === 'failed' || pc.connectionState === 'closed') this._ended(`peer connection ${pc.connectionState}`);
    });
  }

  get bufferedAmount() {
    return this.control.readyState === 'open' ? this.control.bufferedAmount : 0;
  }

  send(bytes) {
    if (this.readyState !== 'open') return;
    if (isSingleData(bytes)) {
      if (bytes.length > DATA_CHANNEL_MAX_FRAME) {
        this.tooLarge++;
        return;
      }
      if (this.data.readyState !== 'open' || this.data.bufferedAmount > DATA_HIGH_WATER) {
        this.dropped++;
        return;
      }
      this.data.send(bytes);
      return;
    }
    this.control.send(bytes);
  }

  /** Resets both channels, then closes the peer connection a little later (§17.9). */
  close(code = 1000, reason = '') {
    if (this.readyState === 'closing' || this.readyState === 'closed') return;
    this.readyState = 'closing';
    this.closeInfo ??= { code, reason, local: true };
    try {
      this.control.close();
      this.data.close();
    } catch {
      /* already gone */
    }
    setTimeout(() => this._ended(reason || 'closed'), CLOSE_LINGER_MS);
  }

  _ended(why) {
    if (this.readyState === 'closed') return;
    const wasConnecting = this.readyState === 'connecting';
    this.readyState = 'closed';
    this.closeInfo ??= { code: 1006, reason: why, local: false };
    try {
      this.control.close();
      this.data.close();
    } catch {
      /* already gone */
    }
    try {
      this.pc.close();
    } catch {
      /* already closed */
    }
    if (wasConnecting) this._reject(new Error(why));
    // No close code travels on this hop: a close without ERROR before it is a plain peer close.
    this.onclose?.({ code: this.closeInfo.code, reason: this.closeInfo.reason });
  }
}
