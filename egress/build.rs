//! Embeds the XDP liveness object when it has been built (`cargo xtask build-ebpf`, which
//! `cargo xtask test` and `cargo xtask run` do first). Without it, `cargo build` and
//! `cargo test` still work: the `has_ebpf_object` cfg stays unset and `xdp::Xdp::load`
//! reports `XdpUnavailable::NotBuilt`.
//!
//! Where the object is looked for, in order: `$BROFLAKE_EBPF_OBJ`; then
//! `<target dir>/bpfel-unknown-none/release/egress-ebpf` for the target directory this build
//! runs in (found above OUT_DIR) and for `<workspace>/target`. Once found, the object is
//! watched; while missing, only this file and the variable are (xtask touches this file when
//! it builds the object, so that a build made without it picks it up).

use std::path::PathBuf;

const OBJECT: &str = "bpfel-unknown-none/release/egress-ebpf";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(has_ebpf_object)");
    println!("cargo::rerun-if-env-changed=BROFLAKE_EBPF_OBJ");
    println!("cargo::rerun-if-changed=build.rs");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));

    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("BROFLAKE_EBPF_OBJ").filter(|p| !p.is_empty()) {
        candidates.push(PathBuf::from(p));
    } else {
        // OUT_DIR is <target>/[<triple>/]<profile>/build/<pkg>-<hash>/out.
        if let Some(target) = out_dir.ancestors().find(|a| a.join("bpfel-unknown-none").is_dir()) {
            candidates.push(target.join(OBJECT));
        }
        if let Some(target) = out_dir.ancestors().nth(4).filter(|t| !candidates.contains(&t.join(OBJECT))) {
            candidates.push(target.join(OBJECT));
        }
        candidates.push(manifest_dir.join("..").join("target").join(OBJECT));
        candidates.dedup();
    }

    let dest = out_dir.join("egress-ebpf.o");
    match candidates.iter().find(|p| p.is_file()) {
        Some(found) => {
            println!("cargo::rerun-if-changed={}", found.display());
            std::fs::copy(found, &dest).unwrap_or_else(|e| panic!("cannot copy {}: {e}", found.display()));
            println!("cargo::rustc-cfg=has_ebpf_object");
        }
        None => {
            // Nothing to watch cheaply (cargo would walk a watched directory recursively, and
            // a watched missing file reruns this script on every build): `cargo xtask
            // build-ebpf` touches this file when it produces or changes the object.
            let _ = std::fs::remove_file(&dest);
            println!(
                "cargo::warning=XDP object not found ({}); building without kernel liveness \
                 (run `cargo xtask build-ebpf` to embed it)",
                candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            );
        }
    }
}
