//! The admin HTTP port: liveness, readiness and per-endpoint counters.
//!
//! - `GET /live`: 200 while the process runs.
//! - `GET /ready`: 200 once every listener is bound.
//! - `GET /stats`: one line per endpoint: cluster, address, weight, state,
//!   calls in flight, calls sent, failures, connect failures, connections
//!   opened, ejections, ejections spared, times marked unhealthy, calls
//!   turned away while full.
//! - `GET /clusters`: one line per cluster: calls in flight, endpoints
//!   ejected, limit and rate-limit refusals, retries, panics.
//! - `GET /stats?format=json`: the same per cluster and endpoint as JSON,
//!   with each endpoint's calls by status and latency percentiles over the
//!   last 30 to 60 s.
//! - `GET /mesh` (with `[mesh]`): JSON: this node, its peers, the gossip
//!   counters, and per endpoint the local and the mesh view.
//! - `GET /metrics`: Prometheus text format (see [`crate::telemetry::metrics`]).
//! - `GET /ui`: the live load dashboard (see [`ui`]).
//!
//! On the same port, told apart by content type, the admin gRPC API
//! ([`api`]) with `grpc.health.v1` and server reflection: HTTP/1.1 and
//! HTTP/2 are both served.

pub mod api;
pub mod ui;

use std::convert::Infallible;
use std::fmt::Write;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::app::drain;
use crate::app::reload::ReloadStats;
use crate::cluster::Router;
use crate::mesh::Mesh;
use crate::telemetry::calls::{OUTCOMES, outcome_name};
use crate::telemetry::metrics::{self, Metrics};

/// Admin connections open at once at most; more are closed as they come.
const ADMIN_CONNECTIONS: usize = 64;

/// The admin gRPC services: the API, health and reflection.
pub async fn grpc_routes(api: Arc<api::AdminApi>) -> tonic::service::Routes {
    use crate::admin_pb::admin_server::AdminServer;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AdminServer<api::AdminApi>>().await;
    let mut routes =
        tonic::service::Routes::new(AdminServer::from_arc(api)).add_service(health_service);
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::admin_pb::DESCRIPTORS)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    match reflection().build_v1() {
        Ok(v1) => routes = routes.add_service(v1),
        Err(e) => tracing::warn!(error = %e, "admin API: no server reflection"),
    }
    if let Ok(v1alpha) = reflection().build_v1alpha() {
        routes = routes.add_service(v1alpha);
    }
    routes
}

#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: Arc<TcpListener>,
    router: Arc<Router>,
    mesh: Option<Arc<Mesh>>,
    metrics: Arc<Metrics>,
    reloads: Arc<ReloadStats>,
    api: Arc<api::AdminApi>,
    grpc: tonic::service::Routes,
    header_timeout: std::time::Duration,
    idle_timeout: std::time::Duration,
    mut drain: drain::Watch,
) {
    // The admin port has descriptors of its own (within the listeners'
    // reserve), and a few callers cannot take them all.
    let open = Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.signaled() => return,
        };
        let Ok((tcp, peer)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            continue;
        };
        let (router, mesh, metrics) = (router.clone(), mesh.clone(), metrics.clone());
        let (reloads, grpc, api) = (reloads.clone(), grpc.clone(), api.clone());
        tokio::spawn(async move {
            let _permit = permit;
            // A connection that sends nothing in time is closed (HTTP/1.1
            // connections also between requests: see below).
            if tokio::time::timeout(header_timeout, tcp.peek(&mut [0u8; 1]))
                .await
                .is_err()
            {
                return;
            }
            let activity = Arc::new(Activity::new());
            let seen = activity.clone();
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let open = seen.open();
                let is_grpc = req
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                let path = req.uri().path();
                let local = if is_grpc || path.starts_with("/ui/api/") {
                    None
                } else if path == "/ui" || path == "/ui/" {
                    Some(ui::page())
                } else if path == "/ui/events" {
                    Some(ui::events(router.clone(), mesh.clone()))
                } else {
                    Some(
                        respond(&req, &router, mesh.as_deref(), &metrics, &reloads)
                            .map(tonic::body::Body::new),
                    )
                };
                let (grpc, api) = (grpc.clone(), api.clone());
                async move {
                    let response = if let Some(response) = local {
                        response
                    } else if !is_grpc {
                        ui::write(&api, req, peer).await
                    } else {
                        req.extensions_mut().insert(api::Peer(peer));
                        let response = tower::ServiceExt::oneshot(grpc, req).await;
                        response.unwrap_or_else(|never| match never {})
                    };
                    // The request stays open until its response body is
                    // sent (or dropped): a Watch, or the dashboard's events.
                    Ok::<_, Infallible>(
                        response.map(|body| tonic::body::Body::new(Held { body, _open: open })),
                    )
                }
            });
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            builder
                .http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .max_concurrent_streams(16)
                .keep_alive_interval(Some(std::time::Duration::from_secs(20)))
                .keep_alive_timeout(std::time::Duration::from_secs(10));
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                done = conn => if let Err(e) = done {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                },
                () = activity.idle(header_timeout, idle_timeout) => {
                    tracing::debug!(%peer, "admin connection closed: no request open for too long");
                }
            }
        });
    }
}

/// Requests open on one admin connection, and when the last one ended: an
/// HTTP/2 connection (or an HTTP/1.1 one between requests) with none open
/// is closed after the idle timeout, and before its first request after
/// the header timeout, so that silent connections cannot hold the port's
/// 64 slots (its liveness probe among them).
struct Activity {
    open: std::sync::atomic::AtomicUsize,
    requests: std::sync::atomic::AtomicU64,
    last: std::sync::Mutex<tokio::time::Instant>,
}

/// One open request; dropped with its response body.
struct Open(Arc<Activity>);

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted open until it is
    /// sent or dropped; its length (and so `content-length`) is the body's.
    struct Held {
        #[pin]
        body: tonic::body::Body,
        _open: Open,
    }
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        *crate::util::lock(&self.0.last) = tokio::time::Instant::now();
        self.0.open.fetch_sub(1, Relaxed);
    }
}

impl Activity {
    fn new() -> Activity {
        Activity {
            open: Default::default(),
            requests: Default::default(),
            last: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    fn open(self: &Arc<Self>) -> Open {
        use std::sync::atomic::Ordering::Relaxed;
        self.open.fetch_add(1, Relaxed);
        self.requests.fetch_add(1, Relaxed);
        Open(self.clone())
    }

    /// Returns once the connection has had no request open for too long:
    /// `first` before its first request, `between` after.
    async fn idle(&self, first: std::time::Duration, between: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        loop {
            let limit = if self.requests.load(Relaxed) == 0 {
                first
            } else {
                between
            };
            let deadline = *crate::util::lock(&self.last) + limit;
            let now = tokio::time::Instant::now();
            let idle = self.open.load(Relaxed) == 0;
            if idle && now >= deadline {
                return;
            }
            // Look again at the deadline, or, while a request is open, a
            // whole limit from now.
            tokio::time::sleep_until(if idle { deadline } else { now + limit }).await;
        }
    }
}

fn respond(
    req: &Request<Incoming>,
    router: &Router,
    mesh: Option<&Mesh>,
    metrics: &Metrics,
    reloads: &ReloadStats,
) -> Response<Full<Bytes>> {
    let mut content_type = "text/plain; charset=utf-8";
    let json = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "format=json"));
    let (status, body) = match req.uri().path() {
        "/metrics" => {
            content_type = metrics::CONTENT_TYPE;
            (StatusCode::OK, metrics.render())
        }
        "/stats" if json => {
            content_type = "application/json";
            (StatusCode::OK, stats_json(router, Some(reloads)))
        }
        "/mesh" => match mesh {
            Some(mesh) => {
                content_type = "application/json";
                (StatusCode::OK, mesh.render())
            }
            None => (
                StatusCode::NOT_FOUND,
                "no [mesh] in the config: this sidecar does not gossip\n".to_string(),
            ),
        },
        "/live" => (StatusCode::OK, "live\n".to_string()),
        "/health" => {
            content_type = "application/json";
            let health = health(router, mesh, reloads);
            let status = match health.status {
                Status::Unhealthy => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::OK,
            };
            (status, health.to_json())
        }
        "/ready" => (StatusCode::OK, "ready\n".to_string()),
        "/stats" => (StatusCode::OK, stats(router)),
        "/clusters" => (StatusCode::OK, clusters(router)),
        _ => (
            StatusCode::NOT_FOUND,
            "not found; try /live, /ready, /health, /stats, /stats?format=json, /clusters, /metrics, /mesh or /ui\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

/// The `/stats` text.
pub fn stats(router: &Router) -> String {
    let mut out = String::from(
        "cluster\tendpoint\tweight\tstate\tin_flight\tcalls\tfailures\tconnect_failures\tconnections\tejections\tspared\tunhealthy\tfull\tmesh_in_flight\tmesh_ejections\n",
    );
    for cluster in router.clusters().iter() {
        for e in cluster.endpoints().iter() {
            let s = e.stats();
            let _ = writeln!(
                out,
                "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                cluster.name(),
                e.address(),
                e.weight(),
                s.state,
                s.in_flight,
                s.calls,
                s.failures,
                s.connect_failures,
                s.connections_opened,
                s.ejections,
                s.spared,
                s.marked_unhealthy,
                s.full,
                s.mesh_in_flight,
                s.mesh_ejections,
            );
        }
    }
    out
}

/// `/stats?format=json`: per cluster its figures, and per endpoint its
/// counters, calls by outcome and recent latency percentiles.
pub fn stats_json(router: &Router, reloads: Option<&ReloadStats>) -> String {
    let mut out = serde_json::to_string_pretty(&stats_value(router, reloads)).unwrap_or_default();
    out.push('\n');
    out
}

/// What [`stats_json`] prints.
pub fn stats_value(router: &Router, reloads: Option<&ReloadStats>) -> serde_json::Value {
    use crate::cluster::ClusterStats as S;
    use serde_json::json;
    let now = tokio::time::Instant::now();
    let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e5).round() / 100.0;
    let clusters: Vec<_> = router
        .clusters()
        .iter()
        .map(|c| {
            let st = c.stats();
            let snapshot = c.snapshot();
            let endpoints: Vec<_> = c
                .endpoints()
                .iter()
                .map(|e| {
                    let s = e.stats();
                    let outcomes = e.calls().outcomes();
                    let mut by_code = serde_json::Map::new();
                    for (i, &n) in outcomes.iter().enumerate().take(OUTCOMES) {
                        if n > 0 {
                            by_code.insert(outcome_name(i).into(), n.into());
                        }
                    }
                    let latency = e.calls().percentiles(now).map(|p| {
                        json!({
                            "window_calls": p.calls,
                            "p50_ms": ms(p.p50),
                            "p90_ms": ms(p.p90),
                            "p99_ms": ms(p.p99),
                        })
                    });
                    let hold = e.hold(now).map(|h| {
                        json!({
                            "kind": h.kind.as_str(),
                            "by": h.by,
                            "remaining_ms": h.until.map(|t| t.saturating_duration_since(now).as_millis() as u64),
                        })
                    });
                    json!({
                        "address": e.address(),
                        "weight": e.weight().get(),
                        "weight_set_by_api": e.weight_set_by_api(),
                        "hold": hold,
                        "zone": e.zone(),
                        "priority": e.priority(),
                        "version": e.version(),
                        "state": s.state,
                        "in_flight": s.in_flight,
                        "calls": s.calls,
                        "failures": s.failures,
                        "calls_by_status": by_code,
                        "latency": latency,
                        "connect_failures": s.connect_failures,
                        "connections": s.connections_opened,
                        "connected": e.connection().is_open(),
                        "ejections": s.ejections,
                        "spared": s.spared,
                        "unhealthy": s.marked_unhealthy,
                        "health_checks": {"passed": s.health_passed, "failed": s.health_failed},
                        "full": s.full,
                        "mesh_in_flight": s.mesh_in_flight,
                        "mesh_ejections": s.mesh_ejections,
                    })
                })
                .collect();
            let (ejected, max_ejected) = c.ejected();
            let (split, split_set_by_api) = c.split();
            let split: serde_json::Map<_, _> = split
                .into_iter()
                .map(|(v, share)| (v, share.into()))
                .collect();
            json!({
                "name": c.name(),
                "strategy": c.strategy().as_str(),
                "split": split,
                "split_set_by_api": split_set_by_api,
                "in_flight": c.in_flight(),
                "ready": snapshot.ready().len(),
                "panic": snapshot.is_panic(),
                "ejected": ejected,
                "max_ejected": max_ejected,
                "panics": S::get(&st.panics),
                "over_max_in_flight": S::get(&st.over_max_in_flight),
                "endpoints_full": S::get(&st.endpoints_full),
                "rate_limited": S::get(&st.rate_limited),
                "retries": S::get(&st.retries),
                "retries_refused": S::get(&st.retries_refused),
                "endpoints": endpoints,
            })
        })
        .collect();
    let mut all = json!({ "clusters": clusters });
    if let Some(r) = reloads {
        all["reloads"] = json!({
            "applied": ReloadStats::get(&r.applied),
            "unchanged": ReloadStats::get(&r.unchanged),
            "invalid": ReloadStats::get(&r.invalid),
            "by_signal": ReloadStats::get(&r.by_signal),
            "by_file": ReloadStats::get(&r.by_file),
            "by_api": ReloadStats::get(&r.by_api),
            "last_error": r.last_error(),
        });
    }
    all
}

/// The `/clusters` text.
pub fn clusters(router: &Router) -> String {
    use crate::cluster::ClusterStats as S;
    let mut out = String::from(
        "cluster\tin_flight\tready\tejected\tmax_ejected\tpanic\tpanics\tover_max_in_flight\tendpoints_full\trate_limited\trate_limit_keys\tretries\tretries_refused\tendpoints_added\tendpoints_removed\n",
    );
    for c in router.clusters().iter() {
        let s = c.stats();
        let snapshot = c.snapshot();
        let (ejected, max_ejected) = c.ejected();
        let keys: usize = c.rate_limits().iter().map(|l| l.keys()).sum();
        let _ = writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            c.name(),
            c.in_flight(),
            snapshot.ready().len(),
            ejected,
            max_ejected,
            snapshot.is_panic(),
            S::get(&s.panics),
            S::get(&s.over_max_in_flight),
            S::get(&s.endpoints_full),
            S::get(&s.rate_limited),
            keys,
            S::get(&s.retries),
            S::get(&s.retries_refused),
            S::get(&s.endpoints_added),
            S::get(&s.endpoints_removed),
        );
    }
    out
}

/// How the sidecar is doing, for `/health`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Healthy,
    /// Serving, but something needs a look: a cluster in panic mode, a
    /// DNS name that no longer resolves, no gossip peer, a refused reload.
    Degraded,
    /// Some cluster has no ready endpoint: its calls fail.
    Unhealthy,
}

pub struct Health {
    pub status: Status,
    pub reasons: Vec<(Status, String)>,
}

impl Health {
    pub fn to_json(&self) -> String {
        let name = |s: Status| match s {
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Unhealthy => "unhealthy",
        };
        let reasons: Vec<_> = self
            .reasons
            .iter()
            .map(|(s, r)| serde_json::json!({ "status": name(*s), "reason": r }))
            .collect();
        let mut out = serde_json::to_string_pretty(
            &serde_json::json!({ "status": name(self.status), "reasons": reasons }),
        )
        .unwrap_or_default();
        out.push('\n');
        out
    }
}

/// `/health`: healthy, degraded or unhealthy, with every reason.
pub fn health(router: &Router, mesh: Option<&Mesh>, reloads: &ReloadStats) -> Health {
    use std::sync::atomic::Ordering::Relaxed;
    let mut reasons = Vec::new();
    let now = tokio::time::Instant::now();
    for c in router.clusters().iter() {
        let endpoints = c.endpoints();
        let total = endpoints.len();
        let ready = endpoints
            .iter()
            .filter(|e| matches!(e.state(now), "ready" | "probing"))
            .count();
        if ready == 0 {
            let states: Vec<String> = endpoints
                .iter()
                .map(|e| format!("{} {}", e.address(), e.state(now)))
                .collect();
            reasons.push((
                Status::Unhealthy,
                format!(
                    "cluster {:?} has no ready endpoint (of {total}: {})",
                    c.name(),
                    if states.is_empty() {
                        "none".to_string()
                    } else {
                        states.join(", ")
                    }
                ),
            ));
        } else if c.snapshot().is_panic() {
            reasons.push((
                Status::Degraded,
                format!(
                    "cluster {:?} is in panic mode: too few endpoints are healthy, so calls go to all {total}",
                    c.name()
                ),
            ));
        }
        if c.stats().dns_failing.load(Relaxed) {
            let host = c.config().dns.as_ref().map_or("", |d| d.host.as_str());
            reasons.push((
                Status::Degraded,
                format!(
                    "cluster {:?}: DNS discovery of {host:?} is failing; the last {total} endpoints stay",
                    c.name()
                ),
            ));
        }
        if c.stats().kubernetes_failing.load(Relaxed) {
            let service = c
                .config()
                .kubernetes
                .as_ref()
                .map_or("", |k| k.service.as_str());
            reasons.push((
                Status::Degraded,
                format!(
                    "cluster {:?}: watching the EndpointSlices of Service {service:?} is failing; the last {total} endpoints stay",
                    c.name()
                ),
            ));
        }
    }
    if let Some(mesh) = mesh
        && mesh.figures().peers_alive == 0
    {
        reasons.push((
            Status::Degraded,
            "the mesh has no live peer: picks use this sidecar's own figures only".to_string(),
        ));
    }
    if let Some(error) = reloads.last_error() {
        reasons.push((
            Status::Degraded,
            format!("the last config reload was refused; the running config stays: {error}"),
        ));
    }
    let status = reasons
        .iter()
        .map(|(s, _)| *s)
        .max()
        .unwrap_or(Status::Healthy);
    Health { status, reasons }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn an_admin_connection_is_idle_only_with_no_request_open() {
        let first = Duration::from_secs(10);
        let between = Duration::from_secs(300);
        // Nothing ever asked: closed at the header timeout.
        let a = Arc::new(Activity::new());
        let t = Instant::now();
        a.idle(first, between).await;
        assert_eq!(t.elapsed(), first);
        // A request open for 20 minutes (a Watch) keeps it; the idle
        // timeout counts from when the request ended.
        let a = Arc::new(Activity::new());
        let open = a.open();
        let t = Instant::now();
        let ends = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1200)).await;
            drop(open);
        });
        a.idle(first, between).await;
        assert_eq!(t.elapsed(), Duration::from_secs(1200) + between);
        ends.await.unwrap();
    }
}
