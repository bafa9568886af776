#!/usr/bin/env bash
# Installs the OpenAI Python client (pinned, with its dependencies) for the
# serve_openai_client test: a user's own client talking to `moe-worker
# serve`. Idempotent; prints the directory to put on PYTHONPATH, which the
# test finds by itself.
#
#   worker/tests/openai-client/setup.sh    # ~/.cache/moe-operator/openai-3.57.0
set -euo pipefail

# Keep in step with OPENAI_VERSION in worker/tests/serve_openai_client.rs.
OPENAI_VERSION=3.57.0

cache=${MOE_CACHE:-$HOME/.cache/moe-operator}
dest=$cache/openai-$OPENAI_VERSION
if [ ! -f "$dest/.complete" ]; then
  mkdir -p "$cache"
  staging=$(mktemp -d "$cache/.openai-staging.XXXXXX")
  trap 'rm -rf "$staging"' EXIT
  echo "openai-client: installing openai $OPENAI_VERSION into $dest" >&2
  # --ignore-installed: every dependency goes into the directory, whatever
  # the system Python already has.
  python3 -m pip install --quiet --disable-pip-version-check --no-compile --ignore-installed \
    --target "$staging" "openai==$OPENAI_VERSION"
  rm -rf "$dest"
  mv "$staging" "$dest"
  touch "$dest/.complete"
fi
echo "$dest"
