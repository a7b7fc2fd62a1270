//! Live reload: the sidecar binary reloads its config on SIGHUP and when a
//! ConfigMap-style symlink swap replaces the file, applies each change as a
//! diff while calls flow, and refuses an invalid file, keeping the running
//! config. In process: what a diff keeps, rebuilds and removes.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentmesh::pb::agent_client::AgentClient;
use agentmesh::tools::agent::AgentOptions;
use agentmesh::tools::client;
use support::*;
use tonic::transport::Channel;

/// One version of the config: the planner cluster's endpoints as (agent,
/// weight, version), its split (v1, v2) and anything else.
struct Version<'a> {
    endpoints: &'a [(usize, u32, &'a str)],
    split: Option<(u32, u32)>,
    extra: &'a str,
}

struct Ports {
    proxy: SocketAddr,
    admin: SocketAddr,
    local: SocketAddr,
}

fn render(ports: &Ports, agents: &Agents, v: &Version<'_>) -> String {
    let mut text = format!(
        "[listener]\nproxy = \"{}\"\ndrain_timeout = \"5s\"\n[admin]\nlisten = \"{}\"\n\n\
         [[cluster]]\nname = \"planner.agents\"\naliases = [\"planner\"]\nstrategy = \"weighted\"\n\
         local_port = \"{}\"\n",
        ports.proxy, ports.admin, ports.local
    );
    if let Some((v1, v2)) = v.split {
        text.push_str(&format!("split = {{ v1 = {v1}, v2 = {v2} }}\n"));
    }
    text.push_str(v.extra);
    text.push('\n');
    for &(agent, weight, version) in v.endpoints {
        text.push_str(&format!(
            "[[cluster.endpoints]]\naddress = \"{}\"\nweight = {weight}\nversion = \"{version}\"\n",
            agents.addrs[agent]
        ));
    }
    text
}

/// The config directory as the kubelet keeps a mounted ConfigMap:
/// `agentmesh.toml -> ..data/agentmesh.toml`, `..data -> ..<n>`; an update
/// writes a new `..<n>` and renames a new symlink over `..data`.
struct ConfigMap {
    dir: tempfile::TempDir,
    generation: usize,
}

impl ConfigMap {
    fn new(text: &str) -> ConfigMap {
        let dir = tempfile::tempdir().unwrap();
        let map = ConfigMap { dir, generation: 0 };
        map.write_generation(0, text);
        std::os::unix::fs::symlink("..0", map.dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink(
            "..data/agentmesh.toml",
            map.dir.path().join("agentmesh.toml"),
        )
        .unwrap();
        map
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("agentmesh.toml")
    }

    fn write_generation(&self, n: usize, text: &str) {
        let gen_dir = self.dir.path().join(format!("..{n}"));
        std::fs::create_dir_all(&gen_dir).unwrap();
        std::fs::write(gen_dir.join("agentmesh.toml"), text).unwrap();
    }

    /// A ConfigMap update: the new file appears through a symlink swap.
    fn swap(&mut self, text: &str) {
        self.generation += 1;
        self.write_generation(self.generation, text);
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(format!("..{}", self.generation), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }

    /// An edit the directory watch does not see (inside the current
    /// generation), which only SIGHUP picks up.
    fn edit_in_place(&self, text: &str) {
        self.write_generation(self.generation, text);
    }
}

/// `n` calls on 16 callers at once: the share of each agent, and failures.
async fn burst(client: &AgentClient<Channel>, n: usize) -> (BTreeMap<String, usize>, Vec<String>) {
    let per = n / 16;
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let (mut seen, mut failed) = (BTreeMap::new(), Vec::new());
                for _ in 0..per {
                    match client.invoke(request(b"burst")).await {
                        Ok(r) => *seen.entry(r.into_inner().agent).or_insert(0) += 1,
                        Err(s) => failed.push(format!("{:?}: {}", s.code(), s.message())),
                    }
                }
                (seen, failed)
            })
        })
        .collect();
    gather(tasks).await
}

async fn stats(admin: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&admin_get(admin, "/stats?format=json").await).unwrap()
}

/// Polls `/stats?format=json` until `check` holds: how long it took, or
/// `None` after 3 s.
async fn in_effect(
    admin: SocketAddr,
    since: Instant,
    check: impl Fn(&serde_json::Value) -> bool,
) -> Option<Duration> {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if check(&stats(admin).await) {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

fn planner(s: &serde_json::Value) -> &serde_json::Value {
    &s["clusters"][0]
}

fn addresses(s: &serde_json::Value) -> Vec<String> {
    let mut a: Vec<String> = planner(s)["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["address"].as_str().unwrap().to_string())
        .collect();
    a.sort();
    a
}

fn weight_of(s: &serde_json::Value, address: &str) -> Option<u64> {
    planner(s)["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["address"] == address)?["weight"]
        .as_u64()
}

fn hangup(child: &tokio::process::Child) {
    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
}

fn share(seen: &BTreeMap<String, usize>, agent: &str) -> f64 {
    let total: usize = seen.values().sum();
    100.0 * *seen.get(agent).unwrap_or(&0) as f64 / total.max(1) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_reloads_under_load_by_sighup_and_symlink_swap_lose_no_call() {
    bounded(Duration::from_secs(120), async {
        // a0..a3 are version v1, c0 the v2 canary.
        let agents = Agents::start_with(
            ["a0", "a1", "a2", "a3", "c0"]
                .into_iter()
                .map(AgentOptions::named)
                .collect(),
        )
        .await;
        let ports = Ports {
            proxy: closed_port(),
            admin: closed_port(),
            local: closed_port(),
        };
        let a = |i: usize| agents.addrs[i].to_string();
        let v = |endpoints, split, extra| Version {
            endpoints,
            split,
            extra,
        };
        let mut map = ConfigMap::new(&render(
            &ports,
            &agents,
            &v(&[(0, 1, "v1"), (1, 1, "v1"), (2, 1, "v1")], None, ""),
        ));
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentmesh"))
            .args(["run", "--config"])
            .arg(map.path())
            .env("RUST_LOG", "info")
            .kill_on_drop(true)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let up = eventually(Duration::from_secs(10), || {
            std::net::TcpStream::connect(ports.local).is_ok()
                && std::net::TcpStream::connect(ports.admin).is_ok()
        })
        .await;
        assert!(up, "the sidecar serves");

        let local = AgentClient::new(client::direct(ports.local).await.unwrap());
        // A CONNECT tunnel opened before every change, used for the bursts:
        // a long-lived connection follows the cluster across rebuilds.
        let tunnel = AgentClient::new(
            client::via_connect(ports.proxy, "planner.agents:50051")
                .await
                .unwrap(),
        );
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let load_started = Instant::now();
        let load = paced_load(local.clone(), 300, 12_000, stop.clone(), log.clone());
        let mut burst_failures = Vec::new();
        tokio::time::sleep(Duration::from_millis(1_500)).await;

        // 1. File swap: a3 joins.
        let t = Instant::now();
        map.swap(&render(
            &ports,
            &agents,
            &v(
                &[(0, 1, "v1"), (1, 1, "v1"), (2, 1, "v1"), (3, 1, "v1")],
                None,
                "",
            ),
        ));
        let took = in_effect(ports.admin, t, |s| addresses(s).contains(&a(3))).await;
        eprintln!("a3 added: in effect after {took:?}");
        assert!(
            took.is_some_and(|d| d < Duration::from_secs(1)),
            "a3 added: {took:?}"
        );
        let a3_joined = t;
        tokio::time::sleep(Duration::from_millis(1_500)).await;

        // 2. SIGHUP: a0 leaves.
        let t = Instant::now();
        map.edit_in_place(&render(
            &ports,
            &agents,
            &v(&[(1, 1, "v1"), (2, 1, "v1"), (3, 1, "v1")], None, ""),
        ));
        hangup(&child);
        let took = in_effect(ports.admin, t, |s| !addresses(s).contains(&a(0))).await;
        eprintln!("a0 removed: in effect after {took:?}");
        assert!(
            took.is_some_and(|d| d < Duration::from_secs(1)),
            "a0 removed: {took:?}"
        );
        let a0_removed = t;
        tokio::time::sleep(Duration::from_millis(1_500)).await;

        // 3. File swap: a1 weighs 3.
        let t = Instant::now();
        map.swap(&render(
            &ports,
            &agents,
            &v(&[(1, 3, "v1"), (2, 1, "v1"), (3, 1, "v1")], None, ""),
        ));
        let took = in_effect(ports.admin, t, |s| weight_of(s, &a(1)) == Some(3)).await;
        eprintln!("a1 reweighted: in effect after {took:?}");
        assert!(
            took.is_some_and(|d| d < Duration::from_secs(1)),
            "a1 reweighted: {took:?}"
        );
        let (seen, failed) = burst(&tunnel, 3_000).await;
        burst_failures.extend(failed);
        let a1 = share(&seen, "a1");
        eprintln!(
            "weights 3:1:1: a1 took {a1:.1}% of {} calls",
            seen.values().sum::<usize>()
        );
        assert!(
            (a1 - 60.0).abs() <= 4.0,
            "a1 at weight 3 of 5 took {a1:.1}%: {seen:?}"
        );

        // 4-8. The canary walk, 10 -> 25 -> (an invalid file) -> 50 -> 100,
        // alternating SIGHUP and file swaps. Every step rebuilds the
        // cluster (its split changed).
        let mut endpoints = vec![(1, 3, "v1"), (2, 1, "v1"), (3, 1, "v1"), (4, 1, "v2")];
        endpoints[0].1 = 1;
        for (step, percent) in [10u32, 25, 0, 50, 100].into_iter().enumerate() {
            let by_signal = step % 2 == 0;
            let t = Instant::now();
            if percent == 0 {
                // An invalid file: a weight of 0 is refused by key; the
                // split of 25 keeps running.
                let mut bad = render(&ports, &agents, &v(&endpoints, Some((75, 25)), ""));
                bad = bad.replacen("weight = 1", "weight = 0", 1);
                if by_signal {
                    map.edit_in_place(&bad);
                    hangup(&child);
                } else {
                    map.swap(&bad);
                }
                let took = in_effect(ports.admin, t, |s| s["reloads"]["invalid"] == 1).await;
                eprintln!("invalid file: refused after {took:?}");
                assert!(
                    took.is_some_and(|d| d < Duration::from_secs(1)),
                    "invalid file counted: {took:?}"
                );
                let s = stats(ports.admin).await;
                let error = s["reloads"]["last_error"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                assert!(
                    error.contains("agentmesh.toml: cluster[0].endpoints[0].weight:"),
                    "the refusal names the file and key: {error}"
                );
                let health = admin_get(ports.admin, "/health").await;
                assert!(
                    health.contains("\"degraded\"") && health.contains("reload was refused"),
                    "{health}"
                );
                let (seen, failed) = burst(&tunnel, 3_000).await;
                burst_failures.extend(failed);
                let canary = share(&seen, "c0");
                assert!(
                    (canary - 25.0).abs() <= 3.0,
                    "after the invalid file the split of 25 stays: {canary:.1}% {seen:?}"
                );
                continue;
            }
            let text = render(
                &ports,
                &agents,
                &v(&endpoints, Some((100 - percent, percent)), ""),
            );
            if by_signal {
                map.edit_in_place(&text);
                hangup(&child);
            } else {
                map.swap(&text);
            }
            let took = in_effect(ports.admin, t, |s| {
                planner(s)["split"]["v2"] == percent && planner(s)["ready"] == 4
            })
            .await;
            assert!(
                took.is_some_and(|d| d < Duration::from_secs(1)),
                "split {percent}%: {took:?}"
            );
            let (seen, failed) = burst(&tunnel, 3_000).await;
            burst_failures.extend(failed);
            let canary = share(&seen, "c0");
            eprintln!(
                "split {percent}%: in effect after {took:?}; canary share {canary:.1}% of {} calls",
                seen.values().sum::<usize>()
            );
            assert!(
                (canary - f64::from(percent)).abs() <= 3.0,
                "split {percent}%: the canary took {canary:.1}%: {seen:?}"
            );
        }

        // 9. SIGHUP: another strategy and a retry policy (a rebuild).
        let t = Instant::now();
        map.edit_in_place(&render(
            &ports,
            &agents,
            &v(
                &endpoints,
                Some((0, 100)),
                "[cluster.retry]\nmethods = [\"*\"]\nmax_attempts = 2",
            ),
        ));
        hangup(&child);
        let _ = &mut child;
        let took = in_effect(ports.admin, t, |s| s["reloads"]["applied"] == 8).await;
        eprintln!("retry policy: in effect after {took:?}");
        assert!(
            took.is_some_and(|d| d < Duration::from_secs(1)),
            "retry policy: {took:?}"
        );

        // 10. File swap: back to v1 alone, round robin over a1..a3.
        let t = Instant::now();
        map.swap(
            &render(
                &ports,
                &agents,
                &v(&[(1, 1, "v1"), (2, 1, "v1"), (3, 1, "v1")], None, ""),
            )
            .replace("strategy = \"weighted\"", "strategy = \"round_robin\""),
        );
        let took = in_effect(ports.admin, t, |s| {
            planner(s)["strategy"] == "round_robin" && !addresses(s).contains(&a(4))
        })
        .await;
        assert!(
            took.is_some_and(|d| d < Duration::from_secs(1)),
            "round robin, no canary: {took:?}"
        );
        let back = t;
        tokio::time::sleep(Duration::from_millis(1_500)).await;

        while load_started.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.store(true, Ordering::Relaxed);
        load.await.unwrap();

        let log = log.lock().unwrap().clone();
        let failed: Vec<_> = log.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
        eprintln!(
            "paced calls: {}, failed {}; burst calls failed {}",
            log.len(),
            failed.len(),
            burst_failures.len()
        );
        assert!(
            log.len() >= 5_500,
            "300 calls/s for 20 s: {} calls",
            log.len()
        );
        assert!(
            failed.is_empty(),
            "{} of {} paced calls failed: {:?}",
            failed.len(),
            log.len(),
            &failed[..failed.len().min(5)]
        );
        assert!(
            burst_failures.is_empty(),
            "burst calls failed: {:?}",
            &burst_failures[..burst_failures.len().min(5)]
        );
        let answered_by = |agent: &str, from: Instant| {
            log.iter()
                .filter(|(at, r)| *at >= from && r.as_deref() == Ok(agent))
                .count()
        };
        assert!(
            answered_by("a3", a3_joined) > 0,
            "the added agent took calls"
        );
        assert_eq!(
            answered_by("a0", a0_removed + Duration::from_secs(1)),
            0,
            "the removed agent took calls a second after its removal"
        );
        assert_eq!(
            answered_by("c0", back + Duration::from_secs(1)),
            0,
            "the canary took calls after it was removed"
        );

        let s = stats(ports.admin).await;
        let reloads = &s["reloads"];
        assert_eq!(reloads["by_signal"], 5, "{reloads}");
        assert_eq!(reloads["by_file"], 5, "{reloads}");
        assert_eq!(reloads["applied"], 9, "{reloads}");
        assert_eq!(reloads["invalid"], 1, "{reloads}");
        assert!(
            reloads["last_error"].is_null(),
            "a valid file clears the error: {reloads}"
        );
        let metrics = admin_get(ports.admin, "/metrics").await;
        assert!(
            metrics.contains("agentmesh_config_reloads_total{result=\"invalid\"} 1"),
            "{metrics}"
        );
        let _ = child.kill().await;
    })
    .await;
}

/// The same clusters as in `tests/support`, started in process, so that a
/// diff's effect on endpoint objects and connections can be seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diff_keeps_what_stays_rebuilds_what_changed_and_drains_what_went() {
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start(3).await;
        let mut config =
            agentmesh::config::Config::for_test(vec![support::planner(&agents.addrs[..2])]);
        let mut critic = support::planner(&agents.addrs[2..]);
        critic.name = "critic".into();
        critic.aliases.clear();
        critic.local_port = None;
        config.clusters.push(critic.clone());
        let sidecar = agentmesh::app::Sidecar::start(&config).await.unwrap();
        warmed(&sidecar).await;
        let mut planner = planner_client(Way::LocalPort, &sidecar).await;
        planner.invoke(request(b"x")).await.unwrap();
        let critic_tunnel = AgentClient::new(
            client::via_connect(sidecar.proxy_addr(), "critic:1")
                .await
                .unwrap(),
        );
        critic_tunnel.clone().invoke(request(b"x")).await.unwrap();
        let first = sidecar.router().find("planner").unwrap();
        let kept = first.endpoint(&agents.addrs[0].to_string()).unwrap();

        // Endpoints only: the cluster and the endpoint that stays are kept,
        // connection and all.
        let mut next = config.clone();
        next.clusters[0].endpoints.truncate(1);
        next.clusters[0].endpoints[0].weight = std::num::NonZeroU32::new(4).unwrap();
        let changes = sidecar.reloader().apply(next.clone()).await;
        assert_eq!(changes.endpoints.len(), 1, "{changes:?}");
        assert!(
            changes.rebuilt.is_empty() && changes.added.is_empty(),
            "{changes:?}"
        );
        let same = sidecar.router().find("planner").unwrap();
        assert!(Arc::ptr_eq(&first, &same), "the cluster stays");
        let still = same.endpoint(&agents.addrs[0].to_string()).unwrap();
        assert!(
            Arc::ptr_eq(&kept, &still),
            "the endpoint that stays is the same"
        );
        assert_eq!(still.weight().get(), 4);
        assert_eq!(agents.connections(0), 1, "its connection stays");

        // A new strategy: a new build; the local port follows it.
        next.clusters[0].strategy = agentmesh::config::Strategy::LeastConnections;
        let changes = sidecar.reloader().apply(next.clone()).await;
        assert_eq!(
            changes.rebuilt,
            vec!["planner.agents".to_string()],
            "{changes:?}"
        );
        let rebuilt = sidecar.router().find("planner").unwrap();
        assert!(!Arc::ptr_eq(&first, &rebuilt));
        assert_eq!(
            rebuilt.strategy(),
            agentmesh::config::Strategy::LeastConnections
        );
        for _ in 0..5 {
            planner.invoke(request(b"x")).await.unwrap();
        }
        assert_eq!(first.in_flight(), 0);
        // The old build shuts its endpoints once its calls are done.
        assert!(
            eventually(Duration::from_secs(3), || first.endpoints().is_empty()).await,
            "the old build is closed"
        );

        // The critic cluster is removed: its tunnel answers UNAVAILABLE,
        // saying why; it comes back with the next reload.
        let mut without = next.clone();
        without.clusters.truncate(1);
        without.listener.idle_timeout = Duration::from_secs(99);
        let changes = sidecar.reloader().apply(without).await;
        assert_eq!(changes.removed, vec!["critic".to_string()]);
        assert_eq!(
            changes.need_restart,
            vec!["listener".to_string()],
            "listener settings wait for a restart"
        );
        let err = critic_tunnel
            .clone()
            .invoke(request(b"x"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(
            err.message()
                .contains("cluster \"critic\" was removed by a config reload"),
            "{}",
            err.message()
        );
        let changes = sidecar.reloader().apply(next).await;
        assert_eq!(changes.added, vec!["critic".to_string()]);
        critic_tunnel
            .clone()
            .invoke(request(b"x"))
            .await
            .expect("the tunnel reaches the cluster again");
        sidecar.shutdown().await;
    })
    .await;
}

/// `GET path` on the admin port: the status code and the body.
async fn admin_status(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    let code = raw[9..12].parse().unwrap();
    (code, raw.split_once("\r\n\r\n").unwrap().1.to_string())
}

async fn health(addr: SocketAddr) -> (u16, serde_json::Value) {
    let (code, body) = admin_status(addr, "/health").await;
    (code, serde_json::from_str(&body).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_healthy_degraded_or_unhealthy_and_says_why() {
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start(3).await;
        let healthy = support::planner(&agents.addrs);
        let mut down = support::planner(&[dead_address(), dead_address()]);
        down.name = "critic".into();
        down.aliases.clear();
        down.local_port = None;
        let mut config = agentmesh::config::Config::for_test(vec![healthy.clone(), down]);
        let sidecar = agentmesh::app::Sidecar::start(&config).await.unwrap();
        warmed(&sidecar).await;
        let admin = sidecar.admin_addr();

        let (code, body) = health(admin).await;
        assert_eq!(code, 503, "{body}");
        assert_eq!(body["status"], "unhealthy");
        let reasons = body["reasons"].to_string();
        assert!(
            reasons.contains("cluster \\\"critic\\\" has no ready endpoint (of 2: 127.0.0.3:"),
            "{reasons}"
        );
        assert_eq!(
            admin_status(admin, "/ready").await.0,
            200,
            "/ready stays the readiness probe"
        );

        // One of three planner endpoints reachable: below the panic
        // threshold of half, so calls go to all three: degraded.
        config.clusters.truncate(1);
        config.clusters[0].endpoints[1].address = dead_address().to_string();
        config.clusters[0].endpoints[2].address = dead_address().to_string();
        sidecar.reloader().apply(config.clone()).await;
        let degraded = async {
            loop {
                let (code, body) = health(admin).await;
                if body["status"] == "degraded" {
                    return (code, body);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let (code, body) = tokio::time::timeout(Duration::from_secs(5), degraded)
            .await
            .expect("degraded");
        assert_eq!(code, 200, "degraded still serves");
        assert!(body["reasons"].to_string().contains("panic mode"), "{body}");

        config.clusters[0] = healthy;
        sidecar.reloader().apply(config).await;
        let healthy = async {
            loop {
                let (code, body) = health(admin).await;
                if code == 200 && body["status"] == "healthy" {
                    return body;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let body = tokio::time::timeout(Duration::from_secs(5), healthy)
            .await
            .expect("healthy again");
        assert_eq!(body["reasons"], serde_json::json!([]));
        sidecar.shutdown().await;
    })
    .await;
}
