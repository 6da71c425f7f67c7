//! A middlebox simulator: a TCP forwarder that silently black-holes every flow idle longer
//! than a cut-off, like a NAT or firewall whose connection-tracking entry expired. After the
//! cut nothing is forwarded in either direction and nothing is closed or reset: each side's
//! bytes just vanish, so only a protocol-level liveness check can notice.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A running middlebox.
#[derive(Debug)]
pub struct Middlebox {
    pub addr: SocketAddr,
    /// Flows cut for idleness so far.
    pub cut: Arc<AtomicU64>,
    /// Flows accepted so far.
    pub flows: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
    _stop: tokio::sync::watch::Sender<()>,
}

impl Drop for Middlebox {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Middlebox {
    pub async fn start(listen: SocketAddr, upstream: SocketAddr, idle: Duration) -> std::io::Result<Middlebox> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(AtomicU64::new(0));
        let flows = Arc::new(AtomicU64::new(0));
        let (c, f) = (cut.clone(), flows.clone());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                f.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(flow(client, server, idle, c.clone(), stop_rx.clone()));
            }
        });
        Ok(Middlebox { addr, cut, flows, task, _stop: stop_tx })
    }
}

async fn flow(
    client: TcpStream,
    server: TcpStream,
    idle: Duration,
    cut_count: Arc<AtomicU64>,
    stop: tokio::sync::watch::Receiver<()>,
) {
    let origin = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicBool::new(false));
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let a = tokio::spawn(forward(cr, sw, origin, last.clone(), cut.clone(), stop.clone()));
    let b = tokio::spawn(forward(sr, cw, origin, last.clone(), cut.clone(), stop));
    let watchdog = async {
        let step = (idle / 10).max(Duration::from_millis(5));
        loop {
            tokio::time::sleep(step).await;
            let since = origin.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if since >= idle {
                cut.store(true, Ordering::Relaxed);
                cut_count.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    };
    tokio::select! {
        _ = watchdog => {}
        _ = async { let _ = a.await; let _ = b.await; } => {}
    }
}

/// Copies one direction until the flow is cut; afterwards reads and discards.
async fn forward(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    origin: Instant,
    last: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
    mut stop: tokio::sync::watch::Receiver<()>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => {
                if !cut.load(Ordering::Relaxed) {
                    let _ = w.shutdown().await;
                    return;
                }
                // A FIN after the cut is swallowed too: the other side never learns. Keep the
                // write half (dropping it would send a FIN) until the middlebox stops.
                let _ = stop.changed().await;
                drop(w);
                return;
            }
            Ok(n) => n,
        };
        if cut.load(Ordering::Relaxed) {
            continue;
        }
        last.store(origin.elapsed().as_millis() as u64, Ordering::Relaxed);
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
