//! STUN and TURN servers, given as WebRTC's `RTCIceServer` (URLs, username, credential).

use std::net::SocketAddr;

/// One server entry, as the signaling service hands it out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IceServer {
    pub urls: Vec<String>,
    pub username: String,
    pub credential: String,
}

/// A resolved server this implementation can use: STUN, or TURN over UDP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Server {
    Stun(SocketAddr),
    Turn { addr: SocketAddr, username: String, credential: String },
}

/// Why a URL was skipped (logged; other servers are still used).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("{0}: not a stun: or turn: URL")]
    Scheme(String),
    #[error("{0}: only UDP TURN is supported (turns: and transport=tcp are not)")]
    Transport(String),
    #[error("{0}: a TURN server needs a username and a credential")]
    Credentials(String),
    #[error("{0}: cannot resolve the host: {1}")]
    Resolve(String, String),
}

/// `host:port` of a stun:/turn: URL (default port 3478), and whether it asks for TCP.
fn host_port(rest: &str) -> (String, bool) {
    let (hp, query) = rest.split_once('?').unwrap_or((rest, ""));
    let tcp = query.split('&').any(|kv| kv.eq_ignore_ascii_case("transport=tcp"));
    let hp = if hp.starts_with('[') {
        if hp.contains("]:") {
            hp.to_string()
        } else {
            format!("{hp}:3478")
        }
    } else if hp.contains(':') {
        hp.to_string()
    } else {
        format!("{hp}:3478")
    };
    (hp, tcp)
}

/// Resolves every usable URL of `servers`; unusable ones come back as errors.
pub async fn resolve(servers: &[IceServer]) -> (Vec<Server>, Vec<UrlError>) {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for s in servers {
        for url in &s.urls {
            let (turn, rest) = if let Some(r) = url.strip_prefix("stun:") {
                (false, r)
            } else if let Some(r) = url.strip_prefix("turn:") {
                (true, r)
            } else if url.starts_with("turns:") || url.starts_with("stuns:") {
                bad.push(UrlError::Transport(url.clone()));
                continue;
            } else {
                bad.push(UrlError::Scheme(url.clone()));
                continue;
            };
            let (hp, tcp) = host_port(rest);
            if tcp {
                bad.push(UrlError::Transport(url.clone()));
                continue;
            }
            if turn && (s.username.is_empty() || s.credential.is_empty()) {
                bad.push(UrlError::Credentials(url.clone()));
                continue;
            }
            let addr = match tokio::net::lookup_host(hp.as_str()).await {
                Ok(mut a) => match a.find(SocketAddr::is_ipv4) {
                    Some(a) => a,
                    None => {
                        bad.push(UrlError::Resolve(url.clone(), "no IPv4 address".into()));
                        continue;
                    }
                },
                Err(e) => {
                    bad.push(UrlError::Resolve(url.clone(), e.to_string()));
                    continue;
                }
            };
            ok.push(if turn {
                Server::Turn { addr, username: s.username.clone(), credential: s.credential.clone() }
            } else {
                Server::Stun(addr)
            });
        }
    }
    (ok, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urls_are_resolved_or_refused_with_a_reason() {
        let servers = vec![
            IceServer { urls: vec!["stun:127.0.0.1".into(), "stun:127.0.0.2:3479".into()], ..Default::default() },
            IceServer {
                urls: vec!["turn:127.0.0.1:3478?transport=udp".into(), "turn:127.0.0.1?transport=tcp".into()],
                username: "u".into(),
                credential: "p".into(),
            },
            IceServer { urls: vec!["turn:127.0.0.1".into(), "http://x".into()], ..Default::default() },
        ];
        let (ok, bad) = resolve(&servers).await;
        assert_eq!(
            ok,
            vec![
                Server::Stun("127.0.0.1:3478".parse().unwrap()),
                Server::Stun("127.0.0.2:3479".parse().unwrap()),
                Server::Turn { addr: "127.0.0.1:3478".parse().unwrap(), username: "u".into(), credential: "p".into() },
            ]
        );
        assert_eq!(bad.len(), 3, "{bad:?}");
    }
}
