//! The signaling server on tokio: one task per WebSocket, one task owning the [`Hub`]. Client
//! tasks hand the hub what arrives; the hub's actions come back on a bounded queue per
//! client (a client that does not read its messages is dropped, never buffered without end).

use crate::config::Config;
use crate::hub::{Action, ClientId, Hub, Refusal};
use crate::metrics as m;
use crate::msg::{self, Outgoing};
use crate::redis_store::{RedisStore, StoreEvent};
use crate::shared::StoreOp;
use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// What the hub task is told.
enum HubIn {
    Connect {
        ip: IpAddr,
        reply: oneshot::Sender<Result<(ClientId, mpsc::Receiver<ToClient>), Refusal>>,
    },
    Message {
        id: ClientId,
        text: String,
    },
    Oversized {
        id: ClientId,
        len: usize,
    },
    Binary {
        id: ClientId,
    },
    Disconnect {
        id: ClientId,
    },
    Drain,
    Snapshot {
        reply: oneshot::Sender<Snapshot>,
    },
    /// From the shared store (shared mode).
    Store(StoreEvent),
}

/// What a client task is told.
enum ToClient {
    Send(String),
    Close(u16, String),
}

/// Counts of the hub at one instant.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub clients: usize,
    pub volunteers: usize,
    pub free_slots: u64,
    pub sessions: usize,
    pub matches: u64,
    pub unavailable: u64,
}

/// A running signaling service.
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    hub: mpsc::Sender<HubIn>,
    ready: Arc<AtomicBool>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// Client connections still open (each flushes and closes when `stop` is sent).
    live: Arc<std::sync::atomic::AtomicUsize>,
}

/// How long shutting down waits for clients to write what is queued for them and close.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

impl Server {
    /// Binds and starts serving. Must run inside a tokio runtime.
    pub async fn start(config: Config) -> Result<Server> {
        config.validate()?;
        if config.admin.listen.is_some() {
            broflake_ops::recorder(m::describe);
        }
        let listener = bind(config.listen.addr, config.listen.backlog)
            .with_context(|| format!("cannot listen on {}", config.listen.addr))?;
        let addr = listener.local_addr()?;
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| anyhow::anyhow!("no random source for session ids"))?;
        let (hub_tx, hub_rx) = mpsc::channel(4096);
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let readiness = Arc::new(broflake_ops::Readiness::default());
        readiness.flag("listening", true);
        let ready = readiness.flag("not draining", true);
        let (hub, store) = if config.store.kind == "redis" {
            let replica = match config.store.replica.as_str() {
                "" => {
                    let mut r = [0u8; 6];
                    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r)
                        .map_err(|_| anyhow::anyhow!("no random source for the replica id"))?;
                    hex::encode(r)
                }
                r => r.to_owned(),
            };
            tracing::info!(%replica, url = %config.store.url, "one replica of several: state shared in Redis");
            let (ops_tx, ops_rx) = mpsc::unbounded_channel();
            let (ev_tx, mut ev_rx) = mpsc::channel(1024);
            let store = RedisStore {
                url: config.store.url.clone(),
                prefix: config.store.prefix.clone(),
                replica: replica.clone(),
                max_slots: config.limits.max_slots_per_volunteer,
            };
            tasks.spawn(store.run(ops_rx, ev_tx, readiness.flag("shared store reachable", false)));
            let fwd = hub_tx.clone();
            tasks.spawn(async move {
                while let Some(ev) = ev_rx.recv().await {
                    if fwd.send(HubIn::Store(ev)).await.is_err() {
                        return;
                    }
                }
            });
            (Hub::shared(config.hub(), seed, replica), Some(ops_tx))
        } else {
            (Hub::new(config.hub(), seed), None)
        };
        let clock = std::time::Instant::now();
        tasks.spawn(run_hub(hub, hub_rx, clock, config.limits.send_queue, store));
        let cfg = Arc::new(config.clone());
        let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tasks.spawn(accept_loop(listener, cfg, hub_tx.clone(), stop_rx, live.clone()));
        let mut admin_addr = None;
        if let Some(a) = config.admin.listen {
            let l = TcpListener::bind(a).await.with_context(|| format!("cannot listen on {a} (admin)"))?;
            admin_addr = Some(l.local_addr()?);
            let handle = broflake_ops::recorder(m::describe);
            tasks.spawn(broflake_ops::serve_admin(l, handle, readiness, || {}, Arc::new(|_, _| None)));
        }
        Ok(Server { addr, admin_addr, hub: hub_tx, ready, stop, tasks, live })
    }

    /// `ws://ADDR/v1/signal`.
    pub fn url(&self) -> String {
        format!("ws://{}{}", self.addr, msg::PATH)
    }

    /// Counts of the hub now.
    pub async fn snapshot(&self) -> Snapshot {
        let (reply, rx) = oneshot::channel();
        if self.hub.send(HubIn::Snapshot { reply }).await.is_err() {
            return Snapshot::default();
        }
        rx.await.unwrap_or_default()
    }

    /// Starts draining: `/ready` fails, volunteers get GOAWAY, new consumers hear
    /// "unavailable"; sessions in progress go on.
    pub async fn drain(&self) {
        self.ready.store(false, std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!(m::DRAINING).set(1.0);
        let _ = self.hub.send(HubIn::Drain).await;
    }

    /// Waits until no session is in progress or `limit` passed, then stops.
    pub async fn wait_drained(mut self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline && self.snapshot().await.sessions > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.shutdown().await;
    }

    /// Stops: every client connection writes what is queued for it (a GOAWAY sent just before)
    /// and closes with 1001, for at most [`CLOSE_GRACE`]; then everything else stops.
    pub async fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
        while self.live.load(std::sync::atomic::Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let s = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(backlog)
}

async fn run_hub(
    mut hub: Hub,
    mut rx: mpsc::Receiver<HubIn>,
    clock: std::time::Instant,
    queue: usize,
    store: Option<mpsc::UnboundedSender<StoreOp>>,
) {
    let now = || u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut clients: HashMap<ClientId, mpsc::Sender<ToClient>> = HashMap::new();
    loop {
        let wake = hub
            .next_deadline()
            .map(|ms| tokio::time::Instant::from_std(clock + Duration::from_millis(ms)))
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            input = rx.recv() => {
                let Some(input) = input else { return };
                match input {
                    HubIn::Connect { ip, reply } => {
                        let r = hub.connect(now(), ip).map(|id| {
                            let (tx, rx) = mpsc::channel(queue);
                            clients.insert(id, tx);
                            (id, rx)
                        });
                        if let Err(Ok((id, _))) = reply.send(r) {
                            hub.disconnect(now(), id);
                            clients.remove(&id);
                        }
                    }
                    HubIn::Message { id, text } => hub.message(now(), id, &text),
                    HubIn::Oversized { id, len } => hub.oversized(id, len),
                    HubIn::Binary { id } => hub.binary(id),
                    HubIn::Disconnect { id } => {
                        clients.remove(&id);
                        hub.disconnect(now(), id);
                    }
                    HubIn::Drain => hub.drain(),
                    HubIn::Snapshot { reply } => {
                        let _ = reply.send(Snapshot {
                            clients: hub.clients(),
                            volunteers: hub.volunteers(),
                            free_slots: hub.free_slots(),
                            sessions: hub.sessions(),
                            matches: hub.stats.matches,
                            unavailable: hub.stats.unavailable,
                        });
                    }
                    HubIn::Store(ev) => match ev {
                        StoreEvent::Picked { session, volunteer } => hub.picked(now(), session, volunteer),
                        StoreEvent::RouteFailed { session, client, msg, why } => {
                            hub.route_failed(client, session, &msg, why)
                        }
                        StoreEvent::Relay(r) => hub.relay(now(), r),
                        StoreEvent::Registered { client } => hub.registered(client),
                        StoreEvent::Resync { reply } => {
                            let _ = reply.send(hub.local_volunteers());
                        }
                    },
                }
            }
            _ = tokio::time::sleep_until(wake) => hub.timeout(now()),
        }
        let mut too_slow = Vec::new();
        while let Some(a) = hub.poll_action() {
            match a {
                Action::Send(id, out) => {
                    let Some(tx) = clients.get(&id) else { continue };
                    metrics::counter!(m::MESSAGES_SENT, "type" => out.kind()).increment(1);
                    if let Outgoing::Error { code, .. } = &out {
                        metrics::counter!(m::ERRORS, "code" => code.label()).increment(1);
                    }
                    if tx.try_send(ToClient::Send(out.to_json())).is_err() {
                        too_slow.push(id);
                    }
                }
                Action::Close(id, code, reason) => {
                    if let Some(tx) = clients.remove(&id) {
                        // A full queue: the client task closes with "too slow" when the
                        // sender is gone, which is what dropping it here does.
                        let _ = tx.try_send(ToClient::Close(code, reason));
                    }
                }
            }
        }
        for id in too_slow {
            // Dropping the sender ends the client task with close 4413.
            if clients.remove(&id).is_some() {
                metrics::counter!(m::ERRORS, "code" => msg::ErrorCode::TooSlow.label()).increment(1);
                hub.disconnect(now(), id);
            }
        }
        // The store runs them in order; it answers through `HubIn::Store`. (Unbounded: the
        // hub must never wait for Redis, and requests follow client messages, which are
        // bounded per client; while Redis is down they are failed at once.)
        while let Some(op) = hub.poll_store() {
            if let Some(tx) = &store {
                let _ = tx.send(op);
            }
        }
        metrics::gauge!(m::CLIENTS).set(hub.clients() as f64);
        metrics::gauge!(m::VOLUNTEERS).set(hub.volunteers() as f64);
        metrics::gauge!(m::FREE_SLOTS).set(hub.free_slots() as f64);
        metrics::gauge!(m::SESSIONS).set(hub.sessions() as f64);
    }
}

async fn accept_loop(
    listener: TcpListener,
    cfg: Arc<Config>,
    hub: mpsc::Sender<HubIn>,
    mut stop: watch::Receiver<bool>,
    live: Arc<std::sync::atomic::AtomicUsize>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        metrics::counter!(m::CONNECTIONS_ACCEPTED).increment(1);
        let _ = stream.set_nodelay(true);
        let (cfg, hub, stop, live) = (cfg.clone(), hub.clone(), stop.clone(), live.clone());
        live.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tokio::spawn(async move {
            if let Err(e) = client(stream, peer, cfg, hub, stop).await {
                tracing::debug!(%peer, error = %e, "signaling client ended");
            }
            live.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        });
    }
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(256 * 1024)
        .max_message_size(Some(msg::MAX_MESSAGE))
        .max_frame_size(Some(msg::MAX_MESSAGE))
}

/// Checks the upgrade request: the path and the subprotocol (a browser's
/// `new WebSocket(url, ["broflake-signal.v1"])`).
#[allow(clippy::result_large_err)] // the signature is tungstenite's
fn check_upgrade(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    let refuse = |status: u16, why: &str| {
        let mut r = ErrorResponse::new(Some(format!("{why}\n")));
        *r.status_mut() = StatusCode::from_u16(status).expect("status");
        r
    };
    if req.uri().path() != msg::PATH {
        return Err(refuse(404, &format!("the signaling endpoint is {}", msg::PATH)));
    }
    let offered = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == msg::SUBPROTOCOL);
    if !offered {
        return Err(refuse(400, &format!("offer the WebSocket subprotocol {}", msg::SUBPROTOCOL)));
    }
    resp.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static(msg::SUBPROTOCOL));
    Ok(resp)
}

async fn client(
    stream: TcpStream,
    peer: SocketAddr,
    cfg: Arc<Config>,
    hub: mpsc::Sender<HubIn>,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    let (reply, rx) = oneshot::channel();
    hub.send(HubIn::Connect { ip: peer.ip().to_canonical(), reply }).await?;
    let (id, mut out) = match rx.await? {
        Ok(x) => x,
        Err(why) => {
            let label = match why {
                Refusal::PerIpLimit => "per_ip_limit",
                Refusal::Capacity => "capacity",
            };
            metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => label).increment(1);
            return Ok(()); // dropping the stream closes it
        }
    };
    let r = serve_client(stream, id, &cfg, &hub, &mut out, stop).await;
    let _ = hub.send(HubIn::Disconnect { id }).await;
    r
}

async fn serve_client(
    stream: TcpStream,
    id: ClientId,
    cfg: &Config,
    hub: &mpsc::Sender<HubIn>,
    out: &mut mpsc::Receiver<ToClient>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let upgrade = tokio_tungstenite::accept_hdr_async_with_config(stream, check_upgrade, Some(ws_config()));
    let mut ws = match tokio::time::timeout(cfg.timeouts.hello, upgrade).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "upgrade").increment(1);
            return Err(e.into());
        }
        Err(_) => {
            metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => "timeout").increment(1);
            return Ok(());
        }
    };
    loop {
        tokio::select! {
            _ = stop.changed() => {
                // Shutting down: what the hub queued (a GOAWAY) first, then a close frame.
                let flush = async {
                    while let Ok(ToClient::Send(json)) = out.try_recv() {
                        ws.send(Message::text(json)).await?;
                    }
                    let reason = "signaling service shutting down";
                    ws.close(Some(CloseFrame { code: CloseCode::Away, reason: reason.into() })).await
                };
                let _ = tokio::time::timeout(CLOSE_GRACE, flush).await;
                return Ok(());
            }
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    hub.send(HubIn::Message { id, text: t.as_str().to_owned() }).await?;
                }
                Some(Ok(Message::Binary(_))) => {
                    hub.send(HubIn::Binary { id }).await?;
                }
                Some(Ok(Message::Close(_))) | None => return Ok(()),
                Some(Ok(_)) => {}
                Some(Err(WsError::Capacity(e))) => {
                    // The rest of the message is not read: close at once with 1009 (the hub
                    // counts it; its own error and close cannot follow on this stream).
                    tracing::debug!(error = %e, "oversized signaling message");
                    hub.send(HubIn::Oversized { id, len: msg::MAX_MESSAGE + 1 }).await?;
                    let reason = format!("message too large (limit {} bytes)", msg::MAX_MESSAGE);
                    let frame = CloseFrame { code: CloseCode::from(1009), reason: reason.into() };
                    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(Some(frame))).await;
                    return Ok(());
                }
                Some(Err(e)) => return Err(e.into()),
            },
            o = out.recv() => match o {
                // A client that does not read is dropped, not waited for.
                Some(ToClient::Send(json)) => tokio::time::timeout(cfg.timeouts.idle, ws.send(Message::text(json)))
                    .await
                    .map_err(|_| anyhow::anyhow!("client does not read: write timed out"))??,
                Some(ToClient::Close(code, reason)) => {
                    let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
                    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(Some(frame))).await;
                    return Ok(());
                }
                None => {
                    let frame = CloseFrame { code: CloseCode::from(msg::ErrorCode::TooSlow.close_code()), reason: "too slow: messages were not read".into() };
                    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(Some(frame))).await;
                    return Ok(());
                }
            },
        }
    }
}
