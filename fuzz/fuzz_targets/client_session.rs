//! The client session (relays, consumers) fed arbitrary server messages after its HELLO.
#![no_main]

use broflake_proto::frame::decode_message;
use broflake_proto::{ClientConfig, ClientSession, Timestamp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cfg = ClientConfig::default();
    let mut session = ClientSession::new(1);
    let mut tx = Vec::new();
    session.start(&cfg, Timestamp(0), &mut tx);
    for (i, msg) in data.split(|b| *b == 0xfe).enumerate() {
        let now = Timestamp(i as u64 * 7_000);
        let mut tx = Vec::new();
        let r = session.handle_message(&cfg, now, msg, &mut tx, |s, _, _| {
            let _ = s.open_route();
            Ok(())
        });
        let _ = session.handle_timeout(&cfg, now, &mut tx);
        assert!(decode_message(&tx, usize::MAX).is_ok());
        if r.is_err() {
            assert!(session.is_closed());
            break;
        }
    }
});
