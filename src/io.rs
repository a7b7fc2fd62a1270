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

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
}

impl<S> Batched<S> {
    pub fn new(inner: S) -> Batched<S> {
        Batched {
            inner,
            buf: Vec::new(),
            sent: 0,
            yielded: false,
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
        Pin::new(&mut self.inner).poll_read(cx, buf)
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
