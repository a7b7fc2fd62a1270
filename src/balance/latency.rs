//! `latency`: the peak-EWMA round-trip time times (calls in flight + 1),
//! divided by weight, as in Finagle's and Linkerd's balancers, among
//! candidates drawn by [`Draw`]. An endpoint that is slow, busy or failing
//! costs more; the estimate itself is kept beside each endpoint
//! ([`crate::endpoint::Load`]).

use std::sync::Arc;

use tokio::time::Instant;

use super::{Call, Draw, Picker};
use crate::endpoint::Endpoint;

pub struct Latency {
    draw: Draw,
}

impl Latency {
    pub fn new(draw: Draw) -> Latency {
        Latency { draw }
    }
}

impl Picker for Latency {
    fn pick(&self, call: &Call<'_>, ready: &[Arc<Endpoint>]) -> usize {
        let now = Instant::now();
        self.draw.cheapest(call, ready, |e| {
            e.load().rtt_estimate(now) * (e.in_flight() + 1) as f64 / f64::from(e.weight().get())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::balance::test_support::endpoints;
    use crate::config::Choices;

    fn call_on<'a>(headers: &'a http::HeaderMap) -> Call<'a> {
        Call::new("/", headers)
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
        failing.finished(crate::endpoint::Outcome::Status(tonic::Code::Unavailable));
        drop(failing);
        assert_eq!(picker.pick(&call_on(&headers), &ready), 1);
    }
}
