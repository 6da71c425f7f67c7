//! How a connection ends: the code, the reason, and who decided.

use crate::codes::ErrorCode;
use crate::frame::MAX_REASON_LEN;
use std::borrow::Cow;
use std::fmt;

/// The end of a session. The I/O layer turns it into a WebSocket close frame with
/// [`Close::close_code`] and [`Close::reason`] after flushing whatever the session wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: ErrorCode,
    pub reason: Cow<'static, str>,
    /// Whether the peer ended it (REFUSE or ERROR received) rather than this side.
    pub by_peer: bool,
    /// From a REFUSE: how long the peer asked us to wait before reconnecting.
    pub retry_after_ms: u64,
}

impl Close {
    pub fn local(code: ErrorCode, reason: impl Into<Cow<'static, str>>) -> Self {
        Close { code, reason: truncate(reason.into()), by_peer: false, retry_after_ms: 0 }
    }

    pub fn peer(code: ErrorCode, reason: &str, retry_after_ms: u64) -> Self {
        Close { code, reason: Cow::Owned(reason.to_owned()), by_peer: true, retry_after_ms }
    }

    /// The WebSocket close code.
    pub fn close_code(&self) -> u16 {
        self.code.close_code()
    }
}

impl fmt::Display for Close {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = if self.by_peer { "peer" } else { "local" };
        write!(f, "{} ({}, {who}): {}", self.code.label(), self.close_code(), self.reason)
    }
}

/// Cuts a reason to what fits in a close frame, on a character boundary.
pub(crate) fn truncate(reason: Cow<'static, str>) -> Cow<'static, str> {
    if reason.len() <= MAX_REASON_LEN {
        return reason;
    }
    let mut end = MAX_REASON_LEN;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(reason[..end].to_owned())
}
