//! WebSocket clients of the signaling service, one per role: a volunteer that stays
//! registered (PINGing as the service asks) and receives offers, and a consumer that asks
//! for a volunteer with its offer and gets the answer and candidates back.

use crate::msg::{self, Candidate, ErrorCode, IceServer, SessionId};
use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Uri};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A byte stream the signaling WebSocket runs on (TCP, or TLS for `wss://` set up by the
/// caller).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

type Ws = WebSocketStream<Box<dyn Stream>>;

/// Host and port of a `ws://` or `wss://` URL, and whether it wants TLS.
pub fn url_target(url: &str) -> Result<(String, u16, bool)> {
    let uri: Uri = url.parse().with_context(|| format!("bad signaling URL {url}"))?;
    let tls = match uri.scheme_str() {
        Some("ws") => false,
        Some("wss") => true,
        _ => bail!("bad signaling URL {url}: expected ws:// or wss://"),
    };
    let host = uri.host().with_context(|| format!("bad signaling URL {url}: no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    Ok((host, uri.port_u16().unwrap_or(if tls { 443 } else { 80 }), tls))
}

/// Opens the TCP stream for a `ws://` URL (`wss://` needs a stream from the caller).
pub async fn tcp_stream(url: &str) -> Result<Box<dyn Stream>> {
    let (host, port, tls) = url_target(url)?;
    if tls {
        bail!("{url}: wss:// needs a TLS stream from the caller");
    }
    let s = TcpStream::connect((host.as_str(), port)).await.with_context(|| format!("cannot reach {url}"))?;
    s.set_nodelay(true)?;
    Ok(Box::new(s))
}

/// A message from the service, as a client reads it (the inverse of [`msg::Outgoing`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServiceMsg {
    Hello {
        versions: Vec<u32>,
        #[serde(default)]
        ice_servers: Vec<IceServer>,
    },
    Registered {
        version: u32,
        id: String,
        ping_ms: u64,
        idle_ms: u64,
    },
    Matched {
        version: u32,
        session: String,
        ttl_ms: u64,
    },
    Unavailable {
        retry_after_ms: u64,
        reason: String,
    },
    Offer {
        session: String,
        sdp: String,
        ttl_ms: u64,
    },
    Answer {
        session: String,
        sdp: String,
    },
    Candidate {
        session: String,
        candidate: String,
        #[serde(default)]
        mid: Option<String>,
    },
    Cancel {
        session: String,
        reason: String,
    },
    Pong,
    Goaway {
        retry_after_ms: u64,
        reason: String,
    },
    Error {
        code: ErrorCode,
        reason: String,
    },
    #[serde(other)]
    Unknown,
}

async fn connect(url: &str, stream: Option<Box<dyn Stream>>, timeout: Duration) -> Result<Ws> {
    let fut = async {
        let stream = match stream {
            Some(s) => s,
            None => tcp_stream(url).await?,
        };
        let mut req = url.into_client_request().with_context(|| format!("bad signaling URL {url}"))?;
        req.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static(msg::SUBPROTOCOL));
        let (ws, _) = tokio_tungstenite::client_async(req, stream)
            .await
            .with_context(|| format!("cannot open the signaling WebSocket {url}"))?;
        Ok(ws)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("signaling service {url} did not answer within {timeout:?}"))?
}

async fn next_msg(ws: &mut Ws) -> Result<Option<ServiceMsg>> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(t.as_str())
                    .map(Some)
                    .map_err(|e| anyhow!("bad message from the signaling service: {e}"))
            }
            Some(Ok(Message::Close(f))) => {
                let why = f.map(|f| format!("{} {}", u16::from(f.code), f.reason)).unwrap_or_default();
                tracing::debug!(%why, "signaling connection closed");
                return Ok(None);
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => return Ok(None),
        }
    }
}

fn send_json(v: serde_json::Value) -> Message {
    Message::text(v.to_string())
}

/// An open signaling connection, after the service's `hello`: the ICE servers to gather
/// with are known; the client then registers as a volunteer or asks as a consumer.
pub struct SignalConn {
    ws: Ws,
    pub ice_servers: Vec<IceServer>,
}

impl std::fmt::Debug for SignalConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalConn").field("ice_servers", &self.ice_servers).finish_non_exhaustive()
    }
}

impl SignalConn {
    /// Connects (over `stream` when given: TLS for wss://) and reads the `hello`.
    pub async fn connect(url: &str, stream: Option<Box<dyn Stream>>, timeout: Duration) -> Result<SignalConn> {
        let mut ws = connect(url, stream, timeout).await?;
        let hello = tokio::time::timeout(timeout, next_msg(&mut ws))
            .await
            .map_err(|_| anyhow!("no hello from the signaling service {url} within {timeout:?}"))??;
        match hello {
            Some(ServiceMsg::Hello { versions, ice_servers }) => {
                if msg::negotiate(&versions).is_none() {
                    bail!("the signaling service speaks versions {versions:?}, this client {}", msg::VERSION);
                }
                Ok(SignalConn { ws, ice_servers })
            }
            Some(ServiceMsg::Error { code, reason }) => bail!("signaling refused: {} ({reason})", code.label()),
            other => bail!("expected hello from the signaling service, got {other:?}"),
        }
    }
}

/// What a volunteer hears.
#[derive(Debug, Clone)]
pub enum VolunteerEvent {
    Offer {
        session: SessionId,
        sdp: String,
        ttl_ms: u64,
    },
    Candidate {
        session: SessionId,
        candidate: Candidate,
    },
    Cancel {
        session: SessionId,
        reason: String,
    },
    /// The service drains: register again (elsewhere) after `retry_after_ms`.
    Goaway {
        retry_after_ms: u64,
    },
    /// The signaling connection ended.
    Closed {
        reason: String,
    },
}

/// A registered volunteer.
#[derive(Debug)]
pub struct Volunteer {
    pub id: String,
    pub ice_servers: Vec<IceServer>,
    pub events: mpsc::Receiver<VolunteerEvent>,
    pub handle: VolunteerHandle,
}

/// Sends a volunteer's messages.
#[derive(Debug, Clone)]
pub struct VolunteerHandle {
    tx: mpsc::Sender<Message>,
}

impl VolunteerHandle {
    pub async fn answer(&self, session: SessionId, sdp: &str) {
        let m = serde_json::json!({"type": "answer", "session": session.to_string(), "sdp": sdp});
        let _ = self.tx.send(send_json(m)).await;
    }
    pub async fn candidate(&self, session: SessionId, candidate: &Candidate) {
        let m = serde_json::json!({"type": "candidate", "session": session.to_string(),
            "candidate": candidate.candidate, "mid": candidate.mid});
        let _ = self.tx.send(send_json(m)).await;
    }
    pub async fn decline(&self, session: SessionId, reason: &str) {
        let m = serde_json::json!({"type": "decline", "session": session.to_string(), "reason": reason});
        let _ = self.tx.send(send_json(m)).await;
    }
    pub async fn slots(&self, free: u32) {
        let _ = self.tx.send(send_json(serde_json::json!({"type": "slots", "free": free}))).await;
    }
    pub async fn done(&self, session: SessionId) {
        let m = serde_json::json!({"type": "done", "session": session.to_string()});
        let _ = self.tx.send(send_json(m)).await;
    }
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl Volunteer {
    /// Registers with `slots` free consumer slots and keeps the registration alive.
    pub async fn register(conn: SignalConn, slots: u32) -> Result<Volunteer> {
        let SignalConn { mut ws, ice_servers } = conn;
        ws.send(send_json(serde_json::json!({"type": "volunteer", "versions": [msg::VERSION], "slots": slots})))
            .await?;
        let (id, ping_ms) = match next_msg(&mut ws).await? {
            Some(ServiceMsg::Registered { id, ping_ms, .. }) => (id, ping_ms),
            Some(ServiceMsg::Error { code, reason }) => bail!("registration refused: {} ({reason})", code.label()),
            Some(ServiceMsg::Goaway { .. }) => bail!("registration refused: the service is draining"),
            other => bail!("unexpected answer to the registration: {other:?}"),
        };
        let (tx, rx) = mpsc::channel(256);
        let (ev_tx, events) = mpsc::channel(256);
        tokio::spawn(volunteer_task(ws, rx, ev_tx, Duration::from_millis(ping_ms.max(100))));
        Ok(Volunteer { id, ice_servers, events, handle: VolunteerHandle { tx } })
    }
}

async fn volunteer_task(
    mut ws: Ws,
    mut rx: mpsc::Receiver<Message>,
    events: mpsc::Sender<VolunteerEvent>,
    ping: Duration,
) {
    let mut tick = tokio::time::interval(ping);
    tick.tick().await;
    let reason = loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = ws.send(send_json(serde_json::json!({"type": "ping"}))).await {
                    break format!("send failed: {e}");
                }
            }
            m = rx.recv() => match m {
                Some(m) => if let Err(e) = ws.send(m).await { break format!("send failed: {e}") },
                None => {
                    let _ = ws.close(None).await;
                    break "closed locally".into();
                }
            },
            m = next_msg(&mut ws) => {
                let ev = match m {
                    Ok(Some(ServiceMsg::Offer { session, sdp, ttl_ms })) => match SessionId::parse(&session) {
                        Ok(session) => VolunteerEvent::Offer { session, sdp, ttl_ms },
                        Err(_) => continue,
                    },
                    Ok(Some(ServiceMsg::Candidate { session, candidate, mid })) => match SessionId::parse(&session) {
                        Ok(session) => VolunteerEvent::Candidate { session, candidate: Candidate { candidate, mid } },
                        Err(_) => continue,
                    },
                    Ok(Some(ServiceMsg::Cancel { session, reason })) => match SessionId::parse(&session) {
                        Ok(session) => VolunteerEvent::Cancel { session, reason },
                        Err(_) => continue,
                    },
                    Ok(Some(ServiceMsg::Goaway { retry_after_ms, .. })) => VolunteerEvent::Goaway { retry_after_ms },
                    // Not fatal: a late answer or candidate for a session that is over.
                    Ok(Some(ServiceMsg::Error { code: ErrorCode::UnknownSession, .. })) => continue,
                    Ok(Some(ServiceMsg::Error { code, reason })) => break format!("{}: {reason}", code.label()),
                    Ok(Some(_)) => continue,
                    Ok(None) => break "closed by the service".into(),
                    Err(e) => break e.to_string(),
                };
                if events.send(ev).await.is_err() {
                    break "volunteer gone".into();
                }
            }
        }
    };
    let _ = events.send(VolunteerEvent::Closed { reason }).await;
}

/// Why a consumer got no volunteer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("no volunteer available ({reason}); retry after {retry_after_ms} ms")]
    Unavailable { retry_after_ms: u64, reason: String },
    #[error("signaling refused: {code:?} ({reason})")]
    Refused { code: ErrorCode, reason: String },
    #[error("signaling failed: {0:#}")]
    Other(#[from] anyhow::Error),
}

/// What a consumer hears after it was matched.
#[derive(Debug, Clone)]
pub enum ConsumerEvent {
    Answer {
        sdp: String,
    },
    Candidate(Candidate),
    /// The session ended before it completed.
    Cancel {
        reason: String,
    },
    Closed {
        reason: String,
    },
}

/// A consumer matched to a volunteer: the answer and candidates arrive on `events`.
#[derive(Debug)]
pub struct ConsumerRequest {
    pub session: SessionId,
    pub ice_servers: Vec<IceServer>,
    pub events: mpsc::Receiver<ConsumerEvent>,
    tx: mpsc::Sender<Message>,
}

impl ConsumerRequest {
    /// Asks for a volunteer, presenting `offer`; returns once matched (before the answer).
    pub async fn start(conn: SignalConn, offer: &str, timeout: Duration) -> Result<ConsumerRequest, RequestError> {
        let SignalConn { mut ws, ice_servers } = conn;
        ws.send(send_json(serde_json::json!({"type": "consumer", "versions": [msg::VERSION], "offer": offer})))
            .await
            .map_err(anyhow::Error::from)?;
        let m = tokio::time::timeout(timeout, next_msg(&mut ws))
            .await
            .map_err(|_| anyhow!("no answer from the signaling service within {timeout:?}"))??;
        let session = match m {
            Some(ServiceMsg::Matched { session, .. }) => SessionId::parse(&session).map_err(anyhow::Error::from)?,
            Some(ServiceMsg::Unavailable { retry_after_ms, reason }) => {
                return Err(RequestError::Unavailable { retry_after_ms, reason })
            }
            Some(ServiceMsg::Error { code, reason }) => return Err(RequestError::Refused { code, reason }),
            other => return Err(anyhow!("unexpected answer to the request: {other:?}").into()),
        };
        let (tx, rx) = mpsc::channel(64);
        let (ev_tx, events) = mpsc::channel(64);
        tokio::spawn(consumer_task(ws, rx, ev_tx));
        Ok(ConsumerRequest { session, ice_servers, events, tx })
    }

    /// A handle that sends this session's candidates and `done`.
    pub fn sender(&self) -> ConsumerSender {
        ConsumerSender { session: self.session, tx: self.tx.clone() }
    }
}

/// Sends a consumer's candidates for one session.
#[derive(Debug, Clone)]
pub struct ConsumerSender {
    session: SessionId,
    tx: mpsc::Sender<Message>,
}

impl ConsumerSender {
    pub async fn candidate(&self, c: &Candidate) {
        let m = serde_json::json!({"type": "candidate", "session": self.session.to_string(),
            "candidate": c.candidate, "mid": c.mid});
        let _ = self.tx.send(send_json(m)).await;
    }
    /// The DataChannel is open (or the consumer gave up): the service forgets the session.
    pub async fn done(&self) {
        let m = serde_json::json!({"type": "done", "session": self.session.to_string()});
        let _ = self.tx.send(send_json(m)).await;
    }
}

async fn consumer_task(mut ws: Ws, mut rx: mpsc::Receiver<Message>, events: mpsc::Sender<ConsumerEvent>) {
    let reason = loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(m) => if let Err(e) = ws.send(m).await { break format!("send failed: {e}") },
                None => {
                    let _ = ws.close(None).await;
                    break "closed locally".into();
                }
            },
            m = next_msg(&mut ws) => {
                let ev = match m {
                    Ok(Some(ServiceMsg::Answer { sdp, .. })) => ConsumerEvent::Answer { sdp },
                    Ok(Some(ServiceMsg::Candidate { candidate, mid, .. })) => {
                        ConsumerEvent::Candidate(Candidate { candidate, mid })
                    }
                    Ok(Some(ServiceMsg::Cancel { reason, .. })) => ConsumerEvent::Cancel { reason },
                    Ok(Some(ServiceMsg::Error { code: ErrorCode::UnknownSession, .. })) => continue,
                    Ok(Some(ServiceMsg::Error { code, reason })) => break format!("{}: {reason}", code.label()),
                    Ok(Some(_)) => continue,
                    Ok(None) => break "closed by the service".into(),
                    Err(e) => break e.to_string(),
                };
                if events.send(ev).await.is_err() {
                    break "consumer gone".into();
                }
            }
        }
    };
    let _ = events.send(ConsumerEvent::Closed { reason }).await;
}
