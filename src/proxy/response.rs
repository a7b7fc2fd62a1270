//! The endpoint's response on its way to the caller: streamed as it comes,
//! cut off with DEADLINE_EXCEEDED when the call's deadline passes, and
//! given a status of the proxy's own when the endpoint's stream breaks or
//! ends without one. The call's outcome is counted when it ends.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::Deadline;
use super::error::ProxyError;
use super::replay::CallShared;
use crate::cluster::{Admitted, Cluster};
use crate::endpoint::InFlight;
use crate::endpoint::Outcome;
use crate::telemetry::trace::CallSpan;
use crate::wire::grpc;
use crate::wire::stream::{Abandon, Received};
use crate::wire::timer::Timer;

/// A call in flight on an endpoint. Dropped before the response finished,
/// it gives the call up.
pub(super) struct CallGuard {
    /// The call's span, when sampled and not ended yet.
    pub(super) trace: Option<Box<CallSpan>>,
    pub(super) state: Arc<CallShared>,
    pub(super) in_flight: InFlight,
    /// The call's place under the cluster's `max_in_flight`, held until
    /// the response ends.
    pub(super) _admitted: Option<Admitted>,
    pub(super) cluster: Arc<Cluster>,
    pub(super) deadline: Deadline,
    pub(super) finished: bool,
    /// The outcome was counted already (a trailers-only answer).
    pub(super) recorded: bool,
}

impl CallGuard {
    /// Counts the call's outcome against the endpoint, once.
    fn record(&mut self, outcome: Outcome) {
        if !self.recorded {
            self.recorded = true;
            self.in_flight.finished(outcome);
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
        // A span still open here: the caller went away (the span says so
        // when dropped).
    }
}

/// The endpoint's response body on its way to the caller, or nothing for a
/// status the proxy answers itself.
pub struct ResponseBody {
    inner: Option<Received>,
    deadline: Option<DeadlineTimer>,
    guard: Option<CallGuard>,
}

/// The call's deadline: a plain instant until the body first has to wait,
/// then a timer. Most unary answers arrive whole with their headers and
/// never arm one.
enum DeadlineTimer {
    At(Instant),
    Armed(Pin<Box<Timer>>, Instant),
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
    /// The endpoint's body, to be cut off at `deadline`; no call guard yet.
    pub(super) fn new(body: h2::RecvStream, deadline: Instant) -> ResponseBody {
        ResponseBody {
            inner: Some(Received::new(body)),
            deadline: Some(DeadlineTimer::At(deadline)),
            guard: None,
        }
    }

    /// Hands the call's bookkeeping to the body: its outcome is counted
    /// when the response ends.
    pub(super) fn guard(&mut self, guard: CallGuard) {
        self.guard = Some(guard);
    }

    /// Ends the call with a status of the proxy's own, after resetting the
    /// upstream stream.
    fn abort(
        &mut self,
        outcome: Outcome,
        error: impl FnOnce(&CallGuard) -> ProxyError,
    ) -> Frame<Bytes> {
        self.inner = None;
        self.deadline = None;
        let mut trailers = HeaderMap::new();
        if let Some(mut guard) = self.guard.take() {
            guard.record(outcome);
            let error = error(&guard);
            tracing::debug!(cluster = guard.cluster.name(), %error, "call ended by the proxy");
            let status = error.to_status();
            if let Some(span) = guard.trace.take() {
                span.end(status.code(), status.message());
            }
            grpc::put_status(&mut trailers, &status);
        }
        Frame::trailers(trailers)
    }

    /// The response ended with `trailers`.
    fn finish(&mut self, trailers: &HeaderMap) {
        if let Some(mut guard) = self.guard.take() {
            guard.finished = true;
            let code = grpc::status_code(trailers);
            if let Some(span) = guard.trace.take() {
                span.end(
                    code.unwrap_or(tonic::Code::Unknown),
                    grpc::message(trailers).unwrap_or_default(),
                );
            }
            let outcome = code.map_or(Outcome::Reset, |c| guard.state.outcome_of(c));
            guard.record(outcome);
        }
    }

    /// Whether the deadline has passed, even if its timer has yet to fire
    /// (timers fire on the next tick): an answer that comes after the
    /// deadline loses to it.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.deadline {
            None => false,
            Some(DeadlineTimer::At(at)) => Instant::now() >= *at,
            Some(DeadlineTimer::Armed(timer, at)) => {
                timer.as_mut().poll(cx).is_ready() || Instant::now() >= *at
            }
        }
    }

    /// Arms the deadline's timer, now that the body waits.
    fn arm(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(DeadlineTimer::At(at)) = self.deadline {
            let mut timer = Box::pin(Timer::at(at));
            let fired = timer.as_mut().poll(cx).is_ready();
            self.deadline = Some(DeadlineTimer::Armed(timer, at));
            return fired;
        }
        false
    }

    fn deadline_exceeded(&mut self) -> Frame<Bytes> {
        let outcome = self.guard.as_ref().map(|g| g.deadline.outcome());
        let outcome = outcome.unwrap_or(Outcome::Status(tonic::Code::DeadlineExceeded));
        self.abort(outcome, |g| ProxyError::DeadlineExceeded {
            cluster: g.cluster.name().to_string(),
            timeout: g.deadline.timeout,
            set_by: g.deadline.source,
            phase: format!("while {} was responding", g.endpoint_address()),
        })
    }
}

/// The caller giving up shows as a reset of its stream.
impl Abandon for ResponseBody {}

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
                if frame.is_trailers() && this.expired(cx) {
                    return Poll::Ready(Some(Ok(this.deadline_exceeded())));
                }
                if let Some(trailers) = frame.trailers_ref() {
                    this.inner = None;
                    this.finish(trailers);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let frame = this.abort(Outcome::Reset, |g| ProxyError::UpstreamReset {
                    cluster: g.cluster.name().to_string(),
                    endpoint: g.endpoint_address().to_string(),
                    code: grpc::code_for_upstream_error(&e),
                    reason: grpc::describe(&e),
                });
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.inner = None;
                match this.guard.as_ref() {
                    // Ended without trailers, so without a status: a gRPC
                    // caller must still get one.
                    Some(g) if !g.recorded => {
                        let frame = this.abort(Outcome::Reset, |g| ProxyError::UpstreamReset {
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
        // While the outcome is unknown the body must be polled, so that a
        // response that ends without a status gets one.
        if self.guard.as_ref().is_some_and(|g| !g.recorded) {
            return false;
        }
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        match self.inner {
            None => SizeHint::with_exact(0),
            Some(_) => SizeHint::default(),
        }
    }
}
