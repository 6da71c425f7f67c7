//! Several egress hosts behind one name, and QUIC connections that outlive a change of host
//! (ARCHITECTURE.md "Past one host"; the wire parts in PROTOCOL.md §14.5).
//!
//! Each host issues QUIC connection ids that begin with its fleet id ([`FleetCids`]). When a
//! consumer's volunteer changes and the new volunteer's link lands on another host, that
//! host sees short-header packets whose destination connection id names the owner, and
//! forwards them to it over UDP on the fleet's network, tagged with the route they came on
//! (its route id, a token the owner hands back). The owner feeds them to its endpoint on a
//! route of its own for that (host, token) pair: to quinn a migration, as after any failover.
//! Its packets for that route go back to the forwarding host, which writes them as DATA on
//! the original route. Relays and browsers are unchanged; nothing is negotiated with them.
//!
//! The datagram and connection-id layouts are `broflake_proto::fleet`. Datagrams are accepted
//! only from the configured peers' addresses.

use crate::config;
use crate::metrics as m;
use crate::quic::Dropped;
pub use broflake_proto::fleet::{owner, CID_LEN};
use broflake_proto::fleet::{Datagram, Kind};
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Route ids of packets forwarded here: bit 62 set. The io_uring backend's ids have bit 63
/// set and the tokio backend's count up from 1, so the three never meet.
pub const FLEET_ROUTE: u64 = 1 << 62;
/// Routes for forwarded packets kept at most (a new one beyond it is refused and counted).
const MAX_REMOTE_ROUTES: usize = 1 << 20;

/// quinn's connection-id generator for a fleet host.
#[derive(Debug)]
pub struct FleetCids {
    pub id: u16,
}

impl quinn::ConnectionIdGenerator for FleetCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut b = [0u8; CID_LEN];
        b[..2].copy_from_slice(&self.id.to_be_bytes());
        // The rest must be unpredictable (RFC 9000 §5.1); a CID is made a few times per
        // connection, so the system source is cheap enough.
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b[2..]).expect("system randomness");
        quinn::ConnectionId::new(&b)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// What a datagram from a peer asks of this host.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<'a> {
    /// A packet of one of this host's connections, forwarded by a peer: into the endpoint on
    /// this route.
    ToEndpoint { route: u64, packet: &'a [u8] },
    /// A packet the owner sent back for our route `route`: out as DATA there.
    ToRoute { route: u64, packet: &'a [u8] },
}

/// Why a datagram or a packet was dropped (the `reason` label).
pub const DROP_REASONS: [&str; 6] =
    ["unknown_owner", "unknown_peer", "bad_datagram", "route_table_full", "route_gone", "send_failed"];

/// Directions of forwarded packets (the `way` label).
pub const WAYS: [&str; 4] = ["forwarded", "received", "returned", "delivered"];

#[derive(Debug)]
struct RemoteRoute {
    peer: u16,
    token: u64,
    last: Instant,
}

#[derive(Debug, Default)]
struct Remote {
    by_key: HashMap<(u16, u64), u64>,
    by_id: HashMap<u64, RemoteRoute>,
    next: u64,
}

/// This host's part of the fleet: its socket, its peers, the routes of packets forwarded to it.
#[derive(Debug)]
pub struct Fleet {
    pub id: u16,
    socket: UdpSocket,
    peers: HashMap<u16, SocketAddr>,
    by_addr: HashMap<SocketAddr, u16>,
    remote: Mutex<Remote>,
}

fn dropped(reason: &'static str) {
    metrics::counter!(m::FLEET_DROPPED, "reason" => reason).increment(1);
}

fn counted(way: &'static str) {
    metrics::counter!(m::FLEET_PACKETS, "way" => way).increment(1);
}

impl Fleet {
    /// Binds the fleet socket (non-blocking: a send that would block drops the packet, as a
    /// full UDP queue does).
    pub fn bind(cfg: &config::Fleet) -> std::io::Result<Fleet> {
        let addr = cfg.listen.ok_or_else(|| std::io::Error::other("fleet.listen is not set"))?;
        let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, None)?;
        // Room for bursts of 16 KiB packets (the kernel caps it at net.core.rmem_max).
        let _ = s.set_recv_buffer_size(4 << 20);
        let _ = s.set_send_buffer_size(4 << 20);
        s.bind(&addr.into())?;
        s.set_nonblocking(true)?;
        let peers: HashMap<u16, SocketAddr> = cfg.peers.iter().map(|p| (p.id, p.addr)).collect();
        let by_addr = cfg.peers.iter().map(|p| (p.addr, p.id)).collect();
        Ok(Fleet { id: cfg.id, socket: s.into(), peers, by_addr, remote: Mutex::default() })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// A clone of the socket for the receiving task.
    pub fn recv_socket(&self) -> std::io::Result<UdpSocket> {
        self.socket.try_clone()
    }

    /// A packet that arrived on our route `route` whose connection lives at host `owner`:
    /// forwards it there (or drops it: an id no peer has).
    pub fn forward(&self, owner: u16, route: u64, packet: &[u8]) {
        let Some(addr) = self.peers.get(&owner) else {
            return dropped("unknown_owner");
        };
        self.send(*addr, Kind::ToOwner, route, packet, "forwarded");
    }

    /// A packet from our endpoint for a forwarded route: back to the host it came from.
    pub fn send_back(&self, route: u64, packet: &[u8]) -> Result<(), Dropped> {
        let (peer, token) = {
            let mut r = self.remote.lock().expect("fleet routes poisoned");
            let rr = r.by_id.get_mut(&route).ok_or(Dropped::RouteGone)?;
            rr.last = Instant::now();
            (rr.peer, rr.token)
        };
        let addr = *self.peers.get(&peer).ok_or(Dropped::RouteGone)?;
        self.send(addr, Kind::Back, token, packet, "returned");
        Ok(())
    }

    fn send(&self, addr: SocketAddr, kind: Kind, token: u64, packet: &[u8], way: &'static str) {
        // Header and packet as two pieces of one datagram: no copy of the packet.
        let header = Datagram::header(kind, self.id, token);
        let parts = [std::io::IoSlice::new(&header), std::io::IoSlice::new(packet)];
        match socket2::SockRef::from(&self.socket).send_to_vectored(&parts, &addr.into()) {
            Ok(_) => counted(way),
            Err(e) => {
                tracing::debug!(%addr, error = %e, "fleet send failed");
                dropped("send_failed");
            }
        }
    }

    /// A datagram from `from`: what it asks, or `None` (dropped and counted).
    pub fn receive<'a>(&self, from: SocketAddr, d: &'a [u8]) -> Option<Received<'a>> {
        let Some(&peer) = self.by_addr.get(&from) else {
            dropped("unknown_peer");
            return None;
        };
        let d = match Datagram::parse(d) {
            Ok(d) if d.sender == peer => d,
            _ => {
                dropped("bad_datagram");
                return None;
            }
        };
        match d.kind {
            Kind::ToOwner => {
                let route = self.remote_route(peer, d.token)?;
                counted("received");
                Some(Received::ToEndpoint { route, packet: d.packet })
            }
            Kind::Back => {
                counted("delivered");
                Some(Received::ToRoute { route: d.token, packet: d.packet })
            }
        }
    }

    /// Our route for packets `peer` forwards from its route `token` (made on first use).
    fn remote_route(&self, peer: u16, token: u64) -> Option<u64> {
        let mut r = self.remote.lock().expect("fleet routes poisoned");
        if let Some(&id) = r.by_key.get(&(peer, token)) {
            if let Some(rr) = r.by_id.get_mut(&id) {
                rr.last = Instant::now();
            }
            return Some(id);
        }
        if r.by_id.len() >= MAX_REMOTE_ROUTES {
            dropped("route_table_full");
            return None;
        }
        r.next += 1;
        let id = FLEET_ROUTE | r.next;
        r.by_key.insert((peer, token), id);
        r.by_id.insert(id, RemoteRoute { peer, token, last: Instant::now() });
        Some(id)
    }

    /// Forgets forwarded routes unused for `idle` (the QUIC idle timeout: the connection
    /// has moved on or ended).
    pub fn sweep(&self, idle: Duration) {
        let mut r = self.remote.lock().expect("fleet routes poisoned");
        let now = Instant::now();
        let old: Vec<u64> = r.by_id.iter().filter(|(_, rr)| now - rr.last > idle).map(|(id, _)| *id).collect();
        for id in old {
            if let Some(rr) = r.by_id.remove(&id) {
                r.by_key.remove(&(rr.peer, rr.token));
            }
        }
    }

    /// Forwarded routes held now.
    pub fn remote_routes(&self) -> usize {
        self.remote.lock().expect("fleet routes poisoned").by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::ConnectionIdGenerator;

    #[test]
    fn connection_ids_carry_the_host_and_short_headers_name_it() {
        let mut g = FleetCids { id: 0x0203 };
        let (a, b) = (g.generate_cid(), g.generate_cid());
        assert_eq!((a.len(), &a[..2]), (CID_LEN, &[2u8, 3][..]));
        assert_ne!(a[2..], b[2..], "the rest is random");
        let mut short = vec![0x40];
        short.extend_from_slice(&a);
        short.extend_from_slice(&[0; 20]);
        assert_eq!(owner(&short), Some(0x0203));
        let mut long = short.clone();
        long[0] = 0xc0;
        assert_eq!(owner(&long), None, "long headers belong to the receiver");
        assert_eq!(owner(&short[..5]), None);
    }

    #[test]
    fn forwarded_packets_come_back_to_the_route_they_came_on() {
        let bind = |id: u16| {
            let cfg = config::Fleet { id, listen: Some("127.0.0.1:0".parse().unwrap()), peers: Vec::new() };
            Fleet::bind(&cfg).unwrap()
        };
        let (a0, b0) = (bind(1), bind(2));
        let (aa, ba) = (a0.local_addr().unwrap(), b0.local_addr().unwrap());
        let with_peer = |f: Fleet, pid: u16, paddr: SocketAddr| Fleet {
            peers: HashMap::from([(pid, paddr)]),
            by_addr: HashMap::from([(paddr, pid)]),
            ..f
        };
        let (a, b) = (with_peer(a0, 2, ba), with_peer(b0, 1, aa));
        let recv = |f: &Fleet| {
            f.socket.set_nonblocking(false).unwrap();
            f.socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = vec![0u8; 65536];
            let (n, from) = f.socket.recv_from(&mut buf).unwrap();
            buf.truncate(n);
            (buf, from)
        };
        // B got a packet of A's connection on its route 77: to A, as a route of A's own.
        b.forward(1, 77, b"packet");
        let (d, from) = recv(&a);
        let Some(Received::ToEndpoint { route, packet }) = a.receive(from, &d) else { panic!("to the endpoint") };
        assert_eq!((route & FLEET_ROUTE, packet), (FLEET_ROUTE, &b"packet"[..]));
        // The same route for the next packet from the same place.
        b.forward(1, 77, b"again");
        let (d2, from2) = recv(&a);
        assert!(matches!(a.receive(from2, &d2), Some(Received::ToEndpoint { route: r, .. }) if r == route));
        // A's answer goes back to B's route 77.
        a.send_back(route, b"reply").unwrap();
        let (d, from) = recv(&b);
        assert_eq!(b.receive(from, &d), Some(Received::ToRoute { route: 77, packet: b"reply" }));
        // Strangers and garbage are dropped.
        assert_eq!(a.receive("127.0.0.1:9".parse().unwrap(), &d), None);
        assert_eq!(a.receive(ba, &[0xbf, 1, 0]), None);
        assert_eq!(a.send_back(FLEET_ROUTE | 999, b"x"), Err(Dropped::RouteGone));
        a.sweep(Duration::ZERO);
        assert_eq!(a.remote_routes(), 0);
    }
}
