//! `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`. Kubernetes runtimes pass
//! `K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_INFRA_CONTAINER_ID` and
//! `K8S_POD_UID`; other keys are ignored.

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub pod_uid: Option<String>,
}

/// The pod a Kubernetes runtime is adding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sPod<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub uid: Option<&'a str>,
}

impl CniArgs {
    /// Parses `raw`; an item without `=` is an error naming the item.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut out = Self::default();
        for item in raw.split(';').filter(|i| !i.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("CNI_ARGS item {item:?} is not KEY=VALUE"))?;
            let v = (!v.is_empty()).then(|| v.to_string());
            match k {
                "K8S_POD_NAME" => out.pod_name = v,
                "K8S_POD_NAMESPACE" => out.pod_namespace = v,
                "K8S_POD_UID" => out.pod_uid = v,
                _ => {}
            }
        }
        Ok(out)
    }

    /// The Kubernetes pod, when the runtime named one (name and namespace).
    pub fn k8s_pod(&self) -> Option<K8sPod<'_>> {
        Some(K8sPod {
            name: self.pod_name.as_deref()?,
            namespace: self.pod_namespace.as_deref()?,
            uid: self.pod_uid.as_deref(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubernetes_keys() {
        let a = CniArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=1234-5678",
        )
        .unwrap();
        let pod = a.k8s_pod().unwrap();
        assert_eq!(pod.name, "web-0");
        assert_eq!(pod.namespace, "demo");
        assert_eq!(pod.uid, Some("1234-5678"));
    }

    #[test]
    fn non_kubernetes_and_bad_items() {
        assert_eq!(CniArgs::parse("").unwrap().k8s_pod(), None);
        assert_eq!(CniArgs::parse("K8S_POD_NAME=a").unwrap().k8s_pod(), None);
        assert_eq!(
            CniArgs::parse("K8S_POD_NAME=a;K8S_POD_NAMESPACE=")
                .unwrap()
                .k8s_pod(),
            None
        );
        let e = CniArgs::parse("K8S_POD_NAME=a;garbage").unwrap_err();
        assert!(e.contains("garbage"));
    }
}
