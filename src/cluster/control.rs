//! The cluster's control loop: rebuilds the picker's snapshot when an
//! endpoint's readiness changes or a sitting-out endpoint's time is up,
//! and sweeps expired sessions.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::Cluster;
use crate::balance::Snapshot;
use crate::config::ClusterConfig;
use crate::endpoint::Endpoint;
use crate::util::{Task, lock};

impl Cluster {
    /// Starts the cluster: every endpoint's tasks (a health checker when
    /// configured, a background connect), the control loop, DNS discovery
    /// and the TLS file watcher, whose tasks are returned to the caller to
    /// own. Endpoints removed later have
    /// `drain_timeout` to finish their calls.
    pub(crate) fn start(self: &Arc<Self>, drain_timeout: Duration) -> Vec<Task> {
        {
            let mut members = lock(&self.members);
            members.start(drain_timeout);
            for endpoint in self.endpoints.load().iter() {
                // Connect to every endpoint up front, so that the first
                // calls find connections ready (calls pass over endpoints
                // still connecting).
                endpoint.connection().warm();
                let tasks = self.endpoint_tasks(endpoint, false);
                members.own(endpoint.address(), tasks);
            }
        }
        let cluster = self.clone();
        let control = Task::supervised("cluster control loop", move || cluster.clone().run());
        let mut tasks = vec![control];
        if let Some(dns) = &self.config.dns {
            let (cluster, dns) = (self.clone(), dns.clone());
            tasks.push(Task::supervised("DNS discovery", move || {
                cluster.clone().discover(dns.clone())
            }));
        }
        if !self.config.match_names.is_empty() {
            let cluster = self.clone();
            tasks.push(Task::supervised("match resolver", move || {
                cluster.clone().resolve_matches()
            }));
        }
        if let Some(k) = &self.config.kubernetes {
            let (cluster, k) = (self.clone(), k.clone());
            tasks.push(Task::supervised("Kubernetes discovery", move || {
                cluster.clone().watch_kubernetes(k.clone())
            }));
        }
        if let Some(tls) = &self.tls {
            let tls = tls.clone();
            tasks.push(Task::supervised("TLS file watcher", move || {
                tls.clone().watch()
            }));
        }
        tasks
    }

    /// Rebuilds the snapshot from the endpoints' readiness now.
    pub fn rebuild(&self) {
        let _one_at_a_time = lock(&self.rebuilding);
        let live = self.endpoints.load();
        // Endpoints still joining stay out, unless no other is left.
        let joined: Vec<Arc<Endpoint>>;
        let set: &[Arc<Endpoint>] = if live.iter().all(|e| e.has_joined()) {
            &live
        } else {
            joined = live.iter().filter(|e| e.has_joined()).cloned().collect();
            if joined.is_empty() { &live } else { &joined }
        };
        let with_split;
        let config = match &*lock(&self.split_by_api) {
            Some(split) => {
                with_split = ClusterConfig {
                    split: split.clone(),
                    ..self.config.clone()
                };
                &with_split
            }
            None => &self.config,
        };
        let snapshot = Snapshot::build(config, self.local_zone.as_deref(), set, Instant::now());
        let ready = snapshot.ready().len();
        let was = self.snapshot.load();
        if snapshot.is_panic() && !was.is_panic() {
            self.stats.panics.fetch_add(1, Ordering::Relaxed);
            let healthy = set.iter().filter(|e| e.is_ready(Instant::now())).count();
            tracing::warn!(cluster = %self.name, healthy, total = set.len(), threshold = self.config.panic_threshold, "too few endpoints are healthy: balancing over all of them (panic mode)");
        } else if was.is_panic() && !snapshot.is_panic() {
            tracing::info!(cluster = %self.name, ready, "enough endpoints are healthy again; panic mode over");
        } else if ready != was.ready().len() {
            tracing::info!(cluster = %self.name, ready, total = set.len(), "ready endpoints changed");
        }
        drop(was);
        self.snapshot.store(Arc::new(snapshot));
    }

    /// The loop itself; runs until its task is dropped.
    async fn run(self: Arc<Self>) {
        let sweep_every = self.affinity.as_ref().map(|a| a.sweep_every());
        let mut next_sweep = sweep_every.map(|d| Instant::now() + d);
        loop {
            let wake = self
                .endpoints
                .load()
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
            for e in self.endpoints.load().iter() {
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
