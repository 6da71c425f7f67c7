//! Version negotiation (PROTOCOL.md §7).

use crate::close::Close;
use crate::codes::ErrorCode;
use crate::frame::Hello;

/// The versions this implementation speaks.
pub const MIN_VERSION: u64 = 1;
pub const MAX_VERSION: u64 = 1;

/// The highest version in both ranges, or the UNSUPPORTED_VERSION refusal with the
/// reason format the spec fixes: `unsupported version: client A-B, server C-D`.
pub fn negotiate(server_min: u64, server_max: u64, client_min: u64, client_max: u64) -> Result<u64, Close> {
    let low = server_min.max(client_min);
    let high = server_max.min(client_max);
    if low <= high {
        Ok(high)
    } else {
        Err(Close::local(
            ErrorCode::UNSUPPORTED_VERSION,
            format!("unsupported version: client {client_min}-{client_max}, server {server_min}-{server_max}"),
        ))
    }
}

/// [`negotiate`] for a decoded HELLO.
pub fn negotiate_hello(server_min: u64, server_max: u64, hello: &Hello<'_>) -> Result<u64, Close> {
    negotiate(server_min, server_max, hello.min_version, hello.max_version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_highest_common() {
        assert_eq!(negotiate(1, 3, 2, 5), Ok(3));
        assert_eq!(negotiate(1, 1, 1, 1), Ok(1));
        let err = negotiate(1, 1, 2, 3).unwrap_err();
        assert_eq!(err.code, ErrorCode::UNSUPPORTED_VERSION);
        assert_eq!(err.reason, "unsupported version: client 2-3, server 1-1");
    }
}
