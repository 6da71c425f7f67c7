//! The proxy protocol inside QUIC (PROTOCOL.md §14): one request per client-initiated
//! bidirectional stream, one reply, then raw bytes both ways.

use crate::varint::{self, VarintError};
use std::fmt;

/// QUIC ALPN of the proxy protocol.
pub const ALPN: &[u8] = b"broflake-proxy/1";
/// Longest host name or literal.
pub const MAX_HOST_LEN: usize = 255;
/// Longest reply reason.
pub const MAX_REASON_LEN: usize = 255;

/// A malformed request or reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("non-minimal variable-length integer")]
    BadVarint,
    #[error("host must be 1 to 255 bytes of UTF-8")]
    BadHost,
    #[error("port must not be 0")]
    BadPort,
    #[error("reason must be UTF-8 of at most 255 bytes")]
    BadReason,
}

fn varint(buf: &[u8]) -> Result<Option<(u64, usize)>, ProxyError> {
    match varint::read(buf) {
        Ok(v) => Ok(Some(v)),
        Err(VarintError::Truncated) => Ok(None),
        Err(VarintError::NonMinimal) => Err(ProxyError::BadVarint),
    }
}

/// `host_len (i) | host | port (16)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyRequest<'a> {
    pub host: &'a str,
    pub port: u16,
}

impl<'a> ProxyRequest<'a> {
    /// Decodes a request from the front of `buf`; `Ok(None)` means more bytes are needed.
    pub fn decode(buf: &'a [u8]) -> Result<Option<(Self, usize)>, ProxyError> {
        let Some((len, n)) = varint(buf)? else {
            return Ok(None);
        };
        if len == 0 || len > MAX_HOST_LEN as u64 {
            return Err(ProxyError::BadHost);
        }
        let end = n + len as usize;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        let host = std::str::from_utf8(&buf[n..end]).map_err(|_| ProxyError::BadHost)?;
        let port = u16::from_be_bytes([buf[end], buf[end + 1]]);
        if port == 0 {
            return Err(ProxyError::BadPort);
        }
        Ok(Some((ProxyRequest { host, port }, end + 2)))
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        assert!(!self.host.is_empty() && self.host.len() <= MAX_HOST_LEN, "host length");
        varint::write(self.host.len() as u64, out);
        out.extend_from_slice(self.host.as_bytes());
        out.extend_from_slice(&self.port.to_be_bytes());
    }
}

/// Reply status codes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProxyStatus(pub u8);

impl ProxyStatus {
    pub const OK: ProxyStatus = ProxyStatus(0);
    pub const POLICY_REFUSED: ProxyStatus = ProxyStatus(1);
    pub const DNS_FAILED: ProxyStatus = ProxyStatus(2);
    pub const CONNECTION_REFUSED: ProxyStatus = ProxyStatus(3);
    pub const TIMEOUT: ProxyStatus = ProxyStatus(4);
    pub const UNREACHABLE: ProxyStatus = ProxyStatus(5);
    pub const BAD_REQUEST: ProxyStatus = ProxyStatus(6);
    pub const INTERNAL: ProxyStatus = ProxyStatus(7);

    pub fn label(self) -> &'static str {
        match self.0 {
            0 => "ok",
            1 => "policy_refused",
            2 => "dns_failed",
            3 => "connection_refused",
            4 => "timeout",
            5 => "unreachable",
            6 => "bad_request",
            7 => "internal",
            _ => "unknown",
        }
    }
}

impl fmt::Debug for ProxyStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// `status (8) | reason_len (i) | reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyReply<'a> {
    pub status: ProxyStatus,
    pub reason: &'a str,
}

impl<'a> ProxyReply<'a> {
    pub fn decode(buf: &'a [u8]) -> Result<Option<(Self, usize)>, ProxyError> {
        let Some((&status, rest)) = buf.split_first() else {
            return Ok(None);
        };
        let Some((len, n)) = varint(rest)? else {
            return Ok(None);
        };
        if len > MAX_REASON_LEN as u64 {
            return Err(ProxyError::BadReason);
        }
        let end = 1 + n + len as usize;
        if buf.len() < end {
            return Ok(None);
        }
        let reason = std::str::from_utf8(&buf[1 + n..end]).map_err(|_| ProxyError::BadReason)?;
        Ok(Some((ProxyReply { status: ProxyStatus(status), reason }, end)))
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut end = self.reason.len().min(MAX_REASON_LEN);
        while !self.reason.is_char_boundary(end) {
            end -= 1;
        }
        out.push(self.status.0);
        varint::write(end as u64, out);
        out.extend_from_slice(&self.reason.as_bytes()[..end]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_incremental() {
        let mut out = Vec::new();
        ProxyRequest { host: "example.com", port: 443 }.encode(&mut out);
        assert_eq!(out, b"\x0bexample.com\x01\xbb");
        for cut in 0..out.len() {
            assert_eq!(ProxyRequest::decode(&out[..cut]), Ok(None));
        }
        let (req, n) = ProxyRequest::decode(&out).unwrap().unwrap();
        assert_eq!((req.host, req.port, n), ("example.com", 443, out.len()));
        assert_eq!(ProxyRequest::decode(b"\x00\x01\xbb"), Err(ProxyError::BadHost));
        assert_eq!(ProxyRequest::decode(b"\x01a\x00\x00"), Err(ProxyError::BadPort));
        assert_eq!(ProxyRequest::decode(b"\x40\x01a\x00\x01"), Err(ProxyError::BadVarint));
    }

    #[test]
    fn reply_round_trip() {
        let mut out = Vec::new();
        ProxyReply { status: ProxyStatus::POLICY_REFUSED, reason: "10.0.0.1 is private" }.encode(&mut out);
        let (reply, n) = ProxyReply::decode(&out).unwrap().unwrap();
        assert_eq!(n, out.len());
        assert_eq!(reply.status, ProxyStatus::POLICY_REFUSED);
        assert_eq!(reply.reason, "10.0.0.1 is private");
        assert_eq!(ProxyReply::decode(&out[..3]), Ok(None));
    }
}
