//! The retry budget: retries bounded to a share of recent calls.
//!
//! [`RetryBudget`] bounds retries to a share of recent calls plus a small
//! floor, as Finagle's `RetryBudget`
//! (<https://finagle.github.io/blog/2016/02/08/retry-budgets>) and Linkerd's
//! retry budgets (`retryRatio`, `minRetriesPerSecond`, `ttl`) do: over the
//! last `ttl`,
//!
//! ```text
//! retries <= calls * percent / 100 + min_per_second * ttl_seconds
//! ```
//!
//! so that when a backend fails persistently, retries add at most `percent`
//! more load instead of multiplying it, while a quiet client can still retry
//! a few calls. The last `ttl` is kept in a [`Window`] of ten buckets of
//! `ttl / 10`, each holding its calls and retries, so the span slides in
//! steps of a tenth of `ttl`.
//!
//! The budget is plain state behind a short `std::sync::Mutex`, and the
//! caller passes the time in, so tokio's paused clock tests it.
//!
//! A mesh-wide budget (`mesh_wide_budget`) counts the calls and retries
//! every sidecar made to the cluster within `ttl`, as gossip last told
//! ([`RetryBudget::set_peers`]), with one floor for the whole mesh: without
//! it, every sidecar's own floor adds up, and a failing cluster called by
//! many quiet sidecars gets retries from each of them.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::util::lock;
use crate::util::window::{BUCKETS, Window};

/// How many retries a [`RetryBudget`] allows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudgetConfig {
    /// Retries allowed per 100 calls, 0 to 1000 (20.0: one retry per five
    /// calls).
    pub percent: f64,
    /// Retries allowed per second of `ttl` even without calls, so that a
    /// client with little traffic can still retry.
    pub min_per_second: u32,
    /// How long a call or a retry counts against the budget.
    pub ttl: Duration,
    /// Count every sidecar's calls and retries (from gossip).
    pub mesh_wide: bool,
}

impl Default for RetryBudgetConfig {
    /// Finagle's and Linkerd's defaults.
    fn default() -> Self {
        RetryBudgetConfig {
            percent: 20.0,
            min_per_second: 10,
            ttl: Duration::from_secs(10),
            mesh_wide: false,
        }
    }
}

/// Retries allowed as a share of recent calls plus a floor.
#[derive(Debug)]
pub struct RetryBudget {
    config: RetryBudgetConfig,
    /// `min_per_second * ttl`, worked out once.
    reserve: f64,
    window: Mutex<Window<Counts>>,
    /// Peers' calls and retries within `ttl`, as gossip last told.
    peers: Mutex<(f64, f64)>,
}

/// Calls and retries in one bucket of `ttl / 10`.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    calls: u64,
    retries: u64,
}

impl RetryBudget {
    /// A `percent` outside 0..=1000 (or NaN) is clamped into it, and a `ttl`
    /// under 10 ns is taken as 10 ns so that each bucket has a length.
    pub fn new(mut config: RetryBudgetConfig) -> RetryBudget {
        config.percent = if config.percent.is_nan() {
            0.0
        } else {
            config.percent.clamp(0.0, 1000.0)
        };
        config.ttl = config.ttl.max(Duration::from_nanos(BUCKETS as u64));
        RetryBudget {
            reserve: f64::from(config.min_per_second) * config.ttl.as_secs_f64(),
            window: Mutex::new(Window::new(config.ttl, Instant::now())),
            peers: Mutex::new((0.0, 0.0)),
            config,
        }
    }

    /// A call that may later be retried was made (deposit).
    pub fn deposit(&self, now: Instant) {
        let mut window = lock(&self.window);
        let slot = window.slot(now);
        slot.calls = slot.calls.saturating_add(1);
    }

    /// Asks to retry once: true (and counted) if the budget allows it.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let (peer_calls, peer_retries) = if self.config.mesh_wide {
            *lock(&self.peers)
        } else {
            (0.0, 0.0)
        };
        let mut window = lock(&self.window);
        let (calls, retries) = window
            .live(now)
            .fold((0u64, 0u64), |(c, r), b| (c + b.calls, r + b.retries));
        let allowed = (calls as f64 + peer_calls) * self.config.percent / 100.0 + self.reserve;
        // The tolerance absorbs float error in `allowed` (say 0.1 * 10
        // landing just under 1.0) without ever adding a whole retry.
        if retries as f64 + peer_retries + 1.0 <= allowed + 1e-9 {
            let slot = window.slot(now);
            slot.retries = slot.retries.saturating_add(1);
            true
        } else {
            false
        }
    }

    pub fn config(&self) -> &RetryBudgetConfig {
        &self.config
    }

    /// This sidecar's calls and retries within `ttl` (what it tells peers).
    pub fn usage(&self, now: Instant) -> (u64, u64) {
        lock(&self.window)
            .live(now)
            .fold((0, 0), |(c, r), b| (c + b.calls, r + b.retries))
    }

    /// Sets peers' calls and retries within `ttl` (the gossip task).
    pub fn set_peers(&self, calls: f64, retries: f64) {
        *lock(&self.peers) = (calls.max(0.0), retries.max(0.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(percent: f64, min_per_second: u32) -> RetryBudget {
        RetryBudget::new(RetryBudgetConfig {
            percent,
            min_per_second,
            ttl: Duration::from_secs(10),
            mesh_wide: false,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_mesh_wide_budget_counts_peers_and_shares_one_floor() {
        let budget = RetryBudget::new(RetryBudgetConfig {
            percent: 20.0,
            min_per_second: 1,
            ttl: Duration::from_secs(10),
            mesh_wide: true,
        });
        let now = Instant::now();
        for _ in 0..100 {
            budget.deposit(now);
        }
        // Alone: 20 retries for 100 calls, plus a floor of 10 (1/s x 10 s).
        // Peers made 100 calls and 30 retries: 40 + 10 for the mesh, less 30.
        budget.set_peers(100.0, 30.0);
        let allowed = (0..100).take_while(|_| budget.try_withdraw(now)).count();
        assert_eq!(allowed, 20);
        assert_eq!(budget.usage(now), (100, 20));
        // Peers retried a lot: nothing is left for this sidecar.
        budget.set_peers(0.0, 50.0);
        assert!(!budget.try_withdraw(now));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_share_of_calls() {
        let budget = budget(20.0, 0);
        let now = Instant::now();
        assert!(!budget.try_withdraw(now), "no calls, no floor");
        for _ in 0..100 {
            budget.deposit(now);
        }
        for i in 0..20 {
            assert!(budget.try_withdraw(now), "withdrawal {i} refused");
        }
        assert!(!budget.try_withdraw(now));
    }

    #[tokio::test(start_paused = true)]
    async fn calls_expire_with_the_ttl() {
        let budget = budget(20.0, 0);
        for _ in 0..100 {
            budget.deposit(Instant::now());
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(budget.try_withdraw(Instant::now()), "calls 5 s old count");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(!budget.try_withdraw(Instant::now()), "calls 11 s old count");
    }

    #[tokio::test(start_paused = true)]
    async fn floor_refills_after_ttl() {
        let budget = budget(20.0, 10);
        for i in 0..100 {
            assert!(
                budget.try_withdraw(Instant::now()),
                "withdrawal {i} refused"
            );
        }
        assert!(!budget.try_withdraw(Instant::now()));

        // Still inside the ttl: the retries still count.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!budget.try_withdraw(Instant::now()));

        tokio::time::advance(Duration::from_secs(6)).await;
        for i in 0..100 {
            assert!(
                budget.try_withdraw(Instant::now()),
                "withdrawal {i} refused after ttl"
            );
        }
        assert!(!budget.try_withdraw(Instant::now()));
    }
}
