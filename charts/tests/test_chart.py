"""Offline tests of the geneva-mesh Helm chart (`make test-chart`).

What is checked, for the default values and every documented combination:
- the chart renders with real Helm (schema + templates), and every rendered
  object validates against the Kubernetes OpenAPI schemas (strict: unknown
  fields fail) for the oldest supported and a current Kubernetes version;
- API-server rules the JSON schemas do not express (SYS_ADMIN needs
  allowPrivilegeEscalation, selector/labels, volume and port references...);
- the security properties each container must keep per redirection mode
  (capabilities, hostPath allow-list, host network, read-only root...);
- probes, Prometheus annotations, rollout strategies, RBAC rules;
- every env var the chart sets is a name ARCHITECTURE.md defines for that
  program, and the full environment per container matches the golden files
  under golden/ (regenerate with UPDATE_GOLDEN=1);
- bad values are refused at install time (schema or template `fail`).

Run: python3 -m unittest discover -s charts/tests -v   (or make test-chart)
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import tempfile
import unittest
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

from chart_render import (
    COMPONENT_OF,
    NAMESPACE,
    REPO,
    Rendered,
    architecture_env_names,
    crd_objects,
    load_chart,
    render,
)

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE_GOLDEN = os.environ.get("UPDATE_GOLDEN") == "1"

# Kubernetes versions every object must validate against: the chart's minimum
# (Chart.yaml kubeVersion) and the kubectl/kind generation used here.
KUBE_VERSIONS = ("1.26", "1.32")

PEM_ROOT = """-----BEGIN CERTIFICATE-----
MIIBdzCCAR2gAwIBAgIUBcVv0xl4FVIBuDPu2lDRGZ3o9jAwCgYIKoZIzj0EAwIw
-----END CERTIFICATE-----"""

# Documented value combinations (charts/geneva-mesh/README.md).
COMBINATIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "geneve": {"ambient": {"redirectMode": "geneve"}},
    "inpod-no-dns-capture": {"ambient": {"dnsCapture": False}},
    "geneve-no-dns-capture": {"ambient": {"redirectMode": "geneve", "dnsCapture": False}},
    "no-ipv6-no-reconcile": {"ambient": {"ipv6": False, "reconcileIptablesOnStartup": False}},
    "native-nftables": {"ambient": {"nativeNftables": True}},
    "owned-cni-config": {"istioOwnedCNIConfig": True, "istioOwnedCNIConfigFileName": "00-mesh.conflist"},
    "custom-dirs": {
        "cniBinDir": "/home/kubernetes/bin",
        "cniConfDir": "/etc/cni/multus/net.d",
        "cniConfFileName": "10-calico.conflist",
        "cniNetnsDir": "/run/netns",
        "excludeNamespaces": ["kube-system", "monitoring"],
    },
    "enablement-selectors": {
        "ambient": {
            "enablementSelectors": [
                {"podSelector": {"matchLabels": {"mesh": "on"}}},
                {
                    "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["a"]}]},
                    "podSelector": {"matchExpressions": [{"key": "mesh", "operator": "DoesNotExist"}]},
                },
            ]
        }
    },
    "istiod-ca": {"ca": {"enabled": False}},
    "external-ca": {"ca": {"enabled": False}, "caAddress": "cert-manager-istio-csr.cert-manager.svc:443"},
    "ca-existing-secret": {"ca": {"existingSecret": "cacerts", "rootCert": PEM_ROOT}},
    "ca-ha": {"ca": {"replicas": 2, "priorityClassName": "system-cluster-critical"}},
    "no-discovery-local-config": {
        "ztunnel": {"kubernetesDiscovery": False, "localConfig": "workloads: []\nservices: []\n"}
    },
    "discovery-and-local-config": {"ztunnel": {"localConfig": "workloads: []\n"}},
    "istiod-xds": {
        "ca": {"enabled": False},
        "xdsAddress": "istiod.istio-system.svc:15012",
        "ztunnel": {"kubernetesDiscovery": False},
    },
    "istiod-xds-on-demand": {
        "ca": {"enabled": False},
        "xdsAddress": "istiod.istio-system.svc:15012",
        "xdsOnDemand": True,
        "ambient": {"dnsCapture": False},
        "ztunnel": {"kubernetesDiscovery": False},
    },
    "json-logs-debug": {"logAsJson": True, "logLevel": "debug,ztunnel::proxy=trace"},
    "images-and-scheduling": {
        "hub": "registry.example.com/mesh",
        "tag": "1.2.3",
        "imagePullPolicy": "Always",
        "imagePullSecrets": [{"name": "regcred"}],
        "ztunnel": {"image": "other.example.com/ztunnel@sha256:" + "a" * 64},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "mesh", "effect": "NoSchedule"}],
        "priorityClassName": "",
        "nodeAgent": {"readyPort": 18000, "metricsPort": 18014, "env": {"EXTRA_FLAG": "1"}},
    },
    "selinux-openshift": {
        "nodeAgent": {"seLinuxOptions": {"type": "spc_t"}},
        "ztunnel": {"seLinuxOptions": {"type": "spc_t"}},
    },
    "trust-domain-cluster": {
        "trustDomain": "prod.example.com",
        "multiCluster": {"clusterName": "east"},
        "network": "net1",
        "clusterDomain": "corp.local",
        "rootNamespace": "istio-config",
        "ztunnel": {
            "workerThreads": "50%",
            "peerCaCrl": {"enabled": True},
            "resources": {"limits": {"cpu": "1500m"}},
        },
    },
}

# Host paths each container may mount, per redirection mode. Anything else is
# a regression of the least-privilege design (README.md, "Mounts").
def allowed_host_paths(values: dict[str, Any]) -> dict[str, set[str]]:
    v = merged(values)
    # cniBinDir "" = automatic; these renders see Helm's default (non-GKE) version.
    agent = {v["cniBinDir"] or "/opt/cni/bin", v["cniConfDir"], v["cniNetnsDir"], "/var/run/istio-cni", "/run/xtables.lock", "/proc"}
    inpod = v["ambient"]["redirectMode"] == "inpod"
    agent.add("/var/run/ztunnel" if inpod else "/proc/sys/net")
    return {
        "node-agent": agent,
        "ztunnel": {"/var/run/ztunnel"} if inpod else set(),
        "node-agent ca": set(),
    }


EXPECTED_CAPS = {
    ("node-agent", "inpod"): {"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"},
    ("node-agent", "geneve"): {"NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"},
    ("ztunnel", "inpod"): {"NET_ADMIN", "SYS_ADMIN"},
    ("ztunnel", "geneve"): {"NET_ADMIN"},
    ("node-agent ca", "inpod"): set(),
    ("node-agent ca", "geneve"): set(),
}

_CHART: helm.Chart | None = None
_DEFAULTS: dict[str, Any] | None = None
_RENDERS: dict[str, Rendered] = {}


def chart() -> helm.Chart:
    global _CHART, _DEFAULTS
    if _CHART is None:
        _CHART = load_chart()
        _DEFAULTS = _CHART.values
    return _CHART


def merged(values: dict[str, Any]) -> dict[str, Any]:
    return chart().merge_values(copy.deepcopy(values))


def rendered(name: str) -> Rendered:
    if name not in _RENDERS:
        _RENDERS[name] = render(chart(), COMBINATIONS[name])
    return _RENDERS[name]


def mode_of(r: Rendered) -> str:
    return merged(r.values)["ambient"]["redirectMode"]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def containers_with_component(r: Rendered):
    for obj in r.workloads():
        for c in pod_spec(obj)["containers"]:
            key = (obj["kind"], obj["metadata"]["name"], c["name"])
            if key not in COMPONENT_OF:
                raise AssertionError(f"unexpected container {key}")
            yield obj, c, COMPONENT_OF[key]


class SchemaValidation(unittest.TestCase):
    """Every rendered object is a valid Kubernetes object."""

    def test_all_combinations_validate_against_kubernetes_schemas(self):
        for name in COMBINATIONS:
            r = rendered(name)
            self.assertTrue(r.objects, f"{name}: nothing rendered")
            for obj in r.objects:
                for version in KUBE_VERSIONS:
                    with self.subTest(combination=name, object=f"{obj['kind']}/{obj['metadata']['name']}", kube=version):
                        kubernetes_validate.validate(obj, version, strict=True)

    def test_crd_validates(self):
        crds = crd_objects(chart())
        self.assertEqual(
            sorted(c["metadata"]["name"] for c in crds),
            ["authorizationpolicies.security.istio.io", "peerauthentications.security.istio.io"],
        )
        for crd in crds:
            with self.subTest(crd=crd["metadata"]["name"]):
                for version in KUBE_VERSIONS:
                    kubernetes_validate.validate(crd, version, strict=True)
                self.assertEqual(crd["spec"]["scope"], "Namespaced")
                self.assertEqual(crd["spec"]["group"], "security.istio.io")
                storage = [v["name"] for v in crd["spec"]["versions"] if v["storage"]]
                self.assertEqual(storage, ["v1"])

    def test_helm_lint_has_no_warnings(self):
        report = helm.lint(os.fspath(REPO / "charts" / "geneva-mesh"), strict=True, namespace=NAMESPACE)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        self.assertEqual(problems, [], report)
        self.assertEqual(report["errors"], [])


class ApiServerRules(unittest.TestCase):
    """Checks the API server performs that JSON schemas cannot express."""

    def test_semantic_rules(self):
        for name in COMBINATIONS:
            r = rendered(name)
            with self.subTest(combination=name):
                self._check(r)

    def _check(self, r: Rendered):
        names = {(o["kind"], o["metadata"]["name"]) for o in r.objects}
        self.assertEqual(len(names), len(r.objects), "duplicate object names")
        service_accounts = {n for k, n in names if k == "ServiceAccount"}
        config_maps = {n for k, n in names if k == "ConfigMap"}
        for obj in r.objects:
            where = f"{obj['kind']}/{obj['metadata']['name']}"
            if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
                self.assertEqual(obj["metadata"].get("namespace"), NAMESPACE, where)
            self.assertEqual(obj["metadata"]["labels"].get("app.kubernetes.io/part-of"), "geneva-mesh", where)
        for obj in r.workloads():
            where = f"{obj['kind']}/{obj['metadata']['name']}"
            spec = obj["spec"]
            selector = spec["selector"]["matchLabels"]
            labels = spec["template"]["metadata"]["labels"]
            for k, v in selector.items():
                self.assertEqual(labels.get(k), v, f"{where}: selector does not match template labels")
            strategy = spec.get("updateStrategy") or spec.get("strategy")
            ru = strategy["rollingUpdate"]
            self.assertFalse(
                ru.get("maxSurge", 0) == 0 and ru.get("maxUnavailable", 1) == 0,
                f"{where}: maxSurge and maxUnavailable both 0",
            )
            pod = pod_spec(obj)
            self.assertIn(pod["serviceAccountName"], service_accounts, where)
            volumes = [v["name"] for v in pod.get("volumes", [])]
            self.assertEqual(len(volumes), len(set(volumes)), f"{where}: duplicate volume names")
            for v in pod.get("volumes", []):
                if "configMap" in v:
                    cm = v["configMap"]["name"]
                    external = (cm == "istio-ca-root-cert" and not merged(r.values)["ca"]["enabled"]) or (
                        # Published by the operator's CA tooling; mounted optional.
                        cm == "istio-ca-crl" and v["configMap"].get("optional") is True
                    )
                    self.assertTrue(cm in config_maps or external, f"{where}: ConfigMap {cm} not rendered")
            for c in pod["containers"]:
                cw = f"{where} container {c['name']}"
                mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
                self.assertEqual(len(mounts), len(set(mounts)), f"{cw}: duplicate mount paths")
                for m in c.get("volumeMounts", []):
                    self.assertIn(m["name"], volumes, f"{cw}: mount of unknown volume")
                env_names = [e["name"] for e in c.get("env", [])]
                self.assertEqual(len(env_names), len(set(env_names)), f"{cw}: duplicate env {env_names}")
                port_names = [p["name"] for p in c.get("ports", [])]
                self.assertEqual(len(port_names), len(set(port_names)), cw)
                for p in port_names:
                    self.assertRegex(p, r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$", f"{cw}: port name")
                for ref in c.get("envFrom", []):
                    self.assertIn(ref["configMapRef"]["name"], config_maps, cw)
                sc = c["securityContext"]
                caps = set(sc.get("capabilities", {}).get("add", []))
                if sc.get("allowPrivilegeEscalation") is False:
                    # apiserver: "cannot set allowPrivilegeEscalation to false
                    # and privileged to true / capabilities.Add CAP_SYS_ADMIN"
                    self.assertFalse(sc.get("privileged"), cw)
                    self.assertFalse(caps & {"SYS_ADMIN", "CAP_SYS_ADMIN"}, cw)
                for probe in ("readinessProbe", "livenessProbe"):
                    if probe in c:
                        handler = c[probe].get("httpGet") or c[probe].get("tcpSocket")
                        self.assertIsNotNone(handler, f"{cw}: {probe} is neither httpGet nor tcpSocket")
                        declared = {p["containerPort"] for p in c.get("ports", [])} | set(port_names)
                        self.assertIn(handler["port"], declared, f"{cw}: {probe} on an undeclared port")
        for svc in (o for o in r.objects if o["kind"] == "Service"):
            target = r.find("Deployment", svc["spec"]["selector"]["app"])
            self.assertIsNotNone(target, "Service selects no workload")
            port_names = {p["name"] for c in pod_spec(target)["containers"] for p in c.get("ports", [])}
            for p in svc["spec"]["ports"]:
                self.assertIn(p["targetPort"], port_names)
        for binding in (o for o in r.objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
            role_kind = binding["roleRef"]["kind"]
            self.assertIn((role_kind, binding["roleRef"]["name"]), names)
            for s in binding["subjects"]:
                self.assertIn(s["name"], service_accounts)
                self.assertEqual(s["namespace"], NAMESPACE)


class SecurityProperties(unittest.TestCase):
    """Least privilege per container and mode (README.md "Privileges")."""

    def test_capabilities_per_component_and_mode(self):
        for name in COMBINATIONS:
            r = rendered(name)
            mode = mode_of(r)
            for obj, c, component in containers_with_component(r):
                with self.subTest(combination=name, component=component):
                    sc = c["securityContext"]
                    self.assertEqual(sc["capabilities"]["drop"], ["ALL"])
                    self.assertEqual(set(sc["capabilities"].get("add", [])), EXPECTED_CAPS[(component, mode)])
                    self.assertIs(sc["privileged"], False)
                    self.assertIs(sc["readOnlyRootFilesystem"], True)
                    seccomp = sc.get("seccompProfile") or pod_spec(obj).get("securityContext", {}).get("seccompProfile")
                    self.assertEqual(seccomp, {"type": "RuntimeDefault"})
                    caps = set(sc["capabilities"].get("add", []))
                    # Escalation stays off unless the API requires it.
                    self.assertEqual(sc["allowPrivilegeEscalation"], "SYS_ADMIN" in caps)

    def test_ca_runs_as_non_root(self):
        r = rendered("default")
        pod = pod_spec(r.get("Deployment", "mesh-ca"))
        self.assertIs(pod["securityContext"]["runAsNonRoot"], True)
        self.assertNotEqual(pod["securityContext"]["runAsUser"], 0)
        self.assertFalse(pod.get("hostNetwork", False))

    def test_host_network_only_for_node_agent(self):
        for name in COMBINATIONS:
            r = rendered(name)
            with self.subTest(combination=name):
                self.assertIs(pod_spec(r.get("DaemonSet", "node-agent"))["hostNetwork"], True)
                self.assertEqual(pod_spec(r.get("DaemonSet", "node-agent"))["dnsPolicy"], "ClusterFirstWithHostNet")
                self.assertFalse(pod_spec(r.get("DaemonSet", "ztunnel")).get("hostNetwork", False))
                for obj in r.workloads():
                    pod = pod_spec(obj)
                    self.assertFalse(pod.get("hostPID", False))
                    self.assertFalse(pod.get("hostIPC", False))

    def test_host_paths_are_the_allow_list(self):
        for name in COMBINATIONS:
            r = rendered(name)
            allowed = allowed_host_paths(r.values)
            for obj, c, component in containers_with_component(r):
                with self.subTest(combination=name, component=component):
                    volumes = {v["name"]: v for v in pod_spec(obj).get("volumes", [])}
                    paths = {
                        volumes[m["name"]]["hostPath"]["path"]
                        for m in c.get("volumeMounts", [])
                        if "hostPath" in volumes[m["name"]]
                    }
                    self.assertEqual(paths, allowed[component])
                    all_host = {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v}
                    self.assertEqual(all_host, allowed[component], "hostPath volumes not mounted by the container")

    def test_netns_dir_is_mounted_at_host_path_with_propagation(self):
        for name in ("default", "geneve", "custom-dirs"):
            r = rendered(name)
            netns_dir = merged(r.values)["cniNetnsDir"]
            c = r.container("DaemonSet", "node-agent", "node-agent")
            mount = next(m for m in c["volumeMounts"] if m["name"] == "cni-netns-dir")
            self.assertEqual(mount["mountPath"], netns_dir)
            self.assertEqual(mount["mountPropagation"], "HostToContainer")
            self.assertIs(mount["readOnly"], True)

    def test_host_proc_is_read_only_and_sysctls_writable_only_in_geneve(self):
        for name in ("default", "geneve"):
            r = rendered(name)
            c = r.container("DaemonSet", "node-agent", "node-agent")
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            env = r.env("DaemonSet", "node-agent", "node-agent")
            with self.subTest(combination=name):
                self.assertIs(mounts[env["HOST_PROC_DIR"]].get("readOnly"), True)
                sysctl = mounts.get(env["HOST_PROC_DIR"] + "/sys/net")
                if mode_of(r) == "geneve":
                    self.assertIsNotNone(sysctl)
                    self.assertFalse(sysctl.get("readOnly", False))
                else:
                    self.assertIsNone(sysctl)

    def test_ztunnel_never_sees_ca_key(self):
        for name in COMBINATIONS:
            r = rendered(name)
            pod = pod_spec(r.get("DaemonSet", "ztunnel"))
            with self.subTest(combination=name):
                self.assertFalse([v for v in pod["volumes"] if "secret" in v])
                token = next(v for v in pod["volumes"] if v["name"] == "istio-token")
                sat = token["projected"]["sources"][0]["serviceAccountToken"]
                self.assertEqual(sat["audience"], "istio-ca")
                self.assertEqual(pod["automountServiceAccountToken"], merged(r.values)["ztunnel"]["kubernetesDiscovery"])

    def test_rbac_rules_are_exact(self):
        def rules(r: Rendered, kind: str, name: str):
            return sorted(
                (tuple(x["apiGroups"]), tuple(sorted(x["resources"])), tuple(sorted(x["verbs"])), tuple(x.get("resourceNames", [])))
                for x in r.get(kind, name)["rules"]
            )

        r = rendered("default")
        self.assertEqual(
            rules(r, "ClusterRole", "geneva-mesh-node-agent"),
            sorted([
                (("",), ("namespaces", "pods"), ("get", "list", "watch"), ()),
                (("",), ("pods/status",), ("patch",), ()),
            ]),
        )
        self.assertEqual(
            rules(r, "Role", "node-agent"),
            [(("apps",), ("daemonsets",), ("get",), ("node-agent",))],
        )
        self.assertEqual(
            rules(r, "ClusterRole", "geneva-mesh-ztunnel"),
            sorted([
                (("",), ("nodes", "pods", "services"), ("get", "list", "watch"), ()),
                (("discovery.k8s.io",), ("endpointslices",), ("get", "list", "watch"), ()),
                (("security.istio.io",), ("authorizationpolicies", "peerauthentications"), ("get", "list", "watch"), ()),
            ]),
        )
        self.assertEqual(
            rules(r, "ClusterRole", "geneva-mesh-ca"),
            sorted([
                (("authentication.k8s.io",), ("tokenreviews",), ("create",), ()),
                (("",), ("pods",), ("get", "list", "watch"), ()),
            ]),
        )
        for name in COMBINATIONS:
            for obj in rendered(name).objects:
                if obj["kind"] in ("Role", "ClusterRole"):
                    for rule in obj["rules"]:
                        self.assertNotIn("*", rule["verbs"] + rule["resources"] + rule["apiGroups"])
                        self.assertNotIn("secrets", rule["resources"])

    def test_istiod_xds(self):
        r = rendered("istiod-xds")
        env = r.env("DaemonSet", "ztunnel", "istio-proxy")
        self.assertEqual(env["XDS_ADDRESS"], "istiod.istio-system.svc:15012")
        self.assertEqual(env["KUBERNETES_DISCOVERY"], "false")
        self.assertTrue(env["CA_ADDRESS"].startswith("https://istiod."), env["CA_ADDRESS"])
        self.assertEqual(env["CA_TOKEN_PATH"], "/var/run/secrets/tokens/istio-token")
        self.assertNotIn("LOCAL_XDS_PATH", env)
        # istiod authenticates the token: ztunnel needs no Kubernetes API access.
        self.assertIsNone(r.find("ClusterRole", "geneva-mesh-ztunnel"))
        self.assertIsNone(r.find("Deployment", "geneva-mesh-ca"))

    def test_istiod_xds_on_demand(self):
        env = rendered("istiod-xds-on-demand").env("DaemonSet", "ztunnel", "istio-proxy")
        self.assertEqual(env["XDS_ON_DEMAND"], "true")
        self.assertEqual(env["ISTIO_META_DNS_CAPTURE"], "false")
        self.assertNotIn("XDS_ON_DEMAND", rendered("istiod-xds").env("DaemonSet", "ztunnel", "istio-proxy"))

    def test_no_discovery_means_no_api_access_for_ztunnel(self):
        r = rendered("no-discovery-local-config")
        self.assertIsNone(r.find("ClusterRole", "geneva-mesh-ztunnel"))
        self.assertIsNone(r.find("ClusterRoleBinding", "geneva-mesh-ztunnel"))
        self.assertIs(pod_spec(r.get("DaemonSet", "ztunnel"))["automountServiceAccountToken"], False)
        env = r.env("DaemonSet", "ztunnel", "istio-proxy")
        self.assertEqual(env["KUBERNETES_DISCOVERY"], "false")
        self.assertEqual(env["LOCAL_XDS_PATH"], "/etc/ztunnel/local.yaml")
        cm = r.get("ConfigMap", "ztunnel-local-config")
        self.assertEqual(cm["data"]["local.yaml"], "workloads: []\nservices: []\n")


class Operations(unittest.TestCase):
    def test_probes_and_scrape_annotations(self):
        expected = {
            # component: (readiness path, readiness port, scrape port)
            "node-agent": ("/readyz", 8000, 15014),
            "ztunnel": ("/healthz/ready", 15021, 15020),
            "node-agent ca": ("/readyz", 8000, 15014),
        }
        for name in ("default", "geneve"):
            r = rendered(name)
            for obj, c, component in containers_with_component(r):
                path, port, scrape = expected[component]
                with self.subTest(combination=name, component=component):
                    self.assertEqual(c["readinessProbe"]["httpGet"], {"path": path, "port": port})
                    self.assertIn("livenessProbe", c)
                    ann = obj["spec"]["template"]["metadata"]["annotations"]
                    self.assertEqual(ann["prometheus.io/scrape"], "true")
                    self.assertEqual(ann["prometheus.io/port"], str(scrape))
                    self.assertIn(scrape, [p["containerPort"] for p in c["ports"]])
        r = rendered("images-and-scheduling")
        c = r.container("DaemonSet", "node-agent", "node-agent")
        self.assertEqual(c["readinessProbe"]["httpGet"]["port"], 18000)
        self.assertEqual(c["livenessProbe"]["tcpSocket"]["port"], 18000)
        env = r.env("DaemonSet", "node-agent", "node-agent")
        self.assertEqual((env["READY_PORT"], env["METRICS_PORT"]), ("18000", "18014"))
        self.assertEqual(r.get("DaemonSet", "node-agent")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"], "18014")

    def test_rollout_strategies(self):
        for name in ("default", "geneve"):
            r = rendered(name)
            with self.subTest(combination=name):
                agent = r.get("DaemonSet", "node-agent")["spec"]["updateStrategy"]
                self.assertEqual(agent, {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}})
                zt = r.get("DaemonSet", "ztunnel")["spec"]["updateStrategy"]
                self.assertEqual(zt, {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
                ca = r.get("Deployment", "mesh-ca")["spec"]["strategy"]["rollingUpdate"]
                self.assertEqual(ca, {"maxSurge": 1, "maxUnavailable": 0})

    def test_node_critical_and_tolerate_everything_by_default(self):
        r = rendered("default")
        for ds in ("node-agent", "ztunnel"):
            pod = pod_spec(r.get("DaemonSet", ds))
            self.assertEqual(pod["priorityClassName"], "system-node-critical")
            self.assertEqual(pod["tolerations"], [{"operator": "Exists"}])
        r = rendered("images-and-scheduling")
        for ds in ("node-agent", "ztunnel"):
            pod = pod_spec(r.get("DaemonSet", ds))
            self.assertNotIn("priorityClassName", pod)
            self.assertEqual(pod["tolerations"][0]["key"], "dedicated")
            self.assertEqual(pod["imagePullSecrets"], [{"name": "regcred"}])

    def test_images(self):
        r = rendered("default")
        self.assertEqual(r.container("DaemonSet", "node-agent", "node-agent")["image"], "localhost/geneva-mesh/node-agent:dev")
        self.assertEqual(r.container("DaemonSet", "ztunnel", "istio-proxy")["image"], "localhost/geneva-mesh/ztunnel:dev")
        self.assertEqual(r.container("Deployment", "mesh-ca", "ca")["image"], "localhost/geneva-mesh/node-agent:dev")
        self.assertEqual(r.container("Deployment", "mesh-ca", "ca")["args"], ["ca"])
        r = rendered("images-and-scheduling")
        self.assertEqual(r.container("DaemonSet", "node-agent", "node-agent")["image"], "registry.example.com/mesh/node-agent:1.2.3")
        self.assertTrue(r.container("DaemonSet", "ztunnel", "istio-proxy")["image"].startswith("other.example.com/ztunnel@sha256:"))
        self.assertEqual(r.container("DaemonSet", "ztunnel", "istio-proxy")["imagePullPolicy"], "Always")

    def test_config_change_rolls_node_agent(self):
        a = rendered("default").get("DaemonSet", "node-agent")["spec"]["template"]["metadata"]["annotations"]
        b = rendered("no-ipv6-no-reconcile").get("DaemonSet", "node-agent")["spec"]["template"]["metadata"]["annotations"]
        self.assertNotEqual(a["checksum/config"], b["checksum/config"])
        again = render(chart(), COMBINATIONS["default"]).get("DaemonSet", "node-agent")
        self.assertEqual(again["spec"]["template"]["metadata"]["annotations"]["checksum/config"], a["checksum/config"])

    def test_notes(self):
        notes = rendered("default").notes
        self.assertIn("kubectl label namespace <namespace> istio.io/dataplane-mode=ambient", notes)
        self.assertIn("TCP 15008", notes)
        self.assertIn("169.254.7.127", notes)
        self.assertNotIn("WARNING", notes)
        self.assertIn("ztunnel's DNS", notes)
        self.assertNotIn("ztunnel's DNS", rendered("inpod-no-dns-capture").notes)
        self.assertNotIn("169.254.7.127", rendered("geneve").notes)


class CertificateAuthority(unittest.TestCase):
    def _pem_of(self, text: str) -> str:
        out = subprocess.run(
            ["openssl", "x509", "-noout", "-text"], input=text, capture_output=True, text=True, check=True
        )
        return out.stdout

    def test_generated_root_is_consistent_and_private_key_stays_in_secret(self):
        import base64

        r = rendered("default")
        secret = r.get("Secret", "mesh-ca-certs")
        data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        self.assertEqual(sorted(data), ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"])
        cm = r.get("ConfigMap", "istio-ca-root-cert")
        self.assertEqual(cm["data"]["root-cert.pem"].strip(), data["root-cert.pem"].strip())
        self.assertEqual(data["ca-cert.pem"], data["root-cert.pem"])
        self.assertNotIn("PRIVATE KEY", cm["data"]["root-cert.pem"])
        text = self._pem_of(data["root-cert.pem"])
        self.assertIn("CA:TRUE", text)
        self.assertIn("Certificate Sign", text)
        self.assertIn("prime256v1", text)
        self.assertIn("geneva-mesh root CA (cluster.local)", text)
        # The key in the Secret is the certificate's key (SEC1 EC, as the CA reads it).
        self.assertIn("BEGIN EC PRIVATE KEY", data["ca-key.pem"])
        key_pub = subprocess.run(["openssl", "pkey", "-pubout"], input=data["ca-key.pem"],
                                 capture_output=True, text=True, check=True).stdout
        cert_pub = subprocess.run(["openssl", "x509", "-noout", "-pubkey"], input=data["ca-cert.pem"],
                                  capture_output=True, text=True, check=True).stdout
        self.assertEqual(key_pub, cert_pub)
        deploy = pod_spec(r.get("Deployment", "mesh-ca"))
        self.assertEqual(next(v for v in deploy["volumes"] if v["name"] == "cacerts")["secret"]["secretName"], "mesh-ca-certs")
        # Only the CA Deployment mounts a Secret.
        for obj in r.workloads():
            secrets = [v for v in pod_spec(obj).get("volumes", []) if "secret" in v]
            self.assertEqual(bool(secrets), obj["metadata"]["name"] == "mesh-ca", obj["metadata"]["name"])

    def test_existing_secret(self):
        r = rendered("ca-existing-secret")
        self.assertIsNone(r.find("Secret", "mesh-ca-certs"))
        self.assertEqual(r.get("ConfigMap", "istio-ca-root-cert")["data"]["root-cert.pem"].strip(), PEM_ROOT)
        deploy = pod_spec(r.get("Deployment", "mesh-ca"))
        self.assertEqual(next(v for v in deploy["volumes"] if v["name"] == "cacerts")["secret"]["secretName"], "cacerts")

    def test_ca_disabled_uses_istiod(self):
        r = rendered("istiod-ca")
        for kind, name in [("Deployment", "mesh-ca"), ("Service", "mesh-ca"), ("Secret", "mesh-ca-certs"),
                           ("ConfigMap", "istio-ca-root-cert"), ("ClusterRole", "geneva-mesh-ca")]:
            self.assertIsNone(r.find(kind, name), f"{kind}/{name} rendered with ca.enabled=false")
        self.assertEqual(r.env("DaemonSet", "ztunnel", "istio-proxy")["CA_ADDRESS"], "https://istiod.istio-system.svc:15012")
        r = rendered("external-ca")
        self.assertEqual(r.env("DaemonSet", "ztunnel", "istio-proxy")["CA_ADDRESS"], "cert-manager-istio-csr.cert-manager.svc:443")

    def test_ca_wiring(self):
        r = rendered("default")
        zt = r.env("DaemonSet", "ztunnel", "istio-proxy")
        ca = r.env("Deployment", "mesh-ca", "ca")
        self.assertEqual(zt["CA_ADDRESS"], "https://mesh-ca.istio-system.svc:15012")
        self.assertIn("mesh-ca.istio-system.svc", ca["CA_SERVER_DNS_NAMES"].split(","))
        self.assertEqual(ca["CA_TRUSTED_NODE_ACCOUNTS"], "istio-system/ztunnel")
        self.assertEqual(ca["TOKEN_AUDIENCES"], "istio-ca")
        self.assertEqual(ca["TRUST_DOMAIN"], zt["TRUST_DOMAIN"])
        svc = r.get("Service", "mesh-ca")
        self.assertEqual(svc["spec"]["ports"][0]["port"], 15012)
        self.assertIsNone(r.find("PodDisruptionBudget", "mesh-ca"))
        self.assertIsNotNone(rendered("ca-ha").find("PodDisruptionBudget", "mesh-ca"))


class Environment(unittest.TestCase):
    """The env each container gets: names from ARCHITECTURE.md, values golden."""

    def test_env_names_are_defined_in_architecture_md(self):
        defined = architecture_env_names()
        for component in ("ztunnel", "node-agent", "node-agent ca"):
            self.assertTrue(defined.get(component), f"ARCHITECTURE.md defines no env for {component}")
        for name in COMBINATIONS:
            r = rendered(name)
            extra = {
                component: set(merged(r.values)[key]["env"])
                for component, key in (("node-agent", "nodeAgent"), ("ztunnel", "ztunnel"), ("node-agent ca", "ca"))
            }
            for obj, c, component in containers_with_component(r):
                with self.subTest(combination=name, component=component):
                    env = set(r.env(obj["kind"], obj["metadata"]["name"], c["name"])) - extra[component]
                    self.assertEqual(env - defined[component], set(), "not in ARCHITECTURE.md")

    def test_mode_specific_env(self):
        inpod = rendered("default")
        geneve = rendered("geneve")
        a, g = inpod.env("DaemonSet", "node-agent", "node-agent"), geneve.env("DaemonSet", "node-agent", "node-agent")
        self.assertEqual((a["REDIRECT_MODE"], g["REDIRECT_MODE"]), ("inpod", "geneve"))
        self.assertEqual(a["ZTUNNEL_UDS"], "/var/run/ztunnel/ztunnel.sock")
        self.assertNotIn("ZTUNNEL_UDS", g)
        self.assertEqual((a["HOST_PROC_DIR"], g["HOST_PROC_DIR"]), ("/host/proc", "/host/proc"))
        za, zg = inpod.env("DaemonSet", "ztunnel", "istio-proxy"), geneve.env("DaemonSet", "ztunnel", "istio-proxy")
        self.assertEqual((za["INPOD_ENABLED"], zg["INPOD_ENABLED"]), ("true", "false"))
        self.assertEqual(za["INPOD_UDS"], a["ZTUNNEL_UDS"])
        self.assertNotIn("INPOD_UDS", zg)

    def test_values_reach_env(self):
        r = rendered("custom-dirs")
        env = r.env("DaemonSet", "node-agent", "node-agent")
        self.assertEqual(env["CNI_CONF_NAME"], "10-calico.conflist")
        self.assertEqual(env["EXCLUDE_NAMESPACES"], "kube-system,monitoring")
        # Host dirs are mounted at the fixed in-container paths the env names.
        c = r.container("DaemonSet", "node-agent", "node-agent")
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        self.assertEqual(mounts["cni-bin-dir"], env["CNI_BIN_DIR"])
        self.assertEqual(mounts["cni-net-dir"], env["CNI_CONF_DIR"])
        vols = {v["name"]: v for v in pod_spec(r.get("DaemonSet", "node-agent"))["volumes"]}
        self.assertEqual(vols["cni-bin-dir"]["hostPath"]["path"], "/home/kubernetes/bin")
        self.assertEqual(vols["cni-net-dir"]["hostPath"]["path"], "/etc/cni/multus/net.d")
        self.assertNotIn("CNI_CONF_NAME", rendered("default").env("DaemonSet", "node-agent", "node-agent"))
        env = rendered("owned-cni-config").env("DaemonSet", "node-agent", "node-agent")
        self.assertEqual((env["ISTIO_OWNED_CNI_CONFIG"], env["CHAINED_CNI_PLUGIN"]), ("true", "true"))
        env = rendered("default").env("DaemonSet", "node-agent", "node-agent")
        self.assertEqual(env["AMBIENT_DNS_CAPTURE"], "true")
        env = rendered("inpod-no-dns-capture").env("DaemonSet", "node-agent", "node-agent")
        self.assertEqual(env["AMBIENT_DNS_CAPTURE"], "false")
        env = rendered("no-ipv6-no-reconcile").env("DaemonSet", "node-agent", "node-agent")
        self.assertEqual((env["AMBIENT_IPV6"], env["AMBIENT_RECONCILE_POD_RULES_ON_STARTUP"]), ("false", "false"))
        r = rendered("json-logs-debug")
        for obj, c, _ in containers_with_component(r):
            env = r.env(obj["kind"], obj["metadata"]["name"], c["name"])
            self.assertEqual((env["LOG_FORMAT"], env["RUST_LOG"]), ("json", "debug,ztunnel::proxy=trace"))
        for obj, c, _ in containers_with_component(rendered("default")):
            self.assertNotIn("LOG_FORMAT", rendered("default").env(obj["kind"], obj["metadata"]["name"], c["name"]))
        r = rendered("trust-domain-cluster")
        self.assertEqual(r.env("DaemonSet", "ztunnel", "istio-proxy")["TRUST_DOMAIN"], "prod.example.com")
        self.assertEqual(r.env("DaemonSet", "ztunnel", "istio-proxy")["CLUSTER_ID"], "east")
        self.assertEqual(r.env("DaemonSet", "ztunnel", "istio-proxy")["NETWORK"], "net1")
        self.assertNotIn("NETWORK", rendered("default").env("DaemonSet", "ztunnel", "istio-proxy"))
        zt = r.env("DaemonSet", "ztunnel", "istio-proxy")
        self.assertEqual(
            (zt["CLUSTER_DOMAIN"], zt["ROOT_NAMESPACE"], zt["ZTUNNEL_WORKER_THREADS"]),
            ("corp.local", "istio-config", "50%"),
        )
        self.assertEqual(rendered("default").env("DaemonSet", "ztunnel", "istio-proxy")["ROOT_NAMESPACE"], "istio-system")
        # Worker threads: unset by default (ztunnel derives them from the CPU limit and
        # request, as upstream); the resource variables only when the values set them.
        default_zt = rendered("default").env("DaemonSet", "ztunnel", "istio-proxy")
        self.assertNotIn("ZTUNNEL_WORKER_THREADS", default_zt)
        self.assertNotIn("ZTUNNEL_RESOURCE_CPU_LIMIT", default_zt)
        self.assertEqual(default_zt["ZTUNNEL_RESOURCE_CPU_REQUEST"], "<resourceFieldRef:istio-proxy/requests.cpu>")
        self.assertEqual(zt["ZTUNNEL_RESOURCE_CPU_LIMIT"], "<resourceFieldRef:istio-proxy/limits.cpu>")
        # Revocation lists (ztunnel.peerCaCrl): CRL_PATH inside the optional istio-ca-crl ConfigMap.
        self.assertEqual(zt["CRL_PATH"], "/var/run/secrets/istio/crl/ca-crl.pem")
        c = r.container("DaemonSet", "ztunnel", "istio-proxy")
        self.assertIn({"name": "crl-volume", "mountPath": "/var/run/secrets/istio/crl", "readOnly": True}, c["volumeMounts"])
        vols = {v["name"]: v for v in pod_spec(r.get("DaemonSet", "ztunnel"))["volumes"]}
        self.assertEqual(vols["crl-volume"]["configMap"], {"name": "istio-ca-crl", "optional": True})
        self.assertNotIn("CRL_PATH", rendered("default").env("DaemonSet", "ztunnel", "istio-proxy"))
        self.assertEqual(r.env("Deployment", "mesh-ca", "ca")["TRUST_DOMAIN"], "prod.example.com")
        env = rendered("images-and-scheduling").env("DaemonSet", "node-agent", "node-agent")
        self.assertEqual(env["EXTRA_FLAG"], "1")
        # ambient.enablementSelectors: one line of JSON (which is YAML), the
        # list as given; the default is Istio's rule.
        env = rendered("enablement-selectors").env("DaemonSet", "node-agent", "node-agent")
        self.assertNotIn("\n", env["AMBIENT_ENABLEMENT_SELECTOR"])
        self.assertEqual(
            yaml.safe_load(env["AMBIENT_ENABLEMENT_SELECTOR"]),
            COMBINATIONS["enablement-selectors"]["ambient"]["enablementSelectors"],
        )
        env = rendered("default").env("DaemonSet", "node-agent", "node-agent")
        self.assertEqual(
            yaml.safe_load(env["AMBIENT_ENABLEMENT_SELECTOR"]),
            [
                {"podSelector": {"matchLabels": {"istio.io/dataplane-mode": "ambient"}}},
                {
                    "podSelector": {
                        "matchExpressions": [{"key": "istio.io/dataplane-mode", "operator": "NotIn", "values": ["none"]}]
                    },
                    "namespaceSelector": {"matchLabels": {"istio.io/dataplane-mode": "ambient"}},
                },
            ],
        )

    def test_priority_class_quota_on_gke(self):
        """GKE admits system-node-critical pods outside kube-system only with a
        ResourceQuota scoped to that class: without it neither DaemonSet gets a
        pod. auto = on GKE only; true/false override."""

        def quotas(values: dict[str, Any], kube_version: str) -> list[dict[str, Any]]:
            r = render(chart(), values, kube_version=kube_version)
            return [o for o in r.objects if o["kind"] == "ResourceQuota"]

        self.assertEqual(quotas({}, "v1.30.5"), [])
        (q,) = quotas({}, "v1.30.5-gke.100")
        self.assertEqual(q["metadata"]["namespace"], NAMESPACE)
        self.assertEqual(q["spec"]["hard"], {"pods": 5000})
        (expr,) = q["spec"]["scopeSelector"]["matchExpressions"]
        self.assertEqual(
            expr, {"operator": "In", "scopeName": "PriorityClass", "values": ["system-node-critical"]}
        )
        self.assertEqual(quotas({"resourceQuotas": {"enabled": False}}, "v1.30.5-gke.100"), [])
        (q,) = quotas(
            {"resourceQuotas": {"enabled": True, "pods": 64}, "ca": {"priorityClassName": "system-cluster-critical"}},
            "v1.30.5",
        )
        self.assertEqual(q["spec"]["hard"], {"pods": 64})
        self.assertEqual(
            q["spec"]["scopeSelector"]["matchExpressions"][0]["values"],
            ["system-cluster-critical", "system-node-critical"],
        )
        # No priority class anywhere: nothing to admit, no quota.
        self.assertEqual(quotas({"resourceQuotas": {"enabled": True}, "priorityClassName": ""}, "v1.30.5"), [])
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(q, version, strict=True)

    def test_cni_bin_dir_follows_the_platform(self):
        """cniBinDir "" picks the runtime's plugin dir from the cluster version.

        GKE's containerd loads plugins only from /home/kubernetes/bin: a copy
        in /opt/cni/bin is never found, yet the plugin is chained into the
        config, and every new pod on the node fails ("failed to find plugin
        istio-cni"). The agent itself always reads the fixed mount path.
        """

        def bin_dir(values: dict[str, Any], kube_version: str) -> tuple[str, str, str]:
            r = render(chart(), values, kube_version=kube_version)
            ds = r.get("DaemonSet", "node-agent")
            vols = {v["name"]: v for v in pod_spec(ds)["volumes"]}
            c = r.container("DaemonSet", "node-agent", "node-agent")
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            env = r.env("DaemonSet", "node-agent", "node-agent")
            return vols["cni-bin-dir"]["hostPath"]["path"], mounts["cni-bin-dir"], env["CNI_BIN_DIR"]

        inside = "/host/opt/cni/bin"
        self.assertEqual(merged({})["cniBinDir"], "")
        self.assertEqual(bin_dir({}, "v1.30.5-gke.100"), ("/home/kubernetes/bin", inside, inside))
        self.assertEqual(bin_dir({}, "v1.30.5"), ("/opt/cni/bin", inside, inside))
        self.assertEqual(bin_dir({}, "v1.31.4+k3s1"), ("/opt/cni/bin", inside, inside))
        # An explicit value wins, on GKE too.
        k3s = {"cniBinDir": "/var/lib/rancher/k3s/data/cni", "cniConfDir": "/var/lib/rancher/k3s/agent/etc/cni/net.d"}
        self.assertEqual(bin_dir(k3s, "v1.30.5-gke.100"), ("/var/lib/rancher/k3s/data/cni", inside, inside))
        self.assertEqual(bin_dir({"cniBinDir": "/opt/cni/bin"}, "v1.30.5-gke.100")[0], "/opt/cni/bin")
        # The configuration directory is not platform-dependent (GKE uses /etc/cni/net.d).
        r = render(chart(), {}, kube_version="v1.30.5-gke.100")
        vols = {v["name"]: v for v in pod_spec(r.get("DaemonSet", "node-agent"))["volumes"]}
        self.assertEqual(vols["cni-net-dir"]["hostPath"]["path"], "/etc/cni/net.d")
        r = render(chart(), k3s, kube_version="v1.31.4+k3s1")
        vols = {v["name"]: v for v in pod_spec(r.get("DaemonSet", "node-agent"))["volumes"]}
        self.assertEqual(vols["cni-net-dir"]["hostPath"]["path"], "/var/lib/rancher/k3s/agent/etc/cni/net.d")

    def test_env_golden_files(self):
        """golden/env-<mode>.txt: the complete environment per container.

        These files are what the node-in-a-box harness must reproduce to run
        the programs "as the chart would".
        """
        for mode in ("inpod", "geneve"):
            r = render(chart(), {"ambient": {"redirectMode": mode}})
            text = env_listing(r, mode)
            path = GOLDEN / f"env-{mode}.txt"
            if UPDATE_GOLDEN:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            with self.subTest(mode=mode):
                self.assertTrue(path.exists(), f"{path} missing: run UPDATE_GOLDEN=1 make test-chart")
                self.assertEqual(path.read_text(), text, f"{path} is stale: run UPDATE_GOLDEN=1 make test-chart")


def env_listing(r: Rendered, mode: str) -> str:
    lines = [
        "# Environment of each container rendered by charts/geneva-mesh with default",
        f"# values and ambient.redirectMode={mode}, release namespace {NAMESPACE}.",
        "# envFrom ConfigMaps are expanded; downward-API values read <fieldRef:PATH>.",
        "# Generated by charts/tests/test_chart.py; regenerate: UPDATE_GOLDEN=1 make test-chart",
    ]
    for obj, c, component in containers_with_component(r):
        lines.append("")
        lines.append(f"[{component}] {obj['kind']}/{obj['metadata']['name']} container={c['name']}")
        cmd = c.get("command", []) + c.get("args", [])
        pod = pod_spec(obj)
        sc = c["securityContext"]
        user = sc.get("runAsUser", pod.get("securityContext", {}).get("runAsUser"))
        caps = ",".join(sc.get("capabilities", {}).get("add", [])) or "none"
        lines.append(f"# command: {' '.join(cmd)}")
        lines.append(f"# hostNetwork: {str(pod.get('hostNetwork', False)).lower()}; uid {user}; capabilities: {caps}")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for m in c.get("volumeMounts", []):
            v = volumes[m["name"]]
            source = next(k for k in v if k != "name")
            detail = v["hostPath"]["path"] if source == "hostPath" else v[source].get("name", v[source].get("secretName", ""))
            ro = " (read-only)" if m.get("readOnly") else ""
            lines.append(f"# mount: {m['mountPath']} <- {source}:{detail}{ro}".rstrip(":"))
        env = r.env(obj["kind"], obj["metadata"]["name"], c["name"])
        lines.extend(f"{k}={env[k]}" for k in sorted(env))
    return "\n".join(lines) + "\n"


class BadValues(unittest.TestCase):
    """Install-time refusal of bad values, with a message naming the value."""

    SCHEMA_ERRORS = [
        ({"network": "net/1"}, "network"),
        ({"ambient": {"redirectMode": "ebpf"}}, "redirectMode"),
        ({"ambient": {"redirectMode": "GENEVE"}}, "redirectMode"),
        ({"ambient": {"dnsCapture": "yes"}}, "dnsCapture"),
        ({"ambient": {"hostProbeSnatIP": "not-an-ip"}}, "hostProbeSnatIP"),
        ({"ambient": {"unknown": 1}}, "unknown"),
        ({"ambient": {"enablementSelectors": []}}, "enablementSelectors"),
        ({"ambient": {"enablementSelectors": [{"podSelecter": {}}]}}, "podSelecter"),
        (
            {"ambient": {"enablementSelectors": [{"podSelector": {"matchExpressions": [{"key": "k", "operator": "Equals"}]}}]}},
            "operator",
        ),
        (
            {"ambient": {"enablementSelectors": [{"podSelector": {"matchExpressions": [{"key": "k", "operator": "In"}]}}]}},
            "values",
        ),
        (
            {"ambient": {"enablementSelectors": [{"namespaceSelector": {"matchExpressions": [{"key": "k", "operator": "Exists", "values": ["x"]}]}}]}},
            "values",
        ),
        ({"ambient": {"enablementSelectors": [{"podSelector": {"matchLabels": {"mesh": True}}}]}}, "mesh"),
        ({"logAsJson": "true"}, "logAsJson"),
        ({"redirectMode": "inpod"}, "redirectMode"),
        ({"cniBinDir": "opt/cni/bin"}, "cniBinDir"),
        ({"cniBinDir": "/opt/cni bin"}, "cniBinDir"),
        ({"cniConfDir": ""}, "cniConfDir"),
        ({"cniConfFileName": "/etc/cni/net.d/10-x.conflist"}, "cniConfFileName"),
        ({"cniConfFileName": "10-x.json"}, "cniConfFileName"),
        ({"excludeNamespaces": "kube-system"}, "excludeNamespaces"),
        ({"excludeNamespaces": ["Kube-System"]}, "excludeNamespaces"),
        ({"tolerations": [{"operator": "Sometimes"}]}, "operator"),
        ({"tolerations": {"operator": "Exists"}}, "tolerations"),
        ({"imagePullPolicy": "Sometimes"}, "imagePullPolicy"),
        ({"nodeAgent": {"resources": {"requests": {"cpu": "lots"}}}}, "cpu"),
        ({"nodeAgent": {"resources": {"request": {"cpu": "1"}}}}, "request"),
        ({"nodeAgent": {"readyPort": 70000}}, "readyPort"),
        ({"nodeAgent": {"env": {"BAD-NAME": "x"}}}, "BAD-NAME"),
        ({"nodeAgent": {"env": {"X": 1}}}, "X"),
        ({"ztunnel": {"workerThreads": "150%"}}, "workerThreads"),
        ({"ztunnel": {"secretTTL": "1 day"}}, "secretTTL"),
        ({"ztunnel": {"kubernetesDiscovery": "false"}}, "kubernetesDiscovery"),
        ({"ca": {"enabled": "no"}}, "enabled"),
        ({"ca": {"existingSecret": "cacerts"}}, "rootCert"),
        ({"ca": {"existingSecret": "cacerts", "rootCert": "not a pem"}}, "rootCert"),
        ({"ca": {"trustedNodeAccounts": ["ztunnel"]}}, "trustedNodeAccounts"),
        ({"ca": {"replicas": 0}}, "replicas"),
        ({"istioOwnedCNIConfig": True, "chained": False}, "chained"),
        ({"trustDomain": "has space"}, "trustDomain"),
        ({"istioOwnedCNIConfigFileName": "../02.conflist"}, "istioOwnedCNIConfigFileName"),
        ({"hub": ""}, "hub"),
    ]

    TEMPLATE_ERRORS = [
        ({"xdsAddress": "istiod.istio-system.svc:15012"}, "kubernetesDiscovery"),
        ({"ztunnel": {"kubernetesDiscovery": False}}, "localConfig"),
        ({"caAddress": "istiod.istio-system.svc:15012"}, "ca.enabled"),
        (
            {"xdsAddress": "istiod.istio-system.svc:15012", "ztunnel": {"kubernetesDiscovery": False}},
            "xdsAddress is set while ca.enabled=true",
        ),
        ({"nodeAgent": {"readyPort": 15014}}, "readyPort"),
        ({"ambient": {"nativeNftables": True, "redirectMode": "geneve"}}, "nativeNftables"),
        ({"xdsOnDemand": True}, "xdsAddress too"),
        (
            {
                "xdsOnDemand": True,
                "xdsAddress": "istiod.istio-system.svc:15012",
                "ztunnel": {"kubernetesDiscovery": False},
            },
            "dnsCapture",
        ),
    ]

    def test_schema_refuses(self):
        for values, needle in self.SCHEMA_ERRORS:
            with self.subTest(values=values):
                with self.assertRaises(helm.HelmValuesError) as ctx:
                    render(chart(), values)
                self.assertIn(needle, str(ctx.exception))

    def test_templates_refuse(self):
        for values, needle in self.TEMPLATE_ERRORS:
            with self.subTest(values=values):
                with self.assertRaises(helm.HelmRenderError) as ctx:
                    render(chart(), values)
                self.assertIn(needle, str(ctx.exception))

    def test_every_combination_passes_the_schema(self):
        for name, values in COMBINATIONS.items():
            with self.subTest(combination=name):
                chart().validate_schema(merged(values))


class Scripts(unittest.TestCase):
    """Shell scripts of the project (chart tooling, test and bench drivers): shellcheck and prerequisites."""

    SCRIPT_DIRS = ("e2e/kind", "images", "scripts", "bench")

    def scripts(self) -> list[Path]:
        found = []
        for d in self.SCRIPT_DIRS:
            found.extend(sorted((REPO / d).glob("*.sh")))
        return found

    def test_shellcheck(self):
        scripts = self.scripts()
        self.assertTrue(scripts, "no scripts found")
        if shutil.which("shellcheck") is None:
            self.skipTest("shellcheck not installed (scripts/install-deps.sh installs it)")
        out = subprocess.run(
            ["shellcheck", "--severity=style", "--external-sources", "--source-path=SCRIPTDIR", *map(str, scripts)],
            capture_output=True, text=True, cwd=REPO,
        )
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)

    def test_kind_prerequisite_check_names_missing_tool(self):
        """With no kind/helm on PATH the e2e stops early and says how to get them."""
        with tempfile.TemporaryDirectory() as bindir:
            # A PATH with only the basic utilities the script needs itself.
            for tool in ("bash", "env", "dirname", "cat", "uname", "mktemp", "rm", "grep", "sed", "head", "tr", "sort"):
                src = shutil.which(tool)
                if src:
                    os.symlink(src, os.path.join(bindir, tool))
            out = subprocess.run(
                [str(REPO / "e2e" / "kind" / "prereqs.sh")],
                capture_output=True, text=True, env={"PATH": bindir, "HOME": bindir}, timeout=60,
            )
        self.assertNotEqual(out.returncode, 0)
        for tool in ("docker", "kind", "kubectl", "helm"):
            self.assertIn(tool, out.stderr)
        self.assertIn("https://kind.sigs.k8s.io", out.stderr)


if __name__ == "__main__":
    unittest.main()
