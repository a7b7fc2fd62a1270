//! Accepting callers and finding the cluster each call is for.
//!
//! Three ways in share one HTTP/2 server:
//! - the proxy port takes HTTP/1.1 `CONNECT host:port` (what gRPC clients
//!   send when `grpc_proxy`/`https_proxy` is set): the target names the
//!   cluster for every call of the tunnel ([`connect`]);
//! - the same port takes HTTP/2 with prior knowledge, and each call's
//!   `:authority` names its cluster (authority mode);
//! - a cluster's own `local_port` takes HTTP/2 whose calls all go to it;
//! - with `listener.transparent`, connections redirected by iptables come
//!   to their original destination's cluster ([`transparent`]).

mod connect;
pub mod transparent;
#[doc(hidden)]
pub use connect::parse_head_for_fuzzing;
mod prefixed;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::{Request, Response};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, MissedTickBehavior};

use crate::app::drain;
use crate::cluster::{Cluster, Router, Slot};
use crate::config::ListenerConfig;
use crate::proxy;
use crate::proxy::error::ProxyError;
use crate::util::{Clock, Throttle};
use crate::wire::grpc;
use crate::wire::io::{Batched, PeerSignals};
use crate::wire::stream::{Keepalive, Pump};

/// A PING goes to each caller connection this often...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// ...and a caller that does not answer one this soon is gone.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A call the caller resets sooner than this after opening it, before its
/// answer and before its own deadline, was reset early...
const EARLY_RESET: Duration = Duration::from_secs(1);
/// ...and a connection whose calls were mostly reset early is closed with
/// GOAWAY ENHANCE_YOUR_CALM (HTTP/2 "rapid reset", CVE-2023-44487, in the
/// form that waits for each call to be forwarded before resetting it, which
/// the HTTP/2 library's own limit does not see): when at least
/// [`EARLY_RESETS_MIN`] of its calls were, and at least three in four of
/// its recent calls (the last 100 to 200). Hedged calls (a caller that
/// sends two or three copies and cancels the slower) stay below that.
const EARLY_RESETS_MIN: u32 = 50;
/// The window of recent calls that the share is taken over is halved when
/// it reaches this many.
const EARLY_RESETS_WINDOW: u32 = 200;

/// After a caller connection is closed for abuse (rapid reset, a frame
/// flood), the listeners are wary for this long: a new connection may have
/// at most [`WARY_CALLS`] calls open, so that an attacker who reconnects
/// cannot take every slot of a cluster from the callers already connected
/// (with 4 connections it would need 100 calls each; wary, it has 10).
const WARY_FOR: Duration = Duration::from_secs(10);
const WARY_CALLS: u32 = 10;

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
    /// The same, for new connections while the listeners are wary.
    h2_wary: h2::server::Builder,
    /// Until when they are, in ms of `clock`.
    wary_until: AtomicU64,
    clock: Clock,
    pub stats: Arc<CallerStats>,
    /// A permit per caller connection open (`listener.max_connections`).
    connections: Arc<Semaphore>,
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
    /// Connections closed for resetting most of their calls early.
    pub rapid_resets: AtomicU64,
    /// Connections closed for flooding frames that carry nothing.
    pub frame_floods: AtomicU64,
    /// Connections closed as they came, `listener.max_connections` being
    /// open already.
    pub over_limit: AtomicU64,
    /// Connections the HTTP/2 library ended for breaking the protocol or
    /// its limits (CONTINUATION and HPACK floods, resets before accept).
    pub protocol_errors: AtomicU64,
    /// Transparent mode's connections, by what became of them.
    pub transparent: transparent::TransparentStats,
}

impl CallerStats {
    /// Each count with its reason, as `/metrics` labels it.
    pub fn refused(&self) -> [(&'static str, u64); 7] {
        let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
        [
            ("tunnel_forbidden", get(&self.tunnels_forbidden)),
            ("header_timeout", get(&self.header_timeouts)),
            ("idle_timeout", get(&self.idle_closed)),
            ("rapid_reset", get(&self.rapid_resets)),
            ("frame_flood", get(&self.frame_floods)),
            ("connection_limit", get(&self.over_limit)),
            ("protocol_error", get(&self.protocol_errors)),
        ]
    }
}

impl Context {
    /// `own`: every address the sidecar listens on (proxy, admin, local
    /// ports).
    pub fn new(router: Arc<Router>, config: &ListenerConfig, own: Vec<SocketAddr>) -> Context {
        let builder = |streams| {
            let mut h2 = h2::server::Builder::new();
            h2.initial_window_size(1 << 20)
                .initial_connection_window_size(4 << 20)
                .max_concurrent_streams(streams)
                .max_header_list_size(16 << 10);
            h2
        };
        let limit = config.max_connections.unwrap_or_else(connection_limit);
        tracing::debug!(limit, "caller connections open at once at most");
        Context {
            connections: Arc::new(Semaphore::new(limit as usize)),
            router,
            refuse_unknown: config.refuse_unknown,
            own,
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
            h2: builder(config.max_calls_per_connection),
            h2_wary: builder(config.max_calls_per_connection.min(WARY_CALLS)),
            wary_until: AtomicU64::new(0),
            clock: Clock::new(),
            stats: Arc::default(),
        }
    }

    /// A caller connection was closed for abuse: be wary of new ones for a
    /// while (see [`WARY_FOR`]).
    fn abused(&self) {
        let until = self.clock.now_ms() + WARY_FOR.as_millis() as u64;
        if self.wary_until.swap(until, Ordering::Relaxed) < self.clock.now_ms() {
            tracing::warn!(
                calls = WARY_CALLS,
                "a caller connection was closed for abuse; new caller connections may have {WARY_CALLS} calls open each for {WARY_FOR:?}"
            );
        }
    }

    /// The HTTP/2 settings for a new caller connection.
    fn h2(&self) -> &h2::server::Builder {
        if self.wary_until.load(Ordering::Relaxed) > self.clock.now_ms() {
            &self.h2_wary
        } else {
            &self.h2
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
        for cluster in self.router.clusters().iter() {
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
    /// Every call to one cluster (CONNECT tunnel, local port): to its
    /// current build, which a config reload may change.
    Cluster(Arc<Slot>),
    /// Each call to the cluster its `:authority` names.
    Authority(Arc<Router>),
}

impl Route {
    /// The cluster `req` goes to, or why there is none.
    fn pick(&self, req: &Request<h2::RecvStream>) -> Result<Arc<Cluster>, ProxyError> {
        match self {
            Route::Cluster(slot) => slot.current().ok_or_else(|| ProxyError::ClusterRemoved {
                cluster: slot.name().to_string(),
            }),
            Route::Authority(router) => {
                let authority = req
                    .uri()
                    .authority()
                    .map(|a| a.as_str())
                    .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok())
                    .unwrap_or("");
                router
                    .find(authority)
                    .ok_or_else(|| ProxyError::UnknownAuthority {
                        authority: authority.to_string(),
                        known: router.names(),
                    })
            }
        }
    }
}

/// File descriptors kept for all but caller connections: upstream
/// connections, the admin port's, gossip, the config file.
const FD_RESERVE: u64 = 256;

/// Raises the process's soft limit on open files to its hard limit (as Go's
/// runtime and most servers do at start), and returns how many caller
/// connections fit in it: half of what the reserve leaves (a tunnel takes
/// two descriptors), and at least 16.
pub fn connection_limit() -> u32 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if let (Some(soft), Some(hard)) = (limit.current, limit.maximum)
        && soft < hard
    {
        let raised = rustix::process::Rlimit {
            current: Some(hard.min(1 << 20)),
            maximum: Some(hard),
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => limit = raised,
            Err(e) => tracing::debug!(error = %e, "the open file limit could not be raised"),
        }
    }
    let files = limit.current.unwrap_or(1 << 20);
    (files.saturating_sub(FD_RESERVE) / 2).clamp(16, 1_000_000) as u32
}

/// Accepts on the proxy port until draining begins.
pub async fn serve_proxy(listener: Arc<TcpListener>, ctx: Arc<Context>, drain: drain::Watch) {
    let limit = ctx.clone();
    accept_loop(listener, &limit, drain, move |tcp, drain| {
        let ctx = ctx.clone();
        async move { connect::handle(tcp, ctx, drain).await }
    })
    .await
}

/// Accepts connections redirected by iptables (transparent mode) until
/// draining begins.
pub async fn serve_transparent(listener: Arc<TcpListener>, ctx: Arc<Context>, drain: drain::Watch) {
    let limit = ctx.clone();
    accept_loop(listener, &limit, drain, move |tcp, drain| {
        let ctx = ctx.clone();
        async move { transparent::handle(tcp, ctx, drain).await }
    })
    .await
}

/// Accepts on a cluster's local port until draining begins.
pub async fn serve_local(
    listener: Arc<TcpListener>,
    slot: Arc<Slot>,
    ctx: Arc<Context>,
    drain: drain::Watch,
) {
    let limit = ctx.clone();
    accept_loop(listener, &limit, drain, move |tcp, drain| {
        let ctx = ctx.clone();
        let route = Route::Cluster(slot.clone());
        async move {
            let peer = tcp.peer_addr().ok();
            serve_h2(tcp, peer, route, &ctx, drain).await
        }
    })
    .await
}

/// Accepts connections and hands each to `handle` in a task of its own,
/// while `ctx`'s connection limit has room; a connection that comes when it
/// has none is closed at once (and counted), so that the process keeps
/// descriptors for its upstream connections and its admin port.
async fn accept_loop<F, Fut>(
    listener: Arc<TcpListener>,
    ctx: &Context,
    mut drain: drain::Watch,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream, drain::Watch) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.signaled() => return,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let Ok(permit) = ctx.connections.clone().try_acquire_owned() else {
                    ctx.stats.over_limit.fetch_add(1, Ordering::Relaxed);
                    static LOG: Throttle = Throttle::new();
                    crate::warn_throttled!(
                        LOG,
                        caller = %peer,
                        "caller connection closed: listener.max_connections are open already"
                    );
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let served = handle(tcp, drain.clone());
                tokio::spawn(async move {
                    served.await;
                    drop::<OwnedSemaphorePermit>(permit);
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: wait, then go on.
                static LOG: Throttle = Throttle::new();
                crate::warn_throttled!(LOG, error = %e, "accept failed; retrying in 50ms");
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
/// that has no call open for `listener.idle_timeout` is sent a GOAWAY, and
/// one that resets most of its calls early (see [`EARLY_RESET`]) is sent a
/// GOAWAY ENHANCE_YOUR_CALM and closed. `peer`, the caller's address, is for
/// the log.
async fn serve_h2<I>(
    io: I,
    peer: Option<SocketAddr>,
    route: Route,
    ctx: &Context,
    mut drain: drain::Watch,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let signals = Arc::new(PeerSignals::default());
    let io = Batched::caller(io, signals.clone());
    let mut conn = match tokio::time::timeout(ctx.header_timeout, ctx.h2().handshake(io)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            protocol_error(ctx, peer, &e);
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
    let calls = Arc::new(Calls::default());
    let mut idle_since = Some(Instant::now());
    // Calls accepted in the current window (see EARLY_RESETS_WINDOW), and
    // the count of early resets last looked at.
    let mut window: u32 = 0;
    let mut seen_resets: u32 = 0;
    let mut idle_check =
        tokio::time::interval_at(Instant::now() + ctx.idle_timeout / 4, ctx.idle_timeout / 4);
    idle_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    idle_since = None;
                    window += 1;
                    if window >= EARLY_RESETS_WINDOW {
                        window /= 2;
                        let early = calls.early_resets.load(Ordering::Relaxed);
                        seen_resets = early - early / 2;
                        calls.early_resets.fetch_sub(early / 2, Ordering::Relaxed);
                    }
                    let call = Open::new(&calls);
                    // Boxed: a task's future is moved several times on its
                    // way into the runtime, and this one is large.
                    let route = route.clone();
                    tokio::spawn(Box::pin(serve_call(route, req, respond, call)));
                }
                Some(Err(e)) => {
                    protocol_error(ctx, peer, &e);
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
            alarm = std::future::poll_fn(|cx| alarm(cx, &signals, &calls, seen_resets)) => match alarm {
                Alarm::Flood(frames) => {
                    ctx.stats.frame_floods.fetch_add(1, Ordering::Relaxed);
                    ctx.abused();
                    static LOG: Throttle = Throttle::new();
                    crate::warn_throttled!(
                        LOG,
                        caller = ?peer,
                        frames,
                        "caller floods its connection with frames that carry nothing; closing it with GOAWAY ENHANCE_YOUR_CALM"
                    );
                    calm_down(conn).await;
                    return;
                }
                Alarm::Resets(early) => {
                seen_resets = early;
                if early >= EARLY_RESETS_MIN && early * 4 >= window * 3 {
                    ctx.stats.rapid_resets.fetch_add(1, Ordering::Relaxed);
                    ctx.abused();
                    static LOG: Throttle = Throttle::new();
                    crate::warn_throttled!(
                        LOG,
                        caller = ?peer,
                        early_resets = early,
                        of_calls = window,
                        "caller resets most of its calls before their answer (rapid reset); closing its connection with GOAWAY ENHANCE_YOUR_CALM"
                    );
                    calm_down(conn).await;
                    return;
                }
                }
            },
            heard = settings.as_mut(), if awaiting_settings => {
                awaiting_settings = false;
                if !heard {
                    ctx.stats.header_timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(timeout = ?ctx.header_timeout, "caller sent its preface but no SETTINGS in time; closing");
                    return;
                }
            }
            _ = idle_check.tick(), if !draining => {
                if calls.open.load(Ordering::Relaxed) > 0 {
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

/// Closes an abusive caller's connection: GOAWAY ENHANCE_YOUR_CALM, sent
/// within a second, and its calls end with it.
async fn calm_down<I>(mut conn: h2::server::Connection<I, Bytes>)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
    let flushed = async { while let Some(Ok(_)) = conn.accept().await {} };
    let _ = tokio::time::timeout(Duration::from_secs(1), flushed).await;
}

/// Logs (throttled) and counts a caller connection that the HTTP/2
/// library ended for a protocol error or a broken limit of its own.
fn protocol_error(ctx: &Context, peer: Option<SocketAddr>, e: &h2::Error) {
    // A caller that simply went away is no error of its.
    if e.is_io() || e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR) {
        tracing::debug!(caller = ?peer, error = %e, "caller connection ended");
        return;
    }
    ctx.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
    static LOG: Throttle = Throttle::new();
    crate::warn_throttled!(LOG, caller = ?peer, error = %e, "caller connection closed for an HTTP/2 error");
}

/// What the calls of one caller connection tell its connection task.
#[derive(Default)]
struct Calls {
    /// Calls open now.
    open: AtomicUsize,
    /// Calls reset early (see [`EARLY_RESET`]) in the current window.
    early_resets: AtomicU32,
    /// Woken on each early reset (no lock: the connection task polls it
    /// for every call it accepts).
    reset_early: AtomicWaker,
}

/// What a caller connection's task is woken for, besides its calls.
enum Alarm {
    /// The caller flooded frames of this kind.
    Flood(&'static str),
    /// The count of early resets changed; this is it now.
    Resets(u32),
}

fn alarm(
    cx: &mut std::task::Context<'_>,
    signals: &PeerSignals,
    calls: &Calls,
    seen_resets: u32,
) -> std::task::Poll<Alarm> {
    // Registered before the checks, so that nothing set in between is
    // missed.
    signals.alarm.register(cx.waker());
    calls.reset_early.register(cx.waker());
    if let Some(frames) = signals.flood() {
        return std::task::Poll::Ready(Alarm::Flood(frames));
    }
    match calls.early_resets.load(Ordering::Relaxed) {
        n if n != seen_resets => std::task::Poll::Ready(Alarm::Resets(n)),
        _ => std::task::Poll::Pending,
    }
}

/// One call open on a caller connection, counted while it lives.
struct Open(Arc<Calls>);

impl Open {
    fn new(calls: &Arc<Calls>) -> Open {
        calls.open.fetch_add(1, Ordering::Relaxed);
        Open(calls.clone())
    }

    /// The caller reset this call `age` after opening it, before its answer.
    fn reset(&self, age: Duration, patience: Duration) {
        if age < patience {
            self.0.early_resets.fetch_add(1, Ordering::Relaxed);
            self.0.reset_early.wake();
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One call: forwards it, then sends the answer back on `respond`. A
/// caller that resets the stream while the call is under way ends it (the
/// upstream stream is reset too).
fn serve_call(
    route: Route,
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    open: Open,
) -> ServeCall<impl Future<Output = Response<proxy::ResponseBody>> + Send> {
    let opened = Instant::now();
    let timeout = grpc::timeout(req.headers());
    // A reset at the caller's own deadline is no abuse.
    let patience = timeout.map_or(EARLY_RESET, |t| (t * 9 / 10).min(EARLY_RESET));
    let stage = match route.pick(&req) {
        Ok(cluster) => Stage::Forwarding {
            call: proxy::forward(cluster, req, timeout),
        },
        Err(error) => answer(&mut respond, grpc::status_response(&error.to_status())),
    };
    ServeCall {
        stage,
        respond,
        open,
        opened,
        patience,
    }
}

pin_project_lite::pin_project! {
    /// A call's task: its stages are one after another in the same place,
    /// not side by side (as in an `async` block, which also keeps the
    /// request it hands on), for this is what an open call costs in memory.
    struct ServeCall<F> {
        #[pin]
        stage: Stage<F>,
        respond: h2::server::SendResponse<Bytes>,
        open: Open,
        opened: Instant,
        patience: Duration,
    }
}

pin_project_lite::pin_project! {
    #[project = StageProj]
    enum Stage<F> {
        /// The call, until its response headers.
        Forwarding { #[pin] call: F },
        /// The response's body on its way to the caller.
        Answering { pump: Pump<proxy::ResponseBody> },
        Done,
    }
}

/// Sends the response headers to the caller: what is left is the body.
fn answer<F>(
    respond: &mut h2::server::SendResponse<Bytes>,
    response: Response<proxy::ResponseBody>,
) -> Stage<F> {
    let (parts, body) = response.into_parts();
    let end = body.is_end_stream();
    match respond.send_response(Response::from_parts(parts, ()), end) {
        Ok(stream) if !end => Stage::Answering {
            pump: Pump::new(body, stream),
        },
        Ok(_) => Stage::Done,
        Err(e) => {
            tracing::debug!(error = %e, "the answer could not be sent to the caller");
            Stage::Done
        }
    }
}

impl<F: Future<Output = Response<proxy::ResponseBody>>> Future for ServeCall<F> {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let mut this = self.project();
        loop {
            let next = match this.stage.as_mut().project() {
                StageProj::Forwarding { call } => {
                    if this.respond.poll_reset(cx).is_ready() {
                        // Dropping the call resets its upstream stream.
                        this.stage.set(Stage::Done);
                        this.open.reset(this.opened.elapsed(), *this.patience);
                        return std::task::Poll::Ready(());
                    }
                    let response = std::task::ready!(call.poll(cx));
                    answer(this.respond, response)
                }
                StageProj::Answering { pump } => {
                    std::task::ready!(pump.poll(cx));
                    Stage::Done
                }
                StageProj::Done => return std::task::Poll::Ready(()),
            };
            this.stage.set(next);
        }
    }
}
