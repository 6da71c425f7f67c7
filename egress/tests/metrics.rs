//! The admin listener under load: counters move as the traffic did, and the exposition is
//! valid Prometheus text (checked by the real `promtool`). Its own test binary, because the
//! metrics recorder is process-global.

use broflake_client::consumer::{Consumer, ConsumerConfig};
use broflake_client::link::{Link, LinkConfig, TlsMode};
use broflake_egress::config::Backend;
use broflake_egress::Egress;
use broflake_proto::Role;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_as_the_traffic_did_and_promtool_accepts_the_output() {
    let mut cfg = testkit::egress_config(Backend::Tokio);
    cfg.admin.listen = Some("127.0.0.1:0".parse().unwrap());
    let e = Egress::start(cfg).await.unwrap();
    let admin = e.admin_addr.unwrap();
    assert_eq!(get(admin, "/live").await.0, 200);
    assert_eq!(get(admin, "/ready").await.0, 200);
    assert_eq!(get(admin, "/nope").await.0, 404);
    let (_, before) = get(admin, "/metrics").await;

    // Load: 5 pinging relays, a consumer with one good and one forbidden request, a refusal.
    let mut links = Vec::new();
    for _ in 0..5 {
        links.push(Link::connect(LinkConfig::new(format!("ws://{}/broflake", e.ws_addrs[0]))).await.unwrap());
    }
    let mut lc = LinkConfig::new(format!("ws://{}/broflake", e.ws_addrs[0]));
    lc.client.role = Role::CONSUMER;
    let qc = ConsumerConfig { tls: TlsMode::Pinned(e.fingerprint.clone()), ..ConsumerConfig::default() };
    let c = Consumer::connect(Link::connect(lc).await.unwrap(), &qc).await.unwrap();
    let (server, _) = testkit::http_server(1 << 20, 5).await;
    let (mut send, mut recv) = c.open("127.0.0.1", server.port()).await.unwrap();
    send.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let body = recv.read_to_end(4 << 20).await.unwrap();
    assert!(body.len() > 1 << 20);
    assert!(c.open("10.0.0.1", 80).await.is_err());
    let mut bad = LinkConfig::new(format!("ws://{}/broflake", e.ws_addrs[0]));
    bad.client.min_version = 7;
    bad.client.max_version = 7;
    assert!(Link::connect(bad).await.is_err());
    tokio::time::sleep(Duration::from_millis(2500)).await; // a couple of PING intervals (1 s)

    let (status, after) = get(admin, "/metrics").await;
    assert_eq!(status, 200);
    let delta = |name: &str, labels: &[(&str, &str)]| {
        testkit::prom_value(&after, name, labels) - testkit::prom_value(&before, name, labels)
    };
    assert!(delta("broflake_handshakes_total", &[("result", "accepted")]) >= 6.0);
    assert!(delta("broflake_refusals_total", &[("reason", "unsupported_version")]) >= 1.0);
    assert!(delta("broflake_frames_received_total", &[("type", "ping")]) >= 10.0, "5 links × ≥2 PINGs");
    assert!(delta("broflake_frames_sent_total", &[("type", "pong")]) >= 10.0);
    assert!(delta("broflake_frames_received_total", &[("type", "data")]) >= 10.0);
    assert!(delta("broflake_proxy_dials_total", &[("result", "ok")]) >= 1.0);
    assert!(delta("broflake_proxy_dials_total", &[("result", "policy_refused")]) >= 1.0);
    assert!(delta("broflake_proxy_bytes_total", &[("direction", "downstream")]) >= (1 << 20) as f64);
    assert!(delta("broflake_bytes_received_total", &[]) > 0.0);
    assert!(testkit::prom_value(&after, "broflake_connections", &[("backend", "tokio"), ("state", "open")]) >= 6.0);
    assert_eq!(testkit::prom_value(&after, "broflake_liveness_mode", &[("mode", "userspace")]), 1.0);
    assert!(testkit::prom_value(&after, "broflake_quic_connections_total", &[]) >= 1.0);
    assert!(testkit::prom_value(&after, "broflake_open_fds", &[]) > 10.0);
    assert!(testkit::prom_value(&after, "broflake_liveness_sweeps_total", &[]) > 10.0);

    let dir = testkit::temp_dir("metrics");
    std::fs::write(dir.join("metrics.txt"), &after).unwrap();
    if std::env::var_os("BROFLAKE_METRICS_OUT").is_some() {
        std::fs::write(std::env::var("BROFLAKE_METRICS_OUT").unwrap(), &after).unwrap();
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed by the test command (Debian package prometheus)");
    promtool.stdin.take().unwrap().write_all(after.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every metric a dashboard panel or alert rule queries is one the egress exports.
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let checker = format!("{root}/deploy/tests/dashboard_metrics.py");
    if std::path::Path::new(&checker).exists() {
        let out = Command::new("python3")
            .arg(&checker)
            .arg(dir.join("metrics.txt"))
            .arg(format!("{root}/deploy/grafana/dashboards/broflake-egress.json"))
            .arg(format!("{root}/deploy/prometheus/rules/broflake-egress.rules.yml"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dashboard/rules query metrics the egress does not export:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
