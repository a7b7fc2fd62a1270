//! What the proxy answers when it cannot do what a call asks: each a gRPC
//! status (or, before HTTP/2 starts, an HTTP answer) that says what
//! happened and names the cluster or target.

mod support;

use std::time::{Duration, Instant};

use agentmesh::app::Sidecar;
use agentmesh::config::{ClusterConfig, Config};
use agentmesh::pb::agent_client::AgentClient;
use agentmesh::tools::client;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_no_live_endpoint_answers_unavailable_naming_it() {
    bounded(Duration::from_secs(30), async {
        let mut cluster = planner(&[dead_address(), dead_address()]);
        cluster.name = "lonely".into();
        cluster.aliases.clear();
        let sidecar = sidecar(vec![cluster]).await;
        for way in [Way::Connect, Way::Authority, Way::LocalPort] {
            let mut client = AgentClient::new(channel(way, &sidecar, "lonely", "lonely:50051").await);
            let started = Instant::now();
            let status = client.invoke(request(b"x")).await.expect_err("nothing listens");
            assert_eq!(status.code(), Code::Unavailable, "{way:?}");
            assert!(
                status.message().starts_with("agentmesh: cluster \"lonely\": no endpoint reachable (tried 2 of 2; last: 127.0.0.3:"),
                "{}",
                status.message()
            );
            assert!(status.message().contains("refused"), "{}", status.message());
            assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_find_an_endpoint_down_go_to_another() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(2).await;
        let dead = dead_address();
        let sidecar = sidecar(vec![planner(&[agents.addrs[0], dead, agents.addrs[1]])]).await;
        let client = planner_client(Way::Connect, &sidecar).await;
        // `spread` panics on any failed call.
        let counts = spread(&client, 60, 4).await;
        assert_eq!(counts.values().sum::<usize>(), 60);
        assert_eq!(counts.len(), 2, "{counts:?}");
        let endpoints = sidecar.router().clusters()[0].endpoints();
        // Found dead once (or by a few calls at once), then it sits out
        // instead of being dialled by every third call.
        assert!(
            (1..=4).contains(&endpoints[1].stats().connect_failures),
            "{:?}",
            endpoints[1].stats()
        );
        assert_eq!(endpoints[1].stats().calls, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_process_killed_between_calls_costs_no_call_when_others_are_up() {
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start(2).await;
        let port = closed_port();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentmesh"))
            .args(["agent", "--listen", &port.to_string(), "--name", "doomed"])
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let up = eventually(Duration::from_secs(10), || {
            std::net::TcpStream::connect(port).is_ok()
        })
        .await;
        assert!(up, "agent process did not start");
        let sidecar = sidecar(vec![planner(&[agents.addrs[0], agents.addrs[1], port])]).await;
        let client = planner_client(Way::Connect, &sidecar).await;
        assert_eq!(spread(&client, 30, 1).await.get("doomed"), Some(&10));
        child.kill().await.unwrap();
        child.wait().await.unwrap();
        // Once the sidecar has seen the connection close, no call goes to it.
        // (A call sent in the instant between the kill and that moment fails
        // with UNAVAILABLE: whether the endpoint saw it cannot be known, so
        // it is not retried without a retry policy.)
        let doomed = &sidecar.router().clusters()[0].endpoints()[2];
        assert!(eventually(Duration::from_secs(5), || !doomed.connection().is_open()).await);
        let counts = spread(&client, 30, 3).await;
        assert_eq!(counts.get("doomed"), None);
        assert_eq!(counts.values().sum::<usize>(), 30);

        // With only the dead agent left, the answer is UNAVAILABLE, at once.
        let mut alone = planner(&[port]);
        alone.name = "solo".into();
        alone.aliases.clear();
        alone.local_port = None;
        let sidecar = sidecar_with(alone).await;
        let mut client = AgentClient::new(channel(Way::Connect, &sidecar, "solo", "solo:1").await);
        let status = client.invoke(request(b"x")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("cluster \"solo\""),
            "{}",
            status.message()
        );
    })
    .await;
}

async fn sidecar_with(cluster: ClusterConfig) -> Sidecar {
    let sidecar = Sidecar::start(&Config::for_test(vec![cluster]))
        .await
        .unwrap();
    warmed(&sidecar).await;
    sidecar
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_authority_answers_unavailable_naming_it() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(1).await;
        let sidecar = sidecar(vec![planner(&agents.addrs)]).await;
        let channel = client::via_authority(sidecar.proxy_addr(), "billing.agents:50051").await.unwrap();
        let status = AgentClient::new(channel).invoke(request(b"x")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            "agentmesh: no cluster is named \"billing.agents:50051\" (the call's :authority); known clusters: planner.agents"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_a_target_no_cluster_names_is_a_plain_tcp_tunnel() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(2).await;
        // The cluster holds agent-0 only; agent-1 is reached by its address.
        let sidecar = sidecar(vec![planner(&agents.addrs[..1])]).await;
        let target = agents.addrs[1].to_string();
        let client = AgentClient::new(
            client::via_connect(sidecar.proxy_addr(), &target)
                .await
                .unwrap(),
        );
        let counts = spread(&client, 20, 2).await;
        assert_eq!(counts.get("agent-1"), Some(&20), "{counts:?}");
        assert_eq!(
            sidecar.router().clusters()[0].endpoints()[0].stats().calls,
            0
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuse_unknown_answers_403_naming_the_target() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(1).await;
        let mut config = Config::for_test(vec![planner(&agents.addrs)]);
        config.listener.refuse_unknown = true;
        let sidecar = Sidecar::start(&config).await.unwrap();
        let err = client::http_connect(sidecar.proxy_addr(), "example.com:443")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("403 Forbidden"), "{err}");
        // A cluster's target still works.
        assert!(
            client::http_connect(sidecar.proxy_addr(), TARGET)
                .await
                .is_ok()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_requests_on_the_proxy_port_get_a_clear_refusal() {
    bounded(Duration::from_secs(30), async {
        let sidecar = sidecar(vec![planner(&[dead_address()])]).await;
        let mut tcp = tokio::net::TcpStream::connect(sidecar.proxy_addr())
            .await
            .unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{answer}"
        );
        assert!(
            answer.contains("takes HTTP CONNECT (proxy mode) or HTTP/2 with prior knowledge"),
            "{answer}"
        );

        let mut tcp = tokio::net::TcpStream::connect(sidecar.proxy_addr())
            .await
            .unwrap();
        tcp.write_all(b"\x16\x03\x01 not http at all\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
    })
    .await;
}
