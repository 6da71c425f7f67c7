//! Idempotent installation of what the project needs on a fresh machine of this kind
//! (Debian, root, Rust stable + nightly from rustup, registries reachable).

use crate::sh;
use anyhow::Result;
use std::process::{Command, Stdio};

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Everything the test command needs: curl; Prometheus (promtool and the server); coturn
/// (STUN/TURN), nftables and iproute2 for the NAT tests in network namespaces; Redis for the
/// signaling replicas' shared store; HAProxy in front of the egress fleet test's two hosts.
pub fn all() -> Result<()> {
    runtime()?;
    apt(&[
        ("curl", "curl"),
        ("promtool", "prometheus"),
        ("prometheus", "prometheus"),
        ("turnserver", "coturn"),
        ("nft", "nftables"),
        ("ip", "iproute2"),
        ("redis-server", "redis-server"),
        ("haproxy", "haproxy"),
    ])?;
    fuzz_tools()
}

/// Installs Debian packages whose command is missing: (command, package) pairs.
pub fn apt(wanted: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(cmd, _)| !quiet_ok(Command::new("sh").args(["-c", &format!("command -v {cmd}")])))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    sh(Command::new("apt-get").arg("update"))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// What running the egress needs (nothing beyond Rust yet).
pub fn runtime() -> Result<()> {
    Ok(())
}

/// cargo-fuzz on the nightly toolchain.
pub fn fuzz_tools() -> Result<()> {
    if !quiet_ok(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        anyhow::bail!("the nightly toolchain is missing (`rustup toolchain install nightly`); fuzzing needs it");
    }
    if !quiet_ok(Command::new("cargo").args(["fuzz", "--version"])) {
        sh(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}
