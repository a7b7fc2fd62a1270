//! The deploy examples' sidecar config is valid, with and without the
//! environment the Compose file gives it.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_deploy_config_passes_check() {
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/agentmesh.toml");
    for env in [
        vec![],
        vec![
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
