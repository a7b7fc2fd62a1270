//! Clusters: named sets of endpoints, and the router that finds the cluster
//! a call is for.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::balance::{Affinity, Snapshot};
use crate::config::{ClusterConfig, Strategy};
use crate::endpoint::{EjectionBudget, Endpoint};
use crate::limit::{RateLimit, RetryBudget, RetryBudgetConfig};

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
    /// Every endpoint, ready or not, in config order.
    endpoints: Vec<Arc<Endpoint>>,
    /// The ready set, its groups and pickers, swapped whole.
    snapshot: ArcSwap<Snapshot>,
    /// Sticky sessions; they outlive snapshots.
    affinity: Option<Affinity>,
    /// Endpoints ring this when their readiness changes.
    changed: Arc<Notify>,
    budget: Arc<EjectionBudget>,
    in_flight: AtomicU64,
    rate_limits: Vec<RateLimit>,
    retry_budget: Option<RetryBudget>,
    stats: ClusterStats,
    created: Instant,
    /// When a refusal was last logged, in ms since `created` (0: never).
    refusal_logged_ms: AtomicU64,
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
    pub fn new(config: &ClusterConfig, local_zone: Option<&str>) -> Cluster {
        let changed = Arc::new(Notify::new());
        let budget = Arc::new(EjectionBudget::new(
            config.endpoints.len(),
            config.breaker.max_ejection,
        ));
        let endpoints: Vec<Arc<Endpoint>> = config
            .endpoints
            .iter()
            .map(|e| Arc::new(Endpoint::new(e, config, changed.clone(), budget.clone())))
            .collect();
        let snapshot = Snapshot::build(config, local_zone, &endpoints, Instant::now());
        Cluster {
            name: config.name.as_str().into(),
            config: config.clone(),
            local_zone: local_zone.map(String::from),
            endpoints,
            snapshot: ArcSwap::from_pointee(snapshot),
            affinity: config.affinity.as_ref().map(Affinity::new),
            changed,
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
                    ..RetryBudgetConfig::default()
                })
            }),
            stats: ClusterStats::default(),
            created: Instant::now(),
            refusal_logged_ms: AtomicU64::new(0),
        }
    }

    /// Counts a call refused by a limit in `counter`, and logs it, at most
    /// once every 10 s for the cluster so that an overload does not flood
    /// the log.
    pub fn refused(&self, counter: &AtomicU64, reason: &dyn std::fmt::Display) {
        counter.fetch_add(1, Ordering::Relaxed);
        let now = (self.created.elapsed().as_millis() as u64).max(1);
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

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// The current ready set, groups and pickers.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    pub fn affinity(&self) -> Option<&Affinity> {
        self.affinity.as_ref()
    }

    /// Rebuilds the snapshot from the endpoints' readiness now.
    pub fn rebuild(&self) {
        let snapshot = Snapshot::build(
            &self.config,
            self.local_zone.as_deref(),
            &self.endpoints,
            Instant::now(),
        );
        let ready = snapshot.ready().len();
        let was = self.snapshot.load();
        if snapshot.is_panic() && !was.is_panic() {
            self.stats.panics.fetch_add(1, Ordering::Relaxed);
            let healthy = self
                .endpoints
                .iter()
                .filter(|e| e.is_ready(Instant::now()))
                .count();
            tracing::warn!(cluster = %self.name, healthy, total = self.endpoints.len(), threshold = self.config.panic_threshold, "too few endpoints are healthy: balancing over all of them (panic mode)");
        } else if was.is_panic() && !snapshot.is_panic() {
            tracing::info!(cluster = %self.name, ready, "enough endpoints are healthy again; panic mode over");
        } else if ready != was.ready().len() {
            tracing::info!(cluster = %self.name, ready, total = self.endpoints.len(), "ready endpoints changed");
        }
        drop(was);
        self.snapshot.store(Arc::new(snapshot));
    }

    /// The cluster's control loop: rebuilds the snapshot when an endpoint's
    /// readiness changes or a sitting-out endpoint's time is up, and sweeps
    /// expired sessions. Runs until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        // Connect to every endpoint up front, so that the first calls find
        // connections ready (calls pass over endpoints still connecting).
        for e in &self.endpoints {
            e.connection().warm();
        }
        let sweep_every = self.affinity.as_ref().map(|a| a.sweep_every());
        let mut next_sweep = sweep_every.map(|d| Instant::now() + d);
        loop {
            let wake = self
                .endpoints
                .iter()
                .filter_map(|e| e.ready_at())
                .filter(|&t| t > Instant::now())
                .chain(next_sweep)
                .min();
            let sleep = async {
                match wake {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = sleep => {}
            }
            let now = Instant::now();
            for e in &self.endpoints {
                e.poll_breaker(now);
            }
            self.rebuild();
            if let (Some(at), Some(every), Some(affinity)) =
                (next_sweep, sweep_every, &self.affinity)
            {
                if Instant::now() >= at {
                    affinity.sweep();
                    next_sweep = Some(Instant::now() + every);
                }
            }
        }
    }
}

/// Finds clusters by name or alias, as a CONNECT target or an `:authority`.
pub struct Router {
    clusters: Vec<Arc<Cluster>>,
    by_name: HashMap<String, Arc<Cluster>>,
}

impl Router {
    pub fn new(configs: &[ClusterConfig], local_zone: Option<&str>) -> Router {
        let mut by_name = HashMap::new();
        let mut clusters = Vec::with_capacity(configs.len());
        for config in configs {
            let cluster = Arc::new(Cluster::new(config, local_zone));
            for name in std::iter::once(&config.name).chain(&config.aliases) {
                by_name.insert(name.to_ascii_lowercase(), cluster.clone());
            }
            clusters.push(cluster);
        }
        Router { clusters, by_name }
    }

    pub fn clusters(&self) -> &[Arc<Cluster>] {
        &self.clusters
    }

    /// The cluster that `target` names: `name`, `name:port`, or an alias of
    /// either; matched without regard to ASCII case.
    pub fn find(&self, target: &str) -> Option<&Arc<Cluster>> {
        if let Some(c) = self.by_name.get(target) {
            return Some(c);
        }
        let host = strip_port(target);
        if let Some(c) = self.by_name.get(host) {
            return Some(c);
        }
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            let lower = host.to_ascii_lowercase();
            return self
                .by_name
                .get(&target.to_ascii_lowercase())
                .or_else(|| self.by_name.get(&lower));
        }
        None
    }

    /// The names of all clusters, for error messages.
    pub fn names(&self) -> String {
        let names: Vec<&str> = self.clusters.iter().map(|c| c.name()).collect();
        if names.is_empty() {
            "(none)".into()
        } else {
            names.join(", ")
        }
    }
}

/// `host:port` -> `host`; `[v6]:port` -> `[v6]`; a name with no port stays.
pub fn strip_port(target: &str) -> &str {
    match target.rsplit_once(':') {
        Some((host, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!host.contains(':') || host.ends_with(']')) =>
        {
            host
        }
        _ => target,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let mut c = ClusterConfig::for_test("planner.agents", &["127.0.0.1:1".parse().unwrap()]);
        c.aliases = vec!["planner".into()];
        Router::new(&[c], None)
    }

    #[test]
    fn finds_a_cluster_by_name_alias_any_port_and_any_case() {
        let r = router();
        for target in [
            "planner.agents",
            "planner.agents:50051",
            "planner",
            "planner:1",
            "Planner.Agents:7",
        ] {
            assert_eq!(
                r.find(target).map(|c| c.name()),
                Some("planner.agents"),
                "{target}"
            );
        }
        for target in [
            "planner.agent",
            "agents",
            "10.0.0.1:50051",
            "planner.agents.svc:1",
            "",
        ] {
            assert!(r.find(target).is_none(), "{target}");
        }
    }

    #[test]
    fn strips_ports_but_not_ipv6_colons() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
    }
}
