//! What a caller cannot do to the sidecar or to other callers: tunnel to
//! the sidecar's own ports or around the balancer to an endpoint, take
//! every slot of a cluster with one connection, or hold connections open
//! without sending a request head, or idle.

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
        let mut forbidden = 0;
        for target in own.iter().chain(&agents.addrs[..2]) {
            let err = client::http_connect(sidecar.proxy_addr(), &target.to_string())
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains("403 Forbidden"), "{target}: {err}");
            forbidden += 1;
        }
        // The reason names what the target is.
        let err = refusal(sidecar.proxy_addr(), own[1]).await;
        assert!(err.contains("this sidecar's own port"), "{err}");
        let err = refusal(sidecar.proxy_addr(), agents.addrs[1]).await;
        assert!(
            err.contains("an endpoint of cluster \"planner.agents\" (localhost:"),
            "{err}"
        );
        forbidden += 2;
        // Another target is still a plain tunnel.
        let agent = client::http_connect(sidecar.proxy_addr(), &agents.addrs[2].to_string()).await;
        assert!(agent.is_ok());
        assert_eq!(
            refused(
                &get(sidecar.admin_addr(), "/metrics").await,
                "tunnel_forbidden"
            ),
            forbidden
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

/// A sidecar over `agents` whose listeners wait `header` for a request head
/// and close connections idle for `idle`.
async fn timed(agents: &Agents, header: Duration, idle: Duration) -> agentmesh::app::Sidecar {
    let mut config = agentmesh::config::Config::for_test(vec![planner(&agents.addrs[..1])]);
    config.listener.header_timeout = header;
    config.listener.idle_timeout = idle;
    let sidecar = agentmesh::app::Sidecar::start(&config).await.unwrap();
    warmed(&sidecar).await;
    sidecar
}

/// Connects to `addr`, writes `bytes`, and reads until the sidecar closes:
/// what it sent back and how long after the write it closed (None: still
/// open after 5 s).
async fn closed_after(addr: SocketAddr, bytes: &[u8]) -> (Vec<u8>, Option<Duration>) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let start = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await {
            Err(_) => return (got, None),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, Some(start.elapsed())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn refused(metrics: &str, reason: &str) -> u64 {
    let line = format!("agentmesh_callers_refused_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line.as_str()))
        .expect("the counter is exported")
        .parse()
        .unwrap()
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_open_callers_are_closed_after_the_header_timeout() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(1).await;
        let header = Duration::from_millis(400);
        let sidecar = timed(&agents, header, Duration::from_secs(60)).await;
        let (proxy, local, admin) = (
            sidecar.proxy_addr(),
            sidecar.local_addr("planner.agents").unwrap(),
            sidecar.admin_addr(),
        );
        let connect = format!("CONNECT {TARGET} HTTP/1.1\r\nHost: {TARGET}\r\n\r\n");
        let cases: [(&str, SocketAddr, &[u8]); 8] = [
            ("proxy port, silent", proxy, b""),
            ("local port, silent", local, b""),
            ("proxy port, half a preface", proxy, &PREFACE[..10]),
            ("local port, preface and no SETTINGS", local, PREFACE),
            ("proxy port, preface and no SETTINGS", proxy, PREFACE),
            (
                "a CONNECT to a cluster, then nothing",
                proxy,
                connect.as_bytes(),
            ),
            ("admin port, silent", admin, b""),
            (
                "admin port, half a request head",
                admin,
                b"GET /live HTTP/1.1\r\n",
            ),
        ];
        let runs =
            cases.map(|(what, addr, bytes)| async move { (what, closed_after(addr, bytes).await) });
        for (what, (_, after)) in futures_util::future::join_all(runs).await {
            let after = after.unwrap_or_else(|| panic!("{what}: still open after 5 s"));
            eprintln!("{what}: closed after {after:?}");
            assert!(
                after >= header - Duration::from_millis(100) && after < header * 4,
                "{what}: {after:?}"
            );
        }
        // Every one but the admin port's is counted.
        let metrics = get(admin, "/metrics").await;
        assert_eq!(refused(&metrics, "header_timeout"), 6, "{metrics}");
        // A caller that speaks in time is served as ever.
        let mut client = planner_client(Way::LocalPort, &sidecar).await;
        client.invoke(request(b"x")).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_callers_and_tunnels_are_closed_but_never_a_call_in_flight() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(2).await;
        let idle = Duration::from_millis(600);
        let sidecar = timed(&agents, Duration::from_secs(10), idle).await;
        let local = sidecar.local_addr("planner.agents").unwrap();
        // A call that takes three idle timeouts keeps its connection.
        let mut client = planner_client(Way::LocalPort, &sidecar).await;
        let mut slow = request(b"slow");
        slow.delay_ms = 1800;
        let started = std::time::Instant::now();
        client.invoke(slow).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(1800));
        // Idle, the connection is sent a GOAWAY and closed...
        assert!(
            eventually(Duration::from_secs(3), || established_to(local.port()) == 0).await,
            "the idle connection is still open"
        );
        // ...and the caller's next call opens another, losing nothing.
        client.invoke(request(b"x")).await.unwrap();
        // A plain TCP tunnel (to an agent no cluster names) with no byte
        // either way is closed too.
        let tunnel = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", agents.addrs[1]);
        let (answer, after) = closed_after(sidecar.proxy_addr(), tunnel.as_bytes()).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 200 OK\r\n"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        let after = after.expect("the idle tunnel is closed");
        assert!(
            after >= idle - Duration::from_millis(100) && after < idle * 3,
            "{after:?}"
        );
        let metrics = get(sidecar.admin_addr(), "/metrics").await;
        assert!(refused(&metrics, "idle_timeout") >= 2, "{metrics}");
    })
    .await;
}
