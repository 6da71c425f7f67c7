//! The signaling messages (docs/SIGNALING.md §3): JSON objects in WebSocket text messages.
//!
//! Parsing is strict about what it needs and lenient about what it does not know: unknown
//! fields are ignored (so later versions can add them), unknown message types are reported
//! as [`Incoming::Unknown`] (ignored by receivers), and every string and count has a bound,
//! checked before anything is stored.

use serde::{Deserialize, Serialize};

/// The protocol versions this implementation speaks.
pub const VERSION: u32 = 1;
/// The WebSocket subprotocol token.
pub const SUBPROTOCOL: &str = "broflake-signal.v1";
/// The request path of the signaling WebSocket.
pub const PATH: &str = "/v1/signal";

/// Largest WebSocket message accepted (a whole JSON object).
pub const MAX_MESSAGE: usize = 32 * 1024;
/// Largest SDP (offer or answer). A DataChannel-only SDP with every candidate inlined is
/// 1–3 KiB; 16 KiB leaves room and refuses SDP bombs.
pub const MAX_SDP: usize = 16 * 1024;
/// Largest ICE candidate line.
pub const MAX_CANDIDATE: usize = 512;
/// Largest `mid` (media id).
pub const MAX_MID: usize = 16;
/// Largest reason text.
pub const MAX_REASON: usize = 200;
/// Session ids are 32 lowercase hex digits (128 bits).
pub const SESSION_LEN: usize = 32;
/// Versions a client may list.
pub const MAX_VERSIONS: usize = 8;

/// Why a message was refused. Each maps to an `error` code on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsgError {
    #[error("message too large: {0} bytes (limit {MAX_MESSAGE})")]
    TooLarge(usize),
    #[error("not a JSON object: {0}")]
    Json(String),
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("field `{field}` too long: {len} bytes (limit {limit})")]
    TooLong { field: &'static str, len: usize, limit: usize },
    #[error("bad field `{field}`: {why}")]
    Bad { field: &'static str, why: &'static str },
}

impl MsgError {
    /// The `code` of the `error` message sent for this.
    pub fn code(&self) -> ErrorCode {
        match self {
            MsgError::TooLarge(_) | MsgError::TooLong { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::BadMessage,
        }
    }
}

/// Error codes (docs/SIGNALING.md §6), each with its WebSocket close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadMessage,
    TooLarge,
    UnsupportedVersion,
    Unexpected,
    UnknownSession,
    RateLimited,
    OverCapacity,
    Timeout,
    TooSlow,
    Draining,
}

impl ErrorCode {
    pub fn label(self) -> &'static str {
        match self {
            ErrorCode::BadMessage => "bad_message",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Unexpected => "unexpected",
            ErrorCode::UnknownSession => "unknown_session",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::OverCapacity => "over_capacity",
            ErrorCode::Timeout => "timeout",
            ErrorCode::TooSlow => "too_slow",
            ErrorCode::Draining => "draining",
        }
    }

    /// The WebSocket close code that follows a fatal error of this kind.
    pub fn close_code(self) -> u16 {
        match self {
            ErrorCode::BadMessage => 4400,
            ErrorCode::TooLarge => 1009,
            ErrorCode::UnsupportedVersion => 4426,
            ErrorCode::Unexpected => 4409,
            ErrorCode::UnknownSession => 4404,
            ErrorCode::RateLimited => 4429,
            ErrorCode::OverCapacity => 4503,
            ErrorCode::Timeout => 4408,
            ErrorCode::TooSlow => 4413,
            ErrorCode::Draining => 4503,
        }
    }

    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::BadMessage,
        ErrorCode::TooLarge,
        ErrorCode::UnsupportedVersion,
        ErrorCode::Unexpected,
        ErrorCode::UnknownSession,
        ErrorCode::RateLimited,
        ErrorCode::OverCapacity,
        ErrorCode::Timeout,
        ErrorCode::TooSlow,
        ErrorCode::Draining,
    ];
}

/// A session id: 128 random bits as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    pub fn parse(s: &str) -> Result<SessionId, MsgError> {
        let bad = MsgError::Bad { field: "session", why: "expected 32 lowercase hex digits" };
        if s.len() != SESSION_LEN || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(bad);
        }
        let mut id = [0u8; 16];
        hex::decode_to_slice(s, &mut id).map_err(|_| bad)?;
        Ok(SessionId(id))
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl Serialize for SessionId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SessionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SessionId::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A STUN or TURN server clients should use, in the shape of WebRTC's `RTCIceServer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    /// `stun:host:port` or `turn:host:port?transport=udp`.
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub username: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub credential: String,
}

/// A trickled ICE candidate; an empty `candidate` marks the end of candidates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub candidate: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mid: Option<String>,
}

/// A message from a client (volunteer or consumer) to the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// First message of a volunteer: it can serve `slots` consumers now.
    Volunteer {
        versions: Vec<u32>,
        slots: u32,
    },
    /// First message of a consumer: it wants a volunteer and brings its SDP offer.
    Consumer {
        versions: Vec<u32>,
        offer: String,
    },
    /// A volunteer's free slots changed.
    Slots {
        free: u32,
    },
    /// A volunteer's answer to an offer.
    Answer {
        session: SessionId,
        sdp: String,
    },
    /// A volunteer turns an offer down.
    Decline {
        session: SessionId,
        reason: String,
    },
    Candidate {
        session: SessionId,
        candidate: Candidate,
    },
    /// The client is done with a session (its DataChannel is open, or it gave up).
    Done {
        session: SessionId,
    },
    Ping,
    /// A type this version does not know: ignored.
    Unknown(String),
}

impl Incoming {
    /// The `type` of this message (metrics label; unknown types are "unknown").
    pub fn kind(&self) -> &'static str {
        match self {
            Incoming::Volunteer { .. } => "volunteer",
            Incoming::Consumer { .. } => "consumer",
            Incoming::Slots { .. } => "slots",
            Incoming::Answer { .. } => "answer",
            Incoming::Decline { .. } => "decline",
            Incoming::Candidate { .. } => "candidate",
            Incoming::Done { .. } => "done",
            Incoming::Ping => "ping",
            Incoming::Unknown(_) => "unknown",
        }
    }
}

/// A message from the service to a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outgoing {
    /// First message on every connection, before the client says anything: the versions the
    /// service speaks and the STUN/TURN servers to gather candidates with (a consumer needs
    /// them before it can make its offer).
    Hello {
        versions: Vec<u32>,
        ice_servers: Vec<IceServer>,
    },
    /// A volunteer is registered. `ping_ms`: PING at least this often; `idle_ms`: silence
    /// after which the service drops it.
    Registered {
        version: u32,
        id: String,
        ping_ms: u64,
        idle_ms: u64,
    },
    /// A consumer got a volunteer; the answer and candidates follow.
    Matched {
        version: u32,
        session: SessionId,
        ttl_ms: u64,
    },
    /// No volunteer is free now; try again after `retry_after_ms`.
    Unavailable {
        retry_after_ms: u64,
        reason: String,
    },
    /// A consumer's offer, to a volunteer.
    Offer {
        session: SessionId,
        sdp: String,
        ttl_ms: u64,
    },
    /// A volunteer's answer, to the consumer.
    Answer {
        session: SessionId,
        sdp: String,
    },
    Candidate {
        session: SessionId,
        #[serde(flatten)]
        candidate: Candidate,
    },
    /// The session ended before it completed (the peer left, declined or timed out).
    Cancel {
        session: SessionId,
        reason: String,
    },
    Pong,
    /// The service is draining: reconnect (after `retry_after_ms`), to another replica if any.
    Goaway {
        retry_after_ms: u64,
        reason: String,
    },
    Error {
        code: ErrorCode,
        reason: String,
    },
}

impl Outgoing {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("serialising plain data cannot fail")
    }

    /// The `type` of this message (metrics label).
    pub fn kind(&self) -> &'static str {
        match self {
            Outgoing::Hello { .. } => "hello",
            Outgoing::Registered { .. } => "registered",
            Outgoing::Matched { .. } => "matched",
            Outgoing::Unavailable { .. } => "unavailable",
            Outgoing::Offer { .. } => "offer",
            Outgoing::Answer { .. } => "answer",
            Outgoing::Candidate { .. } => "candidate",
            Outgoing::Cancel { .. } => "cancel",
            Outgoing::Pong => "pong",
            Outgoing::Goaway { .. } => "goaway",
            Outgoing::Error { .. } => "error",
        }
    }
}

/// The wire shape of every incoming message: all fields optional, checked per type.
#[derive(Deserialize)]
struct Wire {
    #[serde(rename = "type")]
    ty: String,
    versions: Option<Vec<u32>>,
    slots: Option<u32>,
    free: Option<u32>,
    offer: Option<String>,
    sdp: Option<String>,
    session: Option<String>,
    candidate: Option<String>,
    mid: Option<String>,
    reason: Option<String>,
}

fn bounded(field: &'static str, v: Option<String>, limit: usize) -> Result<String, MsgError> {
    let v = v.ok_or(MsgError::Missing(field))?;
    if v.len() > limit {
        return Err(MsgError::TooLong { field, len: v.len(), limit });
    }
    Ok(v)
}

fn sdp(field: &'static str, v: Option<String>) -> Result<String, MsgError> {
    let v = bounded(field, v, MAX_SDP)?;
    if !v.starts_with("v=0") {
        return Err(MsgError::Bad { field, why: "an SDP starts with \"v=0\"" });
    }
    Ok(v)
}

fn versions(v: Option<Vec<u32>>) -> Result<Vec<u32>, MsgError> {
    let v = v.ok_or(MsgError::Missing("versions"))?;
    if v.is_empty() || v.len() > MAX_VERSIONS {
        return Err(MsgError::Bad { field: "versions", why: "list 1 to 8 versions" });
    }
    Ok(v)
}

fn session(v: Option<String>) -> Result<SessionId, MsgError> {
    SessionId::parse(&v.ok_or(MsgError::Missing("session"))?)
}

/// Parses one incoming text message.
pub fn parse(text: &str) -> Result<Incoming, MsgError> {
    if text.len() > MAX_MESSAGE {
        return Err(MsgError::TooLarge(text.len()));
    }
    let w: Wire = serde_json::from_str(text).map_err(|e| MsgError::Json(e.to_string()))?;
    Ok(match w.ty.as_str() {
        "volunteer" => {
            Incoming::Volunteer { versions: versions(w.versions)?, slots: w.slots.ok_or(MsgError::Missing("slots"))? }
        }
        "consumer" => Incoming::Consumer { versions: versions(w.versions)?, offer: sdp("offer", w.offer)? },
        "slots" => Incoming::Slots { free: w.free.ok_or(MsgError::Missing("free"))? },
        "answer" => Incoming::Answer { session: session(w.session)?, sdp: sdp("sdp", w.sdp)? },
        "decline" => Incoming::Decline {
            session: session(w.session)?,
            reason: bounded("reason", w.reason.or(Some(String::new())), MAX_REASON)?,
        },
        "candidate" => {
            let session = session(w.session)?;
            let candidate = bounded("candidate", w.candidate, MAX_CANDIDATE)?;
            if !(candidate.is_empty() || candidate.starts_with("candidate:")) {
                return Err(MsgError::Bad { field: "candidate", why: "a candidate starts with \"candidate:\"" });
            }
            let mid = match w.mid {
                Some(m) if m.len() > MAX_MID => {
                    return Err(MsgError::TooLong { field: "mid", len: m.len(), limit: MAX_MID })
                }
                m => m,
            };
            Incoming::Candidate { session, candidate: Candidate { candidate, mid } }
        }
        "done" => Incoming::Done { session: session(w.session)? },
        "ping" => Incoming::Ping,
        other => Incoming::Unknown(other.chars().take(32).collect()),
    })
}

/// The highest version both sides speak, if any.
pub fn negotiate(theirs: &[u32]) -> Option<u32> {
    theirs.iter().copied().filter(|v| *v == VERSION).max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outgoing_shapes() {
        let s = SessionId([0xab; 16]);
        assert_eq!(
            Outgoing::Candidate { session: s, candidate: Candidate { candidate: String::new(), mid: None } }.to_json(),
            format!(r#"{{"type":"candidate","session":"{s}","candidate":""}}"#)
        );
        assert_eq!(Outgoing::Pong.to_json(), r#"{"type":"pong"}"#);
        assert_eq!(
            Outgoing::Error { code: ErrorCode::RateLimited, reason: "x".into() }.to_json(),
            r#"{"type":"error","code":"rate_limited","reason":"x"}"#
        );
    }

    #[test]
    fn labels_match_serde_names() {
        for c in ErrorCode::ALL {
            assert_eq!(serde_json::to_string(&c).unwrap(), format!("\"{}\"", c.label()));
        }
    }
}
