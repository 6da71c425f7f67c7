//! Per-connection state of the io_uring backend, kept small: everything a connection needs
//! only sometimes (a partial frame, queued output, TLS, a pending refusal) lives behind an
//! `Option<Box<…>>` that is `None` while the connection is idle.

use crate::wscodec::WsRx;
use broflake_proto::{ErrorCode, ServerSession};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Free,
    /// Reading the HTTP upgrade request.
    Upgrading,
    /// WebSocket open, Broflake session running.
    Open,
    /// Flushing what is queued, then closing.
    Closing,
    /// Socket closed; waiting for in-flight operations to complete before reuse.
    Zombie,
}

/// Flag bits.
pub const F_READ_ARMED: u8 = 1;
pub const F_SEND_INFLIGHT: u8 = 2;
pub const F_TLS: u8 = 4;
/// A receive is in flight (direct descriptors, poll mode).
pub const F_RECV_INFLIGHT: u8 = 8;
/// The socket became readable again while it was.
pub const F_RECV_AGAIN: u8 = 16;

/// What is waiting to be sent.
#[derive(Debug, Default)]
pub struct TxQueue {
    /// Bytes handed to the kernel (must stay put until the send completes).
    pub inflight: Vec<u8>,
    pub offset: usize,
    /// Bytes queued behind them.
    pub pending: Vec<u8>,
    /// When output started waiting (write timeout), in Timestamp ms.
    pub since: u64,
}

/// Rarely needed parts.
#[derive(Debug, Default)]
pub struct Ext {
    /// Boxed on its own: it is large, and plain ws:// connections never need it.
    pub tls: Option<Box<rustls::ServerConnection>>,
    /// Bytes of the upgrade request so far.
    pub request: Vec<u8>,
    /// A refusal decided at accept time, sent in-band after HELLO.
    pub refusal: Option<(ErrorCode, u64, String)>,
}

#[derive(Debug)]
pub struct Conn {
    /// The socket: a descriptor, or with direct descriptors its slot in the ring's table.
    pub fd: i32,
    pub gen: u8,
    pub state: State,
    pub flags: u8,
    /// Operations submitted and not yet finally completed.
    pub ops: u8,
    /// Index of the peer's address in the worker's address table, and its port (to find the
    /// connection of a flow the kernel reports idle).
    pub ip: u32,
    pub port: u16,
    /// Wheel tick this connection is filed at, or `wheel::NOT_FILED`.
    pub filed: u32,
    pub session: ServerSession,
    pub rx: Option<Box<WsRx>>,
    pub tx: Option<Box<TxQueue>>,
    pub ext: Option<Box<Ext>>,
}

impl Conn {
    pub fn empty() -> Self {
        Conn {
            fd: -1,
            gen: 0,
            state: State::Free,
            flags: 0,
            ops: 0,
            ip: 0,
            port: 0,
            filed: super::wheel::NOT_FILED,
            session: ServerSession::new(broflake_proto::Timestamp::ZERO),
            rx: None,
            tx: None,
            ext: None,
        }
    }
}

// An idle connection's whole user-space cost is this struct plus a wheel entry: keep it
// within 112 bytes (docs/BENCHMARKS.md, "Past the open-file limit").
const _: () = assert!(std::mem::size_of::<Conn>() <= 112);

/// Bytes of per-connection state in the worker's table (what an idle connection costs in
/// user space, besides its share of the worker's fixed buffers).
pub const fn size_of_conn() -> usize {
    std::mem::size_of::<Conn>()
}

/// Connections in fixed-size chunks: growing never copies (or transiently doubles) the
/// table, so memory follows the number of connections in 1024-entry steps.
#[derive(Debug, Default)]
pub struct Slab {
    chunks: Vec<Vec<Conn>>,
    len: usize,
}

const CHUNK: usize = 1024;

impl Slab {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn push(&mut self, c: Conn) {
        if self.chunks.last().is_none_or(|ch| ch.len() == CHUNK) {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        self.chunks.last_mut().expect("a chunk").push(c);
        self.len += 1;
    }

    pub fn get_mut(&mut self, i: usize) -> Option<&mut Conn> {
        self.chunks.get_mut(i / CHUNK).and_then(|ch| ch.get_mut(i % CHUNK))
    }
}

impl std::ops::Index<usize> for Slab {
    type Output = Conn;
    fn index(&self, i: usize) -> &Conn {
        &self.chunks[i / CHUNK][i % CHUNK]
    }
}

impl std::ops::IndexMut<usize> for Slab {
    fn index_mut(&mut self, i: usize) -> &mut Conn {
        &mut self.chunks[i / CHUNK][i % CHUNK]
    }
}
