//! Picking an endpoint for each call.
//!
//! A [`Picker`] is one method over a ready set: it is handed the call (so
//! that affinity can read a header) and the endpoints that may take it, and
//! returns the index of one. Pickers own no load counters: those live beside
//! each [`Endpoint`], so that rebuilding a picker when the ready set changes
//! forgets nothing.
//!
//! A [`Snapshot`] is what a cluster swaps whole when readiness changes: the
//! ready endpoints, cut by [`placement`] into groups (version split, then
//! priority level, then zone), each group with its share of calls and its
//! own picker. A call with a session key is placed by [`affinity`] instead.

pub mod affinity;
mod least_connections;
mod performance;
pub mod placement;
#[cfg(test)]
mod properties;
mod round_robin;
mod weighted;

use std::sync::Arc;

use http::HeaderMap;
use tokio::time::Instant;

pub use affinity::Affinity;
pub use least_connections::{Latency, LeastConnections};
pub use performance::Performance;
pub use round_robin::RoundRobin;
pub use weighted::Weighted;

use crate::config::{Choices, ClusterConfig, Strategy};
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

/// Builds the picker that the cluster's strategy names, for `ready`.
pub fn picker_for(config: &ClusterConfig, ready: &[Arc<Endpoint>]) -> Box<dyn Picker> {
    match config.strategy {
        Strategy::RoundRobin => Box::new(RoundRobin::new()),
        Strategy::Weighted => Box::new(Weighted::new(ready)),
        Strategy::LeastConnections => Box::new(LeastConnections::new(config.choices)),
        Strategy::Latency => Box::new(Latency::new(config.choices)),
        Strategy::Performance => Box::new(Performance::new(config.choices, &config.performance)),
    }
}

/// Of `ready`, the index with the lowest `cost`, among `choices` random
/// candidates (or all of them); ties are broken at random.
pub(crate) fn cheapest(
    ready: &[Arc<Endpoint>],
    choices: Choices,
    cost: impl Fn(&Endpoint) -> f64,
) -> usize {
    let n = ready.len();
    let k = match choices {
        Choices::All => n,
        Choices::Random(k) => k.get().min(n),
    };
    if n == 1 {
        return 0;
    }
    if k == 2 && n > 2 {
        let a = fastrand::usize(..n);
        let mut b = fastrand::usize(..n - 1);
        if b >= a {
            b += 1;
        }
        let (ca, cb) = (cost(&ready[a]), cost(&ready[b]));
        return if ca < cb || (ca == cb && fastrand::bool()) {
            a
        } else {
            b
        };
    }
    // Full scan over `k` candidates: a random rotation when k < n keeps the
    // candidate set random without allocating.
    let start = if k < n { fastrand::usize(..n) } else { 0 };
    let stride = if k < n { n / k.max(1) } else { 1 };
    let mut best = start % n;
    let mut best_cost = f64::INFINITY;
    let mut ties = 0u32;
    for step in 0..k {
        let i = (start + step * stride.max(1)) % n;
        let c = cost(&ready[i]);
        if c < best_cost {
            best = i;
            best_cost = c;
            ties = 1;
        } else if c == best_cost {
            // Reservoir sampling over the ties: each is kept with equal odds.
            ties += 1;
            if fastrand::u32(..ties) == 0 {
                best = i;
            }
        }
    }
    best
}

struct Group {
    /// Cumulative share of calls up to and including this group, in (0, 1].
    upto: f64,
    endpoints: Vec<Arc<Endpoint>>,
    picker: Box<dyn Picker>,
}

/// The ready endpoints, their groups and pickers: swapped whole.
pub struct Snapshot {
    ready: Vec<Arc<Endpoint>>,
    groups: Vec<Group>,
    /// True when no endpoint was ready and every endpoint is used instead.
    panic: bool,
}

impl Snapshot {
    /// Builds the snapshot of `endpoints` as they are at `now`.
    pub fn build(
        config: &ClusterConfig,
        local_zone: Option<&str>,
        endpoints: &[Arc<Endpoint>],
        now: Instant,
    ) -> Snapshot {
        let ready: Vec<bool> = endpoints.iter().map(|e| e.is_ready(now)).collect();
        let ready_count = ready.iter().filter(|&&r| r).count();
        let panic = !endpoints.is_empty()
            && (ready_count == 0
                || (ready_count as f64) < config.panic_threshold * endpoints.len() as f64);
        if !panic {
            return Self::with_readiness(config, local_zone, endpoints, ready, false);
        }
        // Too few are healthy: better to spread calls over every endpoint
        // that can be reached than to crush the few that are left (Envoy's
        // panic threshold). Endpoints sitting out a failed connect stay out
        // while any other remains, since a call to them costs a connect
        // timeout.
        // (When none is reachable either, `with_readiness` takes them all.)
        let reachable = endpoints.iter().map(|e| e.is_reachable(now)).collect();
        Self::with_readiness(config, local_zone, endpoints, reachable, true)
    }

    /// Builds the snapshot with `ready[i]` saying whether `endpoints[i]` is
    /// ready; `panic` marks a snapshot made in panic mode.
    pub fn with_readiness(
        config: &ClusterConfig,
        local_zone: Option<&str>,
        endpoints: &[Arc<Endpoint>],
        ready: Vec<bool>,
        panic: bool,
    ) -> Snapshot {
        let mut ready_flags = ready;
        let panic = panic || (!endpoints.is_empty() && !ready_flags.iter().any(|&r| r));
        if !ready_flags.iter().any(|&r| r) {
            ready_flags.iter_mut().for_each(|r| *r = true);
        }
        let placement = placement::Placement {
            local_zone,
            split: &config.split,
            overprovisioning: config.overprovisioning,
        };
        let plan = placement::plan(endpoints, &ready_flags, &placement);
        let mut upto = 0.0;
        let groups = plan
            .into_iter()
            .map(|(share, members)| {
                upto += share;
                let endpoints: Vec<Arc<Endpoint>> =
                    members.iter().map(|&i| endpoints[i].clone()).collect();
                Group {
                    upto,
                    picker: picker_for(config, &endpoints),
                    endpoints,
                }
            })
            .collect();
        let ready = endpoints
            .iter()
            .zip(&ready_flags)
            .filter(|(_, r)| **r)
            .map(|(e, _)| e.clone())
            .collect();
        Snapshot {
            ready,
            groups,
            panic,
        }
    }

    pub fn ready(&self) -> &[Arc<Endpoint>] {
        &self.ready
    }

    pub fn is_panic(&self) -> bool {
        self.panic
    }

    /// Picks an endpoint not in `tried`, or `None` when every ready endpoint
    /// has been tried. A call with a session key goes where `affinity` says;
    /// any other call is placed in a group by the groups' shares, and the
    /// group's picker chooses. A choice that was tried already gives way to
    /// the next untried endpoint of its group, then of the ready set.
    pub fn pick(
        &self,
        call: &Call<'_>,
        tried: &Tried,
        affinity: Option<&Affinity>,
    ) -> Option<&Arc<Endpoint>> {
        if self.ready.is_empty() {
            return None;
        }
        if let Some(affinity) = affinity {
            if let Some(key) = affinity.key(call.headers) {
                if let Some(i) = affinity.pick(key, &self.ready, tried) {
                    return Some(&self.ready[i]);
                }
            }
        }
        let group = match self.groups.len() {
            0 => None,
            1 => Some(&self.groups[0]),
            _ => {
                let x = fastrand::f64() * self.groups.last().map_or(1.0, |g| g.upto);
                self.groups
                    .iter()
                    .find(|g| x < g.upto)
                    .or(self.groups.last())
            }
        };
        if let Some(g) = group {
            let n = g.endpoints.len();
            let first = g.picker.pick(call, &g.endpoints) % n;
            let found = (0..n)
                .map(|step| &g.endpoints[(first + step) % n])
                .find(|e| !tried.contains(e.id()));
            if found.is_some() {
                return found;
            }
        }
        self.ready.iter().find(|e| !tried.contains(e.id()))
    }
}

/// The endpoints one call has already tried, by id; no allocation for the
/// first few.
#[derive(Default)]
pub struct Tried {
    inline: [u64; 4],
    len: usize,
    more: Vec<u64>,
}

impl Tried {
    pub fn insert(&mut self, id: u64) {
        if self.contains(id) {
            return;
        }
        if self.len < self.inline.len() {
            self.inline[self.len] = id;
        } else {
            self.more.push(id);
        }
        self.len += 1;
    }

    pub fn contains(&self, id: u64) -> bool {
        self.inline[..self.len.min(self.inline.len())].contains(&id) || self.more.contains(&id)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::num::NonZeroU32;
    use std::sync::Arc;

    use tokio::sync::Notify;

    use crate::config::{ClusterConfig, EndpointConfig};
    use crate::endpoint::Endpoint;

    pub fn endpoint(
        cluster: &ClusterConfig,
        i: usize,
        weight: u32,
        zone: Option<&str>,
        priority: u32,
        version: Option<&str>,
    ) -> Arc<Endpoint> {
        let config = EndpointConfig {
            address: format!("127.0.0.1:{}", 1000 + i),
            weight: NonZeroU32::new(weight).expect("test weights are positive"),
            zone: zone.map(String::from),
            priority,
            version: version.map(String::from),
        };
        Arc::new(Endpoint::new(
            &config,
            cluster,
            Arc::new(Notify::new()),
            Arc::new(crate::endpoint::EjectionBudget::new(1, 0.5)),
        ))
    }

    pub fn endpoints(weights: &[u32]) -> Vec<Arc<Endpoint>> {
        let cluster = ClusterConfig::for_test("test", &[]);
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| endpoint(&cluster, i, w, None, 0, None))
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
        let eps = test_support::endpoints(&[1, 1, 1]);
        let config = ClusterConfig::for_test("test", &[]);
        let snapshot = Snapshot::build(&config, None, &eps, Instant::now());
        let mut tried = Tried::default();
        let mut seen = Vec::new();
        while let Some(e) = snapshot.pick(&call, &tried, None) {
            assert!(!tried.contains(e.id()), "picked a tried endpoint");
            tried.insert(e.id());
            seen.push(e.id());
        }
        seen.sort();
        let mut want: Vec<u64> = eps.iter().map(|e| e.id()).collect();
        want.sort();
        assert_eq!(seen, want);
    }

    #[test]
    fn tried_counts_beyond_its_inline_slots() {
        let mut t = Tried::default();
        for i in [1, 2, 3, 4, 5, 6, 6] {
            t.insert(i);
        }
        assert_eq!(t.len(), 6);
        assert!(t.contains(6) && t.contains(1) && !t.contains(7));
    }

    #[test]
    fn cheapest_breaks_ties_at_random_and_otherwise_takes_the_lowest() {
        let eps = test_support::endpoints(&[1, 1, 1, 1]);
        for choices in [
            Choices::All,
            Choices::Random(std::num::NonZeroUsize::new(2).unwrap()),
        ] {
            let mut hits = [0; 4];
            for _ in 0..4000 {
                hits[cheapest(&eps, choices, |_| 1.0)] += 1;
            }
            assert!(
                hits.iter().all(|&h| h > 800),
                "{choices:?}: ties spread: {hits:?}"
            );
        }
        let third = eps[2].id();
        assert_eq!(
            cheapest(&eps, Choices::All, |e| if e.id() == third {
                0.5
            } else {
                1.0
            }),
            2
        );
    }
}
