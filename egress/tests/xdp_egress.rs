//! The egress in xdp liveness mode, end to end, in network namespaces joined by a veth pair:
//! the egress (with the XDP program on its veth) in one, clients in the other. Idle
//! connections are closed by kernel expiry; pinging ones never; user space does no
//! per-connection idle work; wakeups do not grow with the number of idle connections.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Duration;
use testkit::Proc;

fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).status().is_ok_and(|s| s.success())
}

/// Namespaces that are removed when dropped.
struct Net {
    srv: String,
    cli: String,
}

impl Drop for Net {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.srv]);
        ip(&["netns", "del", &self.cli]);
    }
}

/// Whether this test can run here; under CI it must (a missing privilege fails the test).
fn can_run() -> bool {
    match capable() {
        Ok(()) => true,
        Err(why) => {
            assert!(std::env::var_os("CI").is_none(), "CI must run the XDP test: {why}");
            eprintln!("SKIPPED: {why}");
            false
        }
    }
}

fn capable() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        return Err("not root: network namespaces and XDP need CAP_NET_ADMIN and CAP_BPF".into());
    }
    if !broflake_egress::xdp::is_built() {
        return Err("the XDP object is not built into this binary (run `cargo xtask build-ebpf`)".into());
    }
    Ok(())
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn setup(tag: &str) -> Net {
    let id = std::process::id() % 100_000;
    let net = Net { srv: format!("bfx-s{tag}{id}"), cli: format!("bfx-c{tag}{id}") };
    let (vs, vc) = (format!("bxs{tag}{}", id % 10_000), format!("bxc{tag}{}", id % 10_000));
    assert!(ip(&["netns", "add", &net.srv]) && ip(&["netns", "add", &net.cli]));
    assert!(ip(&["link", "add", &vs, "type", "veth", "peer", "name", &vc]));
    assert!(ip(&["link", "set", &vs, "netns", &net.srv]) && ip(&["link", "set", &vc, "netns", &net.cli]));
    for (ns, dev, addr) in [(&net.srv, &vs, "10.231.7.1/24"), (&net.cli, &vc, "10.231.7.2/24")] {
        assert!(ip(&["-n", ns, "addr", "add", addr, "dev", dev]));
        assert!(ip(&["-n", ns, "link", "set", dev, "up"]));
        assert!(ip(&["-n", ns, "link", "set", "lo", "up"]));
    }
    net
}

fn metric(ns: &str, name: &str) -> f64 {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-s", "http://10.231.7.1:9090/metrics"])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn loadgen(ns: &str, conns: usize, ping_ms: u64, hold: u64) -> Proc {
    let bin = testkit::workspace_bin("bench", "loadgen");
    Proc::spawn(
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin)
            .args(["--target", "10.231.7.1:8080", "--bind", "10.231.7.2", "--conns", &conns.to_string()])
            .args(["--ping-ms", &ping_ms.to_string(), "--hold-secs", &hold.to_string()])
            .stdout(Stdio::piped()),
    )
}

fn ready(c: &mut Proc) -> serde_json::Value {
    let mut line = String::new();
    BufReader::new(c.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|_| panic!("loadgen said {line:?}"))
}

fn done(mut c: Proc) -> serde_json::Value {
    let mut text = String::new();
    c.stdout.as_mut().unwrap().read_to_string(&mut text).unwrap();
    c.wait().unwrap();
    serde_json::from_str(text.lines().find(|l| l.contains("done")).expect("done line")).unwrap()
}

fn ctxt(pid: u32) -> u64 {
    let mut total = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let s = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        for l in s.lines().filter(|l| l.contains("ctxt_switches:")) {
            total += l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    total
}

fn wakeups_per_sec(pid: u32, secs: f64) -> f64 {
    let a = ctxt(pid);
    std::thread::sleep(Duration::from_secs_f64(secs));
    (ctxt(pid) - a) as f64 / secs
}

#[test]
fn idle_flows_are_closed_by_the_kernel_and_pinging_ones_never() {
    if !can_run() {
        return;
    }
    for (tag, backend) in [("u", "uring"), ("t", "tokio")] {
        let net = setup(tag);
        let dir = testkit::temp_dir("xdp-egress");
        let cfg = dir.join("egress.toml");
        let vs = format!("bxs{tag}{}", std::process::id() % 100_000 % 10_000);
        std::fs::write(
            &cfg,
            format!("[liveness]\nmode = \"xdp\"\ninterfaces = [\"{vs}\"]\nkeepalive = \"1s\"\nidle_timeout = \"4s\"\nsweep_interval = \"250ms\"\n[io]\nbackend = \"{backend}\"\nthreads = 1\n[limits]\nmax_connections = 10000\nmax_connections_per_ip = 100000\n[admin]\nlisten = \"10.231.7.1:9090\"\n"),
        )
        .unwrap();
        let mut egress = Proc::spawn(
            Command::new("ip")
                .args(["netns", "exec", &net.srv, env!("CARGO_BIN_EXE_egress"), "--ws", "10.231.7.1:8080", "--no-wss"])
                .arg("--config")
                .arg(&cfg)
                .arg("--state-dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        );
        testkit::wait_listening(&mut egress);
        let pid = egress.id();
        // `ip netns exec` forks the egress: find the real process.
        let pid = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()
            .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()))
            .unwrap_or(pid);
        assert_eq!(metric(&net.srv, "broflake_liveness_mode{mode=\"xdp\"}"), 1.0, "{backend}: xdp mode active");

        // Wakeups with 100, then 1,000 silent connections (well inside the idle timeout).
        let mut small = loadgen(&net.cli, 100, 0, 8);
        assert_eq!(ready(&mut small)["handshaked"], 100);
        let w100 = wakeups_per_sec(pid, 1.0);
        let mut silent = loadgen(&net.cli, 900, 0, 8);
        assert_eq!(ready(&mut silent)["handshaked"], 900);
        let w1000 = wakeups_per_sec(pid, 1.0);
        eprintln!("{backend}: wakeups/s with 100 idle: {w100:.1}, with 1,000 idle: {w1000:.1}");
        assert!(w1000 <= w100 * 1.5 + 8.0, "{backend}: wakeups grew with N ({w100} → {w1000})");

        // Meanwhile 1,000 pinging connections.
        let mut live = loadgen(&net.cli, 1000, 1000, 7);
        assert_eq!(ready(&mut live)["handshaked"], 1000);
        let live = done(live);
        assert_eq!(live["closed"], 0, "{backend}: no pinging connection was closed");
        // The silent ones: every one closed by the kernel's expiry within idle + one sweep.
        let small = done(small);
        let silent = done(silent);
        let closed = small["closed"].as_u64().unwrap() + silent["closed"].as_u64().unwrap();
        let latest = small["close_after_ms_max"].as_u64().unwrap().max(silent["close_after_ms_max"].as_u64().unwrap());
        eprintln!("{backend}: {closed}/1000 idle closed, the latest {latest} ms after its handshake");
        assert_eq!(closed, 1000, "{backend}: every idle connection closed");
        assert!(
            latest <= 4000 + 250 + 400,
            "{backend}: closed within idle timeout + one sweep (+ delivery): {latest} ms"
        );
        assert!(metric(&net.srv, "broflake_idle_closes_total{source=\"xdp\"}") >= 1000.0);
        assert_eq!(
            metric(&net.srv, "broflake_liveness_userspace_checks_total"),
            0.0,
            "{backend}: no user-space idle work"
        );
        assert_eq!(metric(&net.srv, "broflake_liveness_sweep_wakeups_total"), 0.0, "{backend}: the sweep woke nobody");
        let _ = egress.kill();
        let _ = egress.wait();
        drop(net);
    }
}

#[test]
fn auto_mode_without_privileges_falls_back_to_userspace_and_says_why() {
    if !can_run() {
        return;
    }
    let dir = testkit::temp_dir("xdp-auto");
    let cfg = dir.join("egress.toml");
    std::fs::write(&cfg, "[liveness]\nmode = \"auto\"\ninterfaces = [\"lo\"]\n").unwrap();
    // SAFETY: chmod via std; the unprivileged user must be able to write the state directory.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let run = |mode: &str| {
        let mut c = Proc::spawn(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
                .arg(env!("CARGO_BIN_EXE_egress"))
                .args(["--ws", "127.0.0.1:0", "--no-wss", "--admin", "off", "--liveness", mode, "--config"])
                .arg(&cfg)
                .arg("--state-dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        );
        let stderr = c.stderr.take().unwrap();
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let stop = line.contains("egress running") || line.contains("Error");
            lines.push(line);
            if stop {
                break;
            }
        }
        let _ = c.kill();
        let status = c.wait().unwrap();
        (lines.join("\n"), status)
    };
    let (log, _) = run("auto");
    assert!(log.contains("liveness: auto chose userspace"), "{log}");
    assert!(log.contains("not permitted") && log.contains("CAP_BPF"), "the reason names the missing privilege: {log}");
    assert!(log.contains("liveness=Userspace"), "{log}");
    // And `xdp` mode fails fast with that reason.
    let (log, status) = run("xdp");
    assert!(!status.success());
    assert!(log.contains("cannot run") && log.contains("not permitted"), "{log}");
}
