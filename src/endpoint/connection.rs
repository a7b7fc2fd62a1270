//! One pooled HTTP/2 connection per endpoint, shared by every call and every
//! caller.
//!
//! HTTP/2 multiplexes, so one connection carries all of an endpoint's calls;
//! the fast path is one atomic load and a handle clone. A closed connection
//! is replaced on the next call, and concurrent calls that find none share a
//! single connect attempt (no thundering herd of dials), without holding any
//! lock across `.await`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::tls::{Tls, Transport};
use crate::util::{Clock, lock};
use crate::wire::io::PeerSignals;
use crate::wire::stream::Keepalive;
use crate::wire::timer::Timer;

/// A handle that opens streams on a pooled connection (cheap to clone).
pub type Sender = h2::client::SendRequest<Bytes>;

/// An upstream connection's time limits.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// For the TCP connect and the endpoint's first HTTP/2 frame.
    pub connect: Duration,
    /// A connection that carries no new call this long is closed.
    pub idle: Duration,
    /// A PING goes out this often on every connection, busy or idle...
    pub keepalive_interval: Duration,
    /// ...and a connection whose PING is not answered this soon is
    /// dropped: it died quietly (a NAT or conntrack entry went, the host
    /// hangs), and calls written into it would wait for their deadline.
    pub keepalive_timeout: Duration,
}

type Connecting = Shared<BoxFuture<'static, Result<Arc<Pooled>, ConnectError>>>;

/// Why a connection to an endpoint could not be made.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{address}: {reason}")]
pub struct ConnectError {
    pub address: Arc<str>,
    pub reason: Arc<str>,
    /// Which connect attempt failed (numbered from 1), so that a failure
    /// shared by many waiting calls is counted once.
    pub attempt: u64,
}

pub struct Connection {
    inner: Arc<Inner>,
}

struct Inner {
    address: Arc<str>,
    timeouts: Timeouts,
    /// Calls handed a sender; the idle check compares it over time.
    uses: AtomicU64,
    attempts: AtomicU64,
    /// Connections that ended (closed by either side, or idle).
    closed: AtomicU64,
    /// Learned from real connect attempts, each counted once however many
    /// calls waited on it.
    reach: Reachability,
    failures: AtomicU64,
    /// Rung when reachability changes, so the cluster rebuilds its picker.
    changed: Arc<Notify>,
    ready: ArcSwapOption<Pooled>,
    connecting: Mutex<Option<Connecting>>,
    /// Connections made over the endpoint's life (for stats and tests).
    opened: AtomicU64,
    /// A background connect is running.
    warming: AtomicBool,
    /// Shut for good ([`Connection::shut_down`]): no new connection is made.
    shut: AtomicBool,
    /// Rung on shutting down: a connect under way gives up at once.
    shut_signal: Notify,
    /// The address the last connection reached (a name resolves to one of
    /// its addresses), so that the proxy port can tell a tunnel to it.
    peer: Mutex<Option<SocketAddr>>,
    /// The cluster's TLS client, when its endpoints speak TLS.
    tls: Option<Arc<Tls>>,
}

impl Connection {
    pub fn new(
        address: Arc<str>,
        timeouts: Timeouts,
        tls: Option<Arc<Tls>>,
        changed: Arc<Notify>,
    ) -> Connection {
        Connection {
            inner: Arc::new(Inner {
                address,
                timeouts,
                uses: AtomicU64::new(0),
                attempts: AtomicU64::new(0),
                closed: AtomicU64::new(0),
                reach: Reachability::default(),
                failures: AtomicU64::new(0),
                changed,
                ready: ArcSwapOption::empty(),
                connecting: Mutex::new(None),
                opened: Default::default(),
                warming: AtomicBool::new(false),
                shut: AtomicBool::new(false),
                shut_signal: Notify::new(),
                peer: Mutex::new(None),
                tls,
            }),
        }
    }

    /// Whether connecting may be tried now: no recent attempt failed, or
    /// its backoff has passed.
    pub fn is_reachable(&self, now: Instant) -> bool {
        self.inner.reach.is_up(now)
    }

    /// When the backoff after a failed connect ends, if one is running.
    pub fn reachable_at(&self) -> Option<Instant> {
        self.inner.reach.down_until()
    }

    /// Failed connect attempts so far.
    pub fn failures(&self) -> u64 {
        self.inner.failures.load(Ordering::Relaxed)
    }

    /// Connections opened so far.
    pub fn opened(&self) -> u64 {
        self.inner.opened.load(Ordering::Relaxed)
    }

    /// The endpoint's address.
    pub fn address(&self) -> &str {
        &self.inner.address
    }

    /// The socket address the last connection reached, if one was made.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        *lock(&self.inner.peer)
    }

    /// The time limits this connection was made with.
    pub fn timeouts(&self) -> Timeouts {
        self.inner.timeouts
    }

    /// The TLS client its connections handshake with, if any.
    pub fn tls(&self) -> Option<&Arc<Tls>> {
        self.inner.tls.as_ref()
    }

    /// Drops the live connection at once, with whatever it carries: the
    /// next `get` dials a new one. For a connection that has stopped
    /// answering and should not be written to any more.
    pub fn close(&self) {
        if let Some(pooled) = self.inner.ready.load_full() {
            self.inner.unpool(pooled.attempt);
            if let Some(abandon) = lock(&pooled.abandon).take() {
                let _ = abandon.send(());
            }
        }
    }

    /// Drops the live connection and makes no new one: the endpoint left
    /// its cluster (or the checker that owned the connection stopped).
    /// Connects under way fail, and a connection they open is dropped.
    pub fn shut_down(&self) {
        self.inner.shut.store(true, Ordering::SeqCst);
        self.inner.shut_signal.notify_waiters();
        // A connect under way is moved forward only by those who await it;
        // once they are gone (a removed endpoint's tasks, a stopped
        // checker), the one in the slot would hold the endpoint's state
        // and its half-made connection for good. Dropping it ends both.
        let connecting = lock(&self.inner.connecting).take();
        drop(connecting);
        self.close();
    }

    /// Whether [`Connection::shut_down`] was called.
    pub fn is_shut_down(&self) -> bool {
        self.inner.shut.load(Ordering::SeqCst)
    }

    /// Connections that have ended so far.
    pub fn closed(&self) -> u64 {
        self.inner.closed.load(Ordering::Relaxed)
    }

    /// Whether a live connection is open now.
    pub fn is_open(&self) -> bool {
        self.inner
            .ready
            .load()
            .as_ref()
            .is_some_and(|p| p.is_usable())
    }

    /// Forgets past connect failures (the health checker saw the endpoint
    /// answer again), so it need not sit out its backoff.
    pub fn forget_failures(&self) {
        if self.inner.reach.succeed() {
            self.inner.changed.notify_one();
        }
    }

    /// Starts connecting in the background, unless a connection is open or
    /// a background connect runs already. Calls go elsewhere meanwhile.
    pub fn warm(&self) {
        if self.is_open() || self.is_shut_down() || self.inner.warming.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let connection = Connection {
            inner: self.inner.clone(),
        };
        tokio::spawn(async move {
            // A failure is recorded by the attempt itself (the endpoint
            // sits out its backoff).
            let _ = connection.connect().await;
            connection.inner.warming.store(false, Ordering::Release);
        });
    }

    /// A handle to send calls on, connecting first if there is no live
    /// connection.
    pub async fn get(&self) -> Result<Sender, ConnectError> {
        match self.pooled() {
            Some(sender) => Ok(sender),
            None => self.connect_boxed().await,
        }
    }

    /// The pooled connection's handle, if it is live: the fast path, with
    /// no future to hold.
    pub fn pooled(&self) -> Option<Sender> {
        self.inner.uses.fetch_add(1, Ordering::Relaxed);
        let pooled = self.inner.ready.load();
        let pooled = pooled.as_deref()?;
        pooled.is_usable().then(|| pooled.sender.clone())
    }

    /// Connects (or joins the connect under way). Boxed, so that the
    /// futures of calls that find a pooled connection stay small.
    pub fn connect_boxed(&self) -> BoxFuture<'static, Result<Sender, ConnectError>> {
        let connection = Connection {
            inner: self.inner.clone(),
        };
        Box::pin(async move { connection.connect().await.map(|p| p.sender.clone()) })
    }

    async fn connect(&self) -> Result<Arc<Pooled>, ConnectError> {
        let attempt = {
            let mut slot = lock(&self.inner.connecting);
            let reusable = slot.as_ref().is_some_and(|c| match c.peek() {
                None => true,
                Some(Ok(pooled)) => pooled.is_usable(),
                Some(Err(_)) => false,
            });
            if !reusable {
                *slot = Some(Inner::dial(self.inner.clone()).boxed().shared());
            }
            slot.clone().expect("just filled")
        };
        attempt.await
    }
}

impl Inner {
    async fn dial(self: Arc<Self>) -> Result<Arc<Pooled>, ConnectError> {
        // Registered before the flag is read, so that a shutdown between
        // the two is not missed.
        let shut = self.shut_signal.notified();
        let mut shut = std::pin::pin!(shut);
        shut.as_mut().enable();
        let result = if self.shut.load(Ordering::SeqCst) {
            Err(self.removed())
        } else {
            tokio::select! {
                biased;
                _ = shut => Err(self.removed()),
                result = self.clone().try_dial() => result,
            }
        };
        let now = Instant::now();
        match &result {
            Ok(_) => {
                if self.reach.succeed() {
                    tracing::info!(endpoint = %self.address, "endpoint reachable again");
                    self.changed.notify_one();
                }
            }
            // Shut down on purpose: nothing to learn of the endpoint.
            Err(_) if self.shut.load(Ordering::SeqCst) => {}
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                if self.reach.fail(now) {
                    tracing::info!(endpoint = %self.address, error = %e.reason, "endpoint unreachable; sitting it out");
                    self.changed.notify_one();
                }
            }
        }
        result
    }

    /// Why a connect to a shut-down connection fails. Attempt 0: counted
    /// against nothing (see `Endpoint::connect_failed`).
    fn removed(&self) -> ConnectError {
        ConnectError {
            address: self.address.clone(),
            reason: "the endpoint was removed from its cluster".into(),
            attempt: 0,
        }
    }

    async fn try_dial(self: Arc<Self>) -> Result<Arc<Pooled>, ConnectError> {
        let attempt = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        let fail = |reason: String| ConnectError {
            address: self.address.clone(),
            reason: reason.into(),
            attempt,
        };
        let started = Instant::now();
        let tcp = tokio::time::timeout(self.timeouts.connect, connect_tcp(&self.address))
            .await
            .map_err(|_| {
                fail(format!(
                    "connect timed out after {:?}",
                    self.timeouts.connect
                ))
            })?
            .map_err(|e| fail(e.to_string()))?;
        if let Ok(peer) = tcp.peer_addr() {
            *lock(&self.peer) = Some(peer);
        }
        let transport = match &self.tls {
            None => Transport::Plain(tcp),
            Some(tls) => {
                let left = self.timeouts.connect.saturating_sub(started.elapsed());
                tokio::time::timeout(left, tls.connect(tcp, &self.address))
                    .await
                    .map_err(|_| {
                        fail(format!(
                            "TLS handshake not done within {:?} of connecting",
                            self.timeouts.connect
                        ))
                    })?
                    .map_err(fail)?
            }
        };
        let signals = Arc::new(PeerSignals::default());
        let io = crate::wire::io::Batched::watching(transport, signals.clone());
        let (sender, conn) = client_builder()
            .handshake(io)
            .await
            .map_err(|e| fail(format!("HTTP/2 handshake failed: {e}")))?;
        let (abandon, abandoned) = tokio::sync::oneshot::channel();
        tokio::spawn(
            self.clone()
                .drive(conn, attempt, signals.clone(), abandoned),
        );
        // The connection carries calls once the server has spoken: a socket
        // that the kernel accepted for a server that is going away (or is
        // hung) would swallow them.
        let spoke = async {
            while !signals.heard.load(Ordering::Acquire) && !signals.closed.load(Ordering::Acquire)
            {
                signals.changed.notified().await;
            }
        };
        let left = self.timeouts.connect.saturating_sub(started.elapsed());
        if tokio::time::timeout(left, spoke).await.is_err() {
            return Err(fail(format!(
                "connected, but no HTTP/2 settings came within {:?}",
                self.timeouts.connect
            )));
        }
        if !signals.heard.load(Ordering::Acquire) {
            return Err(fail(
                "connected, but the connection closed before the endpoint spoke HTTP/2".into(),
            ));
        }
        self.opened.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(endpoint = %self.address, "upstream connection open");
        let pooled = Arc::new(Pooled {
            attempt,
            sender,
            signals,
            abandon: Mutex::new(Some(abandon)),
        });
        self.ready.store(Some(pooled.clone()));
        if self.shut.load(Ordering::SeqCst) {
            // Shut down on another thread while this connection went into
            // the pool: its `close` may have found nothing there to drop.
            self.unpool(attempt);
            if let Some(abandon) = lock(&pooled.abandon).take() {
                let _ = abandon.send(());
            }
            return Err(self.removed());
        }
        Ok(pooled)
    }

    /// Runs connection `attempt` until it ends, and takes it out of the
    /// pool once no new call has used it for `idle_timeout`: the HTTP/2
    /// client then closes it when its last stream ends. Sends a PING every
    /// `keepalive_interval` and drops the connection if one goes
    /// unanswered for `keepalive_timeout`. Ends at once when told to by
    /// `abandoned`.
    async fn drive(
        self: Arc<Self>,
        mut conn: ClientConnection,
        attempt: u64,
        signals: Arc<PeerSignals>,
        abandoned: tokio::sync::oneshot::Receiver<()>,
    ) {
        let pings = conn.ping_pong();
        // Pending for good once the pool's handle is dropped without a word
        // (the connection then runs until its last stream ends).
        let mut abandoned = abandoned.fuse();
        let mut conn = std::pin::pin!(conn);
        let every = (self.timeouts.idle / 4).max(Duration::from_millis(1));
        let mut check = std::pin::pin!(Timer::after(every));
        let mut last_uses = self.uses.load(Ordering::Relaxed);
        let mut quiet = Duration::ZERO;
        let mut keepalive = Keepalive::new(
            pings,
            self.timeouts.keepalive_interval,
            self.timeouts.keepalive_timeout,
        );
        let result: Result<(), String> = loop {
            tokio::select! {
                biased;
                result = &mut conn => break result.map_err(|e| crate::wire::grpc::describe(&e)),
                _ = check.as_mut() => {
                    check.as_mut().reset(Instant::now() + every);
                    let uses = self.uses.load(Ordering::Relaxed);
                    quiet = if uses == last_uses { quiet + every } else { Duration::ZERO };
                    last_uses = uses;
                    if quiet >= self.timeouts.idle && self.unpool(attempt) {
                        tracing::debug!(endpoint = %self.address, idle = ?self.timeouts.idle, "closing an idle upstream connection");
                    }
                }
                _ = keepalive.lost() => {
                    break Err(format!("no answer to a PING within {:?}", keepalive.timeout()));
                }
                Ok(()) = &mut abandoned => {
                    tracing::debug!(endpoint = %self.address, "dropping an upstream connection that stopped answering");
                    break Ok(());
                }
            }
        };
        signals.closed.store(true, Ordering::Release);
        self.unpool(attempt);
        self.closed.fetch_add(1, Ordering::Relaxed);
        signals.changed.notify_one();
        match result {
            Ok(()) => tracing::debug!(endpoint = %self.address, "upstream connection closed"),
            Err(e) => {
                tracing::info!(endpoint = %self.address, error = %e, "upstream connection lost")
            }
        }
    }

    /// Drops the pool's handles to connection `attempt`, if it is still the
    /// pooled one. Returns whether it was.
    fn unpool(&self, attempt: u64) -> bool {
        let current = self.ready.load_full();
        if current.as_ref().map(|p| p.attempt) != Some(attempt) {
            return false;
        }
        // Only if no newer connection took its place meanwhile.
        let previous = self.ready.compare_and_swap(&current, None);
        if !previous
            .as_ref()
            .zip(current.as_ref())
            .is_some_and(|(a, b)| Arc::ptr_eq(a, b))
        {
            return false;
        }
        let mut slot = lock(&self.connecting);
        // A dial of the next connection may be under way: leave it be.
        if slot
            .as_ref()
            .and_then(|c| c.peek())
            .is_some_and(|r| matches!(r, Ok(p) if p.attempt == attempt))
        {
            *slot = None;
        }
        true
    }
}

/// The pooled connection's handle, and which connect attempt made it.
struct Pooled {
    attempt: u64,
    sender: Sender,
    /// Once the endpoint sent GOAWAY it is shutting down: no new call goes
    /// on this connection (those in flight finish).
    signals: Arc<PeerSignals>,
    /// Tells the connection's task to drop it at once.
    abandon: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl Pooled {
    fn is_usable(&self) -> bool {
        !self.signals.closed.load(Ordering::Acquire)
            && !self.signals.going_away.load(Ordering::Acquire)
    }
}

type ClientConnection = h2::client::Connection<crate::wire::io::Batched<Transport>, Bytes>;

async fn connect_tcp(address: &str) -> std::io::Result<TcpStream> {
    let tcp = match address.parse::<SocketAddr>() {
        Ok(addr) => TcpStream::connect(addr).await?,
        Err(_) => TcpStream::connect(address).await?,
    };
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// After a failed connect the endpoint sits out this long, doubling with
/// each further failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Whether connecting to the endpoint works, learned from real connects.
struct Reachability {
    clock: Clock,
    /// Milliseconds on `clock` until which the endpoint sits out; 0 when up.
    down_until_ms: AtomicU64,
    backoff_ms: AtomicU64,
}

impl Default for Reachability {
    fn default() -> Self {
        Reachability {
            clock: Clock::new(),
            down_until_ms: AtomicU64::new(0),
            backoff_ms: AtomicU64::new(0),
        }
    }
}

impl Reachability {
    fn is_up(&self, now: Instant) -> bool {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        until == 0 || self.clock.ms(now) >= until
    }

    fn down_until(&self) -> Option<Instant> {
        match self.down_until_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.clock.instant(ms)),
        }
    }

    /// Returns true if the endpoint was up until now.
    fn fail(&self, now: Instant) -> bool {
        let was_up = self.is_up(now);
        let backoff = match self.backoff_ms.load(Ordering::Relaxed) {
            0 => FIRST_BACKOFF.as_millis() as u64,
            b => (b * 2).min(MAX_BACKOFF.as_millis() as u64),
        };
        self.backoff_ms.store(backoff, Ordering::Relaxed);
        let now_ms = self.clock.ms(now);
        self.down_until_ms
            .store(now_ms + backoff.max(1), Ordering::Relaxed);
        was_up
    }

    /// Returns true if the endpoint had been sitting out.
    fn succeed(&self) -> bool {
        self.backoff_ms.store(0, Ordering::Relaxed);
        self.down_until_ms.swap(0, Ordering::Relaxed) != 0
    }
}

fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .enable_push(false);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn close_drops_the_live_connection_and_the_next_get_dials_anew() {
        use crate::tools::agent::{AgentOptions, AgentStats, spawn};
        let stats = Arc::new(AgentStats::default());
        let loopback = "127.0.0.1:0".parse().unwrap();
        let (addr, _agent) = spawn(loopback, AgentOptions::named("a"), stats.clone())
            .await
            .unwrap();
        let timeouts = Timeouts {
            connect: Duration::from_secs(5),
            idle: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
        };
        let connection =
            Connection::new(addr.to_string().into(), timeouts, None, Default::default());
        let mut first = connection.get().await.unwrap();
        assert!(connection.is_open());
        connection.close();
        assert!(!connection.is_open(), "out of the pool at once");
        // Its task drops it without waiting for the handle still held here.
        let ended = async {
            while connection.closed() == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("the connection ends");
        let request = http::Request::post(format!("http://{addr}/"))
            .body(())
            .unwrap();
        assert!(
            first.send_request(request, true).is_err(),
            "the old handle's connection is gone"
        );
        connection.get().await.unwrap();
        assert_eq!((connection.opened(), connection.closed()), (2, 1));
        assert_eq!(stats.get(&stats.connections), 2);
        connection.close();
        connection.close();
        assert!(!connection.is_open(), "closing twice is harmless");
    }

    #[tokio::test]
    async fn shutting_down_ends_a_connect_under_way_at_once() {
        // The kernel completes the TCP handshake; nobody ever speaks HTTP/2.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let timeouts = Timeouts {
            connect: Duration::from_secs(30),
            idle: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
        };
        let address = silent.local_addr().unwrap().to_string();
        let connection = Connection::new(address.into(), timeouts, None, Default::default());
        let waiting = connection.connect_boxed();
        let waiting = tokio::spawn(waiting);
        let (_accepted, _) = tokio::task::spawn_blocking(move || silent.accept())
            .await
            .unwrap()
            .unwrap();
        connection.shut_down();
        let result = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the connect gives up long before its 30 s timeout")
            .unwrap();
        let Err(error) = result else {
            panic!("a connection was made after a shutdown");
        };
        assert!(error.reason.contains("removed"), "{error}");
        assert_eq!(
            connection.failures(),
            0,
            "a shutdown is no failure of the endpoint"
        );
        assert!(
            connection.get().await.is_err(),
            "and no new connection is made"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_connect_sits_the_endpoint_out_with_a_growing_backoff() {
        let r = Reachability::default();
        assert!(r.is_up(Instant::now()));
        assert!(r.fail(Instant::now()), "first failure takes it down");
        assert!(!r.is_up(Instant::now()));
        tokio::time::advance(Duration::from_millis(250)).await;
        assert!(r.is_up(Instant::now()), "back after 250ms");
        assert!(r.fail(Instant::now()));
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(!r.is_up(Instant::now()), "second backoff is 500ms");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(r.is_up(Instant::now()));
        for _ in 0..10 {
            r.fail(Instant::now());
        }
        tokio::time::advance(MAX_BACKOFF - Duration::from_millis(1)).await;
        assert!(!r.is_up(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(
            r.is_up(Instant::now()),
            "backoff is capped at {MAX_BACKOFF:?}"
        );
        assert!(r.succeed());
        assert!(!r.succeed(), "already up");
        assert!(r.fail(Instant::now()));
        tokio::time::advance(FIRST_BACKOFF).await;
        assert!(r.is_up(Instant::now()), "success resets the backoff");
    }
}
