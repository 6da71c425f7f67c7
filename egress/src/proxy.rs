//! The proxy: each bidirectional QUIC stream carries one request (PROTOCOL.md §14). The
//! egress resolves the destination, checks every address against the policy, dials the
//! first allowed one, replies, then splices bytes both ways with backpressure.

use crate::metrics as m;
use crate::policy::Policy;
use broflake_proto::proxy::{ProxyReply, ProxyRequest, ProxyStatus, MAX_HOST_LEN};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Proxy settings.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub policy: Policy,
    pub connect_timeout: Duration,
    pub resolve_timeout: Duration,
    pub stats: Arc<crate::shared::Stats>,
}

/// Accepts tunnelled QUIC connections until the endpoint closes.
pub async fn serve(endpoint: quinn::Endpoint, settings: Arc<ProxySettings>) {
    while let Some(incoming) = endpoint.accept().await {
        let settings = settings.clone();
        tokio::spawn(async move {
            match incoming.await {
                Ok(conn) => connection(conn, settings).await,
                Err(e) => tracing::debug!(error = %e, "QUIC handshake failed"),
            }
        });
    }
}

async fn connection(conn: quinn::Connection, settings: Arc<ProxySettings>) {
    metrics::counter!(m::QUIC_CONNECTIONS_TOTAL).increment(1);
    settings.stats.quic_connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    metrics::gauge!(m::QUIC_CONNECTIONS).increment(1.0);
    let mut path = conn.remote_address();
    tracing::debug!(id = conn.stable_id(), %path, "QUIC connection");
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(id = conn.stable_id(), reason = %e, "QUIC connection ended");
                break;
            }
        };
        let now = conn.remote_address();
        if now != path {
            metrics::counter!(m::QUIC_MIGRATIONS).increment(1);
            settings.stats.quic_migrations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(id = conn.stable_id(), from = %path, to = %now, "QUIC connection migrated");
            path = now;
        }
        metrics::counter!(m::QUIC_STREAMS).increment(1);
        tokio::spawn(stream(send, recv, settings.clone()));
    }
    metrics::gauge!(m::QUIC_CONNECTIONS).decrement(1.0);
}

/// The outcome of resolving and dialling a request.
#[derive(Debug)]
struct Refusal(ProxyStatus, String);

async fn reply(send: &mut quinn::SendStream, status: ProxyStatus, reason: &str) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(reason.len() + 3);
    ProxyReply { status, reason }.encode(&mut out);
    send.write_all(&out).await?;
    Ok(())
}

async fn stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, settings: Arc<ProxySettings>) {
    // Read exactly one request; what follows it already belongs to the destination.
    let mut buf = Vec::with_capacity(64);
    let (host, port, used) = loop {
        match ProxyRequest::decode(&buf) {
            Ok(Some((req, used))) => break (req.host.to_owned(), req.port, used),
            Ok(None) if buf.len() < MAX_HOST_LEN + 16 => {}
            Ok(None) | Err(_) => {
                let _ = reply(&mut send, ProxyStatus::BAD_REQUEST, "malformed proxy request").await;
                let _ = send.finish();
                metrics::counter!(m::PROXY_DIALS, "result" => "bad_request").increment(1);
                return;
            }
        }
        let mut chunk = [0u8; 512];
        match recv.read(&mut chunk).await {
            Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
            _ => {
                let _ = reply(&mut send, ProxyStatus::BAD_REQUEST, "stream ended before the request").await;
                let _ = send.finish();
                metrics::counter!(m::PROXY_DIALS, "result" => "bad_request").increment(1);
                return;
            }
        }
    };
    let early = buf.split_off(used);
    let tcp = match dial(&host, port, &settings).await {
        Ok(tcp) => tcp,
        Err(Refusal(status, reason)) => {
            tracing::debug!(%host, port, status = status.label(), %reason, "proxy request refused");
            metrics::counter!(m::PROXY_DIALS, "result" => status.label()).increment(1);
            settings.stats.proxy_refusals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = reply(&mut send, status, &reason).await;
            let _ = send.finish();
            return;
        }
    };
    metrics::counter!(m::PROXY_DIALS, "result" => "ok").increment(1);
    if reply(&mut send, ProxyStatus::OK, "").await.is_err() {
        return;
    }
    splice(tcp, send, recv, early).await;
}

async fn dial(host: &str, port: u16, s: &ProxySettings) -> Result<TcpStream, Refusal> {
    dial_with(
        host,
        port,
        s,
        |host, port| async move { tokio::net::lookup_host((host, port)).await.map(|a| a.collect()) },
    )
    .await
}

/// Resolves once (`FnOnce`: a name is never looked up again between check and dial, so a
/// DNS answer that changes — rebinding — cannot swap a checked address for a forbidden
/// one), checks every address, and dials only addresses that passed.
async fn dial_with<R, F>(host: &str, port: u16, s: &ProxySettings, resolve: R) -> Result<TcpStream, Refusal>
where
    R: FnOnce(String, u16) -> F,
    F: std::future::Future<Output = std::io::Result<Vec<SocketAddr>>>,
{
    let literal = host.parse::<IpAddr>().ok();
    let addrs: Vec<SocketAddr> = match literal {
        Some(ip) => vec![SocketAddr::new(ip, port)],
        None => {
            let lookup = tokio::time::timeout(s.resolve_timeout, resolve(host.to_string(), port)).await;
            match lookup {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => return Err(Refusal(ProxyStatus::DNS_FAILED, format!("cannot resolve {host}: {e}"))),
                Err(_) => return Err(Refusal(ProxyStatus::DNS_FAILED, format!("resolving {host} timed out"))),
            }
        }
    };
    if addrs.is_empty() {
        return Err(Refusal(ProxyStatus::DNS_FAILED, format!("{host} has no addresses")));
    }
    let mut first_refusal = None;
    let allowed: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| match s.policy.check(a.ip()) {
            Ok(()) => true,
            Err(why) => {
                first_refusal.get_or_insert((a.ip(), why));
                false
            }
        })
        .collect();
    if allowed.is_empty() {
        let (ip, why) = first_refusal.expect("some address was refused");
        let reason = if literal.is_some() {
            format!("destination {ip} is {}", why.describe())
        } else {
            format!("destination {host} resolves to {ip}, {}", why.describe())
        };
        return Err(Refusal(ProxyStatus::POLICY_REFUSED, reason));
    }
    let mut last = Refusal(ProxyStatus::UNREACHABLE, format!("cannot reach {host}"));
    for addr in allowed {
        match tokio::time::timeout(s.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                last = Refusal(ProxyStatus::CONNECTION_REFUSED, format!("{addr} refused the connection"));
            }
            Ok(Err(e)) => last = Refusal(ProxyStatus::UNREACHABLE, format!("cannot reach {addr}: {e}")),
            Err(_) => last = Refusal(ProxyStatus::TIMEOUT, format!("connecting to {addr} timed out")),
        }
    }
    Err(last)
}

async fn splice(tcp: TcpStream, mut send: quinn::SendStream, mut recv: quinn::RecvStream, early: Vec<u8>) {
    let (mut tcp_r, mut tcp_w) = tcp.into_split();
    let up = async {
        if !early.is_empty() {
            tcp_w.write_all(&early).await?;
        }
        let n = broflake_tunnel::stream::quic_to_tcp(&mut recv, &mut tcp_w).await?;
        Ok::<u64, std::io::Error>(early.len() as u64 + n)
    };
    let down = broflake_tunnel::stream::tcp_to_quic(&mut tcp_r, &mut send);
    // Each direction is counted as soon as it ends (the other may stay open for long).
    let up = async {
        let r = up.await;
        if let Ok(n) = r {
            metrics::counter!(m::PROXY_BYTES, "direction" => "upstream").increment(n);
        }
        r
    };
    let down = async {
        let r = down.await;
        if let Ok(n) = r {
            metrics::counter!(m::PROXY_BYTES, "direction" => "downstream").increment(n);
        }
        r
    };
    let (u, d) = tokio::join!(up, down);
    if d.is_err() {
        let _ = send.reset(0u32.into());
    }
    if u.is_err() {
        let _ = recv.stop(0u32.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn settings(allow: &[&str]) -> ProxySettings {
        ProxySettings {
            policy: Policy::new(true, allow.iter().map(|a| a.parse().unwrap()).collect()),
            connect_timeout: Duration::from_secs(2),
            resolve_timeout: Duration::from_secs(2),
            stats: Default::default(),
        }
    }

    /// A name server that answers differently each time it is asked (DNS rebinding).
    struct Rebinding {
        answers: Mutex<Vec<Vec<SocketAddr>>>,
        asked: Mutex<u32>,
    }

    impl Rebinding {
        fn new(answers: Vec<Vec<SocketAddr>>) -> Arc<Self> {
            Arc::new(Rebinding { answers: Mutex::new(answers), asked: Mutex::new(0) })
        }
        fn resolver(
            self: &Arc<Self>,
        ) -> impl FnOnce(String, u16) -> std::future::Ready<std::io::Result<Vec<SocketAddr>>> {
            let me = self.clone();
            move |_, _| {
                *me.asked.lock().unwrap() += 1;
                std::future::ready(Ok(me.answers.lock().unwrap().remove(0)))
            }
        }
    }

    #[tokio::test]
    async fn names_that_resolve_to_forbidden_addresses_are_refused() {
        let s = settings(&[]);
        // The system resolver: localhost is loopback whatever order the answers come in.
        let Err(Refusal(status, reason)) = dial("localhost", 80, &s).await else { panic!("localhost was dialled") };
        assert_eq!(status, ProxyStatus::POLICY_REFUSED);
        assert!(reason.starts_with("destination localhost resolves to "), "{reason}");
        assert!(reason.ends_with("a loopback address"), "{reason}");
        // Any name whose every answer is internal.
        for (ip, why) in [
            ("169.254.169.254", "a cloud metadata address"),
            ("fd00:ec2::254", "a cloud metadata address"),
            ("10.0.0.7", "a private address"),
            ("::ffff:192.168.1.1", "a private address"),
            ("fe80::1", "a link-local address"),
        ] {
            let dns = Rebinding::new(vec![vec![SocketAddr::new(ip.parse().unwrap(), 80)]]);
            let Err(Refusal(status, reason)) = dial_with("evil.example", 80, &s, dns.resolver()).await else {
                panic!("{ip} was dialled")
            };
            assert_eq!(status, ProxyStatus::POLICY_REFUSED);
            assert_eq!(reason, format!("destination evil.example resolves to {ip}, {why}"));
        }
    }

    #[tokio::test]
    async fn forbidden_answers_are_never_dialled_and_a_name_is_resolved_once() {
        // The allowed destination: 127.0.0.2 only (allowlisted); 127.0.0.1 stays forbidden.
        let allowed = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
        let port = allowed.local_addr().unwrap().port();
        let forbidden = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let s = settings(&["127.0.0.2/32"]);
        let good = SocketAddr::from(([127, 0, 0, 2], port));
        let bad = SocketAddr::from(([127, 0, 0, 1], port));

        // Mixed answers, the forbidden one first: only the allowed one is dialled.
        let dns = Rebinding::new(vec![vec![bad, good]]);
        let tcp = dial_with("mixed.example", port, &s, dns.resolver()).await.unwrap();
        assert_eq!(tcp.peer_addr().unwrap(), good);

        // Rebinding: the first answer is allowed, every later one points inside. The dial
        // uses the checked answer; the name server is asked once.
        let dns = Rebinding::new(vec![vec![good], vec![bad], vec![bad]]);
        let tcp = dial_with("rebind.example", port, &s, dns.resolver()).await.unwrap();
        assert_eq!(tcp.peer_addr().unwrap(), good);
        assert_eq!(*dns.asked.lock().unwrap(), 1);

        // Nothing ever reached the forbidden listener.
        let never = tokio::time::timeout(Duration::from_millis(200), forbidden.accept()).await;
        assert!(never.is_err(), "a forbidden address was dialled");
        drop(allowed);
    }
}
