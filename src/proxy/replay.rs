//! The request body, kept as it is sent (up to a bound) so that a later
//! attempt can send it again from its start, as Linkerd's `ReplayBody` does;
//! and what else of a request a later attempt needs.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{HeaderMap, Method, Request, Uri, Version};
use http_body::{Body, Frame};

use crate::endpoint::Outcome;
use crate::util::lock;
use crate::wire::grpc;
use crate::wire::stream::{Abandon, Received};

/// The caller's request without its body: each attempt sends a copy.
pub(super) struct Template {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Template {
    pub(super) fn new(parts: http::request::Parts) -> Template {
        Template {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
        }
    }

    pub(super) fn path(&self) -> &str {
        self.uri.path()
    }

    pub(super) fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The request for one attempt, with `body`.
    pub(super) fn request(&self, body: RequestBody) -> Request<RequestBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// What the attempts of one call share: the caller's request body and what
/// has been read of it, and whether the call was given up, so that the
/// request half stops and resets the upstream stream.
pub(super) struct CallShared {
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
    /// Boxed, as `ahead` is: requests seldom have either, and this is
    /// held for as long as a call is open.
    trailers: Option<Box<HeaderMap>>,
    /// The source is done (ended, or broke).
    ended: bool,
    broke: bool,
    /// A frame read ahead of its turn (see [`Replay::look_ahead`]).
    ahead: Option<Box<Frame<Bytes>>>,
    /// The attempt whose body may read; older attempts' bodies fail.
    attempt: u32,
}

impl Replay {
    /// Whether the caller's body has ended (or broke): seen here, or by
    /// `h2`, which keeps a stream's END_STREAM when its connection breaks
    /// after it (from h2 0.4.21; before, the stream turned to an error).
    fn source_ended(&self) -> bool {
        self.ended || (self.ahead.is_none() && self.source.is_end_stream())
    }

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
                    self.ahead = Some(Box::new(frame));
                    return;
                }
            }
        }
    }
}

impl CallShared {
    pub(super) fn new(source: Received, limit: usize) -> CallShared {
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

    pub(super) fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Whether the caller's request stream broke (a malformed body, say),
    /// so that the sidecar reset the stream it was sending upstream.
    pub(super) fn caller_broke(&self) -> bool {
        self.replay().broke
    }

    /// Whether another attempt could send the whole body from its start.
    pub(super) fn can_replay(&self) -> bool {
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

    /// What the endpoint's status `code` says of it. INTERNAL in answer to
    /// a request that ended without one whole message (not even the
    /// 5-byte prefix) is the request's fault: gRPC servers answer a unary
    /// call without its message so (tonic's "Missing request message").
    /// Any other status is the endpoint's (see its `failures`).
    pub(super) fn outcome_of(&self, code: tonic::Code) -> Outcome {
        if code == tonic::Code::Internal && self.carried_no_message() {
            Outcome::Excused(code)
        } else {
            Outcome::Status(code)
        }
    }

    fn carried_no_message(&self) -> bool {
        let r = self.replay();
        r.source_ended() && !r.broke && !r.overflowed && r.kept_len < grpc::PREFIX_LEN
    }

    /// Starts the next attempt, if the body can be sent again.
    pub(super) fn new_attempt(&self) -> Option<u32> {
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
    pub(super) fn call(shared: Arc<CallShared>, attempt: u32) -> RequestBody {
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
                if let Some(t) = &r.trailers {
                    return Poll::Ready(Some(Ok(Frame::trailers(HeaderMap::clone(t)))));
                }
            }
            return Poll::Ready(None);
        }
        let next = match r.ahead.take() {
            Some(frame) => Some(Ok(*frame)),
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
                            r.trailers = Some(Box::new(t.clone()));
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
            && r.source_ended()
            && !r.broke
            && (self.trailers_sent || r.trailers.is_none())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The caller's side of a call over a real HTTP/2 connection in
    /// memory, and the server side's answer handle: held while the test
    /// runs. Aborting `driver` breaks the connection; `server` ends once
    /// the sidecar's side has seen it break.
    struct Caller {
        driver: tokio::task::JoinHandle<()>,
        server: tokio::task::JoinHandle<()>,
        _held: (
            h2::client::SendRequest<Bytes>,
            h2::SendStream<Bytes>,
            h2::server::SendResponse<Bytes>,
        ),
    }

    /// A call whose request ends on its head (`end`) or on an empty DATA
    /// frame after it, and its request stream as the sidecar's server
    /// side has it.
    async fn accepted(end: bool) -> (h2::RecvStream, Caller) {
        let (caller, server) = tokio::io::duplex(1 << 16);
        let (streams, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server).await.unwrap();
            while let Some(Ok((req, respond))) = conn.accept().await {
                let _ = streams.send((req.into_body(), respond));
            }
        });
        let (mut send, conn) = h2::client::handshake(caller).await.unwrap();
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::post("http://planner/agentmesh.demo.v1.Agent/Invoke")
            .body(())
            .unwrap();
        let (_response, mut body) = send.send_request(req, end).unwrap();
        if !end {
            body.send_data(Bytes::new(), true).unwrap();
        }
        let (source, respond) = rx.recv().await.unwrap();
        let caller = Caller {
            driver,
            server,
            _held: (send, body, respond),
        };
        (source, caller)
    }

    /// A unary request without its message is the caller's fault (the
    /// endpoint answers INTERNAL), also when the caller's connection
    /// breaks before the answer comes: the request ended before it broke.
    #[tokio::test]
    async fn a_request_without_its_message_stays_the_callers_fault_after_its_connection_breaks() {
        for end_on_head in [true, false] {
            let (source, caller) = accepted(end_on_head).await;
            let shared = Arc::new(CallShared::new(Received::new(source), 1024));
            let mut body = RequestBody::call(shared.clone(), 0);
            // As `exchange` sends it: whole at once, or pumped to its end.
            assert_eq!(body.is_end_stream(), end_on_head);
            if !end_on_head {
                let pumped = tokio::time::timeout(Duration::from_secs(5), async {
                    while let Some(frame) =
                        std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
                    {
                        assert!(frame.unwrap().data_ref().is_some_and(Bytes::is_empty));
                    }
                })
                .await;
                assert!(pumped.is_ok(), "the body ends");
            }
            // The caller's connection breaks, and the sidecar's side of it
            // has seen it (its connection task ends).
            caller.driver.abort();
            let broken = tokio::time::timeout(Duration::from_secs(5), caller.server).await;
            assert!(
                broken.is_ok(),
                "the sidecar's side saw the connection break"
            );
            assert_eq!(
                shared.outcome_of(tonic::Code::Internal),
                Outcome::Excused(tonic::Code::Internal),
                "end on head: {end_on_head}"
            );
            assert_eq!(
                shared.outcome_of(tonic::Code::Unavailable),
                Outcome::Status(tonic::Code::Unavailable)
            );
        }
    }
}
