//! A coarse hashed timer wheel: one tick per sweep interval. Connections are filed lazily:
//! an entry is only re-filed when it fires and its deadline has moved, so a PING (which moves
//! the idle deadline) costs nothing here. The loop sleeps until the next tick that has
//! entries, not tick by tick: a worker whose connections have no deadline (idle ones whose
//! liveness the kernel tracks) does not wake at all.

pub const NOT_FILED: u32 = u32::MAX;

pub struct Wheel {
    slots: Vec<Vec<u32>>,
    /// Entries of each slot that are still filed there (the others went stale: their
    /// connection was re-filed earlier, needs no deadline any more, or closed). Only a slot
    /// with live entries wakes the loop.
    live: Vec<u32>,
    granularity_ms: u64,
    /// Last tick processed.
    current: u64,
    /// No slot of a tick before this one has entries (`u64::MAX`: no slot has).
    earliest: u64,
}

impl Wheel {
    /// `slots` must be a power of two (a slot is found from the low 32 bits of its tick).
    pub fn new(granularity_ms: u64, slots: usize, now_ms: u64) -> Self {
        assert!(slots.is_power_of_two() && slots <= 1 << 31);
        Wheel {
            slots: vec![Vec::new(); slots],
            live: vec![0; slots],
            granularity_ms: granularity_ms.max(1),
            current: now_ms / granularity_ms.max(1),
            earliest: u64::MAX,
        }
    }

    /// The tick a deadline falls in (rounded up), capped at the wheel's horizon.
    pub fn tick_of(&self, deadline_ms: u64) -> u64 {
        let t = deadline_ms.div_ceil(self.granularity_ms);
        t.clamp(self.current + 1, self.current + self.slots.len() as u64 - 1)
    }

    /// Files `idx` at `tick`; returns the tick stored in the connection (low 32 bits).
    pub fn file(&mut self, idx: u32, tick: u64) -> u32 {
        let n = self.slots.len() as u64;
        self.slots[(tick % n) as usize].push(idx);
        self.live[(tick % n) as usize] += 1;
        self.earliest = self.earliest.min(tick);
        tick as u32
    }

    /// Marks the entry filed at `filed` (a value [`Wheel::file`] returned, for a tick not yet
    /// due) stale.
    pub fn unfile(&mut self, filed: u32) {
        let slot = filed as usize % self.slots.len();
        debug_assert!(self.live[slot] > 0, "unfiling from an empty slot");
        self.live[slot] = self.live[slot].saturating_sub(1);
    }

    /// The next tick due by `now_ms` with its entries (taken out of the wheel); the caller
    /// handles or re-files each and hands the vector back with [`Wheel::recycle`].
    pub fn next_due(&mut self, now_ms: u64) -> Option<(u32, Vec<u32>)> {
        if self.current >= now_ms / self.granularity_ms {
            return None;
        }
        self.current += 1;
        let slot = (self.current % self.slots.len() as u64) as usize;
        self.live[slot] = 0;
        Some((self.current as u32, std::mem::take(&mut self.slots[slot])))
    }

    /// Returns a vector from [`Wheel::next_due`] to keep its capacity.
    pub fn recycle(&mut self, mut v: Vec<u32>) {
        v.clear();
        let n = self.slots.len() as u64;
        let slot = &mut self.slots[(self.current % n) as usize];
        if slot.is_empty() && v.capacity() > 0 {
            *slot = v;
        }
    }

    /// The first tick after the last one processed that has live entries.
    pub fn next_filled(&mut self) -> Option<u64> {
        let n = self.slots.len() as u64;
        let from = self.earliest.max(self.current + 1);
        let found = (from..self.current + n).find(|t| self.live[(t % n) as usize] > 0);
        self.earliest = found.unwrap_or(u64::MAX);
        found
    }

    /// How long the loop may sleep before a tick with entries is due (`None`: none is filed).
    /// The loop then sleeps exactly that long, so a tick is handled at its boundary.
    pub fn ms_to_next_filled(&mut self, now_ms: u64) -> Option<u64> {
        let tick = self.next_filled()?;
        Some((tick * self.granularity_ms).saturating_sub(now_ms).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::Wheel;

    /// Every (tick, entry) due by `now_ms`, in order, as the loop takes them.
    fn due_until(w: &mut Wheel, now_ms: u64) -> Vec<(u32, u32)> {
        let mut seen = Vec::new();
        while let Some((tick, due)) = w.next_due(now_ms) {
            seen.extend(due.iter().map(|i| (tick, *i)));
            w.recycle(due);
        }
        seen
    }

    #[test]
    fn an_empty_wheel_never_wakes_the_loop_and_a_filed_one_wakes_it_at_the_tick() {
        let mut w = Wheel::new(1000, 8, 10_500);
        assert_eq!(w.ms_to_next_filled(10_500), None);
        let t = w.tick_of(13_200);
        assert_eq!(t, 14);
        w.file(3, t);
        assert_eq!(w.ms_to_next_filled(10_500), Some(3_500));
        w.file(4, w.tick_of(11_000));
        assert_eq!(w.ms_to_next_filled(10_500), Some(500));
        // Nothing is due before its tick; then the ticks come in order, each once.
        assert!(w.next_due(10_999).is_none());
        let (tick, due) = w.next_due(11_000).expect("tick 11");
        assert_eq!((tick, due.as_slice()), (11, &[4][..]));
        w.recycle(due);
        assert_eq!(w.ms_to_next_filled(11_000), Some(3_000));
        assert_eq!(due_until(&mut w, 20_000), [(14, 3)]);
        assert_eq!(w.ms_to_next_filled(20_000), None);
    }

    #[test]
    fn a_slot_whose_entries_all_went_stale_does_not_wake_the_loop() {
        let mut w = Wheel::new(1000, 8, 0);
        let a = w.file(1, 3);
        let b = w.file(2, 3);
        w.file(3, 5);
        assert_eq!(w.ms_to_next_filled(0), Some(3_000));
        w.unfile(a);
        assert_eq!(w.ms_to_next_filled(0), Some(3_000));
        w.unfile(b);
        assert_eq!(w.ms_to_next_filled(0), Some(5_000));
        // The stale entries still come out when their tick passes (the caller skips them).
        assert_eq!(due_until(&mut w, 3_000), [(3, 1), (3, 2)]);
        assert_eq!(w.ms_to_next_filled(3_000), Some(2_000));
    }

    #[test]
    fn deadlines_past_the_horizon_are_filed_at_its_edge() {
        let mut w = Wheel::new(1000, 8, 0);
        let t = w.tick_of(1_000_000);
        assert_eq!(t, 7);
        w.file(1, t);
        assert_eq!(w.ms_to_next_filled(0), Some(7_000));
    }
}
