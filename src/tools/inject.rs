//! `agentmesh inject`: adds the sidecar to the workloads of a manifest, as
//! `linkerd inject` does. Every Deployment, StatefulSet, DaemonSet,
//! ReplicaSet or Job gets, in its pod template:
//!
//! - the sidecar as a native sidecar (an init container with
//!   `restartPolicy: Always`: it starts before the app's containers and
//!   stops after them), first among the init containers, with its probes,
//!   its config from the `agentmesh` ConfigMap and the pod's identity in
//!   its environment;
//! - with `--transparent`, before it, the init container that installs the
//!   iptables rules (`agentmesh init-iptables`, NET_ADMIN and NET_RAW), and
//!   the sidecar runs as the user those rules except; without it, every app
//!   container gets `grpc_proxy` and `https_proxy` (proxy mode);
//! - the label `agentmesh.io/mesh: "true"` (the gossip seeds' Service
//!   selects it) and the `prometheus.io/*` annotations.
//!
//! Other documents pass through unchanged; a workload that has the sidecar
//! already is left as it is.

use serde_json::{Value, json};

/// What `inject` adds.
#[derive(Clone, Debug)]
pub struct Inject {
    pub image: String,
    pub transparent: bool,
    /// The ConfigMap holding `agentmesh.toml`.
    pub config_map: String,
    /// The sidecar's user id (transparent mode's rules except it).
    pub proxy_uid: u32,
}

const KINDS: [&str; 5] = [
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Job",
];
const SIDECAR: &str = "agentmesh";
const INIT: &str = "agentmesh-init";

impl Inject {
    /// The manifest (YAML, one or more documents) with the sidecar added,
    /// and what was done to each workload, for the operator.
    pub fn run(&self, manifest: &str) -> Result<(String, Vec<String>), String> {
        let docs: Vec<Value> = serde_saphyr::from_multiple(manifest)
            .map_err(|e| format!("the input is not YAML: {e}"))?;
        let mut report = Vec::new();
        let mut out = Vec::new();
        for mut doc in docs {
            if doc.is_null() {
                continue;
            }
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            let name = doc["metadata"]["name"].as_str().unwrap_or("?").to_string();
            if KINDS.contains(&kind.as_str()) {
                let template = doc
                    .pointer_mut("/spec/template")
                    .filter(|t| t.is_object())
                    .ok_or_else(|| format!("{kind} {name}: no spec.template"))?;
                report.push(match self.add_to(template) {
                    true => format!("{kind}/{name}: sidecar added"),
                    false => format!("{kind}/{name}: has the sidecar already; unchanged"),
                });
            }
            out.push(serde_saphyr::to_string(&doc).map_err(|e| e.to_string())?);
        }
        Ok((out.join("---\n"), report))
    }

    /// Adds the sidecar to a pod template; `false` if it has it already.
    fn add_to(&self, template: &mut Value) -> bool {
        let spec = object(template, "spec");
        let has = |list: &Value| {
            list.as_array()
                .is_some_and(|l| l.iter().any(|c| c["name"] == SIDECAR))
        };
        if has(&spec["initContainers"]) || has(&spec["containers"]) {
            return false;
        }
        let mut init = Vec::new();
        if self.transparent {
            init.push(self.iptables_init());
        }
        init.push(self.sidecar());
        if let Some(Value::Array(existing)) = spec.get("initContainers") {
            init.extend(existing.iter().cloned());
        }
        spec["initContainers"] = Value::Array(init);
        let volumes = array(spec, "volumes");
        volumes
            .push(json!({ "name": "agentmesh-config", "configMap": { "name": self.config_map } }));
        if !self.transparent {
            for container in array(spec, "containers") {
                let env = array(container, "env");
                for (name, value) in [
                    ("grpc_proxy", "http://127.0.0.1:15001"),
                    ("https_proxy", "http://127.0.0.1:15001"),
                    ("no_proxy", "localhost,127.0.0.1"),
                ] {
                    if !env.iter().any(|e| e["name"] == name) {
                        env.push(json!({ "name": name, "value": value }));
                    }
                }
            }
        }
        let metadata = object(template, "metadata");
        object(metadata, "labels")["agentmesh.io/mesh"] = json!("true");
        let annotations = object(metadata, "annotations");
        for (k, v) in [
            ("prometheus.io/scrape", "true"),
            ("prometheus.io/port", "15000"),
            ("prometheus.io/path", "/metrics"),
        ] {
            annotations[k] = json!(v);
        }
        true
    }

    fn sidecar(&self) -> Value {
        let mut env = vec![
            json!({ "name": "POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } }),
            json!({ "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }),
            json!({ "name": "POD_NAMESPACE", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } }),
            json!({ "name": "AGENTMESH_MESH_KEY", "valueFrom": { "secretKeyRef": { "name": "agentmesh-mesh-key", "key": "key" } } }),
        ];
        if self.transparent {
            env.push(json!({ "name": "AGENTMESH_TRANSPARENT", "value": "127.0.0.1:15006" }));
        }
        json!({
            "name": SIDECAR,
            "image": self.image,
            "restartPolicy": "Always",
            "args": ["run", "--config", "/etc/agentmesh/agentmesh.toml"],
            "ports": [
                { "name": "am-admin", "containerPort": 15000 },
                { "name": "am-gossip", "containerPort": 15002, "protocol": "UDP" },
            ],
            "env": env,
            "startupProbe": { "httpGet": { "path": "/ready", "port": 15000 }, "periodSeconds": 1, "failureThreshold": 30 },
            "readinessProbe": { "httpGet": { "path": "/ready", "port": 15000 } },
            "livenessProbe": { "httpGet": { "path": "/live", "port": 15000 } },
            "securityContext": {
                "runAsUser": self.proxy_uid,
                "runAsNonRoot": true,
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": { "drop": ["ALL"] },
            },
            "resources": {
                "requests": { "cpu": "50m", "memory": "32Mi" },
                "limits": { "cpu": "1", "memory": "128Mi" },
            },
            "volumeMounts": [{ "name": "agentmesh-config", "mountPath": "/etc/agentmesh", "readOnly": true }],
        })
    }

    fn iptables_init(&self) -> Value {
        json!({
            "name": INIT,
            "image": self.image,
            "args": [
                "init-iptables", "--proxy-uid", self.proxy_uid.to_string(),
                "--port", "15006", "--exclude-ports", "15000,15002",
            ],
            "securityContext": {
                "runAsUser": 0,
                "runAsNonRoot": false,
                "allowPrivilegeEscalation": false,
                "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] },
            },
            "resources": {
                "requests": { "cpu": "10m", "memory": "16Mi" },
                "limits": { "cpu": "100m", "memory": "64Mi" },
            },
        })
    }
}

/// `value[key]` as an object, made one if absent or null.
fn object<'a>(value: &'a mut Value, key: &str) -> &'a mut Value {
    let slot = &mut value[key];
    if !slot.is_object() {
        *slot = json!({});
    }
    slot
}

/// `value[key]` as an array, made one if absent or null.
fn array<'a>(value: &'a mut Value, key: &str) -> &'a mut Vec<Value> {
    let slot = &mut value[key];
    if !slot.is_array() {
        *slot = json!([]);
    }
    match slot {
        Value::Array(a) => a,
        _ => unreachable!("just made an array"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: app\nspec:\n  selector:\n    matchLabels: { app: app }\n  template:\n    metadata:\n      labels: { app: app }\n    spec:\n      containers:\n        - name: app\n          image: app\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: app\nspec:\n  ports: [{ port: 80 }]\n";

    fn inject(transparent: bool) -> Inject {
        Inject {
            image: "agentmesh:dev".into(),
            transparent,
            config_map: "agentmesh".into(),
            proxy_uid: 2102,
        }
    }

    #[test]
    fn adds_the_sidecar_once_and_leaves_other_documents_alone() {
        let (out, report) = inject(false).run(APP).unwrap();
        assert_eq!(report, vec!["Deployment/app: sidecar added"]);
        let docs: Vec<Value> = serde_saphyr::from_multiple(&out).unwrap();
        let pod = &docs[0]["spec"]["template"];
        assert_eq!(pod["spec"]["initContainers"][0]["name"], "agentmesh");
        assert_eq!(pod["spec"]["initContainers"][0]["restartPolicy"], "Always");
        assert_eq!(pod["metadata"]["labels"]["agentmesh.io/mesh"], "true");
        assert_eq!(pod["spec"]["containers"][0]["env"][0]["name"], "grpc_proxy");
        assert_eq!(docs[1]["kind"], "Service");
        assert_eq!(docs[1]["spec"]["ports"][0]["port"], 80);

        let (again, report) = inject(false).run(&out).unwrap();
        assert_eq!(
            report,
            vec!["Deployment/app: has the sidecar already; unchanged"]
        );
        assert_eq!(again, out);
    }

    #[test]
    fn transparent_mode_puts_the_iptables_init_container_first() {
        let (out, _) = inject(true).run(APP).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&out).unwrap();
        let spec = &docs[0]["spec"]["template"]["spec"];
        assert_eq!(spec["initContainers"][0]["name"], "agentmesh-init");
        assert_eq!(spec["initContainers"][0]["args"][2], "2102");
        assert_eq!(
            spec["initContainers"][1]["securityContext"]["runAsUser"],
            2102
        );
        assert!(spec["containers"][0]["env"].is_null(), "no proxy variables");
    }
}
