//! The WebSocket binding (PROTOCOL.md §3): subprotocol tokens and how a server picks one.

/// Default request path of the egress's WebSocket endpoint.
pub const DEFAULT_PATH: &str = "/broflake";
/// The versionless token: "complete the upgrade and negotiate in HELLO".
pub const GENERIC_TOKEN: &str = "broflake";
/// Prefix of the per-version tokens (`broflake.v1`, …).
pub const VERSION_TOKEN_PREFIX: &str = "broflake.v";

/// What a server chose from the client's `Sec-WebSocket-Protocol` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selected {
    /// A `broflake.vN` token the server supports.
    Version(u64),
    /// The generic `broflake` token: version negotiation (and any refusal) happens in HELLO.
    Generic,
}

impl Selected {
    /// The token to echo in the `Sec-WebSocket-Protocol` response header.
    pub fn token(self) -> String {
        match self {
            Selected::Version(v) => format!("{VERSION_TOKEN_PREFIX}{v}"),
            Selected::Generic => GENERIC_TOKEN.to_string(),
        }
    }
}

/// Why an upgrade is refused at the HTTP level (only non-browser clients can read these).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeRefusal {
    #[error("missing Sec-WebSocket-Protocol (expected {VERSION_TOKEN_PREFIX}1 or {GENERIC_TOKEN})")]
    MissingProtocol,
    #[error("no supported subprotocol offered (server speaks {VERSION_TOKEN_PREFIX}{min} to {VERSION_TOKEN_PREFIX}{max}; offer {GENERIC_TOKEN} to negotiate in-band)")]
    NoSupportedProtocol { min: u64, max: u64 },
}

impl UpgradeRefusal {
    /// HTTP status of the refusal.
    pub fn status(&self) -> u16 {
        match self {
            UpgradeRefusal::MissingProtocol => 400,
            UpgradeRefusal::NoSupportedProtocol { .. } => 426,
        }
    }
}

/// Parses `broflake.vN` (N a decimal without leading zeros, ≥ 1).
pub fn parse_version_token(token: &str) -> Option<u64> {
    let digits = token.strip_prefix(VERSION_TOKEN_PREFIX)?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|v| *v >= 1)
}

/// The server's selection algorithm over the comma-separated header value(s).
pub fn select<'a>(
    header_values: impl IntoIterator<Item = &'a str>,
    min_version: u64,
    max_version: u64,
) -> Result<Selected, UpgradeRefusal> {
    let mut any = false;
    let mut generic = false;
    let mut best: Option<u64> = None;
    for token in header_values.into_iter().flat_map(|v| v.split(',')).map(str::trim) {
        if token.is_empty() {
            continue;
        }
        any = true;
        if token == GENERIC_TOKEN {
            generic = true;
        } else if let Some(v) = parse_version_token(token) {
            if (min_version..=max_version).contains(&v) && best.is_none_or(|b| v > b) {
                best = Some(v);
            }
        }
    }
    match (best, generic, any) {
        (Some(v), _, _) => Ok(Selected::Version(v)),
        (None, true, _) => Ok(Selected::Generic),
        (None, false, false) => Err(UpgradeRefusal::MissingProtocol),
        (None, false, true) => Err(UpgradeRefusal::NoSupportedProtocol { min: min_version, max: max_version }),
    }
}

/// The list a client offers: its versions, highest first, then the generic token.
pub fn offer(min_version: u64, max_version: u64) -> Vec<String> {
    let mut tokens: Vec<String> =
        (min_version..=max_version).rev().map(|v| format!("{VERSION_TOKEN_PREFIX}{v}")).collect();
    tokens.push(GENERIC_TOKEN.to_string());
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection() {
        assert_eq!(select(["broflake.v1, broflake"], 1, 1), Ok(Selected::Version(1)));
        assert_eq!(select(["broflake.v2", "broflake.v1"], 1, 2), Ok(Selected::Version(2)));
        assert_eq!(select(["broflake.v9, broflake"], 1, 1), Ok(Selected::Generic));
        assert_eq!(select(["broflake.x-1f2e, broflake.v1"], 1, 1), Ok(Selected::Version(1)));
        assert_eq!(select(Vec::<&str>::new(), 1, 1), Err(UpgradeRefusal::MissingProtocol));
        assert_eq!(select(["broflake.v9"], 1, 1), Err(UpgradeRefusal::NoSupportedProtocol { min: 1, max: 1 }));
        assert_eq!(select(["broflake.v01"], 1, 1).unwrap_err().status(), 426);
        assert_eq!(offer(1, 2), vec!["broflake.v2", "broflake.v1", "broflake"]);
        assert_eq!(Selected::Version(1).token(), "broflake.v1");
    }
}
