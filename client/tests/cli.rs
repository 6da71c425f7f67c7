//! The `broflake` command line: certificate checks are on unless turned off by name.

use std::process::Command;

fn broflake(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_broflake")).args(args).env("RUST_BACKTRACE", "0").output().unwrap()
}

#[test]
fn a_wss_upstream_needs_a_pin_a_ca_or_an_explicit_insecure() {
    let out = broflake(&["relay", "--upstream", "wss://127.0.0.1:9/broflake", "--listen", "127.0.0.1:0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("give --cert-sha256 or --ca to authenticate the server (or --insecure, for testing)"),
        "{err}"
    );

    let out = broflake(&[
        "consumer",
        "--relay",
        "wss://127.0.0.1:9/broflake",
        "--egress-cert-sha256",
        "00",
        "--socks",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wss://127.0.0.1:9/broflake: give --cert-sha256 or --ca"), "{err}");
}
