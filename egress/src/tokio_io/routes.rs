//! The tokio backend's routes: a table from route id to the owning connection's packet
//! queue and the route's label there.

use crate::metrics as m;
use crate::quic::{Dropped, RouteSink};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::mpsc;

#[derive(Debug, Clone)]
struct Target {
    tx: mpsc::Sender<Bytes>,
    label: u64,
}

#[derive(Debug)]
pub struct RouteTable {
    map: Mutex<HashMap<u64, Target>>,
    /// DATA frames are encoded into one shared buffer and split off it: once the frames of a
    /// block are sent and dropped the block is reused, still in cache, instead of a fresh
    /// allocation per packet (freed on another thread, so never warm).
    arena: Mutex<Arena>,
    next_id: AtomicU64,
}

#[derive(Debug, Default)]
struct Arena {
    buf: BytesMut,
    header: Vec<u8>,
}

/// Size of the arena's blocks.
const ARENA_BLOCK: usize = 256 * 1024;

impl Default for RouteTable {
    fn default() -> Self {
        // Ids are below 2^63: the io_uring backend's encoded ids have the top bit set, so the
        // two never collide in logs or metrics.
        RouteTable { map: Mutex::default(), arena: Mutex::default(), next_id: AtomicU64::new(1) }
    }
}

impl RouteTable {
    /// Opens a route for `label` on the connection whose packet queue is `tx`.
    pub fn open(&self, tx: mpsc::Sender<Bytes>, label: u64) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.map.lock().expect("routes poisoned").insert(id, Target { tx, label });
        metrics::gauge!(m::ROUTES).increment(1.0);
        id
    }

    pub fn close(&self, id: u64) {
        if self.map.lock().expect("routes poisoned").remove(&id).is_some() {
            metrics::gauge!(m::ROUTES).decrement(1.0);
        }
    }
}

impl RouteSink for RouteTable {
    fn send(&self, id: u64, packet: &[u8]) -> Result<(), Dropped> {
        let target = self.map.lock().expect("routes poisoned").get(&id).cloned().ok_or(Dropped::RouteGone)?;
        // Fits the frame limit: quinn probes only up to what the limit carries (quic::max_mtu).
        let frame = {
            let mut a = self.arena.lock().expect("arena poisoned");
            let Arena { buf, header } = &mut *a;
            header.clear();
            broflake_proto::frame::encode_data_header(target.label, packet.len(), header);
            let size = header.len() + packet.len();
            if buf.capacity() < size {
                buf.reserve(ARENA_BLOCK.max(size));
            }
            buf.extend_from_slice(header);
            buf.extend_from_slice(packet);
            buf.split().freeze()
        };
        target.tx.try_send(frame).map_err(|_| Dropped::QueueFull)
    }

    fn route_count(&self) -> usize {
        self.map.lock().expect("routes poisoned").len()
    }
}
