//! The QUIC side: one quinn endpoint over a [`VirtualSocket`]. Every (connection, label)
//! pair is a route with its own virtual address; packets from quinn go back to the right
//! connection and label, already framed as DATA.

use crate::metrics as m;
use broflake_tunnel::{route_addr, route_id, Inbound, PacketSink, VirtualSocket};
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Where a route's packets go: the owning connection's queue, and its label there.
#[derive(Debug, Clone)]
struct Target {
    tx: mpsc::Sender<Bytes>,
    label: u64,
}

#[derive(Debug, Default)]
struct Routes {
    map: Mutex<HashMap<u64, Target>>,
    /// Inboxes of the io_uring worker threads (index = thread number).
    uring: std::sync::OnceLock<Vec<Arc<Inbox>>>,
}

/// Route ids of io_uring connections carry their address: no per-route state at all.
/// Layout: `1 | thread (5) | slot (22) | generation (8) | label (28)`.
pub mod uring_route {
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
    armed: std::sync::atomic::AtomicBool,
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
            armed: Default::default(),
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
        if !self.armed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a valid u64 to our eventfd.
            unsafe { libc::write(self.efd, (&one as *const u64).cast(), 8) };
        }
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

    fn wake(&self) {
        if !self.armed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a valid u64 to our eventfd.
            unsafe { libc::write(self.efd, (&one as *const u64).cast(), 8) };
        }
    }

    /// Takes everything queued, leaving `spare` (cleared) in its place.
    pub fn take(&self, spare: &mut OutQueue) {
        spare.bytes.clear();
        spare.items.clear();
        self.armed.store(false, std::sync::atomic::Ordering::Release);
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

impl PacketSink for Routes {
    fn send(&self, destination: SocketAddr, packet: &[u8]) {
        if let Some((thread, slot, gen, label)) = route_id(destination).and_then(uring_route::decode) {
            let inbox = self.uring.get().and_then(|v| v.get(thread as usize));
            if !inbox.is_some_and(|i| i.push(slot, gen, label, packet)) {
                metrics::counter!(m::PACKETS_DROPPED, "reason" => "send_queue_full").increment(1);
            }
            return;
        }
        let target = route_id(destination).and_then(|id| self.map.lock().expect("routes poisoned").get(&id).cloned());
        let Some(target) = target else {
            metrics::counter!(m::PACKETS_DROPPED, "reason" => "route_gone").increment(1);
            return;
        };
        let mut frame =
            Vec::with_capacity(broflake_proto::frame::data_overhead(target.label, packet.len()) + packet.len() + 8);
        broflake_proto::frame::encode_data(target.label, packet, &mut frame);
        if target.tx.try_send(Bytes::from(frame)).is_err() {
            // The connection is not draining its queue (slow reader): drop, QUIC backs off.
            metrics::counter!(m::PACKETS_DROPPED, "reason" => "send_queue_full").increment(1);
        }
    }
}

/// The bridge between connections and the QUIC endpoint.
#[derive(Debug)]
pub struct QuicBridge {
    routes: Arc<Routes>,
    inbound: Inbound,
    next_id: AtomicU64,
    pub endpoint: quinn::Endpoint,
}

/// The stateless-reset key, derived from the egress's long-term secret (its TLS key) instead
/// of chosen at random per process: an egress restarted with the same state directory then
/// answers packets of its predecessor's connections with resets the consumers accept, and
/// they reconnect at once instead of waiting for their idle timeout.
pub fn reset_key(secret: &[u8]) -> Arc<dyn quinn::crypto::HmacKey> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"broflake-egress quic stateless reset v1\0");
    h.update(secret);
    Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &h.finalize()))
}

impl QuicBridge {
    /// `reset_secret` seeds the stateless-reset key (see [`reset_key`]).
    pub fn new(server: quinn::ServerConfig, inbound_queue: usize, reset_secret: &[u8]) -> std::io::Result<Arc<Self>> {
        let routes = Arc::new(Routes::default());
        let local: SocketAddr = "[fd00:b70f::]:443".parse().expect("literal");
        let (socket, inbound) = VirtualSocket::new(local, routes.clone(), inbound_queue);
        let mut config = broflake_tunnel::settings::endpoint_config();
        config.reset_key(reset_key(reset_secret));
        let endpoint =
            quinn::Endpoint::new_with_abstract_socket(config, Some(server), socket, Arc::new(quinn::TokioRuntime))?;
        Ok(Arc::new(QuicBridge { routes, inbound, next_id: AtomicU64::new(1), endpoint }))
    }

    /// Opens a route for `label` on the connection whose packet queue is `tx`.
    pub fn open_route(&self, tx: mpsc::Sender<Bytes>, label: u64) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.routes.map.lock().expect("routes poisoned").insert(id, Target { tx, label });
        metrics::gauge!(m::ROUTES).increment(1.0);
        id
    }

    pub fn close_route(&self, id: u64) {
        if self.routes.map.lock().expect("routes poisoned").remove(&id).is_some() {
            metrics::gauge!(m::ROUTES).decrement(1.0);
        }
    }

    /// Hands a QUIC packet that arrived on route `id` to the endpoint.
    pub fn deliver(&self, id: u64, packet: Bytes) {
        if !self.inbound.deliver(route_addr(id), packet) {
            metrics::counter!(m::PACKETS_DROPPED, "reason" => "endpoint_queue_full").increment(1);
        }
    }

    /// The io_uring workers' inboxes (empty with the tokio backend).
    pub fn uring_inboxes(&self) -> &[Arc<Inbox>] {
        self.routes.uring.get().map_or(&[], |v| v.as_slice())
    }

    /// Registers the io_uring workers' inboxes (once, at start-up).
    pub fn set_uring_inboxes(&self, inboxes: Vec<Arc<Inbox>>) {
        let _ = self.routes.uring.set(inboxes);
    }

    pub fn route_count(&self) -> usize {
        self.routes.map.lock().expect("routes poisoned").len()
    }
}

/// The quinn server configuration for the tunnel.
pub fn server_config(
    crypto: Arc<quinn::crypto::rustls::QuicServerConfig>,
    config: &crate::config::Config,
) -> quinn::ServerConfig {
    let mut s = quinn::ServerConfig::with_crypto(crypto);
    s.transport_config(Arc::new(broflake_tunnel::settings::transport(
        config.limits.max_streams_per_quic_connection,
        config.quic.idle_timeout,
        None,
    )));
    // Consumers move between relays and routes: that is the point of running QUIC end to end.
    s.migration(true);
    s
}
