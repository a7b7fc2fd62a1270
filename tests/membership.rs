//! Endpoints that come and go while calls flow: a real sidecar in front of
//! real agents, its cluster changed by `Cluster::apply` (the door that
//! discovery, reload and the admin API use).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use agentmesh::cluster::Update;
use agentmesh::config::{EndpointConfig, HealthCheckConfig};
use agentmesh::tools::agent::AgentOptions;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_added_and_removed_under_load_loses_no_call_and_leaves_nothing_behind() {
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start(3).await;
        let mut config = planner(&agents.addrs[..2]);
        config.health_check = Some(HealthCheckConfig {
            interval: Duration::from_millis(100),
            ..HealthCheckConfig::default()
        });
        let sidecar = sidecar(vec![config]).await;
        let cluster = sidecar.router().clusters()[0].clone();
        assert_eq!(cluster.endpoint_task_count(), 2, "a health checker each");
        let third = agents.addrs[2];
        assert_eq!(established_to(third.port()), 0);

        // Eight callers, bounded in count and time, until told to stop.
        let client = planner_client(Way::LocalPort, &sidecar).await;
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut callers = Vec::new();
        for _ in 0..8 {
            let (mut client, stop) = (client.clone(), stop.clone());
            let (ok, failed) = (ok.clone(), failed.clone());
            callers.push(tokio::spawn(async move {
                for _ in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match client.invoke(request(b"x")).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(status) => {
                            eprintln!("call failed: {status:?}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;

        let applied = cluster.apply(Update::Add(vec![EndpointConfig::new(third)]));
        assert_eq!(applied.added, 1);
        let stats = agents.stats[2].clone();
        assert!(
            eventually(Duration::from_secs(5), || stats.get(&stats.calls) > 100).await,
            "the added agent takes calls"
        );
        assert_eq!(cluster.endpoint_task_count(), 3, "its checker runs too");
        assert!(established_to(third.port()) >= 1);

        let leaving = cluster
            .endpoint(&third.to_string())
            .expect("in the cluster");
        let applied = cluster.apply(Update::Remove(vec![third.to_string()]));
        assert_eq!(applied.removed, 1);
        // Calls in flight on it finish; from then on it gets none.
        assert!(eventually(Duration::from_secs(5), || leaving.in_flight() == 0).await);
        let calls_at_removal = stats.get(&stats.calls);
        let gone = eventually(Duration::from_secs(5), || {
            cluster.endpoint_task_count() == 2 && established_to(third.port()) == 0
        })
        .await;
        assert!(
            gone,
            "the removed endpoint's tasks ({} left) and connections ({} left) end",
            cluster.endpoint_task_count(),
            established_to(third.port())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.store(true, Ordering::Relaxed);
        for caller in callers {
            caller.await.unwrap();
        }
        assert_eq!(failed.load(Ordering::Relaxed), 0, "no call was lost");
        assert!(ok.load(Ordering::Relaxed) > 500);
        assert_eq!(
            stats.get(&stats.calls),
            calls_at_removal,
            "no call after it left"
        );
        assert_eq!(agents.cancelled(2), 0, "none of its calls was cut off");
        let counted = (
            cluster_column(&sidecar, "endpoints_added"),
            cluster_column(&sidecar, "endpoints_removed"),
        );
        assert_eq!(counted, ("1".to_string(), "1".to_string()));
        // The endpoints that stayed kept their one connection each.
        assert_eq!(
            (agents.connections(0), agents.connections(1)),
            (2, 2),
            "calls and checker"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_on_a_removed_endpoint_finish() {
    bounded(Duration::from_secs(30), async {
        let mut slow = AgentOptions::named("slow");
        slow.delay = Duration::from_millis(500);
        let agents = Agents::start_with(vec![AgentOptions::named("fast"), slow]).await;
        let sidecar = sidecar(vec![planner(&agents.addrs)]).await;
        let cluster = sidecar.router().clusters()[0].clone();
        let client = planner_client(Way::LocalPort, &sidecar).await;
        // Round robin: half of these land on the slow agent and wait there.
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    client
                        .invoke(request(b"x"))
                        .await
                        .map(|r| r.into_inner().agent)
                })
            })
            .collect();
        let slow_stats = agents.stats[1].clone();
        assert!(
            eventually(Duration::from_secs(5), || slow_stats.get(&slow_stats.calls)
                == 4)
            .await
        );
        cluster.apply(Update::Remove(vec![agents.addrs[1].to_string()]));
        let mut by_agent = std::collections::BTreeMap::new();
        for call in calls {
            let agent = call.await.unwrap().expect("every call in flight finishes");
            *by_agent.entry(agent).or_insert(0) += 1;
        }
        assert_eq!(by_agent.get("slow"), Some(&4), "{by_agent:?}");
        assert_eq!(agents.cancelled(1), 0);
        // Then its connection closes, and new calls go to the one left.
        assert!(
            eventually(Duration::from_secs(5), || established_to(
                agents.addrs[1].port()
            ) == 0)
            .await
        );
        let counts = spread(&client, 20, 4).await;
        assert_eq!(counts.get("fast"), Some(&20), "{counts:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_removed_while_its_first_connect_hangs_leaves_no_connection() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(1).await;
        let mut config = planner(&agents.addrs);
        config.connect_timeout = Duration::from_secs(20);
        let sidecar = sidecar(vec![config]).await;
        let cluster = sidecar.router().clusters()[0].clone();
        // A port whose kernel completes TCP handshakes that nobody accepts:
        // the sidecar's connect waits there for HTTP/2 settings.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        cluster.apply(Update::Add(vec![EndpointConfig::new(
            silent.local_addr().unwrap(),
        )]));
        assert!(
            eventually(Duration::from_secs(5), || established_to(port) == 1).await,
            "the first connect reached the port"
        );
        let added = cluster
            .endpoint(&silent.local_addr().unwrap().to_string())
            .unwrap();
        assert!(!added.has_joined(), "still waiting for settings");
        cluster.apply(Update::Remove(vec![
            silent.local_addr().unwrap().to_string(),
        ]));
        // Well before the 20 s connect timeout, the half-made connection
        // is gone with the endpoint.
        let closed = eventually(Duration::from_secs(3), || {
            established_to(port) == 0 && cluster.endpoint_task_count() == 0
        })
        .await;
        assert!(
            closed,
            "connections left: {}, tasks left: {}",
            established_to(port),
            cluster.endpoint_task_count()
        );
        drop(silent);
    })
    .await;
}
