//! Shared pieces of the end-to-end tests: real demo agents (tonic servers on
//! loopback), a real sidecar, and channels into it by each way in.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentmesh::app::Sidecar;
use agentmesh::config::{ClusterConfig, Config};
use agentmesh::pb::agent_client::AgentClient;
use agentmesh::pb::{InvokeReply, InvokeRequest};
use agentmesh::tools::agent::{self, AgentOptions, AgentStats};
use agentmesh::tools::client;
use tonic::transport::Channel;

pub const TARGET: &str = "planner.agents:50051";

/// Demo agents running in this process.
pub struct Agents {
    pub addrs: Vec<SocketAddr>,
    pub stats: Vec<Arc<AgentStats>>,
    pub names: Vec<String>,
}

impl Agents {
    /// `n` agents named `agent-0`, `agent-1`, ...
    pub async fn start(n: usize) -> Agents {
        Self::start_with(
            (0..n)
                .map(|i| AgentOptions::named(&format!("agent-{i}")))
                .collect(),
        )
        .await
    }

    pub async fn start_with(options: Vec<AgentOptions>) -> Agents {
        let mut agents = Agents {
            addrs: Vec::new(),
            stats: Vec::new(),
            names: Vec::new(),
        };
        for opts in options {
            let stats = Arc::new(AgentStats::default());
            agents.names.push(opts.name.clone());
            let (addr, _task) = agent::spawn(loopback(), opts, stats.clone())
                .await
                .expect("agent binds a loopback port");
            agents.addrs.push(addr);
            agents.stats.push(stats);
        }
        agents
    }

    /// The index of the agent called `name`.
    pub fn index(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no agent named {name}"))
    }

    pub fn cancelled(&self, i: usize) -> u64 {
        self.stats[i].get(&self.stats[i].cancelled)
    }

    pub fn connections(&self, i: usize) -> u64 {
        self.stats[i].get(&self.stats[i].connections)
    }
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A loopback address where nothing listens yet: for a server the test
/// starts on it (see `dead_address` for one that must stay down).
pub fn closed_port() -> SocketAddr {
    free_port_of("127.0.0.1")
}

/// An address that stays down: a free port of 127.0.0.3, where no test
/// binds (they all bind 127.0.0.1), so a connection to it is refused for
/// the whole test. A free port of 127.0.0.1, as `closed_port` gives, can
/// be handed by the system to another test's server running beside this
/// one, and then answers.
pub fn dead_address() -> SocketAddr {
    free_port_of("127.0.0.3")
}

/// A port of `ip` that the system had free a moment ago.
fn free_port_of(ip: &str) -> SocketAddr {
    let l = std::net::TcpListener::bind((ip, 0)).unwrap();
    l.local_addr().unwrap()
}

/// `planner.agents` (alias `planner`) over `addrs`, round robin, with a
/// local port.
pub fn planner(addrs: &[SocketAddr]) -> ClusterConfig {
    let mut c = ClusterConfig::for_test("planner.agents", addrs);
    c.aliases = vec!["planner".into()];
    c.local_port = Some(loopback());
    c
}

pub async fn sidecar(clusters: Vec<ClusterConfig>) -> Sidecar {
    let sidecar = Sidecar::start(&Config::for_test(clusters))
        .await
        .expect("sidecar starts");
    warmed(&sidecar).await;
    sidecar
}

/// Waits until the sidecar's start-up connects have ended: every endpoint
/// is connected or sitting out a failed connect. Calls pass over endpoints
/// still connecting, so tests that count calls per agent start from here.
pub async fn warmed(sidecar: &Sidecar) {
    let router = sidecar.router().clone();
    let done = eventually(Duration::from_secs(5), || {
        let now = tokio::time::Instant::now();
        router
            .clusters()
            .iter()
            .flat_map(|c| c.endpoints().to_vec())
            .all(|e| e.connection().is_open() || !e.is_reachable(now))
    })
    .await;
    assert!(done, "the sidecar's endpoints did not finish connecting");
}

/// The ways a caller reaches the sidecar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// HTTP CONNECT on the proxy port (what `grpc_proxy` makes clients do).
    Connect,
    /// HTTP/2 on the proxy port with `:authority` naming the cluster.
    Authority,
    /// HTTP/2 on the cluster's own local port.
    LocalPort,
}

pub const WAYS: [Way; 3] = [Way::Connect, Way::Authority, Way::LocalPort];

/// One client channel (one HTTP/2 connection) into the sidecar.
pub async fn channel(way: Way, sidecar: &Sidecar, cluster: &str, target: &str) -> Channel {
    let result = match way {
        Way::Connect => client::via_connect(sidecar.proxy_addr(), target).await,
        Way::Authority => client::via_authority(sidecar.proxy_addr(), target).await,
        Way::LocalPort => {
            let addr = sidecar
                .local_addr(cluster)
                .unwrap_or_else(|| panic!("cluster {cluster} has no local port"));
            client::direct(addr).await
        }
    };
    result.unwrap_or_else(|e| panic!("{way:?}: cannot connect: {e}"))
}

pub async fn planner_client(way: Way, sidecar: &Sidecar) -> AgentClient<Channel> {
    AgentClient::new(channel(way, sidecar, "planner.agents", TARGET).await)
}

pub fn request(payload: &[u8]) -> InvokeRequest {
    InvokeRequest {
        payload: payload.to_vec(),
        ..Default::default()
    }
}

/// Sends `n` unary calls, `concurrency` at a time on the one client, and
/// counts the replies by agent. Panics on any failed call.
pub async fn spread(
    client: &AgentClient<Channel>,
    n: usize,
    concurrency: usize,
) -> BTreeMap<String, usize> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut client = client.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                let reply: InvokeReply = client
                    .invoke(request(b"x"))
                    .await
                    .expect("call through the sidecar succeeds")
                    .into_inner();
                seen.push(reply.agent);
            }
            seen
        }));
    }
    let mut counts = BTreeMap::new();
    for t in tasks {
        for agent in t.await.unwrap() {
            *counts.entry(agent).or_insert(0) += 1;
        }
    }
    counts
}

/// The Python the cross-language tests run: `$AGENTMESH_PYTHON`, or
/// `.venv/bin/python` as `scripts/python-env` makes it (grpcio and the
/// OpenTelemetry SDK).
pub fn python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("AGENTMESH_PYTHON") {
        return p.into();
    }
    let venv = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with grpcio, the OpenTelemetry SDK and h2: run scripts/python-env (or scripts/test), or set AGENTMESH_PYTHON"
    );
    venv
}

/// Runs `tests/python/SCRIPT ARGS..` with [`python`] to its end: the JSON
/// object it prints.
pub async fn python_json(script: &str, args: &[String]) -> serde_json::Value {
    python_json_niced(0, script, args).await
}

/// As [`python_json`], with the script run at `nice` niceness (`nice -n`):
/// a load generator that stands for another host should not take the CPU
/// of the processes it measures.
pub async fn python_json_niced(nice: i32, script: &str, args: &[String]) -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let mut command = if nice == 0 {
        tokio::process::Command::new(python())
    } else {
        let mut nice_command = tokio::process::Command::new("nice");
        nice_command.args(["-n", &nice.to_string()]).arg(python());
        nice_command
    };
    let out = command
        .arg(path)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("python runs");
    assert!(
        out.status.success(),
        "{script} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// A GET over HTTP/1.1 to the admin port: the body.
pub async fn admin_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    raw.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// Waits (polling, for at most `limit`) until `check` holds.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Bounds a whole test.
pub async fn bounded<F: Future>(limit: Duration, f: F) -> F::Output {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"))
}

/// A gRPC unary call made by hand over HTTP/2, for cases where tonic's own
/// client would interfere (it enforces `grpc-timeout` itself). Returns the
/// status headers: the trailers, or the headers of a trailers-only answer.
pub async fn raw_unary(
    way: Way,
    sidecar: &Sidecar,
    message: &InvokeRequest,
    extra: &[(&'static str, &str)],
) -> http::HeaderMap {
    use http_body_util::BodyExt;
    let io = match way {
        Way::Connect => client::http_connect(sidecar.proxy_addr(), TARGET)
            .await
            .unwrap(),
        Way::Authority => tokio::net::TcpStream::connect(sidecar.proxy_addr())
            .await
            .unwrap(),
        Way::LocalPort => {
            tokio::net::TcpStream::connect(sidecar.local_addr("planner.agents").unwrap())
                .await
                .unwrap()
        }
    };
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let encoded = prost::Message::encode_to_vec(message);
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    framed.extend_from_slice(&encoded);
    let mut req = http::Request::post(format!("http://{TARGET}/agentmesh.demo.v1.Agent/Invoke"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from(framed)))
        .unwrap();
    let response = send.send_request(req).await.unwrap();
    if response.headers().contains_key("grpc-status") {
        return response.headers().clone();
    }
    let collected = response.into_body().collect().await.unwrap();
    collected.trailers().cloned().unwrap_or_default()
}

/// TCP connections established to `port` on this host, counted from the
/// server's side in `/proc/net/tcp` and `/proc/net/tcp6`: the connections
/// an in-process agent on that port still has open.
pub fn established_to(port: u16) -> usize {
    let port = format!("{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|table| {
            table
                .lines()
                .skip(1)
                .filter(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    // local_address is "ADDR:PORT" in hex; state 01 is ESTABLISHED.
                    fields.len() > 3
                        && fields[1].rsplit(':').next() == Some(port.as_str())
                        && fields[3] == "01"
                })
                .count()
        })
        .sum()
}

/// The value in the column called `name` of the first cluster's line of
/// the admin port's `/clusters` text.
pub fn cluster_column(sidecar: &Sidecar, name: &str) -> String {
    let text = agentmesh::admin::clusters(sidecar.router());
    let header: Vec<&str> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split('\t')
        .collect();
    let row: Vec<&str> = text
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split('\t')
        .collect();
    let at = header
        .iter()
        .position(|h| *h == name)
        .unwrap_or_else(|| panic!("no column {name} in {text}"));
    row[at].to_string()
}

/// What a hand-made call got: the HTTP status and the status headers (the
/// trailers, or the headers of a trailers-only answer), or the HTTP/2 error
/// that ended its stream.
pub type RawAnswer = Result<(http::StatusCode, http::HeaderMap), h2::Error>;

/// A call to `planner.agents` made by hand with the h2 crate (CONNECT way
/// in), sending exactly `body` as the request body and `extra` headers:
/// for requests that a gRPC library would never send (no message, a
/// content-length that lies, headers too large for the endpoint).
pub async fn raw_call(sidecar: &Sidecar, body: &[u8], extra: &[(&str, &str)]) -> RawAnswer {
    raw_call_in_parts(sidecar, &[body], Duration::ZERO, extra).await
}

/// As [`raw_call`], with the body sent in `parts`, `pause` apart.
pub async fn raw_call_in_parts(
    sidecar: &Sidecar,
    parts: &[&[u8]],
    pause: Duration,
    extra: &[(&str, &str)],
) -> RawAnswer {
    let io = client::http_connect(sidecar.proxy_addr(), TARGET)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await?;
    let mut req = http::Request::post(format!("http://{TARGET}/agentmesh.demo.v1.Agent/Invoke"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let empty = parts.iter().all(|p| p.is_empty());
    let (mut response, mut stream) = send.send_request(req.body(()).unwrap(), empty)?;
    if !empty {
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(pause).await;
            }
            let last = i + 1 == parts.len();
            if stream
                .send_data(bytes::Bytes::copy_from_slice(part), last)
                .is_err()
            {
                // The answer came before the body was all sent (a 431, say)
                // and closed the stream: it is read below.
                break;
            }
        }
    }
    let response = std::future::poll_fn(|cx| std::pin::Pin::new(&mut response).poll(cx)).await?;
    let status = response.status();
    if response.headers().contains_key("grpc-status") {
        return Ok((status, response.headers().clone()));
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        data?;
    }
    let trailers = body.trailers().await?.unwrap_or_default();
    Ok((status, trailers))
}

/// A unary Invoke request as framed on the wire: the 5-byte gRPC prefix and
/// the message.
pub fn framed(message: &InvokeRequest) -> Vec<u8> {
    let encoded = prost::Message::encode_to_vec(message);
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    framed.extend_from_slice(&encoded);
    framed
}

/// What callers saw: calls by the agent that served them, and failures.
pub type Seen<F> = (std::collections::BTreeMap<String, usize>, Vec<F>);

/// Callers' answers added up.
pub async fn gather<F>(callers: Vec<tokio::task::JoinHandle<Seen<F>>>) -> Seen<F> {
    let (mut seen, mut failed) = (std::collections::BTreeMap::new(), Vec::new());
    for caller in callers {
        let (s, f) = caller.await.unwrap();
        for (k, v) in s {
            *seen.entry(k).or_insert(0) += v;
        }
        failed.extend(f);
    }
    (seen, failed)
}

/// Every call of the load: when it started, and the agent that answered or
/// the status it failed with.
pub type Log = Arc<std::sync::Mutex<Vec<(std::time::Instant, Result<String, String>)>>>;

/// Calls at `per_second` on `client` until `stop` (at most `max` calls).
pub fn paced_load(
    client: AgentClient<Channel>,
    per_second: u64,
    max: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
    log: Log,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
        let mut calls = Vec::new();
        for _ in 0..max {
            tick.tick().await;
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let (mut client, log) = (client.clone(), log.clone());
            calls.push(tokio::spawn(async move {
                let started = std::time::Instant::now();
                let result = match client.invoke(request(b"paced")).await {
                    Ok(r) => Ok(r.into_inner().agent),
                    Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
                };
                log.lock().unwrap().push((started, result));
            }));
        }
        for call in calls {
            let _ = call.await;
        }
    })
}
