//! What a caller cannot do to the sidecar or to other callers: tunnel to
//! the sidecar's own ports or around the balancer to an endpoint, or take
//! every slot of a cluster with one connection.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use agentmesh::tools::client;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A GET over HTTP/1.1 to the admin port: the body.
async fn get(addr: SocketAddr, path: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    raw.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// The whole answer to a CONNECT that the proxy refuses.
async fn refusal(proxy: SocketAddr, target: SocketAddr) -> String {
    let mut tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    raw
}

fn refused_tunnels(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("agentmesh_callers_refused_total{reason=\"tunnel_forbidden\"} ")
        })
        .expect("the counter is exported")
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_never_reaches_the_sidecar_itself_or_a_clusters_endpoint() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(3).await;
        // agent-0 by address, agent-1 by name; agent-2 belongs to no cluster.
        let mut cluster = planner(&agents.addrs[..1]);
        let mut by_name = planner(&agents.addrs[1..2]).endpoints.remove(0);
        by_name.address = format!("localhost:{}", agents.addrs[1].port());
        cluster.endpoints.push(by_name);
        let sidecar = sidecar(vec![cluster]).await;
        let own = [
            sidecar.proxy_addr(),
            sidecar.admin_addr(),
            sidecar.local_addr("planner.agents").unwrap(),
        ];
        let mut refused = 0;
        for target in own.iter().chain(&agents.addrs[..2]) {
            let err = client::http_connect(sidecar.proxy_addr(), &target.to_string())
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains("403 Forbidden"), "{target}: {err}");
            refused += 1;
        }
        // The reason names what the target is.
        let err = refusal(sidecar.proxy_addr(), own[1]).await;
        assert!(err.contains("this sidecar's own port"), "{err}");
        let err = refusal(sidecar.proxy_addr(), agents.addrs[1]).await;
        assert!(
            err.contains("an endpoint of cluster \"planner.agents\" (localhost:"),
            "{err}"
        );
        refused += 2;
        // Another target is still a plain tunnel.
        let agent = client::http_connect(sidecar.proxy_addr(), &agents.addrs[2].to_string()).await;
        assert!(agent.is_ok());
        assert_eq!(
            refused_tunnels(&get(sidecar.admin_addr(), "/metrics").await),
            refused
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_connects_in_one_write_do_not_chain_through_the_sidecar() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(1).await;
        let sidecar = sidecar(vec![planner(&agents.addrs)]).await;
        let proxy = sidecar.proxy_addr();
        let before = established_to(proxy.port());
        let mut tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let chain = format!("CONNECT {proxy} HTTP/1.1\r\nHost: {proxy}\r\n\r\n").repeat(500);
        tcp.write_all(chain.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        // One refusal, and the connection closed: no hop was made.
        assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
        assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
        drop(tcp);
        assert!(
            eventually(Duration::from_secs(5), || established_to(proxy.port())
                <= before)
            .await,
            "{} connections to the proxy port, {before} before",
            established_to(proxy.port())
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_cannot_take_every_slot_of_a_cluster() {
    bounded(Duration::from_secs(30), async {
        // Two agents, 100 calls in flight each: 200 slots.
        let agents = Agents::start(2).await;
        let sidecar = sidecar(vec![planner(&agents.addrs)]).await;
        let local = sidecar.local_addr("planner.agents").unwrap();
        // The attacker: 300 calls on one connection, headers and no body,
        // each holding its slot until the request timeout.
        let tcp = tokio::net::TcpStream::connect(local).await.unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.unwrap();
        let driver = tokio::spawn(conn);
        let mut held = Vec::new();
        let mut send = send.ready().await.unwrap();
        for _ in 0..300 {
            let req = http::Request::post("http://planner.agents/agentmesh.demo.v1.Agent/Invoke")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
            match send.send_request(req, false) {
                Ok(call) => held.push(call),
                Err(_) => break,
            }
        }
        let in_flight = || -> u64 {
            sidecar.router().clusters()[0]
                .endpoints()
                .iter()
                .map(|e| e.stats().in_flight)
                .sum()
        };
        eventually(Duration::from_secs(5), || in_flight() >= 100).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let taken = in_flight();
        assert!(
            (1..=100).contains(&taken),
            "one connection holds {taken} calls in flight"
        );
        // Another caller still gets every call through.
        let mut other = planner_client(Way::LocalPort, &sidecar).await;
        let mut failed = Vec::new();
        for _ in 0..40 {
            if let Err(status) = other.invoke(request(b"x")).await {
                failed.push(status);
            }
        }
        eprintln!(
            "the attacker holds {taken} calls in flight; the other caller lost {} of 40",
            failed.len()
        );
        assert!(failed.is_empty(), "{failed:?}");
        drop(held);
        driver.abort();
    })
    .await;
}
