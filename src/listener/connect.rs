//! The proxy port: HTTP/1.1 CONNECT tunnels, or HTTP/2 with prior knowledge.
//!
//! The first bytes decide. The HTTP/2 connection preface means authority
//! mode. Otherwise the bytes must be an HTTP/1.1 request head: a `CONNECT`
//! whose target names a cluster is answered `200` and the tunnel is served
//! as HTTP/2 with every call going to that cluster; a `CONNECT` to any other
//! target is tunnelled as plain TCP to it (or refused with `403` when
//! `listener.refuse_unknown` is set), so that an agent's other traffic
//! through the same proxy setting keeps working.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::prefixed::Prefixed;
use super::{Context, Route, serve_h2};
use crate::app::drain;

pub(super) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const MAX_HEAD: usize = 8 * 1024;

enum Head {
    Http2,
    Http1 {
        method: String,
        target: String,
        len: usize,
    },
}

pub(super) async fn handle(mut tcp: TcpStream, ctx: Arc<Context>, mut drain: drain::Watch) {
    let mut buf = BytesMut::with_capacity(1024);
    let head = tokio::select! {
        head = tokio::time::timeout(ctx.header_timeout, read_head(&mut tcp, &mut buf)) => head,
        // A caller that has not asked for anything yet holds up no drain.
        _ = drain.signaled() => return,
    };
    let head = match head {
        Ok(Ok(head)) => head,
        Ok(Err(reason)) => {
            reply(&mut tcp, "400 Bad Request", &reason).await;
            return;
        }
        Err(_) => {
            ctx.stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(timeout = ?ctx.header_timeout, "caller sent no request head in time; closing");
            return;
        }
    };
    match head {
        Head::Http2 => {
            let route = Route::Authority(ctx.router.clone());
            let peer = tcp.peer_addr().ok();
            serve_h2(Prefixed::new(buf.freeze(), tcp), peer, route, &ctx, drain).await;
        }
        Head::Http1 {
            method,
            target,
            len,
        } => {
            let rest = buf.split_off(len).freeze();
            if !method.eq_ignore_ascii_case("CONNECT") {
                let reason = format!(
                    "agentmesh: this port takes HTTP CONNECT (proxy mode) or HTTP/2 with prior knowledge (authority mode), not {method}"
                );
                reply(&mut tcp, "405 Method Not Allowed", &reason).await;
                return;
            }
            tunnel(tcp, rest, &target, ctx, drain).await;
        }
    }
}

async fn tunnel(
    mut tcp: TcpStream,
    rest: Bytes,
    target: &str,
    ctx: Arc<Context>,
    drain: drain::Watch,
) {
    if let Some(slot) = ctx.router.slot(target) {
        tracing::debug!(target, cluster = slot.name(), "CONNECT tunnel to a cluster");
        let route = Route::Cluster(slot);
        if tcp.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.is_err() {
            return;
        }
        let peer = tcp.peer_addr().ok();
        serve_h2(Prefixed::new(rest, tcp), peer, route, &ctx, drain).await;
        return;
    }
    if ctx.refuse_unknown {
        let reason = format!(
            "agentmesh: no cluster is named {target:?}, and listener.refuse_unknown is set; known clusters: {}",
            ctx.router.names()
        );
        reply(&mut tcp, "403 Forbidden", &reason).await;
        return;
    }
    // Not ours to balance: pass it through as plain TCP. A tunnel is not a
    // call, so it does not hold up draining.
    drop(drain);
    let connect = tokio::time::timeout(
        crate::config::DEFAULT_CONNECT_TIMEOUT,
        TcpStream::connect(target),
    )
    .await;
    let upstream = match connect {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(e)) => {
            let reason =
                format!("agentmesh: cannot connect to {target:?} (no cluster names it): {e}");
            reply(&mut tcp, "502 Bad Gateway", &reason).await;
            return;
        }
        Err(_) => {
            let reason =
                format!("agentmesh: connecting to {target:?} timed out (no cluster names it)");
            reply(&mut tcp, "504 Gateway Timeout", &reason).await;
            return;
        }
    };
    if let (Ok(peer), Ok(local)) = (upstream.peer_addr(), upstream.local_addr())
        && let Some(why) = ctx.forbidden(peer, local)
    {
        drop(upstream);
        ctx.stats.tunnels_forbidden.fetch_add(1, Ordering::Relaxed);
        let reason = format!("agentmesh: will not tunnel to {target:?}: {why}");
        reply(&mut tcp, "403 Forbidden", &reason).await;
        return;
    }
    tracing::debug!(
        target,
        "CONNECT tunnel to a target no cluster names: plain TCP"
    );
    if tcp.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.is_err() {
        return;
    }
    pipe(tcp, rest, upstream, &ctx, target).await;
}

/// Carries bytes both ways between a caller and the upstream it asked for,
/// `rest` (what the caller sent already) first, until either side closes
/// or nothing moves for `listener.idle_timeout`.
pub(super) async fn pipe(
    tcp: TcpStream,
    rest: Bytes,
    mut upstream: TcpStream,
    ctx: &Context,
    target: &str,
) {
    let _ = upstream.set_nodelay(true);
    if !rest.is_empty() && upstream.write_all(&rest).await.is_err() {
        return;
    }
    let last = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut caller = Touched::new(tcp, &last, started);
    let mut upstream = Touched::new(upstream, &last, started);
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut caller, &mut upstream) => {
            if let Err(e) = copied {
                tracing::debug!(target, error = %e, "TCP tunnel ended");
            }
        }
        () = idle(&last, started, ctx.idle_timeout) => {
            ctx.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(target, idle = ?ctx.idle_timeout, "TCP tunnel idle; closing");
        }
    }
}

/// Returns once nothing has been read from either side of a tunnel for
/// `limit` (`last`: milliseconds after `started` of the last read).
async fn idle(last: &AtomicU64, started: Instant, limit: Duration) {
    loop {
        let since = Duration::from_millis(last.load(Ordering::Relaxed));
        let quiet = started.elapsed().saturating_sub(since);
        if quiet >= limit {
            return;
        }
        tokio::time::sleep(limit - quiet).await;
    }
}

pin_project_lite::pin_project! {
    /// A stream that notes when it last read anything.
    struct Touched<S> {
        #[pin]
        inner: S,
        last: Arc<AtomicU64>,
        started: Instant,
    }
}

impl<S> Touched<S> {
    fn new(inner: S, last: &Arc<AtomicU64>, started: Instant) -> Touched<S> {
        Touched {
            inner,
            last: last.clone(),
            started,
        }
    }
}

impl<S: AsyncRead> AsyncRead for Touched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            let ms = this.started.elapsed().as_millis() as u64;
            this.last.store(ms, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite> AsyncWrite for Touched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, data)
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// Reads until the HTTP/2 preface or a whole HTTP/1 request head is in `buf`.
async fn read_head(tcp: &mut TcpStream, buf: &mut BytesMut) -> Result<Head, String> {
    loop {
        if tcp.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("connection closed before a request was complete".into());
        }
        if let Some(head) = parse_head(buf)? {
            return Ok(head);
        }
    }
}

/// What the first bytes of a proxy-port connection ask for: `None` while
/// they are not yet a whole request head (and could still become one).
fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return Ok((n == H2_PREFACE.len()).then_some(Head::Http2));
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Ok(Some(Head::Http1 {
            method: req.method.unwrap_or_default().to_string(),
            target: req.path.unwrap_or_default().to_string(),
            len,
        })),
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => Ok(None),
        Ok(httparse::Status::Partial) => Err(format!(
            "agentmesh: request head is longer than {MAX_HEAD} bytes"
        )),
        Err(e) => Err(format!(
            "agentmesh: not an HTTP/1.1 request or HTTP/2 preface: {e}"
        )),
    }
}

/// [`parse_head`] for the fuzzer: `Some(None)` for the HTTP/2 preface,
/// `Some(Some((method, target, head length)))` for an HTTP/1 head.
#[doc(hidden)]
#[allow(clippy::type_complexity)]
pub fn parse_head_for_fuzzing(
    buf: &[u8],
) -> Result<Option<Option<(String, String, usize)>>, String> {
    Ok(parse_head(buf)?.map(|head| match head {
        Head::Http2 => None,
        Head::Http1 {
            method,
            target,
            len,
        } => Some((method, target, len)),
    }))
}

async fn reply(tcp: &mut TcpStream, status: &str, reason: &str) {
    tracing::debug!(status, reason, "refusing a proxy-port request");
    let body = format!("{reason}\n");
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.write_all(response.as_bytes()).await;
    let _ = tcp.shutdown().await;
}
