//! Kubernetes discovery: a cluster whose endpoints are a Service's
//! EndpointSlices (`kubernetes = { service = "planner", namespace =
//! "agents", port = "grpc" }`), watched with kube-runtime's watcher: a
//! list, then a watch from its resourceVersion, listed again when the watch
//! breaks or its version is too old, with backoff.
//!
//! Each endpoint address is an endpoint at the named (or numbered) port,
//! in its slice's `zone`. Only endpoints whose `ready` condition is not
//! false are in the set: one that turns not ready, or terminating (a pod
//! being deleted: `ready` false, `serving` maybe still true), leaves it,
//! which is how a cluster drains an endpoint: no new call, its calls in
//! flight finish. Every change after the first full list is applied as one
//! [`Update::Reset`] of all slices together, so that a pod moving from one
//! slice to another is not removed and added again.
//!
//! The client is the one `kube` infers, as in any controller: in a pod, the
//! ServiceAccount's token and the API server's address from the
//! environment; elsewhere, `KUBECONFIG` or `~/.kube/config`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt as _, watcher};

use super::{Cluster, Update};
use crate::config::EndpointConfig;

/// A cluster's `kubernetes` table.
#[derive(Clone, Debug, PartialEq)]
pub struct KubernetesConfig {
    pub service: String,
    /// `None`: the client's default (the pod's own namespace).
    pub namespace: Option<String>,
    pub port: PortRef,
}

/// The endpoints' port: by the Service port's name, or a number.
#[derive(Clone, Debug, PartialEq)]
pub enum PortRef {
    Name(String),
    Number(u16),
}

/// The endpoint set that `slices` describe, sorted by address.
pub fn endpoints_of(
    slices: &BTreeMap<String, EndpointSlice>,
    port: &PortRef,
) -> Vec<EndpointConfig> {
    let mut out: Vec<EndpointConfig> = Vec::new();
    for slice in slices.values() {
        let number = match port {
            PortRef::Number(n) => Some(*n),
            PortRef::Name(name) => slice.ports.iter().flatten().find_map(|p| {
                (p.name.as_deref() == Some(name.as_str()))
                    .then_some(p.port)
                    .flatten()
                    .and_then(|n| u16::try_from(n).ok())
            }),
        };
        let Some(number) = number else { continue };
        for endpoint in &slice.endpoints {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !ready {
                continue;
            }
            for address in &endpoint.addresses {
                let address = if address.contains(':') {
                    format!("[{address}]:{number}")
                } else {
                    format!("{address}:{number}")
                };
                if out.iter().any(|e| e.address == address) {
                    continue;
                }
                let mut config = EndpointConfig::new(&address);
                config.zone = endpoint.zone.clone();
                out.push(config);
            }
        }
    }
    out.sort_by(|a, b| a.address.cmp(&b.address));
    out
}

impl Cluster {
    /// Follows the Service's EndpointSlices until the task is dropped.
    pub(crate) async fn watch_kubernetes(self: Arc<Self>, config: KubernetesConfig) {
        let client = loop {
            match kube::Client::try_default().await {
                Ok(c) => break c,
                Err(e) => {
                    self.stats.kubernetes_errors.fetch_add(1, Ordering::Relaxed);
                    self.stats.kubernetes_failing.store(true, Ordering::Relaxed);
                    tracing::error!(cluster = %self.name, error = %e, "no Kubernetes API client (in-cluster config or KUBECONFIG); trying again in 5 s");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        };
        let api: kube::Api<EndpointSlice> = match &config.namespace {
            Some(ns) => kube::Api::namespaced(client, ns),
            None => kube::Api::default_namespaced(client),
        };
        let selector = format!("kubernetes.io/service-name={}", config.service);
        let stream = watcher(api, watcher::Config::default().labels(&selector)).default_backoff();
        let mut stream = std::pin::pin!(stream);
        // The slices as last listed and watched; `listing` while a (re)list
        // is under way, whose slices replace them when it is done.
        let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
        let mut listing: Option<BTreeMap<String, EndpointSlice>> = None;
        let mut failing = false;
        while let Some(event) = stream.next().await {
            let changed = match event {
                Ok(watcher::Event::Init) => {
                    listing = Some(BTreeMap::new());
                    false
                }
                Ok(watcher::Event::InitApply(slice)) => {
                    if let Some(l) = listing.as_mut() {
                        l.insert(name_of(&slice), slice);
                    }
                    false
                }
                Ok(watcher::Event::InitDone) => {
                    slices = listing.take().unwrap_or_default();
                    true
                }
                Ok(watcher::Event::Apply(slice)) => {
                    slices.insert(name_of(&slice), slice);
                    true
                }
                Ok(watcher::Event::Delete(slice)) => {
                    slices.remove(&name_of(&slice));
                    true
                }
                Err(e) => {
                    self.stats.kubernetes_errors.fetch_add(1, Ordering::Relaxed);
                    self.stats.kubernetes_failing.store(true, Ordering::Relaxed);
                    if !failing {
                        tracing::warn!(cluster = %self.name, service = %config.service, error = %e, "watching EndpointSlices failed; keeping the last endpoints and trying again with backoff (logged once until it recovers)");
                    }
                    failing = true;
                    false
                }
            };
            if changed {
                if failing {
                    tracing::info!(cluster = %self.name, service = %config.service, "watching EndpointSlices again");
                }
                failing = false;
                self.stats
                    .kubernetes_failing
                    .store(false, Ordering::Relaxed);
                self.stats
                    .kubernetes_updates
                    .fetch_add(1, Ordering::Relaxed);
                let endpoints = endpoints_of(&slices, &config.port);
                let applied = self.apply(Update::Reset(endpoints));
                if !applied.is_empty() {
                    tracing::debug!(cluster = %self.name, ?applied, "EndpointSlices changed the endpoints");
                }
            }
        }
    }
}

fn name_of(slice: &EndpointSlice) -> String {
    slice.metadata.name.clone().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    fn slice(
        name: &str,
        port: i32,
        endpoints: &[(&str, Option<bool>, Option<&str>)],
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                name: Some("grpc".into()),
                port: Some(port),
                ..Default::default()
            }]),
            endpoints: endpoints
                .iter()
                .map(|(ip, ready, zone)| Endpoint {
                    addresses: vec![ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        serving: Some(true),
                        terminating: ready.map(|r| !r),
                    }),
                    zone: zone.map(String::from),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn ready_endpoints_of_every_slice_at_the_named_port_with_their_zone() {
        let mut slices = BTreeMap::new();
        slices.insert(
            "a".into(),
            slice(
                "a",
                50051,
                &[
                    ("10.0.0.1", Some(true), Some("z1")),
                    ("10.0.0.2", Some(false), None),
                ],
            ),
        );
        slices.insert(
            "b".into(),
            slice("b", 50051, &[("10.0.0.3", None, Some("z2"))]),
        );
        let got = endpoints_of(&slices, &PortRef::Name("grpc".into()));
        let got: Vec<(String, Option<String>)> =
            got.into_iter().map(|e| (e.address, e.zone)).collect();
        assert_eq!(
            got,
            vec![
                ("10.0.0.1:50051".into(), Some("z1".into())),
                ("10.0.0.3:50051".into(), Some("z2".into())),
            ],
            "the not-ready one is left out; an unknown readiness counts as ready"
        );
        assert!(endpoints_of(&slices, &PortRef::Name("http".into())).is_empty());
        assert_eq!(
            endpoints_of(&slices, &PortRef::Number(9000))[0].address,
            "10.0.0.1:9000"
        );
    }
}
