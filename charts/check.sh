#!/usr/bin/env bash
# Checks the Helm chart without a cluster, with the pinned helm of tests/cluster/
# (tests/run.sh runs it as its `chart` phase):
#   - helm lint --strict, with the default values and with ci/full-values.yaml
#     (every value set to something other than its default);
#   - helm template with both, and the objects each must render;
#   - values.schema.json rejects a wrong type and an unknown key, naming them;
#   - crds.enabled / crds.keep gate the CRD templates;
#   - the Argo CD health checks under deploy/argocd/ give their tested verdicts.
# Usage: charts/check.sh   (builds/reuses the pinned helm and kstatus via tests/cluster/build.sh)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=$(tests/cluster/build.sh | tail -n 1)
export PATH="$bin:$PATH"
chart=charts/moe-operator
full=$chart/ci/full-values.yaml
passed=0 failed=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

check() { # description, command...: one check, reported like a test
  local what=$1; shift
  if out=$("$@" 2>&1); then
    passed=$((passed + 1)); echo "chart check $what ... ok"
  else
    failed=$((failed + 1)); echo "chart check $what ... FAILED"; echo "$out" | sed 's/^/    /'
  fi
}
kinds() { # rendered manifests on stdin -> sorted "Kind/name" lines
  awk '/^kind:/ {k=$2} /^  name:/ && k {print k "/" $2; k=""}' | sort
}
want_kinds() { # file, expected "Kind/name" lines...
  local file=$1; shift
  diff <(printf '%s\n' "$@" | sort) <(kinds <"$file")
}
rejects() { # expected error text, helm template arguments...: rendering must fail saying so
  local want=$1; shift
  if out=$(helm template moe "$chart" "$@" 2>&1); then echo "rendered, but should fail with: $want"; return 1; fi
  grep -qF -- "$want" <<<"$out" || { echo "error does not say '$want':"; echo "$out"; return 1; }
}

undocumented_values() { # every key of values.yaml has a comment above it, or follows a documented sibling
  awk '
    /^[[:space:]]*#/ {c = 1; next}
    /^[[:space:]]*$/ {c = 0; prev = -1; next}
    /^[[:space:]]*- / {c = 0; next}
    /^[[:space:]]*[A-Za-z][A-Za-z0-9]*:/ {
      match($0, /^ */); ind = RLENGTH
      key = $1; sub(/:.*/, "", key)
      if (res >= 0 && ind > res) next   # inside resources: Kubernetes fields
      res = -1
      ok = c || (prev == ind && prev_ok)
      if (!ok) { print FILENAME ":" NR ": " key " has no comment"; bad = 1 }
      if (key == "resources") res = ind
      prev = ind; prev_ok = ok; c = 0; next
    }
    {c = 0}
    BEGIN {res = -1; prev = -1}
    END {exit bad}' "$chart/values.yaml"
}

check "every value in values.yaml is documented" undocumented_values
check "lint --strict (default values)" helm lint --strict "$chart"
check "lint --strict (full values)" helm lint --strict "$chart" -f "$full"
check "template (default values)" sh -c "helm template moe $chart -n moe-system >$tmp/default.yaml"
check "template (full values)" sh -c "helm template moe $chart -n moe-system -f $full >$tmp/full.yaml"
check "default values render the operator, its RBAC, metrics Service, PDB, CRDs and helm test" want_kinds "$tmp/default.yaml" \
  ClusterRole/moe-moe-operator ClusterRoleBinding/moe-moe-operator Role/moe-moe-operator-leader-election \
  RoleBinding/moe-moe-operator-leader-election ServiceAccount/moe-moe-operator Service/moe-moe-operator \
  Deployment/moe-moe-operator PodDisruptionBudget/moe-moe-operator Pod/moe-moe-operator-test-ready \
  CustomResourceDefinition/moetrainingjobs.moe.dev CustomResourceDefinition/moeinferenceservices.moe.dev
check "full values add the ServiceMonitor, the workers' PodMonitors and NetworkPolicy; watchNamespace makes the RBAC a Role" want_kinds "$tmp/full.yaml" \
  Role/moe-moe-operator RoleBinding/moe-moe-operator Role/moe-moe-operator-leader-election \
  RoleBinding/moe-moe-operator-leader-election ServiceAccount/moe-operator-full Service/moe-moe-operator \
  Deployment/moe-moe-operator PodDisruptionBudget/moe-moe-operator Pod/moe-moe-operator-test-ready \
  CustomResourceDefinition/moetrainingjobs.moe.dev CustomResourceDefinition/moeinferenceservices.moe.dev ServiceMonitor/moe-moe-operator NetworkPolicy/moe-moe-operator \
  PodMonitor/moe-moe-operator-training PodMonitor/moe-moe-operator-serving
check "the training PodMonitor scrapes rank 0 only, in the watched namespace" sh -c "
  grep -A14 'name: moe-moe-operator-training' $tmp/full.yaml | grep -qF 'batch.kubernetes.io/job-completion-index: \"0\"' &&
  grep -A18 'name: moe-moe-operator-training' $tmp/full.yaml | grep -qF 'matchNames: [training]' &&
  grep -A18 'name: moe-moe-operator-serving' $tmp/full.yaml | grep -qF 'moe.dev/role: server'"
check "the worker image reaches the operator as --worker-image" \
  grep -qF -- "- --worker-image=registry.example.com/moe/moe-worker:9.9.9-cuda12.8" "$tmp/full.yaml"
check "the default worker image is the appVersion's" \
  grep -qF -- "- --worker-image=ghcr.io/moe-operator/moe-worker:$(awk '/^appVersion:/ {gsub(/"/, "", $2); print $2}' $chart/Chart.yaml)" "$tmp/default.yaml"
check "the operator image digest wins over the tag" \
  grep -qF 'image: "registry.example.com/moe/moe-operator@sha256:0123456789abcdef' "$tmp/full.yaml"
check "crds.keep=true (default) annotates the CRD" grep -qF "helm.sh/resource-policy: keep" "$tmp/default.yaml"
check "gangScheduling passes the flag, and only workload-api grants podgroups" sh -c "
  grep -qF -- '- --gang-scheduling=workload-api' $tmp/full.yaml && grep -qF 'resources: [podgroups]' $tmp/full.yaml &&
  grep -qF -- '- --gang-scheduling=none' $tmp/default.yaml && ! grep -q podgroups $tmp/default.yaml"
check "gatewayAPI passes --gateway-api and grants httproutes, only when enabled" sh -c "
  grep -qF -- '- --gateway-api' $tmp/full.yaml && grep -qF 'resources: [httproutes]' $tmp/full.yaml &&
  ! grep -qF -- '- --gateway-api' $tmp/default.yaml && ! grep -qF 'resources: [httproutes]' $tmp/default.yaml"
check "gatewayAPI.inferencePool passes --inference-pool and grants inferencepools, only when enabled" sh -c "
  grep -qF -- '- --inference-pool' $tmp/full.yaml && grep -qF 'resources: [inferencepools]' $tmp/full.yaml &&
  ! grep -qF -- '- --inference-pool' $tmp/default.yaml && ! grep -qF 'resources: [inferencepools]' $tmp/default.yaml &&
  ! helm template moe $chart --set gatewayAPI.inferencePool=true | grep -qF -- '- --inference-pool'"
check "crds.keep=false leaves the CRD deletable" sh -c "! grep -q 'resource-policy' $tmp/full.yaml"
check "crds.enabled=false renders no CRD" sh -c \
  "helm template moe $chart --set crds.enabled=false | grep -c '^kind: CustomResourceDefinition' | grep -qx 0"
check "every pod and container is Pod Security restricted" sh -c "
  for f in $tmp/default.yaml $tmp/full.yaml; do
    [ \$(grep -c 'runAsNonRoot: true' \$f) -ge 4 ] && [ \$(grep -c 'readOnlyRootFilesystem: true' \$f) -eq 2 ] &&
    [ \$(grep -c 'allowPrivilegeEscalation: false' \$f) -eq 2 ] && [ \$(grep -c 'capabilities: {drop: \[ALL\]}' \$f) -eq 2 ] &&
    [ \$(grep -c 'seccompProfile: {type: RuntimeDefault}' \$f) -eq 4 ] || { echo \"\$f\"; exit 1; }
  done"
check "the helm test pod is not selected by the operator's Service, ReplicaSet or PDB" sh -c "
  helm template moe $chart --show-only templates/tests/test-ready.yaml | grep -q 'app.kubernetes.io/name: moe-operator-test' &&
  ! helm template moe $chart --show-only templates/tests/test-ready.yaml | grep -q 'app.kubernetes.io/name: moe-operator\$'"
check "schema rejects a wrong type" rejects "at '/replicas': got string, want integer" --set replicas=two
check "schema rejects a wrong nested type" rejects "at '/crds/keep': got string, want boolean" --set-string crds.keep=yes
check "schema rejects an unknown key" rejects "additional properties 'replica' not allowed" --set replica=2
check "schema rejects an unknown nested key" rejects "at '/image': additional properties 'tags' not allowed" --set image.tags=x
check "schema rejects a bad enum value" rejects "at '/logFormat'" --set logFormat=xml
check "two PDB bounds are refused" rejects "set at most one of minAvailable and maxUnavailable" \
  --set podDisruptionBudget.minAvailable=1 --set podDisruptionBudget.maxUnavailable=1
check "two replicas without leader election are refused" rejects "leaderElection.enabled=false needs replicas: 1" \
  --set leaderElection.enabled=false --set replicas=2
if [[ -d deploy/argocd ]]; then
  check "Argo CD health checks (deploy/argocd)" kstatus test deploy/argocd
  # Argo CD wants one script per kind; they are one script (the shared status
  # contract) under different names, so their code must not drift apart.
  custom=deploy/argocd/resource_customizations/moe.dev
  check "every kind's health.lua is the same code" bash -c "
    first=\$(ls $custom/*/health.lua | head -1)
    for f in $custom/*/health.lua; do diff <(grep -v '^--' \$first) <(grep -v '^--' \$f) >/dev/null || exit 1; done"
fi

echo "test result: $([[ $failed == 0 ]] && echo ok || echo FAILED). $passed passed; $failed failed (charts/check.sh)"
[[ $failed == 0 ]]
