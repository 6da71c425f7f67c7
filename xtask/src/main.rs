//! `cargo xtask …`: everything a developer, CI or an operator runs, in one place, so that
//! the README's two commands work on a fresh machine.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

mod demo;
mod deploy;
mod ebpf;
mod setup;

#[derive(Parser, Debug)]
#[command(name = "cargo xtask", about = "Broflake egress project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Install what the tests need (idempotent), then run every check CI runs:
    /// rustfmt, clippy, the test suites and a bounded fuzzing pass.
    Test {
        /// Seconds each fuzz target runs (0 skips fuzzing).
        #[arg(long, env = "FUZZ_SECONDS", default_value_t = 30)]
        fuzz_seconds: u64,
    },
    /// Install the toolchain pieces the project needs (idempotent).
    Setup,
    /// Run fuzz targets for a bounded time each.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
    /// Run the side-by-side benchmark (quick: N ≤ 2,000, a few minutes; --full: N up to 19,000).
    Bench {
        #[arg(long)]
        full: bool,
        /// Only these rows, comma-separated (the floor row always runs).
        #[arg(long)]
        rows: Option<String>,
        /// Only the WebRTC hop and signaling measurements.
        #[arg(long)]
        webrtc: bool,
        /// Only the tunnel's cost per byte (both backends, both directions, QUIC and AES anchors).
        #[arg(long, conflicts_with = "webrtc")]
        tunnel: bool,
        /// With --tunnel: also a perf profile of the io_uring egress during one more download.
        #[arg(long, requires = "tunnel")]
        profile: bool,
        /// Only throughput under delay and loss (an emulated WAN link between relay and egress).
        #[arg(long, conflicts_with_all = ["webrtc", "tunnel"])]
        wan: bool,
        /// Only signaling matches per second: memory, Redis, two replicas on one Redis.
        #[arg(long, conflicts_with_all = ["webrtc", "tunnel", "wan"])]
        signaling: bool,
        /// Only density past the open-file limit: 50,000–150,000 idle connections, io_uring +
        /// XDP against the floor, three interleaved rounds, and CPU per PING (also in --full).
        #[arg(long, conflicts_with_all = ["webrtc", "tunnel", "wan", "signaling"])]
        scale: bool,
    },
    /// Build the XDP program (installing its toolchain if needed) into the object that
    /// `egress` embeds: target/bpfel-unknown-none/release/egress-ebpf.
    BuildEbpf,
    /// Build the release binaries with the XDP object embedded (installing the eBPF
    /// toolchain when missing).
    Build,
    /// Install the egress (binary, unit, sysctl, config, dashboards, rules, manifests) into a
    /// root directory, or onto a host over ssh.
    Deploy {
        /// Install into this directory (a staging tree, an image build, or /).
        #[arg(long, conflicts_with = "host")]
        root: Option<PathBuf>,
        /// Install on this host over ssh (user@host).
        #[arg(long)]
        host: Option<String>,
        /// Print every step without doing it.
        #[arg(long)]
        dry_run: bool,
        /// Use this binary instead of building target/release/egress.
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Build a release tarball with the installed layout (target/dist/).
    Dist {
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// The whole path on loopback: egress, signaling service, a volunteer and a consumer that
    /// reaches it over WebRTC; prints the curl line that works through them.
    Demo,
    /// Build and run the egress with its embedded defaults (extra arguments go to the egress).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = project_root();
    std::env::set_current_dir(&root)?;
    match cli.cmd {
        Cmd::Test { fuzz_seconds } => test(fuzz_seconds),
        Cmd::Setup => setup::all(),
        Cmd::Fuzz { seconds, targets } => {
            setup::fuzz_tools()?;
            fuzz(seconds, &targets)
        }
        Cmd::Run { args } => run(&args),
        Cmd::Demo => demo::run(),
        Cmd::Bench { full, rows, webrtc, tunnel, profile, wan, signaling, scale } => {
            let what = match (webrtc, signaling, wan, tunnel, scale) {
                (true, ..) => "webrtc",
                (_, true, ..) => "signaling",
                (_, _, true, ..) => "wan",
                (_, _, _, true, _) => "tunnel",
                (.., true) => "scale",
                _ => "run",
            };
            bench(what, full, rows, profile)
        }
        Cmd::Deploy { root, host, dry_run, binary } => {
            let binary = release_binary(binary, dry_run)?;
            match (root, host) {
                (Some(root), None) => deploy::install_root(&root, &binary, dry_run),
                (None, Some(host)) => deploy::install_host(&host, &binary, dry_run),
                _ => bail!("give --root DIR or --host user@host"),
            }
        }
        Cmd::Build => build_release(),
        Cmd::Dist { binary } => deploy::dist(&release_binary(binary, false)?).map(drop),
        Cmd::BuildEbpf => {
            ebpf::ensure_toolchain()?;
            ebpf::build().map(drop)
        }
    }
}

pub(crate) fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Runs a command, echoing it, failing with its exit status.
pub(crate) fn sh(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {}", display(cmd));
    let status = cmd.status().with_context(|| format!("cannot start {}", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed with {status}", display(cmd));
    }
    Ok(())
}

pub(crate) fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Cargo without the environment `cargo run` gave xtask itself (CARGO_MANIFEST_DIR,
/// CARGO_PKG_*, ...): some build scripts track those variables, so a build from here and the
/// same build from a test (`testkit::workspace_bin`, which strips them too) would otherwise
/// see different values and rebuild ring and everything above it, minutes per test target.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if (k.starts_with("CARGO_") && !matches!(k.as_ref(), "CARGO_HOME" | "CARGO_TARGET_DIR")) || k == "OUT_DIR" {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd
}

/// Whether this Rust source has a doc comment code block that rustdoc compiles.
fn has_doc_test(text: &str) -> bool {
    let mut open = false;
    for l in text.lines().map(str::trim_start) {
        let Some(doc) = l.strip_prefix("///").or_else(|| l.strip_prefix("//!")) else { continue };
        let Some(info) = doc.trim_start().strip_prefix("```") else { continue };
        // Rustdoc compiles a block unless its info string names another language.
        if !open && (info.is_empty() || info.split(',').any(|t| t.contains("rust") || DOCTEST.contains(&t))) {
            return true;
        }
        open = !open;
    }
    false
}

const DOCTEST: [&str; 4] = ["no_run", "should_panic", "compile_fail", "ignore"];

/// Whether any doc comment in the workspace holds a code block (a doc test). Building for
/// `cargo test --doc` takes minutes of its own, spent for nothing while there are none.
fn has_doc_tests() -> Result<bool> {
    fn walk(dir: &Path, found: &mut bool) -> Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, found)?;
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path)?;
                *found |= has_doc_test(&text);
            }
        }
        Ok(())
    }
    let mut found = false;
    for entry in std::fs::read_dir(".")? {
        let src = entry?.path().join("src");
        if src.is_dir() && !src.starts_with("./target") {
            walk(&src, &mut found)?;
        }
    }
    Ok(found)
}

fn test(fuzz_seconds: u64) -> Result<()> {
    setup::all()?;
    // Before any cargo build of `egress`, whose build script embeds the object.
    ebpf::ensure_toolchain()?;
    ebpf::build()?;
    sh(cargo().args(["fmt", "--all", "--check"]))?;
    sh(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    // Tests start other packages' executables (loadgen, broflake, egress): build them all.
    sh(cargo().args(["build", "--workspace", "--bins"]))?;
    // The browser volunteer runs in Chromium in the cargo tests (client/tests/browser_volunteer.rs)
    // as well as in web/'s own suites.
    setup::apt(&[("chromium", "chromium")])?;
    sh(Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir("web"))?;
    sh(cargo().args(["test", "--workspace", "--all-targets"]))?;
    // Doc tests are not covered by --all-targets.
    if has_doc_tests()? {
        sh(cargo().args(["test", "--workspace", "--doc"]))?;
    } else {
        eprintln!("xtask test: no doc tests in the workspace (no code block in a doc comment)");
    }
    // Deployment material: unit, sysctl, rules (+ rule unit tests), dashboards, manifests.
    sh(Command::new("bash")
        .arg("deploy/tests/check.sh")
        .env("EGRESS_BIN", "target/debug/egress")
        .env("SIGNAL_BIN", "target/debug/signal"))?;
    // The browser relay, in real Chromium, against the real egress and native consumer.
    sh(Command::new("node")
        .args(["--test", "test/"])
        .current_dir("web")
        .env("EGRESS_BIN", "../target/debug/egress")
        .env("BROFLAKE_BIN", "../target/debug/broflake"))?;
    if fuzz_seconds > 0 {
        fuzz(fuzz_seconds, &[])?;
    }
    eprintln!("xtask test: all checks passed");
    Ok(())
}

/// Every fuzz target, from fuzz/Cargo.toml.
fn fuzz_targets() -> Result<Vec<String>> {
    let manifest = std::fs::read_to_string("fuzz/Cargo.toml")?;
    Ok(manifest
        .lines()
        .filter_map(|l| l.trim().strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|n| *n != "broflake-fuzz")
        .map(str::to_owned)
        .collect())
}

fn fuzz(seconds: u64, only: &[String]) -> Result<()> {
    let targets = if only.is_empty() { fuzz_targets()? } else { only.to_vec() };
    for t in &targets {
        // New inputs go to a scratch directory; the committed corpus is read as a seed.
        let scratch = PathBuf::from(format!("target/fuzz-corpus/{t}"));
        std::fs::create_dir_all(&scratch)?;
        let seed = PathBuf::from(format!("fuzz/corpus/{t}"));
        std::fs::create_dir_all(&seed)?;
        // Through rustup: `cargo xtask` runs with CARGO pointing at the stable cargo binary,
        // which does not understand `+nightly`; cargo-fuzz must not inherit it either.
        sh(Command::new("rustup")
            .args(["run", "nightly", "cargo", "fuzz", "run", "--fuzz-dir", "fuzz", t])
            .env_remove("CARGO")
            .env_remove("RUSTUP_TOOLCHAIN")
            .arg(&scratch)
            .arg(&seed)
            .args(["--", &format!("-max_total_time={seconds}"), "-print_final_stats=1"]))?;
    }
    Ok(())
}

/// The binary to install: the given one, or a fresh release build (with the XDP object).
fn release_binary(given: Option<PathBuf>, dry_run: bool) -> Result<PathBuf> {
    if let Some(b) = given {
        return Ok(b);
    }
    if !dry_run {
        build_release()?;
    }
    Ok(PathBuf::from("target/release/egress"))
}

/// `what`: the bench's subcommand (`run` for everything).
fn bench(what: &str, full: bool, rows: Option<String>, profile: bool) -> Result<()> {
    setup::apt(&[("curl", "curl"), ("turnserver", "coturn"), ("redis-server", "redis-server")])?;
    if profile {
        setup::apt(&[("perf", "linux-perf")])?;
    }
    // The uring+xdp row needs the XDP program embedded in the egress.
    ebpf::ensure_toolchain()?;
    ebpf::build()?;
    sh(cargo().args([
        "build",
        "--release",
        "-p",
        "broflake-egress",
        "-p",
        "broflake-client",
        "-p",
        "broflake-signal",
        "-p",
        "bench",
        "--bins",
    ]))?;
    let mut args: Vec<String> = vec!["target/release/bench".into(), what.into()];
    if full {
        args.push("--full".into());
    }
    if profile {
        args.push("--profile".into());
    }
    if let (Some(rows), "run") = (rows, what) {
        args.extend(["--rows".into(), rows]);
    }
    // In a network namespace of its own: the XDP row attaches to that namespace's loopback,
    // never to the host's interfaces.
    let ns = "broflake-bench";
    let in_ns = Command::new("ip").args(["netns", "add", ns]).status().is_ok_and(|s| s.success())
        || Command::new("ip").args(["netns", "exec", ns, "true"]).status().is_ok_and(|s| s.success());
    if in_ns {
        sh(Command::new("ip").args(["netns", "exec", ns, "ip", "link", "set", "lo", "up"]))?;
        let r = sh(Command::new("ip").args(["netns", "exec", ns]).args(&args));
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
        r
    } else {
        eprintln!("xtask bench: cannot create a network namespace (not root?); running without the XDP row");
        sh(Command::new(&args[0]).args(&args[1..]))
    }
}

/// The release binaries with the XDP object embedded. `build` and `run` build exactly this
/// set, so the same features are unified and one never recompiles what the other built.
pub(crate) fn build_release() -> Result<()> {
    ebpf::ensure_toolchain()?;
    ebpf::build()?;
    sh(cargo().args(["build", "--release", "--bins"]))
}

fn run(args: &[String]) -> Result<()> {
    setup::runtime()?;
    build_release()?;
    sh(Command::new("target/release/egress").args(args))
}

#[cfg(test)]
mod tests {
    use super::has_doc_test;

    #[test]
    fn doc_tests_are_found_and_text_blocks_are_not() {
        assert!(!has_doc_test("//! A topology:\n//! ```text\n//! a ─ b\n//! ```\nfn f() {}\n"));
        assert!(has_doc_test("/// ```\n/// assert!(true);\n/// ```\n"));
        assert!(has_doc_test("    /// ```no_run\n    /// f();\n    /// ```\n"));
        assert!(has_doc_test("//! ```text\n//! x\n//! ```\n//! ```rust\n//! y();\n//! ```\n"));
        assert!(!has_doc_test("// ```\n// not a doc comment\n// ```\n"));
    }
}
