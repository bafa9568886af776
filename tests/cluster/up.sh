#!/usr/bin/env bash
# Starts a real Kubernetes control plane on 127.0.0.1 for tests: etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler and KWOK with a fake
# GPU node pool. Builds what is missing first (build.sh, cached by version).
#
# Writes tests/cluster/.state/env, which exports KUBECONFIG (admin) and puts the
# pinned kubectl/helm first on PATH:   source tests/cluster/.state/env
# Idempotent: while the plane is running a second call returns at once.
#
# Knobs (environment): MOE_KWOK_GPU_NODES (default 24), MOE_CLUSTER_PORT_BASE
# (default 16000: apiserver on +443, etcd on +379/+380, KCM +257, scheduler +259,
# custom metrics adapter +445 (HTTPS, aggregated) and +80 (plain HTTP, metric writes),
# Kueue's webhooks +446 and its health probes +81).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/versions.sh"
state="$here/.state"
gpu_nodes=${MOE_KWOK_GPU_NODES:-24}
base=${MOE_CLUSTER_PORT_BASE:-16000}
api_port=$((base + 443)) etcd_port=$((base + 379)) etcd_peer=$((base + 380))
kcm_port=$((base + 257)) sched_port=$((base + 259))
adapter_port=$((base + 445)) adapter_write_port=$((base + 80))
kueue_webhook_port=$((base + 446)) kueue_health_port=$((base + 81))
server="https://127.0.0.1:$api_port"
t_start=$SECONDS

log() { echo "up.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

alive() { [[ -f "$state/pids/$1" ]] && kill -0 "$(cat "$state/pids/$1")" 2>/dev/null; }

if [[ -f "$state/env" ]] && alive etcd && alive kube-apiserver && alive kube-controller-manager &&
  alive kube-scheduler && alive kwok && alive metrics-adapter && alive kueue &&
  curl -fsS --cacert "$state/pki/ca.crt" "$server/readyz" >/dev/null 2>&1; then
  log "control plane already running ($server); source $state/env"
  exit 0
fi
# Half-started leftovers (a crash, a killed run): clear them before starting anew.
if [[ -d "$state" ]]; then "$here/down.sh" >/dev/null 2>&1 || true; fi

t0=$SECONDS
bin=$("$here/build.sh" | tail -n 1)
log "binaries ready in $((SECONDS - t0))s: $bin"
mkdir -p "$state"/{pki,logs,pids,etcd}
echo "$bin" >"$state/bin"

# ---------------------------------------------------------------- PKI
# One CA; a serving certificate with IP SAN 127.0.0.1 (rustls checks IP SANs);
# client certificates per identity; the ServiceAccount signing key pair.
pki="$state/pki"
ossl() { openssl "$@" >/dev/null 2>&1 || { openssl "$@"; exit 1; }; }
ossl req -x509 -newkey rsa:2048 -nodes -keyout "$pki/ca.key" -out "$pki/ca.crt" -days 3650 \
  -subj "/CN=moe-test-ca" -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
sign() { # name, subject, extensions
  ossl req -newkey rsa:2048 -nodes -keyout "$pki/$1.key" -out "$pki/$1.csr" -subj "$2"
  printf '%s\n' "$3" >"$pki/$1.ext"
  ossl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -out "$pki/$1.crt" -days 3650 -extfile "$pki/$1.ext"
}
sign apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.96.0.1"
client_ext="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
sign admin "/O=system:masters/CN=kubernetes-admin" "$client_ext"
sign kcm "/CN=system:kube-controller-manager" "$client_ext"
sign scheduler "/CN=system:kube-scheduler" "$client_ext"
sign kwok "/O=system:masters/CN=kwok-controller" "$client_ext"
sign kueue "/O=system:masters/CN=kueue-controller" "$client_ext"
# API aggregation: the apiserver proxies custom.metrics.k8s.io to the metrics
# adapter with a front-proxy client certificate from a CA of its own (whoever
# holds a certificate of that CA may assert any user in headers), and the
# adapter serves under the name the aggregator checks: <service>.<namespace>.svc.
ossl req -x509 -newkey rsa:2048 -nodes -keyout "$pki/front-proxy-ca.key" -out "$pki/front-proxy-ca.crt" -days 3650 \
  -subj "/CN=moe-test-front-proxy-ca" -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
ossl req -newkey rsa:2048 -nodes -keyout "$pki/front-proxy-client.key" -out "$pki/front-proxy-client.csr" -subj "/CN=front-proxy-client"
printf '%s\n' "$client_ext" >"$pki/front-proxy-client.ext"
ossl x509 -req -in "$pki/front-proxy-client.csr" -CA "$pki/front-proxy-ca.crt" -CAkey "$pki/front-proxy-ca.key" \
  -CAcreateserial -out "$pki/front-proxy-client.crt" -days 3650 -extfile "$pki/front-proxy-client.ext"
sign metrics-adapter "/CN=custom-metrics.kube-system.svc" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:custom-metrics.kube-system.svc,DNS:localhost,IP:127.0.0.1"
ossl genrsa -out "$pki/sa.key" 2048
ossl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub"

kubeconfig() { # identity -> $pki/<identity>.kubeconfig, certificates embedded
  cat >"$pki/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: moe-test
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
- name: $1
  user:
    client-certificate-data: $(base64 -w0 "$pki/$1.crt")
    client-key-data: $(base64 -w0 "$pki/$1.key")
contexts:
- name: moe-test
  context: {cluster: moe-test, user: $1}
current-context: moe-test
EOF
}
for id in admin kcm scheduler kwok kueue; do kubeconfig "$id"; done

# ---------------------------------------------------------------- processes
start() { # name, args...: runs bin/name in the background, logs to logs/name.log
  local name=$1; shift
  setsid "$bin/$name" "$@" >"$state/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$state/pids/$name"
}
wait_for() { # what, seconds, command...
  local what=$1 limit=$2 t=$SECONDS; shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS - t > limit)); then die "$what not healthy after ${limit}s; see $state/logs/"; fi
    # A process of ours that exited will not become healthy: say so now.
    if [[ -f "$state/pids/$what" ]] && ! alive "$what"; then die "$what exited; see $state/logs/$what.log"; fi
    sleep 0.5
  done
  log "$what healthy after $((SECONDS - t))s"
}

start etcd --name=node0 --data-dir="$state/etcd" \
  --listen-client-urls="http://127.0.0.1:$etcd_port" --advertise-client-urls="http://127.0.0.1:$etcd_port" \
  --listen-peer-urls="http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer" \
  --initial-cluster="node0=http://127.0.0.1:$etcd_peer" --listen-metrics-urls="" \
  --unsafe-no-fsync=true --auto-compaction-retention=1 --quota-backend-bytes=2147483648 --log-level=warn
wait_for etcd 60 curl -fsS "http://127.0.0.1:$etcd_port/health"

# Audit trail of one identity only, the operator's ServiceAccount as the e2e
# harness installs it with the chart (release moe in moe-system): the RBAC test
# (tests/e2e/tests/rbac.rs) checks, after the training and inference suites,
# that every permission the chart grants was used and that none was missing.
cat >"$state/audit-policy.yaml" <<EOF
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  users: ["system:serviceaccount:moe-system:moe-moe-operator"]
- level: None
EOF
# Kubernetes' Workload-Aware Scheduling (alpha in 1.36): the PodGroup API, and
# the scheduler's gang, topology and whole-gang preemption, for the operator's
# --gang-scheduling=workload-api. Pods without spec.schedulingGroup are
# scheduled exactly as before.
workload_gates=GenericWorkload=true,GangScheduling=true,TopologyAwareWorkloadScheduling=true,WorkloadAwarePreemption=true
start kube-apiserver --etcd-servers="http://127.0.0.1:$etcd_port" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" \
  --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
  --client-ca-file="$pki/ca.crt" \
  --requestheader-client-ca-file="$pki/front-proxy-ca.crt" --requestheader-allowed-names=front-proxy-client \
  --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --proxy-client-cert-file="$pki/front-proxy-client.crt" --proxy-client-key-file="$pki/front-proxy-client.key" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
  --api-audiences=https://kubernetes.default.svc.cluster.local \
  --service-cluster-ip-range=10.96.0.0/16 \
  --authorization-mode=Node,RBAC \
  --enable-admission-plugins=OwnerReferencesPermissionEnforcement \
  --allow-privileged=true \
  --enable-priority-and-fairness=false --profiling=false --v=1 \
  --audit-policy-file="$state/audit-policy.yaml" --audit-log-path="$state/logs/audit.log" \
  --cert-dir="$state/apiserver-certs" \
  --feature-gates="$workload_gates" --runtime-config=scheduling.k8s.io/v1alpha2=true
wait_for kube-apiserver 180 curl -fsS --cacert "$pki/ca.crt" "$server/readyz"

# Slim controller set for 2 cores: what Jobs, GC, namespaces, ServiceAccounts,
# node loss, workloads, PDBs and HPAs need. node-monitor-grace-period is short so
# a NotReady node is acted on within seconds in tests; the HPA syncs every 2s and
# scales down after 10s of lower recommendations (defaults: 15s and 5 min).
start kube-controller-manager --kubeconfig="$pki/kcm.kubeconfig" \
  --authentication-kubeconfig="$pki/kcm.kubeconfig" --authorization-kubeconfig="$pki/kcm.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$kcm_port" --leader-elect=false \
  --use-service-account-credentials=true \
  --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
  --cluster-name=moe-test --node-monitor-grace-period=20s --node-monitor-period=2s \
  --horizontal-pod-autoscaler-sync-period=2s --horizontal-pod-autoscaler-downscale-stabilization=10s \
  --controllers=job-controller,garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller,root-ca-certificate-publisher-controller,node-lifecycle-controller,taint-eviction-controller,pod-garbage-collector-controller,replicaset-controller,deployment-controller,statefulset-controller,ttl-after-finished-controller,endpointslice-controller,resourcequota-controller,clusterrole-aggregation-controller,disruption-controller,cronjob-controller,persistentvolume-binder-controller,persistentvolumeclaim-protection-controller,persistentvolume-protection-controller,horizontal-pod-autoscaler-controller,podgroup-protection-controller,resourceclaim-controller \
  --feature-gates="$workload_gates" --cert-dir="$state/kcm-certs" --v=1
cat >"$state/scheduler.yaml" <<EOF
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection: {kubeconfig: $pki/scheduler.kubeconfig}
leaderElection: {leaderElect: false}
EOF
start kube-scheduler --config="$state/scheduler.yaml" \
  --authentication-kubeconfig="$pki/scheduler.kubeconfig" --authorization-kubeconfig="$pki/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$sched_port" --cert-dir="$state/scheduler-certs" \
  --feature-gates="$workload_gates" --v=1

# KWOK: upstream stages from the pinned module plus our own (kwok-stages.yaml).
{
  cat <<EOF
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options:
  # Pod IPs from a loopback range: nothing here can route to pods, but a test
  # can listen on a pod's IP (all of 127/8 is local) to play that pod's server.
  cidr: 127.244.0.0/16
  manageAllNodes: false
  manageNodesWithAnnotationSelector: kwok.x-k8s.io/node=fake
  # Leases renew every quarter of this: every 5 s, four renewals inside the
  # controller-manager's 20 s node-monitor grace period, so a starved 2-core
  # host (tests compiling beside the cluster) does not see a node go NotReady
  # and its pods disrupted by a renewal 10 s late (with 40: one renewal a grace).
  nodeLeaseDurationSeconds: 20
  # kwok applies its defaults only to a config it generates itself; set the
  # parallelism it refuses to start without.
  podPlayStageParallelism: 4
  nodePlayStageParallelism: 4
  nodeLeaseParallelism: 4
  podsOnNodeSyncParallelism: 1
EOF
  for f in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease node/chaos/node-not-ready \
    pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete \
    pod/chaos/pod-container-running-failed pod/chaos/pod-init-container-running-failed; do
    echo "---"; cat "$bin/kwok-stages/$f.yaml"
  done
  echo "---"; cat "$here/kwok-stages.yaml"
} >"$state/kwok.yaml"
start kwok --kubeconfig="$pki/kwok.kubeconfig" --config="$state/kwok.yaml"

# The custom metrics adapter (upstream's test adapter): custom.metrics.k8s.io
# for the HPA, values written by tests over plain HTTP on loopback. It reads the
# apiserver's requestheader CA at start, so it starts after the apiserver.
start metrics-adapter --lister-kubeconfig="$pki/admin.kubeconfig" \
  --authentication-kubeconfig="$pki/admin.kubeconfig" --authorization-kubeconfig="$pki/admin.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$adapter_port" \
  --tls-cert-file="$pki/metrics-adapter.crt" --tls-private-key-file="$pki/metrics-adapter.key" \
  --write-metrics-address="127.0.0.1:$adapter_write_port" --v=1

wait_for kube-controller-manager 120 curl -fsSk "https://127.0.0.1:$kcm_port/healthz"
wait_for kube-scheduler 120 curl -fsSk "https://127.0.0.1:$sched_port/healthz"

export KUBECONFIG="$pki/admin.kubeconfig"
kubectl() { "$bin/kubectl" "$@"; }
wait_for "default ServiceAccount" 120 kubectl get serviceaccount default -n default

# Register the adapter with the aggregator. No Service networking here: an
# ExternalName Service makes the aggregator dial localhost:<port> (it resolves
# Services itself, without --enable-aggregator-routing, which would need
# Endpoints, and those refuse loopback addresses).
wait_for metrics-adapter 120 curl -fsSk "https://127.0.0.1:$adapter_port/healthz"
ca_bundle=$(base64 -w0 "$pki/ca.crt")
{
  cat <<EOF
apiVersion: v1
kind: Service
metadata: {name: custom-metrics, namespace: kube-system}
spec: {type: ExternalName, externalName: localhost}
EOF
  for v in v1beta2 v1beta1; do
    cat <<EOF
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: $v.custom.metrics.k8s.io}
spec:
  group: custom.metrics.k8s.io
  version: $v
  service: {name: custom-metrics, namespace: kube-system, port: $adapter_port}
  caBundle: $ca_bundle
  groupPriorityMinimum: 100
  versionPriority: $([[ $v == v1beta2 ]] && echo 200 || echo 100)
EOF
  done
} | kubectl apply -f - >/dev/null
wait_for "custom.metrics.k8s.io" 120 kubectl get --raw /apis/custom.metrics.k8s.io/v1beta2

# ---------------------------------------------------------------- Gateway API
# Its CRDs only: no Gateway controller runs, so routes are stored and
# validated by the apiserver (the HTTPRoute schema and its CEL rules) but
# never accepted by a gateway; a test plays the controller where it must.
kubectl apply --server-side -f "$bin/gateway-crds" >/dev/null
kubectl wait --for condition=established --timeout=60s crd/httproutes.gateway.networking.k8s.io >/dev/null
# The Inference Extension's InferencePool, likewise without an endpoint picker.
kubectl apply --server-side -f "$bin/inference-crds" >/dev/null
kubectl wait --for condition=established --timeout=60s crd/inferencepools.inference.networking.k8s.io >/dev/null

# ---------------------------------------------------------------- Kueue
# Installed as its release manifests install it (CRDs with conversion webhooks,
# every webhook of its kustomize build), run as a process: its webhook Service
# is an ExternalName one (localhost, as for the metrics adapter) and every
# reference to it names our port. Kueue issues its own serving certificate and
# injects the CA into the CRDs and webhook configurations (internal certs).
# The integrations the operator's children use are enabled: batch/job (training
# attempts), and pod, deployment and statefulset (serving replicas; a replica
# group's StatefulSet is one pod group); the rest answer as no-ops.
kdir="$state/kueue"
mkdir -p "$kdir/certs"
cp -r "$bin/kueue-config/crd" "$bin/kueue-config/webhook" "$kdir/"
cat >"$kdir/kustomization.yaml" <<EOF
namespace: kueue-system
namePrefix: kueue-
resources: [crd, webhook]
patches:
- target: {kind: Service, name: webhook-service}
  patch: |-
    - {op: replace, path: /spec, value: {type: ExternalName, externalName: localhost}}
EOF
kubectl create namespace kueue-system >/dev/null
# The Secret Kueue's certificate rotator fills (its release ships it empty).
kubectl create secret generic kueue-webhook-server-cert -n kueue-system >/dev/null
kubectl kustomize "$kdir" | sed -E "s/^( {6,})name: kueue-webhook-service$/&\n\1port: $kueue_webhook_port/" \
  >"$kdir/manifests.yaml"
grep -q "port: $kueue_webhook_port" "$kdir/manifests.yaml" || die "Kueue manifests: no webhook reference to rewrite"
kubectl apply --server-side -f "$kdir/manifests.yaml" >/dev/null
cat >"$kdir/config.yaml" <<EOF
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: kueue-system
health: {healthProbeBindAddress: "127.0.0.1:$kueue_health_port"}
metrics: {bindAddress: "0"}
webhook: {host: 127.0.0.1, port: $kueue_webhook_port, certDir: $kdir/certs}
leaderElection: {leaderElect: false}
internalCertManagement: {enable: true, webhookServiceName: kueue-webhook-service, webhookSecretName: kueue-webhook-server-cert}
integrations: {frameworks: ["batch/job", "pod", "deployment", "statefulset"]}
clientConnection: {qps: 50, burst: 100}
EOF
start kueue --config="$kdir/config.yaml" --kubeconfig="$pki/kueue.kubeconfig" \
  --feature-gates=VisibilityOnDemand=false --zap-log-level=info
# In a cluster the kubelet mounts that Secret where the webhook server reads
# its certificate, and Kueue waits for the files: play the kubelet's part.
kueue_cert() { # writes the Secret's keys into the cert dir once the rotator has filled it
  local key v
  for key in tls.crt tls.key ca.crt; do
    v=$(kubectl get secret kueue-webhook-server-cert -n kueue-system -o "jsonpath={.data.${key//./\\.}}") && [[ -n "$v" ]] || return 1
    base64 -d <<<"$v" >"$kdir/certs/$key.tmp" && mv "$kdir/certs/$key.tmp" "$kdir/certs/$key"
  done
}
wait_for "Kueue's serving certificate" 120 kueue_cert
wait_for kueue 180 curl -fsS "http://127.0.0.1:$kueue_health_port/readyz"

# ---------------------------------------------------------------- fake nodes
"$here/nodes.sh" "$gpu_nodes" | kubectl apply -f - >/dev/null
wait_for "kwok" 60 kill -0 "$(cat "$state/pids/kwok")"
t=$SECONDS
kubectl wait --for=condition=Ready node -l type=kwok --timeout=180s >/dev/null ||
  die "fake nodes not Ready; see $state/logs/kwok.log"
# Ready nodes lose the not-ready taint shortly after; scheduling needs that.
until [[ -z "$(kubectl get nodes -l type=kwok -o jsonpath='{range .items[*]}{.spec.taints[?(@.key=="node.kubernetes.io/not-ready")].key}{end}')" ]]; do
  ((SECONDS - t < 120)) || die "not-ready taint still on fake nodes"
  sleep 0.5
done
log "$(kubectl get nodes -l type=kwok --no-headers | wc -l) fake nodes Ready after $((SECONDS - t))s"

cat >"$state/env" <<EOF
# Generated by tests/cluster/up.sh: source it to talk to the test control plane.
export KUBECONFIG="$pki/admin.kubeconfig"
export PATH="$bin:\$PATH"
export MOE_CLUSTER_STATE="$state"
export MOE_CLUSTER_SERVER="$server"
# POST a value to \$MOE_METRICS_WRITE_URL/namespaces/<ns>/pods/<pod>/<metric> to set a custom metric.
export MOE_METRICS_WRITE_URL="http://127.0.0.1:$adapter_write_port/write-metrics"
EOF
log "control plane up in $((SECONDS - t_start))s at $server; source $state/env"
