//! `broflake relay …` / `broflake consumer …` / `broflake middlebox …`.

use anyhow::Result;
use broflake_client::consumer::ConsumerConfig;
use broflake_client::link::{LinkConfig, TlsMode};
use broflake_client::local_proxy::{ConsumerOptions, ConsumerService};
use broflake_client::middlebox::Middlebox;
use broflake_client::relay::{Relay, RelayConfig};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "broflake", version, about = "Broflake relay and consumer")]
struct Cli {
    /// Log filter (tracing syntax).
    #[arg(long, global = true, default_value = "info")]
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
        /// Where consumers (or downstream relays) connect.
        #[arg(long, default_value = "127.0.0.1:9001")]
        listen: SocketAddr,
        /// Do not send PINGs (reproduces the idle-disconnect problem).
        #[arg(long)]
        no_ping: bool,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Run a consumer: local SOCKS5/HTTP CONNECT proxies tunnelled to the egress via relays.
    Consumer {
        /// Relay URL (repeatable; later ones are fail-over targets). An egress URL works too.
        #[arg(long = "relay", required = true)]
        relays: Vec<String>,
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
        Cmd::Relay { upstream, pool, listen, no_ping, tls } => {
            let mut link = LinkConfig::new(upstream.clone());
            link.tls = tls.mode(&upstream)?;
            link.client.send_pings = !no_ping;
            let mut cfg = RelayConfig::new(link, listen);
            cfg.pool = pool;
            let relay = Relay::start(cfg).await?;
            eprintln!("relay listening on {}", relay.url());
            wait_for_signal().await;
            relay.kill().await;
        }
        Cmd::Consumer { relays, egress_cert_sha256, egress_ca, egress_name, socks, http, tls } => {
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
            let svc = ConsumerService::start(ConsumerOptions { relays, quic, socks, http }).await?;
            if let Some(a) = svc.socks_addr {
                eprintln!("socks5 listening on {a}");
            }
            if let Some(a) = svc.http_addr {
                eprintln!("http connect listening on {a}");
            }
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

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
