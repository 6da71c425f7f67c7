//! WebSocket messages of an open connection through its Broflake session: control frames
//! answered here, DATA handed to the QUIC endpoint under a route id that encodes the
//! connection.

use super::conn::Conn;
use super::counts::Counts;
use super::routes::route_id;
use super::worker::Worker;
use crate::metrics as m;
use crate::shared::Shared;
use crate::wscodec::{self, FeedError, WsEvent};
use broflake_proto::frame::{self, Frame};
use broflake_proto::{Close, ErrorCode, ServerEvent, Timestamp};
use bytes::Bytes;
use std::sync::atomic::Ordering;

/// Why on_ws stopped early.
pub(super) enum End {
    Close(Close),
    PeerClosed(u16),
}

impl Worker {
    /// WebSocket bytes of an open connection.
    pub(super) fn on_ws(&mut self, idx: u32, data: &mut [u8]) {
        let now = self.now;
        let thread = self.thread;
        let max_message = self.shared.config.limits.max_message_size as usize;
        let Worker { conns, shared, tx, wsout, counts, .. } = self;
        let conn = &mut conns[idx as usize];
        let gen = conn.gen;
        let mut rx = conn.rx.take().map(|b| *b).unwrap_or_default();
        let routes_before = conn.session.route_count();
        let was_open = conn.session.is_open();
        wsout.clear();
        let r = wscodec::feed(&mut rx, data, max_message, |ev| match ev {
            WsEvent::Binary(msg) => {
                let r = handle_binary(conn, shared, now, msg, tx, thread, idx, gen, counts);
                move_as_message(tx, wsout);
                r.map_err(End::Close)
            }
            WsEvent::Ping(p) => {
                if let Err(close) = conn.session.ws_ping(&shared.session, now, tx) {
                    // The ERROR frame the session wrote goes out before the close.
                    move_as_message(tx, wsout);
                    return Err(End::Close(close));
                }
                wscodec::frame_header(0xA, p.len(), wsout);
                wsout.extend_from_slice(p);
                Ok(())
            }
            WsEvent::Pong => {
                conn.session.touch(now);
                Ok(())
            }
            WsEvent::Close(code) => Err(End::PeerClosed(code)),
        });
        let conn = &mut self.conns[idx as usize];
        if !rx.is_empty() {
            rx.shrink();
            conn.rx = Some(Box::new(rx));
        }
        let routes_after = conn.session.route_count();
        if routes_after != routes_before {
            let d = routes_after as i64 - routes_before as i64;
            self.routes.open.fetch_add(d, Ordering::Relaxed);
            metrics::gauge!(m::ROUTES).increment(d as f64);
        }
        if !was_open && conn.session.is_open() {
            metrics::gauge!(m::CONNECTIONS, "backend" => "uring", "state" => "handshaking").decrement(1.0);
            metrics::gauge!(m::CONNECTIONS, "backend" => "uring", "state" => "open").increment(1.0);
        }
        let out = std::mem::take(&mut self.wsout);
        if !out.is_empty() {
            self.queue_out(idx, &out);
        }
        self.wsout = out;
        match r {
            // The session's deadlines may have moved (a reply sent straight to the socket
            // files nothing on its own).
            Ok(()) => self.refile(idx),
            Err(FeedError::Ws(f)) => {
                let label = match f.code {
                    1003 => "text_message",
                    1009 => "message_too_big",
                    _ => "ws_protocol_error",
                };
                metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => label).increment(1);
                self.begin_close(idx, Some((f.code, f.reason.to_string())));
            }
            Err(FeedError::Caller(End::Close(close))) => {
                if !was_open && !close.by_peer && close.code != ErrorCode::NO_ERROR {
                    self.shared.stats.refusals.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::HANDSHAKES, "result" => "refused").increment(1);
                    metrics::counter!(m::REFUSALS, "reason" => close.code.label()).increment(1);
                }
                self.count_close(&close);
                self.begin_close(idx, Some((close.close_code(), close.reason.to_string())));
            }
            Err(FeedError::Caller(End::PeerClosed(code))) => {
                metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => "normal").increment(1);
                let code = if code == 1005 { 1000 } else { code };
                self.begin_close(idx, Some((code, String::new())));
            }
        }
    }
}

/// One Broflake message from an open connection (the same session logic as the tokio
/// backend). DATA goes to the QUIC endpoint under a route id that encodes the connection.
#[allow(clippy::too_many_arguments)]
pub(super) fn handle_binary(
    conn: &mut Conn,
    shared: &Shared,
    now: Timestamp,
    msg: &[u8],
    tx: &mut Vec<u8>,
    thread: u8,
    idx: u32,
    gen: u8,
    counts: &mut Counts,
) -> Result<(), Close> {
    counts.bytes_rx += msg.len() as u64;
    let cfg = &shared.session;
    let limit = conn.session.max_frame_size(cfg);
    let mut rest = msg;
    while !rest.is_empty() {
        let decoded = match frame::decode(rest, limit) {
            Ok(d) => d,
            Err(e) => {
                counts.frames_rx[m::FRAME_INVALID] += 1;
                return Err(conn.session.decode_error(&e, tx));
            }
        };
        rest = &rest[decoded.len..];
        counts.frames_rx[m::frame_index(decoded.frame.frame_type())] += 1;
        if matches!(decoded.frame, Frame::Ping { .. }) {
            counts.frames_tx[m::frame_index(frame::types::PONG)] += 1;
        }
        match conn.session.handle_frame(cfg, now, decoded, tx)? {
            ServerEvent::Hello { hello, .. } => {
                let draining = *shared.drain.borrow();
                let resuming = draining && shared.issued_here(hello.previous_session);
                let refusal = conn.ext.as_mut().and_then(|e| e.refusal.take());
                let refusal = refusal.or_else(|| {
                    (draining && !resuming).then(|| (ErrorCode::DRAINING, 5_000, "server is draining".to_string()))
                });
                if let Some((code, retry, reason)) = refusal {
                    return Err(conn.session.refuse(code, retry, reason, tx));
                }
                if resuming {
                    conn.session.close_at(Timestamp(shared.drain_deadline.load(Ordering::Relaxed)));
                    shared.stats.resumptions.fetch_add(1, Ordering::Relaxed);
                }
                conn.session.accept(cfg, now, shared.session_id(), tx)?;
                if conn.ext.as_ref().is_some_and(|e| e.tls.is_none() && e.refusal.is_none()) {
                    conn.ext = None;
                }
                counts.frames_tx[m::frame_index(frame::types::WELCOME)] += 1;
                shared.stats.handshakes.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::HANDSHAKES, "result" => "accepted").increment(1);
            }
            ServerEvent::Data { label, packet, .. } => {
                if label > route_id::MAX_LABEL {
                    conn.session.close_route(label, ErrorCode::ROUTE_LIMIT, tx);
                    continue;
                }
                let id = route_id::encode(thread, idx, gen, label);
                shared.quic.deliver(id, Bytes::copy_from_slice(packet));
            }
            ServerEvent::RouteClosed { .. } | ServerEvent::Pong | ServerEvent::None => {}
        }
    }
    Ok(())
}

/// Moves `payload` (Broflake frames) to the end of `out` as one binary WebSocket message;
/// nothing when empty.
pub(super) fn move_as_message(payload: &mut Vec<u8>, out: &mut Vec<u8>) {
    if !payload.is_empty() {
        wscodec::frame_header(0x2, payload.len(), out);
        out.extend_from_slice(payload);
        payload.clear();
    }
}
