//! Forwarding one call: admit it, pick an endpoint, send the request to it,
//! and stream the response back with its trailers.
//!
//! Admission comes first: the cluster's rate limits, then its limit of
//! calls in flight. Then the call's deadline bounds everything (the
//! tighter of its `grpc-timeout` and the cluster's `request_timeout`):
//! connecting, waiting for the response headers and streaming the body.
//! When it passes, the caller gets DEADLINE_EXCEEDED and the upstream stream
//! is reset. When the caller goes away (RST_STREAM, closed connection), the
//! upstream stream is reset too.
//!
//! Retries: the request body is kept as it is sent, up to a bound, so that
//! the call can be sent again while the response has not started.
//! - A call that never reached an endpoint (no connection could be made,
//!   the connection closed before the call was written, the endpoint
//!   refused the stream or sent GOAWAY before processing it) always goes to
//!   another endpoint: the endpoint saw nothing of it. Each endpoint is
//!   tried at most once.
//! - A call that reached an endpoint is sent again only if its method is
//!   named in `[cluster.retry]`, it failed with a listed status before any
//!   response message, the retry budget allows it, and the backoff ends
//!   before the deadline (the design of gRPC's retry proposal, A6).

mod attempt;
pub mod error;
mod replay;
mod response;
mod retry;
mod trace;

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Request, Response};
use tokio::time::Instant;

pub use replay::RequestBody;
pub use response::ResponseBody;

use futures_util::future::Either;

use crate::cluster::{Admitted, Cluster};
use crate::endpoint::Outcome;
use crate::telemetry::otlp::Attr;
use crate::telemetry::trace::CallSpan;
use crate::wire::grpc;
use attempt::Attempts;
use error::ProxyError;

/// How much of a request body is kept for re-sending a call that never
/// reached an endpoint, when no retry policy names a larger bound.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// The call's time limit and where it came from.
#[derive(Clone, Copy)]
struct Deadline {
    at: Instant,
    timeout: Duration,
    /// `grpc-timeout` or `cluster.request_timeout`.
    source: &'static str,
    /// The caller's own `grpc-timeout`.
    own: Option<Duration>,
}

/// `Deadline::source` when the cluster's `request_timeout` set it.
const REQUEST_TIMEOUT: &str = "cluster.request_timeout";

impl Deadline {
    /// What the deadline's passing says of the endpoint. The cluster's
    /// `request_timeout` is the operator's bound on how long an endpoint
    /// may take: its passing counts as DEADLINE_EXCEEDED (a failure unless
    /// `failures` leaves it out). A deadline the caller chose is the
    /// caller's business: a caller asking 50 ms of a 500 ms method would
    /// otherwise get a healthy endpoint ejected.
    fn outcome(&self) -> Outcome {
        let code = tonic::Code::DeadlineExceeded;
        if self.source == REQUEST_TIMEOUT {
            Outcome::Status(code)
        } else {
            Outcome::Excused(code)
        }
    }
}

/// Proxies `req` to an endpoint of `cluster`. `own` is the call's own
/// timeout (its `grpc-timeout`, as [`grpc::timeout`] reads it). Never fails:
/// what goes wrong becomes a gRPC status for the caller.
pub fn forward(
    cluster: Arc<Cluster>,
    mut req: Request<h2::RecvStream>,
    own: Option<Duration>,
) -> impl Future<Output = Response<ResponseBody>> + Send {
    // A function that does its synchronous work and returns its future,
    // not an `async fn`: an `async fn` keeps each argument in its future
    // for as long as it runs, even once it is handed on (the request, 240
    // bytes, was held so four times over), and this future is what an open
    // call costs in memory.
    let limit = cluster.config().request_timeout;
    let (timeout, source) = match own {
        Some(t) if t <= limit => (t, "grpc-timeout"),
        _ => (limit, REQUEST_TIMEOUT),
    };
    let deadline = Deadline {
        at: Instant::now() + timeout,
        timeout,
        source,
        own,
    };
    let mut trace = match cluster.traces() {
        None => None,
        Some(traces) => trace::start(traces, &cluster, &mut req),
    };
    let admitted = match admit(&cluster, req.headers()) {
        Ok(admitted) => admitted,
        Err(error) => {
            if let Some(span) = trace.as_deref_mut() {
                let reason = error.to_string();
                span.event("refused", &[("agentmesh.reason", Attr::Str(&reason))]);
            }
            return Either::Left(std::future::ready(failed(&cluster, error, trace)));
        }
    };
    // The attempts own what the call needs from here on, so that the
    // future holds nothing twice.
    let mut attempts = Attempts::new(cluster, req, deadline, admitted, trace);
    Either::Right(async move {
        match attempts.run().await {
            Ok(response) => response,
            Err(error) => {
                let trace = attempts.take_trace();
                failed(attempts.cluster(), error, trace)
            }
        }
    })
}

/// The caller's answer to a call that failed in the proxy: the error as a
/// gRPC status, which ends the call's span.
fn failed(
    cluster: &Cluster,
    error: ProxyError,
    trace: Option<Box<CallSpan>>,
) -> Response<ResponseBody> {
    tracing::debug!(cluster = cluster.name(), %error, "call failed in the proxy");
    let status = error.to_status();
    if let Some(span) = trace {
        span.end(status.code(), status.message());
    }
    grpc::status_response(&status)
}

/// The cluster's rate limits, then its limit of calls in flight.
fn admit(cluster: &Arc<Cluster>, headers: &HeaderMap) -> Result<Admitted, ProxyError> {
    if !cluster.rate_limits().is_empty() {
        let now = Instant::now();
        for (index, limit) in cluster.rate_limits().iter().enumerate() {
            if let Err(refusal) = limit.admit(headers, now) {
                let error = ProxyError::RateLimited {
                    cluster: cluster.name().to_string(),
                    index,
                    refusal,
                };
                cluster.refused(&cluster.stats().rate_limited, &error);
                return Err(error);
            }
        }
    }
    cluster.admit().ok_or_else(|| {
        let error = ProxyError::ClusterFull {
            cluster: cluster.name().to_string(),
            max: cluster.config().max_in_flight,
        };
        cluster.refused(&cluster.stats().over_max_in_flight, &error);
        error
    })
}
