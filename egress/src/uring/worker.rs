//! One io_uring worker thread: its ring, listeners, connection table, timer wheel.

use super::bufring::BufRing;
use super::conn::{Conn, Slab, State};
use super::counts::{Counts, COUNTS_FLUSH_MS};
use super::iptable::IpTable;
use super::routes::{Inbox, OutQueue, UringRoutes};
use super::wheel::Wheel;
use crate::config::ReadMode;
use crate::shared::Shared;
use broflake_proto::Timestamp;
use io_uring::{cqueue, squeue, types, IoUring};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub(super) const OP_ACCEPT: u64 = 1;
pub(super) const OP_READ: u64 = 2;
pub(super) const OP_SEND: u64 = 3;
pub(super) const OP_EVENTFD: u64 = 4;
pub(super) const OP_CANCEL: u64 = 5;
/// A receive into the buffer ring after a poll said readable (direct descriptors).
pub(super) const OP_RECV: u64 = 6;
/// Cancel and close of a direct descriptor (completions only on failure).
pub(super) const OP_CLOSE: u64 = 7;

/// The provided-buffer group of the worker's buffer ring (recv mode).
const BUFRING_GROUP: u16 = 7;
/// The longest a worker sleeps with nothing to do (everything that needs it sooner, a
/// deadline, a completion, stop or drain, wakes it).
const MAX_SLEEP_MS: u64 = 60_000;

pub(super) fn ud(op: u64, gen: u8, idx: u32) -> u64 {
    (op << 56) | (u64::from(gen) << 32) | u64::from(idx)
}

pub(super) fn ud_parts(u: u64) -> (u64, u8, u32) {
    (u >> 56, (u >> 32) as u8, u as u32)
}

pub struct Worker {
    pub(super) thread: u8,
    // Field order matters for Drop: the ring goes before the buffer ring memory.
    pub(super) ring: IoUring,
    pub(super) bufring: Option<BufRing>,
    /// Connections are indices in the ring's registered file table, not descriptors.
    pub(super) direct: bool,
    /// Peer addresses of the accepts in flight (direct descriptors: one-shot accepts, each
    /// with its own address buffer, which must outlive it).
    pub(super) accept_addrs: Box<[super::accept::AcceptAddr]>,
    /// Connections that found the buffer ring empty, to receive again once buffers return.
    pub(super) recv_waiting: Vec<(u32, u8)>,
    pub(super) shared: Arc<Shared>,
    pub(super) listeners: Vec<(i32, bool)>,
    pub(super) wss: Option<Arc<rustls::ServerConfig>>,
    pub(super) inbox: Arc<Inbox>,
    /// Every worker's inboxes and the count of routes open on io_uring connections.
    pub(super) routes: Arc<UringRoutes>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) mode: ReadMode,
    pub(super) conns: Slab,
    pub(super) free: Vec<u32>,
    pub(super) scratch: Vec<u8>,
    pub(super) plain: Vec<u8>,
    pub(super) tx: Vec<u8>,
    pub(super) wsout: Vec<u8>,
    pub(super) out: OutQueue,
    pub(super) efd_buf: Box<[u8; 8]>,
    pub(super) wheel: Wheel,
    pub(super) now: Timestamp,
    pub(super) ips: IpTable,
    pub(super) draining: bool,
    pub(super) rearm_accept: Vec<usize>,
    pub(super) cqes: Vec<(u64, i32, u32)>,
    pub(super) counts: Counts,
    /// When `counts` last went to `metrics` (ms).
    pub(super) counts_flushed: u64,
}

impl Worker {
    pub fn new(
        thread: u8,
        shared: Arc<Shared>,
        listeners: Vec<(i32, bool)>,
        wss: Option<Arc<rustls::ServerConfig>>,
        routes: Arc<UringRoutes>,
        stop: Arc<AtomicBool>,
        mode: ReadMode,
    ) -> std::io::Result<Worker> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(4096)
            .or_else(|_| IoUring::new(4096))?;
        let direct = shared.config.io.uring_direct_descriptors
            && register_table(&ring, thread, shared.config.limits.max_connections);
        let bufring = match (mode, direct) {
            (ReadMode::Recv, _) => Some(BufRing::new(&ring, BUFRING_GROUP, 1024, 16 * 1024)?),
            // A receive is only issued when a poll said readable, and its buffer comes back
            // before the loop waits again: a few buffers serve every connection.
            (ReadMode::Poll, true) => Some(BufRing::new(&ring, BUFRING_GROUP, 64, 64 * 1024)?),
            (ReadMode::Poll, false) => None,
        };
        metrics::gauge!(crate::metrics::URING_DESCRIPTORS, "descriptors" => if direct { "direct" } else { "ordinary" })
            .increment(1.0);
        let now = shared.now();
        let gran = u64::try_from(shared.config.liveness.sweep_interval.as_millis()).unwrap_or(1000).max(1);
        Ok(Worker {
            thread,
            ring,
            bufring,
            direct,
            accept_addrs: super::accept::AcceptAddr::table(if direct { listeners.len() } else { 0 }),
            recv_waiting: Vec::new(),
            shared,
            listeners,
            wss,
            inbox: routes.inboxes[usize::from(thread)].clone(),
            routes,
            stop,
            mode,
            conns: Slab::default(),
            free: Vec::new(),
            scratch: vec![0u8; 64 * 1024],
            plain: vec![0u8; 64 * 1024],
            tx: Vec::with_capacity(4096),
            wsout: Vec::with_capacity(4096),
            out: OutQueue::default(),
            efd_buf: Box::new([0u8; 8]),
            wheel: Wheel::new(gran, 512, now.as_millis()),
            now,
            ips: IpTable::default(),
            draining: false,
            rearm_accept: Vec::new(),
            cqes: Vec::with_capacity(512),
            counts: Counts::default(),
            counts_flushed: 0,
        })
    }

    pub(super) fn push(&mut self, sqe: squeue::Entry) {
        loop {
            // SAFETY: every buffer an SQE points at (connection send queues, the eventfd
            // buffer) outlives the operation: it is freed only after the final CQE.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return;
            }
            let _ = self.ring.submit();
        }
    }

    /// Pushes two linked operations into the same submission (a link never spans a submit).
    pub(super) fn push_linked(&mut self, first: squeue::Entry, second: squeue::Entry) {
        loop {
            // SAFETY: as in `push`; neither operation points at memory of ours.
            if unsafe { self.ring.submission().push_multiple(&[first.clone(), second.clone()]) }.is_ok() {
                return;
            }
            let _ = self.ring.submit();
        }
    }

    pub fn run(mut self) {
        for i in 0..self.listeners.len() {
            self.arm_accept(i);
        }
        self.arm_eventfd();
        loop {
            if self.stop.load(Ordering::Acquire) {
                self.shutdown();
                return;
            }
            let wait = std::time::Duration::from_millis(self.sleep_ms());
            let ts = types::Timespec::new().sec(wait.as_secs()).nsec(wait.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)) => {}
                Err(e) => {
                    tracing::error!(thread = self.thread, error = %e, "io_uring_enter failed");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            self.now = self.shared.now();
            self.cqes.clear();
            for cqe in self.ring.completion() {
                self.cqes.push((cqe.user_data(), cqe.result(), cqe.flags()));
            }
            let cqes = std::mem::take(&mut self.cqes);
            for &(u, res, flags) in &cqes {
                self.on_cqe(u, res, flags);
            }
            self.cqes = cqes;
            self.run_wheel();
            if !self.draining && *self.shared.drain.borrow() {
                self.start_drain();
            }
            for i in std::mem::take(&mut self.rearm_accept) {
                self.arm_accept(i);
            }
            self.retry_recvs();
        }
    }

    /// How long the loop may wait for completions: until the next wheel tick with entries
    /// or the next flush of pending counts. Idle, it sleeps [`MAX_SLEEP_MS`]; stop and drain
    /// wake it through the inbox's eventfd.
    fn sleep_ms(&mut self) -> u64 {
        let now = self.shared.now().as_millis();
        let mut ms = self.wheel.ms_to_next_filled(now).unwrap_or(MAX_SLEEP_MS).min(MAX_SLEEP_MS);
        if self.counts.pending() {
            ms = ms.min((self.counts_flushed + COUNTS_FLUSH_MS).saturating_sub(now).max(1));
        }
        ms
    }

    pub(super) fn on_cqe(&mut self, u: u64, res: i32, flags: u32) {
        let (op, gen, idx) = ud_parts(u);
        match op {
            OP_ACCEPT => {
                if res >= 0 {
                    let tls = self.listeners[idx as usize].1;
                    let peer = self.direct.then(|| self.accepted_peer(idx as usize, gen));
                    self.on_accept(res, tls, peer);
                } else if res != -libc::ECANCELED {
                    tracing::warn!(thread = self.thread, error = %std::io::Error::from_raw_os_error(-res), "accept failed");
                }
                if self.direct {
                    // Errors of one connection (gone before it was accepted, table or memory
                    // full) leave the accept armed; any other would repeat at once.
                    let transient =
                        [libc::ECONNABORTED, libc::ENFILE, libc::EMFILE, libc::ENOMEM, libc::EINTR, libc::EAGAIN];
                    if res >= 0 || transient.contains(&-res) {
                        self.arm_one_accept(idx as usize, gen);
                    } else if res != -libc::ECANCELED {
                        tracing::error!(thread = self.thread, error = %std::io::Error::from_raw_os_error(-res), "accept stopped on this listener");
                    }
                } else if !cqueue::more(flags) {
                    self.rearm_accept.push(idx as usize);
                }
            }
            OP_EVENTFD => {
                self.arm_eventfd();
                self.on_inbox();
            }
            OP_CANCEL => {
                if let Some(c) = self.live(idx, gen) {
                    c.ops -= 1;
                }
                self.maybe_free(idx, gen);
            }
            OP_READ => self.on_read(idx, gen, res, flags),
            OP_RECV => self.on_recv(idx, gen, res, flags),
            // ENOENT: nothing was in flight to cancel.
            OP_CLOSE if res < 0 && res != -libc::ENOENT => {
                tracing::debug!(thread = self.thread, error = %std::io::Error::from_raw_os_error(-res), "closing a direct descriptor");
            }
            OP_SEND => self.on_send(idx, gen, res),
            _ => {}
        }
    }

    /// The connection at `idx` if it still has generation `gen` and is in use.
    pub(super) fn live(&mut self, idx: u32, gen: u8) -> Option<&mut Conn> {
        self.conns.get_mut(idx as usize).filter(|c| c.gen == gen && c.state != State::Free)
    }

    pub(super) fn shutdown(&mut self) {
        self.flush_counts();
        for idx in 0..self.conns.len() as u32 {
            if matches!(self.conns[idx as usize].state, State::Upgrading | State::Open | State::Closing) {
                self.drop_conn(idx, "shutdown");
            }
        }
        for (fd, _) in &self.listeners {
            // SAFETY: our listening sockets.
            unsafe { libc::close(*fd) };
        }
        let _ = self.ring.submit();
    }
}

/// Registers the ring's file table for direct descriptors, sparse (slots filled by accept).
/// Its size is bounded by the kernel (RLIMIT_NOFILE, and 2^20) and by what this egress admits.
/// False, with the reason logged, where the kernel refuses: the worker uses ordinary descriptors.
fn register_table(ring: &IoUring, thread: u8, max_connections: usize) -> bool {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit into a valid struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    let slots = limit.rlim_cur.min(1 << 20).min(max_connections as u64 + 64).max(64) as u32;
    let mut probe = io_uring::Probe::new();
    let missing = match ring.submitter().register_probe(&mut probe) {
        Ok(()) => [
            (io_uring::opcode::Accept::CODE, "accept"),
            (io_uring::opcode::Recv::CODE, "recv"),
            (io_uring::opcode::AsyncCancel::CODE, "cancel"),
            (io_uring::opcode::Close::CODE, "close"),
        ]
        .into_iter()
        .find(|(code, _)| !probe.is_supported(*code))
        .map(|(_, name)| format!("io_uring lacks the {name} operation")),
        Err(e) => Some(format!("cannot probe io_uring: {e}")),
    };
    let outcome = match missing {
        Some(why) => Err(why),
        None => ring
            .submitter()
            .register_files_sparse(slots)
            .map_err(|e| format!("cannot register a file table of {slots} slots: {e}")),
    };
    match outcome {
        Ok(()) => {
            tracing::debug!(thread, slots, "connections use direct descriptors");
            true
        }
        Err(why) => {
            tracing::warn!(thread, %why, "io_uring direct descriptors unavailable; using ordinary descriptors");
            false
        }
    }
}
