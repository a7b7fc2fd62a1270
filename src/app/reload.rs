//! Live reload: the config file read again on SIGHUP and when it changes
//! (a ConfigMap update swaps a symlink in the file's directory, which a
//! watch on that directory sees), validated as `agentmesh check` does, and
//! applied as a diff while calls flow:
//!
//! - a cluster whose endpoints alone changed (addresses, weights) takes an
//!   [`Update::Reset`]: endpoints that stay keep their connections, load,
//!   latency estimates, breakers and pinned sessions;
//! - a cluster with any other change (strategy, split, limits, retry,
//!   health, TLS...) is built again from the new settings, as Envoy rebuilds
//!   a cluster whose definition changed: the new build connects to its
//!   endpoints first, then takes every new call; the old one finishes the
//!   calls it has (up to `listener.drain_timeout`) and is then shut;
//! - a new cluster starts; a removed one drains the same way;
//! - the listeners, `[admin]`, `[mesh]`, `[telemetry]`, `[runtime]`,
//!   `[locality]` and clusters' `local_port`s keep their running values
//!   until a restart; a reload that changes them says so in the log.
//!
//! A file that does not validate is refused with the same errors as
//! `agentmesh check`, logged and counted; the running config stays.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use tokio::time::Instant;

use crate::cluster::{Applied, Cluster, Router, Update};
use crate::config::{ClusterConfig, Config, ConfigError, ConfigErrors};
use crate::telemetry::trace::Traces;
use crate::util::{Task, lock};

/// What started a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// The file (or the symlink it is reached through) changed.
    File,
    /// The admin API's `Reload`.
    Api,
}

/// What reloads have done, for `/stats` and `/metrics`.
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Valid files that changed something.
    pub applied: AtomicU64,
    /// Valid files that changed nothing that a reload applies.
    pub unchanged: AtomicU64,
    /// Files refused: unreadable or invalid.
    pub invalid: AtomicU64,
    /// Reloads by trigger.
    pub by_signal: AtomicU64,
    pub by_file: AtomicU64,
    pub by_api: AtomicU64,
    /// Why the last refused file was refused; cleared by a valid one.
    last_error: Mutex<Option<String>>,
}

impl ReloadStats {
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// What a reload changed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Clusters built again because settings beside their endpoints changed.
    pub rebuilt: Vec<String>,
    /// Clusters whose endpoints alone changed, and how.
    pub endpoints: Vec<(String, Applied)>,
    /// Keys that changed but keep their running values until a restart.
    pub need_restart: Vec<String>,
    /// Holds, weights and splits set through the admin API that the
    /// reload undid.
    pub api_changes_undone: usize,
}

impl std::fmt::Display for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for (what, names) in [
            ("clusters added", &self.added),
            ("clusters removed", &self.removed),
            ("clusters rebuilt", &self.rebuilt),
        ] {
            if !names.is_empty() {
                parts.push(format!("{what}: {}", names.join(", ")));
            }
        }
        for (name, a) in &self.endpoints {
            parts.push(format!(
                "cluster {name}: {} endpoints added, {} removed, {} reweighted",
                a.added, a.removed, a.reweighted
            ));
        }
        if !self.need_restart.is_empty() {
            parts.push(format!(
                "need a restart to apply: {}",
                self.need_restart.join(", ")
            ));
        }
        if self.api_changes_undone > 0 {
            parts.push(format!(
                "undid {} change(s) made through the admin API",
                self.api_changes_undone
            ));
        }
        if parts.is_empty() {
            f.write_str("nothing changed")
        } else {
            f.write_str(&parts.join("; "))
        }
    }
}

impl Changes {
    /// Whether the reload changed anything running.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.rebuilt.is_empty()
            && self.endpoints.is_empty()
    }
}

/// Owns every cluster's tasks and applies new configs to the router.
pub struct Reloader {
    router: Arc<Router>,
    traces: Option<Arc<Traces>>,
    zone: Option<String>,
    drain_timeout: Duration,
    stats: Arc<ReloadStats>,
    /// One reload at a time.
    state: tokio::sync::Mutex<State>,
}

struct State {
    /// The config running: the last valid file's clusters, with the
    /// sections a reload does not change as they were at start.
    config: Config,
    /// The bytes last read from the file, valid or not: a file event that
    /// leaves them as they were is no change.
    last_read: Option<Vec<u8>>,
    /// Each running cluster's tasks, by name.
    tasks: HashMap<String, Vec<Task>>,
    /// Clusters taken out by a reload, finishing their calls.
    retiring: Vec<Task>,
    /// The config file, once [`Reloader::remember`] has named it.
    path: Option<PathBuf>,
}

/// After a cluster leaves the router, calls that found it a moment before
/// have this long to be admitted before its in-flight count is trusted.
const ADMIT_GRACE: Duration = Duration::from_millis(100);

/// File events closer together than this are read as one change (a
/// symlink swap and an editor's save each come as several events).
const SETTLE: Duration = Duration::from_millis(50);

impl Reloader {
    /// Starts every cluster of `router` (built from `config`).
    pub fn start(config: &Config, router: Arc<Router>, traces: Option<Arc<Traces>>) -> Reloader {
        let drain_timeout = config.listener.drain_timeout;
        let mut tasks = HashMap::new();
        for cluster in router.clusters().iter() {
            if let Some(traces) = &traces {
                cluster.set_traces(traces.clone());
            }
            tasks.insert(cluster.name().to_string(), cluster.start(drain_timeout));
        }
        Reloader {
            router,
            traces,
            zone: config.locality.zone.clone(),
            drain_timeout,
            stats: Arc::new(ReloadStats::default()),
            state: tokio::sync::Mutex::new(State {
                config: config.clone(),
                last_read: None,
                tasks,
                retiring: Vec::new(),
                path: None,
            }),
        }
    }

    pub fn stats(&self) -> &Arc<ReloadStats> {
        &self.stats
    }

    /// Remembers the file's bytes now, so that a file event that does not
    /// change them is not taken for a change.
    pub async fn remember(&self, path: &Path) {
        let mut state = self.state.lock().await;
        state.path = Some(path.to_owned());
        if let Ok(bytes) = std::fs::read(path) {
            state.last_read = Some(bytes);
        }
    }

    /// The config file reloads read, if the sidecar was started from one.
    pub async fn path(&self) -> Option<PathBuf> {
        self.state.lock().await.path.clone()
    }

    /// Reads `path` and applies it if valid. A [`Trigger::File`] reload of
    /// bytes already read is no reload (`None`).
    pub async fn reload_file(
        &self,
        path: &Path,
        trigger: Trigger,
    ) -> Option<Result<Changes, ConfigErrors>> {
        let mut state = self.state.lock().await;
        let read = std::fs::read(path);
        if let Ok(bytes) = &read {
            if trigger == Trigger::File && state.last_read.as_ref() == Some(bytes) {
                return None;
            }
            state.last_read = Some(bytes.clone());
        }
        match trigger {
            Trigger::Signal => &self.stats.by_signal,
            Trigger::File => &self.stats.by_file,
            Trigger::Api => &self.stats.by_api,
        }
        .fetch_add(1, Ordering::Relaxed);
        let file_error = |reason: String| {
            ConfigErrors(vec![ConfigError {
                file: path.to_owned(),
                key: "(file)".into(),
                reason,
            }])
        };
        let parsed = match read {
            Err(e) => Err(file_error(format!("cannot read: {e}"))),
            Ok(bytes) => match String::from_utf8(bytes) {
                Err(_) => Err(file_error("is not UTF-8".into())),
                Ok(text) => Config::parse(path, &text, &|name| std::env::var(name).ok()),
            },
        };
        Some(match parsed {
            Ok(config) => {
                let mut changes = self.apply_locked(&mut state, config).await;
                // A reload gives back what the config says: the admin
                // API's holds, weights and splits end.
                let undone: usize = self
                    .router
                    .clusters()
                    .iter()
                    .map(|c| c.undo_api_changes())
                    .sum();
                if undone > 0 {
                    tracing::info!(
                        undone,
                        "the reload undid the changes made through the admin API"
                    );
                }
                changes.api_changes_undone = undone;
                Ok(changes)
            }
            Err(errors) => {
                self.stats.invalid.fetch_add(1, Ordering::Relaxed);
                *lock(&self.stats.last_error) = Some(errors.to_string());
                for error in &errors.0 {
                    tracing::error!(?trigger, %error, "config reload refused; the running config stays");
                }
                Err(errors)
            }
        })
    }

    /// Applies a valid config (see the module doc).
    pub async fn apply(&self, config: Config) -> Changes {
        let mut state = self.state.lock().await;
        self.apply_locked(&mut state, config).await
    }

    async fn apply_locked(&self, state: &mut State, mut new: Config) -> Changes {
        *lock(&self.stats.last_error) = None;
        let mut changes = Changes {
            need_restart: need_restart(&state.config, &new),
            ..Changes::default()
        };
        // What a reload does not change keeps its running value, so that
        // a cluster's settings derived from it (mesh_load) stay too.
        new.set_mesh(state.config.mesh.clone());
        let current = self.router.clusters();
        let mut next = Vec::with_capacity(new.clusters.len());
        let mut fresh = Vec::new();
        let mut retire = Vec::new();
        for config in &new.clusters {
            let name = config.name.clone();
            match current.iter().find(|c| c.name() == name) {
                Some(running) if same_but_endpoints(running.config(), config) => {
                    if config.dns.is_none() {
                        let applied = running.apply(Update::Reset(config.endpoints.clone()));
                        if !applied.is_empty() {
                            changes.endpoints.push((name, applied));
                        }
                    }
                    next.push(running.clone());
                }
                Some(running) => {
                    let mut config = config.clone();
                    if config.dns.is_some() && config.dns == running.config().dns {
                        // Start from what discovery found, not from nothing.
                        config.endpoints = running.endpoints().iter().map(|e| e.config()).collect();
                    }
                    let tasks = state.tasks.remove(&name).unwrap_or_default();
                    retire.push((running.clone(), tasks));
                    let cluster = self.build(&config, state);
                    fresh.push(cluster.clone());
                    next.push(cluster);
                    changes.rebuilt.push(name);
                }
                None => {
                    let cluster = self.build(config, state);
                    fresh.push(cluster.clone());
                    next.push(cluster);
                    changes.added.push(name);
                }
            }
        }
        for running in current.iter() {
            if !new.clusters.iter().any(|c| c.name == running.name()) {
                let tasks = state.tasks.remove(running.name()).unwrap_or_default();
                retire.push((running.clone(), tasks));
                changes.removed.push(running.name().to_string());
            }
        }
        // New builds connect before they take calls.
        join_all(fresh.iter().map(warm)).await;
        self.router.install(next);
        state.retiring.retain(|t| !t.is_finished());
        for (cluster, tasks) in retire {
            let timeout = self.drain_timeout;
            state
                .retiring
                .push(Task::spawn(retire_cluster(cluster, tasks, timeout)));
        }
        // Sections a reload does not change stay as they run.
        let running = std::mem::replace(&mut state.config, new);
        let config = &mut state.config;
        config.listener = running.listener;
        config.admin = running.admin;
        config.locality = running.locality;
        config.runtime = running.runtime;
        config.telemetry = running.telemetry;
        for c in &mut config.clusters {
            c.local_port = running
                .clusters
                .iter()
                .find(|r| r.name == c.name)
                .and_then(|r| r.local_port);
        }

        if changes.is_empty() {
            self.stats.unchanged.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.applied.fetch_add(1, Ordering::Relaxed);
        }
        let endpoints: Vec<String> = changes
            .endpoints
            .iter()
            .map(|(c, a)| format!("{c}: +{} -{} ~{} weights", a.added, a.removed, a.reweighted))
            .collect();
        tracing::info!(
            added = ?changes.added,
            removed = ?changes.removed,
            rebuilt = ?changes.rebuilt,
            endpoints = ?endpoints,
            "config reloaded"
        );
        if !changes.need_restart.is_empty() {
            tracing::warn!(keys = ?changes.need_restart, "these settings changed in the file but keep their running values until a restart");
        }
        changes
    }

    /// A new cluster, started, its tasks owned here.
    fn build(&self, config: &ClusterConfig, state: &mut State) -> Arc<Cluster> {
        let cluster = Arc::new(Cluster::new(config, self.zone.as_deref()));
        if let Some(traces) = &self.traces {
            cluster.set_traces(traces.clone());
        }
        let tasks = cluster.start(self.drain_timeout);
        state.tasks.insert(config.name.clone(), tasks);
        cluster
    }

    /// Stops every cluster's tasks (at shutdown, after the drain).
    pub async fn stop(&self) {
        let mut state = self.state.lock().await;
        for task in std::mem::take(&mut state.retiring) {
            task.stop().await;
        }
        for (_, tasks) in state.tasks.drain() {
            for task in tasks {
                task.stop().await;
            }
        }
    }

    /// Reloads on every SIGHUP, for the sidecar's life.
    pub async fn on_signal(self: Arc<Self>, path: PathBuf) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot take SIGHUP; reloads come from file changes only");
                return;
            }
        };
        while hangup.recv().await.is_some() {
            tracing::info!(config = %path.display(), "SIGHUP: reloading the config");
            self.reload_file(&path, Trigger::Signal).await;
        }
    }

    /// Reloads when the file changes: its directory is watched (inotify),
    /// so that an edit in place, a rename over it and a swap of the
    /// symlink it is reached through are all seen. Without a watch (the
    /// system's limit reached), the file is read every second instead.
    pub async fn on_change(self: Arc<Self>, path: PathBuf) {
        use notify::Watcher as _;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok() {
                let _ = tx.try_send(());
            }
        })
        .and_then(|mut w| {
            w.watch(&dir, notify::RecursiveMode::NonRecursive)?;
            Ok(w)
        });
        let _watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config's directory; reading the file every second instead");
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    self.reload_file(&path, Trigger::File).await;
                }
            }
        };
        while rx.recv().await.is_some() {
            tokio::time::sleep(SETTLE).await;
            while rx.try_recv().is_ok() {}
            self.reload_file(&path, Trigger::File).await;
        }
    }
}

/// Whether two builds of a cluster differ in their endpoints at most.
fn same_but_endpoints(a: &ClusterConfig, b: &ClusterConfig) -> bool {
    let strip = |c: &ClusterConfig| ClusterConfig {
        endpoints: Vec::new(),
        ..c.clone()
    };
    strip(a) == strip(b)
}

/// The keys of `new` that differ from `running` but are not reloaded.
fn need_restart(running: &Config, new: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    let mut differs = |key: &str, changed: bool| {
        if changed {
            keys.push(key.to_string());
        }
    };
    differs("listener", running.listener != new.listener);
    differs("admin", running.admin != new.admin);
    differs("locality", running.locality != new.locality);
    differs("runtime", running.runtime != new.runtime);
    differs("mesh", running.mesh != new.mesh);
    differs("telemetry", running.telemetry != new.telemetry);
    for (i, c) in new.clusters.iter().enumerate() {
        let was = running
            .clusters
            .iter()
            .find(|r| r.name == c.name)
            .and_then(|r| r.local_port);
        if c.local_port != was {
            keys.push(format!("cluster[{i}].local_port"));
        }
    }
    keys
}

/// Connects to a new build's endpoints, each for up to its connect
/// timeout, before the build takes calls (a failed endpoint sits out its
/// backoff, as at start).
async fn warm(cluster: &Arc<Cluster>) {
    let timeout = cluster.config().connect_timeout;
    let endpoints = cluster.endpoints();
    join_all(endpoints.iter().map(|e| {
        let connect = e.connection().connect_boxed();
        async move {
            let _ = tokio::time::timeout(timeout, connect).await;
        }
    }))
    .await;
}

/// Takes a cluster out of service once the router no longer finds it:
/// waits for its calls in flight (retries included) to end, up to
/// `timeout`, then removes its endpoints (which closes their connections)
/// and stops its tasks.
async fn retire_cluster(cluster: Arc<Cluster>, tasks: Vec<Task>, timeout: Duration) {
    tokio::time::sleep(ADMIT_GRACE).await;
    let deadline = Instant::now() + timeout;
    while cluster.in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = cluster.in_flight();
    if left > 0 {
        tracing::warn!(
            cluster = cluster.name(),
            calls = left,
            ?timeout,
            "a cluster taken out by a reload still had calls in flight at the drain timeout; closing its connections"
        );
    }
    cluster.close().await;
    for task in tasks {
        task.stop().await;
    }
    tracing::debug!(
        cluster = cluster.name(),
        "the old build of a reloaded cluster is shut"
    );
}
