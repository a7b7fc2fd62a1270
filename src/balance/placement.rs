//! Placement: which share of calls each group of endpoints gets, by version
//! split, priority level and zone. A pure function of the endpoints and
//! their readiness; the cluster calls it when readiness changes.
//!
//! 1. **Version split** (`split = { v1 = 90, v2 = 10 }`): each version gets
//!    its share. A version with no ready endpoint gets none, and the others'
//!    shares grow in proportion, so that the split holds whatever the
//!    strategy, and a canary that is down takes no calls.
//! 2. **Priority levels** (within a version), as in Envoy: a level's health
//!    is its ready fraction times the overprovisioning factor (1.4), capped
//!    at 1. Level 0 gets its health as its share, level 1 gets what is left
//!    up to its own health, and so on; if the levels' health adds up to less
//!    than 1, the shares are scaled up to 1. A lower level is used only when
//!    the higher ones fall below `1 / 1.4` (about 71%) ready.
//! 3. **Zones** (within a level): when the sidecar knows its zone and the
//!    level has endpoints there, the local zone gets its health (as above)
//!    as its share and the rest spills to the other endpoints in proportion
//!    to their ready weight. Calls stay local while the local zone is at
//!    least 71% ready.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::endpoint::Endpoint;

pub struct Placement<'a> {
    pub local_zone: Option<&'a str>,
    pub split: &'a [(String, u32)],
    pub overprovisioning: f64,
}

/// Groups of endpoints (indices into `endpoints`, ready ones only) and their
/// shares of calls. The shares add up to 1 unless no endpoint is ready, in
/// which case there are no groups.
pub fn plan(
    endpoints: &[Arc<Endpoint>],
    ready: &[bool],
    placement: &Placement<'_>,
) -> Vec<(f64, Vec<usize>)> {
    let all: Vec<usize> = (0..endpoints.len()).collect();
    let mut groups = Vec::new();
    // 1. Versions.
    let versions: Vec<(f64, Vec<usize>)> = if placement.split.is_empty() {
        vec![(1.0, all)]
    } else {
        placement
            .split
            .iter()
            .map(|(version, share)| {
                let members = all
                    .iter()
                    .copied()
                    .filter(|&i| endpoints[i].version() == Some(version.as_str()))
                    .collect();
                (f64::from(*share), members)
            })
            .collect()
    };
    let mut versions = normalise(
        versions
            .into_iter()
            .filter(|(share, members): &(f64, Vec<usize>)| {
                *share > 0.0 && members.iter().any(|&i| ready[i])
            })
            .collect(),
    );
    if versions.is_empty() && ready.iter().any(|&r| r) {
        // Only versions with no share are ready: better them than nothing.
        versions = vec![(1.0, (0..endpoints.len()).collect())];
    }
    for (version_share, members) in versions {
        // 2. Priority levels.
        let mut levels: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for i in members {
            levels.entry(endpoints[i].priority()).or_default().push(i);
        }
        let mut left = 1.0;
        let mut level_shares = Vec::new();
        for (_, level) in levels {
            let share = health(&level, ready, placement.overprovisioning).min(left);
            left -= share;
            level_shares.push((share, level));
        }
        for (level_share, level) in normalise(level_shares) {
            // 3. Zones.
            for (zone_share, members) in zones(endpoints, &level, ready, placement) {
                let share = version_share * level_share * zone_share;
                let members: Vec<usize> = members.into_iter().filter(|&i| ready[i]).collect();
                if share > 0.0 && !members.is_empty() {
                    groups.push((share, members));
                }
            }
        }
    }
    normalise(groups)
}

/// Ready fraction times the overprovisioning factor, capped at 1.
fn health(members: &[usize], ready: &[bool], overprovisioning: f64) -> f64 {
    if members.is_empty() {
        return 0.0;
    }
    let up = members.iter().filter(|&&i| ready[i]).count();
    (up as f64 / members.len() as f64 * overprovisioning).min(1.0)
}

fn zones(
    endpoints: &[Arc<Endpoint>],
    level: &[usize],
    ready: &[bool],
    placement: &Placement<'_>,
) -> Vec<(f64, Vec<usize>)> {
    let Some(local) = placement.local_zone else {
        return vec![(1.0, level.to_vec())];
    };
    let (here, elsewhere): (Vec<usize>, Vec<usize>) = level
        .iter()
        .partition(|&&i| endpoints[i].zone() == Some(local));
    let here_ready = here.iter().any(|&i| ready[i]);
    let elsewhere_ready = elsewhere.iter().any(|&i| ready[i]);
    match (here_ready, elsewhere_ready) {
        (true, false) => return vec![(1.0, here)],
        (false, _) => return vec![(1.0, elsewhere)],
        (true, true) => {}
    }
    let local_share = health(&here, ready, placement.overprovisioning);
    let mut out = vec![(local_share, here)];
    // The rest spills to the other zones by their ready weight.
    let mut by_zone: BTreeMap<Option<&str>, Vec<usize>> = BTreeMap::new();
    for &i in &elsewhere {
        by_zone.entry(endpoints[i].zone()).or_default().push(i);
    }
    let ready_weight = |members: &[usize]| -> f64 {
        members
            .iter()
            .filter(|&&i| ready[i])
            .map(|&i| f64::from(endpoints[i].weight().get()))
            .sum()
    };
    let total: f64 = by_zone.values().map(|m| ready_weight(m)).sum();
    for (_, members) in by_zone {
        out.push((
            (1.0 - local_share) * ready_weight(&members) / total,
            members,
        ));
    }
    out
}

/// Scales the shares to add up to 1 (dropping zero shares).
fn normalise(groups: Vec<(f64, Vec<usize>)>) -> Vec<(f64, Vec<usize>)> {
    let total: f64 = groups.iter().map(|(s, _)| *s).sum();
    if total <= 0.0 {
        return Vec::new();
    }
    groups
        .into_iter()
        .filter(|(s, _)| *s > 0.0)
        .map(|(s, m)| (s / total, m))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_support::endpoint;
    use crate::config::ClusterConfig;

    struct Case {
        endpoints: Vec<Arc<Endpoint>>,
    }

    impl Case {
        /// (zone, priority, version) per endpoint.
        fn new(spec: &[(&str, u32, &str)]) -> Case {
            let cluster = ClusterConfig::for_test("t", &[]);
            let endpoints = spec
                .iter()
                .enumerate()
                .map(|(i, (z, p, v))| {
                    endpoint(
                        &cluster,
                        i,
                        1,
                        (!z.is_empty()).then_some(*z),
                        *p,
                        (!v.is_empty()).then_some(*v),
                    )
                })
                .collect();
            Case { endpoints }
        }

        /// Each endpoint's share of calls.
        fn shares(&self, ready: &[bool], zone: Option<&str>, split: &[(&str, u32)]) -> Vec<f64> {
            let split: Vec<(String, u32)> =
                split.iter().map(|(v, s)| (v.to_string(), *s)).collect();
            let p = Placement {
                local_zone: zone,
                split: &split,
                overprovisioning: 1.4,
            };
            let mut shares = vec![0.0; self.endpoints.len()];
            for (share, members) in plan(&self.endpoints, ready, &p) {
                for i in &members {
                    shares[*i] += share / members.len() as f64;
                }
            }
            shares
                .iter()
                .map(|s| (s * 1000.0).round() / 1000.0)
                .collect()
        }
    }

    #[test]
    fn priority_levels_fail_over_as_health_drops() {
        let c = Case::new(&[
            ("", 0, ""),
            ("", 0, ""),
            ("", 0, ""),
            ("", 1, ""),
            ("", 1, ""),
        ]);
        assert_eq!(
            c.shares(&[true; 5], None, &[]),
            [0.333, 0.333, 0.333, 0.0, 0.0]
        );
        // 2 of 3 ready: health 0.933, the rest goes to level 1.
        let s = c.shares(&[true, true, false, true, true], None, &[]);
        assert_eq!(s, [0.467, 0.467, 0.0, 0.033, 0.033]);
        // None of level 0: all to level 1.
        assert_eq!(
            c.shares(&[false, false, false, true, true], None, &[]),
            [0.0, 0.0, 0.0, 0.5, 0.5]
        );
        // Nothing ready: no groups at all.
        assert!(
            plan(
                &c.endpoints,
                &[false; 5],
                &Placement {
                    local_zone: None,
                    split: &[],
                    overprovisioning: 1.4
                }
            )
            .is_empty()
        );
    }

    #[test]
    fn calls_stay_in_the_local_zone_until_it_is_short_of_healthy_endpoints() {
        let c = Case::new(&[
            ("a", 0, ""),
            ("a", 0, ""),
            ("a", 0, ""),
            ("b", 0, ""),
            ("b", 0, ""),
        ]);
        assert_eq!(
            c.shares(&[true; 5], Some("a"), &[]),
            [0.333, 0.333, 0.333, 0.0, 0.0]
        );
        assert_eq!(
            c.shares(&[true; 5], Some("b"), &[]),
            [0.0, 0.0, 0.0, 0.5, 0.5]
        );
        assert_eq!(
            c.shares(&[true; 5], Some("c"), &[]),
            [0.2; 5],
            "no local endpoints: all zones alike"
        );
        assert_eq!(c.shares(&[true; 5], None, &[]), [0.2; 5]);
        // One of three local endpoints down: 93% stays, 7% spills.
        assert_eq!(
            c.shares(&[false, true, true, true, true], Some("a"), &[]),
            [0.0, 0.467, 0.467, 0.033, 0.033]
        );
        // Two down: 47% stays.
        assert_eq!(
            c.shares(&[false, false, true, true, true], Some("a"), &[]),
            [0.0, 0.0, 0.467, 0.267, 0.267]
        );
    }

    #[test]
    fn the_version_split_holds_and_a_down_canary_takes_nothing() {
        let c = Case::new(&[("", 0, "v1"), ("", 0, "v1"), ("", 0, "v1"), ("", 0, "v2")]);
        let s = c.shares(&[true; 4], None, &[("v1", 90), ("v2", 10)]);
        assert_eq!(s, [0.3, 0.3, 0.3, 0.1]);
        let s = c.shares(&[true, true, true, false], None, &[("v1", 90), ("v2", 10)]);
        assert_eq!(s, [0.333, 0.333, 0.333, 0.0]);
        let s = c.shares(&[true; 4], None, &[("v1", 0), ("v2", 100)]);
        assert_eq!(s, [0.0, 0.0, 0.0, 1.0]);
        // The only version with a share is down: the others take the calls,
        // balanced, rather than none at all.
        let s = c.shares(&[true, true, true, false], None, &[("v1", 0), ("v2", 100)]);
        assert_eq!(s, [0.333, 0.333, 0.333, 0.0]);
    }
}
