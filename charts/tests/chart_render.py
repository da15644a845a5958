"""Offline rendering of the geneva-mesh chart and helpers the tests share.

Rendering uses real Helm (v4, as a library: the `helm_python` package binds
libhelm), so templates, `values.schema.json` and `fail` calls behave exactly as
on `helm install`. Nothing contacts a cluster: `lookup` returns nothing, which
is what a first install sees.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
from helm_python import _native as helm_native
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "geneva-mesh"
ARCHITECTURE_MD = REPO / "ARCHITECTURE.md"
RELEASE = "geneva-mesh"
NAMESPACE = "istio-system"

# Component each workload runs, as ARCHITECTURE.md names it.
COMPONENT_OF = {
    ("DaemonSet", "node-agent", "node-agent"): "node-agent",
    ("DaemonSet", "ztunnel", "istio-proxy"): "ztunnel",
    ("Deployment", "mesh-ca", "ca"): "node-agent ca",
}

WORKLOAD_KINDS = ("DaemonSet", "Deployment")


@dataclass
class Rendered:
    """One chart rendering: its objects, NOTES.txt and the values used."""

    values: dict[str, Any]
    objects: list[dict[str, Any]]
    notes: str
    files: dict[str, str] = field(default_factory=dict)

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for obj in self.objects:
            if obj["kind"] == kind and obj["metadata"]["name"] == name:
                return obj
        raise KeyError(f"{kind}/{name} not rendered (have: {self.names()})")

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        try:
            return self.get(kind, name)
        except KeyError:
            return None

    def names(self) -> list[str]:
        return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in self.objects)

    def workloads(self) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] in WORKLOAD_KINDS]

    def container(self, kind: str, name: str, container: str) -> dict[str, Any]:
        spec = self.get(kind, name)["spec"]["template"]["spec"]
        for c in spec["containers"]:
            if c["name"] == container:
                return c
        raise KeyError(f"container {container} not in {kind}/{name}")

    def env(self, kind: str, name: str, container: str) -> dict[str, str]:
        """The container's environment with envFrom ConfigMaps expanded.

        Explicit `env` entries win over envFrom, as in the kubelet. Values
        from the downward API are shown as `<fieldRef:PATH>` and
        `<resourceFieldRef:CONTAINER/RESOURCE>`.
        """
        c = self.container(kind, name, container)
        result: dict[str, str] = {}
        for source in c.get("envFrom", []):
            ref = source.get("configMapRef")
            if ref is None:
                raise AssertionError(f"{kind}/{name}: unsupported envFrom {source}")
            cm = self.get("ConfigMap", ref["name"])
            result.update({k: str(v) for k, v in cm.get("data", {}).items()})
        for entry in c.get("env", []):
            if "value" in entry:
                result[entry["name"]] = str(entry["value"])
            elif "valueFrom" in entry and "fieldRef" in entry["valueFrom"]:
                path = entry["valueFrom"]["fieldRef"]["fieldPath"]
                result[entry["name"]] = f"<fieldRef:{path}>"
            elif "valueFrom" in entry and "resourceFieldRef" in entry["valueFrom"]:
                ref = entry["valueFrom"]["resourceFieldRef"]
                result[entry["name"]] = f"<resourceFieldRef:{ref.get('containerName', '')}/{ref['resource']}>"
            else:
                raise AssertionError(f"{kind}/{name}: unsupported env entry {entry}")
        return result


def load_chart() -> helm.Chart:
    return helm.Chart.load(os.fspath(CHART_DIR))


def render(
    chart: helm.Chart, values: dict[str, Any] | None = None, kube_version: str | None = None
) -> Rendered:
    """Render like `helm install --namespace istio-system geneva-mesh`.

    `kube_version` (e.g. "v1.30.5-gke.100") is the cluster version the
    templates see as `.Capabilities.KubeVersion`, as `helm install` reads it
    from the API server; None = Helm's built-in default.
    """
    values = copy.deepcopy(values or {})
    if kube_version is None:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    else:
        files = _render_with_kube_version(chart, values, kube_version)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(doc)
    return Rendered(values=values, objects=objects, notes=notes, files=files)


def _render_with_kube_version(chart: helm.Chart, values: dict[str, Any], kube_version: str) -> dict[str, str]:
    # helm_python's Chart.render has no kube_version keyword, but the libhelm
    # render options it passes through accept one (the same option `lint` exposes).
    opts = {"name": RELEASE, "namespace": NAMESPACE, "is_install": True, "kube_version": kube_version}
    out = helm_native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(opts))
    return json.loads(out)


def crd_objects(chart: helm.Chart) -> list[dict[str, Any]]:
    docs = []
    for crd in chart.crds:
        docs.extend(d for d in yaml.safe_load_all(crd["data"]) if d)
    return docs


# --- ARCHITECTURE.md -----------------------------------------------------------

_COMPONENT_LINE = re.compile(r"^(?:#+\s*)?(node-agent ca|node-agent|ztunnel)\b", re.IGNORECASE)
_ENV_TOKEN = re.compile(r"`([A-Z][A-Z0-9_]*)(?:=[^`]*)?`")


def architecture_env_names(text: str | None = None) -> dict[str, set[str]]:
    """Env names per component from the tables of ARCHITECTURE.md.

    A line outside a table that starts with a component name ("ztunnel ...",
    "node-agent:", "### node-agent ca") selects the component; every
    backticked UPPER_CASE name in the first cell of the table rows that
    follow is one of its variables. Only the "Configuration names" section
    and the "Chart ↔ program contract additions" section are read.
    """
    if text is None:
        text = ARCHITECTURE_MD.read_text()
    names: dict[str, set[str]] = {}
    component: str | None = None
    in_config = False
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:].strip().lower()
            in_config = title.startswith("configuration names") or title.startswith(
                "chart ↔ program contract additions"
            )
            component = None
            continue
        if not in_config:
            continue
        if line.startswith("|"):
            if component is None:
                continue
            cells = line.strip().strip("|").split("|")
            names.setdefault(component, set()).update(_ENV_TOKEN.findall(cells[0]))
            continue
        match = _COMPONENT_LINE.match(line.strip())
        if match:
            component = match.group(1).lower()
    return names
