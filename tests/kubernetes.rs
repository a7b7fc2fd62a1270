//! Kubernetes discovery against a small API server in the test: it speaks
//! the API's list and watch protocol for EndpointSlices (discovery.k8s.io/v1,
//! objects as the API documents them, resourceVersions, a chunked watch
//! stream of ADDED, MODIFIED and DELETED events), which is what kube's
//! watcher uses against a real API server. There is no Kubernetes API server
//! on this machine; the sidecar binary reaches this one through a
//! KUBECONFIG, the same client code path as in a cluster.

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentmesh::tools::agent::{self, AgentOptions, AgentStats};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use support::*;

/// The API server's state: the EndpointSlices, and every change with its
/// resourceVersion.
#[derive(Default)]
struct State {
    rv: u64,
    slices: BTreeMap<String, Value>,
    log: Vec<(u64, &'static str, Value)>,
    /// Bumped to end every open watch (a watch that breaks).
    generation: u64,
    /// The query strings of the requests, in order.
    requests: Vec<String>,
}

#[derive(Clone, Default)]
struct ApiServer {
    state: Arc<Mutex<State>>,
    changed: Arc<tokio::sync::Notify>,
}

const PATH: &str = "/apis/discovery.k8s.io/v1/namespaces/agents/endpointslices";

impl ApiServer {
    async fn start(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let api = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let api = api.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(api.respond(req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        addr
    }

    fn respond(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<BoxBody<Bytes, Infallible>> {
        let query = req.uri().query().unwrap_or_default().to_string();
        let params: BTreeMap<String, String> = url_params(&query);
        self.state.lock().unwrap().requests.push(query);
        let full = |status: u16, body: Value| {
            hyper::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())).boxed())
                .unwrap()
        };
        if req.uri().path() != PATH
            || params.get("labelSelector").map(String::as_str)
                != Some("kubernetes.io/service-name=planner")
        {
            return full(
                404,
                json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404 }),
            );
        }
        if params.get("watch").map(String::as_str) != Some("true") {
            let state = self.state.lock().unwrap();
            return full(
                200,
                json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSliceList",
                    "metadata": { "resourceVersion": state.rv.to_string() },
                    "items": state.slices.values().cloned().collect::<Vec<_>>(),
                }),
            );
        }
        let from: u64 = params
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
        let api = self.clone();
        tokio::spawn(async move {
            let generation = api.state.lock().unwrap().generation;
            let mut sent = from;
            loop {
                let notified = api.changed.notified();
                let (events, ended) = {
                    let state = api.state.lock().unwrap();
                    let events: Vec<_> = state
                        .log
                        .iter()
                        .filter(|(rv, _, _)| *rv > sent)
                        .cloned()
                        .collect();
                    (events, state.generation != generation)
                };
                if ended {
                    return;
                }
                for (rv, kind, object) in events {
                    let line = format!("{}\n", json!({ "type": kind, "object": object }));
                    if tx.send(Ok(Frame::data(Bytes::from(line)))).await.is_err() {
                        return;
                    }
                    sent = rv;
                }
                notified.await;
            }
        });
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        hyper::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(body.boxed())
            .unwrap()
    }

    /// Adds or replaces a slice (ADDED or MODIFIED), or deletes it.
    fn put(&self, name: &str, port: u16, endpoints: &[(IpAddr, bool, bool)]) {
        let mut state = self.state.lock().unwrap();
        state.rv += 1;
        let object = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": "agents",
                "resourceVersion": state.rv.to_string(),
                "labels": { "kubernetes.io/service-name": "planner" },
            },
            "addressType": "IPv4",
            "ports": [{ "name": "grpc", "port": port, "protocol": "TCP" }],
            "endpoints": endpoints.iter().map(|(ip, ready, terminating)| json!({
                "addresses": [ip.to_string()],
                "conditions": { "ready": ready, "serving": ready | terminating, "terminating": terminating },
                "zone": "zone-a",
            })).collect::<Vec<_>>(),
        });
        let kind = if state.slices.contains_key(name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let rv = state.rv;
        state.slices.insert(name.to_string(), object.clone());
        state.log.push((rv, kind, object));
        drop(state);
        self.changed.notify_waiters();
    }

    fn delete(&self, name: &str) {
        let mut state = self.state.lock().unwrap();
        state.rv += 1;
        let mut object = state.slices.remove(name).expect("a slice to delete");
        object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        let rv = state.rv;
        state.log.push((rv, "DELETED", object));
        drop(state);
        self.changed.notify_waiters();
    }

    /// Ends every open watch, as an API server restart or a load balancer's
    /// timeout does.
    fn break_watches(&self) {
        self.state.lock().unwrap().generation += 1;
        self.changed.notify_waiters();
    }

    fn watches(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|q| q.contains("watch=true"))
            .cloned()
            .collect()
    }
}

fn url_params(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Four agents on 127.0.0.2-5 at one port, named by their address.
async fn agents_on_one_port(delay_first: Duration) -> (u16, Vec<IpAddr>, Vec<Arc<AgentStats>>) {
    let ips: Vec<IpAddr> = (2..=5)
        .map(|i| format!("127.0.0.{i}").parse().unwrap())
        .collect();
    'ports: for _ in 0..20 {
        let port = std::net::TcpListener::bind((ips[0], 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut stats = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            let s = Arc::new(AgentStats::default());
            let mut options = AgentOptions::named(&ip.to_string());
            if i == 0 {
                options.delay = delay_first;
            }
            if agent::spawn(SocketAddr::new(*ip, port), options, s.clone())
                .await
                .is_err()
            {
                continue 'ports;
            }
            stats.push(s);
        }
        return (port, ips, stats);
    }
    panic!("no port free on 127.0.0.2-5");
}

fn kubeconfig(dir: &std::path::Path, api: SocketAddr) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://{api}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: agents\n\
             current-context: test\nusers:\n- name: test\n  user: {{}}\n"
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_follow_endpointslices_through_ready_terminating_delete_and_a_broken_watch() {
    bounded(Duration::from_secs(90), async {
        // The first agent is slow, so that it has calls in flight when it
        // starts terminating.
        let (port, ips, stats) = agents_on_one_port(Duration::from_millis(150)).await;
        let calls = |i: usize| stats[i].get(&stats[i].calls);
        let api = ApiServer::default();
        api.put("planner-a", port, &[(ips[0], true, false), (ips[1], true, false)]);
        let api_addr = api.start().await;

        let dir = tempfile::tempdir().unwrap();
        let (proxy, admin, local) = (closed_port(), closed_port(), closed_port());
        let config = dir.path().join("agentmesh.toml");
        std::fs::write(
            &config,
            format!(
                "[listener]\nproxy = \"{proxy}\"\n[admin]\nlisten = \"{admin}\"\n\
                 [[cluster]]\nname = \"planner.agents\"\nlocal_port = \"{local}\"\n\
                 kubernetes = {{ service = \"planner\", namespace = \"agents\", port = \"grpc\" }}\n"
            ),
        )
        .unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentmesh"))
            .args(["run", "--no-watch", "--config"])
            .arg(&config)
            .env("KUBECONFIG", kubeconfig(dir.path(), api_addr))
            .env_remove("KUBERNETES_SERVICE_HOST")
            .kill_on_drop(true)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        assert!(
            eventually(Duration::from_secs(10), || std::net::TcpStream::connect(local).is_ok()).await,
            "the sidecar serves"
        );
        let client = agentmesh::pb::agent_client::AgentClient::new(
            agentmesh::tools::client::direct(local).await.unwrap(),
        );
        // The first list's endpoints take calls.
        let mut c = client.clone();
        let mut first = false;
        for _ in 0..200 {
            if c.invoke(request(b"x")).await.is_ok() && calls(0) > 0 && calls(1) > 0 {
                first = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(first, "both listed endpoints took calls");

        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let (mut c, stop, failures) = (client.clone(), stop.clone(), failures.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        if let Err(s) = c.invoke(request(b"x")).await {
                            failures.lock().unwrap().push(format!("{:?}: {}", s.code(), s.message()));
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                })
            })
            .collect();

        // Added: a third endpoint in the slice.
        api.put("planner-a", port, &[(ips[0], true, false), (ips[1], true, false), (ips[2], true, false)]);
        assert!(eventually(Duration::from_secs(3), || calls(2) > 0).await, "the added endpoint took calls");

        // Ready flips to false: it takes no new call.
        api.put("planner-a", port, &[(ips[0], true, false), (ips[1], false, false), (ips[2], true, false)]);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = calls(1);
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(calls(1), before, "a not-ready endpoint took new calls");

        // Terminating (serving, not ready): its calls in flight finish,
        // no new one comes.
        assert!(stats[0].get(&stats[0].calls) > 0);
        api.put("planner-a", port, &[(ips[0], false, true), (ips[2], true, false)]);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = calls(0);
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(calls(0), before, "a terminating endpoint took new calls");

        // A second slice, then the first deleted: only the second's remain.
        api.put("planner-b", port, &[(ips[3], true, false)]);
        assert!(eventually(Duration::from_secs(3), || calls(3) > 0).await, "the second slice's endpoint took calls");
        api.delete("planner-a");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = calls(2);
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(calls(2), before, "an endpoint of a deleted slice took new calls");

        // The watch breaks; a change made meanwhile is seen when it resumes
        // from the last resourceVersion it had.
        let watches_before = api.watches().len();
        api.break_watches();
        api.put("planner-b", port, &[(ips[3], true, false), (ips[1], true, false)]);
        let before = calls(1);
        assert!(
            eventually(Duration::from_secs(10), || calls(1) > before).await,
            "the change made while the watch was down reached the sidecar"
        );
        let watches = api.watches();
        assert!(watches.len() > watches_before, "the watch was made again: {watches:?}");
        eprintln!("API requests: {:#?}", api.state.lock().unwrap().requests);
        let resumed = url_params(watches.last().unwrap());
        assert!(
            resumed.get("resourceVersion").is_some_and(|v| v != "0"),
            "it resumed from a resourceVersion: {watches:?}"
        );

        stop.store(true, Ordering::Relaxed);
        for c in callers {
            c.await.unwrap();
        }
        let failures = failures.lock().unwrap().clone();
        assert!(failures.is_empty(), "calls failed: {failures:?}");

        let metrics = admin_get(admin, "/metrics").await;
        let updates = metrics
            .lines()
            .find_map(|l| l.strip_prefix("agentmesh_cluster_kubernetes_updates_total{cluster=\"planner.agents\"} "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .expect("the updates counter");
        assert!(updates >= 7, "{updates} updates");
        let health = admin_get(admin, "/health").await;
        assert!(!health.contains("EndpointSlices"), "the watch is healthy again: {health}");
        let _ = child.kill().await;
    })
    .await;
}
