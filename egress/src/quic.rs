//! The QUIC side: one quinn endpoint over a [`VirtualSocket`]. Every (connection, label)
//! pair is a route with its own virtual address (a route id); packets from quinn go to the
//! backend's [`RouteSink`], which frames them as DATA for the right connection and label.

use crate::fleet::{self, Fleet, Received, FLEET_ROUTE};
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
    /// Fleet mode: routes of packets other hosts forwarded here go back through it.
    fleet: Option<Arc<Fleet>>,
}

impl PacketSink for Routes {
    fn send(&self, destination: SocketAddr, packet: &[u8]) {
        let r = match (route_id(destination), self.sink.get(), &self.fleet) {
            (Some(id), _, Some(f)) if id & (3 << 62) == FLEET_ROUTE => f.send_back(id, packet),
            (Some(id), Some(sink), _) => sink.send(id, packet),
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
    /// `reset_secret` seeds the stateless-reset key (see [`reset_key`]); with a `fleet` the
    /// endpoint's connection ids carry this host's fleet id.
    pub fn new(
        server: quinn::ServerConfig,
        inbound_queue: usize,
        reset_secret: &[u8],
        max_mtu: u16,
        fleet: Option<Arc<Fleet>>,
    ) -> std::io::Result<Arc<Self>> {
        let routes = Arc::new(Routes { sink: Default::default(), fleet: fleet.clone() });
        let local: SocketAddr = "[fd00:b70f::]:443".parse().expect("literal");
        let (socket, inbound) = VirtualSocket::new(local, routes.clone(), inbound_queue);
        let mut config = broflake_tunnel::settings::endpoint_config(max_mtu);
        config.reset_key(reset_key(reset_secret));
        if let Some(f) = &fleet {
            let id = f.id;
            config.cid_generator(move || Box::new(fleet::FleetCids { id }));
        }
        let endpoint =
            quinn::Endpoint::new_with_abstract_socket(config, Some(server), socket, Arc::new(quinn::TokioRuntime))?;
        Ok(Arc::new(QuicBridge { routes, inbound, endpoint }))
    }

    /// Hands a QUIC packet that arrived on route `id` to the endpoint, or, in a fleet, to the
    /// host that holds its connection.
    pub fn deliver(&self, id: u64, packet: Bytes) {
        if let Some(f) = &self.routes.fleet {
            match fleet::owner(&packet) {
                Some(owner) if owner != f.id => return f.forward(owner, id, &packet),
                _ => {}
            }
        }
        self.to_endpoint(id, packet);
    }

    fn to_endpoint(&self, id: u64, packet: Bytes) {
        if !self.inbound.deliver(route_addr(id), packet) {
            metrics::counter!(m::PACKETS_DROPPED, "reason" => "endpoint_queue_full").increment(1);
        }
    }

    /// Connects the endpoint to the backend's routes (once, at start-up; packets sent before
    /// are dropped as for a gone route).
    pub fn set_sink(&self, sink: Arc<dyn RouteSink>) {
        let _ = self.routes.sink.set(sink);
    }

    /// Receives what peers forward (fleet mode), until the socket fails; forgets forwarded
    /// routes idle longer than `idle`.
    pub async fn serve_fleet(self: Arc<Self>, idle: std::time::Duration) {
        let Some(f) = self.routes.fleet.clone() else { return };
        let socket = match f.recv_socket().and_then(tokio::net::UdpSocket::from_std) {
            Ok(s) => s,
            Err(e) => return tracing::error!(error = %e, "fleet socket unusable; no forwarding"),
        };
        let mut buf = vec![0u8; 65536];
        let mut sweep = tokio::time::interval(idle.min(std::time::Duration::from_secs(10)));
        loop {
            tokio::select! {
                r = socket.recv_from(&mut buf) => {
                    let (n, from) = match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "fleet receive failed");
                            continue;
                        }
                    };
                    match f.receive(from, &buf[..n]) {
                        Some(Received::ToEndpoint { route, packet }) => {
                            self.to_endpoint(route, Bytes::copy_from_slice(packet))
                        }
                        Some(Received::ToRoute { route, packet }) => {
                            let r = self.routes.sink.get().map_or(Err(Dropped::RouteGone), |s| s.send(route, packet));
                            if r.is_err() {
                                metrics::counter!(m::FLEET_DROPPED, "reason" => "route_gone").increment(1);
                            }
                        }
                        None => {}
                    }
                }
                _ = sweep.tick() => {
                    f.sweep(idle);
                    metrics::gauge!(m::FLEET_ROUTES).set(f.remote_routes() as f64);
                }
            }
        }
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
