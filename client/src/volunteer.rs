//! The volunteer role of a relay: registered with a signaling service, it answers consumers'
//! WebRTC offers and serves each consumer's DataChannel pair with the same server session
//! and route table as a WebSocket downstream peer (docs/SIGNALING.md, PROTOCOL.md §17).

use crate::pipe::Pipe;
use crate::relay::{serve_downstream, Ev, RelayStats, DOWN_IDS};
use crate::transport::{self, TlsMode};
use broflake_proto::server::ServerConfig;
use broflake_rtc::{CandidateSink, IceServer, Peer, RtcConfig};
use broflake_signal::client::{SignalConn, Volunteer, VolunteerEvent, VolunteerHandle};
use broflake_signal::msg::SessionId;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// How a relay volunteers.
#[derive(Debug, Clone)]
pub struct VolunteerConfig {
    /// The signaling service: `ws[s]://host:port/v1/signal`.
    pub signal: String,
    /// How to check a wss:// signaling service.
    pub tls: TlsMode,
    /// Consumers served at once.
    pub slots: u32,
    /// STUN/TURN servers; empty: those the signaling service hands out.
    pub ice_servers: Vec<IceServer>,
    /// Local IP for the WebRTC sockets (default: the one that routes to the ICE servers).
    pub bind: Option<IpAddr>,
    /// ICE + DTLS + SCTP must complete within this.
    pub connect_timeout: Duration,
    pub backoff_cap: Duration,
}

impl VolunteerConfig {
    pub fn new(signal: impl Into<String>) -> Self {
        VolunteerConfig {
            signal: signal.into(),
            tls: TlsMode::default(),
            slots: 8,
            ice_servers: Vec::new(),
            bind: None,
            connect_timeout: Duration::from_secs(20),
            backoff_cap: Duration::from_secs(30),
        }
    }
}

/// Converts the signaling service's ICE servers.
pub fn ice_servers(from: &[broflake_signal::msg::IceServer]) -> Vec<IceServer> {
    from.iter()
        .map(|s| IceServer { urls: s.urls.clone(), username: s.username.clone(), credential: s.credential.clone() })
        .collect()
}

/// Opens a signaling connection (TLS for wss://).
pub async fn connect_signal(url: &str, tls: &TlsMode) -> anyhow::Result<SignalConn> {
    let (host, port, wss) = broflake_signal::client::url_target(url)?;
    let stream: Option<Box<dyn broflake_signal::client::Stream>> =
        if wss { Some(Box::new(transport::connect_stream(&host, port, Some(tls)).await?)) } else { None };
    SignalConn::connect(url, stream, Duration::from_secs(10)).await
}

/// Stays registered (re-registering with backoff) and serves consumers until dropped.
pub(crate) async fn run(
    cfg: VolunteerConfig,
    down: Arc<ServerConfig>,
    router: mpsc::Sender<Ev>,
    stats: Arc<RelayStats>,
) {
    let mut attempt = 0u32;
    loop {
        let registered = async {
            let conn = connect_signal(&cfg.signal, &cfg.tls).await?;
            let ice = if cfg.ice_servers.is_empty() { ice_servers(&conn.ice_servers) } else { cfg.ice_servers.clone() };
            Ok::<_, anyhow::Error>((Volunteer::register(conn, cfg.slots).await?, ice))
        };
        let wait = match registered.await {
            Ok((v, ice)) => {
                attempt = 0;
                tracing::info!(id = %v.id, slots = cfg.slots, signal = %cfg.signal, "volunteer registered");
                serve(v, ice, &cfg, &down, &router, &stats).await
            }
            Err(e) => {
                tracing::warn!(signal = %cfg.signal, error = %e, "cannot register as a volunteer");
                attempt = attempt.saturating_add(1);
                Duration::from_millis((250u64 << attempt.min(10)).min(cfg.backoff_cap.as_millis() as u64))
            }
        };
        if router.is_closed() {
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

/// Serves one registration; returns how long to wait before registering again.
async fn serve(
    mut v: Volunteer,
    ice: Vec<IceServer>,
    cfg: &VolunteerConfig,
    down: &Arc<ServerConfig>,
    router: &mpsc::Sender<Ev>,
    stats: &Arc<RelayStats>,
) -> Duration {
    let active = Arc::new(AtomicU32::new(0));
    let sinks: Arc<Mutex<HashMap<SessionId, CandidateSink>>> = Arc::default();
    let rtc = RtcConfig { ice_servers: ice, bind: cfg.bind, ..RtcConfig::default() };
    loop {
        let ev = tokio::select! {
            ev = v.events.recv() => ev,
            _ = router.closed() => return Duration::ZERO,
        };
        match ev {
            Some(VolunteerEvent::Offer { session, sdp, .. }) => {
                if active.load(Ordering::Relaxed) >= cfg.slots {
                    v.handle.decline(session, "no free slot").await;
                    continue;
                }
                active.fetch_add(1, Ordering::Relaxed);
                let ctx = Session {
                    session,
                    handle: v.handle.clone(),
                    active: active.clone(),
                    sinks: sinks.clone(),
                    slots: cfg.slots,
                    connect_timeout: cfg.connect_timeout,
                    down: down.clone(),
                    router: router.clone(),
                    stats: stats.clone(),
                };
                tokio::spawn(ctx.run(rtc.clone(), sdp));
            }
            Some(VolunteerEvent::Candidate { session, candidate }) => {
                let sink = sinks.lock().expect("poisoned").get(&session).cloned();
                if let Some(s) = sink {
                    s.add(&candidate.candidate).await;
                }
            }
            Some(VolunteerEvent::Cancel { session, reason }) => {
                tracing::debug!(%session, %reason, "offer cancelled");
                sinks.lock().expect("poisoned").remove(&session);
            }
            Some(VolunteerEvent::Goaway { retry_after_ms }) => {
                tracing::info!("signaling service is draining: registering again");
                return Duration::from_millis(retry_after_ms);
            }
            Some(VolunteerEvent::Closed { reason }) => {
                tracing::warn!(%reason, "signaling connection ended: registering again");
                return Duration::from_millis(500);
            }
            None => return Duration::from_millis(500),
        }
    }
}

/// One consumer: answer, wait for the channels, serve them, free the slot.
struct Session {
    session: SessionId,
    handle: VolunteerHandle,
    active: Arc<AtomicU32>,
    sinks: Arc<Mutex<HashMap<SessionId, CandidateSink>>>,
    slots: u32,
    connect_timeout: Duration,
    down: Arc<ServerConfig>,
    router: mpsc::Sender<Ev>,
    stats: Arc<RelayStats>,
}

impl Session {
    async fn run(self, rtc: RtcConfig, offer: String) {
        let session = self.session;
        match Peer::answer(&rtc, &offer).await {
            Err(e) => {
                tracing::warn!(%session, error = %e, "cannot answer an offer");
                self.handle.decline(session, &format!("{e}")).await;
            }
            Ok(peer) => {
                self.sinks.lock().expect("poisoned").insert(session, peer.candidate_sink());
                self.handle.answer(session, &peer.sdp).await;
                let r = peer.connected(self.connect_timeout).await;
                self.sinks.lock().expect("poisoned").remove(&session);
                match r {
                    Err(e) => tracing::warn!(%session, error = %e, "consumer did not connect"),
                    Ok(pipe) => {
                        self.handle.done(session).await;
                        let relayed = pipe.path().is_some_and(|p| p.relayed());
                        tracing::info!(%session, relayed, "consumer connected over WebRTC");
                        tracing::debug!(%session, path = ?pipe.path().map(|p| p.to_string()), "WebRTC path");
                        let down = DOWN_IDS.fetch_add(1, Ordering::Relaxed);
                        self.stats.downstream_links.fetch_add(1, Ordering::Relaxed);
                        let router = self.router.clone();
                        if let Err(e) =
                            serve_downstream(Pipe::Rtc(pipe), down, self.down.clone(), router, self.stats.clone()).await
                        {
                            tracing::debug!(%session, error = %e, "consumer link ended");
                        }
                        self.stats.downstream_links.fetch_sub(1, Ordering::Relaxed);
                        let _ = self.router.send(Ev::DownClosed { down }).await;
                        tracing::info!(%session, "consumer left");
                    }
                }
            }
        }
        let now = self.active.fetch_sub(1, Ordering::Relaxed) - 1;
        self.handle.slots(self.slots.saturating_sub(now)).await;
    }
}
