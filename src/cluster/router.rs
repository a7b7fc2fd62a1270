//! Finding the cluster a call is for, by the CONNECT target or the
//! `:authority` it names.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, ArcSwapOption};

use super::Cluster;
use crate::config::ClusterConfig;
use crate::util::lock;

/// Finds clusters by name or alias, as a CONNECT target or an `:authority`.
///
/// The cluster set is swapped whole by a config reload ([`Router::install`]);
/// a call finds the set of the moment it starts. A connection bound to one
/// cluster for its lifetime (a CONNECT tunnel, a local port) holds that
/// cluster's [`Slot`], which a reload points at the cluster's new build.
pub struct Router {
    table: ArcSwap<Table>,
    /// Every name's slot, kept across reloads (a cluster that is removed
    /// and comes back finds its old tunnels again).
    slots: Mutex<HashMap<Arc<str>, Arc<Slot>>>,
}

/// The clusters at one moment, with their names and aliases.
pub struct Table {
    clusters: Vec<Arc<Cluster>>,
    by_name: HashMap<String, Arc<Cluster>>,
    slots: HashMap<String, Arc<Slot>>,
}

impl std::ops::Deref for Table {
    type Target = [Arc<Cluster>];

    fn deref(&self) -> &[Arc<Cluster>] {
        &self.clusters
    }
}

/// Where one cluster's calls go now: its current build, or none once a
/// reload removed it.
pub struct Slot {
    name: Arc<str>,
    cluster: ArcSwapOption<Cluster>,
}

impl Slot {
    /// The cluster's current build; `None` when a reload removed it.
    pub fn current(&self) -> Option<Arc<Cluster>> {
        self.cluster.load_full()
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Router {
    pub fn new(configs: &[ClusterConfig], local_zone: Option<&str>) -> Router {
        let clusters = configs
            .iter()
            .map(|c| Arc::new(Cluster::new(c, local_zone)))
            .collect();
        let router = Router {
            table: ArcSwap::from_pointee(Table {
                clusters: Vec::new(),
                by_name: HashMap::new(),
                slots: HashMap::new(),
            }),
            slots: Mutex::new(HashMap::new()),
        };
        router.install(clusters);
        router
    }

    /// Makes `clusters` the cluster set: new calls find them, and the slots
    /// of their names point at them; a name no longer there has its slot
    /// emptied.
    pub fn install(&self, clusters: Vec<Arc<Cluster>>) {
        let mut slots = lock(&self.slots);
        let mut by_name = HashMap::new();
        let mut named = HashMap::new();
        for cluster in &clusters {
            let slot = slots
                .entry(cluster.name().into())
                .or_insert_with(|| {
                    Arc::new(Slot {
                        name: cluster.name().into(),
                        cluster: ArcSwapOption::empty(),
                    })
                })
                .clone();
            slot.cluster.store(Some(cluster.clone()));
            let config = cluster.config();
            for name in std::iter::once(&config.name).chain(&config.aliases) {
                by_name.insert(name.to_ascii_lowercase(), cluster.clone());
                named.insert(name.to_ascii_lowercase(), slot.clone());
            }
        }
        for (name, slot) in slots.iter() {
            if !clusters.iter().any(|c| c.name() == &**name) {
                slot.cluster.store(None);
            }
        }
        self.table.store(Arc::new(Table {
            clusters,
            by_name,
            slots: named,
        }));
    }

    /// The clusters now.
    pub fn clusters(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// The cluster that `target` names: `name`, `name:port`, or an alias of
    /// either; matched without regard to ASCII case.
    pub fn find(&self, target: &str) -> Option<Arc<Cluster>> {
        lookup(&self.table.load().by_name, target).cloned()
    }

    /// The slot of the cluster that `target` names, for a connection whose
    /// every call goes to that cluster.
    pub fn slot(&self, target: &str) -> Option<Arc<Slot>> {
        lookup(&self.table.load().slots, target).cloned()
    }

    /// Transparent mode: the slot of the cluster a connection redirected
    /// from `destination` is for: the first whose `match` names it (or a
    /// name there resolved to it), else
    /// the first with an endpoint there (by its address, or the address its
    /// connection reached).
    pub fn slot_for_destination(&self, destination: SocketAddr) -> Option<Arc<Slot>> {
        let table = self.table.load();
        let cluster = table
            .clusters
            .iter()
            .find(|c| c.matches(destination))
            .or_else(|| {
                table.clusters.iter().find(|c| {
                    c.endpoints().iter().any(|e| {
                        e.address().parse::<SocketAddr>().ok() == Some(destination)
                            || e.connection().peer_addr() == Some(destination)
                    })
                })
            })?;
        table
            .slots
            .get(&cluster.name().to_ascii_lowercase())
            .cloned()
    }

    /// The names of all clusters, for error messages.
    pub fn names(&self) -> String {
        let table = self.table.load();
        let names: Vec<&str> = table.clusters.iter().map(|c| c.name()).collect();
        if names.is_empty() {
            "(none)".into()
        } else {
            names.join(", ")
        }
    }
}

fn lookup<'a, T>(by_name: &'a HashMap<String, T>, target: &str) -> Option<&'a T> {
    if let Some(c) = by_name.get(target) {
        return Some(c);
    }
    let host = strip_port(target);
    if let Some(c) = by_name.get(host) {
        return Some(c);
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        let lower = host.to_ascii_lowercase();
        return by_name
            .get(&target.to_ascii_lowercase())
            .or_else(|| by_name.get(&lower));
    }
    None
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
                r.find(target).map(|c| c.name().to_string()).as_deref(),
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
    fn a_reload_moves_slots_to_the_new_build_and_empties_a_removed_cluster() {
        let r = router();
        let slot = r.slot("planner:50051").expect("a slot by alias");
        let first = slot.current().expect("the first build");
        let again = Arc::new(Cluster::new(first.config(), None));
        r.install(vec![again.clone()]);
        assert!(Arc::ptr_eq(&slot.current().unwrap(), &again));
        assert!(Arc::ptr_eq(&r.find("planner").unwrap(), &again));

        let other = ClusterConfig::for_test("critic", &["127.0.0.1:2".parse().unwrap()]);
        r.install(vec![Arc::new(Cluster::new(&other, None))]);
        assert!(
            slot.current().is_none(),
            "a removed cluster's slot is empty"
        );
        assert!(r.find("planner").is_none());
        assert_eq!(r.names(), "critic");

        r.install(vec![again.clone()]);
        assert!(
            Arc::ptr_eq(&slot.current().unwrap(), &again),
            "a cluster that comes back fills its old slot"
        );
    }

    #[test]
    fn strips_ports_but_not_ipv6_colons() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
    }
}
