//! Soak: relays churning, relays killed mid-transfer, consumers downloading without pause,
//! and the egress drained and replaced by a new process on the same port halfway through.
//! Every byte that arrives is checked (SHA-256), every failed download must be explained by
//! an event the test caused and counted, the egress processes exit cleanly, and the
//! surviving one returns to its baseline of file descriptors and memory when the load is
//! gone. `SOAK_SECS` sets the length (default 60 s; run it longer locally).

use broflake_client::consumer::ConsumerConfig;
use broflake_client::link::{Link, LinkConfig, TlsMode};
use broflake_client::local_proxy::{ConsumerOptions, ConsumerService};
use broflake_client::relay::{Relay, RelayConfig};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BODY: usize = 2 << 20;

struct EgressProc {
    child: Child,
    log: testkit::EgressLog,
    admin: SocketAddr,
}

impl EgressProc {
    /// Starts the egress binary on `port` (SO_REUSEPORT: a replacement can bind while the
    /// old process drains) and waits until it listens.
    fn start(port: u16, state: &std::path::Path, tag: &str) -> (EgressProc, String) {
        let admin = free_port();
        let cfg = state.join(format!("{tag}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[io]\nbackend = \"uring\"\nthreads = 2\n[liveness]\nmode = \"userspace\"\nkeepalive = \"1s\"\nidle_timeout = \"4s\"\n\
                 [drain]\ngrace = \"4s\"\n[proxy]\nallow = [\"127.0.0.0/8\"]\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n"
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_egress"))
            .args(["--log", &std::env::var("SOAK_EGRESS_LOG").unwrap_or_else(|_| "info".into())])
            .args(["--ws", &format!("127.0.0.1:{port}"), "--no-wss", "--config"])
            .arg(&cfg)
            .arg("--state-dir")
            .arg(state)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (_, log) = testkit::wait_listening(&mut child);
        // The fingerprint consumers pin, printed on stdout once the egress runs.
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let fp = stdout
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("certificate sha256 ").map(str::to_string))
            .expect("the egress prints its certificate fingerprint");
        (EgressProc { child, log, admin: SocketAddr::from(([127, 0, 0, 1], admin)) }, fp)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Descriptors: the process's, and the direct ones in its io_uring tables.
    fn fds(&self) -> usize {
        (bench::procfs::fds(self.pid()).unwrap() + bench::procfs::direct_descriptors(self.pid()).unwrap()) as usize
    }

    fn rss(&self) -> u64 {
        bench::procfs::rss_bytes(self.pid()).unwrap()
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.admin).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        testkit::prom_value(&text, name, labels)
    }

    fn assert_no_panic(&self, tag: &str) {
        let log = self.log.lock().unwrap();
        assert!(!log.iter().any(|l| l.contains("panicked")), "{tag} panicked:\n{}", log.join("\n"));
    }
}

impl Drop for EgressProc {
    /// A failing assertion must not leave the egress running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Three relay slots on fixed ports, so a killed relay comes back at the same address.
struct Relays {
    slots: Vec<(SocketAddr, Option<Relay>)>,
    egress_url: String,
}

impl Relays {
    async fn start(egress_url: &str) -> Relays {
        let mut r = Relays { slots: Vec::new(), egress_url: egress_url.to_string() };
        for _ in 0..3 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            r.slots.push((addr, None));
        }
        for i in 0..3 {
            r.restart(i).await;
        }
        r
    }
    async fn restart(&mut self, i: usize) {
        let addr = self.slots[i].0;
        let cfg = RelayConfig { pool: 2, ..RelayConfig::new(LinkConfig::new(self.egress_url.clone()), addr) };
        // The port was just released by the killed relay; binding may need a moment.
        for _ in 0..50 {
            match Relay::start(cfg.clone()).await {
                Ok(r) => {
                    self.slots[i].1 = Some(r);
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        panic!("relay slot {i} cannot bind {addr}");
    }
    async fn kill(&mut self, i: usize) {
        if let Some(r) = self.slots[i].1.take() {
            r.kill().await;
        }
    }
    fn urls(&self) -> Vec<String> {
        self.slots.iter().map(|(a, _)| format!("ws://{a}/broflake")).collect()
    }
}

struct Tally {
    started: Instant,
    ok: AtomicU64,
    bytes: AtomicU64,
    corrupt: AtomicU64,
    failed: Mutex<Vec<String>>,
    /// QUIC connections the consumers saw closed by the egress (the drained process leaving).
    quic_closed_by_egress: AtomicU64,
    consumers_started: AtomicU64,
    /// Consumers that found no relay to start through (a relay restarting): not a download.
    start_failures: AtomicU64,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            started: Instant::now(),
            ok: Default::default(),
            bytes: Default::default(),
            corrupt: Default::default(),
            failed: Default::default(),
            quic_closed_by_egress: Default::default(),
            consumers_started: Default::default(),
            start_failures: Default::default(),
        }
    }
}

/// What a consumer application works with: the relays it knows, the egress it pins, and the
/// download it repeats.
#[derive(Clone)]
struct Job {
    relays: Vec<String>,
    fingerprint: String,
    server: SocketAddr,
    digest: String,
}

impl Job {
    fn spawn(&self, tally: &Arc<Tally>, stop: &Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(consumer_loop(self.clone(), tally.clone(), stop.clone()))
    }
}

/// One consumer application: downloads in a loop; when its QUIC connection is closed by
/// the egress, it starts over (as a real client would).
async fn consumer_loop(job: Job, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let Job { relays, fingerprint, server, digest } = job;
    while !stop.load(Ordering::Relaxed) {
        let opts = ConsumerOptions {
            signal: None,
            relays: relays.iter().map(|u| LinkConfig::new(u.clone())).collect(),
            quic: ConsumerConfig { tls: TlsMode::Pinned(fingerprint.clone()), ..ConsumerConfig::default() },
            socks: None,
            http: None,
        };
        let svc = match ConsumerService::start(opts).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("consumer start failed: {e:#}");
                tally.start_failures.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        tally.consumers_started.fetch_add(1, Ordering::Relaxed);
        while !stop.load(Ordering::Relaxed) {
            if let Some(reason) = svc.consumer.connection.close_reason() {
                tally.quic_closed_by_egress.fetch_add(1, Ordering::Relaxed);
                eprintln!("consumer: QUIC connection closed ({reason}); starting over");
                break;
            }
            match fetch(&svc, server).await {
                Ok((d, n)) if d == digest => {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                    tally.bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Ok(_) => {
                    tally.corrupt.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    let closed = svc.consumer.connection.close_reason();
                    let at = tally.started.elapsed().as_secs_f64();
                    let st = svc.consumer.connection.stats();
                    eprintln!(
                        "consumer failure at {at:.1} s: {e}; route {:?}, link failures {}, udp tx {} rx {}, lost {}, rtt {:?}",
                        svc.consumer.current_route(),
                        svc.consumer.link_failures.load(Ordering::Relaxed),
                        st.udp_tx.datagrams,
                        st.udp_rx.datagrams,
                        st.path.lost_packets,
                        st.path.rtt
                    );
                    tally.failed.lock().unwrap().push(format!("at {at:.1} s: {e} (QUIC connection: {closed:?})"));
                    if closed.is_some() {
                        tally.quic_closed_by_egress.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
        svc.stop().await;
    }
}

async fn fetch(c: &ConsumerService, server: SocketAddr) -> anyhow::Result<(String, usize)> {
    let (mut send, mut recv) = c.consumer.open("127.0.0.1", server.port()).await?;
    send.write_all(b"GET / HTTP/1.1\r\nHost: soak\r\n\r\n").await?;
    // Longer than the consumer's QUIC idle timeout (30 s): a connection whose egress went
    // away without a close or reset reaching it ends with TimedOut, not a hang.
    let all = tokio::time::timeout(Duration::from_secs(60), recv.read_to_end(BODY + 4096)).await??;
    let head_end = all.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| anyhow::anyhow!("no HTTP head"))? + 4;
    Ok((testkit::sha256_hex(&all[head_end..]), all.len() - head_end))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_churn_kills_and_a_restart_lose_nothing_and_leak_nothing() {
    if broflake_egress::uring::probe().is_err() {
        eprintln!("SKIPPED: io_uring is not available here");
        return;
    }
    if let Ok(filter) = std::env::var("SOAK_CLIENT_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    }
    let secs: u64 = std::env::var("SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let state = testkit::temp_dir("soak");
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/broflake");
    let (a, fingerprint) = EgressProc::start(port, &state, "a");
    let (server, digest) = testkit::http_server(BODY, 77).await;

    // Warm-up and baseline of the first process: one download, then nobody.
    {
        let mut relays = Relays::start(&url).await;
        let tally = Arc::new(Tally::new());
        let stop = Arc::new(AtomicBool::new(false));
        let c = Job { relays: relays.urls(), fingerprint: fingerprint.clone(), server, digest: digest.clone() }
            .spawn(&tally, &stop);
        while tally.ok.load(Ordering::Relaxed) < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.store(true, Ordering::Relaxed);
        c.await.unwrap();
        for i in 0..3 {
            relays.kill(i).await;
        }
    }
    wait_idle(&a).await;
    let (a_fds, a_rss) = (a.fds(), a.rss());
    eprintln!("egress A baseline: {a_fds} fds, RSS {a_rss}");

    let tally = Arc::new(Tally::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut relays = Relays::start(&url).await;
    let mut consumers = Vec::new();
    let job = Job { relays: relays.urls(), fingerprint: fingerprint.clone(), server, digest: digest.clone() };
    for _ in 0..3 {
        consumers.push(job.spawn(&tally, &stop));
    }
    // Relays that connect, handshake and leave, all the time.
    let churned = Arc::new(AtomicU64::new(0));
    let churn = {
        let (url, stop, churned) = (url.clone(), stop.clone(), churned.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(link) = Link::connect(LinkConfig::new(url.clone())).await {
                    churned.fetch_add(1, Ordering::Relaxed);
                    drop(link);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let started = Instant::now();
    let (mut kills, mut next_kill, mut replaced) = (0u64, 0usize, None);
    let mut a = Some(a);
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // A relay dies mid-transfer and comes back.
        eprintln!("at {:.1} s: killing relay {next_kill}", started.elapsed().as_secs_f64());
        relays.kill(next_kill).await;
        kills += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
        relays.restart(next_kill).await;
        next_kill = (next_kill + 1) % 3;
        // Halfway: drain the egress and start its replacement on the same port.
        if replaced.is_none() && started.elapsed() >= Duration::from_secs(secs / 2) {
            let old = a.take().unwrap();
            assert!(Command::new("kill").args(["-TERM", &old.pid().to_string()]).status().unwrap().success());
            let (b, fp) = EgressProc::start(port, &state, "b");
            assert_eq!(fp, fingerprint, "the replacement keeps the identity");
            replaced = Some((old, b));
            eprintln!("egress A draining, B started at {:?}", started.elapsed());
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in consumers {
        c.await.unwrap();
    }
    churn.await.unwrap();
    let (mut old, b) = replaced.expect("the egress was replaced");

    // The drained process left on its own, cleanly.
    let status = tokio::task::spawn_blocking(move || {
        let s = old.child.wait();
        (old, s)
    })
    .await
    .unwrap();
    let (old, status) = status;
    assert!(status.unwrap().success(), "drained egress exit status");

    // Recovery: with the old process gone, a consumer gets through the same relays to the
    // replacement (bounded: a handshake that went to the old process is retried after the
    // consumer's QUIC idle timeout, 30 s, at worst).
    let recovered = Instant::now();
    let after = Arc::new(Tally::new());
    let stop_after = Arc::new(AtomicBool::new(false));
    let c = job.spawn(&after, &stop_after);
    while after.ok.load(Ordering::Relaxed) == 0 {
        assert!(recovered.elapsed() < Duration::from_secs(90), "no download through the replacement egress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_after.store(true, Ordering::Relaxed);
    c.await.unwrap();
    eprintln!("after the old egress exited, the first download through the replacement took {:?}", recovered.elapsed());
    for i in 0..3 {
        relays.kill(i).await;
    }
    old.assert_no_panic("egress A");
    b.assert_no_panic("egress B");

    let ok = tally.ok.load(Ordering::Relaxed);
    let failed = tally.failed.lock().unwrap().clone();
    let closed = tally.quic_closed_by_egress.load(Ordering::Relaxed);
    eprintln!(
        "soak {secs} s: {ok} downloads intact ({} MiB), {} failed, {} corrupt; {kills} relay kills, {} relays churned, \
         {closed} QUIC connections ended by the drain, {} consumer starts ({} retried)",
        tally.bytes.load(Ordering::Relaxed) >> 20,
        failed.len(),
        tally.corrupt.load(Ordering::Relaxed),
        churned.load(Ordering::Relaxed),
        tally.consumers_started.load(Ordering::Relaxed),
        tally.start_failures.load(Ordering::Relaxed),
    );
    for f in &failed {
        eprintln!("  failed: {f}");
    }
    assert_eq!(tally.corrupt.load(Ordering::Relaxed), 0, "a download arrived with different bytes");
    assert!(ok >= secs / 3, "too few downloads completed ({ok})");
    // Relay kills never fail a download (the QUIC connection moves to another relay). The
    // only failures allowed are downloads cut when the drained egress ended a consumer's QUIC
    // connection: at most one in flight per consumer per such close.
    assert!(failed.len() as u64 <= closed, "{} failures, {closed} explained by the drain: {failed:#?}", failed.len());
    assert!(failed.iter().all(|f| f.contains("QUIC connection: Some")), "unexplained failures: {failed:#?}");

    // The replacement returns to an idle baseline: no connection, descriptor or memory kept.
    wait_idle(&b).await;
    // Descriptors are released as the last closes complete (and the admin connection of the
    // scrape above ends): wait, bounded, for the count to come back.
    let t = Instant::now();
    while b.fds() > a_fds && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (b_fds, b_rss) = (b.fds(), b.rss());
    eprintln!("egress B after the load: {b_fds} fds (A's idle baseline {a_fds}), RSS {b_rss} (A's {a_rss})");
    // At most the baseline: the status sampler opens /proc files for a moment every 2 s, so
    // either count may include one transient descriptor.
    assert!(b_fds <= a_fds + 1, "file descriptors back to the idle baseline: {b_fds} vs {a_fds}");
    assert!(b_rss < a_rss + (24 << 20), "RSS {b_rss} vs an idle baseline of {a_rss}");
    let routes = b.metric("broflake_routes", &[]).await;
    assert_eq!(routes, 0.0, "routes left over");
}

/// Waits (bounded) until the egress holds no connection and no QUIC connection.
async fn wait_idle(e: &EgressProc) {
    let t = Instant::now();
    loop {
        let conns = e.metric("broflake_connections", &[("backend", "uring")]).await;
        let quic = e.metric("broflake_quic_connections", &[]).await;
        if conns == 0.0 && quic == 0.0 {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "egress not idle: {conns} connections, {quic} QUIC");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
