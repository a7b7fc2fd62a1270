//! The `performance` strategy: a score that mixes success rate and
//! response time, as the agent frameworks' "performance-based" balancer
//! does:
//!
//! `score = success_weight * success_rate + latency_weight * latency_score`
//!
//! with weights 0.7 and 0.3 by default, the success rate over a window
//! (default 5 minutes). The latency score is relative (the seed's
//! `1 / (1 + seconds)` barely tells 5 ms from 50 ms): the best candidate's
//! figure divided by this one's, 1.0 for the best. Which figure depends on
//! `score`:
//!
//! - `load_aware` (the default): the time a new call can expect here, the
//!   endpoint's recent round trips times (calls in flight + 1), divided by
//!   weight, as `latency` reckons it. An endpoint with calls waiting scores
//!   lower, so the best endpoint is not sent every call until it queues.
//! - `performance_based`: the window's mean latency, as the seed's
//!   `calculatePerformanceScore` has it. It does not see calls waiting: the
//!   best-scoring endpoint takes calls until its mean moves, which over a
//!   five-minute window is long after a queue has formed (`bench/quality`).
//!
//! Candidates are drawn as in the other load-aware pickers; the higher score
//! wins. An endpoint with no calls in the window scores as perfect, so that
//! it is tried; with a mesh, as its peers saw it, where they have figures
//! (warm start).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Call, Draw, Picker};
use crate::config::{PerformanceConfig, PerformanceScore};
use crate::endpoint::Endpoint;

pub struct Performance {
    draw: Draw,
    success_weight: f64,
    latency_weight: f64,
    score: PerformanceScore,
}

impl Performance {
    pub fn new(draw: Draw, config: &PerformanceConfig) -> Performance {
        Performance {
            draw,
            success_weight: config.success_weight,
            latency_weight: config.latency_weight,
            score: config.score,
        }
    }

    /// The latency figure the score compares, in seconds (lower is
    /// better); `None` where there is none yet.
    fn figure(&self, e: &Endpoint, now: Instant) -> Option<f64> {
        let mean = || e.load().summary(now).map(|s| s.mean_latency);
        match self.score {
            PerformanceScore::PerformanceBased => mean().map(seconds),
            PerformanceScore::LoadAware => {
                let recent = match e.load().recent_rtt_ns() {
                    0 => mean().map(seconds)?,
                    ns => ns as f64 / 1e9,
                };
                let waiting = (e.in_flight() + 1) as f64;
                Some(recent.max(1e-6) * waiting / f64::from(e.weight().get()))
            }
        }
    }
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-6)
}

impl Picker for Performance {
    fn pick(&self, call: &Call<'_>, ready: &[Arc<Endpoint>]) -> usize {
        let now = Instant::now();
        // The best figure among all ready endpoints normalises the latency
        // score (one pass; the sets are small).
        let best = ready
            .iter()
            .filter_map(|e| self.figure(e, now))
            .fold(f64::INFINITY, f64::min);
        self.draw.cheapest(call, ready, |e| {
            let success = e.load().summary(now).map_or(1.0, |s| s.success_rate);
            let latency = match self.figure(e, now) {
                Some(figure) if best.is_finite() => best / figure,
                _ => 1.0,
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
        let seed = PerformanceConfig {
            score: PerformanceScore::PerformanceBased,
            ..Default::default()
        };
        let p = Performance::new(Draw::new(Choices::All, false), &seed);
        assert_eq!(p.pick(&call, &ready), 2);
        let speed_only = PerformanceConfig {
            success_weight: 0.0,
            latency_weight: 1.0,
            ..seed.clone()
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
    async fn load_aware_scores_fall_with_calls_waiting() {
        let ready = endpoints(&[1, 1]);
        let now = Instant::now();
        ready[0].load().observe_rtt(Duration::from_millis(10), now);
        ready[1].load().observe_rtt(Duration::from_millis(14), now);
        let headers = http::HeaderMap::new();
        let call = Call::new("/", &headers);
        let load_aware = Performance::new(
            Draw::new(Choices::Auto, true),
            &PerformanceConfig::default(),
        );
        assert_eq!(load_aware.pick(&call, &ready), 0, "idle: the faster");
        // Two calls wait on the faster: 10 ms x 3 against 14 ms x 1.
        let _waiting = (ready[0].start_call(), ready[0].start_call());
        assert_eq!(load_aware.pick(&call, &ready), 1);
        // The seed's score sees the mean latency only and stays put.
        for (i, ms) in [(0, 10), (1, 14)] {
            ready[i]
                .load()
                .observe_outcome(false, Duration::from_millis(ms), now);
        }
        let seed = Performance::new(
            Draw::new(Choices::All, false),
            &PerformanceConfig {
                score: PerformanceScore::PerformanceBased,
                ..Default::default()
            },
        );
        assert_eq!(seed.pick(&call, &ready), 0);
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
