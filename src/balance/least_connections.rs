//! `least_connections`: the fewest calls in flight, divided by weight, among
//! candidates drawn by [`Draw`]: all of a group of up to 16 endpoints; in a
//! larger one, two at random (power of two choices, as in Mitzenmacher's
//! analysis and tower's `p2c`) and the last runner-up. Ties go to the
//! endpoint whose recent answers came faster.
//!
//! Two random candidates avoid the herd that "always the least loaded"
//! causes when many pickers (or sidecars) act on the same stale view, and
//! cost O(1) per call; on a few endpoints the full scan costs little and
//! misses the least loaded never, which is what a tail latency sees.

use std::sync::Arc;

use super::{Call, Draw, Picker};
use crate::endpoint::Endpoint;

pub struct LeastConnections {
    draw: Draw,
    /// Count peers' calls too (`[mesh]` with `share_load`); without a mesh
    /// the cost is this sidecar's count alone, read as before.
    mesh: bool,
}

impl LeastConnections {
    pub fn new(draw: Draw, mesh: bool) -> LeastConnections {
        LeastConnections { draw, mesh }
    }
}

impl Picker for LeastConnections {
    fn pick(&self, call: &Call<'_>, ready: &[Arc<Endpoint>]) -> usize {
        // Ties go to the endpoint that has been answering faster: among
        // idle endpoints, a slow one is otherwise as likely as any to get
        // the next call, and holds it the longest.
        let faster = |e: &Endpoint| e.load().recent_rtt_ns() as f64;
        if self.mesh {
            return self.draw.cheapest(call, ready, |e| {
                (
                    e.load().mesh_wide_in_flight() / f64::from(e.weight().get()),
                    faster(e),
                )
            });
        }
        self.draw.cheapest(call, ready, |e| {
            (
                e.in_flight() as f64 / f64::from(e.weight().get()),
                faster(e),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use super::*;
    use crate::balance::test_support::endpoints;
    use crate::config::Choices;

    fn call_on<'a>(headers: &'a http::HeaderMap) -> Call<'a> {
        Call::new("/", headers)
    }

    #[test]
    fn least_connections_avoids_the_busy_endpoint_and_honours_weight() {
        let ready = endpoints(&[1, 1, 4]);
        let headers = http::HeaderMap::new();
        // Endpoint 0 has 5 calls in flight, endpoint 2 has 8 (but weight 4).
        let _busy: Vec<_> = (0..5).map(|_| ready[0].start_call()).collect();
        let _heavy: Vec<_> = (0..8).map(|_| ready[2].start_call()).collect();
        let all = LeastConnections::new(Draw::new(Choices::All, false), false);
        assert_eq!(
            all.pick(&call_on(&headers), &ready),
            1,
            "0 in flight beats 5/1 and 8/4"
        );
        let p2c = LeastConnections::new(
            Draw::new(Choices::Random(NonZeroUsize::new(2).unwrap()), false),
            false,
        );
        let mut hits = [0; 3];
        for _ in 0..3000 {
            hits[p2c.pick(&call_on(&headers), &ready)] += 1;
        }
        // Endpoint 1 wins whenever it is a candidate (2/3 of the time);
        // endpoint 2 (cost 2) beats endpoint 0 (cost 5) otherwise.
        assert!(hits[0] == 0 && hits[1] > 1800 && hits[2] > 800, "{hits:?}");
    }

    #[test]
    fn ties_go_to_the_endpoint_that_answers_faster() {
        let ready = endpoints(&[1, 1, 1]);
        let headers = http::HeaderMap::new();
        let now = tokio::time::Instant::now();
        let ms = std::time::Duration::from_millis;
        ready[0].load().observe_rtt(ms(200), now);
        ready[1].load().observe_rtt(ms(5), now);
        ready[2].load().observe_rtt(ms(6), now);
        let all = LeastConnections::new(Draw::new(Choices::Auto, true), false);
        assert_eq!(all.pick(&call_on(&headers), &ready), 1);
        // The slow one is still picked when it is the least loaded.
        let _busy = (ready[1].start_call(), ready[2].start_call());
        assert_eq!(all.pick(&call_on(&headers), &ready), 0);
        // A failure counts as a slow answer: endpoint 1 fails fast.
        drop(_busy);
        for _ in 0..4 {
            let mut call = ready[1].start_call();
            call.finished(crate::endpoint::Outcome::Status(tonic::Code::Unavailable));
        }
        assert_eq!(all.pick(&call_on(&headers), &ready), 2);
    }

    #[test]
    fn with_a_mesh_peers_calls_count_too() {
        let ready = endpoints(&[1, 1]);
        let headers = http::HeaderMap::new();
        let _mine = ready[1].start_call();
        // Peers carry 8 calls on endpoint 0, which this sidecar never used.
        ready[0].load().set_mesh(8.0, None, None);
        let local = LeastConnections::new(Draw::new(Choices::All, false), false);
        let mesh = LeastConnections::new(Draw::new(Choices::All, false), true);
        assert_eq!(local.pick(&call_on(&headers), &ready), 0);
        assert_eq!(mesh.pick(&call_on(&headers), &ready), 1, "1 beats 0 + 8");
    }
}
