//! `egress`: parse CLI → load config → logging → run → drain on SIGTERM.

use anyhow::{Context, Result};
use broflake_egress::config::{Backend, Config, LivenessMode};
use broflake_egress::Egress;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Transparent huge pages off before the first allocation: the Rust runtime allocates before
/// `main`, and with the kernel's `madvise` mode that first touch of the allocator's arena would
/// already fault in 2 MiB pages (4 MiB of them on every start). `memory::apply` turns them back
/// on when the configuration says `transparent_huge_pages = "system"`.
#[used]
#[link_section = ".init_array"]
static THP_OFF_BEFORE_MAIN: extern "C" fn() = {
    extern "C" fn off() {
        // SAFETY: prctl with integer arguments; it changes only this process's THP flag.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
    off
};

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
    /// Admin listener for the status page, /metrics, /live, /ready (default 127.0.0.1:9090);
    /// `off` disables it.
    #[arg(long)]
    admin: Option<String>,
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
    match cli.admin.as_deref() {
        None => {}
        Some("off") => c.admin.listen = None,
        Some(a) => c.admin.listen = Some(a.parse().with_context(|| format!("--admin {a}: not an address or `off`"))?),
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
    // Before the runtime's threads exist and the allocator's arenas grow.
    let memory = broflake_egress::memory::apply(config.memory.transparent_huge_pages);
    init_logging(&config);
    match memory.error {
        None => tracing::info!("{memory}"),
        Some(_) => tracing::warn!("{memory}"),
    }
    let threads = if config.io.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        config.io.threads
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?;
    runtime.block_on(serve(config, memory))
}

async fn serve(config: Config, memory: broflake_egress::memory::Applied) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    broflake_egress::admin::recorder();
    let grace = config.drain.grace;
    let path = config.listen.path.clone();
    let egress = Egress::start(config).await?;
    // Start-up freed several MB on this thread (the XDP object's ELF and the kernel's BTF, parsed
    // by aya); mimalloc returns freed pages only when the freeing thread allocates again, and this
    // one mostly waits from here on. Without this they stay resident for the process's life.
    // SAFETY: mi_collect only walks this thread's heap and the abandoned segments.
    unsafe { libmimalloc_sys::mi_collect(true) };
    for a in &egress.ws_addrs {
        tracing::info!("listening on ws://{a}");
    }
    for a in &egress.wss_addrs {
        tracing::info!("listening on wss://{a}");
    }
    if let Some(a) = egress.admin_addr {
        tracing::info!("admin listening on http://{a} (status page /, /metrics, /live, /ready)");
    }
    tracing::info!(backend = ?egress.backend, liveness = ?egress.liveness, reason = %egress.liveness_reason, "egress running");
    // On stdout, for the operator (and for scripts: the certificate line is stable).
    print!("{}", summary(&egress, &path, &memory));
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

/// What an operator needs next: where relays connect, the certificate to pin, the liveness
/// mode and why, the admin URLs, and a relay command line that works against this egress.
fn summary(e: &Egress, path: &str, memory: &broflake_egress::memory::Applied) -> String {
    use std::fmt::Write;
    let local = |a: &SocketAddr| -> SocketAddr {
        // A wildcard listener is reachable on loopback from this host.
        match a.ip() {
            std::net::IpAddr::V4(v) if v.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], a.port())),
            std::net::IpAddr::V6(v) if v.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], a.port())),
            _ => *a,
        }
    };
    let mut s = String::from("egress ready\n");
    for a in &e.ws_addrs {
        let _ = writeln!(s, "  relays connect to   ws://{}{path}", local(a));
    }
    for a in &e.wss_addrs {
        let _ = writeln!(s, "  relays connect to   wss://{}{path}   (pin the certificate below)", local(a));
    }
    let _ = writeln!(s, "  backend             {:?}", e.backend);
    let _ = writeln!(s, "  liveness            {:?}: {}", e.liveness, e.liveness_reason);
    let _ = writeln!(s, "  memory              {memory}");
    match e.admin_addr {
        Some(a) => {
            let _ = writeln!(s, "  status page         http://{a}/   (also /metrics, /live, /ready)");
        }
        None => s.push_str("  admin               off\n"),
    }
    if let Some(a) = e.ws_addrs.first() {
        let _ = writeln!(
            s,
            "  try a relay         cargo run --release --bin broflake -- relay --upstream ws://{}{path} --listen 127.0.0.1:9001",
            local(a)
        );
    } else if let Some(a) = e.wss_addrs.first() {
        let _ = writeln!(
            s,
            "  try a relay         cargo run --release --bin broflake -- relay --upstream wss://{}{path} --cert-sha256 {} --listen 127.0.0.1:9001",
            local(a),
            e.fingerprint
        );
    }
    s
}
