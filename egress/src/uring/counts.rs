//! Per-message counters of a worker, added up in the loop and handed to `metrics` in batches.

use crate::metrics as m;

/// How often the per-message counters go to `metrics` (at most this stale in a scrape).
pub(super) const COUNTS_FLUSH_MS: u64 = 200;

/// Per-message counters, added up in the loop and handed to `metrics` every
/// [`COUNTS_FLUSH_MS`] (a registry lookup per PING would cost more than the PING itself).
#[derive(Default)]
pub(super) struct Counts {
    pub(super) frames_rx: [u64; m::FRAME_TYPES.len()],
    pub(super) frames_tx: [u64; m::FRAME_TYPES.len()],
    pub(super) bytes_rx: u64,
    pub(super) bytes_tx: u64,
}

impl Counts {
    /// Whether anything waits to be flushed (the loop then wakes for it).
    pub(super) fn pending(&self) -> bool {
        self.bytes_rx > 0
            || self.bytes_tx > 0
            || self.frames_rx.iter().any(|&n| n > 0)
            || self.frames_tx.iter().any(|&n| n > 0)
    }

    /// Hands the counts to `metrics` and zeroes them.
    pub(super) fn flush(&mut self) {
        let c = self;
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
}
