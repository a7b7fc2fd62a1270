//! What one pick costs, by strategy and group size: the full scan that
//! `choices = "auto"` makes on up to 16 endpoints against two random
//! candidates and the runner-up. A benchmark, not a test:
//! `cargo bench --bench pick` (bounded: 200,000 picks per row).
//!
//! Each endpoint carries 0-7 calls in flight, so that comparisons are
//! real; the picker reads only atomics.

use std::hint::black_box;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::Instant;

use agentmesh::balance::{Call, Draw, HotCold, Latency, LeastConnections, Picker};
use agentmesh::config::{Choices, ClusterConfig, EndpointConfig, Strategy};
use agentmesh::endpoint::{EjectionBudget, Endpoint};
use tokio::sync::Notify;

const PICKS: u32 = 200_000;

fn endpoints(n: usize, strategy: Strategy) -> Vec<Arc<Endpoint>> {
    let mut cluster = ClusterConfig::for_test("bench", &[]);
    cluster.strategy = strategy;
    (0..n)
        .map(|i| {
            let config = EndpointConfig {
                address: format!("10.0.{}.{}:50051", i / 250, i % 250),
                weight: NonZeroU32::MIN,
                zone: None,
                priority: 0,
                version: None,
            };
            Arc::new(Endpoint::new(
                &config,
                &cluster,
                Arc::new(Notify::new()),
                Arc::new(EjectionBudget::new(n, 0.5)),
                None,
            ))
        })
        .collect()
}

/// Nanoseconds per pick.
fn time(picker: &dyn Picker, ready: &[Arc<Endpoint>]) -> f64 {
    let headers = http::HeaderMap::new();
    let call = Call::new("/bench.Service/Method", &headers);
    for _ in 0..PICKS / 10 {
        black_box(picker.pick(&call, ready));
    }
    let start = Instant::now();
    for _ in 0..PICKS {
        black_box(picker.pick(black_box(&call), ready));
    }
    start.elapsed().as_nanos() as f64 / f64::from(PICKS)
}

fn main() {
    let two = Choices::Random(NonZeroUsize::new(2).expect("2 is not 0"));
    println!(
        "| endpoints | least_connections, 2 + runner-up ns | full scan ns | latency, 2 + runner-up ns | full scan ns | hot_cold, 2 + runner-up ns | full scan ns |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for n in [2, 4, 8, 16, 32, 64, 128] {
        let mut row = format!("| {n} |");
        for strategy in [
            Strategy::LeastConnections,
            Strategy::Latency,
            Strategy::HotCold,
        ] {
            let ready = endpoints(n, strategy);
            let _calls: Vec<_> = ready
                .iter()
                .enumerate()
                .flat_map(|(i, e)| {
                    (0..i % 8)
                        .filter_map(|_| e.try_start_call(u32::MAX).ok())
                        .collect::<Vec<_>>()
                })
                .collect();
            for choices in [two, Choices::All] {
                let draw = Draw::new(choices, true);
                let picker: Box<dyn Picker> = match strategy {
                    Strategy::LeastConnections => Box::new(LeastConnections::new(draw, false)),
                    Strategy::Latency => Box::new(Latency::new(draw)),
                    _ => Box::new(HotCold::new(draw, 0.84)),
                };
                row += &format!(" {:.1} |", time(picker.as_ref(), &ready));
            }
        }
        println!("{row}");
    }
}
