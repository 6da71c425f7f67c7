//! Time in the loop: each connection's next deadline filed in the coarse wheel, what
//! happens when one passes (handshake, idle, server ping, write timeout), the drain, and the
//! counters flushed to `metrics` on a tick.

use super::conn::State;
use super::counts::COUNTS_FLUSH_MS;
use super::wheel::NOT_FILED;
use super::worker::Worker;
use crate::metrics as m;
use crate::wscodec::{self};
use broflake_proto::ErrorCode;
use std::sync::atomic::Ordering;

impl Worker {
    /// The connection's next deadline (ms), if any.
    pub(super) fn deadline(&self, idx: u32) -> Option<u64> {
        let c = &self.conns[idx as usize];
        let write = c.tx.as_ref().map(|t| t.since + self.shared.config.limits.write_timeout.as_millis() as u64);
        let session = match c.state {
            State::Upgrading | State::Open => {
                let idle = !self.shared.kernel_liveness() || !c.session.is_open() || c.session.server_pings();
                c.session.next_timeout_with(&self.shared.session, idle).map(|t| t.as_millis())
            }
            _ => None,
        };
        match (write, session) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Files the connection at its next deadline if that is earlier than where it is filed
    /// (a later one waits until the filed tick passes: a PING costs nothing here), and takes
    /// it out of the wheel's count when it has no deadline left, so it wakes nobody.
    pub(super) fn refile(&mut self, idx: u32) {
        let deadline = self.deadline(idx);
        let filed = self.conns[idx as usize].filed;
        let Some(d) = deadline else {
            if filed != NOT_FILED {
                self.wheel.unfile(filed);
                self.conns[idx as usize].filed = NOT_FILED;
            }
            return;
        };
        let tick = self.wheel.tick_of(d);
        if filed == NOT_FILED || u64::from(filed) > tick {
            if filed != NOT_FILED {
                self.wheel.unfile(filed);
            }
            let t = self.wheel.file(idx, tick);
            self.conns[idx as usize].filed = t;
        }
    }

    pub(super) fn run_wheel(&mut self) {
        let now = self.now;
        let mut checked = 0u64;
        while let Some((tick, entries)) = self.wheel.next_due(now.as_millis()) {
            for &idx in &entries {
                let c = &mut self.conns[idx as usize];
                if c.filed != tick {
                    continue;
                }
                c.filed = NOT_FILED;
                if matches!(c.state, State::Free | State::Zombie) {
                    continue;
                }
                if c.session.is_open() {
                    checked += 1;
                }
                if let Some(d) = self.deadline(idx) {
                    if d <= now.as_millis() {
                        self.on_deadline(idx);
                    }
                }
                if matches!(self.conns[idx as usize].state, State::Upgrading | State::Open | State::Closing) {
                    self.refile(idx);
                }
            }
            self.wheel.recycle(entries);
        }
        if checked > 0 {
            self.shared.stats.userspace_liveness_checks.fetch_add(checked, Ordering::Relaxed);
            metrics::counter!(m::USERSPACE_CHECKS).increment(checked);
        }
        if self.counts.pending() && now.as_millis() >= self.counts_flushed + COUNTS_FLUSH_MS {
            self.counts_flushed = now.as_millis();
            self.flush_counts();
        }
    }

    pub(super) fn on_deadline(&mut self, idx: u32) {
        let now = self.now;
        let write_timeout = self.shared.config.limits.write_timeout.as_millis() as u64;
        let c = &mut self.conns[idx as usize];
        if c.tx.as_ref().is_some_and(|t| t.since + write_timeout <= now.as_millis()) {
            // drop_conn counts the close (once).
            self.drop_conn(idx, "write_timeout");
            return;
        }
        if c.state == State::Closing {
            return;
        }
        if c.state == State::Upgrading {
            // No WebSocket yet: the answer is HTTP (over TLS once it is up), never a close frame.
            metrics::counter!(m::UPGRADE_REFUSALS, "reason" => "timeout").increment(1);
            let tls_up = c.ext.as_ref().and_then(|e| e.tls.as_deref()).is_none_or(|t| !t.is_handshaking());
            if tls_up {
                self.queue_out(idx, &wscodec::request_timeout_response());
            }
            self.begin_close(idx, None);
            return;
        }
        let server_pings = c.session.server_pings();
        let mut tx = std::mem::take(&mut self.tx);
        tx.clear();
        let r = c.session.on_timeout(&self.shared.session, now, &mut tx);
        self.queue_message(idx, &tx);
        self.tx = tx;
        match r {
            Ok(()) => {
                if server_pings {
                    self.shared.stats.server_pings.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::SERVER_PINGS).increment(1);
                }
            }
            Err(close) => {
                if close.code == ErrorCode::IDLE_TIMEOUT {
                    let source = if server_pings { "server-ping" } else { "userspace" };
                    metrics::counter!(m::IDLE_CLOSES, "source" => source).increment(1);
                }
                if close.code == ErrorCode::HANDSHAKE_TIMEOUT {
                    self.shared.stats.refusals.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::REFUSALS, "reason" => close.code.label()).increment(1);
                }
                self.count_close(&close);
                self.begin_close(idx, Some((close.close_code(), close.reason.to_string())));
            }
        }
    }

    pub(super) fn start_drain(&mut self) {
        self.draining = true;
        let grace = u64::try_from(self.shared.config.drain.grace.as_millis()).unwrap_or(u64::MAX);
        let reconnect = self.shared.config.drain.reconnect.clone();
        for idx in 0..self.conns.len() as u32 {
            let c = &mut self.conns[idx as usize];
            if c.state != State::Open || !c.session.is_open() || c.session.is_draining() {
                continue;
            }
            let mut tx = Vec::new();
            c.session.goaway(self.now, grace, &reconnect, &mut tx);
            self.shared.stats.goaways.fetch_add(1, Ordering::Relaxed);
            metrics::gauge!(m::CONNECTIONS, "backend" => "uring", "state" => "open").decrement(1.0);
            metrics::gauge!(m::CONNECTIONS, "backend" => "uring", "state" => "draining").increment(1.0);
            self.queue_message(idx, &tx);
            self.refile(idx);
        }
    }

    pub(super) fn flush_counts(&mut self) {
        self.counts.flush();
    }
}
