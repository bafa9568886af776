# Pinned versions of everything the test control plane is built from.
# Sourced by build.sh and up.sh. Changing one changes the cache key, so the
# next build.sh rebuilds only what changed. Keep these in step with the
# wrapper modules under go/ (build.sh checks that they agree).
K8S_VERSION=v1.36.3      # kube-apiserver, controller-manager, scheduler, kubectl
ETCD_VERSION=v3.6.16     # the 3.6 line is what Kubernetes 1.36 ships its client for
KWOK_VERSION=v0.8.0      # built against the 1.36 libraries
HELM_VERSION=v3.21.4     # built with client-go v0.36
GO_VERSION_REQUIRED=1.26
# The kstatus harness tool (go/kstatus): kstatus verdicts and Argo CD Lua health
# checks. Not part of the cache key: build.sh rebuilds it when its sources change.
KSTATUS_VERSION=v0.37.2  # sigs.k8s.io/cli-utils (pkg/kstatus)
GOPHER_LUA_VERSION=v1.1.2 # github.com/yuin/gopher-lua, the Lua that Argo CD embeds
# The metrics-adapter harness tool (go/metrics-adapter): custom.metrics.k8s.io
# for the HPA controller. Likewise rebuilt when its sources change.
CUSTOM_METRICS_APISERVER_VERSION=v1.36.0 # sigs.k8s.io/custom-metrics-apiserver (test-adapter)
# Kueue (go/kueue): the queue manager that admits queued training jobs (quota,
# priorities, preemption, topology-aware placement). Rebuilt when go/kueue changes.
KUEUE_VERSION=v0.17.0     # sigs.k8s.io/kueue: its v1beta2 API and the batch/job integration
# The Gateway API (go/gateway-api): its standard-channel CRDs, for the
# operator's HTTPRoutes (--gateway-api). Recopied when go/gateway-api changes.
GATEWAY_API_VERSION=v1.5.0 # sigs.k8s.io/gateway-api: HTTPRoute v1
# The Gateway API Inference Extension (go/inference-extension): its
# InferencePool CRD, for the operator's --inference-pool. Recopied when
# go/inference-extension changes.
INFERENCE_EXTENSION_VERSION=v1.3.0 # sigs.k8s.io/gateway-api-inference-extension: InferencePool v1

KBIN_CACHE=${MOE_KBIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moe-operator/kbin}
