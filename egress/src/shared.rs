//! State shared by every connection of the process.

use crate::config::Config;
use crate::quic::QuicBridge;
use crate::registry::Registry;
use broflake_proto::time::Clock;
use broflake_proto::{Close, ServerConfig, SessionId, Timestamp};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

#[derive(Debug)]
pub struct Shared {
    pub config: Arc<Config>,
    /// Protocol session settings derived from the config.
    pub session: ServerConfig,
    pub clock: Clock,
    pub conns: Arc<Registry>,
    pub quic: Arc<QuicBridge>,
    /// Turns true once when draining starts.
    pub drain: watch::Sender<bool>,
    /// When the drain ends (Timestamp ms; 0 while not draining).
    pub drain_deadline: AtomicU64,
    /// Idle timeouts are enforced by the kernel (xdp mode): user space keeps no idle deadline.
    pub kernel_liveness: std::sync::atomic::AtomicBool,
    pub stats: Arc<Stats>,
    ids: AtomicU64,
    seed: std::collections::hash_map::RandomState,
}

impl Shared {
    pub fn new(config: Arc<Config>, quic: Arc<QuicBridge>, kernel_liveness: bool) -> Self {
        let session = config.session_config();
        let conns = Registry::new(config.limits.max_connections, config.limits.max_connections_per_ip);
        Shared {
            config,
            session,
            clock: Clock::new(std::time::Instant::now()),
            conns,
            quic,
            drain: watch::channel(false).0,
            drain_deadline: AtomicU64::new(0),
            kernel_liveness: std::sync::atomic::AtomicBool::new(kernel_liveness),
            stats: Arc::new(Stats::default()),
            ids: AtomicU64::new(0),
            seed: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Whether the kernel enforces idle timeouts (xdp mode is active).
    pub fn kernel_liveness(&self) -> bool {
        self.kernel_liveness.load(Ordering::Relaxed)
    }

    pub fn now(&self) -> Timestamp {
        self.clock.at(std::time::Instant::now())
    }

    /// A fresh session id: 16 bytes that look random (a keyed PRF of a counter, then a keyed
    /// MAC of that), so ids reveal nothing, yet a draining egress can recognise its own in
    /// `previous_session` without storing them ([`Shared::issued_here`]).
    pub fn session_id(&self) -> SessionId {
        let n = self.ids.fetch_add(1, Ordering::Relaxed) + 1;
        let head = self.mac(n ^ 0x5eed_0f5e_5510_0001);
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&head.to_be_bytes());
        id[8..].copy_from_slice(&self.mac(head).to_be_bytes());
        SessionId(id)
    }

    /// Whether `id` is a session id this process handed out.
    pub fn issued_here(&self, id: SessionId) -> bool {
        let head = u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes"));
        !id.is_none() && u64::from_be_bytes(id.0[8..].try_into().expect("8 bytes")) == self.mac(head)
    }

    fn mac(&self, n: u64) -> u64 {
        let mut h = self.seed.build_hasher();
        h.write_u64(n);
        h.finish()
    }
}

/// Event counts the process keeps itself (tests and the admin endpoint read them; the same
/// events also go to `metrics`).
#[derive(Debug, Default)]
pub struct Stats {
    pub handshakes: AtomicU64,
    pub refusals: AtomicU64,
    pub idle_closes: AtomicU64,
    pub server_pings: AtomicU64,
    pub goaways: AtomicU64,
    pub quic_migrations: AtomicU64,
    pub quic_connections: AtomicU64,
    /// Connections a draining egress admitted so clients could move their routes.
    pub resumptions: AtomicU64,
    /// Per-connection deadline checks made by user space (the io_uring wheel); in xdp mode it
    /// stays at zero for idle, client-pinging connections.
    pub userspace_liveness_checks: AtomicU64,
    /// Flows the kernel reported idle (xdp mode), and how many of them matched a connection.
    pub xdp_expired: AtomicU64,
    pub xdp_closed: AtomicU64,
    pub proxy_refusals: AtomicU64,
}

impl Stats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A WebSocket close to send: code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsClose {
    pub code: u16,
    pub reason: String,
}

impl From<&Close> for WsClose {
    fn from(c: &Close) -> Self {
        WsClose { code: c.close_code(), reason: c.reason.to_string() }
    }
}
