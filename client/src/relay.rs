//! The relay (a volunteer's "widget"): pre-opens a pool of links to the egress (or to an
//! upstream relay), keeps them alive with client-driven PING, replaces dead ones with capped
//! exponential backoff, follows GOAWAY, and label-switches consumers' routes onto them.
//!
//! Downstream peers get the server side of the protocol from the same `proto` session the
//! egress runs, over either transport: consumers behind NAT reach a volunteer over WebRTC
//! DataChannels set up through the signaling service ([`crate::volunteer`]); consumers
//! and relays further down a chain can also connect to a WebSocket listener.

use crate::link::{Link, LinkConfig, LinkEvent, LinkSender};
use crate::pipe::{Pipe, PipeEvent};
use crate::transport::BoxStream;
use crate::volunteer::{self, VolunteerConfig};
use broflake_proto::relay::RouteTable;
use broflake_proto::server::{ServerConfig, ServerEvent, ServerSession};
use broflake_proto::time::Clock;
use broflake_proto::{binding, ErrorCode, SessionId};
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The upstream links' settings (URL of the egress or of another relay).
    pub upstream: LinkConfig,
    /// Links kept open before any consumer arrives.
    pub pool: usize,
    /// Where downstream peers may connect over WebSocket (`ws://ADDR/…`); None: none.
    pub listen: Option<SocketAddr>,
    /// Serve consumers over WebRTC, found through a signaling service (the volunteer role).
    pub volunteer: Option<VolunteerConfig>,
    /// Protocol settings for downstream sessions.
    pub downstream: ServerConfig,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

impl RelayConfig {
    pub fn new(upstream: LinkConfig, listen: SocketAddr) -> Self {
        RelayConfig {
            upstream,
            pool: 3,
            listen: Some(listen),
            volunteer: None,
            downstream: ServerConfig::default(),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
        }
    }
}

/// Counters of a relay.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Successful upstream handshakes.
    pub connects: AtomicU64,
    /// Upstream links that ended and were replaced.
    pub reconnects: AtomicU64,
    /// Failed connection attempts.
    pub connect_failures: AtomicU64,
    pub goaways: AtomicU64,
    /// Upstream links open now.
    pub upstream_open: AtomicU64,
    pub downstream_links: AtomicU64,
    pub routes_opened: AtomicU64,
    pub routes_migrated: AtomicU64,
    pub packets_up: AtomicU64,
    pub packets_down: AtomicU64,
    /// Packets from upstream larger than their downstream hop carries, dropped (PROTOCOL.md
    /// §14.4). Upstream links count their own in their link stats.
    pub packets_too_large: AtomicU64,
}

/// A running relay. Dropping it stops everything.
#[derive(Debug)]
pub struct Relay {
    /// The WebSocket listener's address, if the relay has one.
    pub listen_addr: Option<SocketAddr>,
    pub stats: Arc<RelayStats>,
    tasks: JoinSet<()>,
}

impl Relay {
    pub async fn start(cfg: RelayConfig) -> std::io::Result<Relay> {
        let listener = match cfg.listen {
            Some(a) => Some(TcpListener::bind(a).await?),
            None => None,
        };
        let listen_addr = listener.as_ref().map(TcpListener::local_addr).transpose()?;
        let stats = Arc::new(RelayStats::default());
        let (router_tx, router_rx) = mpsc::channel(8192);
        let mut tasks = JoinSet::new();
        tasks.spawn(Router::new(stats.clone()).run(router_rx));
        for slot in 0..cfg.pool {
            tasks.spawn(slot_task(slot as u64, cfg.clone(), router_tx.clone(), stats.clone()));
        }
        if let Some(v) = cfg.volunteer.clone() {
            tasks.spawn(volunteer::run(v, Arc::new(cfg.downstream.clone()), router_tx.clone(), stats.clone()));
        }
        if let Some(l) = listener {
            tasks.spawn(accept_loop(l, cfg.downstream.clone(), router_tx, stats.clone()));
        }
        Ok(Relay { listen_addr, stats, tasks })
    }

    /// Stops the relay at once (links and downstream connections drop without goodbye: a
    /// relay dying, as tests need).
    pub async fn kill(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }

    /// The WebSocket listener's URL. Panics for a relay without one.
    pub fn url(&self) -> String {
        let addr = self.listen_addr.expect("this relay has no WebSocket listener");
        format!("ws://{addr}{}", binding::DEFAULT_PATH)
    }
}

type UpId = u64;
pub(crate) type DownId = u64;

pub(crate) enum Ev {
    UpOpen {
        up: UpId,
        sender: LinkSender,
        max_routes: u64,
    },
    UpData {
        up: UpId,
        label: u64,
        packet: Bytes,
    },
    UpRouteClosed {
        up: UpId,
        label: u64,
        code: ErrorCode,
    },
    /// `from` got GOAWAY; `to` is its replacement: move the routes, then close `from`.
    UpMigrate {
        from: UpId,
        to: UpId,
    },
    UpClosed {
        up: UpId,
    },
    DownOpen {
        down: DownId,
        tx: mpsc::Sender<DownCmd>,
    },
    DownData {
        down: DownId,
        label: u64,
        packet: Bytes,
    },
    DownRouteClosed {
        down: DownId,
        label: u64,
    },
    DownClosed {
        down: DownId,
    },
}

#[derive(Debug)]
pub(crate) enum DownCmd {
    Data { label: u64, packet: Bytes },
    RouteClose { label: u64, code: ErrorCode },
}

struct Up {
    sender: LinkSender,
    going_away: bool,
}

/// Owns the route table. Never awaits anything but its input, so it cannot deadlock with
/// the links and connections that feed it; what it sends on is `try_send` (a full queue
/// drops the packet, which QUIC recovers from).
struct Router {
    table: RouteTable<DownId, UpId>,
    ups: HashMap<UpId, Up>,
    downs: HashMap<DownId, mpsc::Sender<DownCmd>>,
    stats: Arc<RelayStats>,
}

impl Router {
    fn new(stats: Arc<RelayStats>) -> Self {
        Router { table: RouteTable::new(), ups: HashMap::new(), downs: HashMap::new(), stats }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Ev>) {
        while let Some(ev) = rx.recv().await {
            self.on_event(ev);
        }
    }

    /// The least loaded upstream that is not going away and has room.
    fn pick(&self) -> Option<UpId> {
        self.ups
            .iter()
            .filter(|(id, u)| !u.going_away && !u.sender.is_closed() && self.table.has_room(**id))
            .min_by_key(|(id, _)| (self.table.load(**id), **id))
            .map(|(id, _)| *id)
    }

    fn map_new(&mut self, down: DownId, label: u64) -> Option<(UpId, u64)> {
        let up = self.pick()?;
        let ul = self.ups[&up].sender.open_route_now()?;
        self.table.insert(down, label, up, ul).ok()?;
        self.stats.routes_opened.fetch_add(1, Ordering::Relaxed);
        Some((up, ul))
    }

    fn on_event(&mut self, ev: Ev) {
        match ev {
            Ev::UpOpen { up, sender, max_routes } => {
                self.table.add_upstream(up, max_routes);
                self.ups.insert(up, Up { sender, going_away: false });
            }
            Ev::UpData { up, label, packet } => {
                if let Some((down, dl)) = self.table.downstream_of(up, label) {
                    if let Some(tx) = self.downs.get(&down) {
                        if tx.try_send(DownCmd::Data { label: dl, packet }).is_ok() {
                            self.stats.packets_down.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            Ev::UpRouteClosed { up, label, code } => {
                if let Some((down, dl)) = self.table.close_up(up, label) {
                    if let Some(tx) = self.downs.get(&down) {
                        let _ = tx.try_send(DownCmd::RouteClose { label: dl, code });
                    }
                }
            }
            Ev::UpMigrate { from, to } => {
                if let Some(u) = self.ups.get_mut(&from) {
                    u.going_away = true;
                }
                for (down, dl, old) in self.table.routes_of(from) {
                    self.table.close_up(from, old);
                    let mapped = self
                        .ups
                        .get(&to)
                        .and_then(|u| u.sender.open_route_now())
                        .and_then(|ul| self.table.insert(down, dl, to, ul).ok().map(|()| ul));
                    if mapped.is_some() {
                        self.stats.routes_migrated.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if let Some(u) = self.ups.get(&from) {
                    let sender = u.sender.clone();
                    tokio::spawn(async move { sender.close().await });
                }
            }
            Ev::UpClosed { up } => {
                self.ups.remove(&up);
                // Routes are re-mapped lazily, on their next packet (PROTOCOL.md §12).
                self.table.remove_upstream(up);
            }
            Ev::DownOpen { down, tx } => {
                self.downs.insert(down, tx);
            }
            Ev::DownData { down, label, packet } => {
                let target = match self.table.upstream_of(down, label) {
                    Some((up, ul)) if self.ups.get(&up).is_some_and(|u| !u.sender.is_closed()) => Some((up, ul)),
                    Some((up, ul)) => {
                        self.table.close_up(up, ul);
                        self.map_new(down, label)
                    }
                    None => self.map_new(down, label),
                };
                if let Some((up, ul)) = target {
                    if self.ups[&up].sender.send_packet(ul, packet) {
                        self.stats.packets_up.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ev::DownRouteClosed { down, label } => {
                if let Some((up, ul)) = self.table.close_down(down, label) {
                    if let Some(u) = self.ups.get(&up) {
                        u.sender.close_route_now(ul, ErrorCode::NO_ERROR);
                    }
                }
            }
            Ev::DownClosed { down } => {
                self.downs.remove(&down);
                for (up, ul) in self.table.remove_link(down) {
                    if let Some(u) = self.ups.get(&up) {
                        u.sender.close_route_now(ul, ErrorCode::NO_ERROR);
                    }
                }
            }
        }
    }
}

static UP_IDS: AtomicU64 = AtomicU64::new(1);

/// Capped exponential backoff with full jitter.
fn backoff(attempt: u32, base: Duration, cap: Duration, seed: &mut broflake_proto::grease::Rng) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
    let ms = u64::try_from(exp.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(seed.below(ms + 1))
}

/// Keeps one pool slot filled: connect, pump, replace on death or GOAWAY.
async fn slot_task(slot: u64, cfg: RelayConfig, router: mpsc::Sender<Ev>, stats: Arc<RelayStats>) {
    let mut rng = broflake_proto::grease::Rng::new(cfg.upstream.seed ^ slot.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut attempt = 0u32;
    let mut previous = SessionId::NONE;
    let mut replacing: Option<UpId> = None;
    loop {
        let mut lc = cfg.upstream.clone();
        lc.seed = rng.next_u64();
        lc.client.previous_session = previous;
        let link = match Link::connect(lc).await {
            Ok(l) => l,
            Err(e) => {
                stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                let mut wait = backoff(attempt, cfg.backoff_base, cfg.backoff_cap, &mut rng);
                if let Some(c) = e.refusal() {
                    wait = wait.max(Duration::from_millis(c.retry_after_ms));
                }
                tracing::debug!(slot, error = %e, ?wait, "upstream connect failed");
                attempt = attempt.saturating_add(1);
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        attempt = 0;
        stats.connects.fetch_add(1, Ordering::Relaxed);
        stats.upstream_open.fetch_add(1, Ordering::Relaxed);
        let up = UP_IDS.fetch_add(1, Ordering::Relaxed);
        previous = link.sender.session_id;
        let ev = Ev::UpOpen { up, sender: link.sender.clone(), max_routes: link.negotiated.max_routes };
        if router.send(ev).await.is_err() {
            return;
        }
        if let Some(from) = replacing.take() {
            let _ = router.send(Ev::UpMigrate { from, to: up }).await;
        }
        // Pump this link's events; stop at its end or at GOAWAY (a replacement is opened and
        // the old link keeps delivering until the router closes it).
        let (done_tx, mut done_rx) = mpsc::channel::<bool>(1);
        tokio::spawn(pump(link, up, router.clone(), stats.clone(), done_tx));
        match done_rx.recv().await {
            Some(true) => {
                stats.goaways.fetch_add(1, Ordering::Relaxed);
                replacing = Some(up);
            }
            _ => {
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
                let wait = backoff(0, cfg.backoff_base, cfg.backoff_cap, &mut rng);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Forwards one link's events to the router. Tells the slot `true` on GOAWAY, `false` when
/// the link ended (without an earlier GOAWAY).
async fn pump(mut link: Link, up: UpId, router: mpsc::Sender<Ev>, stats: Arc<RelayStats>, done: mpsc::Sender<bool>) {
    let mut told = false;
    loop {
        // A stopped relay (router gone) lets go of the link, which then closes: an idle link
        // would otherwise go on pinging the egress for ever.
        let ev = tokio::select! {
            ev = link.events.recv() => ev,
            _ = router.closed() => None,
        };
        let Some(ev) = ev else { break };
        let out = match ev {
            LinkEvent::Data { label, packet } => Ev::UpData { up, label, packet },
            LinkEvent::RouteClosed { label, code } => Ev::UpRouteClosed { up, label, code },
            LinkEvent::GoAway { .. } => {
                if !told {
                    told = true;
                    let _ = done.send(true).await;
                }
                continue;
            }
            LinkEvent::Closed { reason, .. } => {
                tracing::debug!(up, %reason, "upstream link ended");
                break;
            }
        };
        if router.send(out).await.is_err() {
            return;
        }
    }
    stats.upstream_open.fetch_sub(1, Ordering::Relaxed);
    let _ = router.send(Ev::UpClosed { up }).await;
    if !told {
        let _ = done.send(false).await;
    }
}

pub(crate) static DOWN_IDS: AtomicU64 = AtomicU64::new(1);

async fn accept_loop(listener: TcpListener, cfg: ServerConfig, router: mpsc::Sender<Ev>, stats: Arc<RelayStats>) {
    let cfg = Arc::new(cfg);
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let down = DOWN_IDS.fetch_add(1, Ordering::Relaxed);
        let (cfg, router, stats) = (cfg.clone(), router.clone(), stats.clone());
        tokio::spawn(async move {
            stats.downstream_links.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = downstream_ws(stream, down, cfg, router.clone(), stats.clone()).await {
                tracing::debug!(%peer, error = %e, "downstream link ended");
            }
            stats.downstream_links.fetch_sub(1, Ordering::Relaxed);
            let _ = router.send(Ev::DownClosed { down }).await;
        });
    }
}

/// A downstream peer over WebSocket: the upgrade, then [`serve_downstream`].
async fn downstream_ws(
    stream: TcpStream,
    down: DownId,
    cfg: Arc<ServerConfig>,
    router: mpsc::Sender<Ev>,
    stats: Arc<RelayStats>,
) -> anyhow::Result<()> {
    let (min_v, max_v) = (cfg.min_version, cfg.max_version);
    #[allow(clippy::result_large_err)] // the signature is tungstenite's
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let offered = req.headers().get_all("sec-websocket-protocol").iter().filter_map(|v| v.to_str().ok());
        match binding::select(offered, min_v, max_v) {
            Ok(sel) => {
                resp.headers_mut()
                    .insert("sec-websocket-protocol", HeaderValue::from_str(&sel.token()).expect("token"));
                Ok(resp)
            }
            Err(e) => {
                let mut r = ErrorResponse::new(Some(e.to_string()));
                *r.status_mut() = StatusCode::from_u16(e.status()).expect("status");
                Err(r)
            }
        }
    };
    let stream: BoxStream = Box::new(stream);
    let ws = tokio::time::timeout(
        Duration::from_millis(cfg.handshake_timeout_ms),
        tokio_tungstenite::accept_hdr_async(stream, callback),
    )
    .await??;
    serve_downstream(Pipe::Ws(Box::new(ws)), down, cfg, router, stats).await
}

/// One downstream link: the server side of the protocol over `pipe`, routes handed to the
/// router.
pub(crate) async fn serve_downstream(
    mut pipe: Pipe,
    down: DownId,
    cfg: Arc<ServerConfig>,
    router: mpsc::Sender<Ev>,
    stats: Arc<RelayStats>,
) -> anyhow::Result<()> {
    let (tx_cmd, mut rx_cmd) = mpsc::channel::<DownCmd>(1024);
    router.send(Ev::DownOpen { down, tx: tx_cmd }).await?;
    let clock = Clock::new(std::time::Instant::now());
    let now = || clock.at(std::time::Instant::now());
    let mut session = ServerSession::new(now());
    let mut ids = broflake_proto::grease::Rng::new(crate::link::seed());
    let mut tx = Vec::new();
    // The DATA frames of the next message: each frame's header, then its packet as it came from
    // upstream (a slice of that message, not copied).
    let mut parts: Vec<Bytes> = Vec::new();
    let mut heads = bytes::BytesMut::new();
    let mut head = Vec::new();
    // Several packets per message over WebSocket; one per message on a DataChannel.
    let coalesce = if pipe.coalesces_data() { cfg.max_frame_size as usize } else { 0 };
    let max_frame = pipe.max_data_frame(cfg.max_frame_size as usize);
    let mut push_data = |session: &ServerSession, label: u64, packet: Bytes, parts: &mut Vec<Bytes>| {
        head.clear();
        let r = broflake_proto::packet_size::check_fits(label, packet.len(), max_frame)
            .and_then(|()| session.send_data_header(&cfg, label, packet.len(), &mut head));
        match r {
            Ok(()) => {
                if heads.capacity() < head.len() {
                    // Headers share blocks: one allocation per few hundred frames.
                    heads.reserve(4096);
                }
                heads.extend_from_slice(&head);
                parts.push(heads.split().freeze());
                let added = head.len() + packet.len();
                parts.push(packet);
                added
            }
            Err(broflake_proto::DataRefused::TooLarge { .. }) => {
                stats.packets_too_large.fetch_add(1, Ordering::Relaxed);
                0
            }
            Err(_) => 0,
        }
    };
    loop {
        let wake = session
            .next_timeout(&cfg)
            .map(|t| tokio::time::Instant::from_std(clock.instant(t)))
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        let mut end = None;
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {
                if let Err(c) = session.on_timeout(&cfg, now(), &mut tx) { end = Some(c) }
            }
            cmd = rx_cmd.recv() => match cmd {
                Some(DownCmd::Data { label, packet }) => {
                    let mut len = push_data(&session, label, packet, &mut parts);
                    while len < coalesce {
                        match rx_cmd.try_recv() {
                            Ok(DownCmd::Data { label, packet }) => len += push_data(&session, label, packet, &mut parts),
                            Ok(DownCmd::RouteClose { label, code }) => {
                                session.close_route(label, code, &mut tx);
                            }
                            Err(_) => break,
                        }
                    }
                }
                Some(DownCmd::RouteClose { label, code }) => { session.close_route(label, code, &mut tx); }
                None => return Ok(()),
            },
            msg = pipe.recv() => {
                let bytes = match msg {
                    PipeEvent::Message(b) => b,
                    PipeEvent::Closed { .. } => return Ok(()),
                    PipeEvent::Text => {
                        pipe.close(1003, "text messages are not allowed".into()).await;
                        return Ok(());
                    }
                };
                let mut events = Vec::new();
                let r = session.handle_message(&cfg, now(), &bytes, &mut tx, |s, ev, tx| {
                    match ev {
                        ServerEvent::Hello { .. } => {
                            let mut id = [0u8; 16];
                            id[..8].copy_from_slice(&ids.next_u64().to_be_bytes());
                            id[8..].copy_from_slice(&ids.next_u64().to_be_bytes());
                            s.accept(&cfg, now(), SessionId(id), tx)?;
                        }
                        ServerEvent::Data { label, packet, .. } => {
                            events.push(Ev::DownData { down, label, packet: bytes.slice_ref(packet) })
                        }
                        ServerEvent::RouteClosed { label, .. } => events.push(Ev::DownRouteClosed { down, label }),
                        ServerEvent::Pong | ServerEvent::None => {}
                    }
                    Ok(())
                });
                for ev in events {
                    router.send(ev).await?;
                }
                if let Err(c) = r { end = Some(c) }
            }
        }
        if !parts.is_empty() {
            pipe.send_data_parts(&parts).await.map_err(anyhow::Error::msg)?;
            parts.clear();
        }
        if !tx.is_empty() {
            pipe.send(Bytes::from(std::mem::take(&mut tx)), false).await.map_err(anyhow::Error::msg)?;
        }
        if let Some(c) = end {
            pipe.close(c.close_code(), c.reason.to_string()).await;
            return Ok(());
        }
    }
}
