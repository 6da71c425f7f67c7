//! How large a QUIC packet a hop carries (PROTOCOL.md §14.4).
//!
//! Every hop carries a [`BASE_PACKET_SIZE`]-byte packet. Beyond that, a WebSocket hop carries
//! whatever fits its frame size limit, a WebRTC data channel carries exactly the base size
//! (one packet per SCTP chunk, §17.5). A node never sends a DATA frame above the next hop's
//! limit: it drops the packet, and the QUIC endpoints' path MTU discovery, which sees the drop as
//! a lost probe, settles on the largest size the whole route carries.

use crate::frame::types;
use crate::varint;

/// The QUIC UDP payload size every hop carries: the tunnelled QUIC's initial and minimum
/// datagram size, and the largest packet on a WebRTC data channel.
pub const BASE_PACKET_SIZE: usize = 1350;

/// The largest DATA frame on a WebRTC data channel: a base-size packet with the longest label.
pub const DATA_CHANNEL_MAX_FRAME: usize = 1362;

/// Encoded size of a DATA frame carrying `packet_len` bytes on `label`.
pub fn data_frame_size(label: u64, packet_len: usize) -> usize {
    let payload = varint::len(label) + packet_len;
    varint::len(types::DATA) + 1 + varint::len(payload as u64) + payload
}

/// The largest packet a DATA frame on any label can carry within `max_frame_size`; what a
/// QUIC endpoint behind a hop with that limit may probe up to.
pub fn max_packet(max_frame_size: usize) -> usize {
    const LONGEST_LABEL: usize = 8;
    // Type (1) and flags (1), then the Length varint, whose own size depends on the payload.
    [1usize, 2, 4, 8]
        .into_iter()
        .filter_map(|len_size| {
            let payload = max_frame_size.checked_sub(2 + len_size)?;
            (varint::len(payload as u64) == len_size).then_some(payload)
        })
        .max()
        .map_or(0, |payload| payload.saturating_sub(LONGEST_LABEL))
}

/// Why a DATA frame was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DataRefused {
    #[error("the session is not open")]
    NotOpen,
    #[error("route {0} is not open")]
    NoRoute(u64),
    /// The packet does not fit this hop (the sender drops it; PROTOCOL.md §14.4).
    #[error("a DATA frame of {size} bytes exceeds the hop's frame size limit of {max}")]
    TooLarge { size: usize, max: usize },
}

impl DataRefused {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            DataRefused::NotOpen => "not_open",
            DataRefused::NoRoute(_) => "no_route",
            DataRefused::TooLarge { .. } => "too_large",
        }
    }
}

/// Checks that DATA(`label`, `packet_len` bytes) fits a hop whose frame limit is `max`.
pub fn check_fits(label: u64, packet_len: usize, max: usize) -> Result<(), DataRefused> {
    let size = data_frame_size(label, packet_len);
    if size > max {
        return Err(DataRefused::TooLarge { size, max });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_data, DEFAULT_MAX_FRAME_SIZE, MIN_MAX_FRAME_SIZE};

    #[test]
    fn frame_size_matches_the_encoder() {
        for label in [0, 63, 64, 16_383, 16_384, (1 << 30) - 1, 1 << 30, (1 << 62) - 1] {
            for len in [1, 1350, 16_000, 20_000] {
                let mut out = Vec::new();
                encode_data(label, &vec![0u8; len], &mut out);
                assert_eq!(data_frame_size(label, len), out.len(), "label {label} len {len}");
            }
        }
    }

    #[test]
    fn the_largest_packet_fills_the_limit_exactly_with_the_longest_label() {
        for max in [MIN_MAX_FRAME_SIZE as usize, 4096, DEFAULT_MAX_FRAME_SIZE, 16_385, 16_392, 65_536, 1 << 20] {
            let p = max_packet(max);
            let longest = (1u64 << 62) - 1;
            assert!(data_frame_size(longest, p) <= max, "limit {max}: {p} does not fit");
            assert!(
                data_frame_size(longest, p + 1) > max || data_frame_size(longest, p + 2) > max,
                "limit {max}: {p} is not the largest"
            );
            assert!(check_fits(0, p, max).is_ok());
        }
        assert_eq!(max_packet(DEFAULT_MAX_FRAME_SIZE), 16_372);
        assert_eq!(max_packet(MIN_MAX_FRAME_SIZE as usize), 1488);
    }

    #[test]
    fn a_base_packet_fits_every_hop() {
        assert!(max_packet(MIN_MAX_FRAME_SIZE as usize) >= BASE_PACKET_SIZE);
        assert_eq!(data_frame_size((1 << 62) - 1, BASE_PACKET_SIZE), DATA_CHANNEL_MAX_FRAME);
    }

    #[test]
    fn a_header_then_the_packet_is_the_frame() {
        for (label, len) in [(0u64, 1usize), (63, 1350), (1 << 30, 16_372)] {
            let packet = vec![7u8; len];
            let mut whole = Vec::new();
            encode_data(label, &packet, &mut whole);
            let mut parts = Vec::new();
            crate::frame::encode_data_header(label, len, &mut parts);
            parts.extend_from_slice(&packet);
            assert_eq!(parts, whole);
        }
    }

    #[test]
    fn too_large_names_both_sizes() {
        let e = check_fits(0, 1500, 1500).unwrap_err();
        assert_eq!(e, DataRefused::TooLarge { size: 1505, max: 1500 });
        assert_eq!(e.to_string(), "a DATA frame of 1505 bytes exceeds the hop's frame size limit of 1500");
    }
}
