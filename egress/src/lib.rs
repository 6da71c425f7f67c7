//! The Broflake egress server.
//!
//! Relays hold WebSockets to the egress; each carries Broflake frames (docs/PROTOCOL.md).
//! Control frames are answered by the connection's `proto` session; DATA frames carry QUIC
//! packets that go to one quinn endpoint over a virtual socket ([`quic`]); each QUIC stream
//! is a proxy request ([`proxy`]) checked against the destination [`policy`].

pub mod admin;
pub mod config;
pub mod fleet;
pub mod listen;
pub mod liveness;
pub mod memory;
pub mod metrics;
pub mod netif;
pub mod policy;
pub mod proxy;
pub mod quic;
pub mod registry;
pub mod shared;
pub mod status;
pub mod tls;
pub mod tokio_io;
pub mod uring;
pub use broflake_wscodec as wscodec;
pub mod xdp;

use anyhow::{Context, Result};
use config::{Backend, Config, LivenessMode};
use shared::Shared;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A running egress.
#[derive(Debug)]
pub struct Egress {
    /// Bound ws:// and wss:// addresses (useful when the config asked for port 0).
    pub ws_addrs: Vec<SocketAddr>,
    pub wss_addrs: Vec<SocketAddr>,
    /// Bound admin address, if configured.
    pub admin_addr: Option<SocketAddr>,
    uring: Option<uring::Uring>,
    /// SHA-256 of the certificate (clients pin it).
    pub fingerprint: String,
    pub liveness: LivenessMode,
    /// Why that mode (and, for xdp, which interfaces): for the log and the status page.
    pub liveness_reason: String,
    pub backend: Backend,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Egress {
    /// Binds every listener and starts serving. Must run inside a tokio runtime.
    pub async fn start(config: Config) -> Result<Egress> {
        config.validate()?;
        if config.admin.listen.is_some() {
            // Before anything records a metric, so nothing is lost.
            admin::recorder();
        }
        let config = Arc::new(config);
        let identity = tls::Identity::load(&config)?;
        let fingerprint = identity.fingerprint();

        let backend = match config.io.backend {
            Backend::Tokio => Backend::Tokio,
            Backend::Uring => match uring::probe() {
                Ok(()) => Backend::Uring,
                Err(why) => anyhow::bail!("io.backend = \"uring\" cannot run here: {why}; use \"tokio\" or \"auto\""),
            },
            Backend::Auto => match uring::probe() {
                Ok(()) => Backend::Uring,
                Err(why) => {
                    tracing::warn!(reason = %why, "io backend: auto chose tokio");
                    Backend::Tokio
                }
            },
        };
        ::metrics::gauge!(crate::metrics::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);

        let fleet = match config.fleet.id {
            0 => None,
            id => {
                let f = fleet::Fleet::bind(&config.fleet)
                    .with_context(|| format!("cannot bind the fleet socket {:?}", config.fleet.listen))?;
                tracing::info!(id, addr = %f.local_addr()?, peers = config.fleet.peers.len(), "fleet host");
                Some(Arc::new(f))
            }
        };
        let quic = quic::QuicBridge::new(
            quic::server_config(identity.quic_config()?, &config),
            config.quic.inbound_queue,
            identity.key.secret_der(),
            quic::max_mtu(&config),
            fleet,
        )
        .context("cannot create the QUIC endpoint")?;
        let shared = Arc::new(Shared::new(config.clone(), quic.clone(), false));
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();

        let settings = Arc::new(proxy::ProxySettings {
            policy: policy::Policy::new(config.proxy.deny_internal, config.proxy.allow.clone()),
            connect_timeout: config.proxy.connect_timeout,
            resolve_timeout: config.proxy.resolve_timeout,
            stats: shared.stats.clone(),
        });
        tasks.spawn(proxy::serve(quic.endpoint.clone(), settings));
        tasks.spawn(quic.clone().serve_fleet(config.quic.idle_timeout));
        tasks.spawn(liveness::sweeper(shared.clone(), stop_rx.clone()));

        let mut ws_addrs = Vec::new();
        let mut wss_addrs = Vec::new();
        let mut uring_workers = None;
        let wss_config = identity.wss_config()?;
        if backend == Backend::Uring {
            let threads = match config.io.threads {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            };
            let (u, ws, wss) = uring::Uring::start(shared.clone(), Some(wss_config), threads, config.io.uring_read)?;
            ws_addrs = ws;
            wss_addrs = wss;
            uring_workers = Some(u);
        } else {
            let routes = Arc::new(tokio_io::RouteTable::default());
            shared.quic.set_sink(routes.clone());
            let acceptor = tokio_rustls::TlsAcceptor::from(wss_config);
            for (addrs, out, tls) in
                [(&config.listen.ws, &mut ws_addrs, None), (&config.listen.wss, &mut wss_addrs, Some(acceptor))]
            {
                for addr in addrs {
                    let std = listen::bind(*addr, config.listen.backlog)
                        .with_context(|| format!("cannot listen on {addr}"))?;
                    let listener = tokio::net::TcpListener::from_std(std)?;
                    out.push(listener.local_addr()?);
                    tasks.spawn(tokio_io::serve(
                        listener,
                        tls.clone(),
                        shared.clone(),
                        routes.clone(),
                        stop_rx.clone(),
                    ));
                }
            }
        }
        // Where the kernel's idle-flow reports go: the io_uring workers' inboxes, or the
        // registry's connection for the tokio backend.
        let expire: liveness::Expire = match &uring_workers {
            Some(u) => {
                let routes = u.routes();
                Box::new(move |peer| routes.expire(peer))
            }
            None => {
                let conns = shared.conns.clone();
                Box::new(move |peer| {
                    if let Some(c) = conns.find_peer(peer) {
                        c.kill.store(true, std::sync::atomic::Ordering::Relaxed);
                        c.wake.notify_one();
                    }
                })
            }
        };
        let chosen = liveness::start(&config, &shared, &ws_addrs, &wss_addrs, expire, &mut tasks)?;
        let (liveness, liveness_reason) = (chosen.mode, chosen.reason);
        let mut admin_addr = None;
        let readiness = Arc::new(admin::Readiness::default());
        readiness.flag("listening", true);
        readiness.flag("liveness", true);
        if let Some(addr) = config.admin.listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (admin)"))?;
            admin_addr = Some(listener.local_addr()?);
            let board = status::StatusBoard::new(
                format!("{backend:?}").to_lowercase(),
                format!("{liveness:?}").to_lowercase(),
                liveness_reason.clone(),
            );
            tasks.spawn(admin::sample(board.clone()));
            tasks.spawn(admin::serve(listener, readiness.clone(), board));
        }
        Ok(Egress {
            ws_addrs,
            wss_addrs,
            admin_addr,
            uring: uring_workers,
            fingerprint,
            liveness,
            liveness_reason,
            backend,
            shared,
            stop,
            tasks,
        })
    }

    /// Connections held now.
    pub fn connections(&self) -> usize {
        self.shared.conns.len()
    }

    /// Routes (connection, label) open now.
    pub fn routes(&self) -> usize {
        self.shared.quic.route_count()
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Starts draining: GOAWAY to every connection; they close at the end of the grace
    /// period (or earlier, when clients leave). Until then the listeners stay open, but only
    /// for clients moving their routes off a draining session (HELLO with its session id as
    /// `previous_session`); everyone else is refused with DRAINING.
    pub fn drain(&self) {
        if self.shared.drain.send_replace(true) {
            return;
        }
        let grace = u64::try_from(self.shared.config.drain.grace.as_millis()).unwrap_or(u64::MAX);
        let deadline = self.shared.now() + grace;
        self.shared.drain_deadline.store(deadline.as_millis(), std::sync::atomic::Ordering::Relaxed);
        if let Some(u) = &self.uring {
            // Workers with nothing due sleep; this one is news to them.
            u.wake();
        }
        ::metrics::gauge!(crate::metrics::DRAINING).set(1.0);
        tracing::info!(connections = self.connections(), grace = ?self.shared.config.drain.grace, "draining");
    }

    /// Waits until every connection is gone or `limit` passed, then shuts down.
    pub async fn wait_drained(mut self, limit: Duration) {
        let start = tokio::time::Instant::now();
        let deadline = start + limit;
        // The tunnelled QUIC connections are closed a little before the grace period ends,
        // while the WebSockets that carry them are still open: consumers get the
        // CONNECTION_CLOSE and reconnect at once instead of at their idle timeout.
        let grace = self.shared.config.drain.grace.min(limit);
        let close_quic_at = start + grace - (grace / 4).min(Duration::from_secs(1));
        let mut quic_closed = false;
        while !self.shared.conns.is_empty() && tokio::time::Instant::now() < deadline {
            if !quic_closed && tokio::time::Instant::now() >= close_quic_at {
                quic_closed = true;
                tracing::info!("closing tunnelled QUIC connections before the grace period ends");
                self.shared.quic.endpoint.close(0u32.into(), b"egress draining");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.shutdown().await;
    }

    /// Stops everything now.
    pub async fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        if let Some(mut u) = self.uring.take() {
            tokio::task::spawn_blocking(move || u.stop()).await.ok();
        }
        self.shared.quic.endpoint.close(0u32.into(), b"egress shutting down");
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}
