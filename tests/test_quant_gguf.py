"""GGUF quantized types and weights kept quantized.

- The engine's C dequantizer (`_core.dequantize_gguf`, the one the keep path
  and the loader use) equals gguf-py's `gguf.quants.dequantize` bitwise on
  random blocks of every supported type (random quants, random finite
  float16 scales including subnormal, negative and large ones).
- Tiny models written in each type (K-quants and IQ4 as random valid blocks:
  `rjepa_latent.testing.gguf_blocks`) match HF transformers loading the same
  file (gguf-py dequantizes it for HF; HF computes in float64 from those
  fp32 weights) at every layer within 1e-5, with the
  weights kept quantized and dequantized at load, and the two are bitwise
  equal on the CPU. A Q4_K_M-like file mixes Q4_K and Q6_K.
- Corrupt blocks (a non-finite scale, a wrong size) are ModelFormatErrors
  naming the tensor, in both modes.
- memory_plan counts the stored bytes plus one scratch, as the engine holds
  them, and a subprocess's resident memory follows the file size.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import rjepa_latent as rl  # noqa: E402
from rjepa_latent import _core  # noqa: E402
from rjepa_latent.testing import tiny_model  # noqa: E402
from rjepa_latent.testing.gguf_blocks import SCALE_OFFSETS  # noqa: E402

from conftest import load_rss  # noqa: E402

NEW_TYPES = ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
ALL_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1") + NEW_TYPES
TOL = 1e-5
HIDDEN = 256   # K-quant rows hold 256 values


# ----------------------------------------------------------------- dequantization

def _random_scales(rng: np.random.Generator, n: int) -> np.ndarray:
    """Finite float16 scales: ordinary, subnormal, negative, zero and large."""
    mags = np.concatenate([rng.uniform(-2, 2, n // 2), rng.uniform(-6e-5, 6e-5, n // 4),
                           rng.uniform(-6e4, 6e4, n - n // 2 - n // 4)])
    mags[rng.integers(0, n, max(1, n // 50))] = 0.0
    return rng.permutation(mags).astype(np.float16)


def _random_tensor(type_name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[type_name]
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * cols // block
    blocks = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    for off in SCALE_OFFSETS.get(type_name, ()):
        blocks[:, off:off + 2] = _random_scales(rng, n).view(np.uint8).reshape(n, 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_dequantize_bitwise_equals_gguf_py(type_name):
    from gguf.quants import dequantize
    qtype = gguf.GGMLQuantizationType[type_name]
    for seed, (rows, cols) in enumerate([(1, 256), (7, 512), (33, 1024)]):
        data = _random_tensor(type_name, rows, cols, seed)
        ours = _core.dequantize_gguf(data, int(qtype), rows, cols)
        ref = np.asarray(dequantize(data, qtype), dtype=np.float32).reshape(rows, cols)
        assert ours.dtype == np.float32 and ours.shape == (rows, cols)
        np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32),
                                      err_msg=f"{type_name} {rows}x{cols}")


@pytest.mark.parametrize("type_name", sorted(SCALE_OFFSETS))
def test_dequantize_refuses_non_finite_scales(type_name):
    qtype = int(gguf.GGMLQuantizationType[type_name])
    for k, off in enumerate(SCALE_OFFSETS[type_name]):
        data = _random_tensor(type_name, 3, 512, 7)
        nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][1]
        bad = np.float16(np.inf if k == 0 else np.nan)
        row_blocks = data.shape[1] // nbytes
        data[2, (row_blocks - 1) * nbytes + off:(row_blocks - 1) * nbytes + off + 2] = \
            np.frombuffer(bad.tobytes(), np.uint8)
        with pytest.raises(ValueError, match=rf"{type_name} block {row_blocks - 1} of row 2 has a "
                                             rf"non-finite scale \({'min' if k else 'd'}\)"):
            _core.dequantize_gguf(data, qtype, 3, 512)


def test_dequantize_refuses_inconsistent_sizes():
    q4k = int(gguf.GGMLQuantizationType.Q4_K)
    data = _random_tensor("Q4_K", 2, 512, 0)
    with pytest.raises(ValueError, match="does not hold whole Q4_K blocks"):
        _core.dequantize_gguf(data, q4k, 2, 500)
    with pytest.raises(ValueError, match="holds 576 bytes of Q4_K blocks, expected 864"):
        _core.dequantize_gguf(data, q4k, 3, 512)
    with pytest.raises(ValueError, match="GGML type 9 is not supported"):   # Q8_1
        _core.dequantize_gguf(data, 9, 2, 512)


# ----------------------------------------------------------------- models vs HF

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("qgguf")
    cache: dict = {}

    def get(dtype: str, family: str = "llama") -> Path:
        if (dtype, family) not in cache:
            # qwen3: head_dim 128, which HF's GGUF reader assumes for that architecture
            heads = (2, 1) if family == "qwen3" else (4, 2)
            cache[dtype, family] = tiny_model(root / f"{family}-{dtype}" / "model.gguf",
                                              family=family, hidden=HIDDEN, heads=heads[0],
                                              kv_heads=heads[1], format="gguf", dtype=dtype,
                                              seed=3)
        return cache[dtype, family]
    return get


def _hf_states(path: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear" and q.weight.dtype == torch.float32
    # float64 from the same (fp32, gguf-py dequantized) weights: the reference
    # then measures this engine's fp32 error alone, not HF's fp32 error too
    model = model.double()
    with torch.inference_mode():
        out = model.model(torch.tensor([ids]), output_hidden_states=True)
    return torch.stack(out.hidden_states)[:, 0].float().numpy()


def _worst(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape
    return max(float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(ours, ref))


def _check_file(path: Path, expect_types: set[str]) -> None:
    stored = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors
              if len(t.shape) == 2}
    assert stored == expect_types
    ids = np.random.default_rng(5).integers(2, 300, 57).astype(np.int32)
    kept = rl.Model(path, device="cpu", max_batch_tokens=64)
    dense = rl.Model(path, device="cpu", max_batch_tokens=64, weights="dequantize")
    assert (kept.weights, dense.weights) == ("keep", "dequantize")
    a, b = kept.hidden_states(ids), dense.hidden_states(ids)
    np.testing.assert_array_equal(a, b)   # the same fp32 weights reach the same GEMMs
    worst = _worst(a, _hf_states(path, ids.tolist()))
    assert worst <= TOL, (path.name, worst)
    # the stored blocks (plus one scratch) replace the dense matrices
    assert kept.memory_report()["weight_bytes"] < dense.memory_report()["weight_bytes"]


@pytest.mark.parametrize("dtype", NEW_TYPES)
def test_every_layer_matches_hf(files, dtype):
    """llama: q/k rows carry llama.cpp's per-head interleave, so the kept
    blocks are put back in HF row order whole rows at a time."""
    _check_file(files(dtype), {dtype})


def test_mixed_q4_k_m_file_matches_hf(files):
    _check_file(files("Q4_K_M", "qwen3"), {"Q4_K", "Q6_K"})


def test_existing_types_keep_by_default_and_dense_files_do_not(files):
    assert rl.Model(files("Q8_0"), device="cpu", max_batch_tokens=16).weights == "keep"
    assert rl.Model(files("float16"), device="cpu", max_batch_tokens=16).weights == "dequantize"
    forced = rl.Model(files("float16"), device="cpu", max_batch_tokens=16, weights="keep")
    ids = np.arange(3, 40, dtype=np.int32)
    ref = rl.Model(files("float16"), device="cpu", max_batch_tokens=16).hidden_states(ids)
    np.testing.assert_array_equal(forced.hidden_states(ids), ref)
    with pytest.raises(ValueError, match="weights must be 'keep', 'dequantize' or None"):
        rl.Model(files("Q8_0"), device="cpu", weights="int4")


def test_hf_directory_refuses_keep(tmp_path):
    d = tiny_model(tmp_path / "hf")
    with pytest.raises(ValueError, match="weights='keep' needs a checkpoint stored quantized"):
        rl.Model(d, device="cpu", weights="keep")


@pytest.mark.parametrize("weights", ["keep", "dequantize"])
def test_memory_plan_counts_what_the_engine_holds(files, weights):
    path = files("Q4_K_M", "qwen3")
    plan = rl.memory_plan(path, device="cpu", max_batch_tokens=32, weights=weights)
    m = rl.Model(path, device="cpu", max_batch_tokens=32, weights=weights)
    rep = m.memory_report()
    assert (plan["weight_bytes"], plan["workspace_bytes"]) == \
        (rep["weight_bytes"], rep["workspace_bytes"])
    assert plan["weights"] == weights
    if weights == "keep":
        stored = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors
                     if len(t.shape) == 2)
        assert plan["kept_bytes"] == stored
        cfg = m.config
        # one scratch of the largest fused matrix (gate + up) in fp32
        scratch = 2 * cfg["intermediate_size"] * cfg["hidden_size"] * 4
        dense_rest = plan["weight_bytes"] - stored - scratch
        assert 0 < dense_rest < 4 * 64 * HIDDEN   # norms and rope only


# ----------------------------------------------------------------- corrupt files

def _corrupt_scale(path: Path, out: Path, tensor: str, type_name: str) -> None:
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == tensor)
    assert t.tensor_type.name == type_name
    nbytes = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
    raw = bytearray(path.read_bytes())
    pos = int(t.data_offset) + 3 * nbytes + SCALE_OFFSETS[type_name][0]
    raw[pos:pos + 2] = np.float16(np.nan).tobytes()
    out.write_bytes(bytes(raw))


@pytest.mark.parametrize("weights", ["keep", "dequantize"])
def test_non_finite_scale_in_file_names_the_tensor(files, tmp_path, weights):
    bad = tmp_path / "bad.gguf"
    _corrupt_scale(files("Q4_K_M", "qwen3"), bad, "blk.1.ffn_up.weight", "Q4_K")
    with pytest.raises(rl.ModelFormatError, match=r"bad.gguf: tensor 'blk.1.ffn_up.weight': .*"
                                                  r"Q4_K block 0 of row 3 has a non-finite scale"):
        rl.Model(bad, device="cpu", weights=weights, max_batch_tokens=16)


# ----------------------------------------------------------------- resident memory




@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_resident_memory_follows_file_size(tmp_path):
    """A Q4_K model of ~300 MB in fp32 (~45 MB as stored): loading it kept
    quantized grows the process by about the file (plus one layer's scratch),
    not by the dense size; the mapped file pages are dropped after copying."""
    path = tiny_model(tmp_path / "m.gguf", family="qwen3", hidden=1024, layers=8, heads=8,
                      kv_heads=4, format="gguf", dtype="Q4_K")
    size = path.stat().st_size
    kept = load_rss(path, "keep")
    dense = load_rss(path, "dequantize")
    cfg = rl.memory_plan(path, device="cpu", max_batch_tokens=16, weights="keep")
    scratch = 2 * 2048 * 1024 * 4
    grew = kept["peak"] - kept["base"]
    assert kept["weight_bytes"] == cfg["weight_bytes"]
    assert grew <= 1.25 * size + scratch + 48 * 2**20, (grew, size)
    assert dense["after"] - dense["base"] > 4 * size   # what keeping saves


# ----------------------------------------------------------------- CUDA (and the emulated device)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cuda_keep_equals_dequantize(files, dtype):
    """The device kernels dequantize each block to the CPU's fp32 values and
    round them once into the weight dtype, as an upload of the dequantized
    weights does: kept and dequantized models give the same bits; and the
    fp32 mode follows the CPU engine."""
    from rjepa_latent import _core as core
    if not rl.build_info()["cuda"]:
        pytest.skip("CUDA not compiled in")
    if core.cuda_device_count() == 0:
        pytest.skip("no CUDA device")
    path = files("Q4_K_M", "qwen3")
    ids = np.random.default_rng(2).integers(2, 300, 45).astype(np.int32)
    kept = rl.Model(path, device="cuda:0", dtype=dtype, max_batch_tokens=64)
    dense = rl.Model(path, device="cuda:0", dtype=dtype, max_batch_tokens=64, weights="dequantize")
    assert kept.weights == "keep"
    a = kept.hidden_states(ids)
    np.testing.assert_array_equal(a, dense.hidden_states(ids))
    if dtype == "float32":
        ref = rl.Model(path, device="cpu", max_batch_tokens=64).hidden_states(ids)
        assert _worst(a, ref) <= 1e-4
    assert kept.memory_report()["weight_bytes"] < dense.memory_report()["weight_bytes"]
