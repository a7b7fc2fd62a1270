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
//!
//! On a caller's connection the watch goes on for the connection's life and
//! meters the frames that carry (almost) nothing ([`Chaff`]): a caller that
//! floods them is flagged for its connection task to close.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::sync::atomic::AtomicU8;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

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
    /// Bytes written so far (they earn a caller room for WINDOW_UPDATEs).
    wrote: u64,
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
            wrote: 0,
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
    /// preface arrives (HTTP/2 requires it to be SETTINGS), and sets
    /// `signals.flood` when the caller floods frames that carry nothing
    /// (see [`Chaff`]).
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
        if this.watch.as_ref().is_some_and(|w| w.flooded) {
            // Read no more of a flood: the HTTP/2 codec would go on taking
            // frames (and keeping them) until the socket ran dry. The
            // connection task, woken by `signals.alarm`, closes it.
            return Poll::Pending;
        }
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
            watch.wrote = this.wrote;
            watch.scan(&buf.filled()[before..]);
            if watch.done() {
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
    /// A caller's flood: the type of the frames it flooded, plus one (0:
    /// none).
    flood: AtomicU8,
    /// Woken when `flood` is set (no lock: the connection task polls it
    /// for every call it accepts).
    pub alarm: futures_util::task::AtomicWaker,
}

impl PeerSignals {
    /// The kind of frame the caller flooded, if it did.
    pub fn flood(&self) -> Option<&'static str> {
        match self.flood.load(Ordering::Acquire) {
            0 => None,
            n => Some(frame_name(n - 1)),
        }
    }
}

fn frame_name(kind: u8) -> &'static str {
    match kind {
        DATA => "small DATA",
        PRIORITY => "PRIORITY",
        SETTINGS => "SETTINGS",
        PING => "PING",
        WINDOW_UPDATE => "WINDOW_UPDATE",
        _ => "other",
    }
}

/// Follows HTTP/2 frame boundaries in a byte stream.
pub struct FrameWatch {
    signals: Arc<PeerSignals>,
    header: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    skip: usize,
    /// Only the first frame matters.
    first_only: bool,
    /// A whole frame has come (and `signals.heard` is set).
    heard: bool,
    /// The caller flooded (see [`Chaff`]): nothing more is read.
    flooded: bool,
    /// A caller's connection: its frames are metered.
    chaff: Option<Chaff>,
    /// Bytes written to the peer so far.
    wrote: u64,
}

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;

/// A caller may send frames that carry (almost) nothing: WINDOW_UPDATE,
/// PING, SETTINGS, PRIORITY, and DATA of fewer than [`TINY`] bytes that
/// does not end its stream. Each costs the sidecar more than it costs the
/// caller (a 1-byte DATA frame is kept as a buffer of its own and sent on
/// as a frame of its own), so they are metered by a token bucket per
/// connection (a tiny DATA frame takes [`TINY_DATA_COST`] tokens, the
/// others one): [`BURST`] at first, [`PER_MS`] more each millisecond, and
/// more for useful work (each call opened, each KiB sent to the caller,
/// which its WINDOW_UPDATEs answer). A caller that runs out is flooding;
/// its connection is closed with GOAWAY ENHANCE_YOUR_CALM (as Envoy's
/// limits on empty frames and on WINDOW_UPDATEs per DATA frame sent do).
pub struct Chaff {
    tokens: u32,
    /// When the tokens were last topped up by time...
    topped: Instant,
    /// ...and by bytes written.
    topped_wrote: u64,
}

/// DATA frames shorter than this (and not ending their stream) are chaff:
/// a gRPC message takes five bytes of framing alone.
pub const TINY: usize = 16;
pub const BURST: u32 = 4000;
pub const PER_MS: u32 = 1;
/// Tokens earned by a call opened (a HEADERS frame)...
const PER_CALL: u32 = 10;
/// ...and by each this many bytes written to the caller.
const PER_WRITTEN: u64 = 1024;
/// What a tiny DATA frame costs (the others cost 1): the sidecar keeps
/// each until it is sent on.
const TINY_DATA_COST: u32 = 8;

impl Chaff {
    fn new() -> Chaff {
        Chaff {
            tokens: BURST,
            topped: Instant::now(),
            topped_wrote: 0,
        }
    }

    /// Meters one frame; false when the caller has run out.
    fn frame(&mut self, kind: u8, flags: u8, len: usize, wrote: u64) -> bool {
        let cost = match kind {
            HEADERS => {
                self.tokens = (self.tokens + PER_CALL).min(BURST);
                0
            }
            // Each is kept, as a buffer of its own, until it is sent on.
            DATA if len < TINY && flags & END_STREAM == 0 => TINY_DATA_COST,
            SETTINGS | PING if flags & ACK == 0 => 1,
            PRIORITY | WINDOW_UPDATE => 1,
            _ => 0,
        };
        if cost == 0 {
            return true;
        }
        if self.tokens < cost {
            // Topped up only when empty: most connections never read the
            // clock here.
            let now = Instant::now();
            let ms = now.saturating_duration_since(self.topped).as_millis() as u64;
            self.topped += Duration::from_millis(ms);
            let kib = wrote.saturating_sub(self.topped_wrote) / PER_WRITTEN;
            self.topped_wrote += kib * PER_WRITTEN;
            let earned = ms.saturating_mul(u64::from(PER_MS)).saturating_add(kib);
            self.tokens = (u64::from(self.tokens) + earned).min(u64::from(BURST)) as u32;
            if self.tokens < cost {
                return false;
            }
        }
        self.tokens -= cost;
        true
    }
}

impl FrameWatch {
    pub fn new(signals: Arc<PeerSignals>) -> FrameWatch {
        FrameWatch {
            signals,
            header: [0; 9],
            have: 0,
            skip: 0,
            first_only: false,
            heard: false,
            flooded: false,
            chaff: None,
            wrote: 0,
        }
    }

    /// Watches a caller's bytes: the client preface (24 bytes), then its
    /// frames, metered (see [`Chaff`]).
    pub fn after_preface(signals: Arc<PeerSignals>) -> FrameWatch {
        FrameWatch {
            skip: 24,
            chaff: Some(Chaff::new()),
            ..FrameWatch::new(signals)
        }
    }

    /// Whether there is nothing more to watch for.
    fn done(&self) -> bool {
        self.first_only && self.signals.heard.load(Ordering::Relaxed)
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
                if !self.heard {
                    self.heard = true;
                    if !self.signals.heard.swap(true, Ordering::AcqRel) {
                        self.signals.changed.notify_one();
                    }
                }
                if h[3] == GOAWAY {
                    self.signals.going_away.store(true, Ordering::Release);
                }
                if let Some(chaff) = &mut self.chaff
                    && !chaff.frame(h[3], h[4], self.skip, self.wrote)
                {
                    self.chaff = None;
                    self.flooded = true;
                    self.signals.flood.store(h[3] + 1, Ordering::Release);
                    self.signals.alarm.wake();
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
            let n = ready!(Pin::new(&mut this.inner).poll_write(cx, data))?;
            this.wrote += n as u64;
            return Poll::Ready(Ok(n));
        }
        this.buf.extend_from_slice(data);
        this.wrote += data.len() as u64;
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
            let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
            this.wrote += n as u64;
            return Poll::Ready(Ok(n));
        }
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        this.wrote += total as u64;
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

    #[tokio::test(start_paused = true)]
    async fn chaff_is_metered_and_useful_work_earns_room() {
        let mut c = Chaff::new();
        // The burst: WINDOW_UPDATEs, PINGs, PRIORITYs; acks, whole DATA
        // frames and the end of a stream cost nothing.
        for i in 0..BURST {
            let (kind, flags, len) =
                [(WINDOW_UPDATE, 0, 4), (PING, 0, 8), (PRIORITY, 0, 5)][i as usize % 3];
            assert!(c.frame(kind, flags, len, 0), "frame {i}");
            assert!(c.frame(PING, ACK, 8, 0));
            assert!(c.frame(DATA, 0, 200, 0));
            assert!(c.frame(DATA, END_STREAM, 0, 0));
        }
        assert!(!c.frame(WINDOW_UPDATE, 0, 4, 0), "the burst is spent");
        // Tiny DATA frames cost more.
        let mut c = Chaff::new();
        for i in 0..BURST / TINY_DATA_COST {
            assert!(c.frame(DATA, 0, 1, 0), "frame {i}");
        }
        assert!(!c.frame(DATA, 0, 1, 0));
        // A call opened earns a little...
        let mut c = Chaff::new();
        c.tokens = 0;
        assert!(c.frame(HEADERS, 0, 40, 0));
        for _ in 0..PER_CALL {
            assert!(c.frame(SETTINGS, 0, 0, 0));
        }
        assert!(!c.frame(SETTINGS, 0, 0, 0));
        // ...so do bytes sent to the caller (its WINDOW_UPDATEs answer
        // them), and time.
        assert!(c.frame(WINDOW_UPDATE, 0, 4, 2 * PER_WRITTEN));
        assert!(c.frame(WINDOW_UPDATE, 0, 4, 2 * PER_WRITTEN));
        assert!(!c.frame(WINDOW_UPDATE, 0, 4, 2 * PER_WRITTEN));
        tokio::time::advance(Duration::from_millis(5)).await;
        for _ in 0..5 * PER_MS {
            assert!(c.frame(PRIORITY, 0, 5, 2 * PER_WRITTEN));
        }
        assert!(!c.frame(PRIORITY, 0, 5, 2 * PER_WRITTEN));
        // Never more than the burst, however long the caller was quiet.
        tokio::time::advance(Duration::from_secs(3600)).await;
        let mut spent = 0;
        while c.frame(PING, 0, 8, 2 * PER_WRITTEN) {
            spent += 1;
        }
        assert_eq!(spent, BURST);
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
