//! Pair-harness tests: a client and a server session driven against each other in memory
//! with a virtual clock (the quinn-proto model), plus a two-hop relay chain.

use broflake_proto::client::RouteError;
use broflake_proto::relay::RouteTable;
use broflake_proto::{
    Capabilities, ClientConfig, ClientEvent, ClientSession, Close, ErrorCode, Frame, Role, ServerConfig, ServerEvent,
    ServerPing, ServerSession, SessionId, Timestamp,
};
use std::collections::VecDeque;

/// Owned copies of events, for assertions after the borrow of the message ends.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Hello { version: u64, role: Role, user_agent: Option<String> },
    Welcome { version: u64, keepalive_ms: u64, caps: u64, max_routes: u64 },
    Data { label: u64, packet: Vec<u8>, new_route: bool },
    RouteClosed { label: u64, code: ErrorCode },
    GoAway { grace_ms: u64, reconnect: String },
    Pong,
}

/// How the server admits a HELLO (stands in for the I/O layer's limits and drain state).
#[derive(Clone)]
enum Admission {
    Accept,
    Refuse(ErrorCode, u64, &'static str),
}

struct Pair {
    now: Timestamp,
    scfg: ServerConfig,
    ccfg: ClientConfig,
    server: ServerSession,
    client: ClientSession,
    to_server: VecDeque<Vec<u8>>,
    to_client: VecDeque<Vec<u8>>,
    server_events: Vec<Ev>,
    client_events: Vec<Ev>,
    server_close: Option<Close>,
    client_close: Option<Close>,
    server_closed_at: Option<Timestamp>,
    client_closed_at: Option<Timestamp>,
    admission: Admission,
    /// Black-hole switches: drop everything in that direction (a middlebox that cut the flow).
    drop_to_server: bool,
    drop_to_client: bool,
    frames_to_server: usize,
}

impl Pair {
    fn new(scfg: ServerConfig, ccfg: ClientConfig) -> Self {
        let now = Timestamp(1_000);
        Pair {
            now,
            scfg,
            ccfg,
            server: ServerSession::new(now),
            client: ClientSession::new(42),
            to_server: VecDeque::new(),
            to_client: VecDeque::new(),
            server_events: Vec::new(),
            client_events: Vec::new(),
            server_close: None,
            client_close: None,
            server_closed_at: None,
            client_closed_at: None,
            admission: Admission::Accept,
            drop_to_server: false,
            drop_to_client: false,
            frames_to_server: 0,
        }
    }

    fn start(&mut self) {
        let mut tx = Vec::new();
        self.client.start(&self.ccfg, self.now, &mut tx);
        self.push_to_server(tx);
        self.drive();
    }

    fn connected() -> Self {
        let mut p = Pair::new(ServerConfig::default(), ClientConfig::default());
        p.start();
        assert!(p.client.is_open(), "handshake failed: {:?}", p.client_close);
        p
    }

    fn push_to_server(&mut self, tx: Vec<u8>) {
        if !tx.is_empty() && !self.drop_to_server {
            self.frames_to_server += 1;
            self.to_server.push_back(tx);
        }
    }

    fn push_to_client(&mut self, tx: Vec<u8>) {
        if !tx.is_empty() && !self.drop_to_client {
            self.to_client.push_back(tx);
        }
    }

    /// Delivers queued messages both ways until nothing is in flight.
    fn drive(&mut self) {
        loop {
            if let Some(msg) = self.to_server.pop_front() {
                let mut tx = Vec::new();
                if self.server_close.is_none() {
                    let admission = self.admission.clone();
                    let now = self.now;
                    let events = &mut self.server_events;
                    let scfg = &self.scfg;
                    let r = self.server.handle_message(scfg, now, &msg, &mut tx, |s, ev, tx| {
                        match ev {
                            ServerEvent::Hello { hello, version } => {
                                events.push(Ev::Hello {
                                    version,
                                    role: hello.role,
                                    user_agent: hello.extensions.user_agent().map(str::to_owned),
                                });
                                match admission {
                                    Admission::Accept => s.accept(scfg, now, SessionId([7; 16]), tx)?,
                                    Admission::Refuse(code, retry, reason) => {
                                        return Err(s.refuse(code, retry, reason, tx))
                                    }
                                }
                            }
                            ServerEvent::Data { label, packet, new_route } => {
                                events.push(Ev::Data { label, packet: packet.to_vec(), new_route })
                            }
                            ServerEvent::RouteClosed { label, code } => events.push(Ev::RouteClosed { label, code }),
                            ServerEvent::Pong => events.push(Ev::Pong),
                            ServerEvent::None => {}
                        }
                        Ok(())
                    });
                    if let Err(c) = r {
                        self.server_close = Some(c);
                    }
                }
                self.push_to_client(tx);
                continue;
            }
            if let Some(msg) = self.to_client.pop_front() {
                let mut tx = Vec::new();
                if self.client_close.is_none() {
                    let events = &mut self.client_events;
                    let r = self.client.handle_message(&self.ccfg, self.now, &msg, &mut tx, |_, ev, _| {
                        match ev {
                            ClientEvent::Welcome(n) => events.push(Ev::Welcome {
                                version: n.version,
                                keepalive_ms: n.keepalive_ms,
                                caps: n.capabilities.known().0,
                                max_routes: n.max_routes,
                            }),
                            ClientEvent::Data { label, packet } => {
                                events.push(Ev::Data { label, packet: packet.to_vec(), new_route: false })
                            }
                            ClientEvent::RouteClosed { label, code } => events.push(Ev::RouteClosed { label, code }),
                            ClientEvent::GoAway { grace_ms, reconnect } => {
                                events.push(Ev::GoAway { grace_ms, reconnect: reconnect.to_owned() })
                            }
                            ClientEvent::Pong { .. } => events.push(Ev::Pong),
                            ClientEvent::None => {}
                        }
                        Ok(())
                    });
                    if let Err(c) = r {
                        self.client_close = Some(c);
                    }
                }
                self.push_to_server(tx);
                continue;
            }
            break;
        }
    }

    /// Moves the clock to `until`, stopping at every deadline either side reports.
    fn advance_to(&mut self, until: Timestamp) {
        loop {
            let mut next = until;
            if self.server_close.is_none() {
                if let Some(t) = self.server.next_timeout(&self.scfg) {
                    next = next.min(t);
                }
            }
            if self.client_close.is_none() {
                if let Some(t) = self.client.poll_timeout(&self.ccfg) {
                    next = next.min(t);
                }
            }
            self.now = self.now.max(next);
            if self.server_close.is_none() {
                let mut tx = Vec::new();
                if let Err(c) = self.server.on_timeout(&self.scfg, self.now, &mut tx) {
                    self.server_close = Some(c);
                }
                self.push_to_client(tx);
            }
            if self.client_close.is_none() {
                let mut tx = Vec::new();
                if let Err(c) = self.client.handle_timeout(&self.ccfg, self.now, &mut tx) {
                    self.client_close = Some(c);
                }
                self.push_to_server(tx);
            }
            self.drive();
            if self.server_close.is_some() && self.server_closed_at.is_none() {
                self.server_closed_at = Some(self.now);
            }
            if self.client_close.is_some() && self.client_closed_at.is_none() {
                self.client_closed_at = Some(self.now);
            }
            if self.now >= until || (self.server_close.is_some() && self.client_close.is_some()) {
                break;
            }
        }
    }

    fn advance(&mut self, ms: u64) {
        self.advance_to(self.now + ms);
    }

    fn client_send(&mut self, f: impl FnOnce(&mut ClientSession, &mut Vec<u8>)) {
        let mut tx = Vec::new();
        f(&mut self.client, &mut tx);
        self.push_to_server(tx);
        self.drive();
    }

    fn server_send(&mut self, f: impl FnOnce(&mut ServerSession, &mut Vec<u8>)) {
        let mut tx = Vec::new();
        f(&mut self.server, &mut tx);
        self.push_to_client(tx);
        self.drive();
    }
}

fn refusal_of(p: &Pair) -> &Close {
    p.client_close.as_ref().expect("client saw a close")
}

#[test]
fn successful_negotiation() {
    let ccfg = ClientConfig { user_agent: Some("pair-test/1".into()), ..ClientConfig::default() };
    let mut p = Pair::new(ServerConfig::default(), ccfg);
    p.start();
    assert_eq!(
        p.server_events,
        vec![Ev::Hello { version: 1, role: Role::RELAY, user_agent: Some("pair-test/1".into()) }]
    );
    assert_eq!(
        p.client_events,
        vec![Ev::Welcome {
            version: 1,
            keepalive_ms: 20_000,
            caps: Capabilities::PING | Capabilities::ROUTES | Capabilities::GOAWAY,
            max_routes: 256,
        }]
    );
    assert!(p.server.is_open() && p.client.is_open());
    assert!(!p.server.server_pings(), "a client that pings is never pinged");
    assert_eq!(p.client.negotiated().unwrap().session_id, SessionId([7; 16]));
}

#[test]
fn refusal_unsupported_version_client_too_new() {
    let ccfg = ClientConfig { min_version: 2, max_version: 3, ..ClientConfig::default() };
    let mut p = Pair::new(ServerConfig::default(), ccfg);
    p.start();
    let c = refusal_of(&p);
    assert!(c.by_peer);
    assert_eq!(c.code, ErrorCode::UNSUPPORTED_VERSION);
    assert_eq!(c.close_code(), 4001);
    assert_eq!(c.reason, "unsupported version: client 2-3, server 1-1");
    assert_eq!(p.server_close.as_ref().unwrap().code, ErrorCode::UNSUPPORTED_VERSION);
    assert!(p.server.is_closed());
}

#[test]
fn refusal_unsupported_version_client_too_old() {
    let scfg = ServerConfig { min_version: 2, max_version: 3, ..ServerConfig::default() };
    let mut p = Pair::new(scfg, ClientConfig::default());
    p.start();
    assert_eq!(refusal_of(&p).reason, "unsupported version: client 1-1, server 2-3");
}

#[test]
fn server_choosing_a_version_outside_the_client_range_is_rejected_by_the_client() {
    // A broken server that ignores the client's range: the client must not go on.
    let mut client = ClientSession::new(1);
    let ccfg = ClientConfig::default();
    let mut tx = Vec::new();
    client.start(&ccfg, Timestamp(0), &mut tx);
    let mut msg = Vec::new();
    Frame::Welcome(broflake_proto::frame::Welcome {
        version: 5,
        session_id: SessionId::NONE,
        capabilities: Capabilities(0),
        keepalive_ms: 20_000,
        idle_timeout_ms: 60_000,
        max_frame_size: 16_384,
        max_routes: 1,
        extensions: broflake_proto::frame::Extensions::EMPTY,
    })
    .encode(0, &mut msg);
    let mut out = Vec::new();
    let err = client.handle_message(&ccfg, Timestamp(1), &msg, &mut out, |_, _, _| Ok(())).unwrap_err();
    assert_eq!(err.code, ErrorCode::UNSUPPORTED_VERSION);
    assert!(!err.by_peer);
    assert!(client.is_closed());
}

#[test]
fn each_admission_refusal_reaches_the_client_with_code_and_reason() {
    let cases = [
        (ErrorCode::SERVER_FULL, 5_000, "server full: 20000 connections", 4008),
        (ErrorCode::PER_IP_LIMIT, 1_000, "too many connections from 127.0.0.1", 4009),
        (ErrorCode::DRAINING, 0, "server is draining", 4010),
    ];
    for (code, retry, reason, close) in cases {
        let mut p = Pair::new(ServerConfig::default(), ClientConfig::default());
        p.admission = Admission::Refuse(code, retry, reason);
        p.start();
        let c = refusal_of(&p);
        assert_eq!((c.code, c.retry_after_ms, c.reason.as_ref(), c.close_code()), (code, retry, reason, close));
    }
}

#[test]
fn refusal_bad_role() {
    let ccfg = ClientConfig { role: Role(9), ..ClientConfig::default() };
    let mut p = Pair::new(ServerConfig::default(), ccfg);
    p.start();
    let c = refusal_of(&p);
    assert_eq!((c.code, c.close_code()), (ErrorCode::BAD_ROLE, 4011));
    assert_eq!(c.reason, "role 9 is not allowed here");
}

#[test]
fn refusal_handshake_timeout() {
    let mut p = Pair::new(ServerConfig::default(), ClientConfig::default());
    // The client never sends HELLO (slowloris after the upgrade).
    p.advance(9_999);
    assert!(p.server_close.is_none());
    p.advance(1);
    let c = p.server_close.as_ref().unwrap();
    assert_eq!((c.code, c.close_code()), (ErrorCode::HANDSHAKE_TIMEOUT, 4006));
    assert_eq!(p.to_client.len(), 0, "drive delivered the REFUSE");
}

#[test]
fn client_times_out_without_welcome() {
    let mut p = Pair::new(ServerConfig::default(), ClientConfig::default());
    p.drop_to_server = true;
    p.start();
    p.advance(10_000);
    assert_eq!(p.client_close.as_ref().unwrap().code, ErrorCode::HANDSHAKE_TIMEOUT);
}

#[test]
fn ping_pong_keeps_the_connection_alive_well_past_the_idle_timeout() {
    let mut p = Pair::connected();
    p.advance(5 * 60_000);
    assert!(p.server_close.is_none() && p.client_close.is_none());
    let pongs = p.client.pongs_received();
    // Jittered interval in (16 s, 20 s]: 15 to 18 PINGs in five minutes.
    assert!((15..=19).contains(&pongs), "pongs {pongs}");
    assert_eq!(p.client.pings_sent(), pongs);
    assert!(!p.server.server_pings());
}

#[test]
fn missed_pong_is_detected_by_the_client() {
    let mut p = Pair::connected();
    let t0 = p.now;
    p.drop_to_client = true; // the middlebox silently swallows the server's packets
    p.advance(60_000);
    let c = p.client_close.as_ref().expect("dead link detected");
    assert_eq!(c.code, ErrorCode::IDLE_TIMEOUT);
    assert!(c.reason.starts_with("pong timeout"));
    // First PING after at most 20 s, then the 10 s pong timeout.
    let after = p.client_closed_at.unwrap().since(t0);
    assert!((16_000 + 10_000..=30_000).contains(&after), "detected after {after} ms");
}

#[test]
fn silent_client_is_closed_for_idleness_at_the_idle_timeout() {
    let mut p = Pair::connected();
    let t0 = p.now;
    p.drop_to_server = true;
    p.advance(120_000);
    let c = p.server_close.as_ref().expect("idle close");
    assert_eq!((c.code, c.close_code()), (ErrorCode::IDLE_TIMEOUT, 4007));
    assert_eq!(p.server_closed_at.unwrap().since(t0), 60_000);
}

#[test]
fn server_ping_mode_keeps_a_client_without_ping_alive() {
    let ccfg = ClientConfig { send_pings: false, ..ClientConfig::default() };
    let mut p = Pair::new(ServerConfig::default(), ccfg);
    p.start();
    assert!(p.server.server_pings(), "compat: client did not announce PING");
    match p.client_events[0] {
        Ev::Welcome { caps, .. } => assert!(caps & Capabilities::SERVER_PING != 0),
        ref e => panic!("{e:?}"),
    }
    p.advance(4 * 60_000);
    assert!(p.server_close.is_none() && p.client_close.is_none());
    let pongs = p.server_events.iter().filter(|e| **e == Ev::Pong).count();
    assert_eq!(pongs, 12, "one server PING every 20 s");
    assert_eq!(p.client.pings_sent(), 0);
}

#[test]
fn server_ping_all_pings_even_pinging_clients() {
    let scfg = ServerConfig { server_ping: ServerPing::All, ..ServerConfig::default() };
    let mut p = Pair::new(scfg, ClientConfig::default());
    p.start();
    assert!(p.server.server_pings());
    match p.client_events[0] {
        Ev::Welcome { caps, .. } => {
            assert_eq!(caps & (Capabilities::PING | Capabilities::SERVER_PING), Capabilities::SERVER_PING)
        }
        ref e => panic!("{e:?}"),
    }
    p.advance(3 * 60_000);
    assert!(p.server_close.is_none() && p.client_close.is_none());
    assert_eq!(p.server_events.iter().filter(|e| **e == Ev::Pong).count(), 9);
    assert_eq!(p.client.pings_sent(), 0, "PING is not in effect, so the client does not ping");
}

#[test]
fn probes_may_not_send_data() {
    let ccfg = ClientConfig { role: Role::PROBE, ..ClientConfig::default() };
    let mut p = Pair::new(ServerConfig::default(), ccfg);
    p.start();
    let l = p.client.open_route().unwrap();
    p.client_send(|c, tx| assert!(c.send_data(l, b"x", tx).is_ok()));
    assert_eq!(p.server_close.as_ref().unwrap().code, ErrorCode::PROTOCOL_VIOLATION);
}

#[test]
fn admission_refusals_come_before_the_role_check() {
    let ccfg = ClientConfig { role: Role(9), ..ClientConfig::default() };
    let mut p = Pair::new(ServerConfig::default(), ccfg);
    p.admission = Admission::Refuse(ErrorCode::SERVER_FULL, 0, "full");
    p.start();
    assert_eq!(refusal_of(&p).code, ErrorCode::SERVER_FULL);
}

#[test]
fn server_pings_do_not_keep_a_black_holed_client_alive() {
    // Server pings answer nothing when the client's direction is cut: the idle timeout
    // still closes the connection.
    let ccfg = ClientConfig { send_pings: false, ..ClientConfig::default() };
    let mut p = Pair::new(ServerConfig::default(), ccfg);
    p.start();
    assert!(p.server.server_pings());
    p.drop_to_server = true;
    p.advance(61_000);
    assert_eq!(p.server_close.as_ref().unwrap().code, ErrorCode::IDLE_TIMEOUT);
}

#[test]
fn goaway_drains_the_connection() {
    let mut p = Pair::connected();
    let label = p.client.open_route().unwrap();
    p.client_send(|c, tx| assert!(c.send_data(label, b"quic-1", tx).is_ok()));
    let now = p.now;
    p.server_send(|s, tx| s.goaway(now, 30_000, "wss://other.example/broflake", tx));
    assert_eq!(
        p.client_events.last(),
        Some(&Ev::GoAway { grace_ms: 30_000, reconnect: "wss://other.example/broflake".into() })
    );
    assert!(p.client.is_going_away());
    assert_eq!(p.client.open_route(), Err(RouteError::GoingAway));
    // Existing routes still flow during the grace period.
    p.client_send(|c, tx| assert!(c.send_data(label, b"quic-2", tx).is_ok()));
    assert_eq!(p.server_events.last(), Some(&Ev::Data { label, packet: b"quic-2".to_vec(), new_route: false }));
    // A new label during the drain is closed with DRAINING.
    p.client_send(|_, tx| broflake_proto::frame::encode_data(9, b"x", tx));
    assert_eq!(p.client_events.last(), Some(&Ev::RouteClosed { label: 9, code: ErrorCode::DRAINING }));
    // The client keeps pinging; the server closes at the end of the grace period.
    p.advance(40_000);
    let c = p.server_close.as_ref().unwrap();
    assert_eq!((c.code, c.close_code(), c.reason.as_ref()), (ErrorCode::DRAINING, 4010, "drained"));
    assert_eq!(p.server_closed_at.unwrap().since(now), 30_000);
}

#[test]
fn routes_open_close_limit_and_unknown() {
    let scfg = ServerConfig { max_routes: 2, ..ServerConfig::default() };
    let mut p = Pair::new(scfg, ClientConfig::default());
    p.start();
    let a = p.client.open_route().unwrap();
    let b = p.client.open_route().unwrap();
    assert_eq!((a, b), (0, 1));
    assert_eq!(p.client.open_route(), Err(RouteError::Limit(2)));
    p.client_send(|c, tx| {
        c.send_data(a, b"a", tx).unwrap();
        c.send_data(b, b"b", tx).unwrap();
        c.send_data(a, b"a2", tx).unwrap();
    });
    assert_eq!(
        p.server_events[1..],
        [
            Ev::Data { label: 0, packet: b"a".to_vec(), new_route: true },
            Ev::Data { label: 1, packet: b"b".to_vec(), new_route: true },
            Ev::Data { label: 0, packet: b"a2".to_vec(), new_route: false },
        ]
    );
    // The client closes a route; the label is gone for good.
    p.client_send(|c, tx| assert!(c.close_route(a, ErrorCode::NO_ERROR, tx)));
    assert_eq!(p.server_events.last(), Some(&Ev::RouteClosed { label: 0, code: ErrorCode::NO_ERROR }));
    // A late packet on the closed label is dropped silently (no amplification).
    let (se, ce) = (p.server_events.len(), p.client_events.len());
    p.client_send(|_, tx| broflake_proto::frame::encode_data(0, b"late", tx));
    assert_eq!((p.server_events.len(), p.client_events.len()), (se, ce));
    assert!(p.server_close.is_none());
    // DATA from the server on a label the client does not hold: ROUTE_UNKNOWN back.
    // (the server ignores a ROUTE_CLOSE for a label it does not hold, so count messages.)
    let sent = p.frames_to_server;
    p.server_send(|_, tx| broflake_proto::frame::encode_data(7, b"stray", tx));
    assert_eq!(p.frames_to_server, sent + 1, "the client answered with ROUTE_CLOSE(ROUTE_UNKNOWN)");
    assert!(p.client_close.is_none() && p.server_close.is_none());
    p.client_send(|c, tx| assert!(c.close_route(b, ErrorCode::NO_ERROR, tx)));
    assert!(p.server.route_count() == 0);
    let b = p.client.open_route().unwrap();
    p.client_send(|c, tx| assert!(c.send_data(b, b"b2", tx).is_ok()));
    assert_eq!(b, 2, "labels are never reused");
    // The server closes a route from its side.
    p.server_send(|s, tx| assert!(s.close_route(b, ErrorCode::NO_ERROR, tx)));
    assert_eq!(p.client_events.last(), Some(&Ev::RouteClosed { label: 2, code: ErrorCode::NO_ERROR }));
    assert!(p.client.routes().is_empty() && p.server.route_count() == 0);
    // A client that ignores max_routes: labels beyond the limit are refused, packets dropped.
    let (x, y) = (p.client.open_route().unwrap(), p.client.open_route().unwrap());
    p.client_send(|c, tx| {
        c.send_data(x, b"x", tx).unwrap();
        c.send_data(y, b"y", tx).unwrap();
        broflake_proto::frame::encode_data(y + 1, b"z", tx);
    });
    assert_eq!(p.client_events.last(), Some(&Ev::RouteClosed { label: y + 1, code: ErrorCode::ROUTE_LIMIT }));
    assert_eq!(p.server.route_count(), 2);
}

#[test]
fn ping_flood_is_rate_limited() {
    let mut p = Pair::connected();
    p.client_send(|_, tx| {
        for i in 0u8..16 {
            Frame::Ping { payload: &[i] }.encode(0, tx);
        }
    });
    assert!(p.server_close.is_none(), "the burst is allowed");
    p.client_send(|_, tx| Frame::Ping { payload: &[99] }.encode(0, tx));
    let c = p.server_close.as_ref().unwrap();
    assert_eq!((c.code, c.close_code()), (ErrorCode::RATE_LIMITED, 4012));
    assert_eq!(p.client_close.as_ref().unwrap().code, ErrorCode::RATE_LIMITED);
}

#[test]
fn protocol_violations_close_with_the_documented_codes() {
    fn server_verdict(first: &[u8], then: Option<&[u8]>) -> Close {
        let cfg = ServerConfig::default();
        let mut s = ServerSession::new(Timestamp(0));
        let mut tx = Vec::new();
        let run = |s: &mut ServerSession, msg: &[u8], tx: &mut Vec<u8>| {
            s.handle_message(&cfg, Timestamp(1), msg, tx, |s, ev, tx| {
                if let ServerEvent::Hello { .. } = ev {
                    s.accept(&cfg, Timestamp(1), SessionId::NONE, tx)?;
                }
                Ok(())
            })
        };
        if let Err(c) = run(&mut s, first, &mut tx) {
            return c;
        }
        run(&mut s, then.expect("second message"), &mut tx).unwrap_err()
    }
    let mut hello = Vec::new();
    let mut c = ClientSession::new(3);
    c.start(&ClientConfig { grease: false, ..ClientConfig::default() }, Timestamp(0), &mut hello);

    let mut data = Vec::new();
    broflake_proto::frame::encode_data(0, b"q", &mut data);
    let v = server_verdict(&data, None);
    assert_eq!((v.code, v.reason.as_ref()), (ErrorCode::PROTOCOL_VIOLATION, "data frame not allowed before HELLO"));

    let v = server_verdict(&hello, Some(&hello));
    assert_eq!(v.code, ErrorCode::PROTOCOL_VIOLATION, "handshake replay");
    assert_eq!(v.close_code(), 4003);

    let v = server_verdict(&hello, Some(&[0x0a, 0x00, 0x00]));
    assert_eq!((v.code, v.close_code()), (ErrorCode::UNKNOWN_FRAME, 4004));

    let v = server_verdict(&hello, Some(&[0x04, 0x01, 0x00]));
    assert_eq!(v.code, ErrorCode::FRAME_ENCODING, "reserved flag on PING");

    let v = server_verdict(&hello, Some(&[0x08, 0x00, 0x80, 0x00, 0x40, 0x00]));
    assert_eq!((v.code, v.close_code()), (ErrorCode::FRAME_TOO_LARGE, 4005));

    let v = server_verdict(&[0x00, 0x00, 0x00, 0x04, 0x00], None);
    assert_eq!(v.code, ErrorCode::FRAME_ENCODING, "truncated PING after PADDING");
}

#[test]
fn grease_and_padding_are_ignored_in_every_state() {
    let mut p = Pair::connected();
    let before = p.server_events.len();
    p.client_send(|_, tx| {
        Frame::Unknown { frame_type: 0x40, payload: b"grease" }.encode(0x80, tx);
        Frame::Padding { payload: &[0; 100] }.encode(0, tx);
        Frame::Unknown { frame_type: 0x0a, payload: b"" }.encode(0x80, tx); // future type, ignorable
    });
    assert!(p.server_close.is_none());
    assert_eq!(p.server_events.len(), before);
    p.server_send(|_, tx| broflake_proto::grease::encode_frame(&mut broflake_proto::grease::Rng::new(5), tx));
    assert!(p.client_close.is_none());
}

/// A two-hop chain: consumer C → relay A → relay B → egress E. Each relay is a server to
/// its downstream and a client of its upstream, and rewrites labels with a RouteTable.
#[test]
fn route_open_rewrite_and_close_across_a_two_hop_chain() {
    struct Hop {
        down: ServerSession, // this relay's server session for its downstream link
        up: ClientSession,   // this relay's client session towards its upstream
        table: RouteTable<u8, u8>,
    }
    let scfg = ServerConfig::default();
    let ccfg = ClientConfig::default();
    let t = Timestamp(0);

    // Handshake one client/server session pair in memory.
    fn handshake(c: &mut ClientSession, s: &mut ServerSession, scfg: &ServerConfig, ccfg: &ClientConfig) {
        let mut hello = Vec::new();
        c.start(ccfg, Timestamp(0), &mut hello);
        let mut welcome = Vec::new();
        s.handle_message(scfg, Timestamp(0), &hello, &mut welcome, |s, ev, tx| {
            if let ServerEvent::Hello { .. } = ev {
                s.accept(scfg, Timestamp(0), SessionId::NONE, tx)?;
            }
            Ok(())
        })
        .unwrap();
        c.handle_message(ccfg, Timestamp(0), &welcome, &mut Vec::new(), |_, _, _| Ok(())).unwrap();
        assert!(c.is_open() && s.is_open());
    }

    let consumer_cfg = ClientConfig { role: Role::CONSUMER, ..ClientConfig::default() };
    let mut consumer = ClientSession::new(1);
    let mut a = Hop { down: ServerSession::new(t), up: ClientSession::new(2), table: RouteTable::new() };
    let mut b = Hop { down: ServerSession::new(t), up: ClientSession::new(3), table: RouteTable::new() };
    let mut egress = ServerSession::new(t);
    handshake(&mut consumer, &mut a.down, &scfg, &consumer_cfg);
    handshake(&mut a.up, &mut b.down, &scfg, &ccfg);
    handshake(&mut b.up, &mut egress, &scfg, &ccfg);
    a.table.add_upstream(0, 256);
    b.table.add_upstream(0, 256);
    // Relay B already carries other routes upstream, so labels differ hop by hop.
    for _ in 0..3 {
        b.up.open_route().unwrap();
    }
    b.table.route_up(99, 0, 0).unwrap();
    b.table.route_up(99, 1, 0).unwrap();
    b.table.route_up(99, 2, 0).unwrap();

    /// Passes one message downstream→upstream through a relay hop; returns the upstream message.
    fn relay_up(hop: &mut Hop, link: u8, msg: &[u8], scfg: &ServerConfig) -> Vec<u8> {
        let mut out = Vec::new();
        let mut back = Vec::new();
        let Hop { down, up, table } = hop;
        down.handle_message(scfg, Timestamp(0), msg, &mut back, |_, ev, _| {
            match ev {
                ServerEvent::Data { label, packet, .. } => {
                    let (_, ul, new) = table.route_up(link, label, 0).unwrap();
                    if new {
                        assert_eq!(up.open_route().unwrap(), ul, "table and session agree on labels");
                    }
                    assert!(up.send_data(ul, packet, &mut out).is_ok());
                }
                ServerEvent::RouteClosed { label, code } => {
                    let (_, ul) = table.close_down(link, label).unwrap();
                    assert!(up.close_route(ul, code, &mut out));
                }
                _ => {}
            }
            Ok(())
        })
        .unwrap();
        out
    }

    /// Passes one message upstream→downstream through a relay hop.
    fn relay_down(hop: &mut Hop, msg: &[u8], ccfg: &ClientConfig, scfg: &ServerConfig) -> Vec<u8> {
        let mut out = Vec::new();
        let Hop { down, up, table } = hop;
        up.handle_message(ccfg, Timestamp(0), msg, &mut Vec::new(), |_, ev, _| {
            match ev {
                ClientEvent::Data { label, packet } => {
                    let (_, dl) = table.downstream_of(0, label).unwrap();
                    assert!(down.send_data(scfg, dl, packet, &mut out).is_ok());
                }
                ClientEvent::RouteClosed { label, code } => {
                    let (_, dl) = table.close_up(0, label).unwrap();
                    assert!(down.close_route(dl, code, &mut out));
                }
                _ => {}
            }
            Ok(())
        })
        .unwrap();
        out
    }

    // Consumer sends a QUIC packet on its label 0.
    let cl = consumer.open_route().unwrap();
    let mut m = Vec::new();
    consumer.send_data(cl, b"initial", &mut m).unwrap();
    let m = relay_up(&mut a, 1, &m, &scfg);
    let m = relay_up(&mut b, 1, &m, &scfg);
    let mut seen = Vec::new();
    egress
        .handle_message(&scfg, t, &m, &mut Vec::new(), |_, ev, _| {
            if let ServerEvent::Data { label, packet, new_route } = ev {
                seen.push((label, packet.to_vec(), new_route));
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(seen, vec![(3, b"initial".to_vec(), true)], "egress sees B's label 3 only");
    assert_eq!(a.table.upstream_of(1, 0), Some((0, 0)));
    assert_eq!(b.table.upstream_of(1, 0), Some((0, 3)));

    // The egress answers on label 3; it comes back to the consumer on label 0.
    let mut m = Vec::new();
    assert!(egress.send_data(&scfg, 3, b"handshake", &mut m).is_ok());
    let m = relay_down(&mut b, &m, &ccfg, &scfg);
    let m = relay_down(&mut a, &m, &ccfg, &scfg);
    let mut got = Vec::new();
    consumer
        .handle_message(&consumer_cfg, t, &m, &mut Vec::new(), |_, ev, _| {
            if let ClientEvent::Data { label, packet } = ev {
                got.push((label, packet.to_vec()));
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(got, vec![(0, b"handshake".to_vec())]);

    // The consumer closes its route: every hop releases it, the egress sees label 3 close.
    let mut m = Vec::new();
    assert!(consumer.close_route(cl, ErrorCode::NO_ERROR, &mut m));
    let m = relay_up(&mut a, 1, &m, &scfg);
    let m = relay_up(&mut b, 1, &m, &scfg);
    let mut closed = Vec::new();
    egress
        .handle_message(&scfg, t, &m, &mut Vec::new(), |_, ev, _| {
            if let ServerEvent::RouteClosed { label, code } = ev {
                closed.push((label, code));
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(closed, vec![(3, ErrorCode::NO_ERROR)]);
    assert!(a.table.is_empty());
    assert_eq!(b.table.len(), 3, "only B's other routes remain");

    // A second consumer route, closed by the egress this time, travels back down.
    let cl2 = consumer.open_route().unwrap();
    let mut m = Vec::new();
    consumer.send_data(cl2, b"again", &mut m).unwrap();
    let m = relay_up(&mut a, 1, &m, &scfg);
    let m = relay_up(&mut b, 1, &m, &scfg);
    egress.handle_message(&scfg, t, &m, &mut Vec::new(), |_, _, _| Ok(())).unwrap();
    let (_, el) = b.table.upstream_of(1, 1).unwrap();
    assert_eq!(el, 4, "upstream labels are never reused");
    let mut m = Vec::new();
    assert!(egress.close_route(el, ErrorCode::NO_ERROR, &mut m));
    let m = relay_down(&mut b, &m, &ccfg, &scfg);
    let m = relay_down(&mut a, &m, &ccfg, &scfg);
    let mut closed = Vec::new();
    consumer
        .handle_message(&consumer_cfg, t, &m, &mut Vec::new(), |_, ev, _| {
            if let ClientEvent::RouteClosed { label, code } = ev {
                closed.push((label, code));
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(closed, vec![(cl2, ErrorCode::NO_ERROR)]);
    assert!(consumer.routes().is_empty());
}

#[test]
fn relay_table_migrates_routes_on_goaway_and_cleans_up_links() {
    let mut t: RouteTable<u32, u32> = RouteTable::new();
    t.add_upstream(1, 10);
    t.add_upstream(2, 10);
    assert_eq!(t.route_up(100, 0, 1).unwrap(), (1, 0, true));
    assert_eq!(t.route_up(100, 5, 1).unwrap(), (1, 1, true));
    assert_eq!(t.route_up(200, 0, 1).unwrap(), (1, 2, true));
    assert_eq!(t.route_up(100, 0, 2).unwrap(), (1, 0, false), "existing mapping wins");
    let mut moved = t.migrate(1, 2).unwrap();
    moved.sort();
    assert_eq!(moved.iter().map(|(o, _)| *o).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert!(t.upstream_load().all(|(u, n)| if u == 1 { n == 0 } else { n == 3 }));
    let mut released = t.remove_link(100);
    released.sort();
    assert_eq!(released.len(), 2);
    assert!(released.iter().all(|(u, _)| *u == 2));
    assert_eq!(t.remove_upstream(2), vec![(200, 0)]);
    assert!(t.is_empty());
    t.add_upstream(3, 1);
    t.route_up(1, 0, 3).unwrap();
    assert_eq!(t.route_up(1, 1, 3), Err(broflake_proto::relay::RouteTableError::UpstreamFull(1)));
}

#[test]
fn a_client_that_does_not_ping_detects_a_dead_link_by_the_receive_timeout() {
    // Pure client-driven liveness (the server never pings) and a client that does not PING:
    // the original problem. The middlebox has silently cut the flow.
    let scfg = ServerConfig { server_ping: ServerPing::Never, ..ServerConfig::default() };
    let ccfg = ClientConfig { send_pings: false, ..ClientConfig::default() };
    let mut p = Pair::new(scfg, ccfg);
    p.start();
    assert!(!p.server.server_pings());
    let t0 = p.now;
    p.drop_to_client = true;
    p.drop_to_server = true;
    p.advance(120_000);
    assert_eq!(p.server_closed_at.unwrap().since(t0), 60_000, "server: idle timeout");
    let c = p.client_close.as_ref().unwrap();
    assert!(c.reason.starts_with("receive timeout"), "{c}");
    assert_eq!(p.client_closed_at.unwrap().since(t0), 80_000, "client: idle timeout + one keepalive");
}

#[test]
fn hostile_welcome_values_do_not_overflow_the_client() {
    // Found by fuzzing: a server announcing a huge keepalive made the jitter arithmetic
    // overflow. Every value from the wire must be safe to compute with.
    let ccfg = ClientConfig::default();
    let mut c = ClientSession::new(7);
    let mut tx = Vec::new();
    c.start(&ccfg, Timestamp(0), &mut tx);
    let mut msg = Vec::new();
    Frame::Welcome(broflake_proto::frame::Welcome {
        version: 1,
        session_id: SessionId([1; 16]),
        capabilities: Capabilities(Capabilities::PING),
        keepalive_ms: broflake_proto::varint::MAX / 2,
        idle_timeout_ms: broflake_proto::varint::MAX,
        max_frame_size: broflake_proto::varint::MAX,
        max_routes: broflake_proto::varint::MAX,
        extensions: broflake_proto::frame::Extensions::EMPTY,
    })
    .encode(0, &mut msg);
    c.handle_message(&ccfg, Timestamp(1), &msg, &mut tx, |_, _, _| Ok(())).unwrap();
    let t = c.poll_timeout(&ccfg).unwrap();
    assert!(t.as_millis() > 1 << 40);
    c.handle_timeout(&ccfg, Timestamp(u64::MAX - 1), &mut tx).unwrap();
}

#[test]
fn a_packet_above_the_frame_limit_is_refused_and_the_link_lives_on() {
    use broflake_proto::packet_size::{max_packet, DataRefused};
    let scfg = ServerConfig { max_frame_size: 1500, ..ServerConfig::default() };
    let mut p = Pair::new(scfg, ClientConfig::default());
    p.start();
    assert!(p.client.is_open(), "handshake failed: {:?}", p.client_close);
    let label = p.client.open_route().unwrap();
    let big = vec![0x5a; max_packet(1500) + 8]; // fits with label 0 up to 1495 bytes; this is 1496
    let mut tx = Vec::new();
    assert_eq!(p.client.send_data(label, &big, &mut tx), Err(DataRefused::TooLarge { size: 1501, max: 1500 }));
    assert!(tx.is_empty(), "nothing written for a refused packet");
    let fits = vec![0x5a; 1495];
    p.client_send(|c, tx| c.send_data(label, &fits, tx).unwrap());
    assert_eq!(p.server_events.last(), Some(&Ev::Data { label, packet: fits.clone(), new_route: true }));
    // The server's side of the same hop refuses the same way, and both stay open.
    let scfg = p.scfg.clone();
    let mut tx = Vec::new();
    assert!(matches!(p.server.send_data(&scfg, label, &big, &mut tx), Err(DataRefused::TooLarge { .. })));
    p.server_send(|s, tx| s.send_data(&scfg, label, &fits, tx).unwrap());
    assert_eq!(p.client_events.last(), Some(&Ev::Data { label, packet: fits, new_route: false }));
    assert!(p.client.is_open() && p.server.is_open());
    assert_eq!(p.client.send_data(label + 1, b"x", &mut tx), Err(DataRefused::NoRoute(label + 1)));
}

#[test]
fn a_data_header_and_its_packet_are_the_data_frame() {
    let mut p = Pair::connected();
    let label = p.client.open_route().unwrap();
    p.client_send(|c, tx| assert!(c.send_data(label, b"open", tx).is_ok()));
    let cfg = p.scfg.clone();
    let packet = vec![7u8; 1200];
    let (mut whole, mut head) = (Vec::new(), Vec::new());
    p.server.send_data(&cfg, label, &packet, &mut whole).unwrap();
    p.server.send_data_header(&cfg, label, packet.len(), &mut head).unwrap();
    head.extend_from_slice(&packet);
    assert_eq!(head, whole);
    // The same refusals as the whole frame: no route, too large.
    let mut none = Vec::new();
    assert_eq!(
        p.server.send_data_header(&cfg, label + 1, 1, &mut none),
        p.server.send_data(&cfg, label + 1, b"x", &mut none)
    );
    let huge = vec![0u8; 1 << 20];
    assert!(p.server.send_data_header(&cfg, label, huge.len(), &mut none).is_err());
    assert_eq!(
        p.server.send_data_header(&cfg, label, huge.len(), &mut none),
        p.server.send_data(&cfg, label, &huge, &mut none)
    );
    assert!(none.is_empty());
}
