//! QUIC settings both ends must agree on, and certificate pinning.

use std::sync::Arc;
use std::time::Duration;

/// UDP payload size used on every path. Fixed: the tunnel runs over TCP, so path MTU
/// discovery would only probe the WebSocket hop's framing, never a real link. A DATA frame
/// carrying a full packet stays far below the smallest allowed `max_frame_size` (1500).
pub const MTU: u16 = 1350;

/// Transport settings shared by the egress and consumers.
pub fn transport(
    max_bidi_streams: u32,
    idle_timeout: Duration,
    keep_alive: Option<Duration>,
) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.initial_mtu(MTU);
    t.min_mtu(MTU);
    t.mtu_discovery_config(None);
    t.max_concurrent_bidi_streams(max_bidi_streams.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.max_idle_timeout(Some(idle_timeout.try_into().expect("idle timeout in range")));
    t.keep_alive_interval(keep_alive);
    // Loopback and relay links have large bandwidth-delay products relative to the defaults.
    t.stream_receive_window((8u32 << 20).into());
    t.receive_window((32u32 << 20).into());
    t.send_window(32 << 20);
    t
}

/// The endpoint configuration: UDP payload capped at the fixed MTU.
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut c = quinn::EndpointConfig::default();
    c.max_udp_payload_size(MTU).expect("valid payload size");
    c
}

/// Lower-case hex SHA-256 of a DER certificate (what the egress prints and clients pin).
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}

/// A rustls verifier that accepts exactly one certificate, by SHA-256 of its DER encoding.
/// Signatures are still checked, so possession of the key is proven.
#[derive(Debug)]
pub struct PinnedCert {
    sha256: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedCert {
    /// Parses a hex fingerprint (64 hex digits, `:` separators allowed).
    pub fn new(fingerprint_hex: &str) -> Result<Arc<Self>, String> {
        let clean: String = fingerprint_hex.chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(&clean).map_err(|e| format!("bad certificate fingerprint: {e}"))?;
        let sha256: [u8; 32] =
            bytes.try_into().map_err(|_| "certificate fingerprint must be 32 bytes of SHA-256".to_string())?;
        Ok(Arc::new(PinnedCert { sha256, provider: Arc::new(rustls::crypto::ring::default_provider()) }))
    }
}

impl rustls::client::danger::ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use sha2::Digest;
        if sha2::Sha256::digest(end_entity.as_ref()).as_slice() == self.sha256 {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("server certificate does not match the pinned SHA-256".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
