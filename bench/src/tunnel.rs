//! What a tunnelled byte costs: curl → consumer → relay → egress → a local HTTP server, both
//! directions, both egress backends, with the egress's user and system CPU per GiB from /proc;
//! next to two anchors measured in the same run: quinn over plain loopback UDP with the tunnel's
//! QUIC settings (what QUIC itself costs here) and AES-128-GCM in this process (the crypto floor).

use crate::chain::{Chain, Spec};
use crate::procfs::{cpu_times, CpuTimes};
use crate::Procs;
use anyhow::{Context, Result};
use serde::Serialize;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

const GIB: f64 = (1u64 << 30) as f64;

#[derive(Debug, Default, Serialize, Clone)]
pub struct TunnelResults {
    pub bytes: u64,
    /// curl straight to the local server (no proxy), seconds.
    pub plain_download_secs: f64,
    pub plain_upload_secs: f64,
    pub rows: Vec<TunnelRow>,
    pub quic_loopback: Vec<QuicAnchor>,
    /// AES-128-GCM seal in this process, CPU seconds per GiB, in 16 KiB blocks.
    pub aes_gcm_16k_sec_per_gib: f64,
    /// The same in 1,350-byte packets (QUIC's base packet size).
    pub aes_gcm_1350_sec_per_gib: f64,
    /// Top frames of the io_uring egress during one more download, when asked for.
    pub profile: Vec<crate::profile::Frame>,
}

#[derive(Debug, Default, Serialize, Clone)]
pub struct TunnelRow {
    pub backend: String,
    pub direction: String,
    pub secs: f64,
    /// Throughput over a plain loopback copy of the same bytes (1.0 = as fast).
    pub ratio_to_plain: f64,
    pub egress_user_sec_per_gib: f64,
    pub egress_system_sec_per_gib: f64,
    pub relay_sec_per_gib: f64,
    pub consumer_sec_per_gib: f64,
}

#[derive(Debug, Default, Serialize, Clone)]
pub struct QuicAnchor {
    pub direction: String,
    pub secs: f64,
    pub server_user_sec_per_gib: f64,
    pub server_system_sec_per_gib: f64,
}

/// Reads `child`'s stderr until a line contains `needle`; returns that line.
pub(crate) fn wait_stderr(child: &mut Child, needle: &str) -> Result<String> {
    let stderr = child.stderr.take().context("stderr not piped")?;
    let mut lines = BufReader::new(stderr).lines();
    let found = loop {
        let line = lines.next().context("exited before saying it was ready")??;
        if line.contains(needle) {
            break line;
        }
    };
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok(found)
}

/// A local HTTP/1.1 server: `GET` answers `bytes` bytes, `PUT` reads and discards its body.
fn http_server(bytes: u64) -> Result<std::net::SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    serve_http(l, bytes);
    Ok(addr)
}

/// Serves [`http_server`]'s answers on `l` (bound wherever, e.g. in another namespace).
pub(crate) fn serve_http(l: std::net::TcpListener, bytes: u64) {
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || serve_one(s, bytes));
        }
    });
}

fn serve_one(mut s: std::net::TcpStream, bytes: u64) {
    let mut buf = vec![0u8; 1 << 20];
    let mut have = 0;
    let head_end = loop {
        match s.read(&mut buf[have..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => have += n,
        }
        if let Some(i) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if have == buf.len() {
            return;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if head.starts_with("put ") {
        let length: u64 = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let mut left = length.saturating_sub((have - head_end) as u64);
        while left > 0 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n as u64),
            }
        }
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    }
    // `GET /1`: one byte (a warm-up that opens the tunnel's QUIC connection).
    let bytes = if head.starts_with("get /1 ") { 1 } else { bytes };
    let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {bytes}\r\nConnection: close\r\n\r\n");
    buf.fill(0x5a);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        if s.write_all(&buf[..n]).is_err() {
            return;
        }
        left -= n as u64;
    }
}

/// One curl transfer, timed: a download to /dev/null or an upload of `upload` (a file).
fn curl(http: std::net::SocketAddr, proxy: Option<&str>, upload: Option<&Path>) -> Result<f64> {
    curl_path(http, proxy, upload, "/")
}

fn curl_path(http: std::net::SocketAddr, proxy: Option<&str>, upload: Option<&Path>, path: &str) -> Result<f64> {
    let mut c = Command::new("curl");
    c.args(["--silent", "--fail", "--output", "/dev/null", "--max-time", "600"]);
    if let Some(p) = proxy {
        c.args(["--proxy", p]);
    }
    if let Some(file) = upload {
        // No "Expect: 100-continue" round trip before the body.
        c.args(["-H", "Expect:", "--upload-file"]).arg(file);
    }
    c.arg(format!("http://localhost:{}{path}", http.port()));
    let t = Instant::now();
    let st = c.status().context("cannot run curl")?;
    anyhow::ensure!(st.success(), "curl failed: {st}");
    Ok(t.elapsed().as_secs_f64())
}

fn per_gib(cpu: f64, bytes: u64) -> f64 {
    cpu * GIB / bytes as f64
}

/// Runs every measurement. `bin`: the release binaries; `bench`: this program (for the QUIC
/// sink process).
/// `profile`: where to record a perf profile of the io_uring egress during an extra download.
pub fn run(bin: &Path, bench: &Path, bytes: u64, profile: Option<&Path>) -> Result<TunnelResults> {
    let http = http_server(bytes)?;
    let upload = std::env::temp_dir().join(format!("broflake-bench-upload-{}", std::process::id()));
    // Sparse: reading it costs curl no disk I/O.
    std::fs::File::create(&upload)?.set_len(bytes)?;
    let _cleanup = RemoveOnDrop(upload.clone());
    let mut r = TunnelResults {
        bytes,
        plain_download_secs: curl(http, None, None)?,
        plain_upload_secs: curl(http, None, Some(&upload))?,
        ..Default::default()
    };
    for backend in ["uring", "tokio"] {
        let profile = profile.filter(|_| backend == "uring");
        let (rows, frames) = through_tunnel(bin, backend, http, &upload, &r, profile)?;
        r.rows.extend(rows);
        r.profile.extend(frames);
    }
    r.quic_loopback = quic_anchor(bench, bytes)?;
    r.aes_gcm_16k_sec_per_gib = aes_gcm_sec_per_gib(16 << 10);
    r.aes_gcm_1350_sec_per_gib = aes_gcm_sec_per_gib(1350);
    Ok(r)
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn through_tunnel(
    bin: &Path,
    backend: &str,
    http: std::net::SocketAddr,
    upload: &Path,
    plain: &TunnelResults,
    profile: Option<&Path>,
) -> Result<(Vec<TunnelRow>, Vec<crate::profile::Frame>)> {
    let chain = Chain::start(&Spec {
        bin,
        tag: &format!("tunnel-{backend}"),
        egress_ip: "127.0.0.1",
        allow: "127.0.0.0/8",
        backend: Some(backend),
        egress_ns: None,
        user_ns: None,
    })?;
    let (egress_pid, relay_pid, consumer_pid) = (chain.egress_pid, chain.relay_pid, chain.consumer_pid);
    let proxy = chain.proxy.clone();
    // A first small transfer opens the QUIC connection, so the rows measure bytes, not set-up.
    curl_path(http, Some(&proxy), None, "/1")?;
    let mut rows = Vec::new();
    for (direction, file, plain_secs) in
        [("download", None, plain.plain_download_secs), ("upload", Some(upload), plain.plain_upload_secs)]
    {
        let cpu = |pid| cpu_times(pid).unwrap_or_default();
        let (e0, r0, c0) = (cpu(egress_pid), cpu(relay_pid), cpu(consumer_pid));
        let secs = curl(http, Some(&proxy), file)?;
        let (e, rl, c): (CpuTimes, CpuTimes, CpuTimes) =
            (cpu(egress_pid) - e0, cpu(relay_pid) - r0, cpu(consumer_pid) - c0);
        rows.push(TunnelRow {
            backend: backend.into(),
            direction: direction.into(),
            secs,
            ratio_to_plain: plain_secs / secs,
            egress_user_sec_per_gib: per_gib(e.user, plain.bytes),
            egress_system_sec_per_gib: per_gib(e.system, plain.bytes),
            relay_sec_per_gib: per_gib(rl.total(), plain.bytes),
            consumer_sec_per_gib: per_gib(c.total(), plain.bytes),
        });
    }
    // Profiled apart from the measured rows, so sampling costs them nothing.
    let frames = match profile {
        Some(data) => {
            let rec = crate::profile::Recording::start(egress_pid, data)?;
            curl(http, Some(&proxy), None)?;
            rec.finish(1.0)?
        }
        None => Vec::new(),
    };
    drop(chain);
    Ok((rows, frames))
}

/// quinn over loopback UDP: the sink process is the server, measured like the egress.
fn quic_anchor(bench: &Path, bytes: u64) -> Result<Vec<QuicAnchor>> {
    let mut sink = Command::new(bench).arg("quic-sink").stderr(Stdio::piped()).spawn()?;
    let line = wait_stderr(&mut sink, "quic sink listening on ")?;
    let addr = crate::quic_sink::parse_listening(&line).context("quic sink address")?;
    let pid = sink.id();
    let _procs = Procs(vec![sink]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async move {
        let client = crate::quic_sink::client_endpoint()?;
        let conn = client.connect(addr, "localhost")?.await?;
        let mut out = Vec::new();
        for direction in ["download", "upload"] {
            let c0 = cpu_times(pid).unwrap_or_default();
            let t = Instant::now();
            crate::quic_sink::transfer(&conn, direction == "download", bytes).await?;
            let secs = t.elapsed().as_secs_f64();
            let c = cpu_times(pid).unwrap_or_default() - c0;
            out.push(QuicAnchor {
                direction: direction.into(),
                secs,
                server_user_sec_per_gib: per_gib(c.user, bytes),
                server_system_sec_per_gib: per_gib(c.system, bytes),
            });
        }
        conn.close(0u32.into(), b"done");
        client.wait_idle().await;
        anyhow::Ok(out)
    })
}

/// CPU seconds per GiB to seal `block`-byte messages with AES-128-GCM (ring, as rustls uses).
fn aes_gcm_sec_per_gib(block: usize) -> f64 {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).expect("16-byte key"));
    let mut buf = vec![0x5au8; block];
    let total: u64 = 1 << 30;
    let start = thread_cpu();
    let mut done = 0u64;
    let mut counter = 0u64;
    while done < total {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&counter.to_be_bytes());
        counter += 1;
        let tag = key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::empty(), &mut buf);
        std::hint::black_box(tag.expect("seal").as_ref());
        done += block as u64;
    }
    (thread_cpu() - start) * GIB / done as f64
}

fn thread_cpu() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// The tunnel section of BENCHMARKS.md.
pub fn markdown(r: &TunnelResults, command: &str) -> String {
    let mib = r.bytes >> 20;
    let mut s = format!(
        "\nTunnel ({mib} MiB per transfer, curl → consumer → relay → egress → local HTTP server; `{command}`). \
         CPU in seconds per GiB moved; plain loopback copy: download {:.2} s, upload {:.2} s.\n\n\
         | backend | direction | time s | × plain copy | egress user | egress system | egress total | relay | consumer |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        r.plain_download_secs, r.plain_upload_secs
    );
    for t in &r.rows {
        s += &format!(
            "| {} | {} | {:.2} | {:.3} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            t.backend,
            t.direction,
            t.secs,
            t.ratio_to_plain,
            t.egress_user_sec_per_gib,
            t.egress_system_sec_per_gib,
            t.egress_user_sec_per_gib + t.egress_system_sec_per_gib,
            t.relay_sec_per_gib,
            t.consumer_sec_per_gib
        );
    }
    s += "\nAnchors in the same run:\n\n| what | direction | time s | server user | server system | server total |\n|---|---|---|---|---|---|\n";
    for q in &r.quic_loopback {
        s += &format!(
            "| quinn over loopback UDP, tunnel's QUIC settings | {} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            q.direction,
            q.secs,
            q.server_user_sec_per_gib,
            q.server_system_sec_per_gib,
            q.server_user_sec_per_gib + q.server_system_sec_per_gib
        );
    }
    s += &format!(
        "| AES-128-GCM seal (ring), 16 KiB blocks | — | — | {0:.2} | 0 | {0:.2} |\n| AES-128-GCM seal (ring), 1,350-byte packets | — | — | {1:.2} | 0 | {1:.2} |\n",
        r.aes_gcm_16k_sec_per_gib, r.aes_gcm_1350_sec_per_gib
    );
    if !r.profile.is_empty() {
        s += &format!(
            "\nWhere the io_uring egress spends its CPU during one more {mib} MiB download (`perf record -F 999 -g -p EGRESS`, \
             `perf report --no-children --sort symbol`, frames at 1 % of samples or more; k = kernel):\n\n\
             | % of samples | | function |\n|---|---|---|\n"
        );
        for f in &r.profile {
            s += &format!("| {:.1} | {} | `{}` |\n", f.percent, f.space, f.symbol);
        }
    }
    s
}
