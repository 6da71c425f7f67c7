//! The browser volunteer (web/src/volunteer.js) in Debian's Chromium, running in the
//! namespace behind NAT B of the NAT topology, serving native consumers behind NAT A:
//!
//! curl → consumer (NAT A) → WebRTC → Chromium volunteer (NAT B) → WebSocket → egress → HTTP
//!
//! - a direct path through endpoint-independent NATs, and the TURN relay through symmetric
//!   ones, 64 MiB each with its SHA-256 and the selected candidate pair's types;
//! - three consumers at once through one tab;
//! - the tab hidden for 4× a middlebox's cut-off while a consumer downloads;
//! - the tab closed mid-download: the consumer moves to a native volunteer and completes.
//!
//! The tab is driven by web/tools/volunteer-tab.mjs (one JSON command per line).

mod common;

use common::{body_of, kinds, start_with, Lines, World, EGRESS, SIGNAL};
use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::process::{ChildStdin, Stdio};
use std::time::{Duration, Instant};
use testkit::nat::NatKind;
use testkit::Proc;

fn web_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web")
}

/// Why Chromium cannot run here, if it cannot. Installs web/'s npm packages when missing, as
/// `cargo xtask test` does; under CI a missing piece fails the test.
fn browser_unavailable() -> Option<String> {
    let why = if !std::path::Path::new("/usr/bin/chromium").exists() {
        Some("Chromium is missing: apt-get install chromium (cargo xtask test installs it)".to_string())
    } else if std::process::Command::new("node").arg("--version").output().is_err() {
        Some("node is missing: apt-get install nodejs npm".to_string())
    } else if !web_dir().join("node_modules/playwright-core").exists()
        && !std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(web_dir())
            .status()
            .is_ok_and(|s| s.success())
    {
        Some("`npm ci` in web/ failed".to_string())
    } else {
        None
    };
    if let (Some(w), Ok(_)) = (&why, std::env::var("CI")) {
        panic!("required under CI: {w}");
    }
    why
}

/// Bodies for the tests that are about something else than volume: one tab relays about
/// 2 MB/s on this machine (docs/BENCHMARKS.md).
const SMALL: usize = 16 << 20;

/// One tab at a time: each keeps a core busy while it relays, and the machines that run
/// these have two.
static ONE_TAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_tab() -> std::sync::MutexGuard<'static, ()> {
    ONE_TAB.lock().unwrap_or_else(|e| e.into_inner())
}

fn world(tag: &str, kind: NatKind, egress_toml: &str, body: usize) -> Option<World> {
    if let Some(why) = browser_unavailable() {
        eprintln!("SKIPPED: {why}");
        return None;
    }
    start_with(tag, kind, "tokio", egress_toml, body)
}

/// The volunteer tab: Chromium behind NAT B, under remote control.
struct Tab {
    proc: Proc,
    stdin: Option<ChildStdin>,
    lines: Lines,
    /// Chromium's process group (the script starts it in a group of its own).
    chromium: i32,
}

impl Drop for Tab {
    /// Closing stdin lets the script close Chromium; whatever is left then is killed, also when
    /// a test failed.
    fn drop(&mut self) {
        drop(self.stdin.take());
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end && self.proc.try_wait().ok().flatten().is_none() {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.chromium > 1 {
            let group = format!("-{}", self.chromium);
            let _ = std::process::Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
        }
    }
}

impl Tab {
    fn open(w: &World, extra: &[&str]) -> Tab {
        let mut p = Proc::spawn(
            w.topo
                .exec(&w.topo.b, "node")
                .arg(web_dir().join("tools/volunteer-tab.mjs"))
                .args(["--egress", EGRESS, "--signal", SIGNAL, "--pool", "2"])
                .args(extra)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        );
        let lines = Lines::of(p.stdout.take().expect("piped"), "tab");
        let stdin = p.stdin.take().expect("piped");
        let ready = lines.wait("{\"", Duration::from_secs(60));
        assert!(ready.starts_with("{\"ready\""), "the volunteer tab did not start: {ready}");
        let v: Value = serde_json::from_str(&ready).expect("JSON from the tab");
        let chromium = v["ready"]["chromium_pgid"].as_i64().expect("Chromium's process group") as i32;
        Tab { proc: p, stdin: Some(stdin), lines, chromium }
    }

    /// Sends one command and returns its answer (the first line with `key`).
    fn cmd(&mut self, cmd: &str, key: &str) -> Value {
        writeln!(self.stdin.as_mut().expect("open"), "{cmd}").expect("the tab's stdin");
        let line = self.lines.wait(&format!("\"{key}\""), Duration::from_secs(30));
        let v: Value = serde_json::from_str(&line).expect("JSON from the tab");
        assert!(v.get("error").is_none(), "{cmd}: {line}");
        v[key].clone()
    }

    fn snapshot(&mut self) -> Value {
        self.cmd(r#"{"cmd":"snapshot"}"#, "snapshot")
    }

    /// The next consumer that connected: (session, local type, remote type) as the tab sees them.
    fn next_consumer(&self) -> Value {
        let line = self.lines.wait("{\"consumer\"", Duration::from_secs(40));
        serde_json::from_str::<Value>(&line).expect("JSON")["consumer"].clone()
    }
}

fn screenshot_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots/browser-volunteer.png")
}

/// Bytes the tab sent and received over candidate pairs with a relayed candidate, and over
/// the others, for its one consumer: (relayed, direct).
fn bytes_by_path(pairs: &Value) -> (f64, f64) {
    let sessions = pairs.as_object().expect("pairs by session");
    assert_eq!(sessions.len(), 1, "one consumer: {pairs}");
    let (mut relayed, mut direct) = (0.0, 0.0);
    for p in sessions.values().next().unwrap().as_array().unwrap() {
        let n = p["bytesSent"].as_f64().unwrap() + p["bytesReceived"].as_f64().unwrap();
        if p["local"] == "relay" || p["remote"] == "relay" {
            relayed += n;
        } else {
            direct += n;
        }
    }
    (relayed, direct)
}

/// One consumer downloads 64 MiB through the tab; returns the consumer's (local, remote)
/// candidate types when it connected and the tab's bytes by path (relayed, direct).
fn download(tag: &str, kind: NatKind) -> Option<((String, String), (f64, f64))> {
    let _one = one_tab();
    let w = world(tag, kind, "", common::BODY)?;
    let mut tab = Tab::open(&w, &[]);
    let cpu0 = tab.snapshot()["cpu"].as_f64().expect("cpu");
    let (_c, via) = w.consumer();
    let line = via.wait("via webrtc", Duration::from_secs(40));
    let seen = tab.next_consumer();
    let t = Instant::now();
    let curl = w.curl(None);
    if std::env::var("BROWSER_PROFILE").is_ok() {
        // Where the tab's JavaScript spends its time while it relays (for docs/BENCHMARKS.md).
        std::thread::sleep(Duration::from_secs(3));
        let p = tab.cmd(r#"{"cmd":"profile","ms":5000}"#, "profile");
        eprintln!("{tag}: JavaScript profile of the tab over 5 s:\n{p:#}");
    }
    let (sha, n) = body_of(curl);
    let secs = t.elapsed().as_secs_f64();
    let by_path = bytes_by_path(&tab.cmd(r#"{"cmd":"pairs"}"#, "pairs"));
    eprintln!("{tag}: the tab's bytes over relayed pairs {:.0}, over direct ones {:.0}", by_path.0, by_path.1);
    let snap = tab.snapshot();
    let cpu = snap["cpu"].as_f64().expect("cpu") - cpu0;
    let mib = n as f64 / f64::from(1 << 20);
    eprintln!(
        "{tag}: {n} bytes in {secs:.2} s ({:.1} MB/s) through the tab; Chromium CPU {cpu:.2} s = {:.1} ms per MiB",
        n as f64 / secs / 1e6,
        cpu * 1000.0 / mib
    );
    assert_eq!(n, common::BODY);
    assert_eq!(sha, w.sha, "the body arrived intact");
    let v = &snap["volunteer"];
    assert_eq!(v["stats"]["connected"], 1, "one consumer served: {v}");
    let relayed = v["bytes"]["in"].as_f64().unwrap() + v["bytes"]["out"].as_f64().unwrap();
    assert!(relayed >= n as f64, "the tab counted the bytes it relayed: {relayed}");
    if kind == NatKind::EndpointIndependent {
        tab.cmd(&format!(r#"{{"cmd":"screenshot","path":"{}"}}"#, screenshot_path().display()), "screenshot");
    }
    let _ = std::fs::remove_dir_all(&w.dir);
    let _ = seen;
    Some((kinds(&line), by_path))
}

#[test]
fn through_endpoint_independent_nats_the_tab_serves_a_consumer_on_a_direct_path() {
    let Some(((local, _), (relayed, direct))) = download("be", NatKind::EndpointIndependent) else { return };
    assert_eq!(local, "host", "no relay on the consumer's side");
    // The consumer may nominate the tab's relayed candidate first (its checks succeed before
    // the NAT B mapping is open, the tab trickling its candidates) and move to the direct
    // pair when that succeeds: what counts is where the bytes went.
    assert!(direct > 0.95 * (direct + relayed), "the bytes took the direct path: {direct} direct, {relayed} relayed");
    assert!(screenshot_path().exists());
}

#[test]
fn through_symmetric_nats_the_tab_serves_a_consumer_via_turn() {
    let Some(((local, remote), (relayed, direct))) = download("bs", NatKind::Symmetric) else { return };
    assert!(local == "relay" || remote == "relay", "a relayed candidate in the pair: local={local} remote={remote}");
    assert!(relayed > 0.95 * (direct + relayed), "the bytes went through TURN: {direct} direct, {relayed} relayed");
}

#[test]
fn three_consumers_at_once_through_one_tab() {
    let _one = one_tab();
    let Some(w) = world("b3", NatKind::EndpointIndependent, "", SMALL) else { return };
    let mut tab = Tab::open(&w, &["--slots", "4"]);
    let socks = ["127.0.0.1:1081", "127.0.0.1:1082", "127.0.0.1:1083"];
    let consumers: Vec<_> = socks.iter().map(|s| w.consumer_on(s)).collect();
    for (_, via) in &consumers {
        via.wait("via webrtc", Duration::from_secs(40));
    }
    let readers: Vec<_> =
        socks.iter().map(|s| w.curl_via(s, None)).map(|c| std::thread::spawn(move || body_of(c))).collect();
    for r in readers {
        let (sha, n) = r.join().expect("reader");
        assert_eq!(n, w.body);
        assert_eq!(sha, w.sha, "every body arrived intact");
    }
    let v = &tab.snapshot()["volunteer"];
    assert_eq!(v["stats"]["connected"], 3, "three consumers served by the one tab: {v}");
    assert_eq!(v["consumers"].as_array().unwrap().len(), 3, "all three still connected");
    assert_eq!(v["free"], 1, "one slot of four left: {v}");
}

/// The middlebox between the tab and the egress cuts flows idle for this long.
const CUTOFF_MS: u64 = 1500;

#[test]
fn a_hidden_tab_keeps_serving_a_download_with_no_reconnects() {
    // PINGs every second, so an idle link's keepalive beats the 1.5 s cut-off.
    let fast = "[liveness]\nkeepalive = \"1s\"\nidle_timeout = \"3s\"\n";
    let _one = one_tab();
    let Some(w) = world("bh", NatKind::EndpointIndependent, fast, SMALL) else { return };
    // A PONG may take longer than the default half a keepalive while the tab, a debug egress
    // and the download share two cores: the pool waits up to the egress's idle timeout, and
    // the consumer's hop (no middlebox on it) keeps a 5 s keepalive instead of the egress's 1 s.
    let mut tab = Tab::open(
        &w,
        &[
            "--middlebox-idle-ms",
            &CUTOFF_MS.to_string(),
            "--pong-timeout-ms",
            "3000",
            "--consumer-keepalive-ms",
            "5000",
        ],
    );
    let (_c, via) = w.consumer();
    via.wait("via webrtc", Duration::from_secs(40));
    tab.next_consumer();
    let start = tab.snapshot();
    assert_eq!(tab.cmd(r#"{"cmd":"hide"}"#, "visibility"), "hidden");
    // 16 MiB at 2 MB/s: about 8 s, more than 4 × the cut-off hidden.
    let reader = std::thread::spawn({
        let curl = w.curl(Some("2M"));
        move || body_of(curl)
    });
    let hidden_at = Instant::now();
    while hidden_at.elapsed() < Duration::from_millis(4 * CUTOFF_MS + 500) {
        let s = tab.snapshot();
        assert_eq!(s["state"], "hidden", "the tab stayed hidden");
        assert_eq!(
            s["pool"]["stats"]["reconnects"],
            0,
            "an egress link was replaced after {:?}: {} {}",
            hidden_at.elapsed(),
            s["pool"]["links"],
            s["events"]
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (sha, n) = reader.join().expect("reader");
    assert_eq!(n, w.body);
    assert_eq!(sha, w.sha, "the body arrived intact");
    let end = tab.snapshot();
    assert_eq!(end["state"], "hidden");
    assert_eq!(end["pool"]["stats"]["reconnects"], 0);
    assert_eq!(end["pool"]["stats"]["lostLinks"], 0);
    assert_eq!(end["middlebox"]["blackholed"], 0, "the middlebox cut no flow: {}", end["middlebox"]);
    let sessions =
        |s: &Value| s["pool"]["links"].as_array().unwrap().iter().map(|l| l["session"].clone()).collect::<Vec<_>>();
    assert_eq!(sessions(&end), sessions(&start), "the same egress links throughout");
    let v = &end["volunteer"];
    assert_eq!(v["stats"]["connected"], 1, "the consumer never reconnected: {v}");
    assert_eq!(v["consumers"][0]["state"], "open");
    let pings =
        v["consumers"][0]["pings"].as_u64().unwrap() - start["volunteer"]["consumers"][0]["pings"].as_u64().unwrap();
    assert!(pings >= 1, "the consumer's PINGs were answered while hidden: {v}");
    assert!(via.0.try_iter().all(|l| !l.contains("via webrtc")), "the consumer kept its one link");
}

#[test]
fn a_closed_tab_mid_download_fails_over_to_a_native_volunteer() {
    let _one = one_tab();
    let Some(w) = world("bc", NatKind::EndpointIndependent, "", SMALL) else { return };
    let mut tab = Tab::open(&w, &[]);
    let (_c, via) = w.consumer();
    via.wait("via webrtc", Duration::from_secs(40));
    tab.next_consumer();
    // Only now the native volunteer: the consumer's first match was the tab.
    let (_v, vlog) = w.volunteer("native-volunteer");
    let curl = w.curl(Some("2M"));
    let reader = std::thread::spawn(move || body_of(curl));
    std::thread::sleep(Duration::from_millis(2000)); // mid-download: 16 MiB at 2 MB/s take 8 s
    let closed_at = Instant::now();
    tab.cmd(r#"{"cmd":"close"}"#, "closed");
    let line = via.wait("via webrtc", Duration::from_secs(40));
    eprintln!("{:?} after the tab closed: {line}", closed_at.elapsed());
    vlog.wait("consumer connected over WebRTC", Duration::from_secs(10));
    let (sha, n) = reader.join().expect("reader");
    assert_eq!(n, w.body);
    assert_eq!(sha, w.sha, "the body arrived intact across the failover");
    assert_eq!(w.metric("broflake_quic_connections_total"), 1.0, "one QUIC handshake: the connection moved");
}
