//! The service clock: milliseconds of time *served*, persisted across restarts.
//!
//! Bans and rate budgets are measured on this clock, never on the wall clock. It is a
//! counter, `served_ms`, that advances only with monotonic time while the server runs:
//! [`StateDb::flush`](crate::StateDb::flush) stores it (the server calls that every second
//! and at shutdown), and after a restart it continues from the stored value.
//!
//! What follows, by design (fail closed):
//!
//! - **The wall clock is never consulted.** Setting it forwards, backwards, or jumping it by
//!   NTP changes nothing: no ban or budget can be shortened that way.
//! - **Downtime does not count.** A ban of ten minutes is ten minutes of the server
//!   *running*; a server that is down for an hour resumes with the same ten minutes left.
//! - **A crash loses at most one flush interval** of served time: the clock resumes from
//!   the last stored value, so every ban and budget gets *longer* by that much, never
//!   shorter.
//! - [`ServiceClock::now_ms`] never goes backwards, even if a [`Monotonic`] source did.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// A monotonic time source: milliseconds elapsed since a fixed origin (for example the
/// moment the process opened the database). Must never decrease.
pub trait Monotonic: Send + Sync {
    /// Milliseconds since this source's origin.
    fn elapsed_ms(&self) -> u64;
}

/// The real source: [`Instant`] elapsed since construction.
#[derive(Debug, Clone, Copy)]
pub struct SystemMonotonic {
    origin: Instant,
}

impl SystemMonotonic {
    /// A source whose origin is now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemMonotonic {
    fn default() -> Self {
        Self::new()
    }
}

impl Monotonic for SystemMonotonic {
    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A source moved by hand, for deterministic tests and simulations.
#[derive(Debug, Default)]
pub struct ManualClock {
    ms: AtomicU64,
}

impl ManualClock {
    /// A clock at 0 ms.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forwards by `ms` (saturating).
    pub fn advance(&self, ms: u64) {
        let _ = self
            .ms
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_add(ms))
            });
    }

    /// The current reading.
    pub fn get(&self) -> u64 {
        self.ms.load(Ordering::Acquire)
    }
}

impl Monotonic for ManualClock {
    fn elapsed_ms(&self) -> u64 {
        self.get()
    }
}

/// Served time in milliseconds: the stored base plus monotonic time since the database
/// was opened. See the [module documentation](self) for what this guarantees.
pub struct ServiceClock {
    base_ms: u64,
    source: Arc<dyn Monotonic>,
    /// The highest value handed out, so that the clock never goes backwards.
    last_ms: AtomicU64,
}

impl ServiceClock {
    /// A clock that starts at `base_ms` (the stored `served_ms`) and advances with `source`.
    pub fn new(base_ms: u64, source: Arc<dyn Monotonic>) -> Self {
        Self {
            base_ms,
            source,
            last_ms: AtomicU64::new(base_ms),
        }
    }

    /// Served milliseconds now. Never decreases.
    pub fn now_ms(&self) -> u64 {
        let now = self.base_ms.saturating_add(self.source.elapsed_ms());
        let prev = self.last_ms.fetch_max(now, Ordering::AcqRel);
        prev.max(now)
    }

    /// The served time this clock started from (what was stored at the last flush before
    /// this open).
    pub fn base_ms(&self) -> u64 {
        self.base_ms
    }
}

impl fmt::Debug for ServiceClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceClock")
            .field("base_ms", &self.base_ms)
            .field("now_ms", &self.now_ms())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_base_and_advances_with_the_source() {
        let m = Arc::new(ManualClock::new());
        let c = ServiceClock::new(5_000, m.clone());
        assert_eq!(c.now_ms(), 5_000);
        m.advance(250);
        assert_eq!(c.now_ms(), 5_250);
        assert_eq!(c.base_ms(), 5_000);
    }

    /// A source that goes backwards (a broken one) cannot move the clock backwards.
    #[test]
    fn never_goes_backwards() {
        struct Backwards(AtomicU64);
        impl Monotonic for Backwards {
            fn elapsed_ms(&self) -> u64 {
                self.0
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                        Some(v.saturating_sub(100))
                    })
                    .unwrap_or(0)
            }
        }
        let c = ServiceClock::new(10, Arc::new(Backwards(AtomicU64::new(1_000))));
        let first = c.now_ms();
        assert_eq!(first, 1_010);
        assert_eq!(c.now_ms(), 1_010);
        assert_eq!(c.now_ms(), 1_010);
    }

    #[test]
    fn saturates_instead_of_overflowing() {
        let m = Arc::new(ManualClock::new());
        m.advance(u64::MAX);
        m.advance(1);
        let c = ServiceClock::new(u64::MAX - 1, m);
        assert_eq!(c.now_ms(), u64::MAX);
    }

    #[test]
    fn system_source_is_monotonic() {
        let s = SystemMonotonic::new();
        let a = s.elapsed_ms();
        let b = s.elapsed_ms();
        assert!(b >= a);
    }
}
