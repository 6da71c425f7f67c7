//! The signaling service's message parser and matchmaking core on hostile input: each line of
//! the input is one client's message (the first byte picks the client), time moves on; the
//! parser never panics, every refusal has a code, and the hub keeps its bounds. The same lines
//! drive a hub in shared mode too, whose store answers from the input (volunteers at another
//! replica, failures), and some lines arrive as relay messages from other replicas.
#![no_main]

use broflake_signal::hub::{Action, Hub, HubConfig};
use broflake_signal::msg;
use broflake_signal::shared::{Relay, RouteFailure, StoreOp, VolunteerRef};
use libfuzzer_sys::fuzz_target;
use std::net::IpAddr;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = msg::parse(text) {
            let _ = e.code().close_code();
        }
    }
    let cfg = HubConfig { max_clients: 8, max_sessions: 4, max_candidates_per_side: 4, ..HubConfig::default() };
    drive(Hub::new(cfg.clone(), [1; 32]), data);
    drive(Hub::shared(cfg, [2; 32], "r1".into()), data);
});

/// Feeds the lines to `hub`. A hub in shared mode also takes lines starting with `~` as relay
/// messages from other replicas, and its store answers from the input: slots of volunteers at
/// replica "r2" (or here), none free, or failures.
fn drive(mut hub: Hub, data: &[u8]) {
    let mut ids = Vec::new();
    let mut now = 0u64;
    for line in data.split(|b| *b == b'\n') {
        let Some((&who, rest)) = line.split_first() else { continue };
        now += u64::from(who % 16) * 500;
        hub.timeout(now);
        if who == b'~' && hub.replica().is_some() {
            if let Ok(r) = serde_json::from_slice::<Relay>(rest) {
                hub.relay(now, r);
            }
        } else {
            let slot = usize::from(who) % 6;
            while ids.len() <= slot {
                match hub.connect(now, IpAddr::from([10, 0, 0, (ids.len() % 3) as u8])) {
                    Ok(id) => ids.push(id),
                    Err(_) => break,
                }
            }
            let Some(&id) = ids.get(slot) else { continue };
            match std::str::from_utf8(rest) {
                Ok(_) if who % 7 == 0 => hub.disconnect(now, id),
                Ok(t) => hub.message(now, id, t),
                Err(_) => hub.binary(id),
            }
        }
        while let Some(op) = hub.poll_store() {
            match op {
                StoreOp::Pick { session, skip } => {
                    let replica = if who % 3 == 0 { "r1" } else { "r2" };
                    let v = VolunteerRef { replica: replica.into(), client: u64::from(who % 4) };
                    let v = (who % 5 != 0 && !skip.contains(&v)).then_some(v);
                    hub.picked(now, session, v);
                }
                StoreOp::Registered { client } => hub.registered(client),
                StoreOp::FromVolunteer { session, client, msg } if who % 2 == 0 => {
                    let why = if who % 4 == 0 { RouteFailure::UnknownSession } else { RouteFailure::OwnerGone };
                    hub.route_failed(client, session, &msg, why);
                }
                _ => {}
            }
        }
        while let Some(a) = hub.poll_action() {
            if let Action::Close(_, code, reason) = a {
                assert!(reason.len() <= 123, "close reason fits a control frame");
                assert!(code >= 1000);
            }
        }
        assert!(hub.sessions() <= 4);
        assert!(hub.clients() <= 8);
    }
}
