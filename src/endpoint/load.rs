//! The load an endpoint carries, measured beside it and compared by pickers.
//!
//! - In-flight calls: a counter, raised when a call is sent and lowered when
//!   it ends (least-connections).
//! - Peak-EWMA of round-trip time (latency strategy), after Finagle's
//!   `PeakEwma` and tower's `load::PeakEwma`: a slower sample replaces the
//!   estimate at once (the peak), a faster one is blended in with weight
//!   `1 - exp(-elapsed / decay)`, and between samples the estimate decays
//!   toward zero so that an endpoint left alone is tried again. Unlike
//!   tower's, a failed call is fed in as a penalty (a round trip of at least
//!   `failure_penalty`), so an endpoint that fails fast does not look fast;
//!   and a faster sample is blended in with a weight of at least 0.1, so
//!   that a busy endpoint's estimate follows its answers: with time alone,
//!   one slow answer dominates an endpoint that answers every few
//!   milliseconds for the whole decay time, however many fast answers come
//!   after it, and a far slower endpoint with no call in flight then looks
//!   as cheap as the busy fast ones (measured in `bench/quality`: the 10x
//!   slower agent's share fell from 0.7% to about 0.1%).
//! - A sliding window of calls, failures and latency, kept in
//!   [`crate::util::Window`]'s ten buckets, only for a cluster whose
//!   strategy reads it (`performance`): elsewhere it would cost a lock per
//!   call for nothing.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{LatencyConfig, PerformanceConfig, Strategy};
use crate::util::{Window, lock};

/// Which estimates an endpoint keeps beside its in-flight count: those its
/// cluster's picker reads. Each costs a lock per call, so a strategy that
/// reads neither pays for neither.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keep {
    /// The peak-EWMA round-trip time (`latency`).
    pub rtt: bool,
    /// The call window (`performance`).
    pub window: bool,
    /// The lock-free moving average of round trips (`least_connections`'
    /// ties, `performance`'s load-aware score).
    pub recent: bool,
}

impl Keep {
    pub fn for_strategy(strategy: Strategy) -> Keep {
        Keep {
            rtt: matches!(strategy, Strategy::Latency | Strategy::HotCold),
            window: strategy == Strategy::Performance,
            recent: matches!(strategy, Strategy::LeastConnections | Strategy::Performance),
        }
    }

    /// Every estimate (tests of pickers).
    #[cfg(test)]
    pub const ALL: Keep = Keep {
        rtt: true,
        window: true,
        recent: true,
    };
}

/// The clock mesh report times are kept on.
static MESH_CLOCK: std::sync::LazyLock<crate::util::Clock> =
    std::sync::LazyLock::new(crate::util::Clock::new);

pub struct Load {
    in_flight: AtomicU64,
    /// A moving average of this endpoint's round trips in nanoseconds (each
    /// answer moves it an eighth of the way), 0 before the first: kept
    /// without a lock (a lost update under a race costs one sample), for
    /// the pickers that read it (`Keep::recent`).
    recent_rtt_ns: AtomicU64,
    keep_recent: bool,
    /// Peers' calls in flight here, in sixteenths, as the mesh last
    /// computed them (0 without a mesh).
    mesh_in_flight: AtomicU64,
    /// Peers' mean latency estimate in nanoseconds; 0 for none.
    mesh_rtt_ns: AtomicU64,
    /// Peers' mean success rate in millionths, plus one; 0 for none.
    mesh_success: AtomicU64,
    /// When the newest of those reports came, in ms on [`MESH_CLOCK`], plus
    /// one; 0 for none.
    mesh_newest_ms: AtomicU64,
    latency: LatencyConfig,
    ewma: Option<Mutex<PeakEwma>>,
    window: Option<Mutex<CallWindow>>,
}

impl Load {
    pub fn new(latency: &LatencyConfig, performance: &PerformanceConfig, keep: Keep) -> Load {
        let now = Instant::now();
        Load {
            in_flight: AtomicU64::new(0),
            recent_rtt_ns: AtomicU64::new(0),
            keep_recent: keep.recent,
            mesh_in_flight: AtomicU64::new(0),
            mesh_rtt_ns: AtomicU64::new(0),
            mesh_success: AtomicU64::new(0),
            mesh_newest_ms: AtomicU64::new(0),
            ewma: keep.rtt.then(|| {
                Mutex::new(PeakEwma {
                    estimate_ns: latency.default_rtt.as_nanos() as f64,
                    stamp: now,
                    sampled: false,
                })
            }),
            latency: latency.clone(),
            window: keep
                .window
                .then(|| Mutex::new(CallWindow::new(performance.window, now))),
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts one more call in flight, unless `max` are in flight already.
    /// Sequentially consistent with the endpoint's `retired` flag: a call
    /// counted here either sees the endpoint retired or is seen by its drain
    /// (on x86 these are the same instructions as relaxed ones).
    pub(super) fn try_enter(&self, max: u64) -> bool {
        if self.in_flight.fetch_add(1, Ordering::SeqCst) >= max {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Counts a call finished; returns the calls still in flight.
    pub(super) fn leave(&self) -> u64 {
        self.in_flight.fetch_sub(1, Ordering::SeqCst) - 1
    }

    /// The round-trip estimate now, in nanoseconds (`default_rtt` where
    /// none is kept). Without a sample here within the decay time, the
    /// mesh's estimate stands in where peers have one (warm start).
    pub fn rtt_estimate(&self, now: Instant) -> f64 {
        match &self.ewma {
            Some(ewma) => {
                let ewma = lock(ewma);
                if !ewma.is_recent(now, self.latency.decay) {
                    let mesh = self.mesh_rtt_ns.load(Ordering::Relaxed);
                    if mesh > 0 {
                        return mesh as f64;
                    }
                }
                ewma.estimate(now, self.latency.decay)
            }
            None => self.latency.default_rtt.as_nanos() as f64,
        }
    }

    /// The moving average of this endpoint's recent round trips, in
    /// nanoseconds; 0 before its first answer.
    pub fn recent_rtt_ns(&self) -> u64 {
        self.recent_rtt_ns.load(Ordering::Relaxed)
    }

    /// The estimate measured here, if a sample came within the decay time
    /// (what this sidecar tells its peers).
    pub fn own_rtt_estimate(&self, now: Instant) -> Option<f64> {
        let ewma = lock(self.ewma.as_ref()?);
        ewma.is_recent(now, self.latency.decay)
            .then(|| ewma.estimate(now, self.latency.decay))
    }

    /// Calls in flight here from every sidecar: this one's, plus what the
    /// mesh last reported.
    pub fn mesh_wide_in_flight(&self) -> f64 {
        self.in_flight() as f64 + self.mesh_in_flight()
    }

    /// Peers' calls in flight here, as last reported.
    pub fn mesh_in_flight(&self) -> f64 {
        self.mesh_in_flight.load(Ordering::Relaxed) as f64 / 16.0
    }

    /// Sets what the mesh says of this endpoint (the gossip task, each
    /// interval): peers' calls in flight, mean latency and success rate.
    pub fn set_mesh(&self, in_flight: f64, rtt_ns: Option<f64>, success: Option<f64>) {
        let sixteenths = (in_flight.max(0.0) * 16.0).round() as u64;
        self.mesh_in_flight.store(sixteenths, Ordering::Relaxed);
        let rtt = rtt_ns.map_or(0, |ns| ns.max(1.0) as u64);
        self.mesh_rtt_ns.store(rtt, Ordering::Relaxed);
        let success = success.map_or(0, |s| (s.clamp(0.0, 1.0) * 1e6) as u64 + 1);
        self.mesh_success.store(success, Ordering::Relaxed);
    }

    /// When the newest report behind the mesh's figures came (the gossip
    /// task, each interval).
    pub fn set_mesh_newest(&self, at: Option<Instant>) {
        let ms = at.map_or(0, |t| MESH_CLOCK.ms(t) + 1);
        self.mesh_newest_ms.store(ms, Ordering::Relaxed);
    }

    /// How old the newest report behind the mesh's figures is; `None` when
    /// no peer reports this endpoint's load or latency.
    pub fn mesh_age(&self, now: Instant) -> Option<Duration> {
        let ms = self.mesh_newest_ms.load(Ordering::Relaxed).checked_sub(1)?;
        Some(Duration::from_millis(MESH_CLOCK.ms(now).saturating_sub(ms)))
    }

    /// Peers' mean latency estimate, if they have one.
    pub fn mesh_rtt_ns(&self) -> Option<f64> {
        let ns = self.mesh_rtt_ns.load(Ordering::Relaxed);
        (ns > 0).then_some(ns as f64)
    }

    /// A call's answer started arriving `rtt` after it was sent. The first
    /// sample blends into the mesh's estimate where peers have one, rather
    /// than into `default_rtt`.
    pub fn observe_rtt(&self, rtt: Duration, now: Instant) {
        self.blend_recent_rtt(rtt);
        if let Some(ewma) = &self.ewma {
            let mut ewma = lock(ewma);
            if !ewma.sampled {
                self.seed_from_mesh(&mut ewma, now);
            }
            ewma.observe(rtt, now, self.latency.decay);
        }
    }

    fn blend_recent_rtt(&self, rtt: Duration) {
        if !self.keep_recent {
            return;
        }
        let sample = rtt.as_nanos().min(u128::from(u64::MAX / 2)) as u64;
        let old = self.recent_rtt_ns.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old - old / 8 + sample / 8
        };
        self.recent_rtt_ns.store(new.max(1), Ordering::Relaxed);
    }

    fn seed_from_mesh(&self, ewma: &mut PeakEwma, now: Instant) {
        let mesh = self.mesh_rtt_ns.load(Ordering::Relaxed);
        if mesh > 0 {
            ewma.estimate_ns = mesh as f64;
            ewma.stamp = now;
        }
    }

    /// A call ended, after `elapsed`; `failed` as the breaker would count it.
    pub fn observe_outcome(&self, failed: bool, elapsed: Duration, now: Instant) {
        if failed {
            // An endpoint that fails fast must not look fast.
            self.blend_recent_rtt(elapsed.max(self.latency.failure_penalty));
        }
        if let (true, Some(ewma)) = (failed, &self.ewma) {
            let penalty = elapsed.max(self.latency.failure_penalty);
            let mut ewma = lock(ewma);
            if !ewma.sampled {
                self.seed_from_mesh(&mut ewma, now);
            }
            ewma.observe(penalty, now, self.latency.decay);
        }
        if let Some(window) = &self.window {
            lock(window).record(failed, elapsed, now);
        }
    }

    /// Success rate and mean latency over the window; `None` before any
    /// call in the window.
    pub fn window_summary(&self, now: Instant) -> Option<WindowSummary> {
        lock(self.window.as_ref()?).summary(now)
    }

    /// The window's summary, or, with no call in it, the mesh's (peers'
    /// mean success rate and latency, `calls` 0) where peers have both:
    /// what `performance` scores.
    pub fn summary(&self, now: Instant) -> Option<WindowSummary> {
        self.window_summary(now).or_else(|| {
            let success = self.mesh_success.load(Ordering::Relaxed);
            let rtt = self.mesh_rtt_ns.load(Ordering::Relaxed);
            (success > 0 && rtt > 0).then(|| WindowSummary {
                calls: 0,
                success_rate: (success - 1) as f64 / 1e6,
                mean_latency: Duration::from_nanos(rtt),
            })
        })
    }
}

/// Each faster answer is blended in with at least this weight (see the
/// module doc).
const MIN_SAMPLE_WEIGHT: f64 = 0.1;

struct PeakEwma {
    estimate_ns: f64,
    stamp: Instant,
    /// A sample has come (else the estimate is `default_rtt`).
    sampled: bool,
}

impl PeakEwma {
    /// A sample came within `decay` of `now`.
    fn is_recent(&self, now: Instant, decay: Duration) -> bool {
        self.sampled && now.saturating_duration_since(self.stamp) < decay
    }

    fn decayed(&self, now: Instant, decay: Duration) -> f64 {
        let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
        self.estimate_ns * (-elapsed / decay.as_secs_f64()).exp()
    }

    fn estimate(&self, now: Instant, decay: Duration) -> f64 {
        self.decayed(now, decay)
    }

    fn observe(&mut self, rtt: Duration, now: Instant, decay: Duration) {
        let rtt = rtt.as_nanos() as f64;
        let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
        let current = self.decayed(now, decay);
        self.estimate_ns = if rtt > current {
            rtt
        } else {
            let w = (-elapsed / decay.as_secs_f64())
                .exp()
                .min(1.0 - MIN_SAMPLE_WEIGHT);
            current * w + rtt * (1.0 - w)
        };
        self.stamp = now;
        self.sampled = true;
    }
}

/// One bucket of the call window.
#[derive(Clone, Copy, Default)]
struct Calls {
    calls: u64,
    failures: u64,
    latency_ns: u128,
}

/// Calls, failures and latency over a sliding span: the performance
/// strategy's window, and the breaker's for error rates.
pub(super) struct CallWindow(Window<Calls>);

/// What the window says of an endpoint.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WindowSummary {
    pub calls: u64,
    pub success_rate: f64,
    pub mean_latency: Duration,
}

impl CallWindow {
    pub(super) fn new(span: Duration, now: Instant) -> CallWindow {
        // Buckets of at least a millisecond.
        CallWindow(Window::new(span.max(Duration::from_millis(10)), now))
    }

    /// Forgets every call.
    pub(super) fn clear(&mut self) {
        self.0.clear();
    }

    pub(super) fn record(&mut self, failed: bool, elapsed: Duration, now: Instant) {
        let b = self.0.slot(now);
        b.calls += 1;
        b.failures += u64::from(failed);
        b.latency_ns += elapsed.as_nanos();
    }

    pub(super) fn summary(&self, now: Instant) -> Option<WindowSummary> {
        let (calls, failures, latency) = self.0.live(now).fold((0, 0, 0u128), |(c, f, l), b| {
            (c + b.calls, f + b.failures, l + b.latency_ns)
        });
        (calls > 0).then(|| WindowSummary {
            calls,
            success_rate: 1.0 - failures as f64 / calls as f64,
            mean_latency: Duration::from_nanos((latency / u128::from(calls)) as u64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load() -> Load {
        let latency = LatencyConfig {
            decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(30),
            failure_penalty: Duration::from_secs(1),
        };
        let performance = PerformanceConfig {
            window: Duration::from_secs(10),
            ..PerformanceConfig::default()
        };
        Load::new(&latency, &performance, Keep::ALL)
    }

    fn ms(ns: f64) -> f64 {
        ns / 1e6
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_jumps_to_peaks_and_decays_slowly() {
        let l = load();
        let t0 = Instant::now();
        assert_eq!(
            ms(l.rtt_estimate(t0)).round(),
            30.0,
            "starts at default_rtt"
        );
        l.observe_rtt(Duration::from_millis(200), t0);
        assert_eq!(
            ms(l.rtt_estimate(t0)).round(),
            200.0,
            "a slower sample is taken at once"
        );
        // A fast sample 2 s later is blended in, weighted by 1 - e^-0.2.
        tokio::time::advance(Duration::from_secs(2)).await;
        let t1 = Instant::now();
        l.observe_rtt(Duration::from_millis(10), t1);
        let e = ms(l.rtt_estimate(t1));
        let decayed = 200.0 * (-0.2f64).exp();
        let want = decayed * (-0.2f64).exp() + 10.0 * (1.0 - (-0.2f64).exp());
        assert!((e - want).abs() < 0.01, "{e} vs {want}");
        // Left alone, the estimate decays toward zero (so it is tried again).
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(ms(l.rtt_estimate(Instant::now())) < e * 0.06);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_endpoint_forgets_a_peak_after_a_few_fast_answers() {
        let l = load();
        l.observe_rtt(Duration::from_millis(200), Instant::now());
        // Twenty 10 ms answers, 1 ms apart: by time alone (e^-0.0001 a
        // step) the estimate would stay near 200 ms.
        for _ in 0..20 {
            tokio::time::advance(Duration::from_millis(1)).await;
            l.observe_rtt(Duration::from_millis(10), Instant::now());
        }
        let e = ms(l.rtt_estimate(Instant::now()));
        let want = 10.0 + 190.0 * 0.9f64.powi(20);
        assert!((e - want).abs() < 0.5, "{e} vs {want}");
        assert!(e < 35.0, "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_failure_counts_as_a_slow_call() {
        let l = load();
        let now = Instant::now();
        l.observe_rtt(Duration::from_millis(1), now);
        l.observe_outcome(true, Duration::from_millis(1), now);
        assert_eq!(ms(l.rtt_estimate(now)).round(), 1000.0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_forgets_calls_older_than_its_span() {
        let l = load();
        assert_eq!(l.window_summary(Instant::now()), None);
        for failed in [false, false, false, true] {
            l.observe_outcome(failed, Duration::from_millis(20), Instant::now());
        }
        let s = l.window_summary(Instant::now()).unwrap();
        assert_eq!((s.calls, s.success_rate), (4, 0.75));
        assert_eq!(s.mean_latency, Duration::from_millis(20));
        tokio::time::advance(Duration::from_secs(5)).await;
        l.observe_outcome(false, Duration::from_millis(40), Instant::now());
        assert_eq!(l.window_summary(Instant::now()).unwrap().calls, 5);
        // 10 s after the first four, only the fifth is left.
        tokio::time::advance(Duration::from_millis(5_500)).await;
        let s = l.window_summary(Instant::now()).unwrap();
        assert_eq!((s.calls, s.success_rate), (1, 1.0));
        assert_eq!(s.mean_latency, Duration::from_millis(40));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(l.window_summary(Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_mesh_estimate_stands_in_until_a_sample_comes_here() {
        let l = load();
        let now = Instant::now();
        l.set_mesh(0.0, Some(200e6), None);
        assert_eq!(ms(l.rtt_estimate(now)).round(), 200.0, "warm start");
        assert_eq!(l.own_rtt_estimate(now), None, "nothing measured here");
        // A first sample blends into the mesh's estimate, not default_rtt's.
        tokio::time::advance(Duration::from_secs(1)).await;
        l.observe_rtt(Duration::from_millis(100), Instant::now());
        let e = ms(l.rtt_estimate(Instant::now()));
        assert!(e > 150.0 && e < 200.0, "{e}");
        // After the decay time without a sample here, the mesh's again.
        tokio::time::advance(Duration::from_secs(11)).await;
        l.set_mesh(0.0, Some(50e6), None);
        assert_eq!(ms(l.rtt_estimate(Instant::now())).round(), 50.0);
    }
}
