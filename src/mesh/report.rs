//! What a sidecar tells its peers about one endpoint, and its encoding.
//!
//! One [`Item`] per (cluster, endpoint) a sidecar has something to say of:
//! its own calls in flight there, its latency estimate, its success rate and
//! calls per second, and its verdict (breaker open, or health checks
//! failing) with the reason and the time left. Values are quantized, so a
//! report changes, and is sent again, only when it changes by a step that
//! matters: in-flight counts exactly up to 16 and to about 6% above, latency
//! and rates to about 4% and 10%. Items are encoded with postcard; every
//! string is bounded, and an item that breaks a bound is refused whole.

use serde::{Deserialize, Serialize};

/// The longest node id, cluster name, endpoint address or reason accepted.
pub const MAX_NAME: usize = 128;

/// One sidecar's report on one endpoint, as sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// The sidecar that measured it.
    pub node: String,
    /// That sidecar's zone, if it has one.
    pub zone: Option<String>,
    /// Higher is newer, per node: microseconds since the epoch when it was
    /// published (so a restarted sidecar's reports are newer than its old
    /// ones).
    pub seq: u64,
    pub cluster: String,
    pub endpoint: String,
    pub report: Report,
}

/// The figures, quantized.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Calls in flight from the reporting sidecar ([`quantize_count`]).
    pub in_flight: u32,
    /// Latency estimate, as a [`rtt_code`]; 0 for none.
    pub rtt: u16,
    /// Success rate in half percents (0..=200); `None` without calls.
    pub success: Option<u8>,
    /// Calls a second, as a [`rate_code`]; 0 for none.
    pub rate: u16,
    pub verdict: Option<Verdict>,
}

impl Report {
    /// Nothing to say: no call in flight, no estimate, no verdict.
    pub fn is_empty(&self) -> bool {
        *self == Report::default()
    }

    /// Carries figures that go stale fast (calls in flight, a verdict).
    pub fn is_live(&self) -> bool {
        self.in_flight > 0 || self.verdict.is_some()
    }
}

/// Why the reporting sidecar keeps calls off the endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Health checks fail (rather than the breaker being open).
    pub unhealthy: bool,
    /// How long the reporter will keep it out, from when it published.
    pub remaining_ms: u32,
    pub reason: String,
}

impl Item {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("an item always serialises")
    }

    /// Decodes one item; refuses one whose strings break the bounds.
    pub fn decode(bytes: &[u8]) -> Option<Item> {
        let item: Item = postcard::from_bytes(bytes).ok()?;
        item.is_bounded().then_some(item)
    }

    fn is_bounded(&self) -> bool {
        let names = [&self.node, &self.cluster, &self.endpoint];
        names.iter().all(|s| !s.is_empty() && s.len() <= MAX_NAME)
            && self.zone.as_ref().is_none_or(|z| z.len() <= MAX_NAME)
            && self
                .report
                .verdict
                .as_ref()
                .is_none_or(|v| v.reason.len() <= MAX_NAME)
            && self.report.success.is_none_or(|s| s <= 200)
    }
}

/// The first byte of an encoded [`Usage`]. An [`Item`] never starts with
/// it: its first byte is the length of a node id of at most [`MAX_NAME`]
/// bytes, so items and usages share the broadcast channel, and a sidecar
/// that knows only items refuses a usage as undecodable.
pub const USAGE_TAG: u8 = 0xff;

/// [`Usage::limit`] for the retry budget, rather than a rate limit.
pub const RETRY_BUDGET: u8 = u8::MAX;

/// One sidecar's use of a limit the mesh shares: a rate limit
/// (`cluster.rate_limit[i]` with `mesh_wide`), for one key, or the retry
/// budget (`cluster.retry.mesh_wide_budget`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub node: String,
    /// Higher is newer, per node (as [`Item::seq`]).
    pub seq: u64,
    pub cluster: String,
    /// The rate limit's index in the cluster's list, or [`RETRY_BUDGET`].
    pub limit: u8,
    /// The key of a keyed rate limit (a key longer than 64 bytes as its
    /// fixed-size hash); empty otherwise.
    pub key: String,
    /// Calls admitted within the limit's window, as the reporter's sliding
    /// estimate when it published (for the retry budget: calls made within
    /// its `ttl`).
    pub calls: u32,
    /// Retries made within the retry budget's `ttl` (0 for a rate limit).
    pub retries: u32,
}

impl Usage {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![USAGE_TAG];
        out.extend(postcard::to_allocvec(self).expect("a usage always serialises"));
        out
    }

    /// Decodes one usage (with its tag); refuses one that breaks a bound.
    pub fn decode(bytes: &[u8]) -> Option<Usage> {
        let (&USAGE_TAG, body) = bytes.split_first()? else {
            return None;
        };
        let usage: Usage = postcard::from_bytes(body).ok()?;
        let names = [&usage.node, &usage.cluster];
        (names.iter().all(|s| !s.is_empty() && s.len() <= MAX_NAME) && usage.key.len() <= MAX_NAME)
            .then_some(usage)
    }
}

/// Encodes items into as few payloads of at most `max` bytes as they fit
/// (each a postcard sequence of items); an item that alone exceeds `max`
/// is left out.
pub fn pack(items: &[Item], max: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut batch: Vec<&Item> = Vec::new();
    let mut size = 1;
    for item in items {
        let len = postcard::experimental::serialized_size(item).unwrap_or(usize::MAX);
        if len + 5 > max {
            continue;
        }
        if size + len + 1 > max {
            out.push(postcard::to_allocvec(&batch).expect("items serialise"));
            batch.clear();
            size = 1;
        }
        batch.push(item);
        size += len;
    }
    if !batch.is_empty() {
        out.push(postcard::to_allocvec(&batch).expect("items serialise"));
    }
    out
}

/// Decodes a payload [`pack`] made; `None` if it is not one, or any item
/// breaks a bound.
pub fn unpack(payload: &[u8]) -> Option<Vec<Item>> {
    let items: Vec<Item> = postcard::from_bytes(payload).ok()?;
    items.iter().all(Item::is_bounded).then_some(items)
}

/// Counts exactly up to 16, then keeps the top four significant bits
/// (steps of at most about 6%).
pub fn quantize_count(n: u64) -> u32 {
    let n = n.min(u64::from(u32::MAX));
    if n <= 16 {
        return n as u32;
    }
    let shift = 63 - n.leading_zeros() - 4;
    ((n >> shift) << shift) as u32
}

const RTT_STEP: f64 = 1.04;
const RATE_STEP: f64 = 1.1;

/// A latency in nanoseconds as a code on a log scale of 4% steps (from
/// 1 µs); 0 is "none".
pub fn rtt_code(ns: f64) -> u16 {
    if ns.is_nan() || ns < 1_000.0 {
        return if ns >= 1.0 { 1 } else { 0 };
    }
    let code = 1.0 + ((ns / 1_000.0).ln() / RTT_STEP.ln()).round();
    code.min(f64::from(u16::MAX)) as u16
}

/// The latency, in nanoseconds, a [`rtt_code`] stands for.
pub fn rtt_ns(code: u16) -> Option<f64> {
    (code > 0).then(|| 1_000.0 * RTT_STEP.powi(i32::from(code) - 1))
}

/// Calls a second as a code on a log scale of 10% steps (from 0.1/s).
pub fn rate_code(per_second: f64) -> u16 {
    if per_second.is_nan() || per_second < 0.1 {
        return 0;
    }
    let code = 1.0 + ((per_second * 10.0).ln() / RATE_STEP.ln()).round();
    code.min(f64::from(u16::MAX)) as u16
}

/// The calls a second a [`rate_code`] stands for.
pub fn rate(code: u16) -> f64 {
    if code == 0 {
        0.0
    } else {
        RATE_STEP.powi(i32::from(code) - 1) / 10.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(endpoint: &str) -> Item {
        Item {
            node: "sidecar-a".into(),
            zone: Some("zone-1".into()),
            seq: 1_800_000_000_000_000,
            cluster: "planner".into(),
            endpoint: endpoint.into(),
            report: Report {
                in_flight: 8,
                rtt: rtt_code(20e6),
                success: Some(200),
                rate: rate_code(400.0),
                verdict: Some(Verdict {
                    unhealthy: false,
                    remaining_ms: 4_000,
                    reason: "5 consecutive failures".into(),
                }),
            },
        }
    }

    #[test]
    fn items_round_trip_and_bounds_are_enforced() {
        let it = item("10.0.0.1:50051");
        assert_eq!(Item::decode(&it.encode()), Some(it.clone()));
        let mut long = it.clone();
        long.endpoint = "x".repeat(MAX_NAME + 1);
        assert_eq!(Item::decode(&long.encode()), None);
        let mut odd = it;
        odd.report.success = Some(201);
        assert_eq!(Item::decode(&odd.encode()), None);
        assert_eq!(Item::decode(&[0xff; 40]), None);
    }

    #[test]
    fn usages_round_trip_and_are_never_taken_for_items() {
        let u = Usage {
            node: "sidecar-a".into(),
            seq: 1_800_000_000_000_000,
            cluster: "planner".into(),
            limit: 0,
            key: "tenant-7".into(),
            calls: 42,
            retries: 0,
        };
        let bytes = u.encode();
        assert_eq!(Usage::decode(&bytes), Some(u.clone()));
        assert_eq!(Item::decode(&bytes), None, "an item decoder refuses it");
        assert_eq!(Usage::decode(&item("10.0.0.1:50051").encode()), None);
        let mut long = u;
        long.key = "k".repeat(MAX_NAME + 1);
        assert_eq!(Usage::decode(&long.encode()), None);
        // A node id of the longest length starts an item with 0x80.
        let mut longest = item("10.0.0.1:50051");
        longest.node = "n".repeat(MAX_NAME);
        assert_ne!(longest.encode()[0], USAGE_TAG);
    }

    #[test]
    fn packing_fills_payloads_up_to_the_bound() {
        let items: Vec<Item> = (0..60)
            .map(|i| item(&format!("10.0.0.{i}:50051")))
            .collect();
        let payloads = pack(&items, 1_000);
        assert!(payloads.len() > 1);
        assert!(payloads.iter().all(|p| p.len() <= 1_000), "each fits");
        let back: Vec<Item> = payloads.iter().flat_map(|p| unpack(p).unwrap()).collect();
        assert_eq!(back, items);
    }

    #[test]
    fn quantization_keeps_small_counts_exact_and_steps_small() {
        for n in 0..=16 {
            assert_eq!(quantize_count(n), n as u32);
        }
        for n in [17u64, 100, 1_000, 123_456] {
            let q = u64::from(quantize_count(n));
            assert!(q <= n && (n - q) as f64 / n as f64 <= 0.0625, "{n} -> {q}");
        }
        for ms in [0.5, 1.0, 20.0, 200.0, 5_000.0] {
            let ns = ms * 1e6;
            let back = rtt_ns(rtt_code(ns)).unwrap();
            assert!((back - ns).abs() / ns <= 0.021, "{ms} ms -> {back}");
        }
        assert_eq!(rtt_ns(rtt_code(0.0)), None);
        for r in [0.5, 7.0, 400.0, 90_000.0] {
            assert!((rate(rate_code(r)) - r).abs() / r <= 0.05, "{r}");
        }
    }
}
