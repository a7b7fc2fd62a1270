//! `/metrics`: the sidecar's counters in the Prometheus text format,
//! written by `prometheus-client`.
//!
//! Nothing here is on the call path. The counters are the atomics the
//! endpoints, clusters and the mesh keep anyway; a scrape reads them all
//! through one [`Collector`], so a call never looks up a label or takes a
//! lock for metrics. Label values are cluster names and endpoint addresses
//! (bounded by the config) and fixed words.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType::{self, Counter, Gauge, Histogram};
use prometheus_client::registry::Registry;

use super::calls::{BUCKETS, OUTCOMES, outcome_name, prometheus_buckets};
use super::trace::Traces;
use crate::app::reload::ReloadStats;
use crate::cluster::{Cluster, ClusterStats, Router};
use crate::endpoint::{Endpoint, StatsSnapshot};
use crate::listener::CallerStats;
use crate::mesh::Mesh;

/// The `Content-Type` of what [`Metrics::render`] writes.
pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Everything `/metrics` shows.
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new(
        router: Arc<Router>,
        callers: Arc<CallerStats>,
        mesh: Option<Arc<Mesh>>,
        traces: Option<Arc<Traces>>,
        reloads: Arc<ReloadStats>,
    ) -> Metrics {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Sidecar {
            router,
            callers,
            mesh,
            traces,
            reloads,
        }));
        Metrics { registry }
    }

    /// The metrics as Prometheus text (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            // Writing to a String does not fail; say so if it ever does.
            tracing::warn!(error = %e, "encoding the metrics failed");
        }
        out
    }
}

struct Sidecar {
    router: Arc<Router>,
    callers: Arc<CallerStats>,
    mesh: Option<Arc<Mesh>>,
    traces: Option<Arc<Traces>>,
    reloads: Arc<ReloadStats>,
}

impl fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sidecar").finish_non_exhaustive()
    }
}

/// `cluster` and `endpoint` labels.
type Labels = [(&'static str, String); 2];

/// One endpoint's figures, read once per scrape.
struct Row {
    labels: Labels,
    stats: StatsSnapshot,
    outcomes: [u64; OUTCOMES],
    durations: ([u64; BUCKETS], f64),
    endpoint: Arc<Endpoint>,
}

impl Row {
    /// The endpoint's labels and one more.
    fn with(&self, key: &'static str, value: &str) -> [(&'static str, String); 3] {
        let [c, e] = self.labels.clone();
        [c, e, (key, value.to_string())]
    }
}

/// One metric family being written: its name, help and type once, then a
/// sample per label set.
struct Family<'a>(MetricEncoder<'a>);

impl Family<'_> {
    fn counter(&mut self, labels: &impl EncodeLabelSet, value: u64) -> fmt::Result {
        self.0
            .encode_family(labels)?
            .encode_counter::<NoLabelSet, _, u64>(&value, None)
    }

    fn gauge(&mut self, labels: &impl EncodeLabelSet, value: f64) -> fmt::Result {
        self.0.encode_family(labels)?.encode_gauge(&value)
    }
}

/// Writes one family: `write` adds its samples.
fn family(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    write: impl FnOnce(&mut Family<'_>) -> fmt::Result,
) -> fmt::Result {
    write(&mut Family(e.encode_descriptor(name, help, None, kind)?))
}

/// Every state an endpoint can be in (see `Endpoint::state`).
const STATES: [&str; 7] = [
    "ready",
    "unhealthy",
    "ejected",
    "probing",
    "unreachable",
    "joining",
    "removed",
];

/// Endpoint gauges: name, help, and how to read the value.
type EndpointGauge = (&'static str, &'static str, fn(&Row) -> f64);

const ENDPOINT_GAUGES: [EndpointGauge; 4] = [
    (
        "agentmesh_endpoint_in_flight",
        "Calls in flight on an endpoint from this sidecar.",
        |r| r.stats.in_flight as f64,
    ),
    (
        "agentmesh_endpoint_mesh_in_flight",
        "Calls in flight on an endpoint from the peer sidecars, as the mesh last reported (0 without a mesh).",
        |r| r.stats.mesh_in_flight,
    ),
    (
        "agentmesh_endpoint_connected",
        "1 while the sidecar holds an open HTTP/2 connection to the endpoint.",
        |r| f64::from(u8::from(r.endpoint.connection().is_open())),
    ),
    ("agentmesh_endpoint_weight", "An endpoint's weight.", |r| {
        f64::from(r.endpoint.weight().get())
    }),
];

/// Endpoint counters with only the endpoint's labels.
type EndpointCounter = (&'static str, &'static str, fn(&StatsSnapshot) -> u64);

const ENDPOINT_COUNTERS: [EndpointCounter; 4] = [
    (
        "agentmesh_endpoint_connections_opened",
        "HTTP/2 connections opened to an endpoint.",
        |s| s.connections_opened,
    ),
    (
        "agentmesh_endpoint_connect_failures",
        "Failed attempts to connect to an endpoint.",
        |s| s.connect_failures,
    ),
    (
        "agentmesh_endpoint_full",
        "Calls that passed an endpoint over because it carried max_in_flight_per_endpoint calls.",
        |s| s.full,
    ),
    (
        "agentmesh_endpoint_ejections_spared",
        "Times an endpoint's breaker would have opened but the cluster's max_ejection_percent kept it in.",
        |s| s.spared,
    ),
];

/// Cluster figures: name, help, type, and how to read the value.
type ClusterFigure = (&'static str, &'static str, MetricType, fn(&Cluster) -> u64);

const CLUSTER_FIGURES: [ClusterFigure; 11] = [
    (
        "agentmesh_cluster_in_flight",
        "Calls in flight in a cluster.",
        Gauge,
        Cluster::in_flight,
    ),
    (
        "agentmesh_cluster_endpoints",
        "Endpoints in a cluster.",
        Gauge,
        |c| c.endpoints().len() as u64,
    ),
    (
        "agentmesh_cluster_ready_endpoints",
        "Endpoints of a cluster that take calls now.",
        Gauge,
        |c| c.snapshot().ready().len() as u64,
    ),
    (
        "agentmesh_cluster_panic",
        "1 while a cluster is in panic mode (too few endpoints ready: calls go to all of them).",
        Gauge,
        |c| u64::from(c.snapshot().is_panic()),
    ),
    (
        "agentmesh_cluster_panics",
        "Times a cluster went into panic mode.",
        Counter,
        |c| ClusterStats::get(&c.stats().panics),
    ),
    (
        "agentmesh_cluster_retries",
        "Calls sent again after an attempt that reached an endpoint failed.",
        Counter,
        |c| ClusterStats::get(&c.stats().retries),
    ),
    (
        "agentmesh_cluster_retries_refused",
        "Retries the retry budget refused.",
        Counter,
        |c| ClusterStats::get(&c.stats().retries_refused),
    ),
    (
        "agentmesh_cluster_dns_answers",
        "DNS discovery: answers with addresses (applied to the endpoint set).",
        Counter,
        |c| ClusterStats::get(&c.stats().dns_answers),
    ),
    (
        "agentmesh_cluster_dns_failures",
        "DNS discovery: lookups that failed or came back empty (the last endpoints stayed).",
        Counter,
        |c| ClusterStats::get(&c.stats().dns_failures),
    ),
    (
        "agentmesh_cluster_kubernetes_updates",
        "Kubernetes discovery: endpoint sets applied from the Service's EndpointSlices.",
        Counter,
        |c| ClusterStats::get(&c.stats().kubernetes_updates),
    ),
    (
        "agentmesh_cluster_kubernetes_errors",
        "Kubernetes discovery: API client or watch errors (the last endpoints stayed).",
        Counter,
        |c| ClusterStats::get(&c.stats().kubernetes_errors),
    ),
];

impl Collector for Sidecar {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let clusters = self.router.clusters();
        let rows: Vec<Row> = clusters
            .iter()
            .flat_map(|c| {
                c.endpoints()
                    .iter()
                    .map(|ep| Row {
                        labels: [
                            ("cluster", c.name().to_string()),
                            ("endpoint", ep.address().to_string()),
                        ],
                        stats: ep.stats(),
                        outcomes: ep.calls().outcomes(),
                        durations: ep.calls().durations(),
                        endpoint: ep.clone(),
                    })
                    .collect::<Vec<_>>()
            })
            .collect();

        family(
            &mut e,
            "agentmesh_build_info",
            "The running agentmesh's version (always 1).",
            Gauge,
            |f| f.gauge(&[("version", env!("CARGO_PKG_VERSION"))], 1.0),
        )?;
        endpoint_calls(&mut e, &rows)?;
        for (name, help, read) in ENDPOINT_GAUGES {
            family(&mut e, name, help, Gauge, |f| {
                rows.iter().try_for_each(|r| f.gauge(&r.labels, read(r)))
            })?;
        }
        family(
            &mut e,
            "agentmesh_endpoint_state",
            "1 for the state an endpoint is in: ready, unhealthy (active health checks), ejected (circuit breaker), probing (half-open), unreachable (connects fail), joining or removed.",
            Gauge,
            |f| {
                for r in &rows {
                    for state in STATES {
                        f.gauge(
                            &r.with("state", state),
                            f64::from(u8::from(r.stats.state == state)),
                        )?;
                    }
                }
                Ok(())
            },
        )?;
        for (name, help, read) in ENDPOINT_COUNTERS {
            family(&mut e, name, help, Counter, |f| {
                rows.iter()
                    .try_for_each(|r| f.counter(&r.labels, read(&r.stats)))
            })?;
        }
        family(
            &mut e,
            "agentmesh_endpoint_ejections",
            "Times an endpoint was taken out: reason local (this sidecar's circuit breaker), mesh (a peer's report), health (active health checks failed).",
            Counter,
            |f| {
                for r in &rows {
                    let s = &r.stats;
                    let local = s.ejections.saturating_sub(s.mesh_ejections);
                    f.counter(&r.with("reason", "local"), local)?;
                    f.counter(&r.with("reason", "mesh"), s.mesh_ejections)?;
                    f.counter(&r.with("reason", "health"), s.marked_unhealthy)?;
                }
                Ok(())
            },
        )?;
        family(
            &mut e,
            "agentmesh_endpoint_health_checks",
            "Active health checks of an endpoint, by result (pass or fail).",
            Counter,
            |f| {
                for r in &rows {
                    f.counter(&r.with("result", "pass"), r.stats.health_passed)?;
                    f.counter(&r.with("result", "fail"), r.stats.health_failed)?;
                }
                Ok(())
            },
        )?;

        let labels: Vec<_> = clusters
            .iter()
            .map(|c| [("cluster", c.name().to_string())])
            .collect();
        for (name, help, kind, read) in CLUSTER_FIGURES {
            family(&mut e, name, help, kind, |f| {
                clusters
                    .iter()
                    .zip(&labels)
                    .try_for_each(|(c, l)| match kind {
                        Counter => f.counter(l, read(c)),
                        _ => f.gauge(l, read(c) as f64),
                    })
            })?;
        }
        family(
            &mut e,
            "agentmesh_cluster_refused",
            "Calls the sidecar answered itself without sending them: reason rate_limit, max_in_flight (the cluster's), endpoints_full (every endpoint at max_in_flight_per_endpoint).",
            Counter,
            |f| {
                for (c, [l]) in clusters.iter().zip(&labels) {
                    let s = c.stats();
                    for (reason, n) in [
                        ("rate_limit", &s.rate_limited),
                        ("max_in_flight", &s.over_max_in_flight),
                        ("endpoints_full", &s.endpoints_full),
                    ] {
                        f.counter(
                            &[l.clone(), ("reason", reason.to_string())],
                            ClusterStats::get(n),
                        )?;
                    }
                }
                Ok(())
            },
        )?;

        let tls: Vec<_> = clusters
            .iter()
            .zip(&labels)
            .filter_map(|(c, [l])| c.tls().map(|t| (l, &t.stats)))
            .collect();
        if !tls.is_empty() {
            family(
                &mut e,
                "agentmesh_tls_handshakes",
                "TLS handshakes with a cluster's endpoints, by result (ok or fail).",
                Counter,
                |f| {
                    for (l, s) in &tls {
                        let all = s.handshakes.load(Relaxed);
                        let failed = s.handshake_failures.load(Relaxed);
                        f.counter(
                            &[(*l).clone(), ("result", "ok".into())],
                            all - failed.min(all),
                        )?;
                        f.counter(&[(*l).clone(), ("result", "fail".into())], failed)?;
                    }
                    Ok(())
                },
            )?;
            family(
                &mut e,
                "agentmesh_tls_reloads",
                "Changed TLS files of a cluster: result ok (taken into use) or fail (refused; the last good files stay).",
                Counter,
                |f| {
                    for (l, s) in &tls {
                        f.counter(
                            &[(*l).clone(), ("result", "ok".into())],
                            s.reloads.load(Relaxed),
                        )?;
                        f.counter(
                            &[(*l).clone(), ("result", "fail".into())],
                            s.reload_failures.load(Relaxed),
                        )?;
                    }
                    Ok(())
                },
            )?;
        }

        family(
            &mut e,
            "agentmesh_callers_refused",
            "What the listeners refused callers, by reason (tunnel_forbidden: a CONNECT to the sidecar's own ports or to a cluster's endpoint).",
            Counter,
            |f| {
                self.callers
                    .refused()
                    .iter()
                    .try_for_each(|(reason, n)| f.counter(&[("reason", *reason)], *n))
            },
        )?;
        family(
            &mut e,
            "agentmesh_transparent_connections",
            "Transparent mode's connections, by what became of them: balanced (HTTP/2 to a cluster's address), passed_through (TCP to the original destination), refused (not redirected, or the destination unreachable).",
            Counter,
            |f| {
                self.callers
                    .transparent
                    .by_kind()
                    .iter()
                    .try_for_each(|(kind, n)| f.counter(&[("kind", *kind)], *n))
            },
        )?;
        family(
            &mut e,
            "agentmesh_config_reloads",
            "Config reloads (SIGHUP or a file change), by result: applied, unchanged (valid, nothing to change), invalid (refused; the running config stayed).",
            Counter,
            |f| {
                let r = &self.reloads;
                f.counter(&[("result", "applied")], ReloadStats::get(&r.applied))?;
                f.counter(&[("result", "unchanged")], ReloadStats::get(&r.unchanged))?;
                f.counter(&[("result", "invalid")], ReloadStats::get(&r.invalid))
            },
        )?;
        if let Some(mesh) = &self.mesh {
            mesh_metrics(&mut e, mesh)?;
        }
        if let Some(traces) = &self.traces {
            let c = traces.counts();
            family(
                &mut e,
                "agentmesh_trace_spans",
                "Spans of sampled calls, by what became of them: exported, dropped_queue_full (the export queue was full: the backend is slow or down), dropped_export_failed (the backend refused them or did not answer in time).",
                Counter,
                |f| {
                    for (outcome, n) in [
                        ("exported", &c.exported),
                        ("dropped_queue_full", &c.dropped_queue_full),
                        ("dropped_export_failed", &c.dropped_export_failed),
                    ] {
                        f.counter(
                            &[("outcome", outcome)],
                            n.load(std::sync::atomic::Ordering::Relaxed),
                        )?;
                    }
                    Ok(())
                },
            )?;
        }
        Ok(())
    }
}

/// Calls per endpoint by outcome, and their durations.
fn endpoint_calls(e: &mut DescriptorEncoder<'_>, rows: &[Row]) -> fmt::Result {
    family(
        e,
        "agentmesh_endpoint_calls",
        "Calls that ended on an endpoint, by the gRPC status it answered (stream_broke: the stream broke before a status; abandoned: the caller went away or the deadline passed first).",
        Counter,
        |f| {
            for r in rows {
                for (i, &n) in r.outcomes.iter().enumerate() {
                    // OK always, so that a rate over it exists from the start.
                    if n > 0 || i == 0 {
                        f.counter(&r.with("grpc_code", outcome_name(i)), n)?;
                    }
                }
            }
            Ok(())
        },
    )?;
    family(
        e,
        "agentmesh_endpoint_call_duration_seconds",
        "How long calls on an endpoint took, from sending the request to the end of the response.",
        Histogram,
        |f| {
            for r in rows {
                let (counts, sum) = &r.durations;
                f.0.encode_family(&r.labels)?
                    .encode_histogram::<NoLabelSet>(
                        *sum,
                        counts.iter().sum(),
                        &prometheus_buckets(counts),
                        None,
                    )?;
            }
            Ok(())
        },
    )
}

fn mesh_metrics(e: &mut DescriptorEncoder<'_>, mesh: &Mesh) -> fmt::Result {
    let m = mesh.figures();
    let none: [(&str, &str); 0] = [];
    family(
        e,
        "agentmesh_mesh_peers",
        "Peer sidecars this sidecar sees alive in the mesh.",
        Gauge,
        |f| f.gauge(&none, m.peers_alive as f64),
    )?;
    family(
        e,
        "agentmesh_mesh_datagrams",
        "Gossip datagrams, by direction (sent or received).",
        Counter,
        |f| {
            f.counter(&[("direction", "sent")], m.datagrams_sent)?;
            f.counter(&[("direction", "received")], m.datagrams_received)
        },
    )?;
    family(
        e,
        "agentmesh_mesh_bytes",
        "Gossip bytes, by direction (sent or received).",
        Counter,
        |f| {
            f.counter(&[("direction", "sent")], m.bytes_sent)?;
            f.counter(&[("direction", "received")], m.bytes_received)
        },
    )?;
    family(
        e,
        "agentmesh_mesh_datagrams_dropped",
        "Gossip datagrams dropped, by reason (oversized, truncated, other_key, replayed, forged: unread; undecodable: authentic but not usable).",
        Counter,
        |f| {
            m.dropped
                .iter()
                .try_for_each(|(reason, n)| f.counter(&[("reason", *reason)], *n))
        },
    )?;
    family(
        e,
        "agentmesh_mesh_reports",
        "Endpoint reports, by kind: published (this sidecar's) or merged (peers' taken into its view).",
        Counter,
        |f| {
            f.counter(&[("kind", "published")], m.reports_published)?;
            f.counter(&[("kind", "merged")], m.reports_merged)
        },
    )?;
    family(
        e,
        "agentmesh_mesh_reporters_ignored",
        "Peer reports ignored because the peer claimed more of a cluster ejected than max_ejection_percent allows.",
        Counter,
        |f| f.counter(&none, m.reporters_ignored),
    )
}
