"""The command line on a CUDA device (marked `gpu`; skipped cleanly without
one): `rjepa-latent extract --device cuda` and `rjepa-latent parity --device
cuda` end to end on tiny models, and how the device is chosen and named.

On the emulated device of a RJEPA_CUDA=emu test build: `--version` and the run's
`engine_kernel` say so, a notice on stderr says the kernels run on the CPU,
`device=None` stays on the CPU engine (the emulated device is used only when
asked for), and `parity` runs HF on the CPU with the CUDA engine's bounds.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from test_gpu_model import EMULATED, _require_gpu

pytestmark = pytest.mark.gpu

SAMPLES = os.path.join(os.path.dirname(__file__), "..", "rjepa_latent", "samples",
                       "word_problems.jsonl")


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`rjepa-latent ARGS` in a fresh process (this interpreter, this package)."""
    return subprocess.run([sys.executable, "-m", "rjepa_latent.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_version_names_the_build():
    _require_gpu()
    out = _cli("--version")
    assert out.returncode == 0, out.stderr
    assert "CUDA compiled in" in out.stdout
    if EMULATED:
        assert "emulated" in out.stdout and "for testing only" in out.stdout, out.stdout
    else:
        assert "emulated" not in out.stdout, out.stdout


def test_default_device(tiny_model_dir):
    """device=None: cuda:0 on a real device; on the emulated one the CPU, with
    a notice that names the emulated device."""
    _require_gpu()
    code = "import rjepa_latent as rl; m = rl.Model(r'%s'); print(m.device, m.backend)"
    out = subprocess.run([sys.executable, "-c", code % tiny_model_dir("llama")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if EMULATED:
        assert out.stdout.split() == ["cpu", "cpu"]
        assert "emulated on the CPU" in out.stderr and "device='cuda'" in out.stderr, out.stderr
    else:
        assert out.stdout.split() == ["cuda:0", "cuda"]
        assert "emulated" not in out.stderr


def test_extract_on_cuda_matches_cpu(tiny_model_dir, tmp_path):
    """The whole pipeline on the device: the same records, steps and token
    spans as the CPU run, latents within the bf16 engine's error, the engine's
    identity in the manifest."""
    _require_gpu()
    d = tiny_model_dir("llama")
    runs = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / device
        res = _cli("extract", "--model", str(d), "--out", str(out), "--device", device,
                   "--limit", "5", "--layers", "1,-1", "--pooling", "mean,max,last",
                   "--no-progress", SAMPLES)
        assert res.returncode == 0, res.stderr
        assert "complete" in res.stderr + res.stdout
        if device == "cuda":
            assert ("is an emulated CUDA device" in res.stderr) == EMULATED, res.stderr
        runs[device] = out
    manifest = json.loads((runs["cuda"] / "manifest.json").read_text())
    cfg = manifest["config"]
    assert (cfg["engine_backend"], cfg["engine_dtype"]) == ("cuda", "bfloat16")
    assert ("emulated" in cfg["engine_kernel"]) == EMULATED, cfg["engine_kernel"]
    assert manifest["complete"] and manifest["totals"]["errors"] == 0

    import rjepa_latent as rl
    gpu, cpu = rl.open_latents(runs["cuda"]), rl.open_latents(runs["cpu"])
    assert len(gpu) == len(cpu) == 5
    worst = {}
    for a, b in zip(gpu, cpu):
        assert a.id == b.id
        np.testing.assert_array_equal(a.token_spans, b.token_spans)
        for pooling in ("mean", "max", "last"):
            x, ref = a.pooled(pooling).astype(np.float64), b.pooled(pooling).astype(np.float64)
            assert x.shape == ref.shape and np.isfinite(x).all()
            rel = np.linalg.norm((x - ref).reshape(len(ref), -1), axis=1) / \
                np.linalg.norm(ref.reshape(len(ref), -1), axis=1)
            worst[pooling] = np.maximum(worst.get(pooling, 0), rel)
    print("extract cuda vs cpu, worst rel err per stored layer:",
          {p: np.round(w, 4).tolist() for p, w in worst.items()})
    # bf16 weights and GEMMs on tiny random models: ~2-4e-2 at the last layer;
    # a wrong span, pooling or layer is off by O(1)
    for p, w in worst.items():
        assert (w < 0.1).all(), f"{p}: {w}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_parity_command_on_cuda(tiny_model_dir, tmp_path, dtype):
    """`rjepa-latent parity --device cuda`: passes with the CUDA bounds; HF
    runs on the engine's GPU, or on the CPU for the emulated device (said so)."""
    _require_gpu()
    from rjepa_latent import cli
    report = tmp_path / "parity.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main(["parity", "--model", str(tiny_model_dir("qwen3")), "--device", "cuda",
                       "--dtype", dtype, "--texts", "3", "--json", str(report)])
    text = stdout.getvalue()
    print(text)
    assert rc == 0, text + stderr.getvalue()
    j = json.loads(report.read_text())
    assert j["passed"] and j["device"] == "cuda:0" and j["dtype"] == dtype
    assert j["emulated_device"] == EMULATED
    if dtype == "float32":
        assert all(r["bound"] == 1e-4 for r in j["layers"])   # the CUDA fp32 bound
    else:
        assert all(r["hf_bf16_rel_err"] > 0 for r in j["layers"][1:])
    if EMULATED:
        assert "on cpu" in j["reference"] and "emulated on the CPU" in text
        assert any("emulated CUDA device" in n for n in j["notes"])
    else:
        assert "on cuda:0" in j["reference"]
