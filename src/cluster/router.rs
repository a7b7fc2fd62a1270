//! Finding the cluster a call is for, by the CONNECT target or the
//! `:authority` it names.

use std::collections::HashMap;
use std::sync::Arc;

use super::Cluster;
use crate::config::ClusterConfig;

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
