//! The message vectors of docs/SIGNALING.md §8 (signal/vectors/v1.json): every valid one
//! parses to the listed fields, every invalid one fails with the listed error code.

use broflake_signal::msg::{self, Incoming};
use serde_json::Value;

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/vectors/v1.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

fn field(c: &Value, name: &str) -> Value {
    c["fields"][name].clone()
}

#[test]
fn every_vector_parses_as_specified() {
    let cases = cases();
    assert!(cases.len() >= 30, "the vector file lost cases");
    for c in &cases {
        let name = c["name"].as_str().unwrap();
        let text = c["message"].as_str().unwrap();
        let r = msg::parse(text);
        if c["valid"].as_bool().unwrap() {
            let m = r.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(m.kind(), c["kind"].as_str().unwrap(), "{name}");
            match m {
                Incoming::Volunteer { versions, slots } => {
                    assert_eq!(Value::from(slots), field(c, "slots"), "{name}");
                    assert_eq!(Value::from(versions), field(c, "versions"), "{name}");
                }
                Incoming::Consumer { offer, .. } => assert_eq!(Value::from(offer), field(c, "offer"), "{name}"),
                Incoming::Slots { free } => assert_eq!(Value::from(free), field(c, "free"), "{name}"),
                Incoming::Answer { session, sdp } => {
                    assert_eq!(Value::from(session.to_string()), field(c, "session"), "{name}");
                    assert_eq!(Value::from(sdp), field(c, "sdp"), "{name}");
                }
                Incoming::Decline { session, reason } => {
                    assert_eq!(Value::from(session.to_string()), field(c, "session"), "{name}");
                    assert_eq!(Value::from(reason), field(c, "reason"), "{name}");
                }
                Incoming::Candidate { session, candidate } => {
                    assert_eq!(Value::from(session.to_string()), field(c, "session"), "{name}");
                    assert_eq!(Value::from(candidate.candidate), field(c, "candidate"), "{name}");
                    if let Some(mid) = candidate.mid {
                        assert_eq!(Value::from(mid), field(c, "mid"), "{name}");
                    }
                }
                Incoming::Done { session } => {
                    assert_eq!(Value::from(session.to_string()), field(c, "session"), "{name}")
                }
                Incoming::Ping | Incoming::Unknown(_) => {}
            }
        } else {
            let e = match r {
                Ok(m) => panic!("{name}: parsed as {m:?}, expected {}", c["error"]),
                Err(e) => e,
            };
            assert_eq!(e.code().label(), c["error"].as_str().unwrap(), "{name}: {e}");
        }
    }
}
