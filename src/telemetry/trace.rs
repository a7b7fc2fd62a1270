//! Traces: one OpenTelemetry span per proxied call, in the caller's trace.
//!
//! A call that is not sampled costs a header lookup or two. A sampled
//! call's span is written as it goes straight into its OTLP protobuf
//! encoding ([`otlp`]), and a batch of those bytes is sent as one export
//! to the OTLP trace service. Two earlier designs cost more per sampled
//! call: the SDK's span pipeline (a span, then `SpanData`, then a
//! conversion into `opentelemetry-proto`'s structs, value by value through
//! `Display`), and building those structs directly and encoding them at
//! export (see the README's figures). The SDK still reads the caller's W3C
//! headers (its propagator) and gathers the resource (its detectors, so
//! `OTEL_RESOURCE_ATTRIBUTES` counts).
//!
//! - **Context**: a caller's W3C `traceparent` (and `tracestate`) is read
//!   with the SDK's propagator; the sidecar's span is its child, and the
//!   upstream request carries a `traceparent` naming the sidecar's span as
//!   parent (and the caller's `tracestate`), so the agent's spans nest
//!   under it. A call that is not
//!   sampled keeps the caller's headers as they came.
//! - **Sampling**: the caller's sampled flag decides; a call without a
//!   parent is sampled at `sample_ratio` (default 0); `x-agentmesh-trace: 1`
//!   samples any call.
//! - **Export**: a finished span goes into a bounded queue and never waits:
//!   when the queue is full it is dropped and counted. A thread of its own
//!   sends the queue in batches, woken once a batch rather than once a
//!   span; a batch the backend refuses or does not
//!   take within the export timeout is dropped and counted too. Calls are
//!   never slowed by the backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_proto::tonic::common::v1 as pb_common;
use opentelemetry_proto::tonic::resource::v1::Resource as PbResource;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use prost::Message as _;
use tokio::sync::{Notify, mpsc};

use super::otlp::{Attr, Batch, Envelope, Fields, PreEncoded, span, status};

use crate::balance::explain::Explanation;
use crate::config::TelemetryConfig;
use crate::endpoint::Endpoint;
use crate::util::Task;

/// The header that samples a call whatever its parent says.
pub const FORCE_HEADER: HeaderName = HeaderName::from_static("x-agentmesh-trace");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Spans sent to the backend in one export at most.
const BATCH: usize = 512;
/// How long a batch may wait for more spans.
const BATCH_WAIT: Duration = Duration::from_millis(200);
/// How long one export may take before its spans are given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// What became of finished spans (relaxed atomics).
#[derive(Debug, Default)]
pub struct SpanCounts {
    pub exported: AtomicU64,
    /// Dropped because the queue was full (the backend is slow or down).
    pub dropped_queue_full: AtomicU64,
    /// Dropped because the backend refused them or did not answer in time.
    pub dropped_export_failed: AtomicU64,
}

/// The tracer: decides which calls get a span, and starts them.
pub struct Traces {
    ratio: f64,
    propagator: TraceContextPropagator,
    shared: Arc<Shared>,
}

/// What a span needs when it ends: the queue to the export thread and
/// the counts.
struct Shared {
    queue: mpsc::Sender<Vec<u8>>,
    counts: SpanCounts,
    /// Spans in the queue (about: the export thread takes them off in
    /// batches); the span that makes it [`BATCH`] wakes the export thread
    /// early, so a busy sidecar wakes it once a batch, not once a span.
    queued: AtomicUsize,
    batch_ready: Notify,
}

impl std::fmt::Debug for Traces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traces")
            .field("ratio", &self.ratio)
            .finish_non_exhaustive()
    }
}

/// What every call's span says of it: the OpenTelemetry RPC conventions'
/// attributes and the cluster's own.
#[derive(Debug, Clone, Copy)]
pub struct CallInfo<'a> {
    /// `package.Service/Method`: the span's name and `rpc.method`.
    pub method: &'a str,
    pub server: &'a str,
    pub port: Option<i64>,
    pub cluster: &'a str,
    pub strategy: &'a str,
}

impl Traces {
    /// Starts the exporter, if the config names an OTLP endpoint; `None`
    /// turns tracing off entirely.
    pub fn start(config: &TelemetryConfig) -> anyhow::Result<Option<Arc<Traces>>> {
        let Some(endpoint) = config.otlp_endpoint.clone() else {
            return Ok(None);
        };
        let resource = resource(&config.service_name);
        let (queue, spans) = mpsc::channel(config.max_queued_spans);
        let shared = Arc::new(Shared {
            queue,
            counts: SpanCounts::default(),
            queued: AtomicUsize::new(0),
            batch_ready: Notify::new(),
        });
        // Sending spans runs on a thread of its own, so that a batch being
        // exported never holds up a call on the proxy's workers.
        let (built, exporter_built) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("span-export".into())
            .spawn({
                let (shared, endpoint) = (shared.clone(), endpoint.clone());
                move || export_thread(endpoint, resource, spans, shared, built)
            })
            .map_err(|e| anyhow::anyhow!("starting the span export thread: {e}"))?;
        exporter_built
            .recv()
            .map_err(|_| anyhow::anyhow!("the span export thread ended before it started"))??;
        tracing::info!(%endpoint, ratio = config.sample_ratio, service = %config.service_name, "tracing calls to an OTLP receiver");
        Ok(Some(Arc::new(Traces {
            ratio: config.sample_ratio,
            propagator: TraceContextPropagator::new(),
            shared,
        })))
    }

    pub fn counts(&self) -> &SpanCounts {
        &self.shared.counts
    }

    /// Whether a call with `headers` gets a span: `None` if not, else the
    /// parent to start it under (empty for a new trace). A call with no
    /// `traceparent`, no `x-agentmesh-trace` and a ratio of 0 costs two
    /// header lookups.
    pub fn sample(&self, headers: &HeaderMap) -> Option<Context> {
        let forced = headers.get(&FORCE_HEADER).is_some_and(|v| v == "1");
        let has_parent = headers.contains_key(&TRACEPARENT);
        if !forced && !has_parent && self.ratio <= 0.0 {
            return None;
        }
        if has_parent
            && !forced
            && headers.get(&TRACEPARENT).and_then(|v| flags(v.as_bytes())) == Some(false)
        {
            // The caller's trace is not sampled: nothing to parse further,
            // and its headers go on as they came.
            return None;
        }
        let parent = if has_parent {
            self.propagator.extract(&Headers(headers))
        } else {
            Context::new()
        };
        let span = parent.span();
        let remote = span.span_context();
        let sampled = forced
            || if remote.is_valid() {
                remote.is_sampled()
            } else {
                self.ratio > 0.0 && fastrand::f64() < self.ratio
            };
        sampled.then_some(parent)
    }

    /// Starts a sampled call's span under `parent`; [`Started::headers`]
    /// then gives the upstream request its `traceparent`.
    pub fn start_span(&self, parent: &Context, call: &CallInfo<'_>) -> Started {
        let parent = parent.span();
        let remote = parent.span_context();
        let trace_id = if remote.is_valid() {
            remote.trace_id().to_bytes()
        } else {
            fastrand::u128(1..).to_be_bytes()
        };
        let span_id = fastrand::u64(1..).to_be_bytes();
        let mut buf = Vec::with_capacity(1024);
        let mut f = Fields(&mut buf);
        f.bytes(span::TRACE_ID, &trace_id);
        f.bytes(span::SPAN_ID, &span_id);
        // W3C flags (sampled), and whether the parent is remote: known.
        let mut flags = 0x01 | 0x100;
        if remote.is_valid() {
            let state = remote.trace_state().header();
            if !state.is_empty() {
                f.string(span::TRACE_STATE, &state);
            }
            f.bytes(span::PARENT_SPAN_ID, &remote.span_id().to_bytes());
            flags |= 0x200;
        }
        f.fixed32(span::FLAGS, flags);
        f.string(span::NAME, call.method);
        f.varint(span::KIND, span::KIND_CLIENT);
        f.fixed64(span::START_TIME, unix_nanos(SystemTime::now()));
        const A: u32 = span::ATTRIBUTES;
        f.attribute(A, "rpc.system.name", Attr::Str("grpc"));
        f.attribute(A, "rpc.method", Attr::Str(call.method));
        f.attribute(A, "server.address", Attr::Str(call.server));
        if let Some(port) = call.port {
            f.attribute(A, "server.port", Attr::Int(port));
        }
        f.attribute(A, "agentmesh.cluster", Attr::Str(call.cluster));
        f.attribute(A, "agentmesh.strategy", Attr::Str(call.strategy));
        Started {
            span: Box::new(CallSpan {
                buf,
                attempts: 0,
                peer: None,
                ended: false,
                shared: self.shared.clone(),
            }),
            traceparent: traceparent(&trace_id, &span_id),
            new_trace: !remote.is_valid(),
        }
    }
}

/// A span just started, and the `traceparent` it gives the upstream
/// request.
pub struct Started {
    span: Box<CallSpan>,
    traceparent: HeaderValue,
    new_trace: bool,
}

impl Started {
    /// Writes the span's `traceparent` into the upstream request's
    /// `headers` (the caller's `tracestate` stays; in a new trace there is
    /// none to keep), and gives the span.
    pub fn headers(self, headers: &mut HeaderMap) -> Box<CallSpan> {
        if self.new_trace {
            headers.remove(&TRACESTATE);
        }
        headers.insert(TRACEPARENT, self.traceparent);
        self.span
    }
}

/// `00-<trace id>-<span id>-01`, marked sensitive so that the HPACK
/// encoder sends it as a literal instead of filling its table with a
/// value that never comes again.
fn traceparent(trace_id: &[u8; 16], span_id: &[u8; 8]) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 55];
    out[..3].copy_from_slice(b"00-");
    for (i, b) in trace_id.iter().chain(span_id).enumerate() {
        // The span id starts after the trace id's 32 digits and a dash.
        let at = 3 + 2 * i + usize::from(i >= 16);
        out[at] = HEX[usize::from(b >> 4)];
        out[at + 1] = HEX[usize::from(b & 0xf)];
    }
    out[35] = b'-';
    out[52..].copy_from_slice(b"-01");
    let mut value = HeaderValue::from_bytes(&out).expect("hex digits and dashes");
    value.set_sensitive(true);
    value
}

/// A sampled call's span, as the bytes of its OTLP encoding so far. Ended
/// by [`CallSpan::end`], or when dropped.
pub struct CallSpan {
    buf: Vec<u8>,
    attempts: u32,
    /// The endpoint of the last attempt.
    peer: Option<Arc<str>>,
    ended: bool,
    shared: Arc<Shared>,
}

impl CallSpan {
    pub fn event(&mut self, name: &str, attributes: &[(&str, Attr<'_>)]) {
        Fields(&mut self.buf).event(unix_nanos(SystemTime::now()), name, attributes);
    }

    /// An attempt goes to `endpoint`. The span's peer attributes name the
    /// last one (the endpoint that answered), set when the span ends.
    pub fn attempt(&mut self, endpoint: &Arc<str>) {
        self.attempts += 1;
        self.peer = Some(endpoint.clone());
    }

    /// The picker chose `endpoint`, for the reasons in `why`: an event
    /// naming the candidates it compared, each one's cost and what the
    /// cost was made of (this sidecar's figures, or the mesh's and how old).
    pub fn picked(&mut self, endpoint: &Endpoint, why: Explanation) {
        if why.candidates.is_empty()
            && why.affinity.is_none()
            && why.group.is_none()
            && endpoint.zone().is_none()
            && endpoint.version().is_none()
        {
            // Nothing compared and nothing placed it (round robin over one
            // group): the attempt event names the endpoint already.
            return;
        }
        let now = tokio::time::Instant::now();
        let group = why
            .group
            .map(|(index, groups, size)| format!("{} of {groups} ({size} endpoints)", index + 1));
        let described: Vec<String> = why
            .candidates
            .iter()
            .map(|(e, cost)| describe(e, *cost, now))
            .collect();
        let mut attributes = Vec::with_capacity(7);
        attributes.push(("agentmesh.endpoint", Attr::Str(endpoint.address())));
        if let Some(affinity) = why.affinity {
            attributes.push(("agentmesh.affinity", Attr::Str(affinity)));
        }
        if let Some(group) = &group {
            attributes.push(("agentmesh.group", Attr::Str(group)));
        }
        if let Some(zone) = endpoint.zone() {
            attributes.push(("agentmesh.zone", Attr::Str(zone)));
        }
        if let Some(version) = endpoint.version() {
            attributes.push(("agentmesh.version", Attr::Str(version)));
        }
        if endpoint.priority() > 0 {
            attributes.push((
                "agentmesh.priority",
                Attr::Int(i64::from(endpoint.priority())),
            ));
        }
        if !described.is_empty() {
            attributes.push(("agentmesh.candidates", Attr::Strs(&described)));
        }
        self.event("pick", &attributes);
    }

    /// A retry the policy wanted was not made, and why.
    pub fn retry_refused(&mut self, why: &str) {
        self.event("retry refused", &[("agentmesh.reason", Attr::Str(why))]);
    }

    /// The picker's choice was passed over for another, and why.
    pub fn passed_over(&mut self, endpoint: &str, why: &str) {
        self.event(
            "passed over",
            &[
                ("agentmesh.endpoint", Attr::Str(endpoint)),
                ("agentmesh.reason", Attr::Str(why)),
            ],
        );
    }

    /// How one attempt ended.
    pub fn attempt_ended(&mut self, endpoint: &str, outcome: &str) {
        let attempt = i64::from(self.attempts);
        self.event(
            "attempt",
            &[
                ("agentmesh.attempt", Attr::Int(attempt)),
                ("agentmesh.endpoint", Attr::Str(endpoint)),
                ("agentmesh.outcome", Attr::Str(outcome)),
            ],
        );
    }

    /// Ends the span with the status the caller got.
    pub fn end(mut self, code: tonic::Code, message: &str) {
        self.finish(code, message);
    }

    fn finish(&mut self, code: tonic::Code, message: &str) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let mut buf = std::mem::take(&mut self.buf);
        let mut f = Fields(&mut buf);
        const A: u32 = span::ATTRIBUTES;
        if let Some(peer) = &self.peer {
            let (host, port) = split_host_port(peer);
            f.attribute(A, "network.peer.address", Attr::Str(host));
            if let Some(port) = port {
                f.attribute(A, "network.peer.port", Attr::Int(i64::from(port)));
            }
        }
        let name = crate::wire::grpc::code_name(code);
        f.attribute(A, "agentmesh.attempts", Attr::Int(i64::from(self.attempts)));
        f.attribute(A, "rpc.grpc.status_code", Attr::Int(code as i64));
        f.attribute(A, "rpc.response.status_code", Attr::Str(name));
        f.fixed64(span::END_TIME, unix_nanos(SystemTime::now()));
        if code != tonic::Code::Ok {
            f.message(span::STATUS, |s| {
                s.string(status::MESSAGE, &format!("{name}: {message}"));
                s.varint(status::CODE, status::CODE_ERROR);
            });
        }
        let shared = &self.shared;
        if shared.queue.try_send(buf).is_err() {
            shared.counts.dropped_queue_full.fetch_add(1, Relaxed);
        } else if shared.queued.fetch_add(1, Relaxed) + 1 == BATCH {
            shared.batch_ready.notify_one();
        }
    }
}

impl Drop for CallSpan {
    fn drop(&mut self) {
        // Dropped without an end: the caller went away.
        self.finish(tonic::Code::Cancelled, "the caller went away");
    }
}

/// Whether a well-formed W3C `traceparent` has its sampled flag set
/// (`None` if it is not well formed: the SDK's propagator then treats it
/// as absent). Only the fixed layout of version 00, or a later version's
/// first 55 bytes, is read: `vv-<32 hex>-<16 hex>-ff`.
fn flags(traceparent: &[u8]) -> Option<bool> {
    let hex = |b: &[u8]| b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let t = traceparent;
    let version_ok = t.len() == 55 || (t.len() > 55 && t[..2] != *b"00" && t[55] == b'-');
    if !version_ok
        || t[..2] == *b"ff"
        || !hex(&t[..2])
        || t[2] != b'-'
        || t[35] != b'-'
        || t[52] != b'-'
    {
        return None;
    }
    let (trace_id, parent_id, flags) = (&t[3..35], &t[36..52], &t[53..55]);
    if !hex(trace_id) || !hex(parent_id) || !hex(flags) {
        return None;
    }
    if trace_id.iter().all(|&c| c == b'0') || parent_id.iter().all(|&c| c == b'0') {
        return None;
    }
    let low = match flags[1] {
        c @ b'0'..=b'9' => c - b'0',
        c => c - b'a' + 10,
    };
    Some(low & 1 == 1)
}

/// One candidate, for the span: its cost and what went into it.
fn describe(e: &Endpoint, cost: f64, now: tokio::time::Instant) -> String {
    use std::fmt::Write as _;
    let load = e.load();
    let mut out = format!(
        "{} cost {cost:.3}: {} in flight here",
        e.address(),
        load.in_flight()
    );
    let age = load.mesh_age(now);
    if let Some(age) = age {
        let _ = write!(out, ", {:.1} from peers", load.mesh_in_flight());
        if let Some(ns) = load.mesh_rtt_ns() {
            let _ = write!(out, ", peers' latency {:.1} ms", ns / 1e6);
        }
        let _ = write!(out, " (mesh, reported {} ms ago)", age.as_millis());
    }
    if let Some(ns) = load.own_rtt_estimate(now) {
        let _ = write!(out, ", latency {:.1} ms measured here", ns / 1e6);
    }
    if e.weight().get() != 1 {
        let _ = write!(out, ", weight {}", e.weight());
    }
    out
}

/// `host:port` (or `[v6]:port`) split; the port `None` if absent.
fn split_host_port(address: &str) -> (&str, Option<u16>) {
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => match port.parse() {
            Ok(p) => (host.trim_start_matches('[').trim_end_matches(']'), Some(p)),
            Err(_) => (address, None),
        },
        _ => (address, None),
    }
}

/// The sidecar's resource: service name and version, the Kubernetes pod
/// and namespace where the Downward API gives them (`POD_NAME`,
/// `POD_NAMESPACE`), and `OTEL_RESOURCE_ATTRIBUTES` (the SDK's detectors).
fn resource(service_name: &str) -> PbResource {
    let mut attributes = vec![KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))];
    for (var, key) in [
        ("POD_NAME", "k8s.pod.name"),
        ("POD_NAMESPACE", "k8s.namespace.name"),
    ] {
        if let Ok(v) = std::env::var(var) {
            if !v.trim().is_empty() {
                attributes.push(KeyValue::new(key, v));
            }
        }
    }
    let resource = Resource::builder()
        .with_service_name(service_name.to_string())
        .with_attributes(attributes)
        .build();
    PbResource {
        attributes: resource
            .iter()
            .map(|(k, v)| to_pb(KeyValue::new(k.clone(), v.clone())))
            .collect(),
        ..Default::default()
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn pb_value(value: Value) -> pb_common::AnyValue {
    use opentelemetry::Array;
    use pb_common::any_value::Value as V;
    let value = match value {
        Value::Bool(b) => V::BoolValue(b),
        Value::I64(i) => V::IntValue(i),
        Value::F64(f) => V::DoubleValue(f),
        Value::String(s) => V::StringValue(s.into()),
        Value::Array(a) => {
            let values = match a {
                Array::Bool(v) => v.into_iter().map(Value::Bool).map(pb_value).collect(),
                Array::I64(v) => v.into_iter().map(Value::I64).map(pb_value).collect(),
                Array::F64(v) => v.into_iter().map(Value::F64).map(pb_value).collect(),
                Array::String(v) => v.into_iter().map(Value::String).map(pb_value).collect(),
                _ => Vec::new(),
            };
            V::ArrayValue(pb_common::ArrayValue { values })
        }
        other => V::StringValue(other.to_string()),
    };
    pb_common::AnyValue { value: Some(value) }
}

fn to_pb(kv: KeyValue) -> pb_common::KeyValue {
    pb_common::KeyValue {
        key: kv.key.as_str().to_string(),
        value: Some(pb_value(kv.value)),
        ..Default::default()
    }
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// The export thread: connects the OTLP client on a runtime of its own,
/// says whether that worked, and sends queued spans until the queue's
/// sender is gone (the tracer was dropped). A panic in the export loop is
/// logged and the loop started again.
fn export_thread(
    endpoint: String,
    resource: PbResource,
    spans: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
    built: std::sync::mpsc::Sender<anyhow::Result<()>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = built.send(Err(anyhow::anyhow!("the span export runtime: {e}")));
            return;
        }
    };
    runtime.block_on(async move {
        let channel = match tonic::transport::Endpoint::from_shared(endpoint.clone()) {
            Ok(e) => e
                .timeout(EXPORT_TIMEOUT)
                .connect_timeout(EXPORT_TIMEOUT)
                .connect_lazy(),
            Err(e) => {
                let _ = built.send(Err(anyhow::anyhow!(
                    "telemetry.otlp_endpoint {endpoint:?}: {e}"
                )));
                return;
            }
        };
        let _ = built.send(Ok(()));
        let client = tonic::client::Grpc::new(channel);
        let spans = Arc::new(tokio::sync::Mutex::new(spans));
        let scope = pb_common::InstrumentationScope {
            name: "agentmesh".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        };
        let envelope = Arc::new(Envelope {
            resource: resource.encode_to_vec(),
            scope: scope.encode_to_vec(),
        });
        Task::supervised("span export", move || {
            export(
                spans.clone(),
                client.clone(),
                envelope.clone(),
                shared.clone(),
            )
        })
        .finished()
        .await;
    });
}

/// Sends queued spans in batches: once the first span arrives, the rest
/// of its batch (up to [`BATCH`]) gathers for [`BATCH_WAIT`], or until a
/// batch's worth is queued. The queue is read without waiting while they
/// gather, so a span does not wake this thread.
async fn export(
    spans: Arc<tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>>,
    mut client: tonic::client::Grpc<tonic::transport::Channel>,
    envelope: Arc<Envelope>,
    shared: Arc<Shared>,
) {
    let mut spans = spans.lock().await;
    let mut failing = false;
    let path = http::uri::PathAndQuery::from_static(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    );
    let counts = &shared.counts;
    loop {
        let mut batch = Vec::with_capacity(BATCH);
        let Some(first) = spans.recv().await else {
            return;
        };
        batch.push(first);
        let _ = tokio::time::timeout(BATCH_WAIT, shared.batch_ready.notified()).await;
        while batch.len() < BATCH {
            match spans.try_recv() {
                Ok(span) => batch.push(span),
                Err(_) => break,
            }
        }
        let n = batch.len();
        shared.queued.fetch_sub(n, Relaxed);
        let request = Batch {
            envelope: envelope.clone(),
            spans: batch,
        };
        let sent = tokio::time::timeout(EXPORT_TIMEOUT, async {
            client
                .ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            client
                .unary(tonic::Request::new(request), path.clone(), PreEncoded)
                .await
        });
        let failure = match sent.await {
            Ok(Ok(_)) => None,
            Ok(Err(status)) => Some(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Some(format!("no answer within {EXPORT_TIMEOUT:?}")),
        };
        let n = n as u64;
        match failure {
            None => {
                counts.exported.fetch_add(n, Relaxed);
                if std::mem::replace(&mut failing, false) {
                    tracing::info!("span export works again");
                }
            }
            Some(error) => {
                counts.dropped_export_failed.fetch_add(n, Relaxed);
                // Logged when exports start failing, not for every batch.
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(%error, spans = n, "span export failed; spans are dropped (and counted) until it works again");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sampled_flag_is_read_from_well_formed_traceparents_only() {
        let tp = |s: &str| flags(s.as_bytes());
        assert_eq!(
            tp("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some(true)
        );
        assert_eq!(
            tp("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
            Some(false)
        );
        assert_eq!(
            tp("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03"),
            Some(true)
        );
        assert_eq!(
            tp("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-02"),
            Some(false)
        );
        // A later version may carry more after the flags.
        assert_eq!(
            tp("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more"),
            Some(true)
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert_eq!(tp(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn host_and_port_are_split_for_the_peer_attributes() {
        assert_eq!(split_host_port("10.0.0.7:50051"), ("10.0.0.7", Some(50051)));
        assert_eq!(split_host_port("[::1]:50051"), ("::1", Some(50051)));
        assert_eq!(
            split_host_port("planner-0.planner"),
            ("planner-0.planner", None)
        );
    }
}
