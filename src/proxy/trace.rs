//! The call's span: started before the call is admitted, with the
//! attributes every call has (the OpenTelemetry RPC conventions and the
//! cluster's own).

use std::sync::Arc;

use http::Request;
use opentelemetry::KeyValue;

use crate::cluster::Cluster;
use crate::telemetry::trace::{CallSpan, Traces};

/// The span for `req`, if it is sampled (its `traceparent` is then the
/// sidecar's span).
pub(super) fn start<B>(
    traces: &Traces,
    cluster: &Arc<Cluster>,
    req: &mut Request<B>,
) -> Option<Box<CallSpan>> {
    let parent = traces.sample(req.headers())?;
    let path = req.uri().path();
    let method = path.strip_prefix('/').unwrap_or(path).to_string();
    let authority = req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    let (server, port) = match authority.and_then(|a| a.rsplit_once(':')) {
        Some((host, port)) => (host, port.parse::<i64>().ok()),
        None => (authority.unwrap_or(cluster.name()), None),
    };
    let mut attributes = vec![
        KeyValue::new("rpc.system.name", "grpc"),
        KeyValue::new("rpc.method", method.clone()),
        KeyValue::new("server.address", server.to_string()),
        KeyValue::new("agentmesh.cluster", cluster.name().to_string()),
        KeyValue::new("agentmesh.strategy", cluster.strategy().as_str()),
    ];
    if let Some(port) = port {
        attributes.push(KeyValue::new("server.port", port));
    }
    Some(traces.start_span(&parent, method, attributes, req.headers_mut()))
}
