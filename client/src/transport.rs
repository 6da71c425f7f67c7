//! TCP (+ TLS) streams for WebSocket clients.

use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A byte stream a WebSocket can run on.
pub trait IoStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> IoStream for T {}

pub type BoxStream = Box<dyn IoStream>;

/// How to authenticate a wss:// server.
#[derive(Debug, Clone, Default)]
pub enum TlsMode {
    /// Trust exactly the certificate with this SHA-256 (hex), as printed by the egress.
    Pinned(String),
    /// Trust certificates issued by the CA(s) in this PEM file.
    CaFile(PathBuf),
    /// No certificate check at all. Tests and diagnostics only.
    #[default]
    InsecureNoVerify,
}

/// rustls client configuration for a TLS mode and ALPN list.
pub fn client_tls(mode: &TlsMode, alpn: &[&[u8]]) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let mut config = match mode {
        TlsMode::Pinned(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(
                broflake_tunnel::settings::PinnedCert::new(fp).map_err(anyhow::Error::msg)?,
            )
            .with_no_client_auth(),
        TlsMode::CaFile(path) => {
            let pem = std::fs::read(path)?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile_certs(&pem)? {
                roots.add(cert)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        TlsMode::InsecureNoVerify => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider))).with_no_client_auth()
        }
    };
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(config)
}

fn rustls_pemfile_certs(pem: &[u8]) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(pem).collect::<Result<_, _>>()?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in the CA file");
    Ok(certs)
}

#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Opens the TCP (and for wss://, TLS) stream for a ws:// or wss:// URL.
pub async fn connect_stream(host: &str, port: u16, tls: Option<&TlsMode>) -> anyhow::Result<BoxStream> {
    let tcp = TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    match tls {
        None => Ok(Box::new(tcp)),
        Some(mode) => {
            let config = client_tls(mode, &[b"http/1.1"])?;
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let name = rustls::pki_types::ServerName::try_from(host.to_string())?;
            Ok(Box::new(connector.connect(name, tcp).await?))
        }
    }
}
