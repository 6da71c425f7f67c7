//! The NAT world shared by the WebRTC tests: the topology of `testkit::nat` with coturn, the
//! signaling service, the egress and an HTTP server on the public segment, and helpers to
//! start volunteers, consumers and curl in it. Every process is killed when its handle drops.
#![allow(dead_code)] // each test target uses its own part

use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use testkit::nat::{NatKind, Topology, PUBLIC};
use testkit::Proc;

pub const BODY: usize = 64 << 20;
pub const SIGNAL: &str = "ws://203.0.113.10:8090/v1/signal";
pub const EGRESS: &str = "ws://203.0.113.10:8080/broflake";
pub const FILE_URL: &str = "http://203.0.113.10:8000/blob";

/// `--log FILTER` when NAT_TEST_LOG is set (e.g. `info,broflake_rtc=debug,is=debug`), else
/// nothing: the CLI's default.
pub fn log_args() -> Vec<String> {
    std::env::var("NAT_TEST_LOG").map(|f| vec!["--log".to_string(), f]).unwrap_or_default()
}

/// Lines a process writes, read on a thread (stdout or stderr), also echoed for the log.
pub struct Lines(pub mpsc::Receiver<String>);

impl Lines {
    pub fn of(r: impl Read + Send + 'static, tag: &'static str) -> Lines {
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
    pub fn wait(&self, what: &str, limit: Duration) -> String {
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

pub struct World {
    /// Serves the HTTP body (the tests themselves are synchronous).
    _rt: tokio::runtime::Runtime,
    pub topo: Topology,
    _services: Vec<Proc>,
    pub fingerprint: String,
    pub sha: String,
    /// The body's length.
    pub body: usize,
    pub dir: std::path::PathBuf,
}

pub fn start(tag: &str, kind: NatKind, backend: &str) -> Option<World> {
    start_with(tag, kind, backend, "", BODY)
}

/// As [`start`], with `egress_toml` (if not empty) as the egress's configuration file and a
/// body of `body` bytes.
pub fn start_with(tag: &str, kind: NatKind, backend: &str, egress_toml: &str, body: usize) -> Option<World> {
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
    let mut egress_cmd = topo.exec(&p, testkit::workspace_bin("broflake-egress", "egress"));
    if !egress_toml.is_empty() {
        std::fs::write(dir.join("egress.toml"), egress_toml).expect("egress config");
        egress_cmd.arg("--config").arg(dir.join("egress.toml"));
    }
    let mut egress = Proc::spawn(
        egress_cmd
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
        testkit::serve_http(tokio::net::TcpListener::from_std(listener).expect("tokio listener"), body, 42)
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
    Some(World { _rt: rt, topo, _services: services, fingerprint, sha, body, dir })
}

impl World {
    /// A volunteer behind NAT B; returns it with its log once it is registered.
    pub fn volunteer(&self, tag: &'static str) -> (Proc, Lines) {
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
    pub fn consumer(&self) -> (Proc, Lines) {
        self.consumer_on("127.0.0.1:1080")
    }

    /// A consumer behind NAT A with its SOCKS proxy on `socks` there.
    pub fn consumer_on(&self, socks: &str) -> (Proc, Lines) {
        let mut c = Proc::spawn(
            self.topo
                .exec(&self.topo.a, env!("CARGO_BIN_EXE_broflake"))
                .args(["consumer", "--signal", SIGNAL, "--socks", socks])
                .args(log_args())
                .args(["--egress-cert-sha256", &self.fingerprint])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        );
        let lines = Lines::of(c.stdout.take().expect("piped"), "consumer");
        (c, lines)
    }

    /// Starts curl behind NAT A through the consumer.
    pub fn curl(&self, rate: Option<&str>) -> Proc {
        self.curl_via("127.0.0.1:1080", rate)
    }

    /// Starts curl behind NAT A through the consumer whose SOCKS proxy is `socks`.
    pub fn curl_via(&self, socks: &str, rate: Option<&str>) -> Proc {
        let mut cmd = self.topo.exec(&self.topo.a, "curl");
        cmd.args(["-sS", "--fail", "--max-time", "240", "--socks5-hostname", socks, FILE_URL, "-o", "-"]);
        if let Some(r) = rate {
            cmd.args(["--limit-rate", r]);
        }
        Proc::spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()))
    }

    pub fn metric(&self, name: &str) -> f64 {
        let out =
            self.topo.exec(&self.topo.a, "curl").args(["-s", "http://203.0.113.10:9090/metrics"]).output().unwrap();
        testkit::prom_value(&String::from_utf8_lossy(&out.stdout), name, &[])
    }
}

/// Reads curl's output to the end: its SHA-256 and length.
pub fn body_of(mut curl: Proc) -> (String, usize) {
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
pub fn kinds(via: &str) -> (String, String) {
    let field = |k: &str| {
        via.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap_or_else(|| panic!("{k} in {via:?}")).to_string()
    };
    (field("local="), field("remote="))
}
