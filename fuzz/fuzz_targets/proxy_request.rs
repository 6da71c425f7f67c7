//! The proxy request and reply parsers that run on QUIC stream bytes.
#![no_main]

use broflake_proto::proxy::{ProxyReply, ProxyRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((req, n))) = ProxyRequest::decode(data) {
        let mut out = Vec::new();
        req.encode(&mut out);
        assert_eq!(&out[..], &data[..n]);
    }
    if let Ok(Some((reply, n))) = ProxyReply::decode(data) {
        let mut out = Vec::new();
        reply.encode(&mut out);
        assert_eq!(&out[..], &data[..n]);
    }
});
