//! The resource types the double serves: one table drives discovery,
//! routing and storage.

/// One served resource (a group/version/plural).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceType {
    /// API group (`""` for the core group).
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Subresources served besides the object (`status`, `token`).
    pub subresources: &'static [&'static str],
    /// Only `create` (TokenReview): nothing is stored.
    pub create_only: bool,
}

impl ResourceType {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `PodList`.
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// `pods` or `daemonsets.apps` (as kubectl and error messages name it).
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn has_status(&self) -> bool {
        self.subresources.contains(&"status")
    }

    /// Discovery categories (`kubectl get all`).
    pub fn categories(&self) -> &'static [&'static str] {
        match (self.group, self.plural) {
            ("", "pods" | "services") | ("apps", "daemonsets" | "deployments") => &["all"],
            _ => &[],
        }
    }

    /// Verbs as advertised in discovery.
    pub fn verbs(&self) -> &'static [&'static str] {
        if self.create_only {
            &["create"]
        } else {
            &[
                "create", "delete", "get", "list", "patch", "update", "watch",
            ]
        }
    }

    /// The URL prefix of its group/version: `/api/v1` or `/apis/apps/v1`.
    pub fn gv_path(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }
}

#[allow(clippy::too_many_arguments)] // a table row
const fn rt(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    subresources: &'static [&'static str],
) -> ResourceType {
    ResourceType {
        group,
        version,
        plural,
        singular,
        kind,
        namespaced,
        short_names,
        subresources,
        create_only: false,
    }
}

/// Group and plural of the Istio AuthorizationPolicy custom resource (can be
/// left out to test clients against a cluster without the CRD).
pub const AUTHORIZATION_POLICY: (&str, &str) = ("security.istio.io", "authorizationpolicies");

/// Group and plural of the Istio PeerAuthentication custom resource (can be
/// left out like [`AUTHORIZATION_POLICY`]).
pub const PEER_AUTHENTICATION: (&str, &str) = ("security.istio.io", "peerauthentications");

/// Everything the double knows.
pub const ALL: &[ResourceType] = &[
    rt(
        "",
        "v1",
        "namespaces",
        "namespace",
        "Namespace",
        false,
        &["ns"],
        &["status"],
    ),
    rt("", "v1", "pods", "pod", "Pod", true, &["po"], &["status"]),
    rt(
        "",
        "v1",
        "services",
        "service",
        "Service",
        true,
        &["svc"],
        &["status"],
    ),
    rt(
        "",
        "v1",
        "serviceaccounts",
        "serviceaccount",
        "ServiceAccount",
        true,
        &["sa"],
        &["token"],
    ),
    rt(
        "",
        "v1",
        "nodes",
        "node",
        "Node",
        false,
        &["no"],
        &["status"],
    ),
    rt(
        "",
        "v1",
        "configmaps",
        "configmap",
        "ConfigMap",
        true,
        &["cm"],
        &[],
    ),
    rt("", "v1", "secrets", "secret", "Secret", true, &[], &[]),
    rt("", "v1", "events", "event", "Event", true, &["ev"], &[]),
    rt(
        "",
        "v1",
        "endpoints",
        "endpoints",
        "Endpoints",
        true,
        &["ep"],
        &[],
    ),
    rt(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "endpointslice",
        "EndpointSlice",
        true,
        &[],
        &[],
    ),
    rt(
        "apps",
        "v1",
        "daemonsets",
        "daemonset",
        "DaemonSet",
        true,
        &["ds"],
        &["status"],
    ),
    rt(
        "apps",
        "v1",
        "deployments",
        "deployment",
        "Deployment",
        true,
        &["deploy"],
        &["status"],
    ),
    rt(
        "events.k8s.io",
        "v1",
        "events",
        "event",
        "Event",
        true,
        &["ev"],
        &[],
    ),
    rt(
        "coordination.k8s.io",
        "v1",
        "leases",
        "lease",
        "Lease",
        true,
        &[],
        &[],
    ),
    rt(
        AUTHORIZATION_POLICY.0,
        "v1",
        AUTHORIZATION_POLICY.1,
        "authorizationpolicy",
        "AuthorizationPolicy",
        true,
        &["ap"],
        &[],
    ),
    rt(
        PEER_AUTHENTICATION.0,
        "v1",
        PEER_AUTHENTICATION.1,
        "peerauthentication",
        "PeerAuthentication",
        true,
        &["pa"],
        &[],
    ),
    ResourceType {
        group: "authentication.k8s.io",
        version: "v1",
        plural: "tokenreviews",
        singular: "tokenreview",
        kind: "TokenReview",
        namespaced: false,
        short_names: &[],
        subresources: &[],
        create_only: true,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_per_group_version() {
        let mut seen = std::collections::HashSet::new();
        for r in ALL {
            assert!(seen.insert((r.group, r.version, r.plural)), "{r:?}");
            assert_eq!(r.list_kind(), format!("{}List", r.kind));
        }
        let ds = ALL.iter().find(|r| r.plural == "daemonsets").unwrap();
        assert_eq!(ds.api_version(), "apps/v1");
        assert_eq!(ds.qualified(), "daemonsets.apps");
        assert_eq!(ds.gv_path(), "/apis/apps/v1");
    }
}
