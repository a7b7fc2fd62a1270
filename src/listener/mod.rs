//! Accepting callers and finding the cluster each call is for.
//!
//! Three ways in share one HTTP/2 server:
//! - the proxy port takes HTTP/1.1 `CONNECT host:port` (what gRPC clients
//!   send when `grpc_proxy`/`https_proxy` is set): the target names the
//!   cluster for every call of the tunnel ([`connect`]);
//! - the same port takes HTTP/2 with prior knowledge, and each call's
//!   `:authority` names its cluster (authority mode);
//! - a cluster's own `local_port` takes HTTP/2 whose calls all go to it.

mod connect;
mod prefixed;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::time::{Instant, MissedTickBehavior};

use crate::app::drain;
use crate::cluster::{Cluster, Router};
use crate::config::ListenerConfig;
use crate::proxy::error::ProxyError;
use crate::proxy::{self, ResponseBody};
use crate::wire::grpc;
use crate::wire::io::{Batched, PeerSignals};
use crate::wire::stream::{Keepalive, Pump};

/// A PING goes to each caller connection this often...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// ...and a caller that does not answer one this soon is gone.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// What every connection handler needs.
pub struct Context {
    pub router: Arc<Router>,
    pub refuse_unknown: bool,
    /// The sidecar's own listening addresses: a CONNECT never tunnels to
    /// them.
    own: Vec<SocketAddr>,
    /// `listener.header_timeout`.
    header_timeout: Duration,
    /// `listener.idle_timeout`.
    idle_timeout: Duration,
    h2: h2::server::Builder,
    pub stats: Arc<CallerStats>,
}

/// What the listeners refused callers, for `/metrics`.
#[derive(Default)]
pub struct CallerStats {
    /// CONNECTs refused because they named the sidecar itself or one of a
    /// cluster's endpoints.
    pub tunnels_forbidden: AtomicU64,
    /// Connections closed for not sending a request head within
    /// `listener.header_timeout`.
    pub header_timeouts: AtomicU64,
    /// Connections and tunnels closed after `listener.idle_timeout` idle.
    pub idle_closed: AtomicU64,
}

impl CallerStats {
    /// Each count with its reason, as `/metrics` labels it.
    pub fn refused(&self) -> [(&'static str, u64); 3] {
        let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
        [
            ("tunnel_forbidden", get(&self.tunnels_forbidden)),
            ("header_timeout", get(&self.header_timeouts)),
            ("idle_timeout", get(&self.idle_closed)),
        ]
    }
}

impl Context {
    /// `own`: every address the sidecar listens on (proxy, admin, local
    /// ports).
    pub fn new(router: Arc<Router>, config: &ListenerConfig, own: Vec<SocketAddr>) -> Context {
        let mut h2 = h2::server::Builder::new();
        h2.initial_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .max_concurrent_streams(config.max_calls_per_connection)
            .max_header_list_size(16 << 10);
        Context {
            router,
            refuse_unknown: config.refuse_unknown,
            own,
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
            h2,
            stats: Arc::default(),
        }
    }

    /// Why a tunnel that reached `peer` (from `local`, this end of it) must
    /// not be used, if it must not: `peer` is one of the sidecar's own
    /// ports, or one of a cluster's endpoints (whose calls go through the
    /// balancer, its limits and its breakers).
    fn forbidden(&self, peer: SocketAddr, local: SocketAddr) -> Option<String> {
        // The kernel picks the destination itself as the source address
        // for any address of this host but loopback's.
        let this_host = peer.ip().is_loopback() || peer.ip() == local.ip();
        let own = self.own.iter().any(|a| {
            a.port() == peer.port()
                && (a.ip() == peer.ip() || (this_host && a.ip().is_unspecified()))
        });
        if own && this_host {
            return Some(format!("{peer} is this sidecar's own port"));
        }
        for cluster in self.router.clusters() {
            for e in cluster.endpoints().iter() {
                let named = e.address().parse::<SocketAddr>().ok() == Some(peer);
                if named || e.connection().peer_addr() == Some(peer) {
                    return Some(format!(
                        "{peer} is an endpoint of cluster {:?} ({}); send its calls through the cluster",
                        cluster.name(),
                        e.address()
                    ));
                }
            }
        }
        None
    }
}

/// Where the calls of one HTTP/2 connection go.
#[derive(Clone)]
enum Route {
    /// Every call to one cluster (CONNECT tunnel, local port).
    Cluster(Arc<Cluster>),
    /// Each call to the cluster its `:authority` names.
    Authority(Arc<Router>),
}

impl Route {
    async fn call(self, req: Request<h2::RecvStream>) -> Response<ResponseBody> {
        let cluster = match self {
            Route::Cluster(cluster) => cluster,
            Route::Authority(router) => {
                let authority = req
                    .uri()
                    .authority()
                    .map(|a| a.as_str())
                    .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok())
                    .unwrap_or("");
                match router.find(authority) {
                    Some(cluster) => cluster.clone(),
                    None => {
                        let error = ProxyError::UnknownAuthority {
                            authority: authority.to_string(),
                            known: router.names(),
                        };
                        return grpc::status_response(&error.to_status());
                    }
                }
            }
        };
        // Not boxed here: the whole call is boxed once where its task is
        // spawned.
        proxy::forward(cluster, req).await
    }
}

/// Accepts on the proxy port until draining begins.
pub async fn serve_proxy(listener: Arc<TcpListener>, ctx: Arc<Context>, drain: drain::Watch) {
    accept_loop(listener, drain, move |tcp, drain| {
        let ctx = ctx.clone();
        async move { connect::handle(tcp, ctx, drain).await }
    })
    .await
}

/// Accepts on a cluster's local port until draining begins.
pub async fn serve_local(
    listener: Arc<TcpListener>,
    cluster: Arc<Cluster>,
    ctx: Arc<Context>,
    drain: drain::Watch,
) {
    accept_loop(listener, drain, move |tcp, drain| {
        let ctx = ctx.clone();
        let route = Route::Cluster(cluster.clone());
        async move { serve_h2(tcp, route, &ctx, drain).await }
    })
    .await
}

async fn accept_loop<F, Fut>(listener: Arc<TcpListener>, mut drain: drain::Watch, handle: F)
where
    F: Fn(tokio::net::TcpStream, drain::Watch) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.signaled() => return,
        };
        match accepted {
            Ok((tcp, _peer)) => {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(handle(tcp, drain.clone()));
            }
            Err(e) => {
                // Out of file descriptors and the like: wait, then go on.
                tracing::warn!(error = %e, "accept failed; retrying in 50ms");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves HTTP/2 (prior knowledge) on `io` until the caller closes it or
/// draining ends it with a GOAWAY (calls in flight finish first). Each call
/// runs in a task of its own. A PING goes out every
/// [`KEEPALIVE_INTERVAL`]; a caller that leaves one unanswered for
/// [`KEEPALIVE_TIMEOUT`] is gone, and its connection is dropped. A caller
/// that sends no SETTINGS within `listener.header_timeout` is dropped; one
/// that has no call open for `listener.idle_timeout` is sent a GOAWAY.
async fn serve_h2<I>(io: I, route: Route, ctx: &Context, mut drain: drain::Watch)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let signals = Arc::new(PeerSignals::default());
    let io = Batched::caller(io, signals.clone());
    let mut conn = match tokio::time::timeout(ctx.header_timeout, ctx.h2.handshake(io)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "caller's HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            ctx.stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(timeout = ?ctx.header_timeout, "caller sent no HTTP/2 preface in time; closing");
            return;
        }
    };
    let mut keepalive = Keepalive::new(conn.ping_pong(), KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT);
    let mut draining = false;
    // Made once: the loop comes round several times per call.
    let mut signaled = std::pin::pin!(drain.signaled());
    let mut settings = std::pin::pin!(heard_within(&signals, ctx.header_timeout));
    let mut awaiting_settings = true;
    // Calls open on this connection, and when it last had none.
    let open = Arc::new(AtomicUsize::new(0));
    let mut idle_since = Some(Instant::now());
    let mut idle_check =
        tokio::time::interval_at(Instant::now() + ctx.idle_timeout / 4, ctx.idle_timeout / 4);
    idle_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    idle_since = None;
                    let call = Open::new(&open);
                    // Boxed: a task's future is moved several times on its
                    // way into the runtime, and this one is large.
                    let route = route.clone();
                    tokio::spawn(Box::pin(async move {
                        serve_call(route, req, respond).await;
                        drop(call);
                    }));
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "caller connection ended with an error");
                    return;
                }
                None => return,
            },
            _ = signaled.as_mut(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
            _ = keepalive.lost() => {
                tracing::debug!(timeout = ?KEEPALIVE_TIMEOUT, "caller left a PING unanswered; dropping its connection");
                return;
            }
            heard = settings.as_mut(), if awaiting_settings => {
                awaiting_settings = false;
                if !heard {
                    ctx.stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(timeout = ?ctx.header_timeout, "caller sent its preface but no SETTINGS in time; closing");
                    return;
                }
            }
            _ = idle_check.tick(), if !draining => {
                if open.load(Ordering::Relaxed) > 0 {
                    idle_since = None;
                } else if idle_since.get_or_insert_with(Instant::now).elapsed() >= ctx.idle_timeout {
                    ctx.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(idle = ?ctx.idle_timeout, "caller connection idle; sending GOAWAY");
                    draining = true;
                    conn.graceful_shutdown();
                }
            }
        }
    }
}

/// Whether the caller's first frame after its preface came within `limit`.
async fn heard_within(signals: &PeerSignals, limit: Duration) -> bool {
    let heard = async {
        while !signals.heard.load(Ordering::Acquire) {
            signals.changed.notified().await;
        }
    };
    tokio::time::timeout(limit, heard).await.is_ok()
}

/// One call open on a caller connection, counted while it lives.
struct Open(Arc<AtomicUsize>);

impl Open {
    fn new(open: &Arc<AtomicUsize>) -> Open {
        open.fetch_add(1, Ordering::Relaxed);
        Open(open.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One call: forwards it, then sends the answer back on `respond`. A
/// caller that resets the stream while the call is under way ends it (the
/// upstream stream is reset too).
async fn serve_call(
    route: Route,
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let mut call = std::pin::pin!(route.call(req));
    let response = std::future::poll_fn(|cx| {
        if respond.poll_reset(cx).is_ready() {
            // Returning drops the call.
            return std::task::Poll::Ready(None);
        }
        call.as_mut().poll(cx).map(Some)
    })
    .await;
    let Some(response) = response else {
        return;
    };
    let (parts, body) = response.into_parts();
    let end = body.is_end_stream();
    match respond.send_response(Response::from_parts(parts, ()), end) {
        Ok(stream) if !end => Pump::new(body, stream).run().await,
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "the answer could not be sent to the caller"),
    }
}
