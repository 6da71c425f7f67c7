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
}

impl PacketSink for Routes {
    fn send(&self, destination: SocketAddr, packet: &[u8]) {
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

impl QuicBridge {
    pub fn new(server: quinn::ServerConfig, inbound_queue: usize) -> std::io::Result<Arc<Self>> {
        let routes = Arc::new(Routes::default());
        let local: SocketAddr = "[fd00:b70f::]:443".parse().expect("literal");
        let (socket, inbound) = VirtualSocket::new(local, routes.clone(), inbound_queue);
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            broflake_tunnel::settings::endpoint_config(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
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
