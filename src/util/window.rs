//! A sliding window kept in ten buckets, each a tenth of the span: what
//! happened over the last span, give or take a bucket, in constant memory
//! and constant time. The endpoint's call statistics (performance strategy,
//! outlier detection) and the retry budget both count in one.

use std::time::Duration;

use tokio::time::Instant;

/// Buckets per window.
pub const BUCKETS: usize = 10;

/// Buckets of `T` over a sliding span.
#[derive(Debug, Clone)]
pub struct Window<T> {
    epoch: Instant,
    bucket: Duration,
    /// The newest bucket seen; a caller whose `now` is older (read before
    /// another thread's) counts in it rather than in a slot reused since.
    latest: u64,
    /// Each slot with the bucket it holds, numbered from 1 (0: never used).
    slots: [(u64, T); BUCKETS],
}

impl<T: Default + Copy> Window<T> {
    /// A window over `span` (each bucket at least a nanosecond), starting
    /// empty at `now`.
    pub fn new(span: Duration, now: Instant) -> Window<T> {
        Window {
            epoch: now,
            bucket: (span / BUCKETS as u32).max(Duration::from_nanos(1)),
            latest: 0,
            slots: [(0, T::default()); BUCKETS],
        }
    }

    fn number(&self, now: Instant) -> u64 {
        let n = now.saturating_duration_since(self.epoch).as_nanos() / self.bucket.as_nanos();
        u64::try_from(n).unwrap_or(u64::MAX - 1) + 1
    }

    /// The bucket for `now`, emptied first if its slot held an older one.
    pub fn slot(&mut self, now: Instant) -> &mut T {
        let number = self.number(now).max(self.latest);
        self.latest = number;
        let slot = &mut self.slots[(number % BUCKETS as u64) as usize];
        if slot.0 != number {
            *slot = (number, T::default());
        }
        &mut slot.1
    }

    /// The buckets still inside the span at `now`.
    pub fn live(&self, now: Instant) -> impl Iterator<Item = &T> {
        let newest = self.number(now).max(self.latest);
        self.slots
            .iter()
            .filter(move |(n, _)| *n != 0 && *n <= newest && newest - n < BUCKETS as u64)
            .map(|(_, t)| t)
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.slots = [(0, T::default()); BUCKETS];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_what_falls_within_the_span_and_forgets_the_rest() {
        let mut w: Window<u32> = Window::new(Duration::from_secs(10), Instant::now());
        let sum = |w: &Window<u32>| w.live(Instant::now()).sum::<u32>();
        *w.slot(Instant::now()) += 3;
        tokio::time::advance(Duration::from_secs(5)).await;
        *w.slot(Instant::now()) += 1;
        assert_eq!(sum(&w), 4);
        // Ten buckets after the first, it has slid out.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(sum(&w), 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(sum(&w), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_now_counts_in_the_newest_bucket() {
        let start = Instant::now();
        let mut w: Window<u32> = Window::new(Duration::from_secs(10), start);
        tokio::time::advance(Duration::from_secs(25)).await;
        *w.slot(Instant::now()) += 1;
        // A `now` read long before: its old slot was reused; it counts now.
        *w.slot(start) += 1;
        assert_eq!(w.live(Instant::now()).sum::<u32>(), 2);
        w.clear();
        assert_eq!(w.live(Instant::now()).sum::<u32>(), 0);
    }
}
