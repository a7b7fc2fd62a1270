//! What the proxy itself can answer a call with, and the one place where each
//! of those answers becomes a gRPC status.
//!
//! Every message starts with `agentmesh:` and names the cluster, the target
//! or the endpoint, so that a caller reading a status knows that the sidecar
//! (not the endpoint) produced it, and why.

use std::time::Duration;

use tonic::{Code, Status};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// Authority mode: the call's `:authority` names no cluster.
    #[error("no cluster is named {authority:?} (the call's :authority); known clusters: {known}")]
    UnknownAuthority { authority: String, known: String },

    /// The cluster a tunnel or a local port serves was removed by a config
    /// reload.
    #[error(
        "cluster {cluster:?} was removed by a config reload; this connection was bound to it (reconnect to reach another)"
    )]
    ClusterRemoved { cluster: String },

    /// No endpoint of the cluster could take the call: each was tried (a
    /// connect, or the request sent) or passed over (at its limit, removed).
    #[error(
        "cluster {cluster:?}: no endpoint reachable (tried {tried} of {total}{}; last: {last})",
        match passed_over { 0 => String::new(), n => format!(", {n} passed over") }
    )]
    NoEndpointReachable {
        cluster: String,
        tried: usize,
        passed_over: usize,
        total: usize,
        last: String,
    },

    /// The call's deadline passed before the response ended.
    #[error(
        "cluster {cluster:?}: deadline of {timeout:?} ({set_by}) exceeded {phase}; the upstream stream was reset"
    )]
    DeadlineExceeded {
        cluster: String,
        timeout: Duration,
        /// `grpc-timeout` or `cluster.request_timeout`.
        set_by: &'static str,
        phase: String,
    },

    /// A rate limit of the cluster refused the call.
    #[error("cluster {cluster:?}: rate limit exceeded: {} calls per {:?}{} (cluster.rate_limit[{index}]); the call was not sent", refusal.limit, refusal.window, match &refusal.key { Some((h, v)) => format!(" for {h} {v:?}"), None => String::new() })]
    RateLimited {
        cluster: String,
        index: usize,
        refusal: crate::cluster::limit::Refusal,
    },

    /// The cluster already carries `max_in_flight` calls.
    #[error(
        "cluster {cluster:?}: {max} calls in flight already (cluster.max_in_flight); the call was not sent"
    )]
    ClusterFull { cluster: String, max: u32 },

    /// Every endpoint that could take the call carries its limit.
    #[error(
        "cluster {cluster:?}: every endpoint tried ({full}) has {max} calls in flight already (cluster.max_in_flight_per_endpoint); the call was not sent"
    )]
    EndpointsFull {
        cluster: String,
        max: u32,
        full: usize,
    },

    /// The endpoint took the call but failed before sending response headers.
    /// `code` follows the gRPC mapping of the HTTP/2 error.
    #[error("cluster {cluster:?}: endpoint {endpoint} failed before answering: {reason}")]
    UpstreamFailed {
        cluster: String,
        endpoint: String,
        code: Code,
        reason: String,
    },

    /// The endpoint's stream broke after the response had started.
    #[error("cluster {cluster:?}: endpoint {endpoint} broke the stream mid-response: {reason}")]
    UpstreamReset {
        cluster: String,
        endpoint: String,
        code: Code,
        reason: String,
    },
}

impl ProxyError {
    pub fn code(&self) -> Code {
        match self {
            ProxyError::UnknownAuthority { .. }
            | ProxyError::ClusterRemoved { .. }
            | ProxyError::NoEndpointReachable { .. } => Code::Unavailable,
            ProxyError::UpstreamFailed { code, .. } | ProxyError::UpstreamReset { code, .. } => {
                *code
            }
            ProxyError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            ProxyError::RateLimited { .. }
            | ProxyError::ClusterFull { .. }
            | ProxyError::EndpointsFull { .. } => Code::ResourceExhausted,
        }
    }

    pub fn to_status(&self) -> Status {
        Status::new(self.code(), format!("agentmesh: {self}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_name_the_proxy_and_the_cluster() {
        let e = ProxyError::NoEndpointReachable {
            cluster: "planner".into(),
            tried: 3,
            passed_over: 0,
            total: 3,
            last: "127.0.0.1:1: connection refused".into(),
        };
        let s = e.to_status();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(
            s.message(),
            "agentmesh: cluster \"planner\": no endpoint reachable (tried 3 of 3; last: 127.0.0.1:1: connection refused)"
        );
        let d = ProxyError::DeadlineExceeded {
            cluster: "planner".into(),
            timeout: Duration::from_millis(200),
            set_by: "grpc-timeout",
            phase: "waiting for response headers from 127.0.0.1:9".into(),
        };
        assert_eq!(d.to_status().code(), Code::DeadlineExceeded);
    }
}
