//! The demo agent (`agentmesh agent`): a small gRPC server with the four call
//! kinds, health checks, and knobs for slowness and failure. The demo, the
//! tests and the benchmarks use it as the endpoint behind the sidecar.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::net::TcpListener;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::pb::agent_server::{Agent, AgentServer};
use crate::pb::{InvokeReply, InvokeRequest};

/// How an agent behaves.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Reported in every reply's `agent` field.
    pub name: String,
    /// Added to every call before it answers.
    pub delay: Duration,
    /// The share of calls answered with UNAVAILABLE, from 0.0 to 1.0.
    pub fail_ratio: f64,
    /// Calls served at once; more wait their turn. 0: no limit.
    pub max_concurrency: usize,
    /// After the first duration, the delay becomes the second.
    pub delay_after: Option<(Duration, Duration)>,
    /// The largest request header list it takes (HTTP/2
    /// SETTINGS_MAX_HEADER_LIST_SIZE); a larger one is answered 431.
    /// `None`: the server's default (16 KiB).
    pub max_header_list_size: Option<u32>,
    /// Serve TLS (see [`server_tls`]) instead of plain HTTP/2.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Send the `traceparent` a call came with back, as the response
    /// header `x-traceparent-received` (for the tracing tests; the
    /// benchmarks turn it off, as it is no work of the proxy's).
    pub echo_traceparent: bool,
}

impl AgentOptions {
    pub fn named(name: &str) -> AgentOptions {
        AgentOptions {
            name: name.to_string(),
            delay: Duration::ZERO,
            fail_ratio: 0.0,
            max_concurrency: 0,
            delay_after: None,
            max_header_list_size: None,
            tls: None,
            echo_traceparent: true,
        }
    }
}

/// A TLS server config for an agent: its certificate chain and key (PEM
/// files), and, for mutual TLS, the CA its callers' certificates must chain
/// to (a caller without one is refused).
pub fn server_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use anyhow::Context;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = crate::endpoint::tls::provider();
    let certs = |path: &std::path::Path| {
        CertificateDer::pem_file_iter(path)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("reading certificates from {}", path.display()))
    };
    let chain = certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading a private key from {}", key.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca)? {
                roots.add(c)?;
            }
            builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()?,
            )
        }
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// What an agent has seen, for tests and the demo, and two knobs that
/// change its behaviour while it runs.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// The share of calls answered with UNAVAILABLE now, as `f64` bits;
    /// `serve` starts it at `--fail-ratio`. See [`AgentStats::set_fail_ratio`].
    fail_ratio_bits: AtomicU64,
    /// The agent's health service, to answer NOT_SERVING on demand.
    health: std::sync::OnceLock<tonic_health::server::HealthReporter>,
    /// Calls started, of any kind.
    pub calls: AtomicU64,
    /// Calls that ran to their end (including with an error status).
    pub completed: AtomicU64,
    /// Calls dropped before their end: the caller (or the proxy) reset them.
    pub cancelled: AtomicU64,
    /// TCP connections accepted.
    pub connections: AtomicU64,
    /// With TLS: handshakes completed, of those the ones where the caller
    /// presented a certificate, and handshakes that failed.
    pub tls_handshakes: AtomicU64,
    pub tls_client_certs: AtomicU64,
    pub tls_failures: AtomicU64,
}

impl AgentStats {
    pub fn get(&self, counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Changes the share of calls answered with UNAVAILABLE (0.0 to 1.0).
    pub fn set_fail_ratio(&self, ratio: f64) {
        self.fail_ratio_bits
            .store(ratio.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
    }

    pub fn fail_ratio(&self) -> f64 {
        f64::from_bits(self.fail_ratio_bits.load(Ordering::Relaxed))
    }

    /// Makes `grpc.health.v1.Health/Check` answer SERVING or NOT_SERVING.
    pub async fn set_serving(&self, serving: bool) {
        use tonic_health::ServingStatus;
        if let Some(health) = self.health.get() {
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status("", status).await;
        }
    }
}

/// Serves the agent on `listener` until `shutdown` resolves. The share of
/// failed calls is `stats.fail_ratio()` (see [`spawn`], which sets it from
/// `options`).
pub async fn serve(
    listener: TcpListener,
    options: AgentOptions,
    stats: Arc<AgentStats>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServer<AgentService>>().await;
    let _ = stats.health.set(health);
    let counting = stats.clone();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).inspect(move |conn| {
        if let Ok(tcp) = conn {
            let _ = tcp.set_nodelay(true);
            counting.connections.fetch_add(1, Ordering::Relaxed);
        }
    });
    let delay_ms = Arc::new(AtomicU64::new(options.delay.as_millis() as u64));
    if let Some((after, delay)) = options.delay_after {
        let delay_ms = delay_ms.clone();
        let name = options.name.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            tracing::info!(agent = name, ?delay, "delay changes");
            delay_ms.store(delay.as_millis() as u64, Ordering::Relaxed);
        });
    }
    let max_header_list_size = options.max_header_list_size;
    let service = AgentService {
        slots: (options.max_concurrency > 0)
            .then(|| Arc::new(tokio::sync::Semaphore::new(options.max_concurrency))),
        options: Arc::new(options),
        stats,
        delay_ms,
    };
    let tls = service.options.tls.clone();
    let router = tonic::transport::Server::builder()
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .http2_max_header_list_size(max_header_list_size)
        .add_service(health_service)
        .add_service(AgentServer::new(service.clone()));
    match tls {
        None => {
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        Some(tls) => {
            let incoming = handshaken(incoming, tls, service.stats.clone());
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    }
}

/// The TLS connections made over `incoming`'s TCP connections, each
/// handshake in a task of its own so that a slow one holds up no other.
fn handshaken(
    incoming: impl Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static,
    tls: Arc<rustls::ServerConfig>,
    stats: Arc<AgentStats>,
) -> impl Stream<Item = std::io::Result<TlsIo>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        let mut incoming = std::pin::pin!(incoming);
        while let Some(conn) = incoming.next().await {
            let Ok(tcp) = conn else { continue };
            let (acceptor, tx, stats) = (acceptor.clone(), tx.clone(), stats.clone());
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp));
                match handshake.await {
                    Ok(Ok(stream)) => {
                        stats.tls_handshakes.fetch_add(1, Ordering::Relaxed);
                        if stream.get_ref().1.peer_certificates().is_some() {
                            stats.tls_client_certs.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = tx.send(Ok(TlsIo(stream))).await;
                    }
                    Ok(Err(e)) => {
                        stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(error = %e, "agent: TLS handshake failed");
                    }
                    Err(_) => {
                        stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A caller's TLS connection, as tonic serves it.
pub struct TlsIo(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsIo {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Binds `addr` and serves the agent in a background task; returns the
/// bound address.
pub async fn spawn(
    addr: SocketAddr,
    options: AgentOptions,
    stats: Arc<AgentStats>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    stats.set_fail_ratio(options.fail_ratio);
    let name = options.name.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = serve(listener, options, stats, std::future::pending()).await {
            tracing::error!(agent = name, error = %e, "agent stopped");
        }
    });
    Ok((local, task))
}

#[derive(Clone)]
struct AgentService {
    options: Arc<AgentOptions>,
    stats: Arc<AgentStats>,
    /// The delay now, which `delay_after` may change.
    delay_ms: Arc<AtomicU64>,
    /// `max_concurrency`: a call holds a slot while it works.
    slots: Option<Arc<tokio::sync::Semaphore>>,
}

/// Counts a call; dropped before `done()`, it counts the call cancelled.
struct Tracked {
    stats: Arc<AgentStats>,
    done: bool,
}

impl Tracked {
    fn start(stats: &Arc<AgentStats>) -> Tracked {
        stats.calls.fetch_add(1, Ordering::Relaxed);
        Tracked {
            stats: stats.clone(),
            done: false,
        }
    }

    fn done(mut self) {
        self.done = true;
        self.stats.completed.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if !self.done {
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<InvokeReply, Status>> + Send>>;

impl AgentService {
    /// The call's work: its delay, in one of the agent's slots.
    async fn pause(&self, extra_ms: u32) {
        let _slot = match &self.slots {
            Some(slots) => slots.acquire().await.ok(),
            None => None,
        };
        let delay =
            Duration::from_millis(self.delay_ms.load(Ordering::Relaxed) + u64::from(extra_ms));
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    /// The status this request asks for, or an injected failure.
    fn outcome(&self, r: &InvokeRequest) -> Result<(), Status> {
        let (code, message) = if r.fail_code != 0 {
            (Code::from_i32(r.fail_code), r.fail_message.clone())
        } else if let ratio = self.stats.fail_ratio()
            && ratio > 0.0
            && fastrand::f64() < ratio
        {
            let message = format!(
                "agent {}: injected failure (--fail-ratio {ratio})",
                self.options.name
            );
            (Code::Unavailable, message)
        } else {
            return Ok(());
        };
        // A trailer of our own, so that tests can see trailers pass intact.
        let mut trailers = tonic::metadata::MetadataMap::new();
        if let Ok(name) = self.options.name.parse() {
            trailers.insert("x-agent", name);
        }
        Err(Status::with_metadata(code, message, trailers))
    }

    fn reply(&self, payload: Vec<u8>, seq: u32) -> InvokeReply {
        InvokeReply {
            agent: self.options.name.clone(),
            payload,
            seq,
        }
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn invoke(
        &self,
        request: Request<InvokeRequest>,
    ) -> Result<Response<InvokeReply>, Status> {
        let tracked = Tracked::start(&self.stats);
        let echo = request.metadata().get("x-echo").cloned();
        let traceparent = if self.options.echo_traceparent {
            request.metadata().get("traceparent").cloned()
        } else {
            None
        };
        let r = request.into_inner();
        self.pause(r.delay_ms).await;
        let result = self.outcome(&r);
        tracked.done();
        result.map(|()| {
            let mut response = Response::new(self.reply(r.payload, 0));
            if let Some(echo) = echo {
                // A header of the caller's, sent back, to show headers pass.
                response.metadata_mut().insert("x-echo", echo);
            }
            if let Some(traceparent) = traceparent {
                // The trace context the agent was given, for the tracing
                // tests to see whose span is its parent.
                response
                    .metadata_mut()
                    .insert("x-traceparent-received", traceparent);
            }
            response
        })
    }

    type StreamStream = ReplyStream;

    /// `count` replies, `interval_ms` apart; then the requested status.
    async fn stream(
        &self,
        request: Request<InvokeRequest>,
    ) -> Result<Response<ReplyStream>, Status> {
        let tracked = Tracked::start(&self.stats);
        let r = request.into_inner();
        let state = (0u32, tracked, r, self.clone());
        let replies = futures_util::stream::unfold(Some(state), |state| async move {
            let (i, tracked, r, agent) = state?;
            if i == 0 {
                agent.pause(r.delay_ms).await;
            } else if r.interval_ms > 0 && i < r.count {
                tokio::time::sleep(Duration::from_millis(u64::from(r.interval_ms))).await;
            }
            if i < r.count {
                let reply = agent.reply(r.payload.clone(), i);
                return Some((Ok(reply), Some((i + 1, tracked, r, agent))));
            }
            tracked.done();
            agent.outcome(&r).err().map(|status| (Err(status), None))
        });
        Ok(Response::new(Box::pin(replies)))
    }

    /// Reads every request, then answers with `seq` = how many came.
    async fn collect(
        &self,
        request: Request<Streaming<InvokeRequest>>,
    ) -> Result<Response<InvokeReply>, Status> {
        let tracked = Tracked::start(&self.stats);
        let mut requests = request.into_inner();
        let mut count = 0u32;
        let mut last = InvokeRequest::default();
        while let Some(r) = requests.message().await? {
            count += 1;
            last = r;
        }
        self.pause(last.delay_ms).await;
        let result = self.outcome(&last);
        tracked.done();
        result.map(|()| Response::new(self.reply(last.payload, count)))
    }

    type ChatStream = ReplyStream;

    /// One reply per request, in order; a request with `fail_code` ends the
    /// call with that status.
    async fn chat(
        &self,
        request: Request<Streaming<InvokeRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let tracked = Tracked::start(&self.stats);
        let state = (0u32, tracked, request.into_inner(), self.clone());
        let replies = futures_util::stream::unfold(Some(state), |state| async move {
            let (i, tracked, mut requests, agent) = state?;
            match requests.message().await {
                Ok(Some(r)) => {
                    agent.pause(r.delay_ms).await;
                    match agent.outcome(&r) {
                        Ok(()) => {
                            let reply = agent.reply(r.payload, i);
                            Some((Ok(reply), Some((i + 1, tracked, requests, agent))))
                        }
                        Err(status) => {
                            tracked.done();
                            Some((Err(status), None))
                        }
                    }
                }
                Ok(None) => {
                    tracked.done();
                    None
                }
                Err(status) => Some((Err(status), None)),
            }
        });
        Ok(Response::new(Box::pin(replies)))
    }
}
