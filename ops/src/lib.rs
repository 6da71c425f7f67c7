//! Operational plumbing shared by the egress and the signaling service: the admin listener,
//! the process-wide Prometheus recorder and logging set-up. No server logic lives here.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The process-wide Prometheus recorder, installed on first use; `describe` runs once then
/// (so every series has its help text).
pub fn recorder(describe: fn()) -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new().install_recorder().expect("no other metrics recorder installed");
        describe();
        handle
    })
}

/// What `/ready` reports: every flag must be up.
#[derive(Debug, Default)]
pub struct Readiness {
    flags: std::sync::Mutex<Vec<(&'static str, Arc<AtomicBool>)>>,
}

impl Readiness {
    /// A named condition of readiness, initially `up`.
    pub fn flag(&self, name: &'static str, up: bool) -> Arc<AtomicBool> {
        let f = Arc::new(AtomicBool::new(up));
        self.flags.lock().expect("poisoned").push((name, f.clone()));
        f
    }

    /// Ready, or the names of the conditions that are down.
    pub fn check(&self) -> Result<(), Vec<&'static str>> {
        let down: Vec<&'static str> = self
            .flags
            .lock()
            .expect("poisoned")
            .iter()
            .filter(|(_, f)| !f.load(Ordering::Relaxed))
            .map(|(n, _)| *n)
            .collect();
        if down.is_empty() {
            Ok(())
        } else {
            Err(down)
        }
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

/// An answer from a page handler: status line, content type, body.
pub type Page = (&'static str, &'static str, Vec<u8>);

/// Serves pages beyond /metrics, /live and /ready: `path` (without the query) → page.
pub type Pages = Arc<dyn Fn(&str, &str) -> Option<Page> + Send + Sync>;

/// Runs the admin listener: `/metrics` (after `before_render`, which refreshes gauges read
/// at scrape time), `/live`, `/ready`, then `pages`. One request per connection, GET only,
/// 2 KiB request head, 5 s to send it: an operator interface, usually on localhost.
pub async fn serve_admin(
    listener: TcpListener,
    handle: &'static PrometheusHandle,
    readiness: Arc<Readiness>,
    before_render: fn(),
    pages: Pages,
) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else { continue };
        let (readiness, pages) = (readiness.clone(), pages.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let mut n = 0;
            let head_done = loop {
                match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf[n..])).await {
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
            let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            let (status, ctype, body): Page = match (method, path) {
                ("GET", "/metrics") => {
                    before_render();
                    ("200 OK", "text/plain; version=0.0.4", handle.render().into_bytes())
                }
                ("GET", "/live") => ("200 OK", "text/plain", b"live\n".to_vec()),
                ("GET", "/ready") => match readiness.check() {
                    Ok(()) => ("200 OK", "text/plain", b"ready\n".to_vec()),
                    Err(down) => (
                        "503 Service Unavailable",
                        "text/plain",
                        format!("not ready: {}\n", down.join(", ")).into_bytes(),
                    ),
                },
                ("GET", p) => pages(p, query).unwrap_or((
                    "404 Not Found",
                    "text/plain",
                    b"try /, /metrics, /live or /ready\n".to_vec(),
                )),
                _ => ("405 Method Not Allowed", "text/plain", b"GET only\n".to_vec()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(&body).await;
            let _ = s.shutdown().await;
        });
    }
}

/// Logging to stderr: `format` is "text" (colours only on a terminal) or "json"; `RUST_LOG`
/// overrides `filter`.
pub fn init_logging(filter: &str, format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
