//! `broflake relay …` / `broflake consumer …` / `broflake middlebox …`.

use anyhow::{Context, Result};
use broflake_client::consumer::ConsumerConfig;
use broflake_client::link::{LinkConfig, TlsMode};
use broflake_client::local_proxy::{ConsumerOptions, ConsumerService, Via};
use broflake_client::middlebox::Middlebox;
use broflake_client::relay::{Relay, RelayConfig};
use broflake_client::signaled::SignalSource;
use broflake_client::volunteer::VolunteerConfig;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "broflake", version, about = "Broflake relay and consumer")]
struct Cli {
    /// Log filter (tracing syntax). The TURN client logs every poll at info: quieted.
    #[arg(long, global = true, default_value = "info,turn_client_proto=warn,turn_types=warn,stun_proto=warn")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug, Clone)]
struct TlsArgs {
    /// Pin the server's certificate by SHA-256 (hex), as the egress prints it.
    #[arg(long)]
    cert_sha256: Option<String>,
    /// Trust certificates from this CA bundle (PEM).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Do not verify wss:// certificates at all (testing only).
    #[arg(long)]
    insecure: bool,
}

impl TlsArgs {
    /// How to check the server of `url`. A wss:// server must be authenticated unless the
    /// user says `--insecure`; for ws:// there is nothing to check.
    fn mode(&self, url: &str) -> Result<TlsMode> {
        match (&self.cert_sha256, &self.ca) {
            (Some(fp), _) => Ok(TlsMode::Pinned(fp.clone())),
            (None, Some(ca)) => Ok(TlsMode::CaFile(ca.clone())),
            _ if self.insecure || !url.starts_with("wss://") => Ok(TlsMode::InsecureNoVerify),
            _ => anyhow::bail!(
                "{url}: give --cert-sha256 or --ca to authenticate the server (or --insecure, for testing)"
            ),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a relay: pre-open links to the egress (or an upstream relay) and relay consumers.
    Relay {
        /// Upstream URL: the egress (ws[s]://host:port/broflake) or another relay.
        #[arg(long)]
        upstream: String,
        /// Links to keep open.
        #[arg(long, default_value_t = 3)]
        pool: usize,
        /// Where consumers (or downstream relays) may connect over WebSocket; `off`: nowhere.
        #[arg(long, default_value = "127.0.0.1:9001")]
        listen: String,
        /// Volunteer: register with this signaling service (ws[s]://host:port/v1/signal) and
        /// serve the consumers it sends over WebRTC.
        #[arg(long)]
        signal: Option<String>,
        /// Consumers served at once over WebRTC.
        #[arg(long, default_value_t = 8)]
        slots: u32,
        #[command(flatten)]
        ice: IceArgs,
        /// Do not send PINGs (reproduces the idle-disconnect problem).
        #[arg(long)]
        no_ping: bool,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Run a consumer: local SOCKS5/HTTP CONNECT proxies tunnelled to the egress via relays.
    Consumer {
        /// Find a volunteer through this signaling service (ws[s]://host:port/v1/signal) and
        /// reach it over WebRTC; on failure (or failover) the --relay URLs are tried next.
        #[arg(long, required_unless_present = "relays")]
        signal: Option<String>,
        /// Relay URL (repeatable; later ones are fail-over targets). An egress URL works too.
        #[arg(long = "relay")]
        relays: Vec<String>,
        /// Offer only relayed (TURN) candidates.
        #[arg(long)]
        relay_only: bool,
        #[command(flatten)]
        ice: IceArgs,
        /// Pin the egress's certificate (SHA-256 hex, as printed by the egress).
        #[arg(long)]
        egress_cert_sha256: Option<String>,
        /// Or trust the egress certificate via this CA bundle.
        #[arg(long)]
        egress_ca: Option<PathBuf>,
        /// Name to verify against the CA (default: localhost).
        #[arg(long, default_value = "localhost")]
        egress_name: String,
        #[arg(long)]
        socks: Option<SocketAddr>,
        #[arg(long)]
        http: Option<SocketAddr>,
        /// TLS settings for wss:// relay URLs.
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// A middlebox simulator: forward TCP, silently black-holing flows idle longer than the cut-off.
    Middlebox {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        upstream: SocketAddr,
        /// Idle cut-off, e.g. 60s or 1500ms.
        #[arg(long, value_parser = humantime_parse)]
        idle: Duration,
    },
}

/// STUN/TURN servers for the WebRTC hop (default: those the signaling service hands out).
#[derive(clap::Args, Debug)]
struct IceArgs {
    /// A STUN server, e.g. stun:198.51.100.7:3478 (repeatable).
    #[arg(long)]
    stun: Vec<String>,
    /// A TURN server: turn:HOST:PORT,USER,PASSWORD (repeatable).
    #[arg(long)]
    turn: Vec<String>,
    /// Local IP for WebRTC sockets (default: the one that routes to the ICE servers).
    #[arg(long)]
    bind_ip: Option<std::net::IpAddr>,
}

impl IceArgs {
    fn servers(&self) -> Result<Vec<broflake_rtc::IceServer>> {
        let mut out: Vec<broflake_rtc::IceServer> =
            self.stun.iter().map(|u| broflake_rtc::IceServer { urls: vec![u.clone()], ..Default::default() }).collect();
        for t in &self.turn {
            let mut p = t.splitn(3, ',');
            let (Some(url), Some(user), Some(pass)) = (p.next(), p.next(), p.next()) else {
                anyhow::bail!("--turn {t}: expected URL,USER,PASSWORD");
            };
            out.push(broflake_rtc::IceServer {
                urls: vec![url.into()],
                username: user.into(),
                credential: pass.into(),
            });
        }
        Ok(out)
    }
}

fn humantime_parse(s: &str) -> Result<Duration, String> {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse().map(Duration::from_millis).map_err(|e| e.to_string());
    }
    if let Some(sec) = s.strip_suffix('s') {
        return sec.parse::<f64>().map(Duration::from_secs_f64).map_err(|e| e.to_string());
    }
    Err(format!("expected a duration like 60s or 1500ms, got {s}"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::Relay { upstream, pool, listen, signal, slots, ice, no_ping, tls } => {
            let mut link = LinkConfig::new(upstream.clone());
            link.tls = tls.mode(&upstream)?;
            link.client.send_pings = !no_ping;
            let listen: Option<SocketAddr> = match listen.as_str() {
                "off" => None,
                a => Some(a.parse().with_context(|| format!("--listen {a}: not an address or `off`"))?),
            };
            anyhow::ensure!(listen.is_some() || signal.is_some(), "with --listen off, give --signal");
            let mut cfg = RelayConfig::new(link, "127.0.0.1:0".parse()?);
            cfg.listen = listen;
            cfg.pool = pool;
            if let Some(url) = signal {
                let mut v = VolunteerConfig::new(url.clone());
                v.tls = tls.mode(&url)?;
                v.slots = slots;
                v.ice_servers = ice.servers()?;
                v.bind = ice.bind_ip;
                eprintln!("volunteering through {url} with {slots} slots");
                cfg.volunteer = Some(v);
            }
            let relay = Relay::start(cfg).await?;
            if relay.listen_addr.is_some() {
                eprintln!("relay listening on {}", relay.url());
            }
            wait_for_signal().await;
            relay.kill().await;
        }
        Cmd::Consumer {
            signal,
            relays,
            relay_only,
            ice,
            egress_cert_sha256,
            egress_ca,
            egress_name,
            socks,
            http,
            tls,
        } => {
            anyhow::ensure!(socks.is_some() || http.is_some(), "give --socks and/or --http");
            let quic = ConsumerConfig {
                tls: match (egress_cert_sha256, egress_ca) {
                    (Some(fp), _) => TlsMode::Pinned(fp),
                    (None, Some(ca)) => TlsMode::CaFile(ca),
                    (None, None) => {
                        anyhow::bail!("give --egress-cert-sha256 or --egress-ca to authenticate the egress")
                    }
                },
                server_name: egress_name,
                ..ConsumerConfig::default()
            };
            let relays = relays
                .into_iter()
                .map(|url| Ok(LinkConfig { tls: tls.mode(&url)?, ..LinkConfig::new(url) }))
                .collect::<Result<Vec<_>>>()?;
            let signal = match signal {
                Some(url) => {
                    let mut s = SignalSource::new(url.clone());
                    s.tls = tls.mode(&url)?;
                    s.ice_servers = ice.servers()?;
                    s.bind = ice.bind_ip;
                    s.relay_only = relay_only;
                    Some(s)
                }
                None => None,
            };
            let svc = ConsumerService::start(ConsumerOptions { signal, relays, quic, socks, http }).await?;
            if let Some(a) = svc.socks_addr {
                eprintln!("socks5 listening on {a}");
            }
            if let Some(a) = svc.http_addr {
                eprintln!("http connect listening on {a}");
            }
            // On stdout, one line per link, for people and scripts: how the egress is reached.
            let mut via = svc.via.clone();
            tokio::spawn(async move {
                loop {
                    println!("{}", via_line(&via.borrow_and_update()));
                    if via.changed().await.is_err() {
                        return;
                    }
                }
            });
            wait_for_signal().await;
            svc.stop().await;
        }
        Cmd::Middlebox { listen, upstream, idle } => {
            let mb = Middlebox::start(listen, upstream, idle).await?;
            eprintln!("middlebox listening on {}", mb.addr);
            wait_for_signal().await;
        }
    }
    Ok(())
}

/// `via webrtc local=KIND ADDR remote=KIND ADDR`, or `via relay URL`.
fn via_line(v: &Via) -> String {
    match v {
        Via::Volunteer { path: Some(p) } => {
            format!("via webrtc local={} {} remote={} {}", p.local, p.local_addr, p.remote, p.remote_addr)
        }
        Via::Volunteer { path: None } => "via webrtc".into(),
        Via::Relay { url } => format!("via relay {url}"),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
