//! The egress's admin listener (served by the shared `broflake_ops` listener): the status
//! page `/` and its data `/status.json`, `/metrics` (Prometheus text format), `/live`,
//! `/ready`, with process gauges read at scrape time.

use crate::metrics as m;
use crate::status::{self, StatusBoard};
pub use broflake_ops::Readiness;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;
use tokio::net::TcpListener;

/// The process-wide Prometheus recorder (installed once; later calls reuse it).
pub fn recorder() -> &'static PrometheusHandle {
    broflake_ops::recorder(m::describe)
}

/// File descriptors in use and the soft limit, from /proc.
pub use broflake_ops::fds;

/// Gauges read from /proc when someone looks (a scrape, a status sample).
pub fn refresh_process_gauges() {
    let (open, max) = fds();
    ::metrics::gauge!(m::OPEN_FDS).set(open as f64);
    ::metrics::gauge!(m::MAX_FDS).set(max as f64);
    let (cpu, rss) = status::process_usage();
    ::metrics::gauge!(m::PROCESS_CPU).set(cpu);
    ::metrics::gauge!(m::PROCESS_RESIDENT).set(rss);
}

pub async fn serve(listener: TcpListener, readiness: Arc<Readiness>, board: Arc<StatusBoard>) {
    let pages: broflake_ops::Pages = Arc::new(move |path, _| match path {
        "/" => Some(("200 OK", "text/html; charset=utf-8", status::PAGE.as_bytes().to_vec())),
        "/status.json" => {
            Some(("200 OK", "application/json", serde_json::to_vec(&board.status()).expect("plain data serialises")))
        }
        _ => None,
    });
    broflake_ops::serve_admin(listener, recorder(), readiness, refresh_process_gauges, pages).await
}

/// Samples the metrics for the status page, every [`status::PERIOD`].
pub async fn sample(board: Arc<StatusBoard>) {
    let mut tick = tokio::time::interval(status::PERIOD);
    loop {
        tick.tick().await;
        refresh_process_gauges();
        board.record(&recorder().render());
    }
}
