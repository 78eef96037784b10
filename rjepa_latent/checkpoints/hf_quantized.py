"""Quantized HF directories: AWQ, GPTQ and FP8 with block scales.

What it does:
- `read_scheme`: config.json's `quantization_config` -> a `QuantScheme`
  (None for an unquantized directory); a method, version, format or bit
  width it cannot read is refused here, before any tensor is looked at,
  naming what is supported (`SUPPORTED`).
- `logical_tensors`: the safetensors tensors with each quantized module's
  parts (AWQ/GPTQ `qweight`, `qzeros`, `scales`, `g_idx`; FP8 `weight` +
  `weight_scale_inv`) replaced by one `QuantWeight` named `<module>.weight`
  with the logical [out_features, in_features] shape, so the name mapping
  and shape checks of the loader see the model the engine runs. The parts'
  dtypes and shapes are checked against each other here (headers only).
- `QuantWeight.dequantize`: the fp32 weight, made by the C core
  (`_core.dequant_hf`, csrc/quant_hf.c) from zero-copy slices of the mmap'd
  files, after the scales (finite) and g_idx (in range) were checked here.
  `QuantWeight.qtensor` is the same call's arguments (the rl_qtensor of
  csrc/quant.h).
- `weights="keep"` (the default for a quantized directory, CPU): `storage`
  says which kinds are kept and their stored bytes; the feed yields each
  weight of a kept kind as a `KeptParts` record, whose `hand_to` copies the
  parts unchanged into the engine (`Engine.set_tensor_quantized`, checked
  there as the dequantization checks them) and drops their mapped pages. A
  plain weight of a kept kind (modules_to_not_convert) goes as a dense GGUF
  type (F32/F16/BF16), so a fused q/k/v or gate/up matrix is kept whole; a
  float16 / bfloat16 embedding is kept the same way (at 8B it is a third of
  the stored bytes, and twice that as float32).

Every problem is a `ModelFormatError` naming the file and the tensor.
"""
from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _native  # noqa: F401  (preloads OpenBLAS before _core)
from .. import _core
from ..errors import ModelFormatError

SUPPORTED = ("awq (version gemm, 4 bits, zero points or none), gptq (2, 4 or 8 bits, "
             "symmetric or not, with or without g_idx, checkpoint format gptq or gptq_v2), "
             "fp8 (e4m3, square weight_block_size, dynamic activations)")

# rl_qfamily of csrc/quant.h and the scale dtype codes of csrc/quant_hf.h
RL_QF_GGUF, RL_QF_AWQ, RL_QF_GPTQ, RL_QF_FP8_BLOCK = 1, 2, 3, 4
# GGML type ids of the dense safetensors dtypes (a plain weight of a kept kind)
GGML_DENSE = {"F32": 0, "F16": 1, "BF16": 30}
# an embedding stored in one of these is kept as stored beside quantized matrices
HALF_DENSE = ("F16", "BF16")
# the kinds that can be kept quantized and the feed's dtype for a kept record
# (quantized.py re-exports both)
KEEPABLE = ("embed", "q", "k", "v", "o", "gate", "up", "down")
KEPT_DTYPE = "kept"
# kinds the engine fuses into one matrix: kept together or not at all
FUSED = (("q", "k", "v"), ("gate", "up"), ("o",), ("down",), ("embed",))
SCALE_CODES = {"F16": 0, "BF16": 1, "F32": 2}
ZERO_MINUS_ONE = 1 << 16

AWQ_PARTS = ("qweight", "qzeros", "scales")
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class QuantScheme:
    method: str                      # "awq" | "gptq" | "fp8"
    bits: int
    group_size: int                  # AWQ/GPTQ group (-1: all in_features); FP8 block edge
    zero_point: bool = True          # AWQ: qzeros stored
    sym: bool = False                # GPTQ
    desc_act: bool = False           # GPTQ act-order (g_idx permutes the groups)
    zero_minus_one: bool = False     # GPTQ checkpoint_format "gptq" (v1)
    not_converted: tuple[str, ...] = ()


def _bad(where: str, what: str) -> ModelFormatError:
    return ModelFormatError(f"{where}: quantization_config: {what} (supported: {SUPPORTED})")


def _int_field(q: dict, key: str, default: Any, where: str) -> int:
    v = q.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(where, f"{key} must be an integer, got {v!r}")
    return v


def _modules(q: dict, where: str) -> tuple[str, ...]:
    mods = q.get("modules_to_not_convert", q.get("ignored_layers")) or []
    if not isinstance(mods, list) or not all(isinstance(m, str) for m in mods):
        raise _bad(where, f"modules_to_not_convert must be a list of names, got {mods!r}")
    return tuple(mods)


def parse_scheme(q: Any, where: str) -> QuantScheme:
    """A `quantization_config` dict -> QuantScheme, or ModelFormatError."""
    if not isinstance(q, dict):
        raise _bad(where, f"must be an object, got {type(q).__name__}")
    method = q.get("quant_method")
    if method == "awq":
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise _bad(where, f"AWQ version {q.get('version')!r} is not supported")
        bits = _int_field(q, "bits", 4, where)
        if bits != 4:
            raise _bad(where, f"AWQ with bits={bits} is not supported")
        group = _int_field(q, "group_size", 128, where)
        if group <= 0:
            raise _bad(where, f"AWQ group_size must be positive, got {group}")
        return QuantScheme("awq", 4, group, zero_point=bool(q.get("zero_point", True)),
                           not_converted=_modules(q, where))
    if method == "gptq":
        fmt = q.get("checkpoint_format", q.get("format", "gptq"))
        if fmt not in ("gptq", "gptq_v2"):
            raise _bad(where, f"GPTQ checkpoint_format {fmt!r} is not supported")
        bits = _int_field(q, "bits", 4, where)
        if bits not in (2, 4, 8):
            raise _bad(where, f"GPTQ with bits={bits} is not supported")
        group = _int_field(q, "group_size", 128, where)
        if group == 0 or group < -1:
            raise _bad(where, f"GPTQ group_size must be positive or -1, got {group}")
        return QuantScheme("gptq", bits, group, sym=bool(q.get("sym", True)),
                           desc_act=bool(q.get("desc_act", False)),
                           zero_minus_one=fmt == "gptq", not_converted=_modules(q, where))
    if method == "fp8":
        fmt = q.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise _bad(where, f"FP8 format {fmt!r} is not supported")
        act = q.get("activation_scheme", "dynamic")
        if act != "dynamic":
            raise _bad(where, f"FP8 activation_scheme {act!r} is not supported")
        block = q.get("weight_block_size")
        if (not isinstance(block, list) or len(block) != 2 or block[0] != block[1]
                or isinstance(block[0], bool) or not isinstance(block[0], int) or block[0] <= 0):
            raise _bad(where, f"FP8 weight_block_size {block!r} is not a square block "
                       "(per-tensor FP8 scales are not supported)")
        return QuantScheme("fp8", 8, block[0], not_converted=_modules(q, where))
    raise _bad(where, f"quant_method {method!r} is not supported")


def read_scheme(directory: str) -> QuantScheme | None:
    """The QuantScheme of an HF directory's config.json, None when it states
    no quantization_config. (config.json itself was validated before.)"""
    file = os.path.join(directory, "config.json")
    with open(file, "rb") as f:
        raw = json.loads(f.read().decode("utf-8"))
    q = raw.get("quantization_config") if isinstance(raw, dict) else None
    if q is None:
        return None
    return parse_scheme(q, file)


# ---------------------------------------------------------------------------
# parts -> logical weights


class Scratch:
    """One float32 buffer reused for every weight of a tensor feed (a fresh
    one per weight would fault in new pages each time)."""

    def __init__(self) -> None:
        self.buf = np.empty(0, np.float32)

    def get(self, rows: int, cols: int) -> np.ndarray:
        if self.buf.size < rows * cols:
            self.buf = np.empty(rows * cols, np.float32)
        return self.buf[:rows * cols].reshape(rows, cols)


@dataclass
class QuantWeight:
    """One quantized module's logical weight; stands where the loader expects
    a TensorInfo (name, dtype, shape, file)."""
    name: str                            # "<module>.weight"
    shape: tuple[int, int]               # (out_features, in_features)
    scheme: QuantScheme
    parts: dict[str, Any] = field(default_factory=dict)   # part name -> TensorInfo
    group: int = 0
    dtype: str = "F32"                   # what the feed delivers
    file: str = ""

    @property
    def module(self) -> str:
        return self.name[: -len(".weight")]

    def _where(self, part: str) -> str:
        info = self.parts.get(part) or next(iter(self.parts.values()))
        return f"{info.file}: tensor {self.module + '.' + part!r}"

    def _view(self, part: str, maps: dict[str, mmap.mmap]):
        info = self.parts.get(part)
        return None if info is None else _view(info, maps)

    @property
    def stored_bytes(self) -> int:
        return sum(info.end - info.begin for info in self.parts.values())

    def qtensor(self, maps: dict[str, mmap.mmap]) -> tuple:
        """(family, subtype, rows, cols, group, parts) as `_core.dequant_hf`
        and rl_qtensor take them; parts are memoryviews of the mmap'd files."""
        s = self.scheme
        if s.method == "fp8":
            names = ("weight", "weight_scale_inv")
            family, scale = RL_QF_FP8_BLOCK, self.parts["weight_scale_inv"].dtype
        else:
            names = AWQ_PARTS if s.method == "awq" else GPTQ_PARTS
            family, scale = (RL_QF_AWQ if s.method == "awq" else RL_QF_GPTQ), self.parts["scales"].dtype
        subtype = s.bits | SCALE_CODES[scale] << 8
        if s.method == "gptq" and s.zero_minus_one:
            subtype |= ZERO_MINUS_ONE
        views = tuple(self._view(n, maps) for n in names)
        return family, subtype, self.shape[0], self.shape[1], self.group, views

    def check_data(self, maps: dict[str, mmap.mmap]) -> None:
        """The scales finite and g_idx in range, each named when not."""
        scale_part = "weight_scale_inv" if self.scheme.method == "fp8" else "scales"
        info = self.parts[scale_part]
        if info.dtype == "F32":
            bad = ~np.isfinite(self._copy(scale_part, np.float32, maps))
        else:
            exp = 0x7F80 if info.dtype == "BF16" else 0x7C00
            bad = (self._copy(scale_part, np.uint16, maps) & exp) == exp
        if bad.any():
            at = np.unravel_index(int(np.argmax(bad)), info.shape)
            raise ModelFormatError(f"{self._where(scale_part)}: scale {list(map(int, at))} "
                                   "is not finite")
        if "g_idx" in self.parts:
            g = self._copy("g_idx", np.int32, maps)
            groups = self.parts["scales"].shape[0]
            if g.size and (int(g.min()) < 0 or int(g.max()) >= groups):
                i = int(np.argmax((g < 0) | (g >= groups)))
                raise ModelFormatError(f"{self._where('g_idx')}: g_idx[{i}] = {int(g[i])} is "
                                       f"outside 0..{groups - 1} (the groups of the scales)")

    def _copy(self, part: str, dtype, maps: dict[str, mmap.mmap]) -> np.ndarray:
        """A small part as an array of its own (no view left on the mmap)."""
        view = self._view(part, maps)
        try:
            return np.frombuffer(view, dtype).copy()
        finally:
            view.release()

    def dequantize(self, maps: dict[str, mmap.mmap], scratch: Scratch | None = None,
                   threads: int = 0) -> np.ndarray:
        """The fp32 [out_features, in_features] weight (in `scratch` when
        given: valid until its next use), on `threads` threads (0: one per core)."""
        self.check_data(maps)
        family, subtype, rows, cols, group, views = self.qtensor(maps)
        out = (scratch or Scratch()).get(rows, cols)
        try:
            _core.dequant_hf(family, subtype, rows, cols, group, views, out, 0, rows,
                             threads=threads)
        except ValueError as e:
            raise self.format_error(str(e)) from None
        finally:
            for v in views:
                if v is not None:
                    v.release()
        return out

    def format_error(self, msg: str) -> ModelFormatError:
        """The core's message about this weight, naming the part it starts with."""
        part = msg.split(" ", 1)[0].split("[", 1)[0]
        part = {"scale": "scales" if self.scheme.method != "fp8" else "weight_scale_inv"
                }.get(part, part)
        if part not in self.parts:
            part = "weight" if self.scheme.method == "fp8" else "qweight"
        return ModelFormatError(f"{self._where(part)}: {msg}")


def _view(info: Any, maps: dict[str, mmap.mmap]) -> memoryview:
    """A zero-copy slice of tensor `info`'s file (mapped once per file)."""
    if info.file not in maps:
        with open(info.file, "rb") as f:
            maps[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return memoryview(maps[info.file])[info.begin:info.end]


def _drop_pages(mm: mmap.mmap, begin: int, end: int) -> None:
    """Drops [begin, end) of a read-only map from resident memory (the file is
    unchanged; a later read faults the pages in again). No-op where unsupported."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None or end <= begin:
        return
    start = begin - begin % mmap.PAGESIZE
    try:
        mm.madvise(advice, start, min(end, len(mm)) - start)
    except (OSError, ValueError):
        pass


@dataclass
class KeptParts:
    """One weight of a kept kind, handed to the engine as stored: a
    QuantWeight's parts, or a plain weight (TensorInfo) as a dense GGUF type."""
    weight: Any
    maps: dict

    def hand_to(self, engine: Any, kind: str, layer: int, shape: tuple) -> None:
        w, maps = self.weight, self.maps
        quant = isinstance(w, QuantWeight)
        if quant:
            w.check_data(maps)      # the dequantization's messages, naming the part
            family, subtype, _, _, group, views = w.qtensor(maps)
            infos = list(w.parts.values())
        else:
            family, subtype, group, views, infos = RL_QF_GGUF, GGML_DENSE[w.dtype], 0, \
                (_view(w, maps),), [w]
        try:
            if family == RL_QF_GGUF:
                engine.set_tensor_quantized(kind, layer, views[0], subtype, tuple(shape))
            else:
                engine.set_tensor_quantized(kind, layer, views, subtype, tuple(shape),
                                            family=family, group=group)
        except ValueError as e:
            msg = str(e)
            if msg.startswith("set_tensor_quantized: "):   # "<call>: <tensor>: <what>"
                msg = msg.split(": ", 2)[-1]
            raise (w.format_error(msg) if quant else
                   ModelFormatError(f"{w.file}: tensor {w.name!r}: {msg}")) from None
        finally:
            for v in views:
                if v is not None:
                    v.release()
            for info in infos:      # copied: the mapped pages stop counting as resident
                _drop_pages(maps[info.file], info.begin, info.end)


def storage(found: dict, layout: list, weights: str | None,
            where: str) -> tuple[tuple[str, ...], int]:
    """(kinds kept quantized, their stored bytes) of a directory's tensors
    (`found`: (kind, layer) -> TensorInfo or QuantWeight) read as `layout`
    under `weights`: a fused group is kept when any of its weights is stored
    quantized, and so is a 16-bit embedding (HALF_DENSE) beside them (half of
    its float32 size; its rows are converted as tokens need them, the same
    exact conversion); None keeps when any is."""
    if weights not in (None, "keep", "dequantize"):
        raise ValueError(f"weights must be 'keep', 'dequantize' or None, got {weights!r}")
    needed = [(kind, layer) for kind, layer, _ in layout if kind in KEEPABLE]
    quantized = {kind for kind, layer in needed
                 if isinstance(found.get((kind, layer)), QuantWeight)}
    if weights == "keep" and not quantized:
        raise ValueError(f"{where}: weights='keep' needs a checkpoint stored quantized (a GGUF "
                         "file, or an AWQ / GPTQ / FP8 directory); this one is loaded in the "
                         "compute dtype (weights='dequantize')")
    if weights == "dequantize" or not quantized:
        return (), 0
    embed = found.get(("embed", 0))
    if ("embed", 0) in needed and getattr(embed, "dtype", None) in HALF_DENSE:
        quantized.add("embed")     # the matrices are kept: the embedding with them
    keep = tuple(k for group in FUSED if quantized & set(group) for k in group
                 if any(kind == k for kind, _ in needed))
    stored = 0
    for key in needed:
        if key[0] in keep:
            info = found[key]
            stored += info.stored_bytes if isinstance(info, QuantWeight) else info.end - info.begin
    return keep, stored


# the decoder's linear projections: what the quantization tools convert
LINEAR = ("q", "k", "v", "o", "gate", "up", "down")


def planned_storage(scheme: QuantScheme, layout: list, weights: str | None,
                    where: str) -> tuple[tuple[str, ...], int]:
    """`storage` for a directory that has its config.json only (a plan for a
    model not downloaded): every decoder projection counted quantized, in the
    layout the quantization tools write: float16 scales (AWQ, GPTQ), float32
    FP8 block scales, AWQ zero points when `zero_point`, GPTQ zero points
    and g_idx always (as AutoGPTQ / GPTQModel store them)."""
    if weights not in (None, "keep", "dequantize"):
        raise ValueError(f"weights must be 'keep', 'dequantize' or None, got {weights!r}")
    if any(m != "lm_head" for m in scheme.not_converted):
        raise ValueError(f"{where}: modules_to_not_convert {list(scheme.not_converted)} needs the "
                         "safetensors headers to plan (which modules stay unquantized); this "
                         "directory has its config.json only")
    if weights == "dequantize":
        return (), 0
    keep = tuple(k for k in LINEAR if any(kind == k for kind, _, _ in layout))
    stored = 0
    for kind, _, shape in layout:
        if kind not in keep:
            continue
        rows, cols = shape
        if scheme.method == "fp8":
            b = scheme.group_size
            stored += rows * cols + -(-rows // b) * -(-cols // b) * 4
            continue
        group = cols if scheme.group_size == -1 else scheme.group_size
        groups = -(-cols // group)
        if scheme.method == "awq":
            stored += rows * cols // 2 + groups * rows * 2 + \
                (groups * rows // 8 * 4 if scheme.zero_point else 0)
        else:
            pf = 32 // scheme.bits
            stored += cols // pf * rows * 4 + groups * rows // pf * 4 + groups * rows * 2 + \
                cols * 4
    return keep, stored


def _shape_error(info: Any, want: tuple, why: str = "") -> str:
    return (f"tensor {info.name!r} in {info.file} has shape {list(info.shape)}, expected "
            f"{list(want)}{why}")


def _dtype_error(info: Any, allowed: tuple[str, ...]) -> str | None:
    if info.dtype in allowed:
        return None
    return f"tensor {info.name!r} in {info.file} has dtype {info.dtype}, expected {' or '.join(allowed)}"


def _awq(module: str, parts: dict, s: QuantScheme, problems: list[str]) -> QuantWeight | None:
    qw, qz, sc = parts.get("qweight"), parts.get("qzeros"), parts.get("scales")
    missing = [n for n, t in (("qweight", qw), ("scales", sc)) if t is None]
    if s.zero_point and qz is None:
        missing.append("qzeros")
    if missing:
        problems.append(f"quantized module {module!r} lacks " + ", ".join(
            f"{module}.{n}" for n in missing))
        return None
    errs = [e for e in (_dtype_error(qw, ("I32",)), _dtype_error(sc, tuple(SCALE_CODES)),
                        qz is not None and _dtype_error(qz, ("I32",))) if e]
    if errs or len(qw.shape) != 2 or len(sc.shape) != 2:
        problems.extend(errs or [f"tensors of {module!r} must be matrices"])
        return None
    cols, rows = qw.shape[0], qw.shape[1] * 8
    if cols % s.group_size:
        problems.append(f"tensor {qw.name!r} in {qw.file}: in_features {cols} is not a multiple "
                        f"of group_size {s.group_size}")
        return None
    groups = cols // s.group_size
    if sc.shape != (groups, rows):
        problems.append(_shape_error(sc, (groups, rows), f" for qweight {list(qw.shape)} in "
                                     f"groups of {s.group_size}"))
        return None
    if qz is not None and qz.shape != (groups, rows // 8):
        problems.append(_shape_error(qz, (groups, rows // 8)))
        return None
    # without zero points (zero_point false) every zero is 8, whatever a file carries
    kept = {"qweight": qw, "scales": sc, **({"qzeros": qz} if s.zero_point else {})}
    return QuantWeight(module + ".weight", (rows, cols), s, kept, s.group_size, file=qw.file)


def _gptq(module: str, parts: dict, s: QuantScheme, problems: list[str]) -> QuantWeight | None:
    qw, qz, sc, gi = (parts.get(n) for n in GPTQ_PARTS)
    missing = [n for n, t in (("qweight", qw), ("scales", sc)) if t is None]
    if not s.sym and qz is None:
        missing.append("qzeros")
    if s.desc_act and gi is None:
        missing.append("g_idx")
    if missing:
        problems.append(f"quantized module {module!r} lacks " + ", ".join(
            f"{module}.{n}" for n in missing))
        return None
    errs = [e for e in (_dtype_error(qw, ("I32",)), _dtype_error(sc, tuple(SCALE_CODES)),
                        qz is not None and _dtype_error(qz, ("I32",)),
                        gi is not None and _dtype_error(gi, ("I32",))) if e]
    if errs or len(qw.shape) != 2 or len(sc.shape) != 2:
        problems.extend(errs or [f"tensors of {module!r} must be matrices"])
        return None
    pf = 32 // s.bits
    cols, rows = qw.shape[0] * pf, qw.shape[1]
    group = cols if s.group_size == -1 else s.group_size
    if cols % group:
        problems.append(f"tensor {qw.name!r} in {qw.file}: in_features {cols} is not a multiple "
                        f"of group_size {group}")
        return None
    groups = cols // group
    if sc.shape != (groups, rows):
        problems.append(_shape_error(sc, (groups, rows), f" for qweight {list(qw.shape)} in "
                                     f"groups of {group}"))
        return None
    if rows % pf:
        problems.append(f"tensor {qw.name!r} in {qw.file}: out_features {rows} is not a multiple "
                        f"of {pf} ({s.bits}-bit zero points are packed {pf} to a word)")
        return None
    if qz is not None and qz.shape != (groups, rows // pf):
        problems.append(_shape_error(qz, (groups, rows // pf)))
        return None
    if gi is not None and gi.shape != (cols,):
        problems.append(_shape_error(gi, (cols,)))
        return None
    kept = {n: t for n, t in zip(GPTQ_PARTS, (qw, qz, sc, gi)) if t is not None}
    return QuantWeight(module + ".weight", (rows, cols), s, kept, group, file=qw.file)


def _fp8(module: str, parts: dict, s: QuantScheme, problems: list[str]) -> QuantWeight | None:
    w, sc = parts.get("weight"), parts.get("weight_scale_inv")
    if w is None or sc is None:
        lacking = f"{module}.weight_scale_inv" if w is not None else f"{module}.weight"
        problems.append(f"quantized module {module!r} lacks {lacking}")
        return None
    errs = [e for e in (_dtype_error(w, ("F8_E4M3",)), _dtype_error(sc, tuple(SCALE_CODES))) if e]
    if errs or len(w.shape) != 2:
        problems.extend(errs or [f"tensor {w.name!r} in {w.file} is not a matrix"])
        return None
    rows, cols = w.shape
    b = s.group_size
    want = (-(-rows // b), -(-cols // b))
    if sc.shape != want:
        problems.append(_shape_error(sc, want, f" for weight {list(w.shape)} in blocks of {b}x{b}"))
        return None
    return QuantWeight(module + ".weight", (rows, cols), s, {"weight": w, "weight_scale_inv": sc},
                       b, file=w.file)


def logical_tensors(scheme: QuantScheme | None, tensors: dict[str, Any],
                    where: str) -> dict[str, Any]:
    """`tensors` ({name: TensorInfo}) with each quantized module's parts
    replaced by its QuantWeight; every inconsistency in one ModelFormatError."""
    if scheme is None:
        return tensors
    part_names = ("weight", "weight_scale_inv") if scheme.method == "fp8" else GPTQ_PARTS
    modules: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {}
    for name, info in tensors.items():
        module, _, part = name.rpartition(".")
        quantized_part = part in part_names and part != "weight"
        if scheme.method == "fp8" and part == "weight":
            quantized_part = info.dtype in ("F8_E4M3", "F8_E5M2")
        if module and quantized_part:
            modules.setdefault(module, {})[part] = info
        else:
            out[name] = info
    problems: list[str] = []
    build = {"awq": _awq, "gptq": _gptq, "fp8": _fp8}[scheme.method]
    for module, parts in sorted(modules.items()):
        if scheme.method == "awq" and "g_idx" in parts:
            problems.append(f"tensor {parts['g_idx'].name!r}: AWQ has no g_idx")
            continue
        if module + ".weight" in out:
            problems.append(f"module {module!r} has both a plain weight and quantized parts")
            continue
        q = build(module, parts, scheme, problems)
        if q is not None:
            out[q.name] = q
    if problems:
        raise ModelFormatError(f"{where}: " + "; ".join(problems))
    return out
