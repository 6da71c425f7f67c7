//! The read path: the armed read (multishot poll or receive), draining a readable socket
//! (with `recv(2)`, or with direct descriptors a receive into the buffer ring issued on the
//! ring), TLS, and the HTTP upgrade.

use super::conn::{State, F_READ_ARMED, F_RECV_AGAIN, F_RECV_INFLIGHT, F_TLS};
use super::worker::{ud, Worker, OP_READ, OP_RECV};
use crate::config::ReadMode;
use crate::metrics as m;
use crate::wscodec::{self, Upgrade};
use io_uring::{cqueue, opcode, squeue, types};
use std::io::Read;

impl Worker {
    pub(super) fn arm_read(&mut self, idx: u32) {
        let c = &mut self.conns[idx as usize];
        if c.flags & F_READ_ARMED != 0 {
            return;
        }
        let u = ud(OP_READ, c.gen, idx);
        let sqe = match (self.mode, &self.bufring) {
            (ReadMode::Recv, Some(br)) => {
                on_socket!(self.direct, c.fd, |t| opcode::RecvMulti::new(t, br.group).build().user_data(u))
            }
            _ => on_socket!(self.direct, c.fd, |t| opcode::PollAdd::new(t, (libc::POLLIN | libc::POLLRDHUP) as u32)
                .multi(true)
                .build()
                .user_data(u)),
        };
        c.flags |= F_READ_ARMED;
        c.ops += 1;
        self.push(sqe);
    }

    pub(super) fn on_read(&mut self, idx: u32, gen: u8, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        let Some(c) = self.live(idx, gen) else { return };
        if !more {
            c.ops -= 1;
            c.flags &= !F_READ_ARMED;
        }
        let readable = matches!(c.state, State::Upgrading | State::Open);
        if !readable {
            if let (Some(bid), Some(br)) = (bid, self.bufring.as_mut()) {
                br.recycle(bid);
            }
            self.maybe_free(idx, gen);
            return;
        }
        match self.mode {
            ReadMode::Poll => {
                if res < 0 {
                    if res != -libc::ECANCELED {
                        self.drop_conn(idx, "peer_gone");
                    }
                    return;
                }
                if self.direct {
                    self.recv_ready(idx);
                } else {
                    self.read_ready(idx);
                }
            }
            ReadMode::Recv => {
                if res > 0 {
                    if let Some(bid) = bid {
                        let mut br = self.bufring.take().expect("recv mode has a buffer ring");
                        let data = br.buf(bid, res as usize);
                        self.on_bytes(idx, data);
                        br.recycle(bid);
                        self.bufring = Some(br);
                    }
                } else if res == 0 || res != -libc::ENOBUFS {
                    // End of stream or an error; ENOBUFS only means the ring ran dry (re-armed below).
                    self.drop_conn(idx, "peer_gone");
                    return;
                }
            }
        }
        if !more && self.live(idx, gen).is_some_and(|c| matches!(c.state, State::Upgrading | State::Open)) {
            self.arm_read(idx);
        }
    }

    /// Poll mode with direct descriptors: receive what is there into a buffer of the ring
    /// (one receive in flight per connection; a readiness seen meanwhile asks for another).
    pub(super) fn recv_ready(&mut self, idx: u32) {
        let c = &mut self.conns[idx as usize];
        if c.flags & F_RECV_INFLIGHT != 0 {
            c.flags |= F_RECV_AGAIN;
            return;
        }
        let Some(br) = self.bufring.as_ref() else { return };
        let sqe = opcode::Recv::new(types::Fixed(c.fd as u32), std::ptr::null_mut(), br.buf_size() as u32)
            .buf_group(br.group)
            .flags(libc::MSG_DONTWAIT)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(ud(OP_RECV, c.gen, idx));
        c.flags = (c.flags | F_RECV_INFLIGHT) & !F_RECV_AGAIN;
        c.ops += 1;
        self.push(sqe);
    }

    pub(super) fn on_recv(&mut self, idx: u32, gen: u8, res: i32, flags: u32) {
        let bid = cqueue::buffer_select(flags);
        let Some(c) = self.live(idx, gen) else { return };
        c.ops -= 1;
        c.flags &= !F_RECV_INFLIGHT;
        let again = c.flags & F_RECV_AGAIN != 0;
        let readable = matches!(c.state, State::Upgrading | State::Open);
        let mut br = self.bufring.take().expect("direct descriptors have a buffer ring");
        let full = res > 0 && res as usize == br.buf_size();
        match (bid, readable) {
            (Some(bid), true) if res > 0 => {
                self.on_bytes(idx, br.buf(bid, res as usize));
                br.recycle(bid);
            }
            (Some(bid), _) => br.recycle(bid),
            (None, _) => {}
        }
        self.bufring = Some(br);
        if !readable {
            self.maybe_free(idx, gen);
            return;
        }
        match res {
            0 => self.drop_conn(idx, "peer_gone"),
            r if r == -libc::ENOBUFS => self.recv_waiting.push((idx, gen)),
            r if r < 0 && r != -libc::EAGAIN && r != -libc::EINTR => self.drop_conn(idx, "peer_gone"),
            _ => {
                if (full || again)
                    && self.live(idx, gen).is_some_and(|c| matches!(c.state, State::Upgrading | State::Open))
                {
                    self.recv_ready(idx);
                }
            }
        }
    }

    /// Receives for connections that found the buffer ring empty (its buffers are back by now).
    pub(super) fn retry_recvs(&mut self) {
        for (idx, gen) in std::mem::take(&mut self.recv_waiting) {
            if self.live(idx, gen).is_some_and(|c| matches!(c.state, State::Upgrading | State::Open)) {
                self.recv_ready(idx);
            }
        }
    }

    /// Poll mode: read what is there into the thread's buffer.
    pub(super) fn read_ready(&mut self, idx: u32) {
        let mut buf = std::mem::take(&mut self.scratch);
        loop {
            let c = &self.conns[idx as usize];
            if !matches!(c.state, State::Upgrading | State::Open) {
                break;
            }
            // SAFETY: reading into our own buffer from a socket we own.
            let n = unsafe { libc::recv(c.fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n > 0 {
                let n = n as usize;
                self.on_bytes(idx, &mut buf[..n]);
                if n < buf.len() {
                    break;
                }
            } else if n == 0 {
                self.drop_conn(idx, "peer_gone");
                break;
            } else {
                let e = std::io::Error::last_os_error().raw_os_error();
                if e == Some(libc::EINTR) {
                    continue;
                }
                if e != Some(libc::EAGAIN) {
                    self.drop_conn(idx, "peer_gone");
                }
                break;
            }
        }
        self.scratch = buf;
    }

    pub(super) fn on_bytes(&mut self, idx: u32, data: &mut [u8]) {
        if self.conns[idx as usize].flags & F_TLS == 0 {
            self.on_plain(idx, data);
            return;
        }
        let mut rd: &[u8] = data;
        let mut plain = std::mem::take(&mut self.plain);
        let mut failed = false;
        while !rd.is_empty() && !failed {
            let Some(tls) = self.tls(idx) else { break };
            if tls.read_tls(&mut rd).is_err() || tls.process_new_packets().is_err() {
                failed = true;
            }
            while let Some(tls) = self.tls(idx) {
                match tls.reader().read(&mut plain) {
                    Ok(0) => break,
                    Ok(n) => {
                        self.on_plain(idx, &mut plain[..n]);
                        if !matches!(self.conns[idx as usize].state, State::Upgrading | State::Open) {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        }
        self.plain = plain;
        // Handshake records, alerts.
        self.queue_out(idx, &[]);
        if failed {
            metrics::counter!(m::UPGRADE_REFUSALS, "reason" => "tls").increment(1);
            self.begin_close(idx, None);
        }
    }

    pub(super) fn tls(&mut self, idx: u32) -> Option<&mut rustls::ServerConnection> {
        self.conns[idx as usize].ext.as_mut().and_then(|e| e.tls.as_deref_mut())
    }

    pub(super) fn on_plain(&mut self, idx: u32, data: &mut [u8]) {
        match self.conns[idx as usize].state {
            State::Upgrading => self.on_upgrade_bytes(idx, data),
            State::Open => self.on_ws(idx, data),
            _ => {}
        }
    }

    pub(super) fn on_upgrade_bytes(&mut self, idx: u32, data: &[u8]) {
        let cfg = &self.shared.config;
        let (min_v, max_v) = (self.shared.session.min_version, self.shared.session.max_version);
        let ext = self.conns[idx as usize].ext.get_or_insert_with(Default::default);
        ext.request.extend_from_slice(data);
        match wscodec::upgrade(&ext.request, &cfg.listen.path, min_v, max_v) {
            Upgrade::Partial => {}
            Upgrade::Accept { response, used, .. } => {
                let mut rest = ext.request.split_off(used);
                ext.request = Vec::new();
                if ext.tls.is_none() && ext.refusal.is_none() {
                    self.conns[idx as usize].ext = None;
                }
                self.queue_out(idx, &response);
                self.set_state(idx, State::Open);
                if !rest.is_empty() {
                    self.on_ws(idx, &mut rest);
                }
            }
            Upgrade::Refuse { response, label } => {
                metrics::counter!(m::UPGRADE_REFUSALS, "reason" => label).increment(1);
                self.queue_out(idx, &response);
                self.begin_close(idx, None);
            }
        }
    }
}
