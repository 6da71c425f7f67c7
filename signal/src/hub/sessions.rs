//! Sessions: a consumer's request, picking volunteers (here or through the store), offers,
//! answers and candidates between the two sides, and what happens when one side goes.

use super::{Client, Hub, Role, Session, SessionState, Timer, Vol};
use crate::hub::ClientId;
use crate::msg::{self, ErrorCode, Outgoing, SessionId};
use crate::shared::{FromVolunteer, StoreOp, ToVolunteer, VolunteerRef};

impl Hub {
    /// A message from volunteer `id` (here) about `session`: handled here if this replica owns
    /// the session, else passed to its owner through the store (shared mode).
    pub(super) fn volunteer_says(&mut self, now: u64, id: ClientId, session: SessionId, m: FromVolunteer) {
        if self.sessions.contains_key(&session) {
            return self.owner_hears(now, &Vol::Local(id), session, m);
        }
        let volunteer = matches!(self.clients.get(&id), Some(Client { role: Role::Volunteer { .. }, .. }));
        if volunteer && self.shared.is_some() {
            return self.store(StoreOp::FromVolunteer { session, client: id, msg: m });
        }
        if matches!(m, FromVolunteer::Answer { .. }) {
            self.send(id, Outgoing::Error { code: ErrorCode::UnknownSession, reason: "session is over".into() });
        }
    }

    pub(super) fn send_registered(&mut self, id: ClientId, name: String) {
        let (ping_ms, idle_ms) = (self.cfg.ping_interval, self.cfg.idle_timeout);
        self.send(id, Outgoing::Registered { version: msg::VERSION, id: name, ping_ms, idle_ms });
    }

    /// The owner's side of a volunteer's message (the volunteer here or at another replica).
    pub(super) fn owner_hears(&mut self, now: u64, v: &Vol, session: SessionId, m: FromVolunteer) {
        let Some(s) = self.sessions.get_mut(&session) else { return };
        if s.volunteer != *v {
            // A volunteer's late message for an offer that moved on (usually a race after a
            // timeout): an answer hears so, the rest is dropped.
            if let (Vol::Local(id), FromVolunteer::Answer { .. }) = (v, &m) {
                let reason = "not an offer of yours (any more)".into();
                self.send(*id, Outgoing::Error { code: ErrorCode::UnknownSession, reason });
            }
            return;
        }
        match m {
            FromVolunteer::Answer { sdp } => {
                if s.state != SessionState::Offered {
                    if let Vol::Local(id) = v {
                        let reason = "not an offer of yours (any more)".into();
                        self.send(*id, Outgoing::Error { code: ErrorCode::UnknownSession, reason });
                    }
                    return;
                }
                s.state = SessionState::Answered;
                let consumer = s.consumer;
                self.stats.matches += 1;
                metrics::counter!(crate::metrics::MATCHES).increment(1);
                self.send(consumer, Outgoing::Answer { session, sdp });
            }
            FromVolunteer::Decline => {
                if s.state == SessionState::Offered {
                    self.stats.declines += 1;
                    metrics::counter!(crate::metrics::SESSION_ENDS, "reason" => "declined").increment(1);
                    self.reoffer(now, session, "volunteer declined");
                }
            }
            FromVolunteer::Candidate { candidate } => {
                if s.volunteer_candidates >= self.cfg.max_candidates_per_side {
                    self.stats.candidates_dropped += 1;
                    metrics::counter!(crate::metrics::CANDIDATES_DROPPED).increment(1);
                    return;
                }
                s.volunteer_candidates += 1;
                let consumer = s.consumer;
                self.send(consumer, Outgoing::Candidate { session, candidate });
            }
            FromVolunteer::Done => {
                let s = self.remove_session(session).expect("exists");
                self.end_session_of(s.consumer);
            }
        }
    }

    /// The consumer's signaling is over, whoever said done first.
    pub(super) fn end_session_of(&mut self, consumer: ClientId) {
        if let Some(Client { role: Role::Consumer { session }, .. }) = self.clients.get_mut(&consumer) {
            *session = None;
        }
        self.close(consumer, 1000, "done".into());
    }

    /// Volunteer `v` is gone: its offers move on, its answered sessions end.
    pub(super) fn volunteer_gone(&mut self, now: u64, v: &Vol) {
        let orphans: Vec<SessionId> =
            self.sessions.iter().filter(|(_, s)| s.volunteer == *v).map(|(sid, _)| *sid).collect();
        for sid in orphans {
            match self.sessions.get(&sid).map(|s| &s.state) {
                Some(SessionState::Offered) => self.reoffer(now, sid, "volunteer left"),
                Some(SessionState::Answered) => {
                    let s = self.remove_session(sid).expect("exists");
                    self.end_consumer(s.consumer, sid, "volunteer left");
                }
                _ => {}
            }
        }
    }

    pub(super) fn on_consumer(&mut self, now: u64, id: ClientId, versions: &[u32], offer: String) {
        if msg::negotiate(versions).is_none() {
            return self.fail(id, ErrorCode::UnsupportedVersion, "this service speaks version 1");
        }
        let ip = self.clients[&id].ip;
        let (burst, rate) = (f64::from(self.cfg.consumer_burst), f64::from(self.cfg.consumer_per_sec));
        let st = self.ips.get_mut(&ip).expect("a connected client's ip");
        st.tokens = (st.tokens + (now.saturating_sub(st.refilled)) as f64 / 1000.0 * rate).min(burst);
        st.refilled = now;
        if st.tokens < 1.0 {
            return self.fail(id, ErrorCode::RateLimited, "too many requests from this address");
        }
        st.tokens -= 1.0;
        self.clients.get_mut(&id).expect("exists").role = Role::Consumer { session: None };
        // A consumer connection that lingers without a session ends at the idle timeout.
        self.timer(now + self.cfg.idle_timeout, Timer::Idle(id));
        if self.draining {
            return self.unavailable(id, "signaling service is draining");
        }
        if self.sessions.len() >= self.cfg.max_sessions {
            return self.unavailable(id, "too many sessions in progress");
        }
        let sid = SessionId(self.rng.next_id());
        self.sessions.insert(
            sid,
            Session {
                consumer: id,
                volunteer: Vol::Local(0),
                state: SessionState::Picking,
                offer,
                consumer_candidates: Vec::new(),
                volunteer_candidates: 0,
                tried: Vec::new(),
                why: "",
                expires: now + self.cfg.session_ttl,
                answer_by: 0,
            },
        );
        self.clients.get_mut(&id).expect("exists").role = Role::Consumer { session: Some(sid) };
        self.timer(now + self.cfg.session_ttl, Timer::Expire(sid));
        self.pick_for(now, sid);
    }

    /// Finds the session a volunteer: at once from this hub's own, or through the store
    /// (shared mode; [`Hub::picked`] goes on from there).
    pub(super) fn pick_for(&mut self, now: u64, sid: SessionId) {
        let Some(s) = self.sessions.get_mut(&sid) else { return };
        s.state = SessionState::Picking;
        if let Some(sh) = &mut self.shared {
            let replica = sh.replica.clone();
            let skip = s
                .tried
                .iter()
                .map(|v| match v {
                    Vol::Local(c) => VolunteerRef { replica: replica.clone(), client: *c },
                    Vol::Remote(r) => r.clone(),
                })
                .collect();
            sh.ops.push_back(StoreOp::Pick { session: sid, skip });
            return;
        }
        let tried = s.tried.clone();
        let v = self.pick(&tried).map(Vol::Local);
        self.found(now, sid, v);
    }

    /// A volunteer for session `sid` (or none is free): offer it, or tell the consumer.
    pub(super) fn found(&mut self, now: u64, sid: SessionId, v: Option<Vol>) {
        let Some(s) = self.sessions.get(&sid) else {
            // The consumer left meanwhile.
            if let Some(v) = v {
                self.give_back_slot(&v);
            }
            return;
        };
        let (first, consumer, why) = (s.tried.is_empty(), s.consumer, s.why);
        match v {
            Some(v) => {
                if first {
                    let ttl_ms = self.cfg.session_ttl;
                    self.send(consumer, Outgoing::Matched { version: msg::VERSION, session: sid, ttl_ms });
                }
                self.offer_to(now, sid, v);
            }
            None if first => {
                self.remove_session(sid);
                if let Some(Client { role: Role::Consumer { session }, .. }) = self.clients.get_mut(&consumer) {
                    *session = None;
                }
                self.unavailable(consumer, "no volunteer has a free slot");
            }
            None => {
                self.remove_session(sid);
                self.stats.unavailable += 1;
                metrics::counter!(crate::metrics::UNAVAILABLE).increment(1);
                self.send(consumer, Outgoing::Cancel { session: sid, reason: why.into() });
                self.send(
                    consumer,
                    Outgoing::Unavailable {
                        retry_after_ms: self.cfg.retry_after,
                        reason: "no volunteer answered".into(),
                    },
                );
                self.close(consumer, 1000, why.into());
            }
        }
    }

    pub(super) fn unavailable(&mut self, id: ClientId, reason: &str) {
        self.stats.unavailable += 1;
        metrics::counter!(crate::metrics::UNAVAILABLE).increment(1);
        self.send(id, Outgoing::Unavailable { retry_after_ms: self.cfg.retry_after, reason: reason.into() });
        self.close(id, 1000, reason.into());
    }

    pub(super) fn offer_to(&mut self, now: u64, sid: SessionId, v: Vol) {
        let ttl = self.cfg.session_ttl;
        let s = self.sessions.get_mut(&sid).expect("session exists");
        s.volunteer = v.clone();
        s.state = SessionState::Offered;
        s.tried.push(v.clone());
        s.answer_by = now + self.cfg.answer_timeout;
        let (offer, candidates) = (s.offer.clone(), s.consumer_candidates.clone());
        let ttl_ms = s.expires.saturating_sub(now).min(ttl);
        if self.shared.is_some() {
            let volunteer = self.vref(&v);
            self.store(StoreOp::Match { session: sid, volunteer, ttl_ms });
        }
        self.timer(now + self.cfg.answer_timeout, Timer::Answer(sid));
        self.send_volunteer(&v, ToVolunteer::Offer { session: sid, sdp: offer, ttl_ms });
        for c in candidates {
            self.send_volunteer(&v, ToVolunteer::Candidate { session: sid, candidate: c });
        }
    }

    /// The session's volunteer declined, left or was too slow: try the next one.
    pub(super) fn reoffer(&mut self, now: u64, sid: SessionId, why: &'static str) {
        let Some(s) = self.sessions.get_mut(&sid) else { return };
        s.why = why;
        if (s.tried.len() as u32) < self.cfg.max_attempts {
            self.pick_for(now, sid);
        } else {
            self.found(now, sid, None);
        }
    }

    /// Ends a consumer's signaling: `cancel`, then close.
    pub(super) fn end_consumer(&mut self, consumer: ClientId, sid: SessionId, why: &str) {
        self.send(consumer, Outgoing::Cancel { session: sid, reason: why.into() });
        self.close(consumer, 1000, why.into());
    }

    /// Removes a session (and, in shared mode, its match record).
    pub(super) fn remove_session(&mut self, sid: SessionId) -> Option<Session> {
        let s = self.sessions.remove(&sid)?;
        self.store(StoreOp::EndMatch { session: sid });
        Some(s)
    }

    /// Queues a store request (shared mode; nothing otherwise).
    pub(super) fn store(&mut self, op: StoreOp) {
        if let Some(sh) = &mut self.shared {
            sh.ops.push_back(op);
        }
    }

    /// A volunteer as the store names it.
    pub(super) fn vref(&self, v: &Vol) -> VolunteerRef {
        match v {
            Vol::Local(c) => {
                VolunteerRef { replica: self.shared.as_ref().map_or("", |s| &s.replica).to_owned(), client: *c }
            }
            Vol::Remote(r) => r.clone(),
        }
    }

    /// Sends to a session's volunteer, here or (shared mode) at its replica.
    pub(super) fn send_volunteer(&mut self, v: &Vol, m: ToVolunteer) {
        match v {
            Vol::Local(id) => self.send(*id, m.into()),
            Vol::Remote(r) => self.store(StoreOp::ToVolunteer { volunteer: r.clone(), msg: m }),
        }
    }

    /// The next volunteer with a free slot (round robin), not one of `skip`; takes the slot.
    pub(super) fn pick(&mut self, skip: &[Vol]) -> Option<ClientId> {
        let mut skipped = Vec::new();
        let mut found = None;
        while let Some(v) = self.ready.pop_front() {
            let Some(Client { role: Role::Volunteer { free, queued }, closing, .. }) = self.clients.get_mut(&v) else {
                continue;
            };
            if *free == 0 || *closing {
                *queued = false;
                continue;
            }
            if skip.contains(&Vol::Local(v)) {
                skipped.push(v);
                continue;
            }
            *free -= 1;
            self.free_slots -= 1;
            if *free == 0 {
                *queued = false;
            } else {
                self.ready.push_back(v);
            }
            found = Some(v);
            break;
        }
        for v in skipped.into_iter().rev() {
            self.ready.push_front(v);
        }
        found
    }

    /// A volunteer here announced `free` slots. In shared mode the store keeps the count
    /// (replicas take slots from it); this hub's copy is what the volunteer last said.
    pub(super) fn set_free(&mut self, id: ClientId, free: u32) {
        let Some(Client { role: Role::Volunteer { free: f, queued }, .. }) = self.clients.get_mut(&id) else {
            return;
        };
        self.free_slots = self.free_slots - u64::from(*f) + u64::from(free);
        *f = free;
        if let Some(sh) = &mut self.shared {
            sh.ops.push_back(StoreOp::Slots { client: id, free });
            return;
        }
        if free > 0 && !*queued {
            *queued = true;
            self.ready.push_back(id);
        }
    }

    /// A slot taken for an offer that came to nothing is the volunteer's again.
    pub(super) fn give_back_slot(&mut self, v: &Vol) {
        if self.shared.is_some() {
            let volunteer = self.vref(v);
            return self.store(StoreOp::GiveBack { volunteer });
        }
        let Vol::Local(v) = *v else { return };
        let free = match self.clients.get(&v) {
            Some(Client { role: Role::Volunteer { free, .. }, .. }) => *free,
            _ => return,
        };
        self.set_free(v, (free + 1).min(self.cfg.max_slots_per_volunteer));
    }
}

impl From<ToVolunteer> for Outgoing {
    fn from(m: ToVolunteer) -> Outgoing {
        match m {
            ToVolunteer::Offer { session, sdp, ttl_ms } => Outgoing::Offer { session, sdp, ttl_ms },
            ToVolunteer::Candidate { session, candidate } => Outgoing::Candidate { session, candidate },
            ToVolunteer::Cancel { session, reason } => Outgoing::Cancel { session, reason },
        }
    }
}
