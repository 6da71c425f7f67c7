//! Connection registry: admission limits (total, per source IP), and the user-space
//! deadline sweep that replaces per-connection timers.
//!
//! Each connection publishes its next deadline (handshake timeout, idle timeout, server
//! ping, end of drain) as an atomic. One sweeper wakes every `sweep_interval`, walks the
//! registry and wakes only the connections whose deadline has passed. Idle connections
//! therefore own no timer, and the number of wake-ups a second does not grow with the
//! number of connections that are alive and pinging.

use broflake_proto::{ErrorCode, Timestamp};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// No deadline.
pub const NEVER: u64 = u64::MAX;

/// What the registry knows of one connection.
#[derive(Debug)]
pub struct ConnHandle {
    pub id: u64,
    pub peer: SocketAddr,
    /// Next deadline in [`Timestamp`] milliseconds, or [`NEVER`].
    deadline: AtomicU64,
    /// Woken by the sweep when the deadline passed.
    pub wake: Notify,
    /// Set (before a wake) when the kernel reported the flow idle: close it.
    pub kill: std::sync::atomic::AtomicBool,
}

impl ConnHandle {
    pub fn set_deadline(&self, t: Option<Timestamp>) {
        self.deadline.store(t.map_or(NEVER, |t| t.as_millis()), Ordering::Relaxed);
    }

    pub fn deadline(&self) -> Option<Timestamp> {
        match self.deadline.load(Ordering::Relaxed) {
            NEVER => None,
            ms => Some(Timestamp(ms)),
        }
    }
}

/// The admission verdict for a new TCP connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Admit,
    /// Complete the upgrade and refuse in-band after HELLO (so browsers see the reason).
    Refuse {
        code: ErrorCode,
        retry_after_ms: u64,
        reason: String,
    },
    /// Far over the limits: close the TCP connection at once, spending nothing on it.
    Reject(&'static str),
}

#[derive(Debug, Default)]
struct Inner {
    conns: HashMap<u64, Arc<ConnHandle>>,
    /// Connection id by peer address (canonical form), for kernel-side expiry, which reports
    /// 4-tuples: a lookup, not a scan, per expired flow.
    by_peer: HashMap<SocketAddr, u64>,
    per_ip: HashMap<IpAddr, u32>,
    next_id: u64,
}

/// All live connections of the process.
#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Inner>,
    count: AtomicUsize,
    max_connections: usize,
    max_per_ip: u32,
}

/// Unregisters a connection when dropped.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Registry>,
    pub handle: Arc<ConnHandle>,
    pub admission: Admission,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.unregister(&self.handle);
    }
}

impl Registry {
    pub fn new(max_connections: usize, max_per_ip: u32) -> Arc<Self> {
        Arc::new(Registry {
            inner: Mutex::new(Inner::default()),
            count: AtomicUsize::new(0),
            max_connections,
            max_per_ip,
        })
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts a new connection from `peer` and decides its admission, without tracking a
    /// handle (the io_uring backend keeps its own connection table). Pair with [`Registry::release`].
    pub fn admit(&self, peer: SocketAddr) -> Result<Admission, &'static str> {
        let mut inner = self.inner.lock().expect("registry poisoned");
        self.admit_locked(&mut inner, peer)
    }

    fn admit_locked(&self, inner: &mut Inner, peer: SocketAddr) -> Result<Admission, &'static str> {
        let total = self.count.load(Ordering::Relaxed);
        let from_ip = inner.per_ip.get(&peer.ip()).copied().unwrap_or(0);
        // Up to the limit: admitted. Above it, some head-room is spent on telling clients
        // why (in-band refusal); beyond that the TCP connection is dropped at once.
        let hard_total = self.max_connections + (self.max_connections / 16).max(64);
        let hard_ip = self.max_per_ip.saturating_mul(2).max(self.max_per_ip + 8);
        if total >= hard_total {
            return Err("server far over its connection limit");
        }
        if from_ip >= hard_ip {
            return Err("source address far over its connection limit");
        }
        let admission = if total >= self.max_connections {
            Admission::Refuse {
                code: ErrorCode::SERVER_FULL,
                retry_after_ms: 5_000,
                reason: format!("server full: {} connections", self.max_connections),
            }
        } else if from_ip >= self.max_per_ip {
            Admission::Refuse {
                code: ErrorCode::PER_IP_LIMIT,
                retry_after_ms: 1_000,
                reason: format!("too many connections from {} (limit {})", peer.ip(), self.max_per_ip),
            }
        } else {
            Admission::Admit
        };
        *inner.per_ip.entry(peer.ip()).or_insert(0) += 1;
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(admission)
    }

    /// Forgets a connection counted by [`Registry::admit`].
    pub fn release(&self, ip: IpAddr) {
        let mut inner = self.inner.lock().expect("registry poisoned");
        Self::release_locked(&mut inner, ip);
        self.count.fetch_sub(1, Ordering::Relaxed);
    }

    fn release_locked(inner: &mut Inner, ip: IpAddr) {
        if let Some(n) = inner.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                inner.per_ip.remove(&ip);
            }
        }
    }

    /// Registers a new connection with a handle (tokio backend) and decides its admission.
    pub fn register(self: &Arc<Self>, peer: SocketAddr) -> Result<Registration, &'static str> {
        let mut inner = self.inner.lock().expect("registry poisoned");
        let admission = self.admit_locked(&mut inner, peer)?;
        inner.next_id += 1;
        let id = inner.next_id;
        let handle = Arc::new(ConnHandle {
            id,
            peer,
            deadline: AtomicU64::new(NEVER),
            wake: Notify::new(),
            kill: Default::default(),
        });
        inner.conns.insert(id, handle.clone());
        inner.by_peer.insert(canonical(peer), id);
        Ok(Registration { registry: self.clone(), handle, admission })
    }

    fn unregister(&self, handle: &ConnHandle) {
        let mut inner = self.inner.lock().expect("registry poisoned");
        if inner.by_peer.get(&canonical(handle.peer)) == Some(&handle.id) {
            inner.by_peer.remove(&canonical(handle.peer));
        }
        if inner.conns.remove(&handle.id).is_some() {
            Self::release_locked(&mut inner, handle.peer.ip());
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Wakes every connection whose deadline is at or before `now`; returns how many.
    pub fn sweep(&self, now: Timestamp) -> usize {
        let inner = self.inner.lock().expect("registry poisoned");
        let mut woken = 0;
        for c in inner.conns.values() {
            if c.deadline.load(Ordering::Relaxed) <= now.as_millis() {
                c.wake.notify_one();
                woken += 1;
            }
        }
        woken
    }

    /// The connection with exactly this peer address, if any (for kernel-side expiry, which
    /// reports 4-tuples).
    pub fn find_peer(&self, peer: SocketAddr) -> Option<Arc<ConnHandle>> {
        let inner = self.inner.lock().expect("registry poisoned");
        inner.by_peer.get(&canonical(peer)).and_then(|id| inner.conns.get(id)).cloned()
    }
}

/// An address with IPv4-mapped IPv6 written as IPv4, as the kernel may report either.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_refuse_then_reject() {
        let r = Registry::new(2, 100);
        let a = r.register("1.1.1.1:1".parse().unwrap()).unwrap();
        let _b = r.register("1.1.1.2:1".parse().unwrap()).unwrap();
        assert_eq!(a.admission, Admission::Admit);
        let c = r.register("1.1.1.3:1".parse().unwrap()).unwrap();
        assert!(matches!(c.admission, Admission::Refuse { code: ErrorCode::SERVER_FULL, .. }));
        let mut extra = Vec::new();
        loop {
            match r.register("1.1.1.4:1".parse().unwrap()) {
                Ok(x) => extra.push(x),
                Err(e) => {
                    assert_eq!(e, "server far over its connection limit");
                    break;
                }
            }
        }
        assert_eq!(r.len(), 2 + 64);
        drop(extra);
        drop(c);
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn per_ip_limit() {
        let r = Registry::new(1000, 2);
        let ip = |p: u16| SocketAddr::from(([9, 9, 9, 9], p));
        let _a = r.register(ip(1)).unwrap();
        let _b = r.register(ip(2)).unwrap();
        let c = r.register(ip(3)).unwrap();
        assert!(
            matches!(&c.admission, Admission::Refuse { code: ErrorCode::PER_IP_LIMIT, reason, .. } if reason.contains("9.9.9.9"))
        );
        assert_eq!(r.register("8.8.8.8:1".parse().unwrap()).unwrap().admission, Admission::Admit);
    }

    #[test]
    fn find_peer_by_address_in_either_form() {
        let r = Registry::new(10, 10);
        let a = r.register("9.9.9.9:1000".parse().unwrap()).unwrap();
        let b = r.register("[::ffff:9.9.9.9]:1001".parse().unwrap()).unwrap();
        assert_eq!(r.find_peer("[::ffff:9.9.9.9]:1000".parse().unwrap()).map(|c| c.id), Some(a.handle.id));
        assert_eq!(r.find_peer("9.9.9.9:1001".parse().unwrap()).map(|c| c.id), Some(b.handle.id));
        assert!(r.find_peer("9.9.9.9:1002".parse().unwrap()).is_none());
        drop(a);
        assert!(r.find_peer("9.9.9.9:1000".parse().unwrap()).is_none(), "forgotten with its connection");
        assert!(r.find_peer("9.9.9.9:1001".parse().unwrap()).is_some());
    }

    #[test]
    fn sweep_wakes_only_due_connections() {
        let r = Registry::new(10, 10);
        let a = r.register("1.1.1.1:1".parse().unwrap()).unwrap();
        let b = r.register("1.1.1.1:2".parse().unwrap()).unwrap();
        a.handle.set_deadline(Some(Timestamp(100)));
        b.handle.set_deadline(Some(Timestamp(5_000)));
        assert_eq!(r.sweep(Timestamp(99)), 0);
        assert_eq!(r.sweep(Timestamp(100)), 1);
        assert_eq!(r.find_peer("1.1.1.1:2".parse().unwrap()).unwrap().id, b.handle.id);
    }
}
