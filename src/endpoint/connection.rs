//! One pooled HTTP/2 connection per endpoint, shared by every call and every
//! caller.
//!
//! HTTP/2 multiplexes, so one connection carries all of an endpoint's calls;
//! the fast path is one atomic load and a handle clone. A closed connection
//! is replaced on the next call, and concurrent calls that find none share a
//! single connect attempt (no thundering herd of dials), without holding any
//! lock across `.await`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::proxy::RequestBody;

pub type Sender = http2::SendRequest<RequestBody>;

type Connecting = Shared<BoxFuture<'static, Result<Sender, ConnectError>>>;

/// Why a connection to an endpoint could not be made.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{address}: {reason}")]
pub struct ConnectError {
    pub address: Arc<str>,
    pub reason: Arc<str>,
}

pub struct Connection {
    inner: Arc<Inner>,
}

struct Inner {
    address: Arc<str>,
    connect_timeout: Duration,
    ready: ArcSwapOption<Sender>,
    connecting: Mutex<Option<Connecting>>,
    /// Connections made over the endpoint's life (for stats and tests).
    opened: std::sync::atomic::AtomicU64,
}

impl Connection {
    pub fn new(address: Arc<str>, connect_timeout: Duration) -> Connection {
        Connection {
            inner: Arc::new(Inner {
                address,
                connect_timeout,
                ready: ArcSwapOption::empty(),
                connecting: Mutex::new(None),
                opened: Default::default(),
            }),
        }
    }

    /// Connections opened so far.
    pub fn opened(&self) -> u64 {
        self.inner.opened.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a live connection is open now.
    pub fn is_open(&self) -> bool {
        self.inner
            .ready
            .load()
            .as_ref()
            .is_some_and(|s| !s.is_closed())
    }

    /// A handle to send calls on, connecting first if there is no live
    /// connection.
    pub async fn get(&self) -> Result<Sender, ConnectError> {
        if let Some(sender) = self.inner.ready.load().as_deref() {
            if !sender.is_closed() {
                return Ok(sender.clone());
            }
        }
        self.connect().await
    }

    async fn connect(&self) -> Result<Sender, ConnectError> {
        let attempt = {
            let mut slot = self
                .inner
                .connecting
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            let reusable = slot.as_ref().is_some_and(|c| match c.peek() {
                None => true,
                Some(Ok(sender)) => !sender.is_closed(),
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
    async fn dial(self: Arc<Self>) -> Result<Sender, ConnectError> {
        let fail = |reason: String| ConnectError {
            address: self.address.clone(),
            reason: reason.into(),
        };
        let tcp = tokio::time::timeout(self.connect_timeout, connect_tcp(&self.address))
            .await
            .map_err(|_| {
                fail(format!(
                    "connect timed out after {:?}",
                    self.connect_timeout
                ))
            })?
            .map_err(|e| fail(e.to_string()))?;
        let (sender, conn) = client_builder()
            .handshake(TokioIo::new(crate::io::Batched::new(tcp)))
            .await
            .map_err(|e| fail(format!("HTTP/2 handshake failed: {e}")))?;
        let address = self.address.clone();
        tokio::spawn(async move {
            match conn.await {
                Ok(()) => tracing::debug!(endpoint = %address, "upstream connection closed"),
                Err(e) => {
                    tracing::info!(endpoint = %address, error = %e, "upstream connection lost")
                }
            }
        });
        self.opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(endpoint = %self.address, "upstream connection open");
        self.ready.store(Some(Arc::new(sender.clone())));
        Ok(sender)
    }
}

async fn connect_tcp(address: &str) -> std::io::Result<TcpStream> {
    let tcp = match address.parse::<SocketAddr>() {
        Ok(addr) => TcpStream::connect(addr).await?,
        Err(_) => TcpStream::connect(address).await?,
    };
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

fn client_builder() -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    b
}
