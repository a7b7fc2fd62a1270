//! Forwarding one call: pick an endpoint, send the request to it, and stream
//! the response back with its trailers.
//!
//! The call's `grpc-timeout` bounds everything: connecting, waiting for the
//! response headers and streaming the body. When it passes, the caller gets
//! DEADLINE_EXCEEDED and the upstream stream is reset. When the caller goes
//! away (RST_STREAM, closed connection), the upstream stream is reset too.
//! A call that never reached an endpoint (the connection could not be made,
//! or closed before the call was written) is sent to another endpoint: that
//! is always safe, because the endpoint saw nothing of it.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::balance::{Call, Tried};
use crate::cluster::Cluster;
use crate::endpoint::InFlight;
use crate::error::ProxyError;
use crate::grpc;

/// Proxies `req` to an endpoint of `cluster`. Never fails: what goes wrong
/// becomes a gRPC status for the caller.
pub async fn forward(cluster: Arc<Cluster>, req: Request<Incoming>) -> Response<ResponseBody> {
    let timeout = grpc::timeout(req.headers());
    let deadline = timeout.map(|t| Instant::now() + t);
    match send(&cluster, req, timeout, deadline).await {
        Ok(response) => response,
        Err(error) => {
            tracing::debug!(cluster = cluster.name(), %error, "call failed in the proxy");
            grpc::status_response(&error.to_status())
        }
    }
}

async fn send(
    cluster: &Arc<Cluster>,
    req: Request<Incoming>,
    timeout: Option<Duration>,
    deadline: Option<Instant>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let state = Arc::new(CallState::default());
    let (parts, body) = req.into_parts();
    let mut req = Request::from_parts(
        parts,
        RequestBody {
            inner: body,
            state: state.clone(),
        },
    );
    let snapshot = cluster.snapshot();
    let total = snapshot.ready().len();
    let mut tried = Tried::default();
    let mut last_failure = String::from("the cluster has no ready endpoint");
    let expired = |phase: String| ProxyError::DeadlineExceeded {
        cluster: cluster.name().to_string(),
        timeout: timeout.unwrap_or_default(),
        phase,
    };

    loop {
        let call = Call {
            path: req.uri().path(),
            headers: req.headers(),
        };
        let Some(endpoint) = snapshot.pick(&call, &tried, cluster.affinity()) else {
            return Err(ProxyError::NoEndpointReachable {
                cluster: cluster.name().to_string(),
                tried: tried.len(),
                total,
                last: last_failure,
            });
        };
        tried.insert(endpoint.id());
        // A call handed back unsent (the connection closed under it) gets
        // one more try on the same endpoint, over a fresh connection.
        for attempt in 0..2 {
            let mut sender = match within(deadline, endpoint.connection().get()).await {
                None => {
                    return Err(expired(format!(
                        "while connecting to {}",
                        endpoint.address()
                    )));
                }
                Some(Err(e)) => {
                    tracing::debug!(cluster = cluster.name(), error = %e, "endpoint unreachable; trying another");
                    last_failure = e.to_string();
                    break;
                }
                Some(Ok(sender)) => sender,
            };
            if let Some(d) = deadline {
                grpc::set_remaining(
                    req.headers_mut(),
                    d.saturating_duration_since(Instant::now()),
                    timeout,
                );
            }
            // Dropping the send future (deadline, caller gone) resets the
            // upstream stream; the in-flight count ends with it.
            let in_flight = endpoint.start_call();
            match within(deadline, sender.try_send_request(req)).await {
                None => {
                    in_flight.finished(true);
                    state.cancel();
                    return Err(expired(format!(
                        "waiting for {} to answer",
                        endpoint.address()
                    )));
                }
                Some(Ok(response)) => {
                    let (parts, body) = response.into_parts();
                    let trailers_only = grpc::status_code(&parts.headers);
                    match trailers_only {
                        Some(code) => in_flight.finished(grpc::counts_as_failure(code)),
                        None => in_flight.responded(),
                    }
                    let body = ResponseBody {
                        inner: Some(body),
                        deadline: deadline.map(Deadline::At),
                        guard: Some(CallGuard {
                            state,
                            in_flight,
                            cluster: cluster.clone(),
                            timeout,
                            finished: false,
                            recorded: trailers_only.is_some(),
                        }),
                    };
                    return Ok(Response::from_parts(parts, body));
                }
                Some(Err(mut e)) => match e.take_message() {
                    Some(unsent) => {
                        in_flight.not_sent();
                        last_failure = format!("{}: {}", endpoint.address(), e.error());
                        req = unsent;
                        tracing::debug!(cluster = cluster.name(), attempt, error = %last_failure, "call handed back unsent");
                    }
                    None => {
                        in_flight.finished(true);
                        state.cancel();
                        let error = e.into_error();
                        return Err(ProxyError::UpstreamFailed {
                            cluster: cluster.name().to_string(),
                            endpoint: endpoint.address().to_string(),
                            code: grpc::code_for_upstream_error(&error),
                            reason: error.to_string(),
                        });
                    }
                },
            }
        }
    }
}

/// Runs `f` until `deadline`; `None` if the deadline came first. When both
/// are ready at once the deadline wins, so that an answer racing the
/// deadline is not mistaken for one that beat it.
async fn within<F: Future>(deadline: Option<Instant>, f: F) -> Option<F::Output> {
    let Some(d) = deadline else {
        return Some(f.await);
    };
    let mut f = std::pin::pin!(f);
    // Most of what is awaited here is ready at once (a pooled connection):
    // arm no timer for it.
    let first = std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await;
    if let Poll::Ready(out) = first {
        return (Instant::now() < d).then_some(out);
    }
    tokio::select! {
        biased;
        _ = tokio::time::sleep_until(d) => None,
        out = f => Some(out),
    }
}

/// What the two halves of a proxied call share: whether the call was given
/// up, so that the request half stops and resets the upstream stream.
#[derive(Default)]
struct CallState {
    cancelled: AtomicBool,
    waker: AtomicWaker,
}

impl CallState {
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }
}

/// The caller's request body, on its way to the endpoint.
///
/// Fails with `CANCEL` once the call is given up, which makes the HTTP/2
/// client reset the upstream stream even while the caller is still sending.
pub struct RequestBody {
    inner: Incoming,
    state: Arc<CallState>,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if this.state.is_cancelled() {
            return Poll::Ready(Some(Err(h2::Reason::CANCEL.into())));
        }
        this.state.waker.register(cx.waker());
        if this.state.is_cancelled() {
            return Poll::Ready(Some(Err(h2::Reason::CANCEL.into())));
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Err(e)) => {
                tracing::debug!(error = %e, "caller's request stream broke; resetting upstream");
                Poll::Ready(Some(Err(h2::Reason::CANCEL.into())))
            }
            other => Poll::Ready(other.map(|r| r.map_err(|_| h2::Reason::CANCEL.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A call in flight on an endpoint. Dropped before the response finished,
/// it gives the call up.
struct CallGuard {
    state: Arc<CallState>,
    in_flight: InFlight,
    cluster: Arc<Cluster>,
    timeout: Option<Duration>,
    finished: bool,
    /// The outcome was counted already (a trailers-only answer).
    recorded: bool,
}

impl CallGuard {
    /// Counts the call's outcome against the endpoint, once.
    fn record(&mut self, failed: bool) {
        if !self.recorded {
            self.recorded = true;
            self.in_flight.finished(failed);
        }
    }

    fn endpoint_address(&self) -> &str {
        self.in_flight.endpoint().address()
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.state.cancel();
        }
    }
}

/// The endpoint's response body on its way to the caller, or nothing for a
/// status the proxy answers itself.
pub struct ResponseBody {
    inner: Option<Incoming>,
    deadline: Option<Deadline>,
    guard: Option<CallGuard>,
}

/// The call's deadline: a plain instant until the body first has to wait,
/// then a timer. Most unary answers arrive whole with their headers and
/// never arm one.
enum Deadline {
    At(Instant),
    Armed(Pin<Box<Sleep>>),
}

impl Default for ResponseBody {
    /// An empty body: the response's headers say it all (trailers-only).
    fn default() -> Self {
        ResponseBody {
            inner: None,
            deadline: None,
            guard: None,
        }
    }
}

impl ResponseBody {
    /// Ends the call with a status of the proxy's own, after resetting the
    /// upstream stream.
    fn abort(&mut self, error: impl FnOnce(&CallGuard) -> ProxyError) -> Frame<Bytes> {
        self.inner = None;
        self.deadline = None;
        let mut trailers = HeaderMap::new();
        if let Some(mut guard) = self.guard.take() {
            guard.record(true);
            let error = error(&guard);
            tracing::debug!(cluster = guard.cluster.name(), %error, "call ended by the proxy");
            grpc::put_status(&mut trailers, &error.to_status());
        }
        Frame::trailers(trailers)
    }

    /// The response ended with `trailers`.
    fn finish(&mut self, trailers: &HeaderMap) {
        if let Some(mut guard) = self.guard.take() {
            guard.finished = true;
            let failed = grpc::status_code(trailers).is_none_or(grpc::counts_as_failure);
            guard.record(failed);
        }
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.deadline {
            None => false,
            Some(Deadline::At(at)) => Instant::now() >= *at,
            Some(Deadline::Armed(sleep)) => sleep.as_mut().poll(cx).is_ready(),
        }
    }

    /// Arms the deadline's timer, now that the body waits.
    fn arm(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(Deadline::At(at)) = self.deadline {
            let mut sleep = Box::pin(tokio::time::sleep_until(at));
            let fired = sleep.as_mut().poll(cx).is_ready();
            self.deadline = Some(Deadline::Armed(sleep));
            return fired;
        }
        false
    }

    fn deadline_exceeded(&mut self) -> Frame<Bytes> {
        self.abort(|g| ProxyError::DeadlineExceeded {
            cluster: g.cluster.name().to_string(),
            timeout: g.timeout.unwrap_or_default(),
            phase: format!("while {} was responding", g.endpoint_address()),
        })
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.inner.is_none() {
            return Poll::Ready(None);
        }
        if this.expired(cx) {
            return Poll::Ready(Some(Ok(this.deadline_exceeded())));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Pending => {
                if this.arm(cx) {
                    return Poll::Ready(Some(Ok(this.deadline_exceeded())));
                }
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.inner = None;
                    this.finish(trailers);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let frame = this.abort(|g| ProxyError::UpstreamReset {
                    cluster: g.cluster.name().to_string(),
                    endpoint: g.endpoint_address().to_string(),
                    code: grpc::code_for_upstream_error(&e),
                    reason: e.to_string(),
                });
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.inner = None;
                match this.guard.as_ref() {
                    // Ended without trailers, so without a status: a gRPC
                    // caller must still get one.
                    Some(g) if !g.recorded => {
                        let frame = this.abort(|g| ProxyError::UpstreamReset {
                            cluster: g.cluster.name().to_string(),
                            endpoint: g.endpoint_address().to_string(),
                            code: tonic::Code::Internal,
                            reason: "the response ended without a grpc-status".into(),
                        });
                        Poll::Ready(Some(Ok(frame)))
                    }
                    _ => {
                        if let Some(mut g) = this.guard.take() {
                            g.finished = true;
                        }
                        Poll::Ready(None)
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
