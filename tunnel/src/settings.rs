//! QUIC settings both ends must agree on, and certificate pinning.

use std::sync::Arc;
use std::time::Duration;

/// The UDP payload size every hop carries: QUIC starts at it and never goes below it.
pub const BASE_MTU: u16 = broflake_proto::packet_size::BASE_PACKET_SIZE as u16;

/// The largest UDP payload a consumer probes for: what a DATA frame carries within the
/// default frame size limit (16,384), so a route of WebSocket hops on default settings runs at
/// this size. Path MTU discovery finds less where a hop carries less (a WebRTC data channel,
/// a smaller `max_frame_size`): the hop drops what does not fit (PROTOCOL.md §14.4).
pub const MAX_MTU: u16 = 16_372;

/// The largest UDP payload to probe for behind a hop whose frame limit is `max_frame_size`.
pub fn max_mtu_for_frame_limit(max_frame_size: u64) -> u16 {
    let packet = broflake_proto::packet_size::max_packet(usize::try_from(max_frame_size).unwrap_or(usize::MAX));
    // quinn's own bound on a UDP payload.
    packet.clamp(usize::from(BASE_MTU), 65_527) as u16
}

/// Transport settings shared by the egress and consumers. `max_mtu` bounds path MTU discovery.
pub fn transport(
    max_bidi_streams: u32,
    idle_timeout: Duration,
    keep_alive: Option<Duration>,
    max_mtu: u16,
) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.initial_mtu(BASE_MTU);
    t.min_mtu(BASE_MTU);
    // Each hop drops a DATA frame it cannot carry, which is what DPLPMTUD needs to see: a lost
    // probe. Larger packets amortise every per-packet cost (crypto set-up, ACKs, framing,
    // queueing) on every hop.
    let mut pmtud = quinn::MtuDiscoveryConfig::default();
    pmtud.upper_bound(max_mtu.max(BASE_MTU));
    t.mtu_discovery_config((max_mtu > BASE_MTU).then_some(pmtud));
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

/// The endpoint configuration: the largest UDP payload accepted (and announced to the peer
/// as `max_udp_payload_size`, so a peer that predates large packets never receives one).
pub fn endpoint_config(max_mtu: u16) -> quinn::EndpointConfig {
    let mut c = quinn::EndpointConfig::default();
    c.max_udp_payload_size(max_mtu.max(BASE_MTU)).expect("valid payload size");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_consumers_bound_is_what_a_default_hop_carries() {
        assert_eq!(max_mtu_for_frame_limit(broflake_proto::frame::DEFAULT_MAX_FRAME_SIZE as u64), MAX_MTU);
        assert_eq!(max_mtu_for_frame_limit(broflake_proto::frame::MIN_MAX_FRAME_SIZE), 1488);
        assert_eq!(max_mtu_for_frame_limit(1 << 20), 65_527);
    }
}
