//! Kubernetes objects: namespaces and pods in the API double, read back or changed
//! with real `kubectl`.

use std::process::Command;

use serde_json::{Value, json};

use super::{Env, REDIRECTION};

impl Env {
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubectl_config)
            .args(args)
            .output()
            .expect("run kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn create_namespace(&self, name: &str, labels: Value) {
        self.api
            .create(json!({"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": name, "labels": labels}}))
            .unwrap();
    }

    pub fn pod_object(&self, namespace: &str, name: &str) -> Value {
        self.api
            .get("v1", "Pod", Some(namespace), name)
            .unwrap_or(Value::Null)
    }

    pub fn annotation(&self, namespace: &str, name: &str) -> Option<String> {
        self.pod_object(namespace, name)
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(REDIRECTION))
            .and_then(Value::as_str)
            .map(str::to_string)
    }
}
