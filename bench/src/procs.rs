//! The processes a density measurement runs: the server (an egress with a given
//! configuration, or the floor: plain accept-and-hold TCP servers) and `loadgen` processes
//! of at most 9,000 connections each (the per-process open-file limit), each on its own
//! loopback source addresses.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running server: one egress, or several floor processes sharing the port.
#[derive(Debug)]
pub struct Server {
    pub children: Vec<Child>,
    pub addr: SocketAddr,
    _dir: Option<PathBuf>,
}

impl Server {
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for `listening on ws://ADDR` on the child's stderr (echoing its errors).
pub fn wait_listening(child: &mut Child) -> Result<SocketAddr> {
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("listening on ws://") {
                let _ = tx.send(line[i + "listening on ws://".len()..].trim().to_string());
            }
            if line.contains("ERROR") || line.contains("Error") {
                eprintln!("  server: {line}");
            }
        }
    });
    Ok(rx.recv_timeout(Duration::from_secs(30)).context("server did not start listening")?.parse()?)
}

fn started(mut child: Child) -> Result<(Child, SocketAddr)> {
    match wait_listening(&mut child) {
        Ok(a) => Ok((child, a)),
        Err(e) => {
            let _ = child.kill();
            let mut err = String::new();
            if let Some(mut s) = child.stderr.take() {
                let _ = s.read_to_string(&mut err);
            }
            bail!("{e}: {err}")
        }
    }
}

/// Starts the egress on 127.0.0.1:`port` with `config` (TOML, as an operator writes it).
/// No environment, prctl or setting of its own: the egress runs as the systemd unit and the
/// embedded defaults run it (transparent huge pages off is its own default).
pub fn start_egress(bin: &Path, name: &str, config: &str, port: u16) -> Result<Server> {
    let dir = std::env::temp_dir().join(format!("broflake-bench-{}-{}", name.replace('+', "-"), std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("egress.toml");
    std::fs::write(&cfg, config)?;
    let child = Command::new(bin.join("egress"))
        .args(["--ws", &format!("127.0.0.1:{port}"), "--no-wss", "--admin", "off"])
        .args(["--log", "warn,egress=info,broflake_egress=info", "--config"])
        .arg(&cfg)
        .arg("--state-dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let (child, addr) = started(child)?;
    Ok(Server { children: vec![child], addr, _dir: Some(dir) })
}

/// Starts `procs` floor servers (`bench floor`) on 127.0.0.1:`port` (SO_REUSEPORT: the
/// kernel spreads connections over them, so together they hold more than one process's
/// open-file limit).
pub fn start_floor(bench_exe: &Path, port: u16, procs: usize) -> Result<Server> {
    let mut children = Vec::new();
    let mut addr = None;
    for _ in 0..procs.max(1) {
        let child = Command::new(bench_exe)
            .args(["floor", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let (child, a) = started(child)?;
        children.push(child);
        addr = Some(a);
    }
    Ok(Server { children, addr: addr.expect("at least one floor process"), _dir: None })
}

/// What the load processes do.
#[derive(Debug, Clone, Copy)]
pub struct LoadSpec {
    pub n: usize,
    /// PING interval (0: silent).
    pub ping_ms: u64,
    pub announce: bool,
    /// Plain TCP (the floor).
    pub tcp: bool,
    /// Seconds to hold after the handshakes.
    pub hold: u64,
    /// Source addresses 127.`net`.(`base` + process).1–40: distinct per measurement, so no
    /// measurement meets another's sockets in TIME_WAIT.
    pub net: u8,
    pub base: u8,
    /// Reset the connections when the process ends (no TIME_WAIT left behind to be freed
    /// during the next measurement).
    pub reset: bool,
}

impl LoadSpec {
    pub fn new(n: usize, base: u8) -> Self {
        LoadSpec { n, ping_ms: 0, announce: true, tcp: false, hold: 600, net: 0, base, reset: false }
    }
}

#[derive(Debug)]
pub struct LoadProc {
    children: Vec<Child>,
}

#[derive(Default, Debug)]
pub struct LoadOut {
    pub ready_secs: f64,
    pub handshaked: u64,
    pub failed: u64,
    pub pings: u64,
    pub closed: u64,
    pub rtt_p50: u64,
    pub rtt_p99: u64,
    pub close_after_ms_max: u64,
}

/// Connections per `loadgen` process (under the per-process open-file limit).
pub const PER_PROCESS: usize = 9000;

/// Starts `spec.n` connections to `target` over processes of at most [`PER_PROCESS`].
pub fn start_load(bin: &Path, target: SocketAddr, spec: LoadSpec) -> Result<LoadProc> {
    let mut children = Vec::new();
    let mut left = spec.n;
    let mut k = 0u8;
    while left > 0 {
        let this = left.min(PER_PROCESS);
        left -= this;
        let mut c = Command::new(bin.join("loadgen"));
        c.args(["--target", &target.to_string(), "--conns", &this.to_string(), "--ping-ms", &spec.ping_ms.to_string()])
            .args(["--source-net", &spec.net.to_string(), "--source-base", &(spec.base + k).to_string()])
            .args(["--hold-secs", &spec.hold.to_string()]);
        if !spec.announce {
            c.arg("--no-announce-ping");
        }
        if spec.tcp {
            c.arg("--tcp-only");
        }
        if spec.reset {
            c.arg("--reset-on-exit");
        }
        children.push(c.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?);
        k += 1;
    }
    Ok(LoadProc { children })
}

impl LoadProc {
    /// Reads every process's "ready" line.
    pub fn ready(&mut self) -> Result<LoadOut> {
        let mut out = LoadOut::default();
        for c in &mut self.children {
            let mut line = String::new();
            BufReader::new(c.stdout.as_mut().context("stdout")?).read_line(&mut line)?;
            let v: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("loadgen said {line:?}"))?;
            out.handshaked += v["handshaked"].as_u64().unwrap_or(0);
            out.failed += v["failed"].as_u64().unwrap_or(0);
            out.ready_secs = out.ready_secs.max(v["secs"].as_f64().unwrap_or(0.0));
        }
        Ok(out)
    }

    /// Waits for every process to finish; sums their "done" lines.
    pub fn done(mut self, mut out: LoadOut) -> Result<LoadOut> {
        for c in &mut self.children {
            let mut text = String::new();
            c.stdout.as_mut().context("stdout")?.read_to_string(&mut text)?;
            let _ = c.wait();
            if let Some(line) = text.lines().find(|l| l.contains("\"done\"")) {
                let v: serde_json::Value = serde_json::from_str(line)?;
                out.pings += v["pings"].as_u64().unwrap_or(0);
                out.closed += v["closed"].as_u64().unwrap_or(0);
                out.rtt_p50 = out.rtt_p50.max(v["rtt_p50_us"].as_u64().unwrap_or(0));
                out.rtt_p99 = out.rtt_p99.max(v["rtt_p99_us"].as_u64().unwrap_or(0));
                out.close_after_ms_max = out.close_after_ms_max.max(v["close_after_ms_max"].as_u64().unwrap_or(0));
            }
        }
        Ok(out)
    }

    pub fn kill(mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for LoadProc {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
