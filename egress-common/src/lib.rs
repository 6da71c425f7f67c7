//! Types shared by the XDP liveness program (egress-ebpf/) and user space (egress/src/xdp.rs).
//!
//! Every type is `#[repr(C)]` with explicit padding fields (so that no byte of a map key or
//! value is left uninitialised: the kernel hashes and copies whole keys) and a compile-time
//! size assertion (the two sides are compiled by different compilers for different targets).
//! Multi-byte fields are in host byte order unless their doc says otherwise.
#![no_std]

use core::mem::size_of;

/// Name of the XDP program in the object.
pub const PROGRAM_NAME: &str = "broflake_liveness";
/// Name of the TC ingress program doing the same tracking (interfaces without native XDP).
pub const PROGRAM_NAME_TC: &str = "broflake_liveness_tc";
/// Flow table: [`FlowKey`] → [`FlowValue`] (`BPF_MAP_TYPE_HASH`, preallocated).
pub const MAP_FLOWS: &str = "FLOWS";
/// Single-element array holding [`Config`].
pub const MAP_CONFIG: &str = "CONFIG";
/// Single-element array holding [`PortSet`].
pub const MAP_PORTS: &str = "PORTS";
/// Per-CPU array of one [`Counters`].
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Ring buffer of [`ExpiredEvent`]s.
pub const MAP_EXPIRED: &str = "EXPIRED";
/// Single-element array holding the sweep timer and its cursor.
pub const MAP_SWEEP: &str = "SWEEP";

/// `FlowKey::family` for IPv4.
pub const FAMILY_V4: u8 = 4;
/// `FlowKey::family` for IPv6.
pub const FAMILY_V6: u8 = 6;

/// A TCP flow as the server sees it arrive: client → server.
///
/// IPv4 addresses occupy the first 4 bytes of `saddr`/`daddr`; the other 12 are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Client address (network byte order).
    pub saddr: [u8; 16],
    /// Server (local) address (network byte order).
    pub daddr: [u8; 16],
    /// Client port, network byte order.
    pub sport: u16,
    /// Server (listen) port, network byte order.
    pub dport: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// `FlowValue::flags`: the flow is IPv6.
pub const FLOW_F_V6: u32 = 1;

/// Per-flow state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// Time of the last payload-carrying segment, in the kernel's coarse monotonic clock
    /// (`bpf_ktime_get_coarse_ns`, which is CLOCK_MONOTONIC_COARSE), nanoseconds.
    pub last_seen_ns: u64,
    /// `FLOW_F_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<FlowValue>() == 16);

/// One flow the kernel found idle and removed from the flow table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExpiredEvent {
    pub key: FlowKey,
    /// `FlowValue::last_seen_ns` at expiry.
    pub last_seen_ns: u64,
    /// The sweep's clock reading (same clock).
    pub now_ns: u64,
}
const _: () = assert!(size_of::<ExpiredEvent>() == 56);

/// Liveness settings, written by user space before the first sweep.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// A flow whose last payload is older than this is expired. 0 disables expiry.
    pub idle_timeout_ns: u64,
    /// Time between the starts of two sweeps. 0 disables the sweep timer.
    pub sweep_interval_ns: u64,
    /// Most flows one timer callback examines; a larger table is swept in several slices.
    pub sweep_batch: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Config>() == 24);

/// The set of TCP listen ports (host byte order), as a 65,536-bit bitmap.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSet {
    pub bits: [u64; 1024],
}
const _: () = assert!(size_of::<PortSet>() == 8192);

impl Default for PortSet {
    fn default() -> Self {
        PortSet { bits: [0; 1024] }
    }
}

impl PortSet {
    #[inline(always)]
    pub fn insert(&mut self, port: u16) {
        self.bits[usize::from(port >> 6)] |= 1 << (port & 63);
    }

    #[inline(always)]
    pub fn contains(&self, port: u16) -> bool {
        self.bits[usize::from(port >> 6)] & (1 << (port & 63)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|w| *w == 0)
    }
}

/// What the program counts (per CPU; user space sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets the program ran on.
    pub packets: u64,
    /// Payload segments to a listen port that refreshed a flow (new or known).
    pub flows_updated: u64,
    /// Flows inserted into the table.
    pub flows_created: u64,
    /// Flows removed because of FIN or RST.
    pub flows_closed: u64,
    /// Flows removed as idle and reported on the ring buffer.
    pub flows_expired: u64,
    /// Inserts refused because the table was full.
    pub map_full: u64,
    /// Expired flows not reported because the ring buffer was full (kept; retried on the
    /// next sweep).
    pub ringbuf_full: u64,
    /// Timer callbacks run (slices of sweeps).
    pub sweep_slices: u64,
    /// Complete sweeps of the table.
    pub sweeps: u64,
}
const _: () = assert!(size_of::<Counters>() == 72);

impl Counters {
    /// Adds another CPU's counters.
    pub fn add(&mut self, o: &Counters) {
        self.packets += o.packets;
        self.flows_updated += o.flows_updated;
        self.flows_created += o.flows_created;
        self.flows_closed += o.flows_closed;
        self.flows_expired += o.flows_expired;
        self.map_full += o.map_full;
        self.ringbuf_full += o.ringbuf_full;
        self.sweep_slices += o.sweep_slices;
        self.sweeps += o.sweeps;
    }

    /// Flows in the table: inserted minus removed (exact: every successful insert and delete
    /// is counted once).
    pub fn flows(&self) -> u64 {
        self.flows_created.saturating_sub(self.flows_closed + self.flows_expired)
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` data with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::ExpiredEvent {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::PortSet {}
    unsafe impl aya::Pod for super::Counters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_set() {
        let mut s = PortSet::default();
        assert!(s.is_empty());
        for p in [0, 1, 63, 64, 443, 8080, 65535] {
            s.insert(p);
        }
        for p in [0, 1, 63, 64, 443, 8080, 65535] {
            assert!(s.contains(p), "{p}");
        }
        for p in [2, 62, 65, 442, 444, 65534] {
            assert!(!s.contains(p), "{p}");
        }
    }

    #[test]
    fn counters_sum_and_flows() {
        let mut a = Counters { flows_created: 10, flows_closed: 2, ..Counters::default() };
        a.add(&Counters { flows_created: 1, flows_expired: 3, ..Counters::default() });
        assert_eq!(a.flows(), 6);
    }
}
