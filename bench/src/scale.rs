//! Density past one process's open-file limit: the io_uring egress with XDP liveness (the
//! shipped defaults but for direct descriptors, the setting for a limit below the connections
//! held, and io threads as needed so each ring's file table stays under the limit)
//! against the floor (plain accept-and-hold TCP servers, as many processes as the limit needs)
//! at 50,000 to 150,000 idle connections, in interleaved rounds; and the CPU cost of a PING
//! with the scheduler's nanosecond clock next to the tick-based user/system split.

use crate::procfs;
use crate::procs::{self, LoadOut, LoadSpec, Server};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

/// Connections per io thread (and per floor process): under this machine's 20,000 open files
/// per ring (or process) with room for SO_REUSEPORT's uneven spread.
const PER_RING: usize = 15_000;

#[derive(Debug, Clone, Serialize)]
pub struct ScaleConfig {
    pub ns: Vec<usize>,
    pub rounds: usize,
    /// Seconds of idle counted for wakeups.
    pub window_secs: u64,
    /// The PING measurement: connections, interval, seconds.
    pub ping_conns: usize,
    pub ping_ms: u64,
    pub ping_secs: u64,
    /// The egress with ordinary descriptors (`io.uring_direct_descriptors = false`, the default;
    /// only N under the open-file limit fit), to compare with the direct ones the scale rows need.
    pub ordinary_descriptors: bool,
}

impl ScaleConfig {
    pub fn full() -> Self {
        ScaleConfig {
            ns: vec![50_000, 100_000, 150_000],
            rounds: 3,
            window_secs: 10,
            ping_conns: 50_000,
            ping_ms: 2000,
            ping_secs: 60,
            ordinary_descriptors: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ScalePoint {
    pub row: String,
    pub n: usize,
    pub round: usize,
    /// io threads (egress) or processes (floor).
    pub servers: usize,
    pub handshaked: u64,
    pub failed: u64,
    /// RSS growth from the warm-up to N, ÷ N (all the row's processes): what N connections
    /// cost, the per-thread memory they first touch (buffers, tables) included.
    pub user_bytes_per_conn: f64,
    /// RSS growth from N/2 to N, ÷ (N − N/2): the slope, with every thread already warm.
    pub user_slope: f64,
    /// Slab growth ÷ N, client and server sockets together.
    pub slab_bytes_per_conn: f64,
    /// The BPF maps' memory (kernel `memlock`) before the load and with N connections.
    pub map_bytes_start: u64,
    pub map_bytes_at_n: u64,
    pub rss_bytes: u64,
    pub handshakes_per_sec: f64,
    pub idle_wakeups_per_sec: f64,
}

/// Median and extremes of one figure over the rounds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Spread {
        v.sort_by(f64::total_cmp);
        let median = if v.is_empty() { f64::NAN } else { v[v.len() / 2] };
        Spread { median, min: v.first().copied().unwrap_or(f64::NAN), max: v.last().copied().unwrap_or(f64::NAN) }
    }

    fn show(&self, digits: usize) -> String {
        format!("{:.digits$} ({:.digits$}–{:.digits$})", self.median, self.min, self.max)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ScaleSummary {
    pub n: usize,
    pub user: Spread,
    pub slope: Spread,
    pub slab: Spread,
    /// The XDP maps' memory per connection at the configured capacity: per-flow growth plus
    /// the maps' memory at start ÷ capacity.
    pub map_share: Spread,
    /// user + slab − the floor's client half + the maps' memory at start ÷ capacity (the
    /// per-flow entries come from kmalloc slabs, so the slab column has them already).
    pub total: Spread,
    pub floor_total: Spread,
    /// total ÷ the same round's floor total.
    pub ratio: Spread,
    pub idle_wakeups: Spread,
    pub handshakes: Spread,
}

#[derive(Debug, Clone, Serialize)]
pub struct PingCost {
    pub conns: usize,
    pub pings: u64,
    pub secs: f64,
    /// Scheduler clock (ns), every thread: user + system.
    pub cpu_ns_per_ping: f64,
    pub user_ticks: u64,
    pub system_ticks: u64,
    pub ticks_per_sec: u64,
    pub user_ms_per_1k: f64,
    pub system_ms_per_1k: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScaleResults {
    pub config: ScaleConfig,
    /// The egress's `max_connections` (the XDP map's capacity in connections).
    pub capacity: usize,
    pub points: Vec<ScalePoint>,
    pub summary: Vec<ScaleSummary>,
    pub ping: Option<PingCost>,
}

const CAPACITY: usize = 1_000_000;

fn egress_config(threads: usize, keepalive_ms: u64, ordinary: bool) -> String {
    // The shipped defaults (max_connections 1,000,000, XDP liveness) but for direct
    // descriptors (past the open-file limit, what an operator there sets), the io threads, the
    // interface (loopback) and the per-address limit (all load is from 127/8).
    format!(
        "[liveness]\nmode = \"xdp\"\nkeepalive = \"{keepalive_ms}ms\"\nidle_timeout = \"600s\"\ninterfaces = [\"lo\"]\n[io]\nbackend = \"uring\"\nthreads = {threads}\nuring_direct_descriptors = {}\n[limits]\nmax_connections_per_ip = 1000000\n",
        !ordinary
    )
}

fn sum(pids: &[u32], f: impl Fn(u32) -> Option<u64>) -> u64 {
    pids.iter().filter_map(|p| f(*p)).sum()
}

/// Waits (bounded) until the host's TCP sockets are back to `baseline`: the previous
/// measurement's sockets must not be freed during the next one's.
fn settle(baseline: u64) {
    let t = Instant::now();
    while procfs::tcp_in_use().unwrap_or(0) > baseline + 50 && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[allow(clippy::too_many_arguments)]
fn point(
    bin: &Path,
    exe: &Path,
    row: &str,
    n: usize,
    round: usize,
    window: u64,
    ordinary: bool,
    port: u16,
    net: u8,
) -> Result<ScalePoint> {
    let servers = n.div_ceil(PER_RING).max(2);
    let floor = row == "floor";
    let server: Server = if floor {
        procs::start_floor(exe, port, servers)?
    } else {
        procs::start_egress(bin, row, &egress_config(servers, 5000, ordinary), port)?
    };
    let pids = server.pids();
    let spec = |n, base| LoadSpec { tcp: floor, net, reset: true, ..LoadSpec::new(n, base) };
    procs::start_load(bin, server.addr, LoadSpec { hold: 1, ..spec(200, 1) })?.done(LoadOut::default())?;
    std::thread::sleep(Duration::from_millis(1500));
    let (rss0, slab0, map0) =
        (sum(&pids, procfs::rss_bytes), procfs::slab().values().sum::<u64>(), sum(&pids, procfs::bpf_map_bytes));
    // In two halves, so the slope between N/2 and N is measured on the same threads.
    let half = n / 2;
    let mut first = procs::start_load(bin, server.addr, spec(half, 10))?;
    let ready_half = first.ready()?;
    std::thread::sleep(Duration::from_millis(1000));
    let rss_half = sum(&pids, procfs::rss_bytes);
    let base = 10 + u8::try_from(half.div_ceil(procs::PER_PROCESS)).context("too many load processes")?;
    let mut second = procs::start_load(bin, server.addr, spec(n - half, base))?;
    let ready = second.ready()?;
    std::thread::sleep(Duration::from_millis(1000));
    let (rss1, slab1, map1) =
        (sum(&pids, procfs::rss_bytes), procfs::slab().values().sum::<u64>(), sum(&pids, procfs::bpf_map_bytes));
    let cs0 = sum(&pids, procfs::context_switches);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(window));
    let cs1 = sum(&pids, procfs::context_switches);
    let per = |a: u64, b: u64| (b as f64 - a as f64) / n as f64;
    let p = ScalePoint {
        row: row.into(),
        n,
        round,
        servers,
        handshaked: ready_half.handshaked + ready.handshaked,
        failed: ready_half.failed + ready.failed,
        user_bytes_per_conn: per(rss0, rss1),
        user_slope: (rss1 as f64 - rss_half as f64) / (n - half) as f64,
        slab_bytes_per_conn: per(slab0, slab1),
        map_bytes_start: map0,
        map_bytes_at_n: map1,
        rss_bytes: rss1,
        handshakes_per_sec: (ready_half.handshaked + ready.handshaked) as f64
            / (ready_half.ready_secs + ready.ready_secs).max(1e-3),
        idle_wakeups_per_sec: (cs1 - cs0) as f64 / t.elapsed().as_secs_f64(),
    };
    first.kill();
    second.kill();
    drop(server);
    Ok(p)
}

/// CPU per PING at `conns` connections PINGing every `ping_ms` for `secs`.
fn ping_cost(bin: &Path, cfg: &ScaleConfig, port: u16) -> Result<PingCost> {
    let threads = cfg.ping_conns.div_ceil(PER_RING).max(2);
    let server =
        procs::start_egress(bin, "uring+xdp", &egress_config(threads, cfg.ping_ms, cfg.ordinary_descriptors), port)?;
    let pid = server.pids()[0];
    let spec = LoadSpec {
        ping_ms: cfg.ping_ms,
        hold: cfg.ping_secs,
        net: 250,
        reset: true,
        ..LoadSpec::new(cfg.ping_conns, 10)
    };
    let mut load = procs::start_load(bin, server.addr, spec)?;
    let ready = load.ready()?;
    let ticks = || -> Option<(u64, u64)> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let f: Vec<&str> = s[s.rfind(')')? + 2..].split_whitespace().collect();
        Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
    };
    let (t0, ns0) = (ticks().context("ticks")?, procfs::cpu_ns(pid).context("schedstat")?);
    let started = Instant::now();
    let done = load.done(ready)?;
    let (t1, ns1) = (ticks().context("ticks")?, procfs::cpu_ns(pid).context("schedstat")?);
    // SAFETY: sysconf with a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let pings = done.pings.max(1);
    let (user_ticks, system_ticks) = (t1.0 - t0.0, t1.1 - t0.1);
    let ms_per_1k = |ticks: u64| ticks as f64 * 1000.0 / hz as f64 / (pings as f64 / 1000.0);
    Ok(PingCost {
        conns: cfg.ping_conns,
        pings: done.pings,
        secs: started.elapsed().as_secs_f64(),
        cpu_ns_per_ping: (ns1 - ns0) as f64 / pings as f64,
        user_ticks,
        system_ticks,
        ticks_per_sec: hz,
        user_ms_per_1k: ms_per_1k(user_ticks),
        system_ms_per_1k: ms_per_1k(system_ticks),
    })
}

pub fn run(bin: &Path, exe: &Path, cfg: &ScaleConfig) -> Result<ScaleResults> {
    let baseline = procfs::tcp_in_use().unwrap_or(0);
    let mut points = Vec::new();
    let mut port = 26_000u16;
    let mut net = 1u8;
    // Interleaved: each round measures every N of both rows, so drift over the run falls on
    // every row alike.
    for round in 0..cfg.rounds {
        for &n in &cfg.ns {
            for row in ["floor", "uring+xdp"] {
                port += 1;
                net = net.wrapping_add(1).max(1);
                let p = point(bin, exe, row, n, round, cfg.window_secs, cfg.ordinary_descriptors, port, net)
                    .with_context(|| format!("{row} at N = {n}"))?;
                eprintln!("   round {round} {row} N={n}: {p:?}");
                points.push(p);
                settle(baseline);
            }
        }
    }
    let summary = summarize(&points, &cfg.ns);
    port += 1;
    let ping = ping_cost(bin, cfg, port).map_err(|e| eprintln!("ping cost: {e:#}")).ok();
    Ok(ScaleResults { config: cfg.clone(), capacity: CAPACITY, points, summary, ping })
}

/// A floor point's total per connection: its user space and the server half of the slab.
fn floor_total(p: &ScalePoint) -> f64 {
    p.user_bytes_per_conn.max(0.0) + p.slab_bytes_per_conn / 2.0
}

fn summarize(points: &[ScalePoint], ns: &[usize]) -> Vec<ScaleSummary> {
    let mut out = Vec::new();
    for &n in ns {
        let of = |row: &'static str| points.iter().filter(move |p| p.row == row && p.n == n);
        let floor_of_round = |round: usize| of("floor").find(|p| p.round == round).map(floor_total);
        let map_share = |p: &ScalePoint| {
            (p.map_bytes_at_n as f64 - p.map_bytes_start as f64) / p.n as f64
                + p.map_bytes_start as f64 / CAPACITY as f64
        };
        let total = |p: &ScalePoint| {
            let floor_slab = of("floor").find(|f| f.round == p.round).map_or(0.0, |f| f.slab_bytes_per_conn);
            p.user_bytes_per_conn.max(0.0) + p.slab_bytes_per_conn - floor_slab / 2.0
                + p.map_bytes_start as f64 / CAPACITY as f64
        };
        let e: Vec<&ScalePoint> = of("uring+xdp").collect();
        out.push(ScaleSummary {
            n,
            user: Spread::of(e.iter().map(|p| p.user_bytes_per_conn).collect()),
            slope: Spread::of(e.iter().map(|p| p.user_slope).collect()),
            slab: Spread::of(e.iter().map(|p| p.slab_bytes_per_conn).collect()),
            map_share: Spread::of(e.iter().map(|p| map_share(p)).collect()),
            total: Spread::of(e.iter().map(|p| total(p)).collect()),
            floor_total: Spread::of(of("floor").map(floor_total).collect()),
            ratio: Spread::of(e.iter().filter_map(|p| Some(total(p) / floor_of_round(p.round)?)).collect()),
            idle_wakeups: Spread::of(e.iter().map(|p| p.idle_wakeups_per_sec).collect()),
            handshakes: Spread::of(e.iter().map(|p| p.handshakes_per_sec).collect()),
        });
    }
    out
}

pub fn markdown(r: &ScaleResults, command: &str) -> String {
    let mut s = format!(
        "\n### Past the open-file limit: io_uring + XDP against the floor\n\n`{command}`: {} rounds, rows interleaved; \
         median (min–max) over the rounds. The egress runs its shipped defaults (max_connections {}, so the XDP map's \
         capacity) with one io thread per {PER_RING} connections and {}; the floor runs as many accept-and-hold processes. \
         Server total = user + slab − half the floor's slab + the XDP maps' memory at start ÷ capacity (their per-flow \
         entries are kmalloc'd, so already in the slab column). User B/conn is the RSS growth from the warm-up to N ÷ N, \
         so it includes what the io threads first touch under load (buffers, tables); the slope is the growth from \
         N/2 to N ÷ N/2, on threads already warm: what one more connection costs.\n\n\
         | N | user B/conn | user slope N/2→N | slab B/conn (client+server) | XDP maps B/conn at capacity | server total B/conn | floor total B/conn | × floor | idle wakeups/s | handshakes/s |\n|---|---|---|---|---|---|---|---|---|---|\n",
        r.config.rounds,
        r.capacity,
        if r.config.ordinary_descriptors { "ordinary descriptors" } else { "direct descriptors" }
    );
    for x in &r.summary {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            x.n,
            x.user.show(0),
            x.slope.show(0),
            x.slab.show(0),
            x.map_share.show(0),
            x.total.show(0),
            x.floor_total.show(0),
            x.ratio.show(3),
            x.idle_wakeups.show(1),
            x.handshakes.show(0)
        );
    }
    if let Some(p) = &r.ping {
        s += &format!(
            "\nCPU per PING ({} connections, a PING each {} ms, {:.0} s, {} PINGs): **{:.0} ns** per PING on the \
             scheduler's clock (all threads, user + system, ns resolution); split by ticks: user {:.3} ms and system \
             {:.3} ms per 1,000 PINGs from {} user and {} system ticks (resolution 1/{} s, i.e. ±{:.1} % and ±{:.1} %).\n",
            p.conns,
            r.config.ping_ms,
            p.secs,
            p.pings,
            p.cpu_ns_per_ping,
            p.user_ms_per_1k,
            p.system_ms_per_1k,
            p.user_ticks,
            p.system_ticks,
            p.ticks_per_sec,
            100.0 / p.user_ticks.max(1) as f64,
            100.0 / p.system_ticks.max(1) as f64
        );
    }
    s
}

/// Server bytes per connection against N, with each round's extremes as error bars.
pub fn plot(r: &ScaleResults, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_n = r.config.ns.iter().copied().max().unwrap_or(1) as f64;
    let max_y = r.summary.iter().map(|x| x.total.max.max(x.floor_total.max)).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption("Server bytes per idle connection (median, min–max over rounds)", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_n * 1.08, 0f64..max_y * 1.15)?;
    chart.configure_mesh().x_desc("N connections").y_desc("bytes per connection").draw()?;
    for (i, (name, pick)) in [
        ("uring+xdp (user + kernel + XDP maps)", (|x: &ScaleSummary| x.total) as fn(&ScaleSummary) -> Spread),
        ("floor", |x: &ScaleSummary| x.floor_total),
    ]
    .into_iter()
    .enumerate()
    {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, Spread)> = r.summary.iter().map(|x| (x.n as f64, pick(x))).collect();
        chart
            .draw_series(LineSeries::new(pts.iter().map(|(n, v)| (*n, v.median)), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        // The spread over the rounds: a bar from the least to the most, the median on it.
        chart.draw_series(
            pts.iter().map(|(n, v)| PathElement::new(vec![(*n, v.min), (*n, v.max)], color.stroke_width(2))),
        )?;
        chart.draw_series(pts.iter().map(|(n, v)| Circle::new((*n, v.median), 3, color.filled())))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}
