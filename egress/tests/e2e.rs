//! End-to-end tests of the egress on loopback, run against every backend.

use broflake_client::consumer::{Consumer, ConsumerConfig};
use broflake_client::link::{Link, LinkConfig, LinkError, TlsMode};
use broflake_egress::config::{Backend, Config, LivenessMode};
use broflake_egress::shared::Stats;
use broflake_egress::Egress;
use broflake_proto::frame::Frame;
use broflake_proto::proxy::ProxyStatus;
use broflake_proto::{Capabilities, ClientConfig, ErrorCode, Role};
use futures_util::SinkExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

fn ws_url(e: &Egress) -> String {
    format!("ws://{}/broflake", e.ws_addrs[0])
}

fn wss_url(e: &Egress) -> String {
    format!("wss://localhost:{}/broflake", e.wss_addrs[0].port())
}

async fn egress(mut cfg: Config, tweak: impl FnOnce(&mut Config)) -> Egress {
    tweak(&mut cfg);
    Egress::start(cfg).await.expect("egress starts")
}

/// Runs `test` once per backend.
async fn each_backend<F, Fut>(test: F)
where
    F: Fn(Backend) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for b in testkit::backends() {
        eprintln!("backend {b:?}");
        test(b).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_and_client_ping_pong_over_ws_and_wss() {
    each_backend(|b| async move {
        let e = egress(testkit::egress_config(b), |_| {}).await;
        for (url, tls) in
            [(ws_url(&e), TlsMode::InsecureNoVerify), (wss_url(&e), TlsMode::Pinned(e.fingerprint.clone()))]
        {
            let cfg = LinkConfig { tls, ..LinkConfig::new(url.clone()) };
            let link = Link::connect(cfg).await.expect("handshake");
            assert_eq!(link.subprotocol, "broflake.v1");
            assert_eq!(link.negotiated.version, 1);
            assert_eq!(link.negotiated.keepalive_ms, 1000);
            assert!(link.negotiated.capabilities.has(Capabilities::PING));
            assert!(!link.negotiated.capabilities.has(Capabilities::SERVER_PING));
            // Keepalive 1 s with jitter: three PONGs arrive within a few seconds.
            let t = Instant::now();
            while link.sender.stats().pongs_received.load(Ordering::Relaxed) < 3 {
                assert!(t.elapsed() < Duration::from_secs(6), "{url}: PONGs missing");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Well past the 3 s idle timeout, the pinging link is still up.
            assert!(link.end.lock().unwrap().is_none(), "{url}");
            assert_eq!(Stats::get(&e.shared().stats.server_pings), 0, "client pings, server never does");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_version_is_refused_with_the_documented_code_and_reason() {
    each_backend(|b| async move {
        let e = egress(testkit::egress_config(b), |_| {}).await;
        // In-band: the generic token completes the upgrade, HELLO carries 2-3.
        let mut cfg = LinkConfig::new(ws_url(&e));
        cfg.client.min_version = 2;
        cfg.client.max_version = 3;
        let err = Link::connect(cfg).await.expect_err("refused");
        let close = err.refusal().unwrap_or_else(|| panic!("not an in-band refusal: {err}"));
        assert_eq!(close.code, ErrorCode::UNSUPPORTED_VERSION);
        assert_eq!(close.close_code(), 4001);
        assert_eq!(close.reason, "unsupported version: client 2-3, server 1-1");
        // At the HTTP level, for a client that offers only unknown versions.
        let mut cfg = LinkConfig::new(ws_url(&e));
        cfg.subprotocols = Some(vec!["broflake.v9".into()]);
        match Link::connect(cfg).await {
            Err(LinkError::Http { status, reason }) => {
                assert_eq!(status, 426);
                assert!(reason.contains("no supported subprotocol"), "{reason}");
            }
            other => panic!("expected HTTP 426, got {other:?}"),
        }
        let mut cfg = LinkConfig::new(ws_url(&e));
        cfg.subprotocols = Some(vec![]);
        assert!(matches!(Link::connect(cfg).await, Err(LinkError::Http { status: 400, .. })));
        let mut cfg = LinkConfig::new(format!("ws://{}/elsewhere", e.ws_addrs[0]));
        cfg.subprotocols = None;
        assert!(matches!(Link::connect(cfg).await, Err(LinkError::Http { status: 404, .. })));
        assert!(Stats::get(&e.shared().stats.refusals) >= 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_is_closed_within_idle_timeout_plus_one_sweep() {
    each_backend(|b| async move {
        let e = egress(testkit::egress_config(b), |_| {}).await;
        // Announces PING, then never sends anything: idle.
        let mut ws = testkit::raw_handshaked(e.ws_addrs[0], &ClientConfig::default()).await;
        let t = Instant::now();
        let (code, reason, frames) = testkit::until_close(&mut ws).await;
        let took = t.elapsed();
        assert_eq!(code, 4007, "{reason}");
        assert!(reason.contains("nothing received"), "{reason}");
        assert_eq!(frames, vec!["error"], "ERROR(IDLE_TIMEOUT) precedes the close");
        assert!(took >= Duration::from_millis(2_900), "closed early: {took:?}");
        assert!(took <= Duration::from_millis(3_000 + 100 + 400), "closed late: {took:?}");
        assert_eq!(Stats::get(&e.shared().stats.idle_closes), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_ping_mode_keeps_a_silent_client_alive() {
    each_backend(|b| async move {
        let e = egress(testkit::egress_config(b), |c| c.liveness.mode = LivenessMode::ServerPing).await;
        let mut cfg = LinkConfig::new(ws_url(&e));
        cfg.client.send_pings = false;
        let link = Link::connect(cfg).await.expect("handshake");
        assert!(link.negotiated.capabilities.has(Capabilities::SERVER_PING));
        // Three idle timeouts pass; the server's PINGs (answered by the link) keep it alive.
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(link.end.lock().unwrap().is_none());
        assert_eq!(link.sender.stats().pings_sent.load(Ordering::Relaxed), 0);
        let pings = Stats::get(&e.shared().stats.server_pings);
        assert!((7..=10).contains(&pings), "server pinged {pings} times in 9 s at a 1 s interval");
        assert_eq!(Stats::get(&e.shared().stats.idle_closes), 0);
    })
    .await;
}

async fn consumer(e: &Egress) -> Consumer {
    let mut cfg = LinkConfig::new(ws_url(e));
    cfg.client.role = Role::CONSUMER;
    let link = Link::connect(cfg).await.expect("link");
    let qcfg = ConsumerConfig { tls: TlsMode::Pinned(e.fingerprint.clone()), ..ConsumerConfig::default() };
    Consumer::connect(link, &qcfg).await.expect("QUIC connection")
}

/// Fetches the body from the HTTP server through a proxy stream; returns its SHA-256.
async fn fetch(c: &Consumer, server: std::net::SocketAddr) -> (String, usize) {
    let (mut send, mut recv) = c.open("127.0.0.1", server.port()).await.expect("proxy stream");
    send.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n").await.unwrap();
    let all = recv.read_to_end(128 << 20).await.expect("body");
    let head_end = all.windows(4).position(|w| w == b"\r\n\r\n").expect("HTTP head") + 4;
    (testkit::sha256_hex(&all[head_end..]), all.len() - head_end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_through_the_egress_downloads_64_mib_intact() {
    each_backend(|b| async move {
        let e = egress(testkit::egress_config(b), |_| {}).await;
        let (server, digest) = testkit::http_server(64 << 20, 7).await;
        let c = consumer(&e).await;
        let t = Instant::now();
        let (got, len) = fetch(&c, server).await;
        eprintln!("64 MiB in {:?}", t.elapsed());
        assert_eq!(len, 64 << 20);
        assert_eq!(got, digest);
        assert_eq!(e.routes(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_destinations_are_refused_with_their_reason() {
    each_backend(|b| async move {
        let e = egress(testkit::egress_config(b), |_| {}).await;
        let c = consumer(&e).await;
        let cases = [
            ("10.1.2.3", "destination 10.1.2.3 is a private address"),
            ("169.254.169.254", "destination 169.254.169.254 is a cloud metadata address"),
            ("::1", "destination ::1 is a loopback address"),
            ("fd00:ec2::254", "destination fd00:ec2::254 is a cloud metadata address"),
            ("::ffff:192.168.0.1", "destination ::ffff:192.168.0.1 is a private address"),
        ];
        for (host, reason) in cases {
            match c.open(host, 80).await {
                Err(broflake_client::ProxyError::Refused { status, reason: r }) => {
                    assert_eq!(status, ProxyStatus::POLICY_REFUSED, "{host}");
                    assert_eq!(r, reason, "{host}");
                }
                Ok(_) => panic!("{host} was not refused"),
                Err(other) => panic!("{host}: {other}"),
            }
        }
        // The same QUIC connection still works for an allowed destination.
        let (server, digest) = testkit::http_server(1000, 3).await;
        assert_eq!(fetch(&c, server).await.0, digest);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolving_to_forbidden_addresses_are_refused_over_the_tunnel() {
    each_backend(|b| async move {
        // No allowlist: loopback is forbidden like any internal network.
        let e = egress(testkit::egress_config(b), |c| c.proxy.allow.clear()).await;
        let c = consumer(&e).await;
        for host in ["localhost", "127.0.0.1", "::ffff:127.0.0.1"] {
            match c.open(host, 80).await {
                Err(broflake_client::ProxyError::Refused { status, reason }) => {
                    assert_eq!(status, ProxyStatus::POLICY_REFUSED, "{host}");
                    assert!(reason.ends_with("a loopback address"), "{host}: {reason}");
                    if host == "localhost" {
                        assert!(reason.starts_with("destination localhost resolves to "), "{reason}");
                    }
                }
                Ok(_) => panic!("{host} was not refused"),
                Err(other) => panic!("{host}: {other}"),
            }
        }
        assert_eq!(Stats::get(&e.shared().stats.proxy_refusals), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_keeps_its_quic_connection_across_a_relay_link_failure() {
    each_backend(|b| async move {
        let e = egress(testkit::egress_config(b), |_| {}).await;
        let (server, digest) = testkit::http_server(16 << 20, 11).await;
        let c = consumer(&e).await;
        let id = c.connection.stable_id();
        let (mut send, mut recv) = c.open("127.0.0.1", server.port()).await.unwrap();
        send.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut all = vec![0u8; 0];
        let mut buf = vec![0u8; 64 * 1024];
        // Read a part, then kill the link under the download.
        while all.len() < 4 << 20 {
            let n = recv.read(&mut buf).await.unwrap().unwrap();
            all.extend_from_slice(&buf[..n]);
        }
        let routes_before = e.routes();
        // The first link dies: close its WebSocket from our side without warning QUIC.
        let first = c.current_route();
        let mut cfg = LinkConfig::new(ws_url(&e));
        cfg.client.role = Role::CONSUMER;
        kill_current_link(&c).await;
        let link2 = Link::connect(cfg).await.unwrap();
        c.attach(link2).await.unwrap();
        assert!(first.is_some());
        while let Some(n) = recv.read(&mut buf).await.unwrap() {
            all.extend_from_slice(&buf[..n]);
        }
        let head_end = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(testkit::sha256_hex(&all[head_end..]), digest);
        assert_eq!(c.connection.stable_id(), id, "same QUIC connection");
        assert!(c.connection.close_reason().is_none());
        assert_eq!(c.link_failures.load(Ordering::SeqCst), 1);
        assert_eq!(Stats::get(&e.shared().stats.quic_migrations), 0, "counted at stream accept only");
        // A new stream on the migrated connection: the egress sees the new path.
        assert_eq!(fetch(&c, server).await.0, digest);
        assert_eq!(Stats::get(&e.shared().stats.quic_migrations), 1);
        assert!(routes_before >= 1);
    })
    .await;
}

async fn kill_current_link(c: &Consumer) {
    c.close_current_link().await;
    let t = Instant::now();
    while c.link_failures.load(Ordering::SeqCst) == 0 {
        assert!(t.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_documented_close_and_others_are_unaffected() {
    each_backend(|b| async move {
        let e = egress(testkit::egress_config(b), |_| {}).await;
        let addr = e.ws_addrs[0];
        // A well-behaved client pings throughout.
        let good = Link::connect(LinkConfig::new(ws_url(&e))).await.unwrap();

        // Garbage before the upgrade: the TCP connection is closed, nothing else happens.
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"\x16\x03\x01garbage\r\n\r\n").await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut rest)).await.expect("closed");

        // A text message: close 1003.
        let mut ws = testkit::raw_handshaked(addr, &ClientConfig::default()).await;
        ws.send(Message::Text("hello".into())).await.unwrap();
        let (code, reason, _) = testkit::until_close(&mut ws).await;
        assert_eq!((code, reason.as_str()), (1003, "text messages are not allowed"));

        // A frame over the limit (16 KiB): ERROR then close 4005.
        let mut ws = testkit::raw_handshaked(addr, &ClientConfig::default()).await;
        let big = vec![0u8; 20_000];
        ws.send(testkit::message(&[Frame::Padding { payload: &big }])).await.unwrap();
        let (code, reason, frames) = testkit::until_close(&mut ws).await;
        assert_eq!(code, 4005, "{reason}");
        assert!(reason.contains("exceeds the limit of 16384"), "{reason}");
        assert_eq!(frames, vec!["error"]);

        // An unknown frame type without the ignorable flag: close 4004.
        let mut ws = testkit::raw_handshaked(addr, &ClientConfig::default()).await;
        ws.send(Message::Binary(vec![0x0b, 0x00, 0x00].into())).await.unwrap();
        let (code, reason, _) = testkit::until_close(&mut ws).await;
        assert_eq!(code, 4004, "{reason}");

        // DATA before HELLO: protocol violation, 4003.
        let mut ws = testkit::raw_ws(addr, "broflake.v1").await.unwrap();
        ws.send(testkit::message(&[Frame::Data { label: 0, packet: b"x" }])).await.unwrap();
        let (code, reason, _) = testkit::until_close(&mut ws).await;
        assert_eq!((code, reason.as_str()), (4003, "data frame not allowed before HELLO"));

        // A message over the WebSocket message limit (64 KiB): 1009.
        let mut ws = testkit::raw_handshaked(addr, &ClientConfig::default()).await;
        let _ = ws.send(Message::Binary(vec![0u8; 100_000].into())).await;
        let (code, _, _) = testkit::until_close(&mut ws).await;
        assert!(code == 1009 || code == 1006, "got {code}");

        // Upgrade, then silence: no HELLO within the handshake timeout → REFUSE, 4006.
        let mut ws = testkit::raw_ws(addr, "broflake").await.unwrap();
        let (code, _, frames) = testkit::until_close(&mut ws).await;
        assert_eq!((code, frames), (4006, vec!["refuse".to_string()]));

        // The good client never noticed.
        assert!(good.end.lock().unwrap().is_none());
        assert!(good.sender.stats().pongs_received.load(Ordering::Relaxed) >= 2);
    })
    .await;
}
