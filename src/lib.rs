//! agentmesh: a gRPC sidecar that picks an endpoint for every call.
//!
//! A call flows one way through the modules:
//! [`listener`] (accept, find the cluster) -> [`proxy`] (deadline, retry
//! where safe) -> [`balance`] (pick an endpoint) -> [`endpoint`] (pooled
//! connection, load counters). [`config`], [`admin`] and [`drain`] sit
//! beside that line; [`agent`], [`client`] and [`demo`] are the demo agent
//! and its callers.

pub mod admin;
pub mod agent;
pub mod balance;
pub mod client;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod drain;
pub mod endpoint;
pub mod error;
pub mod grpc;
pub mod health;
pub mod io;
pub mod limit;
pub mod listener;
pub mod load;
pub mod proxy;
pub mod sidecar;
pub mod stream;
pub mod timer;

/// The demo agent's protocol, `proto/agentmesh/demo/v1/agent.proto`.
pub mod pb {
    tonic::include_proto!("agentmesh.demo.v1");
}
