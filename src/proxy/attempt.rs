//! One call's attempts, step by step: take the request (the first, or the
//! kept body replayed), claim an endpoint, send, judge the answer, and back
//! off before a retry. Each step either leads to the next, or says where the
//! call goes instead ([`Flow`]): another attempt at once, a retry after a
//! backoff, or the end of the call.

use std::borrow::Cow;
use std::cell::RefCell;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use futures_util::future::Either;
use http::{Request, Response};
use http_body::Body;
use tokio::time::Instant;

use super::error::ProxyError;
use super::replay::{CallShared, RequestBody, Template};
use super::response::{CallGuard, ResponseBody};
use super::retry::{Failed, backoff, give_up, wants_retry};
use super::{Deadline, REPLAY_LIMIT};
use crate::balance::explain::Explanation;
use crate::balance::{Call, Snapshot, Tried};
use crate::cluster::{Admitted, Cluster};
use crate::config::RetryConfig;
use crate::endpoint::{Endpoint, InFlight, Outcome, Refused, Sender};
use crate::telemetry::otlp::Attr;
use crate::telemetry::trace::CallSpan;
use crate::wire::grpc;
use crate::wire::stream::{Pump, Received};
use crate::wire::timer::Timer;

/// What the caller gets.
pub(super) type Answer = Result<Response<ResponseBody>, ProxyError>;

/// Where a call goes after a step that did not lead to the next one.
pub(super) enum Flow {
    /// Another attempt, now.
    Again,
    /// Another attempt, after [`Attempts::back_off`]: the last one reached
    /// an endpoint, and the retry policy wants the call sent again.
    Retry,
    /// The call is over: [`Attempts::answer`] has the caller's answer.
    Done,
}

/// An endpoint that took a place for the call.
pub(super) struct Claimed {
    endpoint: Arc<Endpoint>,
    in_flight: InFlight,
    /// Its pooled connection, if it had one when claimed.
    pooled: Option<Sender>,
}

/// What came of sending: the response headers, or a broken stream.
pub(super) struct Sent {
    endpoint: Arc<Endpoint>,
    in_flight: InFlight,
    result: Result<Response<h2::RecvStream>, h2::Error>,
}

/// The state one call's attempts share.
pub(super) struct Attempts {
    cluster: Arc<Cluster>,
    deadline: Deadline,
    /// Whether the cluster's retry policy covers the call's method.
    retries: bool,
    admitted: Option<Admitted>,
    template: Template,
    shared: Arc<CallShared>,
    /// The request for the next attempt, when one is at hand.
    next: Option<RequestBody>,
    snapshot: Arc<Snapshot>,
    /// Endpoints picked: sent the call, or passed over.
    tried: Tried,
    /// Of `tried`, those the call went to (a connect, or the request).
    sent_to: usize,
    /// Endpoints passed over because they carried their limit of calls.
    full: usize,
    /// An endpoint whose breaker refused the call, to send it to anyway if
    /// no other takes it: then no endpoint takes calls, and the cluster is
    /// in panic for this call.
    refused_by_breaker: Option<Arc<Endpoint>>,
    /// Attempts that reached an endpoint.
    answered: u32,
    failed: Failed,
    /// An endpoint passed over while it connected, to wait for if no
    /// other takes the call.
    connecting: Option<Arc<Endpoint>>,
    /// Set when a step ends the call (boxed: it is set on failures only,
    /// and the attempts are held as long as the call is open).
    answer: Option<Box<Answer>>,
    /// The call's span, when it is sampled; handed to the response body
    /// once there is one.
    trace: Option<Box<CallSpan>>,
}

impl Attempts {
    /// A call admitted to `cluster`: its body is kept for replay up to the
    /// retry policy's bound, and the retry budget counts it.
    pub(super) fn new(
        cluster: Arc<Cluster>,
        req: Request<h2::RecvStream>,
        deadline: Deadline,
        admitted: Admitted,
        trace: Option<Box<CallSpan>>,
    ) -> Attempts {
        let config = cluster.config();
        let policy = config.retry.as_ref().filter(|r| r.covers(req.uri().path()));
        let retries = policy.is_some();
        if retries {
            if let Some(budget) = cluster.retry_budget() {
                budget.deposit(Instant::now());
            }
        }
        let (parts, body) = req.into_parts();
        let template = Template::new(parts);
        let limit = policy.map_or(REPLAY_LIMIT, |p| p.buffer_limit);
        let snapshot = cluster.snapshot();
        let shared = Arc::new(CallShared::new(Received::new(body), limit));
        let next = Some(RequestBody::call(shared.clone(), 0));
        Attempts {
            cluster,
            deadline,
            retries,
            admitted: Some(admitted),
            template,
            shared,
            next,
            snapshot,
            tried: Tried::default(),
            sent_to: 0,
            full: 0,
            refused_by_breaker: None,
            answered: 0,
            failed: Failed::Nothing(Cow::Borrowed("the cluster has no ready endpoint")),
            connecting: None,
            answer: None,
            trace,
        }
    }

    /// Runs the attempts until one gives the caller's answer.
    pub(super) async fn run(&mut self) -> Answer {
        loop {
            let flow = match self.attempt().await {
                Ok(response) => return Ok(response),
                Err(flow) => flow,
            };
            match flow {
                Flow::Again => {}
                Flow::Retry => {
                    if let Err(Flow::Done) = self.back_off().await {
                        return self.answer();
                    }
                }
                Flow::Done => return self.answer(),
            }
        }
    }

    /// One attempt: each step leads to the next, or says where the call
    /// goes instead.
    async fn attempt(&mut self) -> Result<Response<ResponseBody>, Flow> {
        self.request()?;
        let claimed = self.claim()?;
        let sent = self.send(claimed).await?;
        self.judge(sent)
    }

    pub(super) fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The call's span, if it is sampled and no response took it.
    pub(super) fn take_trace(&mut self) -> Option<Box<CallSpan>> {
        self.trace.take()
    }

    /// The cluster's retry policy, if it covers the call's method.
    fn policy(&self) -> Option<&RetryConfig> {
        self.cluster
            .config()
            .retry
            .as_ref()
            .filter(|_| self.retries)
    }

    /// Notes on the span, if the call has one.
    fn note(&mut self, f: impl FnOnce(&mut CallSpan)) {
        if let Some(span) = self.trace.as_deref_mut() {
            f(span);
        }
    }

    /// Makes the request for this attempt ready in `next`: the first, or
    /// the kept body replayed. It stays there until it is sent.
    fn request(&mut self) -> Result<(), Flow> {
        if self.next.is_some() {
            return Ok(());
        }
        match self.shared.new_attempt() {
            Some(attempt) => {
                self.next = Some(RequestBody::call(self.shared.clone(), attempt));
                Ok(())
            }
            // The body went past the buffer: it cannot be sent again.
            None => Err(self.give_up()),
        }
    }

    /// Picks an endpoint the call has not tried and takes a place on it.
    /// Passes over (for another attempt at once) an endpoint that is not
    /// connected while another is, warming its connection, and one that
    /// refuses the call; gives up when none is left. In panic mode an
    /// endpoint's breaker refuses nothing; nor does it when every other
    /// endpoint was passed over.
    fn claim(&mut self) -> Result<Claimed, Flow> {
        if self.next.is_none() {
            return Err(Flow::Again);
        }
        // A sampled call notes why it went where it went.
        let explain = self.trace.is_some().then(RefCell::<Explanation>::default);
        let call = Call {
            explain: explain.as_ref(),
            ..Call::new(self.template.path(), self.template.headers())
        };
        let picked = self
            .snapshot
            .pick(&call, &self.tried, self.cluster.affinity())
            .cloned();
        if let (Some(x), Some(e)) = (explain, &picked) {
            self.note(|t| t.picked(e, x.into_inner()));
        }
        let mut panic = self.snapshot.is_panic();
        let (endpoint, waited_for) = match picked {
            Some(e) => (e, false),
            // Every other endpoint was full or refused: wait for the one
            // passed over while it connected, or send the call past a
            // breaker (no endpoint takes calls: panic, for this call).
            None => match (self.connecting.take(), self.refused_by_breaker.take()) {
                (Some(e), _) => (e, true),
                (None, Some(e)) => {
                    panic = true;
                    (e, false)
                }
                (None, None) => return Err(self.give_up()),
            },
        };
        self.tried.insert(endpoint.id());
        let pooled = endpoint.connection().pooled();
        if pooled.is_none() && !waited_for && self.may_go_elsewhere() {
            // Connecting takes a round trip at best and a connect timeout
            // at worst (a draining or unplugged endpoint): it goes on in the
            // background while this call goes to a connected endpoint.
            endpoint.connection().warm();
            self.passed_over(&endpoint, "not connected yet");
            self.connecting.get_or_insert(endpoint);
            return Err(Flow::Again);
        }
        let max = self.cluster.config().max_in_flight_per_endpoint;
        let entered = if panic {
            endpoint.try_start_call_in_panic(max)
        } else {
            endpoint.try_start_call(max)
        };
        match entered {
            Ok(in_flight) => {
                self.note(|t| t.attempt(endpoint.address_shared()));
                self.sent_to += 1;
                Ok(Claimed {
                    endpoint,
                    in_flight,
                    pooled,
                })
            }
            Err(refused) => {
                self.full += usize::from(refused == Refused::Full);
                self.passed_over(
                    &endpoint,
                    match refused {
                        Refused::Full => "max_in_flight_per_endpoint reached",
                        Refused::Breaker => "its circuit breaker is open",
                        Refused::Removed => "removed from the cluster",
                    },
                );
                if refused == Refused::Breaker {
                    self.refused_by_breaker.get_or_insert(endpoint);
                }
                Err(Flow::Again)
            }
        }
    }

    /// Notes why the call did not go to `endpoint`; that is the reason
    /// the caller is given if the call goes nowhere else.
    fn passed_over(&mut self, endpoint: &Arc<Endpoint>, why: &'static str) {
        self.note(|t| t.passed_over(endpoint.address(), why));
        if self.sent_to == 0 {
            self.failed =
                Failed::Nothing(format!("{} passed over: {why}", endpoint.address()).into());
        }
    }

    /// Whether a call may pass over an endpoint that is not connected yet:
    /// it carries no session key (a session stays where it is pinned), and
    /// some other endpoint it has not tried is connected.
    fn may_go_elsewhere(&self) -> bool {
        let pinned = self
            .cluster
            .affinity()
            .is_some_and(|a| a.key(self.template.headers()).is_some());
        !pinned
            && self
                .snapshot
                .ready()
                .iter()
                .any(|e| !self.tried.contains(e.id()) && e.connection().is_open())
    }

    /// Sends the request on the claimed endpoint, connecting first if it
    /// has no connection, and waits for the response headers, or for the
    /// stream to break. A call handed back unsent (the connection closed
    /// under it) gets one more try on the same endpoint, over a fresh
    /// connection.
    async fn send(&mut self, claimed: Claimed) -> Result<Sent, Flow> {
        let Claimed {
            endpoint,
            mut in_flight,
            mut pooled,
        } = claimed;
        let mut handed_back = false;
        loop {
            let mut sender = match pooled.take().or_else(|| endpoint.connection().pooled()) {
                Some(sender) => sender,
                None => match within(self.deadline.at, endpoint.connection().connect_boxed()).await
                {
                    None => {
                        in_flight.not_sent();
                        self.note(|t| {
                            t.attempt_ended(endpoint.address(), "deadline passed while connecting")
                        });
                        let phase = format!("while connecting to {}", endpoint.address());
                        return Err(self.end(Err(self.expired(phase))));
                    }
                    Some(Err(e)) => {
                        tracing::debug!(cluster = self.cluster.name(), error = %e, "endpoint unreachable; trying another");
                        self.note(|t| {
                            t.attempt_ended(endpoint.address(), &format!("connect failed: {e}"))
                        });
                        endpoint.connect_failed(&e);
                        in_flight.not_sent();
                        self.failed = Failed::Nothing(e.to_string().into());
                        return Err(Flow::Again);
                    }
                    Some(Ok(sender)) => sender,
                },
            };
            let now = Instant::now();
            if now >= self.deadline.at {
                // Nothing was sent: the endpoint is not to blame (a caller
                // may send a deadline that has passed already).
                in_flight.not_sent();
                let phase = format!("before the call was sent to {}", endpoint.address());
                return Err(self.end(Err(self.expired(phase))));
            }
            let Some(body) = self.next.take() else {
                in_flight.not_sent();
                return Err(Flow::Again);
            };
            // In a block of its own: the request is handed on before the
            // wait, and must not be kept beside it.
            let exchanged = {
                let mut req = self.template.request(body);
                if self.deadline.own.is_some() {
                    grpc::set_remaining(
                        req.headers_mut(),
                        self.deadline.at.saturating_duration_since(now),
                        self.deadline.own,
                    );
                }
                exchange(&mut sender, req, now)
            };
            // Dropping the exchange (deadline, caller gone) resets the
            // upstream stream (see `Awaited`); the in-flight count ends with
            // it.
            return match within(self.deadline.at, exchanged).await {
                None => {
                    in_flight.finished(self.deadline.outcome());
                    self.note(|t| {
                        t.attempt_ended(
                            endpoint.address(),
                            "deadline passed waiting for the answer",
                        )
                    });
                    self.shared.cancel();
                    let phase = format!("waiting for {} to answer", endpoint.address());
                    Err(self.end(Err(self.expired(phase))))
                }
                Some(Exchange::Answered(response)) => Ok(Sent {
                    endpoint,
                    in_flight,
                    result: Ok(response),
                }),
                Some(Exchange::Broke(e)) => Ok(Sent {
                    endpoint,
                    in_flight,
                    result: Err(e),
                }),
                Some(Exchange::Unsent(body, e)) => {
                    // The connection closed (or went away) before the
                    // stream opened: nothing was sent.
                    self.next = Some(body);
                    self.note(|t| {
                        t.attempt_ended(endpoint.address(), "not sent: the connection closed")
                    });
                    if handed_back {
                        in_flight.not_sent();
                        self.failed = Failed::Nothing(
                            format!("{}: {}", endpoint.address(), grpc::describe(&e)).into(),
                        );
                        return Err(Flow::Again);
                    }
                    handed_back = true;
                    tracing::debug!(cluster = self.cluster.name(), endpoint = endpoint.address(), error = %e, "call handed back unsent; one more try");
                    continue;
                }
            };
        }
    }

    /// What the endpoint's answer means: the caller's response, or a retry
    /// ([`Flow::Retry`]) that the policy wants, of a body that can be sent
    /// again.
    fn judge(&mut self, sent: Sent) -> Result<Response<ResponseBody>, Flow> {
        let Sent {
            endpoint,
            mut in_flight,
            result,
        } = sent;
        match result {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                let trailers_only = grpc::status_code(&parts.headers);
                // The endpoint's HTTP layer refused the request itself
                // (431 for headers too large): the caller gets that answer
                // as it came, and it says nothing of the endpoint.
                let refused = trailers_only.is_none() && grpc::refuses_the_request(parts.status);
                match trailers_only {
                    Some(code) => in_flight.finished(self.shared.outcome_of(code)),
                    None if refused => in_flight
                        .finished(Outcome::Excused(grpc::code_for_http_status(parts.status))),
                    None => in_flight.responded(),
                }
                self.note(|t| {
                    t.attempt_ended(
                        endpoint.address(),
                        match trailers_only {
                            Some(code) => grpc::code_name(code),
                            None if refused => "refused the request",
                            None => "answered",
                        },
                    )
                });
                self.answered += 1;
                let retry = trailers_only.is_some_and(|code| {
                    wants_retry(self.policy(), code, self.answered) && self.shared.can_replay()
                });
                let mut body = ResponseBody::new(body, self.deadline.at);
                if retry {
                    self.failed = Failed::Answered(Box::new(Response::from_parts(parts, body)));
                    return Err(Flow::Retry);
                }
                let mut trace = self.trace.take();
                if let Some(code) = trailers_only {
                    // The answer is whole already: the call is over.
                    if let Some(span) = trace.take() {
                        span.end(code, grpc::message(&parts.headers).unwrap_or_default());
                    }
                }
                body.guard(CallGuard {
                    trace,
                    state: self.shared.clone(),
                    in_flight,
                    _admitted: self.admitted.take(),
                    cluster: self.cluster.clone(),
                    deadline: self.deadline,
                    finished: false,
                    recorded: trailers_only.is_some() || refused,
                });
                Ok(Response::from_parts(parts, body))
            }
            Err(error) if grpc::is_unprocessed(&error) => {
                // Refused or cut off by GOAWAY before the endpoint
                // processed it: as good as never sent.
                in_flight.not_sent();
                self.note(|t| {
                    t.attempt_ended(endpoint.address(), &format!("not processed: {error}"))
                });
                tracing::debug!(cluster = self.cluster.name(), endpoint = endpoint.address(), %error, "call not processed; trying another endpoint");
                self.failed = Failed::Nothing(format!("{}: {error}", endpoint.address()).into());
                if self.shared.can_replay() {
                    return Err(Flow::Again);
                }
                self.shared.cancel();
                Err(self.give_up())
            }
            Err(error) => {
                let code = grpc::code_for_upstream_error(&error);
                // A stream the sidecar reset itself, because the caller's
                // request broke on its way, says nothing of the endpoint.
                in_flight.finished(if self.shared.caller_broke() {
                    Outcome::Excused(code)
                } else {
                    Outcome::Reset
                });
                self.answered += 1;
                self.note(|t| {
                    t.attempt_ended(
                        endpoint.address(),
                        &format!("stream broke: {}", grpc::describe(&error)),
                    )
                });
                self.failed = Failed::Broke(Box::new(ProxyError::UpstreamFailed {
                    cluster: self.cluster.name().to_string(),
                    endpoint: endpoint.address().to_string(),
                    code,
                    reason: grpc::describe(&error),
                }));
                if wants_retry(self.policy(), code, self.answered) && self.shared.can_replay() {
                    return Err(Flow::Retry);
                }
                self.shared.cancel();
                Err(self.give_up())
            }
        }
    }

    /// Before a retry of a call that reached an endpoint: the retry budget
    /// must allow it, and the backoff must end before the deadline.
    async fn back_off(&mut self) -> Result<(), Flow> {
        let Some(pause) = self.policy().map(|p| backoff(p, self.answered)) else {
            // A retry is judged wanted only under a policy.
            self.shared.cancel();
            return Err(self.give_up());
        };
        if let Some(budget) = self.cluster.retry_budget() {
            if !budget.try_withdraw(Instant::now()) {
                let stats = self.cluster.stats();
                stats.retries_refused.fetch_add(1, Ordering::Relaxed);
                self.note(|t| t.retry_refused("the retry budget is spent"));
                tracing::debug!(
                    cluster = self.cluster.name(),
                    "retry budget spent; not retrying"
                );
                self.shared.cancel();
                return Err(self.give_up());
            }
        }
        if Instant::now() + pause >= self.deadline.at {
            self.note(|t| t.retry_refused("the backoff would pass the deadline"));
            self.shared.cancel();
            return Err(self.give_up());
        }
        let attempt = i64::from(self.answered + 1);
        self.note(|t| {
            t.event(
                "retry",
                &[
                    ("agentmesh.attempt", Attr::Int(attempt)),
                    ("agentmesh.backoff_ms", Attr::Int(pause.as_millis() as i64)),
                ],
            )
        });
        self.cluster.stats().retries.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            cluster = self.cluster.name(),
            attempt = self.answered + 1,
            ?pause,
            "retrying on another endpoint"
        );
        Box::pin(tokio::time::sleep(pause)).await;
        Ok(())
    }

    /// Ends the call with the last attempt's answer.
    fn give_up(&mut self) -> Flow {
        let answer = self.last_answer();
        self.end(answer)
    }

    /// The caller's answer, once a step returned [`Flow::Done`].
    fn answer(&mut self) -> Answer {
        match self.answer.take() {
            Some(answer) => *answer,
            None => self.last_answer(),
        }
    }

    /// Ends the call with `answer`.
    fn end(&mut self, answer: Answer) -> Flow {
        self.answer = Some(Box::new(answer));
        Flow::Done
    }

    fn last_answer(&mut self) -> Answer {
        let failed = std::mem::replace(&mut self.failed, Failed::Nothing(Cow::Borrowed("")));
        let total = self.snapshot.ready().len();
        give_up(
            failed,
            &self.cluster,
            &self.tried,
            self.sent_to,
            total,
            self.full,
        )
    }

    fn expired(&self, phase: String) -> ProxyError {
        ProxyError::DeadlineExceeded {
            cluster: self.cluster.name().to_string(),
            timeout: self.deadline.timeout,
            set_by: self.deadline.source,
            phase,
        }
    }
}

/// Runs `f` until `deadline`; `None` if the deadline came first. When both
/// are ready at once the deadline wins, so that an answer racing the
/// deadline is not mistaken for one that beat it; so does a deadline that
/// passed while its timer had yet to fire (timers fire on the next tick).
/// An endpoint that was sent the deadline gives up no sooner than the
/// proxy does (see [`grpc::set_remaining`]): its own answer to it
/// (CANCELLED "Timeout expired" from tonic) arrives when the deadline has
/// passed, and the caller gets the proxy's DEADLINE_EXCEEDED instead.
fn within<F: Future>(deadline: Instant, f: F) -> Within<F> {
    Within {
        f,
        timer: None,
        deadline,
    }
}

pin_project_lite::pin_project! {
    /// The future of [`within`]: a struct rather than an `async fn`, which
    /// would keep `f` twice (as given, and pinned in its body) in every
    /// call's future.
    struct Within<F> {
        #[pin]
        f: F,
        // Armed only when `f` is not ready at its first poll: most of what
        // is awaited here is ready at once (a pooled connection).
        #[pin]
        timer: Option<Timer>,
        deadline: Instant,
    }
}

impl<F: Future> Future for Within<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(timer) = this.timer.as_mut().as_pin_mut() {
            if timer.poll(cx).is_ready() {
                return Poll::Ready(None);
            }
        }
        if let Poll::Ready(out) = this.f.poll(cx) {
            return Poll::Ready((Instant::now() < *this.deadline).then_some(out));
        }
        if this.timer.is_none() {
            this.timer.set(Some(Timer::at(*this.deadline)));
            if let Some(timer) = this.timer.as_pin_mut() {
                if timer.poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
            }
        }
        Poll::Pending
    }
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
/// request is sent whole before its answer and needs none. The stream is
/// opened before the future is made, which then holds what it waits on and
/// nothing of the request.
fn exchange(
    sender: &mut Sender,
    req: Request<RequestBody>,
    now: Instant,
) -> impl Future<Output = Exchange> + Send + use<> {
    let (parts, body) = req.into_parts();
    let end = body.is_end_stream();
    let (response, stream) = match sender.send_request(Request::from_parts(parts, ()), end) {
        Ok(opened) => opened,
        Err(e) => return Either::Left(std::future::ready(Exchange::Unsent(body, e))),
    };
    let mut response = Awaited {
        response: Some(response),
        opened: now,
    };
    let mut pump = (!end).then(|| Pump::new(body, stream));
    Either::Right(async move {
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
    })
}

/// An upstream stream is not reset sooner than this after it was opened...
const SETTLE: Duration = Duration::from_millis(50);
/// ...unless this many are held back already.
const SETTLING_MAX: usize = 4096;
/// Streams held back now.
static SETTLING: AtomicUsize = AtomicUsize::new(0);

/// The answer to a request sent upstream, awaited. Dropped before it came
/// (the caller reset the call, or the deadline passed) while the stream is
/// younger than [`SETTLE`], it is held for the rest of that time in a task
/// of its own before the stream is reset. An endpoint's HTTP/2 server
/// counts the streams reset before its application took them, and closes
/// the whole connection when there are too many (h2's "too_many_resets"):
/// a caller that resets its calls as soon as they are forwarded would cost
/// every call on the shared upstream connection.
struct Awaited {
    response: Option<h2::client::ResponseFuture>,
    opened: Instant,
}

impl Future for Awaited {
    type Output = Result<Response<h2::RecvStream>, h2::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let Some(response) = self.response.as_mut() else {
            return Poll::Pending;
        };
        let answer = std::task::ready!(Pin::new(response).poll(cx));
        self.response = None;
        Poll::Ready(answer)
    }
}

impl Drop for Awaited {
    fn drop(&mut self) {
        let Some(response) = self.response.take() else {
            return;
        };
        let settled = self.opened + SETTLE;
        let now = Instant::now();
        if now >= settled || SETTLING.load(Ordering::Relaxed) >= SETTLING_MAX {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        SETTLING.fetch_add(1, Ordering::Relaxed);
        runtime.spawn(async move {
            let _ = tokio::time::timeout_at(settled, response).await;
            SETTLING.fetch_sub(1, Ordering::Relaxed);
        });
    }
}
