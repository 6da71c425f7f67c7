//! Reserved "grease" values (PROTOCOL.md §13, in the spirit of RFC 8701): senders emit
//! them now and then so that a receiver intolerant of extensions fails in testing.

use crate::frame::{Frame, FLAG_IGNORABLE};

/// The N-th grease value for frame and extension types: `0x1f * N + 0x21`.
pub const fn value(n: u64) -> u64 {
    0x1f * n + 0x21
}

/// Whether `v` is a grease frame or extension type.
pub const fn is_grease(v: u64) -> bool {
    v >= 0x21 && (v - 0x21).is_multiple_of(0x1f)
}

/// A small deterministic generator (xorshift64*). Sessions take their randomness from the
/// caller as a seed so that tests replay exactly; jitter and grease need no crypto strength.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[0, bound)`; `bound` must be non-zero.
    pub fn below(&mut self, bound: u64) -> u64 {
        // Modulo bias is irrelevant for jitter and grease selection.
        self.next_u64() % bound
    }
}

/// A grease frame type chosen by `rng` (small N keeps it a 1- or 2-byte varint).
pub fn frame_type(rng: &mut Rng) -> u64 {
    value(rng.below(64))
}

/// A random grease capability bit.
pub fn capability_bit(rng: &mut Rng) -> u64 {
    1 << (48 + rng.below(14))
}

/// Appends a grease frame (ignorable flag set, 0–16 payload bytes) to `out`.
pub fn encode_frame(rng: &mut Rng, out: &mut Vec<u8>) {
    let mut payload = [0u8; 16];
    let len = rng.below(17) as usize;
    for b in &mut payload[..len] {
        *b = rng.next_u64() as u8;
    }
    Frame::Unknown { frame_type: frame_type(rng), payload: &payload[..len] }.encode(FLAG_IGNORABLE, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{decode, types};

    #[test]
    fn grease_values_are_never_assigned_types() {
        assert_eq!(value(0), 0x21);
        assert_eq!(value(1), 0x40);
        for t in types::PADDING..=types::ROUTE_CLOSE {
            assert!(!is_grease(t));
        }
        assert!(is_grease(0x5f) && !is_grease(0x22));
    }

    #[test]
    fn grease_frames_decode_as_ignorable_unknowns() {
        let mut rng = Rng::new(7);
        for _ in 0..200 {
            let mut out = Vec::new();
            encode_frame(&mut rng, &mut out);
            let d = decode(&out, 4096).unwrap();
            assert!(matches!(d.frame, Frame::Unknown { frame_type, .. } if is_grease(frame_type)));
            assert_eq!(d.len, out.len());
        }
    }
}
