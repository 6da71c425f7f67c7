//! The WebRTC hop between a consumer and a volunteer: a DataChannel pair over ICE (host,
//! server-reflexive via STUN, relayed via TURN), driven on one tokio UDP socket around
//! `str0m` (sans-IO WebRTC) and `turn-client-proto` (sans-IO TURN).
//!
//! The hop carries the same Broflake messages as a WebSocket hop (docs/PROTOCOL.md §17):
//! - channel 0 `broflake` (reliable, ordered, negotiated out of band): every message that
//!   is not purely DATA (HELLO, WELCOME, PING, PONG, ROUTE_CLOSE, GOAWAY, ERROR…);
//! - channel 1 `broflake-data` (unordered, no retransmissions, negotiated out of band):
//!   messages of DATA frames only, one QUIC packet each. QUIC recovers its own losses and
//!   orders its own streams; a reliable, ordered channel under it would retransmit twice and
//!   stall every stream behind one lost packet.
//!
//! [`Peer::offer`] / [`Peer::answer`] gather candidates and produce the SDP;
//! [`Peer::connected`] waits until both channels are open and returns a [`DataPipe`].

mod driver;
pub mod ice_server;
pub mod stun;

pub use ice_server::IceServer;

use bytes::Bytes;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Channel ids and labels (negotiated out of band: both peers create them).
pub const CONTROL_ID: u16 = 0;
pub const DATA_ID: u16 = 1;
pub const CONTROL_LABEL: &str = "broflake";
pub const DATA_LABEL: &str = "broflake-data";

/// How a peer connects.
#[derive(Debug, Clone)]
pub struct RtcConfig {
    pub ice_servers: Vec<IceServer>,
    /// Local IP to bind (the host candidate). None: the address of the interface that routes
    /// to the first ICE server, or 127.0.0.1 without servers.
    pub bind: Option<IpAddr>,
    /// How long STUN and TURN get to answer while gathering.
    pub gather_timeout: Duration,
    /// Offer only relayed candidates (like `iceTransportPolicy: "relay"`).
    pub relay_only: bool,
}

impl Default for RtcConfig {
    fn default() -> Self {
        RtcConfig { ice_servers: Vec::new(), bind: None, gather_timeout: Duration::from_secs(3), relay_only: false }
    }
}

/// Why the hop could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RtcError {
    #[error("cannot open a UDP socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("bad SDP: {0}")]
    Sdp(String),
    #[error("WebRTC: {0}")]
    Rtc(String),
    #[error("no DataChannel within {0:?} (ICE/DTLS/SCTP did not complete)")]
    Timeout(Duration),
    #[error("the peer connection ended before its channels opened: {0}")]
    Closed(String),
}

/// The kind of an ICE candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CandidateKind {
    Host,
    Srflx,
    Prflx,
    Relay,
}

impl std::fmt::Display for CandidateKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CandidateKind::Host => "host",
            CandidateKind::Srflx => "srflx",
            CandidateKind::Prflx => "prflx",
            CandidateKind::Relay => "relay",
        })
    }
}

/// The candidate pair the hop's DTLS/SCTP traffic runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SelectedPath {
    pub local: CandidateKind,
    pub local_addr: SocketAddr,
    pub remote: CandidateKind,
    pub remote_addr: SocketAddr,
}

impl SelectedPath {
    /// Whether the path goes through a TURN relay on either side.
    pub fn relayed(&self) -> bool {
        self.local == CandidateKind::Relay || self.remote == CandidateKind::Relay
    }
}

impl std::fmt::Display for SelectedPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ↔ {} {}", self.local, self.local_addr, self.remote, self.remote_addr)
    }
}

enum Cmd {
    Answer(String, oneshot::Sender<Result<(), RtcError>>),
    Candidate(String),
    Send { data: bool, bytes: Bytes },
}

/// A peer connection being set up.
#[derive(Debug)]
pub struct Peer {
    /// The local SDP (offer or answer) with every gathered candidate in it.
    pub sdp: String,
    /// The gathered candidates as `candidate:` lines (for peers that want them trickled).
    pub candidates: Vec<String>,
    cmd: mpsc::Sender<Cmd>,
    open: oneshot::Receiver<Result<DataPipe, RtcError>>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cmd::Answer(..) => "Answer",
            Cmd::Candidate(_) => "Candidate",
            Cmd::Send { .. } => "Send",
        })
    }
}

impl Peer {
    /// Gathers candidates and creates an offer with both channels.
    pub async fn offer(cfg: &RtcConfig) -> Result<Peer, RtcError> {
        driver::start(cfg, None).await
    }

    /// Gathers candidates and answers `offer`.
    pub async fn answer(cfg: &RtcConfig, offer: &str) -> Result<Peer, RtcError> {
        driver::start(cfg, Some(offer)).await
    }

    /// The remote answer (offerer only).
    pub async fn set_answer(&self, sdp: &str) -> Result<(), RtcError> {
        let (tx, rx) = oneshot::channel();
        self.cmd.send(Cmd::Answer(sdp.to_owned(), tx)).await.map_err(|_| RtcError::Closed("driver gone".into()))?;
        rx.await.map_err(|_| RtcError::Closed("driver gone".into()))?
    }

    /// A trickled remote candidate (`candidate:…`; an empty one ends the trickle).
    pub async fn add_remote_candidate(&self, candidate: &str) {
        if !candidate.is_empty() {
            let _ = self.cmd.send(Cmd::Candidate(candidate.to_owned())).await;
        }
    }

    /// A handle that adds trickled remote candidates while [`Peer::connected`] waits.
    pub fn candidate_sink(&self) -> CandidateSink {
        CandidateSink(self.cmd.clone())
    }

    /// Waits until both channels are open (ICE, DTLS and SCTP done).
    pub async fn connected(self, timeout: Duration) -> Result<DataPipe, RtcError> {
        let cmd = self.cmd;
        let r = tokio::time::timeout(timeout, self.open).await;
        drop(cmd);
        match r {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(RtcError::Closed("driver gone".into())),
            Err(_) => Err(RtcError::Timeout(timeout)),
        }
    }
}

/// Adds trickled remote candidates to a peer being set up. Drop it once the peer is
/// connected: it keeps the peer's task alive.
#[derive(Debug, Clone)]
pub struct CandidateSink(mpsc::Sender<Cmd>);

impl CandidateSink {
    /// A remote `candidate:` line (an empty one, the end of candidates, is ignored).
    pub async fn add(&self, candidate: &str) {
        if !candidate.is_empty() {
            let _ = self.0.send(Cmd::Candidate(candidate.to_owned())).await;
        }
    }
}

/// Sends on an open hop; cheap to clone.
#[derive(Debug, Clone)]
pub struct PipeSender {
    cmd: mpsc::Sender<Cmd>,
}

impl PipeSender {
    /// A control message (reliable, ordered); waits for room.
    pub async fn send_control(&self, bytes: Bytes) -> bool {
        self.cmd.send(Cmd::Send { data: false, bytes }).await.is_ok()
    }

    /// A message of DATA frames (unreliable, unordered); dropped, like a UDP datagram, when
    /// the hop is backed up.
    pub fn send_data(&self, bytes: Bytes) -> bool {
        self.cmd.try_send(Cmd::Send { data: true, bytes }).is_ok()
    }

    pub fn is_closed(&self) -> bool {
        self.cmd.is_closed()
    }
}

/// An open hop: messages from both channels arrive on `rx` (it ends when the peer
/// connection does); the selected candidate pair is in `path`.
#[derive(Debug)]
pub struct DataPipe {
    pub tx: PipeSender,
    pub rx: mpsc::Receiver<Bytes>,
    path: Arc<Mutex<Option<SelectedPath>>>,
    /// Why the hop ended, once it has.
    pub end: Arc<Mutex<Option<String>>>,
}

impl DataPipe {
    /// The candidate pair in use now (it may change if ICE moves to another pair).
    pub fn path(&self) -> Option<SelectedPath> {
        *self.path.lock().expect("poisoned")
    }

    /// A handle on the path that stays valid after the pipe is moved or split.
    pub fn path_handle(&self) -> PathHandle {
        PathHandle(self.path.clone())
    }
}

/// Reads the selected path of a hop.
#[derive(Debug, Clone)]
pub struct PathHandle(Arc<Mutex<Option<SelectedPath>>>);

impl PathHandle {
    pub fn get(&self) -> Option<SelectedPath> {
        *self.0.lock().expect("poisoned")
    }
}
