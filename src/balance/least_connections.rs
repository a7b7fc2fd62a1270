//! Load-aware pickers that compare random candidates (power of two choices,
//! as in Mitzenmacher's analysis and tower's `p2c`), or scan all.
//!
//! - `least_connections`: fewest calls in flight, divided by weight.
//! - `latency`: peak-EWMA round-trip time times (calls in flight + 1),
//!   divided by weight, as in Finagle's and Linkerd's balancers. An
//!   endpoint that is slow, busy or failing costs more.
//!
//! Two random candidates avoid the herd that "always the least loaded"
//! causes when many pickers (or sidecars) act on the same stale view, and
//! cost O(1) per call.

use std::sync::Arc;

use tokio::time::Instant;

use super::{Call, Draw, Picker};
use crate::endpoint::Endpoint;

pub struct LeastConnections {
    draw: Draw,
}

impl LeastConnections {
    pub fn new(draw: Draw) -> LeastConnections {
        LeastConnections { draw }
    }
}

impl Picker for LeastConnections {
    fn pick(&self, _call: &Call<'_>, ready: &[Arc<Endpoint>]) -> usize {
        self.draw.cheapest(ready, |e| {
            e.in_flight() as f64 / f64::from(e.weight().get())
        })
    }
}

pub struct Latency {
    draw: Draw,
}

impl Latency {
    pub fn new(draw: Draw) -> Latency {
        Latency { draw }
    }
}

impl Picker for Latency {
    fn pick(&self, _call: &Call<'_>, ready: &[Arc<Endpoint>]) -> usize {
        let now = Instant::now();
        self.draw.cheapest(ready, |e| {
            e.load().rtt_estimate(now) * (e.in_flight() + 1) as f64 / f64::from(e.weight().get())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;
    use std::time::Duration;

    use super::*;
    use crate::balance::test_support::endpoints;
    use crate::config::Choices;

    fn call_on<'a>(headers: &'a http::HeaderMap) -> Call<'a> {
        Call { path: "/", headers }
    }

    #[test]
    fn least_connections_avoids_the_busy_endpoint_and_honours_weight() {
        let ready = endpoints(&[1, 1, 4]);
        let headers = http::HeaderMap::new();
        // Endpoint 0 has 5 calls in flight, endpoint 2 has 8 (but weight 4).
        let _busy: Vec<_> = (0..5).map(|_| ready[0].start_call()).collect();
        let _heavy: Vec<_> = (0..8).map(|_| ready[2].start_call()).collect();
        let all = LeastConnections::new(Draw::new(Choices::All, false));
        assert_eq!(
            all.pick(&call_on(&headers), &ready),
            1,
            "0 in flight beats 5/1 and 8/4"
        );
        let p2c = LeastConnections::new(Draw::new(
            Choices::Random(NonZeroUsize::new(2).unwrap()),
            false,
        ));
        let mut hits = [0; 3];
        for _ in 0..3000 {
            hits[p2c.pick(&call_on(&headers), &ready)] += 1;
        }
        // Endpoint 1 wins whenever it is a candidate (2/3 of the time);
        // endpoint 2 (cost 2) beats endpoint 0 (cost 5) otherwise.
        assert!(hits[0] == 0 && hits[1] > 1800 && hits[2] > 800, "{hits:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn latency_prefers_the_fast_endpoint_and_counts_failures_against_it() {
        let ready = endpoints(&[1, 1]);
        let headers = http::HeaderMap::new();
        let now = Instant::now();
        ready[0].load().observe_rtt(Duration::from_millis(5), now);
        ready[1].load().observe_rtt(Duration::from_millis(50), now);
        let picker = Latency::new(Draw::new(Choices::All, false));
        assert_eq!(picker.pick(&call_on(&headers), &ready), 0);
        // Endpoint 0 now fails fast: it must not look fast any more.
        let mut failing = ready[0].start_call();
        failing.finished(crate::config::Outcome::Status(tonic::Code::Unavailable));
        drop(failing);
        assert_eq!(picker.pick(&call_on(&headers), &ready), 1);
    }
}
