//! The deploy examples are valid: the sidecar configs pass `check` (with
//! and without the environment Compose gives), every Kubernetes manifest
//! and `agentmesh inject`'s output pass PyPI's `kubernetes-validate`
//! (strict: no unknown field) for a current Kubernetes.

mod support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The Kubernetes version the manifests are checked against.
const KUBERNETES: &str = "1.37.0";

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

fn kubernetes_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

/// `kubernetes-validate --strict` over `files`: whether all passed, and
/// what it said.
fn validate(files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(support::python())
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--no-warn",
            "-k",
            KUBERNETES,
        ])
        .args(files)
        .output()
        .expect("kubernetes-validate runs (scripts/python-env installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(kubernetes_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_kubernetes_manifest_validates_strictly() {
    let files = manifests();
    let names: Vec<_> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "caller.yaml",
            "namespace.yaml",
            "planner.yaml",
            "prometheus-adapter.yaml",
            "rbac.yaml"
        ]
    );
    let (ok, said) = validate(&files);
    assert!(ok, "{said}");
    // 11 resources, each named as passed.
    assert_eq!(said.matches(" passed for resource ").count(), 11, "{said}");
    for kind in [
        "deployment/caller",
        "deployment/planner",
        "poddisruptionbudget/planner",
        "horizontalpodautoscaler/planner",
        "role/agentmesh-discovery",
        "serviceaccount/agentmesh",
    ] {
        assert!(said.contains(kind), "{kind}: {said}");
    }

    // The kustomization applies every manifest but the adapter's, and the
    // Kubernetes config.
    let kustomization =
        std::fs::read_to_string(kubernetes_dir().join("kustomization.yaml")).unwrap();
    for name in names.iter().filter(|n| *n != "prometheus-adapter.yaml") {
        assert!(
            kustomization.contains(&format!("- {name}")),
            "{name} is not in the kustomization"
        );
    }
    assert!(kustomization.contains("- agentmesh.toml"));

    // A misspelled field is caught: the check can fail.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(kubernetes_dir().join("planner.yaml"))
        .unwrap()
        .replace("minAvailable: 2", "minAvailible: 2");
    std::fs::write(&bad, text).unwrap();
    let (ok, said) = validate(&[bad]);
    assert!(!ok && said.contains("minAvailible"), "{said}");
}

#[test]
fn the_kubernetes_config_passes_check() {
    let out = Command::new(env!("CARGO_BIN_EXE_agentmesh"))
        .args(["check", "--config"])
        .arg(kubernetes_dir().join("agentmesh.toml"))
        .env(
            "AGENTMESH_MESH_KEY",
            "YW4gYWdlbnRtZXNoIHRlc3Qga2V5IG9mIDMyIGJ5dGU=",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn inject(args: &[&str], input: &str) -> (String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentmesh"))
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn inject_output_validates_in_both_modes() {
    let planner = std::fs::read_to_string(kubernetes_dir().join("planner.yaml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (mode, args) in [("proxy", vec![]), ("transparent", vec!["--transparent"])] {
        let (out, report) = inject(&args, &planner);
        assert_eq!(report, "Deployment/planner: sidecar added\n", "{mode}");
        let file: &Path = &dir.path().join(format!("{mode}.yaml"));
        std::fs::write(file, &out).unwrap();
        let (ok, said) = validate(&[file.to_path_buf()]);
        assert!(ok, "{mode}: {said}\n{out}");
        assert_eq!(
            said.matches(" passed for resource ").count(),
            4,
            "{mode}: {said}"
        );
        assert!(
            out.contains("restartPolicy: Always"),
            "{mode}: a native sidecar"
        );
        assert_eq!(out.contains("NET_ADMIN"), mode == "transparent", "{mode}");
        assert_eq!(out.contains("grpc_proxy"), mode == "proxy", "{mode}");
        // Injecting again changes nothing.
        let (again, report) = inject(&args, &out);
        assert_eq!(again, out, "{mode}");
        assert!(
            report.contains("has the sidecar already"),
            "{mode}: {report}"
        );
    }
}
