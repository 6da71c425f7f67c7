//! Fleet datagrams and QUIC packet headers from the network (PROTOCOL.md §14.5): parsing never
//! panics, whatever parses re-encodes to the same bytes, and the owner of a packet is read
//! only from short headers long enough to carry a connection id.
#![no_main]

use broflake_proto::fleet::{owner, Datagram, CID_LEN, HEADER};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = Datagram::parse(data) {
        let mut again = Datagram::header(d.kind, d.sender, d.token).to_vec();
        again.extend_from_slice(d.packet);
        assert_eq!(again, data);
        assert!(!d.packet.is_empty());
    } else {
        assert!(data.len() <= HEADER || data[0] != 0xbf || !(1..=2).contains(&data[1]));
    }
    if let Some(id) = owner(data) {
        assert!(data.len() > CID_LEN && data[0] & 0x80 == 0);
        assert_eq!(id.to_be_bytes(), [data[1], data[2]]);
    }
});
