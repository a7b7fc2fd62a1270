//! The call's span: started before the call is admitted, with the
//! attributes every call has (the OpenTelemetry RPC conventions and the
//! cluster's own).

use std::sync::Arc;

use crate::cluster::Cluster;
use crate::telemetry::trace::{CallInfo, CallSpan, Traces};
use http::Request;

/// The span for `req`, if it is sampled (its `traceparent` is then the
/// sidecar's span).
pub(super) fn start<B>(
    traces: &Traces,
    cluster: &Arc<Cluster>,
    req: &mut Request<B>,
) -> Option<Box<CallSpan>> {
    let parent = traces.sample(req.headers())?;
    let path = req.uri().path();
    let method = path.strip_prefix('/').unwrap_or(path);
    let authority = req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    let (server, port) = match authority.and_then(|a| a.rsplit_once(':')) {
        Some((host, port)) => (host, port.parse::<i64>().ok()),
        None => (authority.unwrap_or(cluster.name()), None),
    };
    let call = CallInfo {
        method,
        server,
        port,
        cluster: cluster.name(),
        strategy: cluster.strategy().as_str(),
    };
    let started = traces.start_span(&parent, &call);
    Some(started.headers(req.headers_mut()))
}
