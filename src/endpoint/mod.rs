//! An endpoint: one address of a cluster, with its pooled connection, the
//! load it carries and whether it can be reached.
//!
//! An `Endpoint` lives as long as the address stays in its cluster. Pickers
//! see endpoints through short-lived snapshots, so the counters and
//! estimates here survive every rebuild of a picker. When its cluster drops
//! the address, the endpoint is *retired*: it takes no new call, its calls
//! in flight finish ([`Endpoint::drained`]), then its connection is shut.

pub mod breaker;
mod connection;
pub mod health;
mod load;
mod outcome;
pub mod tls;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::time::Instant;

pub use breaker::EjectionBudget;
pub use connection::{ConnectError, Connection, Sender, Timeouts};
pub use load::{Keep, Load, WindowSummary};
pub use outcome::{FailureClasses, Outcome};

use crate::config::{ClusterConfig, EndpointConfig};
use crate::telemetry::calls::Calls;
use crate::util::lock;
use breaker::{Breaker, Transition};
use tls::Tls;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub struct Endpoint {
    id: u64,
    address: Arc<str>,
    /// Never 0; changes in place when an update gives the address a new
    /// weight.
    weight: AtomicU32,
    zone: Option<Arc<str>>,
    priority: u32,
    version: Option<Arc<str>>,
    connection: Connection,
    load: Load,
    stats: Stats,
    /// Outcomes and durations of the calls that ended here.
    calls: Calls,
    breaker: Mutex<Breaker>,
    /// The breaker is closed: the hot path need not lock it to admit a call.
    breaker_closed: AtomicBool,
    failures_count: FailureClasses,
    budget: Arc<EjectionBudget>,
    /// As the active health checker last judged it; true without checks.
    healthy: AtomicBool,
    /// The newest connect attempt whose failure the breaker has counted.
    connect_failure_seen: AtomicU64,
    /// Rung on every change of readiness, so the cluster rebuilds its picker.
    changed: Arc<Notify>,
    /// Taken out of its cluster: no new call, and its outcomes no longer
    /// count against the cluster's ejection budget.
    retired: AtomicBool,
    /// In the picker's set. An endpoint added to a running cluster joins
    /// once its first connect attempt has ended.
    joined: AtomicBool,
    /// Rung when a retired endpoint's last call ends.
    idle: Notify,
    /// An operator's drain, eject or failover (admin API), if any; `held`
    /// says whether there is one, so that readiness need not lock.
    hold: Mutex<Option<Hold>>,
    held: AtomicBool,
    /// The weight its cluster's config or discovery gave it; `weight`
    /// differs while the admin API has set another.
    configured_weight: AtomicU32,
    weight_by_api: AtomicBool,
}

/// What an operator's hold does: every kind keeps the endpoint out of the
/// picks while its calls in flight finish; a failover is also reported to
/// the mesh's peers as this sidecar's own ejection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldKind {
    Drain,
    Eject,
    Failover,
}

impl HoldKind {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldKind::Drain => "drain",
            HoldKind::Eject => "eject",
            HoldKind::Failover => "failover",
        }
    }

    /// The endpoint's state while held.
    fn state(self) -> &'static str {
        match self {
            HoldKind::Drain => "drained",
            HoldKind::Eject => "ejected by admin",
            HoldKind::Failover => "failover",
        }
    }
}

/// An operator's hold on an endpoint, until a time or until restored.
#[derive(Clone, Debug)]
pub struct Hold {
    pub kind: HoldKind,
    pub until: Option<Instant>,
    /// Who asked (the admin caller's address).
    pub by: String,
}

/// Counters kept for display; all relaxed atomics.
#[derive(Default)]
struct Stats {
    calls: AtomicU64,
    failures: AtomicU64,
    ejections: AtomicU64,
    spared: AtomicU64,
    unhealthy: AtomicU64,
    full: AtomicU64,
    mesh_ejections: AtomicU64,
    health_passed: AtomicU64,
    health_failed: AtomicU64,
}

/// What one endpoint has seen, copied out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatsSnapshot {
    pub in_flight: u64,
    pub calls: u64,
    pub failures: u64,
    pub connect_failures: u64,
    pub connections_opened: u64,
    /// Times the breaker opened (consecutive failures or error rate).
    pub ejections: u64,
    /// Times it would have opened but the cluster's ejection cap said no.
    pub spared: u64,
    /// Times the health checker marked the endpoint unhealthy.
    pub marked_unhealthy: u64,
    /// Calls that passed the endpoint over because it was at its limit.
    pub full: u64,
    /// Of `ejections`, those a peer's report made (see [`crate::mesh`]).
    pub mesh_ejections: u64,
    /// Active health checks passed and failed.
    pub health_passed: u64,
    pub health_failed: u64,
    /// Peers' calls in flight here, as the mesh last reported (0 without
    /// one).
    pub mesh_in_flight: f64,
    /// `ready`, `unhealthy`, `ejected`, `probing`, `unreachable`,
    /// `joining`, `removed`, or an operator's hold: `drained`, `ejected by
    /// admin`, `failover`.
    pub state: &'static str,
}

impl Endpoint {
    /// An endpoint of `cluster`, keeping the load estimates its strategy
    /// reads.
    pub fn new(
        config: &EndpointConfig,
        cluster: &ClusterConfig,
        changed: Arc<Notify>,
        budget: Arc<EjectionBudget>,
        tls: Option<Arc<Tls>>,
    ) -> Endpoint {
        let keep = Keep::for_strategy(cluster.strategy);
        Self::keeping(config, cluster, changed, budget, keep, tls)
    }

    /// As [`Endpoint::new`], keeping the estimates `keep` names.
    pub(crate) fn keeping(
        config: &EndpointConfig,
        cluster: &ClusterConfig,
        changed: Arc<Notify>,
        budget: Arc<EjectionBudget>,
        keep: Keep,
        tls: Option<Arc<Tls>>,
    ) -> Endpoint {
        let address: Arc<str> = config.address.as_str().into();
        Endpoint {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            connection: Connection::new(
                address.clone(),
                Timeouts {
                    connect: cluster.connect_timeout,
                    idle: cluster.idle_timeout,
                    keepalive_interval: cluster.keepalive_interval,
                    keepalive_timeout: cluster.keepalive_timeout,
                },
                tls,
                changed.clone(),
            ),
            breaker: Mutex::new(Breaker::new(
                &cluster.breaker,
                cluster.outlier.as_ref(),
                Instant::now(),
            )),
            breaker_closed: AtomicBool::new(true),
            failures_count: cluster.breaker.failures,
            budget,
            healthy: AtomicBool::new(true),
            connect_failure_seen: AtomicU64::new(0),
            changed,
            address,
            weight: AtomicU32::new(config.weight.get()),
            retired: AtomicBool::new(false),
            joined: AtomicBool::new(true),
            idle: Notify::new(),
            hold: Mutex::new(None),
            held: AtomicBool::new(false),
            configured_weight: AtomicU32::new(config.weight.get()),
            weight_by_api: AtomicBool::new(false),
            zone: config.zone.as_deref().map(Arc::from),
            priority: config.priority,
            version: config.version.as_deref().map(Arc::from),
            load: Load::new(&cluster.latency, &cluster.performance, keep),
            stats: Stats::default(),
            calls: Calls::default(),
        }
    }

    /// A process-unique id, stable for the endpoint's life.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// The address, shared (for a span's attributes, without a copy).
    pub fn address_shared(&self) -> &Arc<str> {
        &self.address
    }

    pub fn weight(&self) -> NonZeroU32 {
        NonZeroU32::new(self.weight.load(Ordering::Relaxed)).unwrap_or(NonZeroU32::MIN)
    }

    /// Gives the endpoint a new configured weight (an update of its
    /// cluster's endpoints); returns whether the weight in force changed
    /// (it does not while the admin API's weight stands).
    pub fn set_weight(&self, weight: NonZeroU32) -> bool {
        self.configured_weight
            .store(weight.get(), Ordering::Relaxed);
        if self.weight_by_api.load(Ordering::Relaxed) {
            return false;
        }
        self.weight.swap(weight.get(), Ordering::Relaxed) != weight.get()
    }

    /// Whether `config` names this endpoint in the same place (zone,
    /// priority, version): an update that moves it makes a new endpoint.
    pub fn is_placed_as(&self, config: &EndpointConfig) -> bool {
        *self.address == *config.address
            && self.zone.as_deref() == config.zone.as_deref()
            && self.priority == config.priority
            && self.version.as_deref() == config.version.as_deref()
    }

    /// The endpoint as config describes it.
    pub fn config(&self) -> EndpointConfig {
        EndpointConfig {
            address: self.address.to_string(),
            weight: self.weight(),
            zone: self.zone.as_deref().map(String::from),
            priority: self.priority,
            version: self.version.as_deref().map(String::from),
        }
    }

    /// Whether the endpoint is in the picker's set (see [`Endpoint::join`]).
    pub fn has_joined(&self) -> bool {
        self.joined.load(Ordering::Acquire)
    }

    /// Keeps a new endpoint out of the picker until [`Endpoint::join`].
    pub fn hold_back(&self) {
        self.joined.store(false, Ordering::Release);
    }

    /// Puts a held-back endpoint in the picker's set.
    pub fn join(&self) {
        if !self.joined.swap(true, Ordering::AcqRel) {
            self.changed.notify_one();
        }
    }

    /// Takes the endpoint out of its cluster: it takes no new call, gives
    /// back any ejection it held, and its outcomes no longer feed its
    /// breaker. [`Endpoint::drained`] then waits for its calls.
    pub fn retire(&self) {
        if !self.retired.swap(true, Ordering::SeqCst) {
            self.with_breaker(|b| b.reset(&self.budget));
        }
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// Counts a call finished, and tells a draining endpoint's drain when
    /// it was the last.
    fn leave(&self) {
        if self.load.leave() == 0 && self.is_retired() {
            self.idle.notify_one();
        }
    }

    /// Waits until a retired endpoint carries no call, or `deadline`
    /// passes; returns the calls still in flight (0: drained).
    pub async fn drained(&self, deadline: Instant) -> u64 {
        // A call that ends between the count and the wait leaves a permit
        // in `idle` (see `leave`), so no wake-up is lost.
        loop {
            if self.in_flight() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, self.idle.notified())
                .await
                .is_err()
            {
                return self.in_flight();
            }
        }
    }

    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }

    pub fn priority(&self) -> u32 {
        self.priority
    }

    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Outcomes and durations of the calls that ended here.
    pub fn calls(&self) -> &Calls {
        &self.calls
    }

    /// One active health check's result, counted.
    pub fn health_checked(&self, passed: bool) {
        let counter = if passed {
            &self.stats.health_passed
        } else {
            &self.stats.health_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn load(&self) -> &Load {
        &self.load
    }

    pub fn in_flight(&self) -> u64 {
        self.load.in_flight()
    }

    /// Whether the endpoint may take calls now: it is healthy, its breaker
    /// is not open, and it is not sitting out a connect failure.
    pub fn is_ready(&self, now: Instant) -> bool {
        self.is_healthy()
            && self.is_admitting()
            && self.connection.is_reachable(now)
            && self.hold(now).is_none()
    }

    /// Whether the endpoint is up apart from its health and breaker: it is
    /// not sitting out a failed connect, nor held by an operator. Panic
    /// mode still uses such endpoints.
    pub fn is_reachable(&self, now: Instant) -> bool {
        self.connection.is_reachable(now) && self.hold(now).is_none()
    }

    /// The operator's hold in force at `now`, if any (one that has run out
    /// is dropped here).
    pub fn hold(&self, now: Instant) -> Option<Hold> {
        if !self.held.load(Ordering::Acquire) {
            return None;
        }
        let mut hold = lock(&self.hold);
        if hold
            .as_ref()
            .and_then(|h| h.until)
            .is_some_and(|t| t <= now)
        {
            let ended = hold.take();
            self.held.store(false, Ordering::Release);
            if let Some(h) = ended {
                tracing::info!(endpoint = %self.address, kind = h.kind.as_str(), by = %h.by, "the operator's hold on the endpoint is over");
            }
        }
        hold.clone()
    }

    /// Holds the endpoint out of the picks (admin API) until `until`, or
    /// until [`Endpoint::restore`]; replaces any hold before it.
    pub fn set_hold(&self, hold: Hold) {
        *lock(&self.hold) = Some(hold);
        self.held.store(true, Ordering::Release);
        self.changed.notify_one();
    }

    /// Ends an operator's hold and gives back the configured weight if
    /// the API had set another; returns whether anything changed.
    pub fn restore(&self) -> bool {
        let held = lock(&self.hold).take().is_some();
        self.held.store(false, Ordering::Release);
        let mut changed = held;
        if self.weight_by_api.swap(false, Ordering::Relaxed) {
            let configured = self.configured_weight.load(Ordering::Relaxed);
            changed |= self.weight.swap(configured, Ordering::Relaxed) != configured;
        }
        if changed {
            self.changed.notify_one();
        }
        changed
    }

    /// Sets the weight through the admin API (a config reload gives back
    /// the configured one).
    pub fn set_weight_by_api(&self, weight: NonZeroU32) {
        self.weight_by_api.store(true, Ordering::Relaxed);
        if self.weight.swap(weight.get(), Ordering::Relaxed) != weight.get() {
            self.changed.notify_one();
        }
    }

    /// Whether the weight in force was set through the admin API.
    pub fn weight_set_by_api(&self) -> bool {
        self.weight_by_api.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// The breaker is closed or half-open.
    fn is_admitting(&self) -> bool {
        self.breaker_closed.load(Ordering::Acquire) || lock(&self.breaker).open_until().is_none()
    }

    /// When something that keeps the endpoint out ends by itself: a
    /// connect backoff, or an open breaker's interval.
    pub fn ready_at(&self) -> Option<Instant> {
        let breaker = if self.breaker_closed.load(Ordering::Acquire) {
            None
        } else {
            lock(&self.breaker).open_until()
        };
        let hold = if self.held.load(Ordering::Acquire) {
            lock(&self.hold).as_ref().and_then(|h| h.until)
        } else {
            None
        };
        [self.connection.reachable_at(), breaker, hold]
            .into_iter()
            .flatten()
            .min()
    }

    /// Moves an open breaker whose time is up to half-open; the cluster's
    /// control loop calls this when [`Endpoint::ready_at`] comes.
    pub fn poll_breaker(&self, now: Instant) {
        if self.breaker_closed.load(Ordering::Acquire) {
            return;
        }
        let t = self.with_breaker(|b| b.poll(now));
        self.apply(t);
    }

    /// Counts a call as sent, unless the endpoint already carries `max`
    /// calls or its breaker admits none now; the returned guard counts the
    /// call finished on drop.
    pub fn try_start_call(self: &Arc<Self>, max: u32) -> Result<InFlight, Refused> {
        self.enter(max, true)
    }

    /// As [`Endpoint::try_start_call`], but an open breaker (or a half-open
    /// one whose probe is out) does not refuse the call: panic mode, when
    /// too few endpoints take calls, sends them to every reachable one
    /// (Envoy's panic threshold). A half-open breaker still gets its probe.
    pub fn try_start_call_in_panic(self: &Arc<Self>, max: u32) -> Result<InFlight, Refused> {
        self.enter(max, false)
    }

    fn enter(self: &Arc<Self>, max: u32, heed_breaker: bool) -> Result<InFlight, Refused> {
        if !self.load.try_enter(u64::from(max)) {
            self.stats.full.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::Full);
        }
        // After counting the call: either this sees the endpoint retired,
        // or its drain sees this call in flight (see `retire`).
        if self.is_retired() {
            self.leave();
            return Err(Refused::Removed);
        }
        let probe = if self.breaker_closed.load(Ordering::Acquire) {
            false
        } else {
            match self.with_breaker(Breaker::admit) {
                Some(probe) => probe,
                None if !heed_breaker => false,
                None => {
                    self.leave();
                    return Err(Refused::Breaker);
                }
            }
        };
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        Ok(InFlight {
            endpoint: self.clone(),
            sent: Instant::now(),
            probe,
            recorded: false,
            unsent: false,
        })
    }

    /// Counts a call as sent regardless of limits (tests of pickers).
    #[cfg(test)]
    pub fn start_call(self: &Arc<Self>) -> InFlight {
        self.try_start_call(u32::MAX)
            .expect("a closed breaker admits every call")
    }

    /// A connect attempt failed; counted once per attempt, however many
    /// calls waited on it.
    pub fn connect_failed(&self, error: &ConnectError) {
        if self
            .connect_failure_seen
            .fetch_max(error.attempt, Ordering::AcqRel)
            < error.attempt
        {
            self.record(Outcome::Connect, true, Instant::now());
        }
    }

    /// Feeds an outcome to the breaker; only `settles` outcomes (a probe's,
    /// a connect's) may end a half-open state.
    fn record(&self, outcome: Outcome, settles: bool, now: Instant) {
        if self.is_retired() || matches!(outcome, Outcome::Excused(_)) {
            return;
        }
        let failed = self.failures_count.contains(outcome);
        let t = self.with_breaker(|b| b.record(failed, settles, now, &self.budget));
        self.apply(t);
    }

    /// Runs `f` on the breaker and publishes whether it is closed, under
    /// one lock, so that the flag the hot path reads never disagrees with
    /// the state.
    fn with_breaker<R>(&self, f: impl FnOnce(&mut Breaker) -> R) -> R {
        let mut breaker = lock(&self.breaker);
        let out = f(&mut breaker);
        self.breaker_closed
            .store(breaker.state() == breaker::State::Closed, Ordering::Release);
        out
    }

    /// The health checker's verdict changed.
    pub fn set_healthy(&self, healthy: bool, reason: &str) {
        if self.healthy.swap(healthy, Ordering::AcqRel) == healthy {
            return;
        }
        if healthy {
            tracing::info!(endpoint = %self.address, reason, "endpoint healthy again");
            // Envoy's `successful_active_health_check_uneject_host`: an
            // endpoint that passes its checks again starts afresh.
            let t = self.with_breaker(|b| b.reset(&self.budget));
            self.apply(t);
            self.connection.forget_failures();
        } else {
            self.stats.unhealthy.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(endpoint = %self.address, reason, "endpoint unhealthy; taking it out");
        }
        self.changed.notify_one();
    }

    /// A peer reports the endpoint ejected until `until` (see
    /// [`Breaker::eject_by_peer`]); logged with the peer that reported it.
    /// Returns whether it was taken out.
    pub fn eject_by_peer(&self, until: Instant, peer: &str, reason: &str) -> bool {
        if self.is_retired() || !self.breaker_closed.load(Ordering::Acquire) {
            return false;
        }
        let why = format!("peer {peer} reports: {reason}");
        let t = self.with_breaker(|b| b.eject_by_peer(until, why, &self.budget));
        match t {
            Some(Transition::Opened { open_for, .. }) => {
                self.stats.ejections.fetch_add(1, Ordering::Relaxed);
                self.stats.mesh_ejections.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(endpoint = %self.address, peer, reason, ?open_for, "a peer ejected the endpoint; taking it out here too for the rest of the peer's interval");
                self.changed.notify_one();
                true
            }
            Some(Transition::Spared { .. }) => {
                self.stats.spared.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(endpoint = %self.address, peer, reason, "a peer ejected the endpoint, but the cluster's max_ejection_percent is reached; keeping it");
                false
            }
            _ => false,
        }
    }

    /// What this sidecar's own checks say keeps the endpoint out, for its
    /// peers: its breaker, opened by its own calls, until when and why; or
    /// failing health checks.
    pub fn own_verdict(&self) -> Option<OwnVerdict> {
        if let Some(hold) = self.hold(Instant::now())
            && hold.kind == HoldKind::Failover
        {
            return Some(OwnVerdict {
                unhealthy: false,
                until: hold.until,
                reason: format!("failover drill (asked by {})", hold.by),
            });
        }
        if !self.is_healthy() {
            return Some(OwnVerdict {
                unhealthy: true,
                until: None,
                reason: "active health checks fail".into(),
            });
        }
        if self.breaker_closed.load(Ordering::Acquire) {
            return None;
        }
        let breaker = lock(&self.breaker);
        let (until, reason) = breaker.own_verdict()?;
        Some(OwnVerdict {
            unhealthy: false,
            until: Some(until),
            reason: reason.to_string(),
        })
    }

    /// Logs, counts and announces a breaker transition.
    fn apply(&self, t: Option<Transition>) {
        let Some(t) = t else { return };
        match &t {
            Transition::Opened { reason, open_for } => {
                self.stats.ejections.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(endpoint = %self.address, reason, ?open_for, "circuit breaker opened; ejecting the endpoint");
            }
            Transition::Spared { reason } => {
                self.stats.spared.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(endpoint = %self.address, reason, max_ejected = self.budget.max(), "circuit breaker would open, but the cluster's max_ejection_percent is reached; keeping the endpoint");
            }
            Transition::HalfOpened => {
                tracing::info!(endpoint = %self.address, "circuit breaker half-open; probing the endpoint")
            }
            Transition::Closed => {
                tracing::info!(endpoint = %self.address, "circuit breaker closed; the endpoint is back")
            }
        }
        if !matches!(t, Transition::Spared { .. }) {
            self.changed.notify_one();
        }
    }

    /// What the endpoint's state is now, in a word.
    pub fn state(&self, now: Instant) -> &'static str {
        if self.is_retired() {
            "removed"
        } else if !self.has_joined() {
            "joining"
        } else if let Some(hold) = self.hold(now) {
            hold.kind.state()
        } else if !self.is_healthy() {
            "unhealthy"
        } else if !self.breaker_closed.load(Ordering::Acquire) {
            match lock(&self.breaker).state() {
                breaker::State::Open { .. } => "ejected",
                _ => "probing",
            }
        } else if !self.connection.is_reachable(now) {
            "unreachable"
        } else {
            "ready"
        }
    }

    pub fn stats(&self) -> StatsSnapshot {
        StatsSnapshot {
            in_flight: self.load.in_flight(),
            calls: self.stats.calls.load(Ordering::Relaxed),
            failures: self.stats.failures.load(Ordering::Relaxed),
            connect_failures: self.connection.failures(),
            connections_opened: self.connection.opened(),
            ejections: self.stats.ejections.load(Ordering::Relaxed),
            spared: self.stats.spared.load(Ordering::Relaxed),
            marked_unhealthy: self.stats.unhealthy.load(Ordering::Relaxed),
            full: self.stats.full.load(Ordering::Relaxed),
            mesh_ejections: self.stats.mesh_ejections.load(Ordering::Relaxed),
            health_passed: self.stats.health_passed.load(Ordering::Relaxed),
            health_failed: self.stats.health_failed.load(Ordering::Relaxed),
            mesh_in_flight: self.load.mesh_in_flight(),
            state: self.state(Instant::now()),
        }
    }
}

/// Why this sidecar keeps an endpoint out (see [`Endpoint::own_verdict`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnVerdict {
    pub unhealthy: bool,
    /// When the breaker turns half-open; `None` for health checks, which
    /// last until a check passes.
    pub until: Option<Instant>,
    pub reason: String,
}

/// Why an endpoint would not take a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// It carries its limit of calls in flight.
    Full,
    /// Its breaker is open, or half-open with a probe in flight.
    Breaker,
    /// It was taken out of its cluster.
    Removed,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("address", &self.address)
            .field("weight", &self.weight())
            .field("zone", &self.zone)
            .field("priority", &self.priority)
            .field("version", &self.version)
            .finish()
    }
}

/// One call in flight on an endpoint.
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    sent: Instant,
    /// The call is a half-open breaker's probe.
    probe: bool,
    recorded: bool,
    unsent: bool,
}

impl InFlight {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The call never reached the endpoint after all: uncount it.
    pub fn not_sent(&mut self) {
        if !std::mem::replace(&mut self.unsent, true) {
            self.endpoint.stats.calls.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The response started (headers arrived). A probe that gets as far as
    /// response headers has shown the endpoint answers: it closes the
    /// breaker now, rather than when a long stream ends.
    pub fn responded(&mut self) {
        let now = Instant::now();
        self.endpoint.load.observe_rtt(now - self.sent, now);
        if std::mem::replace(&mut self.probe, false) {
            self.endpoint
                .record(Outcome::Status(tonic::Code::Ok), true, now);
        }
    }

    /// The call ended with `outcome`: fed to the load estimates (see
    /// [`crate::wire::grpc::counts_as_failure`]) and to the breaker (its own
    /// `failures` list). Counted once.
    pub fn finished(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let now = Instant::now();
        let failed = match outcome {
            Outcome::Status(code) => crate::wire::grpc::counts_as_failure(code),
            Outcome::Reset | Outcome::Connect => true,
            Outcome::Excused(_) => {
                // Shown, but it says nothing of the endpoint: a probe that
                // ends so settles nothing, and lets the next one go.
                self.endpoint.calls.record(outcome, now - self.sent, now);
                if std::mem::replace(&mut self.probe, false) {
                    self.endpoint.with_breaker(Breaker::probe_abandoned);
                    self.endpoint.changed.notify_one();
                }
                return;
            }
        };
        if failed {
            self.endpoint.stats.failures.fetch_add(1, Ordering::Relaxed);
        }
        let elapsed = now - self.sent;
        self.endpoint.load.observe_outcome(failed, elapsed, now);
        self.endpoint.calls.record(outcome, elapsed, now);
        self.endpoint.record(outcome, self.probe, now);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.recorded && !self.unsent {
            // Sent, and given up before it ended (the caller went away,
            // or the deadline passed).
            let now = Instant::now();
            self.endpoint.calls.record_abandoned(now - self.sent, now);
        }
        self.endpoint.leave();
        if self.probe && !self.recorded {
            self.endpoint.with_breaker(Breaker::probe_abandoned);
            self.endpoint.changed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::time::Duration;

    use super::*;
    use crate::balance::test_support::endpoint;

    fn cluster() -> ClusterConfig {
        let mut cluster = ClusterConfig::for_test("test", &[]);
        cluster.breaker.failure_threshold = NonZeroU32::new(2).unwrap();
        cluster.breaker.open_for = Duration::from_secs(1);
        cluster.outlier = None;
        cluster
    }

    #[tokio::test(start_paused = true)]
    async fn excused_outcomes_count_neither_for_nor_against_the_endpoint() {
        let e = endpoint(&cluster(), 0, 1, None, 0, None);
        e.start_call()
            .finished(Outcome::Status(tonic::Code::Unavailable));
        // A success here would end the run of failures; these do not.
        for _ in 0..10 {
            e.start_call()
                .finished(Outcome::Excused(tonic::Code::DeadlineExceeded));
        }
        assert_eq!(e.state(Instant::now()), "ready");
        e.start_call()
            .finished(Outcome::Status(tonic::Code::Unavailable));
        assert_eq!(e.state(Instant::now()), "ejected", "two failures in a row");
        let stats = e.stats();
        assert_eq!((stats.calls, stats.failures, stats.ejections), (12, 2, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_excused_probe_settles_nothing_and_lets_the_next_one_go() {
        let e = endpoint(&cluster(), 0, 1, None, 0, None);
        for _ in 0..2 {
            e.start_call()
                .finished(Outcome::Status(tonic::Code::Unavailable));
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        e.poll_breaker(Instant::now());
        assert_eq!(e.state(Instant::now()), "probing");
        let mut probe = e.try_start_call(100).expect("the probe goes");
        assert_eq!(e.try_start_call(100).err(), Some(Refused::Breaker));
        probe.finished(Outcome::Excused(tonic::Code::Cancelled));
        drop(probe);
        assert_eq!(e.state(Instant::now()), "probing", "still half-open");
        let mut next = e.try_start_call(100).expect("the next probe goes");
        next.finished(Outcome::Status(tonic::Code::Ok));
        assert_eq!(e.state(Instant::now()), "ready");
    }
}
