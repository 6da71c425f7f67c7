//! WebSocket (RFC 6455) server-side framing, parsed in place over receive buffers, and the
//! HTTP upgrade, for the egress's io_uring backend (and its fuzz targets). Sans-IO: bytes in,
//! events and bytes out.
//!
//! Frames are unmasked where they lie; a frame is copied only while it is incomplete (the
//! partial-frame buffer exists only then), and a message only while fragmented.

#[cfg(feature = "tokio")]
pub mod io;
pub mod upgrade;

use broflake_proto::binding::Selected;

/// Why a connection is being closed at the WebSocket level: close code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsFail {
    pub code: u16,
    pub reason: &'static str,
}

const fn fail(code: u16, reason: &'static str) -> WsFail {
    WsFail { code, reason }
}

/// What complete frames mean for the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum WsEvent<'a> {
    /// A complete binary message.
    Binary(&'a [u8]),
    /// A PING (the caller answers with PONG carrying the same payload).
    Ping(&'a [u8]),
    /// A PONG (activity only).
    Pong,
    /// The peer closed (code, or 1005 if none).
    Close(u16),
}

/// Per-connection framing state. Empty (no heap) between complete frames.
#[derive(Debug, Default)]
pub struct WsRx {
    /// Bytes of an incomplete frame (header included), kept across reads.
    partial: Vec<u8>,
    /// Payload of a fragmented binary message so far.
    fragments: Vec<u8>,
    fragmented: bool,
}

impl WsRx {
    pub fn is_empty(&self) -> bool {
        self.partial.is_empty() && !self.fragmented
    }

    /// Releases buffers when nothing is pending (idle connections own none).
    pub fn shrink(&mut self) {
        if self.partial.is_empty() {
            self.partial = Vec::new();
        }
        if !self.fragmented {
            self.fragments = Vec::new();
        }
    }
}

/// One parsed frame header.
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

fn parse_header(buf: &[u8], max_message: usize) -> Result<Option<Header>, WsFail> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(fail(1002, "reserved bits set"));
    }
    if b1 & 0x80 == 0 {
        return Err(fail(1002, "unmasked client frame"));
    }
    let opcode = b0 & 0x0f;
    let (len, mut at) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let l = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
            if l >> 63 != 0 {
                return Err(fail(1002, "frame length with the top bit set"));
            }
            (l, 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode >= 8 && (len > 125 || b0 & 0x80 == 0) {
        return Err(fail(1002, "control frame too long or fragmented"));
    }
    if len > max_message as u64 {
        return Err(fail(1009, "frame exceeds the message size limit"));
    }
    if buf.len() < at + 4 {
        return Ok(None);
    }
    let mask = buf[at..at + 4].try_into().expect("4 bytes");
    at += 4;
    Ok(Some(Header { fin: b0 & 0x80 != 0, opcode, mask, header_len: at, payload_len: len as usize }))
}

fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let m = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes((&*c).try_into().expect("4 bytes")) ^ m;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// Feeds received bytes; calls `on_event` for every complete frame. `data` is modified
/// (unmasked in place). Returns an error close on protocol violations; events before it
/// have been delivered. The callback's `Err` stops processing and is returned.
pub fn feed<E>(
    rx: &mut WsRx,
    data: &mut [u8],
    max_message: usize,
    mut on_event: impl FnMut(WsEvent<'_>) -> Result<(), E>,
) -> Result<(), FeedError<E>> {
    if !rx.partial.is_empty() {
        // Complete the pending frame first, taking only what it needs.
        let mut used = 0;
        loop {
            match parse_header(&rx.partial, max_message).map_err(FeedError::Ws)? {
                None => {
                    // Header incomplete: take one byte at a time until it parses (≤ 14 bytes).
                    if used == data.len() {
                        return Ok(());
                    }
                    rx.partial.push(data[used]);
                    used += 1;
                }
                Some(h) => {
                    let need = h.header_len + h.payload_len - rx.partial.len();
                    let take = need.min(data.len() - used);
                    rx.partial.extend_from_slice(&data[used..used + take]);
                    used += take;
                    if take < need {
                        return Ok(());
                    }
                    let mut frame = std::mem::take(&mut rx.partial);
                    let r = frame_done(rx, &h, &mut frame[h.header_len..], max_message, &mut on_event);
                    rx.partial = frame;
                    rx.partial.clear();
                    r?;
                    break;
                }
            }
        }
        return feed(rx, &mut data[used..], max_message, on_event);
    }
    let mut at = 0;
    while at < data.len() {
        let h = match parse_header(&data[at..], max_message).map_err(FeedError::Ws)? {
            Some(h) if data.len() - at >= h.header_len + h.payload_len => h,
            _ => {
                rx.partial.extend_from_slice(&data[at..]);
                return Ok(());
            }
        };
        let start = at + h.header_len;
        let end = start + h.payload_len;
        frame_done(rx, &h, &mut data[start..end], max_message, &mut on_event)?;
        at = end;
    }
    Ok(())
}

/// A failure while feeding: a WebSocket protocol error, or the caller's own.
#[derive(Debug)]
pub enum FeedError<E> {
    Ws(WsFail),
    Caller(E),
}

fn frame_done<E>(
    rx: &mut WsRx,
    h: &Header,
    payload: &mut [u8],
    max_message: usize,
    on_event: &mut impl FnMut(WsEvent<'_>) -> Result<(), E>,
) -> Result<(), FeedError<E>> {
    unmask(payload, h.mask);
    let ev = match h.opcode {
        0x0 => {
            if !rx.fragmented {
                return Err(FeedError::Ws(fail(1002, "continuation without a message")));
            }
            if rx.fragments.len() + payload.len() > max_message {
                return Err(FeedError::Ws(fail(1009, "message exceeds the size limit")));
            }
            rx.fragments.extend_from_slice(payload);
            if !h.fin {
                return Ok(());
            }
            rx.fragmented = false;
            let msg = std::mem::take(&mut rx.fragments);
            let r = on_event(WsEvent::Binary(&msg)).map_err(FeedError::Caller);
            rx.fragments = msg;
            rx.fragments.clear();
            return r;
        }
        0x1 => return Err(FeedError::Ws(fail(1003, "text messages are not allowed"))),
        0x2 => {
            if rx.fragmented {
                return Err(FeedError::Ws(fail(1002, "new message inside a fragmented one")));
            }
            if !h.fin {
                rx.fragmented = true;
                rx.fragments.extend_from_slice(payload);
                return Ok(());
            }
            WsEvent::Binary(payload)
        }
        0x8 => {
            let code = if payload.len() >= 2 { u16::from_be_bytes([payload[0], payload[1]]) } else { 1005 };
            WsEvent::Close(code)
        }
        0x9 => WsEvent::Ping(payload),
        0xa => WsEvent::Pong,
        _ => return Err(FeedError::Ws(fail(1002, "unknown opcode"))),
    };
    on_event(ev).map_err(FeedError::Caller)
}

/// Appends a server frame header (unmasked) for a payload of `len` bytes.
pub fn frame_header(opcode: u8, len: usize, out: &mut Vec<u8>) {
    let mut h = [0u8; MAX_HEADER];
    out.extend_from_slice(frame_header_into(opcode, len, &mut h));
}

/// The longest frame header this side writes: no mask, a 64-bit length.
pub const MAX_HEADER: usize = 10;

/// Writes a final unmasked frame's header into `out`; returns the bytes written.
pub fn frame_header_into(opcode: u8, len: usize, out: &mut [u8; MAX_HEADER]) -> &[u8] {
    out[0] = 0x80 | opcode;
    let n = if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= 0xffff {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    &out[..n]
}

/// Appends a close frame.
pub fn close_frame(code: u16, reason: &str, out: &mut Vec<u8>) {
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    frame_header(0x8, 2 + reason.len(), out);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason);
}

/// Outcome of parsing an upgrade request.
#[derive(Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// More bytes needed.
    Partial,
    /// Accepted: the 101 response to send, and how many request bytes were used (any bytes
    /// after them are WebSocket frames).
    Accept { response: Vec<u8>, used: usize, selected: Selected },
    /// Refused: the HTTP response to send before closing, and the metric label.
    Refuse { response: Vec<u8>, label: &'static str },
}

/// Largest request head accepted.
pub const MAX_REQUEST_HEAD: usize = 8192;

fn refusal(status: u16, text: &str, reason: &str, label: &'static str) -> Upgrade {
    let body = format!("{reason}\n");
    let response = format!(
        "HTTP/1.1 {status} {text}\r\nContent-Type: text/plain\r\nSec-WebSocket-Version: 13\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    Upgrade::Refuse { response: response.into_bytes(), label }
}

/// The response to a client that did not complete its upgrade request in time.
pub fn request_timeout_response() -> Vec<u8> {
    match refusal(408, "Request Timeout", "upgrade request not completed in time", "timeout") {
        Upgrade::Refuse { response, .. } => response,
        _ => unreachable!("refusal() builds a refusal"),
    }
}

/// Parses an HTTP upgrade request from the bytes received so far.
pub fn upgrade(buf: &[u8], path: &str, min_version: u64, max_version: u64) -> Upgrade {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST_HEAD => return Upgrade::Partial,
        Ok(httparse::Status::Partial) => {
            return refusal(431, "Request Header Fields Too Large", "request head too large", "oversized_request")
        }
        Err(httparse::Error::TooManyHeaders) => {
            return refusal(431, "Request Header Fields Too Large", "too many headers", "oversized_request")
        }
        Err(_) => return refusal(400, "Bad Request", "malformed HTTP request", "bad_request"),
    };
    if req.method != Some("GET") {
        return refusal(405, "Method Not Allowed", "WebSocket upgrades use GET", "bad_request");
    }
    let header = |name: &str| req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
    let has_token = |name: &str, token: &str| {
        req.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).any(|h| {
            std::str::from_utf8(h.value).unwrap_or("").split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
        })
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return refusal(426, "Upgrade Required", "expected a WebSocket upgrade", "bad_request");
    }
    if header("sec-websocket-version") != Some(b"13") {
        return refusal(426, "Upgrade Required", "unsupported Sec-WebSocket-Version (expected 13)", "bad_request");
    }
    let Some(key) = header("sec-websocket-key") else {
        return refusal(400, "Bad Request", "missing Sec-WebSocket-Key", "bad_request");
    };
    let protocols = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-protocol"))
        .filter_map(|h| std::str::from_utf8(h.value).ok());
    let selected = match upgrade::check(req.path.unwrap_or(""), path, protocols, min_version, max_version) {
        Ok(s) => s,
        Err(r) => {
            let text = match r.status {
                404 => "Not Found",
                426 => "Upgrade Required",
                _ => "Bad Request",
            };
            return refusal(r.status, text, &r.reason, r.label);
        }
    };
    let accept = tungstenite::handshake::derive_accept_key(key);
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
        selected.token()
    );
    Upgrade::Accept { response: response.into_bytes(), used, selected }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let mask = [1, 2, 3, 4];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn run(rx: &mut WsRx, data: &[u8]) -> Result<Vec<String>, WsFail> {
        let mut got = Vec::new();
        let mut buf = data.to_vec();
        let r = feed::<()>(rx, &mut buf, 1 << 16, |ev| {
            got.push(match ev {
                WsEvent::Binary(b) => format!("bin {}", String::from_utf8_lossy(b)),
                WsEvent::Ping(p) => format!("ping {}", String::from_utf8_lossy(p)),
                WsEvent::Pong => "pong".into(),
                WsEvent::Close(c) => format!("close {c}"),
            });
            Ok(())
        });
        match r {
            Ok(()) => Ok(got),
            Err(FeedError::Ws(f)) => Err(f),
            Err(FeedError::Caller(())) => unreachable!(),
        }
    }

    #[test]
    fn whole_split_and_fragmented_frames() {
        let mut all = client_frame(2, true, b"hello");
        all.extend(client_frame(9, true, b"p"));
        all.extend(client_frame(2, false, b"ab"));
        all.extend(client_frame(0, false, b"cd"));
        all.extend(client_frame(9, true, b"q")); // control frames may interleave
        all.extend(client_frame(0, true, b"ef"));
        all.extend(client_frame(2, true, &[b'x'; 300]));
        let want = vec!["bin hello", "ping p", "ping q", "bin abcdef", &format!("bin {}", "x".repeat(300))]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        let mut rx = WsRx::default();
        assert_eq!(run(&mut rx, &all).unwrap(), want);
        assert!(rx.is_empty());
        // Every split point, byte by byte and in two pieces, gives the same events.
        for cut in 0..all.len() {
            let mut rx = WsRx::default();
            let mut got = run(&mut rx, &all[..cut]).unwrap();
            got.extend(run(&mut rx, &all[cut..]).unwrap());
            assert_eq!(got, want, "cut at {cut}");
        }
        let mut rx = WsRx::default();
        let mut got = Vec::new();
        for b in &all {
            got.extend(run(&mut rx, std::slice::from_ref(b)).unwrap());
        }
        assert_eq!(got, want);
    }

    #[test]
    fn violations() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (vec![0x82, 0x01, b'a'], 1002),                                           // unmasked
            (client_frame(1, true, b"text"), 1003),                                   // text
            (client_frame(0, true, b"x"), 1002),                                      // stray continuation
            (client_frame(9, false, b"x"), 1002),                                     // fragmented control
            (client_frame(9, true, &[0; 126]), 1002),                                 // long control
            (client_frame(3, true, b"x"), 1002),                                      // unknown opcode
            ([vec![0xc2], client_frame(2, true, b"x")[1..].to_vec()].concat(), 1002), // RSV1
            (vec![0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4], 1002),          // 63-bit length
            (vec![0x82, 0xff, 0, 0, 0, 0, 0, 1, 0, 1, 1, 2, 3, 4], 1009),             // 64 KiB + 1
        ];
        for (bytes, code) in cases {
            let mut rx = WsRx::default();
            assert_eq!(run(&mut rx, &bytes).unwrap_err().code, code, "{bytes:x?}");
        }
        // Endless continuations are bounded by the message limit.
        let mut rx = WsRx::default();
        run(&mut rx, &client_frame(2, false, &[0; 60_000])).unwrap();
        assert_eq!(run(&mut rx, &client_frame(0, false, &[0; 10_000])).unwrap_err().code, 1009);
    }

    #[test]
    fn upgrade_requests() {
        let ok = b"GET /broflake HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: broflake.v1, broflake\r\n\r\n";
        for cut in 0..ok.len() {
            assert_eq!(upgrade(&ok[..cut], "/broflake", 1, 1), Upgrade::Partial, "cut {cut}");
        }
        match upgrade(ok, "/broflake", 1, 1) {
            Upgrade::Accept { response, used, selected } => {
                let text = String::from_utf8(response).unwrap();
                assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{text}");
                assert!(text.contains("Sec-WebSocket-Protocol: broflake.v1\r\n"));
                assert_eq!(used, ok.len());
                assert_eq!(selected, Selected::Version(1));
            }
            other => panic!("{other:?}"),
        }
        let status = |req: &[u8]| match upgrade(req, "/broflake", 1, 1) {
            Upgrade::Refuse { response, .. } => String::from_utf8(response).unwrap()[9..12].to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(status(b"\x16\x03\x01garbage\r\n\r\n"), "400");
        assert_eq!(status(&ok.to_vec().replace_path()), "404");
        let no_proto = String::from_utf8_lossy(ok).replace("Sec-WebSocket-Protocol: broflake.v1, broflake\r\n", "");
        assert_eq!(status(no_proto.as_bytes()), "400");
        let bad_proto = String::from_utf8_lossy(ok).replace("broflake.v1, broflake", "chat");
        assert_eq!(status(bad_proto.as_bytes()), "426");
        let huge = format!("GET /broflake HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_REQUEST_HEAD));
        assert_eq!(status(huge.as_bytes()), "431");
    }

    trait ReplacePath {
        fn replace_path(self) -> Vec<u8>;
    }
    impl ReplacePath for Vec<u8> {
        fn replace_path(self) -> Vec<u8> {
            String::from_utf8(self).unwrap().replacen("/broflake", "/other", 1).into_bytes()
        }
    }

    #[test]
    fn server_frames() {
        let mut out = Vec::new();
        frame_header(2, 5, &mut out);
        assert_eq!(out, [0x82, 5]);
        out.clear();
        frame_header(2, 300, &mut out);
        assert_eq!(out, [0x82, 126, 1, 44]);
        out.clear();
        frame_header(2, 70_000, &mut out);
        assert_eq!(out, [0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        out.clear();
        close_frame(4007, "idle", &mut out);
        assert_eq!(out, [0x88, 6, 0x0f, 0xa7, b'i', b'd', b'l', b'e']);
    }
}
