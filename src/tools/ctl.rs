//! `agentmesh ctl`: the admin API's client, in the habits of `kubectl` and
//! `linkerd`: tables by default, `-o json` for scripts, and a message that
//! says what failed (with a non-zero exit) when a call does.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::admin_pb as pb;
use crate::admin_pb::admin_client::AdminClient;

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

/// What to do.
#[derive(Clone, Debug)]
pub enum Action {
    Clusters,
    Endpoints {
        cluster: Option<String>,
    },
    Top {
        cluster: Option<String>,
        interval: Duration,
        /// Stop after this many refreshes (0: run until interrupted).
        iterations: u32,
    },
    Hold {
        kind: &'static str,
        cluster: String,
        endpoint: String,
        for_: Option<Duration>,
    },
    Restore {
        cluster: String,
        endpoint: String,
    },
    Weight {
        cluster: String,
        endpoint: String,
        weight: u32,
    },
    Canary {
        cluster: String,
        version: String,
        percent: u32,
    },
    Split {
        cluster: String,
        /// `version=percent`.
        shares: Vec<String>,
    },
    Explain {
        cluster: String,
        method: Option<String>,
        /// `name=value`.
        headers: Vec<String>,
    },
    Reload,
}

pub struct Options {
    /// `host:port` or `http://host:port`.
    pub admin: String,
    pub token: Option<String>,
    pub output: Output,
}

/// Runs `action`; what to print on stdout, or the message for stderr.
pub async fn run(options: &Options, action: Action) -> Result<(), String> {
    let uri = if options.admin.contains("://") {
        options.admin.clone()
    } else {
        format!("http://{}", options.admin)
    };
    let channel = Channel::from_shared(uri.clone())
        .map_err(|e| format!("--admin {:?} is not an address: {e}", options.admin))?
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .map_err(|e| format!("cannot reach the admin API at {uri}: {}", source_chain(&e)))?;
    let token = options.token.clone();
    let mut client = AdminClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        if let Some(t) = &token {
            let value = format!("Bearer {t}").parse().map_err(|_| {
                tonic::Status::invalid_argument("the token is not a valid header value")
            })?;
            r.metadata_mut().insert("authorization", value);
        }
        Ok(r)
    });
    let json = options.output == Output::Json;
    let failed = |what: &str| {
        let what = what.to_string();
        move |s: tonic::Status| format!("{what}: {} ({:?})", s.message(), s.code())
    };
    let out = match action {
        Action::Clusters => {
            let r = client
                .list_clusters(pb::ListClustersRequest {})
                .await
                .map_err(failed("listing the clusters"))?
                .into_inner();
            if json {
                pretty(
                    &json!({ "clusters": r.clusters.iter().map(cluster_json).collect::<Vec<_>>() }),
                )
            } else {
                clusters_table(&r.clusters)
            }
        }
        Action::Endpoints { cluster } => {
            let r = client
                .list_endpoints(pb::ListEndpointsRequest {
                    cluster: cluster.unwrap_or_default(),
                })
                .await
                .map_err(failed("listing the endpoints"))?
                .into_inner();
            if json {
                pretty(
                    &json!({ "endpoints": r.endpoints.iter().map(endpoint_json).collect::<Vec<_>>() }),
                )
            } else {
                endpoints_table(&r.endpoints)
            }
        }
        Action::Top {
            cluster,
            interval,
            iterations,
        } => return top(&mut client, cluster, interval, iterations, json).await,
        Action::Hold {
            kind,
            cluster,
            endpoint,
            for_,
        } => {
            let request = pb::HoldRequest {
                cluster,
                endpoint,
                for_ms: for_.map_or(0, |d| d.as_millis() as u64),
            };
            let e = match kind {
                "drain" => client.drain(request).await,
                "eject" => client.eject(request).await,
                _ => client.failover(request).await,
            }
            .map_err(failed(kind))?
            .into_inner();
            one_endpoint(&e, json)
        }
        Action::Restore { cluster, endpoint } => {
            let e = client
                .restore(pb::EndpointRequest { cluster, endpoint })
                .await
                .map_err(failed("restore"))?
                .into_inner();
            one_endpoint(&e, json)
        }
        Action::Weight {
            cluster,
            endpoint,
            weight,
        } => {
            let e = client
                .set_weight(pb::SetWeightRequest {
                    cluster,
                    endpoint,
                    weight,
                })
                .await
                .map_err(failed("weight"))?
                .into_inner();
            one_endpoint(&e, json)
        }
        Action::Canary {
            cluster,
            version,
            percent,
        } => {
            let clusters = client
                .list_clusters(pb::ListClustersRequest {})
                .await
                .map_err(failed("listing the clusters"))?
                .into_inner()
                .clusters;
            let c = clusters
                .iter()
                .find(|c| c.name.eq_ignore_ascii_case(&cluster))
                .ok_or_else(|| {
                    let names: Vec<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
                    format!(
                        "canary: no cluster {cluster:?}; the clusters are: {}",
                        names.join(", ")
                    )
                })?;
            let split = canary_split(c, &version, percent)?;
            set_split(&mut client, cluster, split, json).await?
        }
        Action::Split { cluster, shares } => {
            let mut split = Vec::new();
            for s in &shares {
                let (version, percent) = s
                    .split_once('=')
                    .and_then(|(v, p)| Some((v.to_string(), p.trim().parse::<u32>().ok()?)))
                    .ok_or_else(|| format!("split: {s:?} is not VERSION=PERCENT (e.g. v2=25)"))?;
                split.push(pb::VersionShare { version, percent });
            }
            set_split(&mut client, cluster, split, json).await?
        }
        Action::Explain {
            cluster,
            method,
            headers,
        } => {
            let mut map = HashMap::new();
            for h in &headers {
                let (name, value) = h
                    .split_once('=')
                    .ok_or_else(|| format!("explain: --header {h:?} is not NAME=VALUE"))?;
                map.insert(name.trim().to_ascii_lowercase(), value.to_string());
            }
            let r = client
                .explain(pb::ExplainRequest {
                    cluster,
                    method: method.unwrap_or_default(),
                    headers: map,
                })
                .await
                .map_err(failed("explain"))?
                .into_inner();
            if json {
                pretty(&json!({
                    "cluster": r.cluster,
                    "strategy": r.strategy,
                    "chosen": r.chosen,
                    "candidates": r.candidates.iter().map(|c| json!({"address": c.address, "cost": c.cost})).collect::<Vec<_>>(),
                    "affinity": r.affinity,
                    "group": r.group,
                    "ready": r.ready,
                    "panic": r.panic,
                }))
            } else {
                explain_text(&r)
            }
        }
        Action::Reload => {
            let r = client
                .reload(pb::ReloadRequest {})
                .await
                .map_err(failed("reload"))?
                .into_inner();
            if json {
                pretty(&json!({ "result": r.result, "detail": r.detail }))
            } else {
                format!("config reload: {} ({})\n", r.result, r.detail)
            }
        }
    };
    print!("{out}");
    Ok(())
}

async fn set_split<F>(
    client: &mut AdminClient<tonic::service::interceptor::InterceptedService<Channel, F>>,
    cluster: String,
    split: Vec<pb::VersionShare>,
    json: bool,
) -> Result<String, String>
where
    F: tonic::service::Interceptor,
{
    let c = client
        .set_split(pb::SetSplitRequest { cluster, split })
        .await
        .map_err(|s| format!("split: {} ({:?})", s.message(), s.code()))?
        .into_inner();
    Ok(if json {
        pretty(&cluster_json(&c))
    } else {
        format!("cluster {}: split {}\n", c.name, split_text(&c.split))
    })
}

/// The split that gives `version` `percent` and the cluster's other
/// versions the rest, in proportion to their shares now (equal shares if
/// they have none); rounded so that the shares add up to 100.
pub fn canary_split(
    cluster: &pb::Cluster,
    version: &str,
    percent: u32,
) -> Result<Vec<pb::VersionShare>, String> {
    if percent > 100 {
        return Err(format!("canary: --percent {percent} is above 100"));
    }
    if !cluster.versions.iter().any(|v| v == version) {
        return Err(format!(
            "canary: cluster {:?} has no endpoint of version {version:?}; its versions are: {}",
            cluster.name,
            cluster.versions.join(", ")
        ));
    }
    let others: Vec<&String> = cluster.versions.iter().filter(|v| *v != version).collect();
    if others.is_empty() && percent < 100 {
        return Err(format!(
            "canary: cluster {:?} has no version beside {version:?} to take the other {}%",
            cluster.name,
            100 - percent
        ));
    }
    let now: HashMap<&str, u32> = cluster
        .split
        .iter()
        .map(|s| (s.version.as_str(), s.percent))
        .collect();
    let mut weights: Vec<f64> = others
        .iter()
        .map(|v| f64::from(now.get(v.as_str()).copied().unwrap_or(0)))
        .collect();
    if weights.iter().sum::<f64>() == 0.0 {
        weights.iter_mut().for_each(|w| *w = 1.0);
    }
    let total: f64 = weights.iter().sum();
    let rest = f64::from(100 - percent);
    let exact: Vec<f64> = weights.iter().map(|w| rest * w / total).collect();
    let mut shares: Vec<u32> = exact.iter().map(|x| x.floor() as u32).collect();
    // Largest remainders get the points rounding left over.
    let mut order: Vec<usize> = (0..exact.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let mut left = (100 - percent) - shares.iter().sum::<u32>();
    for i in order {
        if left == 0 {
            break;
        }
        shares[i] += 1;
        left -= 1;
    }
    let mut split = vec![pb::VersionShare {
        version: version.to_string(),
        percent,
    }];
    split.extend(others.iter().zip(shares).map(|(v, p)| pb::VersionShare {
        version: v.to_string(),
        percent: p,
    }));
    Ok(split)
}

/// `ctl top`: a table refreshed every `interval` from the `Watch` stream.
async fn top<F>(
    client: &mut AdminClient<tonic::service::interceptor::InterceptedService<Channel, F>>,
    cluster: Option<String>,
    interval: Duration,
    iterations: u32,
    json: bool,
) -> Result<(), String>
where
    F: tonic::service::Interceptor,
{
    use std::io::Write;
    let mut stream = client
        .watch(pb::WatchRequest {
            interval_ms: interval.as_millis().clamp(100, u128::from(u32::MAX)) as u32,
        })
        .await
        .map_err(|s| format!("top: {} ({:?})", s.message(), s.code()))?
        .into_inner();
    let mut last: HashMap<(String, String), (u64, u64)> = HashMap::new();
    let mut shown = 0;
    while let Some(r) = stream
        .message()
        .await
        .map_err(|s| format!("top: the watch ended: {} ({:?})", s.message(), s.code()))?
    {
        let endpoints: Vec<&pb::Endpoint> = r
            .endpoints
            .iter()
            .filter(|e| {
                cluster
                    .as_ref()
                    .is_none_or(|c| e.cluster.eq_ignore_ascii_case(c))
            })
            .collect();
        // Calls per second since the last message; share of the cluster's.
        let mut rates = Vec::new();
        for e in &endpoints {
            let key = (e.cluster.clone(), e.address.clone());
            let rate = match last.get(&key) {
                Some(&(calls, at)) if r.at_unix_ms > at => {
                    e.calls.saturating_sub(calls) as f64 * 1000.0 / (r.at_unix_ms - at) as f64
                }
                _ => 0.0,
            };
            last.insert(key, (e.calls, r.at_unix_ms));
            rates.push(rate);
        }
        let mut totals: HashMap<&str, f64> = HashMap::new();
        for (e, rate) in endpoints.iter().zip(&rates) {
            *totals.entry(e.cluster.as_str()).or_default() += rate;
        }
        let share = |e: &pb::Endpoint, rate: f64| {
            let total = totals.get(e.cluster.as_str()).copied().unwrap_or(0.0);
            if total > 0.0 {
                100.0 * rate / total
            } else {
                0.0
            }
        };
        let out = if json {
            let rows: Vec<Value> = endpoints
                .iter()
                .zip(&rates)
                .map(|(e, &rate)| {
                    let mut v = endpoint_json(e);
                    v["calls_per_second"] = json!(round1(rate));
                    v["share_percent"] = json!(round1(share(e, rate)));
                    v
                })
                .collect();
            format!(
                "{}\n",
                json!({ "at_unix_ms": r.at_unix_ms, "endpoints": rows })
            )
        } else {
            let mut rows = vec![
                [
                    "CLUSTER",
                    "ENDPOINT",
                    "STATE",
                    "CALLS/S",
                    "SHARE",
                    "IN FLIGHT",
                    "MESH",
                    "P50",
                    "P99",
                    "CALLS",
                ]
                .map(String::from)
                .to_vec(),
            ];
            for (e, &rate) in endpoints.iter().zip(&rates) {
                rows.push(vec![
                    e.cluster.clone(),
                    e.address.clone(),
                    state_text(e),
                    format!("{rate:.1}"),
                    format!("{:.1}%", share(e, rate)),
                    e.in_flight.to_string(),
                    format!("{:.1}", e.mesh_in_flight),
                    format!("{:.1}ms", e.p50_ms),
                    format!("{:.1}ms", e.p99_ms),
                    e.calls.to_string(),
                ]);
            }
            // Home, clear, then the table (as `top` redraws).
            format!(
                "\x1b[H\x1b[2Jagentmesh ctl top: every {}  (Ctrl-C to quit)\n\n{}",
                humantime::format_duration(interval),
                table(&rows)
            )
        };
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
        shown += 1;
        if iterations > 0 && shown >= iterations {
            break;
        }
    }
    Ok(())
}

fn explain_text(r: &pb::ExplainResponse) -> String {
    let mut out = format!(
        "cluster {} ({}, {} ready{}): {}\n",
        r.cluster,
        r.strategy,
        r.ready,
        if r.panic { ", panic mode" } else { "" },
        if r.chosen.is_empty() {
            "no endpoint is ready".to_string()
        } else {
            format!("picks {}", r.chosen)
        }
    );
    if !r.affinity.is_empty() {
        let _ = writeln!(out, "session: {}", r.affinity);
    }
    if !r.group.is_empty() {
        let _ = writeln!(out, "placed in group {}", r.group);
    }
    if !r.candidates.is_empty() {
        let mut rows = vec![vec!["CANDIDATE".to_string(), "COST".into(), String::new()]];
        for c in &r.candidates {
            rows.push(vec![
                c.address.clone(),
                format!("{:.3}", c.cost),
                if c.address == r.chosen {
                    "<- chosen".into()
                } else {
                    String::new()
                },
            ]);
        }
        out.push_str(&table(&rows));
    }
    out
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}

fn split_text(split: &[pb::VersionShare]) -> String {
    if split.is_empty() {
        return "none".into();
    }
    split
        .iter()
        .map(|s| format!("{}={}%", s.version, s.percent))
        .collect::<Vec<_>>()
        .join(" ")
}

fn state_text(e: &pb::Endpoint) -> String {
    match &e.hold {
        Some(h) if h.remaining_ms > 0 => format!(
            "{} ({} left)",
            e.state,
            humantime::format_duration(Duration::from_secs(h.remaining_ms.div_ceil(1000)))
        ),
        _ => e.state.clone(),
    }
}

fn cluster_json(c: &pb::Cluster) -> Value {
    json!({
        "name": c.name,
        "strategy": c.strategy,
        "in_flight": c.in_flight,
        "endpoints": c.endpoints,
        "ready": c.ready,
        "panic": c.panic,
        "split": c.split.iter().map(|s| (s.version.clone(), json!(s.percent))).collect::<serde_json::Map<_, _>>(),
        "split_set_by_api": c.split_set_by_api,
        "versions": c.versions,
        "retries": c.retries,
        "rate_limited": c.rate_limited,
    })
}

fn endpoint_json(e: &pb::Endpoint) -> Value {
    json!({
        "cluster": e.cluster,
        "address": e.address,
        "weight": e.weight,
        "weight_set_by_api": e.weight_set_by_api,
        "state": e.state,
        "hold": e.hold.as_ref().map(|h| json!({"kind": h.kind, "remaining_ms": h.remaining_ms, "by": h.by})),
        "in_flight": e.in_flight,
        "mesh_in_flight": e.mesh_in_flight,
        "calls": e.calls,
        "failures": e.failures,
        "p50_ms": e.p50_ms,
        "p90_ms": e.p90_ms,
        "p99_ms": e.p99_ms,
        "ejections": e.ejections,
        "zone": e.zone,
        "version": e.version,
        "priority": e.priority,
        "health_checks": {"passed": e.health_passed, "failed": e.health_failed},
        "sessions": e.sessions,
    })
}

fn one_endpoint(e: &pb::Endpoint, json: bool) -> String {
    if json {
        pretty(&endpoint_json(e))
    } else {
        endpoints_table(std::slice::from_ref(e))
    }
}

fn clusters_table(clusters: &[pb::Cluster]) -> String {
    let mut rows = vec![
        [
            "NAME",
            "STRATEGY",
            "READY",
            "IN FLIGHT",
            "PANIC",
            "SPLIT",
            "RETRIES",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for c in clusters {
        rows.push(vec![
            c.name.clone(),
            c.strategy.clone(),
            format!("{}/{}", c.ready, c.endpoints),
            c.in_flight.to_string(),
            if c.panic { "yes" } else { "no" }.into(),
            format!(
                "{}{}",
                split_text(&c.split),
                if c.split_set_by_api {
                    " (set by ctl)"
                } else {
                    ""
                }
            ),
            c.retries.to_string(),
        ]);
    }
    table(&rows)
}

fn endpoints_table(endpoints: &[pb::Endpoint]) -> String {
    let mut rows = vec![
        [
            "CLUSTER",
            "ENDPOINT",
            "STATE",
            "WEIGHT",
            "VERSION",
            "ZONE",
            "IN FLIGHT",
            "CALLS",
            "FAILURES",
            "P50",
            "P99",
            "SESSIONS",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for e in endpoints {
        rows.push(vec![
            e.cluster.clone(),
            e.address.clone(),
            state_text(e),
            format!("{}{}", e.weight, if e.weight_set_by_api { "*" } else { "" }),
            dash(&e.version),
            dash(&e.zone),
            e.in_flight.to_string(),
            e.calls.to_string(),
            e.failures.to_string(),
            format!("{:.1}ms", e.p50_ms),
            format!("{:.1}ms", e.p99_ms),
            e.sessions.to_string(),
        ]);
    }
    let mut out = table(&rows);
    if endpoints.iter().any(|e| e.weight_set_by_api) {
        out.push_str("(* weight set by ctl; a config reload gives back the configured one)\n");
    }
    out
}

fn dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

/// Left-aligned columns, two spaces apart (as kubectl prints them).
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 < row.len() {
                let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(versions: &[&str], split: &[(&str, u32)]) -> pb::Cluster {
        pb::Cluster {
            name: "planner".into(),
            versions: versions.iter().map(|v| v.to_string()).collect(),
            split: split
                .iter()
                .map(|(v, p)| pb::VersionShare {
                    version: v.to_string(),
                    percent: *p,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn shares(split: &[pb::VersionShare]) -> Vec<(String, u32)> {
        split
            .iter()
            .map(|s| (s.version.clone(), s.percent))
            .collect()
    }

    #[test]
    fn a_canary_step_gives_the_rest_to_the_other_versions_in_proportion() {
        let two = cluster(&["v1", "v2"], &[]);
        assert_eq!(
            shares(&canary_split(&two, "v2", 25).unwrap()),
            [("v2".into(), 25), ("v1".into(), 75)]
        );
        assert_eq!(
            shares(&canary_split(&two, "v2", 100).unwrap()),
            [("v2".into(), 100), ("v1".into(), 0)]
        );
        // Three versions, 60:30 now: 10 for the canary leaves 60 and 30.
        let three = cluster(&["a", "b", "c"], &[("a", 60), ("b", 30), ("c", 10)]);
        assert_eq!(
            shares(&canary_split(&three, "c", 10).unwrap()),
            [("c".into(), 10), ("a".into(), 60), ("b".into(), 30)]
        );
        // Rounding still adds up to 100.
        let even = cluster(&["a", "b", "c", "d"], &[]);
        let split = canary_split(&even, "d", 10).unwrap();
        assert_eq!(split.iter().map(|s| s.percent).sum::<u32>(), 100);
    }

    #[test]
    fn a_canary_of_an_unknown_version_or_past_100_is_refused_with_the_reason() {
        let two = cluster(&["v1", "v2"], &[]);
        let e = canary_split(&two, "v3", 10).unwrap_err();
        assert!(
            e.contains("no endpoint of version \"v3\"") && e.contains("v1, v2"),
            "{e}"
        );
        let e = canary_split(&two, "v2", 101).unwrap_err();
        assert!(e.contains("above 100"), "{e}");
        let alone = cluster(&["v2"], &[]);
        assert!(canary_split(&alone, "v2", 50).is_err());
        assert!(canary_split(&alone, "v2", 100).is_ok());
    }

    #[test]
    fn tables_align_their_columns() {
        let t = table(&[
            vec!["A".into(), "LONG HEADER".into(), "C".into()],
            vec!["wide cell".into(), "x".into(), "y".into()],
        ]);
        assert_eq!(t, "A          LONG HEADER  C\nwide cell  x            y\n");
    }
}
