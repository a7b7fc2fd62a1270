//! The command line: one `Args` struct per command, each turned into the
//! options its code takes in one place.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use agentmesh::config::Strategy;
use agentmesh::tools::agent::AgentOptions;
use agentmesh::tools::demo::DemoOptions;
use agentmesh::tools::load::LoadOptions;

#[derive(Parser)]
#[command(
    name = "agentmesh",
    version,
    about = "A gRPC sidecar that balances every call, not every connection"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the sidecar. It reloads its config on SIGHUP and when the file
    /// changes.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Reload on SIGHUP only, not when the file changes.
        #[arg(long)]
        no_watch: bool,
    },
    /// Validate a config file without starting anything.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a demo agent: a gRPC server of `agentmesh.demo.v1.Agent` and
    /// `grpc.health.v1.Health`.
    Agent(AgentArgs),
    /// Send load to a target and report throughput and latency percentiles.
    Load(LoadArgs),
    /// Start three local agents and the sidecar, send calls, show where they
    /// went; with `--mesh`, show what gossip between two sidecars changes.
    Demo(DemoArgs),
    /// Add the sidecar to the workloads of a Kubernetes manifest read from
    /// stdin (Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs),
    /// as `linkerd inject` does; the result goes to stdout.
    Inject {
        /// Transparent mode: an init container installs the iptables rules
        /// and the app needs no proxy variables.
        #[arg(long)]
        transparent: bool,
        /// The sidecar's image.
        #[arg(long, default_value = "agentmesh:dev")]
        image: String,
        /// The ConfigMap with `agentmesh.toml`.
        #[arg(long, default_value = "agentmesh")]
        config_map: String,
        /// The sidecar's user id.
        #[arg(long, default_value_t = 2102)]
        proxy_uid: u32,
    },
    /// Read and change a running sidecar through its admin API.
    Ctl(CtlArgs),
    /// Install the iptables rules of transparent mode, as an init container
    /// does: the pod's outbound TCP redirected to the transparent port,
    /// except the sidecar's own (by user id), loopback and the excluded
    /// ports. Needs NET_ADMIN and NET_RAW.
    InitIptables {
        /// The transparent listener's port (`listener.transparent`).
        #[arg(long, default_value_t = 15006)]
        port: u16,
        /// The user id the sidecar runs as: its connections are not
        /// redirected.
        #[arg(long)]
        proxy_uid: u32,
        /// Destination ports never redirected, comma-separated.
        #[arg(long, value_delimiter = ',')]
        exclude_ports: Vec<u16>,
        /// Print the rules instead of installing them.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Args)]
pub struct AgentArgs {
    #[arg(long)]
    pub listen: SocketAddr,
    #[arg(long)]
    name: String,
    /// Added to every call.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// The share of calls answered with UNAVAILABLE (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0, value_parser = parse_ratio)]
    fail_ratio: f64,
    /// Calls served at once; more wait their turn (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_concurrency: usize,
    /// `SECS:MS`: after SECS seconds, the delay becomes MS.
    #[arg(long, value_parser = parse_delay_change)]
    delay_after: Option<(Duration, Duration)>,
    /// Serve TLS 1.3 with this PEM certificate chain (and --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: callers must present a certificate from this CA.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Do not send a call's `traceparent` back (as `x-traceparent-received`,
    /// which the tracing tests read): for benchmarks.
    #[arg(long)]
    no_trace_echo: bool,
}

impl AgentArgs {
    pub fn options(self) -> anyhow::Result<AgentOptions> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(agentmesh::tools::agent::server_tls(
                cert,
                key,
                self.tls_client_ca.as_deref(),
            )?),
            _ => None,
        };
        Ok(AgentOptions {
            tls,
            name: self.name,
            delay: Duration::from_millis(self.delay_ms),
            fail_ratio: self.fail_ratio,
            max_concurrency: self.max_concurrency,
            delay_after: self.delay_after,
            max_header_list_size: None,
            echo_traceparent: !self.no_trace_echo,
        })
    }
}

#[derive(Args)]
pub struct LoadArgs {
    /// The address to connect to (a proxy, or an agent); repeat it to
    /// spread connections over several.
    #[arg(long, required = true)]
    target: Vec<SocketAddr>,
    /// The :authority to send (authority mode).
    #[arg(long)]
    authority: Option<String>,
    /// Calls per second: open loop. Without it: closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Closed loop: concurrent callers.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, default_value_t = 1)]
    connections: usize,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Request payload bytes.
    #[arg(long, default_value_t = 1024)]
    payload: usize,
    /// Server streaming: replies per call (0: unary).
    #[arg(long, default_value_t = 0)]
    stream: u32,
    /// Extra delay each call asks of the agent.
    #[arg(long, default_value_t = 0)]
    delay_ms: u32,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also count answers per agent in slices this long (JSON `timeline`).
    #[arg(long, value_parser = humantime::parse_duration)]
    timeline: Option<Duration>,
    /// Closed loop: stop after this many calls.
    #[arg(long)]
    calls: Option<u64>,
    /// JSON: also give every latency recorded (`histogram`), so that
    /// several runs can be merged.
    #[arg(long)]
    histogram: bool,
    /// Metadata sent with every call, as NAME:VALUE; repeat for more.
    #[arg(long, value_parser = parse_header)]
    header: Vec<(
        tonic::metadata::AsciiMetadataKey,
        tonic::metadata::AsciiMetadataValue,
    )>,
}

fn parse_header(
    s: &str,
) -> Result<
    (
        tonic::metadata::AsciiMetadataKey,
        tonic::metadata::AsciiMetadataValue,
    ),
    String,
> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not NAME:VALUE"))?;
    let name = name
        .trim()
        .parse()
        .map_err(|_| format!("{name:?} is not a metadata name"))?;
    let value = value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a metadata value"))?;
    Ok((name, value))
}

impl LoadArgs {
    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            targets: self.target.clone(),
            authority: self.authority.clone(),
            rate: self.rate,
            concurrency: self.concurrency,
            connections: self.connections,
            duration: self.duration,
            warmup: self.warmup,
            payload: self.payload,
            stream: self.stream,
            delay_ms: self.delay_ms,
            timeout: self.timeout,
            timeline: self.timeline,
            calls: self.calls,
            histogram: self.histogram,
            metadata: {
                let mut m = tonic::metadata::MetadataMap::new();
                for (name, value) in &self.header {
                    m.append(name.clone(), value.clone());
                }
                m
            },
            ..Default::default()
        }
    }
}

#[derive(Args)]
pub struct DemoArgs {
    /// Show what gossip changes instead: two sidecars run each scenario
    /// (cross-caller skew, an agent failing) without gossip and with it.
    #[arg(long, conflicts_with_all = ["calls", "concurrency", "strategy"])]
    pub mesh: bool,
    #[arg(long, default_value_t = DemoOptions::default().calls)]
    calls: usize,
    #[arg(long, default_value_t = DemoOptions::default().concurrency)]
    concurrency: usize,
    /// round_robin, weighted, least_connections, latency or performance.
    #[arg(long, default_value = "round_robin", value_parser = parse_strategy)]
    strategy: Strategy,
}

impl DemoArgs {
    pub fn options(self) -> DemoOptions {
        DemoOptions {
            calls: self.calls,
            concurrency: self.concurrency,
            strategy: self.strategy,
        }
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a ratio from 0.0 to 1.0")),
    }
}

fn parse_delay_change(s: &str) -> Result<(Duration, Duration), String> {
    let (secs, ms) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not SECS:MS"))?;
    let secs: f64 = secs
        .parse()
        .map_err(|_| format!("{secs:?} is not a number of seconds"))?;
    let ms: u64 = ms
        .parse()
        .map_err(|_| format!("{ms:?} is not a number of milliseconds"))?;
    Ok((Duration::from_secs_f64(secs), Duration::from_millis(ms)))
}

fn parse_strategy(s: &str) -> Result<Strategy, String> {
    use serde::Deserialize;
    use serde::de::IntoDeserializer;
    let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> = s.into_deserializer();
    Strategy::deserialize(de).map_err(|e| e.to_string())
}

#[derive(Args)]
pub struct CtlArgs {
    /// The sidecar's admin port.
    #[arg(long, global = true, default_value = agentmesh::config::DEFAULT_ADMIN)]
    pub admin: String,
    /// The `[admin] token`, needed for writes from another host.
    #[arg(
        long,
        global = true,
        env = "AGENTMESH_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// `table` or `json`.
    #[arg(long, short, global = true, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand)]
pub enum CtlCommand {
    /// Every cluster: strategy, ready endpoints, calls in flight, split.
    Clusters,
    /// Endpoints with their state, weight, load and latency.
    Endpoints { cluster: Option<String> },
    /// A live table of every endpoint: calls/s, share, in flight, p50/p99.
    Top {
        cluster: Option<String>,
        /// How often to refresh.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Stop after this many refreshes (0: until Ctrl-C).
        #[arg(long, default_value_t = 0)]
        iterations: u32,
    },
    /// Take an endpoint out of the picks; its calls in flight finish.
    Eject(HoldArgs),
    /// Send an endpoint no new call; its calls in flight finish.
    Drain(HoldArgs),
    /// Treat an endpoint as failed (and, with gossip, tell the mesh).
    Failover(HoldArgs),
    /// End an eject, drain or failover, and give back the configured weight.
    Restore { cluster: String, endpoint: String },
    /// Set an endpoint's weight (until restored or reloaded).
    Weight {
        cluster: String,
        endpoint: String,
        weight: u32,
    },
    /// Give a version a percent of the cluster's calls; the other versions
    /// share the rest.
    Canary {
        cluster: String,
        #[arg(long)]
        version: String,
        #[arg(long)]
        percent: u32,
    },
    /// Set the whole version split: `ctl split planner v1=90 v2=10`.
    Split {
        cluster: String,
        #[arg(required = true)]
        shares: Vec<String>,
    },
    /// Where a call would go and why, without sending it: the candidates
    /// compared, their costs and the choice.
    Explain {
        cluster: String,
        /// `/package.Service/Method`.
        #[arg(long)]
        method: Option<String>,
        /// A header of the call, `NAME=VALUE` (repeatable), e.g. its
        /// session key.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
    },
    /// Reload the config file (undoes every change made by ctl).
    Reload,
}

#[derive(Args)]
pub struct HoldArgs {
    pub cluster: String,
    pub endpoint: String,
    /// How long (e.g. 30s, 5m); without it, until `ctl restore`.
    #[arg(long = "for", value_parser = humantime::parse_duration)]
    pub for_: Option<Duration>,
}

impl CtlArgs {
    pub fn options(&self) -> agentmesh::tools::ctl::Options {
        use agentmesh::tools::ctl::{Options, Output};
        Options {
            admin: self.admin.clone(),
            token: self.token.clone(),
            output: if self.output == "json" {
                Output::Json
            } else {
                Output::Table
            },
        }
    }

    pub fn action(self) -> agentmesh::tools::ctl::Action {
        use agentmesh::tools::ctl::Action;
        let hold = |kind, h: HoldArgs| Action::Hold {
            kind,
            cluster: h.cluster,
            endpoint: h.endpoint,
            for_: h.for_,
        };
        match self.command {
            CtlCommand::Clusters => Action::Clusters,
            CtlCommand::Endpoints { cluster } => Action::Endpoints { cluster },
            CtlCommand::Top {
                cluster,
                interval,
                iterations,
            } => Action::Top {
                cluster,
                interval,
                iterations,
            },
            CtlCommand::Eject(h) => hold("eject", h),
            CtlCommand::Drain(h) => hold("drain", h),
            CtlCommand::Failover(h) => hold("failover", h),
            CtlCommand::Restore { cluster, endpoint } => Action::Restore { cluster, endpoint },
            CtlCommand::Weight {
                cluster,
                endpoint,
                weight,
            } => Action::Weight {
                cluster,
                endpoint,
                weight,
            },
            CtlCommand::Canary {
                cluster,
                version,
                percent,
            } => Action::Canary {
                cluster,
                version,
                percent,
            },
            CtlCommand::Split { cluster, shares } => Action::Split { cluster, shares },
            CtlCommand::Explain {
                cluster,
                method,
                headers,
            } => Action::Explain {
                cluster,
                method,
                headers,
            },
            CtlCommand::Reload => Action::Reload,
        }
    }
}
