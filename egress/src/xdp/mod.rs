//! Kernel-side idle tracking (liveness mode `xdp`).
//!
//! An XDP program (egress-ebpf/, embedded at build time by build.rs) sees every packet that
//! arrives on the configured interfaces. For each payload-carrying TCP segment to a listen
//! port it records the flow's last-seen time in a kernel hash map; FIN or RST removes the
//! flow. A kernel timer sweeps the map every `sweep_interval`: flows idle for longer than
//! `idle_timeout` are removed and reported on a ring buffer, which [`Xdp::next_expired`]
//! reads. User space therefore keeps no per-connection idle timer at all.
//!
//! Where the driver has no native XDP, the same tracking runs as a TC ingress program rather
//! than as generic XDP, which copies every cloned or non-linear skb before it can run
//! ([`AttachMode`]).
//!
//! The programs never drop or change a packet (XDP_PASS, TC_ACT_UNSPEC), so a fault in them
//! can only cost liveness tracking, never traffic.
//!
//! [`crate::Egress::start`] chooses the mode (`auto` falls back to userspace with the reason
//! logged) and runs the task that closes the connections of expired flows in either backend.

use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{SchedClassifier, Xdp as XdpProgram};
use aya::{Ebpf, EbpfLoader, TestRun, TestRunOptions};
use egress_common::{
    Config, Counters, ExpiredEvent, FlowKey, FlowValue, PortSet, FAMILY_V4, FAMILY_V6, MAP_CONFIG, MAP_COUNTERS,
    MAP_EXPIRED, MAP_FLOWS, MAP_PORTS, PROGRAM_NAME, PROGRAM_NAME_TC,
};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::io::unix::AsyncFd;

mod attach;
mod errors;

use attach::Link;
pub use attach::{AttachMode, Attachment};
pub use errors::XdpUnavailable;
use errors::{ebpf_error, map_error, program_error};

/// Flows expired as idle, read from the ring buffer (a counter).
pub const XDP_EXPIRED: &str = crate::metrics::XDP_EXPIRED;
/// Payload segments not tracked because the flow table was full (a counter).
pub const XDP_MAP_FULL: &str = "broflake_xdp_map_full_total";
/// Idle flows whose report waited for a later sweep because the ring buffer was full.
pub const XDP_RINGBUF_FULL: &str = "broflake_xdp_ringbuf_full_total";

/// Describes the metrics this module adds to those in [`crate::metrics`].
pub fn describe_metrics() {
    metrics::describe_counter!(XDP_MAP_FULL, "Payload segments whose flow the XDP table had no room for.");
    metrics::describe_counter!(XDP_RINGBUF_FULL, "Idle flows reported a sweep late because the ring buffer was full.");
}

/// What [`Xdp::load`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdpConfig {
    /// TCP listen ports whose flows are tracked.
    pub ports: Vec<u16>,
    /// A flow with no payload for longer than this is expired.
    pub idle_timeout: Duration,
    /// Time between two sweeps of the flow table.
    pub sweep_interval: Duration,
    /// Interfaces to attach to (native mode, else generic). Empty: load only.
    pub interfaces: Vec<String>,
    /// Most flows tracked at once. The table's buckets (16 B per power-of-two slot) are
    /// allocated at load, its entries (112 B) as flows appear.
    pub map_capacity: u32,
}

impl XdpConfig {
    /// The settings the egress configuration implies (ports of every listener; the flow
    /// table sized for `limits.max_connections` plus head-room).
    pub fn from_config(config: &crate::config::Config) -> XdpConfig {
        let mut ports: Vec<u16> =
            config.listen.ws.iter().chain(&config.listen.wss).map(SocketAddr::port).filter(|p| *p != 0).collect();
        ports.sort_unstable();
        ports.dedup();
        let capacity = config.limits.max_connections.saturating_add(config.limits.max_connections / 8 + 1024);
        XdpConfig {
            ports,
            idle_timeout: config.liveness.idle_timeout,
            sweep_interval: config.liveness.sweep_interval,
            interfaces: config.liveness.interfaces.clone(),
            map_capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
        }
    }
}

/// A flow the kernel found idle (and removed from its table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiredFlow {
    /// The client's address: look the connection up with `Registry::find_peer`. IPv4
    /// clients are reported as IPv4 even when a dual-stack socket sees them as
    /// `::ffff:a.b.c.d` (compare canonical addresses: `IpAddr::to_canonical`).
    pub peer: SocketAddr,
    /// The local (listen) address it connected to.
    pub local: SocketAddr,
    /// How long it had been idle when the sweep found it.
    pub idle: Duration,
}

/// The outcome of one BPF_PROG_TEST_RUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestRunOutcome {
    /// The XDP action returned (2 = XDP_PASS).
    pub action: u32,
    /// Average run time per repetition (the kernel's measurement).
    pub duration: Duration,
}

/// XDP_PASS.
pub const XDP_PASS: u32 = 2;

enum Ring {
    Sync(RingBuf<MapData>),
    Async(AsyncFd<RingBuf<MapData>>),
}

/// The loaded (and attached) XDP liveness program.
pub struct Xdp {
    ebpf: Ebpf,
    ring: Option<Ring>,
    links: Vec<Link>,
    attached: Vec<Attachment>,
    capacity: u32,
    last_map_full: u64,
}

impl std::fmt::Debug for Xdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Xdp").field("attached", &self.attached).field("capacity", &self.capacity).finish()
    }
}

#[cfg(has_ebpf_object)]
fn object() -> Option<&'static [u8]> {
    Some(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress-ebpf.o")))
}

#[cfg(not(has_ebpf_object))]
fn object() -> Option<&'static [u8]> {
    None
}

/// Whether this binary carries the XDP program.
pub fn is_built() -> bool {
    object().is_some()
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Ring buffer size in bytes: room for one sweep's worth of events (64 bytes each with the
/// record header) up to a bound; events that do not fit wait for the next sweep.
fn ring_size(capacity: u32) -> u32 {
    let wanted = u64::from(capacity).saturating_mul(64).clamp(64 * 1024, 16 * 1024 * 1024);
    u32::try_from(wanted.next_power_of_two()).unwrap_or(16 * 1024 * 1024)
}

/// Flows one timer callback examines: the table is swept in at most ~8 slices.
fn sweep_batch(capacity: u32) -> u32 {
    (capacity / 8).clamp(16 * 1024, 128 * 1024)
}

fn key_for(peer: SocketAddr, local: SocketAddr) -> FlowKey {
    let mut key = FlowKey::default();
    // IPv4 clients of a dual-stack socket appear as ::ffff:a.b.c.d; on the wire they are IPv4.
    match (peer.ip().to_canonical(), local.ip().to_canonical()) {
        (IpAddr::V4(p), IpAddr::V4(l)) => {
            key.saddr[..4].copy_from_slice(&p.octets());
            key.daddr[..4].copy_from_slice(&l.octets());
            key.family = FAMILY_V4;
        }
        (p, l) => {
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            key.saddr = v6(p).octets();
            key.daddr = v6(l).octets();
            key.family = FAMILY_V6;
        }
    }
    key.sport = u16::from_ne_bytes(peer.port().to_be_bytes());
    key.dport = u16::from_ne_bytes(local.port().to_be_bytes());
    key
}

fn addr(family: u8, bytes: [u8; 16], port: u16) -> SocketAddr {
    let port = u16::from_be_bytes(port.to_ne_bytes());
    let ip = if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(bytes))
    };
    SocketAddr::new(ip, port)
}

fn parse_event(bytes: &[u8]) -> Option<ExpiredFlow> {
    if bytes.len() < size_of::<ExpiredEvent>() {
        return None;
    }
    // SAFETY: length checked; ExpiredEvent is plain old data (any bit pattern is valid).
    let ev: ExpiredEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    Some(ExpiredFlow {
        peer: addr(ev.key.family, ev.key.saddr, ev.key.sport),
        local: addr(ev.key.family, ev.key.daddr, ev.key.dport),
        idle: Duration::from_nanos(ev.now_ns.saturating_sub(ev.last_seen_ns)),
    })
}

impl Xdp {
    /// Loads the program, configures it, starts its sweep timer and attaches it to every
    /// configured interface (native mode first, generic mode when the driver refuses).
    pub fn load(cfg: &XdpConfig) -> Result<Xdp, XdpUnavailable> {
        let object = object().ok_or(XdpUnavailable::NotBuilt)?;
        if cfg.ports.is_empty() || cfg.ports.contains(&0) {
            return Err(XdpUnavailable::InvalidConfig("no listen port to track (port 0 cannot be tracked)".into()));
        }
        if cfg.idle_timeout.is_zero() || cfg.sweep_interval.is_zero() {
            return Err(XdpUnavailable::InvalidConfig("idle timeout and sweep interval must be non-zero".into()));
        }
        if cfg.map_capacity == 0 {
            return Err(XdpUnavailable::InvalidConfig("the flow table capacity must be at least 1".into()));
        }
        if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            return Err(XdpUnavailable::NoBtf);
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_FLOWS, cfg.map_capacity)
            .map_max_entries(MAP_EXPIRED, ring_size(cfg.map_capacity))
            .load(object)
            .map_err(ebpf_error)?;

        // The program first: it references the maps by file descriptor while it loads.
        let program: &mut XdpProgram = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| XdpUnavailable::Setup(format!("the object has no program {PROGRAM_NAME}")))?
            .try_into()
            .map_err(program_error)?;
        program.load().map_err(program_error)?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM_NAME_TC)
            .ok_or_else(|| XdpUnavailable::Setup(format!("the object has no program {PROGRAM_NAME_TC}")))?
            .try_into()
            .map_err(program_error)?;
        tc.load().map_err(program_error)?;

        let config = Config {
            idle_timeout_ns: nanos(cfg.idle_timeout),
            sweep_interval_ns: nanos(cfg.sweep_interval),
            sweep_batch: sweep_batch(cfg.map_capacity),
            _pad: 0,
        };
        let mut ports = PortSet::default();
        for p in &cfg.ports {
            ports.insert(*p);
        }
        let setup = |e: aya::maps::MapError| map_error(e);
        let missing = |name: &str| XdpUnavailable::Setup(format!("the object has no map {name}"));
        Array::<&mut MapData, Config>::try_from(ebpf.map_mut(MAP_CONFIG).ok_or_else(|| missing(MAP_CONFIG))?)
            .map_err(setup)?
            .set(0, config, 0)
            .map_err(setup)?;
        Array::<&mut MapData, PortSet>::try_from(ebpf.map_mut(MAP_PORTS).ok_or_else(|| missing(MAP_PORTS))?)
            .map_err(setup)?
            .set(0, ports, 0)
            .map_err(setup)?;
        let ring = RingBuf::try_from(ebpf.take_map(MAP_EXPIRED).ok_or_else(|| missing(MAP_EXPIRED))?).map_err(setup)?;

        let mut xdp = Xdp {
            ebpf,
            ring: Some(Ring::Sync(ring)),
            links: Vec::new(),
            attached: Vec::new(),
            capacity: cfg.map_capacity,
            last_map_full: 0,
        };
        // One run on a dummy frame starts the sweep timer (the program arms it on its first
        // run after the config is written), so expiry does not wait for traffic.
        xdp.test_run(&[0u8; 64], 1).map_err(|e| XdpUnavailable::Setup(format!("cannot start the sweep timer: {e}")))?;
        for interface in &cfg.interfaces {
            xdp.attach(interface)?;
        }
        Ok(xdp)
    }

    fn program(&self) -> &XdpProgram {
        self.ebpf
            .program(PROGRAM_NAME)
            .and_then(|p| <&XdpProgram>::try_from(p).ok())
            .expect("the program was checked at load")
    }

    fn program_mut(&mut self) -> &mut XdpProgram {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .and_then(|p| <&mut XdpProgram>::try_from(p).ok())
            .expect("the program was checked at load")
    }

    /// Where the program is attached, and how.
    pub fn attached(&self) -> &[Attachment] {
        &self.attached
    }

    /// The flow table's capacity.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The program's counters, summed over CPUs.
    pub fn counters(&self) -> Counters {
        let mut sum = Counters::default();
        let Some(map) = self.ebpf.map(MAP_COUNTERS) else { return sum };
        if let Ok(values) = PerCpuArray::<&MapData, Counters>::try_from(map).and_then(|a| a.get(&0, 0)) {
            for v in values.iter() {
                sum.add(v);
            }
        }
        sum
    }

    /// Flows in the table now (from the counters: no map walk).
    pub fn flows(&self) -> u64 {
        self.counters().flows()
    }

    /// The table's entry for one flow (client `peer` → `local`), if tracked.
    pub fn flow(&self, peer: SocketAddr, local: SocketAddr) -> Option<FlowValue> {
        let map = self.ebpf.map(MAP_FLOWS)?;
        let flows = HashMap::<&MapData, FlowKey, FlowValue>::try_from(map).ok()?;
        flows.get(&key_for(peer, local), 0).ok()
    }

    /// Runs the program once on `packet` (BPF_PROG_TEST_RUN, `repeat` times), without any
    /// interface: for tests and measurements.
    pub fn test_run(&self, packet: &[u8], repeat: u32) -> io::Result<TestRunOutcome> {
        let opts = TestRunOptions { data_in: Some(packet), repeat: repeat.max(1), ..TestRunOptions::default() };
        let r = self.program().test_run(opts).map_err(io::Error::other)?;
        Ok(TestRunOutcome { action: r.return_value, duration: r.duration })
    }

    /// Sets the flow-table gauges and the kernel's counters as metrics; logs when the table
    /// ran full since the last call.
    pub fn publish_metrics(&mut self) {
        let c = self.counters();
        metrics::gauge!(crate::metrics::XDP_FLOWS).set(c.flows() as f64);
        metrics::gauge!(crate::metrics::XDP_MAP_CAPACITY).set(f64::from(self.capacity));
        metrics::counter!(XDP_MAP_FULL).absolute(c.map_full);
        metrics::counter!(XDP_RINGBUF_FULL).absolute(c.ringbuf_full);
        if c.map_full > self.last_map_full {
            tracing::warn!(
                untracked = c.map_full - self.last_map_full,
                capacity = self.capacity,
                "XDP flow table full: some flows are not tracked for idleness"
            );
            self.last_map_full = c.map_full;
        }
    }

    /// The next flow the kernel expired, without waiting.
    pub fn try_next_expired(&mut self) -> Option<ExpiredFlow> {
        let ring = match self.ring.as_mut()? {
            Ring::Sync(r) => r,
            Ring::Async(r) => r.get_mut(),
        };
        let flow = ring.next().and_then(|item| parse_event(&item));
        if flow.is_some() {
            metrics::counter!(XDP_EXPIRED).increment(1);
        }
        flow
    }

    /// Waits for the next flow the kernel expired. Needs a tokio runtime with I/O enabled.
    /// Returns `None` only if the ring buffer cannot be polled.
    pub async fn next_expired(&mut self) -> Option<ExpiredFlow> {
        if let Some(Ring::Sync(_)) = self.ring {
            let Some(Ring::Sync(r)) = self.ring.take() else { unreachable!() };
            // SAFETY: the ring buffer owns its map's file descriptor, which stays open and
            // the same for as long as the AsyncFd holds it.
            match unsafe { AsyncFd::register_with_interest(r, tokio::io::Interest::READABLE) } {
                Ok(fd) => self.ring = Some(Ring::Async(fd)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot poll the XDP ring buffer");
                    return None;
                }
            }
        }
        loop {
            let Some(Ring::Async(fd)) = self.ring.as_mut() else { return None };
            let mut guard = fd.readable_mut().await.ok()?;
            if let Some(flow) = guard.get_inner_mut().next().and_then(|item| parse_event(&item)) {
                metrics::counter!(XDP_EXPIRED).increment(1);
                return Some(flow);
            }
            guard.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let peer: SocketAddr = "10.1.2.3:40000".parse().unwrap();
        let local: SocketAddr = "10.9.9.9:443".parse().unwrap();
        let k = key_for(peer, local);
        assert_eq!(k.family, FAMILY_V4);
        assert_eq!(k.sport.to_ne_bytes(), 40000u16.to_be_bytes());
        assert_eq!(addr(k.family, k.saddr, k.sport), peer);
        assert_eq!(addr(k.family, k.daddr, k.dport), local);
        let peer: SocketAddr = "[2001:db8::1]:5".parse().unwrap();
        let local: SocketAddr = "[2001:db8::2]:8080".parse().unwrap();
        let k = key_for(peer, local);
        assert_eq!(addr(k.family, k.saddr, k.sport), peer);
        assert_eq!(addr(k.family, k.daddr, k.dport), local);
    }

    #[test]
    fn sizes() {
        assert_eq!(ring_size(1), 64 * 1024);
        assert_eq!(ring_size(1_000_000), 16 * 1024 * 1024);
        assert!(ring_size(100_000).is_power_of_two());
        assert_eq!(sweep_batch(1_000), 16 * 1024);
        assert_eq!(sweep_batch(10_000_000), 128 * 1024);
    }

    #[test]
    fn events_parse() {
        let mut ev = ExpiredEvent {
            key: key_for("1.2.3.4:5".parse().unwrap(), "5.6.7.8:9".parse().unwrap()),
            ..Default::default()
        };
        ev.last_seen_ns = 1_000;
        ev.now_ns = 3_000_001_000;
        // SAFETY: plain old data.
        let bytes: [u8; 56] = unsafe { std::mem::transmute(ev) };
        let f = parse_event(&bytes).unwrap();
        assert_eq!(f.peer, "1.2.3.4:5".parse().unwrap());
        assert_eq!(f.local, "5.6.7.8:9".parse().unwrap());
        assert_eq!(f.idle, Duration::from_secs(3));
        assert!(parse_event(&bytes[..55]).is_none());
    }

    #[test]
    fn load_without_object_or_with_bad_config_says_why() {
        let cfg = XdpConfig {
            ports: vec![],
            idle_timeout: Duration::from_secs(1),
            sweep_interval: Duration::from_millis(100),
            interfaces: vec![],
            map_capacity: 16,
        };
        let e = Xdp::load(&cfg).unwrap_err();
        if is_built() {
            assert!(matches!(e, XdpUnavailable::InvalidConfig(_)), "{e}");
        } else {
            assert!(matches!(e, XdpUnavailable::NotBuilt), "{e}");
            assert!(e.to_string().contains("cargo xtask build-ebpf"));
        }
    }
}
