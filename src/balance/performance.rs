//! The `performance` strategy: a score that mixes success rate and
//! response time over a window (default 5 minutes), as the agent
//! frameworks' "performance-based" balancer does:
//!
//! `score = success_weight * success_rate + latency_weight * latency_score`
//!
//! with weights 0.7 and 0.3 by default. The seed's latency score,
//! `1 / (1 + seconds)`, barely tells 5 ms from 50 ms, so here it is relative:
//! the fastest candidate's mean latency divided by this one's (1.0 for the
//! fastest). Candidates are drawn as in the other load-aware pickers (two at
//! random by default); the higher score wins. An endpoint with no calls in
//! the window scores as perfect, so that it is tried; with a mesh, as its
//! peers saw it, where they have figures (warm start).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Call, Draw, Picker};
use crate::config::PerformanceConfig;
use crate::endpoint::Endpoint;

pub struct Performance {
    draw: Draw,
    success_weight: f64,
    latency_weight: f64,
}

impl Performance {
    pub fn new(draw: Draw, config: &PerformanceConfig) -> Performance {
        Performance {
            draw,
            success_weight: config.success_weight,
            latency_weight: config.latency_weight,
        }
    }
}

impl Picker for Performance {
    fn pick(&self, call: &Call<'_>, ready: &[Arc<Endpoint>]) -> usize {
        let now = Instant::now();
        // The fastest mean latency among all ready endpoints normalises the
        // latency score (one pass; the sets are small).
        let fastest = ready
            .iter()
            .filter_map(|e| e.load().summary(now))
            .map(|s| s.mean_latency)
            .min()
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_micros(1));
        self.draw.cheapest(call, ready, |e| {
            let (success, latency) = match e.load().summary(now) {
                None => (1.0, 1.0),
                Some(s) => {
                    let mean = s.mean_latency.max(Duration::from_micros(1));
                    (s.success_rate, fastest.as_secs_f64() / mean.as_secs_f64())
                }
            };
            // cheapest() takes the lowest cost: negate the score.
            -(self.success_weight * success + self.latency_weight * latency)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_support::endpoints;
    use crate::config::Choices;

    #[tokio::test(start_paused = true)]
    async fn success_rate_outweighs_speed_by_default() {
        let ready = endpoints(&[1, 1, 1]);
        let now = Instant::now();
        let record = |i: usize, failed: bool, ms: u64| {
            ready[i]
                .load()
                .observe_outcome(failed, Duration::from_millis(ms), now)
        };
        for _ in 0..10 {
            record(0, false, 50); // slow, always succeeds: 0.7 + 0.3 * 0.1
            record(1, true, 5); // fast, always fails: 0 + 0.3 * 1
            record(2, false, 10); // best: 0.7 + 0.3 * 0.5
        }
        let headers = http::HeaderMap::new();
        let call = Call::new("/", &headers);
        let p = Performance::new(
            Draw::new(Choices::All, false),
            &PerformanceConfig::default(),
        );
        assert_eq!(p.pick(&call, &ready), 2);
        let speed_only = PerformanceConfig {
            success_weight: 0.0,
            latency_weight: 1.0,
            ..Default::default()
        };
        assert_eq!(
            Performance::new(Draw::new(Choices::All, false), &speed_only).pick(&call, &ready),
            1
        );
        let mut without_best = ready.clone();
        without_best.remove(2);
        assert_eq!(p.pick(&call, &without_best), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn unmeasured_endpoints_score_as_the_mesh_saw_them() {
        let ready = endpoints(&[1, 1]);
        let headers = http::HeaderMap::new();
        let call = Call::new("/", &headers);
        let p = Performance::new(
            Draw::new(Choices::All, false),
            &PerformanceConfig::default(),
        );
        // Neither has a call here; peers saw endpoint 0 fail half its calls.
        ready[0].load().set_mesh(0.0, Some(10e6), Some(0.5));
        ready[1].load().set_mesh(0.0, Some(10e6), Some(1.0));
        assert_eq!(p.pick(&call, &ready), 1);
        // A call here outweighs the mesh's figures.
        ready[0]
            .load()
            .observe_outcome(false, Duration::from_millis(10), Instant::now());
        assert!(ready[0].load().summary(Instant::now()).unwrap().calls == 1);
    }
}
