//! Building the XDP program (egress-ebpf/) into an eBPF object that `egress` embeds.
//!
//! The program is built with the nightly toolchain (`-Z build-std=core` for the
//! `bpfel-unknown-none` target) and linked by bpf-linker, which must use the same LLVM major
//! version as nightly's rustc (22 on this machine kind). Both steps are idempotent.

use crate::{display, sh};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// LLVM major version of the nightly toolchain, which bpf-linker must match.
const LLVM_MAJOR: &str = "22";
const TARGET: &str = "bpfel-unknown-none";

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn llvm_prefix() -> PathBuf {
    PathBuf::from(format!("/usr/lib/llvm-{LLVM_MAJOR}"))
}

/// The directory cargo installs binaries to (bpf-linker is looked for there too, in case
/// it is not on PATH).
fn cargo_bin_dir() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("bin")
}

fn bpf_linker_works() -> bool {
    ok(Command::new("bpf-linker").arg("--version"))
        || ok(Command::new(cargo_bin_dir().join("bpf-linker")).arg("--version"))
}

/// Installs what building the eBPF object needs, skipping every piece already present:
/// nightly's rust-src, LLVM's development files (Debian's llvm-22-dev) and bpf-linker
/// built against them.
pub fn ensure_toolchain() -> Result<()> {
    if !ok(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        bail!("the nightly toolchain is missing (`rustup toolchain install nightly`); the XDP program needs it");
    }
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("cannot run rustup")?;
    if !String::from_utf8_lossy(&installed.stdout).lines().any(|l| l.starts_with("rust-src")) {
        sh(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    if !llvm_prefix().join("bin").join("llvm-config").exists() {
        sh(Command::new("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"))?;
        sh(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", &format!("llvm-{LLVM_MAJOR}-dev")])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !bpf_linker_works() {
        sh(Command::new("cargo")
            .args(["install", "bpf-linker", "--locked", "--no-default-features", "--features"])
            .arg(format!("llvm-{LLVM_MAJOR}"))
            .env("LLVM_PREFIX", llvm_prefix()))?;
    }
    Ok(())
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Builds egress-ebpf/ and returns the path of the object
/// (`target/bpfel-unknown-none/release/egress-ebpf`), where egress/build.rs finds it.
pub fn build() -> Result<PathBuf> {
    let root = crate::project_root();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let target_dir = if target_dir.is_absolute() { target_dir } else { root.join(target_dir) };
    let manifest = root.join("egress-ebpf").join("Cargo.toml");
    // PATH gains cargo's bin directory so that rustc finds bpf-linker right after install.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths: Vec<PathBuf> = std::env::split_paths(&path).collect();
    paths.push(cargo_bin_dir());
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "build", "--release", "--ignore-rust-version", "--target", TARGET, "-Z", "build-std=core"])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        .env("PATH", std::env::join_paths(paths)?)
        .env("CARGO_ENCODED_RUSTFLAGS", ["-C", "debuginfo=2", "-C", "link-arg=--btf"].join("\x1f"))
        // Set by `cargo xtask` (stable); the nightly cargo must pick its own toolchain.
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO");
    let object = target_dir.join(TARGET).join("release").join("egress-ebpf");
    let before = modified(&object);
    eprintln!("+ {}", display(&cmd));
    let status = cmd.status().context("cannot start cargo +nightly")?;
    if !status.success() {
        bail!("building the XDP program failed ({status})");
    }
    if !object.is_file() {
        bail!("the XDP program built but {} is missing", object.display());
    }
    if modified(&object) != before {
        // egress/build.rs watches the object once it has seen it, but a build made while it
        // was missing watches nothing: make that build script run again.
        let script = root.join("egress").join("build.rs");
        std::fs::File::options()
            .write(true)
            .open(&script)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()))
            .with_context(|| format!("cannot touch {}", script.display()))?;
    }
    eprintln!("xtask: XDP object at {}", object.display());
    Ok(object)
}
