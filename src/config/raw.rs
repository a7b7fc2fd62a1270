//! The config file as deserialised from TOML: plain `Raw*` structs that deny
//! unknown keys and hold values not yet checked.

use std::time::Duration;

use serde::Deserialize;

use super::{
    DEFAULT_ADMIN, DEFAULT_CONNECT_TIMEOUT, DEFAULT_DRAIN_TIMEOUT, DEFAULT_PROXY, Strategy,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) listener: RawListener,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) locality: RawLocality,
    #[serde(default)]
    pub(super) runtime: RawRuntime,
    #[serde(default)]
    pub(super) cluster: Vec<RawCluster>,
    pub(super) mesh: Option<RawMesh>,
    #[serde(default)]
    pub(super) telemetry: RawTelemetry,
    #[serde(default)]
    pub(super) resolver: RawResolver,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResolver {
    #[serde(default)]
    pub(super) nameservers: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    #[serde(default)]
    pub(super) otlp_endpoint: String,
    pub(super) sample_ratio: Option<f64>,
    #[serde(default)]
    pub(super) service_name: String,
    pub(super) max_queued_spans: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMesh {
    #[serde(default = "default_mesh_listen")]
    pub(super) listen: String,
    #[serde(default)]
    pub(super) advertise: String,
    #[serde(default)]
    pub(super) seeds: Vec<String>,
    #[serde(default)]
    pub(super) node_id: String,
    #[serde(default)]
    pub(super) key: String,
    #[serde(default)]
    pub(super) previous_key: String,
    #[serde(default)]
    pub(super) insecure: bool,
    #[serde(default, with = "humantime_serde")]
    pub(super) interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) stale_after: Option<Duration>,
    #[serde(default = "yes")]
    pub(super) share_load: bool,
    #[serde(default = "yes")]
    pub(super) share_ejections: bool,
    #[serde(default = "yes")]
    pub(super) warm_start: bool,
    pub(super) max_report_endpoints: Option<i64>,
}

fn default_mesh_listen() -> String {
    super::DEFAULT_MESH_LISTEN.to_string()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuntime {
    #[serde(default)]
    pub(super) workers: usize,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLocality {
    pub(super) zone: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    #[serde(default = "default_proxy")]
    pub(super) proxy: String,
    #[serde(default)]
    pub(super) refuse_unknown: bool,
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub(super) drain_timeout: Duration,
    pub(super) max_calls_per_connection: Option<i64>,
    pub(super) max_connections: Option<i64>,
    #[serde(default, with = "humantime_serde")]
    pub(super) header_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) idle_timeout: Option<Duration>,
    pub(super) transparent: Option<String>,
}

impl Default for RawListener {
    fn default() -> Self {
        RawListener {
            proxy: default_proxy(),
            refuse_unknown: false,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_calls_per_connection: None,
            max_connections: None,
            header_timeout: None,
            idle_timeout: None,
            transparent: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    #[serde(default = "default_admin")]
    pub(super) listen: String,
    #[serde(default)]
    pub(super) token: Option<String>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: default_admin(),
            token: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) name: String,
    #[serde(default)]
    pub(super) aliases: Vec<String>,
    #[serde(default)]
    pub(super) strategy: Strategy,
    pub(super) local_port: Option<String>,
    /// Transparent mode: the service addresses whose redirected
    /// connections are this cluster's.
    #[serde(default, rename = "match")]
    pub(super) matches: Vec<String>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub(super) connect_timeout: Duration,
    #[serde(default)]
    pub(super) endpoints: Vec<RawEndpoint>,
    pub(super) choices: Option<RawChoices>,
    #[serde(default = "yes")]
    pub(super) remember_runner_up: bool,
    #[serde(default)]
    pub(super) latency: RawLatency,
    #[serde(default)]
    pub(super) performance: RawPerformance,
    pub(super) hot_quantile: Option<f64>,
    pub(super) session_affinity: Option<RawAffinity>,
    #[serde(default)]
    pub(super) split: std::collections::BTreeMap<String, u32>,
    pub(super) overprovisioning: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    pub(super) request_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) keepalive_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) keepalive_timeout: Option<Duration>,
    pub(super) max_in_flight: Option<i64>,
    pub(super) max_in_flight_per_endpoint: Option<i64>,
    pub(super) panic_threshold: Option<f64>,
    pub(super) circuit_breaker: Option<RawBreaker>,
    pub(super) outlier_detection: Option<RawOutlier>,
    pub(super) health_check: Option<RawHealthCheck>,
    pub(super) retry: Option<RawRetry>,
    #[serde(default)]
    pub(super) rate_limit: Vec<RawRateLimit>,
    pub(super) tls: Option<RawTls>,
    pub(super) dns: Option<String>,
    pub(super) kubernetes: Option<RawKubernetes>,
    #[serde(default, with = "humantime_serde")]
    pub(super) dns_refresh: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) ca: String,
    pub(super) cert: Option<String>,
    pub(super) key: Option<String>,
    pub(super) server_name: Option<String>,
    pub(super) identity: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub(super) reload_every: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreaker {
    pub(super) enabled: Option<bool>,
    pub(super) failure_threshold: Option<i64>,
    #[serde(default, with = "humantime_serde")]
    pub(super) open_for: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) max_open_for: Option<Duration>,
    pub(super) failures: Option<Vec<String>>,
    pub(super) max_ejection_percent: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutlier {
    pub(super) enabled: Option<bool>,
    pub(super) min_success_rate: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    pub(super) window: Option<Duration>,
    pub(super) min_calls: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    pub(super) enabled: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub(super) interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) timeout: Option<Duration>,
    pub(super) unhealthy_threshold: Option<i64>,
    pub(super) healthy_threshold: Option<i64>,
    pub(super) service: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    pub(super) methods: Vec<String>,
    pub(super) on: Option<Vec<String>>,
    pub(super) max_attempts: Option<i64>,
    #[serde(default, with = "humantime_serde")]
    pub(super) backoff: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) max_backoff: Option<Duration>,
    pub(super) budget_percent: Option<f64>,
    pub(super) min_retries_per_second: Option<i64>,
    pub(super) buffer_limit: Option<i64>,
    #[serde(default)]
    pub(super) scope: RawScope,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    pub(super) calls: i64,
    #[serde(with = "humantime_serde")]
    pub(super) window: Duration,
    pub(super) key: Option<String>,
    pub(super) max_keys: Option<i64>,
    #[serde(default)]
    pub(super) scope: RawScope,
}

/// Whose calls a limit counts: this sidecar's (`"local"`, the default) or
/// every sidecar's in the mesh, shared by gossip (`"mesh"`).
#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawScope {
    #[default]
    Local,
    Mesh,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEndpoint {
    pub(super) address: String,
    #[serde(default = "default_weight")]
    pub(super) weight: u32,
    pub(super) zone: Option<String>,
    #[serde(default)]
    pub(super) priority: u32,
    pub(super) version: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawChoices {
    Count(i64),
    Word(String),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLatency {
    #[serde(default, with = "humantime_serde")]
    pub(super) decay: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) default_rtt: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) failure_penalty: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPerformance {
    #[serde(default, with = "humantime_serde")]
    pub(super) window: Option<Duration>,
    pub(super) success_weight: Option<f64>,
    pub(super) latency_weight: Option<f64>,
    pub(super) score: Option<super::PerformanceScore>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAffinity {
    pub(super) header: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub(super) ttl: Option<Duration>,
    pub(super) max_sessions: Option<usize>,
    pub(super) balance_factor: Option<f64>,
}

fn default_proxy() -> String {
    DEFAULT_PROXY.into()
}
fn default_admin() -> String {
    DEFAULT_ADMIN.into()
}
fn default_drain() -> Duration {
    DEFAULT_DRAIN_TIMEOUT
}
fn yes() -> bool {
    true
}

fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}
fn default_weight() -> u32 {
    1
}

/// A cluster's `kubernetes` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKubernetes {
    pub(super) service: String,
    pub(super) namespace: Option<String>,
    pub(super) port: RawPort,
}

/// A port by name or number.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawPort {
    Number(i64),
    Name(String),
}
