//! End to end: real `curl` → consumer → relay(s) → egress → local HTTP server, on every
//! egress backend; failover, shared relay links, middlebox idle cut-offs, GOAWAY migration.

use broflake_client::consumer::ConsumerConfig;
use broflake_client::link::{LinkConfig, TlsMode};
use broflake_client::local_proxy::{ConsumerOptions, ConsumerService};
use broflake_client::middlebox::Middlebox;
use broflake_client::relay::{Relay, RelayConfig};
use broflake_egress::config::{Backend, Config};
use broflake_egress::shared::Stats;
use broflake_egress::Egress;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

async fn egress(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Egress {
    let mut c = testkit::egress_config(backend);
    tweak(&mut c);
    Egress::start(c).await.expect("egress")
}

fn egress_url(e: &Egress) -> String {
    format!("ws://{}/broflake", e.ws_addrs[0])
}

async fn relay(upstream: String, pool: usize) -> Relay {
    let cfg = RelayConfig { pool, ..RelayConfig::new(LinkConfig::new(upstream), "127.0.0.1:0".parse().unwrap()) };
    let r = Relay::start(cfg).await.expect("relay");
    wait_for(|| r.stats.upstream_open.load(Ordering::Relaxed) as usize == pool, "relay pool open").await;
    r
}

async fn consumer(e: &Egress, relays: &[String]) -> ConsumerService {
    let opts = ConsumerOptions {
        signal: None,
        relays: relays.iter().map(|u| LinkConfig::new(u.clone())).collect(),
        quic: ConsumerConfig { tls: TlsMode::Pinned(e.fingerprint.clone()), ..ConsumerConfig::default() },
        socks: Some("127.0.0.1:0".parse().unwrap()),
        http: Some("127.0.0.1:0".parse().unwrap()),
    };
    ConsumerService::start(opts).await.expect("consumer")
}

async fn wait_for(cond: impl Fn() -> bool, what: &str) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Clone, Copy, Debug)]
enum Via {
    Socks5h,
    Connect,
}

/// Runs real curl through the consumer; returns the SHA-256 of the body.
async fn curl(c: &ConsumerService, via: Via, server: SocketAddr) -> String {
    // `localhost` is resolved by the egress (socks5h: remote DNS), not here.
    let url = format!("http://localhost:{}/file", server.port());
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["--silent", "--show-error", "--fail", "--max-time", "120", "--output", "-"]);
    match via {
        Via::Socks5h => cmd.arg("--proxy").arg(format!("socks5h://{}", c.socks_addr.unwrap())),
        Via::Connect => cmd.arg("--proxytunnel").arg("--proxy").arg(format!("http://{}", c.http_addr.unwrap())),
    };
    cmd.arg(url);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().expect("curl runs");
    assert!(out.status.success(), "curl {via:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    testkit::sha256_hex(&out.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_64_mib_via_one_relay_and_via_a_two_relay_chain() {
    for b in testkit::backends() {
        let e = egress(b, |_| {}).await;
        let (server, digest) = testkit::http_server(64 << 20, 21).await;
        let r1 = relay(egress_url(&e), 2).await;
        let r2 = relay(r1.url(), 2).await; // chained: r2 → r1 → egress
        for (name, entry) in [("one relay", r1.url()), ("two-relay chain", r2.url())] {
            let c = consumer(&e, &[entry]).await;
            for via in [Via::Socks5h, Via::Connect] {
                let t = Instant::now();
                assert_eq!(curl(&c, via, server).await, digest, "{b:?} {name} {via:?}");
                eprintln!("{b:?} {name} {via:?}: 64 MiB in {:?}", t.elapsed());
            }
            c.stop().await;
        }
        assert!(r2.stats.routes_opened.load(Ordering::Relaxed) >= 1, "traffic went through the chain");
        assert!(r1.stats.routes_opened.load(Ordering::Relaxed) >= 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_consumers_share_one_relay_connection() {
    for b in testkit::backends() {
        let e = egress(b, |_| {}).await;
        let r = relay(egress_url(&e), 1).await;
        let mut servers = Vec::new();
        for seed in 0..3u64 {
            servers.push(testkit::http_server(4 << 20, 100 + seed).await);
        }
        let mut consumers = Vec::new();
        for _ in 0..3 {
            consumers.push(consumer(&e, &[r.url()]).await);
        }
        let mut jobs = Vec::new();
        for (c, (server, digest)) in consumers.iter().zip(&servers) {
            jobs.push(async move { (curl(c, Via::Socks5h, *server).await, digest.clone()) });
        }
        for (got, want) in futures_util::future::join_all(jobs).await {
            assert_eq!(got, want, "each consumer gets its own bytes");
        }
        assert_eq!(e.connections(), 1, "one relay connection carries every consumer");
        assert_eq!(e.routes(), 3, "three routes on it");
        assert_eq!(r.stats.upstream_open.load(Ordering::Relaxed), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_relay_mid_download_fails_over_on_the_same_quic_connection() {
    for b in testkit::backends() {
        let e = egress(b, |_| {}).await;
        let (server, digest) = testkit::http_server(64 << 20, 33).await;
        let a = relay(egress_url(&e), 1).await;
        let bb = relay(egress_url(&e), 1).await;
        let c = consumer(&e, &[a.url(), bb.url()]).await;
        let id = c.consumer.connection.stable_id();
        let download = {
            let url = format!("http://localhost:{}/file", server.port());
            let proxy = format!("socks5h://{}", c.socks_addr.unwrap());
            tokio::task::spawn_blocking(move || {
                std::process::Command::new("curl")
                    .args([
                        "--silent",
                        "--show-error",
                        "--fail",
                        "--max-time",
                        "120",
                        "--output",
                        "-",
                        "--proxy",
                        &proxy,
                        &url,
                    ])
                    .output()
            })
        };
        let conn = c.consumer.connection.clone();
        wait_for(|| conn.stats().udp_rx.bytes > 8 << 20, "8 MiB through relay A").await;
        a.kill().await;
        let out = download.await.unwrap().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(testkit::sha256_hex(&out.stdout), digest, "download intact across the failover");
        assert_eq!(c.consumer.connection.stable_id(), id);
        assert!(c.consumer.connection.close_reason().is_none(), "the QUIC connection survived");
        assert_eq!(Stats::get(&e.shared().stats.quic_connections), 1, "no second QUIC handshake at the egress");
        assert_eq!(c.consumer.link_failures.load(Ordering::SeqCst), 1);
        assert!(bb.stats.packets_down.load(Ordering::Relaxed) > 0, "relay B carried the rest");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_middlebox_pinging_pools_survive_and_silent_ones_loop() {
    for b in testkit::backends() {
        // Pure client-driven liveness: the egress never pings (1 s keepalive, 3 s idle timeout).
        let e = egress(b, |c| c.liveness.ping_clients_without_ping = false).await;
        let cutoff = Duration::from_millis(1500);
        let mb = Middlebox::start("127.0.0.1:0".parse().unwrap(), e.ws_addrs[0], cutoff).await.unwrap();
        let url = format!("ws://{}/broflake", mb.addr);

        // With PING: at least 3×T with zero reconnects and no flow cut.
        let r = relay(url.clone(), 3).await;
        tokio::time::sleep(cutoff * 3 + Duration::from_millis(500)).await;
        assert_eq!(r.stats.reconnects.load(Ordering::Relaxed), 0);
        assert_eq!(r.stats.connects.load(Ordering::Relaxed), 3);
        assert_eq!(mb.cut.load(Ordering::Relaxed), 0);
        assert!(e.shared().stats.idle_closes.load(Ordering::Relaxed) == 0);
        r.kill().await;

        // Without PING: the middlebox cuts every link, the relay notices only by its receive
        // timeout (idle timeout + keepalive = 4 s) and reconnects: the loop of the original report.
        let before_cut = mb.cut.load(Ordering::Relaxed);
        let cfg = {
            let mut l = LinkConfig::new(url);
            l.client.send_pings = false;
            RelayConfig { pool: 3, ..RelayConfig::new(l, "127.0.0.1:0".parse().unwrap()) }
        };
        let r = Relay::start(cfg).await.unwrap();
        let t = Instant::now();
        wait_for(|| r.stats.reconnects.load(Ordering::Relaxed) >= 3, "one reconnect round").await;
        let first = t.elapsed();
        wait_for(|| r.stats.reconnects.load(Ordering::Relaxed) >= 6, "two reconnect rounds").await;
        let cycle = t.elapsed();
        eprintln!("first round after {first:?}");
        assert!(first >= Duration::from_millis(3_900), "links died by receive timeout, not earlier ({first:?})");
        let cut = mb.cut.load(Ordering::Relaxed) - before_cut;
        eprintln!("{b:?}: no-PING pool: 6 reconnects in {cycle:?}, {cut} flows cut by the middlebox");
        assert!(cut >= 6, "the middlebox cut the idle flows ({cut})");
        assert!(cycle >= Duration::from_secs(8), "a round takes cut-off + receive timeout ({cycle:?})");
        r.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_from_a_draining_egress_moves_an_active_download_without_losing_bytes() {
    for b in testkit::backends() {
        let e = egress(b, |c| c.drain.grace = Duration::from_secs(30)).await;
        let (server, digest) = testkit::http_server(64 << 20, 44).await;
        let r = relay(egress_url(&e), 1).await;
        let c = consumer(&e, &[r.url()]).await;
        let download = {
            let url = format!("http://localhost:{}/file", server.port());
            let proxy = format!("socks5h://{}", c.socks_addr.unwrap());
            tokio::task::spawn_blocking(move || {
                std::process::Command::new("curl")
                    .args([
                        "--silent",
                        "--show-error",
                        "--fail",
                        "--max-time",
                        "120",
                        "--output",
                        "-",
                        "--proxy",
                        &proxy,
                        &url,
                    ])
                    .output()
            })
        };
        let conn = c.consumer.connection.clone();
        wait_for(|| conn.stats().udp_rx.bytes > 8 << 20, "download under way").await;
        e.drain();
        let out = download.await.unwrap().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(testkit::sha256_hex(&out.stdout), digest, "no byte lost");
        assert_eq!(r.stats.goaways.load(Ordering::Relaxed), 1);
        assert!(r.stats.routes_migrated.load(Ordering::Relaxed) >= 1, "the route moved to the new connection");
        assert_eq!(Stats::get(&e.shared().stats.resumptions), 1, "the draining egress admitted the replacement");
        assert_eq!(Stats::get(&e.shared().stats.quic_connections), 1);
        assert!(c.consumer.connection.close_reason().is_none());
    }
}
