"""Tests of the C engine through `_core.Engine` directly (no checkpoint loader).

Random fp32 weights are set from NumPy and the engine is compared with an
independent float64 NumPy forward written here (RMSNorm, rotate_half RoPE,
causal GQA attention, SwiGLU, optional q/k/v/o/mlp biases and q/k norm).
Also: packing is bitwise neutral, layer order/repeats, early exit under
max_layer, every bad argument raises ValueError/TypeError naming it, results
own their memory (HostBuffer base) and repeated calls do not leak.
"""
from __future__ import annotations

import gc
import os
import re

import numpy as np
import pytest

from rjepa_latent import _native  # noqa: F401  (loads _core and the BLAS it needs)
from rjepa_latent import _core
from rjepa_latent.errors import DeviceError

VARIANTS = {
    "llama_gqa": dict(),
    "biases": dict(attn_qkv_bias=1, attn_o_bias=1, mlp_bias=1),
    "qk_norm": dict(qk_norm=1, head_dim=24),
}


def make_config(**over) -> dict:
    cfg = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=4,
               num_kv_heads=2, head_dim=16, max_layer=3, rms_norm_eps=1e-5, attn_qkv_bias=0,
               attn_o_bias=0, mlp_bias=0, qk_norm=0)
    cfg.update(over)
    return cfg


def make_weights(cfg: dict, seed: int = 0) -> dict:
    """HF-shaped random weights {(kind, layer): array}; std large enough that
    activations stay far from zero in every layer."""
    rng = np.random.default_rng(seed)
    d, ff, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_heads"] * hd, cfg["num_kv_heads"] * hd

    def mat(*shape, std=None):
        std = std if std is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm(n):
        return (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    w = {("embed", 0): mat(cfg["vocab_size"], d, std=1.0), ("final_norm", 0): norm(d),
         ("rope_inv_freq", 0): (1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)).astype(np.float32)}
    for l in range(cfg["num_layers"]):
        w.update({("attn_norm", l): norm(d), ("q", l): mat(q, d), ("k", l): mat(kv, d),
                  ("v", l): mat(kv, d), ("o", l): mat(d, q), ("ffn_norm", l): norm(d),
                  ("gate", l): mat(ff, d), ("up", l): mat(ff, d), ("down", l): mat(d, ff)})
        if cfg["attn_qkv_bias"]:
            w.update({("q_bias", l): mat(q, std=0.3), ("k_bias", l): mat(kv, std=0.3),
                      ("v_bias", l): mat(kv, std=0.3)})
        if cfg["attn_o_bias"]:
            w[("o_bias", l)] = mat(d, std=0.3)
        if cfg["mlp_bias"]:
            w.update({("gate_bias", l): mat(ff, std=0.3), ("up_bias", l): mat(ff, std=0.3),
                      ("down_bias", l): mat(d, std=0.3)})
        if cfg["qk_norm"]:
            w.update({("q_norm", l): norm(hd), ("k_norm", l): norm(hd)})
    return w


def make_engine(cfg: dict, w: dict, max_tokens: int = 256, n_threads: int = 2) -> "_core.Engine":
    eng = _core.Engine(cfg, "cpu", n_threads)
    for (kind, layer), arr in w.items():
        if eng.tensor_shape(kind, layer) is None:
            continue  # not loaded under this max_layer
        eng.set_tensor(kind, layer, arr, "float32", arr.shape)
    eng.check_complete()
    eng.reserve(max_tokens)
    return eng


# ---- independent NumPy reference (float64) ---------------------------------

def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, inv_freq):  # x [T, heads, hd]
    ang = np.arange(x.shape[0])[:, None] * inv_freq.astype(np.float64)[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def ref_hidden_states(cfg: dict, w: dict, ids: np.ndarray) -> np.ndarray:
    """[L+1, T, d] like HF output_hidden_states, for one sequence."""
    g = lambda k, l=0: w[(k, l)].astype(np.float64)  # noqa: E731
    opt = lambda k, l: w[(k, l)].astype(np.float64) if (k, l) in w else 0.0  # noqa: E731
    eps, hd, nh, nkv = cfg["rms_norm_eps"], cfg["head_dim"], cfg["num_heads"], cfg["num_kv_heads"]
    T, L = len(ids), cfg["num_layers"]
    x = g("embed")[ids]
    states = [x]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(L):
        h = _rms(x, g("attn_norm", l), eps)
        q = (h @ g("q", l).T + opt("q_bias", l)).reshape(T, nh, hd)
        k = (h @ g("k", l).T + opt("k_bias", l)).reshape(T, nkv, hd)
        v = (h @ g("v", l).T + opt("v_bias", l)).reshape(T, nkv, hd)
        if cfg["qk_norm"]:
            q, k = _rms(q, g("q_norm", l), eps), _rms(k, g("k_norm", l), eps)
        q, k = _rope(q, g("rope_inv_freq")), _rope(k, g("rope_inv_freq"))
        out = np.empty((T, nh, hd))
        for hh in range(nh):
            kv = hh // (nh // nkv)
            s = q[:, hh] @ k[:, kv].T / np.sqrt(hd) + mask
            p = np.exp(s - s.max(-1, keepdims=True))
            out[:, hh] = (p / p.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + out.reshape(T, nh * hd) @ g("o", l).T + opt("o_bias", l)
        h = _rms(x, g("ffn_norm", l), eps)
        gate = h @ g("gate", l).T + opt("gate_bias", l)
        up = h @ g("up", l).T + opt("up_bias", l)
        x = x + (gate / (1 + np.exp(-gate)) * up) @ g("down", l).T + opt("down_bias", l)
        states.append(x if l + 1 < L else _rms(x, g("final_norm"), eps))
    return np.stack(states)


def ref_pool(states: np.ndarray, spans, pooling: str) -> np.ndarray:
    """states [nl, T, d] -> [nl, S, d]."""
    out = []
    for a, b in spans:
        seg = states[:, a:b]
        out.append({"mean": seg.mean(1), "first": seg[:, 0], "last": seg[:, -1],
                    "max": seg.max(1)}[pooling])
    return np.stack(out, 1)


def pack(seqs):
    tokens = np.concatenate(seqs).astype(np.int32)
    cu = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int32)
    return tokens, cu


def rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def run(eng, seqs, layers, spans_per_seq, pooling="mean"):
    tokens, cu = pack(seqs)
    spans = np.array([sp for ss in spans_per_seq for sp in ss], dtype=np.int32).reshape(-1, 2)
    span_seq = np.array([i for i, ss in enumerate(spans_per_seq) for _ in ss], dtype=np.int32)
    return eng.forward(tokens, cu, np.array(layers, np.int32), spans, span_seq, pooling)


def all_token_spans(n):
    return [(t, t + 1) for t in range(n)]


@pytest.fixture(scope="module")
def base():
    cfg = make_config()
    w = make_weights(cfg, seed=1)
    return cfg, w, make_engine(cfg, w)


# ---- parity with the NumPy reference ----------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_layer_matches_reference(variant):
    cfg = make_config(**VARIANTS[variant])
    w = make_weights(cfg, seed=2)
    eng = make_engine(cfg, w)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, cfg["vocab_size"], n) for n in (1, 9, 70)]
    layers = list(range(cfg["num_layers"] + 1))
    got = run(eng, seqs, layers, [all_token_spans(len(s)) for s in seqs], "first")
    off = 0
    for s in seqs:
        ref = ref_hidden_states(cfg, w, s)
        part = got[:, off:off + len(s)]
        for l in layers:
            assert rel_err(part[l], ref[l]) < 2e-5, (variant, l, rel_err(part[l], ref[l]))
        off += len(s)


@pytest.mark.parametrize("pooling", ["mean", "first", "last", "max"])
def test_pooling_matches_reference(base, pooling):
    cfg, w, eng = base
    rng = np.random.default_rng(4)
    seqs = [rng.integers(0, cfg["vocab_size"], n) for n in (13, 30)]
    spans = [[(0, 4), (4, 13), (2, 3)], [(0, 30), (10, 29), (29, 30)]]
    got = run(eng, seqs, [0, 2, 3], spans, pooling)
    want = np.concatenate([ref_pool(ref_hidden_states(cfg, w, s)[[0, 2, 3]], sp, pooling)
                           for s, sp in zip(seqs, spans)], 1)
    assert got.shape == (3, 6, cfg["hidden_size"])
    assert rel_err(got, want) < 2e-5


def test_more_spans_than_max_tokens(base):
    """Spans are pooled in chunks when S exceeds the workspace capacity."""
    cfg, w, _ = base
    eng = make_engine(cfg, w, max_tokens=8)
    ids = np.arange(8) % cfg["vocab_size"]
    spans = [(a, b) for a in range(8) for b in range(a + 1, 9)][:30]
    got = run(eng, [ids], [1, 3], [spans], "mean")
    want = ref_pool(ref_hidden_states(cfg, w, ids)[[1, 3]], spans, "mean")
    assert got.shape == (2, 30, cfg["hidden_size"])
    assert rel_err(got, want) < 2e-5
    # several poolings, chunked: each chunk pooled once per pooling into its slot
    many = run(eng, [ids], [1, 3], [spans], ["max", "mean"])
    assert many.shape == (2, 2, 30, cfg["hidden_size"])
    assert np.array_equal(many[1], got)
    assert np.array_equal(many[0], run(eng, [ids], [1, 3], [spans], "max"))


def test_several_poolings_in_one_forward(base):
    """A pooling list gives [P, nl, S, d] in one array that owns its memory; slot
    [q] holds, bit for bit, what that pooling alone gives; duplicates and a layer
    asked twice are served too; packing stays bitwise neutral."""
    cfg, w, eng = base
    rng = np.random.default_rng(14)
    seqs = [rng.integers(0, cfg["vocab_size"], n) for n in (13, 30, 1)]
    spans = [[(0, 4), (4, 13), (2, 3)], [(0, 30), (10, 29), (29, 30)], [(0, 1)]]
    layers = [3, 0, 2, 3]
    poolings = ("mean", "max", "last", "first", "max")
    got = run(eng, seqs, layers, spans, poolings)
    assert got.shape == (5, 4, 7, cfg["hidden_size"]) and got.dtype == np.float32
    assert got.flags.c_contiguous and got.flags.owndata is False and got.base is not None
    assert type(got.base).__name__ == "HostBuffer"
    for q, p in enumerate(poolings):
        assert np.array_equal(got[q], run(eng, seqs, layers, spans, p)), p
    want = np.concatenate([ref_pool(ref_hidden_states(cfg, w, s)[layers], sp, "max")
                           for s, sp in zip(seqs, spans)], 1)
    assert rel_err(got[1], want) < 2e-5
    assert np.array_equal(run(eng, seqs, layers, spans, ["last"])[0], got[2])   # a list of one
    alone = np.concatenate([run(eng, [s], layers, [sp], poolings) for s, sp in zip(seqs, spans)],
                           2)
    assert np.array_equal(got, alone)


# ---- packing, layer order, early exit ---------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_packed_batch_bitwise_equals_each_sequence_alone(variant):
    cfg = make_config(**VARIANTS[variant])
    eng = make_engine(cfg, make_weights(cfg, seed=5))
    rng = np.random.default_rng(6)
    seqs = [rng.integers(0, cfg["vocab_size"], n) for n in (5, 47, 1, 23, 64)]
    spans = [[(0, len(s))] + ([(1, len(s) - 1)] if len(s) > 2 else []) for s in seqs]
    layers = [3, 1, 0, 2]
    for pooling in ("mean", "last"):
        packed = run(eng, seqs, layers, spans, pooling)
        alone = np.concatenate([run(eng, [s], layers, [sp], pooling) for s, sp in zip(seqs, spans)], 1)
        assert np.array_equal(packed, alone)
        # and in another order of the same sequences
        order = [3, 0, 4, 2, 1]
        shuffled = run(eng, [seqs[i] for i in order], layers, [spans[i] for i in order], pooling)
        idx = np.cumsum([0] + [len(sp) for sp in spans])
        for pos, i in enumerate(order):
            j = sum(len(spans[k]) for k in order[:pos])
            assert np.array_equal(shuffled[:, j:j + len(spans[i])], packed[:, idx[i]:idx[i + 1]])


def test_layers_any_order_and_repeated(base):
    cfg, _, eng = base
    ids = np.arange(20) % cfg["vocab_size"]
    spans = [[(0, 7), (7, 20)]]
    single = {l: run(eng, [ids], [l], spans)[0] for l in range(4)}
    layers = [3, 0, 2, 3, 1, 0]
    got = run(eng, [ids], layers, spans)
    for i, l in enumerate(layers):
        assert np.array_equal(got[i], single[l])


def test_early_exit_max_layer():
    cfg = make_config(max_layer=1)
    w = make_weights(cfg, seed=7)
    full = make_engine(make_config(), w)
    eng = _core.Engine(cfg, "cpu", 2)
    assert eng.tensor_shape("q", 1) is None and eng.tensor_shape("final_norm") is None
    assert eng.tensor_shape("q", 0) == (64, 48)
    for (kind, layer), arr in w.items():  # only what layer 0 needs
        if kind == "final_norm" or layer >= 1:
            continue
        eng.set_tensor(kind, layer, arr, "float32", arr.shape)
    eng.check_complete()
    with pytest.raises(ValueError, match="layer 1 of q is not loaded"):
        eng.set_tensor("q", 1, w[("q", 1)], "float32", w[("q", 1)].shape)
    with pytest.raises(ValueError, match="final_norm"):
        eng.set_tensor("final_norm", 0, w[("final_norm", 0)], "float32", (48,))
    eng.reserve(64)
    ids = np.arange(30) % cfg["vocab_size"]
    spans = [[(0, 30), (3, 9)]]
    assert np.array_equal(run(eng, [ids], [1, 0], spans), run(full, [ids], [1, 0], spans))
    with pytest.raises(ValueError, match=r"layers\[0\]=2 is out of range \[0, max_layer=1\]"):
        run(eng, [ids], [2], spans)
    assert eng.weight_bytes < full.weight_bytes


def test_max_layer_zero_needs_only_embedding():
    cfg = make_config(max_layer=0)
    w = make_weights(cfg, seed=8)
    eng = _core.Engine(cfg, "cpu", 1)
    eng.set_tensor("embed", 0, w[("embed", 0)], "float32", w[("embed", 0)].shape)
    eng.set_tensor("rope_inv_freq", 0, w[("rope_inv_freq", 0)], "float32", (8,))
    eng.check_complete()
    eng.reserve(16)
    ids = np.array([5, 9, 2])
    got = run(eng, [ids], [0], [[(0, 3), (1, 2)]])
    emb = w[("embed", 0)][ids].astype(np.float64)
    assert np.allclose(got[0], [emb.mean(0), emb[1]], rtol=1e-6, atol=1e-7)


# ---- weights in other dtypes -------------------------------------------------

def _to_bf16_bits(a: np.ndarray) -> np.ndarray:
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_weights_are_converted_exactly(dtype):
    cfg = make_config(num_layers=1, max_layer=1)
    w = make_weights(cfg, seed=9)
    eng16 = _core.Engine(cfg, "cpu", 1)
    w_rounded = {}
    for (kind, layer), arr in w.items():
        if kind == "rope_inv_freq":
            eng16.set_tensor(kind, layer, arr, "float32", arr.shape)
            w_rounded[(kind, layer)] = arr
            continue
        if dtype == "float16":
            bits = arr.astype(np.float16)
            back = bits.astype(np.float32)
        else:
            bits = _to_bf16_bits(arr)
            back = (bits.astype(np.uint32) << 16).view(np.float32)
        eng16.set_tensor(kind, layer, memoryview(bits.tobytes()), dtype, arr.shape)
        w_rounded[(kind, layer)] = back
    eng16.check_complete()
    eng16.reserve(32)
    eng32 = make_engine(cfg, w_rounded)
    ids = np.arange(11) % cfg["vocab_size"]
    sp = [[(0, 11), (4, 6)]]
    assert np.array_equal(run(eng16, [ids], [0, 1], sp), run(eng32, [ids], [0, 1], sp))


# ---- result ownership, threads, leaks --------------------------------------

def test_result_owns_its_memory(base):
    cfg, w, _ = base
    eng = make_engine(cfg, w)
    ids = np.arange(12) % cfg["vocab_size"]
    a = run(eng, [ids], [2], [[(0, 12)]])
    b = run(eng, [ids[::-1]], [2], [[(0, 12)]])   # same scratch reused: a must not change
    assert isinstance(a.base, _core.HostBuffer)
    assert not a.flags.owndata and a.flags.writeable and a.flags.c_contiguous
    assert a.dtype == np.float32 and a.shape == (1, 1, cfg["hidden_size"])
    keep = a.copy()
    assert not np.array_equal(a, b)
    del eng
    gc.collect()
    assert np.array_equal(a, keep)   # the owner holds the result's memory, not the model
    a[...] = 1.0
    assert np.all(a == 1.0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_repeated_forward_does_not_leak(base):
    cfg, _, eng = base
    ids = np.arange(40) % cfg["vocab_size"]
    tokens, cu = pack([ids, ids[:17]])
    spans = np.array([[0, 40], [0, 17], [3, 5]], np.int32)
    span_seq = np.array([0, 1, 1], np.int32)
    layers = np.array([0, 1, 2, 3], np.int32)
    for _ in range(20):
        eng.forward(tokens, cu, layers, spans, span_seq, "mean")
    gc.collect()
    before = _rss_bytes()
    for _ in range(200):
        eng.forward(tokens, cu, layers, spans, span_seq, "mean")
        try:
            eng.forward(tokens, cu, np.array([9], np.int32), spans, span_seq, "mean")
        except ValueError:
            pass
    gc.collect()
    assert _rss_bytes() - before < 4 << 20


def test_threads_share_one_engine_safely(base):
    """Concurrent forwards on one Engine serialize on its lock and agree."""
    import threading
    cfg, _, eng = base
    ids = np.arange(50) % cfg["vocab_size"]
    want = run(eng, [ids], [3], [[(0, 50)]])
    bad = []

    def work():
        for _ in range(10):
            if not np.array_equal(run(eng, [ids], [3], [[(0, 50)]]), want):
                bad.append(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


def test_caller_arrays_written_during_forward_cannot_corrupt_it():
    """forward validates ids and offsets, then uses them with the GIL released:
    the engine must work on private copies. Before the binding copied them, a
    thread flipping cu_seqlens / an id to huge values segfaulted the process
    within seconds (heap overflow in the positions scratch, out-of-range
    embedding row). Probabilistic by nature: 1.5 s of racing."""
    import threading
    import time
    cfg = make_config(num_layers=1, max_layer=1)
    eng = make_engine(cfg, make_weights(cfg), max_tokens=64, n_threads=1)
    toks = (np.arange(60) % cfg["vocab_size"]).astype(np.int32)
    cu = np.array([0, 30, 60], dtype=np.int32)
    spans, seq = np.array([[0, 30]], dtype=np.int32), np.array([0], dtype=np.int32)
    want = eng.forward(toks, cu, [1], spans, seq, "mean")
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            cu[1] = 2_000_000_000
            cu[1] = 30
            toks[5] = 10 ** 9
            toks[5] = 5

    t = threading.Thread(target=flip)
    t.start()
    results = []
    try:
        t_end = time.monotonic() + 1.5
        while time.monotonic() < t_end:
            try:
                results.append(eng.forward(toks, cu, [1], spans, seq, "mean"))
            except ValueError:
                pass  # a copy taken mid-flip is refused, never used
    finally:
        stop.set()
        t.join()
    assert results and all(np.array_equal(r, want) for r in results)


# ---- bad arguments ----------------------------------------------------------

GOOD = dict(tokens=[1, 2, 3, 4, 5], cu_seqlens=[0, 2, 5], layers=[1], spans=[[0, 2], [1, 3]],
            span_seq=[0, 1], pooling="mean")

BAD_FORWARD = [
    (dict(tokens=[1, 2, 3, 4, 97]), ValueError, r"tokens\[4\]=97 is out of range \[0, vocab_size=97\)"),
    (dict(tokens=[1, -2, 3, 4, 5]), ValueError, r"tokens\[1\]=-2 is out of range"),
    (dict(tokens=[1.0, 2, 3, 4, 5]), TypeError, r"tokens must be an integer array"),
    (dict(tokens=np.array([1, 2, 3, 4, 2**40])), ValueError, r"tokens\[4\]=1099511627776 is out of the int32 range"),
    (dict(tokens=[[1, 2, 3, 4, 5]]), ValueError, r"tokens must have 1 dimension"),
    (dict(tokens=[], cu_seqlens=[0]), ValueError, r"tokens is empty"),
    (dict(cu_seqlens=[0, 2, 2, 5], spans=[[0, 2]], span_seq=[0]), ValueError, r"sequence 1 is empty"),
    (dict(cu_seqlens=[0, 2, 4]), ValueError, r"cu_seqlens\[2\]=4 must equal the number of tokens 5"),
    (dict(cu_seqlens=[1, 2, 5]), ValueError, r"cu_seqlens\[0\] must be 0"),
    (dict(cu_seqlens=[0, 3, 2, 5], spans=[[0, 2]], span_seq=[0]), ValueError, r"cu_seqlens\[2\]=2 is not greater"),
    (dict(cu_seqlens=[0]), ValueError, r"cu_seqlens must have B\+1 >= 2"),
    (dict(spans=[[0, 2], [1, 4]]), ValueError, r"spans\[1\]=\[1, 4\) is out of range \(sequence 1 has 3 tokens"),
    (dict(spans=[[0, 2], [-1, 2]]), ValueError, r"spans\[1\]=\[-1, 2\) is out of range"),
    (dict(spans=[[0, 2], [2, 2]]), ValueError, r"spans\[1\]=\[2, 2\) is empty or reversed"),
    (dict(spans=[[2, 1], [0, 1]]), ValueError, r"spans\[0\]=\[2, 1\) is empty or reversed"),
    (dict(spans=[[0, 2, 3], [1, 2, 3]]), ValueError, r"spans must have shape \[S, 2\]"),
    (dict(spans=[[0.0, 2.0], [1.0, 3.0]]), TypeError, r"spans must be an integer array"),
    (dict(span_seq=[0, 2]), ValueError, r"span_seq\[1\]=2 is out of range \[0, 2\)"),
    (dict(span_seq=[0, -1]), ValueError, r"span_seq\[1\]=-1 is out of range"),
    (dict(span_seq=[0]), ValueError, r"span_seq has 1 entries but spans has 2"),
    (dict(layers=[4]), ValueError, r"layers\[0\]=4 is out of range \[0, max_layer=3\]"),
    # a negative entry is an activation site (csrc/sites.h): block 99 does not exist
    (dict(layers=[1, -1 - 99 * 7]), ValueError, r"layers\[1\]=-694 names site resid_pre of block 99"),
    (dict(layers=[]), ValueError, r"layers is empty"),
    (dict(layers=[1.5]), TypeError, r"layers must be an integer array"),
    (dict(pooling="top"), ValueError, r"pooling must be 'mean', 'first', 'last' or 'max', got 'top'"),
    (dict(pooling=["mean", "top"]), ValueError, r"pooling must be 'mean', 'first', 'last' or 'max', got 'top'"),
    (dict(pooling=[]), ValueError, r"pooling must list 1 to 16 poolings, got 0"),
    (dict(pooling=["mean"] * 17), ValueError, r"pooling must list 1 to 16 poolings, got 17"),
    (dict(pooling=["mean", 3]), TypeError, r"a pooling must be a str, got int"),
    (dict(pooling=None), TypeError, r"pooling must be a str or a list / tuple of str, got NoneType"),
    (dict(tokens=list(range(20)) * 20, cu_seqlens=[0, 400]), ValueError, r"more than max_tokens=256"),
]


@pytest.mark.parametrize("bad,exc,msg", BAD_FORWARD, ids=[m[:30] for _, _, m in BAD_FORWARD])
def test_bad_forward_arguments(base, bad, exc, msg):
    _, _, eng = base
    args = {**GOOD, **bad}
    with pytest.raises(exc, match=msg):
        eng.forward(args["tokens"], args["cu_seqlens"], args["layers"], args["spans"],
                    args["span_seq"], args["pooling"])
    assert eng.forward(*GOOD.values()).shape == (1, 2, 48)   # still usable


def test_engine_errors_carry_file_and_line(base):
    """The place is kept for bug reports (e.rjepa_where), out of the message."""
    with pytest.raises(ValueError) as e:
        base[2].forward(*{**GOOD, "layers": [7]}.values())
    assert re.fullmatch(r"csrc/engine\.c:\d+", e.value.rjepa_where), e.value.rjepa_where
    assert ".c:" not in str(e.value), str(e.value)


def test_no_spans_gives_empty_result_and_bool_ids_are_refused(base):
    _, _, eng = base
    out = eng.forward(GOOD["tokens"], GOOD["cu_seqlens"], [0, 2], np.zeros((0, 2), np.int32),
                      np.zeros(0, np.int32), "mean")
    assert out.shape == (2, 0, 48) and isinstance(out.base, _core.HostBuffer)
    with pytest.raises(TypeError, match="tokens must be an integer array"):
        eng.forward(np.ones(5, bool), *list(GOOD.values())[1:])


def test_int64_and_unsigned_ids_accepted(base):
    _, _, eng = base
    want = eng.forward(*GOOD.values())
    args = dict(GOOD, tokens=np.array(GOOD["tokens"], np.uint16),
                cu_seqlens=np.array(GOOD["cu_seqlens"], np.int64),
                spans=np.asfortranarray(np.array(GOOD["spans"], np.int64)))
    assert np.array_equal(eng.forward(*args.values()), want)


def test_bad_tensors(base):
    cfg, w, _ = base
    eng = _core.Engine(cfg, "cpu", 1)
    q = w[("q", 0)]
    with pytest.raises(ValueError, match=r"'q' of layer 0 has shape \[64, 47\], expected \[64, 48\]"):
        eng.set_tensor("q", 0, q[:, :47].copy(), "float32", (64, 47))
    with pytest.raises(ValueError, match=r"data of tensor 'q' \(layer 0\) has 12288 bytes but .* need 6144"):
        eng.set_tensor("q", 0, q, "float32", (32, 48))
    with pytest.raises(ValueError, match=r"unknown tensor kind 'qq'"):
        eng.set_tensor("qq", 0, q, "float32", q.shape)
    with pytest.raises(ValueError, match=r"dtype must be"):
        eng.set_tensor("q", 0, q, "int8", q.shape)
    with pytest.raises(ValueError, match=r"'q_bias' of layer 0 is not used by this config"):
        eng.set_tensor("q_bias", 0, np.zeros(64, np.float32), "float32", (64,))
    with pytest.raises(ValueError, match=r"layer 3 of q is not loaded"):
        eng.set_tensor("q", 3, q, "float32", q.shape)
    with pytest.raises(TypeError, match=r"C-contiguous buffer"):
        eng.set_tensor("q", 0, np.asfortranarray(q), "float32", q.shape)
    with pytest.raises(RuntimeError, match=r"tensor 'embed' was never set"):
        eng.check_complete()
    for (kind, layer), arr in w.items():
        if (kind, layer) != ("up", 2):
            eng.set_tensor(kind, layer, arr, "float32", arr.shape)
    with pytest.raises(RuntimeError, match=r"tensor 'up' of layer 2 was never set"):
        eng.check_complete()
    eng.reserve(16)
    with pytest.raises(RuntimeError, match=r"'up' of layer 2 was never set"):
        eng.forward(*GOOD.values())


def test_forward_before_reserve(base):
    cfg, w, _ = base
    eng = _core.Engine(cfg, "cpu", 1)
    for (kind, layer), arr in w.items():
        eng.set_tensor(kind, layer, arr, "float32", arr.shape)
    with pytest.raises(RuntimeError, match="call reserve"):
        eng.forward(*GOOD.values())
    with pytest.raises(ValueError, match="max_tokens must be"):
        eng.reserve(0)


@pytest.mark.parametrize("over,msg", [
    (dict(num_heads=3), r"num_heads \(3\) must be a multiple of num_kv_heads \(2\)"),
    (dict(head_dim=15), r"head_dim must be even"),
    (dict(hidden_size=0), r"hidden_size must be in"),
    (dict(max_layer=4), r"max_layer must be in \[0, num_layers=3\]"),
    (dict(rms_norm_eps=float("nan")), r"rms_norm_eps"),
])
def test_bad_config(over, msg):
    with pytest.raises(ValueError, match=msg):
        _core.Engine(make_config(**over), "cpu")
    with pytest.raises(ValueError, match=msg):
        _core.plan_bytes(make_config(**over), "cpu", 16)


def test_config_and_device_arguments():
    cfg = make_config()
    del cfg["head_dim"]
    with pytest.raises(ValueError, match="config is missing 'head_dim'"):
        _core.Engine(cfg, "cpu")
    with pytest.raises(TypeError, match=r"config\['vocab_size'\] must be an int"):
        _core.Engine(make_config(vocab_size=9.5), "cpu")
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        _core.Engine(make_config(), "gpu")


def test_absurd_thread_count_is_refused():
    # libgomp exits or crashes when it cannot create a team (70000 threads
    # segfaulted the process): the count is refused at creation instead
    with pytest.raises(ValueError, match=r"n_threads must be in \[0, 1024\]"):
        _core.Engine(make_config(), "cpu", 70000)
    with pytest.raises(ValueError, match="n_threads must be"):
        _core.Engine(make_config(), "cpu", -1)


def test_cuda_requests_without_cuda():
    if _core.build_info()["cuda"]:
        pytest.skip("CUDA is compiled in")
    assert _core.cuda_device_count() == 0
    with pytest.raises(DeviceError, match="CUDA is not built in"):
        _core.Engine(make_config(), "cuda:0")
    with pytest.raises(DeviceError, match="CUDA is not built in"):
        _core.cuda_check_device(0)
    with pytest.raises(DeviceError, match="CUDA is not built in"):
        _core.cuda_mem_info(0)


def test_plan_bytes_and_memory_report(base):
    cfg, w, _ = base
    eng = make_engine(cfg, w, max_tokens=100)
    wb, wsb = _core.plan_bytes(cfg, "cpu", 100)
    assert (wb, wsb) == (eng.weight_bytes, eng.workspace_bytes)
    # the own GEMM holds its weights packed: each fused GEMM matrix's rows are
    # padded to the panel width of its ISA (OpenBLAS: row-major, no padding)
    isa = _core.build_info()["cpu_isa"]
    nr = 1 if os.environ.get("RJEPA_GEMM") == "openblas" else 32 if isa == "avx512" else 16
    fused = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "gu", "up": "gu", "down": "down"}
    mats: dict = {}
    for (kind, layer), a in w.items():
        if kind in fused:
            rows = mats.get((fused[kind], layer), (0, 0))[0]
            mats[(fused[kind], layer)] = (rows + a.shape[0], a.shape[1])
    plain = sum(a.size for (kind, _), a in w.items() if kind not in fused)
    assert wb == 4 * (plain + sum(-(-r // nr) * nr * c for r, c in mats.values()))
    unpadded = 4 * sum(a.size for a in w.values())
    assert (wb > unpadded) == (nr == 32)   # d = 48 rows: padded to 64 in 32-wide panels only
    rep = eng.memory_report()
    assert rep == dict(device="cpu", weight_bytes=wb, workspace_bytes=wsb, free_bytes=0, total_bytes=0)
    assert eng.device == "cpu" and eng.max_tokens == 100
    eng.verify_resident()
    cuda_w, _ = _core.plan_bytes(cfg, "cuda:0", 100)   # bf16 storage, inv_freq f32
    assert cuda_w == 2 * (unpadded // 4 - cfg["head_dim"] // 2) + 4 * (cfg["head_dim"] // 2)
    info = _core.build_info()
    import re
    from pathlib import Path
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert info["version"] == re.search(r'^version = "(.*)"', pyproject, re.M).group(1)
    import rjepa_latent
    assert rjepa_latent.__version__ == info["version"]
    assert info["blas"].startswith("scipy-openblas32 OpenBLAS") or info["blas"] == "builtin C GEMM"
    assert ("builtin C GEMM" in eng.kernel) == (info["blas"] == "builtin C GEMM")
    assert info["openmp"] is True


def test_plan_bytes_saturate_instead_of_wrapping():
    # every dimension is valid (<= 2^30) but the byte counts pass 2^64; they
    # used to wrap around (to 9e15 here), which can make a plan look small
    huge = make_config(vocab_size=1000, hidden_size=2 ** 30, intermediate_size=2 ** 30,
                       num_layers=2 ** 20, max_layer=2 ** 20, num_heads=8, num_kv_heads=8,
                       head_dim=2 ** 24)
    assert _core.plan_bytes(huge, "cpu", 2 ** 30) == (2 ** 64 - 1, 2 ** 64 - 1)
    # below the limit the counts are exact: 4 bytes x (embed + final norm +
    # inv_freq + per layer: 2 norms, q/k/v/o, gate/up/down)
    cfg = make_config(hidden_size=2 ** 20, intermediate_size=2 ** 22, num_layers=2 ** 12,
                      max_layer=2 ** 12, num_heads=8, num_kv_heads=8, head_dim=2 ** 16)
    d, ff, q = 2 ** 20, 2 ** 22, 8 * 2 ** 16
    layer = 2 * d + 4 * q * d + 3 * ff * d
    want = 4 * (97 * d + d + 2 ** 15 + 2 ** 12 * layer)
    assert _core.plan_bytes(cfg, "cpu", 1)[0] == want


def test_random_batches_never_crash(base):
    """Random (mostly invalid) batches: each call returns a correct-shaped
    result or raises ValueError/TypeError; the process never crashes."""
    cfg, _, eng = base
    rng = np.random.default_rng(11)
    ok = 0
    for _ in range(400):
        T = int(rng.integers(0, 12))
        B = int(rng.integers(0, 4))
        tokens = rng.integers(-3, cfg["vocab_size"] + 3, T)
        cu = np.sort(rng.integers(-1, T + 2, B + 1))
        if rng.random() < 0.5 and B >= 1:
            cu[0], cu[-1] = 0, T
        S = int(rng.integers(0, 4))
        spans = rng.integers(-2, 8, (S, 2))
        span_seq = rng.integers(-1, B + 1, S)
        layers = rng.integers(-1, 5, int(rng.integers(0, 3)))
        try:
            out = eng.forward(tokens, cu, layers, spans, span_seq, "mean")
        except (ValueError, TypeError):
            continue
        ok += 1
        assert out.shape == (len(layers), S, cfg["hidden_size"]) and np.isfinite(out).all()
    assert ok > 0
