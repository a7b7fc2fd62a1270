//! The `agentmesh` command: the sidecar, its config checker, the demo agent
//! and the demo.

mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use agentmesh::app::Sidecar;
use agentmesh::config::Config;
use agentmesh::tools::agent::{self, AgentOptions, AgentStats};
use agentmesh::tools::{demo, demo_mesh};
use cli::{Cli, Command};

/// Logs to stderr at `default` (or as `RUST_LOG` says). The HTTP/2
/// library's own warnings are left out by default: a caller can cause them
/// at will, and they name no caller; the sidecar logs each such event
/// itself, throttled and with the caller's address, and counts it.
fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default},h2=error")));
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
        Command::Run {
            config: path,
            no_watch,
        } => {
            init_logging("info");
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(2);
                }
            };
            sidecar_runtime(config.runtime.workers).block_on(run(config, path, !no_watch))
        }
        Command::Agent(args) => {
            init_logging("info");
            let listen = args.listen;
            match args.options() {
                Ok(options) => runtime(0).block_on(run_agent(listen, options)),
                Err(e) => {
                    eprintln!("agentmesh agent: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Load(args) => {
            init_logging("warn");
            let (options, json) = (args.options(), args.json);
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
        Command::Demo(args) if args.mesh => {
            init_logging("warn");
            match runtime(0).block_on(demo_mesh::run()) {
                Ok(report) => {
                    print!("{}", report.render());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("agentmesh demo --mesh failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Inject {
            transparent,
            image,
            config_map,
            proxy_uid,
        } => {
            let mut manifest = String::new();
            if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut manifest) {
                eprintln!("agentmesh inject: cannot read stdin: {e}");
                return ExitCode::FAILURE;
            }
            let inject = agentmesh::tools::inject::Inject {
                image,
                transparent,
                config_map,
                proxy_uid,
            };
            match inject.run(&manifest) {
                Ok((out, report)) => {
                    print!("{out}");
                    for line in report {
                        eprintln!("{line}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("agentmesh inject: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ctl(args) => {
            let options = args.options();
            let action = args.action();
            match runtime(1).block_on(agentmesh::tools::ctl::run(&options, action)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("agentmesh ctl: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::InitIptables {
            port,
            proxy_uid,
            exclude_ports,
            dry_run,
        } => {
            let rules = agentmesh::tools::iptables::Rules {
                port,
                proxy_uid,
                exclude_ports,
            };
            match rules.apply(dry_run) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("agentmesh init-iptables: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo(args) => {
            init_logging("warn");
            let options = args.options();
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

/// The sidecar's runtime. `runtime.workers = 0`, the default, gives it as
/// many worker threads as the process may use CPUs: its affinity mask
/// (`taskset`) and its cgroup's CPU quota (a pod's CPU limit), as the
/// standard library reads them, quotas rounded down. With one CPU that is a
/// current-thread runtime, a single event loop like one nginx worker,
/// which costs the least per call there.
fn sidecar_runtime(workers: usize) -> tokio::runtime::Runtime {
    let (workers, from) = match workers {
        0 => (
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            "the CPUs this process may use",
        ),
        n => (n, "runtime.workers"),
    };
    let kind = if workers == 1 {
        "current-thread"
    } else {
        "multi-thread"
    };
    tracing::info!(workers, from, kind, "runtime");
    runtime(workers)
}

/// A runtime of `workers` threads: 1 is a current-thread runtime, 0 one
/// worker per CPU of the host (for the demo agent and the load generator).
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

async fn run(config: Config, path: PathBuf, watch: bool) -> ExitCode {
    let mut sidecar = match Sidecar::start(&config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("agentmesh: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    sidecar.reload_from(path, watch).await;
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
