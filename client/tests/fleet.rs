//! Two egress hosts behind one name (HAProxy in TCP mode), each in its own network namespace:
//! a consumer downloads through a volunteer whose link reached host A; the volunteer is
//! killed; the replacement's link is on host B; the download goes on over the same QUIC
//! connection, which stays at A — B forwards its packets over the fleet network.

mod common;

use common::{body_of, Lines};
use std::process::Stdio;
use std::time::{Duration, Instant};
use testkit::fleet::{host, FleetNet, FRONT};
use testkit::Proc;

const BODY: usize = 64 << 20;

/// An egress value in Prometheus text from host `i`'s admin listener.
fn metric(net: &FleetNet, i: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
    let url = format!("http://{}:9090/metrics", host(i));
    let out = net.exec(&net.front, "curl").args(["-s", &url]).output().expect("curl");
    testkit::prom_value(&String::from_utf8_lossy(&out.stdout), name, labels)
}

/// Waits until host `i` holds `n` WebSocket connections (the relay's link landed there).
fn wait_connections(net: &FleetNet, i: usize, n: f64) {
    let t = Instant::now();
    while metric(net, i, "broflake_connections", &[("state", "open")]) < n {
        assert!(t.elapsed() < Duration::from_secs(20), "host {i} did not get {n} connection(s)");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn fleet_toml(me: usize, peer: usize) -> String {
    format!(
        "[fleet]\nid = {}\nlisten = \"{}:8445\"\n\n[[fleet.peers]]\nid = {}\naddr = \"{}:8445\"\n",
        me + 1,
        host(me),
        peer + 1,
        host(peer)
    )
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn a_download_survives_its_volunteer_moving_to_another_egress_host() {
    if let Some(why) = testkit::fleet::unavailable() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let net = FleetNet::new("fl", 2);
    let dir = testkit::temp_dir("fleet");
    let egress_bin = testkit::workspace_bin("broflake-egress", "egress");

    // Two hosts, one identity: consumers pin one certificate whichever host they reach. A
    // writes it; B starts from a copy. A on io_uring, B on tokio: a mixed fleet.
    let mut hosts = Vec::new();
    let mut fingerprints = Vec::new();
    for (i, backend) in [(0, "uring"), (1, "tokio")] {
        let state = dir.join(format!("egress-{i}"));
        if i == 1 {
            copy_dir(&dir.join("egress-0"), &state);
        }
        std::fs::write(dir.join(format!("egress-{i}.toml")), fleet_toml(i, 1 - i)).unwrap();
        let mut e = Proc::spawn(
            net.exec(&net.hosts[i], &egress_bin)
                .arg("--config")
                .arg(dir.join(format!("egress-{i}.toml")))
                .args(["--ws", &format!("{}:8080", host(i)), "--no-wss", "--admin", &format!("{}:9090", host(i))])
                .args(["--backend", backend, "--liveness", "userspace", "--allow", "10.88.0.0/24", "--state-dir"])
                .arg(&state)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        );
        let fp = Lines::of(e.stdout.take().expect("piped"), if i == 0 { "egress-a" } else { "egress-b" })
            .wait("certificate sha256", Duration::from_secs(30));
        fingerprints.push(fp.rsplit(' ').next().expect("a hash").to_string());
        hosts.push(e);
    }
    assert_eq!(fingerprints[0], fingerprints[1], "both hosts present the same certificate");

    // One name in front: the first link goes to A (one connection at most there), the next to B.
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\n\
             frontend egress\n  bind {FRONT}:8080\n  default_backend hosts\n\n\
             backend hosts\n  balance first\n  server a {}:8080 maxconn 1\n  server b {}:8080 maxconn 1000\n",
            host(0),
            host(1)
        ),
    )
    .unwrap();
    let _haproxy = Proc::spawn(
        net.exec(&net.front, "haproxy").arg("-db").arg("-f").arg(&cfg).stdout(Stdio::null()).stderr(Stdio::inherit()),
    );

    // The origin, in front.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let listener = net.listen(&net.front, (FRONT, 8000).into());
    let sha = {
        let _enter = rt.enter();
        testkit::serve_http(tokio::net::TcpListener::from_std(listener).unwrap(), BODY, 7)
    };

    // Two volunteers (relays with one link each) through the one name: the first lands on A,
    // the second on B.
    let upstream = format!("ws://{FRONT}:8080/broflake");
    let relay = |port: u16, tag: &'static str| {
        let mut r = Proc::spawn(
            net.exec(&net.front, env!("CARGO_BIN_EXE_broflake"))
                .args(["relay", "--upstream", &upstream, "--pool", "1", "--listen", &format!("{FRONT}:{port}")])
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        );
        let line = Lines::of(r.stderr.take().expect("piped"), tag).wait("relay listening on", Duration::from_secs(20));
        (r, line.rsplit(' ').next().expect("a URL").to_string())
    };
    let (v1, url1) = relay(9101, "volunteer-1");
    wait_connections(&net, 0, 1.0);
    let (_v2, url2) = relay(9102, "volunteer-2");
    wait_connections(&net, 1, 1.0);

    let mut consumer = Proc::spawn(
        net.exec(&net.front, env!("CARGO_BIN_EXE_broflake"))
            .args(["consumer", "--relay", &url1, "--relay", &url2, "--socks", &format!("{FRONT}:1080")])
            .args(["--egress-cert-sha256", &fingerprints[0]])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    );
    let via = Lines::of(consumer.stdout.take().expect("piped"), "consumer");
    via.wait(&format!("via relay {url1}"), Duration::from_secs(20));

    // 64 MiB at 16 MB/s: about 4 s, so the kill after 1.5 s is mid-download.
    let file = format!("http://{FRONT}:8000/blob");
    let curl = Proc::spawn(
        net.exec(&net.front, "curl")
            .args(["-sS", "--fail", "--max-time", "120", "--limit-rate", "16M"])
            .args(["--socks5-hostname", &format!("{FRONT}:1080"), &file, "-o", "-"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    );
    let reader = std::thread::spawn(move || body_of(curl));
    std::thread::sleep(Duration::from_millis(1500));
    drop(v1);
    via.wait(&format!("via relay {url2}"), Duration::from_secs(30));
    let (got, n) = reader.join().expect("reader");
    assert_eq!(n, BODY);
    assert_eq!(got, sha, "the body arrived intact across the change of host");

    let a_quic = metric(&net, 0, "broflake_quic_connections_total", &[]);
    let b_quic = metric(&net, 1, "broflake_quic_connections_total", &[]);
    let forwarded = metric(&net, 1, "broflake_fleet_packets_total", &[("way", "forwarded")]);
    let received = metric(&net, 0, "broflake_fleet_packets_total", &[("way", "received")]);
    let returned = metric(&net, 0, "broflake_fleet_packets_total", &[("way", "returned")]);
    let delivered = metric(&net, 1, "broflake_fleet_packets_total", &[("way", "delivered")]);
    let migrations = metric(&net, 0, "broflake_quic_migrations_total", &[]);
    eprintln!(
        "fleet: A quic connections {a_quic}, B {b_quic}; B forwarded {forwarded}, A received {received}, \
         A returned {returned}, B delivered {delivered}; A migrations {migrations}"
    );
    assert_eq!((a_quic, b_quic), (1.0, 0.0), "one QUIC handshake, at A; none at B");
    assert!(forwarded > 0.0 && received > 0.0, "B forwarded the consumer's packets to A");
    // A's endpoint sent on the forwarded route: quinn moved the connection there (the
    // migration counter itself only looks when a stream opens).
    assert!(returned > 0.0 && delivered > 0.0, "A's packets went back through B");
    drop(consumer);
}
