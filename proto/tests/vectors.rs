//! Loads `proto/vectors/v1.json` (the numbered vectors PROTOCOL.md §16 describes) and checks
//! the implementation against every one of them.

use broflake_proto::frame::{decode_message, Decoded, Frame};
use broflake_proto::handshake::negotiate;
use serde_json::{json, Value};

fn load() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/vectors/v1.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("vectors file")).expect("valid JSON")
}

fn exts(e: &broflake_proto::frame::Extensions<'_>) -> Value {
    Value::Array(e.iter().map(|(t, v)| json!({"type": t, "value": hex::encode(v)})).collect())
}

/// The vectors file's JSON form of a decoded frame.
fn to_json(d: &Decoded<'_>) -> Value {
    let mut v = match d.frame {
        Frame::Padding { payload } => json!({"type": "padding", "payload": hex::encode(payload)}),
        Frame::Hello(h) => json!({
            "type": "hello", "min_version": h.min_version, "max_version": h.max_version,
            "role": h.role.0, "capabilities": h.capabilities.0,
            "previous_session": hex::encode(h.previous_session.0), "extensions": exts(&h.extensions),
        }),
        Frame::Welcome(w) => json!({
            "type": "welcome", "version": w.version, "session_id": hex::encode(w.session_id.0),
            "capabilities": w.capabilities.0, "keepalive_ms": w.keepalive_ms,
            "idle_timeout_ms": w.idle_timeout_ms, "max_frame_size": w.max_frame_size,
            "max_routes": w.max_routes, "extensions": exts(&w.extensions),
        }),
        Frame::Refuse { code, retry_after_ms, reason } => {
            json!({"type": "refuse", "code": code.0, "retry_after_ms": retry_after_ms, "reason": reason})
        }
        Frame::Ping { payload } => json!({"type": "ping", "payload": hex::encode(payload)}),
        Frame::Pong { payload } => json!({"type": "pong", "payload": hex::encode(payload)}),
        Frame::GoAway { grace_ms, reconnect } => {
            json!({"type": "goaway", "grace_ms": grace_ms, "reconnect": reconnect})
        }
        Frame::Error { code, reason } => json!({"type": "error", "code": code.0, "reason": reason}),
        Frame::Data { label, packet } => {
            json!({"type": "data", "label": label, "packet": hex::encode(packet)})
        }
        Frame::RouteClose { label, code } => {
            json!({"type": "route_close", "label": label, "code": code.0})
        }
        Frame::Unknown { frame_type, payload } => {
            json!({"type": "unknown", "frame_type": frame_type, "payload": hex::encode(payload)})
        }
    };
    v["flags"] = json!(d.flags);
    v
}

#[test]
fn every_frame_vector() {
    let vectors = load();
    let frames = vectors["frames"].as_array().unwrap();
    assert!(frames.len() >= 60, "the vectors file holds {} frame vectors", frames.len());
    let mut failures = Vec::new();
    for v in frames {
        let id = v["id"].as_u64().unwrap();
        let name = v["name"].as_str().unwrap();
        let bytes = hex::decode(v["hex"].as_str().unwrap()).unwrap();
        let max = v.get("max_frame_size").and_then(Value::as_u64).unwrap_or(16_384) as usize;
        let got = decode_message(&bytes, max);
        match (v["expect"].as_str().unwrap(), got) {
            ("ok", Ok(decoded)) => {
                let got: Vec<Value> = decoded.iter().map(to_json).collect();
                let want = v["frames"].as_array().unwrap();
                if &got != want {
                    failures.push(format!("#{id} {name}: decoded {got:?}, want {want:?}"));
                }
                // Canonical: re-encoding yields the vector's bytes.
                let mut out = Vec::new();
                for d in &decoded {
                    d.frame.encode(d.flags, &mut out);
                }
                if out != bytes {
                    failures.push(format!("#{id} {name}: re-encoded {}", hex::encode(&out)));
                }
            }
            ("ok", Err(e)) => failures.push(format!("#{id} {name}: want ok, got {}: {e}", e.kind())),
            ("error", Ok(d)) => failures.push(format!("#{id} {name}: want {}, decoded {d:?}", v["error"])),
            ("error", Err(e)) => {
                if e.kind() != v["error"].as_str().unwrap() {
                    failures.push(format!("#{id} {name}: want {}, got {} ({e})", v["error"], e.kind()));
                }
            }
            (other, _) => failures.push(format!("#{id}: unknown expectation {other}")),
        }
    }
    assert!(failures.is_empty(), "{} vector(s) failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn every_negotiation_vector() {
    let vectors = load();
    let cases = vectors["negotiation"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for v in cases {
        let n = |k: &str| v[k].as_u64().unwrap();
        let got = negotiate(n("server_min"), n("server_max"), n("client_min"), n("client_max"));
        match v["expect"].as_str().unwrap() {
            "welcome" => assert_eq!(got.ok(), Some(n("version")), "vector {}", v["id"]),
            "refuse" => {
                let close = got.expect_err("refusal");
                assert_eq!(close.code.0, n("code"), "vector {}", v["id"]);
                assert_eq!(close.reason, v["reason"].as_str().unwrap(), "vector {}", v["id"]);
            }
            other => panic!("unknown expectation {other}"),
        }
    }
}

#[test]
fn vector_ids_are_unique_and_documented() {
    let vectors = load();
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md")).unwrap();
    let mut ids = std::collections::HashSet::new();
    for v in vectors["frames"].as_array().unwrap().iter().chain(vectors["negotiation"].as_array().unwrap()) {
        let id = v["id"].as_u64().unwrap();
        assert!(ids.insert(id), "duplicate vector id {id}");
        let name = v["name"].as_str().unwrap();
        assert!(spec.contains(name), "vector {id} ({name}) is not listed in PROTOCOL.md §16");
    }
}
