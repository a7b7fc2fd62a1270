//! Property tests of the pickers' invariants, over random clusters: no
//! picker returns an endpoint that is not ready; weights and splits hold;
//! affinity moves only the sessions it must.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;

use super::test_support::endpoint;
use super::{Affinity, Call, Snapshot, Tried};
use crate::config::{AffinityConfig, Choices, ClusterConfig, Strategy};
use crate::endpoint::Endpoint;

const STRATEGIES: [Strategy; 6] = [
    Strategy::RoundRobin,
    Strategy::Weighted,
    Strategy::LeastConnections,
    Strategy::Latency,
    Strategy::Performance,
    Strategy::HotCold,
];

/// (weight, zone, priority, version, ready) per endpoint.
type Spec = (u32, Option<&'static str>, u32, &'static str, bool);

fn spec() -> impl proptest::strategy::Strategy<Value = Spec> {
    (
        1u32..10,
        prop_oneof![Just(None), Just(Some("a")), Just(Some("b"))],
        0u32..3,
        prop_oneof![Just("v1"), Just("v2")],
        any::<bool>(),
    )
}

fn cluster(strategy: Strategy, choices: Choices, split: bool) -> ClusterConfig {
    let mut c = ClusterConfig::for_test("p", &[]);
    c.strategy = strategy;
    c.choices = choices;
    if split {
        c.split = vec![("v1".into(), 80), ("v2".into(), 20)];
    }
    c
}

fn build(
    config: &ClusterConfig,
    specs: &[Spec],
    zone: Option<&str>,
) -> (Vec<Arc<Endpoint>>, Snapshot) {
    let endpoints: Vec<_> = specs
        .iter()
        .enumerate()
        .map(|(i, (w, z, p, v, _))| endpoint(config, i, *w, *z, *p, Some(v)))
        .collect();
    let ready = specs.iter().map(|s| s.4).collect();
    let snapshot = Snapshot::with_readiness(config, zone, &endpoints, ready, false);
    (endpoints, snapshot)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn no_picker_returns_an_endpoint_that_is_not_ready(
        specs in prop::collection::vec(spec(), 1..8),
        strategy in 0usize..5,
        all in any::<bool>(),
        split in any::<bool>(),
        zone in prop_oneof![Just(None), Just(Some("a"))],
        busy in prop::collection::vec(0usize..8, 0..10),
    ) {
        let choices = if all { Choices::All } else { Choices::Random(NonZeroUsize::new(2).unwrap()) };
        let config = cluster(STRATEGIES[strategy], choices, split);
        let (endpoints, snapshot) = build(&config, &specs, zone);
        // Some load, so that load-aware pickers have something to compare.
        let _load: Vec<_> = busy.iter().filter_map(|&i| endpoints.get(i)).map(|e| e.start_call()).collect();
        let any_ready = specs.iter().any(|s| s.4);
        let headers = HeaderMap::new();
        let call = Call::new("/", &headers);
        let mut tried = Tried::default();
        for _ in 0..50 {
            let e = snapshot.pick(&call, &Tried::default(), None).expect("a ready set is never empty");
            let i = endpoints.iter().position(|x| Arc::ptr_eq(x, e)).unwrap();
            prop_assert!(specs[i].4 || !any_ready, "picked endpoint {} which is not ready", i);
        }
        // With retries excluding what was tried, every pick is new and ready.
        while let Some(e) = snapshot.pick(&call, &tried, None) {
            prop_assert!(!tried.contains(e.id()));
            let i = endpoints.iter().position(|x| Arc::ptr_eq(x, e)).unwrap();
            prop_assert!(specs[i].4 || !any_ready);
            tried.insert(e.id());
        }
        let ready_count = if any_ready { specs.iter().filter(|s| s.4).count() } else { specs.len() };
        prop_assert_eq!(tried.len(), ready_count);
    }

    #[test]
    fn weighted_picks_follow_the_weights(weights in prop::collection::vec(1u32..20, 1..8)) {
        let config = cluster(Strategy::Weighted, Choices::default(), false);
        let specs: Vec<Spec> = weights.iter().map(|&w| (w, None, 0, "v1", true)).collect();
        let (endpoints, snapshot) = build(&config, &specs, None);
        let total: u32 = weights.iter().sum();
        let n = 20 * total as usize;
        let headers = HeaderMap::new();
        let call = Call::new("/", &headers);
        let mut counts: HashMap<u64, usize> = HashMap::new();
        for _ in 0..n {
            *counts.entry(snapshot.pick(&call, &Tried::default(), None).unwrap().id()).or_default() += 1;
        }
        for (e, w) in endpoints.iter().zip(&weights) {
            let want = 20 * *w as usize;
            prop_assert_eq!(counts.get(&e.id()).copied().unwrap_or(0), want, "weight {} of {}", w, total);
        }
    }

    #[test]
    fn the_split_holds_for_every_strategy(
        strategy in 0usize..5,
        v1 in 1usize..5,
        v2 in 1usize..4,
    ) {
        let config = cluster(STRATEGIES[strategy], Choices::default(), true);
        let specs: Vec<Spec> = (0..v1).map(|_| (1, None, 0, "v1", true))
            .chain((0..v2).map(|_| (1, None, 0, "v2", true)))
            .collect();
        let (endpoints, snapshot) = build(&config, &specs, None);
        let headers = HeaderMap::new();
        let call = Call::new("/", &headers);
        let n = 5000;
        let canary = (0..n)
            .filter(|_| snapshot.pick(&call, &Tried::default(), None).unwrap().version() == Some("v2"))
            .count();
        let share = canary as f64 / n as f64;
        prop_assert!((share - 0.2).abs() < 0.03, "v2 got {:.3} of calls, want 0.20 ({} endpoints)", share, endpoints.len());
    }
}

/// 1000 sessions over 3 endpoints; a 4th is added (no pinned session
/// moves), then removed again (only the sessions it had taken move), then
/// one of the first three goes (only its sessions move).
#[test]
fn affinity_moves_only_the_sessions_it_must() {
    let config = cluster(Strategy::RoundRobin, Choices::default(), false);
    let all: Vec<_> = (0..4)
        .map(|i| endpoint(&config, i, 1, None, 0, None))
        .collect();
    let affinity = Affinity::new(&AffinityConfig::default());
    let place = |ready: &[Arc<Endpoint>]| -> Vec<u64> {
        (0..1000)
            .map(|k| {
                let mut headers = HeaderMap::new();
                headers.insert(
                    "x-session-id",
                    HeaderValue::from_str(&format!("session-{k}")).unwrap(),
                );
                let snapshot =
                    Snapshot::with_readiness(&config, None, ready, vec![true; ready.len()], false);
                let call = Call::new("/", &headers);
                snapshot
                    .pick(&call, &Tried::default(), Some(&affinity))
                    .unwrap()
                    .id()
            })
            .collect()
    };
    let three = place(&all[..3]);
    let spread: HashMap<u64, usize> = three.iter().fold(HashMap::new(), |mut m, id| {
        *m.entry(*id).or_default() += 1;
        m
    });
    assert!(
        spread.values().all(|&n| (250..420).contains(&n)),
        "{spread:?}"
    );

    let four = place(&all);
    assert_eq!(three, four, "adding an endpoint moved a pinned session");

    let back = place(&all[..3]);
    assert_eq!(three, back, "removing the added endpoint moved sessions");

    let gone = all[1].id();
    let two = place(&[all[0].clone(), all[2].clone()]);
    for (before, after) in three.iter().zip(&two) {
        if *before == gone {
            assert_ne!(*after, gone);
        } else {
            assert_eq!(before, after, "a session not on the removed endpoint moved");
        }
    }
}

/// Without the sticky table (a fresh sidecar), the hash alone agrees with
/// another sidecar's placement, and a removed endpoint's sessions are the
/// only ones to move.
#[test]
fn two_sidecars_place_sessions_alike() {
    let config = cluster(Strategy::RoundRobin, Choices::default(), false);
    let mine: Vec<_> = (0..3)
        .map(|i| endpoint(&config, i, 1, None, 0, None))
        .collect();
    let theirs: Vec<_> = (0..3)
        .map(|i| endpoint(&config, i, 1, None, 0, None))
        .collect();
    let tried = Tried::default();
    for k in 0..500 {
        let key = format!("s{k}");
        let a = super::affinity::rendezvous(&key, &mine, &tried).unwrap();
        let b = super::affinity::rendezvous(&key, &theirs, &tried).unwrap();
        assert_eq!(a, b, "{key}");
    }
}

/// The bound a new session's endpoint must be under: `factor` times its
/// weighted share of the calls in flight plus one, rounded up.
fn bound(ready: &[Arc<Endpoint>], i: usize, factor: f64) -> f64 {
    let total: f64 = ready.iter().map(|e| e.load().mesh_wide_in_flight()).sum();
    let weights: f64 = ready.iter().map(|e| f64::from(e.weight().get())).sum();
    (factor * (total + 1.0) * f64::from(ready[i].weight().get()) / weights).ceil()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    /// Bounded-load affinity, 10,000 sessions over 5 endpoints, each session
    /// holding a call: every new session lands under its endpoint's bound
    /// (so none ends above `factor` times its share), and when an endpoint
    /// is added and another removed, only the removed one's sessions move.
    #[test]
    fn bounded_load_affinity_keeps_every_endpoint_under_its_bound(
        factor in 1.05f64..2.0,
        weights in proptest::collection::vec(1u32..4, 6),
    ) {
        let config = cluster(Strategy::RoundRobin, Choices::default(), false);
        let all: Vec<_> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| endpoint(&config, i, w, None, 0, None))
            .collect();
        let affinity = Affinity::new(&AffinityConfig {
            balance_factor: Some(factor),
            max_sessions: 1_000_000,
            ..AffinityConfig::default()
        });
        let tried = Tried::default();
        let mut calls: HashMap<String, crate::endpoint::InFlight> = HashMap::new();
        let mut placed: HashMap<String, u64> = HashMap::new();
        let place = |key: String, ready: &[Arc<Endpoint>], calls: &mut HashMap<_, _>| {
            let pinned = affinity.pinned(&key);
            let i = affinity.pick(&key, ready, &tried).expect("a ready endpoint");
            if pinned.is_none() {
                let load = ready[i].load().mesh_wide_in_flight();
                let limit = bound(ready, i, factor);
                prop_assert!(load < limit, "{key}: placed at {load} of a bound of {limit}");
            }
            calls.entry(key.clone()).or_insert_with(|| ready[i].start_call());
            Ok(ready[i].id())
        };
        let five = &all[..5];
        for k in 0..10_000 {
            let key = format!("s{k}");
            let id = place(key.clone(), five, &mut calls)?;
            placed.insert(key, id);
        }
        let weight_of = |ready: &[Arc<Endpoint>]| -> f64 {
            ready.iter().map(|e| f64::from(e.weight().get())).sum()
        };
        for e in five {
            let share = f64::from(e.weight().get()) / weight_of(five);
            prop_assert!(
                e.in_flight() as f64 <= (factor * 10_000.0 * share).ceil(),
                "{} calls against a share of {share:.3}", e.in_flight()
            );
        }
        // Endpoint 5 joins and endpoint 1 leaves: its calls end and its
        // sessions are forgotten.
        let gone = all[1].id();
        affinity.forget(gone);
        calls.retain(|_, call| call.endpoint().id() != gone);
        let after: Vec<_> = all.iter().filter(|e| e.id() != gone).cloned().collect();
        for k in 0..10_000 {
            let key = format!("s{k}");
            let id = place(key.clone(), &after, &mut calls)?;
            if placed[&key] == gone {
                prop_assert_ne!(id, gone);
            } else {
                prop_assert_eq!(id, placed[&key], "{} moved", key);
            }
        }
    }
}

/// Two sidecars that see the same load (the other's calls through gossip)
/// place bounded-load sessions alike, though every session's call is made
/// on one of them only.
#[test]
fn two_sidecars_place_bounded_sessions_alike() {
    let config = cluster(Strategy::RoundRobin, Choices::default(), false);
    let mine: Vec<_> = (0..5)
        .map(|i| endpoint(&config, i, 1, None, 0, None))
        .collect();
    let theirs: Vec<_> = (0..5)
        .map(|i| endpoint(&config, i, 1, None, 0, None))
        .collect();
    let settings = AffinityConfig {
        balance_factor: Some(1.25),
        ..AffinityConfig::default()
    };
    let (a, b) = (Affinity::new(&settings), Affinity::new(&settings));
    let tried = Tried::default();
    let mut calls = Vec::new();
    let mut moved = 0;
    for k in 0..2_000 {
        let key = format!("s{k}");
        let i = a.pick(&key, &mine, &tried).unwrap();
        let j = b.pick(&key, &theirs, &tried).unwrap();
        assert_eq!(i, j, "{key}");
        moved += usize::from(i != super::affinity::rendezvous(&key, &mine, &tried).unwrap());
        // The call goes through one sidecar or the other; gossip tells the
        // other.
        let (here, there) = if k % 2 == 0 {
            (&mine, &theirs)
        } else {
            (&theirs, &mine)
        };
        calls.push(here[i].start_call());
        for (e, f) in here.iter().zip(there.iter()) {
            f.load().set_mesh(e.in_flight() as f64, None, None);
            e.load().set_mesh(f.in_flight() as f64, None, None);
        }
    }
    assert!(
        moved > 0,
        "the bound never took a session off its first choice"
    );
}
