//! The Grafana dashboard and the alert rules, proven with data: real Prometheus (the Debian
//! package) scrapes an egress under load every second; every panel query of
//! deploy/grafana/dashboards/broflake-egress.json must return data (or be listed below as
//! empty by design, with the reason), and the alert rules of deploy/prometheus/rules fire
//! where the test drives their condition. Its own test binary: the metrics recorder is
//! process-global.

use broflake_client::consumer::{Consumer, ConsumerConfig};
use broflake_client::link::{Link, LinkConfig, TlsMode};
use broflake_egress::config::Backend;
use broflake_egress::Egress;
use broflake_proto::{ClientConfig, ClientSession, Role, Timestamp};
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/dashboards/broflake-egress.json");
const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus/rules/broflake-egress.rules.yml");

/// Panel queries allowed to return nothing in this test, with the reason. None today: every
/// series the dashboard uses is registered at start (the XDP ones at 0 in userspace mode),
/// so an empty panel means a renamed or missing metric.
const EMPTY_BY_DESIGN: &[(&str, &str)] = &[];

/// Alerts this test does not drive, and why (their rule logic is unit-tested by promtool in
/// deploy/tests/check.sh).
const NOT_DRIVEN: &[(&str, &str)] = &[
    ("BroflakeFdExhaustion", "needs 90 % of the descriptor limit in use"),
    ("BroflakeQuicPacketDrops", "needs a congested connection dropping 1 % of packets"),
    ("BroflakeXdpFlowMapNearlyFull", "needs xdp mode with a 90 % full flow map"),
];

fn pct(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split_once("\r\n\r\n").map(|b| b.1.to_string()).unwrap_or_default())
}

async fn query(prom: SocketAddr, q: &str) -> Vec<Value> {
    let (status, body) = http_get(prom, &format!("/api/v1/query?query={}", pct(q))).await;
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{q}: {e}: {body}"));
    assert_eq!(status, 200, "{q}: {body}");
    assert_eq!(v["status"], "success", "{q}: {body}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// Firing alerts: (name, labels).
async fn firing(prom: SocketAddr) -> Vec<(String, Value)> {
    let (_, body) = http_get(prom, "/api/v1/alerts").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    v["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "firing")
        .map(|a| (a["labels"]["alertname"].as_str().unwrap().to_string(), a["labels"].clone()))
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn dashboard_queries() -> Vec<(String, String)> {
    let d: Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                let e = e.replace("$job", ".*").replace("$instance", ".*").replace("$__rate_interval", "30s");
                out.push((p["title"].as_str().unwrap_or("?").to_string(), e));
            }
        }
    }
    out
}

/// Keeps conditions going while Prometheus watches: clients that handshake and go silent
/// (idle reaping; once the limit is reached, refusals with server_full), bad upgrade
/// requests, failing DNS lookups.
async fn drive(ws: SocketAddr, consumer: std::sync::Arc<Consumer>, stop: tokio::sync::watch::Receiver<bool>) {
    use futures_util::{SinkExt, StreamExt};
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while !*stop.borrow() {
        tick.tick().await;
        tokio::spawn(async move {
            let Ok(Ok(mut c)) = tokio::time::timeout(Duration::from_secs(2), testkit::raw_ws(ws, "broflake.v1")).await
            else {
                return;
            };
            let mut hello = Vec::new();
            ClientSession::new(1).start(&ClientConfig::default(), Timestamp(0), &mut hello);
            let _ = c.send(Message::Binary(hello.into())).await;
            // Silent from now on: WELCOME (then an idle close) or REFUSE.
            while let Some(Ok(_)) = c.next().await {}
        });
        if let Ok(mut s) = tokio::net::TcpStream::connect(ws).await {
            let _ = s.write_all(b"HELLO THERE\r\n\r\n").await;
        }
        let c = consumer.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(3), c.open("no-such-host.invalid", 80)).await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_panels_have_data_and_alerts_fire_when_driven() {
    if Command::new("prometheus").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
        panic!("Prometheus is needed: `apt-get install prometheus` (cargo xtask test installs it)");
    }
    let mut cfg = testkit::egress_config(Backend::Tokio);
    cfg.admin.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.limits.max_connections = 25;
    cfg.limits.max_connections_per_ip = 1000;
    let e = Egress::start(cfg).await.unwrap();
    let admin = e.admin_addr.unwrap();
    let ws = e.ws_addrs[0];
    let url = format!("ws://{ws}/broflake");

    // Steady load: pinging relays and a consumer downloading through one of them.
    let mut links = Vec::new();
    for _ in 0..4 {
        links.push(Link::connect(LinkConfig::new(url.clone())).await.unwrap());
    }
    let mut lc = LinkConfig::new(url.clone());
    lc.client.role = Role::CONSUMER;
    let qc = ConsumerConfig { tls: TlsMode::Pinned(e.fingerprint.clone()), ..ConsumerConfig::default() };
    let consumer = std::sync::Arc::new(Consumer::connect(Link::connect(lc).await.unwrap(), &qc).await.unwrap());
    let (server, _) = testkit::http_server(256 << 10, 3).await;
    let dl = consumer.clone();
    let downloads = tokio::spawn(async move {
        loop {
            if let Ok((mut send, mut recv)) = dl.open("127.0.0.1", server.port()).await {
                let _ = send.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
                let _ = recv.read_to_end(1 << 20).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let driver = tokio::spawn(drive(ws, consumer.clone(), stop_rx));

    // Prometheus: 1 s scrapes and evaluations, the shipped rules with `for` set to 0 (the
    // test cannot wait minutes; the conditions are what is under test). A second target
    // that nothing serves stands for an egress that is down; the egress is labelled as one
    // expected to run xdp liveness (it runs userspace here).
    let dir = testkit::temp_dir("prometheus");
    let rules = std::fs::read_to_string(RULES).unwrap();
    let rules: String = rules
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("for:") {
                l.split("for:").next().unwrap().to_string() + "for: 0s"
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join("rules.yml"), rules).unwrap();
    let down = free_port();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - rules.yml\n\
             scrape_configs:\n  - job_name: broflake-egress\n    static_configs:\n      - targets: ['{admin}']\n\
             \x20       labels:\n          expected_liveness: xdp\n      - targets: ['127.0.0.1:{down}']\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let prom_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let _prom = testkit::Proc::spawn(
        Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let start = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(prom_addr).await.is_ok() && http_get(prom_addr, "/-/ready").await.0 == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "Prometheus did not become ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Enough scrapes for rates over 30 s windows.
    loop {
        let r = query(prom_addr, &format!("count_over_time(up{{instance=\"{admin}\"}}[1m])")).await;
        if r.first().and_then(|v| v["value"][1].as_str()).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0) >= 12.0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(90), "Prometheus is not scraping the egress");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Every dashboard panel query.
    let mut empty = Vec::new();
    let queries = dashboard_queries();
    assert!(queries.len() >= 30, "the dashboard lost panels");
    for (title, q) in &queries {
        let r = query(prom_addr, q).await;
        let by_design = EMPTY_BY_DESIGN.iter().find(|(series, _)| q.contains(series));
        match (r.is_empty(), by_design) {
            (false, _) => eprintln!("panel ok     {title}: {q} → {} series", r.len()),
            (true, Some((_, why))) => {
                eprintln!("panel empty  {title}: {q} (by design: {why})");
                empty.push(q.clone());
            }
            (true, None) => panic!("panel {title:?} has no data: {q}"),
        }
    }
    // Data, not just series: the load is visible.
    let value =
        |r: &[Value]| r.first().and_then(|v| v["value"][1].as_str()).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    assert!(value(&query(prom_addr, "sum(broflake_connections)").await) >= 5.0);
    assert!(value(&query(prom_addr, "sum(rate(broflake_proxy_bytes_total[30s]))").await) > 0.0);
    assert!(value(&query(prom_addr, "sum(rate(broflake_handshakes_total[30s]))").await) > 0.0);

    // Alerts driven above fire.
    let want = [
        ("BroflakeEgressDown", None),
        ("BroflakeRefusalSpike", Some(("reason", "server_full"))),
        ("BroflakeUpgradeRefusalSpike", Some(("reason", "bad_request"))),
        ("BroflakeXdpFallback", Some(("mode", "userspace"))),
        ("BroflakeIdleReapingSpike", Some(("source", "userspace"))),
        ("BroflakeProxyDnsFailures", None),
    ];
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < want.len() {
        for (name, labels) in firing(prom_addr).await {
            for (w, label) in &want {
                if name == *w && label.is_none_or(|(k, v)| labels[k] == v) {
                    seen.insert(*w);
                }
            }
        }
        if Instant::now() > deadline {
            let missing: Vec<_> = want.iter().map(|w| w.0).filter(|w| !seen.contains(w)).collect();
            panic!("alerts that should fire do not: {missing:?}; firing: {:?}", firing(prom_addr).await);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Draining: BroflakeDrainStuck.
    e.drain();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !firing(prom_addr).await.iter().any(|(n, _)| n == "BroflakeDrainStuck") {
        assert!(Instant::now() < deadline, "BroflakeDrainStuck does not fire while draining");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    seen.insert("BroflakeDrainStuck");
    let _ = stop_tx.send(true);
    driver.abort();
    downloads.abort();
    eprintln!("alerts fired: {seen:?}");
    eprintln!("alerts not driven: {NOT_DRIVEN:?}");
    eprintln!("panels empty by design: {empty:?}");
    // Every rule is either driven here or listed with a reason.
    let rules = std::fs::read_to_string(RULES).unwrap();
    for name in rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        assert!(
            seen.contains(name) || NOT_DRIVEN.iter().any(|(n, _)| *n == name),
            "alert {name} is neither driven by this test nor listed in NOT_DRIVEN"
        );
    }
}
