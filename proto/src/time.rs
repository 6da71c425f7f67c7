//! Time as data. Sessions never read a clock: every call takes `now`, and deadlines come
//! back as values the caller files in whatever timer structure it has (a wheel, a sweep,
//! a kernel map).

use std::ops::{Add, Sub};
use std::time::Duration;

/// Milliseconds since an epoch the caller picks (typically its own start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp(0);

    pub fn from_millis(ms: u64) -> Self {
        Timestamp(ms)
    }

    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<u64> for Timestamp {
    type Output = Timestamp;
    fn add(self, ms: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        self + u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    }
}

impl Sub<Timestamp> for Timestamp {
    type Output = u64;
    fn sub(self, rhs: Timestamp) -> u64 {
        self.since(rhs)
    }
}

/// Converts a monotonic clock reading into [`Timestamp`]s relative to a fixed origin.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: std::time::Instant,
}

impl Clock {
    pub fn new(origin: std::time::Instant) -> Self {
        Clock { origin }
    }

    /// The timestamp of `instant` (which must not precede the origin; earlier clamps to 0).
    pub fn at(&self, instant: std::time::Instant) -> Timestamp {
        let d = instant.saturating_duration_since(self.origin);
        Timestamp(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// The instant a timestamp stands for.
    pub fn instant(&self, t: Timestamp) -> std::time::Instant {
        self.origin + Duration::from_millis(t.0)
    }
}
