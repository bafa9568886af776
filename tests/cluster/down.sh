#!/usr/bin/env bash
# Stops every process up.sh started (by PID, newest first) and removes the state.
# The logs of the run are kept in tests/cluster/.last-logs/ for debugging.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
state="$here/.state"
[[ -d "$state" ]] || { echo "down.sh: nothing running" >&2; exit 0; }
# Tests record processes they start (operators) here too: stop those first.
others=$(cd "$state/pids" 2>/dev/null && ls | grep -vxE 'kueue|metrics-adapter|kwok|kube-scheduler|kube-controller-manager|kube-apiserver|etcd')
for name in $others kueue metrics-adapter kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
  f="$state/pids/$name"
  [[ -f "$f" ]] || continue
  pid=$(cat "$f")
  kill -0 "$pid" 2>/dev/null || continue
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "down.sh: $name ($pid) ignored SIGTERM for 10s; killing" >&2
    kill -KILL "$pid" 2>/dev/null
  fi
done
if [[ -d "$state/logs" ]]; then rm -rf "$here/.last-logs" && mv "$state/logs" "$here/.last-logs"; fi
rm -rf "$state"
echo "down.sh: stopped; logs of this run are in $here/.last-logs" >&2
