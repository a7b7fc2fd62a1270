//! Circuit breaking and outlier ejection for one endpoint.
//!
//! The breaker is closed while calls succeed. It opens after
//! `failure_threshold` consecutive failures, or when the success rate over
//! the outlier window falls below `min_success_rate` with at least
//! `min_calls` calls in it (Envoy's consecutive-5xx and success-rate outlier
//! detection). An open endpoint takes no calls for `open_for`, doubled on
//! each re-open up to `max_open_for`; then it is half-open: one probe call
//! at a time goes through, and its success closes the breaker while its
//! failure opens it again for longer (the shape of Linkerd's
//! consecutive-failures breaker and of Hystrix's half-open state).
//!
//! Ejections are capped per cluster by an [`EjectionBudget`]: at most
//! `max_ejection_percent` of the endpoints are open at once, and at least
//! one always may be, so that failing endpoints cannot empty a cluster.
//!
//! The machine here is plain state, driven by the call outcomes the proxy
//! reports and by the cluster's control loop (which moves an open breaker to
//! half-open when its time is up); it does no I/O and holds no lock across
//! `.await`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::load::CallWindow;
use crate::config::{BreakerConfig, OutlierConfig};

/// How many endpoints of a cluster may be ejected at once. The maximum
/// follows the live endpoint set ([`EjectionBudget::resize`]); endpoints
/// ejected when it shrinks stay ejected, and no more are until the count
/// is under the new maximum.
#[derive(Debug)]
pub struct EjectionBudget {
    share: f64,
    max: AtomicUsize,
    ejected: AtomicUsize,
}

impl EjectionBudget {
    /// `share` (0.0 to 1.0) of `endpoints`, rounded down, but at least one.
    pub fn new(endpoints: usize, share: f64) -> EjectionBudget {
        EjectionBudget {
            share,
            max: AtomicUsize::new(Self::max_for(endpoints, share)),
            ejected: AtomicUsize::new(0),
        }
    }

    fn max_for(endpoints: usize, share: f64) -> usize {
        ((endpoints as f64 * share).floor() as usize).max(1)
    }

    /// The cluster now has `endpoints` endpoints.
    pub fn resize(&self, endpoints: usize) {
        self.max
            .store(Self::max_for(endpoints, self.share), Ordering::Release);
    }

    fn try_take(&self) -> bool {
        let max = self.max();
        self.ejected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    fn give_back(&self) {
        let _ = self
            .ejected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    pub fn ejected(&self) -> usize {
        self.ejected.load(Ordering::Acquire)
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
    }
}

/// Where the breaker stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// A change worth a log line and a counter.
#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    Opened {
        reason: String,
        open_for: Duration,
    },
    /// The breaker would have opened, but the cluster's ejection budget is spent.
    Spared {
        reason: String,
    },
    HalfOpened,
    Closed,
}

pub struct Breaker {
    config: BreakerConfig,
    outlier: Option<OutlierConfig>,
    state: State,
    consecutive: u32,
    /// Opens since the breaker was last closed by a success.
    reopens: u32,
    window: CallWindow,
    /// Why it last opened, and whether a peer's report opened it (such an
    /// ejection is not reported on to the mesh, so it cannot echo).
    reason: String,
    by_peer: bool,
}

impl Breaker {
    pub fn new(config: &BreakerConfig, outlier: Option<&OutlierConfig>, now: Instant) -> Breaker {
        let span = outlier.map_or(Duration::from_secs(10), |o| o.window);
        Breaker {
            config: config.clone(),
            outlier: outlier.cloned(),
            state: State::Closed,
            consecutive: 0,
            reopens: 0,
            window: CallWindow::new(span, now),
            reason: String::new(),
            by_peer: false,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Whether a call may be sent now (a half-open breaker admits one probe
    /// at a time: see [`Breaker::admit`]).
    pub fn is_available(&self) -> bool {
        match self.state {
            State::Closed => true,
            State::Open { .. } => false,
            State::HalfOpen { probing } => !probing,
        }
    }

    /// When an open breaker turns half-open.
    pub fn open_until(&self) -> Option<Instant> {
        match self.state {
            State::Open { until } => Some(until),
            _ => None,
        }
    }

    /// Why it is open now, if this sidecar's own calls opened it: what it
    /// tells its peers.
    pub fn own_verdict(&self) -> Option<(Instant, &str)> {
        match self.state {
            State::Open { until } if !self.by_peer => Some((until, &self.reason)),
            _ => None,
        }
    }

    /// A peer reports the endpoint ejected until `until`: a closed breaker
    /// opens until then, if the cluster's ejection budget allows, without
    /// lengthening its own next interval. When the time is up it turns
    /// half-open and probes with this sidecar's own calls, as after any
    /// ejection. An open or half-open breaker is left as it is.
    pub fn eject_by_peer(
        &mut self,
        until: Instant,
        reason: String,
        budget: &EjectionBudget,
    ) -> Option<Transition> {
        if !self.config.enabled || self.state != State::Closed {
            return None;
        }
        if !budget.try_take() {
            return Some(Transition::Spared { reason });
        }
        self.consecutive = 0;
        self.state = State::Open { until };
        self.by_peer = true;
        self.reason.clone_from(&reason);
        Some(Transition::Opened {
            reason,
            open_for: until.saturating_duration_since(Instant::now()),
        })
    }

    /// Lets one call through: always when closed, one probe at a time when
    /// half-open, none when open. Returns whether the call is a probe.
    pub fn admit(&mut self) -> Option<bool> {
        match self.state {
            State::Closed => Some(false),
            State::HalfOpen { probing: false } => {
                self.state = State::HalfOpen { probing: true };
                Some(true)
            }
            _ => None,
        }
    }

    /// A probe ended without an outcome (the caller went away): let the
    /// next call probe instead.
    pub fn probe_abandoned(&mut self) {
        if self.state == (State::HalfOpen { probing: true }) {
            self.state = State::HalfOpen { probing: false };
        }
    }

    /// Moves an open breaker whose time is up to half-open.
    pub fn poll(&mut self, now: Instant) -> Option<Transition> {
        match self.state {
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen { probing: false };
                Some(Transition::HalfOpened)
            }
            _ => None,
        }
    }

    /// Records a call's outcome. Only a `settles` outcome (the probe's, or
    /// a connect's) ends a half-open state: calls sent before the breaker
    /// opened may still be finishing. `budget` is asked before opening.
    pub fn record(
        &mut self,
        failed: bool,
        settles: bool,
        now: Instant,
        budget: &EjectionBudget,
    ) -> Option<Transition> {
        if !self.config.enabled {
            return None;
        }
        self.window.record(failed, Duration::ZERO, now);
        match self.state {
            State::HalfOpen { .. } if !settles => None,
            State::HalfOpen { .. } if failed => {
                self.open("the half-open probe failed".into(), now, budget)
            }
            State::HalfOpen { .. } => Some(self.close(budget)),
            // Outcomes of calls sent before the breaker opened.
            State::Open { .. } => None,
            State::Closed if !failed => {
                self.consecutive = 0;
                None
            }
            State::Closed => {
                self.consecutive += 1;
                if self.consecutive >= self.config.failure_threshold.get() {
                    let reason = format!("{} consecutive failures", self.consecutive);
                    return self.open(reason, now, budget);
                }
                let outlier = self.outlier.as_ref()?;
                let summary = self.window.summary(now)?;
                let (calls, rate) = (summary.calls, summary.success_rate);
                if calls >= u64::from(outlier.min_calls) && rate < outlier.min_success_rate {
                    let reason = format!(
                        "success rate {:.0}% over {:?} ({calls} calls) is below {:.0}%",
                        rate * 100.0,
                        outlier.window,
                        outlier.min_success_rate * 100.0
                    );
                    return self.open(reason, now, budget);
                }
                None
            }
        }
    }

    /// Closes the breaker whatever its state (the health checker saw the
    /// endpoint come back): the endpoint starts afresh.
    pub fn reset(&mut self, budget: &EjectionBudget) -> Option<Transition> {
        let was_closed = self.state == State::Closed;
        self.window.clear();
        self.consecutive = 0;
        if was_closed {
            self.reopens = 0;
            return None;
        }
        Some(self.close(budget))
    }

    fn open(
        &mut self,
        reason: String,
        now: Instant,
        budget: &EjectionBudget,
    ) -> Option<Transition> {
        // A half-open breaker still holds its ejection slot.
        let holds_slot = matches!(self.state, State::HalfOpen { .. });
        if !holds_slot && !budget.try_take() {
            self.consecutive = 0;
            self.window.clear();
            return Some(Transition::Spared { reason });
        }
        let open_for = self
            .config
            .open_for
            .saturating_mul(1 << self.reopens.min(20))
            .min(self.config.max_open_for);
        self.reopens += 1;
        self.consecutive = 0;
        self.state = State::Open {
            until: now + open_for,
        };
        self.by_peer = false;
        self.reason.clone_from(&reason);
        Some(Transition::Opened { reason, open_for })
    }

    fn close(&mut self, budget: &EjectionBudget) -> Transition {
        budget.give_back();
        self.state = State::Closed;
        self.consecutive = 0;
        self.reopens = 0;
        self.window.clear();
        Transition::Closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn config() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: NonZeroU32::new(5).unwrap(),
            open_for: Duration::from_secs(30),
            max_open_for: Duration::from_secs(100),
            ..BreakerConfig::default()
        }
    }

    fn breaker(outlier: Option<OutlierConfig>) -> Breaker {
        Breaker::new(&config(), outlier.as_ref(), Instant::now())
    }

    /// Five failures in a row, the threshold; the last one's transition.
    fn fail_five(b: &mut Breaker, budget: &EjectionBudget) -> Option<Transition> {
        (0..5)
            .map(|_| b.record(true, true, Instant::now(), budget))
            .last()
            .flatten()
    }

    fn opened_for(t: Option<Transition>) -> Duration {
        match t {
            Some(Transition::Opened { open_for, .. }) => open_for,
            other => panic!("expected the breaker to open, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_of_consecutive_failures_only() {
        let budget = EjectionBudget::new(3, 0.5);
        let mut b = breaker(None);
        for _ in 0..4 {
            assert_eq!(b.record(true, true, Instant::now(), &budget), None);
        }
        // A success in between starts the count again.
        assert_eq!(b.record(false, true, Instant::now(), &budget), None);
        for _ in 0..4 {
            assert_eq!(b.record(true, true, Instant::now(), &budget), None);
        }
        assert!(b.is_available());
        let t = b.record(true, true, Instant::now(), &budget);
        assert_eq!(opened_for(t), Duration::from_secs(30));
        assert!(!b.is_available());
        assert_eq!(budget.ejected(), 1);
        assert_eq!(b.admit(), None, "an open breaker admits nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_one_probe_and_its_success_closes() {
        let budget = EjectionBudget::new(3, 0.5);
        let mut b = breaker(None);
        fail_five(&mut b, &budget);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(b.poll(Instant::now()), None, "still open at 29s");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.poll(Instant::now()), Some(Transition::HalfOpened));
        assert_eq!(b.admit(), Some(true), "the first call is a probe");
        assert_eq!(b.admit(), None, "one probe at a time");
        assert!(!b.is_available());
        assert_eq!(
            b.record(false, true, Instant::now(), &budget),
            Some(Transition::Closed)
        );
        assert_eq!(b.state(), State::Closed);
        assert_eq!(budget.ejected(), 0, "closing gives the slot back");
        assert_eq!(b.admit(), Some(false));
    }

    #[tokio::test(start_paused = true)]
    async fn each_reopen_doubles_the_open_interval_up_to_the_cap() {
        let budget = EjectionBudget::new(3, 0.5);
        let mut b = breaker(None);
        let t = fail_five(&mut b, &budget);
        let mut intervals = vec![opened_for(t)];
        for _ in 0..3 {
            let wait = intervals[intervals.len() - 1];
            tokio::time::advance(wait).await;
            assert_eq!(b.poll(Instant::now()), Some(Transition::HalfOpened));
            assert_eq!(b.admit(), Some(true));
            intervals.push(opened_for(b.record(true, true, Instant::now(), &budget)));
        }
        let secs: Vec<u64> = intervals.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [30, 60, 100, 100]);
        assert_eq!(budget.ejected(), 1, "a re-open keeps its one slot");
        // Success closes it and the next opening starts from 30s again.
        tokio::time::advance(Duration::from_secs(100)).await;
        b.poll(Instant::now());
        b.admit();
        b.record(false, true, Instant::now(), &budget);
        let t = fail_five(&mut b, &budget);
        assert_eq!(opened_for(t), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_probe_settles_a_half_open_breaker() {
        let budget = EjectionBudget::new(3, 0.5);
        let mut b = breaker(None);
        fail_five(&mut b, &budget);
        tokio::time::advance(Duration::from_secs(30)).await;
        b.poll(Instant::now());
        assert_eq!(b.admit(), Some(true));
        // A call sent before the breaker opened ends now, either way.
        assert_eq!(b.record(false, false, Instant::now(), &budget), None);
        assert_eq!(b.record(true, false, Instant::now(), &budget), None);
        assert_eq!(b.state(), State::HalfOpen { probing: true });
        assert_eq!(
            b.record(false, true, Instant::now(), &budget),
            Some(Transition::Closed)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_lets_the_next_call_probe() {
        let budget = EjectionBudget::new(1, 0.5);
        let mut b = breaker(None);
        fail_five(&mut b, &budget);
        tokio::time::advance(Duration::from_secs(30)).await;
        b.poll(Instant::now());
        assert_eq!(b.admit(), Some(true));
        b.probe_abandoned();
        assert_eq!(b.admit(), Some(true));
    }

    #[tokio::test(start_paused = true)]
    async fn max_ejection_spares_endpoints_beyond_the_budget() {
        // Four endpoints at 50%: two may be out at once.
        let budget = EjectionBudget::new(4, 0.5);
        let mut breakers: Vec<Breaker> = (0..4).map(|_| breaker(None)).collect();
        let mut outcomes = Vec::new();
        for b in &mut breakers {
            let last = fail_five(b, &budget);
            outcomes.push(matches!(last, Some(Transition::Opened { .. })));
        }
        assert_eq!(outcomes, [true, true, false, false]);
        assert_eq!(budget.ejected(), 2);
        assert!(breakers[2].is_available() && breakers[3].is_available());
        // One comes back; the next failing endpoint may now be ejected.
        tokio::time::advance(Duration::from_secs(30)).await;
        breakers[0].poll(Instant::now());
        breakers[0].admit();
        breakers[0].record(false, true, Instant::now(), &budget);
        let last = fail_five(&mut breakers[2], &budget);
        assert!(matches!(last, Some(Transition::Opened { .. })), "{last:?}");
        // A cluster of one may always eject its one endpoint.
        assert_eq!(EjectionBudget::new(1, 0.1).max(), 1);
        assert_eq!(EjectionBudget::new(10, 0.1).max(), 1);
        assert_eq!(EjectionBudget::new(10, 0.35).max(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_follows_the_live_set() {
        let budget = EjectionBudget::new(2, 0.5);
        let mut breakers: Vec<Breaker> = (0..4).map(|_| breaker(None)).collect();
        assert!(matches!(
            fail_five(&mut breakers[0], &budget),
            Some(Transition::Opened { .. })
        ));
        assert!(matches!(
            fail_five(&mut breakers[1], &budget),
            Some(Transition::Spared { .. })
        ));
        // Two endpoints more: half of four may be out.
        budget.resize(4);
        assert_eq!(budget.max(), 2);
        assert!(matches!(
            fail_five(&mut breakers[1], &budget),
            Some(Transition::Opened { .. })
        ));
        // Back to two: both stay out, and no third is ejected.
        budget.resize(2);
        assert_eq!((budget.ejected(), budget.max()), (2, 1));
        assert!(matches!(
            fail_five(&mut breakers[2], &budget),
            Some(Transition::Spared { .. })
        ));
        breakers[0].reset(&budget);
        breakers[1].reset(&budget);
        assert_eq!(budget.ejected(), 0);
        assert!(matches!(
            fail_five(&mut breakers[3], &budget),
            Some(Transition::Opened { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_low_success_rate_ejects_without_consecutive_failures() {
        let budget = EjectionBudget::new(3, 0.5);
        let outlier = OutlierConfig {
            min_success_rate: 0.8,
            window: Duration::from_secs(10),
            min_calls: 5,
        };
        let mut b = breaker(Some(outlier));
        // Alternating: never two failures in a row, 50% success.
        let mut t = None;
        let mut calls = 0;
        while t.is_none() {
            calls += 1;
            t = b.record(calls % 2 == 0, true, Instant::now(), &budget);
            assert!(calls < 20, "never ejected");
        }
        match t {
            Some(Transition::Opened { reason, .. }) => {
                assert!(reason.starts_with("success rate"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // Below min_calls nothing is judged; failures older than the
        // window are forgotten.
        let mut b = breaker(Some(OutlierConfig {
            min_calls: 5,
            ..OutlierConfig::default()
        }));
        for _ in 0..2 {
            b.record(false, true, Instant::now(), &budget);
            assert_eq!(b.record(true, true, Instant::now(), &budget), None);
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        for _ in 0..4 {
            b.record(false, true, Instant::now(), &budget);
        }
        assert_eq!(
            b.record(true, true, Instant::now(), &budget),
            None,
            "80% of 5"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_disabled_breaker_never_opens() {
        let budget = EjectionBudget::new(3, 0.5);
        let config = BreakerConfig {
            enabled: false,
            ..config()
        };
        let mut b = Breaker::new(&config, Some(&OutlierConfig::default()), Instant::now());
        for _ in 0..100 {
            assert_eq!(b.record(true, true, Instant::now(), &budget), None);
        }
        assert!(b.is_available());
    }
}
