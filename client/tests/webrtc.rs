//! End to end over the WebRTC hop on loopback (no NAT: the NAT topologies are in
//! egress/tests/nat.rs): consumer → signaling → volunteer over DataChannels → egress.

use broflake_client::consumer::ConsumerConfig;
use broflake_client::link::{LinkConfig, TlsMode};
use broflake_client::local_proxy::{ConsumerOptions, ConsumerService, Via};
use broflake_client::relay::{Relay, RelayConfig};
use broflake_client::signaled::SignalSource;
use broflake_client::volunteer::VolunteerConfig;
use broflake_egress::config::Backend;
use broflake_egress::Egress;
use broflake_rtc::CandidateKind;
use broflake_signal::server::Server;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

async fn volunteer(egress: &Egress, signal: &Server) -> Relay {
    let mut cfg = RelayConfig::new(
        LinkConfig::new(format!("ws://{}/broflake", egress.ws_addrs[0])),
        "127.0.0.1:0".parse().unwrap(),
    );
    cfg.listen = None;
    cfg.pool = 2;
    cfg.volunteer = Some(VolunteerConfig::new(signal.url()));
    Relay::start(cfg).await.unwrap()
}

async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let t = Instant::now();
    while !f().await {
        assert!(t.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_downloads_through_a_volunteer_over_webrtc_and_fails_over_to_another() {
    let egress = Egress::start(testkit::egress_config(Backend::Tokio)).await.unwrap();
    let mut sc = broflake_signal::config::Config::default();
    sc.listen.addr = "127.0.0.1:0".parse().unwrap();
    sc.admin.listen = None;
    let signal = Server::start(sc).await.unwrap();
    let v1 = volunteer(&egress, &signal).await;
    until("the volunteer registered", async || signal.snapshot().await.volunteers == 1).await;

    let t = Instant::now();
    let consumer = ConsumerService::start(ConsumerOptions {
        signal: Some(SignalSource::new(signal.url())),
        relays: Vec::new(),
        quic: ConsumerConfig { tls: TlsMode::Pinned(egress.fingerprint.clone()), ..ConsumerConfig::default() },
        socks: None,
        http: None,
    })
    .await
    .unwrap();
    eprintln!("consumer connected through a volunteer in {:?}", t.elapsed());
    let via = consumer.via.borrow().clone();
    let Via::Volunteer { path: Some(path) } = via else { panic!("not via a volunteer: {via:?}") };
    assert_eq!((path.local, path.remote), (CandidateKind::Host, CandidateKind::Host), "loopback: host pair");
    assert_eq!(signal.snapshot().await.matches, 1);

    let (server, sha) = testkit::http_server(8 << 20, 11).await;
    let fetch = async |c: &ConsumerService| {
        let (mut send, mut recv) = c.consumer.open("127.0.0.1", server.port()).await.unwrap();
        send.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let body = recv.read_to_end(64 << 20).await.unwrap();
        let start = body.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        testkit::sha256_hex(&body[start..])
    };
    let t = Instant::now();
    assert_eq!(fetch(&consumer).await, sha, "8 MiB through the WebRTC hop");
    eprintln!("8 MiB in {:?}", t.elapsed());

    // The volunteer goes away; the consumer gets another from the signaling service and its
    // QUIC connection moves there.
    let v2 = volunteer(&egress, &signal).await;
    until("the second volunteer registered", async || signal.snapshot().await.volunteers == 2).await;
    let qc = consumer.consumer.connection.stable_id();
    v1.kill().await;
    let mut via = consumer.via.clone();
    tokio::time::timeout(Duration::from_secs(30), via.changed()).await.expect("failover in time").unwrap();
    assert_eq!(fetch(&consumer).await, sha, "after failover");
    assert_eq!(consumer.consumer.connection.stable_id(), qc, "the same QUIC connection");
    assert_eq!(egress.shared().stats.quic_connections.load(Ordering::Relaxed), 1, "no second QUIC handshake");
    drop(v2);
}
