//! The one STUN exchange the hop needs outside ICE itself: a Binding request to a STUN server
//! and its response's XOR-MAPPED-ADDRESS, our address as the server sees it (the
//! server-reflexive candidate). RFC 8489 §5–§6 and §14.2; no authentication.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const MAGIC_COOKIE: u32 = 0x2112_A442;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;
const MAPPED_ADDRESS: u16 = 0x0001;

/// A Binding request with transaction id `tid`.
pub fn binding_request(tid: [u8; 12]) -> [u8; 20] {
    let mut m = [0u8; 20];
    m[0..2].copy_from_slice(&BINDING_REQUEST.to_be_bytes());
    // Length 0: no attributes.
    m[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    m[8..20].copy_from_slice(&tid);
    m
}

/// Whether `buf` looks like a STUN message (RFC 8489 §6: top two bits zero, magic cookie).
pub fn is_stun(buf: &[u8]) -> bool {
    buf.len() >= 20 && buf[0] & 0xc0 == 0 && buf[4..8] == MAGIC_COOKIE.to_be_bytes()
}

/// Why a response is not the one expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    #[error("not a STUN message")]
    NotStun,
    #[error("not a Binding success response (type {0:#06x})")]
    NotBindingSuccess(u16),
    #[error("transaction id does not match")]
    OtherTransaction,
    #[error("truncated or malformed attribute")]
    Malformed,
    #[error("no (XOR-)MAPPED-ADDRESS attribute")]
    NoAddress,
}

/// The mapped address of a Binding success response to transaction `tid`.
pub fn parse_binding_response(buf: &[u8], tid: &[u8; 12]) -> Result<SocketAddr, StunError> {
    if !is_stun(buf) {
        return Err(StunError::NotStun);
    }
    let ty = u16::from_be_bytes([buf[0], buf[1]]);
    if ty != BINDING_SUCCESS {
        return Err(StunError::NotBindingSuccess(ty));
    }
    if &buf[8..20] != tid {
        return Err(StunError::OtherTransaction);
    }
    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    let body = buf.get(20..20 + len).ok_or(StunError::Malformed)?;
    let mut plain = None;
    let mut i = 0;
    while i + 4 <= body.len() {
        let at = u16::from_be_bytes([body[i], body[i + 1]]);
        let alen = usize::from(u16::from_be_bytes([body[i + 2], body[i + 3]]));
        let value = body.get(i + 4..i + 4 + alen).ok_or(StunError::Malformed)?;
        match at {
            XOR_MAPPED_ADDRESS => return address(value, Some(tid)),
            MAPPED_ADDRESS => plain = Some(address(value, None)?),
            _ => {}
        }
        // Attributes are padded to 4 bytes.
        i += 4 + alen.div_ceil(4) * 4;
    }
    plain.ok_or(StunError::NoAddress)
}

/// An (XOR-)MAPPED-ADDRESS value; `xor` carries the transaction id for XOR-MAPPED-ADDRESS.
fn address(v: &[u8], xor: Option<&[u8; 12]>) -> Result<SocketAddr, StunError> {
    if v.len() < 4 {
        return Err(StunError::Malformed);
    }
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let mut port = u16::from_be_bytes([v[2], v[3]]);
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    match v[1] {
        0x01 => {
            let mut a: [u8; 4] = v.get(4..8).ok_or(StunError::Malformed)?.try_into().expect("4 bytes");
            if xor.is_some() {
                for (b, c) in a.iter_mut().zip(cookie) {
                    *b ^= c;
                }
            }
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port))
        }
        0x02 => {
            let mut a: [u8; 16] = v.get(4..20).ok_or(StunError::Malformed)?.try_into().expect("16 bytes");
            if let Some(tid) = xor {
                let key: Vec<u8> = cookie.iter().chain(tid.iter()).copied().collect();
                for (b, k) in a.iter_mut().zip(key) {
                    *b ^= k;
                }
            }
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port))
        }
        _ => Err(StunError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc5769_ipv4_response_vector() {
        // RFC 5769 §2.2 (IPv4 response), without the integrity check this code does not do.
        let tid = [0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae];
        let msg = hex::decode(concat!(
            "0101003c2112a442b7e7a701bc34d686fa87dfae",
            "8022000b7465737420766563746f7220",
            "002000080001a147e112a643",
            "000800149ec4cfa27e2c3bdb5d2c71aeeac2fc1e3ebfbc41",
            "80280004c07d4c96"
        ))
        .unwrap();
        assert_eq!(parse_binding_response(&msg, &tid).unwrap(), "192.0.2.1:32853".parse().unwrap());
        assert_eq!(parse_binding_response(&msg, &[0; 12]), Err(StunError::OtherTransaction));
        assert_eq!(parse_binding_response(&msg[..30], &tid), Err(StunError::Malformed));
        assert_eq!(parse_binding_response(b"GET / HTTP/1.1\r\n\r\n....", &tid), Err(StunError::NotStun));
    }

    #[test]
    fn requests_are_stun() {
        let r = binding_request([9; 12]);
        assert!(is_stun(&r));
        assert_eq!(&r[8..], &[9; 12]);
    }
}
