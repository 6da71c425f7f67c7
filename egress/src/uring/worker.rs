//! One io_uring worker thread: its ring, listeners, connection table, timer wheel.

use super::bufring::BufRing;
use super::conn::{Conn, Ext, Slab, State, TxQueue, F_READ_ARMED, F_SEND_INFLIGHT, F_TLS};
use super::wheel::{Wheel, NOT_FILED};
use super::ReadMode;
use crate::metrics as m;
use crate::quic::{uring_route, Inbox, OutQueue};
use crate::registry::Admission;
use crate::shared::Shared;
use crate::wscodec::{self, FeedError, Upgrade, WsEvent};
use broflake_proto::frame::{self, Frame};
use broflake_proto::{Close, ErrorCode, ServerEvent, ServerSession, Timestamp};
use bytes::Bytes;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const OP_ACCEPT: u64 = 1;
const OP_READ: u64 = 2;
const OP_SEND: u64 = 3;
const OP_EVENTFD: u64 = 4;
const OP_CANCEL: u64 = 5;

fn ud(op: u64, gen: u8, idx: u32) -> u64 {
    (op << 56) | (u64::from(gen) << 32) | u64::from(idx)
}

fn ud_parts(u: u64) -> (u64, u8, u32) {
    (u >> 56, (u >> 32) as u8, u as u32)
}

/// Queued output beyond which QUIC packets for a connection are dropped (slow reader).
const MAX_PENDING: usize = 256 * 1024;
/// Queued output beyond which the peer is dropped: it is not reading what it asks for.
const MAX_PENDING_HARD: usize = 1024 * 1024;
const BUFRING_GROUP: u16 = 7;

/// Interned peer addresses (for per-IP accounting without storing an address per connection).
#[derive(Default)]
struct IpTable {
    ids: HashMap<IpAddr, (u32, u32)>,
    addrs: Vec<Option<IpAddr>>,
    free: Vec<u32>,
}

impl IpTable {
    fn intern(&mut self, ip: IpAddr) -> u32 {
        if let Some((id, refs)) = self.ids.get_mut(&ip) {
            *refs += 1;
            return *id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.addrs[id as usize] = Some(ip);
                id
            }
            None => {
                self.addrs.push(Some(ip));
                (self.addrs.len() - 1) as u32
            }
        };
        self.ids.insert(ip, (id, 1));
        id
    }

    fn release(&mut self, id: u32) -> Option<IpAddr> {
        let ip = self.addrs.get(id as usize).copied().flatten()?;
        let e = self.ids.get_mut(&ip)?;
        e.1 -= 1;
        if e.1 == 0 {
            self.ids.remove(&ip);
            self.addrs[id as usize] = None;
            self.free.push(id);
        }
        Some(ip)
    }
}

/// Why on_ws stopped early.
enum End {
    Close(Close),
    PeerClosed(u16),
}

pub struct Worker {
    thread: u8,
    // Field order matters for Drop: the ring goes before the buffer ring memory.
    ring: IoUring,
    bufring: Option<BufRing>,
    shared: Arc<Shared>,
    listeners: Vec<(i32, bool)>,
    wss: Option<Arc<rustls::ServerConfig>>,
    inbox: Arc<Inbox>,
    stop: Arc<AtomicBool>,
    mode: ReadMode,
    conns: Slab,
    free: Vec<u32>,
    scratch: Vec<u8>,
    plain: Vec<u8>,
    tx: Vec<u8>,
    wsout: Vec<u8>,
    out: OutQueue,
    efd_buf: Box<[u8; 8]>,
    wheel: Wheel,
    now: Timestamp,
    ips: IpTable,
    draining: bool,
    rearm_accept: Vec<usize>,
    cqes: Vec<(u64, i32, u32)>,
    counts: Counts,
    /// When `counts` last went to `metrics` (ms).
    counts_flushed: u64,
}

impl Worker {
    pub fn new(
        thread: u8,
        shared: Arc<Shared>,
        listeners: Vec<(i32, bool)>,
        wss: Option<Arc<rustls::ServerConfig>>,
        inbox: Arc<Inbox>,
        stop: Arc<AtomicBool>,
        mode: ReadMode,
    ) -> std::io::Result<Worker> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(4096)
            .or_else(|_| IoUring::new(4096))?;
        let bufring = match mode {
            ReadMode::Recv => Some(BufRing::new(&ring, BUFRING_GROUP, 1024, 16 * 1024)?),
            ReadMode::Poll => None,
        };
        let now = shared.now();
        let gran = u64::try_from(shared.config.liveness.sweep_interval.as_millis()).unwrap_or(1000).max(1);
        Ok(Worker {
            thread,
            ring,
            bufring,
            shared,
            listeners,
            wss,
            inbox,
            stop,
            mode,
            conns: Slab::default(),
            free: Vec::new(),
            scratch: vec![0u8; 64 * 1024],
            plain: vec![0u8; 64 * 1024],
            tx: Vec::with_capacity(4096),
            wsout: Vec::with_capacity(4096),
            out: OutQueue::default(),
            efd_buf: Box::new([0u8; 8]),
            wheel: Wheel::new(gran, 512, now.as_millis()),
            now,
            ips: IpTable::default(),
            draining: false,
            rearm_accept: Vec::new(),
            cqes: Vec::with_capacity(512),
            counts: Counts::default(),
            counts_flushed: 0,
        })
    }

    fn push(&mut self, sqe: squeue::Entry) {
        loop {
            // SAFETY: every buffer an SQE points at (connection send queues, the eventfd
            // buffer) outlives the operation: it is freed only after the final CQE.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return;
            }
            let _ = self.ring.submit();
        }
    }

    pub fn run(mut self) {
        for i in 0..self.listeners.len() {
            self.arm_accept(i);
        }
        self.arm_eventfd();
        loop {
            if self.stop.load(Ordering::Acquire) {
                self.shutdown();
                return;
            }
            let wait = std::time::Duration::from_millis(self.wheel.ms_to_next_tick(self.shared.now().as_millis()));
            let ts = types::Timespec::new().sec(wait.as_secs()).nsec(wait.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)) => {}
                Err(e) => {
                    tracing::error!(thread = self.thread, error = %e, "io_uring_enter failed");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            self.now = self.shared.now();
            self.cqes.clear();
            for cqe in self.ring.completion() {
                self.cqes.push((cqe.user_data(), cqe.result(), cqe.flags()));
            }
            let cqes = std::mem::take(&mut self.cqes);
            for &(u, res, flags) in &cqes {
                self.on_cqe(u, res, flags);
            }
            self.cqes = cqes;
            self.run_wheel();
            if !self.draining && *self.shared.drain.borrow() {
                self.start_drain();
            }
            for i in std::mem::take(&mut self.rearm_accept) {
                self.arm_accept(i);
            }
        }
    }

    fn arm_accept(&mut self, i: usize) {
        let fd = self.listeners[i].0;
        let sqe = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(ud(OP_ACCEPT, 0, i as u32));
        self.push(sqe);
    }

    fn arm_eventfd(&mut self) {
        let sqe = opcode::Read::new(types::Fd(self.inbox.efd), self.efd_buf.as_mut_ptr(), 8)
            .build()
            .user_data(ud(OP_EVENTFD, 0, 0));
        self.push(sqe);
    }

    fn arm_read(&mut self, idx: u32) {
        let c = &mut self.conns[idx as usize];
        if c.flags & F_READ_ARMED != 0 {
            return;
        }
        let u = ud(OP_READ, c.gen, idx);
        let sqe = match (self.mode, &self.bufring) {
            (ReadMode::Recv, Some(br)) => opcode::RecvMulti::new(types::Fd(c.fd), br.group).build().user_data(u),
            _ => opcode::PollAdd::new(types::Fd(c.fd), (libc::POLLIN | libc::POLLRDHUP) as u32)
                .multi(true)
                .build()
                .user_data(u),
        };
        c.flags |= F_READ_ARMED;
        c.ops += 1;
        self.push(sqe);
    }

    fn on_cqe(&mut self, u: u64, res: i32, flags: u32) {
        let (op, gen, idx) = ud_parts(u);
        match op {
            OP_ACCEPT => {
                if res >= 0 {
                    let tls = self.listeners[idx as usize].1;
                    self.on_accept(res, tls);
                } else if res != -libc::ECANCELED {
                    tracing::warn!(thread = self.thread, error = %std::io::Error::from_raw_os_error(-res), "accept failed");
                }
                if !cqueue::more(flags) {
                    self.rearm_accept.push(idx as usize);
                }
            }
            OP_EVENTFD => {
                self.arm_eventfd();
                self.on_inbox();
            }
            OP_CANCEL => {
                if let Some(c) = self.live(idx, gen) {
                    c.ops -= 1;
                }
                self.maybe_free(idx, gen);
            }
            OP_READ => self.on_read(idx, gen, res, flags),
            OP_SEND => self.on_send(idx, gen, res),
            _ => {}
        }
    }

    /// The connection at `idx` if it still has generation `gen` and is in use.
    fn live(&mut self, idx: u32, gen: u8) -> Option<&mut Conn> {
        self.conns.get_mut(idx as usize).filter(|c| c.gen == gen && c.state != State::Free)
    }

    fn on_accept(&mut self, fd: i32, tls: bool) {
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
                if self.conns.len() as u32 >= uring_route::MAX_SLOTS {
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

    fn on_read(&mut self, idx: u32, gen: u8, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        let Some(c) = self.live(idx, gen) else { return };
        if !more {
            c.ops -= 1;
            c.flags &= !F_READ_ARMED;
        }
        let readable = matches!(c.state, State::Upgrading | State::Open);
        if !readable {
            if let (Some(bid), Some(br)) = (bid, self.bufring.as_mut()) {
                br.recycle(bid);
            }
            self.maybe_free(idx, gen);
            return;
        }
        match self.mode {
            ReadMode::Poll => {
                if res < 0 {
                    if res != -libc::ECANCELED {
                        self.drop_conn(idx, "peer_gone");
                    }
                    return;
                }
                self.read_ready(idx);
            }
            ReadMode::Recv => {
                if res > 0 {
                    if let Some(bid) = bid {
                        let mut br = self.bufring.take().expect("recv mode has a buffer ring");
                        let data = br.buf(bid, res as usize);
                        self.on_bytes(idx, data);
                        br.recycle(bid);
                        self.bufring = Some(br);
                    }
                } else if res == 0 || res != -libc::ENOBUFS {
                    // End of stream or an error; ENOBUFS only means the ring ran dry (re-armed below).
                    self.drop_conn(idx, "peer_gone");
                    return;
                }
            }
        }
        if !more && self.live(idx, gen).is_some_and(|c| matches!(c.state, State::Upgrading | State::Open)) {
            self.arm_read(idx);
        }
    }

    /// Poll mode: read what is there into the thread's buffer.
    fn read_ready(&mut self, idx: u32) {
        let mut buf = std::mem::take(&mut self.scratch);
        loop {
            let c = &self.conns[idx as usize];
            if !matches!(c.state, State::Upgrading | State::Open) {
                break;
            }
            // SAFETY: reading into our own buffer from a socket we own.
            let n = unsafe { libc::recv(c.fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n > 0 {
                let n = n as usize;
                self.on_bytes(idx, &mut buf[..n]);
                if n < buf.len() {
                    break;
                }
            } else if n == 0 {
                self.drop_conn(idx, "peer_gone");
                break;
            } else {
                let e = std::io::Error::last_os_error().raw_os_error();
                if e == Some(libc::EINTR) {
                    continue;
                }
                if e != Some(libc::EAGAIN) {
                    self.drop_conn(idx, "peer_gone");
                }
                break;
            }
        }
        self.scratch = buf;
    }

    fn on_bytes(&mut self, idx: u32, data: &mut [u8]) {
        if self.conns[idx as usize].flags & F_TLS == 0 {
            self.on_plain(idx, data);
            return;
        }
        let mut rd: &[u8] = data;
        let mut plain = std::mem::take(&mut self.plain);
        let mut failed = false;
        while !rd.is_empty() && !failed {
            let Some(tls) = self.tls(idx) else { break };
            if tls.read_tls(&mut rd).is_err() || tls.process_new_packets().is_err() {
                failed = true;
            }
            while let Some(tls) = self.tls(idx) {
                match tls.reader().read(&mut plain) {
                    Ok(0) => break,
                    Ok(n) => {
                        self.on_plain(idx, &mut plain[..n]);
                        if !matches!(self.conns[idx as usize].state, State::Upgrading | State::Open) {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        }
        self.plain = plain;
        // Handshake records, alerts.
        self.queue_out(idx, &[]);
        if failed {
            metrics::counter!(m::UPGRADE_REFUSALS, "reason" => "tls").increment(1);
            self.begin_close(idx, None);
        }
    }

    fn tls(&mut self, idx: u32) -> Option<&mut rustls::ServerConnection> {
        self.conns[idx as usize].ext.as_mut().and_then(|e| e.tls.as_deref_mut())
    }

    fn on_plain(&mut self, idx: u32, data: &mut [u8]) {
        match self.conns[idx as usize].state {
            State::Upgrading => self.on_upgrade_bytes(idx, data),
            State::Open => self.on_ws(idx, data),
            _ => {}
        }
    }

    fn on_upgrade_bytes(&mut self, idx: u32, data: &[u8]) {
        let cfg = &self.shared.config;
        let (min_v, max_v) = (self.shared.session.min_version, self.shared.session.max_version);
        let ext = self.conns[idx as usize].ext.get_or_insert_with(Default::default);
        ext.request.extend_from_slice(data);
        match wscodec::upgrade(&ext.request, &cfg.listen.path, min_v, max_v) {
            Upgrade::Partial => {}
            Upgrade::Accept { response, used, .. } => {
                let mut rest = ext.request.split_off(used);
                ext.request = Vec::new();
                if ext.tls.is_none() && ext.refusal.is_none() {
                    self.conns[idx as usize].ext = None;
                }
                self.queue_out(idx, &response);
                self.set_state(idx, State::Open);
                if !rest.is_empty() {
                    self.on_ws(idx, &mut rest);
                }
            }
            Upgrade::Refuse { response, label } => {
                metrics::counter!(m::UPGRADE_REFUSALS, "reason" => label).increment(1);
                self.queue_out(idx, &response);
                self.begin_close(idx, None);
            }
        }
    }

    fn set_state(&mut self, idx: u32, state: State) {
        let c = &mut self.conns[idx as usize];
        let label = |s: State, c: &Conn| match s {
            State::Upgrading => "handshaking",
            State::Open if !c.session.is_open() => "handshaking",
            State::Open if c.session.is_draining() => "draining",
            _ => "open",
        };
        if matches!(c.state, State::Upgrading | State::Open) {
            metrics::gauge!(m::CONNECTIONS, "backend" => "uring", "state" => label(c.state, c)).decrement(1.0);
        }
        c.state = state;
        if matches!(state, State::Upgrading | State::Open) {
            metrics::gauge!(m::CONNECTIONS, "backend" => "uring", "state" => label(state, c)).increment(1.0);
        }
    }

    /// WebSocket bytes of an open connection.
    fn on_ws(&mut self, idx: u32, data: &mut [u8]) {
        let now = self.now;
        let thread = self.thread;
        let max_message = self.shared.config.limits.max_message_size as usize;
        let Worker { conns, shared, tx, wsout, counts, .. } = self;
        let conn = &mut conns[idx as usize];
        let gen = conn.gen;
        let mut rx = conn.rx.take().map(|b| *b).unwrap_or_default();
        let routes_before = conn.session.route_count();
        let was_open = conn.session.is_open();
        wsout.clear();
        let r = wscodec::feed(&mut rx, data, max_message, |ev| match ev {
            WsEvent::Binary(msg) => {
                let r = handle_binary(conn, shared, now, msg, tx, thread, idx, gen, counts);
                move_as_message(tx, wsout);
                r.map_err(End::Close)
            }
            WsEvent::Ping(p) => {
                if let Err(close) = conn.session.ws_ping(&shared.session, now, tx) {
                    // The ERROR frame the session wrote goes out before the close.
                    move_as_message(tx, wsout);
                    return Err(End::Close(close));
                }
                wscodec::frame_header(0xA, p.len(), wsout);
                wsout.extend_from_slice(p);
                Ok(())
            }
            WsEvent::Pong => {
                conn.session.touch(now);
                Ok(())
            }
            WsEvent::Close(code) => Err(End::PeerClosed(code)),
        });
        let conn = &mut self.conns[idx as usize];
        if !rx.is_empty() {
            rx.shrink();
            conn.rx = Some(Box::new(rx));
        }
        let routes_after = conn.session.route_count();
        if routes_after != routes_before {
            let d = routes_after as i64 - routes_before as i64;
            self.shared.uring_routes.fetch_add(d, Ordering::Relaxed);
            metrics::gauge!(m::ROUTES).increment(d as f64);
        }
        if !was_open && conn.session.is_open() {
            metrics::gauge!(m::CONNECTIONS, "backend" => "uring", "state" => "handshaking").decrement(1.0);
            metrics::gauge!(m::CONNECTIONS, "backend" => "uring", "state" => "open").increment(1.0);
        }
        let out = std::mem::take(&mut self.wsout);
        if !out.is_empty() {
            self.queue_out(idx, &out);
        }
        self.wsout = out;
        match r {
            // The session's deadlines may have moved (a reply sent straight to the socket
            // files nothing on its own).
            Ok(()) => self.refile(idx),
            Err(FeedError::Ws(f)) => {
                let label = match f.code {
                    1003 => "text_message",
                    1009 => "message_too_big",
                    _ => "ws_protocol_error",
                };
                metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => label).increment(1);
                self.begin_close(idx, Some((f.code, f.reason.to_string())));
            }
            Err(FeedError::Caller(End::Close(close))) => {
                if !was_open && !close.by_peer && close.code != ErrorCode::NO_ERROR {
                    self.shared.stats.refusals.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::HANDSHAKES, "result" => "refused").increment(1);
                    metrics::counter!(m::REFUSALS, "reason" => close.code.label()).increment(1);
                }
                self.count_close(&close);
                self.begin_close(idx, Some((close.close_code(), close.reason.to_string())));
            }
            Err(FeedError::Caller(End::PeerClosed(code))) => {
                metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => "normal").increment(1);
                let code = if code == 1005 { 1000 } else { code };
                self.begin_close(idx, Some((code, String::new())));
            }
        }
    }

    fn count_close(&self, close: &Close) {
        metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => close.code.label()).increment(1);
        if matches!(close.code, ErrorCode::IDLE_TIMEOUT) {
            self.shared.stats.idle_closes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends `payload` (Broflake frames) as one binary WebSocket message; nothing when empty.
    fn queue_message(&mut self, idx: u32, payload: &[u8]) {
        if payload.is_empty() {
            return;
        }
        let mut f = Vec::with_capacity(payload.len() + 10);
        wscodec::frame_header(0x2, payload.len(), &mut f);
        f.extend_from_slice(payload);
        self.queue_out(idx, &f);
    }

    /// Queues bytes (plaintext for TLS connections) and starts a send if none is in flight.
    fn queue_out(&mut self, idx: u32, bytes: &[u8]) {
        let now = self.now.as_millis();
        let c = &mut self.conns[idx as usize];
        if matches!(c.state, State::Zombie | State::Free) {
            return;
        }
        let tls = c.ext.as_mut().and_then(|e| e.tls.as_deref_mut());
        if tls.is_none() && bytes.is_empty() {
            return;
        }
        let mut bytes = bytes;
        if tls.is_none() && c.tx.is_none() && c.flags & F_SEND_INFLIGHT == 0 && c.fd >= 0 {
            // Nothing queued: write straight to the socket. A reply (PONG, a few DATA frames)
            // almost always fits the socket buffer, and then needs no queue, no allocation and
            // no second completion; only what does not fit is queued.
            // SAFETY: our socket and a valid buffer; MSG_DONTWAIT never blocks the loop.
            let n = unsafe {
                libc::send(c.fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            };
            if n < 0 {
                let e = std::io::Error::last_os_error().raw_os_error();
                if !matches!(e, Some(libc::EAGAIN) | Some(libc::EINTR)) {
                    self.drop_conn(idx, "peer_gone");
                    return;
                }
            } else {
                self.counts.bytes_tx += n as u64;
                bytes = &bytes[n as usize..];
                if bytes.is_empty() {
                    return;
                }
            }
        }
        let c = &mut self.conns[idx as usize];
        let tls = c.ext.as_mut().and_then(|e| e.tls.as_deref_mut());
        let q = c.tx.get_or_insert_with(|| Box::new(TxQueue { since: now, ..TxQueue::default() }));
        match tls {
            Some(tls) => {
                if !bytes.is_empty() {
                    let _ = tls.writer().write_all(bytes);
                }
                while tls.wants_write() {
                    if tls.write_tls(&mut q.pending).is_err() {
                        break;
                    }
                }
            }
            None => q.pending.extend_from_slice(bytes),
        }
        if q.pending.is_empty() && q.inflight.is_empty() {
            c.tx = None;
            return;
        }
        if q.pending.len() > MAX_PENDING_HARD {
            tracing::debug!(thread = self.thread, "peer does not read its replies; dropping it");
            self.drop_conn(idx, "write_timeout");
            return;
        }
        self.flush(idx);
        self.refile(idx);
    }

    fn flush(&mut self, idx: u32) {
        let c = &mut self.conns[idx as usize];
        if c.flags & F_SEND_INFLIGHT != 0 || c.fd < 0 {
            return;
        }
        let Some(q) = c.tx.as_mut() else { return };
        if q.offset >= q.inflight.len() {
            if q.pending.is_empty() {
                return;
            }
            q.inflight.clear();
            std::mem::swap(&mut q.inflight, &mut q.pending);
            q.offset = 0;
        }
        let rest = &q.inflight[q.offset..];
        let sqe = opcode::Send::new(types::Fd(c.fd), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud(OP_SEND, c.gen, idx));
        c.flags |= F_SEND_INFLIGHT;
        c.ops += 1;
        self.push(sqe);
    }

    fn on_send(&mut self, idx: u32, gen: u8, res: i32) {
        let now = self.now.as_millis();
        let Some(c) = self.live(idx, gen) else { return };
        c.ops -= 1;
        c.flags &= !F_SEND_INFLIGHT;
        if c.state == State::Zombie {
            self.maybe_free(idx, gen);
            return;
        }
        if res < 0 {
            self.drop_conn(idx, "peer_gone");
            return;
        }
        let c = &mut self.conns[idx as usize];
        self.counts.bytes_tx += res as u64;
        let q = c.tx.as_mut().expect("a send was in flight");
        q.offset += res as usize;
        q.since = now;
        if q.offset < q.inflight.len() || !q.pending.is_empty() {
            self.flush(idx);
            return;
        }
        c.tx = None;
        if c.state == State::Closing {
            self.finish_close(idx);
        }
    }

    /// Sends an optional close frame, stops reading, closes once the output is flushed.
    fn begin_close(&mut self, idx: u32, ws_close: Option<(u16, String)>) {
        if !matches!(self.conns[idx as usize].state, State::Upgrading | State::Open) {
            return;
        }
        if let Some((code, reason)) = ws_close {
            let mut f = Vec::with_capacity(reason.len() + 4);
            wscodec::close_frame(code, &reason, &mut f);
            self.queue_out(idx, &f);
        }
        self.set_state(idx, State::Closing);
        let c = &mut self.conns[idx as usize];
        if c.flags & F_READ_ARMED != 0 {
            let sqe = opcode::AsyncCancel::new(ud(OP_READ, c.gen, idx)).build().user_data(ud(OP_CANCEL, c.gen, idx));
            c.ops += 1;
            self.push(sqe);
        }
        if self.conns[idx as usize].tx.is_none() {
            self.finish_close(idx);
        } else {
            self.refile(idx);
        }
    }

    fn drop_conn(&mut self, idx: u32, reason: &'static str) {
        if matches!(self.conns[idx as usize].state, State::Upgrading | State::Open) {
            metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => reason).increment(1);
            self.set_state(idx, State::Closing);
        }
        self.finish_close(idx);
    }

    fn finish_close(&mut self, idx: u32) {
        let c = &mut self.conns[idx as usize];
        if c.fd < 0 || matches!(c.state, State::Free | State::Zombie) {
            return;
        }
        // SAFETY: our socket; shutdown makes in-flight operations on it complete.
        unsafe {
            libc::shutdown(c.fd, libc::SHUT_RDWR);
            libc::close(c.fd);
        }
        c.fd = -1;
        c.state = State::Zombie;
        let routes = c.session.route_count();
        let gen = c.gen;
        let ip = c.ip;
        if routes > 0 {
            self.shared.uring_routes.fetch_sub(routes as i64, Ordering::Relaxed);
            metrics::gauge!(m::ROUTES).decrement(routes as f64);
        }
        if let Some(ip) = self.ips.release(ip) {
            self.shared.conns.release(ip);
        }
        self.maybe_free(idx, gen);
    }

    fn maybe_free(&mut self, idx: u32, gen: u8) {
        let Some(c) = self.conns.get_mut(idx as usize) else { return };
        if c.gen != gen || c.state != State::Zombie || c.ops != 0 {
            return;
        }
        c.gen = c.gen.wrapping_add(1);
        c.state = State::Free;
        c.flags = 0;
        c.filed = NOT_FILED;
        c.session = ServerSession::new(Timestamp::ZERO);
        c.rx = None;
        c.tx = None;
        c.ext = None;
        self.free.push(idx);
    }

    /// Closes the connections of peers the kernel reported idle.
    fn on_expired(&mut self) {
        let peers = self.inbox.take_expired();
        // The kernel sweep reports idle flows in bursts: find the whole batch in one pass over
        // the connections (no per-connection index, which would cost memory on every idle
        // connection to save a scan per sweep).
        let mut wanted: std::collections::HashSet<(u32, u16)> = peers
            .iter()
            .filter_map(|p| self.ips.ids.get(&p.ip().to_canonical()).map(|&(id, _)| (id, p.port())))
            .collect();
        let mut found = Vec::with_capacity(wanted.len());
        for i in 0..self.conns.len() as u32 {
            if wanted.is_empty() {
                break;
            }
            let c = &self.conns[i as usize];
            if c.state == State::Open && wanted.remove(&(c.ip, c.port)) {
                found.push(i);
            }
        }
        for idx in found {
            let c = &mut self.conns[idx as usize];
            let mut tx = Vec::new();
            let close = c.session.fail(ErrorCode::IDLE_TIMEOUT, "idle timeout (xdp)", &mut tx);
            self.queue_message(idx, &tx);
            metrics::counter!(m::IDLE_CLOSES, "source" => "xdp").increment(1);
            self.shared.stats.idle_closes.fetch_add(1, Ordering::Relaxed);
            self.shared.stats.xdp_closed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => close.code.label()).increment(1);
            self.begin_close(idx, Some((close.close_code(), close.reason.to_string())));
        }
    }

    /// QUIC packets for this worker's connections.
    fn on_inbox(&mut self) {
        let mut q = std::mem::take(&mut self.out);
        // `take` re-arms the wake-up first, so anything queued after it wakes us again.
        self.inbox.take(&mut q);
        self.on_expired();
        let mut frame = std::mem::take(&mut self.wsout);
        let mut i = 0;
        while i < q.items.len() {
            let (slot, gen, start, _) = q.items[i];
            // Coalesce consecutive frames for the same connection into one message.
            let mut j = i;
            let mut end = q.items[i].3;
            while j + 1 < q.items.len()
                && q.items[j + 1].0 == slot
                && q.items[j + 1].1 == gen
                && q.items[j + 1].2 == end
            {
                j += 1;
                end = q.items[j].3;
                if (end - start) as usize > self.shared.session.max_frame_size as usize {
                    break;
                }
            }
            let n = (j - i + 1) as u64;
            i = j + 1;
            let ok = self.live(slot, gen).is_some_and(|c| {
                c.state == State::Open
                    && c.session.is_open()
                    && c.tx.as_ref().is_none_or(|t| t.pending.len() < MAX_PENDING)
            });
            if !ok {
                metrics::counter!(m::PACKETS_DROPPED, "reason" => "send_queue_full").increment(n);
                continue;
            }
            let bytes = &q.bytes[start as usize..end as usize];
            frame.clear();
            wscodec::frame_header(0x2, bytes.len(), &mut frame);
            frame.extend_from_slice(bytes);
            self.counts.frames_tx[m::frame_index(frame::types::DATA)] += n;
            self.queue_out(slot, &frame);
        }
        self.wsout = frame;
        self.out = q;
    }

    /// The connection's next deadline (ms), if any.
    fn deadline(&self, idx: u32) -> Option<u64> {
        let c = &self.conns[idx as usize];
        let write = c.tx.as_ref().map(|t| t.since + self.shared.config.limits.write_timeout.as_millis() as u64);
        let session = match c.state {
            State::Upgrading | State::Open => {
                let idle = !self.shared.kernel_liveness() || !c.session.is_open() || c.session.server_pings();
                c.session.next_timeout_with(&self.shared.session, idle).map(|t| t.as_millis())
            }
            _ => None,
        };
        match (write, session) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn refile(&mut self, idx: u32) {
        let Some(d) = self.deadline(idx) else { return };
        let tick = self.wheel.tick_of(d);
        let c = &self.conns[idx as usize];
        if c.filed == NOT_FILED || u64::from(c.filed) > tick {
            let t = self.wheel.file(idx, tick);
            self.conns[idx as usize].filed = t;
        }
    }

    fn run_wheel(&mut self) {
        let now = self.now;
        let mut checked = 0u64;
        while let Some((tick, entries)) = self.wheel.next_due(now.as_millis()) {
            for &idx in &entries {
                let c = &mut self.conns[idx as usize];
                if c.filed != tick || matches!(c.state, State::Free | State::Zombie) {
                    continue;
                }
                c.filed = NOT_FILED;
                if c.session.is_open() {
                    checked += 1;
                }
                if let Some(d) = self.deadline(idx) {
                    if d <= now.as_millis() {
                        self.on_deadline(idx);
                    }
                }
                if matches!(self.conns[idx as usize].state, State::Upgrading | State::Open | State::Closing) {
                    self.refile(idx);
                }
            }
            self.wheel.recycle(entries);
        }
        if checked > 0 {
            self.shared.stats.userspace_liveness_checks.fetch_add(checked, Ordering::Relaxed);
            metrics::counter!(m::USERSPACE_CHECKS).increment(checked);
        }
        if now.as_millis() >= self.counts_flushed + COUNTS_FLUSH_MS {
            self.counts_flushed = now.as_millis();
            self.flush_counts();
        }
    }

    fn on_deadline(&mut self, idx: u32) {
        let now = self.now;
        let write_timeout = self.shared.config.limits.write_timeout.as_millis() as u64;
        let c = &mut self.conns[idx as usize];
        if c.tx.as_ref().is_some_and(|t| t.since + write_timeout <= now.as_millis()) {
            // drop_conn counts the close (once).
            self.drop_conn(idx, "write_timeout");
            return;
        }
        if c.state == State::Closing {
            return;
        }
        if c.state == State::Upgrading {
            // No WebSocket yet: the answer is HTTP (over TLS once it is up), never a close frame.
            metrics::counter!(m::UPGRADE_REFUSALS, "reason" => "timeout").increment(1);
            let tls_up = c.ext.as_ref().and_then(|e| e.tls.as_deref()).is_none_or(|t| !t.is_handshaking());
            if tls_up {
                self.queue_out(idx, &wscodec::request_timeout_response());
            }
            self.begin_close(idx, None);
            return;
        }
        let server_pings = c.session.server_pings();
        let mut tx = std::mem::take(&mut self.tx);
        tx.clear();
        let r = c.session.on_timeout(&self.shared.session, now, &mut tx);
        self.queue_message(idx, &tx);
        self.tx = tx;
        match r {
            Ok(()) => {
                if server_pings {
                    self.shared.stats.server_pings.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::SERVER_PINGS).increment(1);
                }
            }
            Err(close) => {
                if close.code == ErrorCode::IDLE_TIMEOUT {
                    let source = if server_pings { "server-ping" } else { "userspace" };
                    metrics::counter!(m::IDLE_CLOSES, "source" => source).increment(1);
                }
                if close.code == ErrorCode::HANDSHAKE_TIMEOUT {
                    self.shared.stats.refusals.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::REFUSALS, "reason" => close.code.label()).increment(1);
                }
                self.count_close(&close);
                self.begin_close(idx, Some((close.close_code(), close.reason.to_string())));
            }
        }
    }

    fn start_drain(&mut self) {
        self.draining = true;
        let grace = u64::try_from(self.shared.config.drain.grace.as_millis()).unwrap_or(u64::MAX);
        let reconnect = self.shared.config.drain.reconnect.clone();
        for idx in 0..self.conns.len() as u32 {
            let c = &mut self.conns[idx as usize];
            if c.state != State::Open || !c.session.is_open() || c.session.is_draining() {
                continue;
            }
            let mut tx = Vec::new();
            c.session.goaway(self.now, grace, &reconnect, &mut tx);
            self.shared.stats.goaways.fetch_add(1, Ordering::Relaxed);
            metrics::gauge!(m::CONNECTIONS, "backend" => "uring", "state" => "open").decrement(1.0);
            metrics::gauge!(m::CONNECTIONS, "backend" => "uring", "state" => "draining").increment(1.0);
            self.queue_message(idx, &tx);
            self.refile(idx);
        }
    }

    fn flush_counts(&mut self) {
        let c = &mut self.counts;
        for (i, name) in m::FRAME_TYPES.iter().enumerate() {
            if c.frames_rx[i] > 0 {
                metrics::counter!(m::FRAMES_RECEIVED, "type" => *name).increment(c.frames_rx[i]);
                c.frames_rx[i] = 0;
            }
            if c.frames_tx[i] > 0 {
                metrics::counter!(m::FRAMES_SENT, "type" => *name).increment(c.frames_tx[i]);
                c.frames_tx[i] = 0;
            }
        }
        if c.bytes_rx > 0 {
            metrics::counter!(m::BYTES_RECEIVED).increment(std::mem::take(&mut c.bytes_rx));
        }
        if c.bytes_tx > 0 {
            metrics::counter!(m::BYTES_SENT).increment(std::mem::take(&mut c.bytes_tx));
        }
    }

    fn shutdown(&mut self) {
        self.flush_counts();
        for idx in 0..self.conns.len() as u32 {
            if matches!(self.conns[idx as usize].state, State::Upgrading | State::Open | State::Closing) {
                self.drop_conn(idx, "shutdown");
            }
        }
        for (fd, _) in &self.listeners {
            // SAFETY: our listening sockets.
            unsafe { libc::close(*fd) };
        }
        let _ = self.ring.submit();
    }
}

/// Moves `payload` (Broflake frames) to the end of `out` as one binary WebSocket message;
/// nothing when empty.
fn move_as_message(payload: &mut Vec<u8>, out: &mut Vec<u8>) {
    if !payload.is_empty() {
        wscodec::frame_header(0x2, payload.len(), out);
        out.extend_from_slice(payload);
        payload.clear();
    }
}

/// How often the per-message counters go to `metrics` (at most this stale in a scrape).
const COUNTS_FLUSH_MS: u64 = 200;

/// Per-message counters, added up in the loop and handed to `metrics` every
/// [`COUNTS_FLUSH_MS`] (a registry lookup per PING would cost more than the PING itself).
#[derive(Default)]
struct Counts {
    frames_rx: [u64; m::FRAME_TYPES.len()],
    frames_tx: [u64; m::FRAME_TYPES.len()],
    bytes_rx: u64,
    bytes_tx: u64,
}

/// One Broflake message from an open connection (the same session logic as the tokio
/// backend). DATA goes to the QUIC endpoint under a route id that encodes the connection.
#[allow(clippy::too_many_arguments)]
fn handle_binary(
    conn: &mut Conn,
    shared: &Shared,
    now: Timestamp,
    msg: &[u8],
    tx: &mut Vec<u8>,
    thread: u8,
    idx: u32,
    gen: u8,
    counts: &mut Counts,
) -> Result<(), Close> {
    counts.bytes_rx += msg.len() as u64;
    let cfg = &shared.session;
    let limit = conn.session.max_frame_size(cfg);
    let mut rest = msg;
    while !rest.is_empty() {
        let decoded = match frame::decode(rest, limit) {
            Ok(d) => d,
            Err(e) => {
                counts.frames_rx[m::FRAME_INVALID] += 1;
                return Err(conn.session.decode_error(&e, tx));
            }
        };
        rest = &rest[decoded.len..];
        counts.frames_rx[m::frame_index(decoded.frame.frame_type())] += 1;
        if matches!(decoded.frame, Frame::Ping { .. }) {
            counts.frames_tx[m::frame_index(frame::types::PONG)] += 1;
        }
        match conn.session.handle_frame(cfg, now, decoded, tx)? {
            ServerEvent::Hello { hello, .. } => {
                let draining = *shared.drain.borrow();
                let resuming = draining && shared.issued_here(hello.previous_session);
                let refusal = conn.ext.as_mut().and_then(|e| e.refusal.take());
                let refusal = refusal.or_else(|| {
                    (draining && !resuming).then(|| (ErrorCode::DRAINING, 5_000, "server is draining".to_string()))
                });
                if let Some((code, retry, reason)) = refusal {
                    return Err(conn.session.refuse(code, retry, reason, tx));
                }
                if resuming {
                    conn.session.close_at(Timestamp(shared.drain_deadline.load(Ordering::Relaxed)));
                    shared.stats.resumptions.fetch_add(1, Ordering::Relaxed);
                }
                conn.session.accept(cfg, now, shared.session_id(), tx)?;
                if conn.ext.as_ref().is_some_and(|e| e.tls.is_none() && e.refusal.is_none()) {
                    conn.ext = None;
                }
                counts.frames_tx[m::frame_index(frame::types::WELCOME)] += 1;
                shared.stats.handshakes.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::HANDSHAKES, "result" => "accepted").increment(1);
            }
            ServerEvent::Data { label, packet, .. } => {
                if label > uring_route::MAX_LABEL {
                    conn.session.close_route(label, ErrorCode::ROUTE_LIMIT, tx);
                    continue;
                }
                let id = uring_route::encode(thread, idx, gen, label);
                shared.quic.deliver(id, Bytes::copy_from_slice(packet));
            }
            ServerEvent::RouteClosed { .. } | ServerEvent::Pong | ServerEvent::None => {}
        }
    }
    Ok(())
}

fn peer_addr(fd: i32) -> Option<SocketAddr> {
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
