//! HTTP upgrade checks shared by the backends: path and subprotocol (PROTOCOL.md §3).

use broflake_proto::binding::{self, Selected, UpgradeRefusal};

/// Why an upgrade request is refused, with its HTTP status and one-line reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub reason: String,
    /// Metric label.
    pub label: &'static str,
}

/// Checks path and `Sec-WebSocket-Protocol` values; returns the token to echo.
pub fn check<'a>(
    path: &str,
    expected_path: &str,
    protocols: impl IntoIterator<Item = &'a str>,
    min_version: u64,
    max_version: u64,
) -> Result<Selected, Refused> {
    // The query string is ignored; clients may add cache-busters.
    let path_only = path.split('?').next().unwrap_or(path);
    if path_only != expected_path {
        return Err(Refused {
            status: 404,
            reason: format!("no WebSocket endpoint at {path_only}"),
            label: "bad_path",
        });
    }
    binding::select(protocols, min_version, max_version).map_err(|e| Refused {
        status: e.status(),
        reason: e.to_string(),
        label: match e {
            UpgradeRefusal::MissingProtocol => "missing_protocol",
            UpgradeRefusal::NoSupportedProtocol { .. } => "unsupported_protocol",
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_and_protocol() {
        assert_eq!(check("/broflake", "/broflake", ["broflake.v1"], 1, 1), Ok(Selected::Version(1)));
        assert_eq!(check("/broflake?x=1", "/broflake", ["broflake"], 1, 1), Ok(Selected::Generic));
        assert_eq!(check("/other", "/broflake", ["broflake.v1"], 1, 1).unwrap_err().status, 404);
        assert_eq!(check("/broflake", "/broflake", [], 1, 1).unwrap_err().status, 400);
        assert_eq!(check("/broflake", "/broflake", ["chat"], 1, 1).unwrap_err().status, 426);
    }
}
