"""CPU dequantization runs on the model's threads (`Model(threads=)`), not
on the process-wide OpenMP default, at load (weights="dequantize") and in the
forward (weights kept quantized), and its bits do not depend on the count.

The process-wide default is what the last CPU model created set
(omp_set_num_threads), so each test creates a model with another count after
the one it checks: an OpenMP region without the model's count would then run
on the other model's team. The teams are observed inside the regions
(`Engine.dequant_threads`, the team `_core.dequant_hf` returns).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent import _core
from rjepa_latent.checkpoints import hf_quantized
from rjepa_latent.testing import tiny_model
from rjepa_latent.testing.quantize import _random_parts, quantize_hf

IDS = [list(range(3, 70)), list(range(5, 40))]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("threads")
    shape = dict(family="qwen3", hidden=256, heads=4, kv_heads=2, seed=5)
    src = tiny_model(base / "src", **shape)
    out = {"gguf": tiny_model(base / "model.gguf", format="gguf", dtype="Q4_0", **shape)}
    for method in ("awq", "gptq", "fp8"):
        out[method] = quantize_hf(src, base / method, method, group_size=128, block=128)
    return out


def run(model) -> list:
    return model.extract(IDS, layers=[1, 2], pooling="mean")


@pytest.mark.parametrize("fmt", ["gguf", "awq", "gptq", "fp8"])
def test_kept_weights_dequantize_on_the_models_threads(checkpoints, fmt):
    path = checkpoints[fmt]
    one = rl.Model(path, device="cpu", threads=1)
    two = rl.Model(path, device="cpu", threads=2)      # the OpenMP default is now 2
    assert one.weights == two.weights == "keep"
    assert (one._engine.threads, two._engine.threads) == (1, 2)
    assert one._engine.dequant_threads == 0           # nothing dequantized yet
    a = run(one)
    assert one._engine.dequant_threads == 1
    b = run(two)
    assert two._engine.dequant_threads == 2
    three = rl.Model(path, device="cpu", threads=3)    # the default is now 3
    c = run(three)
    assert three._engine.dequant_threads == 3
    a2 = run(one)
    assert one._engine.dequant_threads == 1
    for other in (b, c, a2):
        for x, y in zip(a, other):
            assert np.array_equal(x, y)
    for m in (one, two, three):
        m.close()


@pytest.mark.parametrize("fmt", ["gguf", "awq"])
def test_load_time_dequantization_runs_on_the_models_threads(checkpoints, fmt, monkeypatch):
    path = checkpoints[fmt]
    seen: list = []
    hf, gguf = _core.dequant_hf, _core.dequantize_gguf

    def rec_hf(*args, threads=0, **kw):
        team = hf(*args, threads=threads, **kw)
        seen.append((threads, team))
        return team

    def rec_gguf(*args, threads=0, **kw):
        seen.append((threads, None))
        return gguf(*args, threads=threads, **kw)
    monkeypatch.setattr(_core, "dequant_hf", rec_hf)
    monkeypatch.setattr(_core, "dequantize_gguf", rec_gguf)
    kept = rl.Model(path, device="cpu", threads=2)     # the OpenMP default is now 2
    ref = run(kept)
    seen.clear()
    dense = rl.Model(path, device="cpu", threads=1, weights="dequantize")
    assert dense.weights == "dequantize" and seen
    assert all(t == 1 and team in (None, 1) for t, team in seen), seen
    for x, y in zip(ref, run(dense)):
        assert np.array_equal(x, y)
    kept.close()
    dense.close()


@pytest.mark.parametrize("method", ["awq", "gptq", "fp8"])
def test_core_dequantization_team_and_bits(method):
    rows, cols = 512, 384
    parts = _random_parts(method, rows, cols, 128, np.random.default_rng(7), 0.05)
    s = hf_quantized.SCALE_CODES
    if method == "fp8":
        family, subtype = hf_quantized.RL_QF_FP8_BLOCK, 8 | s["F32"] << 8
        views = (parts["weight"][1], parts["weight_scale_inv"][1])
    else:
        family = hf_quantized.RL_QF_AWQ if method == "awq" else hf_quantized.RL_QF_GPTQ
        subtype = 4 | s["F16"] << 8
        names = hf_quantized.AWQ_PARTS if method == "awq" else hf_quantized.GPTQ_PARTS
        views = tuple(parts[n][1] for n in names)
    outs = []
    for threads in (1, 2, 3, 0):
        out = np.empty((rows, cols), np.float32)
        team = _core.dequant_hf(family, subtype, rows, cols, 128, views, out, 0, rows,
                                threads=threads)
        assert team == (threads or len(os.sched_getaffinity(0)))
        outs.append(out)
    assert np.isfinite(outs[0]).all()
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    with pytest.raises(ValueError, match="threads must be in"):
        _core.dequant_hf(family, subtype, rows, cols, 128, views, outs[0], 0, rows, threads=-1)


def test_gguf_dequantization_bits_do_not_depend_on_threads():
    import gguf
    from rjepa_latent.testing.gguf_blocks import random_blocks
    data = random_blocks("Q4_K", 300, 512, np.random.default_rng(3))
    t = gguf.GGMLQuantizationType.Q4_K
    outs = [_core.dequantize_gguf(data, int(t), 300, 512, threads=n) for n in (1, 2, 3, 0)]
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    assert np.array_equal(outs[0], gguf.quants.dequantize(data, t))
    with pytest.raises(ValueError, match="threads must be in"):
        _core.dequantize_gguf(data, int(t), 300, 512, threads=100000)
