//! `signal`: parse CLI → load config → logging → run → drain on SIGTERM.

use anyhow::{Context, Result};
use broflake_signal::config::Config;
use broflake_signal::msg::IceServer;
use broflake_signal::server::Server;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "signal", version, about = "Broflake signaling service: matches consumers with volunteers")]
struct Cli {
    /// Configuration file (TOML). Without one, embedded defaults apply.
    #[arg(short, long, env = "SIGNAL_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address for volunteers and consumers (ws://ADDR/v1/signal).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin listener (/metrics, /live, /ready); `off` disables it.
    #[arg(long)]
    admin: Option<String>,
    /// A STUN server handed to clients, e.g. stun:198.51.100.7:3478 (repeatable; replaces
    /// the configured list together with --turn).
    #[arg(long)]
    stun: Vec<String>,
    /// A TURN server handed to clients: turn:HOST:PORT?transport=udp,USER,PASSWORD (repeatable).
    #[arg(long)]
    turn: Vec<String>,
    /// Share waiting volunteers and pending matches with other replicas in Redis at this
    /// URL (redis://HOST:PORT/DB); sets store.kind = "redis".
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// This replica's id in the shared store (default: random at start).
    #[arg(long)]
    replica: Option<String>,
    /// Log filter (tracing syntax).
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

fn effective_config(cli: &Cli) -> Result<Config> {
    let mut c = match &cli.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(a) = cli.listen {
        c.listen.addr = a;
    }
    match cli.admin.as_deref() {
        None => {}
        Some("off") => c.admin.listen = None,
        Some(a) => c.admin.listen = Some(a.parse().with_context(|| format!("--admin {a}: not an address or `off`"))?),
    }
    if !cli.stun.is_empty() || !cli.turn.is_empty() {
        c.ice_servers.clear();
        for s in &cli.stun {
            c.ice_servers.push(IceServer { urls: vec![s.clone()], username: String::new(), credential: String::new() });
        }
        for t in &cli.turn {
            let mut parts = t.splitn(3, ',');
            let (url, user, pass) = (parts.next().unwrap_or(""), parts.next(), parts.next());
            let (Some(user), Some(pass)) = (user, pass) else {
                anyhow::bail!("--turn {t}: expected URL,USER,PASSWORD");
            };
            c.ice_servers.push(IceServer { urls: vec![url.into()], username: user.into(), credential: pass.into() });
        }
    }
    if let Some(u) = &cli.store {
        c.store.kind = "redis".into();
        c.store.url = u.clone();
    }
    if let Some(r) = &cli.replica {
        c.store.replica = r.clone();
    }
    if let Some(l) = &cli.log {
        c.log.filter = l.clone();
    }
    c.validate().context("invalid configuration")?;
    Ok(c)
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
    broflake_ops::init_logging(&config.log.filter, &config.log.format);
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve(config))
}

async fn serve(config: Config) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let grace = config.drain.grace;
    let server = Server::start(config).await?;
    tracing::info!("signaling on {}", server.url());
    if let Some(a) = server.admin_addr {
        tracing::info!("admin listening on http://{a} (/metrics, /live, /ready)");
    }
    // On stdout too, for scripts.
    println!("signaling on {}", server.url());
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("signal received: draining (a second signal exits at once)");
    server.drain().await;
    tokio::select! {
        _ = server.wait_drained(grace) => tracing::info!("drained; exiting"),
        _ = term.recv() => tracing::warn!("second signal: exiting now"),
        _ = int.recv() => tracing::warn!("second signal: exiting now"),
    }
    Ok(())
}
