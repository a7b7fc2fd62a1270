//! The sidecar's configuration: one TOML file, validated once at the edge.
//!
//! Parsing goes in three steps. The text is parsed as TOML (syntax errors
//! carry a line and column); `${VAR}` in string values is replaced from the
//! environment; the tree is deserialised into plain `Raw*` structs that deny
//! unknown keys, and those are validated into the public types, which cannot
//! hold a weight of 0, an unparsable address or two clusters with one name.
//! Every error names the file, the key (`cluster[1].endpoints[0].weight`) and
//! the reason.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listener: ListenerConfig,
    pub admin: AdminConfig,
    pub locality: LocalityConfig,
    pub runtime: RuntimeConfig,
    pub clusters: Vec<ClusterConfig>,
}

/// The sidecar's threads.
#[derive(Clone, Debug, Default)]
pub struct RuntimeConfig {
    /// Worker threads: 0 for one per CPU, 1 for a single event loop.
    pub workers: usize,
}

/// Where this sidecar runs.
#[derive(Clone, Debug, Default)]
pub struct LocalityConfig {
    /// The sidecar's own zone; calls prefer endpoints of this zone.
    pub zone: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ListenerConfig {
    /// Proxy mode (HTTP CONNECT) and authority mode (h2c prior knowledge).
    pub proxy: SocketAddr,
    /// Refuse CONNECTs to targets that no cluster names, instead of tunnelling
    /// them as plain TCP.
    pub refuse_unknown: bool,
    /// How long in-flight calls may take to finish after SIGTERM.
    pub drain_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub name: String,
    pub aliases: Vec<String>,
    pub strategy: Strategy,
    pub local_port: Option<SocketAddr>,
    pub connect_timeout: Duration,
    pub endpoints: Vec<EndpointConfig>,
    /// How many random candidates the load-aware strategies compare.
    pub choices: Choices,
    /// Whether the previous pick's runner-up is compared again, beside the
    /// random candidates (with `choices` below all).
    pub remember_runner_up: bool,
    pub latency: LatencyConfig,
    pub performance: PerformanceConfig,
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

/// What a call ended with, as far as breaking is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered with this status (OK included).
    Status(tonic::Code),
    /// The stream or connection broke before a status arrived.
    Reset,
    /// No connection could be made.
    Connect,
}

/// A set of outcomes, as `failures = ["connect", "reset", "UNAVAILABLE"]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureClasses(u32);

const CONNECT_BIT: u32 = 1 << 17;
const RESET_BIT: u32 = 1 << 18;

impl Default for FailureClasses {
    /// Connect errors, resets, UNAVAILABLE, DEADLINE_EXCEEDED and INTERNAL.
    fn default() -> Self {
        use tonic::Code::*;
        FailureClasses(
            CONNECT_BIT
                | RESET_BIT
                | 1 << Unavailable as u32
                | 1 << DeadlineExceeded as u32
                | 1 << Internal as u32,
        )
    }
}

impl FailureClasses {
    pub fn contains(self, outcome: Outcome) -> bool {
        let bit = match outcome {
            Outcome::Status(code) => 1 << (code as u32).min(16),
            Outcome::Reset => RESET_BIT,
            Outcome::Connect => CONNECT_BIT,
        };
        self.0 & bit != 0
    }

    /// Parses `connect`, `reset` or a gRPC status name (`UNAVAILABLE`).
    fn parse(names: &[String]) -> Result<FailureClasses, String> {
        let mut bits = 0;
        for name in names {
            bits |= match name.as_str() {
                "connect" => CONNECT_BIT,
                "reset" => RESET_BIT,
                other => 1 << parse_code(other)? as u32,
            };
        }
        Ok(FailureClasses(bits))
    }
}

const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A gRPC status code by its name, as in the gRPC spec (`UNAVAILABLE`).
pub fn parse_code(name: &str) -> Result<tonic::Code, String> {
    CODE_NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|i| tonic::Code::from_i32(i as i32))
        .ok_or_else(|| format!("{name:?} is not a gRPC status name (e.g. UNAVAILABLE)"))
}

/// The spec's name of a gRPC status code.
pub fn code_name(code: tonic::Code) -> &'static str {
    CODE_NAMES.get(code as usize).copied().unwrap_or("UNKNOWN")
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

/// `choices = 2` (power of two random choices) or `choices = "all"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choices {
    Random(std::num::NonZeroUsize),
    All,
}

impl Default for Choices {
    fn default() -> Self {
        Choices::Random(std::num::NonZeroUsize::new(2).expect("2 is not 0"))
    }
}

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
}

impl Default for PerformanceConfig {
    fn default() -> Self {
        PerformanceConfig {
            window: Duration::from_secs(300),
            success_weight: 0.7,
            latency_weight: 0.3,
        }
    }
}

/// `[cluster.session_affinity]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AffinityConfig {
    /// The metadata header whose value is the session key.
    pub header: http::HeaderName,
    /// A session unused this long is forgotten.
    pub ttl: Duration,
    /// The most sessions remembered; the least recently used leave first.
    pub max_sessions: usize,
}

impl Default for AffinityConfig {
    fn default() -> Self {
        AffinityConfig {
            header: http::HeaderName::from_static("x-session-id"),
            ttl: Duration::from_secs(3600),
            max_sessions: 100_000,
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
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::Weighted => "weighted",
            Strategy::LeastConnections => "least_connections",
            Strategy::Latency => "latency",
            Strategy::Performance => "performance",
        }
    }
}

pub const DEFAULT_PROXY: &str = "127.0.0.1:15001";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
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
        raw.validate(file)
    }

    /// A small valid config for tests: everything on ephemeral loopback ports.
    pub fn for_test(clusters: Vec<ClusterConfig>) -> Config {
        Config {
            listener: ListenerConfig {
                proxy: "127.0.0.1:0".parse().expect("literal address"),
                refuse_unknown: false,
                drain_timeout: Duration::from_secs(5),
            },
            admin: AdminConfig {
                listen: "127.0.0.1:0".parse().expect("literal address"),
            },
            locality: LocalityConfig::default(),
            runtime: RuntimeConfig::default(),
            clusters,
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
            connect_timeout: Duration::from_secs(2),
            endpoints: addresses
                .iter()
                .map(|a| EndpointConfig {
                    address: a.to_string(),
                    weight: NonZeroU32::MIN,
                    zone: None,
                    priority: 0,
                    version: None,
                })
                .collect(),
            choices: Choices::default(),
            remember_runner_up: true,
            latency: LatencyConfig::default(),
            performance: PerformanceConfig::default(),
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
        }
    }
}

fn line_col(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("line {line}, column {col}")
}

/// Replaces `${VAR}` and `${VAR:-default}` in every string value. `$$` is a
/// literal `$`.
fn substitute_env(
    value: &mut toml::Value,
    key: &mut String,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), (String, String)> {
    match value {
        toml::Value::String(s) if s.contains('$') => {
            *s = expand(s, env).map_err(|reason| (key.clone(), reason))?;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = key.len();
                key.push_str(&format!("[{i}]"));
                substitute_env(item, key, env)?;
                key.truncate(len);
            }
        }
        toml::Value::Table(table) => {
            for (k, item) in table.iter_mut() {
                let len = key.len();
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(k);
                substitute_env(item, key, env)?;
                key.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = r
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in {s:?}"))?;
            let (name, default) = match r[..end].split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (&r[..end], None),
            };
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("`${{{name}}}` is not a valid variable name"));
            }
            match (env(name), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set (write `${{{name}:-default}}` for a default)"
                    ));
                }
            }
            rest = &r[end + 1..];
        } else {
            out.push('$');
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    listener: RawListener,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    locality: RawLocality,
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default)]
    cluster: Vec<RawCluster>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    #[serde(default)]
    workers: usize,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLocality {
    zone: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    #[serde(default = "default_proxy")]
    proxy: String,
    #[serde(default)]
    refuse_unknown: bool,
    #[serde(default = "default_drain", with = "humantime_serde")]
    drain_timeout: Duration,
}

impl Default for RawListener {
    fn default() -> Self {
        RawListener {
            proxy: default_proxy(),
            refuse_unknown: false,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "default_admin")]
    listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: default_admin(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: String,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    strategy: Strategy,
    local_port: Option<String>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
    choices: Option<RawChoices>,
    #[serde(default = "yes")]
    remember_runner_up: bool,
    #[serde(default)]
    latency: RawLatency,
    #[serde(default)]
    performance: RawPerformance,
    session_affinity: Option<RawAffinity>,
    #[serde(default)]
    split: std::collections::BTreeMap<String, u32>,
    overprovisioning: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    request_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    keepalive_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    keepalive_timeout: Option<Duration>,
    max_in_flight: Option<i64>,
    max_in_flight_per_endpoint: Option<i64>,
    panic_threshold: Option<f64>,
    circuit_breaker: Option<RawBreaker>,
    outlier_detection: Option<RawOutlier>,
    health_check: Option<RawHealthCheck>,
    retry: Option<RawRetry>,
    #[serde(default)]
    rate_limit: Vec<RawRateLimit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    enabled: Option<bool>,
    failure_threshold: Option<i64>,
    #[serde(default, with = "humantime_serde")]
    open_for: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max_open_for: Option<Duration>,
    failures: Option<Vec<String>>,
    max_ejection_percent: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutlier {
    enabled: Option<bool>,
    min_success_rate: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    window: Option<Duration>,
    min_calls: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    enabled: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    unhealthy_threshold: Option<i64>,
    healthy_threshold: Option<i64>,
    service: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    methods: Vec<String>,
    on: Option<Vec<String>>,
    max_attempts: Option<i64>,
    #[serde(default, with = "humantime_serde")]
    backoff: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max_backoff: Option<Duration>,
    budget_percent: Option<f64>,
    min_retries_per_second: Option<i64>,
    buffer_limit: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    calls: i64,
    #[serde(with = "humantime_serde")]
    window: Duration,
    key: Option<String>,
    max_keys: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    address: String,
    #[serde(default = "default_weight")]
    weight: u32,
    zone: Option<String>,
    #[serde(default)]
    priority: u32,
    version: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawChoices {
    Count(i64),
    Word(String),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLatency {
    #[serde(default, with = "humantime_serde")]
    decay: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    default_rtt: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    failure_penalty: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPerformance {
    #[serde(default, with = "humantime_serde")]
    window: Option<Duration>,
    success_weight: Option<f64>,
    latency_weight: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAffinity {
    header: Option<String>,
    #[serde(default, with = "humantime_serde")]
    ttl: Option<Duration>,
    max_sessions: Option<usize>,
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

/// Collects validation problems so that one run reports all of them.
struct Problems<'a> {
    file: &'a Path,
    found: Vec<ConfigError>,
}

impl Problems<'_> {
    fn add(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.found.push(ConfigError {
            file: self.file.to_owned(),
            key: key.into(),
            reason: reason.into(),
        });
    }

    fn socket_addr(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        match value.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.add(
                    key,
                    format!(
                        "{value:?} is not a socket address (want ip:port, e.g. 127.0.0.1:15001)"
                    ),
                );
                None
            }
        }
    }
}

impl RawConfig {
    fn validate(self, file: &Path) -> Result<Config, ConfigErrors> {
        let mut p = Problems {
            file,
            found: Vec::new(),
        };
        let proxy = p.socket_addr("listener.proxy", &self.listener.proxy);
        let admin = p.socket_addr("admin.listen", &self.admin.listen);

        // Every listen address, to catch two listeners on one port (an
        // unspecified address such as 0.0.0.0 takes the port on every one).
        let mut listens: Vec<(SocketAddr, String)> = Vec::new();
        for (key, addr) in [("listener.proxy", proxy), ("admin.listen", admin)] {
            if let Some(a) = addr {
                claim(&mut p, &mut listens, a, key);
            }
        }

        let mut names: HashMap<String, String> = HashMap::new();
        let mut clusters = Vec::with_capacity(self.cluster.len());
        for (ci, c) in self.cluster.into_iter().enumerate() {
            let at = format!("cluster[{ci}]");
            let limits = validate_limits(&mut p, &at, &c);
            if c.name.trim().is_empty() {
                p.add(format!("{at}.name"), "must not be empty");
            }
            for (key, name) in std::iter::once((format!("{at}.name"), &c.name)).chain(
                c.aliases
                    .iter()
                    .enumerate()
                    .map(|(i, a)| (format!("{at}.aliases[{i}]"), a)),
            ) {
                if name.trim().is_empty() {
                    continue;
                }
                let folded = name.to_ascii_lowercase();
                if let Some(first) = names.get(&folded) {
                    p.add(
                        key,
                        format!("{name:?} already names another cluster (at {first})"),
                    );
                } else {
                    names.insert(folded, key);
                }
            }
            let local_port = c.local_port.as_deref().and_then(|v| {
                let key = format!("{at}.local_port");
                let addr = p.socket_addr(&key, v)?;
                claim(&mut p, &mut listens, addr, &key);
                Some(addr)
            });
            if c.endpoints.is_empty() {
                p.add(
                    format!("{at}.endpoints"),
                    "a cluster needs at least one endpoint ([[cluster.endpoints]] address = \"host:port\")",
                );
            }
            if c.connect_timeout > MAX_DURATION {
                p.add(format!("{at}.connect_timeout"), "must be at most a year");
            }
            if c.connect_timeout.is_zero() {
                p.add(format!("{at}.connect_timeout"), "must be more than 0");
            }
            let mut seen = HashSet::new();
            let mut endpoints = Vec::with_capacity(c.endpoints.len());
            for (ei, e) in c.endpoints.into_iter().enumerate() {
                let at = format!("{at}.endpoints[{ei}]");
                if let Err(reason) = check_host_port(&e.address) {
                    p.add(format!("{at}.address"), reason);
                } else if let Some((_, listener)) = e
                    .address
                    .parse::<SocketAddr>()
                    .ok()
                    .and_then(|a| listens.iter().find(|(l, _)| same_socket(*l, a)))
                {
                    p.add(
                        format!("{at}.address"),
                        format!(
                            "{:?} is this sidecar's own {listener}: calls would loop",
                            e.address
                        ),
                    );
                } else if !seen.insert(e.address.to_ascii_lowercase()) {
                    p.add(
                        format!("{at}.address"),
                        format!("{:?} is listed twice in this cluster", e.address),
                    );
                }
                let Some(weight) = NonZeroU32::new(e.weight) else {
                    p.add(
                        format!("{at}.weight"),
                        "must be at least 1 (remove the endpoint to send it nothing)",
                    );
                    continue;
                };
                let label = |p: &mut Problems, key: &str, v: Option<String>| {
                    let v = v.filter(|v| !v.trim().is_empty())?;
                    if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                        p.add(
                            format!("{at}.{key}"),
                            format!("{v:?} must not contain spaces"),
                        );
                    }
                    Some(v)
                };
                let zone = label(&mut p, "zone", e.zone);
                let version = label(&mut p, "version", e.version);
                endpoints.push(EndpointConfig {
                    address: e.address,
                    weight,
                    zone,
                    priority: e.priority,
                    version,
                });
            }
            let choices = match c.choices {
                None => Choices::default(),
                Some(RawChoices::Word(w)) if w == "all" => Choices::All,
                Some(RawChoices::Count(n)) if n >= 1 => Choices::Random(
                    std::num::NonZeroUsize::new(n as usize).unwrap_or(std::num::NonZeroUsize::MIN),
                ),
                Some(_) => {
                    p.add(
                        format!("{at}.choices"),
                        "must be a whole number of at least 1 (2 is the usual) or \"all\"",
                    );
                    Choices::default()
                }
            };
            let latency = validate_latency(&mut p, &at, c.latency);
            let performance = validate_performance(&mut p, &at, c.performance);
            let affinity = c
                .session_affinity
                .map(|a| validate_affinity(&mut p, &at, a));
            let split = validate_split(&mut p, &at, c.split, &endpoints);
            let overprovisioning = c.overprovisioning.unwrap_or(DEFAULT_OVERPROVISIONING);
            if !(1.0..=100.0).contains(&overprovisioning) {
                p.add(
                    format!("{at}.overprovisioning"),
                    "must be from 1.0 to 100.0 (1.4 is the usual)",
                );
            }
            let breaker = validate_breaker(&mut p, &at, c.circuit_breaker);
            let outlier = validate_outlier(&mut p, &at, c.outlier_detection);
            let health_check = validate_health_check(&mut p, &at, c.health_check);
            let retry = c.retry.map(|r| validate_retry(&mut p, &at, r));
            let rate_limits = c
                .rate_limit
                .into_iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    validate_rate_limit(&mut p, &format!("{at}.rate_limit[{i}]"), r)
                })
                .collect();
            clusters.push(ClusterConfig {
                request_timeout: limits.request_timeout,
                idle_timeout: limits.idle_timeout,
                keepalive_interval: limits.keepalive_interval,
                keepalive_timeout: limits.keepalive_timeout,
                max_in_flight: limits.max_in_flight,
                max_in_flight_per_endpoint: limits.max_in_flight_per_endpoint,
                panic_threshold: limits.panic_threshold,
                breaker,
                outlier,
                health_check,
                retry,
                rate_limits,
                name: c.name,
                aliases: c.aliases,
                strategy: c.strategy,
                local_port,
                connect_timeout: c.connect_timeout,
                endpoints,
                choices,
                remember_runner_up: c.remember_runner_up,
                latency,
                performance,
                affinity,
                split,
                overprovisioning,
            });
        }

        if self.runtime.workers > 1024 {
            p.add("runtime.workers", "must be at most 1024 (0: one per CPU)");
        }
        if self.listener.drain_timeout.is_zero() {
            p.add("listener.drain_timeout", "must be more than 0");
        }
        match (proxy, admin, p.found.is_empty()) {
            (Some(proxy), Some(admin), true) => Ok(Config {
                runtime: RuntimeConfig {
                    workers: self.runtime.workers,
                },
                locality: LocalityConfig {
                    zone: self.locality.zone.filter(|z| !z.trim().is_empty()),
                },
                listener: ListenerConfig {
                    proxy,
                    refuse_unknown: self.listener.refuse_unknown,
                    drain_timeout: self.listener.drain_timeout,
                },
                admin: AdminConfig { listen: admin },
                clusters,
            }),
            _ => Err(ConfigErrors(p.found)),
        }
    }
}

/// The cluster's plain limits, validated together.
struct Limits {
    request_timeout: Duration,
    idle_timeout: Duration,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    max_in_flight: u32,
    max_in_flight_per_endpoint: u32,
    panic_threshold: f64,
}

/// A whole number from 1 to `max`, or a problem at `key`.
fn count(p: &mut Problems, key: String, value: Option<i64>, default: u32, max: u32) -> u32 {
    match value {
        None => default,
        Some(n) if (1..=i64::from(max)).contains(&n) => n as u32,
        Some(_) => {
            p.add(key, format!("must be a whole number from 1 to {max}"));
            default
        }
    }
}

/// [`count`], for settings whose type says they are never 0.
fn nonzero(
    p: &mut Problems,
    key: String,
    value: Option<i64>,
    default: NonZeroU32,
    max: u32,
) -> NonZeroU32 {
    NonZeroU32::new(count(p, key, value, default.get(), max)).unwrap_or(default)
}

/// Durations are at most this long: far beyond any use, and clear of
/// overflow when added to a clock reading.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn positive(p: &mut Problems, key: String, value: Option<Duration>, default: Duration) -> Duration {
    let d = value.unwrap_or(default);
    if d.is_zero() {
        p.add(key, "must be more than 0");
    } else if d > MAX_DURATION {
        p.add(key, "must be at most a year");
        return default;
    }
    d
}

/// A duration of at most a year (0 allowed), or a problem at `key`.
fn at_most_a_year(
    p: &mut Problems,
    key: String,
    value: Option<Duration>,
    default: Duration,
) -> Duration {
    match value {
        Some(d) if d > MAX_DURATION => {
            p.add(key, "must be at most a year");
            default
        }
        Some(d) => d,
        None => default,
    }
}

/// A percentage from 0 to 100, as a share from 0.0 to 1.0.
fn percent(p: &mut Problems, key: String, value: Option<f64>, default: f64) -> f64 {
    match value {
        None => default,
        Some(v) if (0.0..=100.0).contains(&v) => v / 100.0,
        Some(_) => {
            p.add(key, "must be a percentage from 0 to 100");
            default
        }
    }
}

fn validate_limits(p: &mut Problems, at: &str, c: &RawCluster) -> Limits {
    Limits {
        request_timeout: positive(
            p,
            format!("{at}.request_timeout"),
            c.request_timeout,
            DEFAULT_REQUEST_TIMEOUT,
        ),
        idle_timeout: positive(
            p,
            format!("{at}.idle_timeout"),
            c.idle_timeout,
            DEFAULT_IDLE_TIMEOUT,
        ),
        keepalive_interval: positive(
            p,
            format!("{at}.keepalive_interval"),
            c.keepalive_interval,
            DEFAULT_KEEPALIVE_INTERVAL,
        ),
        keepalive_timeout: positive(
            p,
            format!("{at}.keepalive_timeout"),
            c.keepalive_timeout,
            DEFAULT_KEEPALIVE_TIMEOUT,
        ),
        max_in_flight: count(
            p,
            format!("{at}.max_in_flight"),
            c.max_in_flight,
            DEFAULT_MAX_IN_FLIGHT,
            10_000_000,
        ),
        max_in_flight_per_endpoint: count(
            p,
            format!("{at}.max_in_flight_per_endpoint"),
            c.max_in_flight_per_endpoint,
            DEFAULT_MAX_IN_FLIGHT_PER_ENDPOINT,
            10_000_000,
        ),
        panic_threshold: percent(
            p,
            format!("{at}.panic_threshold"),
            c.panic_threshold,
            DEFAULT_PANIC_THRESHOLD,
        ),
    }
}

fn validate_breaker(p: &mut Problems, at: &str, raw: Option<RawBreaker>) -> BreakerConfig {
    let d = BreakerConfig::default();
    let Some(raw) = raw else { return d };
    let at = format!("{at}.circuit_breaker");
    let failures = match raw.failures {
        None => d.failures,
        Some(names) => FailureClasses::parse(&names).unwrap_or_else(|reason| {
            p.add(
                format!("{at}.failures"),
                format!("{reason}; or \"connect\", \"reset\""),
            );
            d.failures
        }),
    };
    let out = BreakerConfig {
        enabled: raw.enabled.unwrap_or(true),
        failure_threshold: nonzero(
            p,
            format!("{at}.failure_threshold"),
            raw.failure_threshold,
            d.failure_threshold,
            1_000_000,
        ),
        open_for: positive(p, format!("{at}.open_for"), raw.open_for, d.open_for),
        max_open_for: at_most_a_year(
            p,
            format!("{at}.max_open_for"),
            raw.max_open_for,
            d.max_open_for,
        ),
        failures,
        max_ejection: percent(
            p,
            format!("{at}.max_ejection_percent"),
            raw.max_ejection_percent,
            d.max_ejection,
        ),
    };
    if out.max_open_for < out.open_for {
        p.add(
            format!("{at}.max_open_for"),
            format!("must be at least open_for ({:?})", out.open_for),
        );
    }
    out
}

fn validate_outlier(p: &mut Problems, at: &str, raw: Option<RawOutlier>) -> Option<OutlierConfig> {
    let d = OutlierConfig::default();
    let Some(raw) = raw else { return Some(d) };
    let at = format!("{at}.outlier_detection");
    let min_success_rate = match raw.min_success_rate {
        None => d.min_success_rate,
        Some(r) if (0.0..=1.0).contains(&r) => r,
        Some(_) => {
            p.add(
                format!("{at}.min_success_rate"),
                "must be a share from 0.0 to 1.0 (0.8 for 80%)",
            );
            d.min_success_rate
        }
    };
    let out = OutlierConfig {
        min_success_rate,
        window: raw.window.unwrap_or(d.window),
        min_calls: count(
            p,
            format!("{at}.min_calls"),
            raw.min_calls,
            d.min_calls,
            1_000_000,
        ),
    };
    if out.window < Duration::from_millis(10) {
        p.add(format!("{at}.window"), "must be at least 10ms");
    }
    raw.enabled.unwrap_or(true).then_some(out)
}

fn validate_health_check(
    p: &mut Problems,
    at: &str,
    raw: Option<RawHealthCheck>,
) -> Option<HealthCheckConfig> {
    let raw = raw?;
    let d = HealthCheckConfig::default();
    let at = format!("{at}.health_check");
    let out = HealthCheckConfig {
        unhealthy_threshold: nonzero(
            p,
            format!("{at}.unhealthy_threshold"),
            raw.unhealthy_threshold,
            d.unhealthy_threshold,
            1000,
        ),
        healthy_threshold: nonzero(
            p,
            format!("{at}.healthy_threshold"),
            raw.healthy_threshold,
            d.healthy_threshold,
            1000,
        ),
        interval: positive(p, format!("{at}.interval"), raw.interval, d.interval),
        timeout: positive(p, format!("{at}.timeout"), raw.timeout, d.timeout),
        service: raw.service.unwrap_or_default(),
    };
    raw.enabled.unwrap_or(true).then_some(out)
}

fn validate_retry(p: &mut Problems, at: &str, raw: RawRetry) -> RetryConfig {
    let d = RetryConfig::default();
    let at = format!("{at}.retry");
    if raw.methods.is_empty() {
        p.add(
            format!("{at}.methods"),
            "name at least one method: \"/package.Service/Method\", \"/package.Service/*\" or \"*\"",
        );
    }
    for (i, m) in raw.methods.iter().enumerate() {
        let ok = m == "*" || (m.starts_with('/') && m.find('*').is_none_or(|i| i == m.len() - 1));
        if !ok {
            p.add(
                format!("{at}.methods[{i}]"),
                format!(
                    "{m:?} is not \"/package.Service/Method\", \"/package.Service/*\" or \"*\""
                ),
            );
        }
    }
    let on = match raw.on {
        None => d.on.clone(),
        Some(names) => names
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                parse_code(n)
                    .map_err(|reason| p.add(format!("{at}.on[{i}]"), reason))
                    .ok()
            })
            .collect(),
    };
    let out = RetryConfig {
        methods: raw.methods,
        on,
        max_attempts: nonzero(
            p,
            format!("{at}.max_attempts"),
            raw.max_attempts,
            d.max_attempts,
            10,
        ),
        backoff: at_most_a_year(p, format!("{at}.backoff"), raw.backoff, d.backoff),
        max_backoff: at_most_a_year(
            p,
            format!("{at}.max_backoff"),
            raw.max_backoff,
            d.max_backoff,
        ),
        budget_percent: raw.budget_percent.unwrap_or(d.budget_percent),
        min_retries_per_second: match raw.min_retries_per_second {
            None => d.min_retries_per_second,
            Some(n) if (0..=1_000_000).contains(&n) => n as u32,
            Some(_) => {
                p.add(
                    format!("{at}.min_retries_per_second"),
                    "must be a whole number from 0 to 1000000",
                );
                d.min_retries_per_second
            }
        },
        buffer_limit: count(
            p,
            format!("{at}.buffer_limit"),
            raw.buffer_limit,
            d.buffer_limit as u32,
            16 << 20,
        ) as usize,
    };
    if !(0.0..=1000.0).contains(&out.budget_percent) {
        p.add(
            format!("{at}.budget_percent"),
            "must be from 0 to 1000 (20 is the usual)",
        );
    }
    if out.max_backoff < out.backoff {
        p.add(
            format!("{at}.max_backoff"),
            format!("must be at least backoff ({:?})", out.backoff),
        );
    }
    out
}

fn validate_rate_limit(
    p: &mut Problems,
    at: &str,
    raw: RawRateLimit,
) -> Option<crate::cluster::limit::RateLimitConfig> {
    let calls = u32::try_from(raw.calls).ok().and_then(NonZeroU32::new);
    if calls.is_none() {
        p.add(
            format!("{at}.calls"),
            "must be a whole number of at least 1",
        );
    }
    if raw.window < Duration::from_millis(1) {
        p.add(format!("{at}.window"), "must be at least 1ms");
    } else if raw.window > MAX_DURATION {
        p.add(format!("{at}.window"), "must be at most a year");
    }
    let key = match raw.key {
        None => None,
        Some(h) => match http::HeaderName::from_bytes(h.as_bytes()) {
            Ok(name) if !h.starts_with(':') => Some(name),
            _ => {
                p.add(format!("{at}.key"), format!("{h:?} is not a header name"));
                None
            }
        },
    };
    let max_keys = count(
        p,
        format!("{at}.max_keys"),
        raw.max_keys,
        10_000,
        10_000_000,
    );
    Some(crate::cluster::limit::RateLimitConfig {
        calls: calls?,
        window: raw.window,
        key,
        max_keys: max_keys as usize,
    })
}

fn validate_latency(p: &mut Problems, at: &str, raw: RawLatency) -> LatencyConfig {
    let d = LatencyConfig::default();
    let out = LatencyConfig {
        decay: raw.decay.unwrap_or(d.decay),
        default_rtt: raw.default_rtt.unwrap_or(d.default_rtt),
        failure_penalty: raw.failure_penalty.unwrap_or(d.failure_penalty),
    };
    if out.decay.is_zero() {
        p.add(format!("{at}.latency.decay"), "must be more than 0");
    }
    if out.default_rtt.is_zero() {
        p.add(format!("{at}.latency.default_rtt"), "must be more than 0");
    }
    out
}

fn validate_performance(p: &mut Problems, at: &str, raw: RawPerformance) -> PerformanceConfig {
    let d = PerformanceConfig::default();
    let out = PerformanceConfig {
        window: raw.window.unwrap_or(d.window),
        success_weight: raw.success_weight.unwrap_or(d.success_weight),
        latency_weight: raw.latency_weight.unwrap_or(d.latency_weight),
    };
    if out.window < Duration::from_secs(1) {
        p.add(format!("{at}.performance.window"), "must be at least 1s");
    }
    for (key, w) in [
        ("success_weight", out.success_weight),
        ("latency_weight", out.latency_weight),
    ] {
        if !(0.0..=1000.0).contains(&w) {
            p.add(format!("{at}.performance.{key}"), "must be from 0 to 1000");
        }
    }
    if out.success_weight + out.latency_weight <= 0.0 {
        p.add(
            format!("{at}.performance"),
            "success_weight and latency_weight cannot both be 0",
        );
    }
    out
}

fn validate_affinity(p: &mut Problems, at: &str, raw: RawAffinity) -> AffinityConfig {
    let d = AffinityConfig::default();
    let header = match raw.header {
        None => d.header,
        Some(h) => match http::HeaderName::from_bytes(h.as_bytes()) {
            Ok(name) if !h.starts_with(':') => name,
            _ => {
                p.add(
                    format!("{at}.session_affinity.header"),
                    format!("{h:?} is not a header name"),
                );
                d.header
            }
        },
    };
    let out = AffinityConfig {
        header,
        ttl: raw.ttl.unwrap_or(d.ttl),
        max_sessions: raw.max_sessions.unwrap_or(d.max_sessions),
    };
    if out.ttl < Duration::from_millis(1) {
        p.add(format!("{at}.session_affinity.ttl"), "must be at least 1ms");
    }
    if out.max_sessions == 0 {
        p.add(
            format!("{at}.session_affinity.max_sessions"),
            "must be at least 1",
        );
    }
    out
}

fn validate_split(
    p: &mut Problems,
    at: &str,
    raw: std::collections::BTreeMap<String, u32>,
    endpoints: &[EndpointConfig],
) -> Vec<(String, u32)> {
    if raw.is_empty() {
        return Vec::new();
    }
    for (i, e) in endpoints.iter().enumerate() {
        match &e.version {
            Some(v) if raw.contains_key(v) => {}
            Some(v) => p.add(
                format!("{at}.endpoints[{i}].version"),
                format!("{v:?} has no share in {at}.split"),
            ),
            None => p.add(
                format!("{at}.endpoints[{i}].version"),
                format!("missing: {at}.split is set, so every endpoint needs a version"),
            ),
        }
    }
    for version in raw.keys() {
        if !endpoints
            .iter()
            .any(|e| e.version.as_deref() == Some(version))
        {
            p.add(
                format!("{at}.split.{version}"),
                "no endpoint has this version",
            );
        }
    }
    if raw.values().all(|&share| share == 0) {
        p.add(
            format!("{at}.split"),
            "at least one share must be more than 0",
        );
    }
    raw.into_iter().collect()
}

/// Records that `key` listens on `addr`, refusing a port another listener has.
fn claim(p: &mut Problems, listens: &mut Vec<(SocketAddr, String)>, addr: SocketAddr, key: &str) {
    if addr.port() == 0 {
        return;
    }
    if let Some((_, other)) = listens.iter().find(|(l, _)| same_socket(*l, addr)) {
        p.add(key, format!("{addr} is already used by {other}"));
        return;
    }
    listens.push((addr, key.to_string()));
}

/// Whether binding `a` and reaching `b` meet on one socket: same port, and
/// same address or either one unspecified (0.0.0.0 or ::).
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Checks that `address` is `host:port` with a usable host and a port.
fn check_host_port(address: &str) -> Result<(), String> {
    if address.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let want = "want host:port, e.g. 10.0.0.7:50051 or planner-0.planner:50051";
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!("{address:?} has no port ({want})"));
    };
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!("{address:?} has no valid port ({want})"));
    }
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if host_ok {
        Ok(())
    } else {
        Err(format!(
            "{address:?} is not a valid host name or IP address ({want})"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let env = |name: &str| match name {
            "PLANNER_HOST" => Some("10.0.0.9".to_string()),
            _ => None,
        };
        Config::parse(Path::new("mesh.toml"), text, &env)
    }

    fn first_error(text: &str) -> String {
        parse(text).expect_err("config should be refused").0[0].to_string()
    }

    const GOOD: &str = r#"
        [listener]
        proxy = "127.0.0.1:15001"
        refuse_unknown = true

        [admin]
        listen = "127.0.0.1:15000"

        [[cluster]]
        name = "planner.agents"
        aliases = ["planner"]
        strategy = "weighted"
        local_port = "127.0.0.1:15101"
        [[cluster.endpoints]]
        address = "127.0.0.1:50051"
        weight = 5
        [[cluster.endpoints]]
        address = "${PLANNER_HOST}:50052"
    "#;

    #[test]
    fn reads_every_key_of_the_documented_example() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.listener.proxy.to_string(), "127.0.0.1:15001");
        assert!(c.listener.refuse_unknown);
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:15000");
        let cl = &c.clusters[0];
        assert_eq!(cl.name, "planner.agents");
        assert_eq!(cl.aliases, ["planner"]);
        assert_eq!(cl.strategy, Strategy::Weighted);
        assert_eq!(cl.local_port.unwrap().port(), 15101);
        assert_eq!(cl.endpoints[0].weight.get(), 5);
        assert_eq!(cl.endpoints[1].weight.get(), 1);
        assert_eq!(cl.endpoints[1].address, "10.0.0.9:50052");
    }

    #[test]
    fn defaults_fill_an_almost_empty_file() {
        let c = parse("[[cluster]]\nname = \"a\"\nendpoints = [{ address = \"h:1\" }]").unwrap();
        assert_eq!(c.listener.proxy.to_string(), DEFAULT_PROXY);
        assert_eq!(c.admin.listen.to_string(), DEFAULT_ADMIN);
        assert_eq!(c.clusters[0].strategy, Strategy::RoundRobin);
        assert_eq!(c.clusters[0].connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(c.clusters[0].choices, Choices::default());
        assert!(c.clusters[0].remember_runner_up);
    }

    #[test]
    fn choices_and_the_runner_up_are_read_and_checked() {
        let base = "[[cluster]]\nname = \"a\"\nendpoints = [{ address = \"h:1\" }]\n";
        let c = parse(&format!(
            "{base}choices = \"all\"\nremember_runner_up = false"
        ))
        .unwrap();
        assert_eq!(c.clusters[0].choices, Choices::All);
        assert!(!c.clusters[0].remember_runner_up);
        let e = first_error(&format!("{base}remember_runner_up = \"yes\""));
        assert!(
            e.starts_with("mesh.toml: cluster[0].remember_runner_up: invalid type"),
            "{e}"
        );
        let e = first_error(&format!("{base}choices = 0"));
        assert!(
            e.starts_with("mesh.toml: cluster[0].choices: must be"),
            "{e}"
        );
    }

    #[test]
    fn unknown_strategy_names_the_key_and_the_choices() {
        let e = first_error(&GOOD.replace("\"weighted\"", "\"fastest\""));
        assert!(
            e.starts_with("mesh.toml: cluster[0].strategy: unknown variant `fastest`"),
            "{e}"
        );
        assert!(e.contains("round_robin"), "{e}");
    }

    #[test]
    fn weight_zero_is_refused() {
        let e = first_error(&GOOD.replace("weight = 5", "weight = 0"));
        assert!(
            e.starts_with("mesh.toml: cluster[0].endpoints[0].weight: must be at least 1"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_cluster_names_and_aliases_are_refused() {
        let twice = format!(
            "{GOOD}\n[[cluster]]\nname = \"Planner\"\nendpoints = [{{ address = \"h:1\" }}]"
        );
        let e = first_error(&twice);
        assert!(e.starts_with("mesh.toml: cluster[1].name: \"Planner\" already names another cluster (at cluster[0].aliases[0])"), "{e}");
    }

    #[test]
    fn unparsable_addresses_are_refused() {
        let e = first_error(&GOOD.replace("127.0.0.1:50051", "127.0.0.1"));
        assert!(
            e.starts_with("mesh.toml: cluster[0].endpoints[0].address: \"127.0.0.1\" has no port"),
            "{e}"
        );
        let e = first_error(&GOOD.replace("127.0.0.1:50051", "bad host:80"));
        assert!(e.contains("not a valid host name"), "{e}");
        let e = first_error(&GOOD.replace("127.0.0.1:15001", "localhost:x"));
        assert!(
            e.starts_with("mesh.toml: listener.proxy: \"localhost:x\" is not a socket address"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let e = first_error(&GOOD.replace("weight = 5", "wieght = 5"));
        assert!(
            e.starts_with("mesh.toml: cluster[0].endpoints[0].wieght: unknown field `wieght`"),
            "{e}"
        );
        let e = first_error(&format!("colour = 1\n{GOOD}"));
        assert!(e.starts_with("mesh.toml: colour: unknown field"), "{e}");
    }

    #[test]
    fn an_endpoint_that_is_the_sidecar_itself_is_refused() {
        let e = first_error(&GOOD.replace("127.0.0.1:50051", "127.0.0.1:15001"));
        assert!(e.starts_with("mesh.toml: cluster[0].endpoints[0].address: \"127.0.0.1:15001\" is this sidecar's own listener.proxy"), "{e}");
        let e = first_error(&GOOD.replace("127.0.0.1:50051", "127.0.0.1:15101"));
        assert!(e.contains("own cluster[0].local_port"), "{e}");
    }

    #[test]
    fn a_wildcard_listener_clashes_with_any_address_on_its_port() {
        let e = first_error(&GOOD.replace("127.0.0.1:15000", "0.0.0.0:15001"));
        assert!(
            e.starts_with(
                "mesh.toml: admin.listen: 0.0.0.0:15001 is already used by listener.proxy"
            ),
            "{e}"
        );
    }

    #[test]
    fn syntax_errors_give_a_position() {
        let e = first_error("[listener\nproxy = 1");
        assert!(e.starts_with("mesh.toml: line 1, column"), "{e}");
    }

    #[test]
    fn environment_variables_are_substituted_or_named_when_missing() {
        let e = first_error(&GOOD.replace("${PLANNER_HOST}", "${NOPE}"));
        assert!(
            e.starts_with(
                "mesh.toml: cluster[0].endpoints[1].address: environment variable NOPE is not set"
            ),
            "{e}"
        );
        let c = parse(&GOOD.replace("${PLANNER_HOST}", "${NOPE:-10.1.1.1}")).unwrap();
        assert_eq!(c.clusters[0].endpoints[1].address, "10.1.1.1:50052");
        assert_eq!(expand("a$$b$c", &|_| None).unwrap(), "a$b$c");
    }

    const RESILIENT: &str = r#"
        [[cluster]]
        name = "a"
        request_timeout = "5s"
        idle_timeout = "1m"
        keepalive_interval = "5s"
        keepalive_timeout = "2s"
        max_in_flight = 10
        max_in_flight_per_endpoint = 3
        panic_threshold = 30
        endpoints = [{ address = "h:1" }]
        [cluster.circuit_breaker]
        failure_threshold = 7
        open_for = "2s"
        max_open_for = "20s"
        failures = ["reset", "UNAVAILABLE", "resource_exhausted"]
        max_ejection_percent = 25
        [cluster.outlier_detection]
        min_success_rate = 0.9
        window = "30s"
        min_calls = 20
        [cluster.health_check]
        interval = "1s"
        service = "planner"
        [cluster.retry]
        methods = ["/p.S/M", "/p.T/*"]
        on = ["UNAVAILABLE", "ABORTED"]
        max_attempts = 2
        min_retries_per_second = 0
        [[cluster.rate_limit]]
        calls = 100
        window = "1m"
        key = "x-user-id"
    "#;

    #[test]
    fn reads_every_resilience_key() {
        use tonic::Code;
        let c = parse(RESILIENT).unwrap();
        let cl = &c.clusters[0];
        assert_eq!(cl.request_timeout, Duration::from_secs(5));
        assert_eq!(cl.idle_timeout, Duration::from_secs(60));
        assert_eq!(
            (cl.keepalive_interval, cl.keepalive_timeout),
            (Duration::from_secs(5), Duration::from_secs(2))
        );
        assert_eq!((cl.max_in_flight, cl.max_in_flight_per_endpoint), (10, 3));
        assert_eq!(cl.panic_threshold, 0.3);
        let b = &cl.breaker;
        assert_eq!(b.failure_threshold.get(), 7);
        assert_eq!(
            (b.open_for, b.max_open_for),
            (Duration::from_secs(2), Duration::from_secs(20))
        );
        assert_eq!(b.max_ejection, 0.25);
        assert!(
            b.failures
                .contains(Outcome::Status(Code::ResourceExhausted))
        );
        assert!(b.failures.contains(Outcome::Reset));
        assert!(!b.failures.contains(Outcome::Connect));
        assert!(!b.failures.contains(Outcome::Status(Code::Internal)));
        let o = cl.outlier.as_ref().unwrap();
        assert_eq!((o.min_success_rate, o.min_calls), (0.9, 20));
        let h = cl.health_check.as_ref().unwrap();
        assert_eq!(
            (h.interval, h.timeout),
            (Duration::from_secs(1), Duration::from_secs(5))
        );
        assert_eq!(h.service, "planner");
        let r = cl.retry.as_ref().unwrap();
        assert!(r.covers("/p.S/M") && r.covers("/p.T/X") && !r.covers("/p.S/N"));
        assert_eq!(r.on, [Code::Unavailable, Code::Aborted]);
        assert_eq!((r.max_attempts.get(), r.min_retries_per_second), (2, 0));
        let l = &cl.rate_limits[0];
        assert_eq!((l.calls.get(), l.window), (100, Duration::from_secs(60)));
        assert_eq!(l.key.as_ref().unwrap().as_str(), "x-user-id");
        // Defaults: breaker and outlier detection on, no checks, no retries.
        let d = parse("[[cluster]]\nname = \"a\"\nendpoints = [{ address = \"h:1\" }]").unwrap();
        let d = &d.clusters[0];
        assert!(d.breaker.enabled && d.outlier.is_some());
        assert!(d.health_check.is_none() && d.retry.is_none() && d.rate_limits.is_empty());
        assert!(d.breaker.failures.contains(Outcome::Connect));
    }

    #[test]
    fn bad_resilience_values_name_their_keys() {
        for (from, to, key, reason) in [
            (
                "\"resource_exhausted\"",
                "\"SLOW\"",
                "cluster[0].circuit_breaker.failures",
                "\"SLOW\" is not a gRPC status name",
            ),
            (
                "max_ejection_percent = 25",
                "max_ejection_percent = 120",
                "cluster[0].circuit_breaker.max_ejection_percent",
                "must be a percentage from 0 to 100",
            ),
            (
                "min_success_rate = 0.9",
                "min_success_rate = 90",
                "cluster[0].outlier_detection.min_success_rate",
                "must be a share from 0.0 to 1.0",
            ),
            (
                "\"/p.T/*\"",
                "\"p.T*\"",
                "cluster[0].retry.methods[1]",
                "\"p.T*\" is not",
            ),
            (
                "\"ABORTED\"",
                "\"NOPE\"",
                "cluster[0].retry.on[1]",
                "\"NOPE\" is not a gRPC status name",
            ),
            (
                "max_attempts = 2",
                "max_attempts = 0",
                "cluster[0].retry.max_attempts",
                "must be a whole number from 1 to 10",
            ),
            (
                "calls = 100",
                "calls = 0",
                "cluster[0].rate_limit[0].calls",
                "must be a whole number of at least 1",
            ),
            (
                "max_in_flight = 10",
                "max_in_flight = -1",
                "cluster[0].max_in_flight",
                "must be a whole number",
            ),
            (
                "request_timeout = \"5s\"",
                "request_timeout = \"0s\"",
                "cluster[0].request_timeout",
                "must be more than 0",
            ),
            (
                "keepalive_timeout = \"2s\"",
                "keepalive_timeout = \"0s\"",
                "cluster[0].keepalive_timeout",
                "must be more than 0",
            ),
            (
                "open_for = \"2s\"",
                "open_for = \"1m\"",
                "cluster[0].circuit_breaker.max_open_for",
                "must be at least open_for",
            ),
            (
                "interval = \"1s\"",
                "intervall = \"1s\"",
                "cluster[0].health_check.intervall",
                "unknown field",
            ),
        ] {
            let text = RESILIENT.replace(from, to);
            assert_ne!(text, RESILIENT, "{from}");
            let e = first_error(&text);
            assert!(e.starts_with(&format!("mesh.toml: {key}: ")), "{e}");
            assert!(e.contains(reason), "{e}");
        }
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let text = GOOD
            .replace("weight = 5", "weight = 0")
            .replace("127.0.0.1:15101", "127.0.0.1:15000");
        let errors = parse(&text).unwrap_err().0;
        let keys: Vec<_> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["cluster[0].local_port", "cluster[0].endpoints[0].weight"]
        );
    }
}
