//! Moving message bodies between HTTP/2 streams: [`Pump`] sends a body into
//! a stream as its flow-control window allows, and [`Received`] reads a
//! stream's data and trailers as a body, handing the window back as it goes.
//! [`Keepalive`] PINGs a connection of either side.
//!
//! The proxy works on the HTTP/2 library's streams directly, on both sides:
//! a call costs no task, channel or header conversion beyond its own.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::wire::timer::Timer;

/// A body whose sender may give it up while it waits: the pump then resets
/// the stream at once, even while it waits for window (the peer may not be
/// reading).
pub trait Abandon {
    /// Whether the body was given up; registers for the news if not.
    fn poll_abandoned(&mut self, _cx: &mut Context<'_>) -> bool {
        false
    }
}

/// Sends a body into an HTTP/2 stream, one frame at a time as the stream's
/// window allows. A body that fails, or is given up, resets the stream with
/// `CANCEL`.
pub struct Pump<B> {
    body: B,
    stream: h2::SendStream<Bytes>,
    /// A data frame waiting for window, and whether it ends the body.
    held: Option<(Bytes, bool)>,
}

impl<B: Body<Data = Bytes> + Abandon + Unpin> Pump<B> {
    pub fn new(body: B, stream: h2::SendStream<Bytes>) -> Pump<B> {
        Pump {
            body,
            stream,
            held: None,
        }
    }

    /// Ready once the body is sent, or the stream is over (reset by the
    /// peer, or the body failed).
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if let Some((data, end)) = self.held.take() {
                while self.stream.capacity() == 0 {
                    match self.stream.poll_capacity(cx) {
                        Poll::Pending => {
                            // The body is not polled while this waits: ask
                            // it whether it was given up meanwhile.
                            if self.body.poll_abandoned(cx) {
                                self.stream.send_reset(h2::Reason::CANCEL);
                                return Poll::Ready(());
                            }
                            self.held = Some((data, end));
                            return self.wait(cx);
                        }
                        Poll::Ready(Some(Ok(0))) => {}
                        Poll::Ready(Some(Ok(_))) => break,
                        Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                    }
                }
                if self.stream.send_data(data, end).is_err() || end {
                    return Poll::Ready(());
                }
                continue;
            }
            let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) else {
                return self.wait(cx);
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let end = self.body.is_end_stream();
                        if !data.is_empty() {
                            // Window is asked for only with data in hand: a
                            // claim held while the body is quiet would pin
                            // the connection's window.
                            self.stream.reserve_capacity(1);
                            self.held = Some((data, end));
                        } else if end {
                            let _ = self.stream.send_data(data, true);
                            return Poll::Ready(());
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.stream.reserve_capacity(0);
                            let _ = self.stream.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                Some(Err(_)) => {
                    self.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(());
                }
                None => {
                    let _ = self.stream.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
            }
        }
    }

    /// Waiting, for the body or for window: the peer may reset the stream
    /// meanwhile (it answered early, gave up, or broke), which ends the
    /// pump. Asked only here: while the pump moves, a reset shows as a
    /// failed send.
    fn wait(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.stream.poll_reset(cx).is_ready() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Runs the pump to its end. (Not an `async fn`, which would keep the
    /// pump twice in its future: as given, and bound in its body.)
    pub fn run(mut self) -> impl Future<Output = ()> + Send
    where
        B: Send,
    {
        std::future::poll_fn(move |cx| self.poll(cx))
    }
}

/// An HTTP/2 stream's incoming side as a body: its data, then its trailers.
/// Each data frame's window goes back to the peer as the frame is handed
/// on. A small frame is joined with the frames that have arrived behind it
/// (up to [`JOINED`] bytes): a body sent in tiny frames is not passed on in
/// tiny frames, each a frame for the next hop to handle (and, after that hop
/// has reset the stream, a stream error of its own: h2 closes a connection
/// after 1,024 of them).
pub struct Received {
    recv: h2::RecvStream,
    data_done: bool,
    /// An error met while joining frames, for the next poll.
    error: Option<h2::Error>,
}

/// Frames shorter than this are joined with those behind them...
const SMALL: usize = 1024;
/// ...up to this many bytes.
const JOINED: usize = 16 * 1024;

impl Received {
    pub fn new(recv: h2::RecvStream) -> Received {
        Received {
            recv,
            data_done: false,
            error: None,
        }
    }

    /// `first`, and the data frames that have arrived behind it.
    fn join(&mut self, first: Bytes, cx: &mut Context<'_>) -> Bytes {
        let mut joined = None::<bytes::BytesMut>;
        while joined.as_ref().map_or(first.len(), |j| j.len()) < JOINED {
            match self.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(more))) => {
                    let _ = self.recv.flow_control().release_capacity(more.len());
                    joined
                        .get_or_insert_with(|| bytes::BytesMut::from(&first[..]))
                        .extend_from_slice(&more);
                }
                Poll::Ready(Some(Err(e))) => {
                    self.error = Some(e);
                    break;
                }
                Poll::Ready(None) => {
                    self.data_done = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        joined.map_or(first, bytes::BytesMut::freeze)
    }
}

impl Body for Received {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if let Some(e) = this.error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    let data = if data.len() < SMALL {
                        this.join(data, cx)
                    } else {
                        data
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// HTTP/2 keepalive for one connection: a PING every `interval`, and the
/// peer counts as gone when one is unanswered for `timeout`.
pub struct Keepalive {
    pings: Option<h2::PingPong>,
    timer: Pin<Box<Timer>>,
    interval: std::time::Duration,
    timeout: std::time::Duration,
    /// A PING is out and unanswered.
    pinging: bool,
}

impl Keepalive {
    /// `pings` is the connection's PING handle (`ping_pong()`); without
    /// one, no PING is sent and the peer is never found gone.
    pub fn new(
        pings: Option<h2::PingPong>,
        interval: std::time::Duration,
        timeout: std::time::Duration,
    ) -> Keepalive {
        Keepalive {
            pings,
            timer: Box::pin(Timer::after(interval)),
            interval,
            timeout,
            pinging: false,
        }
    }

    /// The timeout, for messages.
    pub fn timeout(&self) -> std::time::Duration {
        self.timeout
    }

    /// Sends the PINGs and reads their answers; completes only when a PING
    /// went unanswered for the timeout. Polled beside the connection.
    pub async fn lost(&mut self) {
        std::future::poll_fn(|cx| self.poll_lost(cx)).await
    }

    fn poll_lost(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.pinging {
                if let Some(pings) = self.pings.as_mut() {
                    if pings.poll_pong(cx).is_ready() {
                        self.pinging = false;
                        self.rearm(self.interval);
                    }
                }
            }
            ready!(self.timer.as_mut().poll(cx));
            if self.pinging {
                return Poll::Ready(());
            }
            self.pinging = self
                .pings
                .as_mut()
                .is_some_and(|p| p.send_ping(h2::Ping::opaque()).is_ok());
            self.rearm(if self.pinging {
                self.timeout
            } else {
                self.interval
            });
        }
    }

    fn rearm(&mut self, after: std::time::Duration) {
        self.timer
            .as_mut()
            .reset(tokio::time::Instant::now() + after);
    }
}
