//! Accepting connections: multishot accept on the listeners (ordinary descriptors) or a few
//! one-shot accepts per listener into the ring's file table (direct descriptors: the peer's
//! address comes with the accept, since a direct descriptor has no `getpeername`), admission
//! (limits), the slot and the interned peer address a new connection gets.

use super::conn::{Conn, Ext, State, F_TLS};
use super::routes::route_id;
use super::wheel::NOT_FILED;
use super::worker::{ud, Worker, OP_ACCEPT, OP_CLOSE};
use crate::metrics as m;
use crate::registry::Admission;
use broflake_proto::ServerSession;
use io_uring::{opcode, types};
use std::net::{IpAddr, SocketAddr};

/// One-shot accepts kept in flight per listener with direct descriptors (each re-armed as
/// it completes; enough that a burst of handshakes never waits on the loop).
const DIRECT_ACCEPTS: usize = 32;

/// Where one in-flight accept writes its peer's address.
pub(super) struct AcceptAddr {
    addr: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl AcceptAddr {
    /// One per accept of `listeners` listeners, allocated once: the kernel writes into them
    /// while the accepts are in flight, so they never move.
    pub(super) fn table(listeners: usize) -> Box<[AcceptAddr]> {
        // SAFETY: an all-zero sockaddr_storage is valid.
        (0..listeners * DIRECT_ACCEPTS).map(|_| AcceptAddr { addr: unsafe { std::mem::zeroed() }, len: 0 }).collect()
    }
}

impl Worker {
    pub(super) fn arm_accept(&mut self, i: usize) {
        if self.direct {
            for k in 0..DIRECT_ACCEPTS {
                self.arm_one_accept(i, k as u8);
            }
            return;
        }
        let fd = self.listeners[i].0;
        let sqe = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(ud(OP_ACCEPT, 0, i as u32));
        self.push(sqe);
    }

    /// Arms accept `k` of listener `i` (direct descriptors): the kernel picks a free slot of
    /// the ring's table and writes the peer's address into this accept's own buffer.
    pub(super) fn arm_one_accept(&mut self, i: usize, k: u8) {
        let a = &mut self.accept_addrs[i * DIRECT_ACCEPTS + usize::from(k)];
        a.len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let sqe = opcode::Accept::new(
            types::Fd(self.listeners[i].0),
            (&mut a.addr as *mut libc::sockaddr_storage).cast(),
            &mut a.len,
        )
        // No SOCK_CLOEXEC: a direct descriptor is in no descriptor table (the kernel refuses it).
        .file_index(Some(types::DestinationSlot::auto_target()))
        .build()
        .user_data(ud(OP_ACCEPT, k, i as u32));
        self.push(sqe);
    }

    /// The peer address accept `k` of listener `i` wrote.
    pub(super) fn accepted_peer(&self, i: usize, k: u8) -> Option<SocketAddr> {
        let a = &self.accept_addrs[i * DIRECT_ACCEPTS + usize::from(k)];
        sockaddr(&a.addr)
    }

    /// Closes a socket no connection owns yet.
    fn close_unowned(&mut self, fd: i32) {
        if self.direct {
            let sqe = opcode::Close::new(types::Fixed(fd as u32)).build().user_data(ud(OP_CLOSE, 0, 0));
            self.push(sqe);
        } else {
            // SAFETY: closing the fd we were just handed.
            unsafe { libc::close(fd) };
        }
    }

    /// A socket was accepted: `fd` is an ordinary descriptor, or with direct descriptors the
    /// slot in the ring's table, and then `peer` is what the accept reported.
    pub(super) fn on_accept(&mut self, fd: i32, tls: bool, peer: Option<Option<SocketAddr>>) {
        metrics::counter!(m::CONNECTIONS_ACCEPTED, "backend" => "uring", "listener" => if tls { "wss" } else { "ws" })
            .increment(1);
        let Some(peer) = peer.unwrap_or_else(|| peer_addr(fd)) else {
            self.close_unowned(fd);
            return;
        };
        let admission = match self.shared.conns.admit(peer) {
            Ok(a) => a,
            Err(why) => {
                metrics::counter!(m::UPGRADE_REFUSALS, "reason" => "over_limit").increment(1);
                tracing::debug!(%peer, why, "connection rejected");
                self.close_unowned(fd);
                return;
            }
        };
        // TCP_NODELAY comes with the socket: the listener has it, and accepted sockets inherit it.
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                if self.conns.len() as u32 >= route_id::MAX_SLOTS {
                    self.shared.conns.release(peer.ip());
                    self.close_unowned(fd);
                    return;
                }
                self.conns.push(Conn::empty());
                (self.conns.len() - 1) as u32
            }
        };
        let ip = self.ips.intern(peer.ip());
        let refusal = match admission {
            Admission::Refuse { code, retry_after_ms, reason } => Some((code, retry_after_ms, reason)),
            _ => None,
        };
        let tls_conn = if tls {
            match self.wss.as_ref().map(|c| rustls::ServerConnection::new(c.clone())) {
                Some(Ok(t)) => Some(Box::new(t)),
                _ => None,
            }
        } else {
            None
        };
        let c = &mut self.conns[idx as usize];
        c.fd = fd;
        c.state = State::Upgrading;
        c.flags = if tls_conn.is_some() { F_TLS } else { 0 };
        c.ops = 0;
        c.ip = ip;
        c.port = peer.port();
        c.filed = NOT_FILED;
        c.session = ServerSession::new(self.now);
        c.rx = None;
        c.tx = None;
        c.ext = Some(Box::new(Ext { tls: tls_conn, request: Vec::new(), refusal }));
        metrics::gauge!(m::CONNECTIONS, "backend" => "uring", "state" => "handshaking").increment(1.0);
        self.arm_read(idx);
        self.refile(idx);
    }
}

pub(super) fn peer_addr(fd: i32) -> Option<SocketAddr> {
    // SAFETY: getpeername into a zeroed sockaddr_storage of the right size.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getpeername(fd, (&mut ss as *mut libc::sockaddr_storage).cast(), &mut len) != 0 {
            return None;
        }
        sockaddr(&ss)
    }
}

/// The address in a `sockaddr_storage` (IPv4-mapped IPv6 as IPv4).
fn sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    // SAFETY: the family says which layout the storage holds; both fit in it.
    unsafe {
        match i32::from(ss.ss_family) {
            libc::AF_INET => {
                let a = &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                Some(SocketAddr::from((u32::from_be(a.sin_addr.s_addr).to_be_bytes(), u16::from_be(a.sin_port))))
            }
            libc::AF_INET6 => {
                let a = &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                let ip = ip.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(ip));
                Some(SocketAddr::new(ip, u16::from_be(a.sin6_port)))
            }
            _ => None,
        }
    }
}
