//! `loadgen --target ADDR --conns N [--ping-ms MS] [--no-announce-ping] [--hold-secs S]
//! [--source-net X --source-base Y] [--reset-on-exit]`:
//! opens N handshaked WebSockets and holds them, printing progress as JSON lines. The
//! benchmark runs several of these processes when N nears the open-file limit.

use bench::loadgen::{Load, LoadConfig};
use clap::Parser;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    target: std::net::SocketAddr,
    #[arg(long)]
    conns: usize,
    /// PING interval in ms (0: none).
    #[arg(long, default_value_t = 0)]
    ping_ms: u64,
    #[arg(long)]
    no_announce_ping: bool,
    /// Source addresses are 127.NET.BASE.1–40.
    #[arg(long, default_value_t = 0)]
    source_net: u8,
    #[arg(long, default_value_t = 1)]
    source_base: u8,
    /// Reset the connections when the process ends (SO_LINGER 0: no TIME_WAIT left behind).
    #[arg(long)]
    reset_on_exit: bool,
    /// Seconds to hold after the handshakes (then exit); 0 = until killed.
    #[arg(long, default_value_t = 0)]
    hold_secs: u64,
    /// Plain TCP connections (no WebSocket), for the floor row.
    #[arg(long)]
    tcp_only: bool,
    /// Use this single source address instead of 127.0.B.x.
    #[arg(long)]
    bind: Option<std::net::Ipv4Addr>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a = Args::parse();
    let mut cfg = LoadConfig::new(a.target, a.conns);
    cfg.sources = (0..40).map(|i| std::net::Ipv4Addr::new(127, a.source_net, a.source_base, 1 + i)).collect();
    cfg.ping_interval = (a.ping_ms > 0).then(|| Duration::from_millis(a.ping_ms));
    cfg.announce_ping = !a.no_announce_ping;
    cfg.tcp_only = a.tcp_only;
    cfg.reset_on_close = a.reset_on_exit;
    if let Some(ip) = a.bind {
        cfg.sources = vec![ip];
    }
    let load = Load::start(cfg);
    let ok = load.wait_handshaked(a.conns as u64, Duration::from_secs(300)).await;
    let s = &load.stats;
    println!(
        "{{\"event\":\"ready\",\"ok\":{ok},\"handshaked\":{},\"failed\":{},\"secs\":{:.3}}}",
        s.handshaked.load(Ordering::Relaxed),
        s.failed.load(Ordering::Relaxed),
        load.started.elapsed().as_secs_f64()
    );
    let hold = if a.hold_secs == 0 { Duration::from_secs(u64::MAX / 4) } else { Duration::from_secs(a.hold_secs) };
    tokio::time::sleep(hold).await;
    let h = s.rtt_us.lock().unwrap();
    let c = s.close_after_ms.lock().unwrap();
    println!(
        "{{\"event\":\"done\",\"pings\":{},\"pongs\":{},\"closed\":{},\"rtt_p50_us\":{},\"rtt_p99_us\":{},\"close_after_ms_max\":{}}}",
        s.pings.load(Ordering::Relaxed),
        s.pongs.load(Ordering::Relaxed),
        s.closed.load(Ordering::Relaxed),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        c.max()
    );
}
