//! The consumer's local proxies: SOCKS5 (with remote DNS, for `socks5h://`) and HTTP
//! CONNECT. Each accepted TCP connection becomes one proxy stream on the consumer's QUIC
//! connection; a supervisor moves that connection to another relay when its link dies.

use crate::consumer::{Consumer, ConsumerConfig, ProxyError};
use crate::link::{Link, LinkConfig};
use crate::signaled::{self, SignalSource};
use broflake_proto::proxy::ProxyStatus;
use broflake_proto::Role;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// What the consumer service needs.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// A signaling service that finds a volunteer to reach over WebRTC (tried first).
    pub signal: Option<SignalSource>,
    /// Relay (or egress) URLs, tried in order; the next one takes over when a link dies.
    pub relays: Vec<LinkConfig>,
    pub quic: ConsumerConfig,
    pub socks: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
}

/// A running consumer service.
#[derive(Debug)]
pub struct ConsumerService {
    pub consumer: Arc<Consumer>,
    /// How the consumer reaches the egress now (changes on failover).
    pub via: tokio::sync::watch::Receiver<Via>,
    pub socks_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    tasks: JoinSet<()>,
}

impl ConsumerService {
    pub async fn start(mut opts: ConsumerOptions) -> anyhow::Result<ConsumerService> {
        anyhow::ensure!(
            !opts.relays.is_empty() || opts.signal.is_some(),
            "a signaling service or at least one relay URL is needed"
        );
        for r in &mut opts.relays {
            r.client.role = Role::CONSUMER;
        }
        let sources = Sources { signal: opts.signal.clone(), relays: opts.relays.clone() };
        let (first, link, via) = sources.connect_any(0).await?;
        let consumer = Arc::new(Consumer::connect(link, &opts.quic).await?);
        tracing::info!(via = %via, "consumer connected to the egress");
        let (via_tx, via_rx) = tokio::sync::watch::channel(via);
        let mut tasks = JoinSet::new();
        tasks.spawn(supervise(consumer.clone(), sources, first, via_tx));
        let mut socks_addr = None;
        let mut http_addr = None;
        if let Some(a) = opts.socks {
            let l = TcpListener::bind(a).await?;
            socks_addr = Some(l.local_addr()?);
            tasks.spawn(serve(l, consumer.clone(), Kind::Socks));
        }
        if let Some(a) = opts.http {
            let l = TcpListener::bind(a).await?;
            http_addr = Some(l.local_addr()?);
            tasks.spawn(serve(l, consumer.clone(), Kind::Http));
        }
        Ok(ConsumerService { consumer, via: via_rx, socks_addr, http_addr, tasks })
    }

    pub async fn stop(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.consumer.connection.close(0u32.into(), b"consumer stopping");
        // Let the close reach the egress (bounded), so it frees the connection now rather
        // than at its idle timeout.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.consumer.endpoint.wait_idle()).await;
    }
}

/// How the consumer reaches the egress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// A volunteer over WebRTC, with the candidate pair in use when it connected.
    Volunteer { path: Option<broflake_rtc::SelectedPath> },
    /// A relay (or the egress) over WebSocket.
    Relay { url: String },
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Via::Volunteer { path: Some(p) } => write!(f, "volunteer over WebRTC ({p})"),
            Via::Volunteer { path: None } => write!(f, "volunteer over WebRTC"),
            Via::Relay { url } => write!(f, "relay {url}"),
        }
    }
}

/// Where links come from: the signaling service first, then the relay URLs.
#[derive(Debug, Clone)]
struct Sources {
    signal: Option<SignalSource>,
    relays: Vec<LinkConfig>,
}

impl Sources {
    /// A link from the signaling service, else from the first relay that answers after
    /// index `start` (relay indices; the signaling service is tried every time).
    async fn connect_any(&self, start: usize) -> anyhow::Result<(usize, Link, Via)> {
        let mut last = None;
        if let Some(s) = &self.signal {
            match signaled::connect(s).await {
                Ok(link) => {
                    let path = link.path.as_ref().and_then(|p| p.get());
                    return Ok((start, link, Via::Volunteer { path }));
                }
                Err(e) => {
                    tracing::warn!(signal = %s.url, error = %e, "no volunteer through the signaling service");
                    last = Some(e.to_string());
                }
            }
        }
        for i in 0..self.relays.len() {
            let idx = (start + i) % self.relays.len();
            match Link::connect(self.relays[idx].clone()).await {
                Ok(l) => return Ok((idx, l, Via::Relay { url: self.relays[idx].url.clone() })),
                Err(e) => {
                    tracing::warn!(relay = %self.relays[idx].url, error = %e, "relay unavailable");
                    last = Some(e.to_string());
                }
            }
        }
        Err(anyhow::anyhow!("no relay reachable: {}", last.unwrap_or_default()))
    }
}

/// Moves the QUIC connection to another volunteer or relay whenever the current link dies.
async fn supervise(
    consumer: Arc<Consumer>,
    sources: Sources,
    mut current: usize,
    via: tokio::sync::watch::Sender<Via>,
) {
    let mut attempt = 0u32;
    loop {
        consumer.link_down.notified().await;
        loop {
            if consumer.connection.close_reason().is_some() {
                return;
            }
            match sources.connect_any(current + 1).await {
                Ok((idx, link, how)) => match consumer.attach(link).await {
                    Ok(()) => {
                        tracing::info!(via = %how, "consumer failed over");
                        let _ = via.send(how);
                        current = idx;
                        attempt = 0;
                        break;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot attach to relay"),
                },
                Err(e) => tracing::warn!(error = %e, "failover failed"),
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis((100u64 << attempt.min(8)).min(10_000))).await;
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Socks,
    Http,
}

async fn serve(listener: TcpListener, consumer: Arc<Consumer>, kind: Kind) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let consumer = consumer.clone();
        tokio::spawn(async move {
            let r = match kind {
                Kind::Socks => socks(stream, &consumer).await,
                Kind::Http => http_connect(stream, &consumer).await,
            };
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "proxy connection ended");
            }
        });
    }
}

fn socks_reply_code(e: &ProxyError) -> u8 {
    match e {
        ProxyError::Refused { status, .. } => match *status {
            ProxyStatus::POLICY_REFUSED => 0x02,
            ProxyStatus::DNS_FAILED => 0x04,
            ProxyStatus::CONNECTION_REFUSED => 0x05,
            ProxyStatus::TIMEOUT => 0x06,
            ProxyStatus::UNREACHABLE => 0x03,
            _ => 0x01,
        },
        _ => 0x01,
    }
}

/// RFC 1928 CONNECT with no authentication. Domain names go to the egress unresolved.
async fn socks(mut s: TcpStream, consumer: &Consumer) -> anyhow::Result<()> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await?;
    anyhow::ensure!(head[0] == 5, "not SOCKS5");
    let mut methods = vec![0u8; usize::from(head[1])];
    s.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        s.write_all(&[5, 0xff]).await?;
        anyhow::bail!("client offers no acceptable auth method");
    }
    s.write_all(&[5, 0]).await?;
    let mut req = [0u8; 4];
    s.read_exact(&mut req).await?;
    let host = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            s.read_exact(&mut a).await?;
            Ipv4Addr::from(a).to_string()
        }
        3 => {
            let n = s.read_u8().await?;
            let mut name = vec![0u8; usize::from(n)];
            s.read_exact(&mut name).await?;
            String::from_utf8(name)?
        }
        4 => {
            let mut a = [0u8; 16];
            s.read_exact(&mut a).await?;
            Ipv6Addr::from(a).to_string()
        }
        _ => {
            s.write_all(&[5, 8, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
            anyhow::bail!("unsupported address type");
        }
    };
    let port = s.read_u16().await?;
    if req[1] != 1 {
        s.write_all(&[5, 7, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
        anyhow::bail!("only CONNECT is supported");
    }
    match consumer.open(&host, port).await {
        Ok((send, recv)) => {
            s.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
            splice(s, send, recv, Vec::new()).await
        }
        Err(e) => {
            tracing::info!(%host, port, error = %e, "proxy request refused");
            s.write_all(&[5, socks_reply_code(&e), 0, 1, 0, 0, 0, 0, 0, 0]).await?;
            Ok(())
        }
    }
}

/// HTTP CONNECT (what `curl --proxy http://…` and browsers use for HTTPS).
async fn http_connect(mut s: TcpStream, consumer: &Consumer) -> anyhow::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        anyhow::ensure!(buf.len() < 16 * 1024, "request head too large");
        let mut chunk = [0u8; 2048];
        let n = s.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed before the request head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    if method != "CONNECT" {
        s.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nAllow: CONNECT\r\nContent-Length: 0\r\n\r\n").await?;
        return Ok(());
    }
    let Some((host, port)) = target.rsplit_once(':').and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?))) else {
        s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n").await?;
        return Ok(());
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match consumer.open(host, port).await {
        Ok((send, recv)) => {
            s.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await?;
            splice(s, send, recv, buf[end..].to_vec()).await
        }
        Err(e) => {
            let (status, label) = match &e {
                ProxyError::Refused { status, .. } if *status == ProxyStatus::POLICY_REFUSED => {
                    ("403 Forbidden", status.label())
                }
                ProxyError::Refused { status, .. } => ("502 Bad Gateway", status.label()),
                _ => ("502 Bad Gateway", "tunnel"),
            };
            let body = format!("{e}\n");
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nX-Broflake-Status: {label}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(resp.as_bytes()).await?;
            Ok(())
        }
    }
}

async fn splice(
    s: TcpStream,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    early: Vec<u8>,
) -> anyhow::Result<()> {
    let (mut r, mut w) = s.into_split();
    let up = async {
        if !early.is_empty() {
            send.write_all(&early).await?;
        }
        broflake_tunnel::stream::tcp_to_quic(&mut r, &mut send).await
    };
    let down = broflake_tunnel::stream::quic_to_tcp(&mut recv, &mut w);
    let (a, b) = tokio::join!(up, down);
    a.and(b).map(drop).map_err(anyhow::Error::from)
}
