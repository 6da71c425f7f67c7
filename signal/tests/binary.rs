//! The `signal` binary itself: check-config, print-config, the admin endpoints and drain on
//! SIGTERM, as an operator meets them.

use broflake_signal::client::{ConsumerRequest, SignalConn, Volunteer, VolunteerEvent};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SDP: &str = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n";

fn signal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_signal"))
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("broflake-signal-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The service process, killed when the test ends however it ends.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the service with `args` (stdout piped, for the URL it prints); the process and the URL.
fn start(args: &[&str], stderr: Stdio) -> (Service, String) {
    let mut child = signal().args(args).stdout(Stdio::piped()).stderr(stderr).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let service = Service(child);
    // The URL on stdout (for scripts).
    let url = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("signaling on ").map(str::to_string))
        .expect("the service prints its URL");
    (service, url)
}

/// Waits for the service to exit; its status.
async fn exit_status(service: Service) -> std::process::ExitStatus {
    let mut service = service;
    tokio::task::spawn_blocking(move || {
        let s = service.0.wait().unwrap();
        drop(service);
        s
    })
    .await
    .unwrap()
}

/// `GET path` on the admin listener: (status code, body).
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

#[test]
fn check_config_accepts_good_files_and_names_the_mistake() {
    let dir = temp_dir("check-config");
    let good = dir.join("good.toml");
    std::fs::write(&good, "[listen]\naddr = \"127.0.0.1:8090\"\n[drain]\ngrace = \"3s\"\n").unwrap();
    let out = signal().arg("check-config").arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[listen]\nadr = \"127.0.0.1:8090\"\n").unwrap();
    let out = signal().arg("check-config").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `adr`"), "{err}");

    // print-config: the effective configuration with the flags applied, and it parses back.
    let out = signal().args(["--admin", "off", "--stun", "stun:198.51.100.7:3478", "print-config"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("stun:198.51.100.7:3478"), "{text}");
    let printed = dir.join("printed.toml");
    std::fs::write(&printed, &text).unwrap();
    assert!(signal().arg("check-config").arg(&printed).status().unwrap().success());

    // A malformed flag is refused with the reason, before anything listens.
    let out = signal().args(["--turn", "turn:198.51.100.7:3478", "print-config"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected URL,USER,PASSWORD"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_answer_and_sigterm_drains() {
    let dir = temp_dir("drain");
    let config = dir.join("signal.toml");
    std::fs::write(&config, "[drain]\ngrace = \"20s\"\n").unwrap();
    let cfg = config.to_str().unwrap();
    let args = ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--log", "info", "--config", cfg];
    let (mut service, url) = start(&args, Stdio::piped());
    let stderr = service.0.stderr.take().unwrap();
    let (log_tx, log_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("signal: {line}");
            let _ = log_tx.send(line);
        }
    });
    let admin = loop {
        let line = log_rx.recv_timeout(Duration::from_secs(10)).expect("the admin listener is logged");
        if let Some(i) = line.find("admin listening on http://") {
            let rest = &line[i + "admin listening on http://".len()..];
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };

    let a = admin.clone();
    let (live, ready) = tokio::task::spawn_blocking(move || (get(&a, "/live"), get(&a, "/ready"))).await.unwrap();
    assert_eq!(live.0, 200, "{live:?}");
    assert_eq!(ready.0, 200, "{ready:?}");

    let conn = SignalConn::connect(&url, None, Duration::from_secs(5)).await.expect("connect");
    let mut volunteer = Volunteer::register(conn, 3).await.expect("register");
    let a = admin.clone();
    let metrics = tokio::task::spawn_blocking(move || get(&a, "/metrics")).await.unwrap();
    assert_eq!(metrics.0, 200);
    assert!(metrics.1.lines().any(|l| l == "broflake_signal_volunteers 1"), "{}", metrics.1);
    assert!(metrics.1.lines().any(|l| l == "broflake_signal_free_slots 3"), "{}", metrics.1);

    // A session in progress: a consumer matched to the volunteer, not yet done.
    let conn = SignalConn::connect(&url, None, Duration::from_secs(5)).await.expect("connect");
    let request = ConsumerRequest::start(conn, SDP, Duration::from_secs(5)).await.expect("matched");
    let ev = tokio::time::timeout(Duration::from_secs(5), volunteer.events.recv()).await.expect("offer in time");
    assert!(matches!(&ev, Some(VolunteerEvent::Offer { session, .. }) if *session == request.session), "{ev:?}");

    let t = Instant::now();
    let pid = service.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    // The volunteer hears GOAWAY at once and keeps its connection (SIGNALING.md §10).
    let ev = tokio::time::timeout(Duration::from_secs(5), volunteer.events.recv()).await.expect("goaway in time");
    assert!(matches!(ev, Some(VolunteerEvent::Goaway { .. })), "{ev:?}");
    let a = admin.clone();
    let ready = tokio::task::spawn_blocking(move || get(&a, "/ready")).await.unwrap();
    assert_eq!(ready.0, 503, "not ready while draining: {ready:?}");
    // A new volunteer is turned away with GOAWAY while it drains.
    let conn = SignalConn::connect(&url, None, Duration::from_secs(5)).await.expect("connect while draining");
    let Err(refused) = Volunteer::register(conn, 1).await else { panic!("registered while draining") };
    assert!(refused.to_string().contains("draining"), "{refused:#}");

    // The session goes on through the drain; once it is done the service exits, well before the
    // grace is over, with status 0.
    volunteer.handle.done(request.session).await;
    let status = exit_status(service).await;
    assert!(status.success(), "{status}");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(10), "exited when the last session was done, not at the grace: {took:?}");
    drop((volunteer, request));
}

/// With no session in progress the service exits at once on SIGTERM, and still every volunteer
/// hears GOAWAY first and then a WebSocket close, rather than a dropped connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_no_session_in_progress_still_tells_every_volunteer() {
    const VOLUNTEERS: usize = 20;
    let (service, url) = start(&["--listen", "127.0.0.1:0", "--admin", "off", "--log", "info"], Stdio::inherit());
    let mut volunteers = Vec::new();
    for _ in 0..VOLUNTEERS {
        let conn = SignalConn::connect(&url, None, Duration::from_secs(5)).await.expect("connect");
        volunteers.push(Volunteer::register(conn, 1).await.expect("register"));
    }
    let pid = service.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    for (i, v) in volunteers.iter_mut().enumerate() {
        let ev = tokio::time::timeout(Duration::from_secs(5), v.events.recv()).await.expect("an event in time");
        assert!(matches!(ev, Some(VolunteerEvent::Goaway { .. })), "volunteer {i}: {ev:?}");
        let ev = tokio::time::timeout(Duration::from_secs(5), v.events.recv()).await.expect("the close in time");
        // A WebSocket close (1001), not a connection dropped mid-stream.
        assert!(
            matches!(&ev, Some(VolunteerEvent::Closed { reason }) if reason == "closed by the service"),
            "volunteer {i}: {ev:?}"
        );
    }
    let status = exit_status(service).await;
    assert!(status.success(), "{status}");
}
