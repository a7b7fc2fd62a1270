//! TLS to a cluster's endpoints, and mutual TLS, with rustls.
//!
//! A cluster's `tls` table names a CA bundle, and optionally a client
//! certificate and key (mutual TLS). Only TLS 1.3 is offered, with ALPN
//! `h2`. The endpoint's certificate must chain to the CA and name either
//! the server name (a DNS or IP subject alternative name, as browsers
//! check) or, with `identity`, a SPIFFE ID (a URI subject alternative name,
//! as Linkerd and Istio check).
//!
//! The files are read again every `reload_every`; when their bytes change
//! (Kubernetes rotates a mounted Secret by swapping a symlink), new
//! connections use the new files. Connections already open keep theirs:
//! TLS 1.3 has no renegotiation, and a call in flight must not be cut.
//! Files that cannot be used are logged and counted, and the last good
//! ones stay.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// `[[cluster]] tls = { ... }`: how to reach the cluster's endpoints over
/// TLS.
#[derive(Clone, Debug, PartialEq)]
pub struct TlsConfig {
    /// PEM certificates the endpoints' certificates must chain to.
    pub ca: PathBuf,
    /// A PEM certificate chain to present (mutual TLS), with its key.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Sent as SNI and checked against the certificate's DNS or IP names;
    /// by default the host of the endpoint's address.
    pub server_name: Option<String>,
    /// A SPIFFE ID (`spiffe://trust-domain/path`) the endpoint's
    /// certificate must carry as a URI name. When set, the server name is
    /// checked only if `server_name` is given too.
    pub identity: Option<String>,
    /// How often the files are read again for changes.
    pub reload_every: Duration,
}

pub const DEFAULT_RELOAD_EVERY: Duration = Duration::from_secs(5);

/// A problem with the TLS files: which key of the `tls` table, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsProblem {
    pub key: &'static str,
    pub reason: String,
}

impl TlsProblem {
    fn new(key: &'static str, reason: impl Into<String>) -> TlsProblem {
        TlsProblem {
            key,
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for TlsProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tls.{}: {}", self.key, self.reason)
    }
}

/// Checks that `config`'s files make a usable client configuration (for
/// `agentmesh check` and start-up).
pub fn check(config: &TlsConfig) -> Result<(), TlsProblem> {
    let files = Files::read(config)?;
    client_config(config, &files).map(drop)
}

/// What [`Tls`] has counted.
#[derive(Debug, Default)]
pub struct TlsStats {
    pub handshakes: AtomicU64,
    pub handshake_failures: AtomicU64,
    /// Changed files taken into use, and changed files refused.
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

/// A cluster's TLS client: makes the handshakes of its endpoints'
/// connections, and follows its files.
pub struct Tls {
    cluster: Arc<str>,
    config: TlsConfig,
    current: ArcSwap<Loaded>,
    /// The bytes of files last refused, so that the same bad files are
    /// logged once, not at every look.
    refused: std::sync::Mutex<Option<Files>>,
    pub stats: TlsStats,
}

struct Loaded {
    files: Option<Files>,
    client: Result<Arc<ClientConfig>, TlsProblem>,
}

impl Tls {
    /// Loads the files now. If they cannot be used (they changed since the
    /// config was checked), every handshake fails with the reason until
    /// [`Tls::watch`] finds usable ones.
    pub fn new(cluster: &str, config: TlsConfig) -> Tls {
        let loaded = match Files::read(&config) {
            Ok(files) => Loaded {
                client: client_config(&config, &files).map(Arc::new),
                files: Some(files),
            },
            Err(e) => Loaded {
                files: None,
                client: Err(e),
            },
        };
        if let Err(e) = &loaded.client {
            tracing::error!(cluster, error = %e, "TLS files cannot be used; connections to the cluster fail until they can");
        }
        Tls {
            cluster: cluster.into(),
            config,
            current: ArcSwap::from_pointee(loaded),
            refused: Default::default(),
            stats: TlsStats::default(),
        }
    }

    pub fn config(&self) -> &TlsConfig {
        &self.config
    }

    /// The TLS handshake with the endpoint at `address` over `tcp`.
    pub async fn connect(&self, tcp: TcpStream, address: &str) -> Result<Transport, String> {
        self.stats.handshakes.fetch_add(1, Ordering::Relaxed);
        let result = self.handshake(tcp, address).await;
        if result.is_err() {
            self.stats
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn handshake(&self, tcp: TcpStream, address: &str) -> Result<Transport, String> {
        let client = match &self.current.load().client {
            Ok(client) => client.clone(),
            Err(e) => return Err(format!("no usable TLS settings ({e})")),
        };
        let name = self.config.server_name.as_deref().unwrap_or(host(address));
        let name = ServerName::try_from(name.to_string()).map_err(|_| {
            format!("{name:?} is not a DNS name or an IP address to check the certificate against")
        })?;
        let stream = tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        Ok(Transport::Tls(Box::new(stream)))
    }

    /// Reads the files every `reload_every` and takes changed ones into
    /// use; runs until its task is dropped.
    pub async fn watch(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.config.reload_every).await;
            self.reload().await;
        }
    }

    /// Reads the files once and takes them into use if they changed and
    /// work. Returns whether new files were taken.
    pub async fn reload(&self) -> bool {
        let config = self.config.clone();
        let read = tokio::task::spawn_blocking(move || Files::read(&config)).await;
        let files = match read {
            Ok(Ok(files)) => files,
            Ok(Err(e)) => {
                // A rotation under way may show a file missing for a
                // moment; the last good files stay.
                tracing::debug!(cluster = %self.cluster, error = %e, "TLS files unreadable; keeping the last good ones");
                return false;
            }
            Err(_) => return false,
        };
        if self.current.load().files.as_ref() == Some(&files) {
            return false;
        }
        match client_config(&self.config, &files) {
            Ok(client) => {
                self.current.store(Arc::new(Loaded {
                    files: Some(files),
                    client: Ok(Arc::new(client)),
                }));
                self.stats.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(cluster = %self.cluster, "TLS files changed; new connections use them");
                true
            }
            Err(e) => {
                let mut refused = crate::util::lock(&self.refused);
                if refused.as_ref() != Some(&files) {
                    self.stats.reload_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(cluster = %self.cluster, error = %e, "TLS files changed but cannot be used; keeping the last good ones");
                    *refused = Some(files);
                }
                false
            }
        }
    }
}

/// The host part of `host:port` or `[v6]:port`.
fn host(address: &str) -> &str {
    let host = crate::cluster::strip_port(address);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// The bytes of the files, compared to notice a change.
#[derive(Clone, PartialEq)]
struct Files {
    ca: Vec<u8>,
    cert: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
}

impl Files {
    fn read(config: &TlsConfig) -> Result<Files, TlsProblem> {
        let read = |key: &'static str, path: &Path| {
            std::fs::read(path)
                .map_err(|e| TlsProblem::new(key, format!("cannot read {}: {e}", path.display())))
        };
        Ok(Files {
            ca: read("ca", &config.ca)?,
            cert: config
                .cert
                .as_deref()
                .map(|p| read("cert", p))
                .transpose()?,
            key: config.key.as_deref().map(|p| read("key", p)).transpose()?,
        })
    }
}

fn certificates(
    key: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsProblem> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsProblem::new(key, format!("{}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsProblem::new(
            key,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

/// The crypto the sidecar (and the demo agent) use: ring, with X25519
/// offered first.
///
/// ring has X25519, P-256 and P-384 key exchange and no post-quantum
/// hybrid (rustls marks its provider deprecated for that); aws-lc-rs has
/// the hybrid but builds a large C library. rustls' ring defaults put
/// P-384 first, whose key exchange costs about 100 million instructions a
/// handshake here against X25519's few hundred thousand (bench/tls).
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::kx_group::{SECP256R1, SECP384R1, X25519};
    #[allow(deprecated)]
    let ring = rustls::crypto::ring::default_provider();
    Arc::new(CryptoProvider {
        kx_groups: vec![X25519, SECP256R1, SECP384R1],
        ..ring
    })
}

fn client_config(config: &TlsConfig, files: &Files) -> Result<ClientConfig, TlsProblem> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for cert in certificates("ca", &config.ca, &files.ca)? {
        roots.add(cert).map_err(|e| {
            TlsProblem::new(
                "ca",
                format!("{}: not a usable CA certificate: {e}", config.ca.display()),
            )
        })?;
    }
    let roots = Arc::new(roots);
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsProblem::new("ca", e.to_string()))?;
    let builder = match &config.identity {
        None => {
            let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| TlsProblem::new("ca", e.to_string()))?;
            builder.with_webpki_verifier(verifier)
        }
        Some(identity) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(IdentityVerifier {
                roots,
                provider,
                identity: identity.clone(),
                check_name: config.server_name.is_some(),
            })),
    };
    let mut client = match (&config.cert, &config.key, &files.cert, &files.key) {
        (Some(cert_path), Some(key_path), Some(cert), Some(key)) => {
            let chain = certificates("cert", cert_path, cert)?;
            let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
                TlsProblem::new(
                    "key",
                    format!("{}: no usable private key: {e}", key_path.display()),
                )
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                TlsProblem::new(
                    "key",
                    format!(
                        "{} does not go with {}: {e}",
                        key_path.display(),
                        cert_path.display()
                    ),
                )
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(client)
}

/// Checks the chain to the CA, and a SPIFFE ID instead of (or as well as)
/// a DNS name.
#[derive(Debug)]
struct IdentityVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    identity: String,
    /// Whether the server name is checked too (`server_name` was given).
    check_name: bool,
}

/// The certificate does not carry the SPIFFE ID the cluster asks for.
#[derive(Debug)]
struct WrongIdentity {
    wanted: String,
    presented: Vec<String>,
}

impl std::fmt::Display for WrongIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the certificate is not for {} (its URI names: {:?})",
            self.wanted, self.presented
        )
    }
}

impl std::error::Error for WrongIdentity {}

/// The URI subject alternative names of a DER certificate.
pub fn uri_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect()
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if self.check_name {
            rustls::client::verify_server_name(&cert, server_name)?;
        }
        let presented = uri_names(end_entity);
        if !presented.contains(&self.identity) {
            return Err(rustls::Error::Other(rustls::OtherError(Arc::new(
                WrongIdentity {
                    wanted: self.identity.clone(),
                    presented,
                },
            ))));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// An upstream connection's byte stream: plain TCP, or TLS over it. An
/// enum rather than a boxed trait object, so that plain connections pay
/// one branch per read or write.
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_of_an_address() {
        assert_eq!(host("planner-0.agents:50051"), "planner-0.agents");
        assert_eq!(host("127.0.0.1:50051"), "127.0.0.1");
        assert_eq!(host("[::1]:50051"), "::1");
        assert_eq!(host("planner"), "planner");
    }
}
