//! Accepting connections: multishot accept on the listeners, admission (limits), the slot
//! and the interned peer address a new connection gets.

use super::conn::{Conn, Ext, State, F_TLS};
use super::routes::route_id;
use super::wheel::NOT_FILED;
use super::worker::{ud, Worker, OP_ACCEPT};
use crate::metrics as m;
use crate::registry::Admission;
use broflake_proto::ServerSession;
use io_uring::{opcode, types};
use std::net::{IpAddr, SocketAddr};

impl Worker {
    pub(super) fn arm_accept(&mut self, i: usize) {
        let fd = self.listeners[i].0;
        let sqe = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(ud(OP_ACCEPT, 0, i as u32));
        self.push(sqe);
    }

    pub(super) fn on_accept(&mut self, fd: i32, tls: bool) {
        metrics::counter!(m::CONNECTIONS_ACCEPTED, "backend" => "uring", "listener" => if tls { "wss" } else { "ws" })
            .increment(1);
        let Some(peer) = peer_addr(fd) else {
            // SAFETY: closing the fd we were just handed.
            unsafe { libc::close(fd) };
            return;
        };
        let admission = match self.shared.conns.admit(peer) {
            Ok(a) => a,
            Err(why) => {
                metrics::counter!(m::UPGRADE_REFUSALS, "reason" => "over_limit").increment(1);
                tracing::debug!(%peer, why, "connection rejected");
                // SAFETY: as above.
                unsafe { libc::close(fd) };
                return;
            }
        };
        let one: libc::c_int = 1;
        // SAFETY: valid fd and option buffer.
        unsafe {
            libc::setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, (&one as *const libc::c_int).cast(), 4);
        }
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                if self.conns.len() as u32 >= route_id::MAX_SLOTS {
                    self.shared.conns.release(peer.ip());
                    // SAFETY: as above.
                    unsafe { libc::close(fd) };
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
        match i32::from(ss.ss_family) {
            libc::AF_INET => {
                let a = &*(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                Some(SocketAddr::from((u32::from_be(a.sin_addr.s_addr).to_be_bytes(), u16::from_be(a.sin_port))))
            }
            libc::AF_INET6 => {
                let a = &*(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                let ip = ip.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(ip));
                Some(SocketAddr::new(ip, u16::from_be(a.sin6_port)))
            }
            _ => None,
        }
    }
}
