//! `agentmesh demo --mesh`: what gossip changes, shown on loopback in one
//! process. Sidecars A and B run each scenario twice, first each on its
//! own, then in one mesh (gossip over UDP, sealed with a key made at random
//! when the demo starts), and the results are printed side by side.
//!
//! - Cross-caller skew: A's caller keeps agent x full. Alone, B's
//!   `least_connections` counts only B's own calls, so it keeps sending
//!   calls to x, where they queue behind A's; in the mesh it counts A's
//!   calls too and sends its own elsewhere.
//! - An agent failing: A's calls eject agent f. Alone, B has to find that
//!   out with its own calls, paying its breaker's threshold in failures; in
//!   the mesh A's ejection reaches B first.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tonic::transport::Channel;

use crate::app::Sidecar;
use crate::config::{BreakerConfig, ClusterConfig, Config, MeshConfig, Strategy};
use crate::pb::agent_client::AgentClient;
use crate::tools::agent::AgentOptions;
use crate::tools::client;
use crate::tools::demo::{
    Agents, CLUSTER, TARGET, burst, millis, planner, quantile, request, start_sidecar,
};
use crate::util::Task;

/// The whole demo's bound: it ends by itself, whatever happens.
const DEMO_WITHIN: Duration = Duration::from_secs(30);
/// How long two sidecars may take to see each other in the mesh.
const JOIN_WITHIN: Duration = Duration::from_secs(5);
/// How long B may take to eject what A ejected.
const SPREAD_WITHIN: Duration = Duration::from_secs(3);
/// The mesh's node ids.
const A: &str = "sidecar-a";
const B: &str = "sidecar-b";

/// Skew: each agent's time per call and calls served at once.
const SKEW_DELAY: Duration = Duration::from_millis(20);
const SKEW_SLOTS: usize = 4;
/// Skew: the calls A's caller keeps open on x, twice what x serves at once.
const A_OPEN_CALLS: usize = 8;
/// Skew: how long A's calls run before B's start, so that they fill x and
/// (in the mesh) A's report of x reaches B.
const SETTLE: Duration = Duration::from_millis(600);
/// Skew: B's calls, and how many at a time.
const SKEW_CALLS: usize = 300;
const SKEW_CONCURRENCY: usize = 3;

/// Failing: at most this many calls from A to eject the failing agent.
const EJECT_WITHIN_CALLS: usize = 200;
/// Failing: B's calls after A's ejection, one at a time.
const FAILING_CALLS: usize = 60;

/// One scenario's agents, and what it saw without gossip and with it.
#[derive(Debug)]
pub struct Scenario<T> {
    pub agents: Vec<String>,
    pub alone: T,
    pub meshed: T,
}

/// What `agentmesh demo --mesh` saw.
#[derive(Debug)]
pub struct MeshDemoReport {
    /// Agents x, y and z, in the order of [`SkewRun::shares`].
    pub skew: Scenario<SkewRun>,
    /// The failing agent first.
    pub failing: Scenario<FailingRun>,
    /// The breaker's consecutive failures before it ejects: what B pays
    /// alone.
    pub failure_threshold: u32,
    pub elapsed: Duration,
}

/// What B's calls saw in the skew scenario.
#[derive(Debug)]
pub struct SkewRun {
    /// The share of B's answered calls each agent answered, from 0 to 1.
    pub shares: Vec<f64>,
    pub p50: Duration,
    pub p99: Duration,
    pub failed: u64,
}

/// What each sidecar paid in the failing scenario.
#[derive(Debug)]
pub struct FailingRun {
    /// A's failed calls until it ejected the failing agent.
    pub a_failed: u64,
    /// B's failed calls, of the calls it sent after A's ejection.
    pub b_failed: u64,
    /// From A's ejection to B's; `None` without gossip, or when B had not
    /// ejected the agent within [`SPREAD_WITHIN`].
    pub spread: Option<Duration>,
}

/// Runs both scenarios, each without gossip and with it; gives up after
/// 30 s.
pub async fn run() -> anyhow::Result<MeshDemoReport> {
    let started = Instant::now();
    let mut secret = [0u8; 32];
    rand::fill(&mut secret[..]);
    let both = async {
        let skew = cross_caller_skew(&secret)
            .await
            .context("cross-caller skew")?;
        let failing = agent_failing(&secret).await.context("an agent failing")?;
        anyhow::Ok((skew, failing))
    };
    let (skew, failing) = tokio::time::timeout(DEMO_WITHIN, both)
        .await
        .with_context(|| format!("the mesh demo did not finish within {DEMO_WITHIN:?}"))??;
    Ok(MeshDemoReport {
        skew,
        failing,
        failure_threshold: BreakerConfig::default().failure_threshold.get(),
        elapsed: started.elapsed(),
    })
}

/// Agents x, y and z, each serving 4 calls at a time and taking 20 ms a
/// call; the skew run without gossip, then with it.
async fn cross_caller_skew(secret: &[u8]) -> anyhow::Result<Scenario<SkewRun>> {
    let agents = Agents::start(["x", "y", "z"].map(|name| AgentOptions {
        delay: SKEW_DELAY,
        max_concurrency: SKEW_SLOTS,
        ..AgentOptions::named(name)
    }))
    .await?;
    Ok(Scenario {
        alone: skew_run(&agents, None).await.context("without gossip")?,
        meshed: skew_run(&agents, Some(secret))
            .await
            .context("with gossip")?,
        agents: agents.names.clone(),
    })
}

/// Agent f, which fails every call, and g and h, which answer; the failing
/// run without gossip, then with it.
async fn agent_failing(secret: &[u8]) -> anyhow::Result<Scenario<FailingRun>> {
    let agents = Agents::start([
        AgentOptions {
            fail_ratio: 1.0,
            ..AgentOptions::named("f")
        },
        AgentOptions::named("g"),
        AgentOptions::named("h"),
    ])
    .await?;
    Ok(Scenario {
        alone: failing_run(&agents, None).await.context("without gossip")?,
        meshed: failing_run(&agents, Some(secret))
            .await
            .context("with gossip")?,
        agents: agents.names.clone(),
    })
}

/// Sidecar A's caller keeps x full; B balances over x, y and z with
/// `least_connections`. Returns what B's calls saw.
async fn skew_run(agents: &Agents, secret: Option<&[u8]>) -> anyhow::Result<SkewRun> {
    let x = *agents
        .addrs
        .first()
        .context("the skew scenario has agents")?;
    let (a, b) = pair(
        planner(&[x], Strategy::LeastConnections),
        planner(&agents.addrs, Strategy::LeastConnections),
        secret,
    )
    .await?;
    let busy = keep_open(&connect(&a, A).await?, A_OPEN_CALLS);
    tokio::time::sleep(SETTLE).await;
    let tally = burst(&connect(&b, B).await?, SKEW_CALLS, SKEW_CONCURRENCY).await;
    for caller in busy {
        caller.stop().await;
    }
    shutdown(a, b).await;

    let tally = tally?;
    let latencies = tally.latencies()?;
    Ok(SkewRun {
        shares: agents.names.iter().map(|n| tally.share(n)).collect(),
        p50: quantile(Some(&latencies), 0.5),
        p99: quantile(Some(&latencies), 0.99),
        failed: tally.failed,
    })
}

/// Both sidecars balance round robin over the agents, the first of which
/// fails every call. A calls until it ejects that agent; then B sends its
/// calls. Returns the failures each paid.
async fn failing_run(agents: &Agents, secret: Option<&[u8]>) -> anyhow::Result<FailingRun> {
    let f = *agents
        .addrs
        .first()
        .context("the failing scenario has agents")?;
    let (a, b) = pair(
        planner(&agents.addrs, Strategy::RoundRobin),
        planner(&agents.addrs, Strategy::RoundRobin),
        secret,
    )
    .await?;
    let mut a_client = AgentClient::new(connect(&a, A).await?);
    let mut a_failed = 0;
    for _ in 0..EJECT_WITHIN_CALLS {
        if ejected(&a, f) {
            break;
        }
        if a_client.invoke(request(b"find out")).await.is_err() {
            a_failed += 1;
        }
    }
    anyhow::ensure!(
        ejected(&a, f),
        "sidecar A's {EJECT_WITHIN_CALLS} calls did not eject the failing agent"
    );
    let a_ejected = Instant::now();
    let spread = match secret {
        Some(_) if until(SPREAD_WITHIN, || ejected(&b, f)).await => Some(a_ejected.elapsed()),
        _ => None,
    };
    let tally = burst(&connect(&b, B).await?, FAILING_CALLS, 1).await;
    shutdown(a, b).await;
    Ok(FailingRun {
        a_failed,
        b_failed: tally?.failed,
        spread,
    })
}

/// Starts sidecar A over cluster `a` and sidecar B over `b`, each connected
/// to its agents. With `secret`, they gossip in one mesh, B joining through
/// A, and are returned once each sees the other alive.
async fn pair(
    a: ClusterConfig,
    b: ClusterConfig,
    secret: Option<&[u8]>,
) -> anyhow::Result<(Sidecar, Sidecar)> {
    let a = start_sidecar(sidecar_config(a, secret.map(|s| (A, &[][..], s)))).await?;
    let seeds: Vec<_> = a.mesh().map(|m| m.advertise()).into_iter().collect();
    let b = start_sidecar(sidecar_config(b, secret.map(|s| (B, &seeds[..], s)))).await?;
    if secret.is_some() {
        let sees = |s: &Sidecar, peer| s.mesh().is_some_and(|m| m.sees_alive(peer));
        anyhow::ensure!(
            until(JOIN_WITHIN, || sees(&a, B) && sees(&b, A)).await,
            "sidecars A and B did not see each other in the mesh within {JOIN_WITHIN:?}"
        );
    }
    Ok((a, b))
}

/// A sidecar's config: `cluster`, and with `mesh` (node id, seeds,
/// secret) gossip on a free loopback UDP port.
fn sidecar_config(cluster: ClusterConfig, mesh: Option<(&str, &[SocketAddr], &[u8])>) -> Config {
    let mut config = Config::for_test(vec![cluster]);
    let gossip = "127.0.0.1:0".parse().expect("literal address");
    config.set_mesh(
        mesh.map(|(id, seeds, secret)| MeshConfig::for_test(id, gossip, seeds, Some(secret))),
    );
    config
}

/// One client connection to `sidecar`, in proxy mode.
async fn connect(sidecar: &Sidecar, name: &str) -> anyhow::Result<Channel> {
    client::via_connect(sidecar.proxy_addr(), TARGET)
        .await
        .with_context(|| format!("connecting to {name} in proxy mode"))
}

/// Drains both sidecars.
async fn shutdown(a: Sidecar, b: Sidecar) {
    futures_util::future::join(a.shutdown(), b.shutdown()).await;
}

/// Keeps `n` calls open on `channel`: each of `n` callers calls again as
/// soon as its call returns, until its task is stopped.
fn keep_open(channel: &Channel, n: usize) -> Vec<Task> {
    (0..n)
        .map(|_| {
            let mut client = AgentClient::new(channel.clone());
            Task::spawn(async move {
                loop {
                    if client.invoke(request(b"busy")).await.is_err() {
                        // A call refused at once must not make this spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        })
        .collect()
}

/// Whether `sidecar` has `agent` ejected now.
fn ejected(sidecar: &Sidecar, agent: SocketAddr) -> bool {
    sidecar
        .router()
        .find(CLUSTER)
        .and_then(|c| c.endpoint(&agent.to_string()))
        .is_some_and(|e| e.state(tokio::time::Instant::now()) == "ejected")
}

/// Polls `check` every 10 ms for at most `limit`; whether it came to hold.
async fn until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !check() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

impl MeshDemoReport {
    /// What the demo prints: each scenario's table (without gossip | with
    /// gossip) and a line on what the mesh changed.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "agentmesh demo --mesh: sidecars A and B in this process, on loopback.\n\
             Each scenario runs twice: each sidecar on its own, then both in one mesh\n\
             (gossip over UDP, sealed with a random key made at start).\n"
        );
        self.skew.render(&mut out);
        self.failing.render(&mut out, self.failure_threshold);
        let _ = writeln!(out, "wall time {:.2}s", self.elapsed.as_secs_f64());
        out
    }
}

impl<T> Scenario<T> {
    /// The name of agent `i`.
    fn agent(&self, i: usize) -> &str {
        self.agents.get(i).map_or("", String::as_str)
    }
}

impl Scenario<SkewRun> {
    fn render(&self, out: &mut String) {
        let (alone, meshed, x) = (&self.alone, &self.meshed, self.agent(0));
        let agents = self.agents.join(", ");
        let _ = writeln!(
            out,
            "1. cross-caller skew\n   \
             agents {agents} each serve {SKEW_SLOTS} calls at a time and take {delay} a call.\n   \
             A's caller keeps {A_OPEN_CALLS} calls open on {x} (A's cluster lists {x} alone);\n   \
             B sends {SKEW_CALLS} calls, {SKEW_CONCURRENCY} at a time, least_connections over {agents}.\n",
            delay = millis(SKEW_DELAY),
        );
        header(out);
        let share =
            |run: &SkewRun, i: usize| percent(run.shares.get(i).copied().unwrap_or_default());
        for (i, agent) in self.agents.iter().enumerate() {
            let label = format!("B's calls answered by {agent}");
            row(out, &label, share(alone, i), share(meshed, i));
        }
        row(out, "B's p50", millis(alone.p50), millis(meshed.p50));
        row(out, "B's p99", millis(alone.p99), millis(meshed.p99));
        row(out, "B's failed calls", alone.failed, meshed.failed);
        let _ = writeln!(
            out,
            "\n   the mesh: B counted A's calls on {x} too, so {} of its calls went to {x} instead of {},\n   \
             and its p99 went from {} to {}.\n",
            share(meshed, 0),
            share(alone, 0),
            millis(alone.p99),
            millis(meshed.p99),
        );
    }
}

impl Scenario<FailingRun> {
    fn render(&self, out: &mut String, threshold: u32) {
        let (alone, meshed, f) = (&self.alone, &self.meshed, self.agent(0));
        let others = self.agents.get(1..).unwrap_or_default().join(" and ");
        let _ = writeln!(
            out,
            "2. an agent failing\n   \
             agent {f} fails every call; {others} answer. A and B balance round robin over all three.\n   \
             A's calls eject {f}; then B sends {FAILING_CALLS} calls, one at a time.\n"
        );
        header(out);
        let label = format!("A's failed calls, until it ejected {f}");
        row(out, &label, alone.a_failed, meshed.a_failed);
        row(out, "B's failed calls", alone.b_failed, meshed.b_failed);
        let spread = |run: &FailingRun| run.spread.map_or_else(|| "-".to_string(), millis);
        let label = format!("A's ejection of {f} reached B in");
        row(out, &label, spread(alone), spread(meshed));
        let _ = match meshed.spread {
            Some(d) => writeln!(
                out,
                "\n   the mesh: B took {f} out on A's word {} after A ejected it, so B paid {} failed calls\n   \
                 instead of {} (alone, its breaker needs {threshold} failures in a row).\n",
                millis(d),
                meshed.b_failed,
                alone.b_failed,
            ),
            None => writeln!(
                out,
                "\n   the mesh: A's ejection of {f} did not reach B within {SPREAD_WITHIN:?}; B paid {} failed calls\n   \
                 (alone: {}; its breaker needs {threshold} failures in a row).\n",
                meshed.b_failed, alone.b_failed,
            ),
        };
    }
}

/// The two columns' titles.
fn header(out: &mut String) {
    row(out, "", "without gossip", "with gossip");
}

fn row(
    out: &mut String,
    label: &str,
    alone: impl std::fmt::Display,
    meshed: impl std::fmt::Display,
) {
    let _ = writeln!(out, "   {label:<38} {alone:>15} {meshed:>15}");
}

fn percent(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}
