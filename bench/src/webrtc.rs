//! The WebRTC hop and the signaling service, measured (docs/BENCHMARKS.md):
//! - time from a cold consumer start to the first byte through the tunnel (signaling, ICE,
//!   DTLS, SCTP, the Broflake handshake, QUIC, the proxy request), over many consumers, on a
//!   direct path and through TURN (coturn), against volunteers running the real `broflake`
//!   binary and the real `egress` and `signal` binaries;
//! - matches per second the signaling service sustains with many volunteers and consumers,
//!   and its memory per waiting volunteer.
//!
//! Everything runs on loopback in one network namespace; consumers and the synthetic
//! volunteers of the matching measurement run in this process (the library the CLI uses).

use crate::Procs;
use anyhow::{Context, Result};
use broflake_client::consumer::ConsumerConfig;
use broflake_client::link::TlsMode;
use broflake_client::local_proxy::{ConsumerOptions, ConsumerService};
use broflake_client::signaled::SignalSource;
use serde::Serialize;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Percentiles of a latency, in milliseconds.
#[derive(Debug, Serialize, Default, Clone)]
pub struct Latency {
    pub n: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(mut ms: Vec<f64>) -> Latency {
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
        Latency { n: ms.len(), p50_ms: at(0.5), p90_ms: at(0.9), p99_ms: at(0.99), max_ms: at(1.0) }
    }
}

#[derive(Debug, Serialize, Default, Clone)]
pub struct WebrtcResults {
    /// Cold consumer start → first byte, host candidates on loopback.
    pub ttfb_direct: Latency,
    /// The same with relay-only consumers (every path through coturn).
    pub ttfb_turn: Latency,
    pub volunteers: usize,
    pub consumers: usize,
    pub matches_per_sec: f64,
    /// Signaling service RSS growth per registered, waiting volunteer.
    pub signal_bytes_per_volunteer: f64,
}

/// The lines `child` wrote on stdout (or stderr) up to the first containing `needle` (the
/// rest is drained on a thread).
fn lines_until(child: &mut Child, stderr: bool, needle: &str) -> Result<Vec<String>> {
    let out: Box<dyn std::io::Read + Send> = if stderr {
        Box::new(child.stderr.take().context("stderr")?)
    } else {
        Box::new(child.stdout.take().context("stdout")?)
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let needle = needle.to_string();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut sent = false;
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if !sent {
                seen.push(l.clone());
                if l.contains(&needle) {
                    let _ = tx.send(std::mem::take(&mut seen));
                    sent = true;
                }
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60)).context("the process did not say it was ready")
}

fn line(child: &mut Child, stderr: bool, needle: &str) -> Result<String> {
    Ok(lines_until(child, stderr, needle)?.pop().unwrap_or_default())
}

pub fn run(bin: &Path, consumers: usize, volunteers_for_matching: usize) -> Result<WebrtcResults> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(measure(bin, consumers, volunteers_for_matching))
}

async fn measure(bin: &Path, consumers: usize, matching: usize) -> Result<WebrtcResults> {
    let dir = std::env::temp_dir().join(format!("broflake-bench-webrtc-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut procs = Procs(Vec::new());

    // coturn, for the relayed measurement.
    let turn_port = 34780 + (std::process::id() % 1000) as u16;
    let turn = Command::new("turnserver")
        .args(["-n", "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1", "--listening-port"])
        .arg(turn_port.to_string())
        .args(["--no-tls", "--no-dtls", "--no-cli", "--lt-cred-mech", "--user", "bench:bench", "--realm", "bench"])
        .args(["--allow-loopback-peers", "--allowed-peer-ip=127.0.0.1", "--no-stdout-log", "--log-file"])
        .arg(dir.join("turn.log"))
        .arg("--pidfile")
        .arg(dir.join("turn.pid"))
        .arg("--userdb")
        .arg(dir.join("turndb"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("turnserver (coturn) is needed: apt-get install coturn")?;
    procs.0.push(turn);

    // The egress and the signaling service, as shipped.
    let mut egress = Command::new(bin.join("egress"))
        .args(["--ws", "127.0.0.1:0", "--no-wss", "--admin", "off", "--liveness", "userspace"])
        .args(["--allow", "127.0.0.0/8", "--log", "warn", "--state-dir"])
        .arg(dir.join("egress"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    // The start-up summary names the ws:// URL; the certificate line ends it.
    let summary = lines_until(&mut egress, false, "certificate sha256")?;
    procs.0.push(egress);
    let fp = summary.last().and_then(|l| l.rsplit(' ').next()).unwrap_or_default().to_string();
    let egress_url = summary
        .iter()
        .find_map(|l| l.split_whitespace().find(|w| w.starts_with("ws://")))
        .context("the egress's ws:// URL")?
        .to_string();
    let cfg = dir.join("signal.toml");
    std::fs::write(
        &cfg,
        "[limits]\nmax_clients_per_ip = 100000\nconsumer_burst = 100000\nconsumer_per_sec = 100000\nmax_sessions = 100000\n",
    )?;
    let mut signal = Command::new(bin.join("signal"))
        .args(["--listen", "127.0.0.1:0", "--admin", "off", "--log", "warn", "--config"])
        .arg(&cfg)
        .args(["--turn", &format!("turn:127.0.0.1:{turn_port},bench,bench")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let url = line(&mut signal, false, "signaling on")?;
    let url = url.rsplit(' ').next().unwrap_or_default().to_string();
    let signal_pid = signal.id();
    procs.0.push(signal);

    // Two volunteers (the real binary).
    for _ in 0..2 {
        let mut v = Command::new(bin.join("broflake"))
            .args(["relay", "--upstream", &egress_url, "--listen", "off", "--signal", &url, "--slots", "16"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        line(&mut v, true, "volunteer registered")?;
        procs.0.push(v);
    }

    // A local HTTP server answering every request with a small body.
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http_port = http.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = http.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await;
            });
        }
    });

    let mut results = WebrtcResults::default();
    for relay_only in [false, true] {
        let mut ms = Vec::with_capacity(consumers);
        for _ in 0..consumers {
            let t = Instant::now();
            let mut src = SignalSource::new(url.clone());
            src.relay_only = relay_only;
            let svc = ConsumerService::start(ConsumerOptions {
                signal: Some(src),
                relays: Vec::new(),
                quic: ConsumerConfig { tls: TlsMode::Pinned(fp.clone()), ..ConsumerConfig::default() },
                socks: None,
                http: None,
            })
            .await?;
            let (mut send, mut recv) =
                svc.consumer.open("127.0.0.1", http_port).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            send.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
            let mut first = [0u8; 1];
            recv.read_exact(&mut first).await?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
            svc.stop().await;
        }
        if relay_only {
            results.ttfb_turn = Latency::of(ms);
        } else {
            results.ttfb_direct = Latency::of(ms);
        }
    }
    // The signaling service alone: many volunteers that answer at once, many consumers.
    procs.0.truncate(3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = crate::procfs::rss_bytes(signal_pid).unwrap_or(0);
    let volunteers = crate::signaling::volunteers(std::slice::from_ref(&url), matching).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = crate::procfs::rss_bytes(signal_pid).unwrap_or(0);
    results.signal_bytes_per_volunteer = after.saturating_sub(before) as f64 / matching.max(1) as f64;
    results.matches_per_sec = crate::signaling::consumers(std::slice::from_ref(&url), matching).await?;
    results.volunteers = matching;
    results.consumers = consumers;
    drop(volunteers);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(results)
}
