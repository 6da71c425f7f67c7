//! The server session fed arbitrary messages, with and without a valid HELLO first: it never
//! panics, everything it writes decodes, and after an error it is closed.
#![no_main]

use broflake_proto::frame::decode_message;
use broflake_proto::{ClientConfig, ClientSession, ServerConfig, ServerEvent, ServerSession, SessionId, Timestamp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cfg = ServerConfig { max_routes: 4, ping_burst: 3, ..ServerConfig::default() };
    let mut session = ServerSession::new(Timestamp(0));
    let mut messages: Vec<Vec<u8>> = Vec::new();
    let (mode, rest) = data.split_first().map_or((0, data), |(m, r)| (*m, r));
    if mode & 1 == 1 {
        let mut hello = Vec::new();
        ClientSession::new(u64::from(mode)).start(&ClientConfig::default(), Timestamp(0), &mut hello);
        messages.push(hello);
    }
    // 0xfe separates messages so one input can carry a conversation.
    messages.extend(rest.split(|b| *b == 0xfe).map(<[u8]>::to_vec));
    for (i, msg) in messages.iter().enumerate() {
        let now = Timestamp(i as u64 * u64::from(mode >> 1) * 100);
        let mut tx = Vec::new();
        let r = session.handle_message(&cfg, now, msg, &mut tx, |s, ev, tx| {
            if let ServerEvent::Hello { .. } = ev {
                if mode & 2 == 0 {
                    s.accept(&cfg, now, SessionId::NONE, tx)?;
                } else {
                    return Err(s.refuse(broflake_proto::ErrorCode::SERVER_FULL, 1000, "full", tx));
                }
            }
            Ok(())
        });
        let _ = session.on_timeout(&cfg, now, &mut tx);
        assert!(decode_message(&tx, usize::MAX).is_ok(), "server wrote an undecodable message");
        if r.is_err() {
            assert!(session.is_closed());
            break;
        }
    }
});
