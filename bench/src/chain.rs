//! The chain the tunnel measurements drive: an egress, one relay and a consumer with a SOCKS5
//! port, as the release binaries, each side optionally inside a network namespace. Stopped (the
//! processes killed, the egress's state directory removed) on drop.

use crate::tunnel::wait_stderr;
use crate::Procs;
use anyhow::{Context, Result};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where and how to start the chain.
#[derive(Debug)]
pub struct Spec<'a> {
    /// The release binaries.
    pub bin: &'a Path,
    /// Names the state directory.
    pub tag: &'a str,
    /// The egress's listen IP; the relay, the consumer and curl reach it there.
    pub egress_ip: &'a str,
    /// The network the egress may proxy to (the origin's; internal, so allowed explicitly).
    pub allow: &'a str,
    /// `--backend`, or the egress's default.
    pub backend: Option<&'a str>,
    /// Namespaces of the egress's side and of the relay and consumer's side (None: this one).
    pub egress_ns: Option<&'a str>,
    pub user_ns: Option<&'a str>,
}

#[derive(Debug)]
pub struct Chain {
    pub egress_pid: u32,
    pub relay_pid: u32,
    pub consumer_pid: u32,
    /// `socks5h://…` for curl's `--proxy` (in the user side's namespace).
    pub proxy: String,
    procs: Procs,
    dir: PathBuf,
}

/// `program`, inside namespace `ns` when given.
pub fn command(ns: Option<&str>, program: &Path) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

impl Chain {
    pub fn start(s: &Spec<'_>) -> Result<Chain> {
        let dir = std::env::temp_dir().join(format!("broflake-bench-{}-{}", s.tag, std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("egress.toml");
        std::fs::write(&cfg, format!("[proxy]\nallow = [\"{}\"]\n", s.allow))?;
        let mut procs = Procs(Vec::new());
        let mut egress = command(s.egress_ns, &s.bin.join("egress"));
        egress.args(["--ws", &format!("{}:0", s.egress_ip), "--no-wss", "--admin", "off"]);
        if let Some(b) = s.backend {
            egress.args(["--backend", b]);
        }
        let mut egress = egress
            .args(["--log", "warn,egress=info,broflake_egress=info", "--config"])
            .arg(&cfg)
            .arg("--state-dir")
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let line = wait_stderr(&mut egress, "listening on ws://")?;
        let addr: SocketAddr = line.rsplit("ws://").next().unwrap_or_default().trim().parse()?;
        // The start-up summary comes first; the certificate line ends it.
        let fp = BufReader::new(egress.stdout.take().context("stdout")?)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("certificate sha256 ").map(str::to_owned))
            .context("the egress did not print its certificate")?;
        let egress_pid = egress.id();
        procs.0.push(egress);
        let relay_port = addr.port() + 1000;
        let mut relay = command(s.user_ns, &s.bin.join("broflake"))
            .args(["--log", "warn", "relay", "--upstream", &format!("ws://{addr}/broflake"), "--pool", "1"])
            .args(["--listen", &format!("127.0.0.1:{relay_port}")])
            .stderr(Stdio::piped())
            .spawn()?;
        wait_stderr(&mut relay, "relay listening")?;
        let relay_pid = relay.id();
        procs.0.push(relay);
        let socks_port = relay_port + 1;
        let mut consumer = command(s.user_ns, &s.bin.join("broflake"))
            .args(["--log", "warn", "consumer", "--relay", &format!("ws://127.0.0.1:{relay_port}/broflake")])
            .args(["--egress-cert-sha256", &fp, "--socks", &format!("127.0.0.1:{socks_port}")])
            .stderr(Stdio::piped())
            .spawn()?;
        wait_stderr(&mut consumer, "socks5 listening")?;
        let consumer_pid = consumer.id();
        procs.0.push(consumer);
        let proxy = format!("socks5h://127.0.0.1:{socks_port}");
        Ok(Chain { egress_pid, relay_pid, consumer_pid, proxy, procs, dir })
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        self.procs.0.iter_mut().for_each(|c| {
            let _ = c.kill();
            let _ = c.wait();
        });
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
