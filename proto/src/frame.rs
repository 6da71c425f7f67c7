//! Frame codec (PROTOCOL.md §4–§6): `Type (i) | Flags (8) | Length (i) | Payload`.
//!
//! Decoding borrows from the message buffer and never allocates; encoding appends to a
//! caller-owned `Vec<u8>` so a connection loop can reuse one buffer for everything it sends.

use crate::codes::ErrorCode;
use crate::varint::{self, VarintError};
use std::fmt;

/// Frame type numbers (PROTOCOL.md §5).
pub mod types {
    pub const PADDING: u64 = 0x00;
    pub const HELLO: u64 = 0x01;
    pub const WELCOME: u64 = 0x02;
    pub const REFUSE: u64 = 0x03;
    pub const PING: u64 = 0x04;
    pub const PONG: u64 = 0x05;
    pub const GOAWAY: u64 = 0x06;
    pub const ERROR: u64 = 0x07;
    pub const DATA: u64 = 0x08;
    pub const ROUTE_CLOSE: u64 = 0x09;
}

/// The "ignorable" flag: an unknown frame type carrying it is skipped, one without it is fatal.
pub const FLAG_IGNORABLE: u8 = 0x80;
/// Per-type flag bits. Version 1 defines none, so any of them set on a known type is an error.
pub const FLAGS_PER_TYPE: u8 = 0x7f;

/// Frame size limit that applies before the handshake has completed (both directions).
pub const HANDSHAKE_MAX_FRAME_SIZE: usize = 4096;
/// Default limit after the handshake, and the one a client uses unless told otherwise.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 16_384;
/// The smallest `max_frame_size` a WELCOME may announce.
pub const MIN_MAX_FRAME_SIZE: u64 = 1500;

/// Longest PING/PONG payload.
pub const MAX_PING_PAYLOAD: usize = 64;
/// Longest REFUSE/ERROR reason: what fits in a WebSocket close frame.
pub const MAX_REASON_LEN: usize = 123;
/// Longest GOAWAY reconnect hint.
pub const MAX_RECONNECT_LEN: usize = 256;
/// Longest USER_AGENT extension value.
pub const MAX_USER_AGENT_LEN: usize = 64;
/// Length of session identifiers.
pub const SESSION_ID_LEN: usize = 16;

/// Extension TLV types known to version 1.
pub mod ext {
    /// UTF-8 software identification, diagnostics only.
    pub const USER_AGENT: u64 = 0x01;
}

/// A decoding failure. The variant names are the error names used by the test vectors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated frame")]
    Truncated,
    #[error("non-minimal variable-length integer")]
    BadVarint,
    #[error("frame of {size} bytes exceeds the limit of {max}")]
    FrameTooLarge { size: u64, max: usize },
    #[error("reserved flags {flags:#04x} set on frame type {frame_type:#x}")]
    ReservedFlags { frame_type: u64, flags: u8 },
    #[error("unknown frame type {frame_type:#x} without the ignorable flag")]
    UnknownFrame { frame_type: u64 },
    #[error("malformed {frame}: {what}")]
    Malformed { frame: &'static str, what: &'static str },
}

impl DecodeError {
    /// The error name used in the vectors file and in metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Truncated => "truncated",
            DecodeError::BadVarint => "bad_varint",
            DecodeError::FrameTooLarge { .. } => "frame_too_large",
            DecodeError::ReservedFlags { .. } => "reserved_flags",
            DecodeError::UnknownFrame { .. } => "unknown_frame",
            DecodeError::Malformed { .. } => "malformed",
        }
    }

    /// The code a receiver closes the connection with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
            DecodeError::UnknownFrame { .. } => ErrorCode::UNKNOWN_FRAME,
            _ => ErrorCode::FRAME_ENCODING,
        }
    }
}

/// A 16-byte session identifier; all zero means "none".
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SessionId(pub [u8; SESSION_ID_LEN]);

impl SessionId {
    pub const NONE: SessionId = SessionId([0; SESSION_ID_LEN]);

    pub fn is_none(&self) -> bool {
        *self == Self::NONE
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The role a client announces in HELLO. Unknown values decode (the server refuses them).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Role(pub u8);

impl Role {
    /// A volunteer relay forwarding consumers' traffic.
    pub const RELAY: Role = Role(1);
    /// A consumer connected without a relay.
    pub const CONSUMER: Role = Role(2);
    /// A monitoring probe: handshake and PING only, no DATA.
    pub const PROBE: Role = Role(3);

    pub fn label(self) -> &'static str {
        match self {
            Role::RELAY => "relay",
            Role::CONSUMER => "consumer",
            Role::PROBE => "probe",
            _ => "unknown",
        }
    }
}

impl fmt::Debug for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.label() {
            "unknown" => write!(f, "Role({})", self.0),
            name => f.write_str(name),
        }
    }
}

/// Capability bits (PROTOCOL.md §7). Unknown bits are carried and ignored.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// The client sends PINGs at the keepalive interval.
    pub const PING: u64 = 0x01;
    /// The client multiplexes routes other than label 0.
    pub const ROUTES: u64 = 0x02;
    /// The client migrates its routes on GOAWAY.
    pub const GOAWAY: u64 = 0x04;
    /// (WELCOME only) the server will PING this connection.
    pub const SERVER_PING: u64 = 0x08;
    /// Bits senders may set at random so that receivers stay tolerant of unknown bits.
    pub const GREASE_MASK: u64 = ((1 << 62) - 1) & !((1 << 48) - 1);

    pub fn has(self, bit: u64) -> bool {
        self.0 & bit == bit
    }

    /// The bits this version defines, without grease or unknown bits.
    pub fn known(self) -> Capabilities {
        Capabilities(self.0 & (Self::PING | Self::ROUTES | Self::GOAWAY | Self::SERVER_PING))
    }
}

impl fmt::Debug for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Capabilities({:#x})", self.0)
    }
}

/// Validated extension TLVs, still in wire form. Iterate to read them.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Extensions<'a>(&'a [u8]);

impl<'a> Extensions<'a> {
    pub const EMPTY: Extensions<'static> = Extensions(&[]);

    /// Validates `raw` as a TLV sequence: first its structure (a non-minimal varint is
    /// `bad_varint`, an overrun is `malformed`), then the rules (no duplicate type). Values
    /// are not interpreted here; see [`Extensions::user_agent`].
    pub fn parse(raw: &'a [u8], frame: &'static str) -> Result<Self, DecodeError> {
        let malformed = |what| DecodeError::Malformed { frame, what };
        let mut rest = raw;
        let mut count = 0usize;
        while !rest.is_empty() {
            let (_, n) = read_field(rest, frame, "extension type")?;
            rest = &rest[n..];
            let (len, n) = read_field(rest, frame, "extension length")?;
            rest = &rest[n..];
            let len = usize::try_from(len).map_err(|_| malformed("extension overruns the frame"))?;
            if len > rest.len() {
                return Err(malformed("extension overruns the frame"));
            }
            rest = &rest[len..];
            count += 1;
        }
        // Duplicates, without allocating: lists are short and bounded by the frame size.
        let ext = Extensions(raw);
        for (i, (ty, _)) in ext.iter().enumerate() {
            if ext.iter().take(i).any(|(t, _)| t == ty) {
                return Err(malformed("duplicate extension"));
            }
        }
        debug_assert_eq!(ext.iter().count(), count);
        Ok(ext)
    }

    /// The wire bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// (type, value) pairs in wire order. Only meaningful on validated extensions.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &'a [u8])> + 'a {
        let mut rest = self.0;
        std::iter::from_fn(move || {
            let (ty, n) = varint::read(rest).ok()?;
            let (len, m) = varint::read(&rest[n..]).ok()?;
            let start = n + m;
            let end = start.checked_add(usize::try_from(len).ok()?)?;
            let value = rest.get(start..end)?;
            rest = &rest[end..];
            Some((ty, value))
        })
    }

    pub fn get(&self, ty: u64) -> Option<&'a [u8]> {
        self.iter().find(|(t, _)| *t == ty).map(|(_, v)| v)
    }

    /// The USER_AGENT extension if present and valid (UTF-8, at most 64 bytes); an invalid
    /// one is treated as absent, as the spec says.
    pub fn user_agent(&self) -> Option<&'a str> {
        self.get(ext::USER_AGENT).filter(|v| v.len() <= MAX_USER_AGENT_LEN).and_then(|v| std::str::from_utf8(v).ok())
    }
}

impl fmt::Debug for Extensions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Encodes a TLV list. Types must be distinct; the caller owns the result.
pub fn encode_extensions(items: &[(u64, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (ty, value) in items {
        varint::write(*ty, &mut out);
        varint::write(value.len() as u64, &mut out);
        out.extend_from_slice(value);
    }
    out
}

/// HELLO (client → server, first frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello<'a> {
    pub min_version: u64,
    pub max_version: u64,
    pub role: Role,
    pub capabilities: Capabilities,
    pub previous_session: SessionId,
    pub extensions: Extensions<'a>,
}

/// WELCOME (server → client, handshake accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome<'a> {
    pub version: u64,
    pub session_id: SessionId,
    pub capabilities: Capabilities,
    pub keepalive_ms: u64,
    pub idle_timeout_ms: u64,
    pub max_frame_size: u64,
    pub max_routes: u64,
    pub extensions: Extensions<'a>,
}

/// One decoded frame, borrowing from the message it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    Padding {
        payload: &'a [u8],
    },
    Hello(Hello<'a>),
    Welcome(Welcome<'a>),
    Refuse {
        code: ErrorCode,
        retry_after_ms: u64,
        reason: &'a str,
    },
    Ping {
        payload: &'a [u8],
    },
    Pong {
        payload: &'a [u8],
    },
    GoAway {
        grace_ms: u64,
        reconnect: &'a str,
    },
    Error {
        code: ErrorCode,
        reason: &'a str,
    },
    Data {
        label: u64,
        packet: &'a [u8],
    },
    RouteClose {
        label: u64,
        code: ErrorCode,
    },
    /// An unknown type that carried the ignorable flag: receivers skip it.
    Unknown {
        frame_type: u64,
        payload: &'a [u8],
    },
}

impl<'a> Frame<'a> {
    /// The wire type number.
    pub fn frame_type(&self) -> u64 {
        match self {
            Frame::Padding { .. } => types::PADDING,
            Frame::Hello(_) => types::HELLO,
            Frame::Welcome(_) => types::WELCOME,
            Frame::Refuse { .. } => types::REFUSE,
            Frame::Ping { .. } => types::PING,
            Frame::Pong { .. } => types::PONG,
            Frame::GoAway { .. } => types::GOAWAY,
            Frame::Error { .. } => types::ERROR,
            Frame::Data { .. } => types::DATA,
            Frame::RouteClose { .. } => types::ROUTE_CLOSE,
            Frame::Unknown { frame_type, .. } => *frame_type,
        }
    }

    /// Short lower-case name, for logs and metric labels (bounded: unknown types share one).
    pub fn name(&self) -> &'static str {
        type_name(self.frame_type())
    }

    /// Appends the encoding of this frame with the given flags byte to `out`.
    pub fn encode(&self, flags: u8, out: &mut Vec<u8>) {
        varint::write(self.frame_type(), out);
        out.push(flags);
        let len = self.payload_len();
        varint::write(len as u64, out);
        let start = out.len();
        self.encode_payload(out);
        debug_assert_eq!(out.len() - start, len);
    }

    /// The encoded size of the frame (header + payload).
    pub fn encoded_len(&self) -> usize {
        let len = self.payload_len();
        varint::len(self.frame_type()) + 1 + varint::len(len as u64) + len
    }

    fn payload_len(&self) -> usize {
        let v = |x: u64| varint::len(x);
        match self {
            Frame::Padding { payload } | Frame::Ping { payload } | Frame::Pong { payload } => payload.len(),
            Frame::Unknown { payload, .. } => payload.len(),
            Frame::Hello(h) => {
                v(h.min_version) + v(h.max_version) + 1 + v(h.capabilities.0) + SESSION_ID_LEN + h.extensions.0.len()
            }
            Frame::Welcome(w) => {
                v(w.version)
                    + SESSION_ID_LEN
                    + v(w.capabilities.0)
                    + v(w.keepalive_ms)
                    + v(w.idle_timeout_ms)
                    + v(w.max_frame_size)
                    + v(w.max_routes)
                    + w.extensions.0.len()
            }
            Frame::Refuse { code, retry_after_ms, reason } => v(code.0) + v(*retry_after_ms) + reason.len(),
            Frame::GoAway { grace_ms, reconnect } => v(*grace_ms) + reconnect.len(),
            Frame::Error { code, reason } => v(code.0) + reason.len(),
            Frame::Data { label, packet } => v(*label) + packet.len(),
            Frame::RouteClose { label, code } => v(*label) + v(code.0),
        }
    }

    fn encode_payload(&self, out: &mut Vec<u8>) {
        let w = |x: u64, out: &mut Vec<u8>| varint::write(x, out);
        match self {
            Frame::Padding { payload } | Frame::Ping { payload } | Frame::Pong { payload } => {
                out.extend_from_slice(payload)
            }
            Frame::Unknown { payload, .. } => out.extend_from_slice(payload),
            Frame::Hello(h) => {
                w(h.min_version, out);
                w(h.max_version, out);
                out.push(h.role.0);
                w(h.capabilities.0, out);
                out.extend_from_slice(&h.previous_session.0);
                out.extend_from_slice(h.extensions.0);
            }
            Frame::Welcome(x) => {
                w(x.version, out);
                out.extend_from_slice(&x.session_id.0);
                w(x.capabilities.0, out);
                w(x.keepalive_ms, out);
                w(x.idle_timeout_ms, out);
                w(x.max_frame_size, out);
                w(x.max_routes, out);
                out.extend_from_slice(x.extensions.0);
            }
            Frame::Refuse { code, retry_after_ms, reason } => {
                w(code.0, out);
                w(*retry_after_ms, out);
                out.extend_from_slice(reason.as_bytes());
            }
            Frame::GoAway { grace_ms, reconnect } => {
                w(*grace_ms, out);
                out.extend_from_slice(reconnect.as_bytes());
            }
            Frame::Error { code, reason } => {
                w(code.0, out);
                out.extend_from_slice(reason.as_bytes());
            }
            Frame::Data { label, packet } => {
                w(*label, out);
                out.extend_from_slice(packet);
            }
            Frame::RouteClose { label, code } => {
                w(*label, out);
                w(code.0, out);
            }
        }
    }
}

/// Name of a frame type for logs and metrics.
pub fn type_name(frame_type: u64) -> &'static str {
    match frame_type {
        types::PADDING => "padding",
        types::HELLO => "hello",
        types::WELCOME => "welcome",
        types::REFUSE => "refuse",
        types::PING => "ping",
        types::PONG => "pong",
        types::GOAWAY => "goaway",
        types::ERROR => "error",
        types::DATA => "data",
        types::ROUTE_CLOSE => "route_close",
        _ => "unknown",
    }
}

/// Appends a DATA frame without building a [`Frame`] first (the hot path of every hop).
pub fn encode_data(label: u64, packet: &[u8], out: &mut Vec<u8>) {
    Frame::Data { label, packet }.encode(0, out)
}

/// Appends only the header of a DATA frame (type, flags, length, label) for a packet of
/// `packet_len` bytes, for callers that put the packet after it themselves.
pub fn encode_data_header(label: u64, packet_len: usize, out: &mut Vec<u8>) {
    varint::write(types::DATA, out);
    out.push(0);
    varint::write((varint::len(label) + packet_len) as u64, out);
    varint::write(label, out);
}

/// One frame decoded from the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded<'a> {
    pub frame: Frame<'a>,
    /// The raw flags byte.
    pub flags: u8,
    /// Bytes of the buffer this frame used.
    pub len: usize,
}

fn header_varint(buf: &[u8]) -> Result<(u64, usize), DecodeError> {
    varint::read(buf).map_err(|e| match e {
        VarintError::Truncated => DecodeError::Truncated,
        VarintError::NonMinimal => DecodeError::BadVarint,
    })
}

/// Reads a varint inside a payload, where the frame boundary is known: running off the end
/// is `malformed`, a non-minimal encoding is `bad_varint`.
fn read_field(buf: &[u8], frame: &'static str, what: &'static str) -> Result<(u64, usize), DecodeError> {
    varint::read(buf).map_err(|e| match e {
        VarintError::Truncated => DecodeError::Malformed { frame, what },
        VarintError::NonMinimal => DecodeError::BadVarint,
    })
}

/// Cursor over one frame's payload.
struct Fields<'a> {
    buf: &'a [u8],
    frame: &'static str,
}

impl<'a> Fields<'a> {
    fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let (v, n) = read_field(self.buf, self.frame, what)?;
        self.buf = &self.buf[n..];
        Ok(v)
    }

    fn byte(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        let (&b, rest) = self.buf.split_first().ok_or(self.malformed(what))?;
        self.buf = rest;
        Ok(b)
    }

    fn session_id(&mut self, what: &'static str) -> Result<SessionId, DecodeError> {
        if self.buf.len() < SESSION_ID_LEN {
            return Err(self.malformed(what));
        }
        let (id, rest) = self.buf.split_at(SESSION_ID_LEN);
        self.buf = rest;
        Ok(SessionId(id.try_into().expect("length checked")))
    }

    fn text(self, max: usize, what: &'static str) -> Result<&'a str, DecodeError> {
        if self.buf.len() > max {
            return Err(self.malformed(what));
        }
        std::str::from_utf8(self.buf).map_err(|_| self.malformed(what))
    }

    fn end(self, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.malformed(what))
        }
    }

    fn malformed(&self, what: &'static str) -> DecodeError {
        DecodeError::Malformed { frame: self.frame, what }
    }
}

/// Decodes the frame at the front of `buf`, enforcing `max_frame_size` on the whole frame.
pub fn decode(buf: &[u8], max_frame_size: usize) -> Result<Decoded<'_>, DecodeError> {
    let (frame_type, n_type) = header_varint(buf)?;
    let flags = *buf.get(n_type).ok_or(DecodeError::Truncated)?;
    let (len, n_len) = header_varint(&buf[n_type + 1..])?;
    let header = n_type + 1 + n_len;
    let size = header as u64 + len;
    if size > max_frame_size as u64 {
        return Err(DecodeError::FrameTooLarge { size, max: max_frame_size });
    }
    let size = size as usize; // bounded by max_frame_size
    if buf.len() < size {
        return Err(DecodeError::Truncated);
    }
    let payload = &buf[header..size];
    let known = frame_type <= types::ROUTE_CLOSE;
    if !known {
        if flags & FLAG_IGNORABLE == 0 {
            return Err(DecodeError::UnknownFrame { frame_type });
        }
        return Ok(Decoded { frame: Frame::Unknown { frame_type, payload }, flags, len: size });
    }
    if flags & FLAGS_PER_TYPE != 0 {
        return Err(DecodeError::ReservedFlags { frame_type, flags });
    }
    let frame = decode_payload(frame_type, payload)?;
    Ok(Decoded { frame, flags, len: size })
}

fn decode_payload(frame_type: u64, payload: &[u8]) -> Result<Frame<'_>, DecodeError> {
    let name = type_name(frame_type);
    let mut f = Fields { buf: payload, frame: name };
    Ok(match frame_type {
        types::PADDING => Frame::Padding { payload },
        types::HELLO => {
            let min_version = f.varint("min_version")?;
            let max_version = f.varint("max_version")?;
            let role = Role(f.byte("role")?);
            let capabilities = Capabilities(f.varint("capabilities")?);
            let previous_session = f.session_id("previous_session")?;
            let extensions = Extensions::parse(f.buf, name)?;
            if min_version == 0 || min_version > max_version {
                return Err(f.malformed("version range must satisfy 1 <= min <= max"));
            }
            Frame::Hello(Hello { min_version, max_version, role, capabilities, previous_session, extensions })
        }
        types::WELCOME => {
            let version = f.varint("version")?;
            let session_id = f.session_id("session_id")?;
            let capabilities = Capabilities(f.varint("capabilities")?);
            let keepalive_ms = f.varint("keepalive_ms")?;
            let idle_timeout_ms = f.varint("idle_timeout_ms")?;
            let max_frame_size = f.varint("max_frame_size")?;
            let max_routes = f.varint("max_routes")?;
            let extensions = Extensions::parse(f.buf, name)?;
            if version == 0 {
                return Err(f.malformed("version must be at least 1"));
            }
            if keepalive_ms < 1000 {
                return Err(f.malformed("keepalive_ms must be at least 1000"));
            }
            if idle_timeout_ms < keepalive_ms.saturating_mul(2) {
                return Err(f.malformed("idle_timeout_ms must be at least twice keepalive_ms"));
            }
            if max_frame_size < MIN_MAX_FRAME_SIZE {
                return Err(f.malformed("max_frame_size must be at least 1500"));
            }
            Frame::Welcome(Welcome {
                version,
                session_id,
                capabilities,
                keepalive_ms,
                idle_timeout_ms,
                max_frame_size,
                max_routes,
                extensions,
            })
        }
        types::REFUSE => {
            let code = ErrorCode(f.varint("code")?);
            let retry_after_ms = f.varint("retry_after_ms")?;
            let reason = f.text(MAX_REASON_LEN, "reason must be UTF-8 of at most 123 bytes")?;
            Frame::Refuse { code, retry_after_ms, reason }
        }
        types::PING | types::PONG => {
            if payload.len() > MAX_PING_PAYLOAD {
                return Err(f.malformed("payload longer than 64 bytes"));
            }
            if frame_type == types::PING {
                Frame::Ping { payload }
            } else {
                Frame::Pong { payload }
            }
        }
        types::GOAWAY => {
            let grace_ms = f.varint("grace_ms")?;
            let reconnect = f.text(MAX_RECONNECT_LEN, "reconnect must be UTF-8 of at most 256 bytes")?;
            Frame::GoAway { grace_ms, reconnect }
        }
        types::ERROR => {
            let code = ErrorCode(f.varint("code")?);
            let reason = f.text(MAX_REASON_LEN, "reason must be UTF-8 of at most 123 bytes")?;
            Frame::Error { code, reason }
        }
        types::DATA => {
            let label = f.varint("label")?;
            if f.buf.is_empty() {
                return Err(f.malformed("empty packet"));
            }
            Frame::Data { label, packet: f.buf }
        }
        types::ROUTE_CLOSE => {
            let label = f.varint("label")?;
            let code = ErrorCode(f.varint("code")?);
            f.end("trailing bytes")?;
            Frame::RouteClose { label, code }
        }
        _ => unreachable!("known types are handled above"),
    })
}

/// Iterates over the frames of one WebSocket message. After the first error it yields
/// nothing more: a message with a bad frame is rejected as a whole.
#[derive(Debug, Clone)]
pub struct Frames<'a> {
    rest: &'a [u8],
    max_frame_size: usize,
}

impl<'a> Frames<'a> {
    pub fn new(message: &'a [u8], max_frame_size: usize) -> Self {
        Frames { rest: message, max_frame_size }
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Decoded<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        match decode(self.rest, self.max_frame_size) {
            Ok(d) => {
                self.rest = &self.rest[d.len..];
                Some(Ok(d))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}

/// Decodes a whole message, all or nothing (used by tests, vectors and tools).
pub fn decode_message(message: &[u8], max_frame_size: usize) -> Result<Vec<Decoded<'_>>, DecodeError> {
    Frames::new(message, max_frame_size).collect()
}
