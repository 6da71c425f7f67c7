//! `cargo xtask demo`: the whole path on loopback — egress, signaling service, a volunteer
//! and a consumer that finds it by signaling and reaches it over WebRTC — and the curl line
//! that works through them.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The demo's processes, killed when it ends (Ctrl-C or an error).
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `cmd` with its stdout and stderr forwarded (prefixed) and returns it with a
/// channel of its lines.
fn start(cmd: &mut Command, tag: &'static str) -> Result<(Child, mpsc::Receiver<String>)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", crate::display(cmd)))?;
    let (tx, rx) = mpsc::channel();
    for out in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as _),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                eprintln!("[{tag}] {line}");
                let _ = tx.send(line);
            }
        });
    }
    Ok((child, rx))
}

fn wait_for(rx: &mpsc::Receiver<String>, what: &str, tag: &str) -> Result<String> {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(l) if l.contains(what) => return Ok(l),
            Ok(_) => {}
            Err(_) => bail!("{tag} did not say {what:?} within 60 s (its output is above)"),
        }
    }
}

pub fn run() -> Result<()> {
    crate::build_release()?;
    let bin = |n: &str| format!("target/release/{n}");
    let mut procs = Procs(Vec::new());
    let (c, egress) = start(
        Command::new(bin("egress")).args([
            "--ws",
            "127.0.0.1:8080",
            "--no-wss",
            "--admin",
            "127.0.0.1:9090",
            // A demo leaves the host's interfaces alone (`cargo xtask run` shows XDP).
            "--liveness",
            "userspace",
            "--state-dir",
            "target/demo/egress",
        ]),
        "egress",
    )?;
    procs.0.push(c);
    let fp = wait_for(&egress, "certificate sha256", "egress")?;
    let fp = fp.rsplit(' ').next().unwrap_or_default().to_string();
    let (c, signal) =
        start(Command::new(bin("signal")).args(["--listen", "127.0.0.1:8090", "--admin", "127.0.0.1:9091"]), "signal")?;
    procs.0.push(c);
    wait_for(&signal, "signaling on", "signal")?;
    let (c, volunteer) = start(
        Command::new(bin("broflake")).args([
            "relay",
            "--upstream",
            "ws://127.0.0.1:8080/broflake",
            "--listen",
            "off",
            "--signal",
            "ws://127.0.0.1:8090/v1/signal",
        ]),
        "volunteer",
    )?;
    procs.0.push(c);
    wait_for(&volunteer, "volunteer registered", "volunteer")?;
    let (c, consumer) = start(
        Command::new(bin("broflake")).args([
            "consumer",
            "--signal",
            "ws://127.0.0.1:8090/v1/signal",
            "--egress-cert-sha256",
            &fp,
            "--socks",
            "127.0.0.1:1080",
            "--http",
            "127.0.0.1:8118",
        ]),
        "consumer",
    )?;
    procs.0.push(c);
    let via = wait_for(&consumer, "via webrtc", "consumer")?;
    println!();
    println!("broflake demo running: consumer → WebRTC → volunteer → WebSocket → egress");
    println!("  {via}");
    println!("  egress status page    http://127.0.0.1:9090/");
    println!("  signaling metrics     http://127.0.0.1:9091/metrics");
    println!("  try:  curl --proxy socks5h://127.0.0.1:1080 https://example.org/");
    println!("        curl --proxy http://127.0.0.1:8118 https://example.org/");
    println!("Ctrl-C stops everything.");
    // Until Ctrl-C (which also reaches the children) or one of them exits.
    loop {
        std::thread::sleep(Duration::from_millis(500));
        for c in &mut procs.0 {
            if let Ok(Some(status)) = c.try_wait() {
                bail!("a demo process exited ({status}); its output is above");
            }
        }
    }
}
