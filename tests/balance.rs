//! Every call is balanced, not every connection: one client channel's calls
//! spread over the cluster by each way in.

mod support;

use std::num::NonZeroU32;
use std::time::Duration;

use agentmesh::config::Strategy;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_one_channels_calls_evenly_by_every_way_in() {
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start(3).await;
        let sidecar = sidecar(vec![planner(&agents.addrs)]).await;
        for way in WAYS {
            let client = planner_client(way, &sidecar).await;
            let counts = spread(&client, 300, 8).await;
            assert_eq!(
                counts.len(),
                3,
                "{way:?}: every agent gets calls: {counts:?}"
            );
            for (agent, n) in &counts {
                assert!(
                    (90..=110).contains(n),
                    "{way:?}: {agent} got {n} of 300 calls: {counts:?}"
                );
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_follows_the_weights_by_every_way_in() {
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start(3).await;
        let mut cluster = planner(&agents.addrs);
        cluster.strategy = Strategy::Weighted;
        for (e, w) in cluster.endpoints.iter_mut().zip([5, 3, 2]) {
            e.weight = NonZeroU32::new(w).unwrap();
        }
        let sidecar = sidecar(vec![cluster]).await;
        for way in WAYS {
            let client = planner_client(way, &sidecar).await;
            let counts = spread(&client, 1000, 8).await;
            for (i, want) in [50.0, 30.0, 20.0].into_iter().enumerate() {
                let got = *counts.get(&agents.names[i]).unwrap_or(&0) as f64 / 10.0;
                assert!(
                    (got - want).abs() <= 5.0,
                    "{way:?}: agent-{i} got {got}%, want {want}%: {counts:?}"
                );
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_calls_open_one_upstream_connection_per_endpoint() {
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start(3).await;
        let sidecar = sidecar(vec![planner(&agents.addrs)]).await;
        // Many callers, on connections of all three kinds, all at once.
        let mut tasks = Vec::new();
        for way in WAYS.into_iter().cycle().take(6) {
            let client = planner_client(way, &sidecar).await;
            tasks.push(tokio::spawn(async move {
                spread(&client, 1000 / 6 + 1, 32).await
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap().values().sum::<usize>();
        }
        assert!(total >= 1000, "{total} calls");
        for i in 0..3 {
            assert_eq!(
                agents.connections(i),
                1,
                "agent-{i} saw more than one connection from the sidecar"
            );
        }
        for e in sidecar.router().clusters()[0].endpoints().iter() {
            assert_eq!(e.stats().connections_opened, 1, "{}", e.address());
        }
    })
    .await;
}
