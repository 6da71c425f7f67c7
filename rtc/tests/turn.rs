//! The relayed path through a real TURN server (coturn on loopback): a relay-only peer and a
//! host-only peer open their channels through the TURN allocation.

use broflake_rtc::{CandidateKind, IceServer, Peer, RtcConfig};
use bytes::Bytes;
use std::process::{Command, Stdio};
use std::time::Duration;

struct Turn(std::process::Child);
impl Drop for Turn {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn coturn(port: u16) -> Option<Turn> {
    if Command::new("turnserver").arg("-h").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
        assert!(std::env::var("CI").is_err(), "coturn is required under CI (apt-get install coturn)");
        eprintln!("SKIPPED: turnserver (coturn) is not installed");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("rtc-turn-{}-{port}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let child = Command::new("turnserver")
        .args(["-n", "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1", "--listening-port", &port.to_string()])
        .args(["--no-tls", "--no-dtls", "--no-cli", "--lt-cred-mech", "--user", "u:p", "--realm", "test"])
        .args(["--allow-loopback-peers", "--allowed-peer-ip=127.0.0.1"])
        .arg("--log-file")
        .arg(dir.join("turn.log"))
        .arg("--pidfile")
        .arg(dir.join("turn.pid"))
        .arg("--userdb")
        .arg(dir.join("turndb"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(300));
    Some(Turn(child))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_only_peer_connects_through_turn() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_default())
        .with_test_writer()
        .try_init();
    let port = 34780 + (std::process::id() % 500) as u16;
    let Some(_turn) = coturn(port) else { return };
    let ice =
        vec![IceServer { urls: vec![format!("turn:127.0.0.1:{port}")], username: "u".into(), credential: "p".into() }];
    let relayed = RtcConfig { ice_servers: ice, relay_only: true, ..RtcConfig::default() };
    let t = std::time::Instant::now();
    let a = Peer::offer(&relayed).await.unwrap();
    eprintln!("offer with TURN gathered in {:?}", t.elapsed());
    assert!(a.candidates.iter().all(|c| c.contains("typ relay")), "{:?}", a.candidates);
    let b = Peer::answer(&RtcConfig::default(), &a.sdp).await.unwrap();
    a.set_answer(&b.sdp).await.unwrap();
    let t = std::time::Instant::now();
    let (pa, pb) = tokio::join!(a.connected(Duration::from_secs(15)), b.connected(Duration::from_secs(15)));
    eprintln!("connected through TURN in {:?}", t.elapsed());
    let (pa, mut pb) = (pa.unwrap(), pb.unwrap());
    let path = pa.path().unwrap();
    assert_eq!(path.local, CandidateKind::Relay, "{path}");
    assert!(pa.tx.send_control(Bytes::from_static(b"through the relay")).await);
    assert_eq!(pb.rx.recv().await.unwrap(), Bytes::from_static(b"through the relay"));
    // Idle, the peers' tasks sleep until their next timer: no busy loop.
    let cpu = || {
        let s = std::fs::read_to_string("/proc/self/stat").unwrap();
        let f: Vec<u64> =
            s.rsplit_once(')').unwrap().1.split_whitespace().skip(11).take(2).map(|v| v.parse().unwrap()).collect();
        f[0] + f[1]
    };
    let before = cpu();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ticks = cpu() - before;
    eprintln!("idle CPU over 2 s: {ticks} ticks");
    assert!(ticks < 20, "idle peers used {ticks} ticks of CPU in 2 s");
}
