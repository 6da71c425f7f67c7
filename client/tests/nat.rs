//! The WebRTC hop through real NATs: the consumer behind NAT A, volunteers behind NAT B
//! (nftables masquerade in router namespaces), coturn, the signaling service, the egress and
//! an HTTP server on the "public" segment; every program is the real binary.
//!
//! - endpoint-independent NATs: a direct path through the NATs (server-reflexive candidates);
//! - symmetric NATs on both sides: only the TURN relay gets through;
//! - a volunteer killed mid-download: the consumer gets another volunteer from the signaling
//!   service and its QUIC connection moves there; the download completes.
//!
//! Each downloads 64 MiB with real curl through the consumer's SOCKS proxy and checks its
//! SHA-256; both egress backends are used.

use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use testkit::nat::{NatKind, Topology, PUBLIC};
use testkit::Proc;

const BODY: usize = 64 << 20;
const SIGNAL: &str = "ws://203.0.113.10:8090/v1/signal";
const EGRESS: &str = "ws://203.0.113.10:8080/broflake";
const FILE_URL: &str = "http://203.0.113.10:8000/blob";

/// `--log FILTER` when NAT_TEST_LOG is set (e.g. `info,broflake_rtc=debug,is=debug`), else
/// nothing: the CLI's default.
fn log_args() -> Vec<String> {
    std::env::var("NAT_TEST_LOG").map(|f| vec!["--log".to_string(), f]).unwrap_or_default()
}

/// Lines a process writes, read on a thread (stdout or stderr), also echoed for the log.
struct Lines(mpsc::Receiver<String>);

impl Lines {
    fn of(r: impl Read + Send + 'static, tag: &'static str) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                eprintln!("{tag}: {line}");
                if tx.send(line).is_err() {
                    // Keep draining so the process never blocks on a full pipe.
                    continue;
                }
            }
        });
        Lines(rx)
    }

    /// The first line containing `what` within `limit`.
    fn wait(&self, what: &str, limit: Duration) -> String {
        let end = Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.0.recv_timeout(left) {
                Ok(l) if l.contains(what) => return l,
                Ok(_) => {}
                Err(_) => panic!("no line with {what:?} within {limit:?}"),
            }
        }
    }
}

struct World {
    /// Serves the HTTP body (the tests themselves are synchronous).
    _rt: tokio::runtime::Runtime,
    topo: Topology,
    _services: Vec<Proc>,
    fingerprint: String,
    sha: String,
    dir: std::path::PathBuf,
}

fn start(tag: &str, kind: NatKind, backend: &str) -> Option<World> {
    if let Some(why) = testkit::nat::unavailable() {
        eprintln!("SKIPPED: {why}");
        return None;
    }
    let topo = Topology::new(tag, kind);
    let dir = testkit::temp_dir(&format!("nat-{tag}"));
    let p = topo.public.clone();
    let mut services = Vec::new();
    let turn = Proc::spawn(
        topo.exec(&p, "turnserver")
            .args(["-n", "--listening-ip", &PUBLIC.to_string(), "--relay-ip", &PUBLIC.to_string()])
            .args(["--listening-port", "3478", "--min-port", "49152", "--max-port", "65535"])
            .args(["--no-tls", "--no-dtls", "--no-cli", "--lt-cred-mech", "--user", "broflake:test"])
            .args(["--realm", "broflake.test", "--allowed-peer-ip=203.0.113.0-203.0.113.255"])
            .arg("--log-file")
            .arg(dir.join("turn.log"))
            .arg("--pidfile")
            .arg(dir.join("turn.pid"))
            .arg("--userdb")
            .arg(dir.join("turndb"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    services.push(turn);
    let mut signal = Proc::spawn(
        topo.exec(&p, testkit::workspace_bin("broflake-signal", "signal"))
            .args(["--listen", "203.0.113.10:8090", "--admin", "off", "--stun", "stun:203.0.113.10:3478"])
            .args(["--turn", "turn:203.0.113.10:3478?transport=udp,broflake,test"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    Lines::of(signal.stdout.take().expect("piped"), "signal").wait("signaling on", Duration::from_secs(20));
    services.push(signal);
    let mut egress = Proc::spawn(
        topo.exec(&p, testkit::workspace_bin("broflake-egress", "egress"))
            .args(["--ws", "203.0.113.10:8080", "--no-wss", "--admin", "203.0.113.10:9090", "--backend", backend])
            .args(["--liveness", "userspace", "--allow", "203.0.113.0/24", "--state-dir"])
            .arg(dir.join("egress"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let fp =
        Lines::of(egress.stdout.take().expect("piped"), "egress").wait("certificate sha256", Duration::from_secs(30));
    services.push(egress);
    let fingerprint = fp.rsplit(' ').next().expect("a hash").to_string();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let listener = topo.listen(&p, (PUBLIC, 8000).into());
    let sha = {
        let _enter = rt.enter();
        testkit::serve_http(tokio::net::TcpListener::from_std(listener).expect("tokio listener"), BODY, 42)
    };
    // coturn answers STUN from behind NAT A with router A's address.
    let t = Instant::now();
    loop {
        let out =
            topo.exec(&topo.a, "turnutils_stunclient").arg(PUBLIC.to_string()).output().expect("turnutils_stunclient");
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        if text.contains("203.0.113.2") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "coturn does not answer STUN through NAT A: {text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    Some(World { _rt: rt, topo, _services: services, fingerprint, sha, dir })
}

impl World {
    /// A volunteer behind NAT B; returns it with its log once it is registered.
    fn volunteer(&self, tag: &'static str) -> (Proc, Lines) {
        let mut v = Proc::spawn(
            self.topo
                .exec(&self.topo.b, env!("CARGO_BIN_EXE_broflake"))
                .args(["relay", "--upstream", EGRESS, "--listen", "off", "--signal", SIGNAL])
                .args(["--slots", "4", "--pool", "2"])
                .args(log_args())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        );
        let log = Lines::of(v.stderr.take().expect("piped"), tag);
        log.wait("volunteer registered", Duration::from_secs(20));
        (v, log)
    }

    /// The consumer behind NAT A with its SOCKS proxy on 127.0.0.1:1080 there; returns it with
    /// its stdout (the `via …` lines) once connected.
    fn consumer(&self) -> (Proc, Lines) {
        let mut c = Proc::spawn(
            self.topo
                .exec(&self.topo.a, env!("CARGO_BIN_EXE_broflake"))
                .args(["consumer", "--signal", SIGNAL, "--socks", "127.0.0.1:1080"])
                .args(log_args())
                .args(["--egress-cert-sha256", &self.fingerprint])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        );
        let lines = Lines::of(c.stdout.take().expect("piped"), "consumer");
        (c, lines)
    }

    /// Starts curl behind NAT A through the consumer.
    fn curl(&self, rate: Option<&str>) -> Proc {
        let mut cmd = self.topo.exec(&self.topo.a, "curl");
        cmd.args(["-sS", "--fail", "--max-time", "240", "--socks5-hostname", "127.0.0.1:1080", FILE_URL, "-o", "-"]);
        if let Some(r) = rate {
            cmd.args(["--limit-rate", r]);
        }
        Proc::spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()))
    }

    fn metric(&self, name: &str) -> f64 {
        let out =
            self.topo.exec(&self.topo.a, "curl").args(["-s", "http://203.0.113.10:9090/metrics"]).output().unwrap();
        testkit::prom_value(&String::from_utf8_lossy(&out.stdout), name, &[])
    }
}

/// Reads curl's output to the end: its SHA-256 and length.
fn body_of(mut curl: Proc) -> (String, usize) {
    let mut h = Sha256::new();
    let mut n = 0;
    let mut buf = vec![0u8; 1 << 16];
    let mut out = curl.stdout.take().expect("piped");
    loop {
        let k = out.read(&mut buf).expect("curl output");
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k;
    }
    assert!(curl.wait().expect("curl").success(), "curl failed after {n} bytes");
    (hex::encode(h.finalize()), n)
}

/// `via webrtc local=KIND ADDR remote=KIND ADDR` → (local kind, remote kind).
fn kinds(via: &str) -> (String, String) {
    let field = |k: &str| {
        via.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap_or_else(|| panic!("{k} in {via:?}")).to_string()
    };
    (field("local="), field("remote="))
}

fn download_through(tag: &str, kind: NatKind, backend: &str) -> Option<(String, String)> {
    let w = start(tag, kind, backend)?;
    let (_v, _vlog) = w.volunteer("volunteer");
    let t = Instant::now();
    let (_c, via) = w.consumer();
    let line = via.wait("via webrtc", Duration::from_secs(40));
    eprintln!("{tag}: consumer connected in {:?}: {line}", t.elapsed());
    let t = Instant::now();
    let (sha, n) = body_of(w.curl(None));
    let secs = t.elapsed().as_secs_f64();
    eprintln!("{tag}: {n} bytes in {secs:.2} s ({:.1} MB/s)", n as f64 / secs / 1e6);
    assert_eq!(n, BODY);
    assert_eq!(sha, w.sha, "the body arrived intact");
    let _ = std::fs::remove_dir_all(&w.dir);
    Some(kinds(&line))
}

#[test]
fn endpoint_independent_nats_give_a_direct_path_through_server_reflexive_candidates() {
    let Some((local, remote)) = download_through("e", NatKind::EndpointIndependent, "uring") else { return };
    assert_eq!(local, "host", "no relay on our side");
    assert_eq!(remote, "srflx", "the volunteer's NAT mapping, learned by STUN");
}

#[test]
fn symmetric_nats_fall_back_to_the_turn_relay() {
    let Some((local, remote)) = download_through("s", NatKind::Symmetric, "tokio") else { return };
    assert!(local == "relay" || remote == "relay", "a relayed candidate in the pair: local={local} remote={remote}");
}

#[test]
fn a_volunteer_killed_mid_download_is_replaced_and_the_quic_connection_moves() {
    let Some(w) = start("k", NatKind::EndpointIndependent, "uring") else { return };
    let (v1, log1) = w.volunteer("volunteer-1");
    let (c, via) = w.consumer();
    via.wait("via webrtc", Duration::from_secs(40));
    log1.wait("consumer connected over WebRTC", Duration::from_secs(10));
    let (_v2, log2) = w.volunteer("volunteer-2");
    // 64 MiB at 16 MB/s: about 4 s, so the kill after 1.5 s is mid-download.
    let curl = w.curl(Some("16M"));
    let reader = std::thread::spawn(move || body_of(curl));
    std::thread::sleep(Duration::from_millis(1500));
    drop(v1);
    let line = via.wait("via webrtc", Duration::from_secs(40));
    eprintln!("after the kill: {line}");
    log2.wait("consumer connected over WebRTC", Duration::from_secs(10));
    let (sha, n) = reader.join().expect("reader");
    assert_eq!(n, BODY);
    assert_eq!(sha, w.sha, "the body arrived intact across the failover");
    assert_eq!(w.metric("broflake_quic_connections_total"), 1.0, "one QUIC handshake: the connection migrated");
    drop(c);
}
