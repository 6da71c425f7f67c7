//! The io_uring backend: a thread per core, each with its own ring and SO_REUSEPORT
//! listeners; multishot accept; reads armed per connection as a multishot poll (default) or
//! a multishot receive into a provided buffer ring shared by the thread; WebSocket frames
//! parsed in place; the same `proto` server session as the tokio backend; PING answered
//! inside the loop; a coarse per-thread timer wheel; DATA bridged to the QUIC endpoint with
//! no per-route state (route ids encode the connection, see [`routes::route_id`]).

/// Builds an operation on a connection's socket, named by its index in the ring's registered
/// table (direct descriptors) or by an ordinary descriptor.
macro_rules! on_socket {
    ($direct:expr, $fd:expr, |$t:ident| $build:expr) => {
        if $direct {
            let $t = io_uring::types::Fixed($fd as u32);
            $build
        } else {
            let $t = io_uring::types::Fd($fd);
            $build
        }
    };
}

mod accept;
mod bufring;
mod close;
mod conn;
mod counts;
mod iptable;
mod read;
pub mod routes;
mod send;
mod timers;
mod wheel;
mod worker;
mod ws;

use crate::config::ReadMode;
use crate::listen::bind;
use crate::shared::Shared;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use conn::size_of_conn;
use routes::{route_id, Inbox, UringRoutes};

/// Whether io_uring works here, and if not, why (for `auto` and its log line).
pub fn probe() -> Result<(), String> {
    let ring = io_uring::IoUring::new(8).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) => "io_uring is blocked (EPERM: seccomp or io_uring_disabled)".to_string(),
        Some(libc::ENOSYS) => "io_uring is not supported by this kernel (ENOSYS)".to_string(),
        _ => format!("cannot create an io_uring: {e}"),
    })?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| format!("cannot probe io_uring: {e}"))?;
    for (code, name) in [
        (io_uring::opcode::AcceptMulti::CODE, "accept"),
        (io_uring::opcode::PollAdd::CODE, "poll"),
        (io_uring::opcode::Send::CODE, "send"),
        (io_uring::opcode::Read::CODE, "read"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("io_uring lacks the {name} operation"));
        }
    }
    Ok(())
}

/// Running workers.
#[derive(Debug)]
pub struct Uring {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    routes: Arc<UringRoutes>,
}

impl Uring {
    /// Binds the listeners (one SO_REUSEPORT socket per thread and address) and starts the
    /// workers. Returns the bound ws and wss addresses.
    pub fn start(
        shared: Arc<Shared>,
        wss: Option<Arc<rustls::ServerConfig>>,
        threads: usize,
        mode: ReadMode,
    ) -> Result<(Uring, Vec<SocketAddr>, Vec<SocketAddr>)> {
        let threads = threads.clamp(1, route_id::MAX_THREADS);
        let cfg = &shared.config;
        // Bind the first socket of each address to learn the port (port 0 in tests), then the
        // other threads' sockets on exactly that address.
        let mut plan: Vec<(SocketAddr, bool)> = Vec::new();
        let mut first_fds: Vec<i32> = Vec::new();
        let (mut ws_addrs, mut wss_addrs) = (Vec::new(), Vec::new());
        for (addr, tls) in cfg.listen.ws.iter().map(|a| (*a, false)).chain(cfg.listen.wss.iter().map(|a| (*a, true))) {
            let l = bind(addr, cfg.listen.backlog).with_context(|| format!("cannot listen on {addr}"))?;
            let bound = l.local_addr()?;
            if tls {
                wss_addrs.push(bound)
            } else {
                ws_addrs.push(bound)
            }
            plan.push((bound, tls));
            first_fds.push(l.into_raw_fd());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let inboxes = (0..threads).map(|_| Inbox::new()).collect::<std::io::Result<Vec<_>>>();
        let routes = Arc::new(UringRoutes { inboxes: inboxes.context("cannot create an eventfd")?, open: 0.into() });
        let mut handles = Vec::new();
        for t in 0..threads {
            let mut listeners = Vec::new();
            for (i, (addr, tls)) in plan.iter().enumerate() {
                let fd = if t == 0 {
                    first_fds[i]
                } else {
                    bind(*addr, cfg.listen.backlog)
                        .with_context(|| format!("cannot listen on {addr} (thread {t})"))?
                        .into_raw_fd()
                };
                listeners.push((fd, *tls));
            }
            // The ring is created on its own thread: SINGLE_ISSUER binds it to its creator.
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (shared2, wss2, stop2, routes2) = (shared.clone(), wss.clone(), stop.clone(), routes.clone());
            let handle = std::thread::Builder::new()
                .name(format!("uring-{t}"))
                .spawn(move || match worker::Worker::new(t as u8, shared2, listeners, wss2, routes2, stop2, mode) {
                    Ok(w) => {
                        let _ = ready_tx.send(Ok(()));
                        w.run();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                })
                .context("cannot spawn an io_uring worker")?;
            ready_rx
                .recv()
                .context("io_uring worker died during set-up")?
                .with_context(|| format!("cannot set up io_uring worker {t}"))?;
            handles.push(handle);
        }
        shared.quic.set_sink(routes.clone());
        Ok((Uring { stop, threads: handles, routes }, ws_addrs, wss_addrs))
    }

    /// The workers' routes (XDP expiries go to their inboxes).
    pub fn routes(&self) -> Arc<UringRoutes> {
        self.routes.clone()
    }

    /// Wakes every worker to look at the shared state (the drain started).
    pub fn wake(&self) {
        for inbox in &self.routes.inboxes {
            inbox.kick();
        }
    }

    /// Stops the workers and waits for them (connections are dropped).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for inbox in &self.routes.inboxes {
            inbox.kick();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        self.stop();
    }
}
