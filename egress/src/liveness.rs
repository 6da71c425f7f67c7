//! Choosing the liveness mode and running it: the XDP program's expiry task (kernel-side idle
//! tracking) or the user-space deadline sweep. The modes are described in ARCHITECTURE.md.

use crate::config::{Config, LivenessMode};
use crate::metrics as m;
use crate::shared::Shared;
use crate::xdp;
use anyhow::Result;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Closes the connection of a peer whose flow the kernel reported idle.
pub type Expire = Box<dyn Fn(SocketAddr) + Send + Sync>;

/// Chooses the liveness mode; in xdp (or auto) mode loads and attaches the XDP program and
/// starts the task that closes the connections of flows the kernel reports idle.
pub fn start(
    config: &Config,
    shared: &Arc<Shared>,
    ws: &[SocketAddr],
    wss: &[SocketAddr],
    expire: Expire,
    tasks: &mut JoinSet<()>,
) -> Result<LivenessMode> {
    let mode = config.liveness.mode;
    let liveness = match mode {
        LivenessMode::Xdp | LivenessMode::Auto => {
            let mut xc = xdp::XdpConfig::from_config(config);
            xc.ports = ws.iter().chain(wss).map(SocketAddr::port).collect();
            xc.ports.sort_unstable();
            xc.ports.dedup();
            let loaded = if xc.interfaces.is_empty() {
                Err("liveness.interfaces is empty: name the interfaces that carry client traffic".to_string())
            } else {
                xdp::Xdp::load(&xc).map_err(|e| e.to_string())
            };
            match loaded {
                Ok(x) => {
                    for a in x.attached() {
                        tracing::info!(interface = %a.interface, native = a.native, "XDP liveness attached");
                    }
                    shared.kernel_liveness.store(true, std::sync::atomic::Ordering::Relaxed);
                    tasks.spawn(expire_task(x, shared.clone(), expire));
                    LivenessMode::Xdp
                }
                Err(why) if mode == LivenessMode::Auto => {
                    tracing::info!(reason = %why, "liveness: auto chose userspace");
                    LivenessMode::Userspace
                }
                Err(why) => anyhow::bail!("liveness.mode = \"xdp\" cannot run: {why}"),
            }
        }
        m => m,
    };
    for name in ["userspace", "server-ping", "xdp"] {
        let active = matches!(
            (name, liveness),
            ("userspace", LivenessMode::Userspace)
                | ("server-ping", LivenessMode::ServerPing)
                | ("xdp", LivenessMode::Xdp)
        );
        ::metrics::gauge!(m::LIVENESS_MODE, "mode" => name).set(if active { 1.0 } else { 0.0 });
    }
    Ok(liveness)
}

/// Reads flows the kernel expired and closes their connections (in whichever backend).
async fn expire_task(mut x: xdp::Xdp, shared: Arc<Shared>, expire: Expire) {
    xdp::describe_metrics();
    let mut publish = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            flow = x.next_expired() => {
                let Some(flow) = flow else { return };
                shared.stats.xdp_expired.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                expire(flow.peer);
            }
            _ = publish.tick() => x.publish_metrics(),
        }
    }
}

/// The user-space deadline sweep (see [`registry`]).
pub async fn sweeper(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(shared.config.liveness.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let woken = shared.conns.sweep(shared.now());
        ::metrics::counter!(m::SWEEPS).increment(1);
        ::metrics::counter!(m::SWEEP_WAKEUPS).increment(woken as u64);
    }
}
