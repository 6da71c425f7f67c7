//! The `egress` binary itself: embedded defaults, check-config, and drain on SIGTERM.

use broflake_client::link::{Link, LinkConfig, LinkEvent};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn egress() -> Command {
    Command::new(env!("CARGO_BIN_EXE_egress"))
}

#[test]
fn check_config_accepts_the_example_and_rejects_mistakes_with_a_reason() {
    let dir = testkit::temp_dir("check-config");
    let good = dir.join("good.toml");
    std::fs::write(&good, "[listen]\nws = [\"127.0.0.1:9000\"]\nwss = []\n[liveness]\nmode = \"server-ping\"\n")
        .unwrap();
    let out = egress().arg("check-config").arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[listen]\nsw = []\n").unwrap();
    let out = egress().arg("check-config").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `sw`"), "{err}");

    // print-config shows the effective configuration with flags applied, and it parses back.
    let out = egress().args(["--no-wss", "--liveness", "server-ping", "print-config"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("mode = \"server-ping\""), "{text}");
    let reparsed = dir.join("printed.toml");
    std::fs::write(&reparsed, &text).unwrap();
    assert!(egress().arg("check-config").arg(&reparsed).status().unwrap().success());
}

/// Starts the binary; returns it with its ws:// address once it listens.
fn spawn(args: &[&str]) -> (testkit::Proc, String) {
    let state = testkit::temp_dir("binary-state");
    let mut child = testkit::Proc::spawn(
        egress()
            // Userspace liveness: a test never attaches XDP to the host's interfaces.
            .args(["--ws", "127.0.0.1:0", "--no-wss", "--admin", "off", "--liveness", "userspace", "--log", "info"])
            .arg("--state-dir")
            .arg(&state)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let (addr, _) = testkit::wait_listening(&mut child);
    (child, format!("ws://{addr}/broflake"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_goaway_to_every_client_before_closing() {
    let dir = testkit::temp_dir("drain");
    let config = dir.join("egress.toml");
    std::fs::write(&config, "[drain]\ngrace = \"3s\"\n").unwrap();
    let (mut child, url) = spawn(&["--config", config.to_str().unwrap()]);
    let mut links = Vec::new();
    for _ in 0..5 {
        links.push(Link::connect(LinkConfig::new(url.clone())).await.expect("link"));
    }
    let t = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    for link in &mut links {
        let mut seen = Vec::new();
        while let Some(ev) = tokio::time::timeout(Duration::from_secs(45), link.events.recv()).await.expect("events") {
            match ev {
                LinkEvent::GoAway { grace_ms, .. } => seen.push(format!("goaway {grace_ms}")),
                LinkEvent::Closed { reason, .. } => {
                    seen.push(reason);
                    break;
                }
                _ => {}
            }
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[0], "goaway 3000", "GOAWAY first, with the configured grace");
        // Then the socket closes: the client leaves when the grace is over, or the server
        // closes it with 4010 "drained", whichever comes first.
        assert!(
            seen[1].contains("goaway grace over") || (seen[1].contains("4010") && seen[1].contains("drained")),
            "{seen:?}"
        );
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(2_900) && took < Duration::from_secs(8), "drain took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let (mut child, url) = spawn(&[]);
    let _link = Link::connect(LinkConfig::new(url)).await.expect("link");
    let pid = child.id().to_string();
    let t = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(child.try_wait().unwrap().is_none(), "still draining");
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let status = child.wait().unwrap();
    assert!(status.success());
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// A field of /proc/PID/status or /proc/PID/smaps_rollup, as its first number.
fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
    let line = text.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key} not in {file}: {text}"));
    line[key.len()..].split_whitespace().next().unwrap().parse().unwrap()
}

/// The memory policy the binary ships with: transparent huge pages off for the process from its
/// first allocation (none of its memory in huge pages), and back on where the configuration says
/// "system". The start-up log says which.
#[test]
fn transparent_huge_pages_are_off_unless_configured() {
    let start = |config: &str| {
        let dir = testkit::temp_dir("thp");
        let path = dir.join("egress.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = testkit::Proc::spawn(
            egress()
                .args(["--ws", "127.0.0.1:0", "--no-wss", "--admin", "off", "--liveness", "userspace"])
                .arg("--state-dir")
                .arg(&dir)
                .arg("--config")
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        );
        let (_, log) = testkit::wait_listening(&mut child);
        let log = log.lock().unwrap().join("\n");
        (child, log)
    };
    let (child, log) = start("");
    assert_eq!(proc_field(child.id(), "status", "THP_enabled:"), 0, "THP disabled for the process");
    assert_eq!(proc_field(child.id(), "smaps_rollup", "AnonHugePages:"), 0, "no huge page faulted in before main");
    assert!(log.contains("transparent huge pages off for this process"), "{log}");
    drop(child);

    let (child, log) = start("[memory]\ntransparent_huge_pages = \"system\"\n");
    assert_eq!(proc_field(child.id(), "status", "THP_enabled:"), 1, "THP as the system says");
    assert!(log.contains("transparent huge pages as the system says"), "{log}");
}

/// `n` handshaked links to `url`, opened at once.
async fn open_links(url: &str, n: usize) -> Vec<Link> {
    let all = futures_util::future::join_all((0..n).map(|_| Link::connect(LinkConfig::new(url.to_string())))).await;
    all.into_iter().map(|l| l.expect("a handshaked link")).collect()
}

/// The io_uring backend keeps its connections in each ring's registered file table: no
/// descriptor of the process per connection. Where the kernel refuses the table (here: a
/// descriptor limit below the table's minimum of 64 slots) a worker falls back to ordinary
/// descriptors, says why in the log and in `broflake_uring_workers`, and serves as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_use_direct_descriptors_and_fall_back_to_ordinary_ones_when_refused() {
    use std::io::{Read, Write};
    let start = |nofile: Option<u64>| {
        let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let state = testkit::temp_dir("direct");
        let config = state.join("egress.toml");
        std::fs::write(&config, "[io]\nthreads = 2\nuring_direct_descriptors = true\n").unwrap();
        let mut cmd = egress();
        cmd.args(["--ws", "127.0.0.1:0", "--no-wss", "--liveness", "userspace", "--backend", "uring", "--log", "info"])
            .args(["--admin", &admin.to_string()])
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let l = libc::rlimit { rlim_cur: n, rlim_max: n };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                })
            };
        }
        let mut child = testkit::Proc::spawn(&mut cmd);
        let (addr, log) = testkit::wait_listening(&mut child);
        (child, format!("ws://{addr}/broflake"), admin, log)
    };
    let workers = |admin: std::net::SocketAddr, kind: &str| {
        let mut s = std::net::TcpStream::connect(admin).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        testkit::prom_value(&text, "broflake_uring_workers", &[("descriptors", kind)])
    };

    let (child, url, admin, log) = start(None);
    let pid = child.id();
    let fds = bench::procfs::fds(pid).unwrap();
    let links = open_links(&url, 20).await;
    assert!(bench::procfs::direct_descriptors(pid).unwrap() >= 20, "the connections are in the rings' tables");
    assert!(bench::procfs::fds(pid).unwrap() < fds + 20, "and not in the process's");
    assert_eq!((workers(admin, "direct"), workers(admin, "ordinary")), (2.0, 0.0));
    assert!(!log.lock().unwrap().join("\n").contains("direct descriptors unavailable"));
    drop(links);
    drop(child);

    let (child, url, admin, log) = start(Some(60));
    let pid = child.id();
    let text = log.lock().unwrap().join("\n");
    assert!(text.contains("io_uring direct descriptors unavailable"), "{text}");
    assert!(text.contains("cannot register a file table of 64 slots"), "the reason: {text}");
    assert_eq!((workers(admin, "direct"), workers(admin, "ordinary")), (0.0, 2.0));
    let fds = bench::procfs::fds(pid).unwrap();
    let links = open_links(&url, 5).await;
    assert_eq!(bench::procfs::direct_descriptors(pid).unwrap(), 0);
    // (The status sampler holds a /proc file for a moment now and then: one either way.)
    let now = bench::procfs::fds(pid).unwrap();
    assert!(now >= fds + 4, "each connection holds a descriptor of the process: {fds} -> {now}");
    drop(links);
}
