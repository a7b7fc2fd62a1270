//! The mesh end to end: real sidecars in this process gossiping over
//! loopback UDP with a shared key, real demo agents behind them. Each
//! scenario runs once without gossip and once with it, and prints both.

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agentmesh::app::Sidecar;
use agentmesh::config::{ClusterConfig, Config, MeshConfig, Strategy};
use agentmesh::mesh::seal::{Kind, MeshKey, Sealer, now_ms};
use agentmesh::pb::agent_client::AgentClient;
use agentmesh::tools::agent::AgentOptions;
use serde_json::Value;
use support::*;
use tokio::time::Instant;
use tonic::transport::Channel;

const KEY: &[u8] = b"an agentmesh test key of 32 byte";

/// The scenarios measure latency and shares: one at a time, so that they
/// do not share the machine's two cores with each other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn any_udp() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A sidecar over `clusters`, gossiping as `node` through `seeds` when
/// `key` is given (no `[mesh]` otherwise).
async fn node(clusters: Vec<ClusterConfig>, mesh: Option<(&str, &[SocketAddr], &[u8])>) -> Sidecar {
    node_every(clusters, mesh, None).await
}

/// [`node`], gossiping every `interval` (default: the default).
async fn node_every(
    clusters: Vec<ClusterConfig>,
    mesh: Option<(&str, &[SocketAddr], &[u8])>,
    interval: Option<Duration>,
) -> Sidecar {
    let mut config = Config::for_test(clusters);
    config.set_mesh(mesh.map(|(name, seeds, key)| {
        let mut m = MeshConfig::for_test(name, any_udp(), seeds, Some(key));
        m.interval = interval.unwrap_or(m.interval);
        m
    }));
    let sidecar = Sidecar::start(&config).await.expect("sidecar starts");
    warmed(&sidecar).await;
    sidecar
}

/// Sidecar A of a scenario: in a mesh of its own when `gossip`.
async fn first(clusters: Vec<ClusterConfig>, gossip: bool) -> Sidecar {
    node(clusters, gossip.then_some(("a", &[][..], KEY))).await
}

/// Sidecar B of a scenario: in one mesh with A when `gossip`, once the two
/// see each other.
async fn second(a: &Sidecar, clusters: Vec<ClusterConfig>, gossip: bool) -> Sidecar {
    let seeds = if gossip { vec![gossip_addr(a)] } else { vec![] };
    let b = node(clusters, gossip.then_some(("b", &seeds[..], KEY))).await;
    if gossip {
        joined(a, "a", &b, "b").await;
    }
    b
}

fn gossip_addr(s: &Sidecar) -> SocketAddr {
    s.mesh().expect("a mesh").advertise()
}

fn mesh_doc(s: &Sidecar) -> Value {
    serde_json::from_str(&s.mesh().expect("a mesh").render()).expect("/mesh is JSON")
}

/// Whether `s` sees `peer` alive.
fn sees_peer(s: &Sidecar, peer: &str) -> bool {
    mesh_doc(s)["peers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["node_id"] == peer && p["alive"] == true)
}

async fn joined(a: &Sidecar, a_name: &str, b: &Sidecar, b_name: &str) {
    let ok = eventually(Duration::from_secs(10), || {
        sees_peer(a, b_name) && sees_peer(b, a_name)
    })
    .await;
    assert!(ok, "{a_name} and {b_name} did not become peers");
}

fn cluster(addrs: &[SocketAddr], strategy: Strategy) -> ClusterConfig {
    let mut c = planner(addrs);
    c.strategy = strategy;
    c
}

/// The state `/stats` gives `sidecar`'s endpoint at `addr`.
fn state_of(sidecar: &Sidecar, addr: SocketAddr) -> &'static str {
    let cluster = sidecar.router().find("planner.agents").unwrap();
    cluster
        .endpoint(&addr.to_string())
        .map(|e| e.stats().state)
        .unwrap_or("absent")
}

/// Keeps `n` calls open on `client` until `stop`: each caller calls again
/// as soon as its call returns.
fn keep_busy(client: AgentClient<Channel>, n: usize, stop: Arc<AtomicBool>) {
    for _ in 0..n {
        let mut client = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let _ = client.invoke(request(b"busy")).await;
            }
        });
    }
}

/// Sends `n` calls, `concurrency` at a time; returns the replies' agents
/// and latencies, and the failures.
async fn timed_calls(
    client: &AgentClient<Channel>,
    n: usize,
    concurrency: usize,
) -> (Vec<(String, Duration)>, usize) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (mut client, next) = (client.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (Vec::new(), 0);
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let t = Instant::now();
                match client.invoke(request(b"x")).await {
                    Ok(reply) => ok.push((reply.into_inner().agent, t.elapsed())),
                    Err(_) => failed += 1,
                }
            }
            (ok, failed)
        }));
    }
    let (mut all, mut failures) = (Vec::new(), 0);
    for t in tasks {
        let (ok, failed) = t.await.unwrap();
        all.extend(ok);
        failures += failed;
    }
    (all, failures)
}

fn p99(samples: &[(String, Duration)]) -> Duration {
    let mut d: Vec<_> = samples.iter().map(|s| s.1).collect();
    d.sort();
    d[(d.len() * 99 / 100).min(d.len() - 1)]
}

fn share(samples: &[(String, Duration)], agent: &str) -> f64 {
    samples.iter().filter(|s| s.0 == agent).count() as f64 / samples.len() as f64
}

/// Sidecar A's caller keeps 8 calls open on agent X (A's cluster lists X
/// alone); sidecar B balances over X, Y and Z with least_connections. Each
/// agent serves 4 calls at a time and takes 20 ms.
async fn skew_run(agents: &Agents, gossip: bool) -> (f64, Duration) {
    let x = agents.addrs[0];
    let (a_mesh, b_mesh);
    let a = first(vec![cluster(&[x], Strategy::LeastConnections)], gossip).await;
    let b = second(
        &a,
        vec![cluster(&agents.addrs, Strategy::LeastConnections)],
        gossip,
    )
    .await;
    (a_mesh, b_mesh) = (
        planner_client(Way::LocalPort, &a).await,
        planner_client(Way::LocalPort, &b).await,
    );
    let stop = Arc::new(AtomicBool::new(false));
    keep_busy(a_mesh, 8, stop.clone());
    // Let A's calls queue on X, and (with gossip) A's report reach B.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (samples, failures) = timed_calls(&b_mesh, 300, 3).await;
    stop.store(true, Ordering::Relaxed);
    assert_eq!(failures, 0);
    let on_x = share(&samples, &agents.names[0]);
    (on_x, p99(&samples))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_counts_the_whole_meshs_calls() {
    let _alone = ONE_AT_A_TIME.lock().await;
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start_with(
            ["x", "y", "z"]
                .iter()
                .map(|n| AgentOptions {
                    delay: Duration::from_millis(20),
                    max_concurrency: 4,
                    ..AgentOptions::named(n)
                })
                .collect(),
        )
        .await;
        let (alone_share, alone_p99) = skew_run(&agents, false).await;
        let (mesh_share, mesh_p99) = skew_run(&agents, true).await;
        println!(
            "cross-caller skew: B's share on X {:.1}% -> {:.1}% with gossip; B's p99 {:?} -> {:?}",
            alone_share * 100.0,
            mesh_share * 100.0,
            alone_p99,
            mesh_p99
        );
        assert!(
            alone_share > 0.15,
            "without gossip B cannot see A's calls: {alone_share}"
        );
        assert!(mesh_share < 0.10, "with gossip B avoids X: {mesh_share}");
        assert!(
            mesh_p99 * 2 <= alone_p99,
            "B's p99 at least 2x lower: {alone_p99:?} vs {mesh_p99:?}"
        );
    })
    .await;
}

/// Agent F fails every call; G and H answer. A's calls eject F; then B
/// sends 60 calls. Returns B's failures and, with gossip, the time from
/// A's ejection to B's.
async fn protect_run(agents: &Agents, gossip: bool) -> (usize, Option<Duration>) {
    let f = agents.addrs[0];
    let a = first(vec![cluster(&agents.addrs, Strategy::RoundRobin)], gossip).await;
    let b = second(
        &a,
        vec![cluster(&agents.addrs, Strategy::RoundRobin)],
        gossip,
    )
    .await;
    let a_client = planner_client(Way::LocalPort, &a).await;
    for _ in 0..200 {
        if state_of(&a, f) == "ejected" {
            break;
        }
        let _ = a_client.clone().invoke(request(b"x")).await;
    }
    assert_eq!(state_of(&a, f), "ejected", "A's own calls eject F");
    let a_ejected = Instant::now();
    let spread = if gossip {
        let ok = eventually(Duration::from_secs(3), || state_of(&b, f) == "ejected").await;
        assert!(ok, "B takes F out after A ejects it");
        Some(a_ejected.elapsed())
    } else {
        None
    };
    let b_client = planner_client(Way::LocalPort, &b).await;
    let (_, failures) = timed_calls(&b_client, 60, 1).await;
    (failures, spread)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sidecars_ejection_protects_its_peers() {
    let _alone = ONE_AT_A_TIME.lock().await;
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start_with(vec![
            AgentOptions {
                fail_ratio: 1.0,
                ..AgentOptions::named("f")
            },
            AgentOptions::named("g"),
            AgentOptions::named("h"),
        ])
        .await;
        let (alone, _) = protect_run(&agents, false).await;
        let (meshed, spread) = protect_run(&agents, true).await;
        let spread = spread.unwrap();
        println!(
            "one sidecar's finding: B's failures {alone} alone -> {meshed} with gossip; A's ejection reached B in {spread:?}"
        );
        assert_eq!(alone, 5, "alone, B pays its own failure_threshold");
        assert!(meshed <= 1, "with gossip B fails at most once: {meshed}");
        assert!(spread < Duration::from_secs(1), "{spread:?}");
    })
    .await;
}

/// A sidecar that joins after A found agent S slow: the share of its first
/// 200 `latency` calls that go to S.
async fn warm_run(agents: &Agents, gossip: bool) -> f64 {
    let a = first(vec![cluster(&agents.addrs, Strategy::Latency)], gossip).await;
    let a_client = planner_client(Way::LocalPort, &a).await;
    let _ = timed_calls(&a_client, 300, 8).await;
    let b = second(&a, vec![cluster(&agents.addrs, Strategy::Latency)], gossip).await;
    if gossip {
        let slow = agents.addrs[2].to_string();
        let warm = eventually(Duration::from_secs(5), || {
            mesh_doc(&b)["clusters"][0]["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| {
                    e["address"] == slow.as_str() && e["mesh"]["latency_ms"].as_f64() > Some(500.0)
                })
        })
        .await;
        assert!(warm, "B holds A's estimate of the slow agent");
        // The view is applied to the pickers each interval (200 ms).
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let b_client = planner_client(Way::LocalPort, &b).await;
    let (samples, failures) = timed_calls(&b_client, 200, 16).await;
    assert_eq!(failures, 0);
    share(&samples, &agents.names[2])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_sidecar_starts_warm() {
    let _alone = ONE_AT_A_TIME.lock().await;
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start_with(vec![
            AgentOptions {
                delay: Duration::from_millis(5),
                ..AgentOptions::named("fast-1")
            },
            AgentOptions {
                delay: Duration::from_millis(5),
                ..AgentOptions::named("fast-2")
            },
            AgentOptions {
                delay: Duration::from_secs(1),
                ..AgentOptions::named("slow")
            },
        ])
        .await;
        let cold = warm_run(&agents, false).await;
        let warm = warm_run(&agents, true).await;
        println!(
            "warm start: the slow agent's share of a new sidecar's first 200 calls {:.1}% alone -> {:.1}% with gossip",
            cold * 100.0,
            warm * 100.0
        );
        assert!(warm < 0.05, "{warm}");
        assert!(cold > warm, "alone it must find the slow agent itself: {cold}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_key_or_a_bad_datagram_never_gets_in() {
    let _alone = ONE_AT_A_TIME.lock().await;
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start(1).await;
        let clusters = || vec![cluster(&agents.addrs, Strategy::LeastConnections)];
        let a = node(clusters(), Some(("a", &[][..], KEY))).await;
        let seeds = [gossip_addr(&a)];
        let b = node(clusters(), Some(("b", &seeds[..], KEY))).await;
        let other = node(
            clusters(),
            Some(("intruder", &seeds[..], b"another key, also 32 bytes long!")),
        )
        .await;
        joined(&a, "a", &b, "b").await;

        // Hand-made datagrams at A's gossip port.
        let target = gossip_addr(&a);
        let raw = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut sealer = Sealer::new(MeshKey::derive(KEY));
        let mut good = Vec::new();
        sealer.seal(Kind::Swim, b"not a membership packet", now_ms(), &mut good);
        let mut forged = good.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        let mut old = Vec::new();
        sealer.seal(Kind::Swim, b"x", now_ms() - 30_000, &mut old);
        for d in [
            &vec![0u8; 1500],
            &vec![0xa7u8; 10],
            &forged,
            &old,
            &good,
            &good,
        ] {
            raw.send_to(d, target).unwrap();
        }
        let counted = eventually(Duration::from_secs(5), || {
            let d = &mesh_doc(&a)["datagrams"];
            let n = |k: &str| d["dropped"][k].as_u64().unwrap();
            n("oversized") >= 1
                && n("truncated") >= 1
                && n("forged") >= 1
                && n("replayed") >= 2
                && n("other_key") >= 1
                && d["undecodable"].as_u64().unwrap() >= 1
        })
        .await;
        // Give the intruder time to have tried several times.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let doc = mesh_doc(&a);
        println!("A's datagram counters: {}", doc["datagrams"]);
        assert!(
            counted,
            "every bad datagram is dropped and counted: {}",
            doc["datagrams"]
        );
        assert!(!sees_peer(&a, "intruder") && !sees_peer(&b, "intruder"));
        let names: Vec<_> = doc["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["node_id"].clone())
            .collect();
        assert_eq!(names, ["b"], "only the peer with the key");
        assert!(mesh_doc(&other)["peers"].as_array().unwrap().is_empty());
        assert!(sees_peer(&a, "b"), "the real peer is unaffected");
    })
    .await;
}

/// Agent F fails every call; A's calls eject it. Then 40 sessions call
/// once through A and once through B: how many land on different agents
/// (or fail) from the two sidecars.
async fn affinity_run(agents: &Agents, gossip: bool) -> usize {
    let f = agents.addrs[0];
    let with_sessions = || {
        let mut c = cluster(&agents.addrs, Strategy::RoundRobin);
        c.affinity = Some(agentmesh::config::AffinityConfig::default());
        vec![c]
    };
    let a = first(with_sessions(), gossip).await;
    let b = second(&a, with_sessions(), gossip).await;
    let a_client = planner_client(Way::LocalPort, &a).await;
    for _ in 0..200 {
        if state_of(&a, f) == "ejected" {
            break;
        }
        let _ = a_client.clone().invoke(request(b"x")).await;
    }
    assert_eq!(state_of(&a, f), "ejected");
    if gossip {
        assert!(eventually(Duration::from_secs(3), || state_of(&b, f) == "ejected").await);
    }
    let b_client = planner_client(Way::LocalPort, &b).await;
    let mut differ = 0;
    for k in 0..40 {
        let call = |mut client: AgentClient<Channel>| async move {
            let mut req = tonic::Request::new(request(b"x"));
            req.metadata_mut()
                .insert("x-session-id", format!("session-{k}").parse().unwrap());
            client.invoke(req).await.ok().map(|r| r.into_inner().agent)
        };
        let (on_a, on_b) = (call(a_client.clone()).await, call(b_client.clone()).await);
        if on_a.is_none() || on_a != on_b {
            differ += 1;
        }
    }
    differ
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_agree_on_the_ready_set_so_sessions_land_alike() {
    let _alone = ONE_AT_A_TIME.lock().await;
    bounded(Duration::from_secs(60), async {
        let mut options = vec![AgentOptions {
            fail_ratio: 1.0,
            ..AgentOptions::named("f")
        }];
        options.extend(["g", "h", "i"].map(AgentOptions::named));
        let agents = Agents::start_with(options).await;
        let alone = affinity_run(&agents, false).await;
        let meshed = affinity_run(&agents, true).await;
        println!(
            "sessions placed differently by A and B: {alone} of 40 alone -> {meshed} with gossip"
        );
        assert!(
            alone > 0,
            "alone, B still hashes sessions onto the failing agent"
        );
        assert_eq!(meshed, 0);
    })
    .await;
}

/// Three sidecars in one mesh gossiping every `interval` when given (each
/// on its own otherwise).
async fn three(clusters: Vec<ClusterConfig>, interval: Option<Duration>) -> [Sidecar; 3] {
    let gossip = interval.is_some();
    let a = node_every(
        clusters.clone(),
        gossip.then_some(("a", &[][..], KEY)),
        interval,
    )
    .await;
    let seeds = if gossip {
        vec![gossip_addr(&a)]
    } else {
        vec![]
    };
    let b = node_every(
        clusters.clone(),
        gossip.then_some(("b", &seeds[..], KEY)),
        interval,
    )
    .await;
    let c = node_every(clusters, gossip.then_some(("c", &seeds[..], KEY)), interval).await;
    if gossip {
        joined(&a, "a", &b, "b").await;
        joined(&a, "a", &c, "c").await;
        joined(&b, "b", &c, "c").await;
    }
    [a, b, c]
}

/// Calls through each of `sidecars` at once, one every `every` for
/// `seconds`, with `tenant` as the rate-limit key; the calls answered OK and
/// those refused RESOURCE_EXHAUSTED.
async fn paced(sidecars: &[Sidecar], every: Duration, n: usize, tenant: &str) -> (usize, usize) {
    let mut tasks = Vec::new();
    for s in sidecars {
        let mut client = planner_client(Way::Connect, s).await;
        let tenant = tenant.to_string();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (0, 0);
            let mut tick = tokio::time::interval(every);
            for _ in 0..n {
                tick.tick().await;
                let mut r = tonic::Request::new(request(b"x"));
                r.metadata_mut().insert("x-tenant", tenant.parse().unwrap());
                match client.invoke(r).await {
                    Ok(_) => ok += 1,
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => refused += 1,
                    Err(s) => panic!("unexpected {s:?}"),
                }
            }
            (ok, refused)
        }));
    }
    let mut total = (0, 0);
    for t in tasks {
        let (ok, refused) = t.await.unwrap();
        total = (total.0 + ok, total.1 + refused);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_wide_rate_limit_holds_across_three_sidecars() {
    let _one = ONE_AT_A_TIME.lock().await;
    bounded(Duration::from_secs(100), async {
        let agents = Agents::start(2).await;
        let ms = Duration::from_millis;
        let intervals = [None, Some(ms(200)), Some(ms(1000))];
        let mut meshes = Vec::new();
        for interval in intervals {
            let mut c = planner(&agents.addrs);
            c.rate_limits = vec![agentmesh::cluster::limit::RateLimitConfig {
                calls: std::num::NonZeroU32::new(100).unwrap(),
                window: Duration::from_secs(60),
                key: Some(http::HeaderName::from_static("x-tenant")),
                max_keys: 100,
                mesh_wide: interval.is_some(),
            }];
            meshes.push(three(vec![c], interval).await);
        }
        // The three meshes side by side, for a whole minute: 20 calls a
        // second through each sidecar (60 a second into each mesh, 3,600 in
        // the minute) of a limit of 100 a minute.
        let ((alone, _), (every_200ms, _), (every_1s, _)) = tokio::join!(
            paced(&meshes[0], ms(50), 1200, "team-7"),
            paced(&meshes[1], ms(50), 1200, "team-7"),
            paced(&meshes[2], ms(50), 1200, "team-7"),
        );
        for (interval, ok) in intervals.iter().zip([alone, every_200ms, every_1s]) {
            eprintln!(
                "gossip every {interval:?}: {ok} of 3600 let through in a minute (limit 100)"
            );
        }
        // /mesh shows the key, what this sidecar and its peers used.
        let doc = mesh_doc(&meshes[1][0]);
        let limit = &doc["clusters"][0]["shared_limits"][0];
        let key = &limit["busiest_here"][0];
        assert_eq!(key["key"], "team-7", "{limit}");
        let total = key["here"].as_f64().unwrap() + key["peers"].as_f64().unwrap();
        assert!((90.0..=130.0).contains(&total), "{limit}");
        // Alone, each sidecar lets its own 100 through (a window that ends
        // within the minute lets a few more in as it slides).
        assert!((300..=315).contains(&alone), "alone: {alone}");
        // Together they hold the limit, but for what the other two admit
        // before they hear of it: about 40 calls/s x (one interval + the
        // delivery), so gossip every second lets more through.
        assert!(
            (100..=130).contains(&every_200ms),
            "every 200 ms: {every_200ms} let through"
        );
        assert!(
            every_1s > every_200ms && every_1s < alone,
            "every second: {every_1s} let through"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_wide_retry_budget_shares_one_floor_when_every_endpoint_fails() {
    let _one = ONE_AT_A_TIME.lock().await;
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start(2).await;
        for s in &agents.stats {
            s.set_fail_ratio(1.0);
        }
        let mut retries_made = Vec::new();
        let ms = Duration::from_millis;
        for gossip in [false, true] {
            let mut c = planner(&agents.addrs);
            c.breaker.enabled = false;
            c.outlier = None;
            c.retry = Some(agentmesh::config::RetryConfig {
                methods: vec!["*".into()],
                min_retries_per_second: 2,
                backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(1),
                mesh_wide_budget: gossip,
                ..Default::default()
            });
            let sidecars = three(vec![c], gossip.then_some(ms(200))).await;
            let mut tasks = Vec::new();
            for s in &sidecars {
                let mut client = planner_client(Way::Connect, s).await;
                tasks.push(tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_millis(40));
                    for _ in 0..50 {
                        tick.tick().await;
                        let status = client.invoke(request(b"x")).await.unwrap_err();
                        assert!(status.message().contains("injected failure"), "{status:?}");
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let retries: u64 = sidecars
                .iter()
                .map(|s| {
                    let cluster = s.router().clusters()[0].clone();
                    let stats = cluster.stats();
                    agentmesh::cluster::ClusterStats::get(&stats.retries)
                })
                .sum();
            eprintln!("gossip {gossip}: {retries} retries for 150 failing calls from 3 sidecars");
            retries_made.push(retries);
        }
        // Each alone: 20% of its 50 calls plus its own floor of 20 (2/s over
        // 10 s), 30 each. Shared: 20% of 150 plus one floor of 20, 50, and
        // what a gossip interval lets through.
        assert!(retries_made[0] >= 85, "alone: {}", retries_made[0]);
        assert!(
            retries_made[1] <= 62,
            "the mesh made {} retries",
            retries_made[1]
        );
    })
    .await;
}

/// The failover drill mesh-wide: `ctl failover` on sidecar A takes the
/// endpoint out of A's picks, and A tells its peer B, which takes it out
/// too (as a peer's ejection) for the rest of the drill; B's calls then go
/// to the other two. Back on both when the drill ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_drill_on_one_sidecar_reaches_its_peers() {
    let _one = ONE_AT_A_TIME.lock().await;
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start(3).await;
        let a = first(vec![cluster(&agents.addrs, Strategy::RoundRobin)], true).await;
        let b = second(&a, vec![cluster(&agents.addrs, Strategy::RoundRobin)], true).await;
        let f = agents.addrs[0];
        let asked = Instant::now();
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentmesh"))
            .args(["ctl", "--admin", &a.admin_addr().to_string(), "failover"])
            .args(["planner.agents", &f.to_string(), "--for", "4s"])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(state_of(&a, f), "failover");
        let reached = eventually(Duration::from_secs(3), || state_of(&b, f) == "ejected").await;
        let took = asked.elapsed();
        eprintln!("failover on A: B took the endpoint out after {took:?}");
        assert!(reached, "B did not take it out: {}", state_of(&b, f));
        let client = planner_client(Way::LocalPort, &b).await;
        let mut to_f = 0;
        for _ in 0..30 {
            let agent = client
                .clone()
                .invoke(request(b"x"))
                .await
                .unwrap()
                .into_inner()
                .agent;
            to_f += usize::from(agent == "agent-0");
        }
        assert_eq!(to_f, 0, "B sent calls to the drilled endpoint");
        let stats: Value =
            serde_json::from_str(&agentmesh::admin::stats_json(b.router(), None)).unwrap();
        let listed = stats["clusters"][0]["endpoints"].as_array().unwrap();
        let e = listed
            .iter()
            .find(|e| e["address"] == f.to_string())
            .unwrap();
        assert_eq!(e["mesh_ejections"], 1, "{e}");
        // The drill ends on both.
        let back = eventually(Duration::from_secs(8), || {
            state_of(&a, f) == "ready" && matches!(state_of(&b, f), "ready" | "probing")
        })
        .await;
        assert!(
            back,
            "after the drill: A {}, B {}",
            state_of(&a, f),
            state_of(&b, f)
        );
    })
    .await;
}
