//! The egress's admin listener: `/metrics` (Prometheus text format), `/live`, `/ready`
//! (served by the shared `broflake_ops` listener), with gauges read at scrape time.

use crate::metrics as m;
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

fn before_render() {
    let (open, max) = fds();
    ::metrics::gauge!(m::OPEN_FDS).set(open as f64);
    ::metrics::gauge!(m::MAX_FDS).set(max as f64);
}

pub async fn serve(listener: TcpListener, readiness: Arc<Readiness>) {
    broflake_ops::serve_admin(listener, recorder(), readiness, before_render, Arc::new(|_, _| None)).await
}
