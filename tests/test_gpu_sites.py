"""Activation sites on the CUDA engine (marked `gpu`; skipped cleanly without a
CUDA device, real or the emulated one of a RJEPA_CUDA=emu test build): every
site of every block of a tiny model of every family, per token and pooled,
against the CPU engine (whose parity with HF hooks is tests/test_sites.py).

- fp32 mode (dtype="float32"): within FP32_REL (max|cuda - cpu| / max|cpu| per site);
- bf16 (the default): within BF16_REL, a loose bound for two blocks of bf16
  GEMM operands, and the same bits whichever other sites a forward returns;
- a result larger than the pooled rows (the ring of asynchronous downloads).
"""
from __future__ import annotations

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent.engine.sites import HOOKS, SITE_KINDS
from rjepa_latent.testing import families, tiny_model
from test_gpu_model import FP32_REL, _require_gpu, sizes

pytestmark = pytest.mark.gpu

BF16_REL = 0.05
LENS = sizes([1, 9, 45, 300], [1, 9, 45])


def _sites(n: int) -> list[str]:
    return [f"blocks.{b}.{HOOKS[k]}" for b in range(n) for k in SITE_KINDS]


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


@pytest.fixture(scope="module", params=families())
def pair(request, tmp_path_factory):
    _require_gpu()
    path = tiny_model(tmp_path_factory.mktemp(request.param) / "m", family=request.param, layers=2)
    cpu = rl.Model(path, device="cpu")
    yield request.param, path, cpu
    cpu.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sites_match_cpu(pair, dtype):
    name, path, cpu = pair
    sites = _sites(2)
    bound = FP32_REL if dtype == "float32" else BF16_REL
    with rl.Model(path, device="cuda", dtype=dtype, max_batch_tokens=512) as gpu:
        for n in LENS:
            ids = np.random.default_rng(n).integers(2, 300, n)
            ref = cpu.activations(ids, sites)
            got = gpu.activations(ids, sites)
            spans = [np.array([[0, n], [n - 1, n], [0, (n + 1) // 2]])]
            pooled = gpu.extract([ids], spans, pooling=["mean", "max", "last"], sites=sites)[0]
            for s in sites:
                assert _rel(got[s], ref[s]) <= bound, f"{name} {dtype} {s} T={n}"
                r = ref[s].astype(np.float64)
                for q, f in enumerate((lambda a: a.mean(0), lambda a: a.max(0), lambda a: a[-1])):
                    want = np.stack([f(r[a:e]) for a, e in spans[0]])
                    assert _rel(pooled[s][q], want) <= bound, f"{name} {dtype} {s} pooling {q}"
            one = gpu.activations(ids, ["blocks.1.hook_mlp_out"])["blocks.1.hook_mlp_out"]
            np.testing.assert_array_equal(one, got["blocks.1.hook_mlp_out"])


def test_ring_of_pooled_rows(pair):
    """45 one-token spans x 2 poolings x every site of 2 blocks: more floats than the
    2 x 64 pooled rows of a 64-token workspace, so pieces go through the ring."""
    name, path, cpu = pair
    sites = _sites(2)
    ids = np.random.default_rng(1).integers(2, 300, 45)
    ref = cpu.activations(ids, sites)
    with rl.Model(path, device="cuda", dtype="float32", max_batch_tokens=64) as gpu:
        got = gpu.extract([ids], [np.array([[i, i + 1] for i in range(45)])],
                          pooling=["first", "max"], sites=sites)[0]
    for s in sites:
        assert _rel(got[s][0], ref[s]) <= FP32_REL, f"{name} {s}"
        np.testing.assert_array_equal(got[s][0], got[s][1])
