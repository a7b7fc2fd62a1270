//! Rate limits a cluster applies to a call before it picks an endpoint.
//!
//! A limit is plain state behind a short `std::sync::Mutex`: no I/O, no
//! tasks, nothing held across an `.await`. The caller passes the time in
//! (`tokio::time::Instant`), which keeps the arithmetic testable with tokio's
//! paused clock and lets a caller reuse one `now` for several checks.
//!
//! # Rate limit: sliding window counter
//!
//! [`RateLimit`] allows `calls` per `window`, using the *sliding window
//! counter* that Cloudflare describes in "How we built rate limiting capable
//! of scaling to millions of domains"
//! (<https://blog.cloudflare.com/counting-things-a-lot-of-different-things/>).
//! Time is cut into fixed windows aligned to the limiter's creation. Each
//! counter keeps only two numbers, the calls admitted in the current window
//! and in the one before, and estimates the calls in the last `window` as
//!
//! ```text
//! previous * (1 - elapsed_in_current / window) + current
//! ```
//!
//! that is, it assumes the previous window's calls were spread evenly and
//! counts the share of them that still falls inside the sliding window. A
//! call is admitted (and counted) if that estimate plus one stays within
//! `calls`. Unlike a fixed window this does not let a client send `2 *
//! calls` across a window boundary, and unlike a log of timestamps it costs
//! two integers per counter whatever the rate.
//!
//! A limit is either one counter for the whole cluster, or one counter per
//! value of a request header (a tenant, a user). The per-key map is bounded
//! by `max_keys`: when it is full, keys idle for more than two windows are
//! dropped first (their counters can no longer refuse anything, so nothing is
//! lost), then the least recently used keys, in batches so that the cost of
//! the sweep is spread over many insertions. Dropping a busy key forgets its
//! count, so a flood of distinct keys can let a few extra calls through for
//! the keys it pushes out; that is the price of bounded memory, and LRU order
//! keeps the keys that are actually in use. A key longer than 64 bytes is
//! kept as a fixed-size hash of it (`util::hash::short_key`), so the map's
//! bytes are bounded as well as its length.
//!
//! # Mesh-wide limits
//!
//! A limit with `mesh_wide` counts the calls every sidecar admitted: the
//! gossip task publishes this sidecar's estimate per key ([`RateLimit::usage`])
//! and sets, each interval, what its peers admitted ([`RateLimit::set_peers`]),
//! each peer's figure discounted by how much of the window has passed since
//! it published. A call is admitted if this sidecar's estimate plus its
//! peers' plus one stays within `calls`. Peers' calls are known a gossip
//! interval or so late, so the mesh can admit a little more than `calls`
//! (what the other sidecars admit in that time).

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use http::{HeaderMap, HeaderName};
use tokio::time::Instant;

use crate::util::lock;

/// How many characters of a header value a [`Refusal`] repeats: enough to
/// recognise a tenant, not enough to echo a huge header back into logs.
const REFUSAL_VALUE_CHARS: usize = 64;

/// How a [`RateLimit`] counts.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    /// Calls admitted per `window`.
    pub calls: NonZeroU32,
    /// Length of the window; must be more than zero.
    pub window: Duration,
    /// Count calls per value of this request header instead of all
    /// together.
    pub key: Option<HeaderName>,
    /// Most keys remembered at once (a keyed limit only); at least 1.
    pub max_keys: usize,
    /// Count the calls every sidecar of the mesh admitted.
    pub mesh_wide: bool,
}

/// Why a call was not admitted.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The limit's `calls`.
    pub limit: u32,
    /// The limit's `window`.
    pub window: Duration,
    /// For a keyed limit, the header name and the value that ran out (the
    /// value cut to 64 characters).
    pub key: Option<(String, String)>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate limit of {} calls per {} exceeded",
            self.limit,
            humantime::format_duration(self.window)
        )?;
        if let Some((name, value)) = &self.key {
            write!(f, " for {name}: {value}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Refusal {}

/// A sliding-window limit of calls, for the whole cluster or per key.
#[derive(Debug)]
pub struct RateLimit {
    config: RateLimitConfig,
    /// Windows are numbered from here.
    origin: Instant,
    counters: Counters,
}

#[derive(Debug)]
enum Counters {
    /// One counter for every call: no allocation, no hashing.
    Shared(Mutex<Counter>),
    /// SipHash (std's default) rather than a faster hash, because the keys
    /// come from callers and must not be able to force collisions.
    Keyed(Mutex<HashMap<Box<str>, Counter>>),
}

/// Where `now` falls: which window, and how far into it (0.0..1.0).
#[derive(Debug, Clone, Copy)]
struct Position {
    window: u64,
    fraction: f64,
}

#[derive(Debug, Clone, Copy)]
struct Counter {
    /// The window `current` counts.
    window: u64,
    current: u32,
    previous: u32,
    /// Calls peers admitted within the window, as the gossip task last set
    /// it (0 without a mesh-wide limit).
    peers: f64,
    /// For idle and least-recently-used eviction of keyed counters.
    last_used: Instant,
}

impl Counter {
    fn new(window: u64, now: Instant) -> Counter {
        Counter {
            window,
            current: 0,
            previous: 0,
            peers: 0.0,
            last_used: now,
        }
    }

    /// Moves the counts on to window `at` (never back).
    fn roll(&mut self, at: Position) -> f64 {
        if at.window > self.window {
            self.previous = if at.window == self.window + 1 {
                self.current
            } else {
                0
            };
            self.current = 0;
            self.window = at.window;
            at.fraction
        } else if at.window == self.window {
            at.fraction
        } else {
            0.0
        }
    }

    /// Calls admitted here within the sliding window, estimated.
    fn estimate(&mut self, at: Position) -> f64 {
        let fraction = self.roll(at);
        f64::from(self.previous) * (1.0 - fraction) + f64::from(self.current)
    }

    fn admit(&mut self, at: Position, calls: NonZeroU32, now: Instant) -> bool {
        self.last_used = self.last_used.max(now);
        // Callers take `now` before the lock, so a thread can arrive with a
        // slightly older time than the last one; counting it at the start of
        // the newer window is the strict choice and never moves back.
        let estimate = self.estimate(at) + self.peers;
        if estimate + 1.0 <= f64::from(calls.get()) {
            self.current = self.current.saturating_add(1);
            true
        } else {
            false
        }
    }
}

impl RateLimit {
    /// A zero `window` is taken as one nanosecond and `max_keys` of 0 as 1,
    /// so that no configuration can make the limiter divide by zero or
    /// refuse to remember any key; [`config`](Self::config) shows the values
    /// in use.
    pub fn new(mut config: RateLimitConfig) -> RateLimit {
        config.window = config.window.max(Duration::from_nanos(1));
        config.max_keys = config.max_keys.max(1);
        let origin = Instant::now();
        let counters = match config.key {
            None => Counters::Shared(Mutex::new(Counter::new(0, origin))),
            Some(_) => Counters::Keyed(Mutex::new(HashMap::new())),
        };
        RateLimit {
            config,
            origin,
            counters,
        }
    }

    /// Admits one call with these request headers at `now`, or says no. A
    /// keyed limit lets calls without the header through (they are not
    /// limited by it); with the header repeated, the first value is the key.
    pub fn admit(&self, headers: &HeaderMap, now: Instant) -> Result<(), Refusal> {
        let at = self.position(now);
        let calls = self.config.calls;
        match &self.counters {
            Counters::Shared(counter) => {
                let admitted = lock(counter).admit(at, calls, now);
                if admitted {
                    Ok(())
                } else {
                    Err(self.refusal(None))
                }
            }
            Counters::Keyed(map) => {
                let Some(name) = &self.config.key else {
                    return Ok(());
                };
                let Some(value) = headers.get(name) else {
                    return Ok(());
                };
                // Borrows when the value is valid UTF-8 (the usual case), so
                // a known key costs a hash and no allocation. Invalid bytes
                // become U+FFFD: such values may share a counter, which only
                // makes the limit stricter for them.
                let value = String::from_utf8_lossy(value.as_bytes());
                let key = crate::util::hash::short_key(&value);
                let admitted = {
                    let mut map = lock(map);
                    match map.get_mut(key.as_ref()) {
                        Some(counter) => counter.admit(at, calls, now),
                        None => {
                            if map.len() >= self.config.max_keys {
                                self.make_room(&mut map, now);
                            }
                            let mut counter = Counter::new(at.window, now);
                            let admitted = counter.admit(at, calls, now);
                            map.insert(key.as_ref().into(), counter);
                            admitted
                        }
                    }
                };
                if admitted {
                    Ok(())
                } else {
                    let value = value.chars().take(REFUSAL_VALUE_CHARS).collect();
                    Err(self.refusal(Some((name.as_str().to_owned(), value))))
                }
            }
        }
    }

    /// Keys currently remembered (0 for an unkeyed limit).
    pub fn keys(&self) -> usize {
        match &self.counters {
            Counters::Shared(_) => 0,
            Counters::Keyed(map) => lock(map).len(),
        }
    }

    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// The calls admitted here within the window, estimated, per key (the
    /// empty key for an unkeyed limit), those above zero: what the gossip
    /// task tells peers of a mesh-wide limit.
    pub fn usage(&self, now: Instant) -> Vec<(Box<str>, f64)> {
        let at = self.position(now);
        match &self.counters {
            Counters::Shared(counter) => {
                let estimate = lock(counter).estimate(at);
                if estimate > 0.0 {
                    vec![("".into(), estimate)]
                } else {
                    Vec::new()
                }
            }
            Counters::Keyed(map) => lock(map)
                .iter_mut()
                .filter_map(|(key, c)| {
                    let estimate = c.estimate(at);
                    (estimate > 0.0).then(|| (key.clone(), estimate))
                })
                .collect(),
        }
    }

    /// Sets what peers admitted within the window, per key (`peers`
    /// returns it; keys it does not name count 0). A key only peers use is
    /// remembered like one used here, within `max_keys`.
    pub fn set_peers(&self, keys: &[(&str, f64)], now: Instant) {
        let at = self.position(now);
        match &self.counters {
            Counters::Shared(counter) => {
                let peers = keys.iter().find(|(k, _)| k.is_empty()).map_or(0.0, |k| k.1);
                lock(counter).peers = peers;
            }
            Counters::Keyed(map) => {
                let mut map = lock(map);
                for counter in map.values_mut() {
                    counter.peers = 0.0;
                }
                for &(key, peers) in keys {
                    if key.is_empty() {
                        continue;
                    }
                    if let Some(counter) = map.get_mut(key) {
                        counter.peers = peers;
                        continue;
                    }
                    if map.len() >= self.config.max_keys {
                        self.make_room(&mut map, now);
                    }
                    let mut counter = Counter::new(at.window, now);
                    counter.peers = peers;
                    map.insert(key.into(), counter);
                }
            }
        }
    }

    fn position(&self, now: Instant) -> Position {
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        let window = self.config.window.as_nanos();
        Position {
            window: u64::try_from(elapsed / window).unwrap_or(u64::MAX),
            fraction: (elapsed % window) as f64 / window as f64,
        }
    }

    fn refusal(&self, key: Option<(String, String)>) -> Refusal {
        Refusal {
            limit: self.config.calls.get(),
            window: self.config.window,
            key,
        }
    }

    /// Frees at least an eighth of `max_keys`, so that a full map is swept
    /// (O(n)) at most once per `max_keys / 8` new keys.
    fn make_room(&self, map: &mut HashMap<Box<str>, Counter>, now: Instant) {
        // After two idle windows both counts have rolled out: the counter
        // would admit exactly what a fresh one does.
        let idle = self.config.window.saturating_mul(2);
        map.retain(|_, c| now.saturating_duration_since(c.last_used) <= idle);

        let batch = (self.config.max_keys / 8).max(1);
        let keep = self.config.max_keys.saturating_sub(batch);
        if map.len() <= keep {
            return;
        }
        let excess = map.len() - keep;
        let mut ages: Vec<Instant> = map.values().map(|c| c.last_used).collect();
        let (_, &mut cutoff, _) = ages.select_nth_unstable(excess - 1);
        // Many keys can share the cutoff instant (a coarse clock, a burst):
        // drop just enough of those to free `excess`, not all of them.
        let older = ages.iter().filter(|&&t| t < cutoff).count();
        let mut ties = excess - older;
        map.retain(|_, c| {
            if c.last_used < cutoff {
                false
            } else if c.last_used == cutoff && ties > 0 {
                ties -= 1;
                false
            } else {
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn limit(
        calls: u32,
        window_secs: u64,
        key: Option<&'static str>,
        max_keys: usize,
    ) -> RateLimit {
        RateLimit::new(RateLimitConfig {
            calls: NonZeroU32::new(calls).expect("calls > 0"),
            window: Duration::from_secs(window_secs),
            key: key.map(HeaderName::from_static),
            max_keys,
            mesh_wide: false,
        })
    }

    fn headers(name: &'static str, value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        // From bytes: obs-text (bytes above 0x7f) is allowed in a value.
        let value = HeaderValue::from_bytes(value.as_bytes()).expect("valid value");
        headers.insert(name, value);
        headers
    }

    /// Calls admitted out of `attempts` made at `now`.
    fn admitted(limit: &RateLimit, headers: &HeaderMap, attempts: usize, now: Instant) -> usize {
        (0..attempts)
            .filter(|_| limit.admit(headers, now).is_ok())
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn peers_calls_count_against_a_mesh_wide_limit() {
        let limit = limit(10, 60, Some("x-tenant"), 100);
        let a = headers("x-tenant", "a");
        let now = Instant::now();
        assert_eq!(admitted(&limit, &a, 3, now), 3);
        assert_eq!(limit.usage(now), vec![("a".into(), 3.0)]);
        // Peers admitted 5 for "a" and 4 for "b", a key not seen here.
        limit.set_peers(&[("a", 5.0), ("b", 4.0)], now);
        assert_eq!(admitted(&limit, &a, 10, now), 2, "10 - 3 - 5");
        let b = headers("x-tenant", "b");
        assert_eq!(admitted(&limit, &b, 10, now), 6, "10 - 4");
        // Peers' figures are replaced whole: "a" is free of them again.
        limit.set_peers(&[], now);
        assert_eq!(admitted(&limit, &a, 10, now), 5);
        let shared = self::limit(10, 60, None, 1);
        shared.set_peers(&[("", 9.5)], now);
        assert_eq!(admitted(&shared, &HeaderMap::new(), 5, now), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn long_keys_are_counted_by_a_fixed_size_hash() {
        let limit = limit(1, 60, Some("x-tenant"), 100);
        let now = Instant::now();
        let long = "t".repeat(15 * 1024);
        assert_eq!(admitted(&limit, &headers("x-tenant", &long), 3, now), 1);
        let mut other = long.clone();
        other.push('2');
        assert_eq!(admitted(&limit, &headers("x-tenant", &other), 3, now), 1);
        let keys = limit.usage(now);
        assert_eq!(keys.len(), 2);
        assert!(keys.iter().all(|(k, _)| k.len() == 33), "{keys:?}");
        // The refusal still names the caller's value, cut short.
        let refusal = limit.admit(&headers("x-tenant", &long), now).unwrap_err();
        assert_eq!(refusal.key.unwrap().1.len(), REFUSAL_VALUE_CHARS);
    }

    #[tokio::test(start_paused = true)]
    async fn admits_exactly_the_limit_in_the_first_window() {
        let limit = limit(10, 60, None, 1);
        let none = HeaderMap::new();
        let now = Instant::now();
        assert_eq!(admitted(&limit, &none, 10, now), 10);
        for _ in 0..5 {
            let refusal = limit.admit(&none, now).expect_err("over the limit");
            assert_eq!(refusal.limit, 10);
            assert_eq!(refusal.window, Duration::from_secs(60));
            assert_eq!(refusal.key, None);
        }
        assert_eq!(limit.keys(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn window_slides() {
        let limit = limit(10, 10, None, 1);
        let none = HeaderMap::new();
        assert_eq!(admitted(&limit, &none, 10, Instant::now()), 10);

        // The whole previous window still counts at its end.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(admitted(&limit, &none, 10, Instant::now()), 0);

        // Half of it has slid out.
        tokio::time::advance(Duration::from_secs(5)).await;
        let half = admitted(&limit, &none, 10, Instant::now());
        assert!((4..=6).contains(&half), "admitted {half} at 15 s");

        // Two windows later nothing is left of either.
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(admitted(&limit, &none, 15, Instant::now()), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_have_separate_budgets() {
        let limit = limit(2, 60, Some("x-tenant"), 100);
        let a = headers("x-tenant", "a");
        let b = headers("x-tenant", "b");
        let now = Instant::now();

        assert_eq!(admitted(&limit, &a, 2, now), 2);
        let refusal = limit.admit(&a, now).expect_err("a is over its limit");
        assert_eq!(refusal.limit, 2);
        assert_eq!(refusal.window, Duration::from_secs(60));
        assert_eq!(refusal.key, Some(("x-tenant".into(), "a".into())));

        assert_eq!(admitted(&limit, &b, 3, now), 2);
        // Neither the header-less calls nor other headers are limited.
        assert_eq!(admitted(&limit, &HeaderMap::new(), 50, now), 50);
        assert_eq!(admitted(&limit, &headers("x-other", "a"), 50, now), 50);
        assert_eq!(limit.keys(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn refusal_cuts_long_values_and_keeps_binary_keys() {
        let limit = limit(1, 60, Some("x-tenant"), 100);
        let now = Instant::now();

        let long = "é".repeat(100);
        let long = headers("x-tenant", &long);
        assert!(limit.admit(&long, now).is_ok());
        let refusal = limit.admit(&long, now).expect_err("over the limit");
        let (_, value) = refusal.key.expect("keyed refusal");
        assert_eq!(value, "é".repeat(64));

        let mut binary = HeaderMap::new();
        let value = HeaderValue::from_bytes(b"\xff\xfe").expect("obs-text is allowed");
        binary.insert("x-tenant", value);
        assert!(limit.admit(&binary, now).is_ok());
        assert!(limit.admit(&binary, now).is_err());
        assert_eq!(limit.keys(), 2);
    }

    #[test]
    fn keys_stay_bounded_and_busy_keys_stay() {
        let limit = limit(1, 60, Some("x-tenant"), 1000);
        let start = Instant::now();
        let hot = headers("x-tenant", "hot");
        assert!(limit.admit(&hot, start).is_ok());

        for i in 0..100_000u64 {
            // A millisecond apart, so least-recently-used order is exact.
            let now = start + Duration::from_millis(i);
            let key = headers("x-tenant", &format!("key-{i}"));
            assert!(limit.admit(&key, now).is_ok(), "new key {i} refused");
            assert!(limit.keys() <= 1000, "{} keys after {i}", limit.keys());
            if i % 10 == 0 {
                // Still remembered (so still refused) because it is in use.
                assert!(limit.admit(&hot, now).is_err(), "hot key forgotten at {i}");
            }
        }
        assert!(limit.keys() > 800, "evicted too much: {}", limit.keys());
    }

    #[test]
    fn idle_keys_go_first() {
        let limit = limit(1, 1, Some("x-tenant"), 4);
        let start = Instant::now();
        for key in ["a", "b", "c", "d"] {
            assert!(limit.admit(&headers("x-tenant", key), start).is_ok());
        }
        assert_eq!(limit.keys(), 4);
        let later = start + Duration::from_secs(3);
        assert!(limit.admit(&headers("x-tenant", "e"), later).is_ok());
        assert_eq!(limit.keys(), 1);
    }
}
