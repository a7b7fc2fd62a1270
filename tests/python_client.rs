//! A caller in another language: Python's grpcio, configured only through
//! the `grpc_proxy` environment variable, dials `planner.agents:50051` and
//! its calls land on all three agents behind the sidecar.
//!
//! The interpreter is `$AGENTMESH_PYTHON`, or `.venv/bin/python` as made by
//! `scripts/python-env` (which `scripts/test` runs first).

mod support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_through_grpc_proxy_reaches_every_agent() {
    bounded(Duration::from_secs(120), async {
        let agents = Agents::start(3).await;
        let sidecar = sidecar(vec![planner(&agents.addrs)]).await;
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/client.py");
        let mut command = tokio::process::Command::new(python());
        command
            .arg(&script)
            .arg(TARGET)
            .arg("90")
            .env("grpc_proxy", format!("http://{}", sidecar.proxy_addr()))
            .env_remove("no_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_grpc_proxy")
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let out = command.output().await.expect("python runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "python failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout.lines().last().unwrap_or_default();
        for name in &agents.names {
            let needle = format!("\"{name}\": 30");
            assert!(
                line.contains(&needle),
                "want 30 calls on each agent ({needle}): {line}"
            );
        }
        assert!(line.contains("\"failures\": []"), "{line}");
        assert!(
            line.contains("\"status\": \"NOT_FOUND: no such plan\""),
            "{line}"
        );
        // The calls really went through the sidecar.
        let calls: u64 = sidecar.router().clusters()[0]
            .endpoints()
            .iter()
            .map(|e| e.stats().calls)
            .sum();
        assert_eq!(calls, 91);
    })
    .await;
}
