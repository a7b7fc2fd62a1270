//! Traces, checked where they land: an OTLP/gRPC receiver (a tonic server
//! on the official `opentelemetry-proto` definitions) takes the sidecar's
//! spans and those of a Python caller instrumented with the OpenTelemetry
//! SDK, and the demo agent says which `traceparent` it was given.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentmesh::app::Sidecar;
use agentmesh::config::{ClusterConfig, Config, RetryConfig, Strategy, TelemetryConfig};
use agentmesh::pb::agent_client::AgentClient;
use agentmesh::tools::agent::AgentOptions;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// Spans received, with their resource's `service.name`.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    /// Each export's resource attributes.
    resources: Arc<Mutex<Vec<Vec<KeyValue>>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            if let Some(r) = &rs.resource {
                self.resources.lock().unwrap().push(r.attributes.clone());
            }
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| string(&r.attributes, "service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// Starts the receiver on a loopback port.
    async fn start() -> (Receiver, SocketAddr, tokio::task::JoinHandle<()>) {
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let task = tokio::spawn(async move {
            server.await.expect("the receiver serves");
        });
        (receiver, addr, task)
    }

    /// The spans of `service` in trace `trace_id` (hex), once `want` of
    /// them have come (or the time is up).
    async fn wait_for(&self, service: &str, trace_id: &str, want: usize) -> Vec<Span> {
        let mut found = Vec::new();
        for _ in 0..500 {
            found = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|(s, span)| s == service && hex(&span.trace_id) == trace_id)
                .map(|(_, span)| span.clone())
                .collect();
            if found.len() >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        found
    }

    fn all_of(&self, service: &str) -> Vec<Span> {
        let spans = self.spans.lock().unwrap();
        spans
            .iter()
            .filter(|(s, _)| s == service)
            .map(|(_, span)| span.clone())
            .collect()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(attributes: &[KeyValue], key: &str) -> Option<Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.clone())
}

fn string(attributes: &[KeyValue], key: &str) -> Option<String> {
    match value(attributes, key)? {
        Value::StringValue(s) => Some(s),
        _ => None,
    }
}

fn int(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match value(attributes, key)? {
        Value::IntValue(i) => Some(i),
        _ => None,
    }
}

/// Runs the Python caller once; its JSON report.
async fn python_call(target: SocketAddr, receiver: SocketAddr, mode: &str) -> serde_json::Value {
    python_json(
        "traced_client.py",
        &[target.to_string(), receiver.to_string(), mode.to_string()],
    )
    .await
}

/// A sidecar whose traces go to `receiver`, with `clusters`.
async fn traced_sidecar(clusters: Vec<ClusterConfig>, receiver: SocketAddr) -> Sidecar {
    let mut config = Config::for_test(clusters);
    config.telemetry = TelemetryConfig {
        otlp_endpoint: Some(format!("http://{receiver}")),
        ..TelemetryConfig::default()
    };
    let sidecar = Sidecar::start(&config).await.expect("sidecar starts");
    warmed(&sidecar).await;
    sidecar
}

/// `traceparent`'s fields: trace id, parent id, flags.
fn fields(traceparent: &str) -> (String, String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_trace_goes_on_through_the_sidecar_to_the_agent() {
    bounded(Duration::from_secs(120), async {
        let (receiver, at, _server) = Receiver::start().await;
        let agents = Agents::start(3).await;
        let mut cluster = planner(&agents.addrs);
        cluster.strategy = Strategy::LeastConnections;
        let sidecar = traced_sidecar(vec![cluster], at).await;
        let target = sidecar.local_addr("planner.agents").unwrap();

        let caller = python_call(target, at, "sampled").await;
        let trace_id = caller["trace_id"].as_str().unwrap();
        let caller_span = caller["span_id"].as_str().unwrap();

        // The caller's own span reached the receiver, and so did the
        // sidecar's, in the same trace, as its child.
        let python = receiver.wait_for("python-caller", trace_id, 1).await;
        assert_eq!(python.len(), 1, "the Python caller's span");
        assert_eq!(hex(&python[0].span_id), caller_span);
        let ours = receiver.wait_for("agentmesh", trace_id, 1).await;
        assert_eq!(ours.len(), 1, "one sidecar span per call");
        let span = &ours[0];
        assert_eq!(
            hex(&span.parent_span_id),
            caller_span,
            "the caller's span is the parent"
        );
        assert_eq!(span.name, "agentmesh.demo.v1.Agent/Invoke");
        assert_eq!(span.kind, 3, "SPAN_KIND_CLIENT");
        let a = &span.attributes;
        assert_eq!(string(a, "rpc.system.name").as_deref(), Some("grpc"));
        assert_eq!(
            string(a, "rpc.method").as_deref(),
            Some("agentmesh.demo.v1.Agent/Invoke")
        );
        assert_eq!(int(a, "rpc.grpc.status_code"), Some(0));
        assert_eq!(string(a, "rpc.response.status_code").as_deref(), Some("OK"));
        assert_eq!(
            string(a, "agentmesh.cluster").as_deref(),
            Some("planner.agents")
        );
        assert_eq!(
            string(a, "agentmesh.strategy").as_deref(),
            Some("least_connections")
        );
        assert!(string(a, "server.address").is_some(), "{a:?}");
        let peer = format!(
            "{}:{}",
            string(a, "network.peer.address").unwrap(),
            int(a, "network.peer.port").unwrap()
        );
        assert!(
            agents.addrs.iter().any(|x| x.to_string() == peer),
            "{peer} is an agent"
        );

        // Why this endpoint: the candidates least_connections compared.
        let pick = span
            .events
            .iter()
            .find(|e| e.name == "pick")
            .expect("a pick event");
        assert_eq!(
            string(&pick.attributes, "agentmesh.endpoint"),
            Some(peer.clone())
        );
        let Some(Value::ArrayValue(candidates)) = value(&pick.attributes, "agentmesh.candidates")
        else {
            panic!("no candidates in {pick:?}");
        };
        assert!(candidates.values.len() >= 2, "{candidates:?}");
        let attempt = span
            .events
            .iter()
            .find(|e| e.name == "attempt")
            .expect("an attempt event");
        assert_eq!(
            string(&attempt.attributes, "agentmesh.outcome").as_deref(),
            Some("answered")
        );

        // The agent got a traceparent naming the sidecar's span as parent.
        let received = caller["received"]
            .as_str()
            .expect("the agent got a traceparent");
        let (t, parent, flags) = fields(received);
        assert_eq!(t, trace_id);
        assert_eq!(
            parent,
            hex(&span.span_id),
            "the agent's parent is the sidecar's span"
        );
        assert_eq!(flags, "01");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_call_makes_no_span_and_keeps_its_traceparent() {
    bounded(Duration::from_secs(120), async {
        let (receiver, at, _server) = Receiver::start().await;
        let agents = Agents::start(2).await;
        let sidecar = traced_sidecar(vec![planner(&agents.addrs)], at).await;
        let target = sidecar.local_addr("planner.agents").unwrap();

        let caller = python_call(target, at, "unsampled").await;
        assert_eq!(caller["received"], caller["sent"], "passed on as it came");

        // A forced call after it: once its span is in, the unsampled one
        // would be too (one queue, in order).
        let mut client = planner_client(Way::LocalPort, &sidecar).await;
        let mut req = tonic::Request::new(request(b"x"));
        req.metadata_mut()
            .insert("x-agentmesh-trace", "1".parse().unwrap());
        let reply = client.invoke(req).await.unwrap();
        let forced = reply
            .metadata()
            .get("x-traceparent-received")
            .unwrap()
            .to_str()
            .unwrap();
        let (forced_trace, _, flags) = fields(forced);
        assert_eq!(flags, "01");
        let spans = receiver.wait_for("agentmesh", &forced_trace, 1).await;
        assert_eq!(
            spans.len(),
            1,
            "x-agentmesh-trace: 1 samples a call without a parent"
        );
        assert!(
            spans[0].parent_span_id.is_empty(),
            "a new trace starts at the sidecar"
        );
        let unsampled = caller["trace_id"].as_str().unwrap();
        let all = receiver.all_of("agentmesh");
        assert_eq!(all.len(), 1, "no span but the forced one: {all:?}");
        assert!(all.iter().all(|s| hex(&s.trace_id) != unsampled));

        // With no traceparent and a ratio of 0, nothing is traced and no
        // traceparent is made up.
        let reply = client.invoke(request(b"y")).await.unwrap();
        assert!(reply.metadata().get("x-traceparent-received").is_none());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_show_as_attempts_in_the_span() {
    bounded(Duration::from_secs(60), async {
        let (receiver, at, _server) = Receiver::start().await;
        let mut failing = AgentOptions::named("failing");
        failing.fail_ratio = 1.0;
        let agents = Agents::start_with(vec![failing, AgentOptions::named("ok")]).await;
        let mut cluster = planner(&agents.addrs);
        cluster.retry = Some(RetryConfig {
            methods: vec!["/agentmesh.demo.v1.Agent/Invoke".into()],
            on: vec![Code::Unavailable],
            backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(5),
            ..RetryConfig::default()
        });
        // Keep the failing agent in: this test is about the attempts.
        cluster.breaker.enabled = false;
        cluster.outlier = None;
        let sidecar = traced_sidecar(vec![cluster], at).await;
        let mut client = planner_client(Way::LocalPort, &sidecar).await;
        let mut traces = Vec::new();
        for _ in 0..6 {
            let mut req = tonic::Request::new(request(b"x"));
            req.metadata_mut()
                .insert("x-agentmesh-trace", "1".parse().unwrap());
            let reply = client.invoke(req).await.expect("a retry saves the call");
            assert_eq!(reply.get_ref().agent, "ok");
            let tp = reply
                .metadata()
                .get("x-traceparent-received")
                .unwrap()
                .to_str()
                .unwrap();
            traces.push(fields(tp).0);
        }
        let mut retried = 0;
        for t in &traces {
            let spans = receiver.wait_for("agentmesh", t, 1).await;
            assert_eq!(spans.len(), 1);
            let span = &spans[0];
            let outcomes: Vec<String> = span
                .events
                .iter()
                .filter(|e| e.name == "attempt")
                .map(|e| string(&e.attributes, "agentmesh.outcome").unwrap())
                .collect();
            assert_eq!(int(&span.attributes, "rpc.grpc.status_code"), Some(0));
            if outcomes.len() == 2 {
                retried += 1;
                assert_eq!(outcomes, ["UNAVAILABLE", "answered"], "{span:?}");
                let retry = span
                    .events
                    .iter()
                    .find(|e| e.name == "retry")
                    .expect("a retry event");
                let backoff = int(&retry.attributes, "agentmesh.backoff_ms").unwrap();
                assert!(
                    (0..=5).contains(&backoff),
                    "{backoff} ms: within the configured 5 ms"
                );
                assert_eq!(int(&span.attributes, "agentmesh.attempts"), Some(2));
            } else {
                assert_eq!(outcomes, ["answered"], "{span:?}");
            }
        }
        // Round robin sends every other first attempt to the failing agent.
        assert!(retried >= 2, "{retried} of 6 calls were retried");
    })
    .await;
}

/// Counts from `/metrics`: `agentmesh_trace_spans_total` by outcome.
async fn span_counts(admin: SocketAddr) -> BTreeMap<String, u64> {
    let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("agentmesh_trace_spans_total{outcome=\""))
        .filter_map(|l| {
            let (outcome, n) = l.split_once("\"} ")?;
            Some((outcome.to_string(), n.trim().parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_hangs_or_is_gone_slows_no_call() {
    bounded(Duration::from_secs(90), async {
        // A receiver that accepts connections and never answers, and one
        // where nothing listens.
        let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hang_at = hang.local_addr().unwrap();
        let _held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((tcp, _)) = hang.accept().await {
                open.push(tcp);
            }
        });
        for (backend, at) in [("hangs", hang_at), ("is gone", dead_address())] {
            let agents = Agents::start_with(vec![AgentOptions::named("a")]).await;
            let mut config = Config::for_test(vec![planner(&agents.addrs)]);
            config.telemetry = TelemetryConfig {
                otlp_endpoint: Some(format!("http://{at}")),
                sample_ratio: 1.0,
                max_queued_spans: 64,
                ..TelemetryConfig::default()
            };
            let sidecar = Sidecar::start(&config).await.expect("sidecar starts");
            warmed(&sidecar).await;
            let client: AgentClient<_> = planner_client(Way::LocalPort, &sidecar).await;
            // 800 calls, every one sampled, 4 at a time: more than a batch
            // (512) and the queue (64) hold, however fast the calls go.
            const CALLS: u64 = 800;
            let mut slowest = Duration::ZERO;
            let mut tasks = Vec::new();
            for _ in 0..4 {
                let mut client = client.clone();
                tasks.push(tokio::spawn(async move {
                    let mut slowest = Duration::ZERO;
                    for _ in 0..CALLS / 4 {
                        let started = tokio::time::Instant::now();
                        client
                            .invoke(request(b"x"))
                            .await
                            .expect("the call succeeds");
                        slowest = slowest.max(started.elapsed());
                    }
                    slowest
                }));
            }
            for t in tasks {
                slowest = slowest.max(t.await.unwrap());
            }
            // An export waits up to 5 s; no call waited for one.
            assert!(
                slowest < Duration::from_millis(500),
                "backend {backend}: slowest call {slowest:?}"
            );
            // Every span is accounted for: dropped at the full queue, or
            // given up when its export failed (a hung export after 5 s, so
            // up to two of them here: the batch in flight, then the queue).
            let mut counts = BTreeMap::new();
            for _ in 0..800 {
                counts = span_counts(sidecar.admin_addr()).await;
                let full = counts.get("dropped_queue_full").copied().unwrap_or(0);
                let failed = counts.get("dropped_export_failed").copied().unwrap_or(0);
                if full + failed == CALLS {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(
                counts.get("exported").copied(),
                Some(0),
                "backend {backend}: {counts:?}"
            );
            assert_eq!(
                counts["dropped_queue_full"] + counts["dropped_export_failed"],
                CALLS,
                "backend {backend}: {counts:?}"
            );
            // A hung backend holds one batch and the queue; the rest are
            // dropped at the queue rather than waiting.
            if backend == "hangs" {
                assert!(counts["dropped_queue_full"] > 0, "{counts:?}");
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_environment_configures_tracing_and_names_the_pod() {
    bounded(Duration::from_secs(60), async {
        let (receiver, at, _server) = Receiver::start().await;
        let agents = Agents::start(1).await;
        let (admin, proxy, local) = (closed_port(), closed_port(), closed_port());
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("mesh.toml");
        // No [telemetry] in the file: the environment turns tracing on.
        std::fs::write(
            &config,
            format!(
                "[admin]\nlisten = \"{admin}\"\n[listener]\nproxy = \"{proxy}\"\n[[cluster]]\nname = \"planner\"\nlocal_port = \"{local}\"\nendpoints = [{{ address = \"{}\" }}]\n",
                agents.addrs[0]
            ),
        )
        .unwrap();
        let _sidecar = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentmesh"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{at}"))
            .env("OTEL_SERVICE_NAME", "planner-caller")
            .env("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test,team=agents")
            .env("POD_NAME", "caller-7d9f")
            .env("POD_NAMESPACE", "agents")
            .kill_on_drop(true)
            .spawn()
            .expect("the sidecar starts");
        let up = eventually(Duration::from_secs(10), || std::net::TcpStream::connect(local).is_ok()).await;
        assert!(up, "the sidecar listens on its local port");
        let mut client = AgentClient::new(agentmesh::tools::client::direct(local).await.unwrap());
        let mut req = tonic::Request::new(request(b"x"));
        req.metadata_mut().insert("x-agentmesh-trace", "1".parse().unwrap());
        let reply = client.invoke(req).await.expect("the call succeeds");
        let tp = reply.metadata().get("x-traceparent-received").unwrap().to_str().unwrap();
        let spans = receiver.wait_for("planner-caller", &fields(tp).0, 1).await;
        assert_eq!(spans.len(), 1, "the span arrived under OTEL_SERVICE_NAME");
        let resources = receiver.resources.lock().unwrap().clone();
        let resource = resources.last().expect("a resource");
        for (key, want) in [
            ("service.name", "planner-caller"),
            ("k8s.pod.name", "caller-7d9f"),
            ("k8s.namespace.name", "agents"),
            ("deployment.environment", "test"),
            ("team", "agents"),
        ] {
            assert_eq!(string(resource, key).as_deref(), Some(want), "{key} in {resource:?}");
        }
    })
    .await;
}
