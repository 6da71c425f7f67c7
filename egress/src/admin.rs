//! The admin listener: `/metrics` (Prometheus text format), `/live`, `/ready`.
//!
//! Deliberately tiny (one request per connection, GET only, bounded request size): it is an
//! operator interface, usually bound to localhost or a management network.

use crate::metrics as m;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The process-wide Prometheus recorder (installed once; later calls reuse it).
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new().install_recorder().expect("no other metrics recorder installed");
        m::describe();
        handle
    })
}

/// What `/ready` reports.
#[derive(Debug, Default)]
pub struct Readiness {
    pub listening: AtomicBool,
    /// False only in xdp mode until the program is attached.
    pub liveness_ready: AtomicBool,
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.listening.load(Ordering::Relaxed) && self.liveness_ready.load(Ordering::Relaxed)
    }
}

/// File descriptors in use and the soft limit, from /proc.
pub fn fds() -> (u64, u64) {
    let open = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0);
    let max = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    (open, max)
}

pub async fn serve(listener: TcpListener, readiness: Arc<Readiness>) {
    let handle = recorder();
    loop {
        let Ok((mut s, _)) = listener.accept().await else { continue };
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let mut n = 0;
            let head_done = loop {
                match tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf[n..])).await {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break false,
                    Ok(Ok(k)) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break true;
                }
                if n == buf.len() {
                    break false;
                }
            };
            if !head_done {
                return;
            }
            let line = String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().to_string();
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, ctype, body) = match (method, path.split('?').next().unwrap_or("")) {
                ("GET", "/metrics") => {
                    let (open, max) = fds();
                    ::metrics::gauge!(m::OPEN_FDS).set(open as f64);
                    ::metrics::gauge!(m::MAX_FDS).set(max as f64);
                    ("200 OK", "text/plain; version=0.0.4", handle.render())
                }
                ("GET", "/live") => ("200 OK", "text/plain", "live\n".to_string()),
                ("GET", "/ready") if readiness.ready() => ("200 OK", "text/plain", "ready\n".to_string()),
                ("GET", "/ready") => ("503 Service Unavailable", "text/plain", "not ready\n".to_string()),
                ("GET", _) => ("404 Not Found", "text/plain", "try /metrics, /live or /ready\n".to_string()),
                _ => ("405 Method Not Allowed", "text/plain", "GET only\n".to_string()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}
