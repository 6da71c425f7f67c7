//! Metric names and label values (documented in docs/OPERATIONS.md). Labels only ever take
//! values from fixed sets, so cardinality stays bounded whatever peers send.

pub const CONNECTIONS: &str = "broflake_connections";
pub const CONNECTIONS_ACCEPTED: &str = "broflake_connections_accepted_total";
pub const CONNECTIONS_CLOSED: &str = "broflake_connections_closed_total";
pub const UPGRADE_REFUSALS: &str = "broflake_upgrade_refusals_total";
pub const HANDSHAKES: &str = "broflake_handshakes_total";
pub const REFUSALS: &str = "broflake_refusals_total";
pub const FRAMES_RECEIVED: &str = "broflake_frames_received_total";
pub const FRAMES_SENT: &str = "broflake_frames_sent_total";
pub const BYTES_RECEIVED: &str = "broflake_bytes_received_total";
pub const BYTES_SENT: &str = "broflake_bytes_sent_total";
pub const IDLE_CLOSES: &str = "broflake_idle_closes_total";
pub const SERVER_PINGS: &str = "broflake_server_pings_total";
pub const LIVENESS_MODE: &str = "broflake_liveness_mode";
pub const SWEEPS: &str = "broflake_liveness_sweeps_total";
pub const SWEEP_WAKEUPS: &str = "broflake_liveness_sweep_wakeups_total";
pub const USERSPACE_CHECKS: &str = "broflake_liveness_userspace_checks_total";
pub const ROUTES: &str = "broflake_routes";
pub const PACKETS_DROPPED: &str = "broflake_packets_dropped_total";
pub const QUIC_CONNECTIONS: &str = "broflake_quic_connections";
pub const QUIC_CONNECTIONS_TOTAL: &str = "broflake_quic_connections_total";
pub const QUIC_STREAMS: &str = "broflake_quic_streams_total";
pub const QUIC_MIGRATIONS: &str = "broflake_quic_migrations_total";
pub const PROXY_DIALS: &str = "broflake_proxy_dials_total";
pub const PROXY_BYTES: &str = "broflake_proxy_bytes_total";
pub const DRAINING: &str = "broflake_draining";
pub const BUILD_INFO: &str = "broflake_build_info";
pub const FLEET_PACKETS: &str = "broflake_fleet_packets_total";
pub const FLEET_DROPPED: &str = "broflake_fleet_dropped_total";
pub const FLEET_ROUTES: &str = "broflake_fleet_routes";

/// Values of the `type` label of the frame counters: the v1 frame types by number
/// (index = type), then unknown types, then undecodable frames.
pub const FRAME_TYPES: [&str; 12] = [
    "padding",
    "hello",
    "welcome",
    "refuse",
    "ping",
    "pong",
    "goaway",
    "error",
    "data",
    "route_close",
    "unknown",
    "invalid",
];
/// Index of unknown frame types and of undecodable frames in [`FRAME_TYPES`].
pub const FRAME_UNKNOWN: usize = 10;
pub const FRAME_INVALID: usize = 11;

/// Index of a frame type in [`FRAME_TYPES`] (no string work on the per-frame path).
pub fn frame_index(frame_type: u64) -> usize {
    usize::try_from(frame_type).ok().filter(|t| *t < FRAME_UNKNOWN).unwrap_or(FRAME_UNKNOWN)
}
pub const OPEN_FDS: &str = "broflake_open_fds";
pub const PROCESS_CPU: &str = "broflake_process_cpu_seconds";
pub const PROCESS_RESIDENT: &str = "broflake_process_resident_bytes";
pub const MAX_FDS: &str = "broflake_max_fds";
pub const URING_DESCRIPTORS: &str = "broflake_uring_workers";
pub const XDP_FLOWS: &str = "broflake_xdp_flows";
pub const XDP_MAP_CAPACITY: &str = "broflake_xdp_map_capacity";
pub const XDP_EXPIRED: &str = "broflake_xdp_expired_total";

/// Registers every series with its fixed label values at zero, so dashboards and alerts see
/// them before the first event (the exporter omits series never touched).
fn zero_series() {
    use metrics::{counter, gauge};
    for descriptors in ["direct", "ordinary"] {
        gauge!(URING_DESCRIPTORS, "descriptors" => descriptors).increment(0.0);
    }
    for backend in ["tokio", "uring"] {
        for state in ["handshaking", "open", "draining"] {
            gauge!(CONNECTIONS, "backend" => backend, "state" => state).increment(0.0);
        }
        for listener in ["ws", "wss"] {
            counter!(CONNECTIONS_ACCEPTED, "backend" => backend, "listener" => listener).increment(0);
        }
    }
    let codes = broflake_proto::ErrorCode::ALL.iter().map(|c| c.label());
    for reason in codes.clone().chain([
        "normal",
        "ws_protocol_error",
        "text_message",
        "message_too_big",
        "peer_gone",
        "write_timeout",
        "other",
    ]) {
        counter!(CONNECTIONS_CLOSED, "reason" => reason).increment(0);
    }
    for reason in codes {
        counter!(REFUSALS, "reason" => reason).increment(0);
    }
    for reason in [
        "over_limit",
        "tls",
        "timeout",
        "bad_request",
        "bad_path",
        "missing_protocol",
        "unsupported_protocol",
        "oversized_request",
    ] {
        counter!(UPGRADE_REFUSALS, "reason" => reason).increment(0);
    }
    for result in ["accepted", "refused"] {
        counter!(HANDSHAKES, "result" => result).increment(0);
    }
    for t in FRAME_TYPES {
        counter!(FRAMES_RECEIVED, "type" => t).increment(0);
        counter!(FRAMES_SENT, "type" => t).increment(0);
    }
    for source in ["xdp", "userspace", "server-ping"] {
        counter!(IDLE_CLOSES, "source" => source).increment(0);
    }
    for reason in ["route_gone", "send_queue_full", "endpoint_queue_full"] {
        counter!(PACKETS_DROPPED, "reason" => reason).increment(0);
    }
    for way in crate::fleet::WAYS {
        counter!(FLEET_PACKETS, "way" => way).increment(0);
    }
    for reason in crate::fleet::DROP_REASONS {
        counter!(FLEET_DROPPED, "reason" => reason).increment(0);
    }
    gauge!(FLEET_ROUTES).set(0.0);
    for result in [
        "ok",
        "policy_refused",
        "dns_failed",
        "connection_refused",
        "timeout",
        "unreachable",
        "bad_request",
        "internal",
    ] {
        counter!(PROXY_DIALS, "result" => result).increment(0);
    }
    for direction in ["upstream", "downstream"] {
        counter!(PROXY_BYTES, "direction" => direction).increment(0);
    }
    for c in [
        BYTES_RECEIVED,
        BYTES_SENT,
        SERVER_PINGS,
        SWEEPS,
        SWEEP_WAKEUPS,
        QUIC_CONNECTIONS_TOTAL,
        QUIC_STREAMS,
        QUIC_MIGRATIONS,
        XDP_EXPIRED,
    ] {
        counter!(c).increment(0);
    }
    for g in [
        ROUTES,
        QUIC_CONNECTIONS,
        DRAINING,
        XDP_FLOWS,
        XDP_MAP_CAPACITY,
        OPEN_FDS,
        MAX_FDS,
        PROCESS_CPU,
        PROCESS_RESIDENT,
    ] {
        gauge!(g).increment(0.0);
    }
}

/// Describes every metric once, at start-up (HELP text in the exposition).
pub fn describe() {
    zero_series();
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(CONNECTIONS, "WebSocket connections held now, by backend and state.");
    describe_counter!(CONNECTIONS_ACCEPTED, "TCP connections accepted, by backend and listener kind.");
    describe_counter!(CONNECTIONS_CLOSED, "Connections closed, by close reason.");
    describe_counter!(UPGRADE_REFUSALS, "HTTP upgrades refused before any Broflake frame, by reason.");
    describe_counter!(HANDSHAKES, "Broflake handshakes, by result (accepted/refused).");
    describe_counter!(REFUSALS, "Handshake refusals, by reason code.");
    describe_counter!(FRAMES_RECEIVED, "Broflake frames received, by type.");
    describe_counter!(FRAMES_SENT, "Broflake frames sent, by type.");
    describe_counter!(BYTES_RECEIVED, "WebSocket payload bytes received.");
    describe_counter!(BYTES_SENT, "WebSocket payload bytes sent.");
    describe_counter!(IDLE_CLOSES, "Connections closed for idleness, by source (xdp/userspace/server-ping).");
    describe_counter!(SERVER_PINGS, "PINGs sent by the server (server-ping mode and compat clients).");
    describe_gauge!(LIVENESS_MODE, "1 for the liveness mode in effect, by mode.");
    describe_counter!(SWEEPS, "User-space deadline sweeps run.");
    describe_counter!(SWEEP_WAKEUPS, "Connections woken by the deadline sweep.");
    describe_counter!(USERSPACE_CHECKS, "Idle-deadline checks user space made on open connections (io_uring wheel).");
    describe_gauge!(ROUTES, "Routes (connection, label) open now.");
    describe_counter!(PACKETS_DROPPED, "QUIC packets dropped, by reason.");
    describe_gauge!(QUIC_CONNECTIONS, "Tunnelled QUIC connections open now.");
    describe_counter!(QUIC_CONNECTIONS_TOTAL, "Tunnelled QUIC connections accepted.");
    describe_counter!(QUIC_STREAMS, "Proxy streams accepted.");
    describe_counter!(QUIC_MIGRATIONS, "QUIC connections seen on a new route (migrations).");
    describe_counter!(PROXY_DIALS, "Proxy dials, by result (ok, policy_refused, dns_failed, …).");
    describe_counter!(PROXY_BYTES, "Bytes spliced by the proxy, by direction.");
    describe_gauge!(DRAINING, "1 while the egress is draining.");
    describe_counter!(
        FLEET_PACKETS,
        "QUIC packets of another host's connections: forwarded to the owner, received from a forwarder, returned to it, delivered back on the original route."
    );
    describe_counter!(FLEET_DROPPED, "Fleet packets dropped, by reason.");
    describe_gauge!(FLEET_ROUTES, "Routes held for packets other hosts forward here.");
    describe_gauge!(BUILD_INFO, "Always 1; labels carry the version.");
    describe_gauge!(OPEN_FDS, "File descriptors the process holds.");
    describe_gauge!(PROCESS_CPU, "CPU seconds (user + system) the process used since it started.");
    describe_gauge!(PROCESS_RESIDENT, "Resident memory of the process, in bytes.");
    describe_gauge!(MAX_FDS, "The process's file descriptor limit.");
    describe_gauge!(
        URING_DESCRIPTORS,
        "io_uring workers by where their connections' descriptors live: direct (the ring's registered table) or ordinary (the process's table, after a fallback)."
    );
    describe_gauge!(XDP_FLOWS, "Flows in the XDP liveness map.");
    describe_gauge!(XDP_MAP_CAPACITY, "Capacity of the XDP liveness map.");
    describe_counter!(XDP_EXPIRED, "Flows the kernel expired as idle (ring buffer events).");
}
