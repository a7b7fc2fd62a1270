//! DNS discovery: a cluster whose endpoints are the A and AAAA records of a
//! name (`dns = "planner.agents.svc.cluster.local:50051"`), each at the
//! given port, with `hickory-resolver`.
//!
//! The name is resolved again every `dns_refresh`, or sooner when the
//! answer's TTL runs out (as Linkerd does), though not more than once a
//! second unless `dns_refresh` asks for it. A new answer is applied as an
//! [`Update::Reset`]: endpoints that stay keep their connections and calls,
//! new ones join as they connect, and those gone drain their calls in
//! flight. A failed or empty answer changes nothing: the last good set
//! stays, the failure is counted and logged once until the name resolves
//! again. A cluster is never emptied by DNS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;

use super::{Cluster, Update};
use crate::config::EndpointConfig;

/// `dns` and `dns_refresh` of a cluster, with `[resolver]`.
#[derive(Clone, Debug, PartialEq)]
pub struct DnsConfig {
    pub host: String,
    pub port: u16,
    pub refresh: Duration,
    /// Name servers to ask instead of `/etc/resolv.conf`'s.
    pub nameservers: Vec<SocketAddr>,
}

pub const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(5);

/// A TTL shorter than this does not make the name be asked more often
/// (unless `dns_refresh` is shorter still).
const MIN_TTL: Duration = Duration::from_secs(1);

fn resolver(config: &DnsConfig) -> Result<TokioResolver, String> {
    let mut options = ResolverOpts::default();
    options.timeout = Duration::from_secs(2);
    options.attempts = 2;
    // Never answer from a cache older than the refresh.
    options.positive_max_ttl = Some(config.refresh);
    options.negative_max_ttl = Some(config.refresh);
    let builder = if config.nameservers.is_empty() {
        TokioResolver::builder_tokio()
            .map_err(|e| format!("cannot read the system's resolver config: {e}"))?
    } else {
        let mut servers = ResolverConfig::new();
        for &addr in &config.nameservers {
            servers.add_name_server(NameServerConfig::new(addr, Protocol::Udp));
            servers.add_name_server(NameServerConfig::new(addr, Protocol::Tcp));
        }
        TokioResolver::builder_with_config(servers, TokioConnectionProvider::default())
    };
    Ok(builder.with_options(options).build())
}

impl Cluster {
    /// Follows the cluster's DNS name until the task is dropped.
    pub(crate) async fn discover(self: Arc<Self>, dns: DnsConfig) {
        let resolver = loop {
            match resolver(&dns) {
                Ok(r) => break r,
                Err(e) => {
                    self.stats.dns_failures.fetch_add(1, Ordering::Relaxed);
                    self.stats.dns_failing.store(true, Ordering::Relaxed);
                    tracing::error!(cluster = %self.name, error = %e, "cannot resolve endpoints; trying again");
                    tokio::time::sleep(dns.refresh).await;
                }
            }
        };
        let mut failing = false;
        loop {
            let wait = match self.resolve_once(&resolver, &dns).await {
                Ok(ttl) => {
                    if failing {
                        tracing::info!(cluster = %self.name, host = %dns.host, "the name resolves again");
                    }
                    failing = false;
                    self.stats.dns_failing.store(false, Ordering::Relaxed);
                    ttl.max(MIN_TTL.min(dns.refresh)).min(dns.refresh)
                }
                Err(reason) => {
                    self.stats.dns_failures.fetch_add(1, Ordering::Relaxed);
                    if !failing {
                        tracing::warn!(cluster = %self.name, host = %dns.host, %reason, endpoints = self.endpoints().len(), "DNS gave no endpoints; keeping the last ones (logged once until it resolves)");
                    }
                    failing = true;
                    self.stats.dns_failing.store(true, Ordering::Relaxed);
                    dns.refresh
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// One lookup, applied: how long its answer is good for.
    async fn resolve_once(
        &self,
        resolver: &TokioResolver,
        dns: &DnsConfig,
    ) -> Result<Duration, String> {
        let answer = resolver
            .lookup_ip(dns.host.as_str())
            .await
            .map_err(|e| e.to_string())?;
        let mut addrs: Vec<SocketAddr> = answer
            .iter()
            .map(|ip| SocketAddr::new(ip, dns.port))
            .collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err("an answer with no address".into());
        }
        self.stats.dns_answers.fetch_add(1, Ordering::Relaxed);
        let applied = self.apply(Update::Reset(
            addrs.iter().map(EndpointConfig::new).collect(),
        ));
        if !applied.is_empty() {
            tracing::info!(cluster = %self.name, host = %dns.host, added = applied.added, removed = applied.removed, endpoints = addrs.len(), "DNS changed the endpoints");
        }
        Ok(answer
            .valid_until()
            .saturating_duration_since(std::time::Instant::now()))
    }
}
