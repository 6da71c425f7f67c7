//! Several `signal` replicas sharing one real Redis (Debian's redis-server): a volunteer at
//! one replica serves a consumer at another; a replica killed mid-match; Redis restarted.

use broflake_signal::client::{ConsumerEvent, ConsumerRequest, RequestError, SignalConn, Volunteer, VolunteerEvent};
use broflake_signal::msg::Candidate;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

const SDP: &str = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n";
const T: Duration = Duration::from_secs(5);

/// A child process killed when the test ends however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Why these tests cannot run here (no redis-server), or `None`. Under CI it must be there.
fn unavailable() -> Option<&'static str> {
    if Command::new("redis-server").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return None;
    }
    let why = "redis-server is missing: apt-get install redis-server (cargo xtask test installs it)";
    if std::env::var_os("CI").is_some() {
        panic!("required under CI: {why}");
    }
    Some(why)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// redis-server on `port`, nothing persisted, ready when this returns.
fn redis(port: u16) -> Killed {
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start redis-server");
    let out = child.stdout.take().unwrap();
    let child = Killed(child);
    let mut lines = BufReader::new(out).lines();
    assert!(
        lines.by_ref().map_while(Result::ok).any(|l| l.contains("Ready to accept connections")),
        "redis-server did not start"
    );
    std::thread::spawn(move || lines.for_each(drop));
    child
}

/// One replica: its process, WebSocket URL, admin address and log lines.
struct Replica {
    proc: Killed,
    url: String,
    admin: String,
    log: std_mpsc::Receiver<String>,
}

impl Replica {
    fn start(name: &str, redis_port: u16) -> Replica {
        let store = format!("redis://127.0.0.1:{redis_port}/");
        let mut child = Command::new(env!("CARGO_BIN_EXE_signal"))
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--log", "info"])
            .args(["--store", &store, "--replica", name])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let proc = Killed(child);
        let url = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("signaling on ").map(str::to_string))
            .expect("the replica prints its URL");
        let (tx, log) = std_mpsc::channel();
        let tag = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("signal {tag}: {line}");
                let _ = tx.send(line);
            }
        });
        // Both lines, in whichever order they come.
        let (mut admin, mut connected) = (None, false);
        while admin.is_none() || !connected {
            let line = log.recv_timeout(Duration::from_secs(10)).expect("the admin address and the store connected");
            connected |= line.contains("shared store connected");
            if let Some(i) = line.find("admin listening on http://") {
                admin = line[i + 26..].split_whitespace().next().map(str::to_string);
            }
        }
        Replica { proc, url, admin: admin.expect("checked"), log }
    }

    /// Waits for a log line containing `what`; the line.
    fn wait_log(&mut self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(l) if l.contains(what) => return l,
                Ok(_) => {}
                Err(_) => panic!("no log line with {what:?} in 10 s"),
            }
        }
    }

    fn ready(&self) -> u16 {
        let mut s = std::net::TcpStream::connect(&self.admin).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        write!(s, "GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
    }

    async fn conn(&self) -> SignalConn {
        SignalConn::connect(&self.url, None, T).await.expect("connect")
    }
}

/// Redis and replicas "a" and "b" on it, or `None` (skipped, with the reason printed).
fn fleet() -> Option<(Killed, u16, Replica, Replica)> {
    if let Some(why) = unavailable() {
        eprintln!("skipped: {why}");
        return None;
    }
    let port = free_port();
    let redis = redis(port);
    let (a, b) = (Replica::start("a", port), Replica::start("b", port));
    Some((redis, port, a, b))
}

async fn event<E: std::fmt::Debug>(rx: &mut tokio::sync::mpsc::Receiver<E>) -> E {
    tokio::time::timeout(T, rx.recv()).await.expect("an event in time").expect("the connection is open")
}

fn cand(n: u32) -> Candidate {
    Candidate { candidate: format!("candidate:{n} 1 udp 2122260223 192.0.2.{n} 5000 typ host"), mid: Some("0".into()) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volunteer_on_one_replica_serves_a_consumer_on_the_other() {
    let Some((_redis, _, a, b)) = fleet() else { return };

    let mut v = Volunteer::register(a.conn().await, 2).await.expect("register at a");
    assert!(v.id.starts_with("a."), "a volunteer's id names its replica: {}", v.id);

    // Matched at b with the volunteer at a; offer, answer and candidates both ways.
    let mut c = ConsumerRequest::start(b.conn().await, SDP, T).await.expect("matched at b");
    let VolunteerEvent::Offer { session, sdp, .. } = event(&mut v.events).await else { panic!("expected the offer") };
    assert_eq!((session, sdp.as_str()), (c.session, SDP));
    c.sender().candidate(&cand(1)).await;
    let ev = event(&mut v.events).await;
    assert!(matches!(&ev, VolunteerEvent::Candidate { candidate, .. } if *candidate == cand(1)), "{ev:?}");
    v.handle.answer(session, SDP).await;
    v.handle.candidate(session, &cand(2)).await;
    let ev = event(&mut c.events).await;
    assert!(matches!(&ev, ConsumerEvent::Answer { sdp } if sdp == SDP), "{ev:?}");
    let ev = event(&mut c.events).await;
    assert!(matches!(&ev, ConsumerEvent::Candidate(x) if *x == cand(2)), "{ev:?}");

    // The slots are the fleet's: a consumer at a takes the volunteer's second one, and then
    // no replica has a free slot.
    let c2 = ConsumerRequest::start(a.conn().await, SDP, T).await.expect("matched at a");
    let ev = event(&mut v.events).await;
    assert!(matches!(&ev, VolunteerEvent::Offer { session, .. } if *session == c2.session), "{ev:?}");
    for r in [&a, &b] {
        match ConsumerRequest::start(r.conn().await, SDP, T).await {
            Err(RequestError::Unavailable { reason, .. }) => assert!(reason.contains("free slot"), "{reason}"),
            other => panic!("expected unavailable, got {:?}", other.map(|c| c.session)),
        }
    }

    // The volunteer's done ends the consumer's signaling at the other replica.
    v.handle.done(session).await;
    let ev = event(&mut c.events).await;
    assert!(matches!(&ev, ConsumerEvent::Closed { .. }), "{ev:?}");
    assert_eq!((a.ready(), b.ready()), (200, 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_match_the_clients_retry_on_the_other_and_succeed() {
    let Some((_redis, port, mut a, b)) = fleet() else { return };
    // The consumer's replica dies after the offer went to the volunteer.
    let mut v = Volunteer::register(b.conn().await, 1).await.expect("register at b");
    let mut c = ConsumerRequest::start(a.conn().await, SDP, T).await.expect("matched at a");
    let VolunteerEvent::Offer { session, .. } = event(&mut v.events).await else { panic!("expected the offer") };
    a.proc.0.kill().unwrap();
    a.proc.0.wait().unwrap();
    let ev = event(&mut c.events).await;
    assert!(matches!(ev, ConsumerEvent::Closed { .. }), "{ev:?}");
    // The volunteer answers an owner that is gone: it hears cancel, and its slot is free again.
    v.handle.answer(session, SDP).await;
    let ev = event(&mut v.events).await;
    assert!(matches!(&ev, VolunteerEvent::Cancel { reason, .. } if reason.contains("replica is gone")), "{ev:?}");
    // The consumer retries on the other replica and is served by the same volunteer.
    let mut c = ConsumerRequest::start(b.conn().await, SDP, T).await.expect("matched at b after a died");
    let ev = event(&mut v.events).await;
    assert!(matches!(&ev, VolunteerEvent::Offer { session, .. } if *session == c.session), "{ev:?}");
    v.handle.answer(c.session, SDP).await;
    assert!(matches!(event(&mut c.events).await, ConsumerEvent::Answer { .. }));
    drop((v, c));

    // The volunteer's replica dies after the offer reached it: the volunteer registers again
    // at the other; the consumer's session moves on to it (no new request).
    let a = Replica::start("a2", port);
    let mut v = Volunteer::register(a.conn().await, 1).await.expect("register at a2");
    let mut c = ConsumerRequest::start(b.conn().await, SDP, T).await.expect("matched at b");
    let VolunteerEvent::Offer { session, .. } = event(&mut v.events).await else { panic!("expected the offer") };
    drop(a);
    let ev = event(&mut v.events).await;
    assert!(matches!(ev, VolunteerEvent::Closed { .. }), "{ev:?}");
    let mut v = Volunteer::register(b.conn().await, 1).await.expect("register again at b");
    // The next message for the old volunteer finds its replica gone: the offer moves on.
    c.sender().candidate(&cand(3)).await;
    let ev = event(&mut v.events).await;
    assert!(matches!(&ev, VolunteerEvent::Offer { session: s, .. } if *s == session), "same session: {ev:?}");
    let ev = event(&mut v.events).await;
    assert!(matches!(&ev, VolunteerEvent::Candidate { candidate, .. } if *candidate == cand(3)), "{ev:?}");
    v.handle.answer(session, SDP).await;
    assert!(matches!(event(&mut c.events).await, ConsumerEvent::Answer { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_replicas_report_not_ready_answer_at_once_and_recover() {
    let Some((redis_proc, port, mut a, mut b)) = fleet() else { return };
    let mut v = Volunteer::register(a.conn().await, 1).await.expect("register at a");
    assert_eq!((a.ready(), b.ready()), (200, 200));

    drop(redis_proc);
    a.wait_log("shared store lost");
    b.wait_log("shared store lost");
    assert_eq!((a.ready(), b.ready()), (503, 503), "not ready while Redis is away");
    // A consumer meanwhile hears "unavailable" at once instead of waiting.
    let t = Instant::now();
    match ConsumerRequest::start(b.conn().await, SDP, T).await {
        Err(RequestError::Unavailable { .. }) => {}
        other => panic!("expected unavailable, got {:?}", other.map(|c| c.session)),
    }
    assert!(t.elapsed() < Duration::from_secs(2), "answered in {:?}", t.elapsed());

    // A new, empty Redis on the same port: both reconnect, the volunteer at a is announced
    // again without registering again, and a consumer at b is matched with it.
    let _redis = redis(port);
    a.wait_log("shared store connected");
    b.wait_log("shared store connected");
    assert_eq!((a.ready(), b.ready()), (200, 200));
    let c = ConsumerRequest::start(b.conn().await, SDP, T).await.expect("matched after the restart");
    let ev = event(&mut v.events).await;
    assert!(matches!(&ev, VolunteerEvent::Offer { session, .. } if *session == c.session), "{ev:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_under_its_id_leaves_no_volunteer_of_its_predecessor_to_pick() {
    let Some((_redis, port, a, b)) = fleet() else { return };
    let mut old = Volunteer::register(a.conn().await, 1).await.expect("register at a");
    // Killed: it never tells the store that its volunteer is gone.
    drop(a);
    assert!(matches!(event(&mut old.events).await, VolunteerEvent::Closed { .. }));
    // The same id again (a pod name kept across a container restart).
    let _a = Replica::start("a", port);
    let mut v = Volunteer::register(b.conn().await, 1).await.expect("register at b");
    // The predecessor's volunteer, first in the round robin, is not offered this session:
    // the new volunteer hears the offer at once, not after an answer timeout (10 s).
    let c = ConsumerRequest::start(b.conn().await, SDP, T).await.expect("matched");
    let ev = event(&mut v.events).await;
    assert!(matches!(&ev, VolunteerEvent::Offer { session, .. } if *session == c.session), "{ev:?}");
}
