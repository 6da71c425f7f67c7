//! `cargo xtask deploy --root DIR` produces the layout docs/OPERATIONS.md documents, and
//! `--host … --dry-run` prints every step without doing anything.

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn deploy_root_produces_the_documented_layout() {
    let tmp = std::env::temp_dir().join(format!("broflake-deploy-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    // Any executable stands in for the release build (the test checks the layout, not the binary).
    let binary = tmp.with_extension("bin");
    std::fs::write(&binary, b"#!/bin/sh\necho egress\n").unwrap();
    let deploy = || {
        let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .current_dir(root())
            .args(["deploy", "--root"])
            .arg(&tmp)
            .arg("--binary")
            .arg(&binary)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    deploy();
    // Every path in the "Installed layout" table of OPERATIONS.md exists under the root.
    let ops = std::fs::read_to_string(root().join("docs/OPERATIONS.md")).unwrap();
    let table = ops.split("### Installed layout").nth(1).expect("layout section");
    let mut checked = 0;
    for line in table.lines().skip_while(|l| !l.starts_with('|')).take_while(|l| l.starts_with('|')) {
        let Some(path) = line.split('`').nth(1).filter(|p| p.starts_with('/')) else { continue };
        let p = tmp.join(path.trim_start_matches('/'));
        assert!(p.exists(), "{path} is documented but not installed");
        checked += 1;
    }
    assert!(checked >= 9, "only {checked} documented paths found");
    let unit = std::fs::read_to_string(tmp.join("etc/systemd/system/broflake-egress.service")).unwrap();
    assert!(unit.contains("LimitNOFILE=1048576"));
    assert!(tmp.join("usr/share/broflake-egress/grafana/dashboards/broflake-egress.json").exists());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(tmp.join("usr/local/bin/egress")).unwrap().permissions().mode() & 0o777, 0o755);
    assert_eq!(std::fs::metadata(tmp.join("var/lib/broflake-egress")).unwrap().permissions().mode() & 0o777, 0o700);
    // A second deploy (an upgrade) keeps the operator's configuration.
    std::fs::write(tmp.join("etc/broflake-egress/egress.toml"), "# mine\n").unwrap();
    deploy();
    assert_eq!(std::fs::read_to_string(tmp.join("etc/broflake-egress/egress.toml")).unwrap(), "# mine\n");
    assert!(tmp.join("etc/broflake-egress/egress.toml.dist").exists());
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_file(&binary);
}

#[test]
fn deploy_host_dry_run_prints_every_step() {
    let binary = std::env::temp_dir().join(format!("broflake-deploy-dry-{}.bin", std::process::id()));
    std::fs::write(&binary, b"x").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .current_dir(root())
        .args(["deploy", "--host", "ops@egress-1.example", "--dry-run", "--binary"])
        .arg(&binary)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = String::from_utf8_lossy(&out.stderr);
    for step in [
        "usr/local/bin/egress",
        "broflake-egress.service",
        "ssh ops@egress-1.example",
        "systemctl restart broflake-egress",
        "check-config",
    ] {
        assert!(log.contains(step), "dry run does not mention {step}:\n{log}");
    }
    let _ = std::fs::remove_file(&binary);
}
