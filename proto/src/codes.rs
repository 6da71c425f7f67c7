//! The error/refusal code registry (PROTOCOL.md §8): one code space shared by REFUSE,
//! ERROR and ROUTE_CLOSE, mapped onto WebSocket close codes.

use std::fmt;

/// A protocol error or refusal code. Unknown values are kept as they are so they can be
/// reported numerically; for behaviour they count as [`ErrorCode::INTERNAL`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ErrorCode(pub u64);

macro_rules! codes {
    ($($name:ident = $value:expr, $text:expr;)*) => {
        impl ErrorCode {
            $(#[doc = $text] pub const $name: ErrorCode = ErrorCode($value);)*

            /// The registry name, or `None` for an unregistered code.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($value => Some(stringify!($name)),)*
                    _ => None,
                }
            }

            /// Every registered code, in registry order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),*];
        }
    };
}

codes! {
    NO_ERROR = 0x00, "Normal closure (ROUTE_CLOSE of a finished route, orderly close).";
    UNSUPPORTED_VERSION = 0x01, "No common protocol version.";
    FRAME_ENCODING = 0x02, "A frame could not be decoded.";
    PROTOCOL_VIOLATION = 0x03, "A frame arrived that is not allowed in the current state.";
    UNKNOWN_FRAME = 0x04, "An unknown frame type without the ignorable bit.";
    FRAME_TOO_LARGE = 0x05, "A frame larger than the receiver's limit.";
    HANDSHAKE_TIMEOUT = 0x06, "The handshake did not complete in time.";
    IDLE_TIMEOUT = 0x07, "Nothing was received for the idle timeout.";
    SERVER_FULL = 0x08, "The server holds as many connections as it may.";
    PER_IP_LIMIT = 0x09, "Too many connections from this source address.";
    DRAINING = 0x0a, "The server is draining.";
    BAD_ROLE = 0x0b, "The role is unknown or not allowed here.";
    RATE_LIMITED = 0x0c, "The peer sent control frames faster than allowed.";
    ROUTE_LIMIT = 0x0d, "The connection already carries max_routes routes.";
    INTERNAL = 0x0e, "An internal error.";
    ROUTE_UNKNOWN = 0x0f, "The route label is not open on this side.";
}

/// The highest code the registry may ever assign (maps to close code 4999).
pub const MAX_CODE: u64 = 999;

impl ErrorCode {
    /// The WebSocket close code a connection ends with when it ends for this reason:
    /// `0 → 1000`, `n → 4000 + n` for registered and reserved codes up to 999, and the
    /// INTERNAL close code for anything larger (which no conforming peer sends).
    pub fn close_code(self) -> u16 {
        match self.0 {
            0 => 1000,
            n @ 1..=MAX_CODE => 4000 + n as u16,
            _ => 4000 + Self::INTERNAL.0 as u16,
        }
    }

    /// The inverse of [`ErrorCode::close_code`] for the application range 4000–4999.
    pub fn from_close_code(close: u16) -> Option<ErrorCode> {
        match close {
            1000 => Some(Self::NO_ERROR),
            4000..=4999 => Some(ErrorCode(u64::from(close - 4000))),
            _ => None,
        }
    }

    /// Lower-case, metric-friendly label (bounded cardinality: unknown codes share one).
    pub fn label(self) -> &'static str {
        match self {
            Self::NO_ERROR => "no_error",
            Self::UNSUPPORTED_VERSION => "unsupported_version",
            Self::FRAME_ENCODING => "frame_encoding",
            Self::PROTOCOL_VIOLATION => "protocol_violation",
            Self::UNKNOWN_FRAME => "unknown_frame",
            Self::FRAME_TOO_LARGE => "frame_too_large",
            Self::HANDSHAKE_TIMEOUT => "handshake_timeout",
            Self::IDLE_TIMEOUT => "idle_timeout",
            Self::SERVER_FULL => "server_full",
            Self::PER_IP_LIMIT => "per_ip_limit",
            Self::DRAINING => "draining",
            Self::BAD_ROLE => "bad_role",
            Self::RATE_LIMITED => "rate_limited",
            Self::ROUTE_LIMIT => "route_limit",
            Self::INTERNAL => "internal",
            Self::ROUTE_UNKNOWN => "route_unknown",
            _ => "unregistered",
        }
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}"),
            None => write!(f, "ErrorCode({:#x})", self.0),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_round_trip() {
        for &code in ErrorCode::ALL {
            let close = code.close_code();
            assert!(close == 1000 || (4000..5000).contains(&close));
            assert_eq!(ErrorCode::from_close_code(close), Some(code));
        }
        assert_eq!(ErrorCode::UNSUPPORTED_VERSION.close_code(), 4001);
        assert_eq!(ErrorCode::IDLE_TIMEOUT.close_code(), 4007);
        assert_eq!(ErrorCode(1 << 40).close_code(), 4014);
        assert_eq!(ErrorCode::from_close_code(1006), None);
    }
}
