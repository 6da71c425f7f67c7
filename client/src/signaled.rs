//! A consumer's link through a volunteer found by the signaling service: gather, offer, get
//! matched and answered, open the DataChannel pair, then the Broflake handshake over it.

use crate::link::{Link, LinkConfig};
use crate::pipe::Pipe;
use crate::transport::TlsMode;
use crate::volunteer::{connect_signal, ice_servers};
use anyhow::{bail, Context, Result};
use broflake_proto::Role;
use broflake_rtc::{IceServer, Peer, RtcConfig};
use broflake_signal::client::{ConsumerEvent, ConsumerRequest};
use std::net::IpAddr;
use std::time::Duration;

/// A signaling service to find volunteers through.
#[derive(Debug, Clone)]
pub struct SignalSource {
    /// `ws[s]://host:port/v1/signal`.
    pub url: String,
    pub tls: TlsMode,
    /// STUN/TURN servers; empty: those the signaling service hands out.
    pub ice_servers: Vec<IceServer>,
    /// Local IP for the WebRTC socket (default: the one that routes to the ICE servers).
    pub bind: Option<IpAddr>,
    /// Offer only relayed candidates (always through TURN).
    pub relay_only: bool,
    /// Signaling, ICE, DTLS and SCTP must complete within this.
    pub timeout: Duration,
    /// The Broflake link's settings (PING interval, limits).
    pub link: LinkConfig,
}

impl SignalSource {
    pub fn new(url: impl Into<String>) -> Self {
        let url = url.into();
        let mut link = LinkConfig::new(format!("webrtc via {url}"));
        link.client.role = Role::CONSUMER;
        SignalSource {
            url,
            tls: TlsMode::default(),
            ice_servers: Vec::new(),
            bind: None,
            relay_only: false,
            timeout: Duration::from_secs(20),
            link,
        }
    }
}

/// Finds a volunteer and returns an open link through it.
pub async fn connect(src: &SignalSource) -> Result<Link> {
    let conn = connect_signal(&src.url, &src.tls).await?;
    let ice = if src.ice_servers.is_empty() { ice_servers(&conn.ice_servers) } else { src.ice_servers.clone() };
    let cfg = RtcConfig { ice_servers: ice, bind: src.bind, relay_only: src.relay_only, ..RtcConfig::default() };
    let peer = Peer::offer(&cfg).await.context("cannot set up WebRTC")?;
    let mut req = ConsumerRequest::start(conn, &peer.sdp, src.timeout).await?;
    let signal = req.sender();
    let sink = peer.candidate_sink();
    // The answer first (candidates that come before it wait), then trickled candidates
    // while the connection forms.
    let mut early = Vec::new();
    let answer = tokio::time::timeout(src.timeout, async {
        loop {
            match req.events.recv().await {
                Some(ConsumerEvent::Answer { sdp }) => return Ok(sdp),
                Some(ConsumerEvent::Candidate(c)) => early.push(c.candidate),
                Some(ConsumerEvent::Cancel { reason }) | Some(ConsumerEvent::Closed { reason }) => {
                    bail!("the volunteer did not answer: {reason}")
                }
                None => bail!("signaling ended before an answer"),
            }
        }
    })
    .await
    .context("no answer from a volunteer in time")??;
    peer.set_answer(&answer).await?;
    for c in early {
        sink.add(&c).await;
    }
    let trickle = tokio::spawn(async move {
        while let Some(ev) = req.events.recv().await {
            match ev {
                ConsumerEvent::Candidate(c) => sink.add(&c.candidate).await,
                ConsumerEvent::Cancel { .. } | ConsumerEvent::Closed { .. } => break,
                ConsumerEvent::Answer { .. } => {}
            }
        }
    });
    let pipe = peer.connected(src.timeout).await;
    trickle.abort();
    let pipe = pipe?;
    // The service can forget the session now.
    signal.done().await;
    if let Some(p) = pipe.path() {
        tracing::info!(relayed = p.relayed(), "connected to a volunteer over WebRTC");
        tracing::debug!(path = %p, "WebRTC path");
    }
    Ok(Link::over(Pipe::Rtc(pipe), src.link.clone()).await?)
}
