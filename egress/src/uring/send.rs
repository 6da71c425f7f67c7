//! The send path: straight to the socket when nothing is queued, else a per-connection
//! queue with one send in flight; QUIC packets from the endpoint's inbox.

use super::conn::{State, TxQueue, F_SEND_INFLIGHT};
use super::worker::{ud, Worker, OP_EVENTFD, OP_SEND};
use crate::metrics as m;
use crate::wscodec::{self};
use broflake_proto::frame::{self};
use io_uring::{opcode, types};
use std::io::Write;

/// Queued output beyond which QUIC packets for a connection are dropped (slow reader).
pub(super) const MAX_PENDING: usize = 256 * 1024;
/// Queued output beyond which the peer is dropped: it is not reading what it asks for.
pub(super) const MAX_PENDING_HARD: usize = 1024 * 1024;

impl Worker {
    /// Sends `payload` (Broflake frames) as one binary WebSocket message; nothing when empty.
    pub(super) fn queue_message(&mut self, idx: u32, payload: &[u8]) {
        if payload.is_empty() {
            return;
        }
        let mut f = Vec::with_capacity(payload.len() + 10);
        wscodec::frame_header(0x2, payload.len(), &mut f);
        f.extend_from_slice(payload);
        self.queue_out(idx, &f);
    }

    /// Queues bytes (plaintext for TLS connections) and starts a send if none is in flight.
    pub(super) fn queue_out(&mut self, idx: u32, bytes: &[u8]) {
        self.queue_out_parts(idx, [bytes, &[]]);
    }

    /// [`Self::queue_out`] for bytes in two parts (a WebSocket header and a payload that lives
    /// elsewhere), sent with one `sendmsg` so the payload is not first copied next to its header.
    pub(super) fn queue_out_parts(&mut self, idx: u32, parts: [&[u8]; 2]) {
        let now = self.now.as_millis();
        let c = &mut self.conns[idx as usize];
        if matches!(c.state, State::Zombie | State::Free) {
            return;
        }
        let tls = c.ext.as_mut().and_then(|e| e.tls.as_deref_mut());
        let total = parts[0].len() + parts[1].len();
        if tls.is_none() && total == 0 {
            return;
        }
        let mut sent = 0;
        if tls.is_none() && c.tx.is_none() && c.flags & F_SEND_INFLIGHT == 0 && c.fd >= 0 && !self.direct {
            // Nothing queued: write straight to the socket. A reply (PONG, a few DATA frames)
            // almost always fits the socket buffer, and then needs no queue, no allocation and
            // no second completion; only what does not fit is queued. (A direct descriptor
            // has no system call of its own: its bytes always go through the ring.)
            let mut iov = parts.map(|p| libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() });
            // SAFETY: an all-zero msghdr is valid; it points at two valid buffers.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = iov.len() as _;
            // SAFETY: our socket and valid buffers; MSG_DONTWAIT never blocks the loop.
            let n = unsafe { libc::sendmsg(c.fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
            if n < 0 {
                let e = std::io::Error::last_os_error().raw_os_error();
                if !matches!(e, Some(libc::EAGAIN) | Some(libc::EINTR)) {
                    self.drop_conn(idx, "peer_gone");
                    return;
                }
            } else {
                self.counts.bytes_tx += n as u64;
                sent = n as usize;
                if sent == total {
                    return;
                }
            }
        }
        let c = &mut self.conns[idx as usize];
        let tls = c.ext.as_mut().and_then(|e| e.tls.as_deref_mut());
        let q = c.tx.get_or_insert_with(|| Box::new(TxQueue { since: now, ..TxQueue::default() }));
        // What the socket did not take.
        let head = &parts[0][sent.min(parts[0].len())..];
        let body = &parts[1][sent.saturating_sub(parts[0].len())..];
        match tls {
            Some(tls) => {
                for p in [head, body] {
                    if !p.is_empty() {
                        let _ = tls.writer().write_all(p);
                    }
                }
                while tls.wants_write() {
                    if tls.write_tls(&mut q.pending).is_err() {
                        break;
                    }
                }
            }
            None => {
                q.pending.extend_from_slice(head);
                q.pending.extend_from_slice(body);
            }
        }
        if q.pending.is_empty() && q.inflight.is_empty() {
            c.tx = None;
            return;
        }
        if q.pending.len() > MAX_PENDING_HARD {
            tracing::debug!(thread = self.thread, "peer does not read its replies; dropping it");
            self.drop_conn(idx, "write_timeout");
            return;
        }
        self.flush(idx);
        self.refile(idx);
    }

    pub(super) fn flush(&mut self, idx: u32) {
        let c = &mut self.conns[idx as usize];
        if c.flags & F_SEND_INFLIGHT != 0 || c.fd < 0 {
            return;
        }
        let Some(q) = c.tx.as_mut() else { return };
        if q.offset >= q.inflight.len() {
            if q.pending.is_empty() {
                return;
            }
            q.inflight.clear();
            std::mem::swap(&mut q.inflight, &mut q.pending);
            q.offset = 0;
        }
        let rest = &q.inflight[q.offset..];
        let sqe = on_socket!(self.direct, c.fd, |t| opcode::Send::new(t, rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud(OP_SEND, c.gen, idx)));
        c.flags |= F_SEND_INFLIGHT;
        c.ops += 1;
        self.push(sqe);
    }

    pub(super) fn on_send(&mut self, idx: u32, gen: u8, res: i32) {
        let now = self.now.as_millis();
        let Some(c) = self.live(idx, gen) else { return };
        c.ops -= 1;
        c.flags &= !F_SEND_INFLIGHT;
        if c.state == State::Zombie {
            self.maybe_free(idx, gen);
            return;
        }
        if res < 0 {
            self.drop_conn(idx, "peer_gone");
            return;
        }
        let c = &mut self.conns[idx as usize];
        self.counts.bytes_tx += res as u64;
        let q = c.tx.as_mut().expect("a send was in flight");
        q.offset += res as usize;
        q.since = now;
        if q.offset < q.inflight.len() || !q.pending.is_empty() {
            self.flush(idx);
            return;
        }
        c.tx = None;
        if c.state == State::Closing {
            self.finish_close(idx);
        } else {
            // The write deadline is gone with the queue: if nothing else is due, the
            // connection leaves the wheel's count and wakes no one.
            self.refile(idx);
        }
    }

    pub(super) fn arm_eventfd(&mut self) {
        let sqe = opcode::Read::new(types::Fd(self.inbox.efd), self.efd_buf.as_mut_ptr(), 8)
            .build()
            .user_data(ud(OP_EVENTFD, 0, 0));
        self.push(sqe);
    }

    /// QUIC packets for this worker's connections.
    pub(super) fn on_inbox(&mut self) {
        let mut q = std::mem::take(&mut self.out);
        // `take` re-arms the wake-up first, so anything queued after it wakes us again.
        self.inbox.take(&mut q);
        self.on_expired();
        let mut header = std::mem::take(&mut self.wsout);
        let mut i = 0;
        while i < q.items.len() {
            let (slot, gen, start, _) = q.items[i];
            // Coalesce consecutive frames for the same connection into one message.
            let mut j = i;
            let mut end = q.items[i].3;
            while j + 1 < q.items.len()
                && q.items[j + 1].0 == slot
                && q.items[j + 1].1 == gen
                && q.items[j + 1].2 == end
            {
                j += 1;
                end = q.items[j].3;
                if (end - start) as usize > self.shared.session.max_frame_size as usize {
                    break;
                }
            }
            let n = (j - i + 1) as u64;
            i = j + 1;
            let ok = self.live(slot, gen).is_some_and(|c| {
                c.state == State::Open
                    && c.session.is_open()
                    && c.tx.as_ref().is_none_or(|t| t.pending.len() < MAX_PENDING)
            });
            if !ok {
                metrics::counter!(m::PACKETS_DROPPED, "reason" => "send_queue_full").increment(n);
                continue;
            }
            let bytes = &q.bytes[start as usize..end as usize];
            header.clear();
            wscodec::frame_header(0x2, bytes.len(), &mut header);
            self.counts.frames_tx[m::frame_index(frame::types::DATA)] += n;
            self.queue_out_parts(slot, [&header, bytes]);
        }
        self.wsout = header;
        self.out = q;
    }
}
