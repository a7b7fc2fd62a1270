//! TLS and mutual TLS to endpoints: real agents serving TLS 1.3 (rustls),
//! with certificates made in the test (rcgen).

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use agentmesh::config::Config;
use agentmesh::endpoint::tls::TlsConfig;
use agentmesh::tools::agent::{AgentOptions, server_tls};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use support::*;
use tonic::Code;

const PLANNER_ID: &str = "spiffe://cluster.local/ns/agents/sa/planner";
const CALLER_ID: &str = "spiffe://cluster.local/ns/agents/sa/caller";

/// A test certificate authority.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate and its key (PEM) for these DNS and URI names.
    fn leaf(&self, dns: &[&str], uris: &[&str]) -> (String, String) {
        let mut params =
            CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.to_string().try_into().unwrap()));
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Agents that serve TLS with `cert`/`key`, asking callers for a
/// certificate from `client_ca` if given.
async fn tls_agents(
    prefix: &str,
    n: usize,
    dir: &Path,
    leaf: &(String, String),
    client_ca: Option<&Ca>,
) -> Agents {
    let cert = write(dir, "agent.pem", &leaf.0);
    let key = write(dir, "agent-key.pem", &leaf.1);
    let client_ca = client_ca.map(|ca| write(dir, "client-ca.pem", &ca.pem()));
    let tls = server_tls(&cert, &key, client_ca.as_deref()).unwrap();
    Agents::start_with(
        (0..n)
            .map(|i| AgentOptions {
                tls: Some(tls.clone()),
                ..AgentOptions::named(&format!("{prefix}-{i}"))
            })
            .collect(),
    )
    .await
}

fn tls_config(ca: PathBuf) -> TlsConfig {
    TlsConfig {
        ca,
        cert: None,
        key: None,
        server_name: None,
        identity: None,
        reload_every: Duration::from_millis(50),
    }
}

async fn tls_sidecar(agents: &Agents, tls: TlsConfig) -> agentmesh::app::Sidecar {
    let mut cluster = planner(&agents.addrs);
    cluster.tls = Some(tls);
    sidecar(vec![cluster]).await
}

/// `n` calls one after another: how many succeeded, and the last failure.
async fn calls(sidecar: &agentmesh::app::Sidecar, n: usize) -> (usize, Option<tonic::Status>) {
    let mut client = planner_client(Way::LocalPort, sidecar).await;
    let mut ok = 0;
    let mut failure = None;
    for _ in 0..n {
        match client.invoke(request(b"x")).await {
            Ok(_) => ok += 1,
            Err(status) => failure = Some(status),
        }
    }
    (ok, failure)
}

fn handshakes(agents: &Agents) -> u64 {
    agents
        .stats
        .iter()
        .map(|s| s.tls_handshakes.load(Ordering::Relaxed))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_reach_tls_agents_over_tls_checked_against_the_server_name() {
    bounded(Duration::from_secs(30), async {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("agents CA");
        let leaf = ca.leaf(&["planner.agents.svc"], &[]);
        let agents = tls_agents("agent", 3, dir.path(), &leaf, None).await;
        let ca_file = write(dir.path(), "ca.pem", &ca.pem());

        let sidecar = tls_sidecar(
            &agents,
            TlsConfig {
                server_name: Some("planner.agents.svc".into()),
                ..tls_config(ca_file.clone())
            },
        )
        .await;
        let client = planner_client(Way::LocalPort, &sidecar).await;
        let counts = spread(&client, 60, 4).await;
        assert_eq!(counts.len(), 3, "every TLS agent answered: {counts:?}");
        assert_eq!(counts.values().sum::<usize>(), 60);
        assert_eq!(handshakes(&agents), 3, "one TLS connection per agent");

        // The same agents without `tls`: plain HTTP/2 reaches none of them.
        let plain = sidecar_plain(&agents).await;
        let (ok, failure) = calls(&plain, 3).await;
        assert_eq!(ok, 0, "a TLS agent answered plain HTTP/2");
        assert_eq!(failure.unwrap().code(), Code::Unavailable);
    })
    .await;
}

async fn sidecar_plain(agents: &Agents) -> agentmesh::app::Sidecar {
    sidecar(vec![planner(&agents.addrs)]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_or_from_another_ca_is_refused_with_the_reason() {
    bounded(Duration::from_secs(30), async {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("agents CA");
        let agents = tls_agents(
            "agent",
            1,
            dir.path(),
            &ca.leaf(&["planner.agents.svc"], &[]),
            None,
        )
        .await;
        let ca_file = write(dir.path(), "ca.pem", &ca.pem());

        // The default name is the endpoint's host, 127.0.0.1, which the
        // certificate does not name.
        let sidecar = tls_sidecar(&agents, tls_config(ca_file.clone())).await;
        let (ok, failure) = calls(&sidecar, 2).await;
        assert_eq!(ok, 0);
        let failure = failure.unwrap();
        assert_eq!(failure.code(), Code::Unavailable);
        assert!(
            failure.message().contains("TLS handshake failed")
                && failure
                    .message()
                    .contains("not valid for name \"127.0.0.1\""),
            "{}",
            failure.message()
        );
        let tls = sidecar.router().clusters()[0].tls().unwrap().clone();
        assert!(tls.stats.handshake_failures.load(Ordering::Relaxed) >= 1);

        // A CA that did not sign the agent's certificate.
        let other = write(dir.path(), "other-ca.pem", &Ca::new("another CA").pem());
        let sidecar = tls_sidecar(
            &agents,
            TlsConfig {
                server_name: Some("planner.agents.svc".into()),
                ..tls_config(other)
            },
        )
        .await;
        let (ok, failure) = calls(&sidecar, 2).await;
        assert_eq!(ok, 0);
        let failure = failure.unwrap();
        assert!(
            failure.message().contains("UnknownIssuer"),
            "{}",
            failure.message()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_presents_the_clusters_certificate_and_checks_a_spiffe_identity() {
    bounded(Duration::from_secs(30), async {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("mesh CA");
        // As a mesh issues them: a SPIFFE ID and no DNS name.
        let agents = tls_agents(
            "agent",
            2,
            dir.path(),
            &ca.leaf(&[], &[PLANNER_ID]),
            Some(&ca),
        )
        .await;
        let ca_file = write(dir.path(), "ca.pem", &ca.pem());
        let (cert, key) = ca.leaf(&[], &[CALLER_ID]);
        let cert = write(dir.path(), "sidecar.pem", &cert);
        let key = write(dir.path(), "sidecar-key.pem", &key);
        let mutual = TlsConfig {
            cert: Some(cert),
            key: Some(key),
            identity: Some(PLANNER_ID.into()),
            ..tls_config(ca_file.clone())
        };

        let sidecar = tls_sidecar(&agents, mutual.clone()).await;
        let (ok, failure) = calls(&sidecar, 20).await;
        assert_eq!(ok, 20, "{failure:?}");
        let presented: u64 = agents
            .stats
            .iter()
            .map(|s| s.tls_client_certs.load(Ordering::Relaxed))
            .sum();
        assert_eq!(
            presented, 2,
            "the sidecar presented its certificate to each agent"
        );

        // Without a client certificate the agents refuse the connection.
        let sidecar = tls_sidecar(
            &agents,
            TlsConfig {
                identity: Some(PLANNER_ID.into()),
                ..tls_config(ca_file.clone())
            },
        )
        .await;
        let (ok, failure) = calls(&sidecar, 2).await;
        assert_eq!(ok, 0);
        assert_eq!(failure.unwrap().code(), Code::Unavailable);
        assert!(
            agents
                .stats
                .iter()
                .any(|s| s.tls_failures.load(Ordering::Relaxed) >= 1)
        );

        // An endpoint with another identity is refused, and the message
        // names both.
        let sidecar = tls_sidecar(
            &agents,
            TlsConfig {
                identity: Some("spiffe://cluster.local/ns/agents/sa/reviewer".into()),
                ..mutual
            },
        )
        .await;
        let (ok, failure) = calls(&sidecar, 2).await;
        assert_eq!(ok, 0);
        let message = failure.unwrap().message().to_string();
        assert!(
            message.contains("is not for spiffe://cluster.local/ns/agents/sa/reviewer")
                && message.contains(PLANNER_ID),
            "{message}"
        );
    })
    .await;
}

/// Points `dir/..data` at a new directory holding `files`, as the kubelet
/// updates a mounted Secret: one atomic rename of a symlink.
fn swap(dir: &Path, version: &str, files: &[(&str, &str)]) {
    let versioned = dir.join(version);
    std::fs::create_dir(&versioned).unwrap();
    for (name, text) in files {
        std::fs::write(versioned.join(name), text).unwrap();
        let link = dir.join(name);
        if !link.exists() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link).unwrap();
        }
    }
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_files_are_taken_for_new_connections_and_bad_ones_are_refused() {
    bounded(Duration::from_secs(40), async {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::create_dir(&secret).unwrap();
        let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
        // One agent already has a certificate from the new CA; the other
        // still has the old one.
        let rotated = tls_agents(
            "rotated",
            1,
            dir.path(),
            &new_ca.leaf(&["planner.agents.svc"], &[]),
            None,
        )
        .await;
        let old_dir = dir.path().join("old");
        std::fs::create_dir(&old_dir).unwrap();
        let old = tls_agents(
            "old",
            1,
            &old_dir,
            &old_ca.leaf(&["planner.agents.svc"], &[]),
            None,
        )
        .await;
        swap(&secret, "..v1", &[("ca.pem", &old_ca.pem())]);

        let agents = Agents {
            addrs: vec![old.addrs[0], rotated.addrs[0]],
            stats: vec![old.stats[0].clone(), rotated.stats[0].clone()],
            names: vec!["old".into(), "rotated".into()],
        };
        let sidecar = tls_sidecar(
            &agents,
            TlsConfig {
                server_name: Some("planner.agents.svc".into()),
                ..tls_config(secret.join("ca.pem"))
            },
        )
        .await;
        let tls = sidecar.router().clusters()[0].tls().unwrap().clone();
        let client = planner_client(Way::LocalPort, &sidecar).await;
        let before = spread(&client, 20, 2).await;
        assert_eq!(
            before.keys().collect::<Vec<_>>(),
            ["old-0"],
            "only the agent of the old CA is reachable: {before:?}"
        );

        // The Secret gains the new CA beside the old one.
        let bundle = format!("{}{}", old_ca.pem(), new_ca.pem());
        swap(&secret, "..v2", &[("ca.pem", &bundle)]);
        assert!(
            eventually(Duration::from_secs(5), || tls
                .stats
                .reloads
                .load(Ordering::Relaxed)
                == 1)
            .await,
            "the new bundle was not taken"
        );
        let mut both = false;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !both && tokio::time::Instant::now() < deadline {
            both = spread(&client, 20, 2).await.len() == 2;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            both,
            "the rotated agent was not reached after the bundle changed: {}",
            agentmesh::admin::stats(sidecar.router())
        );
        assert_eq!(
            agents.stats[0].connections.load(Ordering::Relaxed),
            1,
            "the open connection to the old agent was kept"
        );

        // A broken update (a truncated file) is refused, counted once, and
        // the last good files stay in use.
        swap(
            &secret,
            "..v3",
            &[("ca.pem", "-----BEGIN CERTIFICATE-----\nMIIB")],
        );
        assert!(
            eventually(Duration::from_secs(5), || {
                tls.stats.reload_failures.load(Ordering::Relaxed) == 1
            })
            .await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(tls.stats.reload_failures.load(Ordering::Relaxed), 1);
        assert_eq!(tls.stats.reloads.load(Ordering::Relaxed), 1);
        let after = spread(&client, 20, 2).await;
        assert_eq!(after.values().sum::<usize>(), 20);

        let metrics = admin_get(sidecar.admin_addr(), "/metrics").await;
        for line in [
            "agentmesh_tls_reloads_total{cluster=\"planner.agents\",result=\"ok\"} 1",
            "agentmesh_tls_reloads_total{cluster=\"planner.agents\",result=\"fail\"} 1",
        ] {
            assert!(metrics.contains(line), "{line} not in {metrics}");
        }
        let failed = metrics
            .lines()
            .find(|l| {
                l.starts_with(
                    "agentmesh_tls_handshakes_total{cluster=\"planner.agents\",result=\"fail\"}",
                )
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0);
        assert!(
            failed >= 1,
            "the handshakes refused before the rotation: {metrics}"
        );
    })
    .await;
}

fn parse(dir: &Path, tls: &str) -> Result<Config, String> {
    let file = dir.join("agentmesh.toml");
    let text = format!(
        "[[cluster]]\nname = \"planner\"\nendpoints = [{{ address = \"127.0.0.1:50051\" }}]\ntls = {tls}\n"
    );
    Config::parse(&file, &text, &|_| None).map_err(|e| e.to_string())
}

#[test]
fn tls_settings_are_checked_with_the_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("agents CA");
    write(dir.path(), "ca.pem", &ca.pem());
    let (cert, key) = ca.leaf(&[], &[CALLER_ID]);
    write(dir.path(), "cert.pem", &cert);
    write(dir.path(), "key.pem", &key);
    write(dir.path(), "other-key.pem", &ca.leaf(&[], &[]).1);

    // Relative paths are read from the config file's directory.
    let config = parse(
        dir.path(),
        r#"{ ca = "ca.pem", cert = "cert.pem", key = "key.pem" }"#,
    )
    .expect("a good tls table");
    assert_eq!(
        config.clusters[0].tls.as_ref().unwrap().ca,
        dir.path().join("ca.pem")
    );

    let cases = [
        (
            r#"{ ca = "missing.pem" }"#,
            "cluster[0].tls.ca",
            "cannot read",
        ),
        (
            r#"{ ca = "key.pem" }"#,
            "cluster[0].tls.ca",
            "holds no PEM certificate",
        ),
        (
            r#"{ ca = "ca.pem", cert = "cert.pem" }"#,
            "cluster[0].tls.key",
            "go together",
        ),
        (
            r#"{ ca = "ca.pem", cert = "cert.pem", key = "other-key.pem" }"#,
            "cluster[0].tls.key",
            "does not go with",
        ),
        (
            r#"{ ca = "ca.pem", identity = "planner" }"#,
            "cluster[0].tls.identity",
            "not a SPIFFE ID",
        ),
        (
            r#"{ ca = "ca.pem", server_name = "not a name" }"#,
            "cluster[0].tls.server_name",
            "not a DNS name",
        ),
        (
            r#"{ ca = "ca.pem", verify = false }"#,
            "verify",
            "unknown field",
        ),
    ];
    for (tls, key, reason) in cases {
        let error = parse(dir.path(), tls).expect_err(tls);
        assert!(
            error.contains("agentmesh.toml") && error.contains(key) && error.contains(reason),
            "{tls}: {error}"
        );
    }
}
