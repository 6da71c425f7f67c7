//! WebSocket framing (the io_uring backend's in-place parser) on arbitrary bytes, fed in
//! arbitrary pieces: never panics, never yields a message over the limit, and gives the same
//! events however the bytes are split.
#![no_main]

use broflake_wscodec::{feed, FeedError, WsEvent, WsRx};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 4096;

fn run(data: &[u8], cuts: &[usize]) -> (Vec<String>, Option<u16>) {
    let mut rx = WsRx::default();
    let mut events = Vec::new();
    let mut start = 0;
    for &cut in cuts.iter().chain(std::iter::once(&data.len())) {
        let cut = cut.clamp(start, data.len());
        let mut piece = data[start..cut].to_vec();
        start = cut;
        let r = feed::<()>(&mut rx, &mut piece, MAX, |ev| {
            events.push(match ev {
                WsEvent::Binary(b) => {
                    assert!(b.len() <= MAX, "message over the limit");
                    format!("bin {b:?}")
                }
                WsEvent::Ping(p) => format!("ping {p:?}"),
                WsEvent::Pong => "pong".into(),
                WsEvent::Close(c) => format!("close {c}"),
            });
            Ok(())
        });
        match r {
            Ok(()) => {}
            Err(FeedError::Ws(f)) => return (events, Some(f.code)),
            Err(FeedError::Caller(())) => unreachable!(),
        }
    }
    (events, None)
}

fuzz_target!(|input: &[u8]| {
    // The first byte chooses where to split the rest.
    let (split, data) = match input.split_first() {
        Some((s, rest)) => (usize::from(*s), rest),
        None => return,
    };
    let whole = run(data, &[]);
    let cuts: Vec<usize> = (1..=3).map(|k| (split * k * 7) % (data.len() + 1)).collect();
    let mut sorted = cuts.clone();
    sorted.sort_unstable();
    let pieces = run(data, &sorted);
    assert_eq!(whole, pieces, "events depend on how the bytes were split");
});
