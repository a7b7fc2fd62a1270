//! `hot_cold`: Prequal's rule (Wydrowski et al., "Load is not what you
//! should balance", NSDI 2024) on what a sidecar mesh sees. An endpoint is
//! *hot* when its calls in flight, counted over the whole mesh (this
//! sidecar's and what its peers gossip), are above a quantile of the
//! cluster's (0.84 by default, as Prequal); the others are *cold*. Of the
//! candidates, the cold one with the lowest latency to expect wins (its
//! peak-EWMA latency times its calls in flight over the mesh plus one,
//! divided by weight, as Prequal's probes report latency at the replica's
//! current load); if every
//! candidate is hot, the least loaded.
//!
//! Latency picks well while load is even, and load picks well while the
//! endpoints are alike; hot and cold uses latency among the endpoints that
//! are not overloaded and load to keep them so. The quantile is taken over
//! the whole group when it has up to 16 endpoints, otherwise over 16 spread
//! from a random start.

use std::sync::Arc;

use tokio::time::Instant;

use super::{Call, Draw, Picker};
use crate::endpoint::Endpoint;

/// The most endpoints whose load the quantile is taken over.
const SAMPLE: usize = 16;

pub struct HotCold {
    draw: Draw,
    quantile: f64,
}

impl HotCold {
    pub fn new(draw: Draw, quantile: f64) -> HotCold {
        HotCold {
            draw,
            quantile: quantile.clamp(0.0, 1.0),
        }
    }

    /// The load above which an endpoint is hot.
    fn threshold(&self, ready: &[Arc<Endpoint>]) -> f64 {
        let n = ready.len();
        let m = n.min(SAMPLE);
        let (start, stride) = if m == n {
            (0, 1)
        } else {
            (fastrand::usize(..n), n / m)
        };
        let mut loads = [0.0f64; SAMPLE];
        for (k, load) in loads.iter_mut().take(m).enumerate() {
            *load = load_of(&ready[(start + k * stride) % n]);
        }
        let loads = &mut loads[..m];
        loads.sort_unstable_by(f64::total_cmp);
        loads[((m - 1) as f64 * self.quantile).floor() as usize]
    }
}

/// Calls in flight over the mesh, divided by weight.
fn load_of(e: &Endpoint) -> f64 {
    e.load().mesh_wide_in_flight() / f64::from(e.weight().get())
}

impl Picker for HotCold {
    fn pick(&self, call: &Call<'_>, ready: &[Arc<Endpoint>]) -> usize {
        if ready.len() <= 1 {
            return 0;
        }
        let hot_above = self.threshold(ready);
        let now = Instant::now();
        // Cold first (0 before 1), by latency; hot ones by load.
        self.draw.cheapest(call, ready, |e| {
            let load = load_of(e);
            if load > hot_above {
                (1.0, load)
            } else {
                let waiting = e.load().mesh_wide_in_flight() + 1.0;
                (
                    0.0,
                    e.load().rtt_estimate(now) * waiting / f64::from(e.weight().get()),
                )
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::balance::test_support::endpoints;
    use crate::config::Choices;

    #[tokio::test(start_paused = true)]
    async fn the_fastest_cold_endpoint_wins_and_a_hot_one_only_when_all_are() {
        let ready = endpoints(&[1, 1, 1, 1, 1, 1]);
        let headers = http::HeaderMap::new();
        let call = Call::new("/", &headers);
        let now = Instant::now();
        for (i, ms) in [(0, 2), (1, 20), (2, 20), (3, 20), (4, 20), (5, 30)] {
            ready[i].load().observe_rtt(Duration::from_millis(ms), now);
        }
        let picker = HotCold::new(Draw::new(Choices::All, false), 0.84);
        assert_eq!(picker.pick(&call, &ready), 0, "cold and fastest");
        // Peers carry 6 calls on endpoint 0: above the 0.84 quantile, hot.
        ready[0].load().set_mesh(6.0, None, None);
        let picks: Vec<usize> = (0..50).map(|_| picker.pick(&call, &ready)).collect();
        assert!(
            picks.iter().all(|&i| (1..=4).contains(&i)),
            "the fastest cold ones, not the hot one nor the slowest: {picks:?}"
        );
        // Calls in flight alone do not make an endpoint hot while the others
        // carry as many: endpoint 5 is slow but as loaded as the rest.
        for e in &ready[1..] {
            e.load().set_mesh(6.0, None, None);
        }
        assert_eq!(picker.pick(&call, &ready), 0, "all equal: none is hot");
        // With the quantile at 0, all but the least loaded are hot: the
        // slowest, least loaded one wins over any hot one, and two hot
        // candidates go by load (the most loaded never wins).
        for (i, e) in ready[..5].iter().enumerate() {
            e.load().set_mesh(9.0 + i as f64, None, None);
        }
        let strict = HotCold::new(Draw::new(Choices::All, false), 0.0);
        assert_eq!(strict.pick(&call, &ready), 5);
        let two = Choices::Random(std::num::NonZeroUsize::new(2).unwrap());
        let strict = HotCold::new(Draw::new(two, false), 0.0);
        let mut hits = [0; 6];
        for _ in 0..600 {
            hits[strict.pick(&call, &ready)] += 1;
        }
        assert!(hits[4] == 0 && hits[5] > 150 && hits[0] > 50, "{hits:?}");
    }

    #[test]
    fn the_quantile_is_of_the_group_and_of_a_sample_of_a_large_one() {
        let ready = endpoints(&[1; 40]);
        for (i, e) in ready.iter().enumerate() {
            e.load().set_mesh(i as f64, None, None);
        }
        let picker = HotCold::new(Draw::new(Choices::All, false), 0.84);
        for _ in 0..100 {
            // 16 of 40 spread evenly: the 0.84 quantile is their 13th.
            let t = picker.threshold(&ready);
            assert!((20.0..=39.0).contains(&t), "{t}");
        }
        assert_eq!(picker.threshold(&ready[..5]), 3.0);
        assert_eq!(
            HotCold::new(Draw::new(Choices::All, false), 1.0).threshold(&ready[..5]),
            4.0
        );
    }
}
