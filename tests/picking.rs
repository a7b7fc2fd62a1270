//! End to end, with real agents behind the sidecar: the load-aware
//! strategies steer calls away from a slow agent, a session key sticks to
//! one agent across channels, and zones and canary splits hold.

mod support;

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use agentmesh::app::Sidecar;
use agentmesh::config::{AffinityConfig, Config, Strategy};
use agentmesh::pb::agent_client::AgentClient;
use agentmesh::tools::agent::AgentOptions;
use support::*;
use tonic::transport::Channel;

/// Three agents; `agent-2` holds each call ten times longer (50 ms vs 5 ms).
async fn one_slow_agent() -> Agents {
    Agents::start_with(
        [5, 5, 50]
            .iter()
            .enumerate()
            .map(|(i, ms)| AgentOptions {
                delay: Duration::from_millis(*ms),
                ..AgentOptions::named(&format!("agent-{i}"))
            })
            .collect(),
    )
    .await
}

fn share(counts: &BTreeMap<String, usize>, agent: &str) -> f64 {
    let total: usize = counts.values().sum();
    *counts.get(agent).unwrap_or(&0) as f64 / total as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_aware_strategies_send_the_slow_agent_clearly_fewer_calls() {
    bounded(Duration::from_secs(90), async {
        let agents = one_slow_agent().await;
        for strategy in [
            Strategy::RoundRobin,
            Strategy::LeastConnections,
            Strategy::Latency,
            Strategy::Performance,
            Strategy::HotCold,
        ] {
            let mut cluster = planner(&agents.addrs);
            cluster.strategy = strategy;
            let sidecar = sidecar(vec![cluster]).await;
            let client = planner_client(Way::Connect, &sidecar).await;
            let counts = spread(&client, 600, 12).await;
            let slow = share(&counts, "agent-2");
            eprintln!("{strategy:?}: slow agent's share {slow:.3}: {counts:?}");
            match strategy {
                // Round robin ignores speed: a third each.
                Strategy::RoundRobin => assert!((slow - 1.0 / 3.0).abs() < 0.02, "{slow}"),
                // Equal calls in flight mean ten times fewer calls finish on
                // the slow agent (about 5%); ties go to the faster agents.
                Strategy::LeastConnections => assert!(
                    slow < 0.15,
                    "least_connections gave the slow agent {slow:.3}"
                ),
                // Its round trips are ten times longer: it loses almost every
                // comparison. The load-aware performance score and hot-cold
                // reckon by latency too, while the slow agent is not
                // overloaded.
                Strategy::Latency | Strategy::Performance | Strategy::HotCold => {
                    assert!(slow < 0.10, "{strategy:?} gave the slow agent {slow:.3}")
                }
                _ => unreachable!(),
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_key_keeps_landing_on_one_agent_across_channels() {
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start(3).await;
        let mut cluster = planner(&agents.addrs);
        cluster.strategy = Strategy::LeastConnections;
        cluster.affinity = Some(AffinityConfig::default());
        let sidecar = sidecar(vec![cluster]).await;
        let mut first = planner_client(Way::Connect, &sidecar).await;
        let mut second = planner_client(Way::Authority, &sidecar).await;
        let mut used_by_sessions = std::collections::BTreeSet::new();
        for session in [
            "conversation-1",
            "conversation-2",
            "conversation-3",
            "conversation-4",
        ] {
            let mut agents_seen = std::collections::BTreeSet::new();
            for i in 0..100 {
                let client: &mut AgentClient<Channel> =
                    if i % 2 == 0 { &mut first } else { &mut second };
                let mut req = tonic::Request::new(request(b"turn"));
                req.metadata_mut()
                    .insert("x-session-id", session.parse().unwrap());
                agents_seen.insert(client.invoke(req).await.unwrap().into_inner().agent);
            }
            assert_eq!(agents_seen.len(), 1, "{session} moved: {agents_seen:?}");
            used_by_sessions.extend(agents_seen);
        }
        // Many sessions spread over the agents (4 alone may share one).
        for k in 0..30 {
            let mut req = tonic::Request::new(request(b"first turn"));
            req.metadata_mut()
                .insert("x-session-id", format!("user-{k}").parse().unwrap());
            used_by_sessions.insert(first.invoke(req).await.unwrap().into_inner().agent);
        }
        assert_eq!(
            used_by_sessions.len(),
            3,
            "sessions are spread: {used_by_sessions:?}"
        );
        // Calls without the header are balanced as usual.
        let counts = spread(&first, 90, 3).await;
        assert_eq!(counts.len(), 3, "{counts:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_stay_in_the_local_zone_and_spill_when_it_is_short() {
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start(3).await;
        let zoned = |addrs: &[(std::net::SocketAddr, &str)]| {
            let mut cluster = planner(&addrs.iter().map(|(a, _)| *a).collect::<Vec<_>>());
            for (e, (_, zone)) in cluster.endpoints.iter_mut().zip(addrs) {
                e.zone = Some(zone.to_string());
            }
            cluster
        };
        let start = |cluster| async move {
            let mut config = Config::for_test(vec![cluster]);
            config.locality.zone = Some("zone-a".into());
            let sidecar = Sidecar::start(&config).await.unwrap();
            warmed(&sidecar).await;
            sidecar
        };

        // Both zone-a agents up: zone-b gets nothing.
        let cluster = zoned(&[
            (agents.addrs[0], "zone-a"),
            (agents.addrs[1], "zone-a"),
            (agents.addrs[2], "zone-b"),
        ]);
        let sidecar = start(cluster).await;
        let counts = spread(&planner_client(Way::Connect, &sidecar).await, 300, 4).await;
        assert_eq!(counts.get("agent-2"), None, "{counts:?}");

        // One of two zone-a endpoints is down: zone-a keeps 1/2 * 1.4 = 70%.
        let cluster = zoned(&[
            (agents.addrs[0], "zone-a"),
            (dead_address(), "zone-a"),
            (agents.addrs[2], "zone-b"),
        ]);
        let sidecar = start(cluster).await;
        let client = planner_client(Way::Connect, &sidecar).await;
        spread(&client, 20, 1).await; // finds the dead endpoint
        let counts = spread(&client, 1000, 4).await;
        let local = share(&counts, "agent-0");
        assert!(
            (local - 0.7).abs() < 0.05,
            "zone-a got {local:.3}: {counts:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_split_holds_under_every_strategy() {
    bounded(Duration::from_secs(90), async {
        let agents = Agents::start(3).await;
        for strategy in [
            Strategy::RoundRobin,
            Strategy::Weighted,
            Strategy::LeastConnections,
            Strategy::Latency,
            Strategy::Performance,
            Strategy::HotCold,
        ] {
            let mut cluster = planner(&agents.addrs);
            cluster.strategy = strategy;
            for (e, v) in cluster.endpoints.iter_mut().zip(["v1", "v1", "v2"]) {
                e.version = Some(v.into());
                e.weight = NonZeroU32::new(2).unwrap();
            }
            cluster.split = vec![("v1".into(), 90), ("v2".into(), 10)];
            let sidecar = sidecar(vec![cluster]).await;
            let counts = spread(&planner_client(Way::Connect, &sidecar).await, 1000, 4).await;
            let canary = share(&counts, "agent-2");
            assert!(
                (canary - 0.10).abs() < 0.03,
                "{strategy:?}: canary got {canary:.3}: {counts:?}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_priority_level_takes_over_when_the_first_is_unreachable() {
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start(2).await;
        let mut cluster = planner(&[
            dead_address(),
            dead_address(),
            agents.addrs[0],
            agents.addrs[1],
        ]);
        for (e, p) in cluster.endpoints.iter_mut().zip([0, 0, 1, 1]) {
            e.priority = p;
        }
        let sidecar = Arc::new(sidecar(vec![cluster]).await);
        let client = planner_client(Way::Connect, &sidecar).await;
        // No call fails: the first ones find level 0 unreachable and move on.
        let counts = spread(&client, 200, 4).await;
        assert_eq!(counts.values().sum::<usize>(), 200);
        let endpoints = sidecar.router().clusters()[0].endpoints();
        let tried_dead: u64 = endpoints[..2]
            .iter()
            .map(|e| e.stats().connect_failures)
            .sum();
        assert!(
            tried_dead <= 8,
            "level 0 kept being tried: {tried_dead} connect failures"
        );
    })
    .await;
}
