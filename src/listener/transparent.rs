//! Transparent mode: connections that iptables redirected to the sidecar
//! (`agentmesh init-iptables`), from callers that dialled an agent or a
//! Service address themselves and know nothing of the sidecar.
//!
//! The kernel keeps where the caller meant to go (`SO_ORIGINAL_DST`). A
//! destination that a cluster's `match` names, or that is one of a
//! cluster's endpoints, is that cluster's: if the caller speaks HTTP/2 with
//! prior knowledge (gRPC without TLS), its calls are balanced over the
//! cluster, each on its own, as on a local port. Anything else is passed
//! through as plain TCP to the original destination: another protocol, a
//! caller that sends nothing first (the server speaks first, as SMTP and
//! MySQL do), or a destination no cluster claims.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::connect::{H2_PREFACE, pipe};
use super::prefixed::Prefixed;
use super::{Context, Route, serve_h2};
use crate::app::drain;

/// How long a caller to a cluster's address has to send its first bytes
/// before the connection is taken for a server-speaks-first protocol and
/// passed through.
const DETECT_TIMEOUT: Duration = Duration::from_millis(500);

/// What transparent mode did with connections, for `/metrics`.
#[derive(Debug, Default)]
pub struct TransparentStats {
    /// HTTP/2 to a cluster's address: balanced per call.
    pub balanced: std::sync::atomic::AtomicU64,
    /// Passed through as TCP to the original destination.
    pub passed_through: std::sync::atomic::AtomicU64,
    /// Closed: no original destination (the port was dialled directly), or
    /// it could not be reached.
    pub refused: std::sync::atomic::AtomicU64,
}

impl TransparentStats {
    pub fn by_kind(&self) -> [(&'static str, u64); 3] {
        let get = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed);
        [
            ("balanced", get(&self.balanced)),
            ("passed_through", get(&self.passed_through)),
            ("refused", get(&self.refused)),
        ]
    }
}

/// Where a redirected connection was going, as the kernel kept it.
fn original_destination(tcp: &TcpStream) -> Option<SocketAddr> {
    match tcp.local_addr().ok()? {
        SocketAddr::V4(_) => rustix::net::sockopt::ip_original_dst(tcp)
            .ok()
            .map(SocketAddr::V4),
        SocketAddr::V6(_) => rustix::net::sockopt::ipv6_original_dst(tcp)
            .ok()
            .map(SocketAddr::V6),
    }
}

pub(super) async fn handle(mut tcp: TcpStream, ctx: Arc<Context>, drain: drain::Watch) {
    let stats = &ctx.stats.transparent;
    let local = tcp.local_addr().ok();
    let destination = match original_destination(&tcp) {
        // Not redirected: the destination is this port itself.
        Some(d) if Some(d) != local => d,
        _ => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                "a connection to the transparent port that iptables did not redirect; closing"
            );
            return;
        }
    };
    let peer = tcp.peer_addr().ok();
    let mut first = BytesMut::with_capacity(64);
    if let Some(slot) = ctx.router.slot_for_destination(destination) {
        let sniffed = tokio::time::timeout(DETECT_TIMEOUT, async {
            while first.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&first) {
                match tcp.read_buf(&mut first).await {
                    Ok(0) | Err(_) => return false,
                    Ok(_) => {}
                }
            }
            true
        })
        .await;
        if sniffed == Ok(false) {
            return;
        }
        if first.starts_with(H2_PREFACE) {
            stats.balanced.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%destination, cluster = slot.name(), "redirected HTTP/2: balanced per call");
            let route = Route::Cluster(slot);
            serve_h2(Prefixed::new(first.freeze(), tcp), peer, route, &ctx, drain).await;
            return;
        }
    }
    // Not ours to balance: on to where the caller was going. Not a call,
    // so it does not hold up draining.
    drop(drain);
    let upstream = tokio::time::timeout(
        crate::config::DEFAULT_CONNECT_TIMEOUT,
        TcpStream::connect(destination),
    )
    .await;
    let Ok(Ok(upstream)) = upstream else {
        stats.refused.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%destination, "cannot reach a redirected connection's destination; closing");
        return;
    };
    stats.passed_through.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%destination, "redirected connection passed through as TCP");
    pipe(
        tcp,
        first.freeze(),
        upstream,
        &ctx,
        &destination.to_string(),
    )
    .await;
}
