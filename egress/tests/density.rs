//! Connection density of the io_uring backend, measured on a separate egress process: its
//! resident memory per idle handshaked connection, and bounded memory against a peer that
//! stops reading.

use bench::loadgen::{Load, LoadConfig};
use bench::procfs;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Egress {
    child: Child,
    ws: std::net::SocketAddr,
}

impl Drop for Egress {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_egress(backend: &str) -> Egress {
    let dir = testkit::temp_dir("density");
    let config = dir.join("egress.toml");
    std::fs::write(
        &config,
        "[liveness]\nmode = \"userspace\"\nkeepalive = \"60s\"\nidle_timeout = \"600s\"\n[io]\nthreads = 2\n[limits]\nmax_connections_per_ip = 100000\n",
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_egress"));
    // As shipped: the egress turns transparent huge pages off for itself (4 KiB resolution).
    let mut child = cmd
        .args(["--ws", "127.0.0.1:0", "--no-wss", "--admin", "off", "--backend", backend, "--log", "info", "--config"])
        .arg(&config)
        .arg("--state-dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (ws, _) = testkit::wait_listening(&mut child);
    Egress { child, ws }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_cost_less_than_256_bytes_each_in_user_space() {
    const N: usize = 10_000;
    eprintln!("size_of per-connection state (uring): {} B", broflake_egress::uring::size_of_conn());
    let e = spawn_egress("uring");
    let pid = e.child.id();
    // Warm up the worker buffers, allocator and tables.
    let warm = Load::start(LoadConfig::new(e.ws, 500));
    assert!(warm.wait_handshaked(500, Duration::from_secs(30)).await, "warm-up handshakes");
    warm.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The slope between 2,000 and 10,000 connections: start-up and the transient memory of
    // a ramp (both ramps reach the same peak) cancel out; what is left is per connection.
    const BASE: usize = 2_000;
    let first = Load::start(LoadConfig::new(e.ws, BASE));
    assert!(first.wait_handshaked(BASE as u64, Duration::from_secs(60)).await, "{BASE} handshakes");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = procfs::rss_bytes(pid).unwrap();
    let mut cfg = LoadConfig::new(e.ws, N - BASE);
    cfg.sources = (1..=50).map(|i| std::net::Ipv4Addr::new(127, 0, 1, i)).collect();
    let load = Load::start(cfg);
    assert!(load.wait_handshaked((N - BASE) as u64, Duration::from_secs(120)).await, "{N} handshakes");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = procfs::rss_bytes(pid).unwrap();
    let per_conn = (after.saturating_sub(before)) as f64 / (N - BASE) as f64;
    eprintln!("uring: RSS {before} -> {after} bytes from {BASE} to {N} connections: {per_conn:.1} B per idle handshaked connection");
    // As shipped, ordinary descriptors: each connection is one of the process's.
    let fds = procfs::fds(pid).unwrap() as usize;
    assert!(fds >= N, "{fds} descriptors open with {N} connections");
    assert_eq!(procfs::direct_descriptors(pid).unwrap(), 0, "no direct descriptors unless configured");
    assert!(per_conn < 256.0, "{per_conn:.1} B per connection");
    first.stop().await;
    load.stop().await;
}

/// A client that floods WebSocket pings and never reads: the egress must not queue replies
/// without bound. The ping rate limit (shared with PING frames) closes it long before the
/// per-connection output cap (1 MiB) would drop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_cannot_make_the_egress_buffer_without_bound() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for backend in ["uring", "tokio"] {
        let e = spawn_egress(backend);
        let pid = e.child.id();
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect(&e.ws.into()).unwrap();
        sock.set_nonblocking(true).unwrap();
        let mut s = tokio::net::TcpStream::from_std(sock.into()).unwrap();
        let mut opening = "GET /broflake HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: broflake\r\n\r\n".as_bytes().to_vec();
        let mut hello = Vec::new();
        broflake_proto::ClientSession::new(1).start(
            &broflake_proto::ClientConfig::default(),
            broflake_proto::Timestamp(0),
            &mut hello,
        );
        bench::loadgen::ws_frame(&hello, &mut opening);
        s.write_all(&opening).await.unwrap();
        let mut first = [0u8; 512];
        let _ = s.read(&mut first).await.unwrap();
        let before = procfs::rss_bytes(pid).unwrap();
        // 125-byte WebSocket pings, masked, never reading the pongs.
        let mut ping = vec![0x89u8, 0x80 | 125, 1, 2, 3, 4];
        ping.extend(std::iter::repeat_n(0u8, 125));
        let batch: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 1000).collect();
        let mut sent = 0usize;
        let t = std::time::Instant::now();
        let mut closed = false;
        while t.elapsed() < Duration::from_secs(30) {
            match tokio::time::timeout(Duration::from_secs(2), s.write_all(&batch)).await {
                Ok(Ok(())) => sent += 1000,
                Ok(Err(_)) => {
                    closed = true;
                    break;
                }
                Err(_) => break, // the egress stopped reading us: backpressure reached the sender
            }
            if sent >= 200_000 {
                break;
            }
        }
        let after = procfs::rss_bytes(pid).unwrap();
        let growth = after.saturating_sub(before);
        eprintln!("{backend}: {sent} pings sent, peer closed: {closed}, egress RSS grew {growth} bytes");
        // Bounded by the rate limit and the output cap plus allocator granularity; with neither,
        // the same flood grew the egress by over 60 MiB.
        assert!(growth < 16 << 20, "{backend}: RSS grew {growth} bytes");
        assert!(closed || sent < 200_000, "{backend}: the flood was neither cut off nor pushed back");
        drop(s);
    }
}
