#!/usr/bin/env bash
# Builds the pinned control-plane binaries from Go modules into a cache outside
# git, keyed by version. Builds only what is missing, so a warm call is instant.
# Usage: tests/cluster/build.sh   (prints the bin directory on its last line)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.sh
source "$here/versions.sh"

command -v go >/dev/null || { echo "build.sh: go is required (Go $GO_VERSION_REQUIRED.x)" >&2; exit 1; }
gov=$(go env GOVERSION)
case "$gov" in go"$GO_VERSION_REQUIRED"*) ;; *) echo "build.sh: need Go $GO_VERSION_REQUIRED.x, found $gov" >&2; exit 1;; esac

bin="$KBIN_CACHE/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION-$gov"
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local
# The Go build cache of these builds grows to several GiB and is of no use once
# the binaries are cached, so it lives beside them and goes when the build
# succeeds (MOE_GOCACHE keeps one elsewhere, untouched).
export GOCACHE=${MOE_GOCACHE:-$KBIN_CACHE/go-build}
flags=(-trimpath -tags=selinux,notest,grpcnotrace)

require_pin() { # module dir, module path, version: the wrapper must pin what versions.sh says
  grep -qE "^\s*(require )?$2 $3( // indirect)?$" "$here/go/$1/go.mod" ||
    { echo "build.sh: go/$1/go.mod does not require $2 $3 (versions.sh)" >&2; exit 1; }
}

module_dir() { # module dir, module path: where the wrapper's pinned version lies in the module cache
  # `go list -m` prints an empty Dir for a module not downloaded yet: on a
  # fresh machine only what a build needed is there (the Inference
  # Extension's CRDs are copied, never built), so download it first.
  (cd "$here/go/$1" && go mod download "$2" && go list -m -f '{{.Dir}}' "$2")
}

step() { # name, then the command that builds it into $bin/name
  local name=$1; shift
  if [[ -x "$bin/$name" ]]; then return; fi
  local t0=$SECONDS
  echo "build.sh: building $name ..." >&2
  "$@"
  echo "build.sh: built $name in $((SECONDS - t0))s" >&2
}

k8s_ldflags() {
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local f="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    f+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    f+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$f"
}

build_k8s() {
  require_pin k8s k8s.io/kubernetes "$K8S_VERSION"
  (cd "$here/go/k8s" && go build "${flags[@]}" -ldflags "$(k8s_ldflags)" -o "$bin/$1.tmp" "k8s.io/kubernetes/cmd/$1")
  mv "$bin/$1.tmp" "$bin/$1"
}
build_etcd() {
  require_pin etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
  (cd "$here/go/etcd" && go build "${flags[@]}" -ldflags "-s -w" -o "$bin/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv "$bin/etcd.tmp" "$bin/etcd"
}
build_kwok() {
  require_pin kwok sigs.k8s.io/kwok "$KWOK_VERSION"
  (cd "$here/go/kwok" && go build "${flags[@]}" \
    -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" -o "$bin/kwok.tmp" sigs.k8s.io/kwok/cmd/kwok)
  mv "$bin/kwok.tmp" "$bin/kwok"
}
build_helm() {
  require_pin helm helm.sh/helm/v3 "$HELM_VERSION"
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local f="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    f+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$minor"
  done
  (cd "$here/go/helm" && go build "${flags[@]}" -ldflags "$f" -o "$bin/helm.tmp" helm.sh/helm/v3/cmd/helm)
  mv "$bin/helm.tmp" "$bin/helm"
}

# Fast ones first, so a partial cache is still useful; the apiserver is the big one.
step etcd build_etcd
step kwok build_kwok
step helm build_helm
for c in kubectl kube-scheduler kube-controller-manager kube-apiserver; do step "$c" build_k8s "$c"; done

# The kstatus harness tool: its main.go lives in this repository, so a hash of
# its sources (in a stamp beside it) decides whether to rebuild it.
build_kstatus() {
  require_pin kstatus sigs.k8s.io/cli-utils "$KSTATUS_VERSION"
  require_pin kstatus github.com/yuin/gopher-lua "$GOPHER_LUA_VERSION"
  (cd "$here/go/kstatus" && go build "${flags[@]}" -ldflags "-s -w" -o "$bin/kstatus.tmp" .)
  mv "$bin/kstatus.tmp" "$bin/kstatus"
}
kstatus_sum=$(cat "$here/go/kstatus/go.mod" "$here/go/kstatus/go.sum" "$here/go/kstatus/main.go" | sha256sum | cut -c1-16)
[[ "$(cat "$bin/kstatus.stamp" 2>/dev/null)" == "$kstatus_sum" ]] || rm -f "$bin/kstatus"
step kstatus build_kstatus
echo "$kstatus_sum" >"$bin/kstatus.stamp"

# The metrics-adapter harness tool: upstream's custom metrics test adapter
# behind a main of ours (a flag for its write address); rebuilt like kstatus.
build_metrics_adapter() {
  require_pin metrics-adapter sigs.k8s.io/custom-metrics-apiserver "$CUSTOM_METRICS_APISERVER_VERSION"
  (cd "$here/go/metrics-adapter" && go build "${flags[@]}" -ldflags "-s -w" -o "$bin/metrics-adapter.tmp" .)
  mv "$bin/metrics-adapter.tmp" "$bin/metrics-adapter"
}
adapter_sum=$(cat "$here/go/metrics-adapter/go.mod" "$here/go/metrics-adapter/go.sum" "$here/go/metrics-adapter/main.go" | sha256sum | cut -c1-16)
[[ "$(cat "$bin/metrics-adapter.stamp" 2>/dev/null)" == "$adapter_sum" ]] || rm -f "$bin/metrics-adapter"
step metrics-adapter build_metrics_adapter
echo "$adapter_sum" >"$bin/metrics-adapter.stamp"

# Kueue's manager, and the manifests it is installed from (CRDs and webhooks,
# assembled by up.sh with the kustomize built into kubectl); rebuilt like kstatus.
build_kueue() {
  require_pin kueue sigs.k8s.io/kueue "$KUEUE_VERSION"
  (cd "$here/go/kueue" && go build "${flags[@]}" -ldflags "-s -w" -o "$bin/kueue.tmp" sigs.k8s.io/kueue/cmd/kueue)
  local dir
  dir=$(module_dir kueue sigs.k8s.io/kueue)
  rm -rf "$bin/kueue-config" "$bin/kueue-config.tmp" && mkdir "$bin/kueue-config.tmp"
  cp -r "$dir/config/components/crd" "$dir/config/components/webhook" "$bin/kueue-config.tmp/"
  chmod -R u+w "$bin/kueue-config.tmp" && mv "$bin/kueue-config.tmp" "$bin/kueue-config"
  mv "$bin/kueue.tmp" "$bin/kueue"
}
kueue_sum=$(cat "$here/go/kueue/go.mod" "$here/go/kueue/go.sum" | sha256sum | cut -c1-16)
[[ "$(cat "$bin/kueue.stamp" 2>/dev/null)" == "$kueue_sum" ]] || rm -f "$bin/kueue"
step kueue build_kueue
echo "$kueue_sum" >"$bin/kueue.stamp"

# The Gateway API's standard-channel CRDs that the operator's HTTPRoutes need
# (GatewayClass, Gateway, HTTPRoute), installed by up.sh.
require_pin gateway-api sigs.k8s.io/gateway-api "$GATEWAY_API_VERSION"
gateway_sum=$(cat "$here/go/gateway-api/go.mod" "$here/go/gateway-api/go.sum" | sha256sum | cut -c1-16)
[[ "$(cat "$bin/gateway-crds.stamp" 2>/dev/null)" == "$gateway_sum" ]] || rm -rf "$bin/gateway-crds"
if [[ ! -d "$bin/gateway-crds" ]]; then
  gateway_dir=$(module_dir gateway-api sigs.k8s.io/gateway-api)
  rm -rf "$bin/gateway-crds.tmp" && mkdir "$bin/gateway-crds.tmp"
  for kind in gatewayclasses gateways httproutes; do
    cp "$gateway_dir/config/crd/standard/gateway.networking.k8s.io_$kind.yaml" "$bin/gateway-crds.tmp/"
  done
  chmod -R u+w "$bin/gateway-crds.tmp" && mv "$bin/gateway-crds.tmp" "$bin/gateway-crds"
fi
echo "$gateway_sum" >"$bin/gateway-crds.stamp"

# The Gateway API Inference Extension's InferencePool CRD (the operator's
# --inference-pool), installed by up.sh beside the Gateway API's.
require_pin inference-extension sigs.k8s.io/gateway-api-inference-extension "$INFERENCE_EXTENSION_VERSION"
pool_sum=$(cat "$here/go/inference-extension/go.mod" "$here/go/inference-extension/go.sum" | sha256sum | cut -c1-16)
[[ "$(cat "$bin/inference-crds.stamp" 2>/dev/null)" == "$pool_sum" ]] || rm -rf "$bin/inference-crds"
if [[ ! -d "$bin/inference-crds" ]]; then
  pool_dir=$(module_dir inference-extension sigs.k8s.io/gateway-api-inference-extension)
  rm -rf "$bin/inference-crds.tmp" && mkdir "$bin/inference-crds.tmp"
  cp "$pool_dir/config/crd/bases/inference.networking.k8s.io_inferencepools.yaml" "$bin/inference-crds.tmp/"
  chmod -R u+w "$bin/inference-crds.tmp" && mv "$bin/inference-crds.tmp" "$bin/inference-crds"
fi
echo "$pool_sum" >"$bin/inference-crds.stamp"

# The kwok module ships its upstream stage definitions; up.sh assembles its config from them.
kwok_dir=$(module_dir kwok sigs.k8s.io/kwok)
if [[ ! -d "$bin/kwok-stages" ]]; then
  cp -r "$kwok_dir/kustomize/stage" "$bin/kwok-stages.tmp" && chmod -R u+w "$bin/kwok-stages.tmp" && mv "$bin/kwok-stages.tmp" "$bin/kwok-stages"
fi
[[ -n ${MOE_GOCACHE:-} ]] || rm -rf "$KBIN_CACHE/go-build"
echo "$bin"
