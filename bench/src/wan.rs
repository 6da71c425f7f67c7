//! Throughput under delay and loss: the tunnel against a plain TCP download over the same path.
//!
//! Two network namespaces joined by a link with delay and loss ([`crate::wan_link`]): the egress
//! and an HTTP origin on one side, the relay, the consumer and curl on the other, so the relay ↔
//! egress WebSocket hop crosses the delayed (and lossy) link, as it does in the field. For each
//! condition, one stream and eight parallel streams, plain (curl straight to the origin across the
//! link) and through the tunnel (curl → consumer → relay → link → egress → origin).

use crate::chain::{command, Chain, Spec};
use crate::tunnel::serve_http;
use crate::wan_link::{End, WanLink};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const NS_EGRESS: &str = "bfb-wan-e";
const NS_USER: &str = "bfb-wan-u";
const IF_EGRESS: &str = "bfbwE";
const IF_USER: &str = "bfbwU";
const IP_EGRESS: &str = "10.231.9.1";
const IP_USER: &str = "10.231.9.2";

/// One path condition: round-trip delay, and loss applied in each direction.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Condition {
    pub rtt_ms: u32,
    pub loss_percent: f32,
}

pub const CONDITIONS: [Condition; 4] = [
    Condition { rtt_ms: 50, loss_percent: 0.0 },
    Condition { rtt_ms: 150, loss_percent: 0.0 },
    Condition { rtt_ms: 50, loss_percent: 1.0 },
    Condition { rtt_ms: 150, loss_percent: 1.0 },
];

#[derive(Debug, Clone, Serialize)]
pub struct WanRow {
    pub condition: Condition,
    pub streams: usize,
    /// Bytes per stream.
    pub bytes: u64,
    pub plain_mb_per_s: f64,
    pub tunnel_mb_per_s: f64,
}

impl WanRow {
    /// Tunnel throughput over plain (1.0 = as fast).
    pub fn ratio(&self) -> f64 {
        self.tunnel_mb_per_s / self.plain_mb_per_s
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("cannot run ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The two namespaces and the link between them; removed on drop (also when a measurement
/// fails).
struct Net {
    link: Option<WanLink>,
}

impl Net {
    fn create() -> Result<Net> {
        Net::remove();
        let mut net = Net { link: None };
        ip(&["netns", "add", NS_EGRESS])?;
        ip(&["netns", "add", NS_USER])?;
        for ns in [NS_EGRESS, NS_USER] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        net.link = Some(WanLink::create(
            &End { ns: NS_EGRESS, dev: IF_EGRESS, ip: IP_EGRESS },
            &End { ns: NS_USER, dev: IF_USER, ip: IP_USER },
        )?);
        Ok(net)
    }

    fn shape(&self, c: Condition) {
        if let Some(l) = &self.link {
            l.set(std::time::Duration::from_millis(c.rtt_ms.into()), c.loss_percent);
        }
    }

    fn remove() {
        for ns in [NS_EGRESS, NS_USER] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.link = None;
        Net::remove();
    }
}

/// A TCP listener bound inside namespace `ns`.
fn listen_in(ns: &str, addr: &str) -> Result<std::net::TcpListener> {
    let path = format!("/run/netns/{ns}");
    let addr = addr.to_owned();
    std::thread::spawn(move || -> Result<std::net::TcpListener> {
        let f = std::fs::File::open(&path).with_context(|| path.clone())?;
        // SAFETY: a valid namespace fd; only this short-lived thread changes namespace.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        Ok(std::net::TcpListener::bind(&addr)?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
}

/// `streams` parallel curl downloads in the user namespace; MB/s over all of them.
fn download(url: &str, proxy: Option<&str>, streams: usize, bytes: u64) -> Result<f64> {
    let t = Instant::now();
    let mut running = Vec::new();
    for _ in 0..streams {
        let mut c = command(Some(NS_USER), Path::new("curl"));
        c.args(["--silent", "--fail", "--output", "/dev/null", "--max-time", "900"]);
        if let Some(p) = proxy {
            c.args(["--proxy", p]);
        }
        running.push(c.arg(url).spawn().context("cannot run curl")?);
    }
    for mut c in running {
        let st = c.wait()?;
        if !st.success() {
            bail!("curl {url} failed: {st}");
        }
    }
    Ok((streams as u64 * bytes) as f64 / 1e6 / t.elapsed().as_secs_f64())
}

/// Runs every condition. `bin`: the release binaries.
pub fn run(bin: &Path, bytes: u64) -> Result<Vec<WanRow>> {
    let net = Net::create()?;
    // The egress's side runs with the sysctl file `xtask deploy` installs; the user's side, a
    // volunteer's and a censored user's machines, with the kernel's defaults. The origin shares
    // the egress's namespace, so plain downloads are sent with the same settings.
    for s in crate::sysctl::apply_shipped(NS_EGRESS)? {
        eprintln!("wan: egress namespace: {s}");
    }
    let origin = listen_in(NS_EGRESS, &format!("{IP_EGRESS}:0"))?;
    let url = format!("http://{}/", origin.local_addr()?);
    serve_http(origin, bytes);

    let chain = Chain::start(&Spec {
        bin,
        tag: "wan",
        egress_ip: IP_EGRESS,
        allow: &format!("{IP_EGRESS}/32"),
        backend: None,
        egress_ns: Some(NS_EGRESS),
        user_ns: Some(NS_USER),
    })?;
    let proxy = chain.proxy.clone();
    // The tunnel's QUIC connection is opened once, as a consumer keeps it: the rows measure
    // transfers, not its handshake. Plain TCP opens a connection per transfer, as curl does.
    net.shape(CONDITIONS[0]);
    download(&url, Some(&proxy), 1, bytes)?;

    let mut rows = Vec::new();
    for c in CONDITIONS {
        net.shape(c);
        for streams in [1, 8] {
            let plain = download(&url, None, streams, bytes)?;
            let tunnel = download(&url, Some(&proxy), streams, bytes)?;
            eprintln!(
                "wan {} ms, {} % loss, {streams} stream(s): plain {plain:.1} MB/s, tunnel {tunnel:.1} MB/s",
                c.rtt_ms, c.loss_percent
            );
            rows.push(WanRow { condition: c, streams, bytes, plain_mb_per_s: plain, tunnel_mb_per_s: tunnel });
        }
    }
    drop(chain);
    Ok(rows)
}

/// The WAN section of BENCHMARKS.md.
pub fn markdown(rows: &[WanRow], command: &str) -> String {
    let mib = rows.first().map_or(0, |r| r.bytes >> 20);
    let mut s = format!(
        "\nThroughput under delay and loss (`{command}`): {mib} MiB per stream over an emulated link between the \
         relay's side and the egress's side (half the RTT and the loss in each direction), plain = curl straight \
         to the origin over the same link; the egress's side (egress and origin) runs with the per-namespace \
         settings of deploy/sysctl/90-broflake-egress.conf, the user's side with the kernel's defaults. \
         Target: the tunnel within 2× of plain (ratio ≥ 0.5).\n\n\
         | RTT ms | loss each way | streams | plain MB/s | tunnel MB/s | tunnel / plain |\n|---|---|---|---|---|---|\n"
    );
    for r in rows {
        s += &format!(
            "| {} | {} % | {} | {:.1} | {:.1} | {:.2} |\n",
            r.condition.rtt_ms,
            r.condition.loss_percent,
            r.streams,
            r.plain_mb_per_s,
            r.tunnel_mb_per_s,
            r.ratio()
        );
    }
    s
}
