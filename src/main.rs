//! The `agentmesh` command: the sidecar, its config checker, the demo agent
//! and the demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use agentmesh::app::Sidecar;
use agentmesh::config::{Config, Strategy};
use agentmesh::tools::agent::{self, AgentOptions, AgentStats};
use agentmesh::tools::demo::{self, DemoOptions};

#[derive(Parser)]
#[command(
    name = "agentmesh",
    version,
    about = "A gRPC sidecar that balances every call, not every connection"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file without starting anything.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a demo agent: a gRPC server of `agentmesh.demo.v1.Agent` and
    /// `grpc.health.v1.Health`.
    Agent {
        #[arg(long)]
        listen: SocketAddr,
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
    },
    /// Send load to a target and report throughput and latency percentiles.
    Load {
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
        json: bool,
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
    },
    /// Start three local agents and the sidecar, send calls, show where they went.
    Demo {
        #[arg(long, default_value_t = DemoOptions::default().calls)]
        calls: usize,
        #[arg(long, default_value_t = DemoOptions::default().concurrency)]
        concurrency: usize,
        /// round_robin, weighted, least_connections, latency or performance.
        #[arg(long, default_value = "round_robin", value_parser = parse_strategy)]
        strategy: Strategy,
    },
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

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                let endpoints: usize = c.clusters.iter().map(|c| c.endpoints.len()).sum();
                println!(
                    "{}: ok ({} clusters, {} endpoints)",
                    config.display(),
                    c.clusters.len(),
                    endpoints
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            init_logging("info");
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(2);
                }
            };
            runtime(config.runtime.workers).block_on(run(config))
        }
        Command::Agent {
            listen,
            name,
            delay_ms,
            fail_ratio,
            max_concurrency,
            delay_after,
        } => {
            init_logging("info");
            let options = AgentOptions {
                name,
                delay: Duration::from_millis(delay_ms),
                fail_ratio,
                max_concurrency,
                delay_after,
            };
            runtime(0).block_on(run_agent(listen, options))
        }
        Command::Load {
            target,
            authority,
            rate,
            concurrency,
            connections,
            duration,
            warmup,
            payload,
            stream,
            delay_ms,
            timeout,
            json,
            timeline,
            calls,
            histogram,
        } => {
            init_logging("warn");
            let options = agentmesh::tools::load::LoadOptions {
                targets: target,
                authority,
                rate,
                concurrency,
                connections,
                duration,
                warmup,
                payload,
                stream,
                delay_ms,
                timeout,
                timeline,
                calls,
                histogram,
                ..Default::default()
            };
            match runtime(0).block_on(agentmesh::tools::load::run(&options)) {
                Ok(report) if json => {
                    println!("{}", serde_json::to_string(&report).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Ok(report) => {
                    print!("{}", report.render());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("agentmesh load: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo {
            calls,
            concurrency,
            strategy,
        } => {
            init_logging("warn");
            let options = DemoOptions {
                calls,
                concurrency,
                strategy,
            };
            match runtime(0).block_on(demo::run(&options)) {
                Ok(report) => {
                    print!("{}", report.render(&options));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("agentmesh demo failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `workers`: 0 for one per CPU; 1 for a single-threaded runtime (one event
/// loop, like one nginx worker); more for that many threads.
fn runtime(workers: usize) -> tokio::runtime::Runtime {
    let mut builder = match workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    builder
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
}

async fn run(config: Config) -> ExitCode {
    let sidecar = match Sidecar::start(&config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("agentmesh: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    shutdown_signal().await;
    sidecar.shutdown().await;
    ExitCode::SUCCESS
}

async fn run_agent(listen: SocketAddr, options: AgentOptions) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("agentmesh agent: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(%listen, name = options.name, "agent serving");
    let stats = Arc::new(AgentStats::default());
    stats.set_fail_ratio(options.fail_ratio);
    match agent::serve(listener, options, stats, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentmesh agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
}
