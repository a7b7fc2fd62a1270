//! The gossip task: one UDP socket, the membership protocol (foca's SWIM),
//! and, each interval, this sidecar's reports out and the mesh's view in.
//!
//! Each interval the task
//! 1. publishes a report for each endpoint whose quantized figures changed
//!    (or that is due a refresh), busiest first, at most
//!    `max_report_endpoints` per cluster, as foca broadcasts; a new verdict
//!    is pushed to peers at once;
//! 2. publishes this sidecar's use of each limit it shares with the mesh
//!    (a `mesh_wide` rate limit, per key, busiest first; a mesh-wide retry
//!    budget) when it changed or is due a refresh;
//! 3. sets each endpoint's mesh figures from the view ([`super::merge`]),
//!    ejects an endpoint a trusted peer reports ejected, and tells each
//!    shared limit what its peers used.
//!
//! Datagrams are sealed ([`super::seal`]) before they leave and opened
//! before anything decodes them. A peer that joins is sent this sidecar's
//! current reports directly, so it starts warm without waiting for them to
//! change. Broadcasts received are passed on at once, so a report crosses
//! the mesh in a few network round trips rather than a few intervals.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foca::{AccumulatingRuntime, Foca, OwnedNotification, PostcardCodec, Timer};
use rand::rngs::StdRng;
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::merge::{Handler, Peer, Rules, View, max_claimed};
use super::report::{self, Item, RETRY_BUDGET, Report, Usage, Verdict};
use super::seal::{self, DropCounts, Dropped, Kind, MAX_DATAGRAM, MeshKey, Opener, Sealer};
use crate::cluster::Router;
use crate::config::MeshConfig;
use crate::endpoint::Endpoint;
use crate::util::{Task, lock};

/// The mesh as this sidecar runs it: shared between the gossip task and the
/// admin port's `/mesh`.
pub struct Mesh {
    pub(super) config: MeshConfig,
    pub(super) rules: Rules,
    pub(super) zone: Option<String>,
    pub(super) router: Arc<Router>,
    socket: Arc<UdpSocket>,
    pub(super) view: Arc<Mutex<View>>,
    pub(super) peers: Mutex<HashMap<String, PeerInfo>>,
    pub(super) counters: Counters,
    pub(super) drops: DropCounts,
    pub(super) key_id: Option<String>,
}

/// A peer as this sidecar knows it.
pub(super) struct PeerInfo {
    pub addr: SocketAddr,
    pub alive: bool,
    /// When an authentic datagram last came from its address.
    pub last_heard: Option<Instant>,
}

/// Traffic and work counters (relaxed atomics).
#[derive(Default)]
pub(super) struct Counters {
    pub datagrams_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub datagrams_received: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Authentic datagrams the protocol could not use.
    pub undecodable: AtomicU64,
    pub items_published: AtomicU64,
    pub items_merged: Arc<AtomicU64>,
    /// Reporters ignored for claiming too much of a cluster ejected.
    pub reporters_ignored: AtomicU64,
}

type Swim = Foca<Peer, PostcardCodec, StdRng, Handler>;

/// What the task keeps between intervals.
struct State {
    /// The last report published per (cluster, endpoint).
    published: HashMap<(Arc<str>, Arc<str>), Published>,
    /// Calls counted per endpoint id at the last rate sample.
    rates: HashMap<u64, RateSample>,
    /// The endpoint sets the view was last told of.
    known: Vec<Arc<Vec<Arc<Endpoint>>>>,
    /// The last use published per (cluster index, limit, key): calls,
    /// retries, when.
    usage_published: HashMap<UseOf, (u32, u32, Instant)>,
    last_seq: u64,
}

impl State {
    /// The sequence number of the next item published: microseconds since
    /// the epoch, and always above the last.
    fn next_seq(&mut self) -> u64 {
        self.last_seq = (seal::now_ms() * 1_000).max(self.last_seq + 1);
        self.last_seq
    }
}

/// A shared limit's use: (cluster index, limit, key).
/// A limit's use by cluster name, limit index and key.
type UseOf = (Arc<str>, u8, Box<str>);

struct Published {
    item: Item,
    /// The verdict's end, compared instead of its time left.
    until: Option<Instant>,
    at: Instant,
}

/// A report due to be published.
struct Pending {
    report: Report,
    until: Option<Instant>,
    endpoint: Arc<Endpoint>,
}

struct RateSample {
    calls: u64,
    at: Instant,
    code: u16,
}

/// Sends, timers and notifications foca asked for, and the datagram codec.
struct Io {
    runtime: AccumulatingRuntime<Peer>,
    timers: BinaryHeap<Reverse<Due>>,
    next_timer: u64,
    seal: Seal,
    out: Vec<u8>,
}

/// A timer foca asked for; ordered by when it is due, then by order asked.
struct Due {
    at: Instant,
    order: u64,
    timer: Timer<Peer>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}

/// Sealed with the mesh key, or (with `insecure = true`) only framed.
enum Seal {
    Keyed(Box<(Sealer, Opener)>),
    Insecure,
}

/// The insecure framing's first byte, unlike a sealed datagram's.
const INSECURE_MAGIC: u8 = 0xa6;

impl Seal {
    fn seal(&mut self, kind: Kind, payload: &[u8], out: &mut Vec<u8>) {
        match self {
            Seal::Keyed(keyed) => keyed.0.seal(kind, payload, seal::now_ms(), out),
            Seal::Insecure => {
                out.clear();
                out.extend_from_slice(&[INSECURE_MAGIC, kind as u8]);
                out.extend_from_slice(payload);
            }
        }
    }

    fn open<'a>(&mut self, datagram: &'a mut [u8]) -> Result<(Kind, &'a [u8]), Dropped> {
        match self {
            Seal::Keyed(keyed) => keyed.1.open(datagram, seal::now_ms()),
            Seal::Insecure => {
                if datagram.len() > MAX_DATAGRAM {
                    return Err(Dropped::Oversized);
                }
                match datagram {
                    [INSECURE_MAGIC, 0, rest @ ..] => Ok((Kind::Swim, rest)),
                    [INSECURE_MAGIC, 1, rest @ ..] => Ok((Kind::Sync, rest)),
                    _ => Err(Dropped::Truncated),
                }
            }
        }
    }
}

/// The largest payload a datagram carries once sealed.
const MAX_PAYLOAD: usize = MAX_DATAGRAM - seal::OVERHEAD;

impl Mesh {
    /// Binds the gossip socket; fails naming `mesh.listen`.
    pub async fn bind(
        config: &MeshConfig,
        router: Arc<Router>,
        zone: Option<&str>,
    ) -> anyhow::Result<Arc<Mesh>> {
        let socket = UdpSocket::bind(config.listen).await.map_err(|e| {
            anyhow::anyhow!("mesh.listen: cannot listen on {}/udp: {e}", config.listen)
        })?;
        let mut config = config.clone();
        // Port 0 (tests, the demo): advertise the port bound.
        if config.advertise.port() == 0 {
            config.advertise.set_port(socket.local_addr()?.port());
        }
        let rules = Rules {
            interval: config.interval,
            stale_after: config.stale_after,
            share_load: config.share_load,
            share_ejections: config.share_ejections,
            warm_start: config.warm_start,
        };
        let mesh = Mesh {
            key_id: config.key.as_deref().map(|k| MeshKey::derive(k).id_hex()),
            view: Arc::new(Mutex::new(View::new(&config.node_id))),
            config,
            rules,
            zone: zone.map(String::from),
            router,
            socket: Arc::new(socket),
            peers: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            drops: DropCounts::default(),
        };
        if mesh.key_id.is_none() {
            tracing::warn!(
                "mesh.insecure = true: gossip is neither authenticated nor encrypted; any host that reaches mesh.listen can feed this sidecar's pickers"
            );
        }
        Ok(Arc::new(mesh))
    }

    /// The address peers reach this sidecar at.
    pub fn advertise(&self) -> SocketAddr {
        self.config.advertise
    }

    /// The address the gossip socket is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Starts the gossip task, restarted if it panics.
    pub fn start(self: &Arc<Self>) -> Task {
        let mesh = self.clone();
        Task::supervised("mesh gossip", move || mesh.clone().run())
    }

    fn foca_config(&self) -> foca::Config {
        let mut c = foca::Config::new_lan(NonZeroU32::new(64).expect("nonzero"));
        c.probe_period = Duration::from_secs(1);
        c.probe_rtt = Duration::from_millis(300);
        c.suspect_to_down_after = self.config.stale_after.max(Duration::from_secs(2));
        c.max_packet_size = NonZeroUsize::new(MAX_PAYLOAD).expect("nonzero");
        c.periodic_gossip = Some(foca::PeriodicParams {
            frequency: self.config.interval,
            num_members: NonZeroUsize::new(3).expect("nonzero"),
        });
        c
    }

    fn new_io(&self) -> Io {
        let seal = match &self.config.key {
            Some(key) => Seal::Keyed(Box::new((
                Sealer::new(MeshKey::derive(key)),
                Opener::new(
                    MeshKey::derive(key),
                    self.config.previous_key.as_deref().map(MeshKey::derive),
                ),
            ))),
            None => Seal::Insecure,
        };
        Io {
            runtime: AccumulatingRuntime::new(),
            timers: BinaryHeap::new(),
            next_timer: 0,
            seal,
            out: Vec::with_capacity(MAX_DATAGRAM),
        }
    }

    async fn run(self: Arc<Self>) {
        let me = Peer {
            addr: self.config.advertise,
            node: self.config.node_id.clone(),
            bump: seal::now_ms().max(1),
        };
        let handler = Handler {
            view: self.view.clone(),
            merged: self.counters.items_merged.clone(),
        };
        let mut swim: Swim = Foca::with_custom_broadcast(
            me,
            self.foca_config(),
            rand::make_rng(),
            PostcardCodec,
            handler,
        );
        let mut io = self.new_io();
        let mut state = State {
            published: HashMap::new(),
            rates: HashMap::new(),
            known: Vec::new(),
            usage_published: HashMap::new(),
            last_seq: 0,
        };
        lock(&self.view).set_shared(self.shared_limits());
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_announce = Instant::now();
        let mut buf = vec![0u8; 2 * MAX_DATAGRAM];
        tracing::info!(node = %self.config.node_id, listen = %self.config.listen, advertise = %self.config.advertise, seeds = ?self.config.seeds, "gossiping with the mesh");
        loop {
            let due = io.timers.peek().map(|Reverse(d)| d.at);
            tokio::select! {
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((n, from)) => self.received(&mut swim, &mut io, &mut buf[..n], from),
                    Err(e) => {
                        // An ICMP error from an earlier send; nothing is lost.
                        tracing::debug!(error = %e, "gossip socket receive error");
                    }
                },
                _ = sleep_until(due) => {
                    let now = Instant::now();
                    while io.timers.peek().is_some_and(|Reverse(d)| d.at <= now) {
                        let Some(Reverse(d)) = io.timers.pop() else { break };
                        if let Err(e) = swim.handle_timer(d.timer, &mut io.runtime) {
                            tracing::debug!(error = %e, "membership timer failed");
                        }
                    }
                }
                _ = tick.tick() => {
                    self.forget_long_gone();
                    lock(&self.view).sweep(Instant::now(), self.rules.slow_stale());
                    self.refresh_known(&mut state);
                    let urgent = self.publish(&mut swim, &mut state);
                    self.publish_usage(&mut swim, &mut state);
                    if urgent || swim.custom_broadcast_backlog() > 0 {
                        let _ = swim.broadcast(&mut io.runtime);
                    }
                    self.apply();
                    if Instant::now() >= next_announce {
                        self.announce(&mut swim, &mut io).await;
                        let alone = swim.num_members() == 0;
                        next_announce = Instant::now()
                            + if alone { Duration::from_secs(1) } else { Duration::from_secs(30) };
                    }
                }
            }
            self.flush(&mut swim, &mut io, &state).await;
        }
    }

    /// One datagram in: opened, then handed to the protocol or merged.
    fn received(&self, swim: &mut Swim, io: &mut Io, datagram: &mut [u8], from: SocketAddr) {
        self.counters
            .datagrams_received
            .fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_received
            .fetch_add(datagram.len() as u64, Ordering::Relaxed);
        let (kind, payload) = match io.seal.open(datagram) {
            Ok(opened) => opened,
            Err(why) => {
                self.drops.count(why);
                tracing::debug!(%from, reason = why.name(), "dropped a gossip datagram");
                return;
            }
        };
        {
            let mut peers = lock(&self.peers);
            if let Some(p) = peers.values_mut().find(|p| p.addr == from) {
                p.last_heard = Some(Instant::now());
            }
        }
        match kind {
            Kind::Swim => {
                let before = self.counters.items_merged.load(Ordering::Relaxed);
                if let Err(e) = swim.handle_data(payload, &mut io.runtime) {
                    self.counters.undecodable.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%from, error = %e, "an authentic gossip datagram did not decode");
                    return;
                }
                // Pass news on at once rather than at the next interval.
                if self.counters.items_merged.load(Ordering::Relaxed) > before {
                    let _ = swim.broadcast(&mut io.runtime);
                }
            }
            Kind::Sync => match report::unpack(payload) {
                Some(items) => {
                    let now = Instant::now();
                    let mut view = lock(&self.view);
                    for item in items {
                        if view.merge(item, now) == super::merge::Merged::New {
                            self.counters.items_merged.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                None => {
                    self.counters.undecodable.fetch_add(1, Ordering::Relaxed);
                }
            },
        }
    }

    /// Sends what foca queued, schedules its timers, and acts on its
    /// notifications.
    async fn flush(&self, swim: &mut Swim, io: &mut Io, state: &State) {
        loop {
            while let Some((to, data)) = io.runtime.to_send() {
                self.send(io, Kind::Swim, &data, to.addr).await;
            }
            while let Some((after, timer)) = io.runtime.to_schedule() {
                io.next_timer += 1;
                io.timers.push(Reverse(Due {
                    at: Instant::now() + after,
                    order: io.next_timer,
                    timer,
                }));
            }
            let Some(note) = io.runtime.to_notify() else {
                break;
            };
            self.notified(note, swim, io, state).await;
        }
    }

    async fn notified(
        &self,
        note: OwnedNotification<Peer>,
        swim: &mut Swim,
        io: &mut Io,
        state: &State,
    ) {
        match note {
            OwnedNotification::MemberUp(peer) => {
                tracing::info!(peer = %peer.node, addr = %peer.addr, "a peer joined the mesh");
                lock(&self.peers).insert(
                    peer.node.clone(),
                    PeerInfo {
                        addr: peer.addr,
                        alive: true,
                        last_heard: Some(Instant::now()),
                    },
                );
                self.sync_to(io, state, peer.addr).await;
            }
            OwnedNotification::MemberDown(peer) => {
                tracing::warn!(peer = %peer.node, addr = %peer.addr, "a peer is down; its reports no longer count");
                if let Some(p) = lock(&self.peers).get_mut(&peer.node) {
                    p.alive = false;
                }
                lock(&self.view).forget(&peer.node);
            }
            OwnedNotification::Rename(old, new) => {
                if old.node != new.node {
                    lock(&self.view).forget(&old.node);
                    lock(&self.peers).remove(&old.node);
                }
            }
            OwnedNotification::Idle => {
                tracing::warn!("no peer is reachable; picking from this sidecar's view alone");
            }
            OwnedNotification::Defunct => {
                tracing::warn!("the mesh declared this sidecar down; rejoining");
                let _ = swim.reuse_down_identity();
            }
            OwnedNotification::Rejoin(_) | OwnedNotification::Active => {}
        }
    }

    /// Sends this sidecar's current reports straight to a peer that just
    /// joined.
    async fn sync_to(&self, io: &mut Io, state: &State, addr: SocketAddr) {
        let items: Vec<Item> = state
            .published
            .values()
            .filter(|p| !p.item.report.is_empty())
            .map(|p| {
                let mut item = p.item.clone();
                if let (Some(v), Some(until)) = (&mut item.report.verdict, p.until) {
                    v.remaining_ms = remaining_ms(until);
                }
                item
            })
            .collect();
        for payload in report::pack(&items, MAX_PAYLOAD) {
            self.send(io, Kind::Sync, &payload, addr).await;
        }
    }

    async fn send(&self, io: &mut Io, kind: Kind, payload: &[u8], to: SocketAddr) {
        io.seal.seal(kind, payload, &mut io.out);
        match self.socket.send_to(&io.out, to).await {
            Ok(n) => {
                self.counters.datagrams_sent.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .bytes_sent
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(%to, error = %e, "gossip send failed"),
        }
    }

    /// Resolves the seeds again (a headless Service's pods change) and
    /// announces this sidecar to each.
    async fn announce(&self, swim: &mut Swim, io: &mut Io) {
        for seed in &self.config.seeds {
            let resolved =
                tokio::time::timeout(Duration::from_secs(1), tokio::net::lookup_host(seed)).await;
            let addrs = match resolved {
                Ok(Ok(addrs)) => addrs,
                Ok(Err(e)) => {
                    tracing::debug!(seed, error = %e, "cannot resolve a mesh seed");
                    continue;
                }
                Err(_) => {
                    tracing::debug!(seed, "resolving a mesh seed timed out");
                    continue;
                }
            };
            for addr in addrs {
                if addr != self.config.advertise {
                    let _ = swim.announce(Peer::seed(addr), &mut io.runtime);
                }
            }
        }
    }

    /// Forgets peers down and unheard of for ten minutes, so that a mesh
    /// whose pods come and go does not grow the table without end.
    fn forget_long_gone(&self) {
        const GONE: Duration = Duration::from_secs(600);
        let now = Instant::now();
        lock(&self.peers).retain(|_, p| {
            p.alive
                || p.last_heard
                    .is_some_and(|t| now.saturating_duration_since(t) < GONE)
        });
    }

    /// Tells the view which endpoints exist, when a set changed.
    fn refresh_known(&self, state: &mut State) {
        let clusters = self.router.clusters();
        let sets: Vec<_> = clusters.iter().map(|c| c.endpoints()).collect();
        let same = sets.len() == state.known.len()
            && sets
                .iter()
                .zip(&state.known)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if same {
            return;
        }
        let pairs: Vec<(&str, &str)> = clusters
            .iter()
            .zip(&sets)
            .flat_map(|(c, set)| set.iter().map(move |e| (c.name(), e.address())))
            .collect();
        lock(&self.view).set_known(pairs);
        state.published.retain(|(c, e), _| {
            clusters
                .iter()
                .any(|cl| cl.name() == &**c && cl.endpoint(e).is_some())
        });
        state.known = sets;
    }

    /// Publishes the reports that changed or are due again; returns whether
    /// one carries a new verdict (to be pushed at once).
    fn publish(&self, swim: &mut Swim, state: &mut State) -> bool {
        let now = Instant::now();
        let mut urgent = false;
        for cluster in self.router.clusters().iter() {
            let mut due: Vec<Pending> = Vec::new();
            for e in cluster.endpoints().iter() {
                let (report, until) = self.local_report(e, now, &mut state.rates);
                let key = (
                    Arc::<str>::from(cluster.name()),
                    Arc::<str>::from(e.address()),
                );
                let send = match state.published.get(&key) {
                    None => !report.is_empty(),
                    Some(p) if !same_report(&p.item.report, p.until, &report, until) => true,
                    Some(p) => {
                        let every = if report.is_live() {
                            self.rules.refresh()
                        } else if !report.is_empty() {
                            self.rules.slow_refresh()
                        } else {
                            Duration::MAX
                        };
                        now.saturating_duration_since(p.at) >= every
                    }
                };
                if send {
                    let new_verdict = report.verdict.is_some()
                        && state
                            .published
                            .get(&key)
                            .is_none_or(|p| p.item.report.verdict.is_none());
                    urgent |= new_verdict;
                    due.push(Pending {
                        report,
                        until,
                        endpoint: e.clone(),
                    });
                }
            }
            // Verdicts first, then the busiest.
            due.sort_by_key(|p| Reverse((p.report.verdict.is_some(), p.report.in_flight)));
            due.truncate(self.config.max_report_endpoints);
            for Pending {
                report,
                until,
                endpoint: e,
            } in due
            {
                let item = Item {
                    node: self.config.node_id.clone(),
                    zone: self.zone.clone(),
                    seq: state.next_seq(),
                    cluster: cluster.name().to_string(),
                    endpoint: e.address().to_string(),
                    report,
                };
                self.broadcast(swim, &item.encode(), "a report");
                let key = (
                    Arc::<str>::from(cluster.name()),
                    Arc::<str>::from(e.address()),
                );
                state.published.insert(
                    key,
                    Published {
                        item,
                        until,
                        at: now,
                    },
                );
            }
        }
        urgent
    }

    /// Hands `payload` (a report or a limit's use, `what`) to foca to spread,
    /// counted as published.
    fn broadcast(&self, swim: &mut Swim, payload: &[u8], what: &str) {
        match swim.add_broadcast(payload) {
            Ok(_) => {
                self.counters
                    .items_published
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => tracing::debug!(error = %err, "{what} was not published"),
        }
    }

    /// The limits shared with the mesh, as (cluster, limit).
    fn shared_limits(&self) -> Vec<(String, u8)> {
        let mut shared = Vec::new();
        for cluster in self.router.clusters().iter() {
            for (i, limit) in cluster.rate_limits().iter().enumerate() {
                if limit.config().mesh_wide {
                    shared.push((cluster.name().to_string(), i as u8));
                }
            }
            if cluster.retry_budget().is_some_and(|b| b.config().mesh_wide) {
                shared.push((cluster.name().to_string(), RETRY_BUDGET));
            }
        }
        shared
    }

    /// Publishes this sidecar's use of each shared limit that changed or is
    /// due a refresh (and, once, a zero for a key it stopped using).
    fn publish_usage(&self, swim: &mut Swim, state: &mut State) {
        let now = Instant::now();
        let whole = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        for cluster in self.router.clusters().iter() {
            let ci: Arc<str> = cluster.name().into();
            let mut uses: Vec<(u8, Box<str>, u32, u32)> = Vec::new();
            for (i, limit) in cluster.rate_limits().iter().enumerate() {
                if !limit.config().mesh_wide {
                    continue;
                }
                let mut keys = limit.usage(now);
                keys.sort_by(|a, b| b.1.total_cmp(&a.1));
                keys.truncate(self.config.max_report_endpoints);
                for (key, estimate) in keys {
                    uses.push((i as u8, key, estimate.ceil() as u32, 0));
                }
            }
            if let Some(budget) = cluster.retry_budget().filter(|b| b.config().mesh_wide) {
                let (calls, retries) = budget.usage(now);
                uses.push((RETRY_BUDGET, "".into(), whole(calls), whole(retries)));
            }
            for ((c, limit, key), &(calls, retries, _)) in &state.usage_published {
                let gone = !uses.iter().any(|u| u.0 == *limit && u.1 == *key);
                if *c == ci && (calls > 0 || retries > 0) && gone {
                    uses.push((*limit, key.clone(), 0, 0));
                }
            }
            for (limit, key, calls, retries) in uses {
                let id = (ci.clone(), limit, key);
                let send = match state.usage_published.get(&id) {
                    None => calls > 0 || retries > 0,
                    Some(&(c, r, at)) => {
                        (c, r) != (calls, retries)
                            || (calls > 0 || retries > 0)
                                && now.saturating_duration_since(at) >= self.rules.refresh()
                    }
                };
                if !send {
                    continue;
                }
                let usage = Usage {
                    node: self.config.node_id.clone(),
                    seq: state.next_seq(),
                    cluster: cluster.name().to_string(),
                    limit,
                    key: id.2.to_string(),
                    calls,
                    retries,
                };
                self.broadcast(swim, &usage.encode(), "a limit's use");
                state.usage_published.insert(id, (calls, retries, now));
            }
        }
        // A zero, once said, need not be remembered.
        state
            .usage_published
            .retain(|_, &mut (calls, retries, _)| calls > 0 || retries > 0);
    }

    /// This sidecar's own figures for one endpoint, quantized.
    fn local_report(
        &self,
        e: &Endpoint,
        now: Instant,
        rates: &mut HashMap<u64, RateSample>,
    ) -> (Report, Option<Instant>) {
        let load = e.load();
        let summary = load.window_summary(now);
        let rtt = load
            .own_rtt_estimate(now)
            .or_else(|| summary.map(|s| s.mean_latency.as_nanos() as f64));
        let calls = e.stats().calls;
        let sample = rates.entry(e.id()).or_insert(RateSample {
            calls,
            at: now,
            code: 0,
        });
        let span = now.saturating_duration_since(sample.at);
        if span >= self.rules.refresh() {
            let per_second = calls.saturating_sub(sample.calls) as f64 / span.as_secs_f64();
            *sample = RateSample {
                calls,
                at: now,
                code: report::rate_code(per_second),
            };
        }
        let (verdict, until) = match e.own_verdict() {
            Some(v) => {
                let until = v.until.unwrap_or(now + self.rules.stale_after);
                let verdict = Verdict {
                    unhealthy: v.unhealthy,
                    remaining_ms: remaining_ms(until),
                    reason: truncate(v.reason, report::MAX_NAME),
                };
                (Some(verdict), v.until)
            }
            None => (None, None),
        };
        let report = Report {
            in_flight: report::quantize_count(e.in_flight()),
            rtt: rtt.map_or(0, report::rtt_code),
            success: summary.map(|s| (s.success_rate * 200.0).round().clamp(0.0, 200.0) as u8),
            rate: sample.code,
            verdict,
        };
        (report, until)
    }

    /// Sets every endpoint's mesh figures from the view, and ejects what
    /// trusted peers report ejected.
    fn apply(&self) {
        let now = Instant::now();
        let peers = lock(&self.peers);
        let alive = |n: &str| peers.get(n).is_some_and(|p| p.alive);
        let view = lock(&self.view);
        for cluster in self.router.clusters().iter() {
            let endpoints = cluster.endpoints();
            let allowed = max_claimed(endpoints.len(), cluster.config().breaker.max_ejection);
            let claimed = view.ejections_claimed(cluster.name(), now, &self.rules, alive);
            for (node, &n) in &claimed {
                if n > allowed {
                    self.counters
                        .reporters_ignored
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(cluster = cluster.name(), peer = %node, claimed = n, allowed, "ignoring a peer's ejections: it claims more of the cluster ejected than max_ejection_percent allows");
                }
            }
            let trusted = |n: &str| claimed.get(n).is_none_or(|&c| c <= allowed);
            for e in endpoints.iter() {
                let f = view.figures(
                    cluster.name(),
                    e.address(),
                    now,
                    &self.rules,
                    alive,
                    trusted,
                );
                e.load().set_mesh(f.in_flight, f.rtt_ns, f.success);
                e.load().set_mesh_newest(f.newest);
                if let Some(ejection) = f.ejection {
                    e.eject_by_peer(ejection.until, &ejection.node, &ejection.reason);
                }
            }
            for (i, limit) in cluster.rate_limits().iter().enumerate() {
                if limit.config().mesh_wide {
                    let window = limit.config().window;
                    let used = view.peers_usage(cluster.name(), i as u8, window, now, alive);
                    let keys: Vec<(&str, f64)> = used.iter().map(|&(k, c, _)| (k, c)).collect();
                    limit.set_peers(&keys, now);
                }
            }
            if let Some(budget) = cluster.retry_budget().filter(|b| b.config().mesh_wide) {
                let ttl = budget.config().ttl;
                let used = view.peers_usage(cluster.name(), RETRY_BUDGET, ttl, now, alive);
                let (calls, retries) = used
                    .iter()
                    .find(|u| u.0.is_empty())
                    .map_or((0.0, 0.0), |u| (u.1, u.2));
                budget.set_peers(calls, retries);
            }
        }
    }
}

/// Whether two reports say the same, comparing a verdict by when it ends
/// rather than by its time left.
fn same_report(a: &Report, a_until: Option<Instant>, b: &Report, b_until: Option<Instant>) -> bool {
    let strip = |r: &Report| {
        let mut r = r.clone();
        if let Some(v) = &mut r.verdict {
            v.remaining_ms = 0;
        }
        r
    };
    a_until == b_until && strip(a) == strip(b)
}

fn remaining_ms(until: Instant) -> u32 {
    let left = until.saturating_duration_since(Instant::now()).as_millis();
    left.min(u128::from(u32::MAX)) as u32
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
