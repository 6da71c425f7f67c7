//! The task that owns one peer connection: its UDP socket, the `str0m` state machine and the
//! TURN allocation. Gathering happens first (STUN Binding for the server-reflexive address,
//! a TURN Allocate for the relayed one); then the loop moves datagrams between the socket,
//! TURN and str0m, and messages between str0m's channels and the [`DataPipe`].

use crate::ice_server::{self, Server};
use crate::{stun, CandidateKind, Cmd, DataPipe, Peer, PipeSender, RtcConfig, RtcError, SelectedPath};
use crate::{CONTROL_ID, CONTROL_LABEL, DATA_ID, DATA_LABEL};
use bytes::Bytes;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::{ChannelConfig, ChannelId, Reliability};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use turn_client_proto::api::{SendError, TurnClientApi, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet};
use turn_client_proto::stun::agent::Transmit as TurnTransmit;
use turn_client_proto::stun::types::TransportType;
use turn_client_proto::types::TurnCredentials;
use turn_client_proto::udp::TurnClientUdp;

/// Bytes buffered in the data channel beyond which DATA is dropped (QUIC backs off).
const DATA_BUFFER_LIMIT: usize = 512 * 1024;
/// Messages from the peer waiting for the pipe's reader.
const INBOUND_QUEUE: usize = 4096;
/// STUN retransmission while gathering (Binding here; Allocate in the TURN client). Short:
/// a TURN server creates its per-client state on the first packet of a new 5-tuple and may
/// drop one that arrives meanwhile (coturn does), and a consumer waits for gathering.
const STUN_RETRY: Duration = Duration::from_millis(100);

fn crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| str0m::crypto::from_feature_flags().install_process_default());
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).expect("the OS random source");
    b
}

fn channel(id: u16, data: bool) -> ChannelConfig {
    ChannelConfig {
        label: if data { DATA_LABEL } else { CONTROL_LABEL }.into(),
        ordered: !data,
        reliability: if data { Reliability::MaxRetransmits { retransmits: 0 } } else { Reliability::Reliable },
        negotiated: Some(id),
        protocol: "broflake".into(),
    }
}

fn kind(c: &Candidate) -> CandidateKind {
    match c.kind() {
        str0m::CandidateKind::Host => CandidateKind::Host,
        str0m::CandidateKind::ServerReflexive => CandidateKind::Srflx,
        str0m::CandidateKind::PeerReflexive => CandidateKind::Prflx,
        str0m::CandidateKind::Relayed => CandidateKind::Relay,
    }
}

/// The `a=candidate:` lines of an SDP, parsed.
fn sdp_candidates(sdp: &str) -> Vec<Candidate> {
    sdp.lines()
        .filter_map(|l| l.trim_end().strip_prefix("a="))
        .filter(|l| l.starts_with("candidate:"))
        .filter_map(|l| Candidate::from_sdp_string(l).ok())
        .collect()
}

/// The local IP that routes to `to` (no packet is sent: a connected UDP socket's address).
async fn route_ip(to: SocketAddr) -> Option<IpAddr> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await.ok()?;
    s.connect(to).await.ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

/// A UDP socket with buffers for bursts (a QUIC flight arrives as a burst of datagrams; the
/// kernel caps the size at net.core.rmem_max / wmem_max).
fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol as P, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(P::UDP))?;
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// What gathering found.
struct Gathered {
    srflx: Option<SocketAddr>,
    turn: Option<(TurnClientUdp, SocketAddr)>,
}

async fn gather(
    socket: &UdpSocket,
    host: SocketAddr,
    servers: &[Server],
    timeout: Duration,
    base: Instant,
) -> Gathered {
    let now = |b: Instant| turn_client_proto::stun::Instant::from_nanos(b.elapsed().as_nanos() as i64);
    let deadline = tokio::time::Instant::now() + timeout;
    // A Binding request to every server (TURN servers answer them too).
    let mut binding: Vec<(SocketAddr, [u8; 12])> = servers
        .iter()
        .map(|s| match s {
            Server::Stun(a) | Server::Turn { addr: a, .. } => (*a, random()),
        })
        .collect();
    let mut turn = servers.iter().find_map(|s| match s {
        Server::Turn { addr, username, credential } => {
            let mut cfg = TurnConfig::new(TurnCredentials::new(username, credential));
            cfg.set_request_retransmits(STUN_RETRY, Duration::from_millis(1600), 6, Duration::from_millis(1600));
            Some(TurnClientUdp::allocate(host, *addr, cfg))
        }
        _ => None,
    });
    let mut out = Gathered { srflx: None, turn: None };
    // After the Allocate (see STUN_RETRY): one new 5-tuple at a time for the server.
    let mut next_stun = tokio::time::Instant::now() + Duration::from_millis(20);
    let mut buf = vec![0u8; 2048];
    loop {
        let t = now(base);
        if let Some(c) = turn.as_mut() {
            while let Some(tx) = c.poll_transmit(t) {
                let _ = socket.try_send_to(tx.data.as_ref(), tx.to);
            }
            while let Some(ev) = c.poll_event() {
                match ev {
                    TurnEvent::AllocationCreated(_, relayed) => {
                        tracing::debug!(%relayed, "TURN allocation created");
                        out.turn = Some((turn.take().expect("present"), relayed));
                        break;
                    }
                    TurnEvent::AllocationCreateFailed(f) => {
                        tracing::warn!(family = ?f, server = %c.remote_addr(), "TURN allocation failed: no relayed candidate");
                        turn = None;
                        break;
                    }
                    _ => {}
                }
            }
        }
        let stun_done = out.srflx.is_some() || binding.is_empty();
        if stun_done && turn.is_none() {
            return out;
        }
        if tokio::time::Instant::now() >= next_stun && out.srflx.is_none() {
            for (addr, tid) in &binding {
                let _ = socket.try_send_to(&stun::binding_request(*tid), *addr);
            }
            next_stun = tokio::time::Instant::now() + STUN_RETRY;
        }
        let turn_wait = match turn.as_mut().map(|c| c.poll(now(base))) {
            Some(TurnPollRet::WaitUntil(i)) => tokio::time::Instant::from_std(i.to_std(base)),
            _ => deadline,
        };
        let wake = deadline.min(turn_wait).min(if out.srflx.is_none() { next_stun } else { deadline });
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                let data = &buf[..n];
                if let Some(i) = binding.iter().position(|(a, tid)| *a == from && stun::parse_binding_response(data, tid).is_ok()) {
                    let (_, tid) = binding.remove(i);
                    out.srflx = stun::parse_binding_response(data, &tid).ok();
                    continue;
                }
                if let Some(c) = turn.as_mut().filter(|c| c.remote_addr() == from) {
                    let _ = c.recv(TurnTransmit::new(data, TransportType::Udp, from, host), now(base));
                }
            }
            _ = tokio::time::sleep_until(wake) => {
                if tokio::time::Instant::now() >= deadline {
                    if turn.is_some() {
                        tracing::warn!("TURN allocation did not complete in time: no relayed candidate");
                    }
                    return out;
                }
            }
        }
    }
}

pub(crate) async fn start(cfg: &RtcConfig, offer: Option<&str>) -> Result<Peer, RtcError> {
    let (servers, bad) = ice_server::resolve(&cfg.ice_servers).await;
    for e in bad {
        tracing::warn!(error = %e, "ICE server skipped");
    }
    let first = servers.first().map(|s| match s {
        Server::Stun(a) | Server::Turn { addr: a, .. } => *a,
    });
    let ip = match (cfg.bind, first) {
        (Some(ip), _) => ip,
        (None, Some(a)) => route_ip(a).await.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        (None, None) => IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    let socket = bind((ip, 0).into())?;
    let host = socket.local_addr()?;
    let base = Instant::now();
    let g = gather(&socket, host, &servers, cfg.gather_timeout, base).await;
    crypto();
    // Datagrams up to 1436 bytes: a 1350-byte QUIC packet in one DATA frame fits one SCTP
    // chunk (str0m's default, 1150, would split it in two, and on the unreliable channel the
    // loss of either half loses the packet), and 1436 + 36 bytes of TURN Send indication +
    // 28 of UDP/IPv4 is 1500.
    let mut rtc = Rtc::builder().set_mtu(1436..=1500).build(Instant::now());
    if !cfg.relay_only {
        rtc.add_local_candidate(Candidate::host(host, "udp").map_err(|e| RtcError::Rtc(e.to_string()))?);
        if let Some(s) = g.srflx.filter(|s| *s != host) {
            if let Ok(c) = Candidate::server_reflexive(s, host, "udp") {
                rtc.add_local_candidate(c);
            }
        }
    }
    let relayed = g.turn.as_ref().map(|(_, r)| *r);
    if let Some(r) = relayed {
        rtc.add_local_candidate(Candidate::relayed(r, host, "udp").map_err(|e| RtcError::Rtc(e.to_string()))?);
    }
    if cfg.relay_only && relayed.is_none() {
        return Err(RtcError::Rtc("relay-only, but no TURN allocation was made".into()));
    }
    let mut remote = Vec::new();
    let (sdp, pending, ids) = match offer {
        None => {
            let mut api = rtc.sdp_api();
            let c = api.add_channel_with_config(channel(CONTROL_ID, false));
            let d = api.add_channel_with_config(channel(DATA_ID, true));
            let (offer, pending) = api.apply().ok_or_else(|| RtcError::Rtc("nothing to offer".into()))?;
            (offer.to_sdp_string(), Some(pending), (c, d))
        }
        Some(o) => {
            let parsed = SdpOffer::from_sdp_string(o).map_err(|e| RtcError::Sdp(e.to_string()))?;
            remote = sdp_candidates(o);
            let answer = rtc.sdp_api().accept_offer(parsed).map_err(|e| RtcError::Sdp(e.to_string()))?;
            let c = rtc.direct_api().create_data_channel(channel(CONTROL_ID, false));
            let d = rtc.direct_api().create_data_channel(channel(DATA_ID, true));
            (answer.to_sdp_string(), None, (c, d))
        }
    };
    let candidates: Vec<String> = sdp
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("a="))
        .filter(|l| l.starts_with("candidate:"))
        .map(str::to_owned)
        .collect();
    let (cmd_tx, cmd_rx) = mpsc::channel(1024);
    let (open_tx, open_rx) = oneshot::channel();
    let (in_tx, in_rx) = mpsc::channel(INBOUND_QUEUE);
    let mut d = Driver {
        socket,
        rtc,
        turn: g.turn.map(|(t, _)| t),
        host,
        relayed,
        base,
        pending,
        cmd_rx,
        weak: cmd_tx.downgrade(),
        open_tx: Some(open_tx),
        in_tx,
        in_rx: Some(in_rx),
        ids,
        opened: [false; 2],
        remote: Vec::new(),
        connected: false,
        control: std::collections::VecDeque::new(),
        closing: None,
        path: Arc::new(Mutex::new(None)),
        end: Arc::new(Mutex::new(None)),
    };
    for c in remote {
        d.add_remote(c);
    }
    tracing::debug!(%host, srflx = ?g.srflx, ?relayed, "WebRTC candidates gathered");
    tokio::spawn(d.run());
    Ok(Peer { sdp, candidates, cmd: cmd_tx, open: open_rx })
}

struct Driver {
    socket: UdpSocket,
    rtc: Rtc,
    turn: Option<TurnClientUdp>,
    host: SocketAddr,
    relayed: Option<SocketAddr>,
    base: Instant,
    pending: Option<SdpPendingOffer>,
    cmd_rx: mpsc::Receiver<Cmd>,
    /// For the pipe's sender: a strong one here would keep the driver alive for ever.
    weak: mpsc::WeakSender<Cmd>,
    open_tx: Option<oneshot::Sender<Result<DataPipe, RtcError>>>,
    in_tx: mpsc::Sender<Bytes>,
    in_rx: Option<mpsc::Receiver<Bytes>>,
    ids: (ChannelId, ChannelId),
    opened: [bool; 2],
    remote: Vec<(SocketAddr, CandidateKind)>,
    connected: bool,
    /// Control messages the reliable channel has not taken yet.
    control: std::collections::VecDeque<Bytes>,
    /// Set when the owner is gone: the channels are closed and the loop runs until then, so
    /// the peer hears it (an SCTP stream reset) instead of waiting for ICE consent to expire.
    closing: Option<tokio::time::Instant>,
    path: Arc<Mutex<Option<SelectedPath>>>,
    end: Arc<Mutex<Option<String>>>,
}

impl Driver {
    fn turn_now(&self) -> turn_client_proto::stun::Instant {
        turn_client_proto::stun::Instant::from_nanos(self.base.elapsed().as_nanos() as i64)
    }

    async fn run(mut self) {
        let mut buf = vec![0u8; 65536];
        let reason = loop {
            let closing = self.closing;
            if !self.control.is_empty() {
                self.flush_control();
            }
            let rtc_wait = match self.drain_rtc() {
                Ok(t) => t,
                Err(e) => break e,
            };
            let turn_wait = self.drive_turn();
            if !self.rtc.is_alive() {
                break "peer connection closed".to_string();
            }
            if closing.is_some_and(|c| tokio::time::Instant::now() >= c) {
                self.rtc.disconnect();
                break "closed locally".to_string();
            }
            let wake = tokio::time::Instant::from_std(rtc_wait).min(turn_wait).min(closing.unwrap_or(turn_wait));
            tokio::select! {
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => self.on_datagram(from, &buf[..n]),
                    Err(e) => tracing::debug!(error = %e, "UDP receive failed"),
                },
                c = self.cmd_rx.recv(), if closing.is_none() => match c {
                    Some(c) => self.on_cmd(c),
                    None => {
                        self.closing = Some(tokio::time::Instant::now() + Duration::from_millis(300));
                        self.rtc.direct_api().close_data_channel(self.ids.0);
                        let _ = self.drain_rtc();
                        self.rtc.direct_api().close_data_channel(self.ids.1);
                    }
                },
                _ = tokio::time::sleep_until(wake) => {
                    if let Err(e) = self.rtc.handle_input(Input::Timeout(Instant::now())) {
                        break e.to_string();
                    }
                }
            }
        };
        tracing::debug!(%reason, "WebRTC hop ended");
        let now = self.turn_now();
        if let Some(t) = self.turn.as_mut() {
            let _ = t.delete(now);
            while let Some(tx) = t.poll_transmit(now) {
                let _ = self.socket.try_send_to(tx.data.as_ref(), tx.to);
            }
        }
        *self.end.lock().expect("poisoned") = Some(reason.clone());
        if let Some(tx) = self.open_tx.take() {
            let _ = tx.send(Err(RtcError::Closed(reason)));
        }
    }

    /// Handles every str0m output; returns when it wants to be woken.
    fn drain_rtc(&mut self) -> Result<Instant, String> {
        loop {
            match self.rtc.poll_output().map_err(|e| e.to_string())? {
                Output::Timeout(t) => return Ok(t),
                Output::Transmit(t) => self.transmit(t.source, t.destination, &t.contents),
                Output::Event(e) => self.on_event(e),
            }
        }
    }

    fn transmit(&mut self, source: SocketAddr, destination: SocketAddr, data: &[u8]) {
        if self.connected && !stun::is_stun(data) {
            self.note_path(source, destination);
        }
        if Some(source) != self.relayed {
            let _ = self.socket.try_send_to(data, destination);
            return;
        }
        let now = self.turn_now();
        let Some(t) = self.turn.as_mut() else { return };
        match t.send_to(TransportType::Udp, destination, data, now) {
            Ok(Some(tb)) => {
                let tx = tb.build();
                let r = self.socket.try_send_to(&tx.data, tx.to);
                tracing::trace!(%destination, len = data.len(), sent = ?r, "through TURN");
            }
            Ok(None) => {}
            Err(SendError::NoPermission) => {
                let _ = t.create_permission(TransportType::Udp, destination.ip(), now);
            }
            Err(e) => tracing::debug!(error = %e, "TURN send failed"),
        }
    }

    fn note_path(&mut self, source: SocketAddr, destination: SocketAddr) {
        let local = if Some(source) == self.relayed { CandidateKind::Relay } else { CandidateKind::Host };
        let remote = self.remote.iter().find(|(a, _)| *a == destination).map_or(CandidateKind::Prflx, |(_, k)| *k);
        let p = SelectedPath { local, local_addr: source, remote, remote_addr: destination };
        let mut cur = self.path.lock().expect("poisoned");
        if *cur != Some(p) {
            // Addresses are sensitive (a consumer's is its user's): debug level only.
            tracing::debug!(path = %p, "WebRTC path selected");
            *cur = Some(p);
        }
    }

    /// Sends what TURN wants sent (refreshes, permissions); returns when it wants to be woken.
    fn drive_turn(&mut self) -> tokio::time::Instant {
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        let now = self.turn_now();
        let Some(t) = self.turn.as_mut() else { return far };
        while let Some(tx) = t.poll_transmit(now) {
            let _ = self.socket.try_send_to(tx.data.as_ref(), tx.to);
        }
        match t.poll(now) {
            TurnPollRet::WaitUntil(i) => tokio::time::Instant::from_std(i.to_std(self.base)),
            TurnPollRet::Closed => {
                tracing::warn!("TURN allocation closed");
                self.turn = None;
                far
            }
            _ => far,
        }
    }

    fn on_datagram(&mut self, from: SocketAddr, data: &[u8]) {
        let now = self.turn_now();
        if let (Some(t), Some(relayed)) = (self.turn.as_mut(), self.relayed) {
            if t.remote_addr() == from {
                let mut peer_data = Vec::new();
                match t.recv(TurnTransmit::new(data, TransportType::Udp, from, self.host), now) {
                    TurnRecvRet::PeerData(d) => peer_data.push((d.peer, d.data().to_vec())),
                    other => tracing::trace!(ret = ?other, len = data.len(), "from the TURN server"),
                }
                while let Some(d) = t.poll_recv(now) {
                    peer_data.push((d.peer, d.data().to_vec()));
                }
                // Events follow only from what the server sent (asking on every loop would cost
                // a log line each: the client traces every call).
                while let Some(ev) = t.poll_event() {
                    tracing::debug!(event = ?ev, "TURN");
                }
                for (peer, bytes) in peer_data {
                    self.receive(peer, relayed, &bytes);
                    // str0m wants its output drained after every input.
                    let _ = self.drain_rtc();
                }
                return;
            }
        }
        self.receive(from, self.host, data);
    }

    fn receive(&mut self, source: SocketAddr, destination: SocketAddr, data: &[u8]) {
        if let Ok(r) = Receive::new(Protocol::Udp, source, destination, data) {
            if let Err(e) = self.rtc.handle_input(Input::Receive(Instant::now(), r)) {
                tracing::debug!(error = %e, "WebRTC input refused");
            }
        }
    }

    fn add_remote(&mut self, c: Candidate) {
        let now = self.turn_now();
        let ip = c.addr().ip();
        self.remote.push((c.addr(), kind(&c)));
        if let Some(t) = self.turn.as_mut() {
            if !t.have_permission(TransportType::Udp, ip) {
                let _ = t.create_permission(TransportType::Udp, ip, now);
            }
        }
        self.rtc.add_remote_candidate(c);
    }

    fn on_cmd(&mut self, c: Cmd) {
        match c {
            Cmd::Answer(sdp, reply) => {
                let r = match (self.pending.take(), SdpAnswer::from_sdp_string(&sdp)) {
                    (None, _) => Err(RtcError::Sdp("no offer is pending".into())),
                    (_, Err(e)) => Err(RtcError::Sdp(e.to_string())),
                    (Some(p), Ok(a)) => {
                        self.rtc.sdp_api().accept_answer(p, a).map_err(|e| RtcError::Sdp(e.to_string()))
                    }
                };
                if r.is_ok() {
                    for c in sdp_candidates(&sdp) {
                        let _ = self.drain_rtc();
                        self.add_remote(c);
                    }
                }
                let _ = reply.send(r);
            }
            Cmd::Candidate(line) => match Candidate::from_sdp_string(line.trim_start_matches("a=")) {
                Ok(c) => self.add_remote(c),
                Err(e) => tracing::debug!(error = %e, "remote candidate ignored"),
            },
            Cmd::Send { data: true, bytes } => {
                if let Some(mut ch) = self.rtc.channel(self.ids.1) {
                    // Like a datagram: dropped when the channel is backed up.
                    if ch.buffered_amount() <= DATA_BUFFER_LIMIT && !matches!(ch.write(true, &bytes), Ok(true)) {
                        tracing::trace!("DATA message dropped: the channel is full");
                    }
                }
            }
            Cmd::Send { data: false, bytes } => {
                self.control.push_back(bytes);
                self.flush_control();
            }
        }
    }

    fn on_event(&mut self, e: Event) {
        match e {
            Event::IceConnectionStateChange(s) => {
                tracing::debug!(state = ?s, "ICE");
                match s {
                    IceConnectionState::Connected | IceConnectionState::Completed => self.connected = true,
                    IceConnectionState::Disconnected => self.rtc.disconnect(),
                    _ => {}
                }
            }
            Event::ChannelOpen(id, label) => {
                if id == self.ids.0 || label == CONTROL_LABEL {
                    self.opened[0] = true;
                }
                if id == self.ids.1 || label == DATA_LABEL {
                    self.opened[1] = true;
                }
                if self.opened == [true, true] {
                    self.open();
                }
            }
            Event::ChannelData(d) => self.deliver(d.data),
            Event::ChannelBufferedAmountLow(_) => self.flush_control(),
            // The peer closed a channel: the hop is over. (Our own closes come back as this
            // event too; those wait for the reset to reach the peer.)
            Event::ChannelClose(_) if self.closing.is_none() => self.rtc.disconnect(),
            _ => {}
        }
    }

    /// Writes queued control messages while the reliable channel takes them (a full buffer
    /// refuses a write; the rest waits for it to drain).
    fn flush_control(&mut self) {
        while let Some(m) = self.control.front() {
            let Some(mut ch) = self.rtc.channel(self.ids.0) else { return };
            match ch.write(true, m) {
                Ok(true) => {
                    self.control.pop_front();
                }
                Ok(false) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "control message refused");
                    self.control.pop_front();
                }
            }
        }
    }

    fn deliver(&mut self, data: Vec<u8>) {
        if self.in_tx.try_send(Bytes::from(data)).is_err() {
            tracing::debug!("inbound DataChannel message dropped: the reader is behind");
        }
    }

    fn open(&mut self) {
        let (Some(tx), Some(rx), Some(cmd)) = (self.open_tx.take(), self.in_rx.take(), self.weak.upgrade()) else {
            return;
        };
        let pipe = DataPipe { tx: PipeSender { cmd }, rx, path: self.path.clone(), end: self.end.clone() };
        let _ = tx.send(Ok(pipe));
    }
}
