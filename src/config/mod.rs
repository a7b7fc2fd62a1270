//! The sidecar's configuration: one TOML file, validated once at the edge.
//!
//! [`Config::parse`] goes in four steps. The text is parsed as TOML (syntax
//! errors carry a line and column); `env` replaces `${VAR}` in string values
//! from the environment; the tree is deserialised into the plain structs of
//! `raw`, which deny unknown keys; and `validate` turns those into the types
//! here, which cannot hold a weight of 0, an unparsable address or two
//! clusters with one name. Every error names the file, the key
//! (`cluster[1].endpoints[0].weight`) and the reason.

mod env;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::endpoint::FailureClasses;
use env::substitute_env;
use raw::RawConfig;

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listener: ListenerConfig,
    pub admin: AdminConfig,
    pub locality: LocalityConfig,
    pub runtime: RuntimeConfig,
    pub clusters: Vec<ClusterConfig>,
    /// Gossip with peer sidecars; `None`: no `[mesh]`, no gossip.
    pub mesh: Option<MeshConfig>,
    pub telemetry: TelemetryConfig,
}

/// `[telemetry]`: traces sent to an OpenTelemetry backend.
#[derive(Clone, Debug, PartialEq)]
pub struct TelemetryConfig {
    /// Where spans go (OTLP over gRPC): `otlp_endpoint`, else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; `None`: no tracing at all.
    pub otlp_endpoint: Option<String>,
    /// The share of calls without a sampled parent that get a span.
    pub sample_ratio: f64,
    /// `service_name`, else `OTEL_SERVICE_NAME`, else `agentmesh`.
    pub service_name: String,
    /// Spans waiting for export at most; more are dropped and counted.
    pub max_queued_spans: usize,
}

pub const DEFAULT_MAX_QUEUED_SPANS: usize = 2048;
pub const DEFAULT_SERVICE_NAME: &str = "agentmesh";

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            sample_ratio: 0.0,
            service_name: DEFAULT_SERVICE_NAME.into(),
            max_queued_spans: DEFAULT_MAX_QUEUED_SPANS,
        }
    }
}

/// `[mesh]`: gossip with peer sidecars (see [`crate::mesh`]).
#[derive(Clone, Debug, PartialEq)]
pub struct MeshConfig {
    /// Where this sidecar gossips (UDP).
    pub listen: SocketAddr,
    /// The address peers reach it at.
    pub advertise: SocketAddr,
    /// `host:port` of sidecars to join through; names are resolved again
    /// each time they are used.
    pub seeds: Vec<String>,
    pub node_id: String,
    /// The shared secret and the one before it; `None` only when
    /// `insecure = true` was written out.
    pub key: Option<Vec<u8>>,
    pub previous_key: Option<Vec<u8>>,
    /// How often this sidecar publishes what changed and gossips.
    pub interval: Duration,
    /// A peer's report older than this is not used.
    pub stale_after: Duration,
    /// `least_connections` counts peers' calls in flight.
    pub share_load: bool,
    /// An endpoint a peer ejected is taken out here too.
    pub share_ejections: bool,
    /// `latency` uses peers' estimates for endpoints not measured here.
    pub warm_start: bool,
    /// At most this many reports per cluster each interval, busiest first.
    pub max_report_endpoints: usize,
}

pub const DEFAULT_MESH_LISTEN: &str = "0.0.0.0:15002";
pub const DEFAULT_MESH_INTERVAL: Duration = Duration::from_millis(200);
pub const DEFAULT_MESH_STALE_AFTER: Duration = Duration::from_secs(2);
pub const DEFAULT_MAX_REPORT_ENDPOINTS: usize = 64;

/// The sidecar's threads.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct RuntimeConfig {
    /// Worker threads: 0 for one per CPU, 1 for a single event loop.
    pub workers: usize,
}

/// Where this sidecar runs.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct LocalityConfig {
    /// The sidecar's own zone; calls prefer endpoints of this zone.
    pub zone: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ListenerConfig {
    /// Proxy mode (HTTP CONNECT) and authority mode (h2c prior knowledge).
    pub proxy: SocketAddr,
    /// Refuse CONNECTs to targets that no cluster names, instead of tunnelling
    /// them as plain TCP.
    pub refuse_unknown: bool,
    /// How long in-flight calls may take to finish after SIGTERM.
    pub drain_timeout: Duration,
    /// Calls one caller connection may have open at once (HTTP/2's
    /// SETTINGS_MAX_CONCURRENT_STREAMS), so that no one connection can take
    /// every slot a cluster has.
    pub max_calls_per_connection: u32,
    /// How long a new caller connection (every listener, the admin port's
    /// too) has to send its request head: the CONNECT head or the HTTP/2
    /// preface and its SETTINGS.
    pub header_timeout: Duration,
    /// A caller connection with no call open, or a plain TCP tunnel with no
    /// byte either way, is closed after this long (HTTP/2: GOAWAY first).
    pub idle_timeout: Duration,
    /// Caller connections open at once, over the proxy port and the local
    /// ports together; more are closed as they come. `None`: as many as the
    /// process's file limit leaves room for (see
    /// [`crate::listener::connection_limit`]).
    pub max_connections: Option<u32>,
    /// Transparent mode: where connections redirected by iptables come
    /// (see [`crate::listener::transparent`]); `None`: off.
    pub transparent: Option<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Lets the admin API's writes come from other hosts when sent with
    /// it (`authorization: Bearer TOKEN`); without it, only from loopback.
    pub token: Option<Token>,
}

/// A secret that `Debug` does not print.
#[derive(Clone, PartialEq)]
pub struct Token(pub String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClusterConfig {
    pub name: String,
    pub aliases: Vec<String>,
    pub strategy: Strategy,
    pub local_port: Option<SocketAddr>,
    /// Transparent mode: original destinations that are this cluster's
    /// (its Service's address), beside its endpoints' own addresses.
    pub matches: Vec<SocketAddr>,
    /// ...and names whose addresses are (a Service's name, which resolves
    /// to its ClusterIP), with the port; resolved again every 5 s.
    pub match_names: Vec<(String, u16)>,
    pub connect_timeout: Duration,
    pub endpoints: Vec<EndpointConfig>,
    /// How many random candidates the load-aware strategies compare.
    pub choices: Choices,
    /// Whether the previous pick's runner-up is compared again, beside the
    /// random candidates (with `choices` below all).
    pub remember_runner_up: bool,
    pub latency: LatencyConfig,
    pub performance: PerformanceConfig,
    /// `hot_cold`: an endpoint whose calls in flight are above this
    /// quantile of the cluster's is hot.
    pub hot_quantile: f64,
    pub affinity: Option<AffinityConfig>,
    /// Traffic shares by endpoint version, e.g. `[("v1", 90), ("v2", 10)]`;
    /// empty for no split.
    pub split: Vec<(String, u32)>,
    /// How far a priority level or zone may fall below full health before
    /// traffic spills over (Envoy's overprovisioning factor).
    pub overprovisioning: f64,
    /// A call's time limit when its own `grpc-timeout` is longer or absent.
    pub request_timeout: Duration,
    /// An upstream connection that carries nothing this long is closed.
    pub idle_timeout: Duration,
    /// A PING goes out on each upstream connection this often...
    pub keepalive_interval: Duration,
    /// ...and a connection whose PING is unanswered this long is dropped.
    pub keepalive_timeout: Duration,
    /// Calls in flight over the whole cluster; more are refused.
    pub max_in_flight: u32,
    /// Calls in flight on one endpoint; a full endpoint is passed over.
    pub max_in_flight_per_endpoint: u32,
    /// Below this share of healthy endpoints (0.0 to 1.0), every endpoint
    /// is used (panic mode).
    pub panic_threshold: f64,
    pub breaker: BreakerConfig,
    pub outlier: Option<OutlierConfig>,
    pub health_check: Option<HealthCheckConfig>,
    pub retry: Option<RetryConfig>,
    pub rate_limits: Vec<crate::cluster::limit::RateLimitConfig>,
    /// `least_connections` adds peers' calls in flight (`[mesh]` with
    /// `share_load`); set for every cluster by the mesh's config.
    pub mesh_load: bool,
    /// TLS (and mutual TLS) to the endpoints; plain HTTP/2 without.
    pub tls: Option<crate::endpoint::tls::TlsConfig>,
    /// The endpoints are a DNS name's addresses (and `endpoints` is empty).
    pub dns: Option<crate::cluster::discovery::DnsConfig>,
    /// The endpoints are a Service's EndpointSlices (and `endpoints` is
    /// empty).
    pub kubernetes: Option<crate::cluster::kubernetes::KubernetesConfig>,
}

/// `[cluster.circuit_breaker]`: per-endpoint breaking on consecutive failures.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerConfig {
    pub enabled: bool,
    /// Consecutive failures that open the breaker.
    pub failure_threshold: NonZeroU32,
    /// How long it first stays open; doubled with each re-open.
    pub open_for: Duration,
    /// The cap on the doubling.
    pub max_open_for: Duration,
    /// Which outcomes count as failures.
    pub failures: FailureClasses,
    /// At most this share (0.0 to 1.0) of the cluster's endpoints is ejected
    /// at once by breakers and error rates; at least one always may be.
    pub max_ejection: f64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            failure_threshold: NonZeroU32::new(5).expect("5 is not 0"),
            open_for: Duration::from_secs(30),
            max_open_for: Duration::from_secs(300),
            failures: FailureClasses::default(),
            max_ejection: 0.5,
        }
    }
}

/// `[cluster.outlier_detection]`: ejection by error rate.
#[derive(Clone, Debug, PartialEq)]
pub struct OutlierConfig {
    /// Ejected when the success rate over `window` falls below this (0.0 to 1.0).
    pub min_success_rate: f64,
    pub window: Duration,
    /// Calls the window must hold before the rate is judged.
    pub min_calls: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            min_success_rate: 0.8,
            window: Duration::from_secs(10),
            min_calls: 5,
        }
    }
}

/// `[cluster.health_check]`: active `grpc.health.v1.Health/Check` probes.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheckConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: NonZeroU32,
    pub healthy_threshold: NonZeroU32,
    /// The `service` field of the check; empty for the whole server.
    pub service: String,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            unhealthy_threshold: NonZeroU32::new(3).expect("3 is not 0"),
            healthy_threshold: NonZeroU32::new(2).expect("2 is not 0"),
            service: String::new(),
        }
    }
}

/// `[cluster.retry]`: retrying calls that reached an endpoint, opt-in by method.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryConfig {
    /// `/package.Service/Method`, `/package.Service/*` or `*`.
    pub methods: Vec<String>,
    /// Statuses that are retried.
    pub on: Vec<tonic::Code>,
    /// Attempts in all, the first one included.
    pub max_attempts: NonZeroU32,
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Retries may add this share of calls (20.0 for 20%)...
    pub budget_percent: f64,
    /// ... plus this many per second.
    pub min_retries_per_second: u32,
    /// A request body longer than this is not kept for a retry.
    pub buffer_limit: usize,
    /// The budget counts every sidecar's calls and retries to the cluster
    /// (from gossip), with one floor for the whole mesh.
    pub mesh_wide_budget: bool,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            methods: Vec::new(),
            on: vec![tonic::Code::Unavailable],
            max_attempts: NonZeroU32::new(3).expect("3 is not 0"),
            backoff: Duration::from_millis(25),
            max_backoff: Duration::from_millis(250),
            budget_percent: 20.0,
            min_retries_per_second: 10,
            buffer_limit: 64 * 1024,
            mesh_wide_budget: false,
        }
    }
}

impl RetryConfig {
    /// Whether calls to `path` (`/package.Service/Method`) may be retried.
    pub fn covers(&self, path: &str) -> bool {
        self.methods.iter().any(|m| method_matches(m, path))
    }
}

fn method_matches(pattern: &str, path: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => pattern == path,
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointConfig {
    /// `host:port`; the host is an IP address or a DNS name.
    pub address: String,
    pub weight: NonZeroU32,
    pub zone: Option<String>,
    /// 0 is the highest; lower levels take traffic only when higher ones
    /// are short of healthy endpoints.
    pub priority: u32,
    pub version: Option<String>,
}

impl EndpointConfig {
    /// The endpoint at `address`, of weight 1, in no zone, at priority 0
    /// and of no version: what an address alone says (a static list, a
    /// DNS answer).
    pub fn new(address: impl ToString) -> EndpointConfig {
        EndpointConfig {
            address: address.to_string(),
            weight: NonZeroU32::MIN,
            zone: None,
            priority: 0,
            version: None,
        }
    }
}

/// `choices = 2` (power of two random choices), `choices = "all"`, or by
/// default (`"auto"`) all of a group of up to [`FULL_SCAN_UP_TO`]
/// endpoints and two at random in a larger one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Choices {
    Random(std::num::NonZeroUsize),
    All,
    #[default]
    Auto,
}

/// With `choices = "auto"`, groups of up to this many endpoints are
/// compared whole: on so few, a full scan costs a few dozen nanoseconds and
/// finds the least loaded every time, where two random candidates miss it
/// often enough to show in the tail (`bench/quality`).
pub const FULL_SCAN_UP_TO: usize = 16;

/// The `latency` strategy's knobs.
#[derive(Clone, Debug, PartialEq)]
pub struct LatencyConfig {
    /// The peak-EWMA's time constant: how fast old round trips are forgotten.
    pub decay: Duration,
    /// The estimate an endpoint starts with, before any call has returned.
    pub default_rtt: Duration,
    /// A failed call counts as a round trip at least this long.
    pub failure_penalty: Duration,
}

impl Default for LatencyConfig {
    fn default() -> Self {
        LatencyConfig {
            decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(30),
            failure_penalty: Duration::from_secs(1),
        }
    }
}

/// The `performance` strategy's knobs.
#[derive(Clone, Debug, PartialEq)]
pub struct PerformanceConfig {
    /// The window over which success rate and latency are measured.
    pub window: Duration,
    pub success_weight: f64,
    pub latency_weight: f64,
    pub score: PerformanceScore,
}

/// Which latency the `performance` score rewards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PerformanceScore {
    /// The time a new call can expect: recent round trips times (calls in
    /// flight + 1), divided by weight. An endpoint with calls waiting
    /// scores lower.
    #[default]
    LoadAware,
    /// The agent frameworks' `calculatePerformanceScore`: the window's mean
    /// latency, whatever is waiting.
    PerformanceBased,
}

impl PerformanceScore {
    pub fn as_str(self) -> &'static str {
        match self {
            PerformanceScore::LoadAware => "load_aware",
            PerformanceScore::PerformanceBased => "performance_based",
        }
    }
}

impl Default for PerformanceConfig {
    fn default() -> Self {
        PerformanceConfig {
            window: Duration::from_secs(300),
            success_weight: 0.7,
            latency_weight: 0.3,
            score: PerformanceScore::default(),
        }
    }
}

/// `[cluster.session_affinity]`.
#[derive(Clone, Debug, PartialEq)]
pub struct AffinityConfig {
    /// The metadata header whose value is the session key.
    pub header: http::HeaderName,
    /// A session unused this long is forgotten.
    pub ttl: Duration,
    /// The most sessions remembered; the least recently used leave first.
    pub max_sessions: usize,
    /// Bounded load: a new session does not go to an endpoint that already
    /// carries more than this many times its share of the calls in flight
    /// (over the mesh), but to the next on the session's list. `None`:
    /// unbounded.
    pub balance_factor: Option<f64>,
}

impl Default for AffinityConfig {
    fn default() -> Self {
        AffinityConfig {
            header: http::HeaderName::from_static("x-session-id"),
            ttl: Duration::from_secs(3600),
            max_sessions: 100_000,
            balance_factor: None,
        }
    }
}

/// How a cluster picks an endpoint for each call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    RoundRobin,
    Weighted,
    LeastConnections,
    Latency,
    Performance,
    HotCold,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::Weighted => "weighted",
            Strategy::LeastConnections => "least_connections",
            Strategy::Latency => "latency",
            Strategy::Performance => "performance",
            Strategy::HotCold => "hot_cold",
        }
    }
}

/// Prequal's: about one endpoint in six is hot.
pub const DEFAULT_HOT_QUANTILE: f64 = 0.84;
pub const DEFAULT_PROXY: &str = "127.0.0.1:15001";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// `listener.max_calls_per_connection` by default: what HAProxy and most
/// gRPC servers allow one connection.
pub const DEFAULT_MAX_CALLS_PER_CONNECTION: u32 = 100;

/// `listener.header_timeout` by default.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// `listener.idle_timeout` by default: gRPC clients reconnect at once when
/// they have a call to make, so an idle connection costs the caller little
/// to lose and the sidecar a descriptor to keep.
pub const DEFAULT_CALLER_IDLE_TIMEOUT: Duration = Duration::from_secs(180);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_OVERPROVISIONING: f64 = 1.4;
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 1000;
pub const DEFAULT_MAX_IN_FLIGHT_PER_ENDPOINT: u32 = 100;
pub const DEFAULT_PANIC_THRESHOLD: f64 = 0.5;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// The key, as a path (`cluster[0].endpoints[1].address`), or a
    /// `line N, column M` position for syntax errors.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file.display(), self.key, self.reason)
    }
}

/// Every problem found in a config file, one per line when displayed.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads, substitutes, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_owned(),
                key: "(file)".into(),
                reason: format!("cannot read: {e}"),
            }])
        })?;
        Self::parse(path, &text, &|name| std::env::var(name).ok())
    }

    /// Parses `text` as if read from `file`; `env` looks up `${VAR}`s.
    pub fn parse(
        file: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let err = |key: String, reason: String| {
            ConfigErrors(vec![ConfigError {
                file: file.to_owned(),
                key,
                reason,
            }])
        };
        let mut value: toml::Value = toml::from_str::<toml::Table>(text)
            .map(toml::Value::Table)
            .map_err(|e| {
                let key = match e.span() {
                    Some(span) => line_col(text, span.start),
                    None => "(syntax)".to_string(),
                };
                err(key, e.message().to_string())
            })?;
        substitute_env(&mut value, &mut String::new(), env).map_err(|(k, r)| err(k, r))?;
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let mut key = e.path().to_string();
            let reason = e.inner().message().to_string();
            // Depending on the serde path, an unknown key is reported at its
            // parent or at itself; always name the key.
            if let Some(name) = reason
                .strip_prefix("unknown field `")
                .and_then(|r| r.split('`').next())
            {
                if key == "." {
                    key = name.to_string();
                } else if key != name && !key.ends_with(&format!(".{name}")) {
                    key = format!("{key}.{name}");
                }
            }
            if key == "." {
                key = "(top level)".into();
            }
            err(key, reason)
        })?;
        raw.validate(file, env)
    }

    /// A small valid config for tests: everything on ephemeral loopback ports.
    pub fn for_test(clusters: Vec<ClusterConfig>) -> Config {
        Config {
            listener: ListenerConfig {
                proxy: "127.0.0.1:0".parse().expect("literal address"),
                refuse_unknown: false,
                drain_timeout: Duration::from_secs(5),
                max_calls_per_connection: DEFAULT_MAX_CALLS_PER_CONNECTION,
                header_timeout: DEFAULT_HEADER_TIMEOUT,
                idle_timeout: DEFAULT_CALLER_IDLE_TIMEOUT,
                max_connections: None,
                transparent: None,
            },
            admin: AdminConfig {
                token: None,
                listen: "127.0.0.1:0".parse().expect("literal address"),
            },
            locality: LocalityConfig::default(),
            runtime: RuntimeConfig::default(),
            clusters,
            mesh: None,
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl Config {
    /// Turns gossip on (or off, with `None`): every cluster's
    /// `least_connections` then counts peers' calls if `share_load`.
    pub fn set_mesh(&mut self, mesh: Option<MeshConfig>) {
        let share_load = mesh.as_ref().is_some_and(|m| m.share_load);
        for c in &mut self.clusters {
            c.mesh_load = share_load;
        }
        self.mesh = mesh;
    }
}

impl MeshConfig {
    /// A mesh node on `listen` (port 0: any; it is then advertised as
    /// bound), joining through `seeds`, with `key` (`None`: insecure).
    pub fn for_test(
        node_id: &str,
        listen: SocketAddr,
        seeds: &[SocketAddr],
        key: Option<&[u8]>,
    ) -> MeshConfig {
        MeshConfig {
            listen,
            advertise: listen,
            seeds: seeds.iter().map(|s| s.to_string()).collect(),
            node_id: node_id.to_string(),
            key: key.map(<[u8]>::to_vec),
            previous_key: None,
            interval: DEFAULT_MESH_INTERVAL,
            stale_after: DEFAULT_MESH_STALE_AFTER,
            share_load: true,
            share_ejections: true,
            warm_start: true,
            max_report_endpoints: DEFAULT_MAX_REPORT_ENDPOINTS,
        }
    }
}

impl ClusterConfig {
    /// A round-robin cluster over `addresses`, each of weight 1.
    pub fn for_test(name: &str, addresses: &[SocketAddr]) -> ClusterConfig {
        ClusterConfig {
            name: name.to_string(),
            aliases: Vec::new(),
            strategy: Strategy::RoundRobin,
            local_port: None,
            matches: Vec::new(),
            match_names: Vec::new(),
            connect_timeout: Duration::from_secs(2),
            endpoints: addresses.iter().map(EndpointConfig::new).collect(),
            choices: Choices::default(),
            remember_runner_up: true,
            latency: LatencyConfig::default(),
            performance: PerformanceConfig::default(),
            hot_quantile: DEFAULT_HOT_QUANTILE,
            affinity: None,
            split: Vec::new(),
            overprovisioning: DEFAULT_OVERPROVISIONING,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_in_flight_per_endpoint: DEFAULT_MAX_IN_FLIGHT_PER_ENDPOINT,
            panic_threshold: DEFAULT_PANIC_THRESHOLD,
            breaker: BreakerConfig::default(),
            outlier: Some(OutlierConfig::default()),
            health_check: None,
            retry: None,
            rate_limits: Vec::new(),
            mesh_load: false,
            tls: None,
            dns: None,
            kubernetes: None,
        }
    }
}

fn line_col(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {col}")
}
