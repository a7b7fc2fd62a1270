//! Resilience end to end, with real agents on loopback (some of them child
//! processes, so that they can be killed, stopped and restarted): killed
//! and draining endpoints under load, breakers, health checks, retries under
//! a budget, limits and rate limits.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use agentmesh::cluster::limit::RateLimitConfig;
use agentmesh::config::{ClusterConfig, HealthCheckConfig, OutlierConfig, RetryConfig};
use agentmesh::pb::InvokeRequest;
use agentmesh::pb::agent_client::AgentClient;
use agentmesh::tools::agent::AgentOptions;
use support::*;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

const INVOKE: &str = "/agentmesh.demo.v1.Agent/Invoke";

/// A demo agent in a process of its own, listening on `port`.
async fn agent_process(port: SocketAddr, name: &str, delay_ms: u32) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_agentmesh"))
        .args(["agent", "--listen", &port.to_string(), "--name", name])
        .args(["--delay-ms", &delay_ms.to_string()])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("the agentmesh binary starts");
    let up = eventually(Duration::from_secs(10), || {
        std::net::TcpStream::connect(port).is_ok()
    })
    .await;
    assert!(up, "agent {name} did not start on {port}");
    child
}

/// Three agent processes, `agent-0` to `agent-2`, each taking `delay_ms`.
async fn three_agent_processes(delay_ms: u32) -> (Vec<SocketAddr>, Vec<Child>) {
    let ports: Vec<SocketAddr> = (0..3).map(|_| closed_port()).collect();
    let mut children = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        children.push(agent_process(*port, &format!("agent-{i}"), delay_ms).await);
    }
    (ports, children)
}

/// Runs [`open_loop`] and sends `victim` the signal `sig` when `after` has
/// passed; returns the calls' fates and when the signal went.
async fn load_and_signal(
    client: AgentClient<Channel>,
    run: Duration,
    mut victim: Child,
    sig: &'static str,
    after: Duration,
) -> (Vec<Shot>, Instant) {
    let sent = Arc::new(std::sync::Mutex::new(None));
    let at = sent.clone();
    let shots = open_loop(client, 300, run, |start| async move {
        tokio::time::sleep_until(start + after).await;
        *at.lock().unwrap() = Some(Instant::now());
        signal(&victim, sig);
        victim.wait().await.unwrap();
    })
    .await;
    let sent = sent.lock().unwrap().expect("the signal was sent");
    (shots, sent)
}

fn signal(child: &Child, signal: &str) {
    let pid = child.id().expect("the child runs").to_string();
    let status = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal} {pid}");
}

/// One call's fate in a load run.
#[derive(Debug)]
struct Shot {
    started: Instant,
    result: Result<String, (Code, String)>,
}

/// Sends `rate` unary calls a second for `duration`, each on its own
/// schedule (open loop), with a deadline of 2 s; returns every call's fate.
/// `during` runs alongside, with the run's start time.
async fn open_loop<F: Future<Output = ()>>(
    client: AgentClient<Channel>,
    rate: u32,
    duration: Duration,
    during: impl FnOnce(Instant) -> F,
) -> Vec<Shot> {
    let start = Instant::now();
    let total = (f64::from(rate) * duration.as_secs_f64()) as u32;
    let period = Duration::from_secs(1) / rate;
    let sender = async {
        let mut calls = Vec::with_capacity(total as usize);
        for i in 0..total {
            tokio::time::sleep_until(start + period * i).await;
            let mut client = client.clone();
            calls.push(tokio::spawn(async move {
                let started = Instant::now();
                let mut request = tonic::Request::new(request(b"load"));
                request.set_timeout(Duration::from_secs(2));
                let result = match client.invoke(request).await {
                    Ok(reply) => Ok(reply.into_inner().agent),
                    Err(status) => Err((status.code(), status.message().to_string())),
                };
                Shot { started, result }
            }));
        }
        let mut shots = Vec::with_capacity(calls.len());
        for c in calls {
            shots.push(c.await.expect("a load task does not panic"));
        }
        shots
    };
    let (shots, ()) = tokio::join!(sender, during(start));
    shots
}

fn by_agent(shots: &[Shot], from: Instant, to: Instant) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for s in shots {
        if let Ok(agent) = &s.result {
            if s.started >= from && s.started < to {
                *counts.entry(agent.clone()).or_insert(0) += 1;
            }
        }
    }
    counts
}

fn health_check(interval_ms: u64) -> HealthCheckConfig {
    HealthCheckConfig {
        interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_millis(interval_ms),
        unhealthy_threshold: NonZeroU32::new(3).unwrap(),
        healthy_threshold: NonZeroU32::new(2).unwrap(),
        service: String::new(),
    }
}

fn retry_invoke() -> RetryConfig {
    RetryConfig {
        methods: vec![INVOKE.into()],
        ..RetryConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_agent_under_load_loses_no_call_when_invoke_is_retryable() {
    bounded(Duration::from_secs(60), async {
        let (ports, mut children) = three_agent_processes(20).await;
        let mut cluster = planner(&ports);
        cluster.retry = Some(retry_invoke());
        cluster.health_check = Some(health_check(200));
        let sidecar = sidecar(vec![cluster]).await;
        let client = planner_client(Way::Connect, &sidecar).await;
        let endpoint = sidecar.router().clusters()[0].endpoints()[2].clone();
        let victim = children.pop().unwrap();
        let kill_at = Duration::from_secs(3);
        let restart_at = Duration::from_secs(6);
        let marks = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = marks.clone();
        let shots = open_loop(client, 300, Duration::from_secs(10), |start| async move {
            let mut victim = victim;
            tokio::time::sleep_until(start + kill_at).await;
            signal(&victim, "-KILL");
            victim.wait().await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let calls_after_1s = endpoint.stats().calls;
            tokio::time::sleep_until(start + restart_at).await;
            let calls_before_restart = endpoint.stats().calls;
            let restarted = agent_process(ports[2], "agent-2", 20).await;
            record
                .lock()
                .unwrap()
                .extend([calls_after_1s, calls_before_restart]);
            tokio::time::sleep_until(start + Duration::from_secs(10)).await;
            drop(restarted);
        })
        .await;
        let start = shots[0].started;
        let failed: Vec<&Shot> = shots.iter().filter(|s| s.result.is_err()).collect();
        assert_eq!(shots.len(), 3000);
        assert!(
            failed.is_empty(),
            "{} calls failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        let marks = marks.lock().unwrap().clone();
        assert_eq!(
            marks[0], marks[1],
            "the killed agent got calls from 1 s after the kill until its restart"
        );
        let before = by_agent(&shots, start, start + kill_at);
        assert!(
            before.get("agent-2").copied().unwrap_or(0) > 200,
            "{before:?}"
        );
        // Restarted, it passes two checks (200 ms apart) and takes calls again.
        let back = by_agent(
            &shots,
            start + restart_at + Duration::from_secs(2),
            start + Duration::from_secs(10),
        );
        assert!(back.get("agent-2").copied().unwrap_or(0) > 100, "{back:?}");
        let cluster = sidecar.router().clusters()[0].clone();
        let stats = cluster.stats();
        eprintln!(
            "retries: {}, by agent before/after: {before:?} {back:?}",
            agentmesh::cluster::ClusterStats::get(&stats.retries)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_retry_policy_only_calls_in_flight_on_the_killed_agent_fail() {
    bounded(Duration::from_secs(60), async {
        let (ports, mut children) = three_agent_processes(20).await;
        let sidecar = sidecar(vec![planner(&ports)]).await;
        let client = planner_client(Way::Connect, &sidecar).await;
        let victim = children.pop().unwrap();
        let (shots, killed) = load_and_signal(
            client,
            Duration::from_secs(10),
            victim,
            "-KILL",
            Duration::from_secs(3),
        )
        .await;
        let failed: Vec<&Shot> = shots.iter().filter(|s| s.result.is_err()).collect();
        eprintln!(
            "{} of {} calls failed, all sent to the killed agent before it died",
            failed.len(),
            shots.len()
        );
        // At 300 calls/s over three agents that take 20 ms, about two calls
        // are in flight on the victim when it dies.
        assert!(failed.len() <= 10, "{} failed: {failed:?}", failed.len());
        let address = ports[2].to_string();
        for f in &failed {
            let (code, message) = f.result.as_ref().unwrap_err();
            assert_eq!(*code, Code::Unavailable, "{message}");
            assert!(
                message.contains(&address),
                "names the killed endpoint: {message}"
            );
            // Sent before the kill, or in the instant before the sidecar saw
            // the connection close.
            assert!(f.started <= killed + Duration::from_millis(50), "{f:?}");
        }
        let after = by_agent(
            &shots,
            killed + Duration::from_millis(100),
            killed + Duration::from_secs(3),
        );
        assert_eq!(after.get("agent-2"), None, "{after:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_drains_costs_no_call_without_a_retry_policy() {
    bounded(Duration::from_secs(60), async {
        let (ports, mut children) = three_agent_processes(20).await;
        let sidecar = sidecar(vec![planner(&ports)]).await;
        let client = planner_client(Way::Connect, &sidecar).await;
        let victim = children.pop().unwrap();
        // SIGTERM: the agent sends GOAWAY and finishes its calls.
        let (shots, termed) = load_and_signal(
            client,
            Duration::from_secs(3),
            victim,
            "-TERM",
            Duration::from_secs(1),
        )
        .await;
        let failed: Vec<String> = shots
            .iter()
            .filter(|s| s.result.is_err())
            .map(|s| {
                format!(
                    "{:?} after SIGTERM: {:?}",
                    s.started.saturating_duration_since(termed),
                    s.result
                )
            })
            .collect();
        assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_agent_is_ejected_after_the_threshold_and_probed_back() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(3).await;
        agents.stats[1].set_fail_ratio(1.0);
        let mut cluster = planner(&agents.addrs);
        cluster.breaker.open_for = Duration::from_millis(500);
        cluster.outlier = None;
        let sidecar = sidecar(vec![cluster]).await;
        let mut client = planner_client(Way::Connect, &sidecar).await;
        let endpoint = sidecar.router().clusters()[0].endpoints()[1].clone();
        let mut failures = 0;
        for _ in 0..60 {
            if let Err(status) = client.invoke(request(b"x")).await {
                assert_eq!(status.code(), Code::Unavailable);
                assert!(
                    status.message().contains("injected failure"),
                    "{}",
                    status.message()
                );
                failures += 1;
            }
        }
        // Round robin sends it every third call until the fifth failure in
        // a row opens its breaker; then it gets none.
        assert_eq!(failures, 5);
        assert_eq!(endpoint.stats().state, "ejected");
        assert_eq!(endpoint.stats().ejections, 1);
        assert_eq!(agents.stats[1].get(&agents.stats[1].calls), 5);
        // Still failing when its 500 ms are up: the probe fails and the
        // breaker opens again, for twice as long.
        tokio::time::sleep(Duration::from_millis(600)).await;
        for _ in 0..10 {
            let _ = client.invoke(request(b"x")).await;
        }
        assert_eq!(agents.stats[1].get(&agents.stats[1].calls), 6, "one probe");
        assert_eq!(endpoint.stats().ejections, 2);
        // It recovers: the next probe closes the breaker and it takes its
        // share again.
        agents.stats[1].set_fail_ratio(0.0);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let counts = spread(&client, 60, 1).await;
        assert_eq!(endpoint.stats().state, "ready");
        assert!(
            counts.get("agent-1").copied().unwrap_or(0) >= 15,
            "{counts:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_rate_ejection_respects_max_ejection_percent() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(4).await;
        // Two agents fail half their calls: never five in a row for long,
        // but far below an 80% success rate. With 4 endpoints at 25%, only
        // one of them may be ejected.
        agents.stats[0].set_fail_ratio(0.5);
        agents.stats[1].set_fail_ratio(0.5);
        let mut cluster = planner(&agents.addrs);
        cluster.breaker.max_ejection = 0.25;
        cluster.outlier = Some(OutlierConfig {
            min_success_rate: 0.8,
            window: Duration::from_secs(10),
            min_calls: 10,
        });
        let sidecar = sidecar(vec![cluster]).await;
        let mut client = planner_client(Way::Connect, &sidecar).await;
        for _ in 0..200 {
            let _ = client.invoke(request(b"x")).await;
        }
        let cluster = &sidecar.router().clusters()[0];
        let e: Vec<_> = cluster.endpoints().iter().map(|e| e.stats()).collect();
        let states: Vec<&str> = e.iter().map(|s| s.state).collect();
        assert_eq!(cluster.ejected(), (1, 1), "{states:?}");
        assert_eq!(
            states.iter().filter(|s| **s == "ejected").count(),
            1,
            "{states:?}"
        );
        assert!(
            e[0].spared + e[1].spared >= 1,
            "the other was spared: {e:?}"
        );
        assert_eq!(states[2..], ["ready", "ready"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_agent_fails_its_health_checks_and_comes_back() {
    bounded(Duration::from_secs(60), async {
        let (ports, children) = three_agent_processes(0).await;
        let mut cluster = planner(&ports);
        cluster.health_check = Some(health_check(100));
        let sidecar = sidecar(vec![cluster]).await;
        let client = planner_client(Way::Connect, &sidecar).await;
        let endpoint = sidecar.router().clusters()[0].endpoints()[2].clone();
        let counts = spread(&client, 30, 1).await;
        assert!(
            counts.get("agent-2").copied().unwrap_or(0) >= 8,
            "{counts:?}"
        );
        let calls_connection = endpoint.connection();
        let (opened, closed) = (calls_connection.opened(), calls_connection.closed());
        // SIGSTOP: the process holds its sockets but answers nothing.
        signal(&children[2], "-STOP");
        let stopped = Instant::now();
        assert!(
            eventually(Duration::from_secs(5), || endpoint.stats().state
                == "unhealthy")
            .await,
            "{:?}",
            endpoint.stats()
        );
        // Three checks that time out after 100 ms, 100 ms apart.
        assert!(
            stopped.elapsed() >= Duration::from_millis(500),
            "{:?}",
            stopped.elapsed()
        );
        assert_eq!(endpoint.stats().marked_unhealthy, 1);
        let counts = spread(&client, 30, 3).await;
        assert_eq!(counts.get("agent-2"), None, "{counts:?}");
        // Long enough for more than 20 checks to go unanswered: were they on
        // the calls' connection, the agent would wake to more reset streams
        // than its HTTP/2 server allows and close that connection.
        tokio::time::sleep_until(stopped + Duration::from_secs(5)).await;
        signal(&children[2], "-CONT");
        assert!(
            eventually(Duration::from_secs(5), || endpoint.stats().state == "ready").await,
            "{:?}",
            endpoint.stats()
        );
        let counts = spread(&client, 30, 1).await;
        assert!(
            counts.get("agent-2").copied().unwrap_or(0) >= 8,
            "{counts:?}"
        );
        assert_eq!(
            (calls_connection.opened(), calls_connection.closed()),
            (opened, closed),
            "the calls' connection outlived the hang"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_counts_as_a_failed_health_check() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(2).await;
        let mut cluster = planner(&agents.addrs);
        cluster.health_check = Some(health_check(50));
        let sidecar = sidecar(vec![cluster]).await;
        let endpoint = sidecar.router().clusters()[0].endpoints()[0].clone();
        let client = planner_client(Way::Connect, &sidecar).await;
        // Both agents serve before one of them says it does not.
        assert_eq!(spread(&client, 20, 2).await.len(), 2);
        agents.stats[0].set_serving(false).await;
        assert!(
            eventually(Duration::from_secs(5), || endpoint.stats().state
                == "unhealthy")
            .await
        );
        assert_eq!(spread(&client, 20, 2).await.get("agent-0"), None);
        agents.stats[0].set_serving(true).await;
        assert!(eventually(Duration::from_secs(5), || endpoint.stats().state == "ready").await);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_retries_when_every_endpoint_fails() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(3).await;
        for s in &agents.stats {
            s.set_fail_ratio(1.0);
        }
        let mut cluster = planner(&agents.addrs);
        cluster.breaker.enabled = false;
        cluster.outlier = None;
        cluster.retry = Some(RetryConfig {
            min_retries_per_second: 0,
            backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
            ..retry_invoke()
        });
        let sidecar = sidecar(vec![cluster]).await;
        let mut client = planner_client(Way::Connect, &sidecar).await;
        for _ in 0..100 {
            let status = client.invoke(request(b"x")).await.unwrap_err();
            // The caller gets the endpoint's own answer.
            assert!(
                status.message().contains("injected failure"),
                "{}",
                status.message()
            );
        }
        let cluster = sidecar.router().clusters()[0].clone();
        let stats = cluster.stats();
        let retries = agentmesh::cluster::ClusterStats::get(&stats.retries);
        let refused = agentmesh::cluster::ClusterStats::get(&stats.retries_refused);
        let served: u64 = agents.stats.iter().map(|s| s.get(&s.calls)).sum();
        // Unbounded, 3 attempts each would make 200 retries; the budget
        // allows 20% of the calls.
        assert!((15..=20).contains(&retries), "retries: {retries}");
        assert_eq!(served, 100 + retries);
        assert!(refused >= 80, "refused: {refused}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_status_is_retried_on_another_endpoint() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(3).await;
        agents.stats[0].set_fail_ratio(1.0);
        let mut cluster = planner(&agents.addrs);
        cluster.breaker.enabled = false;
        cluster.outlier = None;
        cluster.retry = Some(retry_invoke());
        let sidecar = sidecar(vec![cluster]).await;
        let client = planner_client(Way::Connect, &sidecar).await;
        let counts = spread(&client, 90, 3).await;
        assert_eq!(counts.get("agent-0"), None, "{counts:?}");
        assert_eq!(counts.values().sum::<usize>(), 90);
        // A method not named in the policy is not retried: Collect calls
        // that land on agent-0 fail (round robin: a third of them).
        let mut client = planner_client(Way::Connect, &sidecar).await;
        let mut failed = 0;
        for _ in 0..9 {
            let one = futures_util::stream::iter([request(b"c")]);
            if let Err(status) = client.collect(one).await {
                assert!(status.message().contains("agent-0"), "{}", status.message());
                failed += 1;
            }
        }
        assert_eq!(failed, 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_limits_answer_resource_exhausted_naming_the_limit() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(3).await;
        let mut cluster = planner(&agents.addrs);
        cluster.max_in_flight_per_endpoint = 2;
        let sidecar = sidecar(vec![cluster]).await;
        let client = planner_client(Way::Connect, &sidecar).await;
        let slow = || InvokeRequest {
            delay_ms: 800,
            ..request(b"slow")
        };
        let mut held = Vec::new();
        for _ in 0..6 {
            let mut c = client.clone();
            let r = slow();
            held.push(tokio::spawn(async move { c.invoke(r).await }));
        }
        let cluster = sidecar.router().clusters()[0].clone();
        assert!(eventually(Duration::from_secs(5), || cluster.in_flight() == 6).await);
        let status = client.clone().invoke(slow()).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "agentmesh: cluster \"planner.agents\": every endpoint tried (3) has 2 calls in flight already (cluster.max_in_flight_per_endpoint); the call was not sent"
        );
        for h in held {
            h.await.unwrap().expect("the six calls within the limit succeed");
        }

        let mut tight = planner(&agents.addrs);
        tight.name = "tight".into();
        tight.aliases.clear();
        tight.local_port = None;
        tight.max_in_flight = 4;
        let sidecar = support::sidecar(vec![tight]).await;
        let client = AgentClient::new(channel(Way::Connect, &sidecar, "tight", "tight:1").await);
        let mut held = Vec::new();
        for _ in 0..4 {
            let mut c = client.clone();
            let r = slow();
            held.push(tokio::spawn(async move { c.invoke(r).await }));
        }
        let cluster = sidecar.router().clusters()[0].clone();
        assert!(eventually(Duration::from_secs(5), || cluster.in_flight() == 4).await);
        let status = client.clone().invoke(slow()).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "agentmesh: cluster \"tight\": 4 calls in flight already (cluster.max_in_flight); the call was not sent"
        );
        for h in held {
            h.await.unwrap().unwrap();
        }
        assert_eq!(cluster.in_flight(), 0, "every slot is given back");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_resource_exhausted_and_keep_memory_bounded() {
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start(2).await;
        let mut cluster = planner(&agents.addrs);
        cluster.rate_limits = vec![
            RateLimitConfig {
                calls: NonZeroU32::new(3).unwrap(),
                window: Duration::from_secs(60),
                key: Some(http::HeaderName::from_static("x-user-id")),
                max_keys: 100,
                mesh_wide: false,
            },
            RateLimitConfig {
                calls: NonZeroU32::new(2000).unwrap(),
                window: Duration::from_secs(60),
                key: None,
                max_keys: 1,
                mesh_wide: false,
            },
        ];
        let sidecar = sidecar(vec![cluster]).await;
        let mut client = planner_client(Way::Connect, &sidecar).await;
        let as_user = |user: &str| {
            let mut r = tonic::Request::new(request(b"x"));
            r.metadata_mut().insert("x-user-id", user.parse().unwrap());
            r
        };
        for _ in 0..3 {
            client.invoke(as_user("alice")).await.unwrap();
        }
        let status = client.invoke(as_user("alice")).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "agentmesh: cluster \"planner.agents\": rate limit exceeded: 3 calls per 60s for x-user-id \"alice\" (cluster.rate_limit[0]); the call was not sent"
        );
        client.invoke(as_user("bob")).await.expect("bob has his own budget");
        // Thousands of distinct keys: the table stays at its bound.
        let cluster = sidecar.router().clusters()[0].clone();
        for i in 0..1500 {
            client.invoke(as_user(&format!("user-{i}"))).await.unwrap();
            assert!(cluster.rate_limits()[0].keys() <= 100);
        }
        // Calls without the key fall under the cluster-wide limit only.
        let mut refused = 0;
        for _ in 0..600 {
            if let Err(s) = client.invoke(request(b"x")).await {
                assert!(s.message().contains("2000 calls per 60s (cluster.rate_limit[1])"), "{}", s.message());
                refused += 1;
            }
        }
        // alice's 3, bob's 1 and the 1500 keyed calls count toward the
        // cluster-wide 2000 too.
        assert_eq!(refused, 3 + 1 + 1500 + 600 - 2000);
        assert_eq!(cluster_column(&sidecar, "rate_limited"), "105");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_request_timeout_bounds_calls_without_their_own() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(1).await;
        let mut cluster = planner(&agents.addrs);
        cluster.request_timeout = Duration::from_millis(200);
        let sidecar = sidecar(vec![cluster]).await;
        let mut client = planner_client(Way::Connect, &sidecar).await;
        let started = Instant::now();
        let status = client
            .invoke(InvokeRequest {
                delay_ms: 2000,
                ..request(b"x")
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert!(
            status.message().starts_with("agentmesh: cluster \"planner.agents\": deadline of 200ms (cluster.request_timeout) exceeded"),
            "{}",
            status.message()
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(eventually(Duration::from_secs(5), || agents.cancelled(0) == 1).await);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_upstream_connection_is_closed_and_reopened_on_demand() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(1).await;
        let mut cluster: ClusterConfig = planner(&agents.addrs);
        cluster.idle_timeout = Duration::from_millis(300);
        let sidecar = sidecar(vec![cluster]).await;
        let mut client = planner_client(Way::Connect, &sidecar).await;
        client.invoke(request(b"x")).await.unwrap();
        let endpoint = sidecar.router().clusters()[0].endpoints()[0].clone();
        assert_eq!(endpoint.connection().opened(), 1);
        // Busy connections stay: calls every 100 ms for 600 ms.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.invoke(request(b"x")).await.unwrap();
        }
        assert_eq!(endpoint.connection().closed(), 0);
        assert!(
            eventually(Duration::from_secs(3), || endpoint.connection().closed()
                == 1)
            .await
        );
        client.invoke(request(b"x")).await.unwrap();
        assert_eq!(endpoint.connection().opened(), 2);
        assert_eq!(agents.connections(0), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passed_before_sending_does_not_count_against_the_endpoint() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(1).await;
        let sidecar = sidecar(vec![planner(&agents.addrs)]).await;
        // Far more than the breaker's five: none of them is the endpoint's fault.
        for _ in 0..20 {
            let status = raw_unary(
                Way::Connect,
                &sidecar,
                &request(b"x"),
                &[("grpc-timeout", "1n")],
            )
            .await;
            assert_eq!(status["grpc-status"], "4", "{status:?}");
        }
        let endpoint = sidecar.router().clusters()[0].endpoints()[0].clone();
        let stats = endpoint.stats();
        assert_eq!(
            (stats.state, stats.failures, stats.ejections),
            ("ready", 0, 0),
            "{stats:?}"
        );
        assert_eq!(
            agents.stats[0].get(&agents.stats[0].calls),
            0,
            "nothing was sent"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_ping_goes_unanswered_is_dropped_and_its_calls_fail_fast() {
    bounded(Duration::from_secs(30), async {
        let port = closed_port();
        let agent = agent_process(port, "agent-0", 0).await;
        let mut cluster = planner(&[port]);
        cluster.keepalive_interval = Duration::from_millis(200);
        cluster.keepalive_timeout = Duration::from_millis(300);
        let sidecar = sidecar(vec![cluster]).await;
        let mut client = planner_client(Way::Connect, &sidecar).await;
        client.invoke(request(b"x")).await.unwrap();
        let endpoint = sidecar.router().clusters()[0].endpoints()[0].clone();
        // Answered PINGs keep the connection: 1 s is five of them.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(endpoint.connection().closed(), 0);
        assert!(endpoint.connection().is_open());
        // The agent hangs with the connection open: its kernel still takes
        // the bytes, nothing answers.
        signal(&agent, "-STOP");
        let stopped = Instant::now();
        let call = tokio::spawn(async move { client.invoke(request(b"y")).await });
        assert!(
            eventually(Duration::from_secs(5), || endpoint.connection().closed()
                == 1)
            .await,
            "the connection was not dropped"
        );
        // At most one interval before the PING and its timeout after it.
        let took = stopped.elapsed();
        assert!(took <= Duration::from_millis(1500), "{took:?}");
        assert!(!endpoint.connection().is_open());
        // The call on it fails with the loss, long before its 60 s limit.
        let status = call.await.unwrap().expect_err("the agent never answered");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains(&port.to_string()), "{status:?}");
        signal(&agent, "-CONT");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_answers_for_the_deadline_it_imposed_whoever_notices_first() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(1).await;
        let mut cluster = planner(&agents.addrs);
        cluster.request_timeout = Duration::from_millis(200);
        // Every call here expires: keep the breaker out of it.
        cluster.breaker.enabled = false;
        cluster.outlier = None;
        let sidecar = sidecar(vec![cluster]).await;
        let mut client = planner_client(Way::Connect, &sidecar).await;
        // The caller allows 5 s; the cluster 200 ms, which the agent is
        // sent as the time left and gives up on by itself too (CANCELLED
        // "Timeout expired"). The deadline is the sidecar's: so is the answer.
        for i in 0..10 {
            let mut req = tonic::Request::new(InvokeRequest {
                delay_ms: 500,
                ..request(b"x")
            });
            req.set_timeout(Duration::from_secs(5));
            let status = client.invoke(req).await.unwrap_err();
            assert_eq!(status.code(), Code::DeadlineExceeded, "call {i}: {status:?}");
            assert!(
                status.message().starts_with(
                    "agentmesh: cluster \"planner.agents\": deadline of 200ms (cluster.request_timeout) exceeded"
                ),
                "call {i}: {}",
                status.message()
            );
        }
        // The caller's own deadline, forwarded as it came: the caller gets
        // DEADLINE_EXCEEDED, from the sidecar, naming the caller's header.
        for i in 0..10 {
            let req = InvokeRequest {
                delay_ms: 500,
                ..request(b"x")
            };
            let status = raw_unary(Way::Connect, &sidecar, &req, &[("grpc-timeout", "200m")]).await;
            assert_eq!(status["grpc-status"], "4", "call {i}: {status:?}");
            let message = status["grpc-message"].to_str().unwrap().replace("%20", " ");
            assert!(
                message.contains("deadline of 200ms (grpc-timeout) exceeded"),
                "call {i}: {message}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_ejected_endpoint_takes_the_calls_in_panic_mode() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(1).await;
        agents.stats[0].set_fail_ratio(1.0);
        let mut cluster = planner(&agents.addrs);
        cluster.breaker.open_for = Duration::from_millis(1500);
        cluster.outlier = None;
        let sidecar = sidecar(vec![cluster]).await;
        let mut client = planner_client(Way::Connect, &sidecar).await;
        let endpoint = sidecar.router().clusters()[0].endpoints()[0].clone();
        for _ in 0..5 {
            let status = client.invoke(request(b"x")).await.unwrap_err();
            assert!(status.message().contains("injected failure"), "{status:?}");
        }
        assert_eq!(endpoint.stats().state, "ejected");
        assert_eq!(endpoint.stats().ejections, 1);
        agents.stats[0].set_fail_ratio(0.0);
        // Ejected and alone: no endpoint is ready, so the cluster balances
        // over every endpoint it can reach, this one.
        assert!(
            eventually(Duration::from_secs(1), || cluster_column(&sidecar, "panic")
                == "true")
            .await,
            "{}",
            agentmesh::admin::clusters(sidecar.router())
        );
        for i in 0..10 {
            if let Err(status) = client.invoke(request(b"x")).await {
                panic!("call {i} in panic mode: {status:?}");
            }
        }
        assert_eq!(endpoint.stats().state, "ejected");
        assert_eq!(agents.stats[0].get(&agents.stats[0].calls), 15);
        // Half-open: one probe at a time, and it is slow. The cluster has
        // no other endpoint, so the other calls go to this one too.
        assert!(
            eventually(Duration::from_secs(3), || endpoint.stats().state
                == "probing")
            .await,
            "{:?}",
            endpoint.stats()
        );
        let mut prober = client.clone();
        let probe = tokio::spawn(async move {
            prober
                .invoke(InvokeRequest {
                    delay_ms: 800,
                    ..request(b"probe")
                })
                .await
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        for i in 0..5 {
            if let Err(status) = client.invoke(request(b"x")).await {
                panic!("call {i} while the probe is out: {status:?}");
            }
        }
        probe.await.unwrap().expect("the probe succeeds");
        assert_eq!(endpoint.stats().state, "ready");
        assert_eq!(endpoint.stats().ejections, 1);
    })
    .await;
}

/// A cluster over `agents` whose breaker opens after 3 failures in a row
/// and whose error-rate ejection needs only 5 calls: low enough that calls
/// counted against the endpoint by mistake eject it.
fn touchy(addrs: &[SocketAddr]) -> ClusterConfig {
    let mut cluster = planner(addrs);
    cluster.breaker.failure_threshold = NonZeroU32::new(3).unwrap();
    cluster.outlier = Some(OutlierConfig {
        min_success_rate: 0.8,
        window: Duration::from_secs(10),
        min_calls: 5,
    });
    cluster
}

/// The endpoint was never ejected, counted no failure, and takes a normal
/// call.
async fn judged_healthy(sidecar: &agentmesh::app::Sidecar, client: &mut AgentClient<Channel>) {
    let endpoint = sidecar.router().clusters()[0].endpoints()[0].clone();
    let stats = endpoint.stats();
    assert_eq!(
        (stats.state, stats.failures, stats.ejections, stats.spared),
        ("ready", 0, 0, 0),
        "{stats:?}"
    );
    let json = agentmesh::admin::stats_json(sidecar.router(), None);
    assert!(json.contains("\"ejections\": 0,"), "{json}");
    client
        .invoke(request(b"x"))
        .await
        .expect("a normal call succeeds");
    assert_eq!(endpoint.stats().ejections, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_the_callers_chose_do_not_count_against_the_endpoint() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(1).await;
        let sidecar = sidecar(vec![touchy(&agents.addrs)]).await;
        let client = planner_client(Way::Connect, &sidecar).await;
        for _ in 0..5 {
            let calls: Vec<_> = (0..10)
                .map(|_| {
                    let mut client = client.clone();
                    tokio::spawn(async move {
                        let mut req = tonic::Request::new(InvokeRequest {
                            delay_ms: 500,
                            ..request(b"x")
                        });
                        req.set_timeout(Duration::from_millis(50));
                        client.invoke(req).await.unwrap_err()
                    })
                })
                .collect();
            for c in calls {
                // The sidecar's DEADLINE_EXCEEDED, or the caller's library
                // giving up first (CANCELLED "Timeout expired").
                let status = c.await.unwrap();
                assert!(
                    matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
                    "{status:?}"
                );
            }
        }
        judged_healthy(&sidecar, &mut client.clone()).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_cancel_do_not_count_against_the_endpoint() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(1).await;
        let sidecar = sidecar(vec![touchy(&agents.addrs)]).await;
        let client = planner_client(Way::Connect, &sidecar).await;
        for _ in 0..5 {
            let calls: Vec<_> = (0..10)
                .map(|_| {
                    let mut client = client.clone();
                    tokio::spawn(async move {
                        let call = client.invoke(InvokeRequest {
                            delay_ms: 500,
                            ..request(b"x")
                        });
                        // Dropping the call resets its stream.
                        tokio::time::timeout(Duration::from_millis(50), call).await
                    })
                })
                .collect();
            for c in calls {
                assert!(c.await.unwrap().is_err(), "the call was given up");
            }
        }
        assert!(eventually(Duration::from_secs(5), || agents.cancelled(0) == 50).await);
        judged_healthy(&sidecar, &mut client.clone()).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecars_own_request_timeout_counts_against_the_endpoint() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start(1).await;
        let mut cluster = touchy(&agents.addrs);
        cluster.request_timeout = Duration::from_millis(100);
        let sidecar = sidecar(vec![cluster]).await;
        let mut client = planner_client(Way::Connect, &sidecar).await;
        for _ in 0..3 {
            let status = client
                .invoke(InvokeRequest {
                    delay_ms: 500,
                    ..request(b"x")
                })
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        }
        let endpoint = sidecar.router().clusters()[0].endpoints()[0].clone();
        let stats = endpoint.stats();
        assert_eq!(
            (stats.state, stats.failures, stats.ejections),
            ("ejected", 3, 1),
            "{stats:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_caller_malformed_do_not_count_against_the_endpoint() {
    bounded(Duration::from_secs(30), async {
        let agents = Agents::start_with(vec![AgentOptions {
            max_header_list_size: Some(4096),
            ..AgentOptions::named("agent-0")
        }])
        .await;
        let sidecar = sidecar(vec![touchy(&agents.addrs)]).await;
        let message = framed(&request(b"x"));
        // No message at all: the agent answers INTERNAL, as gRPC servers do
        // for a unary call without its request.
        for _ in 0..10 {
            let (http, status) = raw_call(&sidecar, b"", &[]).await.expect("an answer");
            assert_eq!(http.as_u16(), 200);
            assert_eq!(status["grpc-status"], "13", "{status:?}");
        }
        // A content-length that promises more than the body has: HTTP/2
        // says the stream is malformed, and it is reset.
        for _ in 0..10 {
            let answer = raw_call(&sidecar, &message, &[("content-length", "1000")]).await;
            assert!(answer.is_err(), "{answer:?}");
        }
        // The same, found out only once the request has reached the agent:
        // the sidecar resets the stream it sent the agent.
        for _ in 0..10 {
            let (head, rest) = message.split_at(3);
            let answer = raw_call_in_parts(
                &sidecar,
                &[head, rest],
                Duration::from_millis(100),
                &[("content-length", "1000")],
            )
            .await;
            assert!(answer.is_err(), "{answer:?}");
        }
        // Headers larger than the agent takes (though not twice as large,
        // which h2 takes for abuse and answers by closing the connection):
        // it answers HTTP 431.
        let big = "a".repeat(5000);
        for _ in 0..10 {
            let answer = raw_call(&sidecar, &message, &[("x-big", &big)]).await;
            let (http, status) = answer.expect("an answer");
            assert_eq!(http.as_u16(), 431, "{status:?}");
        }
        judged_healthy(&sidecar, &mut planner_client(Way::Connect, &sidecar).await).await;
    })
    .await;
}
