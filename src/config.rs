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
    pub clusters: Vec<ClusterConfig>,
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
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointConfig {
    /// `host:port`; the host is an IP address or a DNS name.
    pub address: String,
    pub weight: NonZeroU32,
}

/// How a cluster picks an endpoint for each call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    RoundRobin,
    Weighted,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::Weighted => "weighted",
        }
    }
}

pub const DEFAULT_PROXY: &str = "127.0.0.1:15001";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15000";
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
                })
                .collect(),
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
    cluster: Vec<RawCluster>,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    address: String,
    #[serde(default = "default_weight")]
    weight: u32,
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

        // Every listen address, to catch two listeners on one port.
        let mut ports: HashMap<SocketAddr, String> = HashMap::new();
        for (key, addr) in [("listener.proxy", proxy), ("admin.listen", admin)] {
            if let Some(a) = addr.filter(|a| a.port() != 0) {
                if let Some(other) = ports.insert(a, key.to_string()) {
                    p.add(key, format!("{a} is already used by {other}"));
                }
            }
        }

        let mut names: HashMap<String, String> = HashMap::new();
        let mut clusters = Vec::with_capacity(self.cluster.len());
        for (ci, c) in self.cluster.into_iter().enumerate() {
            let at = format!("cluster[{ci}]");
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
                if addr.port() != 0 {
                    if let Some(other) = ports.insert(addr, key.clone()) {
                        p.add(key, format!("{addr} is already used by {other}"));
                    }
                }
                Some(addr)
            });
            if c.endpoints.is_empty() {
                p.add(
                    format!("{at}.endpoints"),
                    "a cluster needs at least one endpoint ([[cluster.endpoints]] address = \"host:port\")",
                );
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
                endpoints.push(EndpointConfig {
                    address: e.address,
                    weight,
                });
            }
            clusters.push(ClusterConfig {
                name: c.name,
                aliases: c.aliases,
                strategy: c.strategy,
                local_port,
                connect_timeout: c.connect_timeout,
                endpoints,
            });
        }

        if self.listener.drain_timeout.is_zero() {
            p.add("listener.drain_timeout", "must be more than 0");
        }
        match (proxy, admin, p.found.is_empty()) {
            (Some(proxy), Some(admin), true) => Ok(Config {
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
