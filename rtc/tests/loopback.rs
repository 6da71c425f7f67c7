//! Two peers on loopback (host candidates only): offer, answer, both channels open, messages
//! both ways on each, and the selected path is host ↔ host.

use broflake_rtc::{CandidateKind, Peer, RtcConfig};
use bytes::Bytes;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_open_both_channels_and_exchange_messages() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_default())
        .with_test_writer()
        .try_init();
    let cfg = RtcConfig::default();
    let start = Instant::now();
    let a = Peer::offer(&cfg).await.unwrap();
    assert!(a.sdp.starts_with("v=0"), "{}", a.sdp);
    assert!(a.candidates.iter().any(|c| c.contains("typ host")), "{:?}", a.candidates);
    let b = Peer::answer(&cfg, &a.sdp).await.unwrap();
    a.set_answer(&b.sdp).await.unwrap();
    let (pa, pb) = tokio::join!(a.connected(Duration::from_secs(10)), b.connected(Duration::from_secs(10)));
    let (mut pa, mut pb) = (pa.unwrap(), pb.unwrap());
    eprintln!("both channels open after {:?}", start.elapsed());
    assert!(pa.tx.send_control(Bytes::from_static(b"hello")).await);
    assert_eq!(pb.rx.recv().await.unwrap(), Bytes::from_static(b"hello"));
    assert!(pb.tx.send_data(Bytes::from(vec![7u8; 1300])));
    assert_eq!(pa.rx.recv().await.unwrap().len(), 1300);
    // Many datagrams on the unreliable channel: most arrive (the rest may be lost in a full
    // socket buffer, as UDP datagrams are; QUIC above recovers them).
    for i in 0..200u16 {
        let _ = pa.tx.send_data(Bytes::from(i.to_be_bytes().repeat(600)));
        if i % 10 == 9 {
            // Paced, as QUIC paces its packets.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let mut got = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(500), pb.rx.recv()).await {
        got += 1;
    }
    assert!(got >= 190, "{got} of 200 arrived");
    eprintln!("{got} of 200 unreliable messages arrived");
    let path = pa.path().expect("a selected path");
    assert_eq!((path.local, path.remote), (CandidateKind::Host, CandidateKind::Host), "{path}");
    // Dropping one side ends the other's pipe.
    drop(pa);
    let t = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), async { while pb.rx.recv().await.is_some() {} }).await;
    assert!(end.is_ok(), "the other side hears the close at once");
    eprintln!("the peer saw the close after {:?}", t.elapsed());
}
