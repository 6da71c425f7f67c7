//! The server end of a Broflake connection (PROTOCOL.md §9): handshake, PING answering,
//! route bookkeeping, idle and handshake deadlines, server pings, draining.
//!
//! The session does no I/O and reads no clock. Frames to send are appended to a `tx`
//! buffer the caller owns (one WebSocket message); deadlines are returned as data.
//! Configuration is shared by every session and passed into each call, so the
//! per-connection state stays small (a pre-opened idle connection is the common case).

use crate::close::Close;
use crate::codes::ErrorCode;
use crate::frame::{
    self, encode_extensions, Capabilities, DecodeError, Decoded, Extensions, Frame, Hello, SessionId, Welcome,
};
use crate::grease;
use crate::handshake;
use crate::labels::LabelSet;
use crate::packet_size::{self, DataRefused};
use crate::time::Timestamp;

/// Whom the server pings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerPing {
    /// Only clients that did not announce the PING capability (compatibility).
    Compat,
    /// Every connection (the original design; kept as a mode and as the benchmark baseline).
    All,
    /// Never: liveness is purely client-driven; clients that do not PING go idle and are closed.
    Never,
}

/// Settings shared by every server session.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub min_version: u64,
    pub max_version: u64,
    pub keepalive_ms: u64,
    pub idle_timeout_ms: u64,
    pub handshake_timeout_ms: u64,
    pub max_frame_size: u64,
    pub max_routes: u64,
    pub server_ping: ServerPing,
    /// PING token bucket: burst size and refill per second.
    pub ping_burst: u32,
    pub ping_refill_per_sec: u32,
    /// Bit `1 << role` set for each allowed role.
    pub allowed_roles: u8,
    /// Send grease (an ignorable extension in WELCOME).
    pub grease: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            min_version: handshake::MIN_VERSION,
            max_version: handshake::MAX_VERSION,
            keepalive_ms: 20_000,
            idle_timeout_ms: 60_000,
            handshake_timeout_ms: 10_000,
            max_frame_size: frame::DEFAULT_MAX_FRAME_SIZE as u64,
            max_routes: 256,
            server_ping: ServerPing::Compat,
            ping_burst: 16,
            ping_refill_per_sec: 2,
            allowed_roles: (1 << 1) | (1 << 2) | (1 << 3),
            grease: true,
        }
    }
}

impl ServerConfig {
    /// Checks the invariants the wire format imposes on a WELCOME built from this config.
    pub fn validate(&self) -> Result<(), String> {
        if self.min_version == 0 || self.min_version > self.max_version {
            return Err("version range must satisfy 1 <= min <= max".into());
        }
        if self.keepalive_ms < 1000 {
            return Err("keepalive must be at least 1 s".into());
        }
        if self.idle_timeout_ms < 2 * self.keepalive_ms {
            return Err("idle timeout must be at least twice the keepalive interval".into());
        }
        if self.max_frame_size < frame::MIN_MAX_FRAME_SIZE || self.max_frame_size > 1 << 20 {
            return Err("max frame size must be between 1500 and 1 MiB".into());
        }
        if self.max_routes == 0 {
            return Err("max routes must be at least 1".into());
        }
        if self.ping_burst == 0 {
            return Err("ping burst must be at least 1".into());
        }
        Ok(())
    }

    fn role_allowed(&self, role: frame::Role) -> bool {
        role.0 < 8 && self.allowed_roles & (1 << role.0) != 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum State {
    AwaitHello,
    /// HELLO negotiated; the caller must call `accept` or `refuse` before the next frame.
    AwaitAdmission,
    Open,
    Draining,
    Closed,
}

/// What a received frame means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerEvent<'a> {
    /// Nothing for the caller (PING answered, PADDING or grease skipped, …).
    None,
    /// A HELLO with a negotiated version. Call [`ServerSession::accept`] or
    /// [`ServerSession::refuse`] before handing the session another frame.
    Hello { hello: Hello<'a>, version: u64 },
    /// A QUIC packet on a route. `new_route` is true for the first packet of a label.
    Data { label: u64, packet: &'a [u8], new_route: bool },
    /// The client released a route that was open.
    RouteClosed { label: u64, code: ErrorCode },
    /// A PONG answering one of the server's pings.
    Pong,
}

/// One server session. Small on purpose: see the module docs.
#[derive(Debug, Clone)]
pub struct ServerSession {
    state: State,
    version: u8,
    client_caps: u8,
    role: u8,
    server_pings: bool,
    /// A server PING is waiting for its PONG (at most one is outstanding).
    ping_outstanding: bool,
    /// PING tokens in thousandths.
    ping_tokens: u32,
    /// Start of the connection while handshaking, then the last receive.
    last_rx: Timestamp,
    /// Last refill of the PING bucket; in DRAINING, the end of the grace period.
    ping_refill_at: Timestamp,
    /// When the server last sent a PING.
    last_ping_tx: Timestamp,
    /// Close the session at this time (resumed sessions of a draining server); 0: never.
    close_at: Timestamp,
    /// Labels below this have been seen (labels are allocated monotonically).
    next_new_label: u64,
    /// Open labels. One pointer, no heap, on idle connections.
    routes: LabelSet,
}

// One per connection on a server holding hundreds of thousands of them.
const _: () = assert!(std::mem::size_of::<ServerSession>() <= 64);

impl ServerSession {
    /// A session for a connection that completed its WebSocket upgrade at `now`.
    pub fn new(now: Timestamp) -> Self {
        ServerSession {
            state: State::AwaitHello,
            version: 0,
            client_caps: 0,
            role: 0,
            server_pings: false,
            ping_outstanding: false,
            ping_tokens: 0,
            last_rx: now,
            ping_refill_at: now,
            last_ping_tx: now,
            close_at: Timestamp::ZERO,
            next_new_label: 0,
            routes: LabelSet::default(),
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open | State::Draining)
    }

    pub fn is_draining(&self) -> bool {
        self.state == State::Draining
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The negotiated version (0 before the handshake).
    pub fn version(&self) -> u64 {
        u64::from(self.version)
    }

    /// The client's known capabilities.
    pub fn client_capabilities(&self) -> Capabilities {
        Capabilities(u64::from(self.client_caps))
    }

    /// Whether the server pings this connection.
    pub fn server_pings(&self) -> bool {
        self.server_pings
    }

    /// Number of open routes.
    pub fn route_count(&self) -> usize {
        self.routes.len()
    }

    /// Open route labels, ascending.
    pub fn routes(&self) -> &[u64] {
        self.routes.as_slice()
    }

    /// The largest frame this side accepts now.
    pub fn max_frame_size(&self, cfg: &ServerConfig) -> usize {
        if self.is_open() {
            cfg.max_frame_size as usize
        } else {
            frame::HANDSHAKE_MAX_FRAME_SIZE
        }
    }

    /// When the connection is to be closed for silence (handshake or idle timeout).
    pub fn idle_deadline(&self, cfg: &ServerConfig) -> Timestamp {
        match self.state {
            State::AwaitHello | State::AwaitAdmission => self.last_rx + cfg.handshake_timeout_ms,
            _ => self.last_rx + cfg.idle_timeout_ms,
        }
    }

    /// The earliest time [`ServerSession::on_timeout`] has work to do.
    pub fn next_timeout(&self, cfg: &ServerConfig) -> Option<Timestamp> {
        self.next_timeout_with(cfg, true)
    }

    /// As [`ServerSession::next_timeout`]; with `idle == false` the idle timeout of an open
    /// session is left out (something else, such as the kernel, enforces it). Handshake,
    /// server-ping and drain deadlines always count.
    pub fn next_timeout_with(&self, cfg: &ServerConfig, idle: bool) -> Option<Timestamp> {
        if self.state == State::Closed {
            return None;
        }
        let mut t = if idle || !self.is_open() { self.idle_deadline(cfg) } else { Timestamp(u64::MAX) };
        if self.server_pings && !self.ping_outstanding {
            t = t.min(self.last_ping_tx + cfg.keepalive_ms);
        }
        if self.state == State::Draining {
            t = t.min(self.ping_refill_at);
        }
        if self.close_at != Timestamp::ZERO {
            t = t.min(self.close_at);
        }
        (t != Timestamp(u64::MAX)).then_some(t)
    }

    /// Records that bytes arrived (used by I/O layers that see traffic the session does not
    /// parse, such as WebSocket-level pings). Any received frame already counts.
    pub fn touch(&mut self, now: Timestamp) {
        if self.is_open() {
            self.last_rx = self.last_rx.max(now);
        }
    }

    /// A WebSocket-level ping arrived (the I/O layer answers it). It counts as traffic and
    /// draws on the same token bucket as PING frames once the session is open, so a flood of
    /// WebSocket pings is closed like a flood of PINGs (RATE_LIMITED).
    pub fn ws_ping(&mut self, cfg: &ServerConfig, now: Timestamp, tx: &mut Vec<u8>) -> Result<(), Close> {
        if !self.is_open() {
            return Ok(());
        }
        self.touch(now);
        self.take_ping_token(cfg, now)
            .map_err(|()| self.fail(ErrorCode::RATE_LIMITED, "websocket ping rate limit exceeded", tx))
    }

    /// Runs deadlines: handshake timeout, idle timeout, end of drain, server pings.
    pub fn on_timeout(&mut self, cfg: &ServerConfig, now: Timestamp, tx: &mut Vec<u8>) -> Result<(), Close> {
        match self.state {
            State::Closed => return Ok(()),
            State::AwaitHello | State::AwaitAdmission => {
                if now >= self.idle_deadline(cfg) {
                    let reason = format!("no HELLO within {} ms", cfg.handshake_timeout_ms);
                    return Err(self.refuse(ErrorCode::HANDSHAKE_TIMEOUT, 0, reason, tx));
                }
                return Ok(());
            }
            State::Open | State::Draining => {}
        }
        if now >= self.idle_deadline(cfg) {
            let reason = format!("nothing received for {} ms", cfg.idle_timeout_ms);
            return Err(self.fail(ErrorCode::IDLE_TIMEOUT, reason, tx));
        }
        if (self.state == State::Draining && now >= self.ping_refill_at)
            || (self.close_at != Timestamp::ZERO && now >= self.close_at)
        {
            self.state = State::Closed;
            return Err(Close::local(ErrorCode::DRAINING, "drained"));
        }
        if self.server_pings && !self.ping_outstanding && now >= self.last_ping_tx + cfg.keepalive_ms {
            self.last_ping_tx = now;
            self.ping_outstanding = true;
            Frame::Ping { payload: &now.as_millis().to_be_bytes() }.encode(0, tx);
        }
        Ok(())
    }

    /// Handles one WebSocket message: every frame in it, in order. `on_event` sees each
    /// event with the session, so it can `accept`/`refuse` a HELLO immediately.
    pub fn handle_message<'a, F>(
        &mut self,
        cfg: &ServerConfig,
        now: Timestamp,
        message: &'a [u8],
        tx: &mut Vec<u8>,
        mut on_event: F,
    ) -> Result<(), Close>
    where
        F: FnMut(&mut Self, ServerEvent<'a>, &mut Vec<u8>) -> Result<(), Close>,
    {
        let mut rest = message;
        while !rest.is_empty() {
            let decoded = match frame::decode(rest, self.max_frame_size(cfg)) {
                Ok(d) => d,
                Err(e) => return Err(self.decode_error(&e, tx)),
            };
            rest = &rest[decoded.len..];
            let event = self.handle_frame(cfg, now, decoded, tx)?;
            on_event(self, event, tx)?;
            if self.state == State::AwaitAdmission {
                return Err(self.fail(ErrorCode::INTERNAL, "handshake left undecided", tx));
            }
        }
        Ok(())
    }

    /// Handles one decoded frame.
    pub fn handle_frame<'a>(
        &mut self,
        cfg: &ServerConfig,
        now: Timestamp,
        decoded: Decoded<'a>,
        tx: &mut Vec<u8>,
    ) -> Result<ServerEvent<'a>, Close> {
        let frame = decoded.frame;
        match self.state {
            State::Closed => return Err(Close::local(ErrorCode::PROTOCOL_VIOLATION, "session closed")),
            State::AwaitAdmission => {
                return Err(self.fail(ErrorCode::INTERNAL, "handshake left undecided", tx));
            }
            State::AwaitHello => {
                return match frame {
                    Frame::Padding { .. } | Frame::Unknown { .. } => Ok(ServerEvent::None),
                    Frame::Hello(hello) => self.on_hello(cfg, hello, tx),
                    other => Err(self.violation(other.name(), "before HELLO", tx)),
                };
            }
            State::Open | State::Draining => {}
        }
        self.last_rx = self.last_rx.max(now);
        match frame {
            Frame::Padding { .. } | Frame::Unknown { .. } => Ok(ServerEvent::None),
            Frame::Ping { payload } => {
                self.take_ping_token(cfg, now)
                    .map_err(|()| self.fail(ErrorCode::RATE_LIMITED, "ping rate limit exceeded", tx))?;
                Frame::Pong { payload }.encode(0, tx);
                Ok(ServerEvent::None)
            }
            Frame::Pong { payload } => {
                if self.ping_outstanding && payload == self.last_ping_tx.as_millis().to_be_bytes() {
                    self.ping_outstanding = false;
                    Ok(ServerEvent::Pong)
                } else {
                    Ok(ServerEvent::None)
                }
            }
            Frame::Data { .. } if frame::Role(self.role) == frame::Role::PROBE => {
                Err(self.violation("data", "from a probe", tx))
            }
            Frame::Data { label, packet } => self.on_data(cfg, label, packet, tx),
            // Crossed with our own ROUTE_CLOSE, or never opened: nothing to release.
            Frame::RouteClose { label, code } => match self.routes.remove(label) {
                true => Ok(ServerEvent::RouteClosed { label, code }),
                false => Ok(ServerEvent::None),
            },
            Frame::Error { code, reason } => {
                self.state = State::Closed;
                Err(Close::peer(code, reason, 0))
            }
            other @ (Frame::Hello(_) | Frame::Welcome(_) | Frame::Refuse { .. } | Frame::GoAway { .. }) => {
                Err(self.violation(other.name(), "from a client after the handshake", tx))
            }
        }
    }

    fn on_hello<'a>(
        &mut self,
        cfg: &ServerConfig,
        hello: Hello<'a>,
        tx: &mut Vec<u8>,
    ) -> Result<ServerEvent<'a>, Close> {
        let version = handshake::negotiate_hello(cfg.min_version, cfg.max_version, &hello)
            .map_err(|refusal| self.refuse(refusal.code, 0, refusal.reason, tx))?;
        self.role = hello.role.0;
        self.version = u8::try_from(version).unwrap_or(u8::MAX);
        self.client_caps = hello.capabilities.known().0 as u8;
        self.state = State::AwaitAdmission;
        Ok(ServerEvent::Hello { hello, version })
    }

    /// Completes the handshake after the caller's admission checks (SERVER_FULL,
    /// PER_IP_LIMIT, DRAINING, in that order): checks the role last, as the spec orders
    /// it, then writes WELCOME and opens the session. `session_id` should be random.
    pub fn accept(
        &mut self,
        cfg: &ServerConfig,
        now: Timestamp,
        session_id: SessionId,
        tx: &mut Vec<u8>,
    ) -> Result<(), Close> {
        assert_eq!(self.state, State::AwaitAdmission, "accept without a pending HELLO");
        if !cfg.role_allowed(frame::Role(self.role)) {
            let reason = format!("role {} is not allowed here", self.role);
            return Err(self.refuse(ErrorCode::BAD_ROLE, 0, reason, tx));
        }
        // All zero means "none" on the wire; never hand that out.
        let mut session_id = session_id;
        if session_id.is_none() {
            session_id.0[15] = 1;
        }
        let client = Capabilities(u64::from(self.client_caps));
        self.server_pings = match cfg.server_ping {
            ServerPing::All => true,
            ServerPing::Compat => !client.has(Capabilities::PING),
            ServerPing::Never => false,
        };
        let mut caps = client.0 & (Capabilities::PING | Capabilities::ROUTES | Capabilities::GOAWAY);
        if self.server_pings {
            // Exactly one of PING and SERVER_PING is in effect (PROTOCOL.md §7.3, §10.2).
            caps = (caps & !Capabilities::PING) | Capabilities::SERVER_PING;
        }
        let max_routes = if client.has(Capabilities::ROUTES) { cfg.max_routes } else { 1 };
        let mut rng = grease::Rng::new(u64::from_le_bytes(session_id.0[..8].try_into().expect("8 bytes")));
        let grease_ext = cfg.grease.then(|| {
            let value = rng.next_u64().to_be_bytes();
            encode_extensions(&[(grease::value(rng.below(64)), &value[..(rng.below(9) as usize)])])
        });
        if cfg.grease {
            caps |= grease::capability_bit(&mut rng);
        }
        let ext_bytes = grease_ext.as_deref().unwrap_or(&[]);
        let extensions = Extensions::parse(ext_bytes, "welcome").expect("well-formed grease");
        Frame::Welcome(Welcome {
            version: self.version(),
            session_id,
            capabilities: Capabilities(caps),
            keepalive_ms: cfg.keepalive_ms,
            idle_timeout_ms: cfg.idle_timeout_ms,
            max_frame_size: cfg.max_frame_size,
            max_routes,
            extensions,
        })
        .encode(0, tx);
        self.state = State::Open;
        self.last_rx = now;
        self.last_ping_tx = now;
        self.ping_refill_at = now;
        self.ping_tokens = cfg.ping_burst * 1000;
        Ok(())
    }

    /// Writes REFUSE and closes. Usable while handshaking (admission refusals such as
    /// SERVER_FULL, PER_IP_LIMIT, DRAINING).
    pub fn refuse(
        &mut self,
        code: ErrorCode,
        retry_after_ms: u64,
        reason: impl Into<std::borrow::Cow<'static, str>>,
        tx: &mut Vec<u8>,
    ) -> Close {
        let close = Close::local(code, reason);
        Frame::Refuse { code, retry_after_ms, reason: &close.reason }.encode(0, tx);
        self.state = State::Closed;
        close
    }

    /// Writes ERROR and closes.
    pub fn fail(
        &mut self,
        code: ErrorCode,
        reason: impl Into<std::borrow::Cow<'static, str>>,
        tx: &mut Vec<u8>,
    ) -> Close {
        let close = Close::local(code, reason);
        if self.state != State::Closed {
            Frame::Error { code, reason: &close.reason }.encode(0, tx);
        }
        self.state = State::Closed;
        close
    }

    /// Turns a decode error on received bytes into the documented ERROR and close.
    pub fn decode_error(&mut self, e: &DecodeError, tx: &mut Vec<u8>) -> Close {
        self.fail(e.code(), e.to_string(), tx)
    }

    fn violation(&mut self, name: &str, when: &str, tx: &mut Vec<u8>) -> Close {
        self.fail(ErrorCode::PROTOCOL_VIOLATION, format!("{name} frame not allowed {when}"), tx)
    }

    fn take_ping_token(&mut self, cfg: &ServerConfig, now: Timestamp) -> Result<(), ()> {
        if self.state == State::Open {
            // In DRAINING `ping_refill_at` holds the drain deadline; the bucket stops refilling.
            let elapsed = now.since(self.ping_refill_at);
            let refill = elapsed.saturating_mul(u64::from(cfg.ping_refill_per_sec));
            self.ping_tokens = (u64::from(self.ping_tokens) + refill).min(u64::from(cfg.ping_burst) * 1000) as u32;
            self.ping_refill_at = now;
        }
        if self.ping_tokens < 1000 {
            return Err(());
        }
        self.ping_tokens -= 1000;
        Ok(())
    }

    fn on_data<'a>(
        &mut self,
        cfg: &ServerConfig,
        label: u64,
        packet: &'a [u8],
        tx: &mut Vec<u8>,
    ) -> Result<ServerEvent<'a>, Close> {
        if self.routes.contains(label) {
            return Ok(ServerEvent::Data { label, packet, new_route: false });
        }
        if label < self.next_new_label {
            // A route that was closed (or refused): drop silently. Labels are never
            // reused, and answering every late packet would be an amplifier.
            return Ok(ServerEvent::None);
        }
        self.next_new_label = label.saturating_add(1);
        let max_routes = if self.client_capabilities().has(Capabilities::ROUTES) { cfg.max_routes } else { 1 };
        let refuse = if self.state == State::Draining {
            Some(ErrorCode::DRAINING)
        } else if self.routes.len() as u64 >= max_routes {
            Some(ErrorCode::ROUTE_LIMIT)
        } else {
            None
        };
        if let Some(code) = refuse {
            Frame::RouteClose { label, code }.encode(0, tx);
            return Ok(ServerEvent::None);
        }
        self.routes.insert(label);
        Ok(ServerEvent::Data { label, packet, new_route: true })
    }

    /// Closes a route from this side (e.g. its QUIC connection ended) and tells the client.
    pub fn close_route(&mut self, label: u64, code: ErrorCode, tx: &mut Vec<u8>) -> bool {
        let open = self.routes.remove(label);
        if open {
            Frame::RouteClose { label, code }.encode(0, tx);
        }
        open
    }

    /// Starts draining: GOAWAY now, close at `now + grace_ms`.
    pub fn goaway(&mut self, now: Timestamp, grace_ms: u64, reconnect: &str, tx: &mut Vec<u8>) {
        if self.state != State::Open {
            return;
        }
        Frame::GoAway { grace_ms, reconnect }.encode(0, tx);
        self.state = State::Draining;
        self.ping_refill_at = now + grace_ms;
    }

    /// Makes an open session end at `at` with DRAINING "drained", without a GOAWAY: for a
    /// connection a draining server admitted so a client could move its routes (PROTOCOL.md §11).
    pub fn close_at(&mut self, at: Timestamp) {
        self.close_at = at.max(Timestamp(1));
    }

    /// Writes a DATA frame on an open route (QUIC packet towards the client). A packet too
    /// large for the frame limit is refused: the caller drops it (PROTOCOL.md §14.4).
    pub fn send_data(
        &self,
        cfg: &ServerConfig,
        label: u64,
        packet: &[u8],
        tx: &mut Vec<u8>,
    ) -> Result<(), DataRefused> {
        self.check_data(cfg, label, packet.len())?;
        frame::encode_data(label, packet, tx);
        Ok(())
    }

    /// As [`Self::send_data`], but appends only the DATA frame's header: the caller sends the
    /// packet's `packet_len` bytes right after it (without copying them into `tx`).
    pub fn send_data_header(
        &self,
        cfg: &ServerConfig,
        label: u64,
        packet_len: usize,
        tx: &mut Vec<u8>,
    ) -> Result<(), DataRefused> {
        self.check_data(cfg, label, packet_len)?;
        frame::encode_data_header(label, packet_len, tx);
        Ok(())
    }

    fn check_data(&self, cfg: &ServerConfig, label: u64, packet_len: usize) -> Result<(), DataRefused> {
        if !self.is_open() {
            return Err(DataRefused::NotOpen);
        }
        if !self.routes.contains(label) {
            return Err(DataRefused::NoRoute(label));
        }
        packet_size::check_fits(label, packet_len, self.max_frame_size(cfg))
    }

    /// Appends a grease frame (callers do this now and then on outgoing messages).
    pub fn grease_frame(rng: &mut grease::Rng, tx: &mut Vec<u8>) {
        grease::encode_frame(rng, tx);
    }
}
