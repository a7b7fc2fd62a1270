//! DNS discovery against a real DNS server: dnsmasq on a loopback port,
//! answering for `planner.test` from a hosts file the test rewrites, while
//! calls flow through the sidecar.

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agentmesh::cluster::discovery::DnsConfig;
use agentmesh::tools::agent::{self, AgentOptions, AgentStats};
use support::*;

/// dnsmasq serving `hosts` on a loopback port, with a TTL of 1 s.
struct Dns {
    child: tokio::process::Child,
    addr: SocketAddr,
    hosts: PathBuf,
    _dir: tempfile::TempDir,
}

impl Dns {
    async fn start(names: &[(IpAddr, &str)]) -> Dns {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        write_hosts(&hosts, names);
        // A free UDP port on loopback (dnsmasq binds TCP on it too).
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = tokio::process::Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--user=root",
                "--local-ttl=1",
                "--log-facility=-",
                "--pid-file=",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--addn-hosts={}", hosts.display()))
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dnsmasq runs (Debian's dnsmasq-base; scripts/test installs it)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let up = eventually(Duration::from_secs(5), || {
            std::net::TcpStream::connect(addr).is_ok()
        })
        .await;
        assert!(up, "dnsmasq listens on {addr}");
        Dns {
            child,
            addr,
            hosts,
            _dir: dir,
        }
    }

    /// Rewrites the hosts file and has dnsmasq read it again (SIGHUP).
    fn answer(&self, names: &[(IpAddr, &str)]) {
        write_hosts(&self.hosts, names);
        let pid = self.child.id().unwrap().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap();
        assert!(sent.success());
    }
}

fn write_hosts(path: &Path, names: &[(IpAddr, &str)]) {
    let text: String = names.iter().map(|(ip, n)| format!("{ip} {n}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// Agents on 127.0.0.2, .3, .4 and .5 at one port (DNS gives addresses;
/// the port is the cluster's), named after their address.
async fn agents_on_one_port() -> (u16, Vec<IpAddr>, Agents) {
    let ips: Vec<IpAddr> = (2..=5)
        .map(|i| format!("127.0.0.{i}").parse().unwrap())
        .collect();
    for _ in 0..20 {
        let first = std::net::TcpListener::bind((ips[0], 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        drop(first);
        let mut agents = Agents {
            addrs: Vec::new(),
            stats: Vec::new(),
            names: Vec::new(),
        };
        let mut all = true;
        for ip in &ips {
            let stats = Arc::new(AgentStats::default());
            match agent::spawn(
                SocketAddr::new(*ip, port),
                AgentOptions::named(&ip.to_string()),
                stats.clone(),
            )
            .await
            {
                Ok((addr, _)) => {
                    agents.addrs.push(addr);
                    agents.stats.push(stats);
                    agents.names.push(ip.to_string());
                }
                Err(_) => all = false,
            }
        }
        if all {
            return (port, ips, agents);
        }
    }
    panic!("no port free on 127.0.0.2-5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_follow_the_dns_answer_under_200_calls_a_second_and_a_failed_answer_keeps_them() {
    bounded(Duration::from_secs(60), async {
        let (port, ips, _agents) = agents_on_one_port().await;
        let name = "planner.test";
        let refresh = Duration::from_secs(1);
        let dns = Dns::start(&[(ips[0], name), (ips[1], name), (ips[2], name)]).await;
        let mut cluster = planner(&[]);
        cluster.endpoints.clear();
        cluster.dns = Some(DnsConfig {
            host: name.into(),
            port,
            refresh,
            nameservers: vec![dns.addr],
        });
        let sidecar = sidecar(vec![cluster]).await;
        let router = sidecar.router().clone();
        let endpoints = || router.clusters()[0].endpoints().len();
        assert!(
            eventually(Duration::from_secs(5), || endpoints() == 3).await,
            "the first answer's three endpoints"
        );
        let client = planner_client(Way::LocalPort, &sidecar).await;
        let spread_before = spread(&client, 60, 4).await;
        assert_eq!(spread_before.len(), 3, "{spread_before:?}");

        let stop = Arc::new(AtomicBool::new(false));
        let log: Log = Arc::default();
        let load = paced_load(client.clone(), 200, 4_000, stop.clone(), log.clone());
        tokio::time::sleep(Duration::from_secs(1)).await;

        // A fourth address comes and the first goes, in one answer.
        let changed = std::time::Instant::now();
        dns.answer(&[(ips[1], name), (ips[2], name), (ips[3], name)]);
        let bound = refresh + Duration::from_secs(1);
        tokio::time::sleep(bound + Duration::from_secs(1)).await;

        // The name stops resolving: the last set stays.
        let failures =
            || agentmesh::cluster::ClusterStats::get(&router.clusters()[0].stats().dns_failures);
        dns.answer(&[]);
        assert!(eventually(Duration::from_secs(5), || failures() >= 1).await);
        let failing = std::time::Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(endpoints(), 3, "a failed answer emptied the cluster");
        stop.store(true, Ordering::Relaxed);
        load.await.unwrap();

        let log = log.lock().unwrap().clone();
        let failed: Vec<_> = log.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "calls failed while endpoints changed: {failed:?}"
        );
        let answered = |agent: IpAddr| {
            let name = agent.to_string();
            move |r: &&(std::time::Instant, Result<String, String>)| {
                r.1.as_deref() == Ok(name.as_str())
            }
        };
        let first_to_new = log
            .iter()
            .filter(answered(ips[3]))
            .map(|(at, _)| at.saturating_duration_since(changed))
            .min()
            .expect("the added agent got calls");
        assert!(
            first_to_new <= bound,
            "the added agent's first call came {first_to_new:?} after the change"
        );
        let late_to_removed = log
            .iter()
            .filter(answered(ips[0]))
            .filter(|(at, _)| *at > changed + bound)
            .count();
        assert_eq!(
            late_to_removed, 0,
            "the removed agent got calls after dns_refresh + 1 s"
        );
        let after_failure: BTreeMap<String, usize> = log
            .iter()
            .filter(|(at, _)| *at > failing)
            .fold(BTreeMap::new(), |mut m, (_, r)| {
                *m.entry(r.clone().unwrap()).or_insert(0) += 1;
                m
            });
        assert_eq!(
            after_failure.len(),
            3,
            "the last set serves while the name fails: {after_failure:?}"
        );
        eprintln!(
            "{} calls at 200/s; the added agent's first call {first_to_new:?} after the change",
            log.len()
        );

        let metrics = admin_get(sidecar.admin_addr(), "/metrics").await;
        assert!(
            metrics.contains("agentmesh_cluster_dns_failures_total{cluster=\"planner.agents\"}"),
            "{metrics}"
        );
    })
    .await;
}

#[test]
fn a_dns_cluster_is_checked_by_key() {
    let file = Path::new("/etc/agentmesh/mesh.toml");
    let parse = |text: &str| {
        agentmesh::config::Config::parse(file, text, &|_| None).map_err(|e| e.to_string())
    };
    let ok = parse(
        "[resolver]\nnameservers = [\"127.0.0.1:5353\", \"10.0.0.10\"]\n\
         [[cluster]]\nname = \"planner\"\ndns = \"planner.agents.svc.cluster.local:50051\"\n",
    )
    .unwrap();
    let dns = ok.clusters[0].dns.as_ref().unwrap();
    assert_eq!(dns.port, 50051);
    assert_eq!(dns.refresh, Duration::from_secs(5));
    assert_eq!(
        dns.nameservers,
        [
            "127.0.0.1:5353".parse().unwrap(),
            "10.0.0.10:53".parse().unwrap()
        ]
    );
    for (text, key, reason) in [
        (
            "[[cluster]]\nname = \"p\"\ndns = \"planner:50051\"\nendpoints = [{ address = \"127.0.0.1:1\" }]\n",
            "cluster[0].dns",
            "not both",
        ),
        (
            "[[cluster]]\nname = \"p\"\ndns = \"planner\"\n",
            "cluster[0].dns",
            "not a DNS name and port",
        ),
        (
            "[[cluster]]\nname = \"p\"\ndns = \"planner:50051\"\ndns_refresh = \"1ms\"\n",
            "cluster[0].dns_refresh",
            "from 100ms",
        ),
        (
            "[resolver]\nnameservers = [\"dns.example\"]\n[[cluster]]\nname = \"p\"\ndns = \"p:1\"\n",
            "resolver.nameservers[0]",
            "not an IP",
        ),
        (
            "[[cluster]]\nname = \"p\"\n",
            "cluster[0].endpoints",
            "or a dns name",
        ),
    ] {
        let error = parse(text).expect_err(text);
        assert!(
            error.contains(key) && error.contains(reason),
            "{text}: {error}"
        );
    }
}
