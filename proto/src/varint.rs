//! QUIC variable-length integers (RFC 9000 §16), with one deviation the spec makes on
//! purpose: only the shortest encoding of a value is accepted. One byte string per value
//! keeps decode/encode a bijection, which the fuzz and property tests rely on.

/// Largest value a varint can hold (2^62 - 1).
pub const MAX: u64 = (1 << 62) - 1;

/// Why a varint could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarintError {
    /// The buffer ends inside the integer.
    Truncated,
    /// The value was encoded in more bytes than it needs.
    NonMinimal,
}

/// Number of bytes `v` takes on the wire. `v` must be at most [`MAX`].
pub const fn len(v: u64) -> usize {
    if v < (1 << 6) {
        1
    } else if v < (1 << 14) {
        2
    } else if v < (1 << 30) {
        4
    } else {
        8
    }
}

/// Reads one varint from the front of `buf`, returning the value and the bytes used.
pub fn read(buf: &[u8]) -> Result<(u64, usize), VarintError> {
    let first = *buf.first().ok_or(VarintError::Truncated)?;
    let n = 1usize << (first >> 6);
    if buf.len() < n {
        return Err(VarintError::Truncated);
    }
    let mut v = u64::from(first & 0x3f);
    for b in &buf[1..n] {
        v = (v << 8) | u64::from(*b);
    }
    if len(v) != n {
        return Err(VarintError::NonMinimal);
    }
    Ok((v, n))
}

/// Appends the shortest encoding of `v` to `out`.
///
/// # Panics
/// If `v` exceeds [`MAX`]; every caller holds values that came from the wire or from
/// bounded configuration, so a larger value is a programming error.
pub fn write(v: u64, out: &mut Vec<u8>) {
    assert!(v <= MAX, "varint out of range: {v}");
    match len(v) {
        1 => out.push(v as u8),
        2 => out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes()),
        4 => out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc9000_examples() {
        // RFC 9000 appendix A.1 sample encodings.
        let cases: [(&[u8], u64); 4] = [
            (&[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c], 151_288_809_941_952_652),
            (&[0x9d, 0x7f, 0x3e, 0x7d], 494_878_333),
            (&[0x7b, 0xbd], 15_293),
            (&[0x25], 37),
        ];
        for (bytes, value) in cases {
            assert_eq!(read(bytes), Ok((value, bytes.len())));
            let mut out = Vec::new();
            write(value, &mut out);
            assert_eq!(out, bytes);
        }
    }

    #[test]
    fn non_minimal_is_rejected() {
        // RFC 9000 says 0x40 0x25 also decodes to 37; this protocol refuses it.
        assert_eq!(read(&[0x40, 0x25]), Err(VarintError::NonMinimal));
        assert_eq!(read(&[0x80, 0, 0x3f, 0xff]), Err(VarintError::NonMinimal));
        assert_eq!(read(&[0xc0, 0, 0, 0, 0x3f, 0xff, 0xff, 0xff]), Err(VarintError::NonMinimal));
    }

    #[test]
    fn boundaries_round_trip() {
        for v in [0, 63, 64, 16_383, 16_384, (1 << 30) - 1, 1 << 30, MAX] {
            let mut out = Vec::new();
            write(v, &mut out);
            assert_eq!(out.len(), len(v));
            assert_eq!(read(&out), Ok((v, out.len())));
            assert_eq!(read(&out[..out.len() - 1]), Err(VarintError::Truncated));
        }
        assert_eq!(read(&[]), Err(VarintError::Truncated));
    }
}
