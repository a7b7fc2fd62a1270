//! Instants as milliseconds since an epoch, so that a time can live in an
//! `AtomicU64` and be read and written without a lock.

use std::time::Duration;

use tokio::time::Instant;

/// Converts between tokio instants and milliseconds since the clock was
/// made. Tokio's time, so that tests can pause and advance it.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    epoch: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    /// A clock whose epoch is now.
    pub fn new() -> Clock {
        Clock {
            epoch: Instant::now(),
        }
    }

    /// Milliseconds from the epoch to `at` (0 for an instant before it).
    pub fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Milliseconds from the epoch to now.
    pub fn now_ms(&self) -> u64 {
        self.ms(Instant::now())
    }

    /// The instant `ms` milliseconds after the epoch.
    pub fn instant(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_milliseconds_on_tokios_clock_both_ways() {
        let clock = Clock::new();
        let start = Instant::now();
        assert_eq!(clock.now_ms(), 0);
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert_eq!(clock.now_ms(), 1_500);
        assert_eq!(clock.instant(1_500), Instant::now());
        assert_eq!(
            clock.ms(start - Duration::from_secs(1)),
            0,
            "before the epoch"
        );
    }
}
