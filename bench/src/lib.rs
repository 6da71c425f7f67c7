//! Benchmark support: a lean WebSocket + Broflake load generator (raw sockets, precomputed
//! handshake bytes, a few hundred bytes per connection — it must not be the bottleneck) and
//! process measurements (RSS, CPU, context switches, slab objects).

pub mod chain;
pub mod loadgen;
pub mod procfs;
pub mod procs;
pub mod profile;
pub mod quic_sink;
pub mod scale;
pub mod signaling;
pub mod sysctl;
pub mod tunnel;
pub mod wan;
pub mod wan_link;
pub mod webrtc;

/// Child processes killed when dropped, so a failed measurement leaves nothing running.
#[derive(Debug)]
pub struct Procs(pub Vec<std::process::Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
