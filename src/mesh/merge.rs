//! The merge rules: what peers' reports do to this sidecar's pickers. Pure
//! state, no I/O and no clock of its own: the gossip task feeds it items
//! and asks it for each endpoint's [`Figures`].
//!
//! - A report is kept per (cluster, endpoint, reporting node), the newest
//!   by `seq` winning; only endpoints this sidecar has are kept, so what a
//!   peer can make it hold is bounded by its own config.
//! - **Calls in flight** (least-connections): the sum over live peers of
//!   each one's count, at full weight while the report is younger than the
//!   refresh period plus one interval, then fading linearly to nothing at
//!   `stale_after`. A peer re-sends a count that has not changed every
//!   `stale_after / 2`, so a fresh count is never discounted.
//! - **Latency and success rate** (warm start): the means of live peers'
//!   estimates younger than ten times `stale_after` (estimates change slowly
//!   and are re-sent when they move by a step, or every five `stale_after`).
//! - **Shared limits** (mesh-wide rate limits and retry budgets): each live
//!   peer's newest use of a limit, per key, discounted linearly over the
//!   limit's window from when it came (its calls leave the sliding window as
//!   it moves on), summed.
//! - **Ejection**: a live peer's verdict younger than `stale_after` takes the
//!   endpoint out until the end of that peer's interval (for failing health
//!   checks, at most `stale_after` past the report, since the peer re-sends
//!   it while it lasts). A peer that claims more of a cluster ejected than
//!   the cluster's `max_ejection_percent` allows is ignored for that
//!   cluster: it is more likely the sick one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foca::{BroadcastHandler, Identity, Invalidates};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::report::{Item, Report, USAGE_TAG, Usage, rtt_ns};
use crate::util::lock;

/// A sidecar as the membership protocol knows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Peer {
    /// Where it gossips (its advertised address).
    pub addr: SocketAddr,
    /// Its node id; empty for a seed not yet heard from.
    pub node: String,
    /// Raised each time it rejoins, so its new self wins over its old.
    pub bump: u64,
}

impl Peer {
    /// A seed address, before its node id is known.
    pub fn seed(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            node: String::new(),
            bump: 0,
        }
    }
}

impl Identity for Peer {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Peer {
            bump: self.bump.wrapping_add(1).max(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

/// The knobs of the rules (from `[mesh]`).
#[derive(Clone, Debug)]
pub struct Rules {
    pub interval: Duration,
    pub stale_after: Duration,
    pub share_load: bool,
    pub share_ejections: bool,
    pub warm_start: bool,
}

impl Rules {
    /// How often a report with live figures (calls in flight, a verdict) is
    /// sent again while unchanged.
    pub fn refresh(&self) -> Duration {
        self.stale_after / 2
    }

    /// How often a report with estimates only is sent again while unchanged.
    pub fn slow_refresh(&self) -> Duration {
        self.stale_after * 5
    }

    /// How long estimates (latency) are used.
    pub fn slow_stale(&self) -> Duration {
        self.stale_after * 10
    }

    /// The weight of a calls-in-flight report `age` old.
    pub fn weight(&self, age: Duration) -> f64 {
        let full = self.refresh() + self.interval;
        if age <= full {
            1.0
        } else if age >= self.stale_after {
            0.0
        } else {
            (self.stale_after - age).as_secs_f64() / (self.stale_after - full).as_secs_f64()
        }
    }
}

/// One peer's newest report on one endpoint.
#[derive(Clone, Debug)]
pub struct Entry {
    pub seq: u64,
    pub report: Report,
    pub received: Instant,
}

/// What the mesh says of one endpoint, for its pickers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    /// Peers' calls in flight, weighted by age.
    pub in_flight: f64,
    /// Peers' mean latency estimate, in nanoseconds.
    pub rtt_ns: Option<f64>,
    /// Peers' mean success rate, from 0 to 1.
    pub success: Option<f64>,
    pub ejection: Option<PeerEjection>,
    /// When the newest report that counted for the load or latency came.
    pub newest: Option<Instant>,
}

/// A peer's verdict that takes an endpoint out here too.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerEjection {
    pub node: String,
    pub until: Instant,
    pub unhealthy: bool,
    pub reason: String,
}

/// What merging an item did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merged {
    /// Newer than what was held: kept, and passed on.
    New,
    /// Not newer than what is held.
    Stale,
    /// This sidecar's own, come back.
    Own,
    /// For an endpoint this sidecar does not have.
    Unknown,
    /// From a node beyond the [`MAX_NODES`] already reporting.
    Full,
}

/// The most reporting nodes the view holds at once: what a key holder
/// inventing node ids can make it hold is bounded.
pub const MAX_NODES: usize = 4096;

/// The most (limit, key, node) uses of shared limits the view holds.
pub const MAX_USAGES: usize = 65_536;

/// One peer's newest use of a shared limit, for one key.
#[derive(Clone, Debug)]
pub struct UsageEntry {
    pub seq: u64,
    pub calls: u32,
    pub retries: u32,
    pub received: Instant,
}

/// (cluster, limit, key) of a shared limit's use.
type UsageKey = (String, u8, String);

type ByNode = HashMap<String, Entry>;

/// Every peer's newest reports, for the endpoints this sidecar has.
pub struct View {
    me: String,
    /// cluster -> endpoint -> reporting node -> report.
    clusters: HashMap<String, HashMap<String, ByNode>>,
    /// Each reporting node's zone, as its latest item said.
    zones: HashMap<String, Option<String>>,
    /// The limits this sidecar shares, by (cluster, limit).
    shared: std::collections::HashSet<(String, u8)>,
    /// Peers' uses of them: (cluster, limit, key) -> node -> use.
    usage: HashMap<UsageKey, HashMap<String, UsageEntry>>,
    /// Entries in `usage`, all keys and nodes together.
    usages: usize,
}

impl View {
    pub fn new(me: &str) -> View {
        View {
            me: me.to_string(),
            clusters: HashMap::new(),
            zones: HashMap::new(),
            shared: Default::default(),
            usage: HashMap::new(),
            usages: 0,
        }
    }

    /// Sets the limits this sidecar shares with the mesh, as (cluster,
    /// limit); uses of others are dropped and refused.
    pub fn set_shared(&mut self, shared: impl IntoIterator<Item = (String, u8)>) {
        self.shared = shared.into_iter().collect();
        let shared = &self.shared;
        self.usage
            .retain(|(c, l, _), _| shared.contains(&(c.clone(), *l)));
        self.usages = self.usage.values().map(HashMap::len).sum();
    }

    /// Keeps `usage` if it is for a limit this sidecar shares and newer
    /// than what it holds.
    pub fn merge_usage(&mut self, usage: Usage, now: Instant) -> Merged {
        if usage.node == self.me {
            return Merged::Own;
        }
        if !self.shared.contains(&(usage.cluster.clone(), usage.limit)) {
            return Merged::Unknown;
        }
        let key = (usage.cluster, usage.limit, usage.key);
        let held = self.usage.get(&key).and_then(|n| n.get(&usage.node));
        if held.is_some_and(|e| e.seq >= usage.seq) {
            return Merged::Stale;
        }
        if held.is_none() && self.usages >= MAX_USAGES {
            return Merged::Full;
        }
        let entry = UsageEntry {
            seq: usage.seq,
            calls: usage.calls,
            retries: usage.retries,
            received: now,
        };
        if self
            .usage
            .entry(key)
            .or_default()
            .insert(usage.node, entry)
            .is_none()
        {
            self.usages += 1;
        }
        Merged::New
    }

    /// What live peers used of one shared limit, per key: calls and
    /// retries, each peer's discounted by the share of `window` since it
    /// came.
    pub fn peers_usage(
        &self,
        cluster: &str,
        limit: u8,
        window: Duration,
        now: Instant,
        alive: impl Fn(&str) -> bool,
    ) -> Vec<(&str, f64, f64)> {
        let mut out = Vec::new();
        for ((c, l, key), by_node) in &self.usage {
            if c != cluster || *l != limit {
                continue;
            }
            let (mut calls, mut retries) = (0.0, 0.0);
            for (node, e) in by_node {
                if !alive(node) {
                    continue;
                }
                let age = now.saturating_duration_since(e.received);
                let left = 1.0 - age.as_secs_f64() / window.as_secs_f64().max(1e-9);
                if left > 0.0 {
                    calls += f64::from(e.calls) * left;
                    retries += f64::from(e.retries) * left;
                }
            }
            if calls > 0.0 || retries > 0.0 {
                out.push((key.as_str(), calls, retries));
            }
        }
        out
    }

    /// Sets the endpoints reports are kept for: reports on endpoints no
    /// longer in the set are dropped, and new ones start empty.
    pub fn set_known<'a>(&mut self, known: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let mut next: HashMap<String, HashMap<String, ByNode>> = HashMap::new();
        for (cluster, endpoint) in known {
            let held = self
                .clusters
                .get_mut(cluster)
                .and_then(|c| c.remove(endpoint))
                .unwrap_or_default();
            next.entry(cluster.to_string())
                .or_default()
                .insert(endpoint.to_string(), held);
        }
        self.clusters = next;
    }

    /// Keeps `item` if it is newer than what this sidecar holds.
    pub fn merge(&mut self, item: Item, now: Instant) -> Merged {
        if item.node == self.me {
            return Merged::Own;
        }
        let Some(by_node) = self
            .clusters
            .get_mut(&item.cluster)
            .and_then(|c| c.get_mut(&item.endpoint))
        else {
            return Merged::Unknown;
        };
        if by_node.get(&item.node).is_some_and(|e| e.seq >= item.seq) {
            return Merged::Stale;
        }
        if !self.zones.contains_key(&item.node) && self.zones.len() >= MAX_NODES {
            return Merged::Full;
        }
        if self.zones.get(&item.node) != Some(&item.zone) {
            self.zones.insert(item.node.clone(), item.zone.clone());
        }
        by_node.insert(
            item.node,
            Entry {
                seq: item.seq,
                report: item.report,
                received: now,
            },
        );
        Merged::New
    }

    /// Drops every report of `node` (it left, or was declared down).
    pub fn forget(&mut self, node: &str) {
        for endpoints in self.clusters.values_mut() {
            for by_node in endpoints.values_mut() {
                by_node.remove(node);
            }
        }
        for by_node in self.usage.values_mut() {
            self.usages -= usize::from(by_node.remove(node).is_some());
        }
        self.usage.retain(|_, by_node| !by_node.is_empty());
        self.zones.remove(node);
    }

    /// Drops reports older than `max_age`, and the nodes left with none.
    pub fn sweep(&mut self, now: Instant, max_age: Duration) {
        let mut reporting: HashMap<&str, ()> = HashMap::new();
        for endpoints in self.clusters.values_mut() {
            for by_node in endpoints.values_mut() {
                by_node.retain(|_, e| now.saturating_duration_since(e.received) < max_age);
            }
        }
        for by_node in self.usage.values_mut() {
            by_node.retain(|_, e| now.saturating_duration_since(e.received) < max_age);
        }
        self.usage.retain(|_, by_node| !by_node.is_empty());
        self.usages = self.usage.values().map(HashMap::len).sum();
        for by_node in self.clusters.values().flat_map(|c| c.values()) {
            for node in by_node.keys() {
                reporting.insert(node, ());
            }
        }
        let keep: std::collections::HashSet<String> =
            reporting.into_keys().map(String::from).collect();
        self.zones.retain(|node, _| keep.contains(node));
    }

    /// Every report held on one endpoint.
    pub fn reports(&self, cluster: &str, endpoint: &str) -> impl Iterator<Item = (&str, &Entry)> {
        self.clusters
            .get(cluster)
            .and_then(|c| c.get(endpoint))
            .into_iter()
            .flat_map(|by_node| by_node.iter().map(|(n, e)| (n.as_str(), e)))
    }

    pub fn zone(&self, node: &str) -> Option<&str> {
        self.zones.get(node).and_then(|z| z.as_deref())
    }

    /// For each live reporter, how many of `cluster`'s endpoints it keeps
    /// out now.
    pub fn ejections_claimed(
        &self,
        cluster: &str,
        now: Instant,
        rules: &Rules,
        alive: impl Fn(&str) -> bool,
    ) -> HashMap<String, usize> {
        let mut claimed: HashMap<String, usize> = HashMap::new();
        for by_node in self
            .clusters
            .get(cluster)
            .into_iter()
            .flat_map(|c| c.values())
        {
            for (node, entry) in by_node {
                if alive(node) && verdict_until(entry, now, rules).is_some() {
                    *claimed.entry(node.clone()).or_default() += 1;
                }
            }
        }
        claimed
    }

    /// What live peers say of one endpoint now. `trusted` says whether a
    /// node's verdicts may eject (see [`View::ejections_claimed`]).
    pub fn figures(
        &self,
        cluster: &str,
        endpoint: &str,
        now: Instant,
        rules: &Rules,
        alive: impl Fn(&str) -> bool,
        trusted: impl Fn(&str) -> bool,
    ) -> Figures {
        let mut figures = Figures::default();
        let (mut rtt_sum, mut rtt_n) = (0.0, 0u32);
        let (mut ok_sum, mut ok_n) = (0.0, 0u32);
        for (node, entry) in self.reports(cluster, endpoint) {
            if !alive(node) {
                continue;
            }
            let age = now.saturating_duration_since(entry.received);
            let mut counted = false;
            if rules.share_load && entry.report.in_flight > 0 {
                figures.in_flight += f64::from(entry.report.in_flight) * rules.weight(age);
                counted = true;
            }
            if rules.warm_start && age < rules.slow_stale() {
                if let Some(ns) = rtt_ns(entry.report.rtt) {
                    rtt_sum += ns;
                    rtt_n += 1;
                    counted = true;
                }
                if let Some(ok) = entry.report.success {
                    ok_sum += f64::from(ok) / 200.0;
                    ok_n += 1;
                }
            }
            if counted && figures.newest.is_none_or(|t| entry.received > t) {
                figures.newest = Some(entry.received);
            }
            if !rules.share_ejections || !trusted(node) {
                continue;
            }
            let Some(until) = verdict_until(entry, now, rules) else {
                continue;
            };
            if figures.ejection.as_ref().is_none_or(|e| until > e.until) {
                let verdict = entry.report.verdict.as_ref().expect("checked above");
                figures.ejection = Some(PeerEjection {
                    node: node.to_string(),
                    until,
                    unhealthy: verdict.unhealthy,
                    reason: verdict.reason.clone(),
                });
            }
        }
        figures.rtt_ns = (rtt_n > 0).then(|| rtt_sum / f64::from(rtt_n));
        figures.success = (ok_n > 0).then(|| ok_sum / f64::from(ok_n));
        figures
    }
}

/// Until when a report's verdict keeps its endpoint out, if it still does.
fn verdict_until(entry: &Entry, now: Instant, rules: &Rules) -> Option<Instant> {
    let verdict = entry.report.verdict.as_ref()?;
    if now.saturating_duration_since(entry.received) >= rules.stale_after {
        return None;
    }
    let mut left = Duration::from_millis(u64::from(verdict.remaining_ms));
    if verdict.unhealthy {
        left = left.min(rules.stale_after);
    }
    let until = entry.received + left;
    (until > now).then_some(until)
}

/// The most endpoints of `total` one reporter may claim ejected and still
/// be believed: the cluster's own cap (at least one).
pub fn max_claimed(total: usize, max_ejection_share: f64) -> usize {
    ((total as f64 * max_ejection_share).floor() as usize).max(1)
}

/// Tells the membership library which broadcast supersedes which: a newer
/// report on the same endpoint from the same node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemKey {
    node: String,
    cluster: String,
    endpoint: String,
    seq: u64,
}

impl Invalidates for ItemKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.node == other.node
            && self.cluster == other.cluster
            && self.endpoint == other.endpoint
            && self.seq >= other.seq
    }
}

/// A broadcast that is not an item.
#[derive(Debug, thiserror::Error)]
#[error("a gossiped report does not decode, or breaks a bound")]
pub struct BadItem;

/// Receives items the membership library disseminates, merges them into
/// the shared view, and says which to pass on.
pub struct Handler {
    pub view: Arc<Mutex<View>>,
    /// Items merged as new (for `/mesh`).
    pub merged: Arc<std::sync::atomic::AtomicU64>,
}

impl BroadcastHandler<Peer> for Handler {
    type Key = ItemKey;
    type Error = BadItem;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&Peer>,
    ) -> Result<Option<ItemKey>, BadItem> {
        if data.first() == Some(&USAGE_TAG) {
            let usage = Usage::decode(data).ok_or(BadItem)?;
            let key = ItemKey {
                node: usage.node.clone(),
                cluster: usage.cluster.clone(),
                // Not an address: a use of limit `limit` for `key`.
                endpoint: format!("\u{0}{}\u{0}{}", usage.limit, usage.key),
                seq: usage.seq,
            };
            if sender.is_none() {
                return Ok(Some(key));
            }
            return match lock(&self.view).merge_usage(usage, Instant::now()) {
                Merged::New => {
                    self.merged
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Ok(Some(key))
                }
                _ => Ok(None),
            };
        }
        let item = Item::decode(data).ok_or(BadItem)?;
        let key = ItemKey {
            node: item.node.clone(),
            cluster: item.cluster.clone(),
            endpoint: item.endpoint.clone(),
            seq: item.seq,
        };
        // This sidecar's own report, just published: pass it on.
        if sender.is_none() {
            return Ok(Some(key));
        }
        match lock(&self.view).merge(item, Instant::now()) {
            Merged::New => {
                self.merged
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(Some(key))
            }
            Merged::Stale | Merged::Own | Merged::Unknown | Merged::Full => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests;
