//! The wire parts of an egress fleet (PROTOCOL.md §14.5): the connection-id layout that names
//! the host holding a QUIC connection, and the datagrams hosts forward packets in. No I/O.

/// Length of the connection ids a fleet host issues: its id (big-endian u16), then 6 random
/// bytes.
pub const CID_LEN: usize = 8;
/// Bytes before the QUIC packet in a fleet datagram.
pub const HEADER: usize = 12;
const MAGIC: u8 = 0xbf;

/// The fleet id in a short-header packet's destination connection id; `None` for long-header
/// packets (a handshake belongs to the host that receives it) and runts.
pub fn owner(packet: &[u8]) -> Option<u16> {
    let first = *packet.first()?;
    if first & 0x80 != 0 {
        return None;
    }
    let cid = packet.get(1..1 + CID_LEN)?;
    Some(u16::from_be_bytes([cid[0], cid[1]]))
}

/// Which way a fleet datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// From the host a packet arrived at to the host that holds its connection.
    ToOwner = 1,
    /// From the owner back to the forwarding host, for the route the token names.
    Back = 2,
}

/// A parsed fleet datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram<'a> {
    pub kind: Kind,
    /// The sending host's fleet id.
    pub sender: u16,
    /// The forwarding host's id for the route the packet came on (opaque to the owner).
    pub token: u64,
    pub packet: &'a [u8],
}

/// Why a datagram is not a fleet datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    #[error("datagram shorter than a header and one byte")]
    Short,
    #[error("not a fleet datagram (bad magic)")]
    Magic,
    #[error("unknown datagram kind {0}")]
    Kind(u8),
}

impl<'a> Datagram<'a> {
    pub fn parse(d: &'a [u8]) -> Result<Datagram<'a>, DatagramError> {
        if d.len() <= HEADER {
            return Err(DatagramError::Short);
        }
        if d[0] != MAGIC {
            return Err(DatagramError::Magic);
        }
        let kind = match d[1] {
            1 => Kind::ToOwner,
            2 => Kind::Back,
            k => return Err(DatagramError::Kind(k)),
        };
        Ok(Datagram {
            kind,
            sender: u16::from_be_bytes([d[2], d[3]]),
            token: u64::from_be_bytes(d[4..12].try_into().expect("8 bytes")),
            packet: &d[HEADER..],
        })
    }

    /// The header for `packet` (send the two together).
    pub fn header(kind: Kind, sender: u16, token: u64) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[0] = MAGIC;
        h[1] = kind as u8;
        h[2..4].copy_from_slice(&sender.to_be_bytes());
        h[4..12].copy_from_slice(&token.to_be_bytes());
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_round_trip_and_garbage_is_refused() {
        let mut d = Datagram::header(Kind::Back, 0x0102, 0x0304_0506_0708_090a).to_vec();
        d.extend_from_slice(b"quic");
        let p = Datagram::parse(&d).unwrap();
        assert_eq!((p.kind, p.sender, p.token, p.packet), (Kind::Back, 0x0102, 0x0304_0506_0708_090a, &b"quic"[..]));
        assert_eq!(Datagram::parse(&d[..HEADER]), Err(DatagramError::Short));
        d[1] = 9;
        assert_eq!(Datagram::parse(&d), Err(DatagramError::Kind(9)));
        d[0] = 0;
        assert_eq!(Datagram::parse(&d), Err(DatagramError::Magic));
    }

    #[test]
    fn short_headers_name_their_host_long_headers_do_not() {
        let mut short = vec![0x40, 0x02, 0x03];
        short.extend_from_slice(&[9; 26]);
        assert_eq!(owner(&short), Some(0x0203));
        short[0] = 0xc0;
        assert_eq!(owner(&short), None);
        assert_eq!(owner(&[0x40, 1, 2, 3]), None);
        assert_eq!(owner(&[]), None);
    }
}
