//! Frame decoding on arbitrary bytes: never panics, and whatever decodes re-encodes to the
//! same bytes (canonical encoding).
#![no_main]

use broflake_proto::frame::decode_message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First byte picks the frame size limit so the limit checks get exercised too.
    let (limit, msg) = match data.split_first() {
        Some((l, rest)) => (usize::from(*l) * 64, rest),
        None => (0, data),
    };
    if let Ok(frames) = decode_message(msg, limit) {
        let mut out = Vec::with_capacity(msg.len());
        for d in &frames {
            assert!(d.len <= limit);
            d.frame.encode(d.flags, &mut out);
        }
        assert_eq!(out, msg, "decode/encode is not canonical");
    }
});
