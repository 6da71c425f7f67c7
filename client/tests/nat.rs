//! The WebRTC hop through real NATs: the consumer behind NAT A, volunteers behind NAT B
//! (nftables masquerade in router namespaces), coturn, the signaling service, the egress and
//! an HTTP server on the "public" segment; every program is the real binary.
//!
//! - endpoint-independent NATs: a direct path through the NATs (server-reflexive candidates);
//! - symmetric NATs on both sides: only the TURN relay gets through;
//! - a volunteer killed mid-download: the consumer gets another volunteer from the signaling
//!   service and its QUIC connection moves there; the download completes.
//!
//! Each downloads 64 MiB with real curl through the consumer's SOCKS proxy and checks its
//! SHA-256; both egress backends are used.

mod common;

use common::{body_of, kinds, start, BODY};
use std::time::{Duration, Instant};
use testkit::nat::NatKind;

fn download_through(tag: &str, kind: NatKind, backend: &str) -> Option<(String, String)> {
    let w = start(tag, kind, backend)?;
    let (_v, _vlog) = w.volunteer("volunteer");
    let t = Instant::now();
    let (_c, via) = w.consumer();
    let line = via.wait("via webrtc", Duration::from_secs(40));
    eprintln!("{tag}: consumer connected in {:?}: {line}", t.elapsed());
    let t = Instant::now();
    let (sha, n) = body_of(w.curl(None));
    let secs = t.elapsed().as_secs_f64();
    eprintln!("{tag}: {n} bytes in {secs:.2} s ({:.1} MB/s)", n as f64 / secs / 1e6);
    assert_eq!(n, BODY);
    assert_eq!(sha, w.sha, "the body arrived intact");
    let _ = std::fs::remove_dir_all(&w.dir);
    Some(kinds(&line))
}

#[test]
fn endpoint_independent_nats_give_a_direct_path_through_server_reflexive_candidates() {
    let Some((local, remote)) = download_through("e", NatKind::EndpointIndependent, "uring") else { return };
    assert_eq!(local, "host", "no relay on our side");
    assert_eq!(remote, "srflx", "the volunteer's NAT mapping, learned by STUN");
}

#[test]
fn symmetric_nats_fall_back_to_the_turn_relay() {
    let Some((local, remote)) = download_through("s", NatKind::Symmetric, "tokio") else { return };
    assert!(local == "relay" || remote == "relay", "a relayed candidate in the pair: local={local} remote={remote}");
}

#[test]
fn a_volunteer_killed_mid_download_is_replaced_and_the_quic_connection_moves() {
    let Some(w) = start("k", NatKind::EndpointIndependent, "uring") else { return };
    let (v1, log1) = w.volunteer("volunteer-1");
    let (c, via) = w.consumer();
    via.wait("via webrtc", Duration::from_secs(40));
    log1.wait("consumer connected over WebRTC", Duration::from_secs(10));
    let (_v2, log2) = w.volunteer("volunteer-2");
    // 64 MiB at 16 MB/s: about 4 s, so the kill after 1.5 s is mid-download.
    let curl = w.curl(Some("16M"));
    let reader = std::thread::spawn(move || body_of(curl));
    std::thread::sleep(Duration::from_millis(1500));
    drop(v1);
    let line = via.wait("via webrtc", Duration::from_secs(40));
    eprintln!("after the kill: {line}");
    log2.wait("consumer connected over WebRTC", Duration::from_secs(10));
    let (sha, n) = reader.join().expect("reader");
    assert_eq!(n, BODY);
    assert_eq!(sha, w.sha, "the body arrived intact across the failover");
    assert_eq!(w.metric("broflake_quic_connections_total"), 1.0, "one QUIC handshake: the connection migrated");
    drop(c);
}
