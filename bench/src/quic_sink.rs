//! The QUIC anchor of the tunnel bench: quinn over plain loopback UDP with the tunnel's transport
//! and endpoint settings (broflake_tunnel::settings), one process serving, the bench driving.
//!
//! On each bidirectional stream the client sends `D` or `U` and a big-endian u64 length:
//! `D` → the server writes that many bytes and finishes; `U` → the client writes that many
//! bytes and finishes, the server reads them all and answers one byte.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

const ALPN: &[u8] = b"broflake-bench";
const CHUNK: usize = 64 << 10;

fn transport() -> Arc<quinn::TransportConfig> {
    Arc::new(broflake_tunnel::settings::transport(
        16,
        Duration::from_secs(30),
        None,
        broflake_tunnel::settings::MAX_MTU,
    ))
}

/// Serves until killed; prints `quic sink listening on ADDR` on stderr.
pub fn serve() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport());
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let endpoint = quinn::Endpoint::new(
            broflake_tunnel::settings::endpoint_config(broflake_tunnel::settings::MAX_MTU),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        eprintln!("quic sink listening on {}", endpoint.local_addr()?);
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(serve_stream(send, recv));
                }
            });
        }
        anyhow::Ok(())
    })
}

async fn serve_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> Result<()> {
    let mut head = [0u8; 9];
    recv.read_exact(&mut head).await?;
    let n = u64::from_be_bytes(head[1..].try_into().expect("8 bytes"));
    let mut buf = vec![0x5au8; CHUNK];
    if head[0] == b'D' {
        let mut left = n;
        while left > 0 {
            let k = left.min(CHUNK as u64) as usize;
            send.write_all(&buf[..k]).await?;
            left -= k as u64;
        }
    } else {
        while recv.read(&mut buf).await?.is_some() {}
        send.write_all(b"k").await?;
    }
    send.finish()?;
    let _ = send.stopped().await;
    Ok(())
}

/// A client endpoint on loopback with the tunnel's settings (the sink's certificate is not
/// checked: it is generated per run).
pub fn client_endpoint() -> Result<quinn::Endpoint> {
    let mut tls = broflake_client::transport::client_tls(&broflake_client::link::TlsMode::InsecureNoVerify, &[ALPN])?;
    tls.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport());
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut endpoint = quinn::Endpoint::new(
        broflake_tunnel::settings::endpoint_config(broflake_tunnel::settings::MAX_MTU),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// Moves `bytes` over one new stream, downloading or uploading.
pub async fn transfer(conn: &quinn::Connection, download: bool, bytes: u64) -> Result<()> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut head = [0u8; 9];
    head[0] = if download { b'D' } else { b'U' };
    head[1..].copy_from_slice(&bytes.to_be_bytes());
    send.write_all(&head).await?;
    let mut buf = vec![0x5au8; CHUNK];
    if download {
        send.finish()?;
        let mut got = 0u64;
        while let Some(n) = recv.read(&mut buf).await? {
            got += n as u64;
        }
        anyhow::ensure!(got == bytes, "quic sink sent {got} of {bytes} bytes");
    } else {
        let mut left = bytes;
        while left > 0 {
            let k = left.min(CHUNK as u64) as usize;
            send.write_all(&buf[..k]).await?;
            left -= k as u64;
        }
        send.finish()?;
        let mut ack = [0u8; 1];
        recv.read_exact(&mut ack).await.context("no acknowledgement from the quic sink")?;
    }
    Ok(())
}

/// Where the sink listens, parsed from its line.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    line.rsplit(' ').next()?.parse().ok()
}
