"""`quantize_hf`: an HF directory of float32 weights (such as `tiny_model`
writes) -> the same model as an AWQ, GPTQ or FP8 (block scales) directory,
laid out as those tools write them, for tests of quantized loading. NumPy
only, no torch; the same arguments always give the same bytes.

The quantization is plain round-to-nearest per group (no calibration): the
point is the file layout, not the accuracy.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

METHODS = ("awq", "gptq", "fp8")
# the decoder's linear projections: the modules the tools quantize
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# AWQ GEMM: output feature 8w + j of a word sits at bit 4 * AWQ_SLOT[j]
AWQ_SLOT = (0, 4, 1, 5, 2, 6, 3, 7)
E4M3_MAX = 448.0


def _read(path: Path) -> dict[str, np.ndarray]:
    from rjepa_latent.checkpoints.checkpoint import read_safetensors_header
    infos, _ = read_safetensors_header(str(path))
    data = path.read_bytes()
    out = {}
    for name, t in infos.items():
        if t.dtype != "F32":
            raise ValueError(f"{path}: {name} is {t.dtype}; quantize_hf reads float32 weights")
        out[name] = np.frombuffer(data[t.begin:t.end], np.float32).reshape(t.shape).copy()
    return out


def _as_scale(s: np.ndarray, dtype: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(safetensors dtype, stored array, the float32 value each stores)."""
    if dtype == "float16":
        h = s.astype(np.float16)
        return "F16", h, h.astype(np.float32)
    if dtype == "bfloat16":
        from rjepa_latent.store.files import bf16_from_f32
        b = bf16_from_f32(s.astype(np.float32))
        return "BF16", b, (b.astype(np.uint32) << 16).view(np.float32)
    f = s.astype(np.float32)
    return "F32", f, f


def _pack_rows(v: np.ndarray, bits: int) -> np.ndarray:
    """[n, m] small ints -> [n * bits / 32, m] int32: 32/bits consecutive rows
    per word, the first in the lowest bits (GPTQ's qweight packing)."""
    pf = 32 // bits
    v = v.astype(np.uint32).reshape(v.shape[0] // pf, pf, v.shape[1])
    word = np.zeros((v.shape[0], v.shape[2]), np.uint32)
    for j in range(pf):
        word |= v[:, j] << np.uint32(bits * j)
    return word.view(np.int32)


def _group_minmax(w: np.ndarray, g_idx: np.ndarray, groups: int, bits: int, sym: bool,
                  scale_dtype: str, min_zero: int):
    """Per output row and group: (stored scales [G, out], their fp32 values,
    zeros [G, out])."""
    maxq = (1 << bits) - 1
    out = w.shape[0]
    s = np.empty((groups, out), np.float32)
    z = np.empty((groups, out), np.int64)
    for g in range(groups):
        cols = w[:, g_idx == g]
        if sym:
            s[g] = np.maximum(np.abs(cols).max(1), 1e-6) / (maxq / 2)
            z[g] = (maxq + 1) // 2
        else:
            lo, hi = np.minimum(cols.min(1), 0), np.maximum(cols.max(1), 0)
            s[g] = np.maximum(hi - lo, 1e-6) / maxq
            z[g] = np.clip(np.round(-lo / s[g]), min_zero, maxq)
    st, stored, value = _as_scale(s, scale_dtype)
    return st, stored, value, z


def _quantize_ints(w, g_idx, value, z, bits):
    maxq = (1 << bits) - 1
    return np.clip(np.round(w / value[g_idx].T) + z[g_idx].T, 0, maxq).astype(np.int64)


def _awq(w: np.ndarray, group: int, zero_point: bool, scale_dtype: str) -> dict:
    out, inn = w.shape
    g_idx = np.arange(inn) // group
    st, stored, value, z = _group_minmax(w, g_idx, inn // group, 4, not zero_point,
                                         scale_dtype, 0)
    q = _quantize_ints(w, g_idx, value, z, 4)              # [out, in]

    def pack_cols(v):      # [n, out] -> [n, out/8], AWQ's order inside a word
        v = v.astype(np.uint32).reshape(v.shape[0], -1, 8)
        word = np.zeros(v.shape[:2], np.uint32)
        for j in range(8):
            word |= v[:, :, j] << np.uint32(4 * AWQ_SLOT[j])
        return word.view(np.int32)
    parts = {"qweight": ("I32", pack_cols(q.T)), "scales": (st, stored)}
    if zero_point:
        parts["qzeros"] = ("I32", pack_cols(z))
    return parts


def _gptq(w: np.ndarray, bits: int, group: int, sym: bool, act_order: bool, v1: bool,
          with_g_idx: bool, scale_dtype: str, rng: np.random.Generator) -> dict:
    out, inn = w.shape
    group = inn if group == -1 else group
    g_idx = np.arange(inn) // group
    if act_order:                         # groups follow a permutation of the inputs
        g_idx = np.empty(inn, np.int64)
        g_idx[rng.permutation(inn)] = np.arange(inn) // group
    # v1 stores zero - 1, so a zero of 0 cannot be written: the tools never make one
    st, stored, value, z = _group_minmax(w, g_idx, inn // group, bits, sym, scale_dtype,
                                         1 if v1 else 0)
    q = _quantize_ints(w, g_idx, value, z, bits)
    zs = (z - 1) if v1 else z
    parts = {"qweight": ("I32", _pack_rows(q.T, bits)), "scales": (st, stored),
             "qzeros": ("I32", _pack_rows(zs.T, bits).T.copy())}
    if with_g_idx or act_order:
        parts["g_idx"] = ("I32", g_idx.astype(np.int32))
    return parts


def e4m3_values() -> np.ndarray:
    """float32 value of each of the 256 e4m3fn codes (NaN for 0x7F, 0xFF)."""
    b = np.arange(256)
    e, m = (b >> 3) & 15, b & 7
    v = np.where(e == 0, m * 2.0 ** -9, (8 + m) * 2.0 ** (e - 10))
    v = np.where((e == 15) & (m == 7), np.nan, v)
    return np.where(b & 0x80, -v, v).astype(np.float32)


def e4m3_encode(x: np.ndarray) -> np.ndarray:
    """Round to nearest e4m3fn code (ties to even), saturating at 448."""
    pos = e4m3_values()[:127].astype(np.float64)          # codes 0..126, increasing
    a = np.minimum(np.abs(x.astype(np.float64)), E4M3_MAX)
    hi = np.clip(np.searchsorted(pos, a), 1, 126)
    lo = hi - 1
    d_lo, d_hi = a - pos[lo], pos[hi] - a
    code = np.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, lo)
    code = np.where(a >= pos[126], 126, code)
    return (code | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def _fp8(w: np.ndarray, block: int, scale_dtype: str) -> dict:
    rows, cols = w.shape
    br, bc = -(-rows // block), -(-cols // block)
    amax = np.zeros((br, bc), np.float32)
    for i in range(br):
        for j in range(bc):
            amax[i, j] = np.abs(w[i * block:(i + 1) * block, j * block:(j + 1) * block]).max()
    st, stored, value = _as_scale(np.maximum(amax, 1e-6) / E4M3_MAX, scale_dtype)
    full = np.repeat(np.repeat(value, block, 0), block, 1)[:rows, :cols]
    return {"weight": ("F8_E4M3", e4m3_encode(w / full)), "weight_scale_inv": (st, stored)}


def quantize_hf(src: str | os.PathLike, dst: str | os.PathLike, method: str, *, bits: int = 4,
                group_size: int = 32, sym: bool = False, zero_point: bool = True,
                act_order: bool = False, g_idx: bool = True, checkpoint_format: str = "gptq",
                block: int = 128, scale_dtype: str | None = None, seed: int = 0) -> Path:
    """Write `src` (an HF directory of float32 weights) quantized by `method`
    into the directory `dst`, and return it.

    awq: GEMM packing, 4 bits, groups of `group_size` input features, zero
    points unless `zero_point=False`. gptq: `bits` 2, 4 or 8, `group_size`
    (-1: one group), `sym`, `act_order` (g_idx a permutation of the groups),
    `g_idx` (write the g_idx tensor when not act_order), `checkpoint_format`
    "gptq" (zeros stored minus one) or "gptq_v2". fp8: e4m3 weights with
    one `weight_scale_inv` per `block` x `block` block. Scales are float16
    (AWQ, GPTQ) or float32 (FP8) unless `scale_dtype` says otherwise.
    Only the decoder's linear projections are quantized."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    scale_dtype = scale_dtype or ("float32" if method == "fp8" else "float16")
    rng = np.random.default_rng(seed)
    from .models import _write_safetensors
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for name, w in sorted(_read(src / "model.safetensors").items()):
        module, _, part = name.rpartition(".")
        if part != "weight" or module.rpartition(".")[2] not in PROJECTIONS:
            tensors[name] = ("F32", w)
            continue
        if method == "awq":
            parts = _awq(w, group_size, zero_point, scale_dtype)
        elif method == "gptq":
            parts = _gptq(w, bits, group_size, sym, act_order, checkpoint_format == "gptq",
                          g_idx, scale_dtype, rng)
        else:
            parts = _fp8(w, block, scale_dtype)
        for part_name, value in parts.items():
            tensors[f"{module}.{part_name}"] = value
    _write_safetensors(dst / "model.safetensors", tensors)
    config = json.loads((src / "config.json").read_text())
    if method == "awq":
        q = {"quant_method": "awq", "bits": 4, "group_size": group_size,
             "zero_point": zero_point, "version": "gemm", "modules_to_not_convert": None}
    elif method == "gptq":
        q = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym,
             "desc_act": act_order, "checkpoint_format": checkpoint_format}
    else:
        q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
             "weight_block_size": [block, block]}
    config["quantization_config"] = q
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for extra in ("tokenizer.json", "tokenizer_config.json"):
        if (src / extra).exists():
            shutil.copyfile(src / extra, dst / extra)
    return dst


# ---------------------------------------------------------------------------
# random quantized directories of any size, streamed


def _random_parts(method: str, rows: int, cols: int, group: int,
                  rng: np.random.Generator, amplitude: float) -> dict:
    """Random stored parts of one [rows, cols] projection, in the layout
    `quantize_hf` writes (float16 scales; FP8 float32), so that the largest
    |weight| is about `amplitude`: the bits are random, only the shapes and
    the decoding work are real."""
    def words(*shape):
        return rng.integers(0, 2**32, size=shape, dtype=np.uint32).view(np.int32)

    def scales(*shape, top):    # between top / 2 and top
        return (top * (0.5 + 0.5 * rng.random(shape, np.float32))).astype(np.float16)
    if method == "awq":
        g = cols // group
        return {"qweight": ("I32", words(cols, rows // 8)), "qzeros": ("I32", words(g, rows // 8)),
                "scales": ("F16", scales(g, rows, top=amplitude / 15))}
    if method == "gptq":
        g = cols // group
        return {"qweight": ("I32", words(cols // 8, rows)), "qzeros": ("I32", words(g, rows // 8)),
                "scales": ("F16", scales(g, rows, top=amplitude / 15)),
                "g_idx": ("I32", (np.arange(cols) // group).astype(np.int32))}
    code = rng.integers(0, 256, size=(rows, cols), dtype=np.uint8)
    code[(code & 0x7F) == 0x7F] &= 0xFE           # no NaN codes
    br, bc = -(-rows // group), -(-cols // group)
    s = (amplitude / E4M3_MAX * (0.5 + 0.5 * rng.random((br, bc), np.float32))).astype(np.float32)
    return {"weight": ("F8_E4M3", code), "weight_scale_inv": ("F32", s)}


def _part_specs(method: str, rows: int, cols: int, group: int) -> dict:
    """{part: (safetensors dtype, shape, bytes)} of `_random_parts`, without data."""
    g = -(-cols // group)
    if method == "awq":
        spec = {"qweight": ("I32", (cols, rows // 8)), "qzeros": ("I32", (g, rows // 8)),
                "scales": ("F16", (g, rows))}
    elif method == "gptq":
        spec = {"qweight": ("I32", (cols // 8, rows)), "qzeros": ("I32", (g, rows // 8)),
                "scales": ("F16", (g, rows)), "g_idx": ("I32", (cols,))}
    else:
        spec = {"weight": ("F8_E4M3", (rows, cols)),
                "weight_scale_inv": ("F32", (-(-rows // group), g))}
    size = {"I32": 4, "F16": 2, "F32": 4, "F8_E4M3": 1}
    return {p: (dt, shp, size[dt] * int(np.prod(shp))) for p, (dt, shp) in spec.items()}


def random_quantized_hf(dst: str | os.PathLike, raw_config: dict, method: str, *,
                        group_size: int = 128, seed: int = 0, amplitude: float = 0.05,
                        chunk_bytes: int = 256 << 20) -> Path:
    """An AWQ (4-bit, zero points), GPTQ (4-bit, v1 zeros, g_idx) or FP8
    (block scales of `group_size`) directory of random weights for the HF
    config dict `raw_config`, of any size: the header is computed from the
    shapes, then each tensor is made and written on its own (the largest
    piece in memory is one projection's parts, or `chunk_bytes` of the
    float16 embedding), so an 8B model is written in a few hundred MB of
    RAM. The norms are ones. For benchmarks of memory and time."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    import struct
    from rjepa_latent.checkpoints import checkpoint
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    public, _ = checkpoint.config_from_dict(raw_config, str(dst))
    fam = checkpoint.family_of(public)
    layout = [(k, l, s) for k, l, s in checkpoint.tensor_layout(public, public["num_layers"])
              if k not in fam.COMPUTED]
    proj = {"q", "k", "v", "o", "gate", "up", "down"}
    entries = {}     # name -> (dtype, shape, bytes, make)
    for kind, layer, shape in layout:
        name = fam.hf_name(kind, layer)
        if kind in proj:
            module = name[: -len(".weight")]
            specs = _part_specs(method, shape[0], shape[1], group_size)
            for part, (dt, shp, nb) in specs.items():
                entries[f"{module}.{part}"] = (dt, shp, nb, (module, shape))
        else:
            n, embed = int(np.prod(shape)), kind == "embed"
            entries[name] = ("F16" if embed else "F32", tuple(shape), (2 if embed else 4) * n,
                             (kind if embed else "norm", shape))
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    names = sorted(entries)
    for name in names:
        dt, shp, nb, _ = entries[name]
        header[name] = {"dtype": dt, "shape": list(shp), "data_offsets": [offset, offset + nb]}
        offset += nb
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    rng = np.random.default_rng(seed)
    made: dict[str, dict] = {}      # module -> its parts not yet written
    with open(dst / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in names:
            dt, shp, nb, src = entries[name]
            if src[0] == "embed":
                rows, cols = shp
                step = max(1, chunk_bytes // (2 * cols))
                for r0 in range(0, rows, step):   # uniform in [-amplitude, amplitude]
                    n = min(step, rows - r0)
                    block = (rng.random((n, cols), np.float32) * 2 - 1) * amplitude
                    f.write(block.astype(np.float16).tobytes())
                continue
            if src[0] == "norm":
                f.write(np.ones(shp, np.float32).tobytes())
                continue
            module, shape = src
            if module not in made:
                made[module] = _random_parts(method, shape[0], shape[1], group_size, rng,
                                             amplitude)
            part = name[len(module) + 1:]
            f.write(np.ascontiguousarray(made[module].pop(part)[1]).tobytes())
            if not made[module]:
                del made[module]
    if method == "awq":
        q = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
             "version": "gemm", "modules_to_not_convert": None}
    elif method == "gptq":
        q = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": False,
             "desc_act": False, "checkpoint_format": "gptq"}
    else:
        q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
             "weight_block_size": [group_size, group_size]}
    config = dict(raw_config, quantization_config=q)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dst
