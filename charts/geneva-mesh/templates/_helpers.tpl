{{/*
Object names are fixed, like Istio's charts: one install per cluster (two
node agents would fight over the node's CNI configuration). The ztunnel
service account is "ztunnel" so that istiod's default CA_TRUSTED_NODE_ACCOUNTS
(istio-system/ztunnel) accepts it when istiod is the CA.
*/}}
{{- define "geneva-mesh.nodeAgent.name" -}}node-agent{{- end }}
{{- define "geneva-mesh.ztunnel.name" -}}ztunnel{{- end }}
{{- define "geneva-mesh.ca.name" -}}mesh-ca{{- end }}
{{- define "geneva-mesh.ca.generatedSecret" -}}mesh-ca-certs{{- end }}
{{- define "geneva-mesh.rootCertConfigMap" -}}istio-ca-root-cert{{- end }}

{{/* Cluster-scoped objects get the chart prefix. */}}
{{- define "geneva-mesh.clusterName" -}}geneva-mesh-{{ . }}{{- end }}

{{- define "geneva-mesh.labels" -}}
app.kubernetes.io/part-of: geneva-mesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* Image reference: a name containing "/" is used verbatim. Args: (list . name) */}}
{{- define "geneva-mesh.image" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- if contains "/" $name -}}
{{ $name }}
{{- else -}}
{{ printf "%s/%s:%s" $root.Values.hub $name $root.Values.tag }}
{{- end -}}
{{- end }}

{{- define "geneva-mesh.redirectMode" -}}{{ .Values.ambient.redirectMode }}{{- end }}
{{- define "geneva-mesh.inpod" -}}{{ if eq .Values.ambient.redirectMode "inpod" }}true{{ end }}{{- end }}

{{/* Fixed in-container paths (the program defaults, see ARCHITECTURE.md). */}}
{{- define "geneva-mesh.hostCniBinDir" -}}/host/opt/cni/bin{{- end }}
{{/*
Host directory the container runtime loads CNI plugins from: cniBinDir, or
when empty, /home/kubernetes/bin on GKE (containerd there is configured with
that directory only; recognised by "-gke" in the API server's version, as
Istio's istio-cni chart does) and /opt/cni/bin elsewhere. `helm template`
does not see the cluster's version: set cniBinDir there.
*/}}
{{- define "geneva-mesh.cniBinDir" -}}
{{- if .Values.cniBinDir -}}
{{ .Values.cniBinDir }}
{{- else if contains "-gke" .Capabilities.KubeVersion.GitVersion -}}
/home/kubernetes/bin
{{- else -}}
/opt/cni/bin
{{- end -}}
{{- end }}
{{- define "geneva-mesh.hostCniConfDir" -}}/host/etc/cni/net.d{{- end }}
{{- define "geneva-mesh.cniAgentRunDir" -}}/var/run/istio-cni{{- end }}
{{- define "geneva-mesh.ztunnelSockDir" -}}/var/run/ztunnel{{- end }}
{{- define "geneva-mesh.hostProcSysNet" -}}/host/proc/sys/net{{- end }}

{{/* CA endpoint ztunnel uses. */}}
{{- define "geneva-mesh.caAddress" -}}
{{- if .Values.caAddress -}}
{{ .Values.caAddress }}
{{- else if .Values.ca.enabled -}}
{{ printf "https://%s.%s.svc:%d" (include "geneva-mesh.ca.name" .) .Release.Namespace (int .Values.ca.grpcPort) }}
{{- else -}}
{{ printf "https://istiod.%s.svc:15012" .Release.Namespace }}
{{- end -}}
{{- end }}

{{/* The Secret the CA reads its signing key from. */}}
{{- define "geneva-mesh.ca.secretName" -}}
{{- .Values.ca.existingSecret | default (include "geneva-mesh.ca.generatedSecret" .) -}}
{{- end }}

{{/* Checks that cannot be expressed in values.schema.json. */}}
{{- define "geneva-mesh.validate" -}}
{{- if and .Values.xdsAddress .Values.ztunnel.kubernetesDiscovery }}
{{- fail "xdsAddress is set while ztunnel.kubernetesDiscovery=true: ztunnel learns workloads from istiod's xDS or from the Kubernetes API, not both (set ztunnel.kubernetesDiscovery=false)" }}
{{- end }}
{{- if and (not .Values.ztunnel.kubernetesDiscovery) (not .Values.ztunnel.localConfig) (not .Values.xdsAddress) }}
{{- fail "ztunnel: with kubernetesDiscovery=false ztunnel needs xdsAddress (istiod) or ztunnel.localConfig (it has no other source of workloads)" }}
{{- end }}
{{- if and .Values.xdsOnDemand (not .Values.xdsAddress) }}
{{- fail "xdsOnDemand asks istiod for addresses: set xdsAddress too" }}
{{- end }}
{{- if and .Values.xdsOnDemand .Values.ambient.dnsCapture }}
{{- fail "xdsOnDemand turns ztunnel's DNS proxy off (it needs the full state): set ambient.dnsCapture=false, or pods' DNS would be redirected to a ztunnel that does not answer it" }}
{{- end }}
{{- if and .Values.xdsAddress .Values.ca.enabled }}
{{- fail "xdsAddress is set while ca.enabled=true: with istiod as the control plane, istiod is also the CA (its xDS serving certificate chains to istiod's root, not to this chart's, and both publish ConfigMap istio-ca-root-cert): set ca.enabled=false" }}
{{- end }}
{{- if and .Values.ca.enabled .Values.caAddress }}
{{- fail "caAddress is set while ca.enabled=true: either use the built-in CA (leave caAddress empty) or an external CA (ca.enabled=false)" }}
{{- end }}
{{- if and .Values.ambient.nativeNftables (eq .Values.ambient.redirectMode "geneve") }}
{{- fail "ambient.nativeNftables needs ambient.redirectMode=inpod: GENEVE mode programs iptables" }}
{{- end }}
{{- if eq (int .Values.nodeAgent.readyPort) (int .Values.nodeAgent.metricsPort) }}
{{- fail "nodeAgent.readyPort and nodeAgent.metricsPort must differ" }}
{{- end }}
{{- end }}

{{/* Env entries from a name: value map, sorted by name. */}}
{{- define "geneva-mesh.extraEnv" -}}
{{- range $k := keys . | sortAlpha }}
- name: {{ $k }}
  value: {{ index $ $k | quote }}
{{- end }}
{{- end }}
