//! Choosing the liveness mode and running it: the XDP program's expiry task (kernel-side idle
//! tracking) or the user-space deadline sweep. The modes are described in ARCHITECTURE.md.

use crate::config::{Config, LivenessMode};
use crate::metrics as m;
use crate::netif;
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

/// The liveness mode in force, and why (for the log, the start-up summary and the status page).
#[derive(Debug, Clone)]
pub struct Chosen {
    pub mode: LivenessMode,
    pub reason: String,
    /// Where the XDP program is attached (xdp mode).
    pub attached: Vec<xdp::Attachment>,
}

/// Chooses the liveness mode; in xdp (or auto) mode loads and attaches the XDP program and
/// starts the task that closes the connections of flows the kernel reports idle. With no
/// `liveness.interfaces` configured, the program goes on the interfaces that carry the
/// listen addresses ([`netif::carrying`]), and interfaces that come up later are added.
pub fn start(
    config: &Config,
    shared: &Arc<Shared>,
    ws: &[SocketAddr],
    wss: &[SocketAddr],
    expire: Expire,
    tasks: &mut JoinSet<()>,
) -> Result<Chosen> {
    let mode = config.liveness.mode;
    let listen: Vec<SocketAddr> = ws.iter().chain(wss).copied().collect();
    let chosen = match mode {
        LivenessMode::Xdp | LivenessMode::Auto => {
            let mut xc = xdp::XdpConfig::from_config(config);
            xc.ports = listen.iter().map(SocketAddr::port).collect();
            xc.ports.sort_unstable();
            xc.ports.dedup();
            let auto = xc.interfaces.is_empty();
            let mut why = String::from("liveness.interfaces names them");
            if auto {
                match netif::up_interfaces() {
                    Ok(ifs) => (xc.interfaces, why) = netif::carrying(&listen, &ifs),
                    Err(e) => why = format!("cannot list the network interfaces: {e}"),
                }
            }
            let loaded = if xc.interfaces.is_empty() {
                Err(format!("no interface to attach to ({why}); name them in liveness.interfaces"))
            } else {
                xdp::Xdp::load(&xc).map_err(|e| e.to_string())
            };
            match loaded {
                Ok(x) => {
                    let attached = x.attached().to_vec();
                    let list: Vec<String> =
                        attached.iter().map(|a| format!("{} ({})", a.interface, a.mode.label())).collect();
                    let reason = format!("XDP attached to {} because {why}", list.join(", "));
                    tracing::info!(%reason, "liveness: xdp");
                    shared.kernel_liveness.store(true, std::sync::atomic::Ordering::Relaxed);
                    let rescan = auto.then_some(listen.clone());
                    tasks.spawn(expire_task(x, shared.clone(), expire, rescan));
                    Chosen { mode: LivenessMode::Xdp, reason, attached }
                }
                Err(why) if mode == LivenessMode::Auto => {
                    tracing::info!(reason = %why, "liveness: auto chose userspace");
                    Chosen {
                        mode: LivenessMode::Userspace,
                        reason: format!("auto fell back to userspace: {why}"),
                        attached: Vec::new(),
                    }
                }
                Err(why) => anyhow::bail!("liveness.mode = \"xdp\" cannot run: {why}"),
            }
        }
        m => Chosen { mode: m, reason: "configured".into(), attached: Vec::new() },
    };
    let liveness = chosen.mode;
    for name in ["userspace", "server-ping", "xdp"] {
        let active = matches!(
            (name, liveness),
            ("userspace", LivenessMode::Userspace)
                | ("server-ping", LivenessMode::ServerPing)
                | ("xdp", LivenessMode::Xdp)
        );
        ::metrics::gauge!(m::LIVENESS_MODE, "mode" => name).set(if active { 1.0 } else { 0.0 });
    }
    Ok(chosen)
}

/// How often interfaces are checked for ones that came up since (auto-chosen interfaces).
const RESCAN: Duration = Duration::from_secs(5);

/// Reads flows the kernel expired and closes their connections (in whichever backend).
/// With `rescan` (the listen addresses, when the interfaces were chosen automatically),
/// interfaces that come up later (a hot-plugged NIC, a new veth) get the program too.
async fn expire_task(mut x: xdp::Xdp, shared: Arc<Shared>, expire: Expire, rescan: Option<Vec<SocketAddr>>) {
    xdp::describe_metrics();
    let mut publish = tokio::time::interval(Duration::from_secs(1));
    let mut scan = tokio::time::interval(RESCAN);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            flow = x.next_expired() => {
                let Some(flow) = flow else { return };
                shared.stats.xdp_expired.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                expire(flow.peer);
            }
            _ = publish.tick() => x.publish_metrics(),
            _ = scan.tick(), if rescan.is_some() => {
                let listen = rescan.as_deref().unwrap_or_default();
                let Ok(ifs) = netif::up_interfaces() else { continue };
                let (wanted, _) = netif::carrying(listen, &ifs);
                for name in wanted {
                    if x.attached().iter().any(|a| a.interface == name) {
                        continue;
                    }
                    match x.attach(&name) {
                        Ok(()) => tracing::info!(interface = %name, "XDP liveness attached to an interface that came up"),
                        Err(e) => tracing::warn!(interface = %name, error = %e,
                            "cannot attach XDP to an interface that came up: its idle connections are not reaped; name the interfaces in liveness.interfaces or restart"),
                    }
                }
            }
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
