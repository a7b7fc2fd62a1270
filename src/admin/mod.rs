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
//! - `GET /mesh` (with `[mesh]`): JSON: this node, its peers, the gossip
//!   counters, and per endpoint the local and the mesh view.

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
use crate::cluster::Router;
use crate::mesh::Mesh;

pub async fn serve(
    listener: Arc<TcpListener>,
    router: Arc<Router>,
    mesh: Option<Arc<Mesh>>,
    mut drain: drain::Watch,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.signaled() => return,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let (router, mesh) = (router.clone(), mesh.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = respond(&req, &router, mesh.as_deref());
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn respond(req: &Request<Incoming>, router: &Router, mesh: Option<&Mesh>) -> Response<Full<Bytes>> {
    let mut content_type = "text/plain; charset=utf-8";
    let (status, body) = match req.uri().path() {
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
        "/ready" => (StatusCode::OK, "ready\n".to_string()),
        "/stats" => (StatusCode::OK, stats(router)),
        "/clusters" => (StatusCode::OK, clusters(router)),
        _ => (
            StatusCode::NOT_FOUND,
            "not found; try /live, /ready, /stats, /clusters or /mesh\n".to_string(),
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
    for cluster in router.clusters() {
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

/// The `/clusters` text.
pub fn clusters(router: &Router) -> String {
    use crate::cluster::ClusterStats as S;
    let mut out = String::from(
        "cluster\tin_flight\tready\tejected\tmax_ejected\tpanic\tpanics\tover_max_in_flight\tendpoints_full\trate_limited\trate_limit_keys\tretries\tretries_refused\tendpoints_added\tendpoints_removed\n",
    );
    for c in router.clusters() {
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
