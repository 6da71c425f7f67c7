//! A coarse hashed timer wheel: one tick per sweep interval. Connections are filed lazily:
//! an entry is only re-filed when it fires and its deadline has moved, so a PING (which moves
//! the idle deadline) costs nothing here.

pub const NOT_FILED: u32 = u32::MAX;

pub struct Wheel {
    slots: Vec<Vec<u32>>,
    granularity_ms: u64,
    /// Last tick processed.
    current: u64,
}

impl Wheel {
    pub fn new(granularity_ms: u64, slots: usize, now_ms: u64) -> Self {
        Wheel {
            slots: vec![Vec::new(); slots],
            granularity_ms: granularity_ms.max(1),
            current: now_ms / granularity_ms.max(1),
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
        tick as u32
    }

    /// The next tick due by `now_ms` with its entries (taken out of the wheel); the caller
    /// handles or re-files each and hands the vector back with [`Wheel::recycle`].
    pub fn next_due(&mut self, now_ms: u64) -> Option<(u32, Vec<u32>)> {
        if self.current >= now_ms / self.granularity_ms {
            return None;
        }
        self.current += 1;
        let n = self.slots.len() as u64;
        Some((self.current as u32, std::mem::take(&mut self.slots[(self.current % n) as usize])))
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

    /// How long until the next tick is due: the loop sleeps exactly that long, so a tick is
    /// handled at its boundary, not up to a whole tick late.
    pub fn ms_to_next_tick(&self, now_ms: u64) -> u64 {
        ((self.current + 1) * self.granularity_ms).saturating_sub(now_ms).clamp(1, self.granularity_ms)
    }
}
