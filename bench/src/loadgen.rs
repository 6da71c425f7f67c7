//! The load generator: N WebSockets from many 127.0.0.x source addresses, each completing
//! the Broflake handshake and then idling, optionally sending PING at an interval and timing
//! the PONG. Raw sockets and precomputed bytes keep it to a few hundred bytes per connection.

use broflake_proto::frame::{decode_message, Frame};
use broflake_proto::{binding, ClientConfig, ClientSession, Timestamp};
use hdrhistogram::Histogram;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub target: SocketAddr,
    pub conns: usize,
    /// Source addresses to spread connections over (ephemeral ports run out per address).
    pub sources: Vec<Ipv4Addr>,
    /// Send PING at this interval (with up to 20 % jitter); None: idle silently.
    pub ping_interval: Option<Duration>,
    /// Announce the PING capability in HELLO (off for the server-ping baseline).
    pub announce_ping: bool,
    /// Connections being opened at once.
    pub ramp_parallelism: usize,
    /// Plain TCP only: connect and hold, no WebSocket (the `floor` row).
    pub tcp_only: bool,
    /// Close with a reset (SO_LINGER 0): nothing left in TIME_WAIT.
    pub reset_on_close: bool,
}

impl LoadConfig {
    pub fn new(target: SocketAddr, conns: usize) -> Self {
        LoadConfig {
            target,
            conns,
            sources: (1..=50).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect(),
            ping_interval: None,
            announce_ping: true,
            ramp_parallelism: 256,
            tcp_only: false,
            reset_on_close: false,
        }
    }
}

/// Live counters of a load run.
#[derive(Debug)]
pub struct LoadStats {
    pub handshaked: AtomicU64,
    pub failed: AtomicU64,
    /// Connections the server closed (or that broke) after the handshake.
    pub closed: AtomicU64,
    pub pings: AtomicU64,
    pub pongs: AtomicU64,
    /// PING → PONG round trips, microseconds.
    pub rtt_us: Mutex<Histogram<u64>>,
    /// Milliseconds from handshake to the server's close, for connections it closed.
    pub close_after_ms: Mutex<Histogram<u64>>,
}

impl Default for LoadStats {
    fn default() -> Self {
        LoadStats {
            handshaked: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            pings: AtomicU64::new(0),
            pongs: AtomicU64::new(0),
            rtt_us: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")),
            close_after_ms: Mutex::new(Histogram::new_with_bounds(1, 3_600_000, 3).expect("histogram bounds")),
        }
    }
}

/// A running load. Dropping it closes every connection.
#[derive(Debug)]
pub struct Load {
    pub stats: Arc<LoadStats>,
    tasks: tokio::task::JoinSet<()>,
    pub started: Instant,
}

/// The upgrade request, and the HELLO frame sent once the 101 arrived (as browsers do).
fn opening_bytes(target: SocketAddr, announce_ping: bool) -> (Vec<u8>, Vec<u8>) {
    let out = format!(
        "GET {} HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: broflake.v1, broflake\r\n\r\n",
        binding::DEFAULT_PATH
    )
    .into_bytes();
    let mut cfg = ClientConfig { grease: false, ..ClientConfig::default() };
    cfg.send_pings = announce_ping;
    let mut hello = Vec::new();
    ClientSession::new(1).start(&cfg, Timestamp(0), &mut hello);
    let mut frame = Vec::new();
    ws_frame(&hello, &mut frame);
    (out, frame)
}

/// A masked client binary frame.
pub fn ws_frame(payload: &[u8], out: &mut Vec<u8>) {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    out.push(0x82);
    if payload.len() < 126 {
        out.push(0x80 | payload.len() as u8);
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// Reads until a server WebSocket frame carries a Broflake frame of type `want` (skipping an
/// HTTP head first if `http` is set). Returns that frame's payload (PING/PONG) or an empty
/// vector; None on EOF, error or close.
async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, mut http: bool, want: u64) -> Option<Vec<u8>> {
    let mut chunk = [0u8; 512];
    loop {
        if http {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                if !buf.starts_with(b"HTTP/1.1 101") {
                    return None;
                }
                buf.drain(..i + 4);
                http = false;
            }
        }
        while !http && buf.len() >= 2 {
            let (len, hl) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
                126 => break,
                127 => return None,
                n => (usize::from(n), 2),
            };
            if buf.len() < hl + len {
                break;
            }
            let op = buf[0] & 0x0f;
            if op == 0x8 {
                return None;
            }
            let found = if op == 0x2 {
                decode_message(&buf[hl..hl + len], usize::MAX).ok().and_then(|frames| {
                    frames.iter().find(|d| d.frame.frame_type() == want).map(|d| match d.frame {
                        Frame::Ping { payload } | Frame::Pong { payload } => payload.to_vec(),
                        _ => Vec::new(),
                    })
                })
            } else {
                None
            };
            buf.drain(..hl + len);
            if found.is_some() {
                return found;
            }
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn one(
    cfg: Arc<LoadConfig>,
    i: usize,
    opening: Arc<(Vec<u8>, Vec<u8>)>,
    stats: Arc<LoadStats>,
    ramp: Arc<tokio::sync::Semaphore>,
) {
    let permit = ramp.acquire().await.expect("semaphore open");
    let src = cfg.sources[i % cfg.sources.len()];
    let connect = async {
        let sock = TcpSocket::new_v4()?;
        sock.bind(SocketAddr::from((src, 0)))?;
        if cfg.reset_on_close {
            // A zero linger never blocks: the close resets at once.
            socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO))?;
        }
        let mut s = sock.connect(cfg.target).await?;
        s.set_nodelay(true)?;
        if !cfg.tcp_only {
            s.write_all(&opening.0).await?;
        }
        std::io::Result::Ok(s)
    };
    let mut s = match tokio::time::timeout(Duration::from_secs(30), connect).await {
        Ok(Ok(s)) => s,
        _ => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let mut buf = Vec::with_capacity(256);
    if cfg.tcp_only {
        stats.handshaked.fetch_add(1, Ordering::Relaxed);
        drop(permit);
        let mut one = [0u8; 1];
        let _ = s.read(&mut one).await;
        stats.closed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let upgraded = async {
        let mut chunk = [0u8; 512];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
            buf.extend_from_slice(&chunk[..n]);
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        if !buf.starts_with(b"HTTP/1.1 101") {
            return None;
        }
        buf.drain(..end);
        s.write_all(&opening.1).await.ok()?;
        read_until(&mut s, &mut buf, false, broflake_proto::frame::types::WELCOME).await
    };
    if upgraded.await.is_none() {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    buf.shrink_to(64);
    stats.handshaked.fetch_add(1, Ordering::Relaxed);
    let handshaked_at = Instant::now();
    drop(permit);
    match cfg.ping_interval {
        None => {
            // Idle: just notice if the server closes, answering server PINGs (baseline mode).
            while let Some(payload) = read_until(&mut s, &mut buf, false, broflake_proto::frame::types::PING).await {
                // A server PING (the server-ping baseline): counted as one PING exchange.
                stats.pings.fetch_add(1, Ordering::Relaxed);
                let mut pong = Vec::new();
                Frame::Pong { payload: &payload }.encode(0, &mut pong);
                let mut f = Vec::new();
                ws_frame(&pong, &mut f);
                if s.write_all(&f).await.is_err() {
                    break;
                }
            }
        }
        Some(interval) => {
            let mut seq = 0u64;
            let mut rng = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            loop {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let jitter = interval.mul_f64((rng % 200) as f64 / 1000.0);
                tokio::time::sleep(interval - jitter).await;
                seq += 1;
                let mut ping = Vec::new();
                Frame::Ping { payload: &seq.to_be_bytes() }.encode(0, &mut ping);
                let mut f = Vec::new();
                ws_frame(&ping, &mut f);
                let t0 = Instant::now();
                if s.write_all(&f).await.is_err() {
                    break;
                }
                stats.pings.fetch_add(1, Ordering::Relaxed);
                if read_until(&mut s, &mut buf, false, broflake_proto::frame::types::PONG).await.is_none() {
                    break;
                }
                let us = t0.elapsed().as_micros() as u64;
                stats.pongs.fetch_add(1, Ordering::Relaxed);
                let _ = stats.rtt_us.lock().expect("poisoned").record(us.max(1));
            }
        }
    }
    stats.closed.fetch_add(1, Ordering::Relaxed);
    let ms = handshaked_at.elapsed().as_millis() as u64;
    let _ = stats.close_after_ms.lock().expect("poisoned").record(ms.max(1));
}

impl Load {
    /// Starts opening connections (returns at once; watch `stats`).
    pub fn start(cfg: LoadConfig) -> Load {
        let stats = Arc::new(LoadStats::default());
        let opening = Arc::new(opening_bytes(cfg.target, cfg.announce_ping));
        let ramp = Arc::new(tokio::sync::Semaphore::new(cfg.ramp_parallelism));
        let cfg = Arc::new(cfg);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..cfg.conns {
            tasks.spawn(one(cfg.clone(), i, opening.clone(), stats.clone(), ramp.clone()));
        }
        Load { stats, tasks, started: Instant::now() }
    }

    /// Waits until `n` connections completed the handshake (or failed); false on timeout.
    pub async fn wait_handshaked(&self, n: u64, timeout: Duration) -> bool {
        let t = Instant::now();
        loop {
            let done = self.stats.handshaked.load(Ordering::Relaxed) + self.stats.failed.load(Ordering::Relaxed);
            if done >= n {
                return self.stats.failed.load(Ordering::Relaxed) == 0;
            }
            if t.elapsed() > timeout {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Closes every connection.
    pub async fn stop(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}
