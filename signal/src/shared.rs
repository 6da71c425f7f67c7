//! What signaling replicas share (docs/SIGNALING.md §13), sans-IO: the requests a hub in
//! shared mode makes of its store ([`StoreOp`]) and the messages replicas pass each other
//! through it ([`Relay`]).
//!
//! Each client's WebSocket lives at one replica. Waiting volunteers (their free slots) and
//! pending matches (who owns the session, which volunteer has it, until when) live in the
//! store, so any replica can match any consumer with any volunteer. A session is driven by
//! the replica of its consumer (the *owner*: offers, timeouts, retries); the volunteer's
//! replica only carries messages between its volunteer and the owner.

use crate::hub::ClientId;
use crate::msg::{Candidate, SessionId};
use serde::{Deserialize, Serialize};

/// A volunteer anywhere in the fleet: its replica and its client id there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VolunteerRef {
    pub replica: String,
    pub client: ClientId,
}

impl VolunteerRef {
    /// The volunteer's id in the store and in `registered` (`REPLICA.CLIENT`).
    pub fn key(&self) -> String {
        format!("{}.{}", self.replica, self.client)
    }

    pub fn parse(key: &str) -> Option<VolunteerRef> {
        let (replica, client) = key.rsplit_once('.')?;
        Some(VolunteerRef { replica: replica.to_owned(), client: client.parse().ok()? })
    }
}

/// A replica id: what its volunteers' ids and its relay channel are named after. Letters,
/// digits, `-` and `_` only (it is part of store keys), at most 64 characters.
pub fn valid_replica_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A request from the hub to its store. Answers come back as [`crate::hub::Hub`] calls
/// (`picked`, `route_failed`, `relay`); a store that cannot be reached fails them at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// A volunteer here announced this many free slots (absolute).
    Slots { client: ClientId, free: u32 },
    /// Answer with [`crate::hub::Hub::registered`] once everything before is stored (a new
    /// volunteer hears `registered` when any replica can match it).
    Registered { client: ClientId },
    /// A volunteer here left: forget it, and tell every replica (sessions offered to it move
    /// on to the next volunteer).
    VolunteerGone { client: ClientId },
    /// Take one slot of a live volunteer not in `skip` (round robin over the fleet); the
    /// answer is [`crate::hub::Hub::picked`].
    Pick { session: SessionId, skip: Vec<VolunteerRef> },
    /// A slot taken for an offer that came to nothing is the volunteer's again.
    GiveBack { volunteer: VolunteerRef },
    /// The match record: this replica owns `session`, offered to `volunteer`, for `ttl_ms`.
    Match { session: SessionId, volunteer: VolunteerRef, ttl_ms: u64 },
    /// The session is over: drop its record.
    EndMatch { session: SessionId },
    /// A message for a volunteer at another replica.
    ToVolunteer { volunteer: VolunteerRef, msg: ToVolunteer },
    /// A message from a volunteer here about a session owned elsewhere: the store checks the
    /// match record (this volunteer, not ended) and passes it to the owner, or answers with
    /// [`crate::hub::Hub::route_failed`].
    FromVolunteer { session: SessionId, client: ClientId, msg: FromVolunteer },
}

/// A message between replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "relay", rename_all = "snake_case")]
pub enum Relay {
    /// For volunteer `client` at the receiving replica.
    ToVolunteer { client: ClientId, msg: ToVolunteer },
    /// For the owner of `session`.
    FromVolunteer { session: SessionId, volunteer: VolunteerRef, msg: FromVolunteer },
    /// To every replica: this volunteer is gone.
    VolunteerGone { volunteer: VolunteerRef },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToVolunteer {
    Offer { session: SessionId, sdp: String, ttl_ms: u64 },
    Candidate { session: SessionId, candidate: Candidate },
    Cancel { session: SessionId, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromVolunteer {
    Answer { sdp: String },
    Candidate { candidate: Candidate },
    Decline,
    Done,
}

/// Why the store could not pass a volunteer's message to the session's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteFailure {
    /// No match record for this volunteer: the session is over or was never its.
    UnknownSession,
    /// The owner replica is gone (or the store is unreachable): the session cannot go on.
    OwnerGone,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volunteer_keys_round_trip() {
        let v = VolunteerRef { replica: "a-1".into(), client: 42 };
        assert_eq!(v.key(), "a-1.42");
        assert_eq!(VolunteerRef::parse(&v.key()), Some(v));
        assert_eq!(VolunteerRef::parse("nodot"), None);
        assert_eq!(VolunteerRef::parse("a.b"), None);
    }

    #[test]
    fn relays_round_trip_as_json() {
        let r = Relay::FromVolunteer {
            session: SessionId([7; 16]),
            volunteer: VolunteerRef { replica: "b".into(), client: 3 },
            msg: FromVolunteer::Candidate { candidate: Candidate { candidate: "candidate:1".into(), mid: None } },
        };
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Relay>(&j).unwrap(), r);
    }
}
