//! Tools beside the sidecar, not part of it: the demo agent (a gRPC server
//! to balance over), clients that reach the sidecar by each way in, the
//! demos, the load generator the benchmarks drive, and the Kubernetes
//! helpers: the iptables rules of transparent mode and `inject`; and
//! `ctl`, the admin API's client.

pub mod agent;
pub mod client;
pub mod ctl;
pub mod demo;
pub mod demo_mesh;
pub mod inject;
pub mod iptables;
pub mod load;
