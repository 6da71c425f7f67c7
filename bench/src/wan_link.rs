//! A point-to-point link with delay and loss between two network namespaces.
//!
//! This kernel is built without `sch_netem` (and without `fq`, which could hold packets by
//! timestamp), so the link is two TUN devices, one in each namespace, and a forwarder that holds
//! every IP packet for half the round trip and drops a given share, in each direction. The
//! TCP stacks on both sides are the kernel's; only the wire is emulated. The forwarder queues at
//! most [`QUEUE_LIMIT`] packets per direction (a router's buffer: beyond it, tail drop).

use anyhow::{bail, Context, Result};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Packets held per direction before the link drops new ones.
pub const QUEUE_LIMIT: usize = 50_000;
const MTU: usize = 1500;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// The link's shape, changeable while it runs.
#[derive(Debug, Default)]
struct Shape {
    one_way_us: AtomicU32,
    /// Loss in parts per million, per direction.
    loss_ppm: AtomicU32,
}

/// The running link; stopped (threads joined) on drop. The namespaces are the caller's.
#[derive(Debug)]
pub struct WanLink {
    shape: Arc<Shape>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// One endpoint: a namespace, the TUN device's name there, and its address.
#[derive(Debug)]
pub struct End<'a> {
    pub ns: &'a str,
    pub dev: &'a str,
    pub ip: &'a str,
}

impl WanLink {
    /// Creates a TUN device in each namespace, addresses them as peers and starts forwarding.
    pub fn create(a: &End<'_>, b: &End<'_>) -> Result<WanLink> {
        let fa = tun_in(a.ns, a.dev)?;
        let fb = tun_in(b.ns, b.dev)?;
        for (end, peer) in [(a, b), (b, a)] {
            ip(&["-n", end.ns, "addr", "add", end.ip, "peer", peer.ip, "dev", end.dev])?;
            ip(&["-n", end.ns, "link", "set", end.dev, "mtu", &MTU.to_string(), "up"])?;
        }
        let shape = Arc::new(Shape::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (fa, fb) = (Arc::new(fa), Arc::new(fb));
        let mut threads = Vec::new();
        for (from, to, seed) in [(fa.clone(), fb.clone(), 0x9e37_79b9_7f4a_7c15u64), (fb, fa, 0xbf58_476d_1ce4_e5b9)] {
            let queue = Arc::new((Mutex::new(VecDeque::<(Instant, Vec<u8>)>::new()), Condvar::new()));
            let (q, s, st) = (queue.clone(), shape.clone(), stop.clone());
            threads.push(std::thread::spawn(move || receive(&from, &q, &s, &st, seed)));
            let st = stop.clone();
            threads.push(std::thread::spawn(move || deliver(&to, &queue, &st)));
        }
        Ok(WanLink { shape, stop, threads })
    }

    /// Sets the round-trip delay (half each way) and the loss in each direction.
    pub fn set(&self, rtt: Duration, loss_percent: f32) {
        self.shape.one_way_us.store((rtt.as_micros() / 2) as u32, Ordering::Relaxed);
        self.shape.loss_ppm.store((loss_percent * 10_000.0) as u32, Ordering::Relaxed);
    }
}

impl Drop for WanLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("cannot run ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Opens a TUN device named `dev` inside namespace `ns`.
fn tun_in(ns: &str, dev: &str) -> Result<OwnedFd> {
    let path = format!("/run/netns/{ns}");
    let dev = dev.to_owned();
    std::thread::spawn(move || -> Result<OwnedFd> {
        let f = std::fs::File::open(&path).with_context(|| path.clone())?;
        // SAFETY: a valid namespace fd; only this short-lived thread changes namespace.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        // SAFETY: plain open of the TUN clone device.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            bail!("/dev/net/tun: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd was just opened and is owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero ifreq is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (i, b) in dev.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
            req.ifr_name[i] = b as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF with a valid ifreq on a TUN fd.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            bail!("TUNSETIFF {dev}: {}", std::io::Error::last_os_error());
        }
        Ok(fd)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
}

type Queue = (Mutex<VecDeque<(Instant, Vec<u8>)>>, Condvar);

/// Reads packets from one end, drops the loss share, queues the rest with their due time.
fn receive(from: &OwnedFd, queue: &Queue, shape: &Shape, stop: &AtomicBool, mut rng: u64) {
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd { fd: from.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
            continue;
        }
        // SAFETY: reading into our buffer.
        let n = unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            continue;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        if (rng % 1_000_000) < u64::from(shape.loss_ppm.load(Ordering::Relaxed)) {
            continue;
        }
        let due = Instant::now() + Duration::from_micros(u64::from(shape.one_way_us.load(Ordering::Relaxed)));
        let (lock, ready) = queue;
        let mut q = lock.lock().expect("poisoned");
        if q.len() < QUEUE_LIMIT {
            q.push_back((due, buf[..n as usize].to_vec()));
            ready.notify_one();
        }
    }
}

/// Writes queued packets to the other end when they are due (the delay is constant, so the
/// queue is in due order).
fn deliver(to: &OwnedFd, queue: &Queue, stop: &AtomicBool) {
    let (lock, ready) = queue;
    let mut q = lock.lock().expect("poisoned");
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        match q.front() {
            Some((due, _)) if *due <= now => {
                let (_, p) = q.pop_front().expect("front");
                drop(q);
                // SAFETY: writing one packet from our buffer.
                unsafe { libc::write(to.as_raw_fd(), p.as_ptr().cast(), p.len()) };
                q = lock.lock().expect("poisoned");
            }
            Some((due, _)) => {
                let wait = (*due - now).min(Duration::from_millis(100));
                q = ready.wait_timeout(q, wait).expect("poisoned").0;
            }
            None => q = ready.wait_timeout(q, Duration::from_millis(100)).expect("poisoned").0,
        }
    }
}
