//! Benchmark support: a lean WebSocket + Broflake load generator (raw sockets, precomputed
//! handshake bytes, a few hundred bytes per connection — it must not be the bottleneck) and
//! process measurements (RSS, CPU, context switches, slab objects).

pub mod loadgen;
pub mod procfs;
pub mod quic_sink;
pub mod tunnel;
pub mod webrtc;
