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

/// The parsers that take bytes from callers and files, as the fuzz targets
/// in `fuzz/` (cargo fuzz) call them. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    use std::time::Duration;

    /// `host:port` to `host`, as CONNECT targets and authorities are
    /// matched to clusters.
    pub use crate::cluster::strip_port;
    /// The first bytes of a proxy-port connection (see `listener`).
    pub use crate::listener::parse_head_for_fuzzing as proxy_head;

    /// A `grpc-timeout` header's value.
    pub fn grpc_timeout(value: &[u8]) -> Option<Duration> {
        crate::wire::grpc::parse_timeout(value)
    }

    /// The `grpc-timeout` the sidecar sends for `remaining` of `original`.
    pub fn grpc_timeout_sent(remaining: Duration, original: Duration) -> Option<Vec<u8>> {
        let mut headers = http::HeaderMap::new();
        crate::wire::grpc::set_remaining(&mut headers, remaining, Some(original));
        Some(headers.get("grpc-timeout")?.as_bytes().to_vec())
    }
}

/// The demo agent's protocol, `proto/agentmesh/demo/v1/agent.proto`.
pub mod pb {
    tonic::include_proto!("agentmesh.demo.v1");
}

/// The admin API, `proto/agentmesh/admin/v1/admin.proto`.
pub mod admin_pb {
    tonic::include_proto!("agentmesh.admin.v1");

    /// The admin API's descriptors, for server reflection.
    pub const DESCRIPTORS: &[u8] = tonic::include_file_descriptor_set!("admin_descriptors");
}
