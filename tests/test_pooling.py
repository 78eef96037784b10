"""Several poolings in one forward, and per-token output, through the Model
API on the CPU: every pooling (mean, first, last, max) equals NumPy pooling of
HF transformers' hidden states over the same spans within 1e-5 relative (per
layer: ||ours - ref|| / ||ref||); each slot of a pooling list is bitwise what
that pooling alone gives; packing stays bitwise neutral; pooling "none"
equals HF's hidden states of every token.

Run with `-s` to see the worst relative error per pooling."""
from __future__ import annotations

import numpy as np
import pytest

import rjepa_latent as rl
from conftest import hf_hidden_states, ids_of, rel_err

TOL = 1e-5
POOLINGS = ("mean", "max", "last", "first")
WORST: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report_worst():
    yield
    if WORST:
        print("\nworst relative error vs NumPy pooling of HF's hidden states (fp32, CPU):")
        for p, err in sorted(WORST.items()):
            print(f"  {p:6s} {err:.3e}")


def numpy_pool(rows: np.ndarray, pooling: str) -> np.ndarray:
    """rows [nl, n, d] (HF fp32) -> [nl, d]."""
    return {"mean": lambda r: r.astype(np.float64).mean(1).astype(np.float32),
            "max": lambda r: r.max(1), "first": lambda r: r[:, 0],
            "last": lambda r: r[:, -1]}[pooling](rows)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "llama_bias"])
def test_every_pooling_equals_numpy_over_hf(arch, model_of, tiny_model_dir):
    m = model_of(arch)
    ids = ids_of(120, seed=11)
    spans = np.array([[0, 1], [1, 30], [30, 31], [5, 120], [119, 120], [10, 60], [60, 61]])
    layers = [0, 1, -2, -1]
    ref = hf_hidden_states(tiny_model_dir(arch), ids)
    out = m.extract([ids], [spans], layers=layers, pooling=POOLINGS)[0]
    assert out.shape == (len(POOLINGS), 4, len(spans), 64) and out.dtype == np.float32
    for q, pooling in enumerate(POOLINGS):
        for j, (s, e) in enumerate(spans):
            want = numpy_pool(ref[[0, 1, 2, 3], s:e], pooling)
            err = rel_err(out[q, :, j], want)
            WORST[pooling] = max(WORST.get(pooling, 0.0), float(err.max()))
            assert err.max() <= TOL, (arch, pooling, j, err)
        if pooling != "mean":
            # a selection: exactly the engine's own per-token states
            states = m.hidden_states(ids, layers=layers)
            sel = np.stack([numpy_pool(states[:, s:e], pooling) for s, e in spans], 1)
            np.testing.assert_array_equal(out[q], sel, err_msg=pooling)
    # max really is the elementwise maximum, not a row: over a long span it differs
    # from every single row
    q = POOLINGS.index("max")
    rows = hf_hidden_states(tiny_model_dir(arch), ids)[2, 5:120]
    assert not any(np.allclose(out[q, 2, 3], r) for r in rows)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_each_slot_equals_its_pooling_alone_bitwise(arch, model_of):
    m = model_of(arch)
    lengths = (5, 33, 1, 70, 12)
    seqs = [ids_of(n, seed=200 + n) for n in lengths]
    spans = [np.array([[0, n], [n // 2, n], [0, 1]]) if n > 1 else np.array([[0, 1]])
             for n in lengths]
    layers = (2, 0, -1)
    many = m.extract(seqs, spans, layers=layers, pooling=["last", "mean", "max"])
    for p_i, p in enumerate(("last", "mean", "max")):
        one = m.extract(seqs, spans, layers=layers, pooling=p)
        for i, (a, b) in enumerate(zip(many, one)):
            assert a.shape == (3, 3, len(spans[i]), 64)
            np.testing.assert_array_equal(a[p_i], b, err_msg=f"{p} seq {i}")
    one_listed = m.extract(seqs, spans, layers=layers, pooling=("max",))
    for a, b in zip(one_listed, many):
        assert a.shape == (1,) + b.shape[1:]
        np.testing.assert_array_equal(a[0], b[2])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_packing_is_bitwise_neutral_with_several_poolings(arch, model_of):
    m = model_of(arch)
    lengths = (5, 33, 1, 70, 12, 200)
    seqs = [ids_of(n, seed=300 + n) for n in lengths]
    spans = [np.array([[0, n], [n // 3, n]]) if n > 1 else np.array([[0, 1]]) for n in lengths]
    poolings = ("max", "mean", "first")
    packed = m.extract(seqs, spans, layers=(0, 2, -1), pooling=poolings, max_batch_tokens=4096)
    small = m.extract(seqs, spans, layers=(0, 2, -1), pooling=poolings, max_batch_tokens=64)
    for i, s in enumerate(seqs):
        alone = m.extract([s], [spans[i]], layers=(0, 2, -1), pooling=poolings)[0]
        np.testing.assert_array_equal(packed[i], alone, err_msg=f"seq {i}")
        np.testing.assert_array_equal(small[i], alone, err_msg=f"seq {i} (many batches)")
    # per-sequence results are views of their batch's one engine result (zero-copy)
    assert packed[0].base is not None and packed[0].base is packed[-1].base
    assert type(packed[0].base.base).__name__ == "HostBuffer"


@pytest.mark.parametrize("arch", ["llama", "qwen3", "llama3_rope"])
def test_per_token_output_equals_hf(arch, model_of, tiny_model_dir):
    m = model_of(arch)
    seqs = [ids_of(n, seed=400 + n) for n in (1, 37, 150)]
    layers = [0, 2, -1]
    outs = m.extract(seqs, layers=layers, pooling="none", max_batch_tokens=256)
    listed = m.extract(seqs, layers=layers, pooling=["none"])
    for s, o, lo in zip(seqs, outs, listed):
        ref = hf_hidden_states(tiny_model_dir(arch), s)[[0, 2, 3]]
        assert o.shape == (3, len(s), 64) and lo.shape == (1, 3, len(s), 64)
        err = rel_err(o, ref)
        WORST["none"] = max(WORST.get("none", 0.0), float(err.max()))
        assert err.max() <= TOL, (arch, len(s), err)
        np.testing.assert_array_equal(lo[0], o)
        np.testing.assert_array_equal(o, m.hidden_states(s, layers=layers))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_several_poolings_on_cuda(tiny_model_dir, dtype):
    """On a CUDA device (skipped elsewhere): each slot of a pooling list equals
    that pooling alone bit for bit; first / last / max select exactly the
    engine's own per-token states; mean is their mean within f32 summation."""
    from rjepa_latent import _core
    if not rl.build_info()["cuda"] or _core.cuda_device_count() == 0:
        pytest.skip("no CUDA device (or CUDA not compiled in)")
    m = rl.Model(tiny_model_dir("qwen3"), device="cuda:0", dtype=dtype)
    try:
        seqs = [ids_of(n, seed=500 + n) for n in (5, 90, 200)]
        spans = [np.array([[0, 1], [0, len(s)], [len(s) // 3, len(s) - 1]]) for s in seqs]
        layers = [0, 1, -2, -1]
        tok = m.extract(seqs, None, layers, "none")
        many = m.extract(seqs, spans, layers, POOLINGS)
        for q, p in enumerate(POOLINGS):
            alone = m.extract(seqs, spans, layers, p)
            for i, (t, sp) in enumerate(zip(tok, spans)):
                np.testing.assert_array_equal(many[i][q], alone[i], err_msg=f"{p} seq {i}")
                for j, (a, b) in enumerate(sp):
                    got = many[i][q][:, j]
                    if p == "mean":
                        np.testing.assert_allclose(got, t[:, a:b].astype(np.float64).mean(1),
                                                   rtol=1e-4, atol=1e-5)
                    else:
                        np.testing.assert_array_equal(got, numpy_pool(t[:, a:b], p))
    finally:
        m.close()
