//! What the sidecar tells the tools teams run: per-endpoint call records
//! ([`calls`]: outcomes and durations, atomics only) and the Prometheus
//! metrics made from them and the other counters ([`metrics`]).

pub mod calls;
pub mod metrics;
