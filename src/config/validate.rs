//! Turns the `Raw*` structs into the typed config, collecting every problem
//! with the key it was found at.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use super::raw::{
    RawAffinity, RawBreaker, RawChoices, RawCluster, RawConfig, RawHealthCheck, RawLatency,
    RawMesh, RawOutlier, RawPerformance, RawRateLimit, RawRetry, RawScope, RawTelemetry,
};
use super::{
    AdminConfig, AffinityConfig, BreakerConfig, Choices, ClusterConfig, Config, ConfigError,
    ConfigErrors, DEFAULT_HOT_QUANTILE, DEFAULT_IDLE_TIMEOUT, DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_KEEPALIVE_TIMEOUT, DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_IN_FLIGHT_PER_ENDPOINT,
    DEFAULT_MAX_QUEUED_SPANS, DEFAULT_OVERPROVISIONING, DEFAULT_PANIC_THRESHOLD,
    DEFAULT_REQUEST_TIMEOUT, DEFAULT_SERVICE_NAME, EndpointConfig, HealthCheckConfig,
    LatencyConfig, ListenerConfig, LocalityConfig, MeshConfig, OutlierConfig, PerformanceConfig,
    RetryConfig, RuntimeConfig, TelemetryConfig, Token,
};
use crate::endpoint::FailureClasses;
use crate::wire::grpc::parse_code;

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
    /// Checks every value; `env` gives the OpenTelemetry variables that
    /// `[telemetry]` falls back on.
    pub(super) fn validate(
        self,
        file: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let mut p = Problems {
            file,
            found: Vec::new(),
        };
        let proxy = p.socket_addr("listener.proxy", &self.listener.proxy);
        let admin = p.socket_addr("admin.listen", &self.admin.listen);
        let token = match self.admin.token {
            Some(t) if t.chars().count() < MIN_TOKEN => {
                p.add(
                    "admin.token",
                    format!(
                        "is {} characters long; a token needs at least {MIN_TOKEN} (e.g. `openssl rand -hex 16`), or leave it out to take writes from loopback only",
                        t.chars().count()
                    ),
                );
                None
            }
            t => t.map(Token),
        };

        // Every listen address, to catch two listeners on one port (an
        // unspecified address such as 0.0.0.0 takes the port on every one).
        let mut listens: Vec<(SocketAddr, String)> = Vec::new();
        let transparent = self
            .listener
            .transparent
            .as_deref()
            .filter(|v| !v.is_empty())
            .and_then(|v| p.socket_addr("listener.transparent", v));
        for (key, addr) in [
            ("listener.proxy", proxy),
            ("admin.listen", admin),
            ("listener.transparent", transparent),
        ] {
            if let Some(a) = addr {
                claim(&mut p, &mut listens, a, key);
            }
        }

        let has_mesh = self.mesh.is_some();
        let mut names: HashMap<String, String> = HashMap::new();
        let nameservers = validate_nameservers(&mut p, &self.resolver.nameservers);
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
            let (mut matches, mut match_names) = (Vec::new(), Vec::new());
            for (i, m) in c.matches.iter().enumerate() {
                if let Ok(addr) = m.parse::<SocketAddr>() {
                    matches.push(addr);
                    continue;
                }
                let name = check_host_port(m).ok().and_then(|()| {
                    let (host, port) = m.rsplit_once(':')?;
                    Some((host.to_string(), port.parse::<u16>().ok()?))
                });
                match name {
                    Some(n) => match_names.push(n),
                    None => p.add(
                        format!("{at}.match[{i}]"),
                        format!("{m:?} is not IP:port or name:port (the address callers dial, e.g. a Service's \"planner.agents:50051\")"),
                    ),
                }
            }
            let dns = validate_dns(&mut p, &at, &c, &nameservers);
            let kubernetes = validate_kubernetes(&mut p, &at, &c);
            if c.endpoints.is_empty() && c.dns.is_none() && c.kubernetes.is_none() {
                p.add(
                    format!("{at}.endpoints"),
                    "a cluster needs at least one endpoint ([[cluster.endpoints]] address = \"host:port\"), or a dns name to find them by",
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
                Some(RawChoices::Word(w)) if w == "auto" => Choices::Auto,
                Some(RawChoices::Count(n)) if n >= 1 => Choices::Random(
                    std::num::NonZeroUsize::new(n as usize).unwrap_or(std::num::NonZeroUsize::MIN),
                ),
                Some(_) => {
                    p.add(
                        format!("{at}.choices"),
                        "must be a whole number of at least 1 (2 is the usual), \"all\" or \"auto\"",
                    );
                    Choices::default()
                }
            };
            let latency = validate_latency(&mut p, &at, c.latency);
            let performance = validate_performance(&mut p, &at, c.performance);
            let hot_quantile = c.hot_quantile.unwrap_or(DEFAULT_HOT_QUANTILE);
            if !(hot_quantile > 0.0 && hot_quantile <= 1.0) {
                p.add(
                    format!("{at}.hot_quantile"),
                    "must be more than 0 and at most 1 (0.84 is the usual)",
                );
            }
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
            if retry.as_ref().is_some_and(|r| r.mesh_wide_budget) && !has_mesh {
                p.add(
                    format!("{at}.retry.scope"),
                    "needs a [mesh] to share the budget with",
                );
            }
            if c.rate_limit.len() > usize::from(crate::mesh::report::RETRY_BUDGET) {
                p.add(format!("{at}.rate_limit"), "at most 255 limits per cluster");
            }
            let rate_limits = c
                .rate_limit
                .into_iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    let at = format!("{at}.rate_limit[{i}]");
                    if r.scope == RawScope::Mesh && !has_mesh {
                        p.add(
                            format!("{at}.scope"),
                            "needs a [mesh] to share the limit with",
                        );
                    }
                    validate_rate_limit(&mut p, &at, r)
                })
                .collect();
            let tls = c.tls.and_then(|t| validate_tls(&mut p, &at, t));
            clusters.push(ClusterConfig {
                tls,
                dns,
                kubernetes,
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
                matches,
                match_names,
                connect_timeout: c.connect_timeout,
                endpoints,
                choices,
                remember_runner_up: c.remember_runner_up,
                latency,
                performance,
                hot_quantile,
                affinity,
                split,
                overprovisioning,
                mesh_load: false,
            });
        }
        let mesh = self.mesh.map(|m| validate_mesh(&mut p, m));
        let telemetry = validate_telemetry(&mut p, self.telemetry, env);

        if self.runtime.workers > 1024 {
            p.add("runtime.workers", "must be at most 1024 (0: one per CPU)");
        }
        if self.listener.drain_timeout.is_zero() {
            p.add("listener.drain_timeout", "must be more than 0");
        }
        let header_timeout = self
            .listener
            .header_timeout
            .unwrap_or(super::DEFAULT_HEADER_TIMEOUT);
        if !(Duration::from_millis(10)..=Duration::from_secs(300)).contains(&header_timeout) {
            p.add("listener.header_timeout", "must be from 10ms to 5m");
        }
        let idle_timeout = self
            .listener
            .idle_timeout
            .unwrap_or(super::DEFAULT_CALLER_IDLE_TIMEOUT);
        if !(Duration::from_millis(10)..=Duration::from_secs(24 * 3600)).contains(&idle_timeout) {
            p.add("listener.idle_timeout", "must be from 10ms to 24h");
        }
        let max_calls_per_connection = count(
            &mut p,
            "listener.max_calls_per_connection".into(),
            self.listener.max_calls_per_connection,
            super::DEFAULT_MAX_CALLS_PER_CONNECTION,
            10_000,
        );
        let max_connections = self.listener.max_connections.map(|n| {
            count(
                &mut p,
                "listener.max_connections".into(),
                Some(n),
                1,
                1_000_000,
            )
        });
        match (proxy, admin, p.found.is_empty()) {
            (Some(proxy), Some(admin), true) => {
                let mut config = Config {
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
                        max_calls_per_connection,
                        header_timeout,
                        idle_timeout,
                        max_connections,
                        transparent,
                    },
                    admin: AdminConfig {
                        listen: admin,
                        token,
                    },
                    clusters,
                    mesh: None,
                    telemetry,
                };
                config.set_mesh(mesh.flatten());
                Ok(config)
            }
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
/// The shortest `admin.token` taken.
const MIN_TOKEN: usize = 16;

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
        mesh_wide_budget: raw.scope == RawScope::Mesh,
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
        mesh_wide: raw.scope == RawScope::Mesh,
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
        score: raw.score.unwrap_or(d.score),
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
        balance_factor: raw.balance_factor,
    };
    if let Some(f) = out.balance_factor {
        if !(1.0..=100.0).contains(&f) {
            p.add(
                format!("{at}.session_affinity.balance_factor"),
                "must be from 1 to 100 (1.25 is the usual)",
            );
        }
    }
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

/// `[telemetry]`, with the standard OpenTelemetry environment as the
/// default for what the file leaves out.
fn validate_telemetry(
    p: &mut Problems,
    raw: RawTelemetry,
    env: &dyn Fn(&str) -> Option<String>,
) -> TelemetryConfig {
    let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let endpoint = match raw.otlp_endpoint.trim() {
        "" => env("OTEL_EXPORTER_OTLP_ENDPOINT").map(|e| ("OTEL_EXPORTER_OTLP_ENDPOINT", e)),
        e => Some(("telemetry.otlp_endpoint", e.to_string())),
    };
    if let Some((key, e)) = &endpoint {
        match e.parse::<http::Uri>() {
            Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() => {}
            Ok(uri) if uri.scheme_str() == Some("https") => p.add(
                *key,
                format!("{e:?}: https is not supported yet (this build has no TLS); send spans to a collector over http:// (a node-local one, say)"),
            ),
            _ => p.add(
                *key,
                format!("{e:?} is not an http:// address of an OTLP/gRPC receiver (e.g. \"http://127.0.0.1:4317\")"),
            ),
        }
    }
    let sample_ratio = raw.sample_ratio.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&sample_ratio) {
        p.add(
            "telemetry.sample_ratio",
            format!("{sample_ratio} is not between 0 and 1"),
        );
    }
    let max_queued_spans = match raw.max_queued_spans {
        None => DEFAULT_MAX_QUEUED_SPANS,
        Some(n) if (1..=1_000_000).contains(&n) => n as usize,
        Some(n) => {
            p.add(
                "telemetry.max_queued_spans",
                format!("{n} is not between 1 and 1000000"),
            );
            DEFAULT_MAX_QUEUED_SPANS
        }
    };
    let service_name = match raw.service_name.trim() {
        "" => env("OTEL_SERVICE_NAME").unwrap_or_else(|| DEFAULT_SERVICE_NAME.into()),
        s => s.to_string(),
    };
    TelemetryConfig {
        otlp_endpoint: endpoint.map(|(_, e)| e),
        sample_ratio,
        service_name,
        max_queued_spans,
    }
}

/// `[mesh]`: addresses, the key, and the timing knobs.
fn validate_mesh(p: &mut Problems, raw: RawMesh) -> Option<MeshConfig> {
    use super::{DEFAULT_MAX_REPORT_ENDPOINTS, DEFAULT_MESH_INTERVAL, DEFAULT_MESH_STALE_AFTER};
    let listen = p.socket_addr("mesh.listen", &raw.listen);
    // "${POD_IP:-}:15002" with no POD_IP leaves ":15002": the port alone.
    let advertise = match (raw.advertise.trim(), listen) {
        ("", Some(l)) => Some(l),
        (a, Some(l)) if a.starts_with(':') => match a[1..].parse::<u16>() {
            Ok(port) => Some(SocketAddr::new(l.ip(), port)),
            Err(_) => {
                p.add("mesh.advertise", format!("{a:?} is not a port after ':'"));
                None
            }
        },
        (a, _) => p.socket_addr("mesh.advertise", a),
    };
    if let Some(a) = advertise {
        if a.ip().is_unspecified() {
            p.add(
                "mesh.advertise",
                format!("{a} cannot be reached by peers; set the address they reach this sidecar at (e.g. \"${{POD_IP}}:{}\"), since mesh.listen is unspecified", a.port()),
            );
        }
    }
    for (i, seed) in raw.seeds.iter().enumerate() {
        if let Err(reason) = check_host_port(seed) {
            p.add(format!("mesh.seeds[{i}]"), reason);
        }
    }
    let node_id = if raw.node_id.trim().is_empty() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let host = if host.is_empty() {
            "agentmesh".to_string()
        } else {
            host
        };
        format!("{host}:{}", advertise.map_or(0, |a| a.port()))
    } else {
        raw.node_id.trim().to_string()
    };
    if node_id.len() > 64 {
        p.add(
            "mesh.node_id",
            format!("{node_id:?} is longer than 64 bytes"),
        );
    }
    let key = mesh_key(p, "mesh.key", &raw.key);
    let previous_key = mesh_key(p, "mesh.previous_key", &raw.previous_key);
    if raw.key.trim().is_empty() && !raw.insecure {
        p.add(
            "mesh.key",
            "is empty: set a shared secret of at least 32 bytes, base64 (e.g. from `head -c 32 /dev/urandom | base64`), or write insecure = true to gossip unauthenticated",
        );
    }
    let interval = raw.interval.unwrap_or(DEFAULT_MESH_INTERVAL);
    let stale_after = raw.stale_after.unwrap_or(DEFAULT_MESH_STALE_AFTER);
    if interval < Duration::from_millis(10) || interval > Duration::from_secs(60) {
        p.add("mesh.interval", "must be from 10ms to 60s");
    }
    if stale_after < interval * 4 {
        p.add(
            "mesh.stale_after",
            format!("must be at least four intervals ({:?})", interval * 4),
        );
    }
    let max_report_endpoints = count(
        p,
        "mesh.max_report_endpoints".into(),
        raw.max_report_endpoints,
        DEFAULT_MAX_REPORT_ENDPOINTS as u32,
        10_000,
    ) as usize;
    Some(MeshConfig {
        listen: listen?,
        advertise: advertise?,
        seeds: raw.seeds,
        node_id,
        key: key?,
        previous_key: previous_key?,
        interval,
        stale_after,
        share_load: raw.share_load,
        share_ejections: raw.share_ejections,
        warm_start: raw.warm_start,
        max_report_endpoints,
    })
}

/// A base64 secret of at least 32 bytes; `Some(None)` when empty.
fn mesh_key(p: &mut Problems, key: &str, value: &str) -> Option<Option<Vec<u8>>> {
    use base64::Engine as _;
    let value = value.trim();
    if value.is_empty() {
        return Some(None);
    }
    match base64::engine::general_purpose::STANDARD.decode(value) {
        Ok(bytes) if bytes.len() >= 32 => Some(Some(bytes)),
        Ok(bytes) => {
            p.add(
                key,
                format!(
                    "decodes to {} bytes; a mesh key must have at least 32",
                    bytes.len()
                ),
            );
            None
        }
        Err(e) => {
            p.add(key, format!("is not base64 ({e})"));
            None
        }
    }
}

/// `tls = { ... }`: the files are read and must make a client config, so
/// that a bad file is found by `agentmesh check`, not by the first call.
/// Relative paths are taken from the config file's directory.
fn validate_tls(
    p: &mut Problems,
    at: &str,
    t: super::raw::RawTls,
) -> Option<crate::endpoint::tls::TlsConfig> {
    let base = p.file.parent().unwrap_or(Path::new("."));
    let path = |s: &str| base.join(s);
    let reload_every = t
        .reload_every
        .unwrap_or(crate::endpoint::tls::DEFAULT_RELOAD_EVERY);
    let mut ok = true;
    if !(Duration::from_millis(10)..=Duration::from_secs(3600)).contains(&reload_every) {
        p.add(format!("{at}.tls.reload_every"), "must be from 10ms to 1h");
        ok = false;
    }
    if t.cert.is_some() != t.key.is_some() {
        let missing = if t.cert.is_some() { "key" } else { "cert" };
        p.add(
            format!("{at}.tls.{missing}"),
            "cert and key go together (both for mutual TLS, or neither)",
        );
        ok = false;
    }
    if let Some(id) = &t.identity {
        let trust_domain = id
            .strip_prefix("spiffe://")
            .and_then(|r| r.split('/').next());
        if trust_domain.is_none_or(str::is_empty) || id.chars().any(char::is_whitespace) {
            p.add(
                format!("{at}.tls.identity"),
                format!("{id:?} is not a SPIFFE ID (spiffe://trust-domain/path)"),
            );
            ok = false;
        }
    }
    if let Some(name) = &t.server_name
        && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
    {
        p.add(
            format!("{at}.tls.server_name"),
            format!("{name:?} is not a DNS name or an IP address"),
        );
        ok = false;
    }
    let config = crate::endpoint::tls::TlsConfig {
        ca: path(&t.ca),
        cert: t.cert.as_deref().map(path),
        key: t.key.as_deref().map(path),
        server_name: t.server_name.filter(|s| !s.is_empty()),
        identity: t.identity,
        reload_every,
    };
    if ok && let Err(e) = crate::endpoint::tls::check(&config) {
        p.add(format!("{at}.tls.{}", e.key), e.reason);
        ok = false;
    }
    ok.then_some(config)
}

/// `[resolver] nameservers`: `ip:port`, or `ip` for port 53.
fn validate_nameservers(p: &mut Problems, raw: &[String]) -> Vec<SocketAddr> {
    raw.iter()
        .enumerate()
        .filter_map(|(i, v)| {
            let parsed = v.parse::<SocketAddr>().ok().or_else(|| {
                v.parse::<std::net::IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, 53))
            });
            if parsed.is_none() {
                p.add(
                    format!("resolver.nameservers[{i}]"),
                    format!(
                        "{v:?} is not an IP address with an optional port (e.g. 127.0.0.1:5353)"
                    ),
                );
            }
            parsed
        })
        .collect()
}

/// `dns = "host:port"` and `dns_refresh`: a name whose addresses are the
/// endpoints, instead of `endpoints`.
/// A cluster's `kubernetes` table: a Service (a DNS label), its namespace
/// and port, and no other source of endpoints.
fn validate_kubernetes(
    p: &mut Problems,
    at: &str,
    c: &super::raw::RawCluster,
) -> Option<crate::cluster::kubernetes::KubernetesConfig> {
    use super::raw::RawPort;
    use crate::cluster::kubernetes::{KubernetesConfig, PortRef};
    let k = c.kubernetes.as_ref()?;
    let key = format!("{at}.kubernetes");
    if !c.endpoints.is_empty() || c.dns.is_some() {
        p.add(
            &key,
            "a cluster takes its endpoints from one of `endpoints`, `dns` and `kubernetes`",
        );
    }
    if !c.split.is_empty() {
        p.add(
            &key,
            "`split` needs each endpoint's version, which EndpointSlices do not give: list the endpoints instead",
        );
    }
    // Names of Services and namespaces are DNS labels (RFC 1123).
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    let mut ok = true;
    if !label(&k.service) {
        p.add(
            format!("{key}.service"),
            format!(
                "{:?} is not a Service name (lowercase letters, digits and '-', at most 63)",
                k.service
            ),
        );
        ok = false;
    }
    if let Some(ns) = &k.namespace
        && !label(ns)
    {
        p.add(
            format!("{key}.namespace"),
            format!(
                "{ns:?} is not a namespace name (lowercase letters, digits and '-', at most 63)"
            ),
        );
        ok = false;
    }
    let port = match &k.port {
        RawPort::Number(n) => match u16::try_from(*n) {
            Ok(n) if n > 0 => Some(PortRef::Number(n)),
            _ => None,
        },
        RawPort::Name(name) if label(name) && name.len() <= 15 => Some(PortRef::Name(name.clone())),
        RawPort::Name(_) => None,
    };
    let Some(port) = port else {
        p.add(
            format!("{key}.port"),
            "must be the Service port's name (e.g. \"grpc\") or a number from 1 to 65535",
        );
        return None;
    };
    ok.then(|| KubernetesConfig {
        service: k.service.clone(),
        namespace: k.namespace.clone(),
        port,
    })
}

fn validate_dns(
    p: &mut Problems,
    at: &str,
    c: &super::raw::RawCluster,
    nameservers: &[SocketAddr],
) -> Option<crate::cluster::discovery::DnsConfig> {
    let Some(dns) = &c.dns else {
        if c.dns_refresh.is_some() {
            p.add(format!("{at}.dns_refresh"), "only goes with dns");
        }
        return None;
    };
    let key = format!("{at}.dns");
    if !c.endpoints.is_empty() {
        p.add(
            &key,
            "a cluster takes its endpoints from `endpoints` or from `dns`, not both",
        );
    }
    if !c.split.is_empty() {
        p.add(
            &key,
            "`split` needs each endpoint's version, which DNS does not give: list the endpoints instead",
        );
    }
    let refresh = c
        .dns_refresh
        .unwrap_or(crate::cluster::discovery::DEFAULT_DNS_REFRESH);
    if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&refresh) {
        p.add(format!("{at}.dns_refresh"), "must be from 100ms to 1h");
    }
    let parsed = dns
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host, port.parse::<u16>().ok().filter(|&p| p > 0)?)))
        .filter(|(host, _)| {
            !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        });
    let Some((host, port)) = parsed else {
        p.add(
            key,
            format!("{dns:?} is not a DNS name and port (e.g. \"planner.agents.svc.cluster.local:50051\")"),
        );
        return None;
    };
    Some(crate::cluster::discovery::DnsConfig {
        host: host.to_string(),
        port,
        refresh,
        nameservers: nameservers.to_vec(),
    })
}
