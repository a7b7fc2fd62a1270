//! The admin gRPC API and `agentmesh ctl`, against a real sidecar over real
//! agents: every call, by the `ctl` binary as a user runs it; the
//! loopback-or-token rule for writes, from a non-loopback address in a
//! network namespace the test creates (needs root, as CI runs); and two
//! drills under paced load: a failover of one agent of three, and a canary
//! walked 10 -> 25 -> 50 -> 100.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentmesh::app::Sidecar;
use agentmesh::config::Config;
use agentmesh::pb::agent_client::AgentClient;
use agentmesh::tools::agent::AgentOptions;
use agentmesh::tools::client;
use serde_json::Value;
use support::*;

/// A sidecar started from a config file (so that `ctl reload` has one to
/// read) over `agents`, each `(agent index, version)`, with `extra` TOML in
/// the cluster; the file's directory is removed when dropped.
struct Running {
    sidecar: Sidecar,
    admin: SocketAddr,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn running(agents: &Agents, versions: &[&str], extra: &str) -> Running {
    let dir = std::env::temp_dir().join(format!(
        "agentmesh-admin-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let endpoints: Vec<String> = agents
        .addrs
        .iter()
        .zip(versions)
        .map(|(a, v)| format!("{{ address = \"{a}\", version = \"{v}\" }}"))
        .collect();
    let text = format!(
        r#"[listener]
proxy = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[[cluster]]
name = "planner"
local_port = "127.0.0.1:0"
endpoints = [{}]
{extra}
"#,
        endpoints.join(", ")
    );
    let path = dir.join("agentmesh.toml");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).expect("the test's config is valid");
    let mut sidecar = Sidecar::start(&config).await.expect("sidecar starts");
    sidecar.reload_from(path, false).await;
    warmed(&sidecar).await;
    let admin = sidecar.admin_addr();
    Running {
        sidecar,
        admin,
        _dir: TempDir(dir),
    }
}

impl Running {
    async fn client(&self) -> AgentClient<tonic::transport::Channel> {
        let local = self.sidecar.local_addr("planner").unwrap();
        AgentClient::new(client::direct(local).await.unwrap())
    }
}

/// `agentmesh ctl --admin ADDR ARGS..`: whether it succeeded, stdout and
/// stderr.
async fn ctl(admin: SocketAddr, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentmesh"))
        .arg("ctl")
        .arg("--admin")
        .arg(admin.to_string())
        .args(args)
        .env_remove("AGENTMESH_ADMIN_TOKEN")
        .kill_on_drop(true)
        .output()
        .await
        .expect("ctl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `ctl ... -o json`, which must succeed: its output.
async fn ctl_json(admin: SocketAddr, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let (ok, out, err) = ctl(admin, &all).await;
    assert!(ok, "ctl {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ctl {args:?}: {e}: {out}"))
}

/// `ctl ...`, which must fail: its message.
async fn ctl_fails(admin: SocketAddr, args: &[&str]) -> String {
    let (ok, out, err) = ctl(admin, args).await;
    assert!(!ok, "ctl {args:?} succeeded: {out}");
    err
}

fn endpoint<'a>(list: &'a Value, address: &str) -> &'a Value {
    list["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == address)
        .unwrap_or_else(|| panic!("no {address} in {list}"))
}

/// `n` calls, one after another: calls by agent, and failures.
async fn calls(
    client: &AgentClient<tonic::transport::Channel>,
    n: usize,
) -> (std::collections::BTreeMap<String, usize>, Vec<String>) {
    let mut seen = std::collections::BTreeMap::new();
    let mut failed = Vec::new();
    for _ in 0..n {
        match client.clone().invoke(request(b"x")).await {
            Ok(r) => *seen.entry(r.into_inner().agent).or_insert(0) += 1,
            Err(s) => failed.push(format!("{:?}: {}", s.code(), s.message())),
        }
    }
    (seen, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_call_works_through_ctl_against_a_real_sidecar() {
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start(3).await;
        let s = running(&agents, &["v1", "v1", "v2"], "strategy = \"weighted\"").await;
        let client = s.client().await;
        let a = |i: usize| agents.addrs[i].to_string();
        // Calls to `agent` of `seen`, within 2 of `want` (a rebuild of the
        // picker can start its rotation over once).
        let near = |seen: &std::collections::BTreeMap<String, usize>, agent: &str, want: usize| {
            let got = seen.get(agent).copied().unwrap_or(0);
            assert!(
                got.abs_diff(want) <= 2,
                "{agent}: {got}, not {want}: {seen:?}"
            );
        };

        // Reads.
        let clusters = ctl_json(s.admin, &["clusters"]).await;
        let planner = &clusters["clusters"][0];
        assert_eq!(planner["name"], "planner");
        assert_eq!(planner["ready"], 3);
        assert_eq!(planner["versions"], serde_json::json!(["v1", "v2"]));
        let (ok, table, _) = ctl(s.admin, &["endpoints", "planner"]).await;
        assert!(ok);
        eprintln!("ctl endpoints planner:\n{table}");
        for i in 0..3 {
            assert!(table.contains(&a(i)), "{table}");
        }

        // Drain: no call, until restored.
        let drained = ctl_json(s.admin, &["drain", "planner", &a(0)]).await;
        assert_eq!(drained["state"], "drained");
        assert_eq!(drained["hold"]["kind"], "drain");
        assert!(
            drained["hold"]["by"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:")
        );
        let (seen, failed) = calls(&client, 60).await;
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(seen.get("agent-0"), None, "{seen:?}");
        // /stats says so too, on the same port.
        let stats = admin_get(s.admin, "/stats?format=json").await;
        assert!(stats.contains("\"drained\""), "{stats}");
        let restored = ctl_json(s.admin, &["restore", "planner", &a(0)]).await;
        assert_eq!(restored["state"], "ready");
        let (seen, _) = calls(&client, 60).await;
        near(&seen, "agent-0", 20);

        // Eject for a time: out, then back by itself.
        let ejected = ctl_json(s.admin, &["eject", "planner", &a(1), "--for", "1s"]).await;
        assert_eq!(ejected["state"], "ejected by admin");
        let left = ejected["hold"]["remaining_ms"].as_u64().unwrap();
        assert!((900..=1000).contains(&left), "{ejected}");
        let (seen, _) = calls(&client, 30).await;
        assert_eq!(seen.get("agent-1"), None, "{seen:?}");
        let back = eventually(Duration::from_secs(3), || {
            s.sidecar
                .router()
                .find("planner")
                .unwrap()
                .snapshot()
                .ready()
                .len()
                == 3
        })
        .await;
        assert!(back, "the eject ended by itself");
        let (seen, _) = calls(&client, 30).await;
        near(&seen, "agent-1", 10);

        // Weight: the weighted strategy honours it.
        let weighted = ctl_json(s.admin, &["weight", "planner", &a(2), "3"]).await;
        assert_eq!(weighted["weight"], 3);
        assert_eq!(weighted["weight_set_by_api"], true);
        let (seen, _) = calls(&client, 50).await;
        near(&seen, "agent-2", 30);

        // Split: every call to v2.
        let split = ctl_json(s.admin, &["split", "planner", "v1=0", "v2=100"]).await;
        assert_eq!(split["split"], serde_json::json!({"v1": 0, "v2": 100}));
        assert_eq!(split["split_set_by_api"], true);
        let (seen, _) = calls(&client, 20).await;
        assert_eq!(seen.get("agent-2"), Some(&20), "{seen:?}");

        // Watch, through `ctl top`: two refreshes, the second with rates.
        let (ok, out, err) = ctl(
            s.admin,
            &[
                "top",
                "--interval",
                "200ms",
                "--iterations",
                "2",
                "-o",
                "json",
            ],
        )
        .await;
        assert!(ok, "{err}");
        let frames: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(frames.len(), 2, "{out}");
        assert_eq!(frames[1]["endpoints"].as_array().unwrap().len(), 3);

        // Reload undoes every change made through the API.
        let (ok, out, err) = ctl(s.admin, &["reload"]).await;
        assert!(ok, "{err}");
        // (The weight and the split: the drain and the eject had ended.)
        assert!(
            out.contains("config reload: unchanged (undid 2 change(s) made through the admin API)"),
            "{out}"
        );
        let after = ctl_json(s.admin, &["endpoints", "planner"]).await;
        assert_eq!(endpoint(&after, &a(2))["weight"], 1, "{after}");
        assert_eq!(endpoint(&after, &a(2))["weight_set_by_api"], false);
        let clusters = ctl_json(s.admin, &["clusters"]).await;
        assert_eq!(clusters["clusters"][0]["split"], serde_json::json!({}));

        // Errors say what failed, and exit non-zero.
        let e = ctl_fails(s.admin, &["drain", "nowhere", &a(0)]).await;
        assert!(
            e.contains("no cluster \"nowhere\"") && e.contains("planner"),
            "{e}"
        );
        let e = ctl_fails(s.admin, &["drain", "planner", "10.9.9.9:1"]).await;
        assert!(e.contains("has no endpoint") && e.contains(&a(1)), "{e}");
        let e = ctl_fails(s.admin, &["weight", "planner", &a(0), "0"]).await;
        assert!(
            e.contains("out of range") && e.contains("InvalidArgument"),
            "{e}"
        );
        let e = ctl_fails(
            s.admin,
            &["canary", "planner", "--version", "v3", "--percent", "5"],
        )
        .await;
        assert!(e.contains("no endpoint of version \"v3\""), "{e}");
        let e = ctl_fails(s.admin, &["split", "planner", "v9=10"]).await;
        assert!(e.contains("no endpoint of version \"v9\""), "{e}");
        let e = ctl_fails(s.admin, &["eject", "planner", &a(0), "--for", "400days"]).await;
        assert!(e.contains("longer than the most"), "{e}");
        let e = ctl_fails(dead_address(), &["clusters"]).await;
        assert!(e.contains("cannot reach the admin API"), "{e}");

        // grpc.health.v1 and server reflection on the same port.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", s.admin))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "agentmesh.admin.v1.Admin".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        let services = reflected_services(channel).await;
        eprintln!("services by reflection: {services:?}");
        assert!(
            services.contains(&"agentmesh.admin.v1.Admin".to_string()),
            "{services:?}"
        );
        // The HTTP paths still answer on HTTP/1.1.
        assert!(admin_get(s.admin, "/live").await.contains("live"));
    })
    .await;
}

/// `ctl explain`: a least-connections pick shows its candidates and their
/// costs (calls in flight: one agent holds 8 slow calls), and picks the
/// cheapest; a session key is placed without being pinned, and once a
/// call has pinned it, explain names the pin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_the_candidates_their_costs_and_the_session_pin() {
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start(3).await;
        let s = running(
            &agents,
            &["v1", "v1", "v1"],
            "strategy = \"least_connections\"\n[cluster.session_affinity]\nheader = \"x-session-id\"",
        )
        .await;
        let client = s.client().await;
        let a = |i: usize| agents.addrs[i].to_string();
        // Eight slow calls, all to agent-0 (a session pins them there).
        let first = ctl_json(s.admin, &["explain", "planner", "-H", "x-session-id=slow"]).await;
        assert_eq!(first["affinity"], "new pin");
        let slow_to = first["chosen"].as_str().unwrap().to_string();
        let again = ctl_json(s.admin, &["explain", "planner", "-H", "x-session-id=slow"]).await;
        assert_eq!(again["affinity"], "new pin", "explain pinned nothing: {again}");
        // A key is taken as the data path takes it: bytes above ASCII
        // (UTF-8) are a value, a control character is not.
        let utf8 = ctl_json(s.admin, &["explain", "planner", "-H", "x-session-id=café"]).await;
        assert_eq!(utf8["affinity"], "new pin", "{utf8}");
        let control = ctl_fails(s.admin, &["explain", "planner", "-H", "x-session-id=a\u{7f}b"]).await;
        assert!(control.contains("is not a header value"), "{control}");
        let slow: Vec<_> = (0..8)
            .map(|_| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    let mut r = tonic::Request::new(agentmesh::pb::InvokeRequest {
                        delay_ms: 1_500,
                        ..request(b"slow")
                    });
                    r.metadata_mut().insert("x-session-id", "slow".parse().unwrap());
                    client.invoke(r).await.map(|r| r.into_inner().agent)
                })
            })
            .collect();
        let busy = eventually(Duration::from_secs(2), || {
            s.sidecar.router().find("planner").unwrap().in_flight() == 8
        })
        .await;
        assert!(busy, "eight calls in flight");
        let pinned = ctl_json(s.admin, &["explain", "planner", "-H", "x-session-id=slow"]).await;
        assert_eq!(pinned["affinity"], "pinned", "{pinned}");
        assert_eq!(pinned["chosen"], slow_to.as_str());
        // The pin is counted on its endpoint.
        let listed = ctl_json(s.admin, &["endpoints", "planner"]).await;
        assert_eq!(endpoint(&listed, &slow_to)["sessions"], 1, "{listed}");
        let pins: u64 = (0..3).map(|i| endpoint(&listed, &a(i))["sessions"].as_u64().unwrap()).sum();
        assert_eq!(pins, 1);
        // Without a key: every candidate's cost, and the busy one loses.
        let x = ctl_json(s.admin, &["explain", "planner", "--method", "/agentmesh.demo.v1.Agent/Invoke"]).await;
        eprintln!("explain: {x}");
        let candidates = x["candidates"].as_array().unwrap();
        assert_eq!(candidates.len(), 3, "{x}");
        let cost = |addr: &str| {
            candidates.iter().find(|c| c["address"] == addr).unwrap()["cost"]
                .as_f64()
                .unwrap()
        };
        assert!(cost(&slow_to) >= 8.0, "{x}");
        assert_ne!(x["chosen"], slow_to.as_str());
        let chosen = x["chosen"].as_str().unwrap();
        assert!((0..3).any(|i| a(i) == chosen));
        assert!(cost(chosen) < 1.0, "{x}");
        let (ok, table, _) = ctl(s.admin, &["explain", "planner"]).await;
        assert!(ok && table.contains("<- chosen"), "{table}");
        eprintln!("ctl explain planner:\n{table}");
        for call in slow {
            call.await.unwrap().unwrap();
        }
    })
    .await;
}

/// The services server reflection lists.
async fn reflected_services(channel: tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    match answer.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("not a list of services: {other:?}"),
    }
}

/// 300 calls a second over three agents that take 20 ms a call; `ctl
/// failover` on one for 5 s. It takes no call that starts 200 ms after the
/// command, no call fails (its calls in flight finish), and it takes calls
/// again when the drill is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_drill_under_load_moves_calls_in_200ms_and_loses_none() {
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start_with(
            (0..3)
                .map(|i| AgentOptions {
                    delay: Duration::from_millis(20),
                    ..AgentOptions::named(&format!("agent-{i}"))
                })
                .collect(),
        )
        .await;
        let s = running(&agents, &["v1", "v1", "v1"], "").await;
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let load = paced_load(s.client().await, 300, 4_000, stop.clone(), log.clone());
        tokio::time::sleep(Duration::from_secs(1)).await;

        let target = agents.addrs[1].to_string();
        let asked = Instant::now();
        let answer = ctl_json(s.admin, &["failover", "planner", &target, "--for", "5s"]).await;
        let answered = asked.elapsed();
        assert_eq!(answer["state"], "failover");
        tokio::time::sleep(Duration::from_secs(7)).await;
        stop.store(true, Ordering::Relaxed);
        load.await.unwrap();

        let log = log.lock().unwrap();
        let failed: Vec<_> = log.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
        let to_target = |from: Duration, to: Duration| {
            log.iter()
                .filter(|(t, r)| {
                    *t >= asked + from && *t < asked + to && r.as_deref() == Ok("agent-1")
                })
                .count()
        };
        let last_before = log
            .iter()
            .filter(|(t, r)| *t >= asked && r.as_deref() == Ok("agent-1"))
            .map(|(t, _)| t.duration_since(asked))
            .filter(|d| *d < Duration::from_secs(4))
            .max();
        let during = to_target(Duration::from_millis(200), Duration::from_millis(4_900));
        let after = to_target(Duration::from_millis(5_500), Duration::from_secs(7));
        eprintln!(
            "failover: {} calls, {} failed; ctl answered in {answered:?}; the last call to the target started {last_before:?} after the command; {during} calls to it from 200 ms to 4.9 s, {after} after the drill",
            log.len(),
            failed.len()
        );
        assert!(failed.is_empty(), "{failed:?}");
        assert!(log.len() >= 2_000, "{} calls", log.len());
        assert_eq!(during, 0);
        assert!(after >= 100, "{after} calls after the drill");
    })
    .await;
}

/// `ctl canary` 10 -> 25 -> 50 -> 100 under 300 calls a second: each
/// step's share of calls to the canary (over the 3 s after the command)
/// within 3 points, and no failed call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_walk_holds_each_step_within_3_points_and_loses_nothing() {
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start(3).await;
        // agent-2 is the canary.
        let s = running(&agents, &["v1", "v1", "v2"], "").await;
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let load = paced_load(s.client().await, 300, 6_000, stop.clone(), log.clone());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut steps = Vec::new();
        for percent in ["10", "25", "50", "100"] {
            let (ok, out, err) = ctl(
                s.admin,
                &["canary", "planner", "--version", "v2", "--percent", percent],
            )
            .await;
            assert!(ok, "{err}");
            eprintln!("{}", out.trim());
            steps.push((percent.parse::<f64>().unwrap(), Instant::now()));
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        stop.store(true, Ordering::Relaxed);
        load.await.unwrap();
        let log = log.lock().unwrap();
        let failed: Vec<_> = log.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
        assert!(failed.is_empty(), "{failed:?}");
        for (percent, at) in steps {
            let window: Vec<_> = log
                .iter()
                .filter(|(t, _)| *t >= at && *t < at + Duration::from_secs(3))
                .collect();
            let canary = window
                .iter()
                .filter(|(_, r)| r.as_deref() == Ok("agent-2"))
                .count();
            let share = 100.0 * canary as f64 / window.len() as f64;
            eprintln!(
                "canary at {percent}%: {canary} of {} calls, {share:.1}%",
                window.len()
            );
            assert!(window.len() >= 600, "{} calls", window.len());
            assert!((share - percent).abs() <= 3.0, "{percent}%: {share:.1}%");
        }
    })
    .await;
}

/// A network namespace whose loopback also holds 10.201.0.1, an address
/// that is not a loopback one; deleted when dropped.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        let name = format!("am-admin-{}", std::process::id());
        let ip = |args: &[&str]| {
            let ok = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap()
                .success();
            assert!(ok, "ip {args:?}");
        };
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ip(&["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"]);
        ip(&[
            "netns",
            "exec",
            &ns.name,
            "ip",
            "addr",
            "add",
            "10.201.0.1/32",
            "dev",
            "lo",
        ]);
        ns
    }

    fn command(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.name, env!("CARGO_BIN_EXE_agentmesh")]);
        c.kill_on_drop(true);
        c
    }

    /// `ctl --admin ADDR ARGS..` inside the namespace.
    async fn ctl(&self, admin: &str, args: &[&str]) -> (bool, String, String) {
        let out = self
            .command()
            .args(["ctl", "--admin", admin])
            .args(args)
            .env_remove("AGENTMESH_ADMIN_TOKEN")
            .output()
            .await
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The sidecar listens on every address of a namespace, with a token from
/// the environment. From 10.201.0.1 a write without the token, or with a
/// wrong one, is refused with PERMISSION_DENIED, and the log names the
/// address; with the token it is taken; reads need none. From 127.0.0.1 a
/// write needs no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_from_another_address_need_the_token() {
    bounded(Duration::from_secs(60), async {
        let ns = Netns::new();
        let dir = TempDir(
            std::env::temp_dir().join(format!("agentmesh-admin-ns-{}", std::process::id())),
        );
        std::fs::create_dir_all(&dir.0).unwrap();
        let config = dir.0.join("agentmesh.toml");
        // Endpoints need not answer: holds apply to any endpoint.
        std::fs::write(
            &config,
            r#"[listener]
proxy = "127.0.0.1:15001"
[admin]
listen = "0.0.0.0:15000"
token = "${AGENTMESH_ADMIN_TOKEN}"
[[cluster]]
name = "planner"
endpoints = [{ address = "127.0.0.1:1" }, { address = "127.0.0.1:2" }]
"#,
        )
        .unwrap();
        let token = "s3cret-token-of-32-characters-xx";
        let log = dir.0.join("sidecar.log");
        let mut sidecar = ns
            .command()
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("AGENTMESH_ADMIN_TOKEN", token)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut up = false;
        for _ in 0..100 {
            if ns.ctl("127.0.0.1:15000", &["clusters"]).await.0 {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(up, "the sidecar serves");

        let other = "10.201.0.1:15000";
        let (ok, out, _) = ns.ctl(other, &["endpoints", "planner"]).await;
        assert!(
            ok && out.contains("127.0.0.1:1"),
            "a read needs no token: {out}"
        );
        let (ok, _, err) = ns.ctl(other, &["drain", "planner", "127.0.0.1:1"]).await;
        eprintln!("without the token: {}", err.trim());
        assert!(!ok && err.contains("PermissionDenied"), "{err}");
        assert!(err.contains("without the admin token"), "{err}");
        let (ok, _, err) = ns
            .ctl(
                other,
                &[
                    "--token",
                    "not-the-token-but-long-enough",
                    "drain",
                    "planner",
                    "127.0.0.1:1",
                ],
            )
            .await;
        assert!(
            !ok && err.contains("PermissionDenied") && err.contains("not the admin token"),
            "{err}"
        );
        let (ok, out, err) = ns
            .ctl(
                other,
                &[
                    "--token",
                    token,
                    "-o",
                    "json",
                    "drain",
                    "planner",
                    "127.0.0.1:1",
                ],
            )
            .await;
        assert!(ok, "{err}");
        let drained: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(drained["state"], "drained");
        assert!(
            drained["hold"]["by"]
                .as_str()
                .unwrap()
                .starts_with("10.201.0.1:"),
            "{drained}"
        );
        let (ok, _, err) = ns
            .ctl("127.0.0.1:15000", &["restore", "planner", "127.0.0.1:1"])
            .await;
        assert!(ok, "from loopback no token is needed: {err}");

        sidecar.kill().await.unwrap();
        let log = std::fs::read_to_string(&log).unwrap();
        let refused = log.lines().filter(|l| l.contains("write refused")).count();
        assert_eq!(refused, 2, "{log}");
        assert!(log.contains("by=\"10.201.0.1:"), "{log}");
        assert!(!log.contains(token), "the token is never logged");
    })
    .await;
}

/// The dashboard in headless Chromium (tests/node/dashboard.mjs, with
/// playwright-core): while 200 calls a second run, the page shows every
/// endpoint with the state, calls and a third of the calls each that
/// `/stats?format=json` has; its "drain" button drains an endpoint, which
/// the page and `/stats` then show, and which takes no more calls. The
/// screenshot is saved under the test's temporary directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_figures_and_drains_from_its_button() {
    bounded(Duration::from_secs(90), async {
        let agents = Agents::start(3).await;
        let s = running(&agents, &["v1", "v1", "v1"], "").await;
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let load = paced_load(s.client().await, 200, 8_000, stop.clone(), log.clone());
        let target = agents.addrs[2].to_string();
        let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node/dashboard.mjs");
        let out = tokio::process::Command::new("node")
            .arg(&script)
            .arg(s.admin.to_string())
            .arg(&target)
            .arg(&screenshot)
            .kill_on_drop(true)
            .output()
            .await
            .expect("node runs (scripts/test installs playwright-core and chromium)");
        let stats: Value =
            serde_json::from_str(&admin_get(s.admin, "/stats?format=json").await).unwrap();
        stop.store(true, Ordering::Relaxed);
        load.await.unwrap();
        assert!(
            out.status.success(),
            "dashboard.mjs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let page: Value = serde_json::from_slice(&out.stdout).unwrap();
        eprintln!("the page before the drain: {}", page["before"]);
        eprintln!("the page after: {}", page["after"]);
        eprintln!("screenshot: {}", screenshot.display());
        assert_eq!(page["errors"], serde_json::json!([]), "{page}");
        let listed = &stats["clusters"][0]["endpoints"];
        let by_address = |rows: &Value, a: &str| -> Value {
            rows.as_array()
                .unwrap()
                .iter()
                .find(|r| r["address"] == a)
                .cloned()
                .unwrap_or_else(|| panic!("no {a} in {rows}"))
        };
        for i in 0..3 {
            let a = agents.addrs[i].to_string();
            let before = by_address(&page["before"], &a);
            let now = by_address(listed, &a);
            assert_eq!(before["cluster"], "planner");
            assert_eq!(before["state"], "ready");
            // The page read its figures before /stats was asked.
            let (shown, counted) = (
                before["calls"].as_u64().unwrap(),
                now["calls"].as_u64().unwrap(),
            );
            assert!(
                shown > 0 && shown <= counted,
                "{a}: the page {shown}, /stats {counted}"
            );
            let rate = before["rate"].as_f64().unwrap();
            assert!(
                (40.0..=100.0).contains(&rate),
                "{a}: {rate} calls/s of 200 over three"
            );
            let after = by_address(&page["after"], &a);
            if a == target {
                assert_eq!(after["state"], "drained");
                assert_eq!(after["rate"].as_f64().unwrap(), 0.0);
                assert_eq!(now["state"], "drained");
                assert_eq!(now["hold"]["kind"], "drain");
            } else {
                assert_eq!(after["state"], "ready");
                assert!(after["rate"].as_f64().unwrap() > 60.0, "{after}");
            }
        }
        assert!(
            page["status"].as_str().unwrap().contains("drained"),
            "{page}"
        );
        assert!(std::fs::metadata(&screenshot).unwrap().len() > 10_000);
        let failed: Vec<_> = log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, r)| r.as_ref().err().cloned())
            .collect();
        assert!(failed.is_empty(), "{failed:?}");
    })
    .await;
}

/// `ctl top` in a real terminal (tmux): the pane shows every endpoint with
/// its calls per second under 150 calls a second, and the figures change
/// from one refresh to the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_top_refreshes_a_table_in_a_real_terminal() {
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start(3).await;
        let s = running(&agents, &["v1", "v1", "v1"], "").await;
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let load = paced_load(s.client().await, 150, 3_000, stop.clone(), log.clone());
        let session = format!("am-top-{}", std::process::id());
        let command = format!(
            "{} ctl --admin {} top --interval 300ms",
            env!("CARGO_BIN_EXE_agentmesh"),
            s.admin
        );
        let tmux = |args: &[&str]| {
            let out = std::process::Command::new("tmux")
                .args(args)
                .output()
                .expect("tmux runs");
            assert!(
                out.status.success(),
                "tmux {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        tmux(&[
            "new-session",
            "-d",
            "-s",
            &session,
            "-x",
            "160",
            "-y",
            "20",
            &command,
        ]);
        struct Kill(String);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = std::process::Command::new("tmux")
                    .args(["kill-session", "-t", &self.0])
                    .status();
            }
        }
        let _kill = Kill(session.clone());
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let first = tmux(&["capture-pane", "-p", "-t", &session]);
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        let second = tmux(&["capture-pane", "-p", "-t", &session]);
        stop.store(true, Ordering::Relaxed);
        load.await.unwrap();
        eprintln!("ctl top, captured:\n{first}\n... and a second later:\n{second}");
        for pane in [&first, &second] {
            assert!(pane.contains("CALLS/S") && pane.contains("SHARE"), "{pane}");
            for a in &agents.addrs {
                let row = pane
                    .lines()
                    .find(|l| l.contains(&a.to_string()))
                    .unwrap_or_else(|| panic!("no row for {a}: {pane}"));
                // planner  ADDR  ready  RATE  SHARE ...: 50 calls/s each.
                let rate: f64 = row.split_whitespace().nth(3).unwrap().parse().unwrap();
                assert!((25.0..=80.0).contains(&rate), "{row}");
            }
        }
        assert_ne!(first, second, "the figures change");
    })
    .await;
}

/// The admin port takes HTTP/2 now, and a connection that sends the
/// HTTP/2 preface and SETTINGS and then nothing is closed at the header
/// timeout (1 s here), as is one that sends nothing at all: silent
/// connections cannot hold the port's 64 slots, its liveness probe's among
/// them. One that asked something stays while its Watch runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_admin_connections_are_closed_and_a_watch_is_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(1).await;
        let mut config = Config::for_test(vec![planner(&agents.addrs)]);
        config.listener.header_timeout = Duration::from_secs(1);
        config.listener.idle_timeout = Duration::from_secs(2);
        let sidecar = Sidecar::start(&config).await.unwrap();
        let admin = sidecar.admin_addr();
        // Closed: the peer's read ends (0 bytes or a reset) within the bound.
        async fn closed_within(
            tcp: &mut tokio::net::TcpStream,
            limit: Duration,
        ) -> Option<Duration> {
            let t = Instant::now();
            let mut buf = [0u8; 4096];
            loop {
                match tokio::time::timeout(limit, tcp.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return Some(t.elapsed()),
                    Ok(Ok(_)) => continue,
                    Err(_) => return None,
                }
            }
        }
        let mut silent = tokio::net::TcpStream::connect(admin).await.unwrap();
        let mut preface = tokio::net::TcpStream::connect(admin).await.unwrap();
        preface
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .unwrap();
        let watch = ctl(
            admin,
            &[
                "top",
                "--interval",
                "500ms",
                "--iterations",
                "8",
                "-o",
                "json",
            ],
        );
        let (a, b, watched) = tokio::join!(
            closed_within(&mut silent, Duration::from_secs(3)),
            closed_within(&mut preface, Duration::from_secs(3)),
            watch
        );
        eprintln!("silent connection closed after {a:?}, preface-only after {b:?}");
        assert!(a.is_some_and(|d| d >= Duration::from_millis(900)), "{a:?}");
        assert!(b.is_some_and(|d| d >= Duration::from_millis(900)), "{b:?}");
        // The watch lasted 3.5 s, past both timeouts, and was not cut.
        let (ok, out, err) = watched;
        assert!(ok, "{err}");
        assert_eq!(out.lines().count(), 8, "{out}");
    })
    .await;
}
