//! The HTTP upgrade parser on arbitrary request bytes: never panics; an accepted request
//! used no more bytes than it was given and selected a token the server supports; every
//! refusal is a complete HTTP response.
#![no_main]

use broflake_wscodec::{upgrade, Upgrade};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match upgrade(data, "/broflake", 1, 1) {
        Upgrade::Partial => assert!(data.len() < broflake_wscodec::MAX_REQUEST_HEAD),
        Upgrade::Accept { response, used, selected } => {
            assert!(used <= data.len());
            let token = selected.token();
            assert!(token == "broflake.v1" || token == "broflake");
            assert!(response.starts_with(b"HTTP/1.1 101 "));
        }
        Upgrade::Refuse { response, .. } => {
            assert!(response.starts_with(b"HTTP/1.1 4"));
            assert!(response.windows(4).any(|w| w == b"\r\n\r\n"));
        }
    }
});
