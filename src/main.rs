//! The `agentmesh` command: the sidecar, its config checker, the demo agent
//! and the demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use agentmesh::agent::{self, AgentOptions, AgentStats};
use agentmesh::config::{Config, Strategy};
use agentmesh::demo::{self, DemoOptions};
use agentmesh::sidecar::Sidecar;

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
            runtime().block_on(run(config))
        }
        Command::Agent {
            listen,
            name,
            delay_ms,
            fail_ratio,
        } => {
            init_logging("info");
            let options = AgentOptions {
                name,
                delay: Duration::from_millis(delay_ms),
                fail_ratio,
            };
            runtime().block_on(run_agent(listen, options))
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
            match runtime().block_on(demo::run(&options)) {
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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
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
