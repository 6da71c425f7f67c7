//! Certificates: loaded from PEM files, or a self-signed one generated on first run and
//! kept in the state directory so that its fingerprint (which clients pin) survives restarts.

use anyhow::{Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

use crate::config::Config;

/// The egress's identity: certificate chain and key.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Whether it was generated (self-signed) rather than configured.
    pub generated: bool,
}

impl Identity {
    /// SHA-256 of the leaf certificate, lower-case hex: what clients pin.
    pub fn fingerprint(&self) -> String {
        broflake_tunnel::settings::fingerprint(self.chain[0].as_ref())
    }

    pub fn load(config: &Config) -> Result<Identity> {
        match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) => Ok(Identity { chain: read_chain(cert)?, key: read_key(key)?, generated: false }),
            _ => self_signed(&config.state_dir(), &config.tls.names),
        }
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// rustls config for wss:// listeners.
    pub fn wss_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let mut c = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key())
            .context("certificate and key do not match")?;
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(c))
    }

    /// rustls config for the tunnelled QUIC (TLS 1.3, the proxy ALPN).
    pub fn quic_config(&self) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>> {
        let mut c = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key())
            .context("certificate and key do not match")?;
        c.alpn_protocols = vec![broflake_proto::proxy::ALPN.to_vec()];
        c.max_early_data_size = 0;
        Ok(Arc::new(quinn::crypto::rustls::QuicServerConfig::try_from(c)?))
    }
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read certificate {}", path.display()))?;
    let chain: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad PEM in {}", path.display()))?;
    anyhow::ensure!(!chain.is_empty(), "no certificate in {}", path.display());
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read key {}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("bad PEM in {}", path.display()))?
        .with_context(|| format!("no private key in {}", path.display()))
}

fn self_signed(dir: &Path, names: &[String]) -> Result<Identity> {
    let cert = dir.join("self-signed-cert.pem");
    let key = dir.join("self-signed-key.pem");
    if cert.exists() && key.exists() {
        return Ok(Identity { chain: read_chain(&cert)?, key: read_key(&key)?, generated: true });
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create state directory {}", dir.display()))?;
    let mut sans = vec!["localhost".to_string()];
    sans.extend(names.iter().cloned());
    let generated = rcgen::generate_simple_self_signed(sans).context("cannot generate a certificate")?;
    write_private(&key, generated.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(&cert, generated.cert.pem()).with_context(|| format!("cannot write {}", cert.display()))?;
    tracing::info!(cert = %cert.display(), "generated a self-signed certificate");
    Ok(Identity { chain: read_chain(&cert)?, key: read_key(&key)?, generated: true })
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}
