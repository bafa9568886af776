// Wrapper module that pins the Kubernetes Gateway API for the test control
// plane: build.sh copies its standard-channel CRDs (GatewayClass, Gateway,
// HTTPRoute), which up.sh installs; the operator's --gateway-api makes
// HTTPRoutes against them.
module moe-operator.invalid/tests/cluster/gateway-api

go 1.26.0

require sigs.k8s.io/gateway-api v1.5.0
