//! Matches per second of the signaling service: one replica on its own memory, one replica on
//! Redis, two replicas sharing one Redis (volunteers and consumers spread over both, so about
//! half of the matches cross replicas). The real `signal` binary and Debian's redis-server;
//! volunteers (answering every offer at once) and consumers run in this process.

use crate::Procs;
use anyhow::{bail, Context, Result};
use broflake_signal::client::{ConsumerEvent, ConsumerRequest, SignalConn, Volunteer, VolunteerEvent};
use serde::Serialize;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Serialize, Clone)]
pub struct MatchRow {
    /// `memory`, `redis` (one replica) or `redis x2`.
    pub setup: String,
    pub replicas: usize,
    pub volunteers: usize,
    pub consumers: usize,
    /// One figure per round (rows interleaved).
    pub matches_per_sec: Vec<f64>,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// redis-server on a free port (killed with `procs`); its port once it accepts connections.
fn redis(procs: &mut Procs) -> Result<u16> {
    let port = free_port()?;
    let mut c = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::piped())
        .spawn()
        .context("redis-server is needed: apt-get install redis-server")?;
    let out = c.stdout.take().context("stdout")?;
    procs.0.push(c);
    let mut lines = BufReader::new(out).lines();
    if !lines.by_ref().map_while(Result::ok).any(|l| l.contains("Ready to accept connections")) {
        bail!("redis-server did not start");
    }
    std::thread::spawn(move || lines.for_each(drop));
    Ok(port)
}

/// A replica with limits out of the way (every client comes from 127.0.0.1), killed with
/// `procs`; its URL.
fn replica(procs: &mut Procs, bin: &Path, cfg: &Path, store: Option<(u16, &str)>) -> Result<String> {
    let mut cmd = Command::new(bin.join("signal"));
    cmd.args(["--listen", "127.0.0.1:0", "--admin", "off", "--log", "warn", "--config"]).arg(cfg);
    if let Some((port, name)) = store {
        cmd.args(["--store", &format!("redis://127.0.0.1:{port}/"), "--replica", name]);
    }
    let mut c = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?;
    let out = c.stdout.take().context("stdout")?;
    procs.0.push(c);
    let mut lines = BufReader::new(out).lines();
    let url = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("signaling on ").map(str::to_string))
        .context("the replica's URL")?;
    std::thread::spawn(move || lines.for_each(drop));
    Ok(url)
}

/// Volunteers answering every offer at once, registered round robin at `urls`; they stay
/// registered until the value is dropped.
#[derive(Debug)]
pub struct Volunteers(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Volunteers {
    fn drop(&mut self) {
        for v in &self.0 {
            v.abort();
        }
    }
}

pub async fn volunteers(urls: &[String], n: usize) -> Result<Volunteers> {
    let mut tasks = Volunteers(Vec::with_capacity(n));
    for i in 0..n {
        let conn = SignalConn::connect(&urls[i % urls.len()], None, Duration::from_secs(10)).await?;
        let mut v = Volunteer::register(conn, 1).await?;
        let h = v.handle.clone();
        tasks.0.push(tokio::spawn(async move {
            while let Some(ev) = v.events.recv().await {
                if let VolunteerEvent::Offer { session, .. } = ev {
                    h.answer(session, "v=0\r\n").await;
                }
            }
        }));
    }
    Ok(tasks)
}

/// `n` consumers (200 in flight) spread over `urls` round robin, each until its answer;
/// matches per second.
pub async fn consumers(urls: &[String], n: usize) -> Result<f64> {
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        // Starting at the second URL: with two replicas and volunteers placed from the first,
        // half the matches (round robin over the fleet) cross replicas.
        let url = urls[(i + 1) % urls.len()].clone();
        tasks.spawn(async move {
            let conn = SignalConn::connect(&url, None, Duration::from_secs(30)).await?;
            let mut req = ConsumerRequest::start(conn, "v=0\r\n", Duration::from_secs(30)).await?;
            match req.events.recv().await {
                Some(ConsumerEvent::Answer { .. }) => Ok::<_, anyhow::Error>(()),
                other => bail!("no answer: {other:?}"),
            }
        });
        while tasks.len() >= 200 {
            tasks.join_next().await.context("a consumer task")???;
        }
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// The three set-ups, `rounds` times each, interleaved.
pub fn run(bin: &Path, n: usize, rounds: usize) -> Result<Vec<MatchRow>> {
    let dir = std::env::temp_dir().join(format!("broflake-bench-signaling-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("signal.toml");
    std::fs::write(
        &cfg,
        "[limits]\nmax_clients_per_ip = 100000\nconsumer_burst = 100000\nconsumer_per_sec = 100000\nmax_sessions = 100000\n",
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut rows: Vec<MatchRow> = [("memory", 1), ("redis", 1), ("redis x2", 2)]
        .into_iter()
        .map(|(setup, replicas)| MatchRow {
            setup: setup.into(),
            replicas,
            volunteers: n,
            consumers: n,
            matches_per_sec: Vec::new(),
        })
        .collect();
    for _ in 0..rounds {
        for row in &mut rows {
            // A fresh Redis and fresh replicas per measurement.
            let mut procs = Procs(Vec::new());
            let mut urls = Vec::new();
            if row.setup == "memory" {
                urls.push(replica(&mut procs, bin, &cfg, None)?);
            } else {
                let port = redis(&mut procs)?;
                for i in 0..row.replicas {
                    urls.push(replica(&mut procs, bin, &cfg, Some((port, &format!("r{i}"))))?);
                }
            }
            let rate = rt.block_on(async {
                let _volunteers = volunteers(&urls, n).await?;
                consumers(&urls, n).await
            })?;
            eprintln!("signaling {}: {rate:.0} matches/s", row.setup);
            row.matches_per_sec.push(rate);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rows)
}

pub fn markdown(rows: &[MatchRow], command: &str) -> String {
    let mut s = String::from(
        "\nSignaling matches per second (volunteers answer at once; clients in the bench process on the same 2 cores):\n\n| store | replicas | volunteers = consumers | matches/s per round |\n|---|---|---|---|\n",
    );
    for r in rows {
        let each: Vec<String> = r.matches_per_sec.iter().map(|m| format!("{m:.0}")).collect();
        s += &format!("| {} | {} | {} | {} |\n", r.setup, r.replicas, r.volunteers, each.join(" / "));
    }
    s += &format!("\nCommand: `{command}`.\n");
    s
}
