#!/usr/bin/env bash
# Set up a fresh machine for tokenprune-kernels: dependencies, then the package and its compiled
# extension as an editable install. Safe to run again (pip skips what is already there).
#
# torch: kept as installed when present (e.g. a CUDA build on a GPU machine); otherwise
# torch==2.13.0, the CPU wheel on this project's machines. Never an unpinned `torch`, which pulls
# several GB of CUDA packages. The extension is built with --no-build-isolation so it compiles
# against the torch installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet numpy "safetensors>=0.4" "transformers>=5.17,<5.24" "triton>=3.2" \
    pillow tqdm matplotlib "pybind11>=2.12" ninja "pytest>=8" "pytest-benchmark>=4" "ruff>=0.6" "setuptools>=64" wheel
MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install --quiet --no-build-isolation --no-deps -e .
"$PY" -c "import tokenprune_kernels._extension as e; print('tokenprune_kernels: extension', 'built' if e.available() else 'NOT built: ' + str(e.load_error()))"
