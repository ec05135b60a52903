#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and the CUDA toolkit: build llama-cpp-python with CUDA (and RPC) in a
# virtualenv of its own, check that the build really has CUDA, then run bench/gpu_check.py, which prints
# planned vs allocated memory per device for four plans and the decode speed against a bare loop.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ST_BRIDGE_GPU_VENV:-$HOME/.cache/st-bridge/venv-cuda}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
jobs="$(nproc)"
# pip would reuse a CPU wheel built earlier without looking at CMAKE_ARGS: build from source, no cache.
CMAKE_ARGS="-DGGML_CUDA=on -DGGML_RPC=on -DCMAKE_CUDA_ARCHITECTURES=native" CMAKE_BUILD_PARALLEL_LEVEL="$jobs" \
    "$VENV/bin/python" -m pip install -q --no-cache-dir --no-binary llama-cpp-python -e .
"$VENV/bin/python" - <<'PY'
import sys
from bridge.devices import ggml
gpus = [d for d in ggml.devices_without_memory() if d.backend == "CUDA"]
print("CUDA devices of this build:", [f"{d.name} ({d.description})" for d in gpus] or "none")
sys.exit(0 if gpus else "this llama-cpp-python build has no CUDA device")
PY
exec "$VENV/bin/python" bench/gpu_check.py "$@"
