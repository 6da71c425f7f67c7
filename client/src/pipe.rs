//! What a Broflake session runs over: a WebSocket, or a WebRTC DataChannel pair (the hop
//! between a consumer and a volunteer). Both carry the same messages; the DataChannel pair
//! puts messages of only DATA frames on its unreliable channel (docs/PROTOCOL.md §17).

use crate::transport::BoxStream;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<BoxStream>;

/// A message transport under a session.
pub enum Pipe {
    Ws(Box<Ws>),
    Rtc(broflake_rtc::DataPipe),
}

impl std::fmt::Debug for Pipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pipe::Ws(_) => "Pipe::Ws",
            Pipe::Rtc(_) => "Pipe::Rtc",
        })
    }
}

/// What arrived.
#[derive(Debug)]
pub enum PipeEvent {
    Message(Bytes),
    /// A text message: a protocol violation on a WebSocket.
    Text,
    /// The transport ended; `code` is the WebSocket close code when there was one.
    Closed {
        reason: String,
        code: Option<u16>,
    },
}

impl Pipe {
    /// Whether several QUIC packets may share one message. Not on a DataChannel: an
    /// unreliable message larger than the path MTU is split into SCTP chunks, and losing one
    /// chunk would lose every packet in it.
    pub fn coalesces_data(&self) -> bool {
        matches!(self, Pipe::Ws(_))
    }

    /// The largest DATA frame this hop carries, given the session's frame limit: on a data
    /// channel one base-size packet (PROTOCOL.md §14.4, §17.5).
    pub fn max_data_frame(&self, frame_limit: usize) -> usize {
        if self.coalesces_data() {
            frame_limit
        } else {
            broflake_proto::packet_size::DATA_CHANNEL_MAX_FRAME.min(frame_limit)
        }
    }

    /// Sends one message; `data_only` says it holds DATA frames only (the DataChannel pair
    /// sends those unreliably and drops them, like datagrams, when it is backed up).
    pub async fn send(&mut self, msg: Bytes, data_only: bool) -> Result<(), String> {
        match self {
            Pipe::Ws(ws) => ws.send(Message::Binary(msg)).await.map_err(|e| e.to_string()),
            Pipe::Rtc(p) => {
                let ok =
                    if data_only { p.tx.send_data(msg) || !p.tx.is_closed() } else { p.tx.send_control(msg).await };
                if ok {
                    Ok(())
                } else {
                    Err("the WebRTC hop is closed".into())
                }
            }
        }
    }

    /// Sends one message of DATA frames given in pieces (a frame's header, then its packet as
    /// it arrived): over a WebSocket as they are, behind one WebSocket header, with no copy;
    /// on a DataChannel joined into one message and sent like a datagram.
    pub async fn send_data_parts(&mut self, parts: &[Bytes]) -> Result<(), String> {
        match self {
            Pipe::Ws(ws) => {
                // Tungstenite's own queued bytes (a pong) go first, never inside this message.
                ws.flush().await.map_err(|e| e.to_string())?;
                broflake_wscodec::io::write_binary_message(ws.get_mut(), parts)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
            Pipe::Rtc(_) => self.send(Bytes::from(parts.concat()), true).await,
        }
    }

    /// The next message (WebSocket control frames are handled underneath).
    pub async fn recv(&mut self) -> PipeEvent {
        match self {
            Pipe::Ws(ws) => loop {
                return match ws.next().await {
                    Some(Ok(Message::Binary(b))) => PipeEvent::Message(b),
                    Some(Ok(Message::Text(_))) => PipeEvent::Text,
                    Some(Ok(Message::Close(f))) => {
                        let (code, reason) =
                            f.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
                        PipeEvent::Closed { reason, code: Some(code) }
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => PipeEvent::Closed { reason: format!("connection error: {e}"), code: None },
                    None => PipeEvent::Closed { reason: "connection closed by peer".into(), code: None },
                };
            },
            Pipe::Rtc(p) => match p.rx.recv().await {
                Some(b) => PipeEvent::Message(b),
                None => {
                    let why = p.end.lock().expect("poisoned").clone().unwrap_or_else(|| "WebRTC hop ended".into());
                    PipeEvent::Closed { reason: why, code: None }
                }
            },
        }
    }

    /// Ends the transport: a WebSocket close frame, or closing the channels.
    pub async fn close(self, code: u16, reason: String) {
        match self {
            Pipe::Ws(mut ws) => {
                let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
                let _ = tokio::time::timeout(Duration::from_secs(2), (*ws).close(Some(frame))).await;
            }
            // Dropping the pipe closes both channels (the peer hears an SCTP stream reset).
            Pipe::Rtc(p) => drop(p),
        }
    }

    /// The WebRTC candidate pair in use, for a DataChannel pipe.
    pub fn path(&self) -> Option<broflake_rtc::PathHandle> {
        match self {
            Pipe::Rtc(p) => Some(p.path_handle()),
            Pipe::Ws(_) => None,
        }
    }
}
