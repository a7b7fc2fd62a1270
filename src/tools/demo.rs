//! `agentmesh demo`: three local agents (one slower), the sidecar in front of
//! them, a bounded burst of calls through proxy mode, and a table of where
//! the calls went.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use tokio::sync::Mutex;

use crate::app::Sidecar;
use crate::config::{ClusterConfig, Config, Strategy};
use crate::pb::InvokeRequest;
use crate::pb::agent_client::AgentClient;
use crate::tools::agent::{self, AgentOptions, AgentStats};

pub const CLUSTER: &str = "planner.agents";
const TARGET: &str = "planner.agents:50051";

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub calls: usize,
    pub concurrency: usize,
    pub strategy: Strategy,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            calls: 600,
            concurrency: 16,
            strategy: Strategy::RoundRobin,
        }
    }
}

/// What the demo saw of one agent.
#[derive(Debug)]
pub struct AgentRow {
    pub name: String,
    pub address: SocketAddr,
    pub delay: Duration,
    pub weight: u32,
    pub calls: u64,
    pub p50: Duration,
    pub p99: Duration,
}

#[derive(Debug)]
pub struct DemoReport {
    pub rows: Vec<AgentRow>,
    pub failed: u64,
    pub elapsed: Duration,
    pub sidecar_stats: String,
}

/// Runs the demo and returns what it saw.
pub async fn run(options: &DemoOptions) -> anyhow::Result<DemoReport> {
    // (name, delay, weight): the slow agent has the least weight, which
    // `weighted` honours and `round_robin` ignores.
    let agents = [("agent-a", 5, 3), ("agent-b", 5, 3), ("agent-c", 50, 1)];
    let mut addresses = Vec::new();
    for (name, delay_ms, _) in agents {
        let opts = AgentOptions {
            delay: Duration::from_millis(delay_ms),
            ..AgentOptions::named(name)
        };
        let loopback = "127.0.0.1:0".parse().expect("literal address");
        let (addr, _task) = agent::spawn(loopback, opts, Arc::new(AgentStats::default()))
            .await
            .context("starting a demo agent")?;
        addresses.push(addr);
    }
    let mut cluster = ClusterConfig::for_test(CLUSTER, &addresses);
    cluster.aliases = vec!["planner".into()];
    cluster.strategy = options.strategy;
    for (endpoint, (_, _, weight)) in cluster.endpoints.iter_mut().zip(agents) {
        endpoint.weight = std::num::NonZeroU32::new(weight).expect("demo weights are positive");
    }
    let sidecar = Sidecar::start(&Config::for_test(vec![cluster])).await?;
    // The sidecar connects to each agent on its first call, and a call
    // passes over an agent still connecting: on a busy machine the first
    // calls would then skew the spread the demo is there to show.
    let endpoints: Vec<_> = sidecar
        .router()
        .clusters()
        .iter()
        .flat_map(|c| c.endpoints().to_vec())
        .collect();
    let connects = endpoints.iter().map(|e| e.connection().get());
    tokio::time::timeout(
        Duration::from_secs(5),
        futures_util::future::join_all(connects),
    )
    .await
    .context("connecting the sidecar to the demo agents took over 5 s")?
    .into_iter()
    .collect::<Result<Vec<_>, _>>()
    .context("connecting the sidecar to a demo agent")?;
    let channel = crate::tools::client::via_connect(sidecar.proxy_addr(), TARGET)
        .await
        .context("connecting to the sidecar in proxy mode")?;

    let next = Arc::new(AtomicUsize::new(0));
    let seen: Arc<Mutex<BTreeMap<String, Histogram<u64>>>> = Default::default();
    let failed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..options.concurrency.max(1) {
        let mut client = AgentClient::new(channel.clone());
        let (next, seen, failed, calls) =
            (next.clone(), seen.clone(), failed.clone(), options.calls);
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < calls {
                let mut request = tonic::Request::new(InvokeRequest {
                    payload: b"hello".to_vec(),
                    ..Default::default()
                });
                request.set_timeout(Duration::from_secs(5));
                let t = Instant::now();
                match client.invoke(request).await {
                    Ok(reply) => {
                        let micros = t.elapsed().as_micros() as u64;
                        let mut seen = seen.lock().await;
                        let h = seen
                            .entry(reply.into_inner().agent)
                            .or_insert_with(|| Histogram::new(3).expect("3 significant figures"));
                        let _ = h.record(micros.max(1));
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let all = futures_util::future::join_all(workers);
    tokio::time::timeout(Duration::from_secs(15), all)
        .await
        .context("the demo's calls did not finish within 15 s")?;
    let elapsed = started.elapsed();
    let sidecar_stats = crate::admin::stats(sidecar.router());
    sidecar.shutdown().await;

    let seen = seen.lock().await;
    let rows = agents
        .iter()
        .zip(&addresses)
        .map(|((name, delay_ms, weight), address)| {
            let h = seen.get(*name);
            let q = |q| Duration::from_micros(h.map_or(0, |h| h.value_at_quantile(q)));
            AgentRow {
                name: name.to_string(),
                address: *address,
                delay: Duration::from_millis(*delay_ms),
                weight: *weight,
                calls: h.map_or(0, |h| h.len()),
                p50: q(0.5),
                p99: q(0.99),
            }
        })
        .collect();
    Ok(DemoReport {
        rows,
        failed: failed.load(Ordering::Relaxed) as u64,
        elapsed,
        sidecar_stats,
    })
}

impl DemoReport {
    /// The table the demo prints.
    pub fn render(&self, options: &DemoOptions) -> String {
        let total: u64 = self.rows.iter().map(|r| r.calls).sum::<u64>() + self.failed;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "agentmesh demo: {} calls from {} concurrent callers on ONE HTTP/2 connection,\n\
             sent through the sidecar in proxy mode (CONNECT {TARGET}), strategy {}:\n",
            options.calls,
            options.concurrency,
            options.strategy.as_str()
        );
        let _ = writeln!(
            out,
            "{:<9} {:<17} {:>8} {:>7} {:>7} {:>7} {:>9} {:>9}",
            "agent", "address", "delay", "weight", "calls", "share", "p50", "p99"
        );
        for r in &self.rows {
            let share = if total == 0 {
                0.0
            } else {
                100.0 * r.calls as f64 / total as f64
            };
            let _ = writeln!(
                out,
                "{:<9} {:<17} {:>8} {:>7} {:>7} {:>6.1}% {:>9} {:>9}",
                r.name,
                r.address.to_string(),
                format!("{}ms", r.delay.as_millis()),
                r.weight,
                r.calls,
                share,
                format!("{:.1}ms", r.p50.as_secs_f64() * 1e3),
                format!("{:.1}ms", r.p99.as_secs_f64() * 1e3),
            );
        }
        let _ = writeln!(
            out,
            "\nfailed calls: {}; wall time {:.2}s\n\nthe sidecar's own counters (also at http://<admin>/stats):\n{}",
            self.failed,
            self.elapsed.as_secs_f64(),
            self.sidecar_stats
        );
        out
    }
}
