"""HF checkpoint directories -> a validated tensor feed for the C engine.

What it does:
- `load_hf_config`: config.json -> a public config dict (what users and the
  store see) and the engine config dict (the `rl_config` field names that
  `_core.Engine` takes). What differs between families (llama, mistral,
  qwen2, qwen3, gemma2, gemma3_text, olmo2) comes from their registry unit
  (`rjepa_latent.arch`).
- `tensor_layout`: which tensors the engine needs under a config and their
  shapes, asked of the C core (`_core.tensor_layout`), the one place that
  knows; both loaders read exactly that list, in that order.
- `rope_inv_freq`: the RoPE inverse frequencies exactly as HF computes them
  (float32 arithmetic, `llama3` and `linear` scaling included; the sliding
  layers' own base, `rope_inv_freq_swa`); the engine takes them as tensors
  so it never re-derives RoPE variants in C.
- `read_safetensors_header`: validates one .safetensors file to the spec
  before any data is touched. Offsets are checked here, in Python, so the C
  side only ever receives bounded `memoryview` slices of an mmap.
- `load_hf`: directory -> `CheckpointSource` (also produced by the GGUF loader;
  AWQ / GPTQ / FP8 directories through `hf_quantized`, their matrices kept as
  stored (`weights="keep"`, the default) or each dequantized to fp32 as the
  feed reaches it; `hf_storage`: what keeping them takes, headers only):
  names and shapes are checked against the config before data is read; all
  missing and all unexpected tensors are reported at once; tensors of layers
  that can never be requested under `max_layer` are not read at all.
- `open_checkpoint` (.gguf file or HF directory -> CheckpointSource) and
  `read_config` (the public config only, no weights).

Design choices: files are mmap'd read-only and handed to the engine as
zero-copy slices (the engine converts to its storage dtype in one pass, so
there is never a second full copy of the weights); every problem is a
`ModelFormatError` naming the file and, where there is one, the tensor.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from .. import _native  # noqa: F401  (preloads OpenBLAS before _core)
from .. import _core
from . import arch, hf_quantized
from ..errors import ModelFormatError
from .tokenizer_file import load_tokenizer_file
from .weight_hash import WeightHasher


SUPPORTED_MODEL_TYPES = arch.SUPPORTED_MODEL_TYPES
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype -> (bytes per element, engine dtype name or None if unusable)
SAFETENSORS_DTYPES: dict[str, tuple[int, str | None]] = {
    "F32": (4, "float32"), "BF16": (2, "bfloat16"), "F16": (2, "float16"),
    "F64": (8, None), "I64": (8, None), "U64": (8, None), "I32": (4, None), "U32": (4, None),
    "I16": (2, None), "U16": (2, None), "I8": (1, None), "U8": (1, None), "BOOL": (1, None),
    "F8_E4M3": (1, None), "F8_E5M2": (1, None), "F8_E8M0": (1, None),
}

# A record of the tensor feed: (engine kind, layer, buffer, dtype name, shape).
TensorRecord = tuple[str, int, Any, str, tuple[int, ...]]


@dataclass
class CheckpointSource:
    """A loaded-but-not-yet-read checkpoint, whatever its file format.

    `config`: public dict (model_type, hidden_size, intermediate_size,
    num_layers, num_heads, num_kv_heads, head_dim, vocab_size, rms_norm_eps,
    rope_theta, rope_scaling, max_position_embeddings, sliding_window, ...).
    `engine_config`: dict with the `rl_config` field names for `_core.Engine`
    (includes `max_layer`). `tokenizer`: `tokenizers.Tokenizer` or None.
    `fingerprint`: sha256 hex of the config and tensor header info (not data);
    `final_fingerprint()`, after `tensors()` was iterated, covers the weights'
    bytes too (`weights`: their hasher, fed as the tensors stream in).
    `sliding_window`: int or None; the attention window of the layers it
    applies to (all, or the config's `layer_types`).
    `tensor_feed(threads)` yields every tensor the engine needs (rope_inv_freq
    included) as (kind, layer, C-contiguous buffer, "float32"|"bfloat16"|
    "float16", shape), dequantizing on `threads` threads (the model's; 0: one
    per core); buffers are only valid until the next item.
    `on_close()` releases files (mmaps) the feed reads from. `keep`: the
    kinds the feed yields as kept records (dtype "kept", handed over with
    their `hand_to`), `stored_bytes` what they take as stored.
    """
    config: dict
    engine_config: dict
    tokenizer: Any
    fingerprint: str
    sliding_window: int | None
    tensor_feed: Callable[[int], Iterator[TensorRecord]]
    on_close: Callable[[], None] = field(default=lambda: None)
    weights: Any = None                      # a weight_hash.WeightHasher, or None
    read_weight: Callable[[str], Any] | None = None   # stored bytes of a tensor by name
    keep: tuple[str, ...] = ()               # kinds handed to the engine as stored (quantized)
    stored_bytes: int = 0                    # their stored bytes

    def tensors(self, threads: int = 0) -> Iterator[TensorRecord]:
        return self.tensor_feed(threads)

    def final_fingerprint(self) -> str:
        """The fingerprint over config, tensor headers and the weights' bytes
        (those not streamed in are read now); `fingerprint` without a hasher."""
        if self.weights is None:
            return self.fingerprint
        return self.weights.fingerprint(self.read_weight)

    def close(self) -> None:
        if self.weights is not None:
            self.weights.close()
        self.on_close()


# ---------------------------------------------------------------------------
# config.json


def _req(raw: dict, key: str, where: str) -> Any:
    if key not in raw or raw[key] is None:
        raise ModelFormatError(f"{where}: required field {key!r} is missing")
    return raw[key]


# Bounds on config.json sizes. Every size must fit the C core's int64; a size
# above the MAX_* (far above any real model) is refused by the tensor checks
# (check_config_sizes: "the checkpoint holds only ..."), so the core is not
# asked about it before, and a config whose layers get one list entry each (a
# sliding window) is refused at once.
INT64_MAX = (1 << 63) - 1
MAX_DIM = 1 << 24
MAX_LAYERS = 1 << 12
MAX_VOCAB = (1 << 31) - 1      # token ids are int32


def _pos_int(value: Any, key: str, where: str, limit: int = INT64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelFormatError(f"{where}: field {key!r} must be a positive integer, got {value!r}")
    if value > limit:
        raise ModelFormatError(f"{where}: field {key!r} is {value}, more than {limit} "
                               "(no model is that large: the file is damaged)")
    return value


def _rope_settings(raw: dict, family: type[arch.Family],
                   where: str) -> tuple[float, dict | None]:
    """(rope_theta, normalized llama3 scaling dict or None); the RoPE types a
    family accepts are its `ROPE_TYPES`. Handles both the transformers<5
    fields (`rope_theta`, `rope_scaling`) and `rope_parameters`."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ModelFormatError(f"{where}: rope_parameters / rope_scaling must be objects")
    if params and all(isinstance(v, dict) for v in params.values()):
        # per layer type (transformers 5): the full-attention layers' are the
        # model's RoPE; a family with a local base reads the sliding ones
        # (Family.hf_variants: rope_local_theta)
        # (either may be absent: then the default RoPE, as Gemma3TextConfig fills in)
        if not family.ROPE_PER_LAYER_TYPE or \
                not set(params) <= {"full_attention", "sliding_attention"}:
            raise ModelFormatError(f"{where}: per-layer-type rope_parameters are not supported")
        params = params.get("full_attention", {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", raw.get("rope_theta", family.ROPE_THETA))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ModelFormatError(f"{where}: rope_theta must be a positive number, got {theta!r}")
    partial = merged.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ModelFormatError(f"{where}: partial_rotary_factor={partial!r} is not supported")
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in family.ROPE_TYPES:
        raise ModelFormatError(f"{where}: rope scaling type {rope_type!r} is not supported "
                               f"(supported: {', '.join(family.ROPE_TYPES)})")
    if rope_type == "default":
        return float(theta), None
    if rope_type == "linear":
        factor = _req(merged, "factor", where + " rope_scaling")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ModelFormatError(f"{where}: linear rope factor must be a positive number, "
                                   f"got {factor!r}")
        return float(theta), {"rope_type": "linear", "factor": float(factor)}
    out = {"rope_type": "llama3"}
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        out[key] = float(_req(merged, key, where + " rope_scaling"))
    omp = merged.get("original_max_position_embeddings", raw.get("max_position_embeddings"))
    out["original_max_position_embeddings"] = _pos_int(
        omp, "original_max_position_embeddings", where)
    if out["high_freq_factor"] == out["low_freq_factor"]:
        raise ModelFormatError(f"{where}: llama3 rope high_freq_factor equals low_freq_factor")
    return float(theta), out


def _sliding_window(raw: dict, family: type[arch.Family], where: str) -> int | None:
    """The attention window that would apply, or None for full attention."""
    sw = family.hf_sliding_window(raw)
    if sw is None:
        return None
    return _pos_int(sw, "sliding_window", where, MAX_VOCAB)


def check_variants(variants: dict, num_layers: int, window: int | None, where: str) -> dict:
    """The variants of a public config (arch.VARIANTS), validated; only those
    that differ from Llama are kept."""
    unknown = set(variants) - set(arch.VARIANTS)
    if unknown:
        raise ModelFormatError(f"{where}: unknown variant(s) {sorted(unknown)}")
    v = {**arch.VARIANTS, **variants}
    if v["norms"] not in arch.NORMS:
        raise ModelFormatError(f"{where}: norms {v['norms']!r} is not one of {arch.NORMS}")
    if v["hidden_act"] not in arch.ACTIVATIONS:
        raise ModelFormatError(f"{where}: activation {v['hidden_act']!r} is not supported "
                               f"(supported: {', '.join(arch.ACTIVATIONS)})")
    if v["norm_offset"] not in (0.0, 1.0) or v["qk_norm_over"] not in ("head", "projection"):
        raise ModelFormatError(f"{where}: norm_offset {v['norm_offset']!r} / qk_norm_over "
                               f"{v['qk_norm_over']!r} not supported")
    for key in ("embed_scale", "attn_scale", "attn_softcap", "rope_local_theta"):
        x = v[key]
        if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))
                              or not math.isfinite(x) or not x > 0):
            raise ModelFormatError(f"{where}: {key} must be a positive number, got {x!r}")
    types = v["layer_types"]
    if types is not None:
        kinds = ("sliding_attention", "full_attention")
        if (not isinstance(types, list) or len(types) != num_layers
                or any(t not in kinds for t in types)):
            raise ModelFormatError(f"{where}: layer_types must list {num_layers} entries of "
                                   f"{' / '.join(kinds)}, got {types!r}")
        if window is None and "sliding_attention" in types:
            raise ModelFormatError(f"{where}: layer_types names sliding_attention layers but no "
                                   "sliding_window applies")
    return {k: x for k, x in v.items() if x != arch.VARIANTS[k]}


def load_hf_config(path: str | os.PathLike) -> tuple[dict, dict]:
    """config.json of an HF directory (or the file itself) -> (public config,
    engine config with max_layer = L). Raises ModelFormatError naming the
    file and the field."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ModelFormatError(f"{file}: config.json not found")
    try:
        with open(file, "rb") as f:
            raw = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{file}: not valid JSON ({e})") from None
    except RecursionError:
        raise ModelFormatError(f"{file}: JSON nested too deeply to be a model config") from None
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{file}: top level must be a JSON object")
    return config_from_dict(raw, file)


def config_from_dict(raw: dict, where: str) -> tuple[dict, dict]:
    """The mapping of load_hf_config for an already-parsed config dict."""
    family = arch.for_hf_config(raw, where)
    d = _pos_int(_req(raw, "hidden_size", where), "hidden_size", where)
    ff = _pos_int(_req(raw, "intermediate_size", where), "intermediate_size", where)
    n_layers = _pos_int(_req(raw, "num_hidden_layers", where), "num_hidden_layers", where)
    nh = _pos_int(_req(raw, "num_attention_heads", where), "num_attention_heads", where)
    vocab = _pos_int(_req(raw, "vocab_size", where), "vocab_size", where)
    positions = raw.get("max_position_embeddings")
    if positions is not None:
        _pos_int(positions, "max_position_embeddings", where)
    nkv = _pos_int(raw.get("num_key_value_heads") or nh, "num_key_value_heads", where)
    hd = raw.get("head_dim") or d // nh
    hd = _pos_int(hd, "head_dim", where)
    if nh % nkv:
        raise ModelFormatError(f"{where}: num_attention_heads={nh} is not a multiple of "
                               f"num_key_value_heads={nkv}")
    if hd % 2:
        raise ModelFormatError(f"{where}: head_dim={hd} must be even for RoPE")
    window = _sliding_window(raw, family, where)
    if window is not None:   # engine_config lists each layer's window
        _pos_int(n_layers, "num_hidden_layers", where, MAX_LAYERS)
    variants = check_variants(family.hf_variants(raw, where), n_layers, window, where)
    types = family.hf_layer_types(raw, window, where)
    if types is not None:
        variants = check_variants({**variants, "layer_types": types}, n_layers, window, where)
    eps = raw.get("rms_norm_eps", 1e-6)
    if (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0
            or not math.isfinite(eps)):
        raise ModelFormatError(f"{where}: rms_norm_eps must be a positive number, got {eps!r}")
    theta, scaling = _rope_settings(raw, family, where)
    flags = family.hf_flags(raw)
    public = {
        "model_type": family.name, "hidden_size": d, "intermediate_size": ff,
        "num_layers": n_layers, "num_heads": nh, "num_kv_heads": nkv, "head_dim": hd,
        "vocab_size": vocab, "rms_norm_eps": float(eps), "rope_theta": theta,
        "rope_scaling": scaling,
        "max_position_embeddings": raw.get("max_position_embeddings"),
        "sliding_window": window,
        **{flag: bool(flags[flag]) for flag in arch.FLAGS},
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
        **variants,
    }
    check_engine_rules(public, where)
    return public, engine_config(public, n_layers)


def check_engine_rules(public: dict, where: str) -> None:
    """The C core's own rule on a config with a sliding window (the most
    layers it describes one for), asked of the core rather than restated
    here, as a ModelFormatError naming the file. Only then: sizes are checked
    against the tensors later (check_config_sizes), with better messages."""
    if not public.get("sliding_window"):
        return
    if (max(public["hidden_size"], public["intermediate_size"], public["head_dim"],
            public["num_heads"] * public["head_dim"]) > MAX_DIM or public["vocab_size"] > MAX_VOCAB
            or public["num_layers"] > MAX_LAYERS):
        return   # no model is that large: check_config_sizes refuses it against the tensors
    try:
        _core.tensor_layout(engine_config(public, public["num_layers"]))
    except ValueError as e:
        raise ModelFormatError(f"{where}: {e}") from None


def engine_config(public: dict, max_layer: int) -> dict:
    """Engine (`rl_config`) dict from the public config: flags and numbers,
    never a family name. The variants (arch.VARIANTS) appear only where a
    config states them (the engine's defaults are Llama's)."""
    out = {
        "vocab_size": public["vocab_size"], "hidden_size": public["hidden_size"],
        "intermediate_size": public["intermediate_size"], "num_layers": public["num_layers"],
        "num_heads": public["num_heads"], "num_kv_heads": public["num_kv_heads"],
        "head_dim": public["head_dim"], "max_layer": int(max_layer),
        "rms_norm_eps": public["rms_norm_eps"],
        **{flag: int(public[flag]) for flag in arch.FLAGS},
    }
    v = {**arch.VARIANTS, **{k: public[k] for k in arch.VARIANTS if k in public}}
    if v["norms"] != "pre":
        out["norms"] = arch.NORMS.index(v["norms"])
    if v["norm_offset"]:
        out["norm_offset"] = float(v["norm_offset"])
    if v["hidden_act"] != "silu":
        out["act"] = arch.ACTIVATIONS.index(v["hidden_act"])
    if out["qk_norm"] and v["qk_norm_over"] == "projection":
        out["qk_norm"] = 2                                  # RL_QK_NORM_PROJ
    for key in ("embed_scale", "attn_scale", "attn_softcap"):
        if v[key] is not None:
            out[key] = float(v[key])
    window = public.get("sliding_window")
    if window:
        out["sliding_window"] = int(window)
        types = v["layer_types"]
        out["layer_sliding"] = ([t == "sliding_attention" for t in types] if types is not None
                                else [True] * public["num_layers"])
    if v["rope_local_theta"] is not None:
        out["rope_swa"] = 1
    return out


def tensor_layout(public: dict, max_layer: int) -> list[tuple[str, int, tuple[int, ...]]]:
    """[(kind, layer, HF-order shape)] of every tensor the engine needs under
    the config and max_layer, in feed order, as the C core states it (the
    final norm only at max_layer == L, layers 0..min(max_layer, L)-1).
    With max_layer = L it is what a complete checkpoint holds (plus the
    kinds the loader computes, `Family.COMPUTED`)."""
    return [(kind, int(layer), tuple(int(x) for x in shape))
            for kind, layer, shape in _core.tensor_layout(engine_config(public, max_layer))]


def rope_inv_freq_swa(cfg: dict) -> np.ndarray:
    """The sliding layers' inverse frequencies: the default RoPE of base
    `rope_local_theta` (Gemma-3's local layers; no scaling)."""
    return rope_inv_freq({**cfg, "rope_theta": cfg["rope_local_theta"], "rope_scaling": None})


def family_of(public: dict) -> type[arch.Family]:
    """The registry unit of a public config (its `model_type`)."""
    return arch.for_model_type(public["model_type"], "config")


def rope_inv_freq(cfg: dict) -> np.ndarray:
    """float32 [head_dim/2] inverse frequencies, computed with the same float32
    operations as HF (`_compute_default_rope_parameters`,
    `_compute_llama3_parameters`) so the engine's RoPE matches bitwise."""
    dim = int(cfg["head_dim"])
    base = np.float32(cfg["rope_theta"])
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    # torch's float32 pow is (nearly always) the correctly rounded result; a
    # float64 pow rounded to float32 reproduces it where numpy's powf does not
    power = (np.float64(base) ** exponent.astype(np.float64)).astype(np.float32)
    inv_freq = (np.float32(1.0) / power).astype(np.float32)
    scaling = cfg.get("rope_scaling")
    if not scaling:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    factor = np.float32(scaling["factor"])
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen = np.float32(old_ctx / low)
    high_wavelen = np.float32(old_ctx / high)
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (np.float32(old_ctx) / wavelen - np.float32(low)) / np.float32(high - low)
    smoothed = (np.float32(1) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


# ---------------------------------------------------------------------------
# safetensors validation


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str                   # safetensors dtype string
    shape: tuple[int, ...]
    begin: int                   # absolute byte offset in the file
    end: int
    file: str


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ModelFormatError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_header_json(raw: bytes, file: str) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFormatError(f"{file}: safetensors header is not UTF-8 ({e})") from None
    if not text.startswith("{"):
        raise ModelFormatError(f"{file}: safetensors header is not a JSON object")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except ModelFormatError as e:
        raise ModelFormatError(f"{file}: safetensors header has a {e}") from None
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise ModelFormatError(f"{file}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{file}: safetensors header is not a JSON object")
    return header


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tensor_entry(name: str, entry: Any, file: str, data_start: int) -> TensorInfo:
    where = f"{file}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise ModelFormatError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise ModelFormatError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise ModelFormatError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise ModelFormatError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype][0]
    if offsets[1] - offsets[0] != nbytes:
        raise ModelFormatError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} "
                               f"bytes but shape {shape} of {dtype} needs {nbytes}")
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0],
                      data_start + offsets[1], file)


def read_safetensors_header(file: str) -> tuple[dict[str, TensorInfo], dict]:
    """Validates a .safetensors file to the spec (header bounds, JSON object,
    dtypes, sizes, sorted contiguous offsets ending at the file end, unique
    names) and returns ({name: TensorInfo}, metadata). Reads only the header."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFormatError(f"{file}: truncated safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise ModelFormatError(f"{file}: safetensors header length {n} is larger than "
                                       f"{'100 MB' if n > MAX_HEADER_BYTES else 'the file'}")
            raw = f.read(n)
    except OSError as e:
        raise ModelFormatError(f"{file}: cannot read ({e.strerror or e})") from None
    header = _parse_header_json(raw, file)
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ModelFormatError(f"{file}: __metadata__ must map strings to strings")
    data_start = 8 + n
    infos = {name: _tensor_entry(name, e, file, data_start) for name, e in header.items()}
    pos = data_start
    for info in sorted(infos.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != pos:
            kind = "overlaps the previous tensor" if info.begin < pos else "leaves a hole before it"
            raise ModelFormatError(f"{file}: tensor {info.name!r}: data_offsets "
                                   f"[{info.begin - data_start}, {info.end - data_start}] {kind}")
        pos = info.end
    if pos != size:
        raise ModelFormatError(f"{file}: tensor data ends at byte {pos} but the file has {size} "
                               f"bytes ({'truncated' if pos > size else 'trailing bytes'})")
    return infos, meta


def _safetensors_files(directory: str) -> list[str]:
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if not os.path.isfile(index):
        raise ModelFormatError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    try:
        with open(index, "rb") as f:
            data = json.loads(f.read().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, ModelFormatError, RecursionError) as e:
        raise ModelFormatError(f"{index}: not valid JSON ({e})") from None
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise ModelFormatError(f"{index}: 'weight_map' must map tensor names to file names")
    files = []
    for name in sorted(set(wmap.values())):
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ModelFormatError(f"{index}: shard file name {name!r} is not a plain file name")
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ModelFormatError(f"{index}: shard {name!r} does not exist")
        files.append(path)
    return files


def read_checkpoint_headers(directory: str) -> dict[str, TensorInfo]:
    """All tensors of the directory's safetensors file(s), each file validated;
    a tensor present in two shards is an error."""
    tensors: dict[str, TensorInfo] = {}
    for file in _safetensors_files(directory):
        infos, _ = read_safetensors_header(file)
        for name, info in infos.items():
            if name in tensors:
                raise ModelFormatError(f"tensor {name!r} is in two shards: "
                                       f"{tensors[name].file} and {file}")
            tensors[name] = info
    return tensors


# ---------------------------------------------------------------------------
# the config against the tensors present


def check_config_sizes(cfg: dict, shapes: list[tuple[int, ...]], where: str,
                       layers_key: str = "num_hidden_layers") -> None:
    """Before the layout is computed or anything is allocated: the config's
    sizes must be possible for the tensors actually present. Every decoder
    layer has tensors of its own, so there are at least num_layers tensors;
    every size (hidden, intermediate, vocab, heads x head_dim) is a dimension
    of some required tensor, so none exceeds the largest dimension present.
    This bounds every product of sizes by what the files hold (an absurd
    num_layers or a size whose products overflow fails here, at once)."""
    if cfg["num_layers"] > len(shapes):
        raise ModelFormatError(f"{where}: {layers_key}={cfg['num_layers']} but the checkpoint holds "
                               f"only {len(shapes)} tensors (each layer has several); the config "
                               "does not describe these weights")
    largest = max((max(s) for s in shapes if len(s)), default=1)
    sizes = {"hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"],
             "vocab_size": cfg["vocab_size"], "head_dim": cfg["head_dim"],
             "num_heads x head_dim": cfg["num_heads"] * cfg["head_dim"],
             "num_kv_heads x head_dim": cfg["num_kv_heads"] * cfg["head_dim"]}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelFormatError(f"{where}: {name} must be a positive integer, got {value!r}")
        if value > largest:
            raise ModelFormatError(f"{where}: {name}={value} is larger than every dimension of the "
                                   f"checkpoint's tensors (the largest is {largest}); the config "
                                   "does not describe these weights")


# ---------------------------------------------------------------------------
# name mapping and shape checks

def match_tensors(cfg: dict, tensors: dict[str, TensorInfo],
                  where: str) -> dict[tuple[str, int], TensorInfo]:
    """Maps checkpoint tensors to (kind, layer) and checks them against what
    the engine needs under the config with all layers (`tensor_layout`): all
    missing, unexpected, duplicate-after-mapping, wrong-shape and
    unusable-dtype tensors are reported in one ModelFormatError."""
    family = family_of(cfg)
    check_config_sizes(cfg, [t.shape for t in tensors.values()], where)
    expected = {(kind, layer): shape for kind, layer, shape in tensor_layout(cfg, cfg["num_layers"])
                if kind not in family.COMPUTED}
    found: dict[tuple[str, int], TensorInfo] = {}
    problems: list[str] = []
    unexpected = []
    for name, info in sorted(tensors.items()):
        key = family.hf_kind(name)
        if key is None or key not in expected:
            if not family.hf_ignored(name):
                unexpected.append(name)
            continue
        if key in found:
            problems.append(f"tensors {found[key].name!r} and {name!r} are the same weight")
            continue
        found[key] = info
        want = expected[key]
        if info.shape != want:
            problems.append(f"tensor {name!r} in {info.file} has shape {list(info.shape)}, "
                            f"expected {list(want)}")
        if SAFETENSORS_DTYPES[info.dtype][1] is None:
            problems.append(f"tensor {name!r} in {info.file} has unsupported dtype {info.dtype} "
                            f"(supported: F32, BF16, F16)")
    missing = sorted(set(expected) - set(found), key=lambda k: (k[1], k[0]))
    if missing:
        problems.append("missing tensors: " + ", ".join(family.hf_name(k, i) for k, i in missing))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(unexpected))
    if problems:
        raise ModelFormatError(f"{where}: " + "; ".join(problems))
    return found


# ---------------------------------------------------------------------------
# loading


def _load_tokenizer(directory: str) -> Any:
    file = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(file):
        return None
    return load_tokenizer_file(file)


def fingerprint(config: dict, tensors: dict[str, TensorInfo]) -> str:
    """sha256 of the public config and each tensor's name, dtype, shape and
    size: identifies a checkpoint without hashing gigabytes of data."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\n{name}|{t.dtype}|{list(t.shape)}|{t.end - t.begin}".encode())
    return h.hexdigest()


def hidden_state_index(x: Any, num_layers: int, what: str = "layer index") -> int:
    """The layer-index rule of docs/design.md, in its one place: an HF
    hidden_states index (0 = embeddings, L = final norm; negatives count from
    the end, -1 = L) -> 0..L. LayerTypeError for a non-int, LayerError when out
    of range; `what` names the value in the message."""
    from ..errors import LayerError, LayerTypeError
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise LayerTypeError(f"{what} must be an int, got {x!r}")
    value = int(x) + (num_layers + 1 if x < 0 else 0)
    if not 0 <= value <= num_layers:
        label = f"{what}={x}" if what.isidentifier() else f"{what} {x}"   # max_layer=4, layer index 4
        raise LayerError(f"{label} is out of range: valid hidden-state indices are "
                         f"{-num_layers - 1}..{num_layers} (0 = embeddings, {num_layers} = final norm)")
    return value


def resolve_max_layer(max_layer: int | None, num_layers: int) -> int:
    """max_layer as a hidden-state index 0..L (None: L)."""
    return num_layers if max_layer is None else hidden_state_index(max_layer, num_layers, "max_layer")


def _mmap_feed(cfg: dict, found: dict[tuple[str, int], TensorInfo], max_layer: int,
               maps: dict[str, mmap.mmap], hasher: Any = None,
               keep: tuple[str, ...] = ()) -> Callable[[int], Iterator[TensorRecord]]:
    """The tensor feed over the mmap'd files: exactly `tensor_layout(cfg,
    max_layer)`, so tensors the engine will not use are never touched; kinds
    in `keep` as `hf_quantized.KeptParts` records."""
    layout = tensor_layout(cfg, max_layer)

    def feed(threads: int = 0) -> Iterator[TensorRecord]:
        scratch = hf_quantized.Scratch()
        for kind, layer, shape in layout:
            if kind in ("rope_inv_freq", "rope_inv_freq_swa"):
                inv = rope_inv_freq(cfg) if kind == "rope_inv_freq" else rope_inv_freq_swa(cfg)
                yield kind, layer, inv, "float32", inv.shape
                continue
            info = found[(kind, layer)]
            if isinstance(info, hf_quantized.QuantWeight) or kind in keep:
                # a quantized weight's every stored part (or a plain one kept in a
                # quantized group), hashed from the same maps as it is read
                parts = list(info.parts.values()) if isinstance(info, hf_quantized.QuantWeight) else [info]
                for part in parts:
                    if part.file not in maps:
                        with open(part.file, "rb") as f:
                            maps[part.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                    if hasher is not None:
                        hasher.add(part.name, maps[part.file], part.begin, part.end)
                if kind in keep:
                    yield (kind, layer, hf_quantized.KeptParts(info, maps), hf_quantized.KEPT_DTYPE,
                           tuple(shape))
                else:
                    yield kind, layer, info.dequantize(maps, scratch, threads), "float32", \
                        info.shape
                continue
            if info.file not in maps:
                with open(info.file, "rb") as f:
                    maps[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            base = memoryview(maps[info.file])
            view = base[info.begin:info.end]
            if hasher is not None:   # hashed in the background from the same map
                hasher.add(info.name, maps[info.file], info.begin, info.end)
            try:
                yield kind, layer, view, SAFETENSORS_DTYPES[info.dtype][1], info.shape
            finally:
                view.release()
                base.release()
    return feed


def _hf_tensors(directory: str, max_layer: int | None) -> tuple[dict, int, dict, dict]:
    """(public config, resolved max_layer, safetensors tensors, (kind, layer)
    -> TensorInfo or QuantWeight) of a directory, headers only."""
    if not os.path.exists(directory):
        raise FileNotFoundError(f"model directory {directory!r} does not exist")
    if not os.path.isdir(directory):
        raise ModelFormatError(f"{directory}: not a model directory (expected config.json and "
                               f"safetensors files, or a .gguf file)")
    cfg, _ = load_hf_config(directory)
    resolved = resolve_max_layer(max_layer, cfg["num_layers"])
    scheme = hf_quantized.read_scheme(directory)
    tensors = read_checkpoint_headers(directory)
    found = match_tensors(cfg, hf_quantized.logical_tensors(scheme, tensors, directory), directory)
    return cfg, resolved, tensors, found


def hf_storage(directory: str | os.PathLike, max_layer: int | None = None,
               weights: str | None = None) -> tuple[tuple[str, ...], int]:
    """(kinds kept quantized, their stored bytes) when the directory is loaded
    with `weights`, from the headers (hf_quantized.storage); a directory
    without a quantization_config needs its config.json only, and one with
    its config.json only is planned from quantization_config
    (hf_quantized.planned_storage)."""
    directory = os.fspath(directory)
    scheme = hf_quantized.read_scheme(directory) if os.path.isdir(directory) else None
    if os.path.isdir(directory) and scheme is None:
        return hf_quantized.storage({}, [], weights, directory)
    if scheme is not None and not any(os.path.isfile(os.path.join(directory, f)) for f in
                                      ("model.safetensors", "model.safetensors.index.json")):
        cfg, _ = load_hf_config(directory)   # config only: the layout the tools write
        resolved = resolve_max_layer(max_layer, cfg["num_layers"])
        return hf_quantized.planned_storage(scheme, tensor_layout(cfg, resolved), weights,
                                            directory)
    cfg, resolved, _, found = _hf_tensors(directory, max_layer)
    return hf_quantized.storage(found, tensor_layout(cfg, resolved), weights, directory)


def load_hf(directory: str | os.PathLike, max_layer: int | None = None,
            weights: str | None = None) -> CheckpointSource:
    """Validates an HF model directory (config, every safetensors file, tensor
    names and shapes) and returns its CheckpointSource. No tensor data is read
    until `tensors()` is iterated. `weights`: "keep", "dequantize" or None
    (keep when the directory stores its matrices quantized)."""
    directory = os.fspath(directory)
    cfg, resolved, tensors, found = _hf_tensors(directory, max_layer)
    keep, stored = hf_quantized.storage(found, tensor_layout(cfg, resolved), weights, directory)
    maps: dict[str, mmap.mmap] = {}
    header = fingerprint(cfg, tensors)
    by_name = {t.name: t for t in found.values() if not isinstance(t, hf_quantized.QuantWeight)}
    by_name.update({p.name: p for t in found.values() if isinstance(t, hf_quantized.QuantWeight)
                    for p in t.parts.values()})   # a quantized weight: each stored part
    hasher = WeightHasher(header, by_name)

    def read_weight(name: str) -> bytes:
        t = by_name[name]
        with open(t.file, "rb") as f:
            f.seek(t.begin)
            return f.read(t.end - t.begin)

    def close() -> None:
        for mm in maps.values():
            mm.close()
        maps.clear()

    return CheckpointSource(
        config=cfg, engine_config=engine_config(cfg, resolved),
        tokenizer=_load_tokenizer(directory), fingerprint=header,
        sliding_window=cfg["sliding_window"],
        tensor_feed=_mmap_feed(cfg, found, resolved, maps, hasher, keep), on_close=close,
        weights=hasher, read_weight=read_weight, keep=keep, stored_bytes=stored)

