//! `agentmesh load`: a load generator for the demo `Agent` service, used by
//! the benchmarks.
//!
//! - **Open loop** (`--rate`): calls start on a fixed schedule whatever
//!   happens to earlier ones, and each call's latency is measured from when
//!   it was *meant* to start, so a proxy that stalls cannot hide its stall
//!   by slowing the generator down (no coordinated omission).
//! - **Closed loop** (`--concurrency`): that many callers, each starting its
//!   next call when the last one ends, as fast as the target allows.
//!
//! Calls are spread over `--connections` HTTP/2 connections. Latencies go
//! into an HDR histogram (microseconds, 3 significant figures); the report
//! gives calls/s, p50, p90, p99, p99.9, max and errors by status code, as
//! text or JSON.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::pb::InvokeRequest;
use crate::pb::agent_client::AgentClient;

#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Where to connect (a proxy, or agents): connections are spread over
    /// these in turn.
    pub targets: Vec<SocketAddr>,
    /// The `:authority` to send (authority mode), if not the target's.
    pub authority: Option<String>,
    /// Calls per second (open loop); `None` for closed loop.
    pub rate: Option<f64>,
    /// Callers (closed loop).
    pub concurrency: usize,
    pub connections: usize,
    pub duration: Duration,
    /// Calls in this first part of the run are made but not counted.
    pub warmup: Duration,
    pub payload: usize,
    /// 0: unary `Invoke`; n > 0: server-streaming `Stream` of n replies.
    pub stream: u32,
    /// Extra delay the agent adds to each call.
    pub delay_ms: u32,
    /// Per-call deadline.
    pub timeout: Duration,
    /// Metadata sent with every call.
    pub metadata: tonic::metadata::MetadataMap,
    /// Open loop: calls allowed in flight at once; beyond it a call is
    /// counted as an error (`overload`) rather than queued.
    pub max_in_flight: usize,
    /// Also count answers per agent in slices of this length, by when each
    /// call started (the report's `timeline`).
    pub timeline: Option<Duration>,
    /// Closed loop: stop after this many calls (or at `duration`, whichever
    /// comes first).
    pub calls: Option<u64>,
    /// Also report the whole latency histogram (the report's `histogram`),
    /// so that the runs of several reports can be merged.
    pub histogram: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            targets: vec!["127.0.0.1:15001".parse().expect("literal address")],
            authority: None,
            rate: None,
            concurrency: 16,
            connections: 1,
            duration: Duration::from_secs(10),
            warmup: Duration::ZERO,
            payload: 1024,
            stream: 0,
            delay_ms: 0,
            timeout: Duration::from_secs(30),
            max_in_flight: 20_000,
            timeline: None,
            calls: None,
            histogram: false,
            metadata: tonic::metadata::MetadataMap::new(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct LoadReport {
    pub mode: String,
    pub seconds: f64,
    pub calls: u64,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub calls_per_sec: f64,
    /// Latency percentiles in milliseconds.
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Calls answered by each agent.
    pub by_agent: BTreeMap<String, u64>,
    /// With `timeline`: calls answered by each agent, per slice of time, by
    /// when they started; failed calls count under `"(failed)"`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<BTreeMap<String, u64>>,
    /// Wall-clock time (Unix, milliseconds) when the measured part began.
    pub started_unix_ms: u64,
    /// With `histogram`: every latency recorded, as `[microseconds, calls]`
    /// pairs in rising order; each value stands for its histogram bucket
    /// (the highest value the bucket holds, 3 significant figures).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub histogram: Vec<[u64; 2]>,
}

struct Outcome {
    started: Instant,
    latency: Duration,
    result: Result<String, String>,
}

pub async fn run(options: &LoadOptions) -> anyhow::Result<LoadReport> {
    let mut clients = Vec::with_capacity(options.connections.max(1));
    anyhow::ensure!(!options.targets.is_empty(), "no target to send load to");
    for i in 0..options.connections.max(1) {
        let target = options.targets[i % options.targets.len()];
        let mut endpoint = tonic::transport::Endpoint::from_shared(format!("http://{target}"))?
            .tcp_nodelay(true)
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20);
        if let Some(authority) = &options.authority {
            let origin = tonic::transport::Endpoint::from_shared(format!("http://{authority}"))?;
            endpoint = endpoint.origin(origin.uri().clone());
        }
        let channel: Channel = endpoint.connect().await?;
        clients.push(AgentClient::new(channel).max_decoding_message_size(64 << 20));
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();
    let start = Instant::now();
    let measure_from = start + options.warmup;
    let started_unix_ms = (std::time::SystemTime::now() + options.warmup)
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let end = start + options.warmup + options.duration;
    let payload = Arc::new(vec![0x5a_u8; options.payload]);

    let slice = options.timeline;
    let collector = tokio::spawn(async move {
        let mut timeline: Vec<BTreeMap<String, u64>> = Vec::new();
        let mut histogram = Histogram::<u64>::new(3).expect("3 significant figures");
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        let mut by_agent: BTreeMap<String, u64> = BTreeMap::new();
        let (mut calls, mut ok) = (0u64, 0u64);
        while let Some(o) = rx.recv().await {
            if o.started < measure_from {
                continue;
            }
            calls += 1;
            let _ = histogram.record((o.latency.as_micros() as u64).max(1));
            if let Some(slice) = slice {
                let i = ((o.started - measure_from).as_nanos() / slice.as_nanos().max(1)) as usize;
                if timeline.len() <= i {
                    timeline.resize_with(i + 1, BTreeMap::new);
                }
                let who = o.result.as_deref().unwrap_or("(failed)");
                *timeline[i].entry(who.to_string()).or_default() += 1;
            }
            match o.result {
                Ok(agent) => {
                    ok += 1;
                    *by_agent.entry(agent).or_default() += 1;
                }
                Err(code) => *errors.entry(code).or_default() += 1,
            }
        }
        (histogram, errors, by_agent, calls, ok, timeline)
    });

    let mode;
    if let Some(rate) = options.rate {
        mode = format!("open loop at {rate}/s");
        let in_flight = Arc::new(AtomicU64::new(0));
        let total = (rate * (options.warmup + options.duration).as_secs_f64()).round() as u64;
        // The schedule runs on a thread of its own with the OS's sleep, which
        // is finer than the async timer's millisecond: calls start within
        // tens of microseconds of when they are due.
        let runtime = tokio::runtime::Handle::current();
        let std_start = start.into_std();
        let (tx2, payload2, in_flight2, opts) = (
            tx.clone(),
            payload.clone(),
            in_flight.clone(),
            options.clone(),
        );
        let clients2 = clients.clone();
        tokio::task::spawn_blocking(move || {
            for i in 0..total {
                let due = std_start + Duration::from_secs_f64(i as f64 / rate);
                if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                    std::thread::sleep(wait);
                }
                let intended = Instant::from_std(due);
                if in_flight2.load(Ordering::Relaxed) as usize >= opts.max_in_flight {
                    let _ = tx2.send(Outcome {
                        started: intended,
                        latency: Instant::now() - intended,
                        result: Err("overload".into()),
                    });
                    continue;
                }
                in_flight2.fetch_add(1, Ordering::Relaxed);
                let client = clients2[i as usize % clients2.len()].clone();
                let (tx, payload, in_flight, opts) = (
                    tx2.clone(),
                    payload2.clone(),
                    in_flight2.clone(),
                    opts.clone(),
                );
                runtime.spawn(async move {
                    let result = call(client, &payload, &opts).await;
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                    let _ = tx.send(Outcome {
                        started: intended,
                        latency: Instant::now() - intended,
                        result,
                    });
                });
            }
        })
        .await?;
        // Let the last calls finish (bounded by their deadline).
        let wait_until = Instant::now() + options.timeout + Duration::from_secs(1);
        while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    } else {
        mode = format!("closed loop, {} callers", options.concurrency);
        let mut workers = Vec::new();
        let budget = Arc::new(AtomicU64::new(options.calls.unwrap_or(u64::MAX)));
        for i in 0..options.concurrency.max(1) {
            let client = clients[i % clients.len()].clone();
            let (tx, payload, opts, budget) =
                (tx.clone(), payload.clone(), options.clone(), budget.clone());
            workers.push(tokio::spawn(async move {
                while Instant::now() < end
                    && budget
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                        .is_ok()
                {
                    let started = Instant::now();
                    let result = call(client.clone(), &payload, &opts).await;
                    let _ = tx.send(Outcome {
                        started,
                        latency: Instant::now() - started,
                        result,
                    });
                }
            }));
        }
        for w in workers {
            let _ = w.await;
        }
    }
    drop(tx);
    let seconds = if options.calls.is_some() {
        (Instant::now() - measure_from).as_secs_f64()
    } else {
        options.duration.as_secs_f64()
    };
    let (histogram, errors, by_agent, calls, ok, timeline) = collector.await?;
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let buckets = if options.histogram {
        histogram
            .iter_recorded()
            .map(|v| [v.value_iterated_to(), v.count_at_value()])
            .collect()
    } else {
        Vec::new()
    };
    Ok(LoadReport {
        mode: format!(
            "{mode}, {} connection(s), {}",
            options.connections,
            if options.stream > 0 {
                format!(
                    "server stream of {} x {} B",
                    options.stream, options.payload
                )
            } else {
                format!("unary {} B", options.payload)
            }
        ),
        seconds,
        calls,
        ok,
        errors,
        calls_per_sec: calls as f64 / seconds,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: histogram.max() as f64 / 1000.0,
        by_agent,
        timeline,
        started_unix_ms,
        histogram: buckets,
    })
}

async fn call(
    mut client: AgentClient<Channel>,
    payload: &[u8],
    options: &LoadOptions,
) -> Result<String, String> {
    let message = InvokeRequest {
        payload: payload.to_vec(),
        count: options.stream,
        delay_ms: options.delay_ms,
        ..Default::default()
    };
    let mut request = tonic::Request::new(message);
    if !options.metadata.is_empty() {
        *request.metadata_mut() = options.metadata.clone();
    }
    request.set_timeout(options.timeout);
    let outcome = if options.stream > 0 {
        match client.stream(request).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                let mut agent = String::new();
                loop {
                    match stream.message().await {
                        Ok(Some(reply)) => agent = reply.agent,
                        Ok(None) => break Ok(agent),
                        Err(status) => break Err(status),
                    }
                }
            }
            Err(status) => Err(status),
        }
    } else {
        client.invoke(request).await.map(|r| r.into_inner().agent)
    };
    outcome.map_err(|status| format!("{:?}", status.code()))
}

impl LoadReport {
    pub fn render(&self) -> String {
        let errors = if self.errors.is_empty() {
            "none".to_string()
        } else {
            self.errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "{}\n{} calls in {:.1}s: {:.1} calls/s; ok {}; errors: {}\nlatency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}\n",
            self.mode,
            self.calls,
            self.seconds,
            self.calls_per_sec,
            self.ok,
            errors,
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms
        )
    }
}
