//! Log lines a caller can trigger, at most one a second per place in the
//! code, each saying how many were held back since the last.
//!
//! A hostile caller that reconnects in a loop must not be able to fill the
//! log (and the disk, and the log pipeline behind it): the lines it causes
//! go through a [`Throttle`], and the metrics keep the full count.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// At most one line per this many milliseconds, per throttle.
const EVERY_MS: u64 = 1000;

/// One place in the code that logs what callers do.
pub struct Throttle {
    /// Milliseconds since [`epoch`] when the next line may go out.
    next: AtomicU64,
    /// Lines held back since the last one that went out.
    held: AtomicU64,
}

impl Throttle {
    pub const fn new() -> Throttle {
        Throttle {
            next: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(held)`: log this line, and say that `held` were held back
    /// before it; `None`: hold it back.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(epoch().elapsed().as_millis() as u64)
    }

    fn admit_at(&self, now: u64) -> Option<u64> {
        let next = self.next.load(Ordering::Relaxed);
        if now >= next
            && self
                .next
                .compare_exchange(next, now + EVERY_MS, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new()
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Logs a warning through `$throttle` (a `static Throttle`), adding
/// `held_back` (lines not logged since the last) to its fields.
#[macro_export]
macro_rules! warn_throttled {
    ($throttle:expr, $($rest:tt)+) => {
        if let Some(held_back) = $throttle.admit() {
            tracing::warn!(held_back, $($rest)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_and_a_count_of_the_rest() {
        let t = Throttle::new();
        assert_eq!(t.admit_at(5_000), Some(0));
        for ms in 5_001..5_999 {
            assert_eq!(t.admit_at(ms), None);
        }
        // 998 held back, then the next second's first line says so.
        assert_eq!(t.admit_at(6_000), Some(998));
        assert_eq!(t.admit_at(6_001), None);
        assert_eq!(t.admit_at(9_000), Some(1));
    }
}
