//! How the QUIC endpoint reaches io_uring connections: route ids that *encode* the worker,
//! slot, generation and label (no per-route state at all), and one inbox per worker that
//! the endpoint appends DATA frames to and an eventfd wakes the worker's ring for.

use crate::quic::{Dropped, RouteSink};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

/// Route id layout: `1 | thread (5) | slot (22) | generation (8) | label (28)`.
pub mod route_id {
    pub const MAX_THREADS: usize = 32;
    pub const MAX_SLOTS: u32 = 1 << 22;
    pub const MAX_LABEL: u64 = (1 << 28) - 1;

    pub fn encode(thread: u8, slot: u32, gen: u8, label: u64) -> u64 {
        debug_assert!((thread as usize) < MAX_THREADS && slot < MAX_SLOTS && label <= MAX_LABEL);
        (1 << 63) | (u64::from(thread) << 58) | (u64::from(slot) << 36) | (u64::from(gen) << 28) | label
    }

    /// (thread, slot, generation, label) of an encoded id.
    pub fn decode(id: u64) -> Option<(u8, u32, u8, u64)> {
        (id >> 63 == 1).then_some((
            ((id >> 58) & 0x1f) as u8,
            ((id >> 36) as u32) & (MAX_SLOTS - 1),
            (id >> 28) as u8,
            id & MAX_LABEL,
        ))
    }
}

/// DATA frames from the QUIC endpoint to one io_uring worker: one byte arena and an index,
/// swapped out whole by the worker, so queuing a packet allocates nothing (amortised).
#[derive(Debug)]
pub struct Inbox {
    queue: Mutex<OutQueue>,
    /// Peers whose flows the kernel reported idle (xdp mode).
    expired: Mutex<Vec<SocketAddr>>,
    /// eventfd the worker's ring reads; written when the queue becomes non-empty.
    pub efd: i32,
    armed: AtomicBool,
}

/// Queued frames: `bytes[start..end]` is one encoded DATA frame for (slot, generation).
#[derive(Debug, Default)]
pub struct OutQueue {
    pub bytes: Vec<u8>,
    pub items: Vec<(u32, u8, u32, u32)>,
}

/// Per-worker cap on queued bytes; beyond it packets are dropped (QUIC backs off).
const INBOX_LIMIT: usize = 8 << 20;

impl Inbox {
    pub fn new() -> std::io::Result<Arc<Inbox>> {
        // SAFETY: plain eventfd creation; the fd is owned by the Inbox.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Arc::new(Inbox {
            queue: Mutex::new(OutQueue::default()),
            expired: Mutex::new(Vec::new()),
            efd,
            armed: AtomicBool::new(false),
        }))
    }

    fn push(&self, slot: u32, gen: u8, label: u64, packet: &[u8]) -> bool {
        {
            let mut q = self.queue.lock().expect("inbox poisoned");
            if q.bytes.len() > INBOX_LIMIT {
                return false;
            }
            let start = q.bytes.len() as u32;
            broflake_proto::frame::encode_data(label, packet, &mut q.bytes);
            let end = q.bytes.len() as u32;
            q.items.push((slot, gen, start, end));
        }
        self.wake();
        true
    }

    /// Asks the worker to close the connection of `peer`, if it holds it (xdp expiry).
    pub fn expire(&self, peer: SocketAddr) {
        self.expired.lock().expect("inbox poisoned").push(peer);
        self.wake();
    }

    /// Peers to close, taken.
    pub fn take_expired(&self) -> Vec<SocketAddr> {
        std::mem::take(&mut *self.expired.lock().expect("inbox poisoned"))
    }

    /// Wakes the worker once per batch: only the first push after a `take` writes the eventfd.
    fn wake(&self) {
        if !self.armed.swap(true, Ordering::AcqRel) {
            self.kick();
        }
    }

    /// Wakes the worker unconditionally (stop).
    pub fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.efd, (&one as *const u64).cast(), 8) };
    }

    /// Takes everything queued, leaving `spare` (cleared) in its place.
    pub fn take(&self, spare: &mut OutQueue) {
        spare.bytes.clear();
        spare.items.clear();
        self.armed.store(false, Ordering::Release);
        let mut q = self.queue.lock().expect("inbox poisoned");
        std::mem::swap(&mut *q, spare);
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        // SAFETY: closing the eventfd this Inbox created.
        unsafe { libc::close(self.efd) };
    }
}

/// The io_uring backend's [`RouteSink`]: the workers' inboxes (index = thread number) and
/// the count of routes open on their connections.
#[derive(Debug)]
pub struct UringRoutes {
    pub inboxes: Vec<Arc<Inbox>>,
    pub open: AtomicI64,
}

impl UringRoutes {
    /// Asks every worker to close the connection of `peer` (only its owner holds it).
    pub fn expire(&self, peer: SocketAddr) {
        for inbox in &self.inboxes {
            inbox.expire(peer);
        }
    }
}

impl RouteSink for UringRoutes {
    fn send(&self, id: u64, packet: &[u8]) -> Result<(), Dropped> {
        let (thread, slot, gen, label) = route_id::decode(id).ok_or(Dropped::RouteGone)?;
        let inbox = self.inboxes.get(thread as usize).ok_or(Dropped::RouteGone)?;
        // A packet for a slot that was since reused is dropped by the worker (generation).
        if inbox.push(slot, gen, label, packet) {
            Ok(())
        } else {
            Err(Dropped::QueueFull)
        }
    }

    fn route_count(&self) -> usize {
        self.open.load(Ordering::Relaxed).max(0) as usize
    }
}
