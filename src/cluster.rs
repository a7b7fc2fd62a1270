//! Clusters: named sets of endpoints, and the router that finds the cluster
//! a call is for.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::balance::Snapshot;
use crate::config::{ClusterConfig, Strategy};
use crate::endpoint::Endpoint;

pub struct Cluster {
    name: Arc<str>,
    strategy: Strategy,
    /// Every endpoint, ready or not, in config order.
    endpoints: Vec<Arc<Endpoint>>,
    /// The ready set and its picker, swapped whole.
    snapshot: ArcSwap<Snapshot>,
}

impl Cluster {
    pub fn new(config: &ClusterConfig) -> Cluster {
        let endpoints: Vec<Arc<Endpoint>> = config
            .endpoints
            .iter()
            .map(|e| Arc::new(Endpoint::new(&e.address, e.weight, config.connect_timeout)))
            .collect();
        let snapshot = Snapshot::new(config.strategy, endpoints.clone());
        Cluster {
            name: config.name.as_str().into(),
            strategy: config.strategy,
            endpoints,
            snapshot: ArcSwap::from_pointee(snapshot),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// The current ready set and picker.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }
}

/// Finds clusters by name or alias, as a CONNECT target or an `:authority`.
pub struct Router {
    clusters: Vec<Arc<Cluster>>,
    by_name: HashMap<String, Arc<Cluster>>,
}

impl Router {
    pub fn new(configs: &[ClusterConfig]) -> Router {
        let mut by_name = HashMap::new();
        let mut clusters = Vec::with_capacity(configs.len());
        for config in configs {
            let cluster = Arc::new(Cluster::new(config));
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
        Router::new(&[c])
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
