//! An endpoint: one address of a cluster, with its pooled connection, the
//! load it carries and whether it can be reached.
//!
//! An `Endpoint` lives as long as the address stays in its cluster. Pickers
//! see endpoints through short-lived snapshots, so the counters and
//! estimates here survive every rebuild of a picker.

mod connection;
mod load;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

pub use connection::{ConnectError, Connection, Sender};
pub use load::{Load, WindowSummary};

use crate::config::{ClusterConfig, EndpointConfig};

/// After a failed connect the endpoint sits out this long, doubling with
/// each further failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub struct Endpoint {
    id: u64,
    address: Arc<str>,
    weight: NonZeroU32,
    zone: Option<Arc<str>>,
    priority: u32,
    version: Option<Arc<str>>,
    connection: Connection,
    load: Load,
    stats: Stats,
    reach: Reachability,
    /// Tells the cluster that this endpoint's readiness changed.
    changed: Arc<Notify>,
}

/// Counters kept for display; all relaxed atomics.
#[derive(Default)]
struct Stats {
    calls: AtomicU64,
    failures: AtomicU64,
    connect_failures: AtomicU64,
}

/// What one endpoint has seen, copied out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub in_flight: u64,
    pub calls: u64,
    pub failures: u64,
    pub connect_failures: u64,
    pub connections_opened: u64,
}

impl Endpoint {
    pub fn new(config: &EndpointConfig, cluster: &ClusterConfig, changed: Arc<Notify>) -> Endpoint {
        let address: Arc<str> = config.address.as_str().into();
        Endpoint {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            connection: Connection::new(address.clone(), cluster.connect_timeout),
            address,
            weight: config.weight,
            zone: config.zone.as_deref().map(Arc::from),
            priority: config.priority,
            version: config.version.as_deref().map(Arc::from),
            load: Load::new(&cluster.latency, &cluster.performance),
            stats: Stats::default(),
            reach: Reachability::default(),
            changed,
        }
    }

    /// A process-unique id, stable for the endpoint's life.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn weight(&self) -> NonZeroU32 {
        self.weight
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

    pub fn load(&self) -> &Load {
        &self.load
    }

    pub fn in_flight(&self) -> u64 {
        self.load.in_flight()
    }

    /// Whether the endpoint may take calls now: it is not sitting out a
    /// connect failure.
    pub fn is_ready(&self, now: Instant) -> bool {
        self.reach.is_up(now)
    }

    /// When a sitting-out endpoint becomes ready again, if it is sitting out.
    pub fn ready_at(&self) -> Option<Instant> {
        self.reach.down_until()
    }

    /// Counts a call as sent; the returned guard counts it finished on drop.
    pub fn start_call(self: &Arc<Self>) -> InFlight {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        self.load.enter();
        InFlight {
            endpoint: self.clone(),
            sent: Instant::now(),
        }
    }

    /// A connection attempt failed: the endpoint sits out a backoff.
    pub fn connect_failed(&self) {
        self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        self.load.observe_outcome(true, Duration::ZERO, now);
        if self.reach.fail(now) {
            tracing::info!(endpoint = %self.address, until = ?self.reach.down_until().map(|t| t - now), "endpoint unreachable; sitting it out");
            self.changed.notify_one();
        }
    }

    /// A connection attempt succeeded.
    pub fn connected(&self) {
        if self.reach.succeed() {
            tracing::info!(endpoint = %self.address, "endpoint reachable again");
            self.changed.notify_one();
        }
    }

    pub fn stats(&self) -> StatsSnapshot {
        StatsSnapshot {
            in_flight: self.load.in_flight(),
            calls: self.stats.calls.load(Ordering::Relaxed),
            failures: self.stats.failures.load(Ordering::Relaxed),
            connect_failures: self.stats.connect_failures.load(Ordering::Relaxed),
            connections_opened: self.connection.opened(),
        }
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("address", &self.address)
            .field("weight", &self.weight)
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
}

impl InFlight {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The call never reached the endpoint after all: uncount it.
    pub fn not_sent(self) {
        self.endpoint.stats.calls.fetch_sub(1, Ordering::Relaxed);
    }

    /// The response started (headers arrived).
    pub fn responded(&self) {
        let now = Instant::now();
        self.endpoint.load.observe_rtt(now - self.sent, now);
    }

    /// The call ended with an outcome; `failed` as counted against the
    /// endpoint (see [`crate::grpc::counts_as_failure`]).
    pub fn finished(&self, failed: bool) {
        let now = Instant::now();
        if failed {
            self.endpoint.stats.failures.fetch_add(1, Ordering::Relaxed);
        }
        self.endpoint
            .load
            .observe_outcome(failed, now - self.sent, now);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.load.leave();
    }
}

/// Whether connecting to the endpoint works, learned from real connects.
struct Reachability {
    epoch: Instant,
    /// Milliseconds since `epoch` until which the endpoint sits out; 0 when up.
    down_until_ms: AtomicU64,
    backoff_ms: AtomicU64,
}

impl Default for Reachability {
    fn default() -> Self {
        Reachability {
            epoch: Instant::now(),
            down_until_ms: AtomicU64::new(0),
            backoff_ms: AtomicU64::new(0),
        }
    }
}

impl Reachability {
    fn is_up(&self, now: Instant) -> bool {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        until == 0 || now.saturating_duration_since(self.epoch).as_millis() as u64 >= until
    }

    fn down_until(&self) -> Option<Instant> {
        match self.down_until_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.epoch + Duration::from_millis(ms)),
        }
    }

    /// Returns true if the endpoint was up until now.
    fn fail(&self, now: Instant) -> bool {
        let was_up = self.is_up(now);
        let backoff = match self.backoff_ms.load(Ordering::Relaxed) {
            0 => FIRST_BACKOFF.as_millis() as u64,
            b => (b * 2).min(MAX_BACKOFF.as_millis() as u64),
        };
        self.backoff_ms.store(backoff, Ordering::Relaxed);
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.down_until_ms
            .store(now_ms + backoff.max(1), Ordering::Relaxed);
        was_up
    }

    /// Returns true if the endpoint had been sitting out.
    fn succeed(&self) -> bool {
        self.backoff_ms.store(0, Ordering::Relaxed);
        self.down_until_ms.swap(0, Ordering::Relaxed) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_failed_connect_sits_the_endpoint_out_with_a_growing_backoff() {
        let r = Reachability::default();
        assert!(r.is_up(Instant::now()));
        assert!(r.fail(Instant::now()), "first failure takes it down");
        assert!(!r.is_up(Instant::now()));
        tokio::time::advance(Duration::from_millis(250)).await;
        assert!(r.is_up(Instant::now()), "back after 250ms");
        assert!(r.fail(Instant::now()));
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(!r.is_up(Instant::now()), "second backoff is 500ms");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(r.is_up(Instant::now()));
        for _ in 0..10 {
            r.fail(Instant::now());
        }
        tokio::time::advance(MAX_BACKOFF - Duration::from_millis(1)).await;
        assert!(!r.is_up(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(
            r.is_up(Instant::now()),
            "backoff is capped at {MAX_BACKOFF:?}"
        );
        assert!(r.succeed());
        assert!(!r.succeed(), "already up");
        assert!(r.fail(Instant::now()));
        tokio::time::advance(FIRST_BACKOFF).await;
        assert!(r.is_up(Instant::now()), "success resets the backoff");
    }
}
