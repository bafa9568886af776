#!/usr/bin/env bash
# Prints the fake node pool as YAML (applied by up.sh): N H100 GPU nodes
# (8 GPUs each, GPU taint, block/rack topology), 2 A100 nodes (a non-Hopper
# pool, for placement tests), 3 CPU-only nodes, and three H100 pools that only
# Kueue's tests reach (Kueue's ResourceFlavors add the toleration of their
# moe.dev/pool taint): 4 nodes for quota and preemption (node.moe.dev/pool:
# kueue-quota), 4 more (kueue-spare), 8 for topology-aware scheduling
# (kueue-tas: 2 blocks of 2 racks of 2 nodes), and 4 for an elastic queued job
# (kueue-elastic: its quota, not the nodes, shrinks it and lets it grow). Their own pools, so the tests'
# gangs neither crowd other tests' pods nor find a node taken by one. Kueue's
# quota is per test, the nodes are not: no two tests that run at once share a
# pool (tests/e2e/src/kueue.rs). One more tainted pool, gang (5 nodes: a rack
# of 2 and a rack of 3), is for the scheduler's own gang scheduling
# (Workload-Aware Scheduling): its tests tolerate the taint themselves. And a
# tainted pool dra (2 nodes), each with one device of a fake DRA driver
# (fabric.moe.dev: a ResourceSlice per node, published here as a driver's
# kubelet plugin would, and the DeviceClass that selects them), for claims
# the scheduler allocates (Dynamic Resource Allocation). A tainted pool elastic
# (4 nodes) for an elastic job's gang that the test crowds and then frees, and
# gang-elastic (4 nodes) for the same under the Workload API. KWOK manages every node annotated
# kwok.x-k8s.io/node=fake and marks it Ready.
# Usage: nodes.sh [GPU_NODES]   (default 16; up.sh passes 24)
set -euo pipefail
gpu_nodes=${1:-16}
per_rack=4 racks_per_block=2

node() { # name, extra label lines, extra capacity, taints
  cat <<YAML
---
apiVersion: v1
kind: Node
metadata:
  name: $1
  annotations: {kwok.x-k8s.io/node: fake}
  labels:
    type: kwok
    kubernetes.io/hostname: $1
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    topology.kubernetes.io/region: region-a
    topology.kubernetes.io/zone: zone-a
$2
spec:
  taints: [$4]
status:
  capacity:    {cpu: "192", memory: 2048Gi, pods: "110", ephemeral-storage: 8Ti$3}
  allocatable: {cpu: "190", memory: 2000Gi, pods: "110", ephemeral-storage: 8Ti$3}
YAML
}
gpu_taint='{key: nvidia.com/gpu, value: present, effect: NoSchedule}'
gpu_labels() { # product, block, rack
  printf '    %s\n' 'nvidia.com/gpu.present: "true"' 'nvidia.com/gpu.count: "8"' \
    "nvidia.com/gpu.product: $1" "topology.moe.dev/block: $2" "topology.moe.dev/rack: $3"
}
for ((i = 0; i < gpu_nodes; i++)); do
  rack=$((i / per_rack))
  block=$((rack / racks_per_block))
  node "gpu-h100-$i" "$(gpu_labels NVIDIA-H100-80GB-HBM3 "block-$block" "rack-$rack")" ', nvidia.com/gpu: "8"' "$gpu_taint"
done
for i in 0 1; do
  node "gpu-a100-$i" "$(gpu_labels NVIDIA-A100-SXM4-80GB block-a100 rack-a100)" ', nvidia.com/gpu: "8"' "$gpu_taint"
done
for i in 0 1 2; do
  node "cpu-$i" "    node.moe.dev/pool: cpu" "" ""
done
tainted_pool() { # pool, node index, block, rack
  node "gpu-$1-$2" "$(gpu_labels NVIDIA-H100-80GB-HBM3 "$3" "$4")
    node.moe.dev/pool: $1" ', nvidia.com/gpu: "8"' "$gpu_taint, {key: moe.dev/pool, value: $1, effect: NoSchedule}"
}
for i in 0 1 2 3; do tainted_pool kueue-quota "$i" block-quota rack-quota; done
for i in 0 1 2 3; do tainted_pool kueue-spare "$i" block-spare rack-spare; done
for i in 0 1 2 3 4 5 6 7; do tainted_pool kueue-tas "$i" "block-tas-$((i / 4))" "rack-tas-$((i / 2))"; done
for i in 0 1 2 3; do tainted_pool kueue-elastic "$i" block-kueue-elastic rack-kueue-elastic; done
for i in 0 1 2 3 4; do tainted_pool gang "$i" block-gang "rack-gang-$((i < 2 ? 0 : 1))"; done
for i in 0 1; do tainted_pool dra "$i" block-dra rack-dra; done
for i in 0 1 2 3; do tainted_pool elastic "$i" block-elastic rack-elastic; done
for i in 0 1 2 3; do tainted_pool gang-elastic "$i" block-gang-elastic rack-gang-elastic; done
cat <<YAML
---
apiVersion: resource.k8s.io/v1
kind: DeviceClass
metadata: {name: fabric.moe.dev}
spec:
  selectors: [{cel: {expression: 'device.driver == "fabric.moe.dev"'}}]
YAML
for i in 0 1; do
  cat <<YAML
---
apiVersion: resource.k8s.io/v1
kind: ResourceSlice
metadata: {name: gpu-dra-$i-fabric}
spec:
  driver: fabric.moe.dev
  nodeName: gpu-dra-$i
  pool: {name: gpu-dra-$i, generation: 1, resourceSliceCount: 1}
  devices: [{name: nic-0}]
YAML
done
