//! Traces: one OpenTelemetry span per proxied call, in the caller's trace.
//!
//! A call that is not sampled costs a header lookup or two. A sampled
//! call's span is built as it goes straight into the OTLP protobuf types of
//! `opentelemetry-proto`, and sent by that crate's tonic client of the OTLP
//! trace service. The SDK's span pipeline (a span, then `SpanData`, then a
//! conversion into the same protobufs, value by value through `Display`)
//! measured 63k instructions per sampled call over an unsampled one; the
//! spans made here carry the same fields for less (see the README). The
//! SDK still reads and writes the W3C headers (its propagator) and gathers
//! the resource (its detectors, so `OTEL_RESOURCE_ATTRIBUTES` counts).
//!
//! - **Context**: a caller's W3C `traceparent` (and `tracestate`) is read
//!   with the SDK's propagator; the sidecar's span is its child, and the
//!   upstream request carries a `traceparent` naming the sidecar's span as
//!   parent, so the agent's spans nest under it. A call that is not
//!   sampled keeps the caller's headers as they came.
//! - **Sampling**: the caller's sampled flag decides; a call without a
//!   parent is sampled at `sample_ratio` (default 0); `x-agentmesh-trace: 1`
//!   samples any call.
//! - **Export**: a finished span goes into a bounded queue and never waits:
//!   when the queue is full it is dropped and counted. A thread of its own
//!   sends the queue in batches; a batch the backend refuses or does not
//!   take within the export timeout is dropped and counted too. Calls are
//!   never slowed by the backend.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1 as pb_common;
use opentelemetry_proto::tonic::resource::v1::Resource as PbResource;
use opentelemetry_proto::tonic::trace::v1 as pb;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tokio::sync::mpsc;

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
    queue: mpsc::Sender<pb::Span>,
    counts: Arc<SpanCounts>,
}

impl std::fmt::Debug for Traces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traces")
            .field("ratio", &self.ratio)
            .finish_non_exhaustive()
    }
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
        let counts = Arc::new(SpanCounts::default());
        // Encoding and sending spans runs on a thread of its own, so that a
        // batch being exported never holds up a call on the proxy's
        // workers.
        let (built, exporter_built) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("span-export".into())
            .spawn({
                let (counts, endpoint) = (counts.clone(), endpoint.clone());
                move || export_thread(endpoint, resource, spans, counts, built)
            })
            .map_err(|e| anyhow::anyhow!("starting the span export thread: {e}"))?;
        exporter_built
            .recv()
            .map_err(|_| anyhow::anyhow!("the span export thread ended before it started"))??;
        tracing::info!(%endpoint, ratio = config.sample_ratio, service = %config.service_name, "tracing calls to an OTLP receiver");
        Ok(Some(Arc::new(Traces {
            ratio: config.sample_ratio,
            propagator: TraceContextPropagator::new(),
            queue,
            counts,
        })))
    }

    pub fn counts(&self) -> &SpanCounts {
        &self.counts
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
        let remote = parent.span().span_context().clone();
        let sampled = forced
            || if remote.is_valid() {
                remote.is_sampled()
            } else {
                self.ratio > 0.0 && fastrand::f64() < self.ratio
            };
        sampled.then_some(parent)
    }

    /// Starts a sampled call's span, named `name`, under `parent`; its
    /// `traceparent` (and the caller's `tracestate`) replace the caller's
    /// in `headers`.
    pub fn start_span(
        &self,
        parent: &Context,
        name: String,
        attributes: Vec<KeyValue>,
        headers: &mut HeaderMap,
    ) -> Box<CallSpan> {
        let remote = parent.span().span_context().clone();
        let (trace_id, parent_id, trace_state) = if remote.is_valid() {
            (
                remote.trace_id(),
                Some(remote.span_id()),
                remote.trace_state().clone(),
            )
        } else {
            (
                TraceId::from(fastrand::u128(1..)),
                None,
                TraceState::default(),
            )
        };
        let span_id = SpanId::from(fastrand::u64(1..));
        let context = SpanContext::new(trace_id, span_id, TraceFlags::SAMPLED, false, trace_state);
        headers.remove(&TRACEPARENT);
        headers.remove(&TRACESTATE);
        self.propagator.inject_context(
            &Context::new().with_remote_span_context(context.clone()),
            &mut HeadersMut(headers),
        );
        let span = pb::Span {
            trace_id: trace_id.to_bytes().to_vec(),
            span_id: span_id.to_bytes().to_vec(),
            trace_state: context.trace_state().header(),
            parent_span_id: parent_id.map(|p| p.to_bytes().to_vec()).unwrap_or_default(),
            // W3C flags (sampled), and whether the parent is remote: known.
            flags: 0x01 | 0x100 | if parent_id.is_some() { 0x200 } else { 0 },
            name,
            kind: pb::span::SpanKind::Client as i32,
            start_time_unix_nano: unix_nanos(SystemTime::now()),
            attributes: attributes.into_iter().map(to_pb).collect(),
            ..Default::default()
        };
        Box::new(CallSpan {
            span,
            attempts: 0,
            peer: String::new(),
            ended: false,
            queue: self.queue.clone(),
            counts: self.counts.clone(),
        })
    }
}

/// A sampled call's span. Ended by [`CallSpan::end`], or when dropped.
pub struct CallSpan {
    span: pb::Span,
    attempts: u32,
    /// The endpoint of the last attempt.
    peer: String,
    ended: bool,
    queue: mpsc::Sender<pb::Span>,
    counts: Arc<SpanCounts>,
}

impl CallSpan {
    pub fn event(&mut self, name: &'static str, attributes: Vec<KeyValue>) {
        self.span.events.push(pb::span::Event {
            time_unix_nano: unix_nanos(SystemTime::now()),
            name: name.to_string(),
            attributes: attributes.into_iter().map(to_pb).collect(),
            dropped_attributes_count: 0,
        });
    }

    /// An attempt goes to `endpoint`. The span's peer attributes name the
    /// last one (the endpoint that answered), set when the span ends.
    pub fn attempt(&mut self, endpoint: &str) {
        self.attempts += 1;
        self.peer.clear();
        self.peer.push_str(endpoint);
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
        let mut attributes = vec![KeyValue::new(
            "agentmesh.endpoint",
            endpoint.address_shared().clone(),
        )];
        if let Some(affinity) = why.affinity {
            attributes.push(KeyValue::new("agentmesh.affinity", affinity));
        }
        if let Some((index, groups, size)) = why.group {
            attributes.push(KeyValue::new(
                "agentmesh.group",
                format!("{} of {groups} ({size} endpoints)", index + 1),
            ));
        }
        for (key, value) in [
            ("agentmesh.zone", endpoint.zone()),
            ("agentmesh.version", endpoint.version()),
        ] {
            if let Some(v) = value {
                attributes.push(KeyValue::new(key, v.to_string()));
            }
        }
        if endpoint.priority() > 0 {
            attributes.push(KeyValue::new(
                "agentmesh.priority",
                i64::from(endpoint.priority()),
            ));
        }
        if !why.candidates.is_empty() {
            let described: Vec<opentelemetry::StringValue> = why
                .candidates
                .iter()
                .map(|(e, cost)| describe(e, *cost, now).into())
                .collect();
            attributes.push(KeyValue::new(
                "agentmesh.candidates",
                Value::Array(opentelemetry::Array::String(described)),
            ));
        }
        self.event("pick", attributes);
    }

    /// A retry the policy wanted was not made, and why.
    pub fn retry_refused(&mut self, why: &'static str) {
        self.event(
            "retry refused",
            vec![KeyValue::new("agentmesh.reason", why)],
        );
    }

    /// The picker's choice was passed over for another, and why.
    pub fn passed_over(&mut self, endpoint: &Arc<str>, why: &'static str) {
        self.event(
            "passed over",
            vec![
                KeyValue::new("agentmesh.endpoint", endpoint.clone()),
                KeyValue::new("agentmesh.reason", why),
            ],
        );
    }

    /// How one attempt ended.
    pub fn attempt_ended(&mut self, endpoint: &Arc<str>, outcome: impl Into<Cow<'static, str>>) {
        let outcome: Cow<'static, str> = outcome.into();
        self.event(
            "attempt",
            vec![
                KeyValue::new("agentmesh.attempt", i64::from(self.attempts)),
                KeyValue::new("agentmesh.endpoint", endpoint.clone()),
                KeyValue::new("agentmesh.outcome", outcome),
            ],
        );
    }

    /// Ends the span with the status the caller got.
    pub fn end(mut self: Box<Self>, code: tonic::Code, message: &str) {
        self.finish(code, message);
    }

    fn finish(&mut self, code: tonic::Code, message: &str) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let mut span = std::mem::take(&mut self.span);
        span.end_time_unix_nano = unix_nanos(SystemTime::now());
        use pb_common::any_value::Value as V;
        if !self.peer.is_empty() {
            let (host, port) = split_host_port(&self.peer);
            let address = pb_attr("network.peer.address", V::StringValue(host.to_string()));
            span.attributes.push(address);
            if let Some(port) = port {
                let port = pb_attr("network.peer.port", V::IntValue(i64::from(port)));
                span.attributes.push(port);
            }
        }
        let name = crate::wire::grpc::code_name(code);
        span.attributes.extend([
            pb_attr("agentmesh.attempts", V::IntValue(i64::from(self.attempts))),
            pb_attr("rpc.grpc.status_code", V::IntValue(code as i64)),
            pb_attr("rpc.response.status_code", V::StringValue(name.to_string())),
        ]);
        if code != tonic::Code::Ok {
            span.status = Some(pb::Status {
                message: format!("{name}: {message}"),
                code: pb::status::StatusCode::Error as i32,
            });
        }
        if self.queue.try_send(span).is_err() {
            self.counts.dropped_queue_full.fetch_add(1, Relaxed);
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

/// An attribute made straight as a protobuf (no `KeyValue` in between).
fn pb_attr(key: &str, value: pb_common::any_value::Value) -> pb_common::KeyValue {
    pb_common::KeyValue {
        key: key.to_string(),
        value: Some(pb_common::AnyValue { value: Some(value) }),
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

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The export thread: connects the OTLP client on a runtime of its own,
/// says whether that worked, and sends queued spans until the queue's
/// sender is gone (the tracer was dropped). A panic in the export loop is
/// logged and the loop started again.
fn export_thread(
    endpoint: String,
    resource: PbResource,
    spans: mpsc::Receiver<pb::Span>,
    counts: Arc<SpanCounts>,
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
        let client = TraceServiceClient::new(channel);
        let spans = Arc::new(tokio::sync::Mutex::new(spans));
        let resource = Arc::new(resource);
        Task::supervised("span export", move || {
            export(
                spans.clone(),
                client.clone(),
                resource.clone(),
                counts.clone(),
            )
        })
        .finished()
        .await;
    });
}

/// Sends queued spans in batches: as many as are waiting (up to
/// [`BATCH`]), after at most [`BATCH_WAIT`] once the first arrives.
async fn export(
    spans: Arc<tokio::sync::Mutex<mpsc::Receiver<pb::Span>>>,
    mut client: TraceServiceClient<tonic::transport::Channel>,
    resource: Arc<PbResource>,
    counts: Arc<SpanCounts>,
) {
    let mut spans = spans.lock().await;
    let mut failing = false;
    let scope = pb_common::InstrumentationScope {
        name: "agentmesh".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    loop {
        let Some(first) = spans.recv().await else {
            return;
        };
        let mut batch = Vec::with_capacity(BATCH);
        batch.push(first);
        let until = tokio::time::Instant::now() + BATCH_WAIT;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(until, spans.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![pb::ResourceSpans {
                resource: Some((*resource).clone()),
                scope_spans: vec![pb::ScopeSpans {
                    scope: Some(scope.clone()),
                    spans: batch,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        let sent = tokio::time::timeout(EXPORT_TIMEOUT, client.export(request));
        let failure = match sent.await {
            Ok(Ok(_)) => None,
            Ok(Err(status)) => Some(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Some(format!("no answer within {EXPORT_TIMEOUT:?}")),
        };
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
