//! `agentmesh demo`: three local agents (one slower), the sidecar in front of
//! them, a bounded burst of calls through proxy mode, and a table of where
//! the calls went.
//!
//! The pieces every demo needs (agents on loopback, a sidecar connected to
//! them, a bounded burst of calls and its tally) are here too;
//! [`super::demo_mesh`] uses them.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use tokio::task::{JoinHandle, JoinSet};
use tonic::transport::Channel;

use crate::app::Sidecar;
use crate::config::{ClusterConfig, Config, Strategy};
use crate::pb::InvokeRequest;
use crate::pb::agent_client::AgentClient;
use crate::tools::agent::{self, AgentOptions, AgentStats};

pub const CLUSTER: &str = "planner.agents";
/// What callers `CONNECT` to: the cluster's name, on a port the sidecar
/// does not use to route.
pub(crate) const TARGET: &str = "planner.agents:50051";
/// Each demo call's deadline.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a burst of calls may take in all.
const BURST_WITHIN: Duration = Duration::from_secs(15);

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
    let running = Agents::start(agents.iter().map(|(name, delay_ms, _)| AgentOptions {
        delay: Duration::from_millis(*delay_ms),
        ..AgentOptions::named(name)
    }))
    .await?;
    let mut cluster = planner(&running.addrs, options.strategy);
    for (endpoint, (_, _, weight)) in cluster.endpoints.iter_mut().zip(agents) {
        endpoint.weight = std::num::NonZeroU32::new(weight).expect("demo weights are positive");
    }
    let sidecar = start_sidecar(Config::for_test(vec![cluster])).await?;
    let channel = crate::tools::client::via_connect(sidecar.proxy_addr(), TARGET)
        .await
        .context("connecting to the sidecar in proxy mode")?;

    let started = Instant::now();
    let tally = burst(&channel, options.calls, options.concurrency).await?;
    let elapsed = started.elapsed();
    let sidecar_stats = crate::admin::stats(sidecar.router());
    sidecar.shutdown().await;

    let rows = agents
        .iter()
        .zip(&running.addrs)
        .map(|((name, delay_ms, weight), address)| {
            let h = tally.by_agent.get(*name);
            AgentRow {
                name: name.to_string(),
                address: *address,
                delay: Duration::from_millis(*delay_ms),
                weight: *weight,
                calls: h.map_or(0, Histogram::len),
                p50: quantile(h, 0.5),
                p99: quantile(h, 0.99),
            }
        })
        .collect();
    Ok(DemoReport {
        rows,
        failed: tally.failed,
        elapsed,
        sidecar_stats,
    })
}

/// Demo agents on loopback ports, stopped when this is dropped.
pub(crate) struct Agents {
    /// Each agent's address and name, in the order they were given.
    pub addrs: Vec<SocketAddr>,
    pub names: Vec<String>,
    tasks: Vec<JoinHandle<()>>,
}

impl Agents {
    /// Starts one agent per entry of `options`, each on a free loopback port.
    pub async fn start(options: impl IntoIterator<Item = AgentOptions>) -> anyhow::Result<Agents> {
        let mut agents = Agents {
            addrs: Vec::new(),
            names: Vec::new(),
            tasks: Vec::new(),
        };
        for opts in options {
            let name = opts.name.clone();
            let loopback = "127.0.0.1:0".parse().expect("literal address");
            let (addr, task) = agent::spawn(loopback, opts, Arc::new(AgentStats::default()))
                .await
                .with_context(|| format!("starting demo agent {name}"))?;
            agents.addrs.push(addr);
            agents.names.push(name);
            agents.tasks.push(task);
        }
        Ok(agents)
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// `planner.agents` (alias `planner`) over `addresses`, balanced by
/// `strategy`.
pub(crate) fn planner(addresses: &[SocketAddr], strategy: Strategy) -> ClusterConfig {
    let mut cluster = ClusterConfig::for_test(CLUSTER, addresses);
    cluster.aliases = vec!["planner".into()];
    cluster.strategy = strategy;
    cluster
}

/// Starts a sidecar from `config` and waits until it has connected to
/// every endpoint.
///
/// The sidecar connects to each agent on its first call, and a call passes
/// over an agent still connecting: on a busy machine the first calls would
/// then skew the spread a demo is there to show.
pub(crate) async fn start_sidecar(config: Config) -> anyhow::Result<Sidecar> {
    let sidecar = Sidecar::start(&config)
        .await
        .context("starting a demo sidecar")?;
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
    Ok(sidecar)
}

/// What a burst of calls saw: each reply's latency by the agent that
/// answered, and the calls that failed.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub by_agent: BTreeMap<String, Histogram<u64>>,
    pub failed: u64,
}

impl Tally {
    fn record(&mut self, agent: String, latency: Duration) -> anyhow::Result<()> {
        let h = match self.by_agent.entry(agent) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(histogram()?),
        };
        h.record((latency.as_micros() as u64).max(1))
            .context("recording a latency")
    }

    fn merge(&mut self, other: Tally) -> anyhow::Result<()> {
        for (agent, h) in other.by_agent {
            match self.by_agent.entry(agent) {
                Entry::Occupied(mut e) => {
                    e.get_mut().add(h).context("merging latency histograms")?;
                }
                Entry::Vacant(e) => {
                    e.insert(h);
                }
            }
        }
        self.failed += other.failed;
        Ok(())
    }

    /// The calls that were answered.
    pub fn answered(&self) -> u64 {
        self.by_agent.values().map(Histogram::len).sum()
    }

    /// The share of answered calls that `agent` answered, from 0 to 1.
    pub fn share(&self, agent: &str) -> f64 {
        let answered = self.answered();
        let by = self.by_agent.get(agent).map_or(0, Histogram::len);
        if answered == 0 {
            0.0
        } else {
            by as f64 / answered as f64
        }
    }

    /// Every answered call's latency, whichever agent answered.
    pub fn latencies(&self) -> anyhow::Result<Histogram<u64>> {
        let mut all = histogram()?;
        for h in self.by_agent.values() {
            all.add(h).context("merging latency histograms")?;
        }
        Ok(all)
    }
}

/// Latencies in microseconds, to 3 significant figures.
fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new(3).context("creating a latency histogram")
}

/// The latency at quantile `q` of `h`, or zero without one.
pub(crate) fn quantile(h: Option<&Histogram<u64>>, q: f64) -> Duration {
    Duration::from_micros(h.map_or(0, |h| h.value_at_quantile(q)))
}

/// Sends `calls` unary calls on `channel`, `concurrency` at a time, each
/// with a 5 s deadline, and tallies where they went. Gives up after 15 s
/// (the callers still running are then aborted).
pub(crate) async fn burst(
    channel: &Channel,
    calls: usize,
    concurrency: usize,
) -> anyhow::Result<Tally> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut callers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (mut client, next) = (AgentClient::new(channel.clone()), next.clone());
        callers.spawn(async move {
            let mut tally = Tally::default();
            while next.fetch_add(1, Ordering::Relaxed) < calls {
                let t = Instant::now();
                match client.invoke(request(b"hello")).await {
                    Ok(reply) => tally.record(reply.into_inner().agent, t.elapsed())?,
                    Err(_) => tally.failed += 1,
                }
            }
            anyhow::Ok(tally)
        });
    }
    let all = async {
        let mut tally = Tally::default();
        while let Some(caller) = callers.join_next().await {
            tally.merge(caller.context("a demo caller's task ended early")??)?;
        }
        anyhow::Ok(tally)
    };
    tokio::time::timeout(BURST_WITHIN, all)
        .await
        .with_context(|| format!("{calls} demo calls did not finish within {BURST_WITHIN:?}"))?
}

/// A demo call carrying `payload`, with the demo's deadline.
pub(crate) fn request(payload: &[u8]) -> tonic::Request<InvokeRequest> {
    let mut request = tonic::Request::new(InvokeRequest {
        payload: payload.to_vec(),
        ..Default::default()
    });
    request.set_timeout(CALL_TIMEOUT);
    request
}

/// `d` in milliseconds with one decimal, as the demos print it.
pub(crate) fn millis(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1e3)
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
                millis(r.p50),
                millis(r.p99),
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
