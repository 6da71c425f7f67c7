//! The portable backend: tokio + tokio-tungstenite, one task per connection. Runs the same
//! `proto` server session as the io_uring backend. No task owns a timer: deadlines go to the
//! registry's sweep.

mod routes;

pub use routes::RouteTable;

use crate::metrics as m;
use crate::registry::{Admission, Registration};
use crate::shared::{Shared, WsClose};
use crate::wscodec;
use broflake_proto::frame::{self, Frame};
use broflake_proto::{Close, ErrorCode, ServerEvent, ServerSession};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// Accepts connections on one listener until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    routes: Arc<RouteTable>,
    mut stop: watch::Receiver<bool>,
) {
    let kind = if tls.is_some() { "wss" } else { "ws" };
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        metrics::counter!(m::CONNECTIONS_ACCEPTED, "backend" => "tokio", "listener" => kind).increment(1);
        let reg = match shared.conns.register(peer) {
            Ok(r) => r,
            Err(why) => {
                metrics::counter!(m::UPGRADE_REFUSALS, "reason" => "over_limit").increment(1);
                tracing::debug!(%peer, why, "connection rejected");
                continue; // dropping the stream closes it
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let routes = routes.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            // One handshake deadline from accept across TLS, the HTTP upgrade and HELLO, as on
            // io_uring: a slow peer cannot stretch it by finishing each step just in time.
            let accepted = Accepted {
                at: shared.now(),
                deadline: tokio::time::Instant::now() + shared.config.liveness.handshake_timeout,
            };
            match tls {
                None => connection(stream, peer, reg, shared, routes, accepted).await,
                Some(acceptor) => match tokio::time::timeout_at(accepted.deadline, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => connection(s, peer, reg, shared, routes, accepted).await,
                    Ok(Err(e)) => {
                        metrics::counter!(m::UPGRADE_REFUSALS, "reason" => "tls").increment(1);
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics::counter!(m::UPGRADE_REFUSALS, "reason" => "timeout").increment(1);
                    }
                },
            }
        });
    }
}

/// The tungstenite buffer settings: small, explicit (the defaults cost ~90 KB a connection).
pub fn ws_config(shared: &Shared) -> WebSocketConfig {
    let l = &shared.config.limits;
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(256 * 1024)
        .max_message_size(Some(l.max_message_size as usize))
        .max_frame_size(Some(l.max_message_size as usize))
}

/// When a connection was accepted, and when its handshake must be done.
#[derive(Clone, Copy)]
struct Accepted {
    at: broflake_proto::Timestamp,
    deadline: tokio::time::Instant,
}

async fn connection<S>(
    mut stream: S,
    peer: SocketAddr,
    reg: Registration,
    shared: Arc<Shared>,
    routes: Arc<RouteTable>,
    accepted: Accepted,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The same upgrade parser and bounds as the io_uring backend (8 KiB head, one deadline
    // from accept however slowly the bytes come), then tungstenite for the framing.
    let cfg = &shared.config;
    let head = tokio::time::timeout_at(accepted.deadline, read_upgrade(&mut stream, &shared)).await;
    let (response, rest) = match head {
        Err(_) => {
            metrics::counter!(m::UPGRADE_REFUSALS, "reason" => "timeout").increment(1);
            tracing::debug!(%peer, "upgrade timed out");
            refuse(stream, &wscodec::request_timeout_response()).await;
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "connection ended during the upgrade");
            return;
        }
        Ok(Ok((wscodec::Upgrade::Refuse { response, label }, _))) => {
            metrics::counter!(m::UPGRADE_REFUSALS, "reason" => label).increment(1);
            tracing::debug!(%peer, reason = label, "upgrade refused");
            refuse(stream, &response).await;
            return;
        }
        Ok(Ok((wscodec::Upgrade::Accept { response, used, .. }, buf))) => (response, buf[used..].to_vec()),
        Ok(Ok((wscodec::Upgrade::Partial, _))) => unreachable!("read_upgrade returns a verdict"),
    };
    match tokio::time::timeout(cfg.limits.write_timeout, stream.write_all(&response)).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    let ws = WebSocketStream::from_partially_read(stream, rest, Role::Server, Some(ws_config(&shared))).await;
    Conn::new(ws, reg, shared, routes, accepted.at).run().await;
}

/// Reads until the request head is complete or refused (never past the 8 KiB bound).
async fn read_upgrade<S: AsyncRead + Unpin>(
    stream: &mut S,
    shared: &Shared,
) -> std::io::Result<(wscodec::Upgrade, Vec<u8>)> {
    let (path, s) = (&shared.config.listen.path, &shared.session);
    let mut buf = vec![0u8; wscodec::MAX_REQUEST_HEAD + 1];
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        len += n;
        match wscodec::upgrade(&buf[..len], path, s.min_version, s.max_version) {
            wscodec::Upgrade::Partial => continue,
            verdict => {
                buf.truncate(len);
                return Ok((verdict, buf));
            }
        }
    }
}

/// Sends a refusal and closes, reading (and discarding, bounded) what the client still sends
/// so that its kernel does not answer our close with a reset that would eat the response.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, response: &[u8]) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        stream.write_all(response).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left = 256 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left -= n.min(left),
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// One connection's state in the tokio backend.
struct Conn<S> {
    ws: WebSocketStream<S>,
    reg: Registration,
    shared: Arc<Shared>,
    route_table: Arc<RouteTable>,
    session: ServerSession,
    /// DATA frames from the QUIC endpoint, already encoded.
    out_tx: mpsc::Sender<Bytes>,
    out_rx: mpsc::Receiver<Bytes>,
    /// label → route id in the route table. Empty (no heap) on idle connections.
    routes: HashMap<u64, u64>,
    tx: Vec<u8>,
    /// DATA frames taken from `out_rx` for the next message, sent as they are (no copy).
    batch: Vec<Bytes>,
    /// A frame taken from `out_rx` that did not fit in the last message: the next one's first.
    held: Option<Bytes>,
    state: &'static str,
    /// Why the connection was dropped without a close frame (for the close-reason metric).
    dropped_for: Option<&'static str>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(
        ws: WebSocketStream<S>,
        reg: Registration,
        shared: Arc<Shared>,
        route_table: Arc<RouteTable>,
        accepted: broflake_proto::Timestamp,
    ) -> Self {
        let (out_tx, out_rx) = mpsc::channel(shared.config.limits.send_queue_packets);
        // The HELLO deadline counts from accept (the upgrade already used part of it).
        let session = ServerSession::new(accepted);
        Conn {
            ws,
            reg,
            shared,
            route_table,
            session,
            out_tx,
            out_rx,
            routes: HashMap::new(),
            tx: Vec::new(),
            batch: Vec::new(),
            held: None,
            state: "handshaking",
            dropped_for: None,
        }
    }

    fn set_state(&mut self, state: &'static str) {
        metrics::gauge!(m::CONNECTIONS, "backend" => "tokio", "state" => self.state).decrement(1.0);
        metrics::gauge!(m::CONNECTIONS, "backend" => "tokio", "state" => state).increment(1.0);
        self.state = state;
    }

    async fn run(mut self) {
        metrics::gauge!(m::CONNECTIONS, "backend" => "tokio", "state" => self.state).increment(1.0);
        let mut drain = self.shared.drain.subscribe();
        let end = self.serve(&mut drain).await;
        self.finish(end).await;
        metrics::gauge!(m::CONNECTIONS, "backend" => "tokio", "state" => self.state).decrement(1.0);
        for (_, id) in self.routes.drain() {
            self.route_table.close(id);
        }
    }

    /// Runs until the connection must end; returns how.
    async fn serve(&mut self, drain: &mut watch::Receiver<bool>) -> Option<WsClose> {
        if *drain.borrow_and_update() {
            self.start_drain();
        }
        loop {
            self.publish_deadline();
            let end: Option<WsClose> = match self.held.take() {
                // Queued DATA first: the frame that did not fit in the last message.
                Some(first) => {
                    self.gather(first);
                    None
                }
                None => tokio::select! {
                    _ = self.reg.handle.wake.notified() => self.on_deadline(),
                    _ = drain.changed() => {
                        self.start_drain();
                        None
                    }
                    msg = self.ws.next() => match msg {
                        None => return None,
                        Some(Ok(msg)) => self.on_message(msg).err(),
                        Some(Err(e)) => Some(ws_error(e)?),
                    },
                    Some(first) = self.out_rx.recv() => {
                        self.gather(first);
                        None
                    }
                },
            };
            // Not once the connection is ending: tungstenite may have answered a close, and
            // only it knows; what is left goes through it.
            if end.is_some() {
                for f in self.batch.drain(..).chain(self.held.take()) {
                    self.tx.extend_from_slice(&f);
                }
            }
            if !self.batch.is_empty() && !self.send_batch().await {
                return None;
            }
            if !self.flush().await {
                return None;
            }
            if end.is_some() {
                return end;
            }
        }
    }

    fn publish_deadline(&self) {
        let cfg = &self.shared.session;
        let t = match self.shared.kernel_liveness() {
            // The kernel watches idleness; user space keeps only the handshake, server-ping
            // and drain deadlines.
            true if self.session.is_open() && !self.session.server_pings() && !self.session.is_draining() => None,
            _ => self.session.next_timeout(cfg),
        };
        self.reg.handle.set_deadline(t);
    }

    fn on_deadline(&mut self) -> Option<WsClose> {
        let now = self.shared.now();
        if self.reg.handle.kill.swap(false, Ordering::Relaxed) && self.session.is_open() {
            // The kernel saw this flow idle for the idle timeout (xdp mode).
            let close = self.session.fail(ErrorCode::IDLE_TIMEOUT, "idle timeout (xdp)", &mut self.tx);
            metrics::counter!(m::IDLE_CLOSES, "source" => "xdp").increment(1);
            self.shared.stats.idle_closes.fetch_add(1, Ordering::Relaxed);
            self.shared.stats.xdp_closed.fetch_add(1, Ordering::Relaxed);
            return Some(WsClose::from(&close));
        }
        let before = self.tx.len();
        match self.session.on_timeout(&self.shared.session, now, &mut self.tx) {
            Ok(()) => {
                if self.tx.len() > before {
                    self.shared.stats.server_pings.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::SERVER_PINGS).increment(1);
                    metrics::counter!(m::FRAMES_SENT, "type" => "ping").increment(1);
                }
                None
            }
            Err(close) => {
                if close.code == ErrorCode::IDLE_TIMEOUT {
                    let source = if self.session.server_pings() { "server-ping" } else { "userspace" };
                    self.shared.stats.idle_closes.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::IDLE_CLOSES, "source" => source).increment(1);
                }
                if close.code == ErrorCode::HANDSHAKE_TIMEOUT {
                    self.count_refusal(&close);
                }
                Some(WsClose::from(&close))
            }
        }
    }

    fn start_drain(&mut self) {
        let now = self.shared.now();
        let d = &self.shared.config.drain;
        let grace = u64::try_from(d.grace.as_millis()).unwrap_or(u64::MAX);
        if self.session.is_open() && !self.session.is_draining() {
            self.session.goaway(now, grace, &d.reconnect, &mut self.tx);
            self.shared.stats.goaways.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::FRAMES_SENT, "type" => "goaway").increment(1);
            self.set_state("draining");
        }
    }

    /// Takes queued DATA frames into `batch`, up to what one message may carry (the client's
    /// frame limit); several frames share a message.
    fn gather(&mut self, first: Bytes) {
        let limit = self.shared.session.max_frame_size as usize;
        let mut len = first.len();
        self.batch.push(first);
        while self.batch.len() < MAX_BATCH {
            let Ok(next) = self.out_rx.try_recv() else { break };
            if len + next.len() > limit {
                self.held = Some(next);
                break;
            }
            len += next.len();
            self.batch.push(next);
        }
        metrics::counter!(m::FRAMES_SENT, "type" => "data").increment(self.batch.len() as u64);
    }

    /// Sends the batch as one binary message: its WebSocket header and the frames as they are,
    /// in vectored writes. `ws.send` would copy them into a message and tungstenite then into
    /// its write buffer (a quarter of the backend's samples in a download). Tungstenite's buffer
    /// is flushed first, so nothing it queued on its own (a pong) can land inside this message.
    async fn send_batch(&mut self) -> bool {
        let (ws, batch) = (&mut self.ws, &self.batch);
        let write = async {
            ws.flush().await.map_err(std::io::Error::other)?;
            wscodec::io::write_binary_message(ws.get_mut(), batch).await
        };
        let r = tokio::time::timeout(self.shared.config.limits.write_timeout, write).await;
        self.batch.clear();
        self.sent(r)
    }

    /// Sends what the session wrote, within the write timeout.
    async fn flush(&mut self) -> bool {
        if self.tx.is_empty() {
            return true;
        }
        let msg = Message::Binary(Bytes::from(std::mem::take(&mut self.tx)));
        let len = msg.len();
        let r = tokio::time::timeout(self.shared.config.limits.write_timeout, self.ws.send(msg)).await;
        self.sent(r.map(|r| r.map(|()| len).map_err(std::io::Error::other)))
    }

    /// Counts a message sent (`Ok(Ok(bytes))`), or says why the connection ends.
    fn sent(&mut self, r: Result<std::io::Result<usize>, tokio::time::error::Elapsed>) -> bool {
        match r {
            Ok(Ok(len)) => {
                metrics::counter!(m::BYTES_SENT).increment(len as u64);
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(peer = %self.reg.handle.peer, error = %e, "send failed");
                false
            }
            Err(_) => {
                tracing::debug!(peer = %self.reg.handle.peer, "peer stopped reading; dropping it");
                self.dropped_for = Some("write_timeout");
                false
            }
        }
    }

    fn on_message(&mut self, msg: Message) -> Result<(), WsClose> {
        let now = self.shared.now();
        let bytes = match msg {
            Message::Binary(b) => b,
            Message::Text(_) => {
                metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => "text_message").increment(1);
                return Err(WsClose { code: 1003, reason: "text messages are not allowed".into() });
            }
            Message::Ping(_) => {
                // tungstenite answers it; the session rate-limits it like a PING frame.
                return self.session.ws_ping(&self.shared.session, now, &mut self.tx).map_err(|c| self.closing(c));
            }
            Message::Pong(_) => {
                self.session.touch(now);
                return Ok(());
            }
            Message::Close(_) => return Err(WsClose { code: 1000, reason: String::new() }),
            Message::Frame(_) => return Ok(()),
        };
        metrics::counter!(m::BYTES_RECEIVED).increment(bytes.len() as u64);
        // The frame limit is fixed at the start of each message (PROTOCOL.md §4).
        let limit = self.session.max_frame_size(&self.shared.session);
        let mut rest: &[u8] = &bytes;
        while !rest.is_empty() {
            let decoded = match frame::decode(rest, limit) {
                Ok(d) => d,
                Err(e) => {
                    let close = self.session.decode_error(&e, &mut self.tx);
                    metrics::counter!(m::FRAMES_RECEIVED, "type" => "invalid").increment(1);
                    return Err(self.closing(close));
                }
            };
            rest = &rest[decoded.len..];
            metrics::counter!(m::FRAMES_RECEIVED, "type" => decoded.frame.name()).increment(1);
            if matches!(decoded.frame, Frame::Ping { .. }) {
                metrics::counter!(m::FRAMES_SENT, "type" => "pong").increment(1);
            }
            let event = match self.session.handle_frame(&self.shared.session, now, decoded, &mut self.tx) {
                Ok(ev) => ev,
                Err(close) => return Err(self.closing(close)),
            };
            match event {
                ServerEvent::Hello { hello, version } => self.on_hello(hello, version)?,
                ServerEvent::Data { label, packet, new_route } => {
                    let id = match self.routes.get(&label) {
                        Some(id) => *id,
                        None if new_route => {
                            let id = self.route_table.open(self.out_tx.clone(), label);
                            self.routes.insert(label, id);
                            id
                        }
                        None => continue,
                    };
                    self.shared.quic.deliver(id, bytes.slice_ref(packet));
                }
                ServerEvent::RouteClosed { label, .. } => {
                    if let Some(id) = self.routes.remove(&label) {
                        self.route_table.close(id);
                    }
                }
                ServerEvent::Pong | ServerEvent::None => {}
            }
        }
        Ok(())
    }

    fn on_hello(&mut self, hello: broflake_proto::frame::Hello<'_>, version: u64) -> Result<(), WsClose> {
        let draining = *self.shared.drain.borrow();
        let resuming = draining && self.shared.issued_here(hello.previous_session);
        let refusal = match &self.reg.admission {
            Admission::Refuse { code, retry_after_ms, reason } => Some((*code, *retry_after_ms, reason.clone())),
            _ if draining && !resuming => Some((ErrorCode::DRAINING, 5_000, "server is draining".to_string())),
            _ => None,
        };
        if let Some((code, retry, reason)) = refusal {
            let close = self.session.refuse(code, retry, reason, &mut self.tx);
            return Err(self.closing(close));
        }
        let id = self.shared.session_id();
        let now = self.shared.now();
        if resuming {
            // Admitted only to take over the routes of a draining session: it ends with the drain.
            let deadline = self.shared.drain_deadline.load(Ordering::Relaxed);
            self.session.close_at(broflake_proto::Timestamp(deadline));
            self.shared.stats.resumptions.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(close) = self.session.accept(&self.shared.session, now, id, &mut self.tx) {
            return Err(self.closing(close));
        }
        metrics::counter!(m::HANDSHAKES, "result" => "accepted").increment(1);
        self.shared.stats.handshakes.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::FRAMES_SENT, "type" => "welcome").increment(1);
        tracing::debug!(
            peer = %self.reg.handle.peer, session = %id, version, role = hello.role.label(),
            previous = %hello.previous_session, user_agent = hello.extensions.user_agent().unwrap_or(""),
            "handshake accepted"
        );
        self.set_state(if resuming { "draining" } else { "open" });
        Ok(())
    }

    fn count_refusal(&self, close: &Close) {
        self.shared.stats.refusals.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::HANDSHAKES, "result" => "refused").increment(1);
        metrics::counter!(m::REFUSALS, "reason" => close.code.label()).increment(1);
    }

    /// Bookkeeping for a session-decided close; returns the WebSocket close to send.
    fn closing(&self, close: Close) -> WsClose {
        if !self.session.is_open() && !close.by_peer && close.code != ErrorCode::NO_ERROR && self.state == "handshaking"
        {
            self.count_refusal(&close);
        }
        tracing::debug!(peer = %self.reg.handle.peer, %close, "closing");
        WsClose::from(&close)
    }

    async fn finish(&mut self, end: Option<WsClose>) {
        let reason_label = match &end {
            Some(c) => close_label(c.code),
            None => self.dropped_for.unwrap_or("peer_gone"),
        };
        metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => reason_label).increment(1);
        if let Some(c) = end {
            let frame = CloseFrame { code: CloseCode::from(c.code), reason: c.reason.into() };
            // Best effort, bounded: a peer that does not read gets its TCP connection dropped.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.ws.close(Some(frame))).await;
        }
    }
}

/// Bounded label for the close-reason metric.
fn close_label(code: u16) -> &'static str {
    match code {
        1000 => "normal",
        1002 => "ws_protocol_error",
        1003 => "text_message",
        1009 => "message_too_big",
        _ => ErrorCode::from_close_code(code).map_or("other", |c| c.label()),
    }
}

/// Maps a WebSocket-level error to the close to send (None: just drop the connection).
fn ws_error(e: WsError) -> Option<WsClose> {
    use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            Some(WsClose { code: 1009, reason: format!("message of {size} bytes exceeds the limit of {max_size}") })
        }
        WsError::Capacity(c) => Some(WsClose { code: 1009, reason: c.to_string() }),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(p) => Some(WsClose { code: 1002, reason: p.to_string() }),
        WsError::Utf8(_) => Some(WsClose { code: 1007, reason: "invalid UTF-8".into() }),
        _ => None,
    }
}

/// DATA frames in one message at most (bounds the batch's vector, not the message's bytes).
const MAX_BATCH: usize = 64;
