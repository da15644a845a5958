#!/usr/bin/env bash
# `make e2e-kind`: the mesh in a real kind cluster (1 control plane, 2 workers).
#
#   1. prerequisites (docker, kind, kubectl, helm), cluster, images, chart
#   2. client, other and optout pods on one worker, server on the other
#   3. scenarios, each printing PASS or stopping the run with diagnostics:
#      plaintext before the label; label -> enrolled, mTLS with SPIFFE
#      identities in ztunnel's access log; opted-out pod stays out;
#      AuthorizationPolicy allow-list and deny; ztunnel restart; node agent
#      restart (open connection survives, pod created meanwhile is enrolled);
#      primary CNI config rewritten -> repaired; unlabel -> plaintext again,
#      nothing restarted.
#
# The cluster is left running for inspection; `make e2e-kind-clean` removes it.
# Settings: see lib.sh (KIND_CLUSTER, E2E_REDIRECT_MODE=inpod|geneve,
# SKIP_IMAGES=1 to reuse loaded images, BIN_DIR=<static binaries>, ...).
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

STATE_DIR="$IMAGES_OUT/e2e-kind"
mkdir -p "$STATE_DIR"

diagnostics() {
  local rc=$?
  [ "$rc" -eq 0 ] && return
  set +e
  echo
  echo "e2e-kind: FAILED (exit $rc); diagnostics follow. The cluster kind-$CLUSTER is kept; 'make e2e-kind-clean' removes it." >&2
  k get pods -A -o wide
  kn get pods -o custom-columns='NAME:.metadata.name,NODE:.spec.nodeName,REDIRECTION:.metadata.annotations.ambient\.istio\.io/redirection,RESTARTS:.status.containerStatuses[0].restartCount'
  echo "--- node agent logs"; km logs -l app=node-agent --tail=80 --prefix --max-log-requests=10
  echo "--- ztunnel logs"; km logs -l app=ztunnel --tail=80 --prefix --max-log-requests=10
  echo "--- CA logs"; km logs -l app=mesh-ca --tail=40 --prefix
  echo "--- events in $APP_NS"; kn get events --sort-by=.lastTimestamp | tail -30
}
trap diagnostics EXIT

pass() { printf '   PASS  %s\n' "$*"; }
fail() { printf '   FAIL  %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

setup_cluster() {
  log "cluster kind-$CLUSTER"
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    info "reusing the existing cluster"
  else
    local args=(create cluster --name "$CLUSTER" --config "$KIND_DIR/kind-config.yaml" --wait 120s)
    [ -n "$KIND_NODE_IMAGE" ] && args+=(--image "$KIND_NODE_IMAGE")
    kind "${args[@]}"
    # The primary CNI config as kindnet wrote it, before the node agent chains
    # into it: the repair scenario puts it back to simulate a rewrite.
    retry 60 primary_conf_present || die "no CNI config on $CLIENT_NODE"
    docker exec "$CLIENT_NODE" sh -c 'cat "$(ls /etc/cni/net.d/*.conf* | head -n1)"' > "$STATE_DIR/pristine.conf"
    docker exec "$CLIENT_NODE" sh -c 'ls /etc/cni/net.d/*.conf* | head -n1' > "$STATE_DIR/pristine.name"
  fi
  k get nodes -o wide
}

primary_conf_present() {
  docker exec "$CLIENT_NODE" sh -c 'ls /etc/cni/net.d/*.conf* >/dev/null 2>&1'
}

load_images() {
  log "images $HUB/{ztunnel,node-agent}:$TAG"
  if [ -z "${SKIP_IMAGES:-}" ]; then
    OUT_DIR="$IMAGES_OUT" HUB="$HUB" TAG="$TAG" "$REPO/images/build.sh"
  fi
  for image in ztunnel node-agent; do
    [ -f "$IMAGES_OUT/$image.tar" ] || die "$IMAGES_OUT/$image.tar missing: run 'make images' (or unset SKIP_IMAGES)"
    kind load image-archive "$IMAGES_OUT/$image.tar" --name "$CLUSTER"
  done
}

install_chart() {
  log "helm install geneva-mesh (ambient.redirectMode=$MODE) in $MESH_NS"
  k create namespace "$MESH_NS" --dry-run=client -o yaml | k apply -f -
  # hostPath, hostNetwork and capabilities: the privileged Pod Security level.
  k label namespace "$MESH_NS" pod-security.kubernetes.io/enforce=privileged --overwrite
  helm --kube-context "kind-$CLUSTER" upgrade --install geneva-mesh "$REPO/charts/geneva-mesh" \
    --namespace "$MESH_NS" \
    --set "ambient.redirectMode=$MODE" --set "hub=$HUB" --set "tag=$TAG" \
    --wait --timeout 5m
  km rollout status daemonset/node-agent --timeout "$WAIT"
  km rollout status daemonset/ztunnel --timeout "$WAIT"
  km rollout status deployment/mesh-ca --timeout "$WAIT"
}

deploy_workloads() {
  log "workloads in namespace $APP_NS"
  k create namespace "$APP_NS" --dry-run=client -o yaml | k apply -f -
  render "$KIND_DIR/manifests/workloads.yaml" | kn apply -f -
  for d in server client other optout; do
    kn rollout status "deployment/$d" --timeout "$WAIT"
  done
}

# render FILE: substitute the __PLACEHOLDERS__ of a manifest.
render() {
  sed -e "s|__CLIENT_NODE__|$CLIENT_NODE|g" -e "s|__SERVER_NODE__|$SERVER_NODE|g" \
    -e "s|__CLIENT_IMAGE__|$CLIENT_IMAGE|g" -e "s|__SERVER_IMAGE__|$SERVER_IMAGE|g" \
    -e "s|__TRUST_DOMAIN__|$TRUST_DOMAIN|g" -e "s|__APP_NS__|$APP_NS|g" "$1"
}

# ---------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------

# http_code FROM_DEPLOYMENT [PATH]: HTTP status of GET http://server/PATH from
# that workload, 000 when the connection fails or is reset.
http_code() {
  kn exec "deploy/$1" -c client -- curl -s -o /dev/null -w '%{http_code}' --max-time 5 \
    "http://server/${2:-hostname}" 2>/dev/null || true
}

expect_ok() {
  local code
  code=$(http_code "$1")
  [ "$code" = 200 ] || fail "$1 -> server: HTTP $code, expected 200"
}

expect_refused() {
  local code
  code=$(http_code "$1")
  [ "$code" != 200 ] || fail "$1 -> server: HTTP 200, expected the connection to be refused"
}

# redirection POD_NAME_PREFIX: value of ambient.istio.io/redirection on the
# pods of that workload ("" when absent).
redirection_of() {
  kn get pods -l "app=$1" -o jsonpath='{range .items[*]}{.metadata.annotations.ambient\.istio\.io/redirection}{"\n"}{end}' | sort -u
}

all_enrolled() {
  local app
  for app in server client other; do
    [ "$(redirection_of "$app")" = enabled ] || return 1
  done
}

none_enrolled() {
  local app
  for app in server client other optout; do
    [ -z "$(redirection_of "$app")" ] || return 1
  done
}

ztunnel_logs_since() {
  km logs -l app=ztunnel --since-time="$1" --max-log-requests=10 --tail=-1 2>/dev/null
}

# Access-log identities; tolerant of quoting ("spiffe://..." or spiffe://...).
identity_re() { printf '%s\\.identity="?spiffe://%s/ns/%s/sa/%s' "$1" "$TRUST_DOMAIN" "$APP_NS" "$2"; }

logged_mtls() { # SINCE SRC_SA DST_SA
  local logs
  logs=$(ztunnel_logs_since "$1")
  grep -E "$(identity_re src "$2")" <<<"$logs" | grep -qE "$(identity_re dst "$3")"
}

pod_fingerprint() { # uid:restarts for every pod in the app namespace
  kn get pods -o jsonpath='{range .items[*]}{.metadata.name} {.metadata.uid} {.status.containerStatuses[0].restartCount}{"\n"}{end}' | sort
}

# ---------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------

scenario_plaintext_before_label() {
  log "1. plaintext before the namespace is labelled"
  k label namespace "$APP_NS" istio.io/dataplane-mode- >/dev/null 2>&1 || true
  retry 30 none_enrolled || fail "pods carry ambient.istio.io/redirection before the label"
  local since
  since=$(now)
  expect_ok client
  expect_ok other
  sleep 2
  if logged_mtls "$since" client server; then
    fail "ztunnel logged an mTLS connection for an unlabelled namespace"
  fi
  pass "client and other reach the server; no ztunnel involvement"
}

scenario_label_enrols() {
  log "2. label the namespace: enrolment, mTLS, SPIFFE identities"
  FINGERPRINT_BEFORE=$(pod_fingerprint)
  k label namespace "$APP_NS" istio.io/dataplane-mode=ambient --overwrite
  retry 30 all_enrolled || fail "pods not annotated ambient.istio.io/redirection=enabled within 30 s"
  pass "server, client, other annotated enabled"
  [ -z "$(redirection_of optout)" ] || fail "optout (istio.io/dataplane-mode=none) was enrolled"
  pass "optout (pod label none) stays out"
  local since
  since=$(now)
  retry 20 expect_ok client
  retry 60 logged_mtls "$since" client server ||
    fail "no ztunnel access-log line with src.identity .../sa/client and dst.identity .../sa/server"
  pass "ztunnel access log: spiffe://$TRUST_DOMAIN/ns/$APP_NS/sa/client -> .../sa/server"
  local pod
  pod=$(km get pods -l app=ztunnel --field-selector "spec.nodeName=$SERVER_NODE" -o jsonpath='{.items[0].metadata.name}')
  if k get --raw "/api/v1/namespaces/$MESH_NS/pods/$pod:15020/proxy/metrics" | grep -q 'connection_security_policy="mutual_tls"'; then
    pass "ztunnel metrics on $SERVER_NODE count mutual_tls connections"
  else
    fail "ztunnel metrics on $SERVER_NODE show no connection_security_policy=\"mutual_tls\""
  fi
  [ "$(pod_fingerprint)" = "$FINGERPRINT_BEFORE" ] || fail "pods were restarted or replaced by enrolment"
  pass "no pod restarted"
}

scenario_authorization_policy() {
  log "3. AuthorizationPolicy"
  render "$KIND_DIR/manifests/policy-allow-client.yaml" | kn apply -f -
  retry 20 expect_refused other || fail "other still reaches the server under an ALLOW policy for client only"
  expect_ok client
  pass "ALLOW only sa/client: client 200, other refused"
  kn delete authorizationpolicy server-allow-client
  render "$KIND_DIR/manifests/policy-deny-client.yaml" | kn apply -f -
  retry 20 expect_refused client || fail "client still reaches the server under a DENY policy"
  expect_ok other
  pass "DENY sa/client: client refused, other 200"
  kn delete authorizationpolicy server-deny-client
  retry 20 expect_ok client || fail "client refused after the policies were deleted"
  expect_ok other
  pass "policies removed: both reach the server"
}

scenario_ztunnel_restart() {
  log "4. ztunnel restart on $SERVER_NODE"
  km delete pod -l app=ztunnel --field-selector "spec.nodeName=$SERVER_NODE" --wait=false
  km rollout status daemonset/ztunnel --timeout "$WAIT"
  retry 10 expect_ok client || fail "client cannot reach the server within 10 s of the new ztunnel being ready"
  pass "new connections work after the restart"
}

scenario_node_agent_restart() {
  log "5. node agent restart on $CLIENT_NODE"
  # A connection held open across the restart: the server answers after 20 s.
  local long="$STATE_DIR/long-connection.out"
  kn exec deploy/client -c client -- curl -s -o /dev/null -w '%{http_code}' --max-time 60 \
    'http://server/shell?cmd=sleep+20' >"$long" 2>&1 &
  local long_pid=$!
  sleep 3
  kn delete pod late --ignore-not-found >/dev/null
  km delete pod -l app=node-agent --field-selector "spec.nodeName=$CLIENT_NODE" --wait=false
  # Created while the agent is down: its CNI ADD fails closed until the agent
  # is back, then it is enrolled; it must never run unredirected.
  kn apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: late
  labels:
    app: late
spec:
  nodeName: $CLIENT_NODE
  terminationGracePeriodSeconds: 1
  containers:
    - name: client
      image: $CLIENT_IMAGE
      command: ["sleep", "1000000"]
EOF
  km rollout status daemonset/node-agent --timeout "$WAIT"
  wait "$long_pid" || true
  [ "$(cat "$long")" = 200 ] || fail "the connection open during the restart ended with '$(cat "$long")', expected 200"
  pass "connection open across the restart completed (HTTP 200 after 20 s)"
  kn wait --for=condition=Ready pod/late --timeout "$WAIT"
  retry 30 pod_enrolled late || fail "pod created while the agent was down is not enrolled"
  local code
  code=$(kn exec late -c client -- curl -s -o /dev/null -w '%{http_code}' --max-time 5 http://server/hostname || true)
  [ "$code" = 200 ] || fail "late -> server: HTTP $code"
  pass "pod created while the agent was down is enrolled and reaches the server"
  kn delete pod late --wait=false
}

pod_enrolled() { # POD
  [ "$(kn get pod "$1" -o jsonpath='{.metadata.annotations.ambient\.istio\.io/redirection}')" = enabled ]
}

scenario_cni_config_repair() {
  log "6. primary CNI config rewritten on $CLIENT_NODE"
  if [ ! -s "$STATE_DIR/pristine.conf" ] || grep -q istio-cni "$STATE_DIR/pristine.conf"; then
    info "SKIP: no pristine copy of the primary CNI config (cluster was not created by this run)"
    return
  fi
  local name
  name=$(cat "$STATE_DIR/pristine.name")
  docker exec -i "$CLIENT_NODE" sh -c "cat > '$name.tmp' && mv '$name.tmp' '$name'" <"$STATE_DIR/pristine.conf"
  retry 10 docker exec "$CLIENT_NODE" grep -q istio-cni "$name" ||
    fail "the node agent did not chain istio-cni back into $name within 10 s"
  pass "istio-cni chained back into $name"
  kn delete pod late2 --ignore-not-found --wait=false >/dev/null
  kn run late2 --image "$CLIENT_IMAGE" --restart=Never \
    --overrides "{\"apiVersion\":\"v1\",\"spec\":{\"nodeName\":\"$CLIENT_NODE\",\"terminationGracePeriodSeconds\":1}}" \
    --command -- sleep 1000000
  kn wait --for=condition=Ready pod/late2 --timeout "$WAIT"
  retry 30 pod_enrolled late2 || fail "pod created after the repair is not enrolled"
  pass "pod created after the repair is enrolled"
  kn delete pod late2 --wait=false
}

scenario_unlabel() {
  log "7. unlabel the namespace"
  local before
  before=$(kn get pods -l 'app in (server,client,other,optout)' -o jsonpath='{range .items[*]}{.metadata.uid} {.status.containerStatuses[0].restartCount}{"\n"}{end}' | sort)
  k label namespace "$APP_NS" istio.io/dataplane-mode-
  retry 30 none_enrolled || fail "ambient.istio.io/redirection still present 30 s after unlabelling"
  pass "annotations removed"
  local since
  since=$(now)
  expect_ok client
  expect_ok other
  sleep 2
  if logged_mtls "$since" client server; then
    fail "ztunnel still proxies client -> server after unlabelling"
  fi
  pass "plaintext again: both reach the server, no ztunnel access-log line"
  local after
  after=$(kn get pods -l 'app in (server,client,other,optout)' -o jsonpath='{range .items[*]}{.metadata.uid} {.status.containerStatuses[0].restartCount}{"\n"}{end}' | sort)
  [ "$before" = "$after" ] || fail "pods were restarted or replaced by unenrolment"
  pass "no pod restarted"
}

main() {
  "$KIND_DIR/prereqs.sh"
  case "$MODE" in inpod | geneve) ;; *) die "E2E_REDIRECT_MODE must be inpod or geneve, not $MODE" ;; esac
  setup_cluster
  load_images
  install_chart
  deploy_workloads
  scenario_plaintext_before_label
  scenario_label_enrols
  scenario_authorization_policy
  scenario_ztunnel_restart
  scenario_node_agent_restart
  scenario_cni_config_repair
  scenario_unlabel
  log "e2e-kind: all scenarios passed (mode $MODE). 'make e2e-kind-clean' deletes the cluster."
}

main "$@"
