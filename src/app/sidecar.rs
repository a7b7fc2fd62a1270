//! The sidecar: binds every listener from a [`Config`], starts every
//! cluster, owns their tasks (restarted if they panic), and drains them on
//! shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::app::drain::Drain;
use crate::app::reload::Reloader;
use crate::cluster::Router;
use crate::config::Config;
use crate::mesh::Mesh;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::trace::Traces;
use crate::util::Task;
use crate::{admin, listener};

pub struct Sidecar {
    router: Arc<Router>,
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    local_addrs: Vec<(String, SocketAddr)>,
    drain: Drain,
    drain_timeout: Duration,
    mesh: Option<Arc<Mesh>>,
    /// Owns every cluster's tasks (their control loops, which own their
    /// endpoints' tasks) and applies reloaded configs.
    reloader: Arc<Reloader>,
    /// Every listener, the mesh and the reload triggers: dropped with the
    /// sidecar, after the drain.
    tasks: Vec<Task>,
}

impl Sidecar {
    /// Binds every listener and starts serving. Fails if a port cannot be
    /// bound, naming the config key.
    pub async fn start(config: &Config) -> anyhow::Result<Sidecar> {
        let router = Arc::new(Router::new(
            &config.clusters,
            config.locality.zone.as_deref(),
        ));
        let drain = Drain::new();

        if !config.listener.proxy.ip().is_loopback() && !config.listener.refuse_unknown {
            tracing::warn!(
                proxy = %config.listener.proxy,
                "the proxy port is reachable from other hosts and tunnels CONNECTs to any target; set listener.refuse_unknown = true unless that is meant"
            );
        }
        let proxy = bind(config.listener.proxy, "listener.proxy").await?;
        let proxy_addr = proxy.local_addr()?;
        let admin = bind(config.admin.listen, "admin.listen").await?;
        let admin_addr = admin.local_addr()?;
        let mut locals = Vec::new();
        for (i, cluster) in config.clusters.iter().enumerate() {
            if let Some(addr) = cluster.local_port {
                let key = format!("cluster[{i}].local_port");
                let listener = bind(addr, &key).await?;
                locals.push((cluster.name.clone(), listener));
            }
        }

        let transparent = match config.listener.transparent {
            Some(addr) => Some(bind(addr, "listener.transparent").await?),
            None => None,
        };
        let mut own = vec![proxy_addr, admin_addr];
        if let Some(t) = &transparent {
            own.push(t.local_addr()?);
        }
        for (_, listener) in &locals {
            own.push(listener.local_addr()?);
        }
        let ctx = Arc::new(listener::Context::new(
            router.clone(),
            &config.listener,
            own,
        ));

        let mesh = match &config.mesh {
            Some(m) => Some(Mesh::bind(m, router.clone(), config.locality.zone.as_deref()).await?),
            None => None,
        };

        let traces = Traces::start(&config.telemetry)?;
        let reloader = Arc::new(Reloader::start(config, router.clone(), traces.clone()));
        let metrics = Arc::new(Metrics::new(
            router.clone(),
            ctx.stats.clone(),
            mesh.clone(),
            traces,
            reloader.stats().clone(),
        ));

        let api = Arc::new(admin::api::AdminApi::new(
            router.clone(),
            reloader.clone(),
            config.admin.token.as_ref(),
        ));
        let grpc = admin::grpc_routes(api.clone()).await;

        let mut tasks = Vec::new();
        tasks.push(Task::supervised("proxy listener", {
            let (ctx, watch) = (ctx.clone(), drain.watch());
            move || listener::serve_proxy(proxy.clone(), ctx.clone(), watch.clone())
        }));
        tasks.push(Task::supervised("admin listener", {
            let (router, mesh, watch) = (router.clone(), mesh.clone(), drain.watch());
            let reloads = reloader.stats().clone();
            let header_timeout = config.listener.header_timeout;
            let idle_timeout = config.listener.idle_timeout;
            move || {
                admin::serve(
                    admin.clone(),
                    router.clone(),
                    mesh.clone(),
                    metrics.clone(),
                    reloads.clone(),
                    api.clone(),
                    grpc.clone(),
                    header_timeout,
                    idle_timeout,
                    watch.clone(),
                )
            }
        }));
        if let Some(listener) = transparent {
            tracing::info!(addr = %listener.local_addr()?, "transparent mode: taking connections redirected by iptables");
            let (ctx, watch) = (ctx.clone(), drain.watch());
            tasks.push(Task::supervised("transparent listener", move || {
                listener::serve_transparent(listener.clone(), ctx.clone(), watch.clone())
            }));
        }
        if let Some(mesh) = &mesh {
            tasks.push(mesh.start());
        }
        let mut local_addrs = Vec::new();
        for (name, listener) in locals {
            local_addrs.push((name.clone(), listener.local_addr()?));
            let slot = router
                .slot(&name)
                .context("a cluster with a local port is missing from the router")?;
            let (ctx, watch) = (ctx.clone(), drain.watch());
            tasks.push(Task::supervised("local port listener", move || {
                listener::serve_local(listener.clone(), slot.clone(), ctx.clone(), watch.clone())
            }));
        }
        tracing::info!(%proxy_addr, %admin_addr, clusters = router.clusters().len(), "agentmesh is serving");
        Ok(Sidecar {
            router,
            proxy_addr,
            admin_addr,
            local_addrs,
            drain,
            drain_timeout: config.listener.drain_timeout,
            mesh,
            reloader,
            tasks,
        })
    }

    /// Reloads the config from `path` on SIGHUP and, with `watch`, when the
    /// file changes (see [`crate::app::reload`]).
    pub async fn reload_from(&mut self, path: PathBuf, watch: bool) {
        self.reloader.remember(&path).await;
        self.tasks.push(Task::supervised("SIGHUP reload", {
            let (reloader, path) = (self.reloader.clone(), path.clone());
            move || reloader.clone().on_signal(path.clone())
        }));
        if watch {
            self.tasks.push(Task::supervised("config file watcher", {
                let reloader = self.reloader.clone();
                move || reloader.clone().on_change(path.clone())
            }));
        }
    }

    /// Applies a new config as a reload does.
    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The bound local port of the cluster named `name`.
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.local_addrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    /// The mesh, when `[mesh]` is configured.
    pub fn mesh(&self) -> Option<&Arc<Mesh>> {
        self.mesh.as_ref()
    }

    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Stops accepting, sends GOAWAY on every connection and waits for
    /// in-flight calls, up to the drain timeout. Returns whether every call
    /// finished in time.
    pub async fn shutdown(self) -> bool {
        tracing::info!(timeout = ?self.drain_timeout, "draining");
        let drained = self.drain.drain(self.drain_timeout).await;
        for task in self.tasks {
            task.stop().await;
        }
        self.reloader.stop().await;
        if drained {
            tracing::info!("drained; every in-flight call finished");
        } else {
            tracing::warn!(timeout = ?self.drain_timeout, "drain timeout passed with calls still in flight");
        }
        drained
    }
}

async fn bind(addr: SocketAddr, key: &str) -> anyhow::Result<Arc<TcpListener>> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("{key}: cannot listen on {addr}"))?;
    Ok(Arc::new(listener))
}
