//! The admin gRPC API (`proto/agentmesh/admin/v1/admin.proto`), served on
//! the admin port beside the HTTP paths.
//!
//! Reads are open to every caller of the admin port, as its HTTP paths are.
//! A write is taken from a loopback address, or from another with the
//! `[admin] token` as `authorization: Bearer TOKEN` (compared in constant
//! time); otherwise it is refused with `PERMISSION_DENIED`. Every write and
//! every refused one is logged with the address it came from.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::Stream;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::admin_pb as pb;
use crate::app::reload::{Reloader, Trigger};
use crate::cluster::{Cluster, Router};
use crate::config::Token;
use crate::endpoint::{Endpoint, Hold, HoldKind};

/// The address an admin request came from; the admin port puts it in the
/// request's extensions.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// The longest hold a write may ask for.
const MAX_HOLD: Duration = Duration::from_secs(30 * 24 * 3600);
/// The largest weight a write may set (as the config takes).
const MAX_WEIGHT: u32 = 1_000_000;
/// `Watch` sends no more often than this.
const MIN_WATCH_INTERVAL: Duration = Duration::from_millis(100);

pub struct AdminApi {
    router: Arc<Router>,
    reloader: Arc<Reloader>,
    /// The token's SHA-256: the comparison takes the same time whatever
    /// the length of what was sent.
    token: Option<[u8; 32]>,
}

impl AdminApi {
    pub fn new(router: Arc<Router>, reloader: Arc<Reloader>, token: Option<&Token>) -> AdminApi {
        AdminApi {
            router,
            reloader,
            token: token.map(|t| Sha256::digest(t.0.as_bytes()).into()),
        }
    }

    /// Whether `request` may write; on success, who sent it (for the log).
    fn writer<T>(&self, request: &Request<T>, what: &str) -> Result<String, Status> {
        let peer = request.extensions().get::<Peer>().map(|p| p.0);
        let by = peer.map_or_else(|| "an unknown address".to_string(), |p| p.to_string());
        if peer.is_some_and(|p| is_loopback(p.ip())) {
            return Ok(by);
        }
        let sent = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let refused = match (&self.token, sent) {
            (Some(token), Some(sent)) => {
                let sent: [u8; 32] = Sha256::digest(sent.trim().as_bytes()).into();
                if bool::from(sent.ct_eq(token)) {
                    return Ok(format!("{by} (with the token)"));
                }
                "the token sent is not the admin token"
            }
            (Some(_), None) => "it came from another host without the admin token",
            (None, _) => "it came from another host, and the sidecar has no [admin] token",
        };
        tracing::warn!(by, what, refused, "admin API: write refused");
        Err(Status::permission_denied(format!(
            "write refused: {refused}; writes are taken from loopback, or with `authorization: Bearer TOKEN` carrying the [admin] token"
        )))
    }

    fn cluster(&self, name: &str) -> Result<Arc<Cluster>, Status> {
        self.router.find(name).ok_or_else(|| {
            let known: Vec<String> = self
                .router
                .clusters()
                .iter()
                .map(|c| c.name().to_string())
                .collect();
            Status::not_found(format!(
                "no cluster {name:?}; the clusters are: {}",
                known.join(", ")
            ))
        })
    }

    fn endpoint(
        &self,
        cluster: &str,
        address: &str,
    ) -> Result<(Arc<Cluster>, Arc<Endpoint>), Status> {
        let cluster = self.cluster(cluster)?;
        let endpoints = cluster.endpoints();
        let found = endpoints.iter().find(|e| e.address() == address).cloned();
        match found {
            Some(e) => Ok((cluster, e)),
            None => {
                let known: Vec<&str> = endpoints.iter().map(|e| e.address()).collect();
                Err(Status::not_found(format!(
                    "cluster {:?} has no endpoint {address:?}; its endpoints are: {}",
                    cluster.name(),
                    known.join(", ")
                )))
            }
        }
    }

    /// Drain, eject or failover.
    fn hold(
        &self,
        request: Request<pb::HoldRequest>,
        kind: HoldKind,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let by = self.writer(&request, kind.as_str())?;
        let r = request.into_inner();
        let (cluster, endpoint) = self.endpoint(&r.cluster, &r.endpoint)?;
        let length = Duration::from_millis(r.for_ms);
        if length > MAX_HOLD {
            return Err(Status::invalid_argument(format!(
                "for_ms {} is longer than the most a hold may last ({} days); leave it 0 to hold until restored",
                r.for_ms,
                MAX_HOLD.as_secs() / 86_400
            )));
        }
        let until = (r.for_ms > 0).then(|| Instant::now() + length);
        tracing::info!(
            by,
            cluster = cluster.name(),
            endpoint = endpoint.address(),
            kind = kind.as_str(),
            for_ms = r.for_ms,
            "admin API: endpoint held out of the picks"
        );
        endpoint.set_hold(Hold {
            kind,
            until,
            by: by.clone(),
        });
        // The picks change now, not at the control loop's next turn.
        cluster.rebuild();
        Ok(Response::new(endpoint_pb(
            &cluster,
            &endpoint,
            Instant::now(),
        )))
    }

    fn endpoints(&self, cluster: &str) -> Result<pb::ListEndpointsResponse, Status> {
        let now = Instant::now();
        let clusters: Vec<Arc<Cluster>> = if cluster.is_empty() {
            self.router.clusters().iter().cloned().collect()
        } else {
            vec![self.cluster(cluster)?]
        };
        let endpoints = clusters
            .iter()
            .flat_map(|c| {
                let pinned = sessions(c);
                c.endpoints()
                    .iter()
                    .map(|e| endpoint_with_sessions(c, e, now, &pinned))
                    .collect::<Vec<_>>()
            })
            .collect();
        Ok(pb::ListEndpointsResponse {
            endpoints,
            at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        })
    }
}

fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Sessions pinned to each endpoint of `cluster`, by id.
fn sessions(cluster: &Cluster) -> std::collections::HashMap<u64, usize> {
    cluster
        .affinity()
        .map(|a| a.sessions_by_endpoint())
        .unwrap_or_default()
}

fn endpoint_pb(cluster: &Cluster, e: &Endpoint, now: Instant) -> pb::Endpoint {
    endpoint_with_sessions(cluster, e, now, &sessions(cluster))
}

fn endpoint_with_sessions(
    cluster: &Cluster,
    e: &Endpoint,
    now: Instant,
    sessions: &std::collections::HashMap<u64, usize>,
) -> pb::Endpoint {
    let s = e.stats();
    let latency = e.calls().percentiles(now);
    let ms = |d: Duration| (d.as_secs_f64() * 1e5).round() / 100.0;
    let hold = e.hold(now).map(|h| pb::Hold {
        kind: h.kind.as_str().to_string(),
        remaining_ms: h.until.map_or(0, |t| {
            t.saturating_duration_since(now).as_millis().max(1) as u64
        }),
        by: h.by,
    });
    pb::Endpoint {
        cluster: cluster.name().to_string(),
        address: e.address().to_string(),
        weight: e.weight().get(),
        weight_set_by_api: e.weight_set_by_api(),
        state: s.state.to_string(),
        in_flight: s.in_flight,
        mesh_in_flight: s.mesh_in_flight,
        calls: s.calls,
        failures: s.failures,
        p50_ms: latency.as_ref().map_or(0.0, |p| ms(p.p50)),
        p90_ms: latency.as_ref().map_or(0.0, |p| ms(p.p90)),
        p99_ms: latency.as_ref().map_or(0.0, |p| ms(p.p99)),
        ejections: s.ejections,
        zone: e.zone().unwrap_or_default().to_string(),
        version: e.version().unwrap_or_default().to_string(),
        priority: e.priority(),
        hold,
        health_passed: s.health_passed,
        health_failed: s.health_failed,
        sessions: sessions.get(&e.id()).copied().unwrap_or(0) as u64,
    }
}

fn cluster_pb(c: &Cluster) -> pb::Cluster {
    use crate::cluster::ClusterStats as S;
    let snapshot = c.snapshot();
    let (split, split_set_by_api) = c.split();
    let mut versions: Vec<String> = c
        .endpoints()
        .iter()
        .filter_map(|e| e.version().map(String::from))
        .collect();
    versions.sort();
    versions.dedup();
    pb::Cluster {
        name: c.name().to_string(),
        strategy: c.strategy().as_str().to_string(),
        in_flight: c.in_flight(),
        endpoints: c.endpoints().len() as u32,
        ready: snapshot.ready().len() as u32,
        panic: snapshot.is_panic(),
        split: split
            .into_iter()
            .map(|(version, percent)| pb::VersionShare { version, percent })
            .collect(),
        split_set_by_api,
        versions,
        retries: S::get(&c.stats().retries),
        rate_limited: S::get(&c.stats().rate_limited),
    }
}

type WatchStream =
    Pin<Box<dyn Stream<Item = Result<pb::ListEndpointsResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminApi {
    async fn list_clusters(
        &self,
        _: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersResponse>, Status> {
        let clusters = self
            .router
            .clusters()
            .iter()
            .map(|c| cluster_pb(c))
            .collect();
        Ok(Response::new(pb::ListClustersResponse { clusters }))
    }

    async fn list_endpoints(
        &self,
        request: Request<pb::ListEndpointsRequest>,
    ) -> Result<Response<pb::ListEndpointsResponse>, Status> {
        self.endpoints(&request.get_ref().cluster)
            .map(Response::new)
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        use futures_util::StreamExt;
        let every = match request.get_ref().interval_ms {
            0 => Duration::from_secs(1),
            ms => Duration::from_millis(u64::from(ms)).max(MIN_WATCH_INTERVAL),
        };
        let api = AdminApi {
            router: self.router.clone(),
            reloader: self.reloader.clone(),
            token: self.token,
        };
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stream =
            tokio_stream::wrappers::IntervalStream::new(interval).map(move |_| api.endpoints(""));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn explain(
        &self,
        request: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        use crate::balance::Call;
        use crate::balance::explain::Explanation;
        let r = request.into_inner();
        let cluster = self.cluster(&r.cluster)?;
        let mut headers = http::HeaderMap::new();
        for (name, value) in &r.headers {
            let name = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| Status::invalid_argument(format!("{name:?} is not a header name")))?;
            // As the data path takes it: obs-text (UTF-8 included) is allowed.
            let value = http::HeaderValue::from_bytes(value.as_bytes()).map_err(|_| {
                Status::invalid_argument(format!("header {name}: {value:?} is not a header value"))
            })?;
            headers.append(name, value);
        }
        let path = if r.method.is_empty() {
            "/"
        } else {
            r.method.as_str()
        };
        let explanation = std::cell::RefCell::new(Explanation::default());
        let snapshot = cluster.snapshot();
        let chosen = {
            let mut call = Call::new(path, &headers);
            call.explain = Some(&explanation);
            snapshot
                .pick_dry(&call, cluster.affinity())
                .map(|e| e.address().to_string())
        };
        let x = explanation.into_inner();
        Ok(Response::new(pb::ExplainResponse {
            cluster: cluster.name().to_string(),
            strategy: cluster.strategy().as_str().to_string(),
            chosen: chosen.unwrap_or_default(),
            candidates: x
                .candidates
                .iter()
                .map(|(e, cost)| pb::Candidate {
                    address: e.address().to_string(),
                    cost: *cost,
                })
                .collect(),
            affinity: x.affinity.unwrap_or_default().to_string(),
            group: x
                .group
                .map(|(i, of, n)| {
                    let s = if n == 1 { "" } else { "s" };
                    format!("{} of {of} ({n} endpoint{s})", i + 1)
                })
                .unwrap_or_default(),
            ready: snapshot.ready().len() as u32,
            panic: snapshot.is_panic(),
        }))
    }

    async fn eject(
        &self,
        request: Request<pb::HoldRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        self.hold(request, HoldKind::Eject)
    }

    async fn drain(
        &self,
        request: Request<pb::HoldRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        self.hold(request, HoldKind::Drain)
    }

    async fn failover(
        &self,
        request: Request<pb::HoldRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        self.hold(request, HoldKind::Failover)
    }

    async fn restore(
        &self,
        request: Request<pb::EndpointRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let by = self.writer(&request, "restore")?;
        let r = request.into_inner();
        let (cluster, endpoint) = self.endpoint(&r.cluster, &r.endpoint)?;
        let changed = endpoint.restore();
        tracing::info!(
            by,
            cluster = cluster.name(),
            endpoint = endpoint.address(),
            changed,
            "admin API: endpoint restored"
        );
        cluster.rebuild();
        Ok(Response::new(endpoint_pb(
            &cluster,
            &endpoint,
            Instant::now(),
        )))
    }

    async fn set_weight(
        &self,
        request: Request<pb::SetWeightRequest>,
    ) -> Result<Response<pb::Endpoint>, Status> {
        let by = self.writer(&request, "set weight")?;
        let r = request.into_inner();
        let (cluster, endpoint) = self.endpoint(&r.cluster, &r.endpoint)?;
        let weight = NonZeroU32::new(r.weight)
            .filter(|w| w.get() <= MAX_WEIGHT)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "weight {} is out of range: 1 to {MAX_WEIGHT} (drain the endpoint to send it nothing)",
                    r.weight
                ))
            })?;
        tracing::info!(
            by,
            cluster = cluster.name(),
            endpoint = endpoint.address(),
            weight = weight.get(),
            "admin API: weight set"
        );
        endpoint.set_weight_by_api(weight);
        cluster.rebuild();
        Ok(Response::new(endpoint_pb(
            &cluster,
            &endpoint,
            Instant::now(),
        )))
    }

    async fn set_split(
        &self,
        request: Request<pb::SetSplitRequest>,
    ) -> Result<Response<pb::Cluster>, Status> {
        let by = self.writer(&request, "set split")?;
        let r = request.into_inner();
        let cluster = self.cluster(&r.cluster)?;
        let known = cluster_pb(&cluster).versions;
        if r.split.is_empty() || r.split.iter().all(|s| s.percent == 0) {
            return Err(Status::invalid_argument(
                "the split gives no version a share; give at least one a percent above 0",
            ));
        }
        let mut split = Vec::new();
        for share in r.split {
            if !known.contains(&share.version) {
                return Err(Status::invalid_argument(format!(
                    "cluster {:?} has no endpoint of version {:?}; its versions are: {}",
                    cluster.name(),
                    share.version,
                    known.join(", ")
                )));
            }
            if share.percent > 100 {
                return Err(Status::invalid_argument(format!(
                    "version {:?}: {} is not a percent (0 to 100)",
                    share.version, share.percent
                )));
            }
            if split.iter().any(|(v, _)| *v == share.version) {
                return Err(Status::invalid_argument(format!(
                    "version {:?} is named twice",
                    share.version
                )));
            }
            split.push((share.version, share.percent));
        }
        let shown: Vec<String> = split.iter().map(|(v, p)| format!("{v}={p}")).collect();
        tracing::info!(by, cluster = cluster.name(), split = %shown.join(" "), "admin API: version split set");
        cluster.set_split(split);
        Ok(Response::new(cluster_pb(&cluster)))
    }

    async fn reload(
        &self,
        request: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        let by = self.writer(&request, "reload")?;
        let path = self.reloader.path().await.ok_or_else(|| {
            Status::failed_precondition(
                "the sidecar was not started from a config file: nothing to reload",
            )
        })?;
        tracing::info!(by, config = %path.display(), "admin API: reloading the config");
        match self.reloader.reload_file(&path, Trigger::Api).await {
            Some(Ok(changes)) => {
                let result = if changes.is_empty() {
                    "unchanged"
                } else {
                    "applied"
                };
                Ok(Response::new(pb::ReloadResponse {
                    result: result.to_string(),
                    detail: changes.to_string(),
                }))
            }
            Some(Err(errors)) => Err(Status::failed_precondition(format!(
                "the config was refused; the running config stays: {errors}"
            ))),
            None => Ok(Response::new(pb::ReloadResponse {
                result: "unchanged".to_string(),
                detail: String::new(),
            })),
        }
    }
}
