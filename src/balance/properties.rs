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

const STRATEGIES: [Strategy; 5] = [
    Strategy::RoundRobin,
    Strategy::Weighted,
    Strategy::LeastConnections,
    Strategy::Latency,
    Strategy::Performance,
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
