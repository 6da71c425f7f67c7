//! Metric names of the signaling service (docs/OPERATIONS.md lists them with their labels).

pub const CLIENTS: &str = "broflake_signal_clients";
pub const VOLUNTEERS: &str = "broflake_signal_volunteers";
pub const FREE_SLOTS: &str = "broflake_signal_free_slots";
pub const SESSIONS: &str = "broflake_signal_sessions";
pub const CONNECTIONS_ACCEPTED: &str = "broflake_signal_connections_accepted_total";
pub const CONNECTIONS_REFUSED: &str = "broflake_signal_connections_refused_total";
pub const MESSAGES_RECEIVED: &str = "broflake_signal_messages_received_total";
pub const MESSAGES_SENT: &str = "broflake_signal_messages_sent_total";
pub const ERRORS: &str = "broflake_signal_errors_total";
pub const MATCHES: &str = "broflake_signal_matches_total";
pub const UNAVAILABLE: &str = "broflake_signal_unavailable_total";
pub const DRAINING: &str = "broflake_signal_draining";
pub const SESSION_ENDS: &str = "broflake_signal_session_ends_total";
pub const CANDIDATES_DROPPED: &str = "broflake_signal_candidates_dropped_total";

/// Help texts (once, when the recorder is installed).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(CLIENTS, "Signaling WebSocket connections held now.");
    describe_gauge!(VOLUNTEERS, "Volunteers registered now.");
    describe_gauge!(FREE_SLOTS, "Consumer slots the registered volunteers offer now.");
    describe_gauge!(SESSIONS, "Sessions (consumer matched to a volunteer) in progress.");
    describe_counter!(CONNECTIONS_ACCEPTED, "Signaling connections accepted.");
    describe_counter!(CONNECTIONS_REFUSED, "Connections refused before a WebSocket, by reason.");
    describe_counter!(MESSAGES_RECEIVED, "Messages received, by type.");
    describe_counter!(MESSAGES_SENT, "Messages sent, by type.");
    describe_counter!(ERRORS, "Errors sent to clients, by code (all but unknown_session end the connection).");
    describe_counter!(
        SESSION_ENDS,
        "Offers that came to nothing with a volunteer, by reason (declined, answer_timeout, expired)."
    );
    describe_counter!(CANDIDATES_DROPPED, "ICE candidates over the per-session limit, dropped.");
    describe_counter!(MATCHES, "Consumers that got a volunteer's answer.");
    describe_counter!(UNAVAILABLE, "Consumers told that no volunteer is free.");
    describe_gauge!(DRAINING, "1 while the service drains.");
}
