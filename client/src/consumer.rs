//! The consumer's QUIC connection to the egress, tunnelled over a route of a [`Link`].
//!
//! quinn sees one fixed virtual peer address for the egress; which link and route carry the
//! packets is switched underneath (`attach`). The egress then sees the same QUIC connection
//! arrive from a new (connection, route) and migrates it, so a consumer survives the loss of
//! its relay without a new handshake.

use crate::link::{Link, LinkEvent, LinkSender};
use crate::transport::{client_tls, TlsMode};
use broflake_proto::proxy::{ProxyReply, ProxyRequest, ProxyStatus, ALPN};
use broflake_tunnel::{Inbound, PacketSink, VirtualSocket};
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The egress as quinn on the consumer side sees it.
pub fn egress_addr() -> SocketAddr {
    "[fd00:b70f::e]:443".parse().expect("literal")
}

#[derive(Debug, Default)]
struct PathSink {
    current: Mutex<Option<(LinkSender, u64, u64)>>,
}

impl PacketSink for PathSink {
    fn send(&self, _destination: SocketAddr, packet: &[u8]) {
        let current = self.current.lock().expect("poisoned").clone();
        if let Some((link, label, _)) = current {
            link.send_packet(label, Bytes::copy_from_slice(packet));
        }
    }
}

/// A proxy request that did not get a connection.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("egress refused: {} ({reason})", status.label())]
    Refused { status: ProxyStatus, reason: String },
    #[error("QUIC: {0}")]
    Quic(String),
    #[error("malformed reply from the egress")]
    BadReply,
}

/// Settings of the consumer's QUIC connection.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// How to verify the egress's certificate.
    pub tls: TlsMode,
    /// Name to verify (with a CA); the egress's self-signed certificate carries `localhost`.
    pub server_name: String,
    pub max_streams: u32,
    pub idle_timeout: Duration,
    /// QUIC keep-alive; also makes a migration visible promptly after a failover.
    pub keep_alive: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            tls: TlsMode::default(),
            server_name: "localhost".into(),
            max_streams: 256,
            // With keep-alives every 5 s a healthy connection never idles out; a dead one
            // (its egress gone, no reset reaching us) is noticed within 30 s, not minutes.
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
        }
    }
}

/// A consumer: one QUIC connection to the egress.
#[derive(Debug)]
pub struct Consumer {
    pub endpoint: quinn::Endpoint,
    pub connection: quinn::Connection,
    sink: Arc<PathSink>,
    inbound: Inbound,
    /// Incremented whenever the link in use ends.
    pub link_failures: Arc<AtomicU64>,
    /// Notified whenever the link in use ends.
    pub link_down: Arc<tokio::sync::Notify>,
    generation: Arc<AtomicU64>,
}

impl Consumer {
    /// Opens a route on `link` and establishes the QUIC connection over it.
    pub async fn connect(link: Link, cfg: &ConsumerConfig) -> anyhow::Result<Consumer> {
        let sink = Arc::new(PathSink::default());
        let local: SocketAddr = "[fd00:b70f::c]:443".parse().expect("literal");
        let (socket, inbound) = VirtualSocket::new(local, sink.clone(), 4096);
        let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
            broflake_tunnel::settings::endpoint_config(broflake_tunnel::settings::MAX_MTU),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        let mut tls = client_tls(&cfg.tls, &[ALPN])?;
        tls.enable_early_data = false;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(broflake_tunnel::settings::transport(
            cfg.max_streams,
            cfg.idle_timeout,
            Some(cfg.keep_alive),
            broflake_tunnel::settings::MAX_MTU,
        )));
        endpoint.set_default_client_config(client);
        let failures = Arc::new(AtomicU64::new(0));
        let generation = Arc::new(AtomicU64::new(0));
        let link_down = Arc::new(tokio::sync::Notify::new());
        attach_link(&sink, &inbound, &failures, &generation, &link_down, link).await?;
        let connection = endpoint.connect(egress_addr(), &cfg.server_name)?.await?;
        Ok(Consumer { endpoint, connection, sink, inbound, link_failures: failures, link_down, generation })
    }

    /// Moves the QUIC connection onto a route of another link (failover, GOAWAY).
    pub async fn attach(&self, link: Link) -> anyhow::Result<()> {
        attach_link(&self.sink, &self.inbound, &self.link_failures, &self.generation, &self.link_down, link).await
    }

    /// Opens a proxy stream to `host:port`; returns the stream once the egress connected.
    pub async fn open(&self, host: &str, port: u16) -> Result<(quinn::SendStream, quinn::RecvStream), ProxyError> {
        let (mut send, mut recv) = self.connection.open_bi().await.map_err(|e| ProxyError::Quic(e.to_string()))?;
        let mut req = Vec::new();
        ProxyRequest { host, port }.encode(&mut req);
        send.write_all(&req).await.map_err(|e| ProxyError::Quic(e.to_string()))?;
        let mut buf = Vec::new();
        loop {
            match ProxyReply::decode(&buf) {
                Ok(Some((reply, used))) => {
                    if used != buf.len() {
                        // The egress sends nothing after the reply before the destination does;
                        // bytes here would belong to the stream, which this API does not return.
                        return Err(ProxyError::BadReply);
                    }
                    if reply.status != ProxyStatus::OK {
                        return Err(ProxyError::Refused { status: reply.status, reason: reply.reason.to_string() });
                    }
                    return Ok((send, recv));
                }
                Ok(None) => {}
                Err(_) => return Err(ProxyError::BadReply),
            }
            // Read byte-wise up to the reply's end so no destination bytes are consumed.
            let mut one = [0u8; 1];
            match recv.read(&mut one).await {
                Ok(Some(1)) => buf.push(one[0]),
                Ok(_) => return Err(ProxyError::BadReply),
                Err(e) => return Err(ProxyError::Quic(e.to_string())),
            }
        }
    }

    /// Closes the link currently in use (tests use it to simulate a relay dying).
    pub async fn close_current_link(&self) {
        let current = self.sink.current.lock().expect("poisoned").clone();
        if let Some((link, _, _)) = current {
            link.close().await;
        }
    }

    /// The link and label currently carrying the connection.
    pub fn current_route(&self) -> Option<u64> {
        self.sink.current.lock().expect("poisoned").as_ref().map(|(_, l, _)| *l)
    }
}

async fn attach_link(
    sink: &Arc<PathSink>,
    inbound: &Inbound,
    failures: &Arc<AtomicU64>,
    generation: &Arc<AtomicU64>,
    link_down: &Arc<tokio::sync::Notify>,
    link: Link,
) -> anyhow::Result<()> {
    let link_down = link_down.clone();
    let label = link.sender.open_route().await.map_err(|e| anyhow::anyhow!("cannot open a route: {e}"))?;
    let gen = generation.fetch_add(1, Ordering::SeqCst) + 1;
    // The sink holds the link's only sender; this task holds only its events and a weak
    // reference to the sink. When the consumer goes away, the sender goes with it and the
    // link closes (a strong reference here would keep the link, and the egress connection,
    // alive for ever).
    let Link { sender, mut events, .. } = link;
    *sink.current.lock().expect("poisoned") = Some((sender, label, gen));
    let inbound = inbound.clone();
    let failures = failures.clone();
    let generation = generation.clone();
    let sink = Arc::downgrade(sink);
    let from = egress_addr();
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            match ev {
                LinkEvent::Data { label: l, packet } if l == label => {
                    inbound.deliver(from, packet);
                }
                LinkEvent::Closed { reason, .. } => {
                    tracing::debug!(%reason, "consumer link ended");
                    break;
                }
                _ => {}
            }
        }
        // Only the link in use counts as a failure of the path (not one already replaced).
        if generation.load(Ordering::SeqCst) == gen {
            failures.fetch_add(1, Ordering::SeqCst);
            link_down.notify_one();
            if let Some(sink) = sink.upgrade() {
                let mut cur = sink.current.lock().expect("poisoned");
                if cur.as_ref().is_some_and(|(_, _, g)| *g == gen) {
                    *cur = None;
                }
            }
        }
    });
    Ok(())
}
