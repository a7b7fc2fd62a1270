//! Round robin: each call takes the next endpoint in turn.
//!
//! One relaxed atomic counter per snapshot; calls from every caller and
//! connection share it, so the spread is even per call, not per connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Call, Picker};
use crate::endpoint::Endpoint;

pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// Starts at a random place, so that sidecars started together do not
    /// all send their first calls to the same endpoint.
    pub fn new() -> RoundRobin {
        RoundRobin {
            next: AtomicUsize::new(fastrand::usize(..1 << 16)),
        }
    }
}

impl Default for RoundRobin {
    fn default() -> Self {
        Self::new()
    }
}

impl Picker for RoundRobin {
    fn pick(&self, _call: &Call<'_>, ready: &[Arc<Endpoint>]) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % ready.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_support::endpoints;

    #[test]
    fn visits_every_endpoint_once_per_turn() {
        let ready = endpoints(&[1, 1, 1, 1]);
        let headers = http::HeaderMap::new();
        let call = Call::new("/", &headers);
        let rr = RoundRobin::new();
        let mut counts = [0; 4];
        for _ in 0..400 {
            counts[rr.pick(&call, &ready)] += 1;
        }
        assert_eq!(counts, [100; 4]);
    }
}
