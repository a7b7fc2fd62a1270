//! Clusters: named sets of endpoints, and the router that finds the cluster
//! a call is for.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::balance::{Affinity, Snapshot};
use crate::config::{ClusterConfig, Strategy};
use crate::endpoint::Endpoint;

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
}

impl Cluster {
    pub fn new(config: &ClusterConfig, local_zone: Option<&str>) -> Cluster {
        let changed = Arc::new(Notify::new());
        let endpoints: Vec<Arc<Endpoint>> = config
            .endpoints
            .iter()
            .map(|e| Arc::new(Endpoint::new(e, config, changed.clone())))
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
        }
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
            tracing::warn!(cluster = %self.name, "no endpoint is ready: balancing over all of them (panic mode)");
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
