"""tests/gpu_check.sh in a dry run on the emulated CUDA device
(GPU_CHECK_EMULATED=1; marked `gpu`, and run only by a RJEPA_CUDA=emu build),
so that the script the first GPU runs has run end to end: each stage's
commands, its log parsing and the summary table.

The script builds in place and deletes the previous build first, so it runs
in a copy of the source tree, never in this checkout.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_gpu_model import EMULATED, _require_gpu

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
SKIP_IN_COPY = shutil.ignore_patterns(".git", "build", "*.so", "*.egg-info", "__pycache__",
                                      ".pytest_cache")


def test_gpu_check_dry_run_on_emulated_device(tmp_path):
    _require_gpu()
    if not EMULATED:
        pytest.skip("the dry run is for the emulated build; with a GPU run tests/gpu_check.sh itself")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=SKIP_IN_COPY)
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_EMULATED": "1", "OUT": str(out), "PYTHON": sys.executable}
    for knob in ("GPU_CHECK_SKIP_MODEL", "GPU_CHECK_SKIP_BENCH", "GPU_CHECK_QUICK", "RJEPA_ATTN"):
        env.pop(knob, None)
    r = subprocess.run(["bash", str(src / "tests" / "gpu_check.sh")], cwd=src, env=env,
                       capture_output=True, text=True, timeout=560)
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else ""
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("*.log")))
    print(summary)
    assert r.returncode == 0, f"exit {r.returncode}\n{summary}\n{logs}\n{r.stderr[-2000:]}"

    # the table: one row per stage, and what each stage found
    stages = dict(re.findall(r"^([a-z0-9]+) +(ok|FAIL|SKIP|NOTE)\b", summary.split("--- stages")[1],
                             re.M))
    assert stages == {"env": "ok", "build": "ok", "ops": "SKIP", "model": "ok", "family": "ok",
                      "parity": "ok", "bench": "SKIP"}, summary
    assert "GPU check: emulated CUDA device" in summary
    assert "emulated sm_90" in (out / "build.log").read_text()
    # bf16 rows (ours vs HF bf16, deepest layer) of both kernels, fp32 worst layers
    for model in ("qwen3-mma", "qwen3-fma", "gemma2-mma"):
        assert re.search(rf"^{model}: +layer \d+: ours [0-9.e-]+ +hf-bf16 [0-9.e-]+$", summary,
                         re.M), model
    assert re.search(r"^fp32 qwen3: worst layer cuda [0-9.e-]+ cpu [0-9.e-]+", summary, re.M)
    assert re.search(r"^fp32 gemma2: worst layer cuda [0-9.e-]+", summary, re.M)
    # the user's parity command, bf16 and fp32, on a tiny model
    runs = re.findall(r"^(\S+) +PASS +worst layer", summary, re.M)
    assert sorted(runs) == ["qwen3-bfloat16", "qwen3-float32"], summary
