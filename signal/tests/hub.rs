//! The matchmaking core driven directly (no sockets, time passed in): every state, timeout
//! and limit of docs/SIGNALING.md §4–§6.

use broflake_signal::hub::{Action, ClientId, Hub, HubConfig, Refusal};
use broflake_signal::msg::{ErrorCode, Outgoing, SessionId};
use std::net::IpAddr;

const SDP: &str = "v=0\\r\\no=- 1 1 IN IP4 0.0.0.0\\r\\ns=-\\r\\nt=0 0\\r\\n";

struct T {
    hub: Hub,
    now: u64,
    /// Actions taken out while looking for a `hello`, given back by the next `actions()`.
    held: Vec<Action>,
}

fn ip(n: u8) -> IpAddr {
    IpAddr::from([192, 0, 2, n])
}

impl T {
    fn new() -> T {
        T::with(HubConfig::default())
    }
    fn with(cfg: HubConfig) -> T {
        T { hub: Hub::new(cfg, [7; 32]), now: 1_000, held: Vec::new() }
    }
    /// Connects a client and takes the `hello` every client gets first.
    fn connect(&mut self, n: u8) -> ClientId {
        let id = self.hub.connect(self.now, ip(n)).unwrap();
        let mut a = self.actions();
        let i = a.iter().position(|x| matches!(x, Action::Send(c, Outgoing::Hello { .. }) if *c == id));
        a.remove(i.unwrap_or_else(|| panic!("no hello for {id} in {a:?}")));
        self.held = a;
        id
    }
    fn say(&mut self, id: ClientId, text: &str) {
        self.hub.message(self.now, id, text);
    }
    fn advance(&mut self, ms: u64) {
        self.now += ms;
        self.hub.timeout(self.now);
    }
    fn actions(&mut self) -> Vec<Action> {
        let mut a = std::mem::take(&mut self.held);
        a.extend(std::iter::from_fn(|| self.hub.poll_action()));
        a
    }
    fn volunteer(&mut self, n: u8, slots: u32) -> ClientId {
        let v = self.connect(n);
        self.say(v, &format!(r#"{{"type":"volunteer","versions":[1],"slots":{slots}}}"#));
        let a = self.actions();
        assert!(matches!(&a[..], [Action::Send(id, Outgoing::Registered { version: 1, .. })] if *id == v), "{a:?}");
        v
    }
    fn consumer(&mut self, n: u8) -> ClientId {
        let c = self.connect(n);
        self.say(c, &format!(r#"{{"type":"consumer","versions":[1],"offer":"{SDP}"}}"#));
        c
    }
}

/// The session of the `matched` sent to `c` in `a`.
fn matched(a: &[Action], c: ClientId) -> SessionId {
    a.iter()
        .find_map(|x| match x {
            Action::Send(id, Outgoing::Matched { session, .. }) if *id == c => Some(*session),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no matched for {c} in {a:?}"))
}

/// Which client got the offer of session `s` in `a`.
fn offered_to(a: &[Action], s: SessionId) -> ClientId {
    a.iter()
        .find_map(|x| match x {
            Action::Send(id, Outgoing::Offer { session, .. }) if *session == s => Some(*id),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no offer for {s} in {a:?}"))
}

fn closed(a: &[Action], id: ClientId) -> Option<u16> {
    a.iter().find_map(|x| match x {
        Action::Close(c, code, _) if *c == id => Some(*code),
        _ => None,
    })
}

fn error(a: &[Action], id: ClientId) -> Option<ErrorCode> {
    a.iter().find_map(|x| match x {
        Action::Send(c, Outgoing::Error { code, .. }) if *c == id => Some(*code),
        _ => None,
    })
}

#[test]
fn a_consumer_is_matched_and_offer_answer_and_candidates_flow_both_ways() {
    let mut t = T::new();
    let v = t.volunteer(1, 2);
    assert_eq!(t.hub.free_slots(), 2);
    let c = t.consumer(2);
    let a = t.actions();
    let s = matched(&a, c);
    assert_eq!(offered_to(&a, s), v);
    assert_eq!(t.hub.free_slots(), 1, "the match takes a slot");
    t.say(
        c,
        &format!(r#"{{"type":"candidate","session":"{s}","candidate":"candidate:1 1 udp 1 10.0.0.2 5 typ host"}}"#),
    );
    let a = t.actions();
    assert!(matches!(&a[..], [Action::Send(id, Outgoing::Candidate { .. })] if *id == v), "{a:?}");
    t.say(v, &format!(r#"{{"type":"answer","session":"{s}","sdp":"{SDP}"}}"#));
    let a = t.actions();
    assert!(
        matches!(&a[..], [Action::Send(id, Outgoing::Answer { session, .. })] if *id == c && *session == s),
        "{a:?}"
    );
    t.say(v, &format!(r#"{{"type":"candidate","session":"{s}","candidate":""}}"#));
    let a = t.actions();
    assert!(matches!(&a[..], [Action::Send(id, Outgoing::Candidate { .. })] if *id == c), "{a:?}");
    assert_eq!(t.hub.stats.matches, 1);
    t.say(c, &format!(r#"{{"type":"done","session":"{s}"}}"#));
    assert_eq!(closed(&t.actions(), c), Some(1000));
    assert_eq!(t.hub.sessions(), 0, "the service forgets the session");
    // A late candidate for a forgotten session is ignored, not an error.
    t.say(v, &format!(r#"{{"type":"candidate","session":"{s}","candidate":""}}"#));
    assert!(t.actions().is_empty());
}

#[test]
fn no_free_volunteer_is_a_clear_answer_with_retry_after() {
    let mut t = T::new();
    let c = t.consumer(2);
    let a = t.actions();
    assert!(
        a.iter().any(|x| matches!(x, Action::Send(id, Outgoing::Unavailable { retry_after_ms: 5000, .. }) if *id == c)),
        "{a:?}"
    );
    assert_eq!(closed(&a, c), Some(1000));
    assert_eq!(t.hub.stats.unavailable, 1);
    // A volunteer with zero slots is no help either.
    t.volunteer(1, 0);
    let c = t.consumer(3);
    assert!(t.actions().iter().any(|x| matches!(x, Action::Send(id, Outgoing::Unavailable { .. }) if *id == c)));
}

#[test]
fn declines_move_the_offer_with_its_candidates_to_the_next_volunteer_then_give_up() {
    let mut t = T::with(HubConfig { max_attempts: 2, ..HubConfig::default() });
    let v1 = t.volunteer(1, 1);
    let v2 = t.volunteer(3, 1);
    let v3 = t.volunteer(4, 1);
    let c = t.consumer(2);
    let a = t.actions();
    let s = matched(&a, c);
    let first = offered_to(&a, s);
    assert_eq!(first, v1, "round robin starts with the longest waiting");
    t.say(
        c,
        &format!(r#"{{"type":"candidate","session":"{s}","candidate":"candidate:1 1 udp 1 10.0.0.2 5 typ host"}}"#),
    );
    t.actions();
    t.say(first, &format!(r#"{{"type":"decline","session":"{s}","reason":"busy"}}"#));
    let a = t.actions();
    let second = offered_to(&a, s);
    assert_eq!(second, v2);
    assert!(
        a.iter().any(|x| matches!(x, Action::Send(id, Outgoing::Candidate { .. }) if *id == second)),
        "the consumer's earlier candidates follow the offer: {a:?}"
    );
    t.say(second, &format!(r#"{{"type":"decline","session":"{s}"}}"#));
    let a = t.actions();
    assert!(a.iter().any(|x| matches!(x, Action::Send(id, Outgoing::Cancel { .. }) if *id == c)), "{a:?}");
    assert!(a.iter().any(|x| matches!(x, Action::Send(id, Outgoing::Unavailable { .. }) if *id == c)), "{a:?}");
    assert_eq!(closed(&a, c), Some(1000));
    assert!(!a.iter().any(|x| matches!(x, Action::Send(id, _) if *id == v3)), "max_attempts bounds the tries");
    assert_eq!(t.hub.sessions(), 0);
}

#[test]
fn a_volunteer_that_does_not_answer_in_time_loses_the_offer_and_gets_its_slot_back() {
    let mut t = T::new();
    let v1 = t.volunteer(1, 1);
    let v2 = t.volunteer(3, 1);
    let c = t.consumer(2);
    let s = matched(&t.actions(), c);
    t.advance(9_999);
    assert!(t.actions().is_empty(), "not before answer_timeout");
    t.advance(1);
    let a = t.actions();
    assert!(a
        .iter()
        .any(|x| matches!(x, Action::Send(id, Outgoing::Cancel { session, .. }) if *id == v1 && *session == s)));
    assert_eq!(offered_to(&a, s), v2);
    assert_eq!(t.hub.stats.answer_timeouts, 1);
    assert_eq!(t.hub.free_slots(), 1, "v1's slot is free again, v2's is taken");
    // v1's late answer (the offer moved on to v2) gets a non-fatal unknown_session.
    t.say(v1, &format!(r#"{{"type":"answer","session":"{s}","sdp":"{SDP}"}}"#));
    let a = t.actions();
    assert_eq!(error(&a, v1), Some(ErrorCode::UnknownSession), "{a:?}");
    assert_eq!(closed(&a, v1), None, "not fatal: it is a race, not misuse");
}

#[test]
fn a_volunteer_leaving_moves_offers_and_cancels_answered_sessions() {
    let mut t = T::new();
    let v1 = t.volunteer(1, 2);
    let v2 = t.volunteer(3, 1);
    let c1 = t.consumer(2);
    let s1 = matched(&t.actions(), c1);
    t.say(v1, &format!(r#"{{"type":"answer","session":"{s1}","sdp":"{SDP}"}}"#));
    t.actions();
    // The next consumer goes to v2 (round robin), the one after to v1.
    let c2 = t.consumer(4);
    let s2 = matched(&t.actions(), c2);
    let c3 = t.consumer(5);
    let a = t.actions();
    let s3 = matched(&a, c3);
    assert_eq!(offered_to(&a, s3), v1);
    t.hub.disconnect(t.now, v1);
    let a = t.actions();
    assert!(a.iter().any(|x| matches!(x, Action::Send(id, Outgoing::Cancel { .. }) if *id == c1)), "{a:?}");
    assert_eq!(closed(&a, c1), Some(1000));
    // v2 has no free slot left (s2 holds it): s3 cannot move and the consumer hears so.
    assert!(a.iter().any(|x| matches!(x, Action::Send(id, Outgoing::Unavailable { .. }) if *id == c3)), "{a:?}");
    assert_eq!(t.hub.sessions(), 1, "only s2, on v2, is left");
    let _ = (s2, v2);
    assert_eq!(t.hub.volunteers(), 1);
}

#[test]
fn first_message_deadline_and_idle_volunteers() {
    let mut t = T::new();
    let silent = t.connect(1);
    t.advance(9_999);
    assert!(t.actions().is_empty(), "not before hello_timeout");
    t.advance(1);
    let a = t.actions();
    assert_eq!(error(&a, silent), Some(ErrorCode::Timeout));
    assert_eq!(closed(&a, silent), Some(4408));
    let quiet = t.volunteer(2, 1);
    let chatty = t.volunteer(3, 1);
    let registered = t.now;
    let mut quiet_closed_at = None;
    for _ in 0..9 {
        t.advance(10_000);
        t.say(chatty, r#"{"type":"ping"}"#);
        let a = t.actions();
        assert!(a.iter().any(|x| matches!(x, Action::Send(id, Outgoing::Pong) if *id == chatty)));
        assert_eq!(closed(&a, chatty), None, "a pinging volunteer stays");
        if let Some(code) = closed(&a, quiet) {
            assert_eq!(code, 4408);
            quiet_closed_at = Some(t.now);
        }
    }
    assert_eq!(quiet_closed_at, Some(registered + 60_000), "a silent volunteer goes at idle_timeout");
    assert_eq!(t.hub.volunteers(), 2, "closing is the caller's job; it disconnects then");
}

#[test]
fn limits_per_ip_and_consumer_rate() {
    let mut t =
        T::with(HubConfig { max_clients_per_ip: 3, consumer_burst: 2, consumer_per_sec: 1, ..HubConfig::default() });
    for _ in 0..3 {
        t.connect(9);
    }
    assert_eq!(t.hub.connect(t.now, ip(9)), Err(Refusal::PerIpLimit));
    t.connect(10);
    t.volunteer(1, 64);
    let a = t.consumer(20);
    let b = t.consumer(20);
    let c = t.consumer(20);
    let acts = t.actions();
    matched(&acts, a);
    matched(&acts, b);
    assert_eq!(error(&acts, c), Some(ErrorCode::RateLimited));
    assert_eq!(closed(&acts, c), Some(4429));
    t.hub.disconnect(t.now, c);
    t.now += 1_000;
    let d = t.consumer(20);
    matched(&t.actions(), d);
}

#[test]
fn protocol_misuse_gets_specific_errors() {
    let mut t = T::new();
    let x = t.connect(1);
    t.say(x, r#"{"type":"slots","free":1}"#);
    assert_eq!(error(&t.actions(), x), Some(ErrorCode::Unexpected));
    let v = t.volunteer(2, 1);
    t.say(v, r#"{"type":"volunteer","versions":[1],"slots":1}"#);
    assert_eq!(error(&t.actions(), v), Some(ErrorCode::Unexpected));
    let old = t.connect(3);
    t.say(old, r#"{"type":"volunteer","versions":[2],"slots":1}"#);
    let a = t.actions();
    assert_eq!(error(&a, old), Some(ErrorCode::UnsupportedVersion));
    assert_eq!(closed(&a, old), Some(4426));
    let bad = t.connect(4);
    t.say(bad, "{");
    let a = t.actions();
    assert_eq!(error(&a, bad), Some(ErrorCode::BadMessage));
    assert_eq!(closed(&a, bad), Some(4400));
    t.say(bad, r#"{"type":"ping"}"#);
    assert!(t.actions().is_empty(), "nothing more for a closing client");
    t.volunteer(5, 1);
    let c = t.consumer(6);
    let s = matched(&t.actions(), c);
    // Someone else's session: answering it is refused (non-fatal), candidates are dropped.
    let stranger = t.volunteer(7, 1);
    t.say(stranger, &format!(r#"{{"type":"answer","session":"{s}","sdp":"{SDP}"}}"#));
    assert_eq!(error(&t.actions(), stranger), Some(ErrorCode::UnknownSession));
    t.say(stranger, &format!(r#"{{"type":"candidate","session":"{s}","candidate":""}}"#));
    assert!(t.actions().is_empty(), "a stranger's candidate goes nowhere");
    // Unknown types are ignored and counted.
    t.say(c, r#"{"type":"x-new","v":1}"#);
    assert!(t.actions().is_empty());
    assert_eq!(t.hub.stats.unknown_types, 1);
}

#[test]
fn candidates_per_side_are_bounded_and_sessions_expire() {
    let mut t = T::with(HubConfig { max_candidates_per_side: 3, ..HubConfig::default() });
    let v = t.volunteer(1, 1);
    let c = t.consumer(2);
    let s = matched(&t.actions(), c);
    for _ in 0..5 {
        t.say(c, &format!(r#"{{"type":"candidate","session":"{s}","candidate":""}}"#));
    }
    let forwarded =
        t.actions().iter().filter(|x| matches!(x, Action::Send(id, Outgoing::Candidate { .. }) if *id == v)).count();
    assert_eq!(forwarded, 3);
    assert_eq!(t.hub.stats.candidates_dropped, 2);
    t.say(v, &format!(r#"{{"type":"answer","session":"{s}","sdp":"{SDP}"}}"#));
    t.actions();
    t.advance(30_000);
    let a = t.actions();
    assert!(a.iter().any(|x| matches!(x, Action::Send(id, Outgoing::Cancel { .. }) if *id == c)), "{a:?}");
    assert_eq!(closed(&a, c), Some(1000));
    assert_eq!(t.hub.sessions(), 0);
    assert_eq!(t.hub.stats.sessions_expired, 1);
}

#[test]
fn draining_sends_goaway_to_volunteers_and_turns_consumers_away() {
    let mut t = T::new();
    let v = t.volunteer(1, 1);
    t.hub.drain();
    let a = t.actions();
    assert!(matches!(&a[..], [Action::Send(id, Outgoing::Goaway { .. })] if *id == v), "{a:?}");
    let c = t.consumer(2);
    let a = t.actions();
    assert!(a.iter().any(|x| matches!(x, Action::Send(id, Outgoing::Unavailable { .. }) if *id == c)));
    let late = t.connect(3);
    t.say(late, r#"{"type":"volunteer","versions":[1],"slots":1}"#);
    let a = t.actions();
    assert!(a.iter().any(|x| matches!(x, Action::Send(id, Outgoing::Goaway { .. }) if *id == late)));
    assert_eq!(closed(&a, late), Some(1000));
}

#[test]
fn slots_are_shared_round_robin_and_given_back() {
    let mut t = T::new();
    let v1 = t.volunteer(1, 2);
    let v2 = t.volunteer(3, 2);
    let mut to = Vec::new();
    for n in 0..4 {
        let c = t.consumer(10 + n);
        let a = t.actions();
        let s = matched(&a, c);
        to.push(offered_to(&a, s));
    }
    assert_eq!(to, vec![v1, v2, v1, v2]);
    assert_eq!(t.hub.free_slots(), 0);
    let c = t.consumer(30);
    assert!(t.actions().iter().any(|x| matches!(x, Action::Send(id, Outgoing::Unavailable { .. }) if *id == c)));
    t.say(v2, r#"{"type":"slots","free":1}"#);
    assert_eq!(t.hub.free_slots(), 1);
    let c = t.consumer(31);
    let a = t.actions();
    assert_eq!(offered_to(&a, matched(&a, c)), v2);
}

#[test]
fn done_from_the_volunteer_ends_the_consumers_signaling_too() {
    let mut t = T::new();
    let v = t.volunteer(1, 1);
    let c = t.consumer(2);
    let s = matched(&t.actions(), c);
    t.say(v, &format!(r#"{{"type":"answer","session":"{s}","sdp":"{SDP}"}}"#));
    t.actions();
    t.say(v, &format!(r#"{{"type":"done","session":"{s}"}}"#));
    let a = t.actions();
    assert_eq!(closed(&a, c), Some(1000), "{a:?}");
    assert_eq!(closed(&a, v), None, "the volunteer stays registered");
    assert!(!a.iter().any(|x| matches!(x, Action::Send(id, Outgoing::Cancel { .. }) if *id == v)), "{a:?}");
    assert_eq!(t.hub.sessions(), 0);
}
