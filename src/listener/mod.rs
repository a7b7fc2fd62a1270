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

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use crate::cluster::{Cluster, Router};
use crate::drain;
use crate::error::ProxyError;
use crate::grpc;
use crate::proxy::{self, ResponseBody};

/// What every connection handler needs.
pub struct Context {
    pub router: Arc<Router>,
    pub refuse_unknown: bool,
    h2: http2::Builder<TokioExecutor>,
}

impl Context {
    pub fn new(router: Arc<Router>, refuse_unknown: bool) -> Context {
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .max_concurrent_streams(10_000)
            .keep_alive_interval(Duration::from_secs(60))
            .keep_alive_timeout(Duration::from_secs(20));
        Context {
            router,
            refuse_unknown,
            h2,
        }
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
    async fn call(self, req: Request<Incoming>) -> Response<ResponseBody> {
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
        // Boxed: the forwarding state is large, and hyper moves the service
        // future into a task of its own per call; a pointer moves cheaply.
        Box::pin(proxy::forward(cluster, req)).await
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
/// draining ends it with a GOAWAY.
async fn serve_h2<I>(io: I, route: Route, ctx: &Context, mut drain: drain::Watch)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let route = route.clone();
        async move { Ok::<_, Infallible>(route.call(req).await) }
    });
    let conn = ctx
        .h2
        .serve_connection(TokioIo::new(crate::io::Batched::new(io)), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = drain.signaled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "caller connection ended with an error");
    }
}
