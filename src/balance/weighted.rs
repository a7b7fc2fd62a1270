//! Weighted round robin, the smooth variant (as in nginx's upstream module).
//!
//! Each pick adds every endpoint's weight to its running score, takes the
//! endpoint with the highest score and subtracts the total weight from it.
//! Over any window of `total` picks each endpoint gets exactly its weight's
//! share, and picks of a heavy endpoint are spread out rather than bunched
//! (weights 5:1:1 give `a a b a c a a`, not `a a a a a b c`).

use std::sync::{Arc, Mutex};

use super::{Call, Picker};
use crate::endpoint::Endpoint;
use crate::util::lock;

pub struct Weighted {
    weights: Vec<i64>,
    total: i64,
    scores: Mutex<Vec<i64>>,
}

impl Weighted {
    pub fn new(ready: &[Arc<Endpoint>]) -> Weighted {
        let weights: Vec<i64> = ready.iter().map(|e| i64::from(e.weight().get())).collect();
        Weighted {
            total: weights.iter().sum(),
            scores: Mutex::new(vec![0; weights.len()]),
            weights,
        }
    }
}

impl Picker for Weighted {
    fn pick(&self, _call: &Call<'_>, ready: &[Arc<Endpoint>]) -> usize {
        if ready.len() != self.weights.len() {
            // Built for another set; cannot happen through `Snapshot`.
            return fastrand::usize(..ready.len());
        }
        let mut scores = lock(&self.scores);
        let mut best = 0;
        for i in 0..scores.len() {
            scores[i] += self.weights[i];
            if scores[i] > scores[best] {
                best = i;
            }
        }
        scores[best] -= self.total;
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_support::endpoints;

    fn picks(weights: &[u32], n: usize) -> Vec<usize> {
        let ready = endpoints(weights);
        let headers = http::HeaderMap::new();
        let call = Call::new("/", &headers);
        let w = Weighted::new(&ready);
        (0..n).map(|_| w.pick(&call, &ready)).collect()
    }

    #[test]
    fn every_window_of_total_weight_holds_the_exact_shares() {
        let p = picks(&[5, 3, 2], 1000);
        for window in p.chunks(10) {
            let count = |e| window.iter().filter(|&&i| i == e).count();
            assert_eq!((count(0), count(1), count(2)), (5, 3, 2), "{window:?}");
        }
    }

    #[test]
    fn heavy_endpoints_are_interleaved_not_bunched() {
        assert_eq!(picks(&[5, 1, 1], 7), [0, 0, 1, 0, 2, 0, 0]);
    }
}
