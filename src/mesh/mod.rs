//! The mesh: sidecars that tell each other what they see of each endpoint,
//! so that every picker sees the whole mesh's load and verdicts.
//!
//! - [`seal`]: every datagram authenticated and encrypted with the mesh key,
//!   checked before anything decodes it.
//! - [`report`]: what one sidecar says of one endpoint, quantized and
//!   bounded.
//! - [`merge`]: the rules, pure: what peers' reports do to the pickers.
//! - [`node`]: the gossip task. Membership (who is in the mesh, who is
//!   down) and dissemination are foca's SWIM; reports ride on it as custom
//!   broadcasts.
//!
//! Without `[mesh]` none of this runs, and the pickers read exactly what
//! they read before.

pub mod merge;
mod node;
pub mod report;
pub mod seal;

use std::fmt::Write as _;

use serde_json::json;
use tokio::time::Instant;

pub use node::Mesh;

use crate::util::lock;

/// The mesh's counters, copied out (for `/metrics`).
#[derive(Clone, Debug, Default)]
pub struct MeshFigures {
    pub peers_alive: usize,
    pub datagrams_sent: u64,
    pub datagrams_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// By reason; `undecodable` last.
    pub dropped: Vec<(&'static str, u64)>,
    pub reports_published: u64,
    pub reports_merged: u64,
    pub reporters_ignored: u64,
}

impl Mesh {
    pub fn figures(&self) -> MeshFigures {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.counters;
        let mut dropped: Vec<_> = seal::Dropped::ALL
            .iter()
            .map(|&why| (why.name(), self.drops.get(why)))
            .collect();
        dropped.push(("undecodable", c.undecodable.load(Relaxed)));
        MeshFigures {
            peers_alive: lock(&self.peers).values().filter(|p| p.alive).count(),
            datagrams_sent: c.datagrams_sent.load(Relaxed),
            datagrams_received: c.datagrams_received.load(Relaxed),
            bytes_sent: c.bytes_sent.load(Relaxed),
            bytes_received: c.bytes_received.load(Relaxed),
            dropped,
            reports_published: c.items_published.load(Relaxed),
            reports_merged: c.items_merged.load(Relaxed),
            reporters_ignored: c.reporters_ignored.load(Relaxed),
        }
    }

    /// Whether this sidecar sees the peer `node_id` in the mesh and alive.
    pub fn sees_alive(&self, node_id: &str) -> bool {
        lock(&self.peers).get(node_id).is_some_and(|p| p.alive)
    }

    /// The `/mesh` document: this node, its peers, the datagram counters,
    /// and per cluster and endpoint the local and the mesh view.
    pub fn render(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        let now = Instant::now();
        let ms = |t: Instant| now.saturating_duration_since(t).as_millis() as u64;
        let peers = lock(&self.peers);
        let mut peer_list: Vec<_> = peers
            .iter()
            .map(|(node, p)| {
                json!({
                    "node_id": node,
                    "address": p.addr.to_string(),
                    "alive": p.alive,
                    "last_heard_ms": p.last_heard.map(ms),
                })
            })
            .collect();
        peer_list.sort_by_key(|p| p["node_id"].as_str().unwrap_or_default().to_string());
        let alive = |n: &str| peers.get(n).is_some_and(|p| p.alive);
        let view = lock(&self.view);
        let clusters: Vec<_> = self
            .router
            .clusters()
            .iter()
            .map(|c| {
                let endpoints: Vec<_> = c
                    .endpoints()
                    .iter()
                    .map(|e| {
                        let f = view.figures(c.name(), e.address(), now, &self.rules, alive, |_| true);
                        let mut reports: Vec<_> = view
                            .reports(c.name(), e.address())
                            .map(|(node, entry)| {
                                let r = &entry.report;
                                json!({
                                    "node_id": node,
                                    "zone": view.zone(node),
                                    "age_ms": ms(entry.received),
                                    "in_flight": r.in_flight,
                                    "latency_ms": report::rtt_ns(r.rtt).map(|ns| round2(ns / 1e6)),
                                    "success_rate": r.success.map(|s| f64::from(s) / 200.0),
                                    "calls_per_second": round2(report::rate(r.rate)),
                                    "verdict": r.verdict.as_ref().map(|v| json!({
                                        "unhealthy": v.unhealthy,
                                        "reason": v.reason,
                                        "until_ms": (entry.received + std::time::Duration::from_millis(u64::from(v.remaining_ms)))
                                            .saturating_duration_since(now).as_millis() as u64,
                                    })),
                                })
                            })
                            .collect();
                        reports.sort_by_key(|r| r["node_id"].as_str().unwrap_or_default().to_string());
                        let local = e.stats();
                        let own = e.own_verdict();
                        json!({
                            "address": e.address(),
                            "state": local.state,
                            "local": {
                                "in_flight": local.in_flight,
                                "latency_ms": e.load().own_rtt_estimate(now).map(|ns| round2(ns / 1e6)),
                                "verdict": own.map(|v| json!({"unhealthy": v.unhealthy, "reason": v.reason})),
                                "ejections_by_peers": local.mesh_ejections,
                            },
                            "mesh": {
                                "in_flight": round2(f.in_flight),
                                "latency_ms": f.rtt_ns.map(|ns| round2(ns / 1e6)),
                                "success_rate": f.success.map(round2),
                                "ejected_by": f.ejection.as_ref().map(|j| j.node.clone()),
                                "ejected_reason": f.ejection.as_ref().map(|j| j.reason.clone()),
                                "ejected_for_ms": f.ejection.as_ref().map(|j| j.until.saturating_duration_since(now).as_millis() as u64),
                            },
                            "reports": reports,
                        })
                    })
                    .collect();
                let mut shared = Vec::new();
                for (i, limit) in c.rate_limits().iter().enumerate() {
                    if !limit.config().mesh_wide {
                        continue;
                    }
                    let window = limit.config().window;
                    let peers = view.peers_usage(c.name(), i as u8, window, now, alive);
                    let mut keys: Vec<_> = limit.usage(now);
                    keys.sort_by(|a, b| b.1.total_cmp(&a.1));
                    keys.truncate(SHOWN_KEYS);
                    let keys: Vec<_> = keys
                        .iter()
                        .map(|(key, local)| {
                            let theirs = peers.iter().find(|p| p.0 == &**key).map_or(0.0, |p| p.1);
                            json!({"key": key, "here": round2(*local), "peers": round2(theirs)})
                        })
                        .collect();
                    shared.push(json!({
                        "limit": format!("rate_limit[{i}]"),
                        "calls": limit.config().calls.get(),
                        "keys_shared_by_peers": peers.len(),
                        "busiest_here": keys,
                    }));
                }
                if let Some(budget) = c.retry_budget().filter(|b| b.config().mesh_wide) {
                    let ttl = budget.config().ttl;
                    let peers = view.peers_usage(c.name(), report::RETRY_BUDGET, ttl, now, alive);
                    let (calls, retries) = budget.usage(now);
                    let (pc, pr) = peers.first().map_or((0.0, 0.0), |p| (p.1, p.2));
                    shared.push(json!({
                        "limit": "retry_budget",
                        "here": {"calls": calls, "retries": retries},
                        "peers": {"calls": round2(pc), "retries": round2(pr)},
                    }));
                }
                json!({"name": c.name(), "endpoints": endpoints, "shared_limits": shared})
            })
            .collect();
        let c = &self.counters;
        let mut dropped = serde_json::Map::new();
        for why in seal::Dropped::ALL {
            dropped.insert(why.name().into(), self.drops.get(why).into());
        }
        let doc = json!({
            "node_id": self.config.node_id,
            "advertise": self.config.advertise.to_string(),
            "zone": self.zone,
            "authenticated": self.key_id.is_some(),
            "key_id": self.key_id,
            "peers": peer_list,
            "datagrams": {
                "sent": c.datagrams_sent.load(Relaxed),
                "bytes_sent": c.bytes_sent.load(Relaxed),
                "received": c.datagrams_received.load(Relaxed),
                "bytes_received": c.bytes_received.load(Relaxed),
                "dropped": dropped,
                "undecodable": c.undecodable.load(Relaxed),
            },
            "reports": {
                "published": c.items_published.load(Relaxed),
                "merged": c.items_merged.load(Relaxed),
                "reporters_ignored": c.reporters_ignored.load(Relaxed),
            },
            "clusters": clusters,
        });
        let mut out = serde_json::to_string_pretty(&doc).unwrap_or_default();
        let _ = writeln!(out);
        out
    }
}

/// The busiest keys `/mesh` shows of each shared rate limit.
const SHOWN_KEYS: usize = 20;

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
