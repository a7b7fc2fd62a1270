//! What the sidecar tells the tools teams run, checked with those tools: a
//! real Prometheus (Debian's `prometheus` package; `.ci/run` installs it)
//! scrapes `/metrics` and its HTTP API must give back the calls the test
//! sent, per endpoint and status; `promtool check metrics` must find no
//! problem; and `/stats?format=json` gives latency percentiles that match
//! the agents' delays.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use agentmesh::pb::agent_client::AgentClient;
use agentmesh::tools::agent::AgentOptions;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tonic::Code;
use tonic::transport::Channel;

/// A GET over HTTP/1.1 to the admin port: the status, the content type and
/// the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin port answers");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).expect("utf-8 answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head[9..12].parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_string();
    (status, content_type, body.to_string())
}

/// Sends `ok` calls that succeed and `failing` that the agents answer with
/// NOT_FOUND, 4 at a time.
async fn send(client: &AgentClient<Channel>, ok: usize, failing: usize) {
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = worker;
            while i < ok + failing {
                let mut req = request(b"x");
                if i >= ok {
                    req.fail_code = Code::NotFound as i32;
                }
                let result = client.invoke(req).await;
                assert_eq!(result.is_ok(), i < ok, "call {i}: {result:?}");
                i += 4;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn tool(name: &str) -> String {
    let path = format!("/usr/bin/{name}");
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} is missing: install Debian's prometheus package (`apt-get install prometheus`; .ci/run does)"
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_calls_each_endpoint_took() {
    bounded(Duration::from_secs(90), async {
        let agents = Agents::start(3).await;
        let sidecar = sidecar(vec![planner(&agents.addrs)]).await;
        let client = planner_client(Way::LocalPort, &sidecar).await;
        send(&client, 90, 9).await;
        let calls: Vec<u64> = agents.stats.iter().map(|s| s.get(&s.calls)).collect();
        assert_eq!(calls.iter().sum::<u64>(), 99);

        // The text itself: the format Prometheus asks for, and clean by
        // promtool's lint.
        let admin = sidecar.admin_addr();
        let (status, content_type, text) = get(admin, "/metrics").await;
        assert_eq!(status, 200);
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        let mut promtool = Command::new(tool("promtool"))
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        promtool.stdin.take().unwrap().write_all(text.as_bytes()).await.unwrap();
        let checked = promtool.wait_with_output().await.unwrap();
        let said = String::from_utf8_lossy(&checked.stdout).to_string()
            + &String::from_utf8_lossy(&checked.stderr);
        assert!(checked.status.success() && said.trim().is_empty(), "promtool check metrics: {said}\n{text}");

        // A real Prometheus scraping the admin port every second.
        let dir = tempfile::tempdir().unwrap();
        let web = closed_port();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: agentmesh\n    static_configs:\n      - targets: ['{admin}']\n"
            ),
        )
        .unwrap();
        let _prometheus = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("prometheus starts");

        // Per endpoint: the calls each agent served.
        let want: BTreeMap<String, u64> = agents
            .addrs
            .iter()
            .zip(&calls)
            .map(|(a, &n)| (a.to_string(), n))
            .collect();
        let by_endpoint = "sum by (endpoint) (agentmesh_endpoint_calls_total{cluster=\"planner.agents\"})";
        let mut got = BTreeMap::new();
        for _ in 0..300 {
            got = query(web, by_endpoint).await;
            if got == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(got, want, "Prometheus's calls per endpoint against the agents' own counts");

        // By status, and the histogram's count.
        let not_found = query(web, "sum(agentmesh_endpoint_calls_total{grpc_code=\"NOT_FOUND\"})").await;
        assert_eq!(not_found.values().sum::<u64>(), 9, "{not_found:?}");
        let ok = query(web, "sum(agentmesh_endpoint_calls_total{grpc_code=\"OK\"})").await;
        assert_eq!(ok.values().sum::<u64>(), 90, "{ok:?}");
        let timed = query(web, "sum(agentmesh_endpoint_call_duration_seconds_count)").await;
        assert_eq!(timed.values().sum::<u64>(), 99, "{timed:?}");
        let ready = query(web, "agentmesh_cluster_ready_endpoints").await;
        assert_eq!(ready.values().sum::<u64>(), 3, "{ready:?}");
    })
    .await;
}

/// Runs an instant query against Prometheus's HTTP API: each series' value
/// by its `endpoint` label (empty without one). An API error or no answer
/// yet gives an empty map.
async fn query(web: SocketAddr, promql: &str) -> BTreeMap<String, u64> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let Ok(Ok(mut tcp)) =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(web)).await
    else {
        return BTreeMap::new();
    };
    let req = format!(
        "GET /api/v1/query?query={encoded} HTTP/1.1\r\nHost: {web}\r\nConnection: close\r\n\r\n"
    );
    if tcp.write_all(req.as_bytes()).await.is_err() {
        return BTreeMap::new();
    }
    let mut raw = Vec::new();
    let _ = tcp.read_to_end(&mut raw).await;
    let raw = String::from_utf8_lossy(&raw);
    let Some((_, body)) = raw.split_once("\r\n\r\n") else {
        return BTreeMap::new();
    };
    // The body may be chunked: the JSON is between the first '{' and the
    // last '}'.
    let (Some(start), Some(end)) = (body.find('{'), body.rfind('}')) else {
        return BTreeMap::new();
    };
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(&body[start..=end]) else {
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    for series in doc["data"]["result"].as_array().into_iter().flatten() {
        let endpoint = series["metric"]["endpoint"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let value = series["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value {
            out.insert(endpoint, v as u64);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_as_json_give_each_endpoint_its_latency_percentiles() {
    bounded(Duration::from_secs(60), async {
        let mut fast = AgentOptions::named("fast");
        fast.delay = Duration::from_millis(5);
        let mut slow = AgentOptions::named("slow");
        slow.delay = Duration::from_millis(40);
        let agents = Agents::start_with(vec![fast, slow]).await;
        let sidecar = sidecar(vec![planner(&agents.addrs)]).await;
        let client = planner_client(Way::LocalPort, &sidecar).await;
        send(&client, 100, 4).await;

        // A call is counted when its answer has gone to the caller, and put
        // in the latency window a moment later, when its stream ends: read
        // the stats once both have every call (or after 5 s).
        let mut fetched = None;
        for _ in 0..100 {
            let (status, content_type, body) =
                get(sidecar.admin_addr(), "/stats?format=json").await;
            let doc: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            let settled = doc["clusters"][0]["endpoints"]
                .as_array()
                .is_some_and(|es| {
                    es.iter()
                        .all(|e| e["latency"]["window_calls"] == e["calls"])
                });
            fetched = Some((status, content_type, doc));
            if settled {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (status, content_type, doc) = fetched.unwrap();
        assert_eq!(status, 200);
        assert_eq!(content_type, "application/json");
        let cluster = &doc["clusters"][0];
        assert_eq!(cluster["name"], "planner.agents");
        assert_eq!(cluster["strategy"], "round_robin");
        assert_eq!(cluster["ready"], 2);
        let (mut total_ok, mut total_not_found) = (0, 0);
        for (i, (name, low, high)) in [("fast", 5.0, 12.0), ("slow", 40.0, 55.0)]
            .into_iter()
            .enumerate()
        {
            let e = &cluster["endpoints"][i];
            assert_eq!(e["address"], agents.addrs[agents.index(name)].to_string());
            let latency = &e["latency"];
            assert_eq!(
                latency["window_calls"], e["calls"],
                "{name}: every call is in the window"
            );
            for q in ["p50_ms", "p90_ms"] {
                let v = latency[q].as_f64().unwrap();
                assert!(
                    (low..high).contains(&v),
                    "{name} {q} = {v} ms, want {low}..{high}: {e}"
                );
            }
            total_ok += e["calls_by_status"]["OK"].as_u64().unwrap();
            total_not_found += e["calls_by_status"]["NOT_FOUND"].as_u64().unwrap_or(0);
        }
        assert_eq!((total_ok, total_not_found), (100, 4));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_shows_in_the_metrics() {
    use agentmesh::config::{Config, MeshConfig};
    bounded(Duration::from_secs(60), async {
        let agents = Agents::start(1).await;
        let key = b"a key of the metrics test, 32 b.";
        let start = |name: &'static str, seeds: Vec<SocketAddr>| {
            let addrs = agents.addrs.clone();
            async move {
                let mut config = Config::for_test(vec![planner(&addrs)]);
                config.set_mesh(Some(MeshConfig::for_test(
                    name,
                    loopback(),
                    &seeds,
                    Some(key),
                )));
                agentmesh::app::Sidecar::start(&config)
                    .await
                    .expect("sidecar starts")
            }
        };
        let a = start("a", vec![]).await;
        let b = start("b", vec![a.mesh().unwrap().advertise()]).await;
        let metric = |text: &str, name: &str| -> Option<f64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        };
        let mut text = String::new();
        for _ in 0..500 {
            text = get(b.admin_addr(), "/metrics").await.2;
            if metric(&text, "agentmesh_mesh_peers") == Some(1.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(metric(&text, "agentmesh_mesh_peers"), Some(1.0), "{text}");
        let sent = metric(&text, "agentmesh_mesh_datagrams_total{direction=\"sent\"}").unwrap();
        assert!(sent > 0.0, "{text}");
        assert_eq!(
            metric(
                &text,
                "agentmesh_mesh_datagrams_dropped_total{reason=\"forged\"}"
            ),
            Some(0.0)
        );
        assert!(
            metric(&text, "agentmesh_trace_spans_total{outcome=\"exported\"}").is_none(),
            "no tracing, no span counters"
        );
    })
    .await;
}
