//! The live status page on the admin listener (`/`, with its data at `/status.json`): what
//! an operator looks at first. A sampler reads the egress's own Prometheus exposition every
//! [`PERIOD`] (so the page shows exactly what `/metrics` says) and keeps the last
//! [`HISTORY`] samples; the page draws them as small SVG charts, no external service.

use crate::metrics as m;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the sampler reads the metrics.
pub const PERIOD: Duration = Duration::from_secs(2);
/// Samples kept: 10 minutes.
pub const HISTORY: usize = 300;

/// One reading of the metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    /// Milliseconds since the Unix epoch.
    pub t: u64,
    pub connections: f64,
    pub routes: f64,
    pub quic_connections: f64,
    pub accepted: f64,
    pub closed: f64,
    pub handshakes: f64,
    pub idle_closes: f64,
    pub refusals: BTreeMap<String, f64>,
    pub xdp_flows: f64,
    pub xdp_capacity: f64,
    pub cpu_seconds: f64,
    pub resident_bytes: f64,
    pub open_fds: f64,
}

/// What the page gets.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub backend: String,
    pub liveness: String,
    pub liveness_reason: String,
    pub period_ms: u64,
    pub samples: Vec<Sample>,
}

/// The sampler's state, shared with the admin listener.
#[derive(Debug)]
pub struct StatusBoard {
    backend: String,
    liveness: String,
    liveness_reason: String,
    samples: Mutex<VecDeque<Sample>>,
}

impl StatusBoard {
    pub fn new(backend: String, liveness: String, liveness_reason: String) -> Arc<StatusBoard> {
        Arc::new(StatusBoard { backend, liveness, liveness_reason, samples: Mutex::new(VecDeque::new()) })
    }

    /// Takes one sample from a Prometheus exposition.
    pub fn record(&self, exposition: &str) {
        let mut s = parse(exposition);
        s.t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
        let mut q = self.samples.lock().expect("poisoned");
        if q.len() == HISTORY {
            q.pop_front();
        }
        q.push_back(s);
    }

    pub fn status(&self) -> Status {
        Status {
            version: env!("CARGO_PKG_VERSION"),
            backend: self.backend.clone(),
            liveness: self.liveness.clone(),
            liveness_reason: self.liveness_reason.clone(),
            period_ms: PERIOD.as_millis() as u64,
            samples: self.samples.lock().expect("poisoned").iter().cloned().collect(),
        }
    }
}

/// The page itself (HTML, CSS and a small script drawing SVG).
pub const PAGE: &str = include_str!("status.html");

/// Reads the series the page shows from a Prometheus text exposition (sums over labels,
/// refusals kept by reason).
pub fn parse(text: &str) -> Sample {
    let mut s = Sample::default();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(v) = value.parse::<f64>() else { continue };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let label = |key: &str| {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == key).then(|| v.trim_matches('"').to_string())
            })
        };
        match name {
            m::CONNECTIONS => s.connections += v,
            m::ROUTES => s.routes += v,
            m::QUIC_CONNECTIONS => s.quic_connections += v,
            m::CONNECTIONS_ACCEPTED => s.accepted += v,
            m::CONNECTIONS_CLOSED => s.closed += v,
            m::HANDSHAKES if label("result").as_deref() == Some("accepted") => s.handshakes += v,
            m::IDLE_CLOSES => s.idle_closes += v,
            m::REFUSALS | m::UPGRADE_REFUSALS => {
                *s.refusals.entry(label("reason").unwrap_or_else(|| "other".into())).or_default() += v;
            }
            m::XDP_FLOWS => s.xdp_flows = v,
            m::XDP_MAP_CAPACITY => s.xdp_capacity = v,
            m::PROCESS_CPU => s.cpu_seconds = v,
            m::PROCESS_RESIDENT => s.resident_bytes = v,
            m::OPEN_FDS => s.open_fds = v,
            _ => {}
        }
    }
    s
}

/// This process's CPU seconds (user + system) and resident bytes, from /proc.
pub fn process_usage() -> (f64, f64) {
    // SAFETY: sysconf has no preconditions.
    let (tick, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let (u, sy) = (f.get(11)?.parse::<f64>().ok()?, f.get(12)?.parse::<f64>().ok()?);
            Some((u + sy) / tick.max(1) as f64)
        })
        .unwrap_or(0.0);
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |p| p * page.max(1) as f64);
    (cpu, rss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_series_it_shows() {
        let text = "# HELP x\nbroflake_connections{backend=\"uring\",state=\"open\"} 7\n\
            broflake_connections{backend=\"uring\",state=\"handshaking\"} 2\n\
            broflake_handshakes_total{result=\"accepted\"} 40\nbroflake_handshakes_total{result=\"refused\"} 3\n\
            broflake_refusals_total{reason=\"per_ip_limit\"} 3\nbroflake_upgrade_refusals_total{reason=\"timeout\"} 1\n\
            broflake_xdp_flows 9\nbroflake_process_cpu_seconds 1.5\n";
        let s = parse(text);
        assert_eq!(s.connections, 9.0);
        assert_eq!(s.handshakes, 40.0);
        assert_eq!(s.refusals.get("per_ip_limit"), Some(&3.0));
        assert_eq!(s.refusals.get("timeout"), Some(&1.0));
        assert_eq!(s.xdp_flows, 9.0);
        assert_eq!(s.cpu_seconds, 1.5);
    }

    #[test]
    fn process_usage_is_read() {
        let (cpu, rss) = process_usage();
        assert!(cpu >= 0.0);
        assert!(rss > 1e6, "{rss}");
    }
}
