//! A link: one WebSocket to an egress (or an upstream relay) running the client side of the
//! Broflake protocol. A driver task owns the socket and the [`ClientSession`]: it sends
//! PINGs at the server's keepalive interval (jittered), detects a dead link by a missed
//! PONG, and moves DATA between routes and the caller.

use crate::pipe::{Pipe, PipeEvent};
use crate::transport;
pub use crate::transport::TlsMode;
use broflake_proto::client::{ClientEvent, RouteError};
use broflake_proto::time::Clock;
use broflake_proto::{binding, ClientConfig, ClientSession, Close, ErrorCode, Negotiated};
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Uri};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Error as WsError;

/// How to open a link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// `ws://host:port/path` or `wss://…`.
    pub url: String,
    pub tls: TlsMode,
    pub client: ClientConfig,
    /// Seed for PING jitter and grease.
    pub seed: u64,
    /// Subprotocol tokens to offer; default: those of the configured version range plus
    /// the generic token.
    pub subprotocols: Option<Vec<String>>,
    pub connect_timeout: Duration,
    /// Outgoing packets queued before new ones are dropped.
    pub queue: usize,
}

impl LinkConfig {
    pub fn new(url: impl Into<String>) -> Self {
        LinkConfig {
            url: url.into(),
            tls: TlsMode::default(),
            client: ClientConfig::default(),
            seed: seed(),
            subprotocols: None,
            connect_timeout: Duration::from_secs(10),
            queue: 1024,
        }
    }
}

/// A per-process seed; jitter and grease need variety, not secrecy.
pub fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

/// Why a link could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("bad URL {0}: expected ws://host:port/path or wss://host:port/path")]
    BadUrl(String),
    #[error("cannot connect to {url}: {error}")]
    Connect { url: String, error: String },
    #[error("upgrade refused with HTTP {status}: {reason}")]
    Http { status: u16, reason: String },
    #[error("handshake refused: {0}")]
    Refused(Close),
    #[error("connection closed during the handshake: {0}")]
    Closed(String),
    #[error("handshake timed out")]
    Timeout,
}

impl LinkError {
    /// The refusal, when the server refused in-band.
    pub fn refusal(&self) -> Option<&Close> {
        match self {
            LinkError::Refused(c) => Some(c),
            _ => None,
        }
    }
}

/// What a link reports.
#[derive(Debug, Clone)]
pub enum LinkEvent {
    Data {
        label: u64,
        packet: Bytes,
    },
    RouteClosed {
        label: u64,
        code: ErrorCode,
    },
    GoAway {
        grace_ms: u64,
        reconnect: String,
    },
    /// The link ended (for whatever reason: dead link, server close, local close).
    Closed {
        reason: String,
        code: Option<u16>,
    },
}

#[derive(Debug)]
enum Cmd {
    Data { label: u64, packet: Bytes },
    OpenRoute { label: u64, reply: Option<oneshot::Sender<Result<u64, RouteError>>> },
    CloseRoute { label: u64, code: ErrorCode },
    Close,
}

/// Counters of one link.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub pings_sent: AtomicU64,
    pub pongs_received: AtomicU64,
    pub last_rtt_ms: AtomicU64,
    pub packets_sent: AtomicU64,
    pub packets_received: AtomicU64,
    pub packets_dropped: AtomicU64,
    /// Packets larger than this hop carries, dropped (PROTOCOL.md §14.4; what path MTU
    /// discovery's probes meet).
    pub packets_too_large: AtomicU64,
}

/// A cheap handle for sending on a link.
#[derive(Debug, Clone)]
pub struct LinkSender {
    tx: mpsc::Sender<Cmd>,
    stats: Arc<LinkStats>,
    /// Labels are allocated here, synchronously, so relays need no round trip per route.
    next_label: Arc<AtomicU64>,
    /// The session id the server gave this link.
    pub session_id: broflake_proto::SessionId,
}

impl LinkSender {
    /// Queues a QUIC packet on a route; dropped (like UDP) if the link is backed up.
    pub fn send_packet(&self, label: u64, packet: Bytes) -> bool {
        let ok = self.tx.try_send(Cmd::Data { label, packet }).is_ok();
        if !ok {
            self.stats.packets_dropped.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Queues a packet, waiting for room (relays use this for backpressure).
    pub async fn send_packet_wait(&self, label: u64, packet: Bytes) -> bool {
        self.tx.send(Cmd::Data { label, packet }).await.is_ok()
    }

    /// Allocates a route label on this link and waits until the session has it.
    pub async fn open_route(&self) -> Result<u64, RouteError> {
        let label = self.next_label.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.tx.send(Cmd::OpenRoute { label, reply: Some(tx) }).await.map_err(|_| RouteError::NotOpen)?;
        rx.await.map_err(|_| RouteError::NotOpen)?
    }

    /// Allocates a route label without waiting (packets queued after it use it). Fails only
    /// if the link's queue is full or closed.
    pub fn open_route_now(&self) -> Option<u64> {
        let label = self.next_label.fetch_add(1, Ordering::Relaxed);
        self.tx.try_send(Cmd::OpenRoute { label, reply: None }).ok().map(|()| label)
    }

    pub async fn close_route(&self, label: u64, code: ErrorCode) {
        let _ = self.tx.send(Cmd::CloseRoute { label, code }).await;
    }

    /// Queues a ROUTE_CLOSE without waiting.
    pub fn close_route_now(&self, label: u64, code: ErrorCode) -> bool {
        self.tx.try_send(Cmd::CloseRoute { label, code }).is_ok()
    }

    /// Closes the link (WebSocket close 1000).
    pub async fn close(&self) {
        let _ = self.tx.send(Cmd::Close).await;
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }
}

/// An open link.
#[derive(Debug)]
pub struct Link {
    pub negotiated: Negotiated,
    /// The subprotocol the server selected.
    pub subprotocol: String,
    pub sender: LinkSender,
    pub events: mpsc::Receiver<LinkEvent>,
    /// Why the link ended, once it has.
    pub end: Arc<Mutex<Option<String>>>,
    /// The WebRTC candidate pair, for a link over a DataChannel pair.
    pub path: Option<broflake_rtc::PathHandle>,
}

fn parse_url(url: &str) -> Result<(String, u16, bool), LinkError> {
    let uri: Uri = url.parse().map_err(|_| LinkError::BadUrl(url.into()))?;
    let tls = match uri.scheme_str() {
        Some("ws") => false,
        Some("wss") => true,
        _ => return Err(LinkError::BadUrl(url.into())),
    };
    let host = uri.host().ok_or_else(|| LinkError::BadUrl(url.into()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok((host, port, tls))
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(1 << 20)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

impl Link {
    /// Connects, upgrades, and completes the Broflake handshake.
    pub async fn connect(cfg: LinkConfig) -> Result<Link, LinkError> {
        let (host, port, tls) = parse_url(&cfg.url)?;
        let timeout = cfg.connect_timeout;
        let fut = async {
            let stream = transport::connect_stream(&host, port, tls.then_some(&cfg.tls))
                .await
                .map_err(|e| LinkError::Connect { url: cfg.url.clone(), error: format!("{e:#}") })?;
            let mut req = cfg.url.as_str().into_client_request().map_err(|_| LinkError::BadUrl(cfg.url.clone()))?;
            let offer = cfg
                .subprotocols
                .clone()
                .unwrap_or_else(|| binding::offer(cfg.client.min_version, cfg.client.max_version));
            if !offer.is_empty() {
                let value = HeaderValue::from_str(&offer.join(", ")).map_err(|_| LinkError::BadUrl(cfg.url.clone()))?;
                req.headers_mut().insert("sec-websocket-protocol", value);
            }
            let (ws, resp) = tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config()))
                .await
                .map_err(|e| match e {
                    WsError::Http(r) => LinkError::Http {
                        status: r.status().as_u16(),
                        reason: r
                            .body()
                            .as_ref()
                            .map(|b| String::from_utf8_lossy(b).trim().to_string())
                            .unwrap_or_default(),
                    },
                    other => LinkError::Connect { url: cfg.url.clone(), error: other.to_string() },
                })?;
            let subprotocol = resp
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            handshake(Pipe::Ws(Box::new(ws)), cfg.clone(), subprotocol).await
        };
        tokio::time::timeout(timeout, fut).await.map_err(|_| LinkError::Timeout)?
    }

    /// Runs the client side of the protocol over an open pipe (a WebRTC DataChannel pair to
    /// a volunteer): the handshake, then the link as over a WebSocket.
    pub async fn over(pipe: Pipe, cfg: LinkConfig) -> Result<Link, LinkError> {
        let timeout = cfg.connect_timeout;
        // A DataChannel has no subprotocol header: the version is negotiated in HELLO.
        let subprotocol = binding::Selected::Generic.token();
        tokio::time::timeout(timeout, handshake(pipe, cfg, subprotocol)).await.map_err(|_| LinkError::Timeout)?
    }
}

async fn send_tx(pipe: &mut Pipe, tx: &mut Vec<u8>, data_only: bool) -> Result<(), String> {
    if tx.is_empty() {
        return Ok(());
    }
    pipe.send(Bytes::from(std::mem::take(tx)), data_only).await
}

async fn handshake(mut pipe: Pipe, cfg: LinkConfig, subprotocol: String) -> Result<Link, LinkError> {
    let clock = Clock::new(std::time::Instant::now());
    let now = || clock.at(std::time::Instant::now());
    let mut session = ClientSession::new(cfg.seed);
    let mut tx = Vec::new();
    session.start(&cfg.client, now(), &mut tx);
    send_tx(&mut pipe, &mut tx, false).await.map_err(LinkError::Closed)?;
    let negotiated = loop {
        let bytes = match pipe.recv().await {
            PipeEvent::Message(b) => b,
            PipeEvent::Text => continue,
            PipeEvent::Closed { reason, code: Some(code) } => {
                return Err(match ErrorCode::from_close_code(code) {
                    Some(c) if code != 1000 => LinkError::Refused(Close::peer(c, &reason, 0)),
                    _ => LinkError::Closed(format!("close {code} {reason}")),
                });
            }
            PipeEvent::Closed { reason, code: None } => return Err(LinkError::Closed(reason)),
        };
        let mut welcome = None;
        let r = session.handle_message(&cfg.client, now(), &bytes, &mut tx, |_, ev, _| {
            if let ClientEvent::Welcome(n) = ev {
                welcome = Some(n);
            }
            Ok(())
        });
        match r {
            Ok(()) => {}
            Err(close) if close.by_peer => return Err(LinkError::Refused(close)),
            Err(close) => {
                let _ = send_tx(&mut pipe, &mut tx, false).await;
                return Err(LinkError::Closed(close.to_string()));
            }
        }
        if let Some(n) = welcome {
            break n;
        }
    };
    let (cmd_tx, cmd_rx) = mpsc::channel(cfg.queue);
    let (ev_tx, ev_rx) = mpsc::channel(cfg.queue);
    let stats = Arc::new(LinkStats::default());
    let end = Arc::new(Mutex::new(None));
    let path = pipe.path();
    let driver =
        Driver { pipe: Some(pipe), session, cfg, clock, cmd_rx, ev_tx, stats: stats.clone(), end: end.clone(), tx };
    tokio::spawn(driver.run());
    Ok(Link {
        negotiated,
        subprotocol,
        sender: LinkSender {
            tx: cmd_tx,
            stats,
            next_label: Arc::new(AtomicU64::new(0)),
            session_id: negotiated.session_id,
        },
        events: ev_rx,
        end,
        path,
    })
}

struct Driver {
    /// Always Some while running (taken to close it at the end).
    pipe: Option<Pipe>,
    session: ClientSession,
    cfg: LinkConfig,
    clock: Clock,
    cmd_rx: mpsc::Receiver<Cmd>,
    ev_tx: mpsc::Sender<LinkEvent>,
    stats: Arc<LinkStats>,
    end: Arc<Mutex<Option<String>>>,
    tx: Vec<u8>,
}

enum Step {
    Continue,
    /// End with this WebSocket close (None: the connection is already gone).
    End(Option<(u16, String)>, String),
}

impl Driver {
    fn now(&self) -> broflake_proto::Timestamp {
        self.clock.at(std::time::Instant::now())
    }

    async fn run(mut self) {
        let (close, reason) = loop {
            let wake = self
                .session
                .poll_timeout(&self.cfg.client)
                .map(|t| tokio::time::Instant::from_std(self.clock.instant(t)))
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            let pipe = self.pipe.as_mut().expect("running");
            let mut data_only = false;
            let step = tokio::select! {
                _ = tokio::time::sleep_until(wake) => self.on_timeout(),
                cmd = self.cmd_rx.recv() => {
                    data_only = matches!(cmd, Some(Cmd::Data { .. }));
                    self.on_cmd(cmd)
                }
                msg = pipe.recv() => self.on_message(msg).await,
            };
            let pipe = self.pipe.as_mut().expect("running");
            if let Err(e) = send_tx(pipe, &mut self.tx, data_only).await {
                break (None, format!("send failed: {e}"));
            }
            if let Step::End(close, reason) = step {
                break (close, reason);
            }
        };
        let code = close.as_ref().map(|c| c.0);
        if let (Some((code, why)), Some(pipe)) = (close, self.pipe.take()) {
            pipe.close(code, why).await;
        }
        tracing::debug!(url = %self.cfg.url, %reason, "link ended");
        *self.end.lock().expect("poisoned") = Some(reason.clone());
        let _ = self.ev_tx.send(LinkEvent::Closed { reason, code }).await;
    }

    fn on_timeout(&mut self) -> Step {
        let before = self.session.pings_sent();
        let now = self.now();
        let r = self.session.handle_timeout(&self.cfg.client, now, &mut self.tx);
        if self.session.pings_sent() > before {
            self.stats.pings_sent.fetch_add(1, Ordering::Relaxed);
        }
        match r {
            Ok(()) => Step::Continue,
            Err(close) => Step::End(Some((close.close_code(), close.reason.to_string())), close.to_string()),
        }
    }

    /// Writes one DATA frame; 1 if written, 0 if dropped. On a data channel only base-size
    /// packets travel (one SCTP chunk each, PROTOCOL.md §17.5).
    fn send_data(&mut self, label: u64, packet: &[u8]) -> u64 {
        let limit = self.session.max_frame_size();
        let max = self.pipe.as_ref().map_or(limit, |p| p.max_data_frame(limit));
        let r = broflake_proto::packet_size::check_fits(label, packet.len(), max)
            .and_then(|()| self.session.send_data(label, packet, &mut self.tx));
        match r {
            Ok(()) => 1,
            Err(broflake_proto::DataRefused::TooLarge { .. }) => {
                self.stats.packets_too_large.fetch_add(1, Ordering::Relaxed);
                0
            }
            Err(_) => 0,
        }
    }

    fn on_cmd(&mut self, cmd: Option<Cmd>) -> Step {
        match cmd {
            None | Some(Cmd::Close) => {
                let c = self.session.close();
                Step::End(Some((1000, c.reason.to_string())), "closed locally".into())
            }
            Some(Cmd::Data { label, packet }) => {
                let mut n = self.send_data(label, &packet);
                // Coalesce what is already queued into the same message (not on a
                // DataChannel: there each packet is its own unreliable message).
                let limit = if self.pipe.as_ref().is_some_and(Pipe::coalesces_data) {
                    self.session.max_frame_size()
                } else {
                    0
                };
                while self.tx.len() < limit {
                    match self.cmd_rx.try_recv() {
                        Ok(Cmd::Data { label, packet }) => n += self.send_data(label, &packet),
                        Ok(other) => {
                            if let Step::End(c, r) = self.on_cmd(Some(other)) {
                                return Step::End(c, r);
                            }
                        }
                        Err(_) => break,
                    }
                }
                self.stats.packets_sent.fetch_add(n, Ordering::Relaxed);
                Step::Continue
            }
            Some(Cmd::OpenRoute { label, reply }) => {
                let r = self.session.open_route_at(label).map(|()| label);
                if let Err(e) = &r {
                    tracing::debug!(url = %self.cfg.url, label, error = %e, "route not opened");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
                Step::Continue
            }
            Some(Cmd::CloseRoute { label, code }) => {
                self.session.close_route(label, code, &mut self.tx);
                Step::Continue
            }
        }
    }

    async fn on_message(&mut self, msg: PipeEvent) -> Step {
        let bytes = match msg {
            PipeEvent::Message(b) => b,
            PipeEvent::Closed { reason, code: Some(code) } => {
                return Step::End(None, format!("server closed: {code} {reason}").trim_end().to_string());
            }
            PipeEvent::Closed { reason, code: None } => return Step::End(None, reason),
            PipeEvent::Text => {
                return Step::End(Some((1003, "text messages are not allowed".into())), "text message".into())
            }
        };
        let now = self.now();
        let mut events = Vec::new();
        let r = self.session.handle_message(&self.cfg.client, now, &bytes, &mut self.tx, |_, ev, _| {
            match ev {
                ClientEvent::Data { label, packet } => {
                    events.push(LinkEvent::Data { label, packet: bytes.slice_ref(packet) })
                }
                ClientEvent::RouteClosed { label, code } => events.push(LinkEvent::RouteClosed { label, code }),
                ClientEvent::GoAway { grace_ms, reconnect } => {
                    events.push(LinkEvent::GoAway { grace_ms, reconnect: reconnect.to_string() })
                }
                ClientEvent::Pong { rtt_ms } => {
                    self.stats.pongs_received.fetch_add(1, Ordering::Relaxed);
                    self.stats.last_rtt_ms.store(rtt_ms, Ordering::Relaxed);
                }
                ClientEvent::Welcome(_) | ClientEvent::None => {}
            }
            Ok(())
        });
        for ev in events {
            if matches!(ev, LinkEvent::Data { .. }) {
                self.stats.packets_received.fetch_add(1, Ordering::Relaxed);
            }
            // Awaiting here is the backpressure: a slow consumer slows the link's reads.
            if self.ev_tx.send(ev).await.is_err() {
                return Step::End(Some((1000, "link owner gone".into())), "link owner gone".into());
            }
        }
        match r {
            Ok(()) => Step::Continue,
            Err(close) if close.by_peer => Step::End(None, close.to_string()),
            Err(close) => Step::End(Some((close.close_code(), close.reason.to_string())), close.to_string()),
        }
    }
}
