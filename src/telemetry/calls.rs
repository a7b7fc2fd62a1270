//! What an endpoint's calls ended with and how long they took, recorded
//! with relaxed atomic adds only, so that the call path takes no lock and
//! looks nothing up.
//!
//! Durations go into fixed log buckets, twenty per decade from 10 us to
//! 100 s (each bound at most 20% above the one before), twice: once for all time (the Prometheus
//! histogram, whose coarser buckets are sums of these) and once into the
//! slot of the current 30-second epoch, of two, so that percentiles over
//! the last 30 to 60 seconds need no background task: a slot whose epoch
//! has passed is cleared by the first call that lands in it again.
//!
//! A bucket holds values up to and including its bound (Prometheus's `le`).
//! A percentile read from the buckets is interpolated within its bucket, so
//! it is off by less than the bucket's width (at most 20%, mostly 10%).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

use crate::endpoint::Outcome;

/// Bucket bounds in nanoseconds: twenty steps of each power of ten from
/// 10 us to 10 s (1, 1.1, 1.2, ... 9 times it), and 100 s.
pub const BOUNDS_NS: [u64; 141] = bounds();

/// Mantissas of the bounds of one decade, in hundredths.
const MANTISSAS: [u64; 20] = [
    100, 110, 120, 130, 140, 160, 180, 200, 220, 250, 280, 300, 350, 400, 450, 500, 600, 700, 800,
    900,
];

const fn bounds() -> [u64; 141] {
    let mut out = [0u64; 141];
    let mut decade = 10_000u64; // 10 us
    let mut i = 0;
    while i < 140 {
        out[i] = decade / 100 * MANTISSAS[i % 20];
        i += 1;
        if i % 20 == 0 {
            decade *= 10;
        }
    }
    out[140] = decade; // 100 s
    out
}

/// Buckets: one per bound, and one for what is above the last.
pub const BUCKETS: usize = BOUNDS_NS.len() + 1;

/// The bucket a duration falls in.
fn bucket(ns: u64) -> usize {
    BOUNDS_NS.partition_point(|&b| b < ns)
}

/// The length of a percentile window's epoch.
pub const EPOCH: Duration = Duration::from_secs(30);

/// The outcomes counted per endpoint: the 17 gRPC codes, a stream that
/// broke before its status, and a call the caller gave up (cancelled or
/// gone) while it was in flight.
pub const OUTCOMES: usize = 19;
pub const BROKE: usize = 17;
pub const ABANDONED: usize = 18;

/// The Prometheus label value of outcome `i`.
pub fn outcome_name(i: usize) -> &'static str {
    match i {
        BROKE => "stream_broke",
        ABANDONED => "abandoned",
        code => crate::wire::grpc::code_name(tonic::Code::from_i32(code as i32)),
    }
}

/// One endpoint's record.
pub struct Calls {
    born: Instant,
    outcomes: [AtomicU64; OUTCOMES],
    /// All time.
    total: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
    /// The two latest epochs: which epoch each slot holds, and its counts.
    epochs: [AtomicU64; 2],
    recent: [[AtomicU64; BUCKETS]; 2],
}

impl Default for Calls {
    fn default() -> Self {
        Calls::new(Instant::now())
    }
}

/// Percentiles of the recent window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Percentiles {
    /// Calls in the window.
    pub calls: u64,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
}

impl Calls {
    pub fn new(born: Instant) -> Calls {
        Calls {
            born,
            outcomes: Default::default(),
            total: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
            // The first epoch (1, in slot 1) holds its slot from the start:
            // a slot is cleared as a new epoch takes it, and calls that land
            // while it is cleared are lost to the window, which would
            // otherwise befall the first calls an endpoint ever ends.
            epochs: [AtomicU64::new(0), AtomicU64::new(1)],
            recent: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }

    /// A call ended with `outcome` after `elapsed`.
    pub fn record(&self, outcome: Outcome, elapsed: Duration, now: Instant) {
        let index = match outcome {
            Outcome::Status(code) | Outcome::Excused(code) => (code as usize).min(16),
            Outcome::Reset => BROKE,
            // A call that found no connection never started: not counted.
            Outcome::Connect => return,
        };
        self.record_index(index, elapsed, now);
    }

    /// A call the caller gave up while it was in flight.
    pub fn record_abandoned(&self, elapsed: Duration, now: Instant) {
        self.record_index(ABANDONED, elapsed, now);
    }

    fn record_index(&self, index: usize, elapsed: Duration, now: Instant) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let b = bucket(ns);
        self.outcomes[index].fetch_add(1, Relaxed);
        self.total[b].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
        let epoch = self.epoch(now);
        let slot = (epoch % 2) as usize;
        let held = self.epochs[slot].load(Relaxed);
        if held != epoch
            && self.epochs[slot]
                .compare_exchange(held, epoch, Relaxed, Relaxed)
                .is_ok()
        {
            // A call landing in this slot between the exchange and the
            // clearing is lost to the window (not to the totals).
            for c in &self.recent[slot] {
                c.store(0, Relaxed);
            }
        }
        self.recent[slot][b].fetch_add(1, Relaxed);
    }

    /// Epochs count from 1, so that a slot's initial 0 is no epoch.
    fn epoch(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.born).as_secs() / EPOCH.as_secs() + 1
    }

    /// Calls that ended with each outcome (index as [`outcome_name`]).
    pub fn outcomes(&self) -> [u64; OUTCOMES] {
        std::array::from_fn(|i| self.outcomes[i].load(Relaxed))
    }

    /// All-time duration counts per bucket (not cumulative), and their sum
    /// in seconds.
    pub fn durations(&self) -> ([u64; BUCKETS], f64) {
        let counts = std::array::from_fn(|i| self.total[i].load(Relaxed));
        (counts, self.sum_ns.load(Relaxed) as f64 / 1e9)
    }

    /// Percentiles of the calls that ended in this epoch and the one
    /// before (30 to 60 s); `None` without such calls.
    pub fn percentiles(&self, now: Instant) -> Option<Percentiles> {
        let epoch = self.epoch(now);
        let mut counts = [0u64; BUCKETS];
        for slot in 0..2 {
            let held = self.epochs[slot].load(Relaxed);
            if held != 0 && held + 1 >= epoch {
                for (sum, c) in counts.iter_mut().zip(&self.recent[slot]) {
                    *sum += c.load(Relaxed);
                }
            }
        }
        let calls: u64 = counts.iter().sum();
        (calls > 0).then(|| Percentiles {
            calls,
            p50: quantile(&counts, calls, 0.50),
            p90: quantile(&counts, calls, 0.90),
            p99: quantile(&counts, calls, 0.99),
        })
    }
}

/// The q-quantile of bucket counts, interpolated linearly within its
/// bucket; the overflow bucket reads as the last bound.
fn quantile(counts: &[u64; BUCKETS], calls: u64, q: f64) -> Duration {
    let rank = (q * calls as f64).ceil().max(1.0);
    let mut seen = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        if c == 0 {
            continue;
        }
        if (seen + c) as f64 >= rank {
            let Some(&upper) = BOUNDS_NS.get(i) else {
                return Duration::from_nanos(BOUNDS_NS[BOUNDS_NS.len() - 1]);
            };
            let lower = if i == 0 { 0 } else { BOUNDS_NS[i - 1] };
            let within = (rank - seen as f64) / c as f64;
            let ns = lower as f64 + within * (upper - lower) as f64;
            return Duration::from_nanos(ns as u64);
        }
        seen += c;
    }
    Duration::from_nanos(BOUNDS_NS[BOUNDS_NS.len() - 1])
}

/// The Prometheus histogram's bounds, in seconds: each is one of
/// [`BOUNDS_NS`], so its cumulative count is a sum of whole buckets.
pub const PROMETHEUS_BOUNDS_S: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The counts of the Prometheus histogram's buckets (each the calls above
/// the bound before and up to its own, as `prometheus-client` takes them),
/// from per-bucket counts; the calls above the last bound are the total
/// less their sum.
pub fn prometheus_buckets(counts: &[u64; BUCKETS]) -> [(f64, u64); PROMETHEUS_BOUNDS_S.len()] {
    let mut i = 0;
    PROMETHEUS_BOUNDS_S.map(|bound| {
        let ns = (bound * 1e9).round() as u64;
        let mut n = 0;
        while i < BOUNDS_NS.len() && BOUNDS_NS[i] <= ns {
            n += counts[i];
            i += 1;
        }
        (bound, n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn bounds_rise_twenty_per_decade_and_hold_the_prometheus_ones() {
        assert_eq!(BOUNDS_NS[0], 10_000);
        assert_eq!(BOUNDS_NS[20], 100_000);
        assert_eq!(BOUNDS_NS[140], 100_000_000_000);
        assert!(BOUNDS_NS.windows(2).all(|w| w[0] < w[1]));
        assert!(
            BOUNDS_NS
                .windows(2)
                .all(|w| w[1] as f64 / w[0] as f64 <= 1.2 + 1e-9)
        );
        for s in PROMETHEUS_BOUNDS_S {
            let ns = (s * 1e9).round() as u64;
            assert!(BOUNDS_NS.contains(&ns), "{s} s is not a bucket bound");
        }
    }

    #[test]
    fn a_value_on_a_bound_falls_in_that_bucket() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(10_000), 0);
        assert_eq!(bucket(10_001), 1);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[tokio::test(start_paused = true)]
    async fn percentiles_fall_within_a_bucket_of_the_truth() {
        let calls = Calls::default();
        let now = Instant::now();
        // 1..=1000 ms, one call each: p50 500, p90 900, p99 990.
        for n in 1..=1000 {
            calls.record(Outcome::Status(tonic::Code::Ok), ms(n), now);
        }
        let p = calls.percentiles(now).unwrap();
        assert_eq!(p.calls, 1000);
        for (got, want) in [(p.p50, 500.0), (p.p90, 900.0), (p.p99, 990.0)] {
            let got = got.as_secs_f64() * 1000.0;
            assert!(
                (got - want).abs() / want < 0.1,
                "got {got} ms, want about {want}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_forgets_calls_older_than_two_epochs() {
        let calls = Calls::default();
        let start = Instant::now();
        calls.record(Outcome::Status(tonic::Code::Ok), ms(900), start);
        // Still in the window one epoch on.
        let later = start + EPOCH;
        calls.record(Outcome::Status(tonic::Code::Ok), ms(5), later);
        assert_eq!(calls.percentiles(later).unwrap().calls, 2);
        // Two epochs on, the first call has left the window: the next call
        // landing in its slot clears it, and a reader skips it anyway.
        let much_later = start + EPOCH * 2;
        assert_eq!(calls.percentiles(much_later).unwrap().calls, 1);
        calls.record(Outcome::Status(tonic::Code::Ok), ms(5), much_later);
        let p = calls.percentiles(much_later).unwrap();
        assert_eq!(p.calls, 2);
        assert!(p.p99 < ms(10), "{p:?}");
        assert_eq!(calls.percentiles(start + EPOCH * 4), None);
        // The totals keep everything.
        assert_eq!(calls.outcomes()[0], 3);
        assert_eq!(calls.durations().0.iter().sum::<u64>(), 3);
    }

    #[test]
    fn outcomes_count_by_code_broken_and_abandoned() {
        let calls = Calls::default();
        let now = Instant::now();
        calls.record(Outcome::Status(tonic::Code::Unavailable), ms(1), now);
        calls.record(Outcome::Reset, ms(1), now);
        calls.record(Outcome::Connect, ms(1), now);
        calls.record_abandoned(ms(1), now);
        let o = calls.outcomes();
        assert_eq!(o[tonic::Code::Unavailable as usize], 1);
        assert_eq!(o[BROKE], 1);
        assert_eq!(o[ABANDONED], 1);
        assert_eq!(o.iter().sum::<u64>(), 3, "a failed connect is no call");
        assert_eq!(outcome_name(14), "UNAVAILABLE");
    }

    #[test]
    fn prometheus_buckets_are_cumulative_sums_of_whole_buckets() {
        let calls = Calls::default();
        let now = Instant::now();
        for n in [1, 2, 2, 7, 40, 3000, 200_000] {
            calls.record(Outcome::Status(tonic::Code::Ok), ms(n), now);
        }
        let (counts, sum) = calls.durations();
        assert!((sum - 203.052).abs() < 1e-6);
        let mut seen = 0;
        let cumulative: Vec<(f64, u64)> = prometheus_buckets(&counts)
            .iter()
            .map(|&(le, n)| {
                seen += n;
                (le, seen)
            })
            .collect();
        let at = |le: f64| cumulative.iter().find(|(x, _)| *x == le).unwrap().1;
        assert_eq!(at(0.001), 1);
        assert_eq!(at(0.0025), 3);
        assert_eq!(at(0.01), 4);
        assert_eq!(at(0.05), 5);
        assert_eq!(at(5.0), 6);
        assert_eq!(at(60.0), 6, "200 s is above the last bound");
        assert_eq!(counts.iter().sum::<u64>(), 7);
    }
}
