//! The one place in this crate where time is read.
//!
//! Observations carry microsecond timestamps that the router compares with its own `now_us`,
//! so adapters and router must share a clock. Making it a trait lets the data plane hand the
//! same clock to both, and lets tests and simulations substitute a controlled one.

use std::time::Instant;

/// A monotonic microsecond clock shared by the adapters and the router that consumes them.
pub trait Clock: Send + Sync {
    /// Microseconds since an arbitrary fixed origin; never decreases.
    fn now_us(&self) -> u64;
}

/// Microseconds since the clock was created, from the OS monotonic clock (immune to wall-clock
/// steps, which would otherwise make fresh samples look stale or from the future).
#[derive(Clone, Copy, Debug)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_clock_starts_near_zero_and_never_goes_back() {
        let c = MonotonicClock::new();
        let a = c.now_us();
        let b = c.now_us();
        assert!(a < 1_000_000, "origin is creation time, got {a} us");
        assert!(b >= a);
    }
}
