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

pub mod error;

use std::borrow::Cow;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{HeaderMap, Method, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::balance::{Call, Snapshot, Tried};
use crate::cluster::{Admitted, Cluster};
use crate::config::{Outcome, RetryConfig};
use crate::endpoint::{Endpoint, InFlight, Refused, Sender};
use crate::proxy::error::ProxyError;
use crate::util::lock;
use crate::wire::grpc;
use crate::wire::stream::{Abandon, Pump, Received};
use crate::wire::timer::Timer;

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

/// Proxies `req` to an endpoint of `cluster`. Never fails: what goes wrong
/// becomes a gRPC status for the caller.
pub async fn forward(
    cluster: Arc<Cluster>,
    req: Request<h2::RecvStream>,
) -> Response<ResponseBody> {
    let own = grpc::timeout(req.headers());
    let limit = cluster.config().request_timeout;
    let (timeout, source) = match own {
        Some(t) if t <= limit => (t, "grpc-timeout"),
        _ => (limit, "cluster.request_timeout"),
    };
    let deadline = Deadline {
        at: Instant::now() + timeout,
        timeout,
        source,
        own,
    };
    match send(&cluster, req, deadline).await {
        Ok(response) => response,
        Err(error) => {
            tracing::debug!(cluster = cluster.name(), %error, "call failed in the proxy");
            grpc::status_response(&error.to_status())
        }
    }
}

/// What is kept of a request to send it again.
struct Template {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Template {
    fn request(&self, body: RequestBody) -> Request<RequestBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// Why the last attempt did not give the caller its answer.
enum Failed {
    /// Nothing reached an endpoint yet.
    Nothing(Cow<'static, str>),
    /// An endpoint answered with a status the policy retries; kept to be
    /// passed on if no retry happens.
    Answered(Box<Response<ResponseBody>>),
    /// An endpoint took the call and failed before answering.
    Broke(ProxyError),
}

async fn send(
    cluster: &Arc<Cluster>,
    req: Request<h2::RecvStream>,
    deadline: Deadline,
) -> Result<Response<ResponseBody>, ProxyError> {
    let config = cluster.config();
    let name = || cluster.name().to_string();
    if !cluster.rate_limits().is_empty() {
        let now = Instant::now();
        for (index, limit) in cluster.rate_limits().iter().enumerate() {
            if let Err(refusal) = limit.admit(req.headers(), now) {
                let error = ProxyError::RateLimited {
                    cluster: name(),
                    index,
                    refusal,
                };
                cluster.refused(&cluster.stats().rate_limited, &error);
                return Err(error);
            }
        }
    }
    let Some(admitted) = cluster.admit() else {
        let error = ProxyError::ClusterFull {
            cluster: name(),
            max: config.max_in_flight,
        };
        cluster.refused(&cluster.stats().over_max_in_flight, &error);
        return Err(error);
    };
    let policy = config.retry.as_ref().filter(|r| r.covers(req.uri().path()));
    if policy.is_some() {
        if let Some(budget) = cluster.retry_budget() {
            budget.deposit(Instant::now());
        }
    }

    let (parts, body) = req.into_parts();
    let template = Template {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
    };
    let limit = policy.map_or(REPLAY_LIMIT, |p| p.buffer_limit);
    let shared = Arc::new(CallShared::new(Received::new(body), limit));
    let mut next = Some(Request::from_parts(
        parts,
        RequestBody::call(shared.clone(), 0),
    ));

    let snapshot = cluster.snapshot();
    let total = snapshot.ready().len();
    let mut tried = Tried::default();
    let mut full = 0usize;
    let mut answered = 0u32;
    let mut failed = Failed::Nothing(Cow::Borrowed("the cluster has no ready endpoint"));
    // An endpoint passed over because it was still connecting.
    let mut connecting: Option<Arc<Endpoint>> = None;
    let expired = |phase: String| ProxyError::DeadlineExceeded {
        cluster: name(),
        timeout: deadline.timeout,
        set_by: deadline.source,
        phase,
    };

    loop {
        let Some(mut req) = next.take().or_else(|| {
            let attempt = shared.new_attempt()?;
            Some(template.request(RequestBody::call(shared.clone(), attempt)))
        }) else {
            // The body went past the buffer: it cannot be sent again.
            return give_up(failed, cluster, &tried, total, full);
        };
        let call = Call {
            path: req.uri().path(),
            headers: req.headers(),
        };
        let (endpoint, waited_for) = match snapshot.pick(&call, &tried, cluster.affinity()) {
            Some(e) => (e.clone(), false),
            // Every other endpoint was full or refused: wait for the one
            // passed over while it connected.
            None => match connecting.take() {
                Some(e) => (e, true),
                None => return give_up(failed, cluster, &tried, total, full),
            },
        };
        tried.insert(endpoint.id());
        let mut pooled = endpoint.connection().pooled();
        if pooled.is_none() && !waited_for && may_go_elsewhere(cluster, &req, &snapshot, &tried) {
            // Connecting takes a round trip at best and a connect timeout
            // at worst (a draining or unplugged endpoint): it goes on in the
            // background while this call goes to a connected endpoint.
            endpoint.connection().warm();
            connecting.get_or_insert(endpoint);
            next = Some(req);
            continue;
        }
        let mut in_flight = match endpoint.try_start_call(config.max_in_flight_per_endpoint) {
            Ok(f) => f,
            Err(refused) => {
                full += usize::from(refused == Refused::Full);
                next = Some(req);
                continue;
            }
        };
        // A call handed back unsent (the connection closed under it) gets
        // one more try on the same endpoint, over a fresh connection.
        let mut handed_back = false;
        let outcome = loop {
            let connected = match pooled.take().or_else(|| endpoint.connection().pooled()) {
                Some(sender) => Some(Ok(sender)),
                None => within(deadline.at, endpoint.connection().connect_boxed()).await,
            };
            let mut sender = match connected {
                None => {
                    in_flight.not_sent();
                    return Err(expired(format!(
                        "while connecting to {}",
                        endpoint.address()
                    )));
                }
                Some(Err(e)) => {
                    tracing::debug!(cluster = cluster.name(), error = %e, "endpoint unreachable; trying another");
                    endpoint.connect_failed(&e);
                    in_flight.not_sent();
                    failed = Failed::Nothing(e.to_string().into());
                    next = Some(req);
                    break None;
                }
                Some(Ok(sender)) => sender,
            };
            if Instant::now() >= deadline.at {
                // Nothing was sent: the endpoint is not to blame (a caller
                // may send a deadline that has passed already).
                in_flight.not_sent();
                return Err(expired(format!(
                    "before the call was sent to {}",
                    endpoint.address()
                )));
            }
            if deadline.own.is_some() {
                grpc::set_remaining(
                    req.headers_mut(),
                    deadline.at.saturating_duration_since(Instant::now()),
                    deadline.own,
                );
            }
            // Dropping the exchange (deadline, caller gone) resets the
            // upstream stream; the in-flight count ends with it.
            match within(deadline.at, exchange(&mut sender, req)).await {
                None => {
                    in_flight.finished(Outcome::Status(tonic::Code::DeadlineExceeded));
                    shared.cancel();
                    return Err(expired(format!(
                        "waiting for {} to answer",
                        endpoint.address()
                    )));
                }
                Some(Exchange::Answered(response)) => break Some(Ok(response)),
                Some(Exchange::Broke(e)) => break Some(Err(e)),
                Some(Exchange::Unsent(body, e)) => {
                    // The connection closed (or went away) before the
                    // stream opened: nothing was sent.
                    let unsent = template.request(body);
                    if !handed_back {
                        handed_back = true;
                        tracing::debug!(cluster = cluster.name(), endpoint = endpoint.address(), error = %e, "call handed back unsent; one more try");
                        req = unsent;
                    } else {
                        in_flight.not_sent();
                        failed = Failed::Nothing(
                            format!("{}: {}", endpoint.address(), grpc::describe(&e)).into(),
                        );
                        next = Some(unsent);
                        break None;
                    }
                }
            }
        };
        let Some(outcome) = outcome else { continue };
        match outcome {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                let trailers_only = grpc::status_code(&parts.headers);
                match trailers_only {
                    Some(code) => in_flight.finished(Outcome::Status(code)),
                    None => in_flight.responded(),
                }
                answered += 1;
                let retry = trailers_only
                    .is_some_and(|code| wants_retry(policy, code, answered) && shared.can_replay());
                let mut body = ResponseBody {
                    inner: Some(Received::new(body)),
                    deadline: Some(DeadlineTimer::At(deadline.at)),
                    guard: None,
                };
                if !retry {
                    body.guard = Some(CallGuard {
                        state: shared,
                        in_flight,
                        admitted,
                        cluster: cluster.clone(),
                        deadline,
                        finished: false,
                        recorded: trailers_only.is_some(),
                    });
                    return Ok(Response::from_parts(parts, body));
                }
                let response = Response::from_parts(parts, body);
                failed = Failed::Answered(Box::new(response));
            }
            Err(error) => {
                if grpc::is_unprocessed(&error) {
                    // Refused or cut off by GOAWAY before the endpoint
                    // processed it: as good as never sent.
                    in_flight.not_sent();
                    tracing::debug!(cluster = cluster.name(), endpoint = endpoint.address(), %error, "call not processed; trying another endpoint");
                    failed = Failed::Nothing(format!("{}: {error}", endpoint.address()).into());
                    if shared.can_replay() {
                        continue;
                    }
                    shared.cancel();
                    return give_up(failed, cluster, &tried, total, full);
                }
                in_flight.finished(Outcome::Reset);
                answered += 1;
                let code = grpc::code_for_upstream_error(&error);
                failed = Failed::Broke(ProxyError::UpstreamFailed {
                    cluster: name(),
                    endpoint: endpoint.address().to_string(),
                    code,
                    reason: grpc::describe(&error),
                });
                if !(wants_retry(policy, code, answered) && shared.can_replay()) {
                    shared.cancel();
                    return give_up(failed, cluster, &tried, total, full);
                }
            }
        }
        // A retry of a call that reached an endpoint: under the budget,
        // after a backoff, and only if the backoff ends before the deadline.
        let policy = policy.expect("wants_retry holds only with a policy");
        if let Some(budget) = cluster.retry_budget() {
            if !budget.try_withdraw(Instant::now()) {
                cluster
                    .stats()
                    .retries_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(cluster = cluster.name(), "retry budget spent; not retrying");
                shared.cancel();
                return give_up(failed, cluster, &tried, total, full);
            }
        }
        let pause = backoff(policy, answered);
        if Instant::now() + pause >= deadline.at {
            shared.cancel();
            return give_up(failed, cluster, &tried, total, full);
        }
        cluster.stats().retries.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            cluster = cluster.name(),
            attempt = answered + 1,
            ?pause,
            "retrying on another endpoint"
        );
        Box::pin(tokio::time::sleep(pause)).await;
    }
}

/// Whether a call may pass over an endpoint that is not connected yet: it
/// carries no session key (a session stays where it is pinned), and some
/// other endpoint it has not tried is connected.
fn may_go_elsewhere(
    cluster: &Cluster,
    req: &Request<RequestBody>,
    snapshot: &Snapshot,
    tried: &Tried,
) -> bool {
    let pinned = cluster
        .affinity()
        .is_some_and(|a| a.key(req.headers()).is_some());
    !pinned
        && snapshot
            .ready()
            .iter()
            .any(|e| !tried.contains(e.id()) && e.connection().is_open())
}

/// Whether the policy retries a call whose `answered`-th attempt ended with
/// `code` before any response message.
fn wants_retry(policy: Option<&RetryConfig>, code: tonic::Code, answered: u32) -> bool {
    policy.is_some_and(|p| p.on.contains(&code) && answered < p.max_attempts.get())
}

/// Exponential backoff with full jitter: a random pause of up to
/// `backoff * 2^(n-1)`, capped at `max_backoff`.
fn backoff(policy: &RetryConfig, retry: u32) -> Duration {
    let ceiling = policy
        .backoff
        .saturating_mul(1 << retry.saturating_sub(1).min(16))
        .min(policy.max_backoff);
    ceiling.mul_f64(fastrand::f64())
}

/// The answer when no attempt is left: the endpoint's own answer if one
/// came, else what the proxy saw.
fn give_up(
    failed: Failed,
    cluster: &Cluster,
    tried: &Tried,
    total: usize,
    full: usize,
) -> Result<Response<ResponseBody>, ProxyError> {
    match failed {
        Failed::Answered(response) => Ok(*response),
        Failed::Broke(error) => Err(error),
        Failed::Nothing(_) if full > 0 && full == tried.len() => {
            let error = ProxyError::EndpointsFull {
                cluster: cluster.name().to_string(),
                max: cluster.config().max_in_flight_per_endpoint,
                full,
            };
            cluster.refused(&cluster.stats().endpoints_full, &error);
            Err(error)
        }
        Failed::Nothing(last) => Err(ProxyError::NoEndpointReachable {
            cluster: cluster.name().to_string(),
            tried: tried.len(),
            total,
            last: last.into_owned(),
        }),
    }
}

/// Runs `f` until `deadline`; `None` if the deadline came first. When both
/// are ready at once the deadline wins, so that an answer racing the
/// deadline is not mistaken for one that beat it.
async fn within<F: Future>(deadline: Instant, f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    // Most of what is awaited here is ready at once (a pooled connection):
    // arm no timer for it.
    let first = std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await;
    if let Poll::Ready(out) = first {
        return (Instant::now() < deadline).then_some(out);
    }
    let mut timer = std::pin::pin!(Timer::at(deadline));
    std::future::poll_fn(|cx| {
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        f.as_mut().poll(cx).map(Some)
    })
    .await
}

/// How one attempt's request went.
enum Exchange {
    /// The response headers came (the request body may still be on its way).
    Answered(Response<h2::RecvStream>),
    /// The stream broke before the response headers.
    Broke(h2::Error),
    /// The stream never opened (the connection had closed): the endpoint
    /// saw nothing. The body is handed back for the next try.
    Unsent(RequestBody, h2::Error),
}

/// Opens a stream for `req` on `sender` and sends its body while waiting
/// for the response headers. A body still being sent when they come (a
/// client or bidirectional stream) goes on in a task of its own; a unary
/// request is sent whole before its answer and needs none.
async fn exchange(sender: &mut Sender, req: Request<RequestBody>) -> Exchange {
    let (parts, body) = req.into_parts();
    let end = body.is_end_stream();
    let (mut response, stream) = match sender.send_request(Request::from_parts(parts, ()), end) {
        Ok(opened) => opened,
        Err(e) => return Exchange::Unsent(body, e),
    };
    let mut pump = (!end).then(|| Pump::new(body, stream));
    let answer = std::future::poll_fn(|cx| {
        if let Some(p) = pump.as_mut() {
            if p.poll(cx).is_ready() {
                pump = None;
            }
        }
        Pin::new(&mut response).poll(cx)
    })
    .await;
    match answer {
        Ok(response) => {
            if let Some(pump) = pump {
                tokio::spawn(pump.run());
            }
            Exchange::Answered(response)
        }
        Err(e) => Exchange::Broke(e),
    }
}

/// What the attempts of one call share: the caller's request body and what
/// has been read of it, and whether the call was given up, so that the
/// request half stops and resets the upstream stream.
struct CallShared {
    cancelled: AtomicBool,
    waker: AtomicWaker,
    body: Mutex<Replay>,
}

/// The caller's body, read once and kept (up to `limit`) for the next
/// attempt, as Linkerd's `ReplayBody` does.
struct Replay {
    source: Received,
    /// Data frames read so far, while they fit in `limit`.
    kept: Kept,
    kept_len: usize,
    limit: usize,
    /// The body outgrew `limit`: no attempt can start over.
    overflowed: bool,
    trailers: Option<HeaderMap>,
    /// The source is done (ended, or broke).
    ended: bool,
    broke: bool,
    /// A frame read ahead of its turn (see [`Replay::look_ahead`]).
    ahead: Option<Frame<Bytes>>,
    /// The attempt whose body may read; older attempts' bodies fail.
    attempt: u32,
}

impl Replay {
    /// The caller's request stream failed: every attempt's body fails, and
    /// the upstream stream is reset.
    fn broke_off(&mut self, error: &h2::Error) {
        tracing::debug!(%error, "caller's request stream broke; resetting upstream");
        self.ended = true;
        self.broke = true;
    }

    /// After a data frame, reads on if the next frame is there already: a
    /// caller's library often ends a unary request with an empty DATA frame
    /// of its own, and knowing the body has ended lets the last data frame
    /// carry END_STREAM (one frame and one write fewer per call upstream).
    fn look_ahead(&mut self, cx: &mut Context<'_>) {
        if self.ended || self.ahead.is_some() {
            return;
        }
        loop {
            match Pin::new(&mut self.source).poll_frame(cx) {
                Poll::Pending => return,
                Poll::Ready(None) => {
                    self.ended = true;
                    return;
                }
                Poll::Ready(Some(Err(e))) => {
                    self.broke_off(&e);
                    return;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if frame.data_ref().is_some_and(|d| d.is_empty()) {
                        continue;
                    }
                    self.ahead = Some(frame);
                    return;
                }
            }
        }
    }
}

impl CallShared {
    fn new(source: Received, limit: usize) -> CallShared {
        CallShared {
            cancelled: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            body: Mutex::new(Replay {
                source,
                kept: Kept::default(),
                kept_len: 0,
                limit,
                overflowed: false,
                trailers: None,
                ended: false,
                broke: false,
                ahead: None,
                attempt: 0,
            }),
        }
    }

    fn replay(&self) -> MutexGuard<'_, Replay> {
        lock(&self.body)
    }

    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Whether another attempt could send the whole body from its start.
    fn can_replay(&self) -> bool {
        let r = self.replay();
        !r.overflowed && !r.broke && !self.is_cancelled()
    }

    /// The body, locked, if `attempt` still owns it: the call was not given
    /// up and no later attempt took the body over. Registers `cx` to be
    /// woken when either happens.
    fn owned_by(&self, attempt: u32, cx: &mut Context<'_>) -> Option<MutexGuard<'_, Replay>> {
        if self.is_cancelled() {
            return None;
        }
        self.waker.register(cx.waker());
        if self.is_cancelled() {
            return None;
        }
        let r = self.replay();
        (r.attempt == attempt).then_some(r)
    }

    /// Starts the next attempt, if the body can be sent again.
    fn new_attempt(&self) -> Option<u32> {
        let mut r = self.replay();
        if r.overflowed || r.broke || self.is_cancelled() {
            return None;
        }
        r.attempt += 1;
        // The attempt before may be waiting on the caller's body: wake it
        // to find that it is over (it then resets its stream).
        self.waker.wake();
        Some(r.attempt)
    }
}

/// The kept data frames: a unary call's one frame needs no allocation.
#[derive(Default)]
enum Kept {
    #[default]
    None,
    One(Bytes),
    Many(Vec<Bytes>),
}

impl Kept {
    fn len(&self) -> usize {
        match self {
            Kept::None => 0,
            Kept::One(_) => 1,
            Kept::Many(v) => v.len(),
        }
    }

    fn push(&mut self, data: Bytes) {
        *self = match std::mem::take(self) {
            Kept::None => Kept::One(data),
            Kept::One(first) => Kept::Many(vec![first, data]),
            Kept::Many(mut v) => {
                v.push(data);
                Kept::Many(v)
            }
        };
    }

    /// The `i`th frame; `i < len()`.
    fn get(&self, i: usize) -> Bytes {
        match self {
            Kept::None => Bytes::new(),
            Kept::One(b) => b.clone(),
            Kept::Many(v) => v.get(i).cloned().unwrap_or_default(),
        }
    }
}

/// A request body on its way to the endpoint: the caller's, replayed for a
/// later attempt.
///
/// Fails with `CANCEL` once the call is given up, which resets the upstream
/// stream even while the caller is still sending.
pub struct RequestBody {
    shared: Arc<CallShared>,
    attempt: u32,
    /// The next kept frame to replay.
    pos: usize,
    trailers_sent: bool,
}

impl RequestBody {
    fn call(shared: Arc<CallShared>, attempt: u32) -> RequestBody {
        RequestBody {
            shared,
            attempt,
            pos: 0,
            trailers_sent: false,
        }
    }
}

impl Abandon for RequestBody {
    /// The call was given up (deadline, caller gone) or a later attempt
    /// took the body over.
    fn poll_abandoned(&mut self, cx: &mut Context<'_>) -> bool {
        self.shared.owned_by(self.attempt, cx).is_none()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let RequestBody {
            shared,
            attempt,
            pos,
            trailers_sent,
        } = self.get_mut();
        let cancelled = || Poll::Ready(Some(Err(h2::Reason::CANCEL.into())));
        let Some(mut r) = shared.owned_by(*attempt, cx) else {
            return cancelled();
        };
        if !r.overflowed && *pos < r.kept.len() {
            *pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(r.kept.get(*pos - 1)))));
        }
        if r.ended {
            if r.broke {
                return cancelled();
            }
            if !*trailers_sent {
                *trailers_sent = true;
                if let Some(t) = r.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        let next = match r.ahead.take() {
            Some(frame) => Some(Ok(frame)),
            None => ready!(Pin::new(&mut r.source).poll_frame(cx)),
        };
        match next {
            Some(Ok(frame)) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        if !r.overflowed {
                            r.kept_len += data.len();
                            if r.kept_len > r.limit {
                                r.overflowed = true;
                                r.kept = Kept::default();
                            } else {
                                r.kept.push(data.clone());
                                *pos += 1;
                            }
                        }
                        r.look_ahead(cx);
                        Frame::data(data)
                    }
                    Err(frame) => {
                        if let Some(t) = frame.trailers_ref() {
                            // Trailers end a body.
                            r.trailers = Some(t.clone());
                            r.ended = true;
                            *trailers_sent = true;
                        }
                        frame
                    }
                };
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                r.broke_off(&e);
                cancelled()
            }
            None => {
                r.ended = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Told right, this lets the last data frame carry END_STREAM
        // instead of an empty frame after it (which servers count against
        // a flood limit).
        let r = self.shared.replay();
        let replayed = r.overflowed || self.pos >= r.kept.len();
        replayed
            && r.ahead.is_none()
            && if r.ended {
                !r.broke && (self.trailers_sent || r.trailers.is_none())
            } else {
                r.source.is_end_stream()
            }
    }
}

/// A call in flight on an endpoint. Dropped before the response finished,
/// it gives the call up.
struct CallGuard {
    state: Arc<CallShared>,
    in_flight: InFlight,
    /// The call's place under the cluster's `max_in_flight`.
    #[allow(dead_code)]
    admitted: Admitted,
    cluster: Arc<Cluster>,
    deadline: Deadline,
    finished: bool,
    /// The outcome was counted already (a trailers-only answer).
    recorded: bool,
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
    Armed(Pin<Box<Timer>>),
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
            grpc::put_status(&mut trailers, &error.to_status());
        }
        Frame::trailers(trailers)
    }

    /// The response ended with `trailers`.
    fn finish(&mut self, trailers: &HeaderMap) {
        if let Some(mut guard) = self.guard.take() {
            guard.finished = true;
            guard.record(grpc::status_code(trailers).map_or(Outcome::Reset, Outcome::Status));
        }
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.deadline {
            None => false,
            Some(DeadlineTimer::At(at)) => Instant::now() >= *at,
            Some(DeadlineTimer::Armed(timer)) => timer.as_mut().poll(cx).is_ready(),
        }
    }

    /// Arms the deadline's timer, now that the body waits.
    fn arm(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(DeadlineTimer::At(at)) = self.deadline {
            let mut timer = Box::pin(Timer::at(at));
            let fired = timer.as_mut().poll(cx).is_ready();
            self.deadline = Some(DeadlineTimer::Armed(timer));
            return fired;
        }
        false
    }

    fn deadline_exceeded(&mut self) -> Frame<Bytes> {
        self.abort(Outcome::Status(tonic::Code::DeadlineExceeded), |g| {
            ProxyError::DeadlineExceeded {
                cluster: g.cluster.name().to_string(),
                timeout: g.deadline.timeout,
                set_by: g.deadline.source,
                phase: format!("while {} was responding", g.endpoint_address()),
            }
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
