"""GGUF checkpoints (the llama.cpp format) as a second input to `Model`.

`load_gguf(path, max_layer)` opens a GGUF file of a registered architecture
(`rjepa_latent.arch`: llama, qwen2, qwen3, gemma2, gemma3, olmo2) with the
`gguf` package's
memory-mapped reader and returns a checkpoint source with the same interface
as an HF directory's (`rjepa_latent.checkpoint`): a public `config`, the
engine's `engine_config`, a `tokenizers.Tokenizer` rebuilt from the file's
metadata, a `fingerprint`, and `tensors()` that feeds the engine one tensor
at a time. `read_gguf_config(path)` reads the config only.

Design choices:
- Everything is validated before any tensor is dequantized: architecture,
  metadata, tensor names, GGML types, shapes and byte sizes, so a corrupt or
  unsupported file fails fast with a `ModelFormatError` naming the problem.
- Which tensors are read, and their shapes, is `checkpoint.tensor_layout`
  (the C core's answer) under the config; names, metadata keys and the q/k
  permutation come from the family's registry unit. Nothing here names a
  family.
- `weights="keep"` (the default when a matrix is stored quantized) hands the
  matrices (and the embedding) to the engine as their stored blocks, read
  from the memory map and never dequantized here (`quantized.KeptTensor`);
  `weights="dequantize"` dequantizes them to float32 one tensor at a time
  (the engine's own C dequantizer, bitwise as `gguf.quants.dequantize`), so
  at most one dequantized tensor is alive besides the engine's own copy.
  Either way the pages of a tensor are dropped from the map once it is
  copied, so resident memory follows what the engine holds, not the file.
- GGUF lists dimensions innermost first (ne0 = columns); numpy order is the
  reverse, which is what the engine and HF use.
- llama.cpp's converter interleaves the rows of attn_q / attn_k within each
  head for some architectures (`Family.gguf_permuted_qk`; its RoPE rotates
  adjacent pairs); the engine uses HF's rotate-half RoPE, so those rows are
  put back in HF order here.
- The block's variants (norm placement, norm offset, GeGLU, soft-capping,
  sliding layers, a local RoPE base) come from the family
  (`Family.gguf_variants`): GGUF stores some as metadata and implies the
  rest by the architecture and the converter's conventions (Gemma's norm
  weights already hold the +1).
- `head_dim` is `<arch>.attention.key_length` when present (Qwen3 writes it;
  it may differ from hidden/heads), else `rope.dimension_count`, else
  hidden/heads; a rotary dimension other than head_dim is refused.
- The tokenizer follows HF transformers' GGUF conversion (byte-level BPE,
  control tokens special, user-defined tokens added whole, the pre-tokenizer
  split regex chosen by `tokenizer.ggml.pre`) so ids match
  `AutoTokenizer.from_pretrained(dir, gguf_file=...)`.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from typing import Any, Iterator

import numpy as np

from .. import _native  # noqa: F401  (preloads OpenBLAS before _core)
from .. import _core
from . import arch
from ..errors import ModelFormatError
from .checkpoint import (CheckpointSource, check_config_sizes, check_engine_rules, check_variants,
                         engine_config, resolve_max_layer, rope_inv_freq, rope_inv_freq_swa, tensor_layout)
from .quantized import KEEPABLE, KEPT_DTYPE, KeptSource, KeptTensor, release_pages
from .weight_hash import WeightHasher


# GGML tensor types this loader reads (kept as stored or dequantized on load)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                   "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
_DENSE_TYPES = ("F32", "F16", "BF16")
SUPPORTED_ARCHITECTURES = arch.SUPPORTED_GGUF_ARCHITECTURES
# kinds whose rows llama.cpp permutes, with the config field giving their head count
_PERMUTED = {"q": "num_heads", "k": "num_kv_heads", "q_bias": "num_heads",
             "k_bias": "num_kv_heads"}

# token types of llama.cpp's vocabulary (tokenizer.ggml.token_type)
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# pre-tokenizer split regexes by `tokenizer.ggml.pre` (public regexes of the
# model families; other values use the byte-level default, as HF does)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's public pre-tokenizer pattern (single digits, unlike Llama 3's 1-3)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    **{name: _LLAMA3_SPLIT for name in (
        "llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral")},
    **{name: _QWEN2_SPLIT for name in ("qwen2", "deepseek-r1-qwen")},
}


def load_gguf(path: str | os.PathLike, max_layer: int | None = None,
              weights: str | None = None) -> CheckpointSource:
    """Validate a GGUF file and return its CheckpointSource (see checkpoint.py).
    `max_layer` (HF hidden-state index, None = all, negative from the end)
    limits which decoder layers are read; `weights` is "keep", "dequantize"
    or None (keep when a matrix is stored quantized; see the module
    docstring). No tensor is read until `tensors()` is iterated."""
    g = GGUFFile(os.fspath(path), max_layer, weights)
    return KeptSource(config=g.config, engine_config=engine_config(g.config, g.max_layer),
                      tokenizer=g.tokenizer, fingerprint=g.fingerprint,
                      sliding_window=g.config["sliding_window"],
                      tensor_feed=g.tensors, on_close=g.close, keep=g.keep,
                      stored_bytes=g.stored_bytes, weights=g.weights,
                      read_weight=lambda name: g.raw(name))


def gguf_storage(path: str | os.PathLike, max_layer: int | None = None,
                 weights: str | None = None) -> tuple[tuple[str, ...], int]:
    """(kinds kept quantized, their stored bytes) of loading `path` so: from
    the tensor table only, for memory plans."""
    path = os.fspath(path)
    reader = _open_reader(path)
    tensors = {t.name: t for t in reader.tensors}
    cfg = _read_config(_Metadata(reader, path), tensors, path)
    family = arch.for_model_type(cfg["model_type"], path)
    layout = tensor_layout(cfg, resolve_max_layer(max_layer, cfg["num_layers"]))
    return _storage(layout, tensors, family, weights, path)


def read_gguf_config(path: str | os.PathLike) -> dict:
    """The public config of a GGUF file from its metadata and tensor table
    only: no tensor is validated or read, no tokenizer is built."""
    path = os.fspath(path)
    reader = _open_reader(path)
    names = {t.name: t for t in reader.tensors}
    cfg = _read_config(_Metadata(reader, path), names, path)
    check_config_sizes(cfg, [_numpy_shape(t) for t in names.values()], path,
                       f"{arch.for_model_type(cfg['model_type'], path).gguf_architecture}.block_count")
    return cfg


def _check_tensor_table(reader: Any, start: int, fields: list, path: str) -> None:
    """Each tensor's data: at a multiple of `general.alignment` (default 32)
    from the data section's start, inside the file, overlapping no other
    tensor. Checked on the tensor table before the reader maps any tensor."""
    import gguf
    align = int(reader.alignment)
    if align <= 0 or align & (align - 1):
        raise ModelFormatError(f"{path}: general.alignment={align} is not a power of two")
    size = len(reader.data)
    spans = []
    for field in fields:
        try:
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8")
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"{path}: malformed tensor table entry ({e})") from None
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_dtype[0]))]
        except (ValueError, KeyError):
            raise ModelFormatError(f"{path}: tensor {name!r} has unknown GGML type id "
                                   f"{int(raw_dtype[0])}") from None
        elements = 1
        for d in dims.tolist():
            elements *= int(d)  # Python ints: no wrap-around
        nbytes = -(-elements // block) * type_size
        rel = int(offset[0])
        if rel % align:
            raise ModelFormatError(f"{path}: tensor {name!r}: data offset {rel} is not a multiple of "
                                   f"general.alignment {align} (corrupt file)")
        if start + rel + nbytes > size:
            raise ModelFormatError(f"{path}: tensor {name!r}: data bytes [{start + rel}, "
                                   f"{start + rel + nbytes}) lie outside the file of {size} bytes "
                                   "(truncated or corrupt file)")
        spans.append((rel, rel + nbytes, name))
    spans.sort()
    for (a0, a1, a), (b0, b1, b) in zip(spans, spans[1:]):
        if b0 < a1:
            raise ModelFormatError(f"{path}: tensor {b!r}: data [{b0}, {b1}) overlaps tensor {a!r} "
                                   f"[{a0}, {a1}) (offsets relative to the data section; corrupt file)")


def _reader_class(path: str):
    import gguf

    class CheckedReader(gguf.GGUFReader):
        """gguf's reader, with the tensor table checked before tensors are mapped
        (its `_build_tensors` hook, gguf >= 0.10)."""

        def _build_tensors(self, start_offs, fields):
            _check_tensor_table(self, int(start_offs), fields, path)
            return super()._build_tensors(start_offs, fields)

    return CheckedReader


# GGUF value types: fixed sizes of the scalars; 8 is a string, 9 an array
_KV_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _check_kv_table(path: str) -> None:
    """Every count and length of the header and the key/value table fits in
    the file, checked before gguf's reader walks them: it reads past the end
    as empty arrays, so a corrupt array length (up to 2**64) makes it loop for
    ever. Files it cannot read at all (magic, version) are left to its own error."""
    import mmap
    import struct
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m[:4] != b"GGUF":
                return
            e = ">" if struct.unpack_from("<I", m, 4)[0] & 0xFFFF == 0 else "<"
            version, n_tensors, n_kv = struct.unpack_from(e + "IQQ", m, 4)
            if version not in (2, 3):   # the reader's own message ("version 1 ...")
                return
            off = 24

            def bad(what: str) -> ModelFormatError:
                return ModelFormatError(f"{path}: {what} at byte {off} runs past the end of the "
                                        f"file of {size} bytes (truncated or corrupt file)")

            def u(fmt: str, what: str) -> int:
                nonlocal off
                n = struct.calcsize(fmt)
                if off + n > size:
                    raise bad(what)
                (v,) = struct.unpack_from(e + fmt, m, off)
                off += n
                return v

            def string(what: str) -> None:
                nonlocal off
                n = u("Q", what)
                if n > size - off:
                    raise bad(f"{what} of {n} bytes")
                off += n

            def value(t: int, depth: int) -> None:
                nonlocal off
                if t in _KV_SIZES:
                    if off + _KV_SIZES[t] > size:
                        raise bad("a metadata value")
                    off += _KV_SIZES[t]
                elif t == 8:
                    string("a metadata string")
                elif t == 9 and depth < 4:
                    it, n = u("I", "an array type"), u("Q", "an array length")
                    least = _KV_SIZES.get(it, 8 if it == 8 else 12)  # bytes per element, at least
                    if n * least > size - off:
                        raise bad(f"an array of {n} elements")
                    if it in _KV_SIZES:
                        off += n * _KV_SIZES[it]
                    else:
                        for _ in range(n):
                            value(it, depth + 1)
                elif t == 9:
                    raise ModelFormatError(f"{path}: metadata arrays nested deeper than 4 at byte "
                                           f"{off} (corrupt file)")
                else:
                    raise ModelFormatError(f"{path}: metadata value type {t} at byte {off} is not "
                                           "a GGUF type (corrupt file)")

            if n_kv * 12 > size - off or n_tensors * 24 > size - off:
                raise bad(f"a table of {n_kv} keys and {n_tensors} tensors")
            for _ in range(n_kv):
                string("a metadata key")
                value(u("I", "a metadata type"), 0)


def _open_reader(path: str):
    if not os.path.isfile(path):
        raise ModelFormatError(f"GGUF file {path!r} does not exist")
    _check_kv_table(path)
    try:
        return _reader_class(path)(path, "r")
    except ModelFormatError:
        raise
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError...
        raise ModelFormatError(f"{path}: not a readable GGUF file "
                               f"(corrupt, truncated or unsupported): {type(e).__name__}: {e}") from e


class _Metadata:
    """Typed access to a reader's key/value fields with errors naming the key."""

    def __init__(self, reader: Any, path: str):
        self.fields = reader.fields
        self.path = path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise ModelFormatError(f"{self.path}: metadata {key!r} is unreadable: {e}") from e

    def require(self, key: str, kind: type) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelFormatError(f"{self.path}: metadata {key!r} is missing")
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ModelFormatError(f"{self.path}: metadata {key!r} must be a positive integer, got {value!r}")
        if kind is float and not isinstance(value, (int, float)):
            raise ModelFormatError(f"{self.path}: metadata {key!r} must be a number, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise ModelFormatError(f"{self.path}: metadata {key!r} must be a string, got {value!r}")
        return value


def _read_config(meta: _Metadata, tensors: dict[str, Any], path: str) -> dict:
    """Public config (HF-like names) from `<arch>.*` metadata, keys as the
    architecture's registry unit names them."""
    family = arch.for_gguf_architecture(meta.require("general.architecture", str), path)
    p = family.gguf_architecture + "."
    keys = {field: p + key for field, key in family.GGUF_KEYS.items()}
    hidden = meta.require(keys["hidden_size"], int)
    heads = meta.require(keys["num_heads"], int)
    kv_heads = meta.get(keys["num_kv_heads"], heads)
    if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise ModelFormatError(f"{path}: {keys['num_kv_heads']}={kv_heads!r} must divide "
                               f"head_count={heads}")
    head_dim = _head_dim(meta, keys, hidden // heads, path)
    eps = meta.require(keys["rms_norm_eps"], float)
    theta = meta.get(keys["rope_theta"], 10000.0)
    for key, value in ((keys["rms_norm_eps"], eps), (keys["rope_theta"], theta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ModelFormatError(f"{path}: metadata {key}={value!r} must be a positive number")
    window = meta.get(keys["sliding_window"])
    if window is not None and (not isinstance(window, int) or isinstance(window, bool)
                               or window <= 0):
        raise ModelFormatError(f"{path}: metadata {keys['sliding_window']}={window!r} must be a "
                               "positive integer")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens else meta.get(keys["vocab_size"])
    if vocab is None and family.gguf_name("embed", 0) in tensors:
        vocab = _numpy_shape(tensors[family.gguf_name("embed", 0)])[0]
    cfg = {
        "model_type": family.name,
        "hidden_size": hidden,
        "intermediate_size": meta.require(keys["intermediate_size"], int),
        "num_layers": meta.require(keys["num_layers"], int),
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": float(eps),
        "rope_theta": float(theta),
        "max_position_embeddings": meta.get(keys["max_position_embeddings"]),
        "rope_scaling": None,  # llama3-style scaling comes as the rope_freqs tensor
        "rope_linear_factor": _read_rope_linear_factor(meta, keys, path),
        "sliding_window": window,
        **{flag: bool(family.GGUF_FLAGS[flag]) for flag in arch.FLAGS},
        "tie_word_embeddings": family.GGUF_LM_HEAD not in tensors,
        "format": "gguf",
        "gguf_file_type": meta.get("general.file_type"),
        "name": meta.get("general.name"),
    }
    variants = family.gguf_variants(cfg, lambda key: meta.get(p + key), path)
    cfg.update(check_variants(variants, cfg["num_layers"], window, path))
    check_engine_rules(cfg, path)
    return cfg


def _head_dim(meta: _Metadata, keys: dict[str, str], default: int, path: str) -> int:
    """key_length, else the rotary dimension, else hidden/heads (llama.cpp's
    own order); value_length and the rotary dimension must equal it."""
    rope_dim = meta.get(keys["rope_dim"])
    head_dim = meta.get(keys["head_dim"], rope_dim if rope_dim is not None else default)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ModelFormatError(f"{path}: head dimension {head_dim!r} (metadata {keys['head_dim']} "
                               f"or {keys['rope_dim']}) must be a positive even integer")
    for key in ("value_dim", "rope_dim"):
        value = meta.get(keys[key], head_dim)
        if value != head_dim:
            raise ModelFormatError(f"{path}: metadata {keys[key]}={value!r} differs from the head "
                                   f"dimension {head_dim} (partial rotary / distinct value heads "
                                   "are not supported)")
    return head_dim


def _read_rope_linear_factor(meta: _Metadata, keys: dict[str, str], path: str) -> float | None:
    """Only linear scaling changes a plain rope here; llama3-style factors come
    as the rope-frequency tensor (applied in `_rope_inv_freq`)."""
    kind = meta.get(keys["rope_scaling_type"])
    if kind in (None, "none"):
        return None
    factor = meta.get(keys["rope_scaling_factor"])
    if kind == "linear" and isinstance(factor, (int, float)) and factor > 0:
        return float(factor)
    raise ModelFormatError(f"{path}: rope scaling type {kind!r} (factor {factor!r}) is not supported "
                           "(supported: none, linear, llama3 frequency factors)")


def _numpy_shape(t: Any) -> tuple:
    return tuple(int(x) for x in reversed(list(t.shape)))


def _check_tensor(t: Any, shape: tuple, path: str) -> None:
    """Type, shape and byte size of one reader tensor, before it is read."""
    import gguf
    type_name = getattr(t.tensor_type, "name", str(t.tensor_type))
    if type_name not in SUPPORTED_TYPES:
        raise ModelFormatError(f"{path}: tensor {t.name!r} has GGML type {type_name}, which is not "
                               f"supported (supported: {', '.join(SUPPORTED_TYPES)})")
    got = _numpy_shape(t)
    if got != shape:
        raise ModelFormatError(f"{path}: tensor {t.name!r} has shape {list(got)}, expected {list(shape)} "
                               "from the metadata")
    block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    if shape[-1] % block:
        raise ModelFormatError(f"{path}: tensor {t.name!r}: row length {shape[-1]} is not a multiple "
                               f"of the {type_name} block size {block}")
    need = int(np.prod(shape)) // block * type_size
    if int(t.data.nbytes) != need:
        raise ModelFormatError(f"{path}: tensor {t.name!r} holds {int(t.data.nbytes)} bytes, expected "
                               f"{need} (file truncated or corrupt)")


def _dequantize(t: Any, shape: tuple, path: str, threads: int = 0) -> np.ndarray:
    """float32 in `shape`, bitwise as gguf.quants.dequantize (the engine's C
    dequantizer, on `threads` threads, 0: one per core); inconsistent blocks
    or a non-finite scale name the tensor."""
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    try:
        arr = _core.dequantize_gguf(np.ascontiguousarray(t.data), int(t.tensor_type), rows,
                                    int(shape[-1]), threads=threads)
    except ValueError as e:
        raise ModelFormatError(f"{path}: tensor {t.name!r}: {e}") from None
    return arr.reshape(shape)


def _storage(layout: list, tensors: dict[str, Any], family: Any, weights: str | None,
             path: str) -> tuple[tuple[str, ...], int]:
    """Kinds kept quantized and their stored bytes under `weights`."""
    if weights not in (None, "keep", "dequantize"):
        raise ValueError(f"weights must be 'keep', 'dequantize' or None, got {weights!r}")
    kept = [(kind, tensors.get(family.gguf_name(kind, layer))) for kind, layer, _ in layout
            if kind in KEEPABLE]
    if weights is None:
        quantized = any(t is not None and getattr(t.tensor_type, "name", "") not in _DENSE_TYPES
                        for _, t in kept)
        weights = "keep" if quantized else "dequantize"
    if weights == "dequantize":
        return (), 0
    return (tuple(k for k in KEEPABLE if any(kind == k for kind, _ in kept)),
            sum(int(t.n_bytes) for _, t in kept if t is not None))


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave of attn_q / attn_k.

    Within a head of `hd` rows, GGUF row 2*i + j holds HF row j*hd/2 + i
    (j = 0 first half of the rotary pair, j = 1 second half)."""
    rows = w.shape[0]
    hd = rows // n_heads
    half = hd // 2
    hf_row = np.arange(rows).reshape(n_heads, 2, half)       # [head, j, i] -> HF row
    gguf_row = (np.arange(n_heads)[:, None, None] * hd
                + 2 * np.arange(half)[None, None, :] + np.arange(2)[None, :, None])
    src = np.empty(rows, dtype=np.int64)
    src[hf_row.ravel()] = gguf_row.ravel()
    return np.ascontiguousarray(w[src])


def _rope_inv_freq(cfg: dict, freq_factors: np.ndarray | None) -> np.ndarray:
    """HF's default inverse frequencies (checkpoint.rope_inv_freq, bitwise as
    HF), divided by a linear scaling factor or by llama3 per-frequency factors
    (`rope_freqs.weight`, as llama.cpp applies them)."""
    inv = rope_inv_freq(cfg)
    if cfg.get("rope_linear_factor"):
        inv = inv / np.float32(cfg["rope_linear_factor"])
    if freq_factors is not None:
        inv = inv / freq_factors.astype(np.float32)
    return np.ascontiguousarray(inv, dtype=np.float32)


def _fingerprint(path: str, data_offset: int) -> str:
    """sha256 of the file size, the whole header (metadata + tensor table) and
    the first and last MiB of tensor data; the model's fingerprint adds every
    tensor's stored bytes to it as they are read (`weight_hash`)."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    h.update(b"gguf:%d:" % size)
    with open(path, "rb") as f:
        h.update(f.read(data_offset))
        h.update(f.read(1 << 20))
        f.seek(max(data_offset, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()


class GGUFFile:
    """A validated GGUF file: `config`, `max_layer` (resolved), `tokenizer`,
    `fingerprint`, and the tensor feed `tensors()`."""

    def __init__(self, path: str, max_layer: int | None, weights: str | None = None):
        self.path = path
        self._reader = _open_reader(path)
        meta = _Metadata(self._reader, path)
        self._tensors = self._index_tensors()
        self.config = _read_config(meta, self._tensors, path)
        self.family = arch.for_model_type(self.config["model_type"], path)
        embed = self.family.gguf_name("embed", 0)
        if embed not in self._tensors:  # the vocabulary size may have to come from it
            raise ModelFormatError(f"{path}: tensor {embed!r} is missing")
        n_layers = self.config["num_layers"]
        check_config_sizes(self.config, [_numpy_shape(t) for t in self._tensors.values()], path,
                           f"{self.family.gguf_architecture}.block_count")
        self.max_layer = resolve_max_layer(max_layer, n_layers)
        self._layout = tensor_layout(self.config, self.max_layer)
        self._validate()
        self.keep, self.stored_bytes = _storage(self._layout, self._tensors, self.family,
                                                weights, path)
        self.tokenizer = build_tokenizer(meta, path)
        self.fingerprint = _fingerprint(path, int(self._reader.data_offset))
        # every tensor's stored (quantized) bytes, hashed as the feed reads them
        self.weights = WeightHasher(self.fingerprint, self._tensors)

    def raw(self, name: str) -> np.ndarray:
        """Tensor `name`'s stored bytes (a view of the file's map)."""
        return np.ascontiguousarray(self._tensors[name].data)

    def _index_tensors(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for t in self._reader.tensors:
            if t.name in out:
                raise ModelFormatError(f"{self.path}: tensor {t.name!r} appears twice")
            out[t.name] = t
        return out

    def _validate(self) -> None:
        """Names, types, shapes and sizes of every tensor that will be loaded,
        and no tensor the engine would silently ignore. What the file must
        hold is the layout of all layers; what is checked and read, the
        layout under max_layer."""
        fam, n_layers = self.family, self.config["num_layers"]
        expected = {fam.gguf_name(kind, layer) for kind, layer, _ in
                    tensor_layout(self.config, n_layers) if kind not in fam.COMPUTED}
        unexpected = sorted(n for n in self._tensors if n not in expected
                            and n != fam.GGUF_ROPE_FREQS and not fam.gguf_ignored(n))
        if unexpected:
            raise ModelFormatError(f"{self.path}: unexpected tensors for a "
                                   f"{fam.gguf_architecture} model: {', '.join(unexpected[:5])}"
                                   f"{' ...' if len(unexpected) > 5 else ''}")
        missing = [fam.gguf_name(kind, layer) for kind, layer, _ in self._layout
                   if kind not in fam.COMPUTED and fam.gguf_name(kind, layer) not in self._tensors]
        if missing:
            raise ModelFormatError(f"{self.path}: missing tensors: {', '.join(missing[:5])}"
                                   f"{' ...' if len(missing) > 5 else ''}")
        for kind, layer, shape in self._layout:
            if kind not in fam.COMPUTED:
                _check_tensor(self._tensors[fam.gguf_name(kind, layer)], shape, self.path)
        freqs = self._tensors.get(fam.GGUF_ROPE_FREQS) if fam.GGUF_ROPE_FREQS else None
        if freqs is not None:
            _check_tensor(freqs, (self.config["head_dim"] // 2,), self.path)

    def tensors(self, threads: int = 0) -> Iterator[tuple[str, int, Any, str, tuple]]:
        """(kind, layer, buffer, dtype, shape) for the engine in layout order:
        kept kinds as `KeptTensor` records (dtype KEPT_DTYPE), the others one
        dequantized float32 tensor at a time, on `threads` threads (the
        model's; 0: one per core)."""
        fam = self.family
        for kind, layer, shape in self._layout:
            if kind in ("rope_inv_freq", "rope_inv_freq_swa"):
                inv = self._rope_inv_freq(threads) if kind == "rope_inv_freq" else \
                    rope_inv_freq_swa(self.config)
                yield kind, layer, inv, "float32", inv.shape
                continue
            t = self._tensors[fam.gguf_name(kind, layer)]
            # hashed as the feed reads it, from the file's map (its pages dropped once hashed)
            self.weights.add(t.name, self._reader.data, int(t.data_offset),
                             int(t.data_offset) + int(t.n_bytes))
            permuted = fam.gguf_permuted_qk and kind in _PERMUTED
            if kind in self.keep:
                blocks = np.asarray(t.data).view(np.uint8).reshape(shape[0], -1)
                if permuted:   # whole rows of blocks move: the same permutation as below
                    rows = _unpermute_rows(np.arange(shape[0])[:, None],
                                           self.config[_PERMUTED[kind]])[:, 0]
                    blocks = np.ascontiguousarray(blocks[rows])
                yield kind, layer, KeptTensor(t.name, self.path, int(t.tensor_type), blocks,
                                              lambda t=t: self._release(t)), KEPT_DTYPE, shape
                continue
            arr = _dequantize(t, shape, self.path, threads)
            self._release(t)
            if permuted:
                arr = _unpermute_rows(arr, self.config[_PERMUTED[kind]])
            yield kind, layer, arr, "float32", shape
            del arr  # keep at most one dequantized tensor alive

    def _release(self, t: Any) -> None:
        """Drops the mapped pages of tensor `t` (read-only file pages: they are
        read again from the file if touched), so they stop counting as this
        process's resident memory once the engine holds its own copy."""
        if self._reader is not None:
            release_pages(self._reader.data, int(t.data_offset), int(t.n_bytes))

    def _rope_inv_freq(self, threads: int = 0) -> np.ndarray:
        name = self.family.GGUF_ROPE_FREQS
        freqs = self._tensors.get(name) if name else None
        if freqs is not None:
            self.weights.add(name, self.raw(name))
        factors = _dequantize(freqs, (self.config["head_dim"] // 2,), self.path, threads) \
            if freqs is not None else None
        return _rope_inv_freq(self.config, factors)

    def close(self) -> None:
        """Drop the memory map (tensors already handed to the engine stay valid)."""
        self.weights.close()
        self._tensors = {}
        self._reader = None


# ---------------------------------------------------------------- tokenizer

def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def build_tokenizer(meta: _Metadata, path: str):
    """`tokenizers.Tokenizer` from tokenizer.ggml.* metadata, or None if the
    file carries no vocabulary. Only byte-level BPE ("gpt2") is supported."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        return None
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        # the weights are still usable with token ids from elsewhere
        warnings.warn(f"{path}: tokenizer model {kind!r} is not supported (supported: 'gpt2' "
                      "byte-level BPE); the model loads without a tokenizer (m.tokenizer is None)",
                      UserWarning, stacklevel=4)
        return None
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise ModelFormatError(f"{path}: tokenizer.ggml.merges is missing for a BPE tokenizer")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ModelFormatError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries "
                               f"for {len(tokens)} tokens")
    try:
        return _byte_level_bpe(tokens, merges, types, meta, path)
    except ModelFormatError:
        raise
    except Exception as e:  # tokenizers rejects malformed vocab/merges
        raise ModelFormatError(f"{path}: cannot build the tokenizer from its metadata: {e}") from e


def _byte_level_bpe(tokens: list[str], merges: list[str], types: list[int], meta: _Metadata, path: str):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    # a token outside the byte alphabet (rare mislabel) is re-spelled byte by byte
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        key = tok if set(tok) <= spelled else "".join(alphabet[b] for b in tok.encode("utf-8"))
        vocab[key] = i
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ModelFormatError(f"{path}: malformed BPE merge {m!r}")
        pairs.append((parts[0], parts[1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, unk_token=None,
                               continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    split = _PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # control tokens are special (kept whole, skippable); user-defined are added whole
    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL and set(t) <= spelled]
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED and t in vocab]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    tok.post_processor = _post_processor(meta, tokens, processors, path)
    return tok


def _post_processor(meta: _Metadata, tokens: list[str], processors: Any, path: str):
    """BOS/EOS around each sequence as the file's add_*_token flags say (HF's layout)."""
    bos = eos = None
    special = []
    for flag, key in (("tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id"),
                      ("tokenizer.ggml.add_eos_token", "tokenizer.ggml.eos_token_id")):
        if not meta.get(flag, False):
            continue
        tid = meta.get(key)
        if not isinstance(tid, int) or not 0 <= tid < len(tokens):
            raise ModelFormatError(f"{path}: {flag} is set but {key}={tid!r} is not a valid token id")
        special.append((tokens[tid], tid))
        if flag.endswith("bos_token"):
            bos = tokens[tid]
        else:
            eos = tokens[tid]

    def seq(name: str, type_id: int) -> str:
        parts = ([f"{bos}:{type_id}"] if bos else []) + [f"${name}:{type_id}"]
        return " ".join(parts + ([f"{eos}:{type_id}"] if eos else []))

    return processors.TemplateProcessing(single=seq("A", 0), pair=seq("A", 0) + " " + seq("B", 1),
                                         special_tokens=list(dict.fromkeys(special)))
