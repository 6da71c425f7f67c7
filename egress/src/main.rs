//! `egress`: parse CLI → load config → logging → run → drain on SIGTERM.

use anyhow::{Context, Result};
use broflake_egress::config::{Backend, Config, LivenessMode};
use broflake_egress::Egress;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "egress", version, about = "Broflake egress server")]
struct Cli {
    /// Configuration file (TOML). Without one, embedded defaults apply.
    #[arg(short, long, env = "EGRESS_CONFIG")]
    config: Option<PathBuf>,
    /// ws:// listen address (repeatable; replaces the configured list).
    #[arg(long = "ws")]
    ws: Vec<SocketAddr>,
    /// wss:// listen address (repeatable; replaces the configured list).
    #[arg(long = "wss")]
    wss: Vec<SocketAddr>,
    /// Disable wss:// listeners.
    #[arg(long)]
    no_wss: bool,
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    #[arg(long, value_enum)]
    liveness: Option<LivenessArg>,
    /// Allow proxying to this network even if internal (repeatable), e.g. 127.0.0.0/8.
    #[arg(long = "allow")]
    allow: Vec<ipnet::IpNet>,
    /// Directory for generated state (self-signed certificate).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Admin listener for /metrics, /live, /ready.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Log filter (tracing syntax), e.g. debug or broflake_egress=debug.
    #[arg(long)]
    log: Option<String>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Validate a configuration file and exit.
    CheckConfig { file: PathBuf },
    /// Print the effective configuration (defaults + file + flags) as TOML.
    PrintConfig,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum BackendArg {
    Tokio,
    Uring,
    Auto,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LivenessArg {
    Userspace,
    ServerPing,
    Xdp,
    Auto,
}

fn effective_config(cli: &Cli) -> Result<Config> {
    let mut c = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if !cli.ws.is_empty() {
        c.listen.ws = cli.ws.clone();
    }
    if !cli.wss.is_empty() {
        c.listen.wss = cli.wss.clone();
    }
    if cli.no_wss {
        c.listen.wss.clear();
    }
    if let Some(b) = cli.backend {
        c.io.backend = match b {
            BackendArg::Tokio => Backend::Tokio,
            BackendArg::Uring => Backend::Uring,
            BackendArg::Auto => Backend::Auto,
        };
    }
    if let Some(l) = cli.liveness {
        c.liveness.mode = match l {
            LivenessArg::Userspace => LivenessMode::Userspace,
            LivenessArg::ServerPing => LivenessMode::ServerPing,
            LivenessArg::Xdp => LivenessMode::Xdp,
            LivenessArg::Auto => LivenessMode::Auto,
        };
    }
    c.proxy.allow.extend(cli.allow.iter().copied());
    if let Some(d) = &cli.state_dir {
        c.tls.state_dir = Some(d.clone());
    }
    if let Some(a) = cli.admin {
        c.admin.listen = Some(a);
    }
    if let Some(l) = &cli.log {
        c.log.filter = l.clone();
    }
    c.validate().context("invalid configuration")?;
    Ok(c)
}

fn init_logging(c: &Config) {
    broflake_ops::init_logging(&c.log.filter, &c.log.format);
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match &cli.cmd {
        Some(Cmd::CheckConfig { file }) => {
            Config::load(file)?;
            println!("{}: ok", file.display());
            return Ok(());
        }
        Some(Cmd::PrintConfig) => {
            print!("{}", effective_config(&cli)?.to_toml());
            return Ok(());
        }
        None => {}
    }
    let config = effective_config(&cli)?;
    init_logging(&config);
    let threads = if config.io.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        config.io.threads
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    broflake_egress::admin::recorder();
    let grace = config.drain.grace;
    let egress = Egress::start(config).await?;
    for a in &egress.ws_addrs {
        tracing::info!("listening on ws://{a}");
    }
    for a in &egress.wss_addrs {
        tracing::info!("listening on wss://{a}");
    }
    if let Some(a) = egress.admin_addr {
        tracing::info!("admin listening on http://{a} (/metrics, /live, /ready)");
    }
    tracing::info!(backend = ?egress.backend, liveness = ?egress.liveness, "egress running");
    // Printed on stdout as well, so scripts and operators can pick it up for pinning.
    println!("certificate sha256 {}", egress.fingerprint);

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("signal received: draining (a second signal exits at once)");
    egress.drain();
    tokio::select! {
        _ = egress.wait_drained(grace + std::time::Duration::from_secs(2)) => {
            tracing::info!("drained; exiting");
        }
        _ = term.recv() => tracing::warn!("second signal: exiting now"),
        _ = int.recv() => tracing::warn!("second signal: exiting now"),
    }
    Ok(())
}
