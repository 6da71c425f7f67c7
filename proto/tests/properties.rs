//! Property tests: decoding never panics and encoding is a bijection onto canonical bytes.

use broflake_proto::frame::{decode, decode_message, encode_extensions, Extensions, Hello, Welcome};
use broflake_proto::proxy::{ProxyReply, ProxyRequest, ProxyStatus};
use broflake_proto::{
    varint, Capabilities, ClientConfig, ClientSession, ErrorCode, Frame, Role, ServerConfig, ServerEvent,
    ServerSession, SessionId, Timestamp,
};
use proptest::prelude::*;

/// An owned frame description the strategy can generate; turned into a `Frame` to encode.
#[derive(Debug, Clone)]
enum Owned {
    Padding(Vec<u8>),
    Hello { min: u64, max: u64, role: u8, caps: u64, prev: [u8; 16], exts: Vec<(u64, Vec<u8>)> },
    Welcome { v: u64, id: [u8; 16], caps: u64, keep: u64, idle_extra: u64, mfs: u64, routes: u64 },
    Refuse(u64, u64, String),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    GoAway(u64, String),
    Error(u64, String),
    Data(u64, Vec<u8>),
    RouteClose(u64, u64),
    Unknown(u64, Vec<u8>),
}

fn var() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..64, 64u64..16_384, 16_384u64..(1 << 30), (1u64 << 30)..=varint::MAX]
}

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..max).prop_map(move |cs| {
        let mut s = String::new();
        for c in cs {
            if s.len() + c.len_utf8() > max {
                break;
            }
            s.push(c);
        }
        s
    })
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..=max)
}

fn owned() -> impl Strategy<Value = Owned> {
    prop_oneof![
        bytes(40).prop_map(Owned::Padding),
        (
            1u64..5,
            0u64..5,
            any::<u8>(),
            var(),
            any::<[u8; 16]>(),
            proptest::collection::btree_map(2u64..1000, bytes(10), 0..4)
        )
            .prop_map(|(min, d, role, caps, prev, m)| Owned::Hello {
                min,
                max: min + d,
                role,
                caps,
                prev,
                exts: m.into_iter().collect()
            }),
        (1u64..1000, any::<[u8; 16]>(), var(), 1000u64..(1 << 30), var(), 1500u64..(1 << 30), var()).prop_map(
            |(v, id, caps, keep, idle_extra, mfs, routes)| Owned::Welcome {
                v,
                id,
                caps,
                keep,
                idle_extra: idle_extra % (1 << 30),
                mfs,
                routes
            }
        ),
        (var(), var(), text(123)).prop_map(|(c, r, s)| Owned::Refuse(c, r, s)),
        bytes(64).prop_map(Owned::Ping),
        bytes(64).prop_map(Owned::Pong),
        (var(), text(256)).prop_map(|(g, s)| Owned::GoAway(g, s)),
        (var(), text(123)).prop_map(|(c, s)| Owned::Error(c, s)),
        (var(), proptest::collection::vec(any::<u8>(), 1..200)).prop_map(|(l, p)| Owned::Data(l, p)),
        (var(), var()).prop_map(|(l, c)| Owned::RouteClose(l, c)),
        ((0x0au64..varint::MAX), bytes(30)).prop_map(|(t, p)| Owned::Unknown(t, p)),
    ]
}

fn encode(o: &Owned, out: &mut Vec<u8>) {
    let ext_raw;
    let frame = match o {
        Owned::Padding(p) => Frame::Padding { payload: p },
        Owned::Hello { min, max, role, caps, prev, exts } => {
            let items: Vec<(u64, &[u8])> = exts.iter().map(|(t, v)| (*t, v.as_slice())).collect();
            ext_raw = encode_extensions(&items);
            Frame::Hello(Hello {
                min_version: *min,
                max_version: *max,
                role: Role(*role),
                capabilities: Capabilities(*caps),
                previous_session: SessionId(*prev),
                extensions: Extensions::parse(&ext_raw, "hello").unwrap(),
            })
        }
        Owned::Welcome { v, id, caps, keep, idle_extra, mfs, routes } => Frame::Welcome(Welcome {
            version: *v,
            session_id: SessionId(*id),
            capabilities: Capabilities(*caps),
            keepalive_ms: *keep,
            idle_timeout_ms: keep * 2 + idle_extra,
            max_frame_size: *mfs,
            max_routes: *routes,
            extensions: Extensions::EMPTY,
        }),
        Owned::Refuse(c, r, s) => Frame::Refuse { code: ErrorCode(*c), retry_after_ms: *r, reason: s },
        Owned::Ping(p) => Frame::Ping { payload: p },
        Owned::Pong(p) => Frame::Pong { payload: p },
        Owned::GoAway(g, s) => Frame::GoAway { grace_ms: *g, reconnect: s },
        Owned::Error(c, s) => Frame::Error { code: ErrorCode(*c), reason: s },
        Owned::Data(l, p) => Frame::Data { label: *l, packet: p },
        Owned::RouteClose(l, c) => Frame::RouteClose { label: *l, code: ErrorCode(*c) },
        Owned::Unknown(t, p) => {
            let t = if *t <= 0x09 { 0x0a } else { *t };
            Frame::Unknown { frame_type: t, payload: p }
        }
    };
    let flags = if matches!(frame, Frame::Unknown { .. }) { 0x80 } else { 0 };
    let start = out.len();
    frame.encode(flags, out);
    assert_eq!(out.len() - start, frame.encoded_len());
    // Decoding what was just encoded yields the same frame.
    let d = decode(&out[start..], usize::MAX).unwrap();
    assert_eq!(d.frame, frame);
    assert_eq!(d.flags, flags);
    assert_eq!(d.len, out.len() - start);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn decode_never_panics(buf in bytes(300), max in 0usize..400) {
        let _ = decode_message(&buf, max);
    }

    #[test]
    fn encode_decode_round_trips(frames in proptest::collection::vec(owned(), 1..6)) {
        let mut msg = Vec::new();
        for f in &frames {
            encode(f, &mut msg);
        }
        let decoded = decode_message(&msg, usize::MAX).unwrap();
        prop_assert_eq!(decoded.len(), frames.len());
    }

    #[test]
    fn decoded_bytes_reencode_identically(buf in bytes(120)) {
        // Canonical encoding: whatever decodes re-encodes to the very same bytes.
        if let Ok(frames) = decode_message(&buf, usize::MAX) {
            let mut out = Vec::new();
            for d in frames {
                d.frame.encode(d.flags, &mut out);
            }
            prop_assert_eq!(out, buf);
        }
    }

    #[test]
    fn any_single_byte_corruption_is_handled(frames in proptest::collection::vec(owned(), 1..4), pos in any::<usize>(), byte in any::<u8>()) {
        let mut msg = Vec::new();
        for f in &frames {
            encode(f, &mut msg);
        }
        let i = pos % msg.len();
        msg[i] = byte;
        let _ = decode_message(&msg, 16_384);
        let cut = pos % (msg.len() + 1);
        let _ = decode_message(&msg[..cut], 16_384);
    }

    #[test]
    fn server_session_survives_arbitrary_messages(msgs in proptest::collection::vec(bytes(80), 0..8), prefix_hello in any::<bool>()) {
        let cfg = ServerConfig::default();
        let mut s = ServerSession::new(Timestamp(0));
        let mut all = Vec::new();
        if prefix_hello {
            let mut hello = Vec::new();
            ClientSession::new(9).start(&ClientConfig::default(), Timestamp(0), &mut hello);
            all.push(hello);
        }
        all.extend(msgs);
        for (i, m) in all.iter().enumerate() {
            let mut tx = Vec::new();
            let r = s.handle_message(&cfg, Timestamp(i as u64), m, &mut tx, |s, ev, tx| {
                if let ServerEvent::Hello { .. } = ev {
                    s.accept(&cfg, Timestamp(0), SessionId::NONE, tx)?;
                }
                Ok(())
            });
            // Whatever the session wrote is itself well-formed protocol.
            prop_assert!(decode_message(&tx, usize::MAX).is_ok());
            if r.is_err() {
                prop_assert!(s.is_closed());
                break;
            }
        }
    }

    #[test]
    fn proxy_codecs_never_panic_and_round_trip(buf in bytes(300), host in "[a-z0-9.-]{1,255}", port in 1u16.., status in any::<u8>(), reason in text(255)) {
        let _ = ProxyRequest::decode(&buf);
        let _ = ProxyReply::decode(&buf);
        let mut out = Vec::new();
        ProxyRequest { host: &host, port }.encode(&mut out);
        let (r, n) = ProxyRequest::decode(&out).unwrap().unwrap();
        prop_assert_eq!((r.host, r.port, n), (host.as_str(), port, out.len()));
        let mut out = Vec::new();
        ProxyReply { status: ProxyStatus(status), reason: &reason }.encode(&mut out);
        let (r, n) = ProxyReply::decode(&out).unwrap().unwrap();
        prop_assert_eq!((r.status, r.reason, n), (ProxyStatus(status), reason.as_str(), out.len()));
    }
}
