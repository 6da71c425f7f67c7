//! The shipped sysctl file, applied inside a bench's network namespace, so a bench that gives
//! the egress a namespace of its own measures it with the settings `xtask deploy` installs.
//!
//! Only `net.*` keys are applied, and each only if the namespace has its own copy: a key the
//! kernel keeps host-wide (`net.ipv4.tcp_mem`) is absent from a namespace's `/proc/sys/net`, and
//! `fs.*` or `vm.*` written from inside a namespace would change the host.

use anyhow::{bail, Context, Result};
use std::process::Command;

/// `deploy/sysctl/90-broflake-egress.conf`, as shipped.
pub const SHIPPED: &str = include_str!("../../deploy/sysctl/90-broflake-egress.conf");

/// One `key = value` line of a sysctl.d file.
#[derive(Debug, PartialEq, Eq)]
pub struct Setting<'a> {
    pub key: &'a str,
    pub value: String,
    /// A leading `-`: systemd-sysctl ignores a failure to apply it.
    pub optional: bool,
}

/// The settings of a sysctl.d file, in order (comments and blank lines skipped; whitespace
/// inside a value, as in `tcp_rmem`, normalised to single spaces).
pub fn parse(text: &str) -> Result<Vec<Setting<'_>>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!("sysctl line {}: no '=' in {line:?}", n + 1);
        };
        let (key, optional) = match key.trim().strip_prefix('-') {
            Some(k) => (k.trim(), true),
            None => (key.trim(), false),
        };
        let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
        out.push(Setting { key, value, optional });
    }
    Ok(out)
}

/// Applies the shipped file's per-namespace `net.*` keys inside namespace `ns`. Returns the keys
/// applied; the others (host-wide, or read-only in a namespace) are the host's business.
pub fn apply_shipped(ns: &str) -> Result<Vec<String>> {
    let mut applied = Vec::new();
    for s in parse(SHIPPED)?.into_iter().filter(|s| s.key.starts_with("net.")) {
        let path = format!("/proc/sys/{}", s.key.replace('.', "/"));
        // Writing through `sh -c` inside the namespace: /proc/sys/net is the namespace's own.
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c", "test -w \"$1\" || exit 3; printf '%s' \"$2\" > \"$1\"", "sh"])
            .args([&path, &s.value])
            .output()
            .context("cannot run ip netns exec")?;
        match out.status.code() {
            Some(0) => applied.push(format!("{} = {}", s.key, s.value)),
            // Not in this namespace, or read-only there: host-wide.
            Some(3) => {}
            _ if s.optional => {}
            _ => bail!(
                "cannot set {} = {} in namespace {ns}: {}",
                s.key,
                s.value,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_shipped_file() {
        let all = parse(SHIPPED).unwrap();
        let rmem = all.iter().find(|s| s.key == "net.ipv4.tcp_rmem").expect("tcp_rmem is shipped");
        assert_eq!(rmem.value.split(' ').count(), 3, "{rmem:?}");
        assert!(all.iter().any(|s| s.key == "net.netfilter.nf_conntrack_max" && s.optional));
        assert!(all.iter().all(|s| !s.key.is_empty() && !s.value.is_empty() && !s.key.contains(' ')));
    }

    /// Removes the namespace when the test ends, passes or panics.
    struct Netns(&'static str);
    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", self.0]).output();
        }
    }

    fn read_in(ns: &str, path: &str) -> String {
        let out = Command::new("ip").args(["netns", "exec", ns, "cat", path]).output().unwrap();
        assert!(out.status.success(), "cat {path} in {ns}");
        String::from_utf8(out.stdout).unwrap().split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn applies_inside_the_namespace_and_leaves_the_host_alone() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: creating a network namespace needs root");
            return;
        }
        let host = |p: &str| std::fs::read_to_string(p).unwrap().split_whitespace().collect::<Vec<_>>().join(" ");
        let before =
            (host("/proc/sys/net/ipv4/tcp_wmem"), host("/proc/sys/net/ipv4/tcp_mem"), host("/proc/sys/fs/nr_open"));
        let ns = Netns("bfb-sysctl-test");
        let _ = Command::new("ip").args(["netns", "del", ns.0]).output();
        assert!(Command::new("ip").args(["netns", "add", ns.0]).status().unwrap().success());

        let applied = apply_shipped(ns.0).unwrap();
        let shipped = parse(SHIPPED).unwrap();
        let wmem = &shipped.iter().find(|s| s.key == "net.ipv4.tcp_wmem").unwrap().value;
        assert!(applied.contains(&format!("net.ipv4.tcp_wmem = {wmem}")), "{applied:?}");
        assert_eq!(&read_in(ns.0, "/proc/sys/net/ipv4/tcp_wmem"), wmem);
        // Host-wide keys are neither applied nor changed, and nothing outside `net.` is touched.
        assert!(applied.iter().all(|a| a.starts_with("net.") && !a.starts_with("net.ipv4.tcp_mem ")), "{applied:?}");
        let after =
            (host("/proc/sys/net/ipv4/tcp_wmem"), host("/proc/sys/net/ipv4/tcp_mem"), host("/proc/sys/fs/nr_open"));
        assert_eq!(before, after, "the host's settings changed");
    }

    #[test]
    fn rejects_a_line_without_a_value() {
        assert!(parse("net.core.somaxconn\n").is_err());
        assert_eq!(
            parse("  # c\n\n-a.b =  1\t2 \n").unwrap(),
            vec![Setting { key: "a.b", value: "1 2".into(), optional: true }]
        );
    }
}
