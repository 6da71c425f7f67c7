//! Packet size along a route (PROTOCOL.md §14.4): QUIC starts at 1350 bytes and its path MTU
//! discovery finds the largest packet every hop carries; a hop that cannot carry a packet
//! drops it, and the download goes on at the size that fits. Real curl → consumer → relay →
//! egress → local HTTP server, on every egress backend.

use broflake_client::consumer::ConsumerConfig;
use broflake_client::link::{LinkConfig, TlsMode};
use broflake_client::local_proxy::{ConsumerOptions, ConsumerService};
use broflake_client::relay::{Relay, RelayConfig};
use broflake_egress::Egress;
use broflake_proto::packet_size::{data_frame_size, max_packet};
use broflake_proto::ServerConfig;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

async fn wait_for(cond: impl Fn() -> bool, what: &str) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn relay(e: &Egress, downstream: ServerConfig) -> Relay {
    let upstream = LinkConfig::new(format!("ws://{}/broflake", e.ws_addrs[0]));
    let cfg = RelayConfig { pool: 1, downstream, ..RelayConfig::new(upstream, "127.0.0.1:0".parse().unwrap()) };
    let r = Relay::start(cfg).await.expect("relay");
    wait_for(|| r.stats.upstream_open.load(Ordering::Relaxed) == 1, "relay link open").await;
    r
}

async fn consumer(e: &Egress, relay: &Relay) -> ConsumerService {
    let opts = ConsumerOptions {
        signal: None,
        relays: vec![LinkConfig::new(relay.url())],
        quic: ConsumerConfig { tls: TlsMode::Pinned(e.fingerprint.clone()), ..ConsumerConfig::default() },
        socks: Some("127.0.0.1:0".parse().unwrap()),
        http: None,
    };
    ConsumerService::start(opts).await.expect("consumer")
}

/// Downloads through the consumer with real curl; the SHA-256 of the body.
async fn download(c: &ConsumerService, server: SocketAddr) -> String {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["--silent", "--show-error", "--fail", "--max-time", "120", "--output", "-", "--proxy"])
        .arg(format!("socks5h://{}", c.socks_addr.unwrap()))
        .arg(format!("http://localhost:{}/file", server.port()));
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().expect("curl runs");
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    testkit::sha256_hex(&out.stdout)
}

/// Average size of the datagrams the consumer received: the egress's packet size.
fn average_received(c: &ConsumerService) -> u64 {
    let rx = c.consumer.connection.stats().udp_rx;
    rx.bytes / rx.datagrams.max(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_every_hop_carries_16_kib_frames_the_tunnel_runs_on_large_packets() {
    for b in testkit::backends() {
        let e = Egress::start(testkit::egress_config(b)).await.expect("egress");
        let (server, digest) = testkit::http_server(32 << 20, 7).await;
        let r = relay(&e, ServerConfig::default()).await;
        let c = consumer(&e, &r).await;
        assert_eq!(download(&c, server).await, digest);
        let mtu = c.consumer.connection.stats().path.current_mtu;
        let avg = average_received(&c);
        eprintln!("{b:?}: consumer path MTU {mtu}, egress datagrams average {avg} bytes");
        assert!(mtu > 8_000, "the consumer's probes found the large path ({mtu})");
        assert!(mtu as usize <= max_packet(16_384), "never above what a default hop carries ({mtu})");
        assert!(avg > 4_000, "the egress sent large packets ({avg} bytes on average)");
        assert_eq!(r.stats.packets_too_large.load(Ordering::Relaxed), 0, "nothing was too large for the hop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hop_with_the_smallest_frame_limit_drops_larger_packets_and_the_download_fits_it() {
    for b in testkit::backends() {
        let e = Egress::start(testkit::egress_config(b)).await.expect("egress");
        let (server, digest) = testkit::http_server(16 << 20, 8).await;
        // The relay's downstream hop announces 1500: packets above 1488 bytes cannot cross it.
        let r = relay(&e, ServerConfig { max_frame_size: 1500, ..ServerConfig::default() }).await;
        let c = consumer(&e, &r).await;
        assert_eq!(download(&c, server).await, digest, "the download is intact");
        let mtu = c.consumer.connection.stats().path.current_mtu;
        let avg = average_received(&c);
        let dropped = r.stats.packets_too_large.load(Ordering::Relaxed);
        eprintln!(
            "{b:?}: consumer path MTU {mtu}, egress datagrams average {avg} bytes, {dropped} dropped at the relay"
        );
        // The consumer's own packets cross the same 1500-byte hop upward; on a short label a
        // DATA frame carries up to 1494 bytes of packet in it (1488 is the longest label's bound).
        let upward = (1350..1600).filter(|p| data_frame_size(0, *p) <= 1500).max().expect("a size fits");
        assert!(
            (1350..=upward).contains(&usize::from(mtu)),
            "the consumer settled within the hop's limit ({mtu} > {upward})"
        );
        assert!(avg <= 1488, "nothing larger than the hop carries reached the consumer ({avg})");
        assert!(dropped > 0, "the egress's probes above the limit were dropped at the relay, not forwarded");
        assert!(c.consumer.connection.close_reason().is_none(), "the QUIC connection is alive");
        assert_eq!(r.stats.downstream_links.load(Ordering::Relaxed), 1, "the relay's downstream link survived");
    }
}
