//! agentmesh: a gRPC sidecar that picks an endpoint for every call.
//!
//! A call flows one way through the modules:
//! [`listener`] (accept, find the cluster) -> [`proxy`] (deadline, attempts,
//! retries where safe) -> [`cluster`] (admission limits, retry budget, the
//! live endpoint set) -> [`balance`] (pick an endpoint) -> [`endpoint`]
//! (pooled connection, load, breaker, health). [`mesh`] gossips with peer
//! sidecars and feeds what they see into the endpoints' load and breakers.
//! [`app`] starts, supervises and drains it all; [`config`] and [`admin`] sit beside the line; `wire`
//! holds the HTTP/2 and gRPC plumbing and `util` the small mechanisms
//! several modules share. [`tools`] are the demo agent and its callers, not
//! part of the sidecar.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod balance;
pub mod cluster;
pub mod config;
pub mod endpoint;
pub mod listener;
pub mod mesh;
pub mod proxy;
pub mod telemetry;
pub mod tools;
pub(crate) mod util;
pub(crate) mod wire;

/// The demo agent's protocol, `proto/agentmesh/demo/v1/agent.proto`.
pub mod pb {
    tonic::include_proto!("agentmesh.demo.v1");
}
