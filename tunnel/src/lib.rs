//! QUIC over Broflake routes.
//!
//! quinn wants a UDP socket; a Broflake hop offers routes (a WebSocket connection plus a
//! label). [`VirtualSocket`] bridges the two: every route gets a virtual socket address,
//! packets arriving on a route are handed to quinn as datagrams from that address, and
//! datagrams quinn sends to an address go to its route through a [`PacketSink`]. Both the
//! egress (QUIC server) and the consumer (QUIC client) use it.

use bytes::Bytes;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::mpsc;

pub mod settings;
pub mod stream;

/// Where quinn's outgoing datagrams go. Implementations look the destination up in their
/// route table and queue the packet without blocking; a packet they cannot queue is dropped
/// (QUIC treats it as loss and its congestion control backs off).
pub trait PacketSink: Send + Sync + fmt::Debug + 'static {
    fn send(&self, destination: SocketAddr, packet: &[u8]);
}

/// The virtual address of route number `id`: `[fd00:b70f::<id>]:443` (ULA space that never
/// reaches a real socket).
pub fn route_addr(id: u64) -> SocketAddr {
    let ip = Ipv6Addr::new(0xfd00, 0xb70f, 0, 0, (id >> 48) as u16, (id >> 32) as u16, (id >> 16) as u16, id as u16);
    SocketAddr::V6(SocketAddrV6::new(ip, 443, 0, 0))
}

/// The route number of a virtual address made by [`route_addr`].
pub fn route_id(addr: SocketAddr) -> Option<u64> {
    match addr {
        SocketAddr::V6(a) if a.ip().segments()[..4] == [0xfd00, 0xb70f, 0, 0] => {
            let s = a.ip().segments();
            Some((u64::from(s[4]) << 48) | (u64::from(s[5]) << 32) | (u64::from(s[6]) << 16) | u64::from(s[7]))
        }
        _ => None,
    }
}

/// Counters a socket keeps (read them for metrics).
#[derive(Debug, Default)]
pub struct SocketStats {
    pub delivered: AtomicU64,
    pub dropped_inbound: AtomicU64,
    pub sent: AtomicU64,
}

/// The receiving half that feeds packets in. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Inbound {
    tx: mpsc::Sender<(SocketAddr, Bytes)>,
    stats: Arc<SocketStats>,
}

impl Inbound {
    /// Hands a packet that arrived on the route with address `from` to quinn. Drops it when
    /// quinn is behind (bounded memory; QUIC recovers).
    pub fn deliver(&self, from: SocketAddr, packet: Bytes) -> bool {
        match self.tx.try_send((from, packet)) {
            Ok(()) => {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.stats.dropped_inbound.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    pub fn stats(&self) -> &SocketStats {
        &self.stats
    }
}

/// An [`quinn::AsyncUdpSocket`] whose datagrams travel over Broflake routes.
pub struct VirtualSocket {
    local: SocketAddr,
    rx: Mutex<mpsc::Receiver<(SocketAddr, Bytes)>>,
    sink: Arc<dyn PacketSink>,
    stats: Arc<SocketStats>,
}

impl fmt::Debug for VirtualSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtualSocket").field("local", &self.local).finish_non_exhaustive()
    }
}

impl VirtualSocket {
    /// A socket with room for `queue` inbound packets in flight.
    pub fn new(local: SocketAddr, sink: Arc<dyn PacketSink>, queue: usize) -> (Arc<Self>, Inbound) {
        let (tx, rx) = mpsc::channel(queue);
        let stats = Arc::new(SocketStats::default());
        let socket = Arc::new(VirtualSocket { local, rx: Mutex::new(rx), sink, stats: stats.clone() });
        (socket, Inbound { tx, stats })
    }

    pub fn stats(&self) -> &SocketStats {
        &self.stats
    }
}

#[derive(Debug)]
struct AlwaysWritable;

impl quinn::UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl quinn::AsyncUdpSocket for VirtualSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit<'_>) -> io::Result<()> {
        // max_transmit_segments is 1, so every transmit is one datagram.
        self.sink.send(transmit.destination, transmit.contents);
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut rx = self.rx.lock().expect("socket receiver poisoned");
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let poll = if n == 0 {
                rx.poll_recv(cx)
            } else {
                match rx.try_recv() {
                    Ok(v) => Poll::Ready(Some(v)),
                    Err(_) => break,
                }
            };
            match poll {
                Poll::Ready(Some((from, packet))) => {
                    let len = packet.len().min(bufs[n].len());
                    bufs[n][..len].copy_from_slice(&packet[..len]);
                    meta[n] = quinn::udp::RecvMeta { addr: from, len, stride: len, ecn: None, dst_ip: None };
                    n += 1;
                }
                Poll::Ready(None) => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "virtual socket closed")))
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_addresses_round_trip() {
        for id in [0, 1, 0xffff, 0x1_0000, u64::MAX] {
            assert_eq!(route_id(route_addr(id)), Some(id));
        }
        assert_eq!(route_id("127.0.0.1:443".parse().unwrap()), None);
    }
}
