//! Picking an endpoint for each call.
//!
//! A [`Picker`] is one method over a ready set: it is handed the call (so
//! that affinity can read a header) and the endpoints that may take it, and
//! returns the index of one. Pickers own no load counters: those live beside
//! each [`Endpoint`], so that rebuilding a picker when the ready set changes
//! forgets nothing. A [`Snapshot`] pairs a ready set with the picker built for
//! it; the cluster swaps whole snapshots atomically.

mod round_robin;
mod weighted;

use std::sync::Arc;

use http::HeaderMap;

pub use round_robin::RoundRobin;
pub use weighted::Weighted;

use crate::config::Strategy;
use crate::endpoint::Endpoint;

/// What a picker may look at of a call.
pub struct Call<'a> {
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

pub trait Picker: Send + Sync + 'static {
    /// The index in `ready` of the endpoint for this call. `ready` is never
    /// empty.
    fn pick(&self, call: &Call<'_>, ready: &[Arc<Endpoint>]) -> usize;
}

/// Builds the picker that `strategy` names, for `ready`.
pub fn picker_for(strategy: Strategy, ready: &[Arc<Endpoint>]) -> Box<dyn Picker> {
    match strategy {
        Strategy::RoundRobin => Box::new(RoundRobin::new()),
        Strategy::Weighted => Box::new(Weighted::new(ready)),
    }
}

/// A ready set and the picker built for it.
pub struct Snapshot {
    ready: Vec<Arc<Endpoint>>,
    picker: Box<dyn Picker>,
}

impl Snapshot {
    pub fn new(strategy: Strategy, ready: Vec<Arc<Endpoint>>) -> Snapshot {
        let picker = picker_for(strategy, &ready);
        Snapshot { ready, picker }
    }

    pub fn ready(&self) -> &[Arc<Endpoint>] {
        &self.ready
    }

    /// Picks an endpoint that is not in `tried`, or `None` when every ready
    /// endpoint has been tried. The picker's choice stands unless it was
    /// tried already; then the next untried endpoint in order is taken.
    pub fn pick(&self, call: &Call<'_>, tried: &Tried) -> Option<&Arc<Endpoint>> {
        let n = self.ready.len();
        if n == 0 || tried.count() >= n {
            return None;
        }
        let first = self.picker.pick(call, &self.ready) % n;
        (0..n)
            .map(|step| (first + step) % n)
            .find(|&i| !tried.contains(i))
            .map(|i| &self.ready[i])
    }

    /// The index of `endpoint` in the ready set.
    pub fn index_of(&self, endpoint: &Arc<Endpoint>) -> Option<usize> {
        self.ready.iter().position(|e| Arc::ptr_eq(e, endpoint))
    }
}

/// The endpoints one call has already tried, by index in the snapshot.
#[derive(Default)]
pub struct Tried {
    small: u64,
    large: Vec<usize>,
}

impl Tried {
    pub fn insert(&mut self, i: usize) {
        if i < 64 {
            self.small |= 1 << i;
        } else if !self.large.contains(&i) {
            self.large.push(i);
        }
    }

    pub fn contains(&self, i: usize) -> bool {
        if i < 64 {
            self.small & (1 << i) != 0
        } else {
            self.large.contains(&i)
        }
    }

    pub fn count(&self) -> usize {
        self.small.count_ones() as usize + self.large.len()
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::num::NonZeroU32;
    use std::sync::Arc;
    use std::time::Duration;

    use crate::endpoint::Endpoint;

    pub fn endpoints(weights: &[u32]) -> Vec<Arc<Endpoint>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                Arc::new(Endpoint::new(
                    &format!("127.0.0.1:{}", 1000 + i),
                    NonZeroU32::new(w).expect("test weights are positive"),
                    Duration::from_secs(1),
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_skips_tried_endpoints_and_gives_up_when_all_are_tried() {
        let headers = HeaderMap::new();
        let call = Call {
            path: "/s/m",
            headers: &headers,
        };
        let snapshot = Snapshot::new(Strategy::RoundRobin, test_support::endpoints(&[1, 1, 1]));
        let mut tried = Tried::default();
        let mut seen = Vec::new();
        while let Some(e) = snapshot.pick(&call, &tried) {
            let i = snapshot.index_of(e).unwrap();
            assert!(!tried.contains(i), "picked a tried endpoint");
            tried.insert(i);
            seen.push(i);
        }
        seen.sort();
        assert_eq!(seen, [0, 1, 2]);
    }

    #[test]
    fn tried_counts_beyond_the_bitmask() {
        let mut t = Tried::default();
        for i in [0, 63, 64, 200, 200] {
            t.insert(i);
        }
        assert_eq!(t.count(), 4);
        assert!(t.contains(200) && t.contains(63) && !t.contains(1));
    }
}
