//! `bench run [--full]`: the side-by-side benchmark. Every row is a fresh server process on
//! the same machine in the same run; the load comes from separate `loadgen` processes.
//! Writes target/bench/results.json, results.md and SVG plots.
//!
//! `bench floor --listen ADDR`: the floor row's server — accept TCP connections and hold
//! them, nothing else (the kernel's own cost of an idle connection).

use anyhow::{bail, Result};
use bench::procfs;
use bench::procs::{self, LoadOut, LoadProc, LoadSpec, Server};
use clap::{Parser, Subcommand};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    Run {
        /// N up to ~19,000 and longer windows (default: quick, N ≤ 2,000).
        #[arg(long)]
        full: bool,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// Directory with the release binaries (egress, loadgen, broflake).
        #[arg(long, default_value = "target/release")]
        bin: PathBuf,
        /// Only these rows (comma-separated names; the floor row always runs).
        #[arg(long, value_delimiter = ',')]
        rows: Vec<String>,
    },
    Floor {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// Only the tunnel's cost per byte (also part of `run`).
    Tunnel {
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        #[arg(long, default_value = "target/release")]
        bin: PathBuf,
        #[arg(long)]
        full: bool,
        /// Also profile the io_uring egress (perf) during one more download.
        #[arg(long)]
        profile: bool,
    },
    /// Only density past the open-file limit (also part of `run --full`).
    Scale {
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        #[arg(long, default_value = "target/release")]
        bin: PathBuf,
        /// Other connection counts (default 50,000, 100,000, 150,000).
        #[arg(long, value_delimiter = ',')]
        ns: Vec<usize>,
        /// Other number of rounds (default 3).
        #[arg(long)]
        rounds: Option<usize>,
        /// Other length of the PING measurement, seconds (default 60).
        #[arg(long)]
        ping_secs: Option<u64>,
        /// Other number of PINGing connections (default 50,000).
        #[arg(long)]
        ping_conns: Option<usize>,
        /// Other PING interval, ms (default 2,000).
        #[arg(long)]
        ping_ms: Option<u64>,
        /// The egress with ordinary descriptors (`io.uring_direct_descriptors = false`).
        #[arg(long)]
        ordinary_descriptors: bool,
    },
    /// The QUIC anchor's server (started by the tunnel measurement).
    QuicSink,
    /// Matches per second of the signaling service: memory, Redis, two replicas on Redis.
    Signaling {
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        #[arg(long, default_value = "target/release")]
        bin: PathBuf,
        #[arg(long)]
        full: bool,
    },
    /// Throughput under delay and loss, tunnel against plain TCP over the same path.
    Wan {
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        #[arg(long, default_value = "target/release")]
        bin: PathBuf,
        #[arg(long)]
        full: bool,
    },
    /// Only the WebRTC hop and signaling measurements (also part of `run`).
    Webrtc {
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        #[arg(long, default_value = "target/release")]
        bin: PathBuf,
        #[arg(long)]
        full: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Floor { listen } => floor(listen),
        Cmd::QuicSink => bench::quic_sink::serve(),
        Cmd::Scale { out, bin, ns, rounds, ping_secs, ping_conns, ping_ms, ordinary_descriptors } => {
            let mut cfg = bench::scale::ScaleConfig::full();
            if !ns.is_empty() {
                cfg.ns = ns;
            }
            cfg.rounds = rounds.unwrap_or(cfg.rounds);
            cfg.ping_secs = ping_secs.unwrap_or(cfg.ping_secs);
            cfg.ping_conns = ping_conns.unwrap_or(cfg.ping_conns);
            cfg.ping_ms = ping_ms.unwrap_or(cfg.ping_ms);
            cfg.ordinary_descriptors = ordinary_descriptors;
            let r = scale_section(&bin, &out, &cfg)?;
            print!("{}", bench::scale::markdown(&r, "cargo xtask bench --scale"));
            Ok(())
        }
        Cmd::Signaling { out, bin, full } => {
            std::fs::create_dir_all(&out)?;
            let rows = signaling_section(&bin, full)?;
            std::fs::write(out.join("signaling.json"), serde_json::to_string_pretty(&rows)?)?;
            let command = if full { "cargo xtask bench --signaling --full" } else { "cargo xtask bench --signaling" };
            print!("{}", bench::signaling::markdown(&rows, command));
            Ok(())
        }
        Cmd::Wan { out, bin, full } => {
            std::fs::create_dir_all(&out)?;
            // Per stream: enough for congestion control to leave slow start on every path.
            let bytes = if full { 32 << 20 } else { 8 << 20 };
            let rows = bench::wan::run(&bin, bytes)?;
            std::fs::write(out.join("wan.json"), serde_json::to_string_pretty(&rows)?)?;
            let command = if full { "cargo xtask bench --wan --full" } else { "cargo xtask bench --wan" };
            print!("{}", bench::wan::markdown(&rows, command));
            Ok(())
        }
        Cmd::Tunnel { out, bin, full, profile } => {
            std::fs::create_dir_all(&out)?;
            let data = out.join("egress-uring-download.perf.data");
            let r = bench::tunnel::run(&bin, &std::env::current_exe()?, tunnel_bytes(full), profile.then_some(&*data))?;
            std::fs::write(out.join("tunnel.json"), serde_json::to_string_pretty(&r)?)?;
            let command = format!(
                "cargo xtask bench --tunnel{}{}",
                if full { " --full" } else { "" },
                if profile { " --profile" } else { "" }
            );
            let command = command.as_str();
            print!("{}", bench::tunnel::markdown(&r, command));
            Ok(())
        }
        Cmd::Webrtc { out, bin, full } => {
            std::fs::create_dir_all(&out)?;
            let r = webrtc_section(&bin, full)?;
            std::fs::write(out.join("webrtc.json"), serde_json::to_string_pretty(&r)?)?;
            print!(
                "{}",
                webrtc_markdown(&r, if full { "cargo xtask bench --full" } else { "cargo xtask bench --webrtc" })
            );
            Ok(())
        }
        Cmd::Run { full, out, bin, rows } => {
            if let Some(bad) = rows.iter().find(|r| !ROWS.iter().any(|x| x.name == r.as_str())) {
                let names: Vec<&str> = ROWS.iter().map(|x| x.name).collect();
                bail!("no row named {bad:?}; rows: {}", names.join(", "));
            }
            run(full, &out, &bin, &rows)
        }
    }
}

/// Bytes per tunnel transfer: enough CPU ticks (10 ms) per row to read the cost per GiB.
fn tunnel_bytes(full: bool) -> u64 {
    if full {
        1 << 30
    } else {
        256 << 20
    }
}

fn floor(listen: std::net::SocketAddr) -> Result<()> {
    // The least a server can hold: 4 KiB pages, as the egress runs by default.
    // SAFETY: prctl with integer arguments changes only this process's THP flag.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    // SO_REUSEPORT: past one process's open-file limit the floor is several processes.
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(listen), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.bind(&listen.into())?;
    sock.listen(4096)?;
    let l: std::net::TcpListener = sock.into();
    eprintln!("listening on ws://{}", l.local_addr()?);
    let mut held = Vec::new();
    for s in l.incoming().flatten() {
        held.push(s);
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Row {
    name: &'static str,
    /// None: the floor server.
    backend: Option<&'static str>,
    liveness: &'static str,
    server_ping: bool,
    /// More egress configuration (TOML sections), as an operator would write it.
    config: &'static str,
}

const ROWS: [Row; 6] = [
    Row { name: "floor", backend: None, liveness: "", server_ping: false, config: "" },
    Row { name: "uring+xdp", backend: Some("uring"), liveness: "xdp", server_ping: false, config: "" },
    // The same egress with the kernel's huge-page mode (what `transparent_huge_pages` costs).
    Row {
        name: "uring+xdp+thp",
        backend: Some("uring"),
        liveness: "xdp",
        server_ping: false,
        config: "[memory]\ntransparent_huge_pages = \"system\"\n",
    },
    Row { name: "uring+userspace", backend: Some("uring"), liveness: "userspace", server_ping: false, config: "" },
    Row { name: "tokio+userspace", backend: Some("tokio"), liveness: "userspace", server_ping: false, config: "" },
    Row { name: "tokio+server-ping", backend: Some("tokio"), liveness: "server-ping", server_ping: true, config: "" },
];

#[derive(Debug, Default, Serialize, Clone)]
struct Point {
    n: usize,
    /// RSS growth from the 200-connection warm-up to N, ÷ N. (Memory freed at start-up and kept
    /// resident by the allocator would be reused by connections and hide their cost: the egress
    /// returns it after start-up, and `rss_bytes` shows the whole.)
    user_bytes_per_conn: f64,
    /// The server's RSS with N idle connections: what an operator sees.
    rss_bytes: u64,
    pss_bytes_per_conn: f64,
    /// Slab bytes per connection, client and server sockets together.
    slab_bytes_per_conn: f64,
    handshakes_per_sec: f64,
    /// Context switches per second of the server while the connections are idle.
    idle_wakeups_per_sec: f64,
}

#[derive(Debug, Default, Serialize)]
struct RowResult {
    row: String,
    skipped: Option<String>,
    points: Vec<Point>,
    /// Server CPU seconds (user + system) per 1,000 PING exchanges (client PINGs, or server pings).
    cpu_sec_per_1000_pings: Option<f64>,
    /// The user-space part of it: the egress's own code, which the design can change.
    user_cpu_sec_per_1000_pings: Option<f64>,
    /// The kernel part of it (TCP receive and send, syscalls, XDP in softirq when accounted here).
    system_cpu_sec_per_1000_pings: Option<f64>,
    pings: u64,
    wakeups_per_sec_pinging: Option<f64>,
    rtt_p50_us: Option<u64>,
    rtt_p99_us: Option<u64>,
    /// Idle reaping: silent connections closed / opened, the latest close after handshake
    /// (ms), and pinging connections closed (must be 0).
    reap_idle_closed: Option<u64>,
    reap_idle_total: Option<u64>,
    reap_latest_close_ms: Option<u64>,
    reap_live_closed: Option<u64>,
    reap_deadline_ms: Option<u64>,
    /// Server-side estimate: user + (slab − floor's client half), per connection, at the largest N.
    server_total_bytes_per_conn: Option<f64>,
}

#[derive(Serialize)]
struct Results {
    machine: String,
    kernel: String,
    cores: usize,
    mode: &'static str,
    ns: Vec<usize>,
    ping_interval_ms: u64,
    window_secs: u64,
    rows: Vec<RowResult>,
    tunnel: Option<bench::tunnel::TunnelResults>,
    webrtc: Option<bench::webrtc::WebrtcResults>,
    scale: Option<bench::scale::ScaleResults>,
    command: String,
}

fn start_server(bin: &Path, row: Row, keepalive_ms: u64, idle_ms: u64, port: u16) -> Result<Server> {
    match row.backend {
        None => procs::start_floor(&std::env::current_exe()?, port, 1),
        Some(backend) => procs::start_egress(
            bin,
            row.name,
            &format!(
                "[liveness]\nmode = \"{}\"\nkeepalive = \"{keepalive_ms}ms\"\nidle_timeout = \"{idle_ms}ms\"\nsweep_interval = \"1s\"\ninterfaces = [\"lo\"]\n[io]\nbackend = \"{backend}\"\nthreads = 2\n[limits]\nmax_connections_per_ip = 1000000\n{}",
                row.liveness, row.config
            ),
            port,
        ),
    }
}

/// `n` connections from 127.0.`base`+k.x, holding `hold` seconds.
#[allow(clippy::too_many_arguments)]
fn start_load(
    bin: &Path,
    target: std::net::SocketAddr,
    n: usize,
    ping_ms: u64,
    announce: bool,
    tcp: bool,
    hold: u64,
    base: u8,
) -> Result<LoadProc> {
    procs::start_load(bin, target, LoadSpec { ping_ms, announce, tcp, hold, ..LoadSpec::new(n, base) })
}

fn slab_total(s: &std::collections::BTreeMap<String, u64>) -> u64 {
    s.values().sum()
}

fn run(full: bool, out: &Path, bin: &Path, only: &[String]) -> Result<()> {
    let ns: Vec<usize> = if full { vec![2000, 5000, 10_000, 19_000] } else { vec![500, 2000] };
    let window = if full { 15 } else { 4 };
    let ping_ms: u64 = if full { 5000 } else { 2000 };
    std::fs::create_dir_all(out)?;
    let mut results = Vec::new();
    let mut port = 24_000u16;
    for row in ROWS {
        if row.backend.is_some() && !only.is_empty() && !only.iter().any(|r| r == row.name) {
            continue;
        }
        eprintln!("== {}", row.name);
        let mut r = RowResult { row: row.name.into(), ..RowResult::default() };
        // Memory, ramp and idle wakeups at each N (silent connections; long idle timeout).
        for &n in &ns {
            port += 1;
            let server = match start_server(bin, row, ping_ms, 600_000, port) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("   skipped: {e:#}");
                    r.skipped = Some(format!("{e:#}"));
                    break;
                }
            };
            let pid = server.pids()[0];
            let tcp = row.backend.is_none();
            let warm = start_load(bin, server.addr, 200, 0, true, tcp, 1, 1)?;
            warm.done(LoadOut::default())?;
            std::thread::sleep(Duration::from_millis(1500));
            let (rss0, pss0, slab0) =
                (procfs::rss_bytes(pid).unwrap_or(0), procfs::pss_bytes(pid).unwrap_or(0), procfs::slab());
            let mut load = start_load(bin, server.addr, n, 0, !row.server_ping, tcp, 600, 10)?;
            let ready = load.ready()?;
            std::thread::sleep(Duration::from_millis(1000));
            let (rss1, pss1, slab1) =
                (procfs::rss_bytes(pid).unwrap_or(0), procfs::pss_bytes(pid).unwrap_or(0), procfs::slab());
            let cs0 = procfs::context_switches(pid).unwrap_or(0);
            let t = Instant::now();
            std::thread::sleep(Duration::from_secs(window));
            let cs1 = procfs::context_switches(pid).unwrap_or(0);
            let per = |a: u64, b: u64| (b as f64 - a as f64) / n as f64;
            let p = Point {
                n,
                user_bytes_per_conn: per(rss0, rss1),
                rss_bytes: rss1,
                pss_bytes_per_conn: per(pss0, pss1),
                slab_bytes_per_conn: per(slab_total(&slab0), slab_total(&slab1)),
                handshakes_per_sec: ready.handshaked as f64 / ready.ready_secs.max(1e-3),
                idle_wakeups_per_sec: (cs1 - cs0) as f64 / t.elapsed().as_secs_f64(),
            };
            eprintln!("   N={n}: {p:?} (failed {})", ready.failed);
            r.points.push(p);
            load.kill();
        }
        if r.skipped.is_some() || row.backend.is_none() {
            results.push(r);
            continue;
        }
        // Keepalive cost: every connection pings (or is pinged) for the window.
        let n = *ns.last().expect("Ns");
        port += 1;
        let server = start_server(bin, row, ping_ms, 600_000, port)?;
        let pid = server.pids()[0];
        let client_ping = if row.server_ping { 0 } else { ping_ms };
        let mut load = start_load(bin, server.addr, n, client_ping, !row.server_ping, false, window + 2, 30)?;
        let ready = load.ready()?;
        let (cpu0, cs0) = (procfs::cpu_times(pid).unwrap_or_default(), procfs::context_switches(pid).unwrap_or(0));
        let t = Instant::now();
        let done = load.done(ready)?;
        let (cpu1, cs1) = (procfs::cpu_times(pid).unwrap_or_default(), procfs::context_switches(pid).unwrap_or(0));
        let cpu = cpu1 - cpu0;
        let pings = if row.server_ping {
            // Server pings are counted by the clients answering them (loadgen idle mode).
            done.pings.max((n as u64) * window / (ping_ms / 1000).max(1))
        } else {
            done.pings
        };
        r.pings = pings;
        let per_1000 = |secs: f64| (pings > 0).then(|| secs / (pings as f64 / 1000.0));
        r.cpu_sec_per_1000_pings = per_1000(cpu.total());
        r.user_cpu_sec_per_1000_pings = per_1000(cpu.user);
        r.system_cpu_sec_per_1000_pings = per_1000(cpu.system);
        r.wakeups_per_sec_pinging = Some((cs1 - cs0) as f64 / t.elapsed().as_secs_f64());
        if !row.server_ping {
            r.rtt_p50_us = Some(done.rtt_p50);
            r.rtt_p99_us = Some(done.rtt_p99);
        }
        eprintln!(
            "   pings {pings}, cpu user {:.3}s system {:.3}s; per 1k: user {:?} total {:?}",
            cpu.user, cpu.system, r.user_cpu_sec_per_1000_pings, r.cpu_sec_per_1000_pings
        );
        drop(server);
        // Idle reaping: 1,000 silent and 1,000 pinging connections, idle timeout 4 s.
        if !row.server_ping {
            port += 1;
            let server = start_server(bin, row, 1000, 4000, port)?;
            let mut silent = start_load(bin, server.addr, 1000, 0, true, false, 8, 60)?;
            let mut live = start_load(bin, server.addr, 1000, 1000, true, false, 8, 70)?;
            let s = silent.ready()?;
            let l = live.ready()?;
            let s = silent.done(s)?;
            let l = live.done(l)?;
            r.reap_idle_closed = Some(s.closed);
            r.reap_idle_total = Some(s.handshaked);
            r.reap_latest_close_ms = Some(s.close_after_ms_max);
            r.reap_live_closed = Some(l.closed);
            r.reap_deadline_ms = Some(4000 + 1000);
            eprintln!(
                "   reaping: {}/{} idle closed, latest after {} ms; live closed {}",
                s.closed, s.handshaked, s.close_after_ms_max, l.closed
            );
        }
        results.push(r);
    }
    // Server-side totals at the largest N, from the floor's slab cost (client + server).
    let floor_slab = results[0].points.last().map(|p| p.slab_bytes_per_conn).unwrap_or(0.0);
    for r in &mut results {
        if let Some(p) = r.points.last() {
            r.server_total_bytes_per_conn =
                Some(p.user_bytes_per_conn.max(0.0) + p.slab_bytes_per_conn - floor_slab / 2.0);
        }
    }
    // Chosen rows are a look at the connection figures alone (`--tunnel` and `--webrtc` run
    // the other sections alone).
    let scale = (full && only.is_empty())
        .then(|| {
            scale_section(bin, out, &bench::scale::ScaleConfig::full()).map_err(|e| eprintln!("scale: {e:#}")).ok()
        })
        .flatten();
    let (tunnel, webrtc) = if only.is_empty() {
        (
            bench::tunnel::run(bin, &std::env::current_exe()?, tunnel_bytes(full), None)
                .map_err(|e| eprintln!("tunnel: {e:#}"))
                .ok(),
            webrtc_section(bin, full).map_err(|e| eprintln!("webrtc: {e:#}")).ok(),
        )
    } else {
        (None, None)
    };
    let uname = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let res = Results {
        machine: std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            })
            .unwrap_or_default(),
        kernel: uname,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        mode: if full { "full" } else { "quick" },
        ns: ns.clone(),
        ping_interval_ms: ping_ms,
        window_secs: window,
        rows: results,
        tunnel,
        webrtc,
        scale,
        command: if full { "cargo xtask bench --full".into() } else { "cargo xtask bench".into() },
    };
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&res)?)?;
    std::fs::write(out.join("results.md"), markdown(&res))?;
    plots(&res, out)?;
    print!("{}", markdown(&res));
    Ok(())
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.digits$}"))
}

fn markdown(r: &Results) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "Machine: {} ({} cores), Linux {}. Mode: {} (N = {:?}; PING interval {} ms; windows {} s).\n\n",
        r.machine, r.cores, r.kernel, r.mode, r.ns, r.ping_interval_ms, r.window_secs
    ));
    let floor_total = r.rows[0].server_total_bytes_per_conn.unwrap_or(0.0);
    let tokio_sp = r.rows.iter().find(|x| x.row == "tokio+server-ping");
    let (tokio_user, tokio_total) =
        (tokio_sp.and_then(|x| x.user_cpu_sec_per_1000_pings), tokio_sp.and_then(|x| x.cpu_sec_per_1000_pings));
    s.push_str("| row | user B/conn | RSS at largest N MB | slab B/conn (client+server) | server total B/conn | × floor | handshakes/s | idle wakeups/s | user CPU ms per 1k PINGs | system CPU ms per 1k PINGs | user CPU × below tokio+server-ping | total CPU × below tokio+server-ping | RTT p50/p99 µs | idle reaping |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for row in &r.rows {
        if let Some(why) = &row.skipped {
            s.push_str(&format!("| {} | skipped: {} ||||||||||||||\n", row.row, why.lines().next().unwrap_or("")));
            continue;
        }
        let p = row.points.last().cloned().unwrap_or_default();
        let ratio = row.server_total_bytes_per_conn.map(|t| t / floor_total.max(1.0));
        let below = |base: Option<f64>, this: Option<f64>| match (base, this) {
            (Some(b), Some(c)) if c > 0.0 => Some(b / c),
            _ => None,
        };
        let ms = |v: Option<f64>| v.map(|v| v * 1000.0);
        let reap = match (row.reap_idle_closed, row.reap_idle_total, row.reap_latest_close_ms, row.reap_live_closed) {
            (Some(c), Some(t), Some(ms), Some(live)) => format!(
                "{c}/{t} idle closed by {ms} ms (deadline {} ms); {live} live closed",
                row.reap_deadline_ms.unwrap_or(0)
            ),
            _ => "n/a".into(),
        };
        s.push_str(&format!(
            "| {} | {} | {:.1} | {:.0} | {} | {} | {:.0} | {:.1} | {} | {} | {} | {} | {} | {} |\n",
            row.row,
            fmt(Some(p.user_bytes_per_conn), 0),
            p.rss_bytes as f64 / 1e6,
            p.slab_bytes_per_conn,
            fmt(row.server_total_bytes_per_conn, 0),
            fmt(ratio, 2),
            p.handshakes_per_sec,
            p.idle_wakeups_per_sec,
            fmt(ms(row.user_cpu_sec_per_1000_pings), 2),
            fmt(ms(row.system_cpu_sec_per_1000_pings), 2),
            fmt(below(tokio_user, row.user_cpu_sec_per_1000_pings), 1),
            fmt(below(tokio_total, row.cpu_sec_per_1000_pings), 1),
            match (row.rtt_p50_us, row.rtt_p99_us) {
                (Some(a), Some(b)) => format!("{a}/{b}"),
                _ => "n/a".into(),
            },
            reap
        ));
    }
    s.push_str("\nIdle wakeups per second by N (server context switches while every connection is silent):\n\n| row |");
    for n in &r.ns {
        s.push_str(&format!(" N={n} |"));
    }
    s.push_str("\n|---|");
    for _ in &r.ns {
        s.push_str("---|");
    }
    s.push('\n');
    for row in &r.rows {
        s.push_str(&format!("| {} |", row.row));
        for p in &row.points {
            s.push_str(&format!(" {:.1} |", p.idle_wakeups_per_sec));
        }
        s.push('\n');
    }
    if let Some(x) = &r.scale {
        s += &bench::scale::markdown(x, &r.command);
    }
    if let Some(w) = &r.webrtc {
        s += &webrtc_markdown(w, &r.command);
    }
    if let Some(t) = &r.tunnel {
        s += &bench::tunnel::markdown(t, &r.command);
    }
    s
}

fn plots(r: &Results, out: &Path) -> Result<()> {
    use plotters::prelude::*;
    let path = out.join("memory_per_conn.svg");
    let root = SVGBackend::new(&path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_y = r
        .rows
        .iter()
        .flat_map(|x| x.points.iter().map(|p| p.user_bytes_per_conn.max(0.0) + p.slab_bytes_per_conn))
        .fold(1.0, f64::max);
    let max_n = *r.ns.last().unwrap_or(&1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption("Memory per idle connection (user + slab, client+server slab)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_n * 1.05, 0f64..max_y * 1.1)?;
    chart.configure_mesh().x_desc("N connections").y_desc("bytes per connection").draw()?;
    for (i, row) in r.rows.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> =
            row.points.iter().map(|p| (p.n as f64, p.user_bytes_per_conn.max(0.0) + p.slab_bytes_per_conn)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(row.row.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;

    let path = out.join("cpu_per_ping.svg");
    let root = SVGBackend::new(&path, (800, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    // Stacked: user space (the egress's own code) below, kernel (system) above.
    let bars: Vec<(String, f64, f64)> = r
        .rows
        .iter()
        .filter_map(|x| {
            Some((x.row.clone(), x.user_cpu_sec_per_1000_pings? * 1000.0, x.system_cpu_sec_per_1000_pings? * 1000.0))
        })
        .collect();
    let max = bars.iter().map(|b| b.1 + b.2).fold(0.001, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption("Server CPU milliseconds per 1,000 PINGs (user below, system above)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0..bars.len(), 0f64..max * 1.15)?;
    chart
        .configure_mesh()
        .x_labels(bars.len())
        .x_label_formatter(&|i| bars.get(*i).map(|b| b.0.clone()).unwrap_or_default())
        .y_desc("ms CPU per 1,000 PINGs")
        .draw()?;
    chart
        .draw_series(
            bars.iter().enumerate().map(|(i, b)| Rectangle::new([(i, 0.0), (i + 1, b.1)], BLUE.mix(0.6).filled())),
        )?
        .label("user")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], BLUE.mix(0.6).filled()));
    chart
        .draw_series(
            bars.iter().enumerate().map(|(i, b)| Rectangle::new([(i, b.1), (i + 1, b.1 + b.2)], RED.mix(0.4).filled())),
        )?
        .label("system")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], RED.mix(0.4).filled()));
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

/// Consumers timed per path and volunteers in the matching measurement.
/// Density past the open-file limit; writes scale.json and scale_per_conn.svg into `out`.
fn scale_section(bin: &Path, out: &Path, cfg: &bench::scale::ScaleConfig) -> Result<bench::scale::ScaleResults> {
    std::fs::create_dir_all(out)?;
    let r = bench::scale::run(bin, &std::env::current_exe()?, cfg)?;
    std::fs::write(out.join("scale.json"), serde_json::to_string_pretty(&r)?)?;
    bench::scale::plot(&r, &out.join("scale_per_conn.svg"))?;
    Ok(r)
}

/// 1,000 (2,000 with --full) volunteers and consumers per measurement, three rounds.
fn signaling_section(bin: &Path, full: bool) -> Result<Vec<bench::signaling::MatchRow>> {
    bench::signaling::run(bin, if full { 2000 } else { 1000 }, 3)
}

fn webrtc_section(bin: &Path, full: bool) -> Result<bench::webrtc::WebrtcResults> {
    let (consumers, volunteers) = if full { (200, 2000) } else { (100, 1000) };
    bench::webrtc::run(bin, consumers, volunteers)
}

fn webrtc_markdown(w: &bench::webrtc::WebrtcResults, command: &str) -> String {
    let row = |name: &str, l: &bench::webrtc::Latency| {
        format!("| {name} | {} | {:.0} | {:.0} | {:.0} | {:.0} |\n", l.n, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms)
    };
    let mut s = String::from("\nWebRTC hop: cold consumer start → first byte through the tunnel (signaling, ICE, DTLS, SCTP, Broflake handshake, QUIC, proxy request), ms:\n\n| path | consumers | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|\n");
    s += &row("direct (host candidates)", &w.ttfb_direct);
    s += &row("through TURN (relay-only consumers)", &w.ttfb_turn);
    s += &format!(
        "\nSignaling: {:.0} matches/s with {} volunteers and {} consumers (one replica, clients on the same machine); {:.0} bytes of service RSS per waiting volunteer.\n\nCommand: `{command}`.\n",
        w.matches_per_sec, w.volunteers, w.volunteers, w.signal_bytes_per_volunteer
    );
    s
}
