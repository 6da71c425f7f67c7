//! The QUIC side: one quinn endpoint over a [`VirtualSocket`]. Every (connection, label)
//! pair is a route with its own virtual address (a route id); packets from quinn go to the
//! backend's [`RouteSink`], which frames them as DATA for the right connection and label.

use crate::metrics as m;
use broflake_tunnel::{route_addr, route_id, Inbound, PacketSink, VirtualSocket};
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;

/// Where the endpoint's packets for a route go. Each backend implements it where it lives
/// (the tokio backend's route table, the io_uring workers' inboxes), so the bridge knows no
/// backend and no backend's id layout.
pub trait RouteSink: Send + Sync + std::fmt::Debug {
    /// Queues `packet` for route `id`, framed as a DATA frame for the route's label.
    fn send(&self, id: u64, packet: &[u8]) -> Result<(), Dropped>;
    /// Routes open now.
    fn route_count(&self) -> usize;
}

/// Why a packet from the endpoint was not queued (QUIC recovers from the loss).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The route is gone (its connection closed).
    RouteGone,
    /// The connection is not draining its queue (slow reader).
    QueueFull,
}

impl Dropped {
    pub fn label(self) -> &'static str {
        match self {
            Dropped::RouteGone => "route_gone",
            Dropped::QueueFull => "send_queue_full",
        }
    }
}

/// The endpoint's side of the virtual socket: forwards to the backend's sink.
#[derive(Debug, Default)]
struct Routes {
    sink: std::sync::OnceLock<Arc<dyn RouteSink>>,
}

impl PacketSink for Routes {
    fn send(&self, destination: SocketAddr, packet: &[u8]) {
        let r = match (route_id(destination), self.sink.get()) {
            (Some(id), Some(sink)) => sink.send(id, packet),
            _ => Err(Dropped::RouteGone),
        };
        if let Err(why) = r {
            metrics::counter!(m::PACKETS_DROPPED, "reason" => why.label()).increment(1);
        }
    }
}

/// The bridge between connections and the QUIC endpoint.
#[derive(Debug)]
pub struct QuicBridge {
    routes: Arc<Routes>,
    inbound: Inbound,
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
    pub fn new(
        server: quinn::ServerConfig,
        inbound_queue: usize,
        reset_secret: &[u8],
        max_mtu: u16,
    ) -> std::io::Result<Arc<Self>> {
        let routes = Arc::new(Routes::default());
        let local: SocketAddr = "[fd00:b70f::]:443".parse().expect("literal");
        let (socket, inbound) = VirtualSocket::new(local, routes.clone(), inbound_queue);
        let mut config = broflake_tunnel::settings::endpoint_config(max_mtu);
        config.reset_key(reset_key(reset_secret));
        let endpoint =
            quinn::Endpoint::new_with_abstract_socket(config, Some(server), socket, Arc::new(quinn::TokioRuntime))?;
        Ok(Arc::new(QuicBridge { routes, inbound, endpoint }))
    }

    /// Hands a QUIC packet that arrived on route `id` to the endpoint.
    pub fn deliver(&self, id: u64, packet: Bytes) {
        if !self.inbound.deliver(route_addr(id), packet) {
            metrics::counter!(m::PACKETS_DROPPED, "reason" => "endpoint_queue_full").increment(1);
        }
    }

    /// Connects the endpoint to the backend's routes (once, at start-up; packets sent before
    /// are dropped as for a gone route).
    pub fn set_sink(&self, sink: Arc<dyn RouteSink>) {
        let _ = self.routes.sink.set(sink);
    }

    pub fn route_count(&self) -> usize {
        self.routes.sink.get().map_or(0, |s| s.route_count())
    }
}

/// The largest QUIC packet the egress probes for: what its own frame limit lets one DATA
/// frame carry (hops further on may carry less; path MTU discovery finds out).
pub fn max_mtu(config: &crate::config::Config) -> u16 {
    broflake_tunnel::settings::max_mtu_for_frame_limit(u64::from(config.limits.max_frame_size))
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
        max_mtu(config),
    )));
    // Consumers move between relays and routes: that is the point of running QUIC end to end.
    s.migration(true);
    s
}
