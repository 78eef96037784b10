"""AWQ, GPTQ and FP8 (block scales) HF directories.

- The C dequantization (`_core.dequant_hf`) equals, bitwise on random
  blocks, the dequantization of packages no one here wrote: compressed-tensors
  (its AutoAWQ converter, its int32 unpacking, its group dequantize and its
  FP8 block dequantizer) and transformers' own FP8 dequantization. Their
  formula (q - zero) * scale is run in fp32 with the scales converted
  exactly, as this package runs it.
- Tiny models quantized into each layout (`rjepa_latent.testing.quantize`)
  load, and every layer equals HF transformers holding the weights those
  packages dequantize (<= 1e-5), and our own model of those fp32 weights
  bitwise.
- Damaged or inconsistent files are ModelFormatErrors naming the tensor;
  unsupported methods are refused naming what is supported.
- `check_parity` / `rjepa-latent parity` pass on them.
- Kept quantized (the default on the CPU), every layout gives the bits of
  the same model dequantized at load; memory_plan counts what the engine
  holds, resident memory follows the stored size, and damaged parts are the
  same ModelFormatErrors under both `weights` modes.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent import _core
from rjepa_latent.checkpoints import hf_quantized as quantized
from rjepa_latent.checkpoints.checkpoint import read_safetensors_header
from rjepa_latent.errors import ModelFormatError
from rjepa_latent.testing import tiny_model
from rjepa_latent.testing.models import _write_safetensors
from rjepa_latent.testing.quantize import e4m3_values, quantize_hf

from conftest import hf_hidden_states, load_rss, rel_err

torch = pytest.importorskip("torch")
ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors (test extra) is the "
                         "reference dequantization")

NP_DTYPES = {"I32": np.int32, "F16": np.float16, "F32": np.float32, "BF16": np.uint16,
             "F8_E4M3": np.uint8}
TORCH_SCALE = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16}


def ours(family, subtype, rows, cols, group, parts, r0=0, r1=None):
    r1 = rows if r1 is None else r1
    out = np.empty((r1 - r0, cols), np.float32)
    _core.dequant_hf(family, subtype, rows, cols, group, tuple(parts), out, r0, r1)
    return out


def scale_tensor(arr: np.ndarray, st: str):
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.view(torch.bfloat16) if st == "BF16" else t


# ---------------------------------------------------------------- references


def ct_group_dequant(q, scale, zero, bits: int, group: int) -> np.ndarray:
    """compressed-tensors' dequantize of signed ints [out, in] with per-group
    scale/zero [out, G], in fp32."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=zero is None,
                            strategy="group", group_size=group)
    return dequantize(q, scale.float(), zero, args=args, dtype=torch.float32).numpy()


def ref_awq(qweight, qzeros, scales, st, group):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter
    conv = AutoAWQConverter(bits=4, group_size=group, zero_point=qzeros is not None)
    t = {"m.qweight": torch.from_numpy(qweight), "m.scales": scale_tensor(scales, st)}
    if qzeros is not None:
        t["m.qzeros"] = torch.from_numpy(qzeros)
    t = conv.process(t)
    out, inn = scales.shape[1], qweight.shape[0]
    q = unpack_from_int32(t["m.weight_packed"], 4, (out, inn))
    z = t.get("m.weight_zero_point")
    if z is not None:
        z = unpack_from_int32(z, 4, (out, inn // group), packed_dim=0)
    return ct_group_dequant(q, t["m.weight_scale"], z, 4, group)


def ref_gptq(qweight, qzeros, scales, st, g_idx, bits, group, v1):
    """GPTQ's qweight is compressed-tensors' weight_packed transposed, its
    qzeros the transposed zero-point packing; v1 stores each zero minus one;
    act-order columns are sorted by group, dequantized, and put back."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    pf = 32 // bits
    inn, out = qweight.shape[0] * pf, qweight.shape[1]
    groups = scales.shape[0]
    q = unpack_from_int32(torch.from_numpy(qweight).T.contiguous(), bits, (out, inn))
    z = None
    if qzeros is not None:
        z = unpack_from_int32(torch.from_numpy(qzeros).T.contiguous(), bits, (out, groups),
                              packed_dim=0).to(torch.int32) + (1 if v1 else 0)
    perm = np.argsort(g_idx, kind="stable") if g_idx is not None else np.arange(inn)
    deq = ct_group_dequant(q[:, perm].to(torch.int32), scale_tensor(scales, st).T.contiguous(),
                           z, bits, inn // groups)
    out_w = np.empty_like(deq)
    out_w[:, perm] = deq
    return out_w


def ref_fp8(weight, scale, st, block):
    """compressed-tensors' FP8 block dequantizer (fp32), and transformers'
    Fp8Dequantize where the blocks tile the weight."""
    from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import \
        FP8BlockDequantizer
    w = torch.from_numpy(weight).view(torch.float8_e4m3fn)
    s = scale_tensor(scale, st)
    a = FP8BlockDequantizer(weight_block_size=(block, block), dtype=torch.float32).process(
        {"m.proj.weight": w, "m.proj.weight_scale_inv": s})["m.proj.weight"].numpy()
    if weight.shape[0] % block == 0 and weight.shape[1] % block == 0:
        from transformers.integrations.finegrained_fp8 import Fp8Dequantize
        b = Fp8Dequantize(None)._dequantize_one(w, s, output_dtype=torch.float32).numpy()
        np.testing.assert_array_equal(a, b)
    return a


# ---------------------------------------------------------------- random blocks


def rand_scales(rng, shape, st):
    v = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    if st == "F16":
        return v.astype(np.float16)
    if st == "BF16":
        return (v.view(np.uint32) >> 16).astype(np.uint16)
    return v


def rand_words(rng, shape):
    return rng.integers(0, 1 << 32, shape, dtype=np.uint64).astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("st", ["F16", "BF16", "F32"])
@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("rows,cols,group", [(64, 128, 32), (24, 256, 128), (8, 64, 64)])
def test_awq_bitwise_equals_compressed_tensors(rows, cols, group, zero_point, st):
    rng = np.random.default_rng(rows + cols + group)
    qweight = rand_words(rng, (cols, rows // 8))
    qzeros = rand_words(rng, (cols // group, rows // 8)) if zero_point else None
    scales = rand_scales(rng, (cols // group, rows), st)
    sub = 4 | quantized.SCALE_CODES[st] << 8
    got = ours(quantized.RL_QF_AWQ, sub, rows, cols, group, (qweight, qzeros, scales))
    np.testing.assert_array_equal(got, ref_awq(qweight, qzeros, scales, st, group))
    # any row range is the same rows of the whole
    np.testing.assert_array_equal(
        ours(quantized.RL_QF_AWQ, sub, rows, cols, group, (qweight, qzeros, scales), 3, rows - 2),
        got[3:rows - 2])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym,v1,act_order", [(False, True, False), (False, False, True),
                                              (True, True, True), (True, False, False)])
def test_gptq_bitwise_equals_compressed_tensors(bits, sym, v1, act_order):
    rng = np.random.default_rng(bits * 7 + sym + 2 * v1)
    rows, cols, group = 64, 256, 64
    pf, groups = 32 // bits, 256 // 64
    qweight = rand_words(rng, (cols // pf, rows))
    qzeros = None
    if not sym:
        z = rng.integers(0, (1 << bits) - (1 if v1 else 0), (groups, rows))   # v1 never stores 2^b-1
        qzeros = np.zeros((groups, rows // pf), np.uint32)
        for j in range(pf):
            qzeros |= z[:, j::pf].astype(np.uint32) << np.uint32(bits * j)
        qzeros = qzeros.view(np.int32)
    scales = rand_scales(rng, (groups, rows), "F16")
    g_idx = None
    if act_order:
        g_idx = np.empty(cols, np.int32)
        g_idx[rng.permutation(cols)] = np.arange(cols) // group
    sub = bits | (quantized.ZERO_MINUS_ONE if v1 else 0)
    got = ours(quantized.RL_QF_GPTQ, sub, rows, cols, group, (qweight, qzeros, scales, g_idx))
    np.testing.assert_array_equal(got, ref_gptq(qweight, qzeros, scales, "F16", g_idx, bits,
                                                group, v1))
    part = ours(quantized.RL_QF_GPTQ, sub, rows, cols, group, (qweight, qzeros, scales, g_idx),
                5, 37)
    np.testing.assert_array_equal(part, got[5:37])


@pytest.mark.parametrize("st", ["F32", "BF16"])
@pytest.mark.parametrize("rows,cols,block", [(256, 384, 128), (200, 130, 128), (96, 64, 32)])
def test_fp8_bitwise_equals_transformers_and_compressed_tensors(rows, cols, block, st):
    rng = np.random.default_rng(rows * cols)
    weight = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    weight[(weight & 0x7F) == 0x7F] = 0x42                  # no NaN codes
    scale = rand_scales(rng, (-(-rows // block), -(-cols // block)), st)
    sub = 8 | quantized.SCALE_CODES[st] << 8
    got = ours(quantized.RL_QF_FP8_BLOCK, sub, rows, cols, block, (weight, scale))
    np.testing.assert_array_equal(got, ref_fp8(weight, scale, st, block))
    np.testing.assert_array_equal(
        ours(quantized.RL_QF_FP8_BLOCK, sub, rows, cols, block, (weight, scale), 1, rows - 1),
        got[1:rows - 1])


def test_e4m3_table_and_hand_checked_awq_word():
    """The test quantizer's e4m3 table is torch's, and one AWQ word by hand:
    AutoAWQ puts output feature (0, 2, 4, 6, 1, 3, 5, 7)[k] in nibble k, so in
    0x76543210 (nibble k holds k) features 0..7 hold 0, 4, 1, 5, 2, 6, 3, 7."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(e4m3_values(), codes)
    qweight = np.array([[0x76543210]], np.uint32).view(np.int32)
    scales = np.ones((1, 8), np.float16)
    got = ours(quantized.RL_QF_AWQ, 4, 8, 1, 1, (qweight, None, scales))
    np.testing.assert_array_equal(got[:, 0], np.array([0, 4, 1, 5, 2, 6, 3, 7]) - 8.0)


# ---------------------------------------------------------------- tiny models

LAYOUTS = {
    "awq": ("awq", {}),
    "awq_nozero": ("awq", {"zero_point": False, "group_size": 64}),
    "gptq4_sym": ("gptq", {"sym": True, "g_idx": False}),
    "gptq4_asym_actorder": ("gptq", {"act_order": True}),
    "gptq8_v2": ("gptq", {"bits": 8, "checkpoint_format": "gptq_v2", "group_size": -1}),
    "gptq2_bf16": ("gptq", {"bits": 2, "scale_dtype": "bfloat16"}),
    "fp8": ("fp8", {}),
    "fp8_bf16_b32": ("fp8", {"block": 32, "scale_dtype": "bfloat16"}),
}


def read_tensors(path) -> dict[str, tuple[str, np.ndarray]]:
    infos, _ = read_safetensors_header(str(path))
    data = path.read_bytes()
    return {n: (t.dtype, np.frombuffer(data[t.begin:t.end], NP_DTYPES[t.dtype]).reshape(t.shape).copy())
            for n, t in infos.items()}


def reference_weights(qdir, scheme) -> dict[str, np.ndarray]:
    """Every tensor of a quantized directory as fp32, each quantized module
    dequantized by the reference packages."""
    t = read_tensors(qdir / "model.safetensors")
    out = {}
    for name, (dt, arr) in t.items():
        module, _, part = name.rpartition(".")
        if part in ("qweight", "weight") and (part == "qweight" or dt == "F8_E4M3"):
            if scheme.method == "awq":
                st, sc = t[f"{module}.scales"]
                qz = t.get(f"{module}.qzeros", (None, None))[1] if scheme.zero_point else None
                w = ref_awq(arr, qz, sc, st, scheme.group_size)
            elif scheme.method == "gptq":
                st, sc = t[f"{module}.scales"]
                qz = t.get(f"{module}.qzeros", (None, None))[1]
                gi = t.get(f"{module}.g_idx", (None, None))[1]
                cols = arr.shape[0] * 32 // scheme.bits
                group = cols if scheme.group_size == -1 else scheme.group_size
                w = ref_gptq(arr, qz, sc, st, gi, scheme.bits, group, scheme.zero_minus_one)
            else:
                st, sc = t[f"{module}.weight_scale_inv"]
                w = ref_fp8(arr, sc, st, scheme.group_size)
            out[f"{module}.weight"] = w
        elif part in ("qzeros", "scales", "g_idx", "weight_scale_inv"):
            continue
        else:
            out[name] = arr.astype(np.float32)
    return out


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """layouts(family, layout) -> (quantized dir, fp32 dir of the reference-
    dequantized weights)."""
    cache: dict = {}

    def get(family: str, layout: str):
        key = (family, layout)
        if key not in cache:
            base = tmp_path_factory.mktemp(f"{family}-{layout}")
            hidden = 128 if layout.startswith("fp8") else 64
            src = tiny_model(base / "src", family=family, hidden=hidden, seed=3)
            method, kw = LAYOUTS[layout]
            qdir = quantize_hf(src, base / "q", method, **kw)
            scheme = quantized.read_scheme(str(qdir))
            ref = base / "ref"
            ref.mkdir()
            _write_safetensors(ref / "model.safetensors",
                               {n: ("F32", w) for n, w in reference_weights(qdir, scheme).items()})
            cfg = json.loads((qdir / "config.json").read_text())
            del cfg["quantization_config"]
            (ref / "config.json").write_text(json.dumps(cfg))
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copyfile(qdir / f, ref / f)
            cache[key] = (qdir, ref)
        return cache[key]
    return get


CASES = [("qwen3", lay) for lay in LAYOUTS] + [("llama", "awq"), ("llama", "gptq4_asym_actorder"),
                                               ("qwen2", "gptq4_sym"), ("qwen2", "fp8"),
                                               ("gemma3_text", "awq"), ("olmo2", "gptq8_v2"),
                                               ("mistral", "fp8_bf16_b32")]


@pytest.mark.parametrize("family,layout", CASES)
def test_every_layer_equals_hf_on_reference_dequantized_weights(layouts, family, layout):
    qdir, ref = layouts(family, layout)
    ids = np.random.default_rng(1).integers(0, 320, 37)
    with rl.Model(qdir, device="cpu", threads=2) as m, rl.Model(ref, device="cpu", threads=2) as r:
        assert m.weights == "keep"          # the default for a quantized directory
        got = m.hidden_states(ids)
        np.testing.assert_array_equal(got, r.hidden_states(ids))   # the same fp32 weights
    err = rel_err(got, hf_hidden_states(ref, ids))
    assert err.max() <= 1e-5, (family, layout, err)
    assert err[1:].min() > 0             # a real comparison


def test_quantized_weights_differ_from_the_unquantized(layouts):
    """The layout is read, not bypassed: 4-bit weights are near, not equal to,
    the float32 ones they came from."""
    qdir, _ = layouts("qwen3", "awq")
    src = qdir.parent / "src"
    ids = np.arange(2, 30)
    with rl.Model(qdir, device="cpu") as m, rl.Model(src, device="cpu") as f:
        a, b = m.hidden_states(ids), f.hidden_states(ids)
    err = rel_err(a, b)
    assert 1e-3 < err[1] < 0.5, err


def test_parity_passes_on_quantized_directories(layouts, tmp_path, capsys):
    from rjepa_latent.cli import main
    for layout in ("awq", "gptq4_asym_actorder", "fp8"):
        qdir, _ = layouts("qwen3", layout)
        res = rl.check_parity(qdir, device="cpu", texts=["one step of text", "and a second"])
        assert res.passed, res.table()
        assert any("quantized" in n for n in res.notes)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q", "steps": ["a b", "c d e"]}) + "\n")
    qdir, _ = layouts("qwen3", "gptq8_v2")
    assert main(["parity", "--model", str(qdir), "--data", str(data), "--texts", "1"]) == 0
    assert "PASSED" in capsys.readouterr().out


# ---------------------------------------------------------------- damaged files


def rewrite(qdir, dst, tensors=None, config=None):
    """A copy of qdir with tensors changed by `tensors(dict)` and the
    quantization_config by `config(dict)`."""
    shutil.copytree(qdir, dst)
    if tensors:
        t = read_tensors(dst / "model.safetensors")
        tensors(t)
        _write_safetensors(dst / "model.safetensors", t)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


P = "model.layers.0.self_attn.q_proj"
M = "model.layers.1.mlp.down_proj"


def _set(t, name, fn):
    dt, arr = t[name]
    t[name] = (dt, fn(arr))


def _poke(index, value):
    def fn(a):
        a = a.copy()
        a[index] = value
        return a
    return fn


BAD = {
    "awq scales wrong shape": ("awq", lambda t: _set(t, f"{P}.scales", lambda a: a[:-1]), None,
                               rf"{P}\.scales.*has shape"),
    "awq group not dividing": ("awq", None, lambda q: q.update(group_size=24),
                               rf"{P}\.qweight.*not a multiple of group_size 24"),
    "awq qzeros missing": ("awq", lambda t: t.pop(f"{M}.qzeros"), None, rf"lacks {M}\.qzeros"),
    "awq qweight dtype": ("awq", lambda t: t.update({f"{P}.qweight": (
        "F32", t[f"{P}.qweight"][1].view(np.float32))}), None, rf"{P}\.qweight.*dtype F32"),
    "gptq scale inf": ("gptq4_asym_actorder", lambda t: _set(t, f"{M}.scales",
                                                             _poke((1, 3), np.inf)), None,
                       rf"{M}\.scales.*scale \[1, 3\] is not finite"),
    "gptq scale nan bf16": ("gptq2_bf16", lambda t: _set(t, f"{P}.scales", _poke((0, 0), 0x7FC0)),
                            None, rf"{P}\.scales.*not finite"),
    "gptq g_idx out of range": ("gptq4_asym_actorder", lambda t: _set(t, f"{P}.g_idx",
                                                                      _poke(5, 99)), None,
                                rf"{P}\.g_idx.*g_idx\[5\] = 99 is outside 0\.\.1"),
    "gptq g_idx negative": ("gptq4_asym_actorder", lambda t: _set(t, f"{M}.g_idx", _poke(0, -1)),
                            None, rf"{M}\.g_idx.*= -1"),
    "gptq g_idx wrong length": ("gptq4_asym_actorder", lambda t: _set(t, f"{P}.g_idx",
                                                                      lambda a: a[:-8]),
                                None, rf"{P}\.g_idx.*has shape \[56\], expected \[64\]"),
    "gptq qzeros wrong shape": ("gptq4_asym_actorder", lambda t: _set(
        t, f"{P}.qzeros", lambda a: np.concatenate([a, a])), None, rf"{P}\.qzeros.*has shape"),
    "gptq act-order without g_idx": ("gptq4_asym_actorder", lambda t: t.pop(f"{P}.g_idx"), None,
                                     rf"lacks {P}\.g_idx"),
    "gptq unsupported bits": ("gptq4_sym", None, lambda q: q.update(bits=3),
                              r"GPTQ with bits=3 is not supported"),
    "gptq marlin format": ("gptq4_sym", None, lambda q: q.update(checkpoint_format="marlin"),
                           r"checkpoint_format 'marlin' is not supported"),
    "awq unsupported bits": ("awq", None, lambda q: q.update(bits=8),
                             r"AWQ with bits=8 is not supported"),
    "awq gemv": ("awq", None, lambda q: q.update(version="gemv"),
                 r"AWQ version 'gemv' is not supported"),
    "unknown method": ("awq", None, lambda q: q.update(quant_method="bitsandbytes"),
                       r"quant_method 'bitsandbytes' is not supported \(supported: awq"),
    "fp8 scale wrong shape": ("fp8_bf16_b32", lambda t: _set(
        t, f"{P}.weight_scale_inv", lambda a: a[:, :-1].copy()), None,
                              rf"{P}\.weight_scale_inv.*has shape \[4, 3\], expected \[4, 4\]"),
    "fp8 scale inf": ("fp8", lambda t: _set(t, f"{M}.weight_scale_inv", _poke((0, 0), np.inf)),
                      None, rf"{M}\.weight_scale_inv.*not finite"),
    "fp8 nan weight": ("fp8", lambda t: _set(t, f"{P}.weight", _poke((3, 7), 0x7F)), None,
                       rf"{P}\.weight.*\[3, 7\] is an e4m3 NaN"),
    "fp8 scale missing": ("fp8", lambda t: t.pop(f"{P}.weight_scale_inv"), None,
                          rf"lacks {P}\.weight_scale_inv"),
    "fp8 non-square block": ("fp8", None, lambda q: q.update(weight_block_size=[128, 64]),
                             r"weight_block_size \[128, 64\] is not a square block"),
    "fp8 static activations": ("fp8", None, lambda q: q.update(activation_scheme="static"),
                               r"activation_scheme 'static' is not supported"),
}


@pytest.mark.parametrize("weights", ["keep", "dequantize"])
@pytest.mark.parametrize("case", list(BAD))
def test_damaged_or_unsupported_is_a_model_format_error(layouts, tmp_path, case, weights):
    layout, tensors, config, pattern = BAD[case]
    qdir, _ = layouts("qwen3", layout)
    bad = rewrite(qdir, tmp_path / "bad", tensors, config)
    with pytest.raises(ModelFormatError, match=pattern):
        rl.Model(bad, device="cpu", weights=weights)


def test_core_refuses_inconsistent_parts_without_reading_past_them():
    """The C side checks sizes itself (a caller that skipped the Python
    checks gets a ValueError, never an out-of-bounds read)."""
    qweight = np.zeros((64, 4), np.int32)
    scales = np.ones((2, 32), np.float16)
    with pytest.raises(ValueError, match=r"qweight has 1024 bytes, expected 4096"):
        ours(quantized.RL_QF_AWQ, 4, 32, 256, 128, (qweight, None, scales))
    with pytest.raises(ValueError, match="g_idx\\[3\\] is 7"):
        g = np.zeros(64, np.int32)
        g[3] = 7
        ours(quantized.RL_QF_GPTQ, 4, 32, 64, 32, (np.zeros((8, 32), np.int32), None, scales, g))
    with pytest.raises(ValueError, match="too large"):
        ours(quantized.RL_QF_FP8_BLOCK, 8, 1 << 40, 1 << 20, 128, (qweight, scales), 0, 0)
    with pytest.raises(ValueError, match="out has"):
        _core.dequant_hf(quantized.RL_QF_AWQ, 4, 32, 64, 32, (qweight[:8], None, scales),
                         np.empty((3, 3), np.float32), 0, 32)


def test_sharded_and_partly_unquantized_directories(layouts, tmp_path):
    """A module's parts may sit in different shards, and a module left
    unquantized (modules_to_not_convert) is a plain weight beside quantized
    ones: both load to the same network."""
    qdir, ref = layouts("qwen3", "gptq4_asym_actorder")
    t = read_tensors(qdir / "model.safetensors")
    names = sorted(t)
    shard_of = {n: ("a" if n.endswith((".qweight", ".g_idx", "norm.weight")) else "b")
                for n in names}
    assert shard_of[f"{P}.qweight"] != shard_of[f"{P}.scales"]      # parts split over shards
    out = tmp_path / "sharded"
    shutil.copytree(qdir, out)
    (out / "model.safetensors").unlink()
    for s in ("a", "b"):
        _write_safetensors(out / f"model-{s}.safetensors",
                           {n: t[n] for n in names if shard_of[n] == s})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f"model-{shard_of[n]}.safetensors" for n in names}}))
    # down_proj of layer 1 stored plain, as its reference-dequantized fp32 weight
    plain = tmp_path / "plain"
    ref_w = read_tensors(ref / "model.safetensors")[f"{M}.weight"]

    def unquantize(t):
        for part in ("qweight", "qzeros", "scales", "g_idx"):
            t.pop(f"{M}.{part}")
        t[f"{M}.weight"] = ref_w
    rewrite(qdir, plain, unquantize,
            lambda q: q.update(modules_to_not_convert=["model.layers.1.mlp.down_proj"]))
    ids = np.arange(3, 40)
    with rl.Model(ref, device="cpu") as r:
        want = r.hidden_states(ids)
    for d in (out, plain):
        for weights in ("keep", "dequantize"):
            with rl.Model(d, device="cpu", weights=weights) as m:
                assert m.weights == weights
                np.testing.assert_array_equal(m.hidden_states(ids), want)


# ---------------------------------------------------------------- kept quantized


QUANT_PARTS = ("qweight", "qzeros", "scales", "g_idx", "weight_scale_inv")


def stored_bytes(qdir, zero_point=True) -> int:
    """Bytes of every quantized module's parts as the file stores them."""
    infos, _ = read_safetensors_header(str(qdir / "model.safetensors"))
    return sum(t.end - t.begin for n, t in infos.items()
               if (n.rpartition(".")[2] in QUANT_PARTS or t.dtype == "F8_E4M3")
               and (zero_point or not n.endswith(".qzeros")))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_keep_equals_dequantize_bitwise(layouts, layout):
    """The engine dequantizes the stored parts into its scratch before each
    GEMM: the same fp32 weights as the load-time dequantization, so the same
    bits; and the stored parts (plus one scratch) replace the dense matrices."""
    qdir, _ = layouts("qwen3", layout)
    ids = np.random.default_rng(4).integers(0, 320, 41)
    with rl.Model(qdir, device="cpu", threads=2, max_batch_tokens=64) as kept, \
            rl.Model(qdir, device="cpu", threads=2, max_batch_tokens=64,
                     weights="dequantize") as dense:
        assert (kept.weights, dense.weights) == ("keep", "dequantize")
        np.testing.assert_array_equal(kept.hidden_states(ids), dense.hidden_states(ids))
        assert kept.memory_report()["weight_bytes"] < dense.memory_report()["weight_bytes"]


@pytest.mark.parametrize("method", ["awq", "gptq", "fp8"])
@pytest.mark.parametrize("embed_dtype", ["F16", "BF16", "F32"])
def test_16bit_embedding_is_kept_beside_quantized_matrices(tmp_path, method, embed_dtype):
    """A float16 / bfloat16 embedding is kept as stored (half its fp32 bytes)
    when the matrices are, with the bits of the model dequantized at load; a
    float32 one is held dense either way."""
    from rjepa_latent.checkpoints.loader import checkpoint_storage
    from rjepa_latent.testing.models import hf_config
    from rjepa_latent.testing.quantize import random_quantized_hf
    raw = hf_config("qwen3", hidden=256, heads=2, kv_heads=1, vocab=1000)
    raw.update(head_dim=128)
    qdir = random_quantized_hf(tmp_path / "q", raw, method)    # a float16 embedding
    if embed_dtype != "F16":   # the same values stored as bfloat16 / float32
        t = read_tensors(qdir / "model.safetensors")
        w = t["model.embed_tokens.weight"][1].astype(np.float32)
        from rjepa_latent.store.files import bf16_from_f32
        t["model.embed_tokens.weight"] = (embed_dtype, w if embed_dtype == "F32"
                                          else bf16_from_f32(w))
        _write_safetensors(qdir / "model.safetensors", t)
    keep, stored = checkpoint_storage(qdir, None, "keep")
    assert ("embed" in keep) == (embed_dtype != "F32")
    # the stored embedding's bytes count as kept, once
    assert stored == stored_bytes(qdir) + (1000 * 256 * 2 if embed_dtype != "F32" else 0)
    ids = np.random.default_rng(5).integers(0, 1000, 37)
    with rl.Model(qdir, device="cpu", threads=2) as kept, \
            rl.Model(qdir, device="cpu", threads=2, weights="dequantize") as dense:
        np.testing.assert_array_equal(kept.hidden_states(ids), dense.hidden_states(ids))
        assert kept.memory_report()["weight_bytes"] == \
            rl.memory_plan(qdir, device="cpu", weights="keep",
                           max_batch_tokens=kept.max_batch_tokens)["weight_bytes"]


@pytest.mark.parametrize("layout", ["awq", "awq_nozero", "gptq4_asym_actorder", "gptq8_v2", "fp8"])
@pytest.mark.parametrize("weights", ["keep", "dequantize"])
def test_memory_plan_counts_what_the_engine_holds(layouts, layout, weights):
    qdir, _ = layouts("qwen3", layout)
    plan = rl.memory_plan(qdir, device="cpu", max_batch_tokens=32, weights=weights)
    with rl.Model(qdir, device="cpu", max_batch_tokens=32, weights=weights) as m:
        rep = m.memory_report()
        cfg = m.config
    assert (plan["weight_bytes"], plan["workspace_bytes"]) == \
        (rep["weight_bytes"], rep["workspace_bytes"])
    assert plan["weights"] == weights
    if weights == "keep":
        stored = stored_bytes(qdir, zero_point=layout != "awq_nozero")
        assert plan["kept_bytes"] == stored
        # one fp32 scratch of the largest fused matrix (gate + up) ...
        scratch = 2 * cfg["intermediate_size"] * cfg["hidden_size"] * 4
        # ... and, dense, the embedding, the norms and RoPE only
        dense_rest = plan["weight_bytes"] - stored - scratch
        embed = cfg["vocab_size"] * cfg["hidden_size"] * 4
        assert embed <= dense_rest < embed + 64 * cfg["hidden_size"] * cfg["num_layers"], \
            (dense_rest, embed)
    assert rl.memory_plan(qdir, device="cpu")["weights"] == "keep"


def test_keep_needs_quantized_weights(layouts):
    """A plain directory cannot be kept; a quantized one is kept by default on
    every device (CUDA has kernels for the AWQ / GPTQ / FP8 layouts)."""
    qdir, ref = layouts("qwen3", "awq")
    with pytest.raises(ValueError, match="weights='keep' needs a checkpoint stored quantized"):
        rl.memory_plan(ref, device="cpu", weights="keep")
    with pytest.raises(ValueError, match="weights='keep' needs a checkpoint stored quantized"):
        rl.memory_plan(ref, device="cuda", weights="keep")
    plan = rl.memory_plan(qdir, device="cuda", max_batch_tokens=16)
    assert plan["weights"] == "keep" and plan["kept_bytes"] == stored_bytes(qdir)
    assert rl.memory_plan(qdir, device="cuda", max_batch_tokens=16,
                          weights="dequantize")["weights"] == "dequantize"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def test_engine_checks_parts_handed_to_it_directly(layouts, device):
    """set_tensor_quantized validates the parts itself (sizes, scales,
    g_idx, FP8 NaN codes), whatever the caller checked before; on a device
    on the host, before any byte is uploaded."""
    from rjepa_latent.checkpoints.checkpoint import load_hf
    if device != "cpu":
        _need_cuda()
    qdir, _ = layouts("qwen3", "gptq4_asym_actorder")
    src = load_hf(qdir, weights="keep")
    eng = _core.Engine(src.engine_config, device, 1, keep=src.keep)
    rec = next(buf for kind, layer, buf, dt, shape in src.tensors() if kind == "q")
    family, subtype, rows, cols, group, views = rec.weight.qtensor(rec.maps)
    parts = [np.frombuffer(v, np.uint8).copy() for v in views]
    for v in views:
        v.release()
    src.close()

    def hand(ps, shape=(rows, cols)):
        eng.set_tensor_quantized("q", 0, tuple(ps), subtype, shape, family=family, group=group)

    hand(parts)                                           # the good parts are taken
    with pytest.raises(ValueError, match="qweight has .* bytes, expected"):
        hand([parts[0][:-4]] + parts[1:])
    g = parts[3].view(np.int32).copy()
    g[2] = 1000
    with pytest.raises(ValueError, match=r"g_idx\[2\] is 1000"):
        hand(parts[:3] + [g.view(np.uint8)])
    sc = parts[2].view(np.float16).copy()
    sc[1] = np.inf
    with pytest.raises(ValueError, match="not finite"):
        hand(parts[:2] + [sc.view(np.uint8)] + parts[3:])
    with pytest.raises(ValueError, match="shape"):
        hand(parts, (rows, cols * 2))
    with pytest.raises(TypeError, match="part 1"):
        hand([parts[0], 3.5])





@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_resident_memory_follows_stored_size(tmp_path):
    """An AWQ model of ~150 MB in fp32 (~20 MB as stored): loading it kept
    grows the process by about the stored parts plus one scratch, not by the
    dense size; the mapped file pages are dropped after copying."""
    src = tiny_model(tmp_path / "src", family="qwen3", hidden=1024, layers=4, heads=8,
                     kv_heads=4, seed=1)
    qdir = quantize_hf(src, tmp_path / "q", "awq", group_size=128)
    shutil.rmtree(src)
    size = (qdir / "model.safetensors").stat().st_size
    plan = rl.memory_plan(qdir, device="cpu", max_batch_tokens=16, weights="keep")
    kept = load_rss(qdir, "keep")
    dense = load_rss(qdir, "dequantize")
    scratch = plan["weight_bytes"] - plan["kept_bytes"]   # the scratch, embedding and norms
    grew = kept["peak"] - kept["base"]
    assert kept["weight_bytes"] == plan["weight_bytes"]
    assert grew <= 1.25 * size + scratch + 48 * 2**20, (grew, size, scratch)
    assert dense["after"] - dense["base"] > 4 * plan["kept_bytes"]   # what keeping saves


def _quantized_embedding(t):
    """The embedding as AWQ parts too (the tools leave it plain; the engine
    keeps it, dequantizing the batch's rows per token)."""
    from rjepa_latent.testing.quantize import _awq
    _, w = t.pop("model.embed_tokens.weight")
    for part, value in _awq(w, 32, True, "float16").items():
        t[f"model.embed_tokens.{part}"] = value


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def test_a_quantized_embedding_is_kept(layouts, tmp_path, device):
    if device != "cpu":
        _need_cuda()
    qdir, _ = layouts("qwen3", "awq")
    emb = rewrite(qdir, tmp_path / "emb", _quantized_embedding)
    ids = np.random.default_rng(5).integers(0, 320, 23)
    for dtype in (("float32",) if device == "cpu" else ("bfloat16", "float32")):
        with rl.Model(emb, device=device, dtype=dtype, max_batch_tokens=32) as kept, \
                rl.Model(emb, device=device, dtype=dtype, max_batch_tokens=32,
                         weights="dequantize") as dense:
            assert kept.weights == "keep"
            np.testing.assert_array_equal(kept.hidden_states(ids), dense.hidden_states(ids))
            assert kept.memory_report()["weight_bytes"] < dense.memory_report()["weight_bytes"]


# ----------------------------------------------------------------- CUDA (and the emulated device)


def _need_cuda():
    if not rl.build_info()["cuda"]:
        pytest.skip("CUDA not compiled in")
    if _core.cuda_device_count() == 0:
        pytest.skip("no CUDA device")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cuda_keep_equals_dequantize_and_the_cpu(layouts, layout, dtype):
    """The device kernels decode each layout to quant_hf.c's fp32 values and
    round them once into the weight dtype, as the upload of the weights
    dequantized at load does: kept and dequantized models give the same bits
    at every layer; in fp32 they follow the CPU engine; the stored parts
    (plus one scratch) replace the dense matrices, as memory_plan says."""
    _need_cuda()
    qdir, _ = layouts("qwen3", layout)
    ids = np.random.default_rng(3).integers(0, 320, 29)
    with rl.Model(qdir, device="cuda:0", dtype=dtype, max_batch_tokens=64) as kept, \
            rl.Model(qdir, device="cuda:0", dtype=dtype, max_batch_tokens=64,
                     weights="dequantize") as dense:
        assert (kept.weights, dense.weights) == ("keep", "dequantize")
        got = kept.hidden_states(ids)
        np.testing.assert_array_equal(got, dense.hidden_states(ids))
        rep, dense_rep = kept.memory_report(), dense.memory_report()
    assert rep["weight_bytes"] < dense_rep["weight_bytes"]
    plan = rl.memory_plan(qdir, device="cuda:0", dtype=dtype, max_batch_tokens=64)
    assert (plan["weight_bytes"], plan["workspace_bytes"]) == \
        (rep["weight_bytes"], rep["workspace_bytes"])
    assert plan["kept_bytes"] == stored_bytes(qdir, zero_point=layout != "awq_nozero")
    if dtype == "float32":
        with rl.Model(qdir, device="cpu", max_batch_tokens=64) as c:
            want = c.hidden_states(ids)
        err = rel_err(got, want)
        assert err.max() <= 1e-4 and err[1:].min() > 0, err


DEVICE_BAD = ["gptq scale inf", "gptq scale nan bf16", "gptq g_idx out of range",
              "gptq g_idx negative", "fp8 scale inf", "fp8 nan weight", "awq scales wrong shape"]


@pytest.mark.gpu
@pytest.mark.parametrize("case", DEVICE_BAD)
def test_cuda_keep_refuses_damaged_tensors_on_the_host(layouts, tmp_path, case):
    """A damaged tensor kept on the device is a ModelFormatError naming it,
    found on the host before its bytes are uploaded, never a device fault."""
    _need_cuda()
    layout, tensors, config, pattern = BAD[case]
    qdir, _ = layouts("qwen3", layout)
    bad = rewrite(qdir, tmp_path / "bad", tensors, config)
    with pytest.raises(ModelFormatError, match=pattern):
        rl.Model(bad, device="cuda:0", weights="keep", max_batch_tokens=16)
    with rl.Model(qdir, device="cuda:0", max_batch_tokens=16) as m:   # the device still works
        assert m.hidden_states(np.arange(5)).shape[1] == 5
