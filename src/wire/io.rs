//! Socket I/O that batches writes across streams.
//!
//! An HTTP/2 connection task writes whatever frames its streams have queued
//! each time it runs, and the HTTP/2 codec sends each sizeable DATA frame
//! with a `writev` of its own. On loopback the system calls then cost more
//! than everything else the proxy does. [`Batched`] takes the writes into a
//! buffer of its own and sends them when the connection flushes, one turn of
//! the scheduler later: the first flush after new data yields (the task
//! wakes itself and goes to the back of the run queue), so that the other
//! ready tasks run first and queue their frames, and the next flush sends
//! everything in one system call. The delay is one pass over tasks that are
//! ready anyway; when nothing else is ready the task runs again at once.
//!
//! A large write that finds the buffer empty goes straight to the socket
//! (no copy), and a full buffer is written out before it takes more, which
//! keeps the socket's backpressure.
//!
//! On upstream connections the read side also watches the frame headers
//! go by ([`FrameWatch`]): for the server's first frame (its SETTINGS,
//! which a connection waits for before it carries calls: a socket that a
//! dying server's kernel accepted but the server never will is no
//! connection), and for a GOAWAY. A server that shuts down
//! gracefully first sends GOAWAY naming the highest stream id, and only a
//! round trip later the last stream it will process; streams opened in
//! between may be neither processed nor refused in a way the client can
//! see, when the server closes its socket with them unread (the kernel
//! then resets the connection). The HTTP/2 library keeps opening streams
//! after the first GOAWAY; seeing it here lets the pool stop at once, as
//! gRPC's own clients do.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::task::{Context, Poll, ready};
use tokio::sync::Notify;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A read into less room than this goes through a buffer of our own.
const READ_ROOM: usize = 4 * 1024;
/// That buffer's size.
const READ_BUF: usize = 16 * 1024;
/// Writes at least this large skip the buffer when it is empty.
const DIRECT: usize = 16 * 1024;
/// The buffer is written out before it grows past this.
const HIGH_WATER: usize = 64 * 1024;

pub struct Batched<S> {
    inner: S,
    buf: Vec<u8>,
    /// How much of `buf` has been written.
    sent: usize,
    yielded: bool,
    /// Bytes read but not yet handed to the reader: `read_buf[unread..read]`.
    read_buf: Box<[u8]>,
    unread: usize,
    read: usize,
    watch: Option<FrameWatch>,
}

impl<S> Batched<S> {
    pub fn new(inner: S) -> Batched<S> {
        Batched {
            inner,
            buf: Vec::new(),
            sent: 0,
            yielded: false,
            read_buf: Box::default(),
            unread: 0,
            read: 0,
            watch: None,
        }
    }

    /// Also watches the HTTP/2 frames read (the read side must be a
    /// server's frames from their start) and tells `signals`.
    pub fn watching(inner: S, signals: Arc<PeerSignals>) -> Batched<S> {
        Batched {
            watch: Some(FrameWatch::new(signals)),
            ..Batched::new(inner)
        }
    }

    /// For a caller's connection (the read side starts with the client
    /// preface): sets `signals.heard` when the first frame after the
    /// preface arrives (HTTP/2 requires it to be SETTINGS), then stops
    /// watching.
    pub fn caller(inner: S, signals: Arc<PeerSignals>) -> Batched<S> {
        Batched {
            watch: Some(FrameWatch::after_preface(signals)),
            ..Batched::new(inner)
        }
    }

    fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }
}

impl<S: AsyncWrite + Unpin> Batched<S> {
    /// Writes the buffer out; `Ready(Ok)` once it is empty.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Batched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        if this.unread == this.read && (1..READ_ROOM).contains(&buf.remaining()) {
            // The HTTP/2 codec reads into whatever room its buffer has left,
            // often a few hundred bytes, and a message then takes two system
            // calls. Take what the socket has into a buffer of our own.
            if this.read_buf.is_empty() {
                this.read_buf = vec![0; READ_BUF].into_boxed_slice();
            }
            let mut staging = ReadBuf::new(&mut this.read_buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut staging))?;
            (this.unread, this.read) = (0, staging.filled().len());
            if this.read == 0 {
                // End of stream: nothing to hand over, and no need to ask again.
                return Poll::Ready(Ok(()));
            }
        }
        if this.unread < this.read {
            let n = buf.remaining().min(this.read - this.unread);
            buf.put_slice(&this.read_buf[this.unread..this.unread + n]);
            this.unread += n;
        } else {
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        }
        if let Some(watch) = &mut this.watch {
            watch.scan(&buf.filled()[before..]);
            if watch.first_only && watch.signals.heard.load(Ordering::Relaxed) {
                this.watch = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// What the reading side has learnt of the peer.
#[derive(Debug, Default)]
pub struct PeerSignals {
    /// A whole frame arrived (the server's SETTINGS comes first).
    pub heard: AtomicBool,
    /// A GOAWAY arrived: the peer is shutting the connection down.
    pub going_away: AtomicBool,
    /// The connection has ended.
    pub closed: AtomicBool,
    /// Rung when `heard` is first set, or when the connection ends.
    pub changed: Notify,
}

/// Follows HTTP/2 frame boundaries in a byte stream.
pub struct FrameWatch {
    signals: Arc<PeerSignals>,
    header: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    skip: usize,
    /// Only the first frame matters (a caller's connection).
    first_only: bool,
}

const GOAWAY: u8 = 0x7;

impl FrameWatch {
    pub fn new(signals: Arc<PeerSignals>) -> FrameWatch {
        FrameWatch {
            signals,
            header: [0; 9],
            have: 0,
            skip: 0,
            first_only: false,
        }
    }

    /// Watches a caller's bytes: the client preface (24 bytes), then the
    /// first frame.
    pub fn after_preface(signals: Arc<PeerSignals>) -> FrameWatch {
        FrameWatch {
            skip: 24,
            first_only: true,
            ..FrameWatch::new(signals)
        }
    }

    pub fn scan(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let n = (9 - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 9 {
                let h = self.header;
                self.skip = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                self.have = 0;
                if !self.signals.heard.swap(true, Ordering::AcqRel) {
                    self.signals.changed.notify_one();
                }
                if h[3] == GOAWAY {
                    self.signals.going_away.store(true, Ordering::Release);
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Batched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending() + data.len() > HIGH_WATER {
            ready!(this.poll_drain(cx))?;
        }
        if this.pending() == 0 && data.len() >= DIRECT {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.pending() + total > HIGH_WATER {
            ready!(this.poll_drain(cx))?;
        }
        if this.pending() == 0 && total >= DIRECT {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pending() > 0 {
            if !this.yielded {
                this.yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(this.poll_drain(cx))?;
        }
        this.yielded = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_and_large_writes_arrive_whole_and_in_order() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Batched::new(a);
        let big = vec![7u8; 100_000];
        w.write_all(b"hello ").await.unwrap();
        w.write_all(&big).await.unwrap();
        w.write_all(b" world").await.unwrap();
        w.flush().await.unwrap();
        drop(w);
        let mut out = Vec::new();
        b.read_to_end(&mut out).await.unwrap();
        assert_eq!(&out[..6], b"hello ");
        assert_eq!(&out[6..100_006], &big[..]);
        assert_eq!(&out[100_006..], b" world");
    }

    /// Counts the reads that reach the stream below.
    struct Counted<S> {
        inner: S,
        reads: usize,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.reads += 1;
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    #[tokio::test]
    async fn a_read_into_little_room_takes_the_whole_message_in_one_read() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let message: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        a.write_all(&message).await.unwrap();
        let mut r = Batched::new(Counted { inner: b, reads: 0 });
        // As the HTTP/2 codec does when its buffer has 600 bytes left.
        let mut out = Vec::new();
        let mut room = [0u8; 600];
        while out.len() < message.len() {
            let n = r.read(&mut room).await.unwrap();
            assert!(n > 0);
            out.extend_from_slice(&room[..n]);
        }
        assert_eq!(out, message, "whole and in order");
        assert_eq!(r.inner.reads, 1, "one read of the stream below");
        // With room enough, reads go straight through.
        a.write_all(&message).await.unwrap();
        let mut big = vec![0u8; 8192];
        assert_eq!(r.read(&mut big).await.unwrap(), 3000);
        assert_eq!(&big[..3000], &message[..]);
        assert_eq!(r.inner.reads, 2);
        drop(a);
        assert_eq!(r.read(&mut room).await.unwrap(), 0, "the end shows");
        assert_eq!(
            r.inner.reads, 3,
            "the end takes one read of the stream below"
        );
    }

    #[test]
    fn the_watch_finds_a_goaway_across_any_split_and_nothing_else() {
        let frame = |len: usize, ty: u8| {
            let mut f = vec![
                (len >> 16) as u8,
                (len >> 8) as u8,
                len as u8,
                ty,
                0,
                0,
                0,
                0,
                1,
            ];
            // Payload bytes that look like a GOAWAY header, to be skipped.
            f.extend(std::iter::repeat_n(GOAWAY, len));
            f
        };
        let mut quiet = frame(100, 0x0);
        quiet.extend(frame(9, 0x4));
        quiet.extend(frame(0, 0x6));
        let mut loud = quiet.clone();
        loud.extend(frame(8, GOAWAY));
        for (bytes, want) in [(&quiet, false), (&loud, true)] {
            for chunk in [1, 2, 7, 9, 10, 64, 1000] {
                let signals = Arc::new(PeerSignals::default());
                let mut w = FrameWatch::new(signals.clone());
                w.scan(&bytes[..8]);
                assert!(
                    !signals.heard.load(Ordering::Acquire),
                    "not a whole header yet"
                );
                for part in bytes[8..].chunks(chunk) {
                    w.scan(part);
                }
                assert!(signals.heard.load(Ordering::Acquire));
                assert_eq!(
                    signals.going_away.load(Ordering::Acquire),
                    want,
                    "chunks of {chunk}"
                );
            }
        }
    }

    #[test]
    fn a_flush_waits_one_turn_then_writes_everything_at_once() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = Batched::new(a);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(
            Pin::new(&mut w).poll_write(&mut cx, b"ab"),
            Poll::Ready(Ok(2))
        ));
        assert!(
            Pin::new(&mut w).poll_flush(&mut cx).is_pending(),
            "the first flush yields"
        );
        assert!(matches!(
            Pin::new(&mut w).poll_write(&mut cx, b"cd"),
            Poll::Ready(Ok(2))
        ));
        assert!(Pin::new(&mut w).poll_flush(&mut cx).is_ready());
        let mut got = [0u8; 4];
        let mut rb = ReadBuf::new(&mut got);
        assert!(Pin::new(&mut b).poll_read(&mut cx, &mut rb).is_ready());
        assert_eq!(rb.filled(), b"abcd", "one write carried both");
        assert!(
            Pin::new(&mut w).poll_flush(&mut cx).is_ready(),
            "nothing pending: no yield"
        );
    }
}
