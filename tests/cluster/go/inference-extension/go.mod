// Wrapper module that pins the Gateway API Inference Extension for the test
// control plane: build.sh copies its InferencePool CRD
// (inference.networking.k8s.io/v1), which up.sh installs; the operator's
// --inference-pool makes InferencePools against it.
module moe-operator.invalid/tests/cluster/inference-extension

go 1.26.0

require sigs.k8s.io/gateway-api-inference-extension v1.3.0
