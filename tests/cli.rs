//! The `agentmesh` command itself: `check` refuses bad configs with the file,
//! the key and the reason; `run` drains in-flight calls on SIGTERM and exits 0.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use agentmesh::pb::InvokeRequest;
use agentmesh::pb::agent_client::AgentClient;
use support::*;

const GOOD: &str = r#"
[listener]
proxy = "127.0.0.1:15001"
refuse_unknown = false

[admin]
listen = "127.0.0.1:15000"

[[cluster]]
name = "planner.agents"
aliases = ["planner"]
strategy = "round_robin"
local_port = "127.0.0.1:15101"
[[cluster.endpoints]]
address = "127.0.0.1:50051"
weight = 5
"#;

fn check(dir: &Path, text: &str) -> Output {
    let file = dir.join("mesh.toml");
    std::fs::write(&file, text).unwrap();
    Command::new(env!("CARGO_BIN_EXE_agentmesh"))
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap()
}

#[test]
fn check_accepts_the_documented_example_and_refuses_each_mistake_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let ok = check(dir.path(), GOOD);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        String::from_utf8_lossy(&ok.stdout).ends_with("mesh.toml: ok (1 clusters, 1 endpoints)\n")
    );

    let second = "\n[[cluster]]\nname = \"planner.agents\"\n[[cluster.endpoints]]\naddress = \"127.0.0.1:50052\"\n";
    let cases = [
        (
            "round_robin",
            "fastest",
            "cluster[0].strategy: unknown variant `fastest`, expected one of `round_robin`, `weighted`, `least_connections`, `latency`, `performance`",
        ),
        (
            "weight = 5",
            "weight = 0",
            "cluster[0].endpoints[0].weight: must be at least 1",
        ),
        (
            "127.0.0.1:50051",
            "127.0.0.1",
            "cluster[0].endpoints[0].address: \"127.0.0.1\" has no port",
        ),
        (
            "127.0.0.1:15101",
            "127.0.0.1:99999",
            "cluster[0].local_port: \"127.0.0.1:99999\" is not a socket address",
        ),
        (
            "weight = 5",
            "weight = 5\nprority = 1",
            "cluster[0].endpoints[0].prority: unknown field `prority`",
        ),
        (
            "refuse_unknown = false",
            "refuse_unknown = \"no\"",
            "listener.refuse_unknown: invalid type: string \"no\", expected a boolean",
        ),
    ];
    for (from, to, want) in cases {
        let out = check(dir.path(), &GOOD.replace(from, to));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{to}: {stderr}");
        assert!(
            stderr.contains(&format!("mesh.toml: {want}")),
            "want {want:?}, got {stderr}"
        );
    }
    let out = check(dir.path(), &format!("{GOOD}{second}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("mesh.toml: cluster[1].name: \"planner.agents\" already names another cluster (at cluster[0].name)"), "{stderr}");

    let missing = Command::new(env!("CARGO_BIN_EXE_agentmesh"))
        .args(["check", "--config", "/nonexistent/mesh.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .starts_with("/nonexistent/mesh.toml: (file): cannot read")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_calls_finish_then_exits_zero() {
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start(1).await;
        let proxy = closed_port();
        let admin = closed_port();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mesh.toml");
        let config = format!(
            "[listener]\nproxy = \"{proxy}\"\ndrain_timeout = \"10s\"\n[admin]\nlisten = \"{admin}\"\n\
             [[cluster]]\nname = \"planner.agents\"\nendpoints = [{{ address = \"${{AGENT_ADDR}}\" }}]\n"
        );
        std::fs::write(&file, config).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentmesh"))
            .args(["run", "--config"])
            .arg(&file)
            .env("AGENT_ADDR", agents.addrs[0].to_string())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        assert!(eventually(Duration::from_secs(10), || std::net::TcpStream::connect(proxy).is_ok()).await);

        let channel = agentmesh::tools::client::via_connect(proxy, TARGET).await.unwrap();
        let mut client = AgentClient::new(channel);
        let slow = tokio::spawn(async move {
            client.invoke(InvokeRequest { delay_ms: 1_500, payload: b"late".to_vec(), ..Default::default() }).await
        });
        assert!(eventually(Duration::from_secs(5), || agents.stats[0].get(&agents.stats[0].calls) == 1).await);

        let started = Instant::now();
        let pid = child.id().unwrap().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        // New connections are refused soon after the signal...
        assert!(eventually(Duration::from_secs(2), || std::net::TcpStream::connect(proxy).is_err()).await);
        // ...while the call in flight completes.
        let reply = slow.await.unwrap().expect("the in-flight call finishes during the drain");
        assert_eq!(reply.into_inner().payload, b"late");
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
        assert!(status.success(), "exit status {status}");
        assert!(started.elapsed() < Duration::from_secs(5), "drain took {:?}", started.elapsed());
    })
    .await;
}

#[test]
fn demo_runs_on_its_own_and_shows_where_the_calls_went() {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_agentmesh"))
        .arg("demo")
        .output()
        .unwrap();
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < Duration::from_secs(20), "demo took {took:?}");
    for agent in ["agent-a", "agent-b", "agent-c"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(agent))
            .unwrap_or_else(|| panic!("no row for {agent}: {stdout}"));
        // Round robin: each of the three agents gets a third of 600 calls.
        assert!(row.contains(" 200 ") && row.contains("33.3%"), "{row}");
    }
    assert!(stdout.contains("failed calls: 0;"), "{stdout}");
}

/// The two figures (without gossip, with gossip) on the first line of
/// `section` of the mesh demo's output that starts with `label`.
fn side_by_side<'a>(stdout: &'a str, section: &str, label: &str) -> (&'a str, &'a str) {
    let line = stdout
        .lines()
        .skip_while(|l| !l.starts_with(section))
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} in {section:?}: {stdout}"));
    let mut figures = line.split_whitespace().rev();
    let meshed = figures.next().unwrap();
    let alone = figures.next().unwrap();
    (alone, meshed)
}

fn percent(figure: &str) -> f64 {
    figure.trim_end_matches('%').parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_demo_shows_what_gossip_changes_side_by_side() {
    let started = Instant::now();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentmesh"))
        .args(["demo", "--mesh"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(40), run)
        .await
        .expect("the mesh demo ends within 40 s")
        .unwrap();
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took < Duration::from_secs(35),
        "the mesh demo took {took:?}"
    );

    let skew = "1. cross-caller skew";
    let (alone, meshed) = side_by_side(&stdout, skew, "B's calls answered by x");
    let (alone, meshed) = (percent(alone), percent(meshed));
    assert!(meshed < 10.0, "with gossip B avoids x: {meshed}%");
    assert!(
        alone > meshed,
        "alone B cannot see A's calls on x: {alone}%"
    );
    assert_eq!(side_by_side(&stdout, skew, "B's failed calls"), ("0", "0"));

    let failing = "2. an agent failing";
    let (alone, meshed) = side_by_side(&stdout, failing, "B's failed calls");
    assert_eq!(alone, "5", "alone, B pays its breaker's threshold");
    assert!(
        meshed.parse::<u32>().unwrap() <= 1,
        "with gossip B fails at most once: {meshed}"
    );
    let (alone, meshed) = side_by_side(&stdout, failing, "A's ejection of f reached B in");
    assert_eq!(alone, "-");
    assert!(meshed.ends_with("ms"), "A's ejection reached B: {meshed}");
    assert!(
        stdout.contains("the mesh: B took f out on A's word"),
        "{stdout}"
    );
}

/// The runtime line the sidecar logs at start, run with `prefix` before it
/// (e.g. `taskset -c 0`) and `top` TOML at the head of its config.
async fn runtime_line(prefix: &[&str], top: &str) -> String {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mesh.toml");
    let (proxy, admin) = (closed_port(), closed_port());
    std::fs::write(
        &file,
        format!(
            "{top}\n[listener]\nproxy = \"{proxy}\"\n[admin]\nlisten = \"{admin}\"\n\
             [[cluster]]\nname = \"planner.agents\"\nendpoints = [{{ address = \"127.0.0.1:1\" }}]\n"
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_agentmesh");
    let mut command = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = tokio::process::Command::new(first);
            c.args(rest).arg(bin);
            c
        }
        None => tokio::process::Command::new(bin),
    };
    let mut child = command
        .args(["run", "--config"])
        .arg(&file)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let line = plain(&line);
            if line.contains(" runtime") && line.contains("workers=") {
                return line;
            }
        }
        panic!("the sidecar logged no runtime line");
    })
    .await
    .expect("the runtime line within 10 s");
    child.kill().await.unwrap();
    line
}

#[tokio::test]
async fn the_default_runtime_follows_the_cpus_the_process_may_use() {
    // One CPU (as a pod's CPU limit of 1 or taskset gives): one event loop.
    let one = runtime_line(&["taskset", "-c", "0"], "").await;
    assert!(
        one.contains("workers=1") && one.contains("current-thread"),
        "{one}"
    );
    // Every CPU of this machine: one worker each.
    let cpus = std::thread::available_parallelism().unwrap().get();
    let all = runtime_line(&[], "").await;
    assert!(all.contains(&format!("workers={cpus} ")), "{all}");
    // The config's own number wins.
    let set = runtime_line(&["taskset", "-c", "0"], "[runtime]\nworkers = 3").await;
    assert!(
        set.contains("workers=3")
            && set.contains("multi-thread")
            && set.contains("runtime.workers"),
        "{set}"
    );
}

/// A log line without its ANSI colours.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
