//! Session affinity: calls that carry the same session key (a metadata
//! header, `x-session-id` by default) go to the same endpoint.
//!
//! A new key is placed by weighted rendezvous hashing (highest random
//! weight, Thaler and Ravishankar 1996) over the ready endpoints, keyed by
//! their addresses, so that every sidecar that sees the same endpoints puts
//! the key on the same one. The choice is then pinned in a sticky table for
//! as long as the key keeps being used (the TTL counts from the last call).
//! A pinned session stays where it is when endpoints are added; when its
//! endpoint goes away or is not ready, only that session is placed again.
//! The table is bounded: past `max_sessions`, the least recently used tenth
//! is dropped.
//!
//! With `balance_factor` (consistent hashing with bounded loads, Mirrokni,
//! Thorup and Zadimoghaddam 2018; Envoy's `hash_balance_factor`), a new key
//! goes down its rendezvous list to the first endpoint whose calls in
//! flight, counted over the mesh, are under `balance_factor` times its
//! weighted share of them all (plus this call), rounded up. Keys already
//! pinned stay where they are. Every sidecar ranks a key's endpoints the
//! same way, and with gossip they see the same load, so they place a key
//! alike but for what changed within a gossip interval.
//!
//! The hash is `util::hash`'s fixed one, so that sidecars of different
//! versions agree. A key longer than 64 bytes is pinned by a fixed-size hash
//! of it, so the table is bounded in bytes as well as in length.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use http::{HeaderMap, HeaderName};

use super::Tried;
use crate::config::AffinityConfig;
use crate::endpoint::Endpoint;
use crate::util::Clock;
use crate::util::hash::{FNV_OFFSET, fnv1a, short_key, splitmix64};

pub struct Affinity {
    header: HeaderName,
    balance_factor: Option<f64>,
    ttl_ms: u64,
    max_sessions: usize,
    clock: Clock,
    table: DashMap<Box<str>, Pin>,
}

struct Pin {
    endpoint: u64,
    last_used_ms: AtomicU64,
}

impl Affinity {
    pub fn new(config: &AffinityConfig) -> Affinity {
        Affinity {
            header: config.header.clone(),
            balance_factor: config.balance_factor,
            ttl_ms: config.ttl.as_millis() as u64,
            max_sessions: config.max_sessions,
            clock: Clock::new(),
            table: DashMap::new(),
        }
    }

    /// The call's session key, if it has one: the header's value, when it
    /// is text (UTF-8, so a key beyond ASCII sticks too; bytes that are
    /// not text are no key, and the strategy picks).
    pub fn key<'h>(&self, headers: &'h HeaderMap) -> Option<&'h str> {
        headers
            .get(&self.header)
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
            .filter(|k| !k.is_empty())
    }

    pub fn sessions(&self) -> usize {
        self.table.len()
    }

    /// Fresh sessions pinned to each endpoint, by endpoint id (a walk of
    /// the table: for the admin API, not for calls).
    pub fn sessions_by_endpoint(&self) -> std::collections::HashMap<u64, usize> {
        let now = self.now_ms();
        let mut counts = std::collections::HashMap::new();
        for pin in self.table.iter() {
            if self.fresh(&pin, now) {
                *counts.entry(pin.endpoint).or_insert(0) += 1;
            }
        }
        counts
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Whether `pin` was used within the TTL before `now`.
    fn fresh(&self, pin: &Pin, now: u64) -> bool {
        now.saturating_sub(pin.last_used_ms.load(Ordering::Relaxed)) < self.ttl_ms
    }

    /// The endpoint id session `key` is pinned to, if it is and the pin is
    /// fresh.
    pub fn pinned(&self, key: &str) -> Option<u64> {
        let key = &*short_key(key);
        let now = self.now_ms();
        self.table
            .get(key)
            .and_then(|pin| self.fresh(&pin, now).then_some(pin.endpoint))
    }

    /// Where [`Affinity::pick`] would send session `key`, without pinning
    /// it or touching its pin: the index, and whether it is the pin.
    pub fn peek(&self, key: &str, ready: &[Arc<Endpoint>], tried: &Tried) -> Option<(usize, bool)> {
        if let Some(id) = self.pinned(key)
            && let Some(i) = ready.iter().position(|e| e.id() == id)
            && !tried.contains(id)
        {
            return Some((i, true));
        }
        let key = &*short_key(key);
        let i = match self.balance_factor {
            None => rendezvous(key, ready, tried)?,
            Some(factor) => bounded(key, ready, tried, factor)?,
        };
        Some((i, false))
    }

    /// The index in `ready` for session `key`: its pinned endpoint while
    /// that is ready (and not tried), otherwise a new placement, pinned.
    pub fn pick(&self, key: &str, ready: &[Arc<Endpoint>], tried: &Tried) -> Option<usize> {
        let key = &*short_key(key);
        let now = self.now_ms();
        // Copy out of the map before doing anything else with it.
        let pinned = self.table.get(key).and_then(|pin| {
            self.fresh(&pin, now).then(|| {
                pin.last_used_ms.store(now, Ordering::Relaxed);
                pin.endpoint
            })
        });
        if let Some(id) = pinned {
            if let Some(i) = ready.iter().position(|e| e.id() == id) {
                if !tried.contains(id) {
                    return Some(i);
                }
            }
        }
        let i = match self.balance_factor {
            None => rendezvous(key, ready, tried)?,
            Some(factor) => bounded(key, ready, tried, factor)?,
        };
        self.table.insert(
            key.into(),
            Pin {
                endpoint: ready[i].id(),
                last_used_ms: AtomicU64::new(now),
            },
        );
        if self.table.len() > self.max_sessions {
            self.evict_oldest();
        }
        Some(i)
    }

    /// Forgets the sessions pinned to endpoint `id` (it left the cluster):
    /// they are placed again on their next call, and no other moves.
    pub fn forget(&self, id: u64) {
        self.table.retain(|_, pin| pin.endpoint != id);
    }

    /// Forgets sessions unused for longer than the TTL.
    pub fn sweep(&self) {
        let now = self.now_ms();
        self.table.retain(|_, pin| self.fresh(pin, now));
    }

    /// How often [`sweep`](Self::sweep) should run.
    pub fn sweep_every(&self) -> Duration {
        Duration::from_millis((self.ttl_ms / 4).clamp(1_000, 60_000))
    }

    fn evict_oldest(&self) {
        let mut ages: Vec<u64> = self
            .table
            .iter()
            .map(|e| e.last_used_ms.load(Ordering::Relaxed))
            .collect();
        if ages.is_empty() {
            return;
        }
        let drop = (ages.len() / 10)
            .max(ages.len().saturating_sub(self.max_sessions))
            .max(1);
        let (_, cutoff, _) = ages.select_nth_unstable(drop - 1);
        let cutoff = *cutoff;
        let mut left = drop;
        self.table.retain(|_, pin| {
            if left > 0 && pin.last_used_ms.load(Ordering::Relaxed) <= cutoff {
                left -= 1;
                false
            } else {
                true
            }
        });
    }
}

/// The ready endpoint (not tried) with the highest weighted score for `key`.
pub fn rendezvous(key: &str, ready: &[Arc<Endpoint>], tried: &Tried) -> Option<usize> {
    let key_hash = fnv1a(key.as_bytes(), FNV_OFFSET);
    ready
        .iter()
        .enumerate()
        .filter(|(_, e)| !tried.contains(e.id()))
        .map(|(i, e)| (i, score(key_hash, e)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

/// Endpoint `e`'s weighted rendezvous score for the key hashed to
/// `key_hash`.
fn score(key_hash: u64, e: &Endpoint) -> f64 {
    let h = splitmix64(fnv1a(e.address().as_bytes(), key_hash));
    // A uniform draw in (0, 1), turned into a weighted score: -w / ln(u) is
    // largest for the winner with probability proportional to w.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(e.weight().get()) / u.ln()
}

/// The first endpoint on `key`'s rendezvous list (not tried) whose calls in
/// flight over the mesh are under its bound: `factor` times its weighted
/// share of all of them plus this call, rounded up.
pub fn bounded(key: &str, ready: &[Arc<Endpoint>], tried: &Tried, factor: f64) -> Option<usize> {
    let key_hash = fnv1a(key.as_bytes(), FNV_OFFSET);
    let mut ranked: Vec<(usize, f64)> = ready
        .iter()
        .enumerate()
        .filter(|(_, e)| !tried.contains(e.id()))
        .map(|(i, e)| (i, score(key_hash, e)))
        .collect();
    ranked.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    let load = |i: usize| ready[i].load().mesh_wide_in_flight();
    let total: f64 = ranked.iter().map(|&(i, _)| load(i)).sum();
    let weights: f64 = ranked
        .iter()
        .map(|&(i, _)| f64::from(ready[i].weight().get()))
        .sum();
    let under_bound = |i: usize| {
        let share = f64::from(ready[i].weight().get()) / weights;
        load(i) < (factor * (total + 1.0) * share).ceil()
    };
    // The bounds add up to more than the load, so one is under its bound;
    // the first on the list stands in should rounding say otherwise.
    ranked
        .iter()
        .map(|&(i, _)| i)
        .find(|&i| under_bound(i))
        .or_else(|| ranked.first().map(|&(i, _)| i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_support::endpoints;

    fn affinity(ttl: Duration, max: usize) -> Affinity {
        Affinity::new(&AffinityConfig {
            ttl,
            max_sessions: max,
            ..AffinityConfig::default()
        })
    }

    #[test]
    fn rendezvous_follows_weights() {
        let ready = endpoints(&[1, 3]);
        let tried = Tried::default();
        let heavy = (0..4000)
            .filter(|k| rendezvous(&format!("session-{k}"), &ready, &tried) == Some(1))
            .count();
        assert!(
            (2800..3200).contains(&heavy),
            "{heavy} of 4000 on the weight-3 endpoint"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_sticks_until_its_ttl_passes_unused() {
        let a = affinity(Duration::from_secs(60), 100);
        let ready = endpoints(&[1, 1, 1]);
        let tried = Tried::default();
        let first = a.pick("s", &ready, &tried).unwrap();
        // Pin it somewhere the hash would not put it, then see it stay.
        let other = (first + 1) % 3;
        a.table.get("s").map(|_| ()).unwrap();
        a.table.insert(
            "s".into(),
            Pin {
                endpoint: ready[other].id(),
                last_used_ms: AtomicU64::new(a.now_ms()),
            },
        );
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(59)).await;
            assert_eq!(
                a.pick("s", &ready, &tried),
                Some(other),
                "used within the TTL: stays"
            );
        }
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(
            a.pick("s", &ready, &tried),
            Some(first),
            "expired: placed by the hash again"
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        a.sweep();
        assert_eq!(a.sessions(), 0);
    }

    #[test]
    fn a_key_is_the_headers_text() {
        let a = affinity(Duration::from_secs(60), 100);
        let key = |value: &[u8]| {
            let mut headers = HeaderMap::new();
            let value = http::HeaderValue::from_bytes(value).expect("a header value");
            headers.insert("x-session-id", value);
            a.key(&headers).map(str::to_owned)
        };
        assert_eq!(key(b"s-1").as_deref(), Some("s-1"));
        assert_eq!(key("café".as_bytes()).as_deref(), Some("café"));
        assert_eq!(key(b"\xff\xfe"), None, "not text");
        assert_eq!(key(b""), None, "empty");
        assert_eq!(a.key(&HeaderMap::new()), None);
    }

    #[test]
    fn long_session_keys_are_pinned_by_a_fixed_size_hash() {
        let a = affinity(Duration::from_secs(60), 100);
        let ready = endpoints(&[1, 1, 1]);
        let tried = Tried::default();
        let long = "s".repeat(15 * 1024);
        let first = a.pick(&long, &ready, &tried).unwrap();
        assert_eq!(a.pinned(&long), Some(ready[first].id()));
        assert!(a.table.iter().all(|pin| pin.key().len() <= 64));
        for _ in 0..5 {
            assert_eq!(a.pick(&long, &ready, &tried), Some(first));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_bounded_and_drops_the_least_recently_used() {
        let a = affinity(Duration::from_secs(3600), 100);
        let ready = endpoints(&[1, 1]);
        let tried = Tried::default();
        for k in 0..100 {
            a.pick(&format!("old-{k}"), &ready, &tried);
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        // Touch the first ten: they are now the most recent.
        for k in 0..10 {
            a.pick(&format!("old-{k}"), &ready, &tried);
        }
        tokio::time::advance(Duration::from_millis(10)).await;
        a.pick("new", &ready, &tried);
        assert!(a.sessions() <= 100, "{}", a.sessions());
        assert!(a.table.contains_key("new") && a.table.contains_key("old-0"));
        assert!(
            !a.table.contains_key("old-10"),
            "the least recently used left first"
        );
    }
}
