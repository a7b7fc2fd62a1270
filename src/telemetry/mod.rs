//! What the sidecar tells the tools teams run: per-endpoint call records
//! ([`calls`]: outcomes and durations, atomics only) and the Prometheus
//! metrics made from them and the other counters ([`metrics`]), and one
//! OpenTelemetry span per sampled call ([`trace`], written as OTLP protobuf
//! bytes by [`otlp`]).

pub mod calls;
pub mod metrics;
pub mod otlp;
pub mod trace;
