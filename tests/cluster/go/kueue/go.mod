// Wrapper module that pins Kueue for the test control plane: build.sh builds
// its manager (sigs.k8s.io/kueue/cmd/kueue) and copies its CRD and webhook
// manifests; up.sh runs it beside the scheduler, admitting queued jobs.
module moe-operator.invalid/tests/cluster/kueue

go 1.26.0

require sigs.k8s.io/kueue v0.17.0
