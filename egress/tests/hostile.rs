//! The bad-input battery: every kind of hostile peer the egress must survive, against both
//! backends. Each case asserts the documented outcome (close code and reason, or HTTP status,
//! and the metric that counts it) and that a well-behaved client on the same egress is
//! unaffected. Its own test binary, because the metrics recorder is process-global; the
//! cases take turns so each one's metric deltas are its own.

use broflake_client::link::{Link, LinkConfig};
use broflake_egress::config::{Backend, Config};
use broflake_egress::Egress;
use broflake_proto::frame::{decode_message, Frame};
use broflake_proto::{binding, ClientConfig, ClientSession, ErrorCode, Timestamp};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// One case at a time: metric deltas must not mix.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn metric(name: &str, labels: &[(&str, &str)]) -> f64 {
    testkit::prom_value(&broflake_egress::admin::recorder().render(), name, labels)
}

const CLOSED: &str = "broflake_connections_closed_total";
const UPGRADE_REFUSALS: &str = "broflake_upgrade_refusals_total";

/// Counts a metric moved by from a starting point.
struct Delta {
    name: &'static str,
    labels: Vec<(&'static str, &'static str)>,
    start: f64,
}

impl Delta {
    fn new(name: &'static str, labels: &[(&'static str, &'static str)]) -> Delta {
        Delta { name, labels: labels.to_vec(), start: metric(name, labels) }
    }
    fn moved(&self) -> f64 {
        metric(self.name, &self.labels) - self.start
    }
    /// Waits (bounded) until the metric has moved by `n`; the close is counted after the
    /// peer sees it, so it can trail the peer's view by a moment.
    async fn expect(&self, n: f64) {
        let end = Instant::now() + Duration::from_secs(5);
        while self.moved() < n && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(self.moved(), n, "{} {:?}", self.name, self.labels);
    }
}

/// An egress under attack, with one well-behaved relay that pings throughout.
struct Target {
    egress: Egress,
    good: Link,
    pongs_before: u64,
}

impl Target {
    async fn start(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Target {
        broflake_egress::admin::recorder();
        let mut cfg = testkit::egress_config(backend);
        tweak(&mut cfg);
        let egress = Egress::start(cfg).await.expect("egress starts");
        let good = Link::connect(LinkConfig::new(format!("ws://{}/broflake", egress.ws_addrs[0]))).await.unwrap();
        let pongs_before = good.sender.stats().pongs_received.load(Ordering::Relaxed);
        Target { egress, good, pongs_before }
    }

    fn addr(&self) -> SocketAddr {
        self.egress.ws_addrs[0]
    }

    /// The good relay kept its connection and its PINGs kept being answered, and a new
    /// client can still complete the handshake.
    async fn assert_unaffected(self) {
        let stats = self.good.sender.stats();
        let end = Instant::now() + Duration::from_secs(4);
        // The relay pings every keepalive (1 s); wait for an answer given after the attack.
        while stats.pongs_received.load(Ordering::Relaxed) <= self.pongs_before && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(stats.pongs_received.load(Ordering::Relaxed) > self.pongs_before, "good relay got no PONG");
        assert!(self.good.end.lock().unwrap().is_none(), "good relay lost: {:?}", self.good.end.lock().unwrap());
        let mut fresh = testkit::raw_handshaked(self.addr(), &ClientConfig::default()).await;
        exchange_ping(&mut fresh).await;
    }
}

async fn exchange_ping(ws: &mut testkit::RawWs) {
    use futures_util::SinkExt;
    ws.send(testkit::message(&[Frame::Ping { payload: b"ok?" }])).await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(5), testkit::next_binary(ws)).await.unwrap().unwrap();
    let frames = decode_message(&msg, usize::MAX).unwrap();
    assert!(frames.iter().any(|d| d.frame == Frame::Pong { payload: b"ok?" }), "{frames:?}");
}

async fn each_backend<F, Fut>(test: F)
where
    F: Fn(Backend) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let _turn = TURN.lock().await;
    for b in testkit::backends() {
        eprintln!("backend {b:?}");
        test(b).await;
    }
}

const UPGRADE: &str = "Host: egress\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: broflake.v1\r\n";

fn request(extra_headers: &str) -> String {
    format!("GET {} HTTP/1.1\r\n{UPGRADE}{extra_headers}\r\n", binding::DEFAULT_PATH)
}

/// Everything the server sends until it closes the TCP connection (bounded wait).
async fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    r.expect("the server closes the connection").ok();
    out
}

/// A TCP connection that completed the WebSocket upgrade by hand.
async fn upgraded_from(addr: SocketAddr, source: Option<std::net::IpAddr>) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let mut s = sock.connect(addr).await?;
    s.write_all(request("").as_bytes()).await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if s.read(&mut b).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    Ok(s)
}

async fn upgraded(addr: SocketAddr) -> TcpStream {
    upgraded_from(addr, None).await.unwrap()
}

/// A client frame, masked unless told otherwise, with the length in the shortest encoding.
fn client_frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    let m = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n if n <= 0xffff => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let key = [0x37, 0xfa, 0x21, 0x3d];
    if masked {
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

fn hello() -> Vec<u8> {
    let mut tx = Vec::new();
    ClientSession::new(7).start(&ClientConfig { grease: false, ..ClientConfig::default() }, Timestamp(0), &mut tx);
    tx
}

/// A server frame read off the raw stream: (opcode, payload), or None at EOF.
async fn server_frame<R: AsyncRead + Unpin>(s: &mut R) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await.ok()?;
    assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
    let len = match h[1] & 0x7f {
        126 => u64::from(s.read_u16().await.ok()?),
        127 => s.read_u64().await.ok()?,
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).await.ok()?;
    Some((h[0] & 0x0f, payload))
}

/// Reads server frames until the close; returns its code and reason (1006: no close frame)
/// and the Broflake frames seen before it.
async fn close_of<R: AsyncRead + Unpin>(s: &mut R) -> (u16, String, Vec<Vec<u8>>) {
    let mut messages = Vec::new();
    let read = async {
        loop {
            match server_frame(s).await {
                None => return (1006, String::new()),
                Some((8, p)) if p.len() >= 2 => {
                    return (u16::from_be_bytes([p[0], p[1]]), String::from_utf8_lossy(&p[2..]).into_owned())
                }
                Some((8, _)) => return (1005, String::new()),
                Some((2, p)) => messages.push(p),
                Some(_) => {}
            }
        }
    };
    let (code, reason) = tokio::time::timeout(Duration::from_secs(10), read).await.expect("the server closes");
    (code, reason, messages)
}

/// Reads server frames until a binary message arrives.
async fn binary(s: &mut TcpStream) -> Vec<u8> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), server_frame(s)).await.expect("a message") {
            Some((2, p)) => return p,
            Some((8, p)) => panic!("closed: {}", String::from_utf8_lossy(&p)),
            Some(_) => continue,
            None => panic!("connection ended"),
        }
    }
}

/// Upgrade + HELLO + WELCOME on a raw stream.
async fn handshaked(addr: SocketAddr) -> TcpStream {
    let mut s = upgraded(addr).await;
    s.write_all(&client_frame(true, 2, &hello(), true)).await.unwrap();
    let welcome = binary(&mut s).await;
    assert!(matches!(decode_message(&welcome, usize::MAX).unwrap()[0].frame, Frame::Welcome(_)));
    s
}

fn frames(list: &[Frame<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in list {
        f.encode(0, &mut out);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_upgrade_is_cut_at_the_handshake_timeout() {
    each_backend(|b| async move {
        let t = Target::start(b, |_| {}).await;
        let timeouts = Delta::new(UPGRADE_REFUSALS, &[("reason", "timeout")]);
        let started = Instant::now();
        let s = TcpStream::connect(t.addr()).await.unwrap();
        let (mut rd, mut wr) = s.into_split();
        // One byte of a never-ending header every 100 ms: always sending, never finishing.
        let dribble = tokio::spawn(async move {
            let head = format!("GET {} HTTP/1.1\r\nX-Slow: ", binding::DEFAULT_PATH);
            let mut next: &[u8] = head.as_bytes();
            while wr.write_all(next).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                next = b"a";
            }
        });
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut buf)).await.expect("cut");
        let after = started.elapsed();
        // handshake_timeout is 2 s in the test configuration.
        assert!(after >= Duration::from_millis(1900) && after < Duration::from_millis(3500), "cut after {after:?}");
        assert!(buf.starts_with(b"HTTP/1.1 408"), "{}", String::from_utf8_lossy(&buf));
        timeouts.expect(1.0).await;
        dribble.abort();
        t.assert_unaffected().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_http_requests_are_refused_with_their_status() {
    each_backend(|b| async move {
        let t = Target::start(b, |_| {}).await;
        let bad = Delta::new(UPGRADE_REFUSALS, &[("reason", "bad_request")]);
        let big = Delta::new(UPGRADE_REFUSALS, &[("reason", "oversized_request")]);

        // A TLS ClientHello-looking blob on the plain listener.
        let mut s = TcpStream::connect(t.addr()).await.unwrap();
        s.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n").await.unwrap();
        let resp = read_all(&mut s).await;
        assert!(resp.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&resp));
        bad.expect(1.0).await;

        // 64 KiB of headers: refused at the 8 KiB bound, not buffered.
        let mut s = TcpStream::connect(t.addr()).await.unwrap();
        let pad: String = (0..64).map(|i| format!("X-Pad-{i}: {}\r\n", "p".repeat(1000))).collect();
        let _ = s.write_all(request(&pad).as_bytes()).await; // the server may close mid-write
        let resp = read_all(&mut s).await;
        assert!(resp.starts_with(b"HTTP/1.1 431"), "{}", String::from_utf8_lossy(&resp));

        // Many tiny headers: also 431.
        let mut s = TcpStream::connect(t.addr()).await.unwrap();
        let many: String = (0..200).map(|i| format!("X-{i}: 1\r\n")).collect();
        let _ = s.write_all(request(&many).as_bytes()).await;
        let resp = read_all(&mut s).await;
        assert!(resp.starts_with(b"HTTP/1.1 431"), "{}", String::from_utf8_lossy(&resp));
        big.expect(2.0).await;
        t.assert_unaffected().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_framing_violations_close_with_1002_or_1009() {
    each_backend(|b| async move {
        let t = Target::start(b, |_| {}).await;
        let proto_err = Delta::new(CLOSED, &[("reason", "ws_protocol_error")]);
        let too_big = Delta::new(CLOSED, &[("reason", "message_too_big")]);

        // An unmasked client frame (RFC 6455 §5.1).
        let mut s = handshaked(t.addr()).await;
        s.write_all(&client_frame(true, 2, &frames(&[Frame::Ping { payload: b"x" }]), false)).await.unwrap();
        assert_eq!(close_of(&mut s).await.0, 1002);

        // A 63-bit length: refused from the header, before any payload is buffered.
        let mut s = handshaked(t.addr()).await;
        let mut f = vec![0x82, 0x80 | 127];
        f.extend_from_slice(&0x7fff_ffff_ffff_ffffu64.to_be_bytes());
        f.extend_from_slice(&[1, 2, 3, 4]);
        s.write_all(&f).await.unwrap();
        assert_eq!(close_of(&mut s).await.0, 1009);

        // A 64-bit length with the top bit set is not a valid frame at all (1002); tungstenite
        // judges it by size first (1009). Either way nothing is buffered.
        let mut s = handshaked(t.addr()).await;
        let mut f = vec![0x82, 0x80 | 127];
        f.extend_from_slice(&u64::MAX.to_be_bytes());
        f.extend_from_slice(&[1, 2, 3, 4]);
        s.write_all(&f).await.unwrap();
        let top_bit = if b == Backend::Uring { 1002 } else { 1009 };
        assert_eq!(close_of(&mut s).await.0, top_bit);

        // Endless continuation frames: cut at the message bound (64 KiB), not buffered on.
        let (mut rd, mut wr) = handshaked(t.addr()).await.into_split();
        let writer = tokio::spawn(async move {
            let chunk = vec![0u8; 1000];
            let mut sent = 0usize;
            let mut frame = client_frame(false, 2, &chunk, true);
            while wr.write_all(&frame).await.is_ok() {
                sent += chunk.len();
                frame = client_frame(false, 0, &chunk, true);
                if sent > 64 << 20 {
                    break;
                }
            }
            sent
        });
        assert_eq!(close_of(&mut rd).await.0, 1009);
        drop(rd);
        let sent = writer.await.unwrap();
        assert!(sent < 16 << 20, "the egress kept reading {sent} bytes of one message");

        // A fragmented control frame.
        let mut s = handshaked(t.addr()).await;
        s.write_all(&client_frame(false, 9, b"ping", true)).await.unwrap();
        assert_eq!(close_of(&mut s).await.0, 1002);

        let uring = f64::from(u8::from(b == Backend::Uring));
        proto_err.expect(2.0 + uring).await;
        too_big.expect(3.0 - uring).await;
        t.assert_unaffected().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_floods_are_rate_limited_with_4012() {
    each_backend(|b| async move {
        let t = Target::start(b, |_| {}).await;
        let limited = Delta::new(CLOSED, &[("reason", ErrorCode::RATE_LIMITED.label())]);
        let mut s = handshaked(t.addr()).await;
        // Each PING its own message, as fast as the socket takes them. The burst (16) is
        // answered; the flood beyond it is not.
        let mut flood = Vec::new();
        for i in 0..200u8 {
            flood.extend(client_frame(true, 2, &frames(&[Frame::Ping { payload: &[i] }]), true));
        }
        s.write_all(&flood).await.unwrap();
        let (code, reason, messages) = close_of(&mut s).await;
        assert_eq!(code, ErrorCode::RATE_LIMITED.close_code(), "{reason}");
        let pongs = messages
            .iter()
            .flat_map(|m| decode_message(m, usize::MAX).unwrap().into_iter().map(|d| d.frame.name()))
            .filter(|n| *n == "pong")
            .count();
        assert!((16..=20).contains(&pongs), "{pongs} PONGs answered");
        // WebSocket-level pings draw on the same bucket.
        let mut s = handshaked(t.addr()).await;
        let flood: Vec<u8> = (0..200u8).flat_map(|i| client_frame(true, 9, &[i], true)).collect();
        s.write_all(&flood).await.unwrap();
        let (code, reason, _) = close_of(&mut s).await;
        assert_eq!((code, reason.as_str()), (4012, "websocket ping rate limit exceeded"));
        limited.expect(2.0).await;
        t.assert_unaffected().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_label_exhaustion_closes_the_extra_routes_not_the_connection() {
    each_backend(|b| async move {
        let t = Target::start(b, |c| c.limits.max_routes_per_connection = 8).await;
        let routes_before = t.egress.routes();
        let mut s = handshaked(t.addr()).await;
        // 40 labels, each with a QUIC-looking packet: 8 become routes, 32 are closed.
        let mut msg = Vec::new();
        for label in 0..40u64 {
            broflake_proto::frame::encode_data(label * 4, &[0x40, 0x01, 0x02, 0x03], &mut msg);
        }
        s.write_all(&client_frame(true, 2, &msg, true)).await.unwrap();
        let mut closed = std::collections::BTreeSet::new();
        while closed.len() < 32 {
            let m = binary(&mut s).await;
            for d in decode_message(&m, usize::MAX).unwrap() {
                if let Frame::RouteClose { label, code } = d.frame {
                    assert_eq!(code, ErrorCode::ROUTE_LIMIT);
                    closed.insert(label);
                }
            }
        }
        assert_eq!(closed, (8..40u64).map(|l| l * 4).collect(), "the routes beyond the limit are the ones closed");
        assert_eq!(t.egress.routes(), routes_before + 8);
        // The connection itself is fine.
        s.write_all(&client_frame(true, 2, &frames(&[Frame::Ping { payload: b"still" }]), true)).await.unwrap();
        let m = binary(&mut s).await;
        assert_eq!(decode_message(&m, usize::MAX).unwrap()[0].frame, Frame::Pong { payload: b"still" });
        drop(s);
        t.assert_unaffected().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_garbage_in_data_frames_is_dropped_by_quic_alone() {
    each_backend(|b| async move {
        let t = Target::start(b, |_| {}).await;
        let quic_before = broflake_egress::shared::Stats::get(&t.egress.shared().stats.quic_connections);
        let mut s = handshaked(t.addr()).await;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        for i in 0..300usize {
            let mut p = noise(1 + i * 4 % 1300);
            match i % 3 {
                // A long header claiming QUIC v1 (an Initial that will not decrypt).
                0 if p.len() > 8 => {
                    p[0] = 0xc0;
                    p[1..5].copy_from_slice(&1u32.to_be_bytes());
                }
                // A short header for a connection that does not exist.
                1 => p[0] = 0x40 | (p[0] & 0x3f),
                _ => {}
            }
            let mut msg = Vec::new();
            broflake_proto::frame::encode_data((i % 4) as u64, &p, &mut msg);
            s.write_all(&client_frame(true, 2, &msg, true)).await.unwrap();
        }
        // The connection and its routes live on; no QUIC connection came of it.
        s.write_all(&client_frame(true, 2, &frames(&[Frame::Ping { payload: b"alive" }]), true)).await.unwrap();
        loop {
            let m = binary(&mut s).await;
            let d = decode_message(&m, usize::MAX).unwrap();
            if d.iter().any(|d| d.frame == Frame::Pong { payload: b"alive" }) {
                break;
            }
        }
        assert_eq!(broflake_egress::shared::Stats::get(&t.egress.shared().stats.quic_connections), quic_before);
        t.assert_unaffected().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_replay_is_a_protocol_violation() {
    each_backend(|b| async move {
        let t = Target::start(b, |_| {}).await;
        let violations = Delta::new(CLOSED, &[("reason", ErrorCode::PROTOCOL_VIOLATION.label())]);
        // A second HELLO on an open session.
        let mut s = handshaked(t.addr()).await;
        s.write_all(&client_frame(true, 2, &hello(), true)).await.unwrap();
        let (code, reason, _) = close_of(&mut s).await;
        assert_eq!(code, 4003, "{reason}");
        // The good relay's session id presented by a stranger on a running egress: a new
        // session for the stranger, nothing taken from the relay.
        let cfg = ClientConfig { previous_session: t.good.negotiated.session_id, ..ClientConfig::default() };
        let mut thief = testkit::raw_handshaked(t.addr(), &cfg).await;
        exchange_ping(&mut thief).await;
        violations.expect(1.0).await;
        t.assert_unaffected().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_too_many_connections_from_one_address_are_refused_then_dropped() {
    each_backend(|b| async move {
        let t = Target::start(b, |c| c.limits.max_connections_per_ip = 16).await;
        let refused = Delta::new("broflake_refusals_total", &[("reason", ErrorCode::PER_IP_LIMIT.label())]);
        let dropped = Delta::new(UPGRADE_REFUSALS, &[("reason", "over_limit")]);
        let flooder: std::net::IpAddr = "127.0.0.9".parse().unwrap();
        let (mut welcomed, mut per_ip, mut cut) = (Vec::new(), 0, 0);
        for _ in 0..200 {
            let mut s = match upgraded_from(t.addr(), Some(flooder)).await {
                Ok(s) => s,
                Err(_) => {
                    cut += 1; // dropped before the upgrade
                    continue;
                }
            };
            if s.write_all(&client_frame(true, 2, &hello(), true)).await.is_err() {
                cut += 1;
                continue;
            }
            match tokio::time::timeout(Duration::from_secs(5), server_frame(&mut s)).await.expect("an answer") {
                Some((2, m)) => match decode_message(&m, usize::MAX).unwrap()[0].frame {
                    Frame::Welcome(_) => welcomed.push(s), // held open
                    Frame::Refuse { code, .. } => {
                        assert_eq!(code, ErrorCode::PER_IP_LIMIT);
                        per_ip += 1;
                    }
                    ref f => panic!("unexpected {f:?}"),
                },
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(welcomed.len(), 16, "exactly the per-address limit is served");
        assert_eq!(per_ip + cut, 184);
        assert!(per_ip >= 16, "at least the head-room is refused in-band ({per_ip})");
        refused.expect(per_ip as f64).await;
        dropped.expect(cut as f64).await;
        // Another address is served while the flooder holds its connections.
        t.assert_unaffected().await;
    })
    .await;
}
