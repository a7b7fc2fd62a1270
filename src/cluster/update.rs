//! Changing a cluster's endpoints while calls flow.
//!
//! Discovery, a config reload and the operator all speak the same
//! [`Update`]s, in the manner of linkerd2-proxy's `Update::{Reset, Add,
//! Remove}`; [`Cluster::apply`] diffs each against the live set, keyed by
//! address:
//!
//! - an endpoint that stays keeps everything it has learned (connection,
//!   load, latency estimate, breaker, pinned sessions); a new weight is
//!   taken in place, a new zone, priority or version makes a new endpoint;
//! - an added endpoint connects in the background and joins the picker once
//!   that first attempt has ended (at once, before the cluster starts);
//! - a removed endpoint takes no new call at once and gives back any
//!   ejection it held; its calls in flight finish, up to the drain timeout;
//!   then its connection is shut and every task of it has stopped. Only the
//!   sessions pinned to it move.
//!
//! The ejection budget, the panic threshold and weighted tables follow the
//! live set, since each is worked out from it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::Cluster;
use crate::config::EndpointConfig;
use crate::endpoint::{Endpoint, health};
use crate::util::{Task, lock};

/// A change to a cluster's endpoints.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    /// The whole set: endpoints not in it go, new ones come, the rest stay.
    Reset(Vec<EndpointConfig>),
    /// These endpoints come (or, at an address already there, are updated).
    Add(Vec<EndpointConfig>),
    /// The endpoints at these addresses go.
    Remove(Vec<String>),
}

/// What an update changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub added: usize,
    pub removed: usize,
    /// Endpoints that stayed with a new weight.
    pub reweighted: usize,
}

impl Applied {
    pub fn is_empty(&self) -> bool {
        *self == Applied::default()
    }
}

/// The writers' side of a cluster's endpoints: the tasks each one owns,
/// and the removed ones still draining.
#[derive(Default)]
pub(super) struct Members {
    /// Set once the cluster has started: how long a removed endpoint's
    /// calls may take to finish.
    drain_timeout: Option<Duration>,
    tasks: HashMap<Arc<str>, Vec<Task>>,
    draining: Vec<Task>,
}

impl Members {
    pub(super) fn start(&mut self, drain_timeout: Duration) {
        self.drain_timeout = Some(drain_timeout);
    }

    pub(super) fn own(&mut self, address: &str, tasks: Vec<Task>) {
        if !tasks.is_empty() {
            self.tasks.insert(address.into(), tasks);
        }
    }
}

impl Cluster {
    /// Applies `update` to the live endpoint set (see the module doc).
    /// Never fails: addresses are validated where updates are made.
    pub fn apply(&self, update: Update) -> Applied {
        let mut members = lock(&self.members);
        members.draining.retain(|t| !t.is_finished());
        let current = self.endpoints.load_full();
        let target = match update {
            Update::Reset(all) => all,
            Update::Add(more) => {
                let mut all: Vec<EndpointConfig> = current.iter().map(|e| e.config()).collect();
                all.extend(more);
                all
            }
            Update::Remove(gone) => current
                .iter()
                .filter(|e| !gone.iter().any(|a| a == e.address()))
                .map(|e| e.config())
                .collect(),
        };
        let started = members.drain_timeout.is_some();
        let mut applied = Applied::default();
        let mut next: Vec<Arc<Endpoint>> = Vec::with_capacity(target.len());
        let mut added = Vec::new();
        for config in last_per_address(target) {
            match current.iter().find(|e| e.address() == config.address) {
                Some(e) if e.is_placed_as(&config) => {
                    applied.reweighted += usize::from(e.set_weight(config.weight));
                    next.push(e.clone());
                }
                _ => {
                    let e = Arc::new(Endpoint::new(
                        &config,
                        &self.config,
                        self.changed.clone(),
                        self.budget.clone(),
                        self.tls.clone(),
                    ));
                    if started {
                        // Out of the picker until its first connect ends.
                        e.hold_back();
                    }
                    added.push(e.clone());
                    next.push(e);
                }
            }
        }
        let removed: Vec<Arc<Endpoint>> = current
            .iter()
            .filter(|e| !next.iter().any(|n| Arc::ptr_eq(n, e)))
            .cloned()
            .collect();
        (applied.added, applied.removed) = (added.len(), removed.len());
        if applied.is_empty() {
            return applied;
        }
        self.budget.resize(next.len());
        self.endpoints.store(Arc::new(next));
        for endpoint in &removed {
            self.retire(&mut members, endpoint);
        }
        if started {
            for endpoint in &added {
                let tasks = self.endpoint_tasks(endpoint, true);
                members.own(endpoint.address(), tasks);
            }
            self.stats
                .endpoints_added
                .fetch_add(added.len() as u64, Ordering::Relaxed);
            self.stats
                .endpoints_removed
                .fetch_add(removed.len() as u64, Ordering::Relaxed);
            tracing::info!(
                cluster = %self.name,
                added = applied.added,
                removed = applied.removed,
                reweighted = applied.reweighted,
                total = self.endpoints.load().len(),
                "endpoints changed"
            );
        }
        drop(members);
        self.rebuild();
        self.changed.notify_one();
        applied
    }

    /// The tasks an endpoint owns while it is in the cluster: its health
    /// checker, and for an endpoint added to a running cluster, the first
    /// connect, after which it joins the picker.
    pub(super) fn endpoint_tasks(&self, endpoint: &Arc<Endpoint>, joining: bool) -> Vec<Task> {
        let mut tasks = Vec::new();
        if let Some(check) = &self.config.health_check {
            let (endpoint, check) = (endpoint.clone(), check.clone());
            tasks.push(Task::supervised("health checker", move || {
                health::run(endpoint.clone(), check.clone())
            }));
        }
        if joining {
            let endpoint = endpoint.clone();
            tasks.push(Task::spawn(async move {
                // Either way the attempt ends, the endpoint joins: if it
                // failed, the endpoint sits out its connect backoff, which
                // keeps it out of the ready set until then.
                let _ = endpoint.connection().connect_boxed().await;
                endpoint.join();
            }));
        }
        tasks
    }

    /// Takes `endpoint` out: no new call, its own tasks stopped, its
    /// sessions unpinned; then, once its calls have finished (or the drain
    /// timeout passed), its connection shut.
    fn retire(&self, members: &mut Members, endpoint: &Arc<Endpoint>) {
        endpoint.retire();
        members.tasks.remove(endpoint.address());
        if let Some(affinity) = &self.affinity {
            affinity.forget(endpoint.id());
        }
        let Some(timeout) = members.drain_timeout else {
            endpoint.connection().shut_down();
            return;
        };
        let (endpoint, cluster) = (endpoint.clone(), self.name.clone());
        members.draining.push(Task::spawn(async move {
            let left = endpoint.drained(Instant::now() + timeout).await;
            if left > 0 {
                tracing::warn!(%cluster, endpoint = endpoint.address(), calls = left, ?timeout, "removed endpoint still had calls in flight at the drain timeout; closing its connection");
            } else {
                tracing::debug!(%cluster, endpoint = endpoint.address(), "removed endpoint drained");
            }
            endpoint.connection().shut_down();
        }));
    }

    /// Removes every endpoint and waits until each has drained (up to the
    /// drain timeout) and its connection is shut: a cluster taken out of
    /// service by a reload.
    pub async fn close(&self) {
        self.apply(Update::Reset(Vec::new()));
        let draining = std::mem::take(&mut lock(&self.members).draining);
        for task in draining {
            task.finished().await;
        }
    }

    /// Tasks the cluster's endpoints own now, draining ones included (for
    /// tests and stats).
    pub fn endpoint_task_count(&self) -> usize {
        let members = lock(&self.members);
        members
            .tasks
            .values()
            .flatten()
            .chain(&members.draining)
            .filter(|t| !t.is_finished())
            .count()
    }
}

/// `configs` with one entry per address: the last one given, in the place
/// of the first.
fn last_per_address(configs: Vec<EndpointConfig>) -> Vec<EndpointConfig> {
    let mut out: Vec<EndpointConfig> = Vec::with_capacity(configs.len());
    for config in configs {
        match out.iter_mut().find(|c| c.address == config.address) {
            Some(slot) => *slot = config,
            None => out.push(config),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::num::NonZeroU32;

    use http::HeaderMap;

    use super::*;
    use crate::balance::{Call, Tried};
    use crate::config::{AffinityConfig, ClusterConfig, Strategy};
    use crate::endpoint::Refused;

    fn addr(i: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1000 + i))
    }

    fn endpoint(i: u16, weight: u32) -> EndpointConfig {
        EndpointConfig {
            weight: NonZeroU32::new(weight).unwrap(),
            ..EndpointConfig::new(addr(i))
        }
    }

    fn cluster(n: u16) -> Cluster {
        let addrs: Vec<SocketAddr> = (0..n).map(addr).collect();
        Cluster::new(&ClusterConfig::for_test("c", &addrs), None)
    }

    fn addresses(c: &Cluster) -> Vec<String> {
        c.endpoints()
            .iter()
            .map(|e| e.address().to_string())
            .collect()
    }

    fn ready(c: &Cluster) -> Vec<String> {
        let snapshot = c.snapshot();
        let mut r: Vec<String> = snapshot
            .ready()
            .iter()
            .map(|e| e.address().to_string())
            .collect();
        r.sort();
        r
    }

    #[tokio::test]
    async fn an_added_endpoint_joins_and_those_that_stay_keep_their_state() {
        let c = cluster(2);
        let before = c.endpoints();
        let call = before[0].start_call();
        assert_eq!(c.ejected().1, 1);
        let applied = c.apply(Update::Add(vec![endpoint(2, 1), endpoint(3, 1)]));
        assert_eq!(
            applied,
            Applied {
                added: 2,
                removed: 0,
                reweighted: 0
            }
        );
        let after = c.endpoints();
        assert_eq!(addresses(&c).len(), 4);
        assert!(Arc::ptr_eq(&before[0], &after[0]) && Arc::ptr_eq(&before[1], &after[1]));
        assert_eq!(
            after[0].in_flight(),
            1,
            "the call in flight is still counted"
        );
        assert_eq!(ready(&c).len(), 4);
        assert_eq!(c.ejected().1, 2, "half of four may be ejected");
        drop(call);
        // The same endpoints again change nothing.
        assert!(c.apply(Update::Add(vec![endpoint(2, 1)])).is_empty());
    }

    #[tokio::test]
    async fn a_removed_endpoint_takes_no_call_and_a_re_added_one_starts_afresh() {
        let c = cluster(3);
        let gone = c.endpoints()[1].clone();
        let applied = c.apply(Update::Remove(vec![gone.address().into()]));
        assert_eq!(applied.removed, 1);
        assert_eq!(addresses(&c), [addr(0).to_string(), addr(2).to_string()]);
        assert!(!ready(&c).contains(&gone.address().to_string()));
        // A call that picked it from an older snapshot is turned away.
        assert_eq!(gone.try_start_call(100).err(), Some(Refused::Removed));
        assert_eq!(gone.state(Instant::now()), "removed");
        assert!(
            gone.connection().is_shut_down(),
            "not started: shut at once"
        );
        assert!(
            c.apply(Update::Remove(vec![gone.address().into()]))
                .is_empty()
        );
        c.apply(Update::Add(vec![endpoint(1, 1)]));
        let back = c.endpoint(&addr(1).to_string()).unwrap();
        assert!(!Arc::ptr_eq(&back, &gone) && back.id() != gone.id());
        assert!(back.try_start_call(100).is_ok());
        assert_eq!(ready(&c).len(), 3);
    }

    #[tokio::test]
    async fn the_panic_threshold_follows_the_live_set() {
        let c = cluster(4);
        for e in &c.endpoints()[1..] {
            e.set_healthy(false, "test");
        }
        c.rebuild();
        assert!(c.snapshot().is_panic(), "1 of 4 ready is under half");
        c.apply(Update::Remove(vec![
            addr(2).to_string(),
            addr(3).to_string(),
        ]));
        assert!(!c.snapshot().is_panic(), "1 of 2 ready is half");
        assert_eq!(ready(&c), [addr(0).to_string()]);
    }

    #[tokio::test]
    async fn removing_the_last_endpoint_empties_the_cluster_until_one_comes_back() {
        let c = cluster(1);
        c.apply(Update::Remove(vec![addr(0).to_string()]));
        assert!(c.endpoints().is_empty());
        let headers = HeaderMap::new();
        let call = Call::new("/s/m", &headers);
        assert!(c.snapshot().pick(&call, &Tried::default(), None).is_none());
        assert_eq!(c.ejected(), (0, 1), "one may always be ejected");
        c.apply(Update::Reset(vec![endpoint(5, 1)]));
        let snapshot = c.snapshot();
        let picked = snapshot.pick(&call, &Tried::default(), None).unwrap();
        assert_eq!(picked.address(), addr(5).to_string());
    }

    #[tokio::test]
    async fn a_reset_diffs_keeps_and_reweighs_in_place_and_moves_by_placement() {
        let mut config = ClusterConfig::for_test("c", &[addr(0), addr(1), addr(2)]);
        config.strategy = Strategy::Weighted;
        let c = Cluster::new(&config, None);
        let before = c.endpoints();
        let mut zoned = endpoint(2, 1);
        zoned.zone = Some("b".into());
        let applied = c.apply(Update::Reset(vec![endpoint(0, 3), endpoint(1, 1), zoned]));
        assert_eq!(
            applied,
            Applied {
                added: 1,
                removed: 1,
                reweighted: 1
            }
        );
        let after = c.endpoints();
        assert!(
            Arc::ptr_eq(&before[0], &after[0]),
            "a new weight is taken in place"
        );
        assert_eq!(after[0].weight().get(), 3);
        assert!(
            !Arc::ptr_eq(&before[2], &after[2]),
            "a new zone makes a new endpoint"
        );
        assert!(before[2].is_retired());
        // The weighted table follows: 3:1:1 over five picks.
        let headers = HeaderMap::new();
        let call = Call::new("/s/m", &headers);
        let snapshot = c.snapshot();
        let mut first = 0;
        for _ in 0..50 {
            let e = snapshot.pick(&call, &Tried::default(), None).unwrap();
            first += usize::from(e.address() == addr(0).to_string());
        }
        assert_eq!(first, 30);
    }

    #[tokio::test]
    async fn only_the_sessions_pinned_to_a_removed_endpoint_move() {
        let mut config = ClusterConfig::for_test("c", &(0..4).map(addr).collect::<Vec<_>>());
        config.affinity = Some(AffinityConfig::default());
        let c = Cluster::new(&config, None);
        let header = config.affinity.as_ref().unwrap().header.clone();
        let place = |c: &Cluster, key: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header.clone(), key.parse().unwrap());
            let call = Call::new("/s/m", &headers);
            let snapshot = c.snapshot();
            let e = snapshot
                .pick(&call, &Tried::default(), c.affinity())
                .unwrap();
            e.address().to_string()
        };
        let keys: Vec<String> = (0..200).map(|i| format!("session-{i}")).collect();
        let before: Vec<String> = keys.iter().map(|k| place(&c, k)).collect();
        let gone = addr(1).to_string();
        let pinned_there = before.iter().filter(|a| **a == gone).count();
        assert!(
            pinned_there > 20,
            "{pinned_there} of 200 on the endpoint to remove"
        );
        c.apply(Update::Remove(vec![gone.clone()]));
        for (key, was) in keys.iter().zip(&before) {
            let now = place(&c, key);
            if *was == gone {
                assert_ne!(now, gone, "{key} moved off the removed endpoint");
            } else {
                assert_eq!(&now, was, "{key} stayed where it was");
            }
        }
        // Adding an endpoint moves no pinned session either.
        c.apply(Update::Add(vec![endpoint(9, 1)]));
        let after: Vec<String> = keys.iter().map(|k| place(&c, k)).collect();
        for (key, (was, now)) in keys.iter().zip(before.iter().zip(&after)) {
            if *was != gone {
                assert_eq!(now, was, "{key}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_removed_endpoint_drains_its_calls_then_its_tasks_and_connection_end() {
        let c = Arc::new(cluster(2));
        let _control = c.start(Duration::from_secs(30));
        // The start-up connects to closed ports end; the control loop stays.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let alive = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        let before = alive();
        let leaving = c.endpoints()[1].clone();
        let call = leaving.start_call();
        let other = leaving.start_call();
        c.apply(Update::Remove(vec![leaving.address().into()]));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(c.endpoint_task_count(), 1, "its drain waits for the calls");
        assert_eq!(alive(), before + 1, "the drain is the one task more");
        assert!(!leaving.connection().is_shut_down());
        drop(call);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(c.endpoint_task_count(), 1, "one call is still in flight");
        drop(other);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(c.endpoint_task_count(), 0, "drained: nothing of it runs");
        assert_eq!(alive(), before, "no task of it is left in the runtime");
        assert!(leaving.connection().is_shut_down());
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_outlives_the_drain_timeout_is_cut_off() {
        let c = Arc::new(cluster(2));
        let _control = c.start(Duration::from_secs(30));
        let leaving = c.endpoints()[0].clone();
        let _stuck = leaving.start_call();
        c.apply(Update::Remove(vec![leaving.address().into()]));
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert!(!leaving.connection().is_shut_down());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(leaving.connection().is_shut_down());
        assert_eq!(c.endpoint_task_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_added_to_a_running_cluster_joins_after_its_first_connect() {
        let c = Arc::new(cluster(1));
        let _control = c.start(Duration::from_secs(30));
        c.apply(Update::Add(vec![endpoint(7, 1)]));
        let added = c.endpoint(&addr(7).to_string()).unwrap();
        assert!(!added.has_joined());
        assert_eq!(
            ready(&c),
            [addr(0).to_string()],
            "held back while it connects"
        );
        // Nothing listens there: the attempt fails fast, and the endpoint
        // joins, sitting out its connect backoff.
        let joined = async {
            while !added.has_joined() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), joined)
            .await
            .expect("joins once the attempt ends");
        assert_eq!(c.stats().endpoints_added.load(Ordering::Relaxed), 1);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Any sequence of updates: the live set is what the updates say,
        /// one endpoint per address, those that stay are the same
        /// endpoints, removed ones are retired and shut, the ready set is
        /// within the live set and the ejection cap follows its size.
        #[test]
        fn any_sequence_of_updates_keeps_the_set_whole(
            steps in proptest::collection::vec(
                (0u8..3, proptest::collection::vec((0u16..8, 1u32..4), 0..6)),
                1..12,
            )
        ) {
            let c = cluster(3);
            let mut want: Vec<(u16, u32)> = (0..3).map(|i| (i, 1)).collect();
            for (kind, picks) in steps {
                let before = c.endpoints();
                let update = match kind {
                    0 => {
                        want = Vec::new();
                        for &(i, w) in &picks {
                            match want.iter_mut().find(|(j, _)| *j == i) {
                                Some(slot) => slot.1 = w,
                                None => want.push((i, w)),
                            }
                        }
                        Update::Reset(picks.iter().map(|&(i, w)| endpoint(i, w)).collect())
                    }
                    1 => {
                        for &(i, w) in &picks {
                            match want.iter_mut().find(|(j, _)| *j == i) {
                                Some(slot) => slot.1 = w,
                                None => want.push((i, w)),
                            }
                        }
                        Update::Add(picks.iter().map(|&(i, w)| endpoint(i, w)).collect())
                    }
                    _ => {
                        want.retain(|(j, _)| !picks.iter().any(|(i, _)| i == j));
                        Update::Remove(picks.iter().map(|&(i, _)| addr(i).to_string()).collect())
                    }
                };
                c.apply(update);
                let live = c.endpoints();
                // As sets: a reset that only reorders the endpoints changes
                // nothing, and keeps the order they had.
                let mut got: Vec<(String, u32)> =
                    live.iter().map(|e| (e.address().to_string(), e.weight().get())).collect();
                let mut expected: Vec<(String, u32)> =
                    want.iter().map(|&(i, w)| (addr(i).to_string(), w)).collect();
                got.sort();
                expected.sort();
                proptest::prop_assert_eq!(got, expected);
                for e in before.iter() {
                    match live.iter().find(|n| n.address() == e.address()) {
                        Some(n) => proptest::prop_assert!(Arc::ptr_eq(n, e), "an endpoint that stays is kept"),
                        None => proptest::prop_assert!(e.is_retired() && e.connection().is_shut_down()),
                    }
                }
                let snapshot = c.snapshot();
                proptest::prop_assert!(snapshot.ready().iter().all(|r| live.iter().any(|e| Arc::ptr_eq(e, r))));
                proptest::prop_assert_eq!(snapshot.ready().len(), live.len(), "all healthy: all ready");
                proptest::prop_assert_eq!(c.ejected().1, (live.len() / 2).max(1));
            }
        }
    }
}
