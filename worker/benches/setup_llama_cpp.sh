#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (CPU only, Release, native CPU flags) from
# the llama.cpp source that the PyPI sdist of llama-cpp-python vendors, for
# worker/benches/serve_vs_transformers.py --llama-server. A benchmark tool:
# not part of CI (.ci/run and tests/run.sh do not call it).
#
#     worker/benches/setup_llama_cpp.sh [DIR]      # DIR default: ~/.cache/moe-operator/llama-cpp
#
# Fetches only from PyPI (pip), pinned by version and sha256; idempotent: a
# step whose output is already there is skipped. Leaves
#     DIR/llama-server                   the server binary
#     DIR/llama.cpp/convert_hf_to_gguf.py the converter (with its gguf-py beside it)
# and prints both paths. PYTHON (default: /work/venv-torch/bin/python when it
# exists, else python3) is the interpreter with torch and transformers that the
# benchmark runs under: the pinned build tools (cmake, ninja) and the
# converter's remaining dependencies are pip-installed into it, since the
# benchmark runs the converter with the same interpreter.
# JOBS (default: the core count) sets the build's parallelism.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP_COMMIT=0c1e57098bba43ac29e6e3b677cdceebdd22334f   # the llama.cpp it vendors (its .git/modules HEAD)
LLAMA_CPP_PYTHON_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
# Build tools, and the converter's dependencies beyond torch + transformers
# (its gguf-py needs numpy, which torch brings, tqdm and pyyaml; it imports
# sentencepiece before falling back to tokenizer.json).
PIP_PINS=(cmake==4.4.5 ninja==1.13.2 tqdm==4.70.1 PyYAML==6.0.4 sentencepiece==0.2.1)

DIR=${1:-${HOME}/.cache/moe-operator/llama-cpp}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x /work/venv-torch/bin/python ]]; then PYTHON=/work/venv-torch/bin/python; else PYTHON=python3; fi
fi
JOBS=${JOBS:-$(nproc)}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)

# 1. Tools, pinned.
"$PYTHON" -m pip install --quiet "${PIP_PINS[@]}"
BIN=$("$PYTHON" -c 'import sys, os; print(os.path.dirname(sys.executable))')
CMAKE=$BIN/cmake
NINJA=$BIN/ninja

# 2. The sdist, checked.
SDIST=$DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz
if [[ ! -f $SDIST ]] || ! echo "$LLAMA_CPP_PYTHON_SHA256  $SDIST" | sha256sum --check --status; then
  rm -f "$SDIST"
  "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" --dest "$DIR"
  echo "$LLAMA_CPP_PYTHON_SHA256  $SDIST" | sha256sum --check --status ||
    { echo "sha256 mismatch: $SDIST" >&2; exit 1; }
fi

# 3. The vendored llama.cpp tree.
SRC=$DIR/llama.cpp
if [[ ! -f $SRC/.from-llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION ]]; then
  rm -rf "$SRC" "$DIR/extract"
  mkdir -p "$DIR/extract"
  tar -xzf "$SDIST" -C "$DIR/extract" "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
  mv "$DIR/extract/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" "$SRC"
  rm -rf "$DIR/extract" "$SRC/.git"   # a gitdir link into the sdist's .git/modules
  touch "$SRC/.from-llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION"
fi

# 4. llama-server only: CPU backend (native flags, OpenMP as upstream's
# default), static, no web UI (it would be fetched from a hub), no TLS.
BUILD=$DIR/build
STAMP=$DIR/.llama-server-from-llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION
if [[ ! -x $DIR/llama-server || ! -f $STAMP ]]; then
  "$CMAKE" -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_MAKE_PROGRAM="$NINJA" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_NUMBER=0 -DLLAMA_BUILD_COMMIT="${LLAMA_CPP_COMMIT:0:8}" >"$DIR/cmake.log"
  "$CMAKE" --build "$BUILD" --target llama-server -j "$JOBS"
  cp "$BUILD/bin/llama-server" "$DIR/llama-server"
  rm -f "$DIR"/.llama-server-from-*
  touch "$STAMP"
fi

"$DIR/llama-server" --version 2>&1 | sed 's/^/# /' || true
echo "llama-server: $DIR/llama-server"
echo "converter:    $SRC/convert_hf_to_gguf.py"
