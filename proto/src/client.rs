//! The client end of a Broflake connection (PROTOCOL.md §9–§11): HELLO, the PING schedule
//! with jitter, dead-link detection by a missed PONG, GOAWAY, route label allocation.
//! Used by relays (towards the egress or an upstream relay) and by direct consumers.

use crate::close::Close;
use crate::codes::ErrorCode;
use crate::frame::{
    self, encode_extensions, ext, Capabilities, DecodeError, Decoded, Extensions, Frame, Hello, Role, SessionId,
};
use crate::grease::{self, Rng};
use crate::handshake;
use crate::packet_size::{self, DataRefused};
use crate::time::Timestamp;

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub min_version: u64,
    pub max_version: u64,
    pub role: Role,
    pub capabilities: Capabilities,
    /// The session this one replaces, if reconnecting (diagnostics on the server).
    pub previous_session: SessionId,
    pub user_agent: Option<String>,
    /// Send PINGs at the server's keepalive interval. Off only to reproduce the problem this
    /// protocol solves (middleboxes cutting idle connections).
    pub send_pings: bool,
    /// Jitter: each interval is shortened by up to this many thousandths.
    pub ping_jitter_permille: u32,
    /// How long a PING may go unanswered; default `min(keepalive/2, 10 s)`.
    pub pong_timeout_ms: Option<u64>,
    pub handshake_timeout_ms: u64,
    /// Emit grease (an ignorable frame and extension, a reserved capability bit).
    pub grease: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            min_version: handshake::MIN_VERSION,
            max_version: handshake::MAX_VERSION,
            role: Role::RELAY,
            capabilities: Capabilities(Capabilities::PING | Capabilities::ROUTES | Capabilities::GOAWAY),
            previous_session: SessionId::NONE,
            user_agent: None,
            send_pings: true,
            ping_jitter_permille: 200,
            pong_timeout_ms: None,
            handshake_timeout_ms: 10_000,
            grease: true,
        }
    }
}

/// What the server granted in WELCOME.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub version: u64,
    pub session_id: SessionId,
    pub capabilities: Capabilities,
    pub keepalive_ms: u64,
    pub idle_timeout_ms: u64,
    pub max_frame_size: u64,
    pub max_routes: u64,
}

/// What a received frame means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientEvent<'a> {
    None,
    Welcome(Negotiated),
    Data {
        label: u64,
        packet: &'a [u8],
    },
    RouteClosed {
        label: u64,
        code: ErrorCode,
    },
    /// The server is draining: open a replacement connection, move routes, close this one.
    GoAway {
        grace_ms: u64,
        reconnect: &'a str,
    },
    /// A PONG for our outstanding PING.
    Pong {
        rtt_ms: u64,
    },
}

/// Why a route could not be opened on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("connection is not open")]
    NotOpen,
    #[error("connection is going away")]
    GoingAway,
    #[error("route limit of {0} reached")]
    Limit(u64),
    #[error("label {0} is not above every label used before")]
    LabelReused(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    AwaitWelcome,
    Open,
    GoingAway,
    Closed,
}

/// One client session.
#[derive(Debug, Clone)]
pub struct ClientSession {
    state: State,
    negotiated: Option<Negotiated>,
    started: Timestamp,
    next_ping_at: Timestamp,
    outstanding: Option<(u64, Timestamp)>,
    ping_seq: u64,
    rng: Rng,
    next_label: u64,
    routes: Vec<u64>,
    goaway_deadline: Option<Timestamp>,
    /// Last time anything arrived (for the receive timeout of clients that do not PING).
    last_rx: Timestamp,
    pings_sent: u64,
    pongs_received: u64,
}

impl ClientSession {
    /// `seed` feeds jitter and grease (pass real randomness in production, a constant in tests).
    pub fn new(seed: u64) -> Self {
        ClientSession {
            state: State::Idle,
            negotiated: None,
            started: Timestamp::ZERO,
            next_ping_at: Timestamp::ZERO,
            outstanding: None,
            ping_seq: 0,
            rng: Rng::new(seed),
            next_label: 0,
            routes: Vec::new(),
            goaway_deadline: None,
            last_rx: Timestamp::ZERO,
            pings_sent: 0,
            pongs_received: 0,
        }
    }

    /// Writes HELLO. Call right after the upgrade.
    pub fn start(&mut self, cfg: &ClientConfig, now: Timestamp, tx: &mut Vec<u8>) {
        assert_eq!(self.state, State::Idle, "start called twice");
        let mut caps = cfg.capabilities.0;
        if !cfg.send_pings {
            caps &= !Capabilities::PING;
        }
        let mut exts: Vec<(u64, Vec<u8>)> = Vec::new();
        if let Some(ua) = &cfg.user_agent {
            let mut end = ua.len().min(frame::MAX_USER_AGENT_LEN);
            while !ua.is_char_boundary(end) {
                end -= 1;
            }
            exts.push((ext::USER_AGENT, ua.as_bytes()[..end].to_vec()));
        }
        if cfg.grease {
            caps |= grease::capability_bit(&mut self.rng);
            let len = self.rng.below(9) as usize;
            let value = self.rng.next_u64().to_be_bytes()[..len].to_vec();
            exts.push((grease::value(self.rng.below(64)), value));
        }
        let items: Vec<(u64, &[u8])> = exts.iter().map(|(t, v)| (*t, v.as_slice())).collect();
        let raw = encode_extensions(&items);
        let extensions = Extensions::parse(&raw, "hello").expect("well-formed extensions");
        Frame::Hello(Hello {
            min_version: cfg.min_version,
            max_version: cfg.max_version,
            role: cfg.role,
            capabilities: Capabilities(caps),
            previous_session: cfg.previous_session,
            extensions,
        })
        .encode(0, tx);
        self.state = State::AwaitWelcome;
        self.started = now;
    }

    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open | State::GoingAway)
    }

    pub fn is_going_away(&self) -> bool {
        self.state == State::GoingAway
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    pub fn pings_sent(&self) -> u64 {
        self.pings_sent
    }

    pub fn pongs_received(&self) -> u64 {
        self.pongs_received
    }

    pub fn routes(&self) -> &[u64] {
        &self.routes
    }

    /// When the server asked us to be gone by.
    pub fn goaway_deadline(&self) -> Option<Timestamp> {
        self.goaway_deadline
    }

    /// The largest frame this side accepts now.
    pub fn max_frame_size(&self) -> usize {
        match &self.negotiated {
            Some(n) => usize::try_from(n.max_frame_size).unwrap_or(usize::MAX),
            None => frame::HANDSHAKE_MAX_FRAME_SIZE,
        }
    }

    fn pong_timeout(&self, cfg: &ClientConfig) -> u64 {
        let keepalive = self.negotiated.map_or(20_000, |n| n.keepalive_ms);
        cfg.pong_timeout_ms.unwrap_or_else(|| (keepalive / 2).min(10_000))
    }

    /// PING is in effect: we offered it and the server granted it.
    fn pinging(&self, cfg: &ClientConfig) -> bool {
        cfg.send_pings && self.is_open() && self.negotiated.is_some_and(|n| n.capabilities.has(Capabilities::PING))
    }

    fn schedule_ping(&mut self, cfg: &ClientConfig, now: Timestamp) {
        let interval = self.negotiated.map_or(20_000, |n| n.keepalive_ms);
        // Server-chosen values are hostile input: no arithmetic on them may overflow.
        let span = interval / 1000 * u64::from(cfg.ping_jitter_permille.min(999));
        let cut = if span == 0 { 0 } else { self.rng.below(span) };
        self.next_ping_at = now + (interval - cut);
    }

    /// The earliest time [`ClientSession::handle_timeout`] has work to do.
    pub fn poll_timeout(&self, cfg: &ClientConfig) -> Option<Timestamp> {
        match self.state {
            State::Idle | State::Closed => None,
            State::AwaitWelcome => Some(self.started + cfg.handshake_timeout_ms),
            State::Open | State::GoingAway => {
                let mut t = self.goaway_deadline;
                if self.pinging(cfg) {
                    t = Some(t.map_or(self.next_ping_at, |g| g.min(self.next_ping_at)));
                }
                if let Some((_, sent)) = self.outstanding {
                    let dead = sent + self.pong_timeout(cfg);
                    t = Some(t.map_or(dead, |x| x.min(dead)));
                }
                if let Some(dead) = self.receive_deadline(cfg) {
                    t = Some(t.map_or(dead, |x| x.min(dead)));
                }
                t
            }
        }
    }

    /// Runs deadlines: handshake timeout, dead link (missed PONG), PING due, GOAWAY grace.
    pub fn handle_timeout(&mut self, cfg: &ClientConfig, now: Timestamp, tx: &mut Vec<u8>) -> Result<(), Close> {
        match self.state {
            State::Idle | State::Closed => Ok(()),
            State::AwaitWelcome => {
                if now >= self.started + cfg.handshake_timeout_ms {
                    self.state = State::Closed;
                    return Err(Close::local(
                        ErrorCode::HANDSHAKE_TIMEOUT,
                        format!("no WELCOME within {} ms", cfg.handshake_timeout_ms),
                    ));
                }
                Ok(())
            }
            State::Open | State::GoingAway => {
                if let Some((_, sent)) = self.outstanding {
                    if now >= sent + self.pong_timeout(cfg) {
                        self.state = State::Closed;
                        return Err(Close::local(
                            ErrorCode::IDLE_TIMEOUT,
                            format!("pong timeout: no PONG within {} ms", self.pong_timeout(cfg)),
                        ));
                    }
                }
                if self.receive_deadline(cfg).is_some_and(|d| now >= d) {
                    self.state = State::Closed;
                    return Err(Close::local(
                        ErrorCode::IDLE_TIMEOUT,
                        "receive timeout: nothing heard from the server for longer than its idle timeout",
                    ));
                }
                if let Some(deadline) = self.goaway_deadline {
                    if now >= deadline {
                        self.state = State::Closed;
                        return Err(Close::local(ErrorCode::NO_ERROR, "goaway grace over"));
                    }
                }
                if self.pinging(cfg) && now >= self.next_ping_at {
                    // At most one PING outstanding: a due PING is skipped while one is.
                    if self.outstanding.is_none() {
                        self.send_ping(now, tx);
                    }
                    self.schedule_ping(cfg, now);
                }
                Ok(())
            }
        }
    }

    /// Without client PINGs in effect, a client cannot tell a quiet link from a dead one, except
    /// that the server closes connections idle for `idle_timeout`: silence for longer than
    /// that (plus one keepalive of margin) means the connection is gone (PROTOCOL.md §10.3).
    fn receive_deadline(&self, cfg: &ClientConfig) -> Option<Timestamp> {
        if self.pinging(cfg) || !self.is_open() {
            return None;
        }
        let n = self.negotiated?;
        Some(self.last_rx + n.idle_timeout_ms.saturating_add(n.keepalive_ms))
    }

    fn send_ping(&mut self, now: Timestamp, tx: &mut Vec<u8>) {
        self.ping_seq += 1;
        Frame::Ping { payload: &self.ping_seq.to_be_bytes() }.encode(0, tx);
        self.outstanding = Some((self.ping_seq, now));
        self.pings_sent += 1;
    }

    /// Handles one WebSocket message.
    pub fn handle_message<'a, F>(
        &mut self,
        cfg: &ClientConfig,
        now: Timestamp,
        message: &'a [u8],
        tx: &mut Vec<u8>,
        mut on_event: F,
    ) -> Result<(), Close>
    where
        F: FnMut(&mut Self, ClientEvent<'a>, &mut Vec<u8>) -> Result<(), Close>,
    {
        let mut rest = message;
        while !rest.is_empty() {
            let decoded = match frame::decode(rest, self.max_frame_size()) {
                Ok(d) => d,
                Err(e) => return Err(self.decode_error(&e, tx)),
            };
            rest = &rest[decoded.len..];
            let event = self.handle_frame(cfg, now, decoded, tx)?;
            on_event(self, event, tx)?;
        }
        Ok(())
    }

    /// Handles one decoded frame.
    pub fn handle_frame<'a>(
        &mut self,
        cfg: &ClientConfig,
        now: Timestamp,
        decoded: Decoded<'a>,
        tx: &mut Vec<u8>,
    ) -> Result<ClientEvent<'a>, Close> {
        let frame = decoded.frame;
        self.last_rx = self.last_rx.max(now);
        match self.state {
            State::Idle | State::Closed => {
                Err(Close::local(ErrorCode::PROTOCOL_VIOLATION, "frame on a session that is not running"))
            }
            State::AwaitWelcome => match frame {
                Frame::Padding { .. } | Frame::Unknown { .. } => Ok(ClientEvent::None),
                Frame::Welcome(w) => {
                    if w.version < cfg.min_version || w.version > cfg.max_version {
                        let reason = format!(
                            "server chose version {} outside {}-{}",
                            w.version, cfg.min_version, cfg.max_version
                        );
                        return Err(self.fail(ErrorCode::UNSUPPORTED_VERSION, reason, tx));
                    }
                    let n = Negotiated {
                        version: w.version,
                        session_id: w.session_id,
                        capabilities: w.capabilities,
                        keepalive_ms: w.keepalive_ms,
                        idle_timeout_ms: w.idle_timeout_ms,
                        max_frame_size: w.max_frame_size,
                        max_routes: w.max_routes,
                    };
                    self.negotiated = Some(n);
                    self.state = State::Open;
                    self.schedule_ping(cfg, now);
                    if cfg.grease {
                        // Grease frames only after the handshake (PROTOCOL.md §13).
                        grease::encode_frame(&mut self.rng, tx);
                    }
                    Ok(ClientEvent::Welcome(n))
                }
                Frame::Refuse { code, retry_after_ms, reason } => {
                    self.state = State::Closed;
                    Err(Close::peer(code, reason, retry_after_ms))
                }
                Frame::Error { code, reason } => {
                    self.state = State::Closed;
                    Err(Close::peer(code, reason, 0))
                }
                other => Err(self.violation(other.name(), "before WELCOME", tx)),
            },
            State::Open | State::GoingAway => match frame {
                Frame::Padding { .. } | Frame::Unknown { .. } => Ok(ClientEvent::None),
                Frame::Ping { payload } => {
                    Frame::Pong { payload }.encode(0, tx);
                    Ok(ClientEvent::None)
                }
                Frame::Pong { payload } => match self.outstanding {
                    Some((seq, sent)) if payload == seq.to_be_bytes() => {
                        self.outstanding = None;
                        self.pongs_received += 1;
                        Ok(ClientEvent::Pong { rtt_ms: now.since(sent) })
                    }
                    // Unsolicited or stale: ignored, as the spec says.
                    _ => Ok(ClientEvent::None),
                },
                Frame::Data { label, packet } => {
                    if self.routes.binary_search(&label).is_ok() {
                        Ok(ClientEvent::Data { label, packet })
                    } else {
                        Frame::RouteClose { label, code: ErrorCode::ROUTE_UNKNOWN }.encode(0, tx);
                        Ok(ClientEvent::None)
                    }
                }
                Frame::RouteClose { label, code } => {
                    if let Ok(i) = self.routes.binary_search(&label) {
                        self.routes.remove(i);
                    }
                    Ok(ClientEvent::RouteClosed { label, code })
                }
                Frame::GoAway { grace_ms, reconnect } => {
                    if self.state == State::Open {
                        self.state = State::GoingAway;
                        self.goaway_deadline = Some(now + grace_ms);
                    }
                    Ok(ClientEvent::GoAway { grace_ms, reconnect })
                }
                Frame::Error { code, reason } => {
                    self.state = State::Closed;
                    Err(Close::peer(code, reason, 0))
                }
                other @ (Frame::Hello(_) | Frame::Welcome(_) | Frame::Refuse { .. }) => {
                    Err(self.violation(other.name(), "after the handshake", tx))
                }
            },
        }
    }

    /// Allocates the next route label (monotonic, never reused on this connection).
    pub fn open_route(&mut self) -> Result<u64, RouteError> {
        let n = match (self.state, &self.negotiated) {
            (State::Open, Some(n)) => *n,
            (State::GoingAway, _) => return Err(RouteError::GoingAway),
            _ => return Err(RouteError::NotOpen),
        };
        if self.routes.len() as u64 >= n.max_routes {
            return Err(RouteError::Limit(n.max_routes));
        }
        let label = self.next_label;
        self.next_label += 1;
        self.routes.push(label); // ascending by construction
        Ok(label)
    }

    /// Opens a route on a label the caller allocated (it must be above every label used so
    /// far on this connection, keeping allocation monotonic).
    pub fn open_route_at(&mut self, label: u64) -> Result<(), RouteError> {
        let n = match (self.state, &self.negotiated) {
            (State::Open, Some(n)) => *n,
            (State::GoingAway, _) => return Err(RouteError::GoingAway),
            _ => return Err(RouteError::NotOpen),
        };
        if label < self.next_label {
            return Err(RouteError::LabelReused(label));
        }
        if self.routes.len() as u64 >= n.max_routes {
            return Err(RouteError::Limit(n.max_routes));
        }
        self.next_label = label + 1;
        self.routes.push(label);
        Ok(())
    }

    /// Releases a route and tells the server.
    pub fn close_route(&mut self, label: u64, code: ErrorCode, tx: &mut Vec<u8>) -> bool {
        match self.routes.binary_search(&label) {
            Ok(i) => {
                self.routes.remove(i);
                if self.is_open() {
                    Frame::RouteClose { label, code }.encode(0, tx);
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Writes a DATA frame on an open route. A packet too large for the frame limit is
    /// refused: the caller drops it (PROTOCOL.md §14.4).
    pub fn send_data(&self, label: u64, packet: &[u8], tx: &mut Vec<u8>) -> Result<(), DataRefused> {
        if !self.is_open() {
            return Err(DataRefused::NotOpen);
        }
        if self.routes.binary_search(&label).is_err() {
            return Err(DataRefused::NoRoute(label));
        }
        packet_size::check_fits(label, packet.len(), self.max_frame_size())?;
        frame::encode_data(label, packet, tx);
        Ok(())
    }

    /// Writes ERROR and closes.
    pub fn fail(
        &mut self,
        code: ErrorCode,
        reason: impl Into<std::borrow::Cow<'static, str>>,
        tx: &mut Vec<u8>,
    ) -> Close {
        let close = Close::local(code, reason);
        if self.state != State::Closed && self.state != State::Idle {
            Frame::Error { code, reason: &close.reason }.encode(0, tx);
        }
        self.state = State::Closed;
        close
    }

    /// Orderly close from this side (e.g. after migrating away on GOAWAY).
    pub fn close(&mut self) -> Close {
        self.state = State::Closed;
        Close::local(ErrorCode::NO_ERROR, "client closing")
    }

    pub fn decode_error(&mut self, e: &DecodeError, tx: &mut Vec<u8>) -> Close {
        self.fail(e.code(), e.to_string(), tx)
    }

    fn violation(&mut self, name: &str, when: &str, tx: &mut Vec<u8>) -> Close {
        self.fail(ErrorCode::PROTOCOL_VIOLATION, format!("{name} frame not allowed {when}"), tx)
    }
}
