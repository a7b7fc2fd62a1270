//! Transparent mode with real iptables, in a network namespace the test
//! creates: three agent processes on 10.200.0.2-4, the sidecar running as
//! another user (uid 65534), and `agentmesh init-iptables` redirecting
//! every other outbound TCP connection to its transparent port. A Python
//! grpcio client that dials one agent's address itself has its calls
//! balanced over all three; plain TCP, to an address a cluster claims or
//! to any other, reaches where it was going. Needs root (CI runs as root).

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use support::*;

const SIDECAR_UID: &str = "65534";

/// A network namespace whose loopback holds 10.200.0.1-7 too (addresses
/// that iptables' loopback exception, 127.0.0.0/8, does not cover), and
/// whose /etc/hosts names 10.200.0.7 `planner.test`; deleted when dropped.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        let name = format!("am-transparent-{}", std::process::id());
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        // `ip netns exec` mounts /etc/netns/NAME/hosts over /etc/hosts:
        // a Service-like name whose address no agent has.
        let etc = format!("/etc/netns/{name}");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            format!("{etc}/hosts"),
            "127.0.0.1 localhost\n10.200.0.7 planner.test\n",
        )
        .unwrap();
        let ns = Netns { name };
        run("ip", &["netns", "add", &ns.name]);
        ns.run("ip", &["link", "set", "lo", "up"]);
        for i in 1..=7 {
            ns.run(
                "ip",
                &["addr", "add", &format!("10.200.0.{i}/32"), "dev", "lo"],
            );
        }
        ns
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c.kill_on_drop(true);
        for proxy in [
            "grpc_proxy",
            "http_proxy",
            "https_proxy",
            "no_proxy",
            "NO_PROXY",
        ] {
            c.env_remove(proxy);
        }
        c
    }

    fn run(&self, program: &str, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Runs to the end inside the namespace: stdout, or a panic with
    /// stderr.
    async fn output(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> String {
        let out = self
            .command(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A GET on the sidecar's admin port inside the namespace, or `None`.
    async fn admin(&self, path: &str) -> Option<String> {
        let out = self
            .command("python3")
            .args([
                "-c",
                "import sys, urllib.request; print(urllib.request.urlopen('http://127.0.0.1:15000' + sys.argv[1], timeout=2).read().decode())",
                path,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .output()
            .await
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

fn run(program: &str, args: &[&str]) {
    let status = std::process::Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{program} runs (scripts/test installs iproute2 and iptables; the test needs root): {e}"));
    assert!(status.success(), "{program} {args:?}: {status}");
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_agentmesh")
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

fn counter(metrics: &str, kind: &str) -> u64 {
    let line = format!("agentmesh_transparent_connections_total{{kind=\"{kind}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line} in the metrics"))
}

/// The config, readable by the sidecar's user.
fn config(dir: &Path) -> PathBuf {
    let text = "[listener]\nproxy = \"127.0.0.1:15001\"\ntransparent = \"127.0.0.1:15006\"\n\
                [admin]\nlisten = \"127.0.0.1:15000\"\n\n\
                [[cluster]]\nname = \"planner.agents\"\n\
                match = [\"10.200.0.5:7007\", \"planner.test:50051\"]\n\
                endpoints = [{ address = \"10.200.0.2:50051\" }, { address = \"10.200.0.3:50051\" }, { address = \"10.200.0.4:50051\" }]\n";
    let file = dir.join("agentmesh.toml");
    std::fs::write(&file, text).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_grpc_is_balanced_over_every_agent_and_other_tcp_passes_through() {
    bounded(Duration::from_secs(120), async {
        let ns = Netns::new();
        let mut children = Vec::new();
        for (i, ip) in ["10.200.0.2", "10.200.0.3", "10.200.0.4"]
            .iter()
            .enumerate()
        {
            children.push(
                ns.command(bin())
                    .args([
                        "agent",
                        "--listen",
                        &format!("{ip}:50051"),
                        "--name",
                        &format!("a{i}"),
                    ])
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let file = config(dir.path());
        children.push(
            ns.command("setpriv")
                .args([
                    &format!("--reuid={SIDECAR_UID}"),
                    &format!("--regid={SIDECAR_UID}"),
                    "--clear-groups",
                    bin(),
                    "run",
                    "--no-watch",
                    "--config",
                ])
                .arg(&file)
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let mut ready = false;
        for _ in 0..100 {
            if ns.admin("/ready").await.is_some() {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ready, "the sidecar serves its admin port in the namespace");
        let python = python();
        let client = script("client.py");
        let client = client.to_str().unwrap();

        // Before the rules: the client reaches the one agent it dials.
        let direct: serde_json::Value = serde_json::from_str(
            &ns.output(&python, &[client, "10.200.0.2:50051", "30"])
                .await,
        )
        .unwrap();
        assert_eq!(
            direct["counts"],
            serde_json::json!({ "a0": 30 }),
            "{direct}"
        );

        let rules = ns
            .output(
                bin(),
                &[
                    "init-iptables",
                    "--proxy-uid",
                    SIDECAR_UID,
                    "--port",
                    "15006",
                ],
            )
            .await;
        let _ = rules;
        let listed = ns
            .output("iptables", &["-t", "nat", "-S", "AGENTMESH_OUTPUT"])
            .await;
        assert!(listed.contains("--uid-owner 65534 -j RETURN"), "{listed}");
        assert!(listed.contains("-j REDIRECT --to-ports 15006"), "{listed}");

        // The same client, the same target: now every agent answers.
        let balanced: serde_json::Value = serde_json::from_str(
            &ns.output(&python, &[client, "10.200.0.2:50051", "90"])
                .await,
        )
        .unwrap();
        eprintln!(
            "redirected, dialling 10.200.0.2:50051: {}",
            balanced["counts"]
        );
        assert_eq!(balanced["failures"], serde_json::json!([]), "{balanced}");
        for agent in ["a0", "a1", "a2"] {
            let n = balanced["counts"][agent].as_u64().unwrap_or(0);
            assert!(n >= 20, "{agent} answered {n} of 90: {balanced}");
        }
        assert_eq!(
            balanced["status"], "NOT_FOUND: no such plan",
            "an agent's status passes through: {balanced}"
        );

        // A name in `match`, as a Service's: the client dials
        // planner.test:50051, whose address (10.200.0.7) no agent has.
        let named: serde_json::Value = serde_json::from_str(
            &ns.output(&python, &[client, "planner.test:50051", "30"])
                .await,
        )
        .unwrap();
        eprintln!(
            "redirected, dialling planner.test:50051: {}",
            named["counts"]
        );
        assert_eq!(named["failures"], serde_json::json!([]), "{named}");
        for agent in ["a0", "a1", "a2"] {
            let n = named["counts"][agent].as_u64().unwrap_or(0);
            assert!(n >= 5, "{agent} answered {n} of 30 by name: {named}");
        }

        // Plain TCP, to an address the cluster's `match` claims (the first
        // bytes are not HTTP/2) and to one no cluster claims: echoed.
        let echo = script("echo.py");
        for (addr, message) in [
            ("10.200.0.5:7007", "hello-claimed"),
            ("10.200.0.6:7008", "hello-other"),
        ] {
            let out: serde_json::Value = serde_json::from_str(
                &ns.output(&python, &[echo.to_str().unwrap(), addr, message])
                    .await,
            )
            .unwrap();
            assert_eq!(out["back"], message, "{out}");
            assert_eq!(out["server_saw"], serde_json::json!([message]), "{out}");
        }

        let metrics = ns.admin("/metrics").await.expect("metrics");
        assert_eq!(
            counter(&metrics, "balanced"),
            2,
            "grpcio's one connection for each target"
        );
        assert_eq!(counter(&metrics, "passed_through"), 2);
        drop(children);
    })
    .await;
}
