//! The live load dashboard at the admin port's `/ui`: one page of plain
//! HTML and JavaScript, embedded in the binary (no build step).
//!
//! - `GET /ui`: the page.
//! - `GET /ui/events`: server-sent events, one a second: every cluster and
//!   endpoint as `/stats?format=json` has them, and the gossip peers.
//! - `POST /ui/api/{drain,eject,failover,restore}` with a JSON body
//!   `{"cluster", "endpoint", "for_ms"}`: the admin API's writes, through
//!   the same code and the same rule (loopback, or the token as
//!   `authorization: Bearer TOKEN`). A browser sends them only from the
//!   page itself: the body must be JSON (another site's page cannot send
//!   that without a CORS preflight, which is never granted), and an
//!   `Origin` header, if any, must name the admin port's own host.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::json;

use super::api::{AdminApi, Peer};
use crate::admin_pb as pb;
use crate::admin_pb::admin_server::Admin;
use crate::cluster::Router;
use crate::mesh::Mesh;

/// The page.
pub const PAGE: &str = include_str!("ui.html");

/// How often `/ui/events` sends.
const EVERY: Duration = Duration::from_secs(1);

/// The largest write body taken.
const MAX_BODY: usize = 4096;

type Body = tonic::body::Body;

pub fn page() -> Response<Body> {
    let mut r = Response::new(Body::new(Full::new(Bytes::from_static(PAGE.as_bytes()))));
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // The page loads nothing from elsewhere, and no other site may frame it.
    h.insert(
        http::header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static(
            "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    r
}

/// One event: the figures now.
fn snapshot(router: &Router, mesh: Option<&Mesh>) -> Bytes {
    let mut all = super::stats_value(router, None);
    all["at_unix_ms"] = json!(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    );
    all["mesh"] = match mesh {
        Some(m) => serde_json::from_str::<serde_json::Value>(&m.render())
            .map(|v| json!({ "node_id": v["node_id"], "peers": v["peers"] }))
            .unwrap_or(serde_json::Value::Null),
        None => serde_json::Value::Null,
    };
    Bytes::from(format!("data: {all}\n\n"))
}

/// `/ui/events`: an event now and every second after, until the page goes.
pub fn events(router: Arc<Router>, mesh: Option<Arc<Mesh>>) -> Response<Body> {
    let mut interval = tokio::time::interval(EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stream = tokio_stream::wrappers::IntervalStream::new(interval)
        .map(move |_| Ok::<_, Infallible>(Frame::data(snapshot(&router, mesh.as_deref()))));
    let mut r = Response::new(Body::new(StreamBody::new(stream)));
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Body::new(Full::new(Bytes::from(body.to_string()))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    answer(status, json!({ "error": message.into() }))
}

/// Whether the request came from a page of this admin port: its `Origin`,
/// if any, names the host it was sent to.
fn same_origin(req: &Request<Incoming>) -> bool {
    let Some(origin) = req.headers().get(http::header::ORIGIN) else {
        return true;
    };
    let host = req.headers().get(http::header::HOST);
    match (origin.to_str().ok(), host.and_then(|h| h.to_str().ok())) {
        (Some(origin), Some(host)) => {
            origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                == Some(host)
        }
        _ => false,
    }
}

/// `POST /ui/api/ACTION`.
pub async fn write(api: &AdminApi, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let action = req.uri().path().trim_start_matches("/ui/api/").to_string();
    if req.method() != http::Method::POST {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "use POST");
    }
    let json_body = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !json_body || !same_origin(&req) {
        return refuse(
            StatusCode::FORBIDDEN,
            "writes from the page take a JSON body from the page's own origin",
        );
    }
    let authorization = req.headers().get(http::header::AUTHORIZATION).cloned();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "the body is unreadable or too long",
            );
        }
    };
    let fields: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
            );
        }
    };
    let text = |k: &str| fields[k].as_str().unwrap_or_default().to_string();
    let (cluster, endpoint) = (text("cluster"), text("endpoint"));
    let for_ms = fields["for_ms"].as_u64().unwrap_or(0);
    fn request<T>(
        message: T,
        peer: SocketAddr,
        authorization: Option<&http::HeaderValue>,
    ) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.extensions_mut().insert(Peer(peer));
        if let Some(a) =
            authorization.and_then(|a| tonic::metadata::MetadataValue::try_from(a.as_bytes()).ok())
        {
            r.metadata_mut().insert("authorization", a);
        }
        r
    }
    let auth = authorization.as_ref();
    let hold = pb::HoldRequest {
        cluster: cluster.clone(),
        endpoint: endpoint.clone(),
        for_ms,
    };
    let done = match action.as_str() {
        "drain" => api.drain(request(hold, peer, auth)).await,
        "eject" => api.eject(request(hold, peer, auth)).await,
        "failover" => api.failover(request(hold, peer, auth)).await,
        "restore" => {
            let which = pb::EndpointRequest { cluster, endpoint };
            api.restore(request(which, peer, auth)).await
        }
        other => {
            return refuse(
                StatusCode::NOT_FOUND,
                format!("no action {other:?}; try drain, eject, failover or restore"),
            );
        }
    };
    match done {
        Ok(e) => {
            let e = e.into_inner();
            answer(
                StatusCode::OK,
                json!({ "endpoint": e.address, "state": e.state }),
            )
        }
        Err(status) => {
            let code = match status.code() {
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            refuse(code, status.message())
        }
    }
}
