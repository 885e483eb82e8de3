#!/usr/bin/env bash
# Create .venv and install edgeprune with everything it needs (CPU only, no network beyond the package registries).
# llama-cpp-python is built from source without -march=native: a native build enables AMX on some Xeons and
# segfaults on quantized GGUFs. pip's wheel cache keeps the built wheel, so later installs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev]'
# Ray (distributed Self-Pruner search, `edgeprune prune --ray ADDRESS`) is optional and not installed here (CI
# time); add it with:  python -m pip install -e '.[ray]'   (tests/test_ray.py skips without it)
if ! python -c 'import llama_cpp' 2>/dev/null; then
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
  export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
  echo "building llama-cpp-python from source (4-6 minutes the first time; cached afterwards)" >&2
  python -m pip install -q 'llama-cpp-python==0.3.36' --no-binary llama-cpp-python
fi
# the OpenAI-compatible server's dependencies (verify checks the GGUF through it; skipped when absent)
python -m pip install -q 'llama-cpp-python[server]==0.3.36' --no-binary llama-cpp-python
