//! XDP liveness: records when each client→server TCP flow to a listen port last carried
//! payload, and expires idle flows in the kernel.
//!
//! - Every payload-carrying segment to a listen port upserts the flow's last-seen time in
//!   `FLOWS` (a hash map whose entries are allocated as flows appear, not for its whole
//!   capacity at load: memory follows the connections there are); FIN or RST removes the flow.
//! - A bpf_timer (in `SWEEP`) walks `FLOWS` every sweep interval with bpf_for_each_map_elem;
//!   each flow idle for longer than the idle timeout is reported on the `EXPIRED` ring buffer
//!   and removed. A large table is swept in slices of at most `Config::sweep_batch` flows,
//!   one timer callback each.
//! - The program never drops, redirects or changes a packet: it always returns XDP_PASS.
//! - The same tracking also exists as a TC ingress program (`broflake_liveness_tc`), for
//!   interfaces without native XDP: generic (SKB-mode) XDP copies every packet it sees that is
//!   cloned or not linear (every TCP segment on loopback or a veth), TC sees the skb as it is.
//!   It returns TC_ACT_UNSPEC: the next program, or the default action, decides.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_timer, xdp_action, BPF_F_NO_PREALLOC, BPF_NOEXIST, TC_ACT_UNSPEC},
    btf_maps::{Array, HashMap, PerCpuArray, RingBuf},
    cty::c_void,
    helpers::{
        bpf_for_each_map_elem, bpf_ktime_get_coarse_ns, bpf_map_delete_elem, bpf_timer_init, bpf_timer_set_callback,
        bpf_timer_start,
    },
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use core::mem::size_of;
use core::ptr;
use egress_common::{Config, Counters, ExpiredEvent, FlowKey, FlowValue, PortSet, FAMILY_V4, FAMILY_V6, FLOW_F_V6};

/// Default capacity; user space sets the real one before loading. Not preallocated: at the
/// default capacity (1,000,000 connections) a preallocated map took 150 MB at load.
#[btf_map]
static FLOWS: HashMap<FlowKey, FlowValue, 65536, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();
#[btf_map]
static CONFIG: Array<Config, 1> = Array::new();
#[btf_map]
static PORTS: Array<PortSet, 1> = Array::new();
#[btf_map]
static COUNTERS: PerCpuArray<Counters, 1> = PerCpuArray::new();
/// Size in bytes; user space sets the real one before loading.
#[btf_map]
static EXPIRED: RingBuf<ExpiredEvent, { 256 * 1024 }> = RingBuf::new();
#[btf_map]
static SWEEP: Array<SweepState, 1> = Array::new();

/// The sweep timer and where the sweep in progress stands.
#[repr(C)]
pub struct SweepState {
    timer: bpf_timer,
    /// Non-zero once the timer was initialised.
    armed: u64,
    /// Flows a sweep in progress has already examined and kept (the next slice skips them).
    cursor: u64,
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;
/// IPv6 extension headers followed before giving up.
const MAX_IPV6_EXT: usize = 6;
/// Bound on header offsets (keeps the verifier's ranges small; real headers end far sooner).
const MAX_L4_OFF: usize = 1024;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const CLOCK_MONOTONIC: u64 = 1;
const EEXIST: i32 = 17;
/// Gap between two slices of one sweep.
const SLICE_GAP_NS: u64 = 50_000;

#[xdp]
pub fn broflake_liveness(ctx: XdpContext) -> u32 {
    let counters = COUNTERS.get_ptr_mut(0);
    count(counters, |c| c.packets += 1);
    arm_sweep();
    let _ = try_liveness(&ctx, counters);
    xdp_action::XDP_PASS
}

/// Headers this long are made linear (pulled) before parsing when the skb's linear part is
/// shorter; in practice the stack keeps them linear already.
const TC_PULL: u32 = 128;

#[classifier]
pub fn broflake_liveness_tc(ctx: TcContext) -> i32 {
    let counters = COUNTERS.get_ptr_mut(0);
    count(counters, |c| c.packets += 1);
    arm_sweep();
    let linear = ctx.data_end() - ctx.data();
    if linear < TC_PULL as usize && ctx.len() as usize > linear {
        let _ = ctx.pull_data(ctx.len().min(TC_PULL));
    }
    let _ = try_liveness(&ctx, counters);
    TC_ACT_UNSPEC
}

/// A packet's bytes, whichever hook sees it.
trait Packet {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
}

impl Packet for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

#[inline(always)]
fn ptr_at<T, C: Packet>(ctx: &C, offset: usize) -> Result<*const T, ()> {
    let start = ctx.start();
    let end = ctx.end();
    if start + offset + size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *const T)
}

#[inline(always)]
fn u16_at<C: Packet>(ctx: &C, offset: usize) -> Result<u16, ()> {
    let p = ptr_at::<[u8; 2], C>(ctx, offset)?;
    // SAFETY: bounds checked against data_end.
    Ok(u16::from_be_bytes(unsafe { *p }))
}

#[repr(C)]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    tot_len: [u8; 2],
    id: [u8; 2],
    frag_off: [u8; 2],
    ttl: u8,
    protocol: u8,
    check: [u8; 2],
    saddr: [u8; 4],
    daddr: [u8; 4],
}

#[repr(C)]
struct Ipv6Hdr {
    vtc_flow: [u8; 4],
    payload_len: [u8; 2],
    nexthdr: u8,
    hop_limit: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

/// The first 8 bytes of any IPv6 extension header (the fragment header is exactly this).
#[repr(C)]
struct Ipv6Ext {
    nexthdr: u8,
    hdrlen: u8,
    /// For the fragment header: offset (13 bits) | res (2) | M (1).
    frag_off: [u8; 2],
    rest: [u8; 4],
}

#[repr(C)]
struct TcpHdr {
    source: [u8; 2],
    dest: [u8; 2],
    seq: [u8; 4],
    ack_seq: [u8; 4],
    doff_res: u8,
    flags: u8,
    window: [u8; 2],
    check: [u8; 2],
    urg_ptr: [u8; 2],
}

/// Where the TCP header is and how long the segment is, from the IP header(s).
struct L4 {
    off: usize,
    len: usize,
}

#[inline(always)]
fn try_liveness<C: Packet>(ctx: &C, counters: Option<*mut Counters>) -> Result<(), ()> {
    let mut ethertype = u16_at(ctx, 12)?;
    let mut off = ETH_HLEN;
    // 802.1Q / 802.1ad: at most two tags (QinQ).
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = u16_at(ctx, off + 2)?;
        off += 4;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            ethertype = u16_at(ctx, off + 2)?;
            off += 4;
        }
    }
    let mut key = FlowKey { saddr: [0; 16], daddr: [0; 16], sport: 0, dport: 0, family: 0, _pad: [0; 3] };
    let l4 = match ethertype {
        ETH_P_IP => ipv4(ctx, off, &mut key)?,
        ETH_P_IPV6 => ipv6(ctx, off, &mut key)?,
        _ => return Err(()),
    };
    let tcp = ptr_at::<TcpHdr, C>(ctx, l4.off)?;
    // SAFETY: bounds checked.
    let (doff_res, flags, sport, dport) = unsafe { ((*tcp).doff_res, (*tcp).flags, (*tcp).source, (*tcp).dest) };
    let doff = usize::from(doff_res >> 4) * 4;
    if doff < size_of::<TcpHdr>() || doff > l4.len {
        return Err(());
    }
    // The whole TCP header (with options) must be in the packet.
    ptr_at::<u8, C>(ctx, l4.off + doff - 1)?;
    let ports = PORTS.get(0).ok_or(())?;
    if !ports.contains(u16::from_be_bytes(dport)) {
        return Err(());
    }
    key.sport = u16::from_ne_bytes(sport);
    key.dport = u16::from_ne_bytes(dport);
    if flags & (TCP_FIN | TCP_RST) != 0 {
        if FLOWS.remove(&key).is_ok() {
            count(counters, |c| c.flows_closed += 1);
        }
        return Ok(());
    }
    if l4.len == doff {
        return Ok(()); // no payload (pure ACK, SYN, keepalive probe without data…)
    }
    upsert(&key, counters);
    Ok(())
}

#[inline(always)]
fn ipv4<C: Packet>(ctx: &C, off: usize, key: &mut FlowKey) -> Result<L4, ()> {
    let ip = ptr_at::<Ipv4Hdr, C>(ctx, off)?;
    // SAFETY: bounds checked.
    let (vihl, tot_len, frag_off, protocol, saddr, daddr) =
        unsafe { ((*ip).version_ihl, (*ip).tot_len, (*ip).frag_off, (*ip).protocol, (*ip).saddr, (*ip).daddr) };
    if vihl >> 4 != 4 || protocol != IPPROTO_TCP {
        return Err(());
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < size_of::<Ipv4Hdr>() {
        return Err(());
    }
    // Only unfragmented packets and first fragments carry the TCP header.
    if u16::from_be_bytes(frag_off) & 0x1fff != 0 {
        return Err(());
    }
    let tot_len = usize::from(u16::from_be_bytes(tot_len));
    if tot_len < ihl {
        return Err(());
    }
    key.saddr[..4].copy_from_slice(&saddr);
    key.daddr[..4].copy_from_slice(&daddr);
    key.family = FAMILY_V4;
    Ok(L4 { off: off + ihl, len: tot_len - ihl })
}

#[inline(always)]
fn ipv6<C: Packet>(ctx: &C, off: usize, key: &mut FlowKey) -> Result<L4, ()> {
    let ip = ptr_at::<Ipv6Hdr, C>(ctx, off)?;
    // SAFETY: bounds checked.
    let (vtc, payload_len, mut next) = unsafe { ((*ip).vtc_flow[0], (*ip).payload_len, (*ip).nexthdr) };
    if vtc >> 4 != 6 {
        return Err(());
    }
    // SAFETY: bounds checked.
    unsafe {
        key.saddr = (*ip).saddr;
        key.daddr = (*ip).daddr;
    }
    key.family = FAMILY_V6;
    let mut len = usize::from(u16::from_be_bytes(payload_len));
    let mut l4 = off + size_of::<Ipv6Hdr>();
    for _ in 0..MAX_IPV6_EXT {
        if next == IPPROTO_TCP {
            break;
        }
        let ext = ptr_at::<Ipv6Ext, C>(ctx, l4)?;
        // SAFETY: bounds checked.
        let (nexthdr, hdrlen, frag_off) = unsafe { ((*ext).nexthdr, (*ext).hdrlen, (*ext).frag_off) };
        let size = match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => (usize::from(hdrlen) + 1) * 8,
            IPPROTO_FRAGMENT => {
                // Only the first fragment carries the TCP header.
                if u16::from_be_bytes(frag_off) & 0xfff8 != 0 {
                    return Err(());
                }
                size_of::<Ipv6Ext>()
            }
            _ => return Err(()),
        };
        if size > len {
            return Err(());
        }
        len -= size;
        l4 += size;
        if l4 > MAX_L4_OFF {
            return Err(());
        }
        next = nexthdr;
    }
    if next != IPPROTO_TCP {
        return Err(());
    }
    Ok(L4 { off: l4, len })
}

#[inline(always)]
fn count(counters: Option<*mut Counters>, f: impl FnOnce(&mut Counters)) {
    if let Some(c) = counters {
        // SAFETY: this CPU's slot of a per-CPU map.
        f(unsafe { &mut *c });
    }
}

#[inline(always)]
fn upsert(key: &FlowKey, counters: Option<*mut Counters>) {
    // SAFETY: a helper without side effects.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if let Some(v) = FLOWS.get_ptr_mut(key) {
        // SAFETY: a live element; an aligned 8-byte store is atomic.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*v).last_seen_ns), now) };
        count(counters, |c| c.flows_updated += 1);
        return;
    }
    let flags = if key.family == FAMILY_V6 { FLOW_F_V6 } else { 0 };
    let value = FlowValue { last_seen_ns: now, flags, _pad: 0 };
    match FLOWS.insert(key, &value, u64::from(BPF_NOEXIST)) {
        Ok(()) => count(counters, |c| {
            c.flows_created += 1;
            c.flows_updated += 1;
        }),
        // Another CPU inserted it first: refresh that one.
        Err(e) if e == -EEXIST => {
            if let Some(v) = FLOWS.get_ptr_mut(key) {
                // SAFETY: as above.
                unsafe { ptr::write_volatile(ptr::addr_of_mut!((*v).last_seen_ns), now) };
            }
            count(counters, |c| c.flows_updated += 1);
        }
        // E2BIG: the table is full (ENOMEM: no memory for a new entry).
        Err(_) => count(counters, |c| c.map_full += 1),
    }
}

fn map_ptr<M>(m: &'static M) -> *mut c_void {
    ptr::from_ref(m).cast_mut().cast()
}

/// Starts the sweep timer on the first run after user space wrote the config (user space
/// runs the program once through BPF_PROG_TEST_RUN right after loading, so the sweep does
/// not wait for traffic).
#[inline(always)]
fn arm_sweep() {
    let Some(st) = SWEEP.get_ptr_mut(0) else { return };
    // SAFETY: the map's only element; `armed` is written once.
    if unsafe { ptr::read_volatile(ptr::addr_of!((*st).armed)) } != 0 {
        return;
    }
    let Some(cfg) = CONFIG.get(0) else { return };
    let interval = cfg.sweep_interval_ns;
    if interval == 0 {
        return;
    }
    // SAFETY: the timer lives in SWEEP's value, as bpf_timer_init requires. A concurrent
    // initialisation on another CPU makes this one fail with EBUSY, which is fine.
    unsafe {
        let timer = ptr::addr_of_mut!((*st).timer);
        if bpf_timer_init(timer, map_ptr(&SWEEP), CLOCK_MONOTONIC) == 0 {
            bpf_timer_set_callback(timer, sweep as *mut c_void);
            bpf_timer_start(timer, interval, 0);
        }
        ptr::write_volatile(ptr::addr_of_mut!((*st).armed), 1);
    }
}

/// State of one slice, shared with the per-flow callback.
#[repr(C)]
struct SliceCtx {
    now: u64,
    idle_timeout: u64,
    /// Flows at the start of the walk to skip (examined by earlier slices).
    skip: u64,
    /// Flows this slice may still examine.
    budget: u64,
    /// Flows kept so far in this sweep (the next slice's `skip`).
    kept: u64,
    expired: u64,
    ringbuf_full: u64,
    /// Non-zero when the walk stopped because the budget ran out.
    stopped: u64,
}

/// Timer callback: one slice of a sweep.
#[inline(never)]
extern "C" fn sweep(_map: *mut c_void, _key: *mut u32, st: *mut SweepState) -> i32 {
    let Some(cfg) = CONFIG.get(0) else { return 0 };
    let interval = cfg.sweep_interval_ns;
    let batch = if cfg.sweep_batch == 0 { u64::MAX } else { u64::from(cfg.sweep_batch) };
    // SAFETY: `st` is SWEEP's element, given by the kernel.
    let cursor = unsafe { (*st).cursor };
    let mut slice = SliceCtx {
        // SAFETY: a helper without side effects.
        now: unsafe { bpf_ktime_get_coarse_ns() },
        idle_timeout: cfg.idle_timeout_ns,
        skip: cursor,
        budget: batch,
        kept: cursor,
        expired: 0,
        ringbuf_full: 0,
        stopped: 0,
    };
    if cfg.idle_timeout_ns != 0 {
        // SAFETY: the callback's signature matches what the kernel passes for a hash map.
        unsafe {
            bpf_for_each_map_elem(map_ptr(&FLOWS), expire as *mut c_void, ptr::addr_of_mut!(slice).cast(), 0);
        }
    }
    let done = slice.stopped == 0;
    count(COUNTERS.get_ptr_mut(0), |c| {
        c.flows_expired += slice.expired;
        c.ringbuf_full += slice.ringbuf_full;
        c.sweep_slices += 1;
        if done {
            c.sweeps += 1;
        }
    });
    // SAFETY: as above; re-arming a timer from its own callback is allowed.
    unsafe {
        (*st).cursor = if done { 0 } else { slice.kept };
        bpf_timer_start(ptr::addr_of_mut!((*st).timer), if done { interval } else { SLICE_GAP_NS }, 0);
    }
    0
}

/// bpf_for_each_map_elem callback: 0 continues the walk, 1 stops it.
#[inline(never)]
extern "C" fn expire(map: *mut c_void, key: *mut FlowKey, value: *mut FlowValue, ctx: *mut SliceCtx) -> i64 {
    // SAFETY: the kernel passes a live element and our stack context.
    unsafe {
        let s = &mut *ctx;
        if s.skip > 0 {
            s.skip -= 1;
            return 0;
        }
        if s.budget == 0 {
            s.stopped = 1;
            return 1;
        }
        s.budget -= 1;
        let last = ptr::read_volatile(ptr::addr_of!((*value).last_seen_ns));
        if s.now > last && s.now - last > s.idle_timeout {
            let event = ExpiredEvent { key: *key, last_seen_ns: last, now_ns: s.now };
            if EXPIRED.output(&event, 0).is_ok() {
                if bpf_map_delete_elem(map, key.cast()) == 0 {
                    s.expired += 1;
                }
                return 0;
            }
            // Kept, and reported by a later sweep.
            s.ringbuf_full += 1;
        }
        s.kept += 1;
        0
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
