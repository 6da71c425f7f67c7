//! Test support for the end-to-end suites. Everything here is real: real sockets, a real
//! egress, a real HTTP server on loopback, real NATs in network namespaces ([`nat`]).

pub mod fleet;
pub mod nat;

use broflake_egress::config::{Backend, Config, LivenessMode};
use broflake_proto::frame::{decode_message, Frame};
use broflake_proto::{binding, ClientConfig, ClientSession, Timestamp};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A fresh, empty temporary directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "broflake-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// An egress configuration for tests: loopback listeners on ephemeral ports, short
/// timeouts, loopback destinations allowed (the test servers live there).
pub fn egress_config(backend: Backend) -> Config {
    let mut c = Config::default();
    c.listen.ws = vec!["127.0.0.1:0".parse().unwrap()];
    c.listen.wss = vec!["127.0.0.1:0".parse().unwrap()];
    c.tls.state_dir = Some(temp_dir("egress-state"));
    c.io.backend = backend;
    c.liveness.mode = LivenessMode::Userspace;
    c.liveness.keepalive = Duration::from_secs(1);
    c.liveness.idle_timeout = Duration::from_secs(3);
    c.liveness.handshake_timeout = Duration::from_secs(2);
    c.liveness.sweep_interval = Duration::from_millis(100);
    c.drain.grace = Duration::from_secs(2);
    c.proxy.allow = vec!["127.0.0.0/8".parse().unwrap()];
    // Tests run side by side: no fixed admin port.
    c.admin.listen = None;
    c
}

/// The backends end-to-end tests run against.
pub fn backends() -> Vec<Backend> {
    vec![Backend::Tokio, Backend::Uring]
}

/// Deterministic pseudo-random body bytes (xorshift), so both ends can check them.
pub fn body(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A minimal HTTP/1.1 server on loopback serving one body for any GET. Returns its address
/// and the body's SHA-256.
pub async fn http_server(len: usize, seed: u64) -> (SocketAddr, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, serve_http(listener, len, seed))
}

/// Serves one body for any GET on `listener` (e.g. one bound in a network namespace);
/// returns the body's SHA-256.
pub fn serve_http(listener: TcpListener, len: usize, seed: u64) -> String {
    let body = Bytes::from(body(len, seed));
    let digest = sha256_hex(&body);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                    if req.len() > 64 * 1024 {
                        return;
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                if s.write_all(head.as_bytes()).await.is_ok() {
                    let _ = s.write_all(&body).await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    digest
}

pub type RawWs = WebSocketStream<TcpStream>;

/// Opens a raw WebSocket to an egress with the given subprotocol offer.
pub async fn raw_ws(addr: SocketAddr, protocols: &str) -> Result<RawWs, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://{addr}{}", binding::DEFAULT_PATH).into_client_request()?;
    if !protocols.is_empty() {
        req.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_str(protocols).unwrap());
    }
    let tcp = TcpStream::connect(addr).await.map_err(tokio_tungstenite::tungstenite::Error::Io)?;
    let (ws, _) = tokio_tungstenite::client_async(req, tcp).await?;
    Ok(ws)
}

/// A raw WebSocket that completed the Broflake handshake (HELLO sent, WELCOME received) and
/// does nothing else unless told to: the idle client of the tests.
pub async fn raw_handshaked(addr: SocketAddr, cfg: &ClientConfig) -> RawWs {
    let mut ws = raw_ws(addr, "broflake.v1, broflake").await.expect("upgrade");
    let mut hello = Vec::new();
    ClientSession::new(1).start(cfg, Timestamp(0), &mut hello);
    ws.send(Message::Binary(hello.into())).await.unwrap();
    let msg = next_binary(&mut ws).await.expect("WELCOME");
    let frames = decode_message(&msg, usize::MAX).unwrap();
    assert!(matches!(frames[0].frame, Frame::Welcome(_)), "got {frames:?}");
    ws
}

/// The next binary message, skipping WebSocket control frames; `None` on close.
pub async fn next_binary(ws: &mut RawWs) -> Option<Bytes> {
    loop {
        match ws.next().await? {
            Ok(Message::Binary(b)) => return Some(b),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// Reads until the server closes; returns the close code and reason (1006 if the TCP
/// connection ended without a close frame), and the Broflake frames seen before it.
pub async fn until_close(ws: &mut RawWs) -> (u16, String, Vec<String>) {
    let mut frames = Vec::new();
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                for d in decode_message(&b, usize::MAX).unwrap_or_default() {
                    frames.push(d.frame.name().to_string());
                }
            }
            Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string(), frames),
            Some(Ok(Message::Close(None))) => return (u16::from(CloseCode::Status), String::new(), frames),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (1006, String::new(), frames),
        }
    }
}

/// Encodes frames into one message.
pub fn message(frames: &[Frame<'_>]) -> Message {
    let mut out = Vec::new();
    for f in frames {
        f.encode(0, &mut out);
    }
    Message::Binary(out.into())
}

/// Sum of the samples of metric `name` in a Prometheus text exposition whose labels include
/// every `labels` pair.
pub fn prom_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|(k, val)| rest.contains(&format!("{k}=\"{val}\""))))
                .then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

/// Lines an egress process wrote to stderr (kept for assertions and failure messages).
pub type EgressLog = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Waits until an egress binary started by a test logs `listening on ws://ADDR`, reading its
/// stderr on a thread that echoes (`egress: …`) and keeps every line. Returns ADDR and the log.
/// Panics with the log when the process ends first or 20 s pass.
pub fn wait_listening(child: &mut std::process::Child) -> (SocketAddr, EgressLog) {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("the egress's stderr is piped");
    let log = EgressLog::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("egress: {line}");
            if let Some(i) = line.find("listening on ws://") {
                let _ = tx.send(line[i + "listening on ws://".len()..].trim().to_string());
            }
            kept.lock().unwrap().push(line);
        }
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(addr) => (addr.parse().expect("a socket address after `listening on ws://`"), log),
        Err(_) => panic!("the egress did not start:\n{}", log.lock().unwrap().join("\n")),
    }
}

/// A binary of another workspace package (e.g. `loadgen` of `bench`), built now if it is
/// missing or stale: cargo only builds a test's own package's binaries, and a test must run
/// alone (`cargo test -p broflake-egress --test xdp_egress`). `cargo build` of an up-to-date
/// binary is a no-op. Panics with the command to run when the build fails.
pub fn workspace_bin(package: &str, name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>/deps").to_path_buf();
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug").to_string();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(&cargo);
    // `--workspace`: features unified as in `cargo build --workspace --bins` (what `cargo
    // xtask test` builds first), so this is a no-op there and never rebuilds dependencies
    // with another feature set. `package` names where the binary lives, for the message.
    cmd.args(["build", "--quiet", "--workspace", "--bin", name]);
    // Not the test's own CARGO_MANIFEST_DIR, OUT_DIR, CARGO_PKG_* and friends: some build scripts
    // track them, and seeing other values than a plain `cargo build` would rebuild half the
    // dependency tree, twice per run.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if (k.starts_with("CARGO_") && !matches!(k.as_ref(), "CARGO_HOME" | "CARGO_TARGET_DIR")) || k == "OUT_DIR" {
            cmd.env_remove(k.as_ref());
        }
    }
    if profile == "release" {
        cmd.arg("--release");
    }
    let shown =
        format!("cargo build -p {package} --bin {name}{}", if profile == "release" { " --release" } else { "" });
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run `{shown}`: {e}"));
    assert!(status.success(), "`{shown}` failed; run it by hand to see why");
    let bin = dir.join(name);
    assert!(bin.exists(), "`{shown}` did not produce {}", bin.display());
    bin
}

/// A child process (and everything it starts: it leads its own process group) that is killed
/// when dropped, so a failing or panicking test leaves nothing running.
#[derive(Debug)]
pub struct Proc(pub std::process::Child);

impl Proc {
    /// Spawns `cmd` as the leader of a new process group.
    pub fn spawn(cmd: &mut std::process::Command) -> Proc {
        use std::os::unix::process::CommandExt;
        let shown = format!("{cmd:?}");
        Proc(cmd.process_group(0).spawn().unwrap_or_else(|e| panic!("cannot start {shown}: {e}")))
    }
}

impl std::ops::Deref for Proc {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // The whole group: `ip netns exec`, shells and the like start the real process
            // as a child.
            let _ = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{}", self.0.id())]).status();
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}
