//! The merge rules on their own, then several membership nodes exchanging
//! reports over an in-memory transport (packets handed from one node's
//! runtime to another's `handle_data`, timers on tokio's paused clock).

use std::collections::BTreeMap;
use std::num::NonZeroUsize;

use foca::{AccumulatingRuntime, Foca, PostcardCodec};
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;
use crate::mesh::report::{Verdict, rtt_code};

fn rules() -> Rules {
    Rules {
        interval: Duration::from_millis(200),
        stale_after: Duration::from_secs(2),
        share_load: true,
        share_ejections: true,
        warm_start: true,
    }
}

fn item(node: &str, seq: u64, endpoint: &str, report: Report) -> Item {
    Item {
        node: node.into(),
        zone: None,
        seq,
        cluster: "planner".into(),
        endpoint: endpoint.into(),
        report,
    }
}

fn busy(n: u32) -> Report {
    Report {
        in_flight: n,
        ..Report::default()
    }
}

fn ejected(ms: u32) -> Report {
    Report {
        verdict: Some(Verdict {
            unhealthy: false,
            remaining_ms: ms,
            reason: "5 consecutive failures".into(),
        }),
        ..Report::default()
    }
}

fn view(endpoints: &[&str]) -> View {
    let mut v = View::new("me");
    v.set_known(endpoints.iter().map(|e| ("planner", *e)));
    v
}

const ALL: fn(&str) -> bool = |_| true;

fn usage(node: &str, seq: u64, limit: u8, key: &str, calls: u32) -> Usage {
    Usage {
        node: node.into(),
        seq,
        cluster: "planner".into(),
        limit,
        key: key.into(),
        calls,
        retries: 0,
    }
}

#[tokio::test(start_paused = true)]
async fn peers_uses_of_a_shared_limit_add_up_and_leave_with_the_window() {
    let mut v = view(&["a:1"]);
    v.set_shared([("planner".to_string(), 0)]);
    let now = Instant::now();
    let window = Duration::from_secs(10);
    assert_eq!(
        v.merge_usage(usage("b", 1, 0, "tenant", 30), now),
        Merged::New
    );
    assert_eq!(
        v.merge_usage(usage("c", 1, 0, "tenant", 20), now),
        Merged::New
    );
    assert_eq!(
        v.merge_usage(usage("c", 1, 0, "tenant", 99), now),
        Merged::Stale
    );
    assert_eq!(
        v.merge_usage(usage("me", 9, 0, "tenant", 99), now),
        Merged::Own
    );
    assert_eq!(
        v.merge_usage(usage("b", 2, 1, "tenant", 5), now),
        Merged::Unknown,
        "a limit this sidecar does not share"
    );
    let used = v.peers_usage("planner", 0, window, now, ALL);
    assert_eq!(used, vec![("tenant", 50.0, 0.0)]);
    // Half the window later, half of each still falls in it; a down peer
    // counts for nothing.
    tokio::time::advance(Duration::from_secs(5)).await;
    let later = Instant::now();
    let used = v.peers_usage("planner", 0, window, later, |n| n != "c");
    assert_eq!(used, vec![("tenant", 15.0, 0.0)]);
    assert_eq!(
        v.merge_usage(usage("b", 3, 0, "tenant", 31), later),
        Merged::New
    );
    assert_eq!(v.peers_usage("planner", 0, window, later, ALL)[0].1, 41.0);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(
        v.peers_usage("planner", 0, window, Instant::now(), ALL)
            .is_empty()
    );
    v.forget("b");
    v.sweep(Instant::now(), Duration::from_secs(1));
    assert_eq!(v.usages, 0);
}

#[test]
fn the_uses_held_are_bounded() {
    let mut v = view(&["a:1"]);
    v.set_shared([("planner".to_string(), 0)]);
    let now = Instant::now();
    for k in 0..MAX_USAGES {
        assert_eq!(
            v.merge_usage(usage("b", 1, 0, &format!("k{k}"), 1), now),
            Merged::New
        );
    }
    assert_eq!(
        v.merge_usage(usage("b", 1, 0, "one more", 1), now),
        Merged::Full
    );
    assert_eq!(
        v.merge_usage(usage("b", 2, 0, "k0", 2), now),
        Merged::New,
        "held keys update"
    );
    v.set_shared([]);
    assert_eq!(v.usages, 0, "no longer shared: dropped");
}

#[tokio::test(start_paused = true)]
async fn the_newest_report_per_node_wins_and_only_known_endpoints_are_kept() {
    let mut v = view(&["x:1"]);
    let now = Instant::now();
    assert_eq!(v.merge(item("a", 2, "x:1", busy(5)), now), Merged::New);
    assert_eq!(v.merge(item("a", 1, "x:1", busy(9)), now), Merged::Stale);
    assert_eq!(v.merge(item("a", 2, "x:1", busy(9)), now), Merged::Stale);
    assert_eq!(v.merge(item("b", 1, "x:1", busy(3)), now), Merged::New);
    assert_eq!(v.merge(item("me", 9, "x:1", busy(3)), now), Merged::Own);
    assert_eq!(v.merge(item("a", 3, "y:1", busy(3)), now), Merged::Unknown);
    let f = v.figures("planner", "x:1", now, &rules(), ALL, ALL);
    assert_eq!(f.in_flight, 8.0, "5 from a, 3 from b");
    // A peer that is down counts for nothing.
    let f = v.figures("planner", "x:1", now, &rules(), |n| n != "b", ALL);
    assert_eq!(f.in_flight, 5.0);
    v.forget("a");
    assert_eq!(
        v.figures("planner", "x:1", now, &rules(), ALL, ALL)
            .in_flight,
        3.0
    );
    // An endpoint that leaves takes its reports with it.
    v.set_known([("planner", "z:1")]);
    assert_eq!(v.reports("planner", "x:1").count(), 0);
}

#[tokio::test(start_paused = true)]
async fn what_invented_nodes_can_make_the_view_hold_is_bounded() {
    let mut v = view(&["x:1"]);
    let now = Instant::now();
    for i in 0..MAX_NODES {
        assert_eq!(
            v.merge(item(&format!("n{i}"), 1, "x:1", busy(1)), now),
            Merged::New
        );
    }
    assert_eq!(
        v.merge(item("one-more", 1, "x:1", busy(1)), now),
        Merged::Full
    );
    assert_eq!(
        v.merge(item("n7", 2, "x:1", busy(2)), now),
        Merged::New,
        "known nodes go on"
    );
    // Old reports are swept, and their nodes with them.
    tokio::time::advance(Duration::from_secs(30)).await;
    v.merge(item("n7", 3, "x:1", busy(2)), Instant::now());
    v.sweep(Instant::now(), rules().slow_stale());
    assert_eq!(v.reports("planner", "x:1").count(), 1);
    assert_eq!(
        v.merge(item("one-more", 1, "x:1", busy(1)), Instant::now()),
        Merged::New
    );
}

#[tokio::test(start_paused = true)]
async fn calls_in_flight_fade_out_between_the_refresh_and_stale_after() {
    let mut v = view(&["x:1"]);
    v.merge(item("a", 1, "x:1", busy(10)), Instant::now());
    let at = |v: &View| {
        v.figures("planner", "x:1", Instant::now(), &rules(), ALL, ALL)
            .in_flight
    };
    // Full weight up to the refresh (1 s) plus an interval (200 ms).
    tokio::time::advance(Duration::from_millis(1_200)).await;
    assert_eq!(at(&v), 10.0);
    tokio::time::advance(Duration::from_millis(400)).await;
    assert!((at(&v) - 5.0).abs() < 0.01, "halfway to stale: {}", at(&v));
    tokio::time::advance(Duration::from_millis(400)).await;
    assert_eq!(at(&v), 0.0, "stale after 2 s");
}

#[tokio::test(start_paused = true)]
async fn a_peers_ejection_lasts_for_the_rest_of_its_interval_and_goes_stale() {
    let mut v = view(&["x:1", "y:1"]);
    let t0 = Instant::now();
    v.merge(item("a", 1, "x:1", ejected(1_500)), t0);
    let f = v.figures("planner", "x:1", t0, &rules(), ALL, ALL);
    let e = f.ejection.expect("ejected");
    assert_eq!(
        (e.node.as_str(), e.until),
        ("a", t0 + Duration::from_millis(1_500))
    );
    tokio::time::advance(Duration::from_millis(1_500)).await;
    let f = v.figures("planner", "x:1", Instant::now(), &rules(), ALL, ALL);
    assert_eq!(f.ejection, None, "the interval is over");
    // A long interval is still only believed while the report is fresh.
    v.merge(item("a", 2, "x:1", ejected(60_000)), Instant::now());
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(
        v.figures("planner", "x:1", Instant::now(), &rules(), ALL, ALL)
            .ejection,
        None
    );
    // An untrusted reporter's verdicts are ignored.
    v.merge(item("a", 3, "x:1", ejected(5_000)), Instant::now());
    let f = v.figures("planner", "x:1", Instant::now(), &rules(), ALL, |n| {
        n != "a"
    });
    assert_eq!(f.ejection, None);
}

#[tokio::test(start_paused = true)]
async fn a_reporter_claiming_more_than_the_cap_is_counted_as_such() {
    let mut v = view(&["x:1", "y:1", "z:1", "w:1"]);
    let now = Instant::now();
    for (i, e) in ["x:1", "y:1", "z:1"].iter().enumerate() {
        v.merge(item("sick", i as u64 + 1, e, ejected(10_000)), now);
    }
    v.merge(item("fine", 1, "w:1", ejected(10_000)), now);
    let claimed = v.ejections_claimed("planner", now, &rules(), ALL);
    let cap = max_claimed(4, 0.5);
    assert_eq!(cap, 2);
    assert_eq!(claimed["sick"], 3);
    assert_eq!(claimed["fine"], 1);
    assert_eq!(max_claimed(1, 0.1), 1, "one may always be ejected");
}

#[tokio::test(start_paused = true)]
async fn latency_estimates_are_averaged_and_outlive_live_figures() {
    let mut v = view(&["x:1"]);
    let with_rtt = |ms: f64| Report {
        rtt: rtt_code(ms * 1e6),
        ..Report::default()
    };
    v.merge(item("a", 1, "x:1", with_rtt(100.0)), Instant::now());
    v.merge(item("b", 1, "x:1", with_rtt(50.0)), Instant::now());
    tokio::time::advance(Duration::from_secs(5)).await;
    let ms = v
        .figures("planner", "x:1", Instant::now(), &rules(), ALL, ALL)
        .rtt_ns
        .unwrap()
        / 1e6;
    assert!((ms - 75.0).abs() < 2.0, "{ms}");
    tokio::time::advance(Duration::from_secs(15)).await;
    assert_eq!(
        v.figures("planner", "x:1", Instant::now(), &rules(), ALL, ALL)
            .rtt_ns,
        None
    );
}

/// A node of the in-memory mesh: foca with the real handler and view.
struct Node {
    swim: Foca<Peer, PostcardCodec, StdRng, Handler>,
    runtime: AccumulatingRuntime<Peer>,
    view: Arc<Mutex<View>>,
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i as u8 + 1], 15002))
}

fn nodes(n: usize) -> Vec<Node> {
    (0..n)
        .map(|i| {
            let view = Arc::new(Mutex::new(View::new(&format!("n{i}"))));
            lock(&view).set_known([("planner", "x:1")]);
            let mut config = foca::Config::new_lan(std::num::NonZeroU32::new(n as u32).unwrap());
            config.periodic_gossip = Some(foca::PeriodicParams {
                frequency: Duration::from_millis(200),
                num_members: NonZeroUsize::new(3).unwrap(),
            });
            let me = Peer {
                addr: addr(i),
                node: format!("n{i}"),
                bump: 1,
            };
            let handler = Handler {
                view: view.clone(),
                merged: Default::default(),
            };
            Node {
                swim: Foca::with_custom_broadcast(
                    me,
                    config,
                    StdRng::seed_from_u64(i as u64),
                    PostcardCodec,
                    handler,
                ),
                runtime: AccumulatingRuntime::new(),
                view,
            }
        })
        .collect()
}

/// Runs the in-memory mesh for `span`: delivers every packet at once
/// (except to or from `cut` nodes), fires timers in order.
async fn run(nodes: &mut [Node], span: Duration, cut: &[usize]) {
    let end = Instant::now() + span;
    let mut timers: BTreeMap<(Instant, u64), (usize, foca::Timer<Peer>)> = BTreeMap::new();
    let mut order = 0u64;
    loop {
        // Deliver until quiet, collecting timers.
        let mut moved = true;
        while moved {
            moved = false;
            for i in 0..nodes.len() {
                while let Some((to, data)) = nodes[i].runtime.to_send() {
                    moved = true;
                    let j = (0..nodes.len()).find(|&j| addr(j) == to.addr).unwrap();
                    if cut.contains(&i) || cut.contains(&j) {
                        continue;
                    }
                    let node = &mut nodes[j];
                    let _ = node.swim.handle_data(&data, &mut node.runtime);
                    let _ = node.swim.broadcast(&mut node.runtime);
                }
                while let Some((after, timer)) = nodes[i].runtime.to_schedule() {
                    order += 1;
                    timers.insert((Instant::now() + after, order), (i, timer));
                }
                while nodes[i].runtime.to_notify().is_some() {}
            }
        }
        let Some((&(at, o), _)) = timers.iter().next() else {
            break;
        };
        if at > end {
            break;
        }
        let (i, timer) = timers.remove(&(at, o)).unwrap();
        tokio::time::advance(at.saturating_duration_since(Instant::now())).await;
        let node = &mut nodes[i];
        let _ = node.swim.handle_timer(timer, &mut node.runtime);
    }
    tokio::time::advance(end.saturating_duration_since(Instant::now())).await;
}

fn has_report(node: &Node, from: &str) -> bool {
    lock(&node.view)
        .reports("planner", "x:1")
        .any(|(n, _)| n == from)
}

#[tokio::test(start_paused = true)]
async fn a_report_reaches_every_node_of_a_16_node_mesh_within_a_second() {
    let mut mesh = nodes(16);
    // Everyone joins through node 0.
    for node in mesh.iter_mut().skip(1) {
        node.swim
            .announce(Peer::seed(addr(0)), &mut node.runtime)
            .unwrap();
    }
    run(&mut mesh, Duration::from_secs(5), &[]).await;
    assert!(
        mesh.iter().all(|n| n.swim.num_members() == 15),
        "full membership"
    );
    let report = item("n3", 1, "x:1", ejected(10_000));
    let n3 = &mut mesh[3];
    n3.swim.add_broadcast(&report.encode()).unwrap();
    n3.swim.broadcast(&mut n3.runtime).unwrap();
    run(&mut mesh, Duration::from_secs(1), &[]).await;
    let reached = mesh.iter().filter(|n| has_report(n, "n3")).count();
    assert_eq!(reached, 15, "every other node holds n3's report");
    // A node cut off hears nothing new.
    let update = item("n3", 2, "x:1", busy(7));
    let n3 = &mut mesh[3];
    n3.swim.add_broadcast(&update.encode()).unwrap();
    n3.swim.broadcast(&mut n3.runtime).unwrap();
    run(&mut mesh, Duration::from_secs(1), &[9]).await;
    let seq_at = |n: &Node| {
        lock(&n.view)
            .reports("planner", "x:1")
            .find(|(n, _)| *n == "n3")
            .map(|(_, e)| e.seq)
    };
    assert_eq!(
        seq_at(&mesh[9]),
        Some(1),
        "the cut node still has the old one"
    );
    assert_eq!(seq_at(&mesh[10]), Some(2));
}
