//! The matchmaking core, sans-IO (quinn-proto style): clients connect, send messages and
//! leave; the hub answers with [`Action`]s to perform and a deadline to be woken at. No
//! sockets and no clock of its own: the caller passes `now` (milliseconds) in.
//!
//! States and timeouts are specified in docs/SIGNALING.md §4–§5.

use crate::msg::{self, Candidate, ErrorCode, Incoming, MsgError, Outgoing, SessionId};
use crate::shared::{FromVolunteer, StoreOp, ToVolunteer, VolunteerRef};
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::IpAddr;

mod replicas;
mod sessions;

pub type ClientId = u64;

/// Limits and timeouts (all times in milliseconds).
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub max_clients: usize,
    pub max_clients_per_ip: u32,
    pub max_slots_per_volunteer: u32,
    pub max_sessions: usize,
    pub max_candidates_per_side: u32,
    /// The first message must arrive within this.
    pub hello_timeout: u64,
    /// PING interval asked of clients; the service drops a client silent for `idle_timeout`.
    pub ping_interval: u64,
    pub idle_timeout: u64,
    /// A volunteer must answer an offer within this.
    pub answer_timeout: u64,
    /// A session (and the consumer's signaling connection) lives at most this long.
    pub session_ttl: u64,
    /// Volunteers tried per consumer before it is told none is free.
    pub max_attempts: u32,
    pub retry_after: u64,
    /// Consumer requests per IP: burst, then this many per second.
    pub consumer_burst: u32,
    pub consumer_per_sec: u32,
    /// STUN/TURN servers handed to every client in `hello`.
    pub ice_servers: Vec<msg::IceServer>,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            max_clients: 200_000,
            max_clients_per_ip: 64,
            max_slots_per_volunteer: 64,
            max_sessions: 50_000,
            max_candidates_per_side: 64,
            // Covers a consumer's gathering (STUN, TURN: up to 3 s) before its first message.
            hello_timeout: 10_000,
            ping_interval: 20_000,
            idle_timeout: 60_000,
            answer_timeout: 10_000,
            session_ttl: 30_000,
            max_attempts: 3,
            retry_after: 5_000,
            consumer_burst: 20,
            consumer_per_sec: 2,
            ice_servers: Vec::new(),
        }
    }
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send(ClientId, Outgoing),
    /// Close the client's WebSocket with this code and reason (after what was sent before).
    Close(ClientId, u16, String),
}

/// Why a connection was refused before it got a client id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    PerIpLimit,
    Capacity,
}

#[derive(Debug)]
enum Role {
    /// Connected, first message not yet seen.
    Pending,
    Volunteer {
        free: u32,
        /// In the ready queue (to avoid duplicates).
        queued: bool,
    },
    Consumer {
        session: Option<SessionId>,
    },
}

#[derive(Debug)]
struct Client {
    ip: IpAddr,
    role: Role,
    last_seen: u64,
    /// Closed by the hub; further input is ignored.
    closing: bool,
}

/// A session's volunteer: a client here, or one at another replica (shared store only).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Vol {
    Local(ClientId),
    Remote(VolunteerRef),
}

#[derive(Debug, PartialEq, Eq)]
enum SessionState {
    /// Waiting for the store to pick a volunteer (shared store only).
    Picking,
    /// The offer went to `volunteer`; waiting for its answer.
    Offered,
    /// The answer went to the consumer; candidates flow until done or expiry.
    Answered,
}

#[derive(Debug)]
struct Session {
    consumer: ClientId,
    volunteer: Vol,
    state: SessionState,
    offer: String,
    /// The consumer's candidates so far (replayed to the next volunteer after a decline).
    consumer_candidates: Vec<Candidate>,
    volunteer_candidates: u32,
    tried: Vec<Vol>,
    /// Why the last volunteer did not take it (told to the consumer if none is left).
    why: &'static str,
    expires: u64,
    answer_by: u64,
}

#[derive(Debug, Default)]
struct IpState {
    clients: u32,
    tokens: f64,
    refilled: u64,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Hello(ClientId),
    Idle(ClientId),
    Answer(SessionId),
    Expire(SessionId),
}

/// Counts the hub keeps (the server turns them into metrics).
#[derive(Debug, Default, Clone)]
pub struct HubStats {
    pub matches: u64,
    pub unavailable: u64,
    pub declines: u64,
    pub answer_timeouts: u64,
    pub sessions_expired: u64,
    pub candidates_dropped: u64,
    pub unknown_types: u64,
}

/// The matchmaking state.
#[derive(Debug)]
pub struct Hub {
    cfg: HubConfig,
    clients: HashMap<ClientId, Client>,
    next_id: ClientId,
    ready: VecDeque<ClientId>,
    sessions: HashMap<SessionId, Session>,
    ips: HashMap<IpAddr, IpState>,
    timers: BinaryHeap<std::cmp::Reverse<(u64, Timer)>>,
    actions: VecDeque<Action>,
    rng: Rng,
    draining: bool,
    volunteers: usize,
    free_slots: u64,
    /// Shared mode: this replica's id, and what the store is asked to do.
    shared: Option<Shared>,
    pub stats: HubStats,
}

#[derive(Debug)]
struct Shared {
    replica: String,
    ops: VecDeque<StoreOp>,
}

impl Hub {
    /// `seed` keys the session-id generator (128 random bits from the OS in production).
    pub fn new(cfg: HubConfig, seed: [u8; 32]) -> Hub {
        Hub {
            cfg,
            clients: HashMap::new(),
            next_id: 1,
            ready: VecDeque::new(),
            sessions: HashMap::new(),
            ips: HashMap::new(),
            timers: BinaryHeap::new(),
            actions: VecDeque::new(),
            rng: Rng::new(seed),
            draining: false,
            volunteers: 0,
            free_slots: 0,
            shared: None,
            stats: HubStats::default(),
        }
    }

    /// A hub that is one replica of several sharing a store (`replica`: this one's id, see
    /// [`crate::shared::valid_replica_id`]): volunteers are picked and sessions recorded
    /// through [`StoreOp`]s, taken with [`Hub::poll_store`].
    pub fn shared(cfg: HubConfig, seed: [u8; 32], replica: String) -> Hub {
        let mut h = Hub::new(cfg, seed);
        h.shared = Some(Shared { replica, ops: VecDeque::new() });
        h
    }

    pub fn config(&self) -> &HubConfig {
        &self.cfg
    }

    /// A new connection from `ip`: its id, or why it is refused (close it at once).
    pub fn connect(&mut self, now: u64, ip: IpAddr) -> Result<ClientId, Refusal> {
        if self.clients.len() >= self.cfg.max_clients {
            return Err(Refusal::Capacity);
        }
        let st = self.ips.entry(ip).or_insert_with(|| IpState {
            clients: 0,
            tokens: f64::from(self.cfg.consumer_burst),
            refilled: now,
        });
        if st.clients >= self.cfg.max_clients_per_ip {
            return Err(Refusal::PerIpLimit);
        }
        st.clients += 1;
        let id = self.next_id;
        self.next_id += 1;
        self.clients.insert(id, Client { ip, role: Role::Pending, last_seen: now, closing: false });
        self.timer(now + self.cfg.hello_timeout, Timer::Hello(id));
        let hello = Outgoing::Hello { versions: vec![msg::VERSION], ice_servers: self.cfg.ice_servers.clone() };
        self.send(id, hello);
        Ok(id)
    }

    /// A text message from a client.
    pub fn message(&mut self, now: u64, id: ClientId, text: &str) {
        match self.clients.get_mut(&id) {
            Some(c) if !c.closing => c.last_seen = now,
            _ => return,
        }
        match msg::parse(text) {
            Ok(m) => {
                metrics::counter!(crate::metrics::MESSAGES_RECEIVED, "type" => m.kind()).increment(1);
                self.on_message(now, id, m)
            }
            Err(e) => {
                metrics::counter!(crate::metrics::MESSAGES_RECEIVED, "type" => "invalid").increment(1);
                self.fail(id, e.code(), &e.to_string())
            }
        }
    }

    /// A binary WebSocket message (the protocol is text only).
    pub fn binary(&mut self, id: ClientId) {
        if self.clients.get(&id).is_some_and(|c| !c.closing) {
            self.fail(id, ErrorCode::BadMessage, "binary message: the protocol is JSON in text messages");
        }
    }

    /// A message too large to be read (the caller stopped reading it).
    pub fn oversized(&mut self, id: ClientId, len: usize) {
        let e = MsgError::TooLarge(len);
        self.fail(id, e.code(), &e.to_string());
    }

    /// The client's connection is gone (closed by either side, or too slow).
    pub fn disconnect(&mut self, now: u64, id: ClientId) {
        let Some(c) = self.clients.remove(&id) else { return };
        let (burst, rate) = (f64::from(self.cfg.consumer_burst), f64::from(self.cfg.consumer_per_sec));
        if let Some(st) = self.ips.get_mut(&c.ip) {
            st.clients -= 1;
            // Forget the address once nothing is connected from it and its bucket would be
            // full again by now (no state kept for addresses that come and go).
            let refilled = st.tokens + now.saturating_sub(st.refilled) as f64 / 1000.0 * rate;
            if st.clients == 0 && refilled >= burst {
                self.ips.remove(&c.ip);
            }
        }
        match c.role {
            Role::Pending => {}
            Role::Consumer { session } => {
                if let Some(sid) = session {
                    if let Some(s) = self.remove_session(sid) {
                        if s.state == SessionState::Offered {
                            self.send_volunteer(
                                &s.volunteer,
                                ToVolunteer::Cancel { session: sid, reason: "consumer left".into() },
                            );
                            self.give_back_slot(&s.volunteer);
                        }
                    }
                }
            }
            Role::Volunteer { free, .. } => {
                self.volunteers -= 1;
                self.free_slots -= u64::from(free);
                self.store(StoreOp::VolunteerGone { client: id });
                self.volunteer_gone(now, &Vol::Local(id));
            }
        }
    }

    /// Starts draining: volunteers are told to go elsewhere, new consumers are turned away.
    pub fn drain(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        let ids: Vec<ClientId> =
            self.clients.iter().filter(|(_, c)| matches!(c.role, Role::Volunteer { .. })).map(|(id, _)| *id).collect();
        for id in ids {
            self.send(id, Outgoing::Goaway { retry_after_ms: 0, reason: "signaling service is draining".into() });
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Handles every deadline at or before `now`.
    pub fn timeout(&mut self, now: u64) {
        while let Some(std::cmp::Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let std::cmp::Reverse((_, t)) = self.timers.pop().expect("peeked");
            match t {
                Timer::Hello(id) => {
                    if self.clients.get(&id).is_some_and(|c| matches!(c.role, Role::Pending) && !c.closing) {
                        self.fail(id, ErrorCode::Timeout, "no first message in time");
                    }
                }
                Timer::Idle(id) => {
                    let Some(c) = self.clients.get(&id) else { continue };
                    if c.closing {
                        continue;
                    }
                    let due = c.last_seen + self.cfg.idle_timeout;
                    if due > now {
                        self.timer(due, Timer::Idle(id));
                    } else {
                        self.fail(id, ErrorCode::Timeout, "silent for too long (send ping)");
                    }
                }
                Timer::Answer(sid) => {
                    let late =
                        self.sessions.get(&sid).is_some_and(|s| s.state == SessionState::Offered && s.answer_by <= now);
                    if late {
                        self.stats.answer_timeouts += 1;
                        metrics::counter!(crate::metrics::SESSION_ENDS, "reason" => "answer_timeout").increment(1);
                        let v = self.sessions[&sid].volunteer.clone();
                        self.send_volunteer(&v, ToVolunteer::Cancel { session: sid, reason: "answer too late".into() });
                        self.give_back_slot(&v);
                        self.reoffer(now, sid, "volunteer did not answer");
                    }
                }
                Timer::Expire(sid) => {
                    if self.sessions.get(&sid).is_some_and(|s| s.expires <= now) {
                        let s = self.remove_session(sid).expect("checked");
                        self.stats.sessions_expired += 1;
                        if s.state == SessionState::Offered {
                            metrics::counter!(crate::metrics::SESSION_ENDS, "reason" => "expired").increment(1);
                            self.send_volunteer(
                                &s.volunteer,
                                ToVolunteer::Cancel { session: sid, reason: "session expired".into() },
                            );
                            self.give_back_slot(&s.volunteer);
                        }
                        self.end_consumer(s.consumer, sid, "session expired");
                    }
                }
            }
        }
    }

    /// When [`Hub::timeout`] must run next.
    pub fn next_deadline(&self) -> Option<u64> {
        self.timers.peek().map(|std::cmp::Reverse((at, _))| *at)
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    pub fn volunteers(&self) -> usize {
        self.volunteers
    }

    pub fn free_slots(&self) -> u64 {
        self.free_slots
    }

    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    fn timer(&mut self, at: u64, t: Timer) {
        self.timers.push(std::cmp::Reverse((at, t)));
    }

    fn send(&mut self, id: ClientId, m: Outgoing) {
        if self.clients.get(&id).is_some_and(|c| !c.closing) {
            self.actions.push_back(Action::Send(id, m));
        }
    }

    /// Sends an `error`, then closes with the code's close code.
    fn fail(&mut self, id: ClientId, code: ErrorCode, reason: &str) {
        let reason: String = reason.chars().take(msg::MAX_REASON).collect();
        self.send(id, Outgoing::Error { code, reason: reason.clone() });
        self.close(id, code.close_code(), reason);
    }

    fn close(&mut self, id: ClientId, code: u16, reason: String) {
        if let Some(c) = self.clients.get_mut(&id) {
            if !c.closing {
                c.closing = true;
                // Close reasons must fit a WebSocket control frame (123 bytes).
                let mut reason = reason;
                while reason.len() > 123 {
                    reason.pop();
                }
                self.actions.push_back(Action::Close(id, code, reason));
            }
        }
    }

    fn on_message(&mut self, now: u64, id: ClientId, m: Incoming) {
        let pending = matches!(self.clients[&id].role, Role::Pending);
        match m {
            Incoming::Ping => self.send(id, Outgoing::Pong),
            Incoming::Unknown(_) => self.stats.unknown_types += 1,
            Incoming::Volunteer { versions, slots } if pending => {
                if msg::negotiate(&versions).is_none() {
                    return self.fail(id, ErrorCode::UnsupportedVersion, "this service speaks version 1");
                }
                if self.draining {
                    self.send(
                        id,
                        Outgoing::Goaway { retry_after_ms: 0, reason: "signaling service is draining".into() },
                    );
                    return self.close(id, 1000, "draining".into());
                }
                let free = slots.min(self.cfg.max_slots_per_volunteer);
                self.clients.get_mut(&id).expect("exists").role = Role::Volunteer { free: 0, queued: false };
                self.volunteers += 1;
                self.set_free(id, free);
                match &mut self.shared {
                    // Registered once the store has the slots: from then on any replica can
                    // match it.
                    Some(sh) => sh.ops.push_back(StoreOp::Registered { client: id }),
                    None => self.send_registered(id, format!("v{id}")),
                }
                self.timer(now + self.cfg.idle_timeout, Timer::Idle(id));
            }
            Incoming::Consumer { versions, offer } if pending => self.on_consumer(now, id, &versions, offer),
            Incoming::Volunteer { .. } | Incoming::Consumer { .. } => {
                self.fail(id, ErrorCode::Unexpected, "the role was already given")
            }
            _ if pending => self.fail(id, ErrorCode::Unexpected, "the first message must be volunteer or consumer"),
            Incoming::Slots { free } => {
                if !matches!(self.clients[&id].role, Role::Volunteer { .. }) {
                    return self.fail(id, ErrorCode::Unexpected, "slots is a volunteer's message");
                }
                let free = free.min(self.cfg.max_slots_per_volunteer);
                self.set_free(id, free);
            }
            Incoming::Answer { session, sdp } => self.volunteer_says(now, id, session, FromVolunteer::Answer { sdp }),
            Incoming::Decline { session, .. } => self.volunteer_says(now, id, session, FromVolunteer::Decline),
            Incoming::Candidate { session, candidate } => {
                let Some(s) = self.sessions.get_mut(&session) else {
                    return self.volunteer_says(now, id, session, FromVolunteer::Candidate { candidate });
                };
                if s.consumer != id {
                    return self.volunteer_says(now, id, session, FromVolunteer::Candidate { candidate });
                }
                if s.consumer_candidates.len() as u32 >= self.cfg.max_candidates_per_side {
                    self.stats.candidates_dropped += 1;
                    metrics::counter!(crate::metrics::CANDIDATES_DROPPED).increment(1);
                    return;
                }
                s.consumer_candidates.push(candidate.clone());
                // While a volunteer is being picked, the offer carries them later.
                if matches!(s.state, SessionState::Offered | SessionState::Answered) {
                    let v = s.volunteer.clone();
                    self.send_volunteer(&v, ToVolunteer::Candidate { session, candidate });
                }
            }
            Incoming::Done { session } => {
                if self.sessions.get(&session).is_none_or(|s| s.consumer != id) {
                    return self.volunteer_says(now, id, session, FromVolunteer::Done);
                }
                let s = self.remove_session(session).expect("checked");
                if s.state == SessionState::Offered {
                    self.send_volunteer(
                        &s.volunteer,
                        ToVolunteer::Cancel { session, reason: "consumer gave up".into() },
                    );
                    self.give_back_slot(&s.volunteer);
                }
                self.end_session_of(s.consumer);
            }
        }
    }
}

/// Session ids: a keyed hash of a counter (SHA-256 of seed ‖ n), so they are unguessable
/// without a random source per call.
#[derive(Debug)]
struct Rng {
    seed: [u8; 32],
    n: u64,
}

impl Rng {
    fn new(seed: [u8; 32]) -> Rng {
        Rng { seed, n: 0 }
    }

    fn next_id(&mut self) -> [u8; 16] {
        use sha2::Digest;
        self.n += 1;
        let mut h = sha2::Sha256::new();
        h.update(self.seed);
        h.update(self.n.to_le_bytes());
        let d = h.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&d[..16]);
        id
    }
}
