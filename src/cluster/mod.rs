//! Clusters: named, live sets of endpoints with the policy that applies to
//! every call to them (admission limits, rate limits, the retry budget),
//! and the router that finds the cluster a call is for.
//!
//! A cluster's endpoints change only through [`Cluster::apply`] (see
//! [`update`]); its control loop ([`control`]) rebuilds the picker's
//! snapshot when an endpoint's readiness changes.

mod control;
pub mod discovery;
pub mod kubernetes;
pub mod limit;
pub mod retry_budget;
mod router;
pub mod update;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio::time::Instant;

pub use router::{Router, Slot, Table, strip_port};
pub use update::{Applied, Update};

use crate::balance::{Affinity, Snapshot};
use crate::config::{ClusterConfig, Strategy};
use crate::endpoint::{EjectionBudget, Endpoint};
use crate::telemetry::trace::Traces;
use crate::util::Clock;
use limit::RateLimit;
use retry_budget::{RetryBudget, RetryBudgetConfig};
use update::Members;

/// What a cluster's admission and retries have done, for `/stats`.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Calls refused because the cluster had `max_in_flight` calls.
    pub over_max_in_flight: AtomicU64,
    /// Calls refused because every endpoint was at its limit.
    pub endpoints_full: AtomicU64,
    /// Calls refused by a rate limit.
    pub rate_limited: AtomicU64,
    /// Calls sent again after an attempt failed.
    pub retries: AtomicU64,
    /// Retries the budget refused.
    pub retries_refused: AtomicU64,
    /// Times the cluster went into panic mode.
    pub panics: AtomicU64,
    /// Endpoints added and removed by updates, after the first.
    pub endpoints_added: AtomicU64,
    pub endpoints_removed: AtomicU64,
    /// DNS discovery: answers with addresses, and lookups that failed or
    /// came back empty (the last good set stayed).
    pub dns_answers: AtomicU64,
    pub dns_failures: AtomicU64,
    /// Whether the last lookup failed (the cluster runs on an older set).
    pub dns_failing: std::sync::atomic::AtomicBool,
    /// Kubernetes discovery: endpoint sets applied from EndpointSlices, and
    /// errors of the API client or the watch (the last set stayed).
    pub kubernetes_updates: AtomicU64,
    pub kubernetes_errors: AtomicU64,
    /// Whether the watch is failing now.
    pub kubernetes_failing: std::sync::atomic::AtomicBool,
}

impl ClusterStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

pub struct Cluster {
    name: Arc<str>,
    config: ClusterConfig,
    local_zone: Option<String>,
    /// The live endpoints, ready or not, in the order updates gave them (a
    /// reset that only reorders them changes nothing).
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    /// The ready set, its groups and pickers, swapped whole.
    snapshot: ArcSwap<Snapshot>,
    /// Held while a snapshot is built and stored, so that a rebuild from an
    /// older endpoint set never lands after one from a newer.
    rebuilding: Mutex<()>,
    /// The writers' side of the endpoint set: the tasks of each endpoint
    /// and of those still draining. Locked by updates only, never by a call.
    members: Mutex<Members>,
    /// Sticky sessions; they outlive snapshots.
    affinity: Option<Affinity>,
    /// Endpoints ring this when their readiness changes.
    changed: Arc<Notify>,
    budget: Arc<EjectionBudget>,
    in_flight: AtomicU64,
    rate_limits: Vec<RateLimit>,
    retry_budget: Option<RetryBudget>,
    stats: ClusterStats,
    clock: Clock,
    /// When a refusal was last logged, in ms on `clock` (0: never).
    refusal_logged_ms: AtomicU64,
    /// The tracer, when tracing is on (set once, at start).
    traces: std::sync::OnceLock<Arc<Traces>>,
    /// The TLS client of its endpoints' connections (`tls`).
    tls: Option<Arc<crate::endpoint::tls::Tls>>,
    /// Transparent mode: the addresses `match`'s names resolved to.
    matched: ArcSwap<Vec<std::net::SocketAddr>>,
    /// A version split set through the admin API, in place of the
    /// config's; read by rebuilds only.
    split_by_api: Mutex<Option<Vec<(String, u32)>>>,
}

/// Refusals are logged at most this often per cluster; `/clusters` counts
/// every one.
const REFUSAL_LOG_EVERY_MS: u64 = 10_000;

/// One call counted against the cluster's `max_in_flight`, until dropped.
pub struct Admitted {
    cluster: Arc<Cluster>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.cluster.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Cluster {
    /// The cluster with its configured endpoints: the static config is the
    /// first [`Update::Reset`]. No task runs until [`Cluster::start`].
    pub fn new(config: &ClusterConfig, local_zone: Option<&str>) -> Cluster {
        let budget = Arc::new(EjectionBudget::new(0, config.breaker.max_ejection));
        let cluster = Cluster {
            name: config.name.as_str().into(),
            config: config.clone(),
            local_zone: local_zone.map(String::from),
            endpoints: ArcSwap::from_pointee(Vec::new()),
            snapshot: ArcSwap::from_pointee(Snapshot::build(
                config,
                local_zone,
                &[],
                Instant::now(),
            )),
            rebuilding: Mutex::new(()),
            members: Mutex::new(Members::default()),
            affinity: config.affinity.as_ref().map(Affinity::new),
            changed: Arc::new(Notify::new()),
            budget,
            in_flight: AtomicU64::new(0),
            rate_limits: config
                .rate_limits
                .iter()
                .cloned()
                .map(RateLimit::new)
                .collect(),
            retry_budget: config.retry.as_ref().map(|r| {
                RetryBudget::new(RetryBudgetConfig {
                    percent: r.budget_percent,
                    min_per_second: r.min_retries_per_second,
                    mesh_wide: r.mesh_wide_budget,
                    ..RetryBudgetConfig::default()
                })
            }),
            stats: ClusterStats::default(),
            clock: Clock::new(),
            refusal_logged_ms: AtomicU64::new(0),
            traces: std::sync::OnceLock::new(),
            tls: config
                .tls
                .clone()
                .map(|t| Arc::new(crate::endpoint::tls::Tls::new(&config.name, t))),
            matched: ArcSwap::from_pointee(Vec::new()),
            split_by_api: Mutex::new(None),
        };
        cluster.apply(Update::Reset(config.endpoints.clone()));
        cluster
    }

    /// Turns tracing on for the cluster's calls.
    pub fn set_traces(&self, traces: Arc<Traces>) {
        let _ = self.traces.set(traces);
    }

    pub fn traces(&self) -> Option<&Arc<Traces>> {
        self.traces.get()
    }

    /// The TLS client of the cluster's connections, when it has `tls`.
    pub fn tls(&self) -> Option<&Arc<crate::endpoint::tls::Tls>> {
        self.tls.as_ref()
    }

    /// Counts a call refused by a limit in `counter`, and logs it, at most
    /// once every 10 s for the cluster so that an overload does not flood
    /// the log.
    pub fn refused(&self, counter: &AtomicU64, reason: &dyn std::fmt::Display) {
        counter.fetch_add(1, Ordering::Relaxed);
        let now = self.clock.now_ms().max(1);
        let last = self.refusal_logged_ms.load(Ordering::Relaxed);
        if (last == 0 || now >= last + REFUSAL_LOG_EVERY_MS)
            && self
                .refusal_logged_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(cluster = %self.name, %reason, "refusing calls: a limit is reached (logged at most every 10 s; /clusters counts them all)");
        }
    }

    /// The version split in force (percent by version), and whether the
    /// admin API set it.
    pub fn split(&self) -> (Vec<(String, u32)>, bool) {
        match &*crate::util::lock(&self.split_by_api) {
            Some(split) => (split.clone(), true),
            None => (self.config.split.clone(), false),
        }
    }

    /// Sets the version split (admin API), until a config reload.
    pub fn set_split(&self, split: Vec<(String, u32)>) {
        *crate::util::lock(&self.split_by_api) = Some(split);
        self.rebuild();
    }

    /// Undoes what the admin API changed: holds, weights, the split.
    /// Returns how many things it undid.
    pub fn undo_api_changes(&self) -> usize {
        let mut undone = usize::from(crate::util::lock(&self.split_by_api).take().is_some());
        for e in self.endpoints.load().iter() {
            undone += usize::from(e.restore());
        }
        if undone > 0 {
            self.rebuild();
        }
        undone
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    pub fn stats(&self) -> &ClusterStats {
        &self.stats
    }

    pub fn rate_limits(&self) -> &[RateLimit] {
        &self.rate_limits
    }

    pub fn retry_budget(&self) -> Option<&RetryBudget> {
        self.retry_budget.as_ref()
    }

    /// Endpoints ejected now, and the most that may be.
    pub fn ejected(&self) -> (usize, usize) {
        (self.budget.ejected(), self.budget.max())
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a call against `max_in_flight`, or refuses it (the caller
    /// reports the refusal through [`Cluster::refused`]).
    pub fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let max = u64::from(self.config.max_in_flight);
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= max {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Admitted {
            cluster: self.clone(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn strategy(&self) -> Strategy {
        self.config.strategy
    }

    /// The live endpoints now, ready or not.
    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// The live endpoint at `address`, if there is one.
    pub fn endpoint(&self, address: &str) -> Option<Arc<Endpoint>> {
        self.endpoints
            .load()
            .iter()
            .find(|e| e.address() == address)
            .cloned()
    }

    /// The current ready set, groups and pickers.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Transparent mode: whether a connection redirected from `destination`
    /// is this cluster's by its `match` (an address, or one a name
    /// resolved to).
    pub fn matches(&self, destination: std::net::SocketAddr) -> bool {
        self.config.matches.contains(&destination) || self.matched.load().contains(&destination)
    }

    /// Resolves `match`'s names every 5 s until the task is dropped; a
    /// failed lookup keeps the addresses it had.
    pub(crate) async fn resolve_matches(self: Arc<Self>) {
        let mut failing = false;
        loop {
            let mut found = Vec::new();
            let mut error = None;
            for (host, port) in &self.config.match_names {
                match tokio::net::lookup_host((host.as_str(), *port)).await {
                    Ok(addrs) => found.extend(addrs),
                    Err(e) => error = Some(format!("{host}:{port}: {e}")),
                }
            }
            match error {
                Some(e) => {
                    if !failing {
                        tracing::warn!(cluster = %self.name, error = %e, "a name in match does not resolve; keeping the addresses it had (logged once until it does)");
                    }
                    failing = true;
                }
                None => {
                    failing = false;
                    found.sort();
                    found.dedup();
                    self.matched.store(Arc::new(found));
                }
            }
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        }
    }

    pub fn affinity(&self) -> Option<&Affinity> {
        self.affinity.as_ref()
    }
}
