//! `deploy --root DIR`, `deploy --host user@host` and `dist`: the installed layout of
//! docs/OPERATIONS.md ("Installed layout"), from the release binary and deploy/.

use crate::sh;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// (source in the repository, destination relative to the root). Directories copy whole.
pub const LAYOUT: &[(&str, &str)] = &[
    ("deploy/config/egress.toml", "etc/broflake-egress/egress.toml"),
    ("deploy/systemd/broflake-egress.service", "etc/systemd/system/broflake-egress.service"),
    ("deploy/systemd/broflake-egress.sysusers.conf", "usr/lib/sysusers.d/broflake-egress.conf"),
    ("deploy/sysctl/90-broflake-egress.conf", "etc/sysctl.d/90-broflake-egress.conf"),
    ("deploy/prometheus", "usr/share/broflake-egress/prometheus"),
    ("deploy/grafana", "usr/share/broflake-egress/grafana"),
    ("deploy/kubernetes", "usr/share/broflake-egress/kubernetes"),
];

/// Where the binary goes.
pub const BINARY: &str = "usr/local/bin/egress";

/// The signaling service, installed beside the egress when its binary was built next to the
/// egress's (`target/release/signal`); not enabled: one host of a fleet runs it, or none.
pub const SIGNAL_LAYOUT: &[(&str, &str)] = &[
    ("deploy/config/signal.toml", "etc/broflake-signal/signal.toml"),
    ("deploy/systemd/broflake-signal.service", "etc/systemd/system/broflake-signal.service"),
    ("deploy/systemd/broflake-signal.sysusers.conf", "usr/lib/sysusers.d/broflake-signal.conf"),
];
pub const SIGNAL_BINARY: &str = "usr/local/bin/signal";

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    if from.is_dir() {
        std::fs::create_dir_all(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
    } else {
        if let Some(p) = to.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::copy(from, to).with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// Installs the layout under `root` (and the signaling service's, when its binary was built
/// next to the egress's).
pub fn install_root(root: &Path, binary: &Path, dry_run: bool) -> Result<()> {
    let step = |what: String| eprintln!("{}{what}", if dry_run { "would: " } else { "+ " });
    if !binary.exists() {
        bail!("no binary at {} (build it with `cargo build --release --bin egress`)", binary.display());
    }
    install_binary(binary, &root.join(BINARY), dry_run)?;
    install_files(root, LAYOUT, dry_run)?;
    let signal = binary.with_file_name("signal");
    if signal.exists() {
        install_binary(&signal, &root.join(SIGNAL_BINARY), dry_run)?;
        install_files(root, SIGNAL_LAYOUT, dry_run)?;
    }
    let state = root.join("var/lib/broflake-egress");
    step(format!("mkdir {} (mode 0700)", state.display()));
    if !dry_run {
        std::fs::create_dir_all(&state)?;
        set_mode(&state, 0o700)?;
    }
    Ok(())
}

fn install_binary(from: &Path, to: &Path, dry_run: bool) -> Result<()> {
    eprintln!("{}install {} -> {}", if dry_run { "would: " } else { "+ " }, from.display(), to.display());
    if !dry_run {
        copy_tree(from, to)?;
        set_mode(to, 0o755)?;
    }
    Ok(())
}

/// Copies `layout` under `root`. An existing configuration file is kept (upgrades must not
/// overwrite the operator's settings); the new example lands next to it as `.toml.dist`.
fn install_files(root: &Path, layout: &[(&str, &str)], dry_run: bool) -> Result<()> {
    for (src, dst) in layout {
        let mut to = root.join(dst);
        if src.starts_with("deploy/config/") && to.exists() {
            to = to.with_extension("toml.dist");
        }
        eprintln!("{}install {src} -> {}", if dry_run { "would: " } else { "+ " }, to.display());
        if !dry_run {
            copy_tree(Path::new(src), &to)?;
        }
    }
    Ok(())
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The same over ssh: stage the layout locally, copy it as a tar stream, and activate it.
pub fn install_host(host: &str, binary: &Path, dry_run: bool) -> Result<()> {
    let stage = std::env::temp_dir().join(format!("broflake-deploy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&stage);
    install_root(&stage, binary, dry_run)?;
    let remote = "tar -C / --no-same-owner -xzf - && systemd-sysusers && sysctl --system >/dev/null \
                  && egress check-config /etc/broflake-egress/egress.toml && systemctl daemon-reload \
                  && systemctl enable broflake-egress && systemctl restart broflake-egress";
    let cmd = format!("tar -C {} -czf - . | ssh {host} '{remote}'", stage.display());
    if dry_run {
        eprintln!("would: {cmd}");
        eprintln!("(restart drains: SIGTERM sends GOAWAY to every relay; TimeoutStopSec covers the grace period)");
        return Ok(());
    }
    sh(Command::new("sh").arg("-c").arg(&cmd))?;
    let _ = std::fs::remove_dir_all(&stage);
    Ok(())
}

/// A tarball of the layout: target/dist/broflake-egress-<version>-<arch>.tar.gz.
pub fn dist(binary: &Path) -> Result<PathBuf> {
    let stage = PathBuf::from("target/dist/root");
    let _ = std::fs::remove_dir_all(&stage);
    install_root(&stage, binary, false)?;
    let name = format!("broflake-egress-{}-{}.tar.gz", env!("CARGO_PKG_VERSION"), std::env::consts::ARCH);
    let out = PathBuf::from("target/dist").join(&name);
    sh(Command::new("tar").args(["-C", "target/dist/root", "--owner=0", "--group=0", "-czf"]).arg(&out).arg("."))?;
    eprintln!("dist: {}", out.display());
    Ok(out)
}
