//! The sidecar as a whole: start every listener and cluster, own their
//! tasks, restart a task that panics, and drain on shutdown.

pub mod drain;
pub mod reload;
mod sidecar;

pub use sidecar::Sidecar;
