//! A provided buffer ring (IORING_REGISTER_PBUF_RING) shared by every connection of one
//! worker: the kernel picks a buffer only when bytes arrive, so idle connections own none.

use io_uring::types::BufRingEntry;
use std::sync::atomic::{AtomicU16, Ordering};

pub struct BufRing {
    ring: *mut BufRingEntry,
    ring_layout: std::alloc::Layout,
    bufs: Vec<u8>,
    buf_size: usize,
    entries: u16,
    tail: u16,
    pub group: u16,
}

// SAFETY: the ring memory is owned by this struct and used from one worker thread only.
unsafe impl Send for BufRing {}

impl BufRing {
    /// `entries` must be a power of two.
    pub fn new(ring: &io_uring::IoUring, group: u16, entries: u16, buf_size: usize) -> std::io::Result<BufRing> {
        assert!(entries.is_power_of_two());
        let layout =
            std::alloc::Layout::from_size_align(usize::from(entries) * std::mem::size_of::<BufRingEntry>(), 4096)
                .expect("valid layout");
        // SAFETY: non-zero size layout; zeroed memory is a valid empty ring.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) } as *mut BufRingEntry;
        assert!(!ptr.is_null(), "allocation failed");
        let mut br = BufRing {
            ring: ptr,
            ring_layout: layout,
            bufs: vec![0u8; usize::from(entries) * buf_size],
            buf_size,
            entries,
            tail: 0,
            group,
        };
        // SAFETY: the ring memory stays valid until this BufRing is dropped (after the ring).
        unsafe { ring.submitter().register_buf_ring_with_flags(ptr as u64, entries, group, 0)? };
        for bid in 0..entries {
            br.push(bid);
        }
        br.publish();
        Ok(br)
    }

    fn push(&mut self, bid: u16) {
        let idx = usize::from(self.tail & (self.entries - 1));
        // SAFETY: idx < entries; the entry belongs to user space until the tail is published.
        let e = unsafe { &mut *self.ring.add(idx) };
        e.set_addr(self.bufs.as_ptr() as u64 + u64::from(bid) * self.buf_size as u64);
        e.set_len(self.buf_size as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail field lives in the first entry, as the kernel ABI defines.
        let tail = unsafe { BufRingEntry::tail(self.ring) } as *const AtomicU16;
        unsafe { (*tail).store(self.tail, Ordering::Release) };
    }

    /// The bytes of buffer `bid` (mutable: frames are unmasked in place).
    pub fn buf(&mut self, bid: u16, len: usize) -> &mut [u8] {
        let start = usize::from(bid) * self.buf_size;
        &mut self.bufs[start..start + len.min(self.buf_size)]
    }

    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// Gives buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        self.push(bid);
        self.publish();
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; the ring is unregistered by then
        // (the worker drops its IoUring first).
        unsafe { std::alloc::dealloc(self.ring.cast(), self.ring_layout) };
    }
}
