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

use tokio::sync::Notify;
use tokio::time::Instant;

pub use connection::{ConnectError, Connection, Sender};
pub use load::{Load, WindowSummary};

use crate::config::{ClusterConfig, EndpointConfig};

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
}

/// Counters kept for display; all relaxed atomics.
#[derive(Default)]
struct Stats {
    calls: AtomicU64,
    failures: AtomicU64,
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
            connection: Connection::new(address.clone(), cluster.connect_timeout, changed),
            address,
            weight: config.weight,
            zone: config.zone.as_deref().map(Arc::from),
            priority: config.priority,
            version: config.version.as_deref().map(Arc::from),
            load: Load::new(&cluster.latency, &cluster.performance),
            stats: Stats::default(),
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
        self.connection.is_reachable(now)
    }

    /// When a sitting-out endpoint becomes ready again, if it is sitting out.
    pub fn ready_at(&self) -> Option<Instant> {
        self.connection.reachable_at()
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

    pub fn stats(&self) -> StatsSnapshot {
        StatsSnapshot {
            in_flight: self.load.in_flight(),
            calls: self.stats.calls.load(Ordering::Relaxed),
            failures: self.stats.failures.load(Ordering::Relaxed),
            connect_failures: self.connection.failures(),
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
