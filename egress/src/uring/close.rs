//! The close lifecycle: Open → Closing (close frame queued, read cancelled) → Zombie
//! (socket closed, operations still in flight) → Free (slot reusable, generation bumped).

use super::conn::{Conn, State, F_READ_ARMED};
use super::wheel::NOT_FILED;
use super::worker::{ud, Worker, OP_CANCEL, OP_CLOSE, OP_READ};
use crate::metrics as m;
use crate::wscodec::{self};
use broflake_proto::{Close, ErrorCode, ServerSession, Timestamp};
use io_uring::{opcode, squeue, types};
use std::sync::atomic::Ordering;

impl Worker {
    pub(super) fn set_state(&mut self, idx: u32, state: State) {
        let c = &mut self.conns[idx as usize];
        let label = |s: State, c: &Conn| match s {
            State::Upgrading => "handshaking",
            State::Open if !c.session.is_open() => "handshaking",
            State::Open if c.session.is_draining() => "draining",
            _ => "open",
        };
        if matches!(c.state, State::Upgrading | State::Open) {
            metrics::gauge!(m::CONNECTIONS, "backend" => "uring", "state" => label(c.state, c)).decrement(1.0);
        }
        c.state = state;
        if matches!(state, State::Upgrading | State::Open) {
            metrics::gauge!(m::CONNECTIONS, "backend" => "uring", "state" => label(state, c)).increment(1.0);
        }
    }

    pub(super) fn count_close(&self, close: &Close) {
        metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => close.code.label()).increment(1);
        if matches!(close.code, ErrorCode::IDLE_TIMEOUT) {
            self.shared.stats.idle_closes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends an optional close frame, stops reading, closes once the output is flushed.
    pub(super) fn begin_close(&mut self, idx: u32, ws_close: Option<(u16, String)>) {
        if !matches!(self.conns[idx as usize].state, State::Upgrading | State::Open) {
            return;
        }
        if let Some((code, reason)) = ws_close {
            let mut f = Vec::with_capacity(reason.len() + 4);
            wscodec::close_frame(code, &reason, &mut f);
            self.queue_out(idx, &f);
        }
        self.set_state(idx, State::Closing);
        let c = &mut self.conns[idx as usize];
        if c.flags & F_READ_ARMED != 0 {
            let sqe = opcode::AsyncCancel::new(ud(OP_READ, c.gen, idx)).build().user_data(ud(OP_CANCEL, c.gen, idx));
            c.ops += 1;
            self.push(sqe);
        }
        if self.conns[idx as usize].tx.is_none() {
            self.finish_close(idx);
        } else {
            self.refile(idx);
        }
    }

    pub(super) fn drop_conn(&mut self, idx: u32, reason: &'static str) {
        if matches!(self.conns[idx as usize].state, State::Upgrading | State::Open) {
            metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => reason).increment(1);
            self.set_state(idx, State::Closing);
        }
        self.finish_close(idx);
    }

    pub(super) fn finish_close(&mut self, idx: u32) {
        let c = &mut self.conns[idx as usize];
        if c.fd < 0 || matches!(c.state, State::Free | State::Zombie) {
            return;
        }
        let fd = c.fd;
        c.fd = -1;
        if self.direct {
            // On the ring: cancel every operation still in flight on the socket (each holds a
            // reference, and a multishot poll would hold it for ever), then close the slot,
            // which releases the socket (FIN, as close(2)); hard-linked, so the close runs
            // whatever the cancel found. Not SHUTDOWN: the kernel runs it on an io-wq thread
            // (it may block), a thread per burst of closes; cancel and close run inline.
            // Completions only on failure.
            let skip = squeue::Flags::SKIP_SUCCESS;
            let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fixed(fd as u32)).all())
                .build()
                .flags(skip | squeue::Flags::IO_HARDLINK)
                .user_data(ud(OP_CLOSE, 0, 0));
            let close = opcode::Close::new(types::Fixed(fd as u32)).build().flags(skip).user_data(ud(OP_CLOSE, 0, 0));
            self.push_linked(cancel, close);
        } else {
            // SAFETY: our socket; shutdown makes in-flight operations on it complete.
            unsafe {
                libc::shutdown(fd, libc::SHUT_RDWR);
                libc::close(fd);
            }
        }
        let c = &mut self.conns[idx as usize];
        c.state = State::Zombie;
        let routes = c.session.route_count();
        let gen = c.gen;
        let ip = c.ip;
        if routes > 0 {
            self.routes.open.fetch_sub(routes as i64, Ordering::Relaxed);
            metrics::gauge!(m::ROUTES).decrement(routes as f64);
        }
        if let Some(ip) = self.ips.release(ip) {
            self.shared.conns.release(ip);
        }
        self.maybe_free(idx, gen);
    }

    pub(super) fn maybe_free(&mut self, idx: u32, gen: u8) {
        let Some(c) = self.conns.get_mut(idx as usize) else { return };
        if c.gen != gen || c.state != State::Zombie || c.ops != 0 {
            return;
        }
        c.gen = c.gen.wrapping_add(1);
        c.state = State::Free;
        c.flags = 0;
        if c.filed != NOT_FILED {
            self.wheel.unfile(c.filed);
        }
        c.filed = NOT_FILED;
        c.session = ServerSession::new(Timestamp::ZERO);
        c.rx = None;
        c.tx = None;
        c.ext = None;
        self.free.push(idx);
    }

    /// Closes the connections of peers the kernel reported idle.
    pub(super) fn on_expired(&mut self) {
        let peers = self.inbox.take_expired();
        // The kernel sweep reports idle flows in bursts: find the whole batch in one pass over
        // the connections (no per-connection index, which would cost memory on every idle
        // connection to save a scan per sweep).
        let mut wanted: std::collections::HashSet<(u32, u16)> =
            peers.iter().filter_map(|p| self.ips.id_of(p.ip().to_canonical()).map(|id| (id, p.port()))).collect();
        let mut found = Vec::with_capacity(wanted.len());
        for i in 0..self.conns.len() as u32 {
            if wanted.is_empty() {
                break;
            }
            let c = &self.conns[i as usize];
            if c.state == State::Open && wanted.remove(&(c.ip, c.port)) {
                found.push(i);
            }
        }
        for idx in found {
            let c = &mut self.conns[idx as usize];
            let mut tx = Vec::new();
            let close = c.session.fail(ErrorCode::IDLE_TIMEOUT, "idle timeout (xdp)", &mut tx);
            self.queue_message(idx, &tx);
            metrics::counter!(m::IDLE_CLOSES, "source" => "xdp").increment(1);
            self.shared.stats.idle_closes.fetch_add(1, Ordering::Relaxed);
            self.shared.stats.xdp_closed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => close.code.label()).increment(1);
            self.begin_close(idx, Some((close.close_code(), close.reason.to_string())));
        }
    }
}
