//! An endpoint: one address of a cluster, with its pooled connection and the
//! load it carries.
//!
//! An `Endpoint` lives as long as the address stays in its cluster. Pickers
//! see endpoints through short-lived snapshots, so the counters here survive
//! every rebuild of a picker.

mod connection;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use connection::{ConnectError, Connection, Sender};

pub struct Endpoint {
    address: Arc<str>,
    weight: NonZeroU32,
    connection: Connection,
    stats: Stats,
}

/// Counters kept beside the endpoint; all relaxed atomics, read for display.
#[derive(Default)]
pub struct Stats {
    /// Calls sent and not yet finished.
    in_flight: AtomicU64,
    /// Calls sent to this endpoint.
    calls: AtomicU64,
    /// Calls that found the endpoint unreachable and went elsewhere.
    connect_failures: AtomicU64,
}

/// What one endpoint has seen, copied out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub in_flight: u64,
    pub calls: u64,
    pub connect_failures: u64,
    pub connections_opened: u64,
}

impl Endpoint {
    pub fn new(address: &str, weight: NonZeroU32, connect_timeout: Duration) -> Endpoint {
        let address: Arc<str> = address.into();
        Endpoint {
            connection: Connection::new(address.clone(), connect_timeout),
            address,
            weight,
            stats: Stats::default(),
        }
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn weight(&self) -> NonZeroU32 {
        self.weight
    }

    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    pub fn in_flight(&self) -> u64 {
        self.stats.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a call as sent; the returned guard counts it finished on drop.
    pub fn start_call(self: &Arc<Self>) -> InFlight {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: self.clone(),
        }
    }

    pub fn connect_failed(&self) {
        self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> StatsSnapshot {
        StatsSnapshot {
            in_flight: self.stats.in_flight.load(Ordering::Relaxed),
            calls: self.stats.calls.load(Ordering::Relaxed),
            connect_failures: self.stats.connect_failures.load(Ordering::Relaxed),
            connections_opened: self.connection.opened(),
        }
    }
}

/// One call in flight on an endpoint.
pub struct InFlight {
    endpoint: Arc<Endpoint>,
}

impl InFlight {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// The call never reached the endpoint after all: uncount it.
    pub fn not_sent(self) {
        self.endpoint.stats.calls.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint
            .stats
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}
