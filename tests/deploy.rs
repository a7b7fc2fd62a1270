//! The deploy examples' sidecar config is valid, with and without the
//! environment the Compose file gives it.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_deploy_config_passes_check() {
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/agentmesh.toml");
    let key = (
        "AGENTMESH_MESH_KEY",
        "YW4gYWdlbnRtZXNoIHRlc3Qga2V5IG9mIDMyIGJ5dGU=",
    );
    for env in [
        vec![key],
        vec![
            key,
            ("PLANNER_0", "planner-0:50051"),
            ("AGENTMESH_ADMIN", "0.0.0.0:15000"),
        ],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_agentmesh"))
            .args(["check", "--config"])
            .arg(&config)
            .envs(env)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.ends_with("ok (1 clusters, 3 endpoints)\n"),
            "{stdout}"
        );
    }
}

#[test]
fn the_deploy_config_refuses_to_gossip_without_its_key() {
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/agentmesh.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_agentmesh"))
        .args(["check", "--config"])
        .arg(&config)
        .env_remove("AGENTMESH_MESH_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("mesh.key") && stderr.contains("AGENTMESH_MESH_KEY"),
        "{stderr}"
    );
}
