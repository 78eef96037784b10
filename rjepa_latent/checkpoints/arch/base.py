"""The base of the architecture registry: what every decoder family states.

A family is a class; a new family subclasses the nearest one and overrides
only what differs (see `llama.py` for the root, `qwen3.py` for a two-flag
difference). The loaders (`checkpoint.py`, `gguf_loader.py`) read everything
family-specific from here and contain no family names; the C engine sees only
the flags and numbers of `rl_config` (`engine_config` in checkpoint.py) and
decides itself, through `_core.tensor_layout`, which tensors a config needs
and what shape each has. A family therefore says how a format *names* a
tensor kind, never which kinds exist.

What a family holds:
- identity: `name` (the public `model_type`), `hf_model_types`,
  `hf_architectures` (config.json `architectures` entries),
  `gguf_architecture` (`general.architecture`, None: not read from GGUF).
- HF config mapping: `hf_flags(raw)` (the engine's structural flags from
  config.json keys and their defaults), `hf_variants(raw, where)` (the
  block's variants beyond Llama, `VARIANTS`), `hf_sliding_window(raw)`,
  `hf_layer_types(raw, window)` (which layers the window applies to),
  `ROPE_TYPES` (the RoPE variants accepted; the frequencies of each are
  computed by checkpoint.rope_inv_freq, the same for every family).
- GGUF metadata mapping: `GGUF_KEYS` (public field -> key under
  `<gguf_architecture>.`), `GGUF_FLAGS` (the structural flags, which GGUF
  does not store: they follow from the architecture), `gguf_variants(cfg,
  get)` (the variants of a GGUF file, from its metadata and the converter's
  conventions).
- tensor names: `HF_NAMES` / `GGUF_NAMES`, engine kind -> name template
  (`{layer}` is the decoder layer); `HF_OPTIONAL_PREFIX` (a prefix HF names
  may lack); `HF_IGNORED` / `GGUF_IGNORED` (regexes of tensors a checkpoint
  may carry that are never needed: LM head, cached RoPE buffers);
  `GGUF_ROPE_FREQS` (llama.cpp's per-frequency RoPE factors tensor);
  `GGUF_LM_HEAD` (its presence means untied embeddings).
- layout quirks: `gguf_permuted_qk` (llama.cpp's converter interleaved the
  rows of q/k within each head for this architecture).
- `COMPUTED`: engine kinds the loader derives from the config instead of
  reading (the RoPE inverse frequencies); `UNUSED_KINDS`: engine kinds no
  config of the family needs, so its name tables need not name them.
"""
from __future__ import annotations

import re
from typing import Any

from ...errors import ModelFormatError


# structural flags of rl_config a family decides (names as in csrc/common.h)
FLAGS = ("attn_qkv_bias", "attn_o_bias", "mlp_bias", "qk_norm")

# The block's variants beyond Llama (public config names) and their Llama
# values. A public config states a variant only where it differs, so the
# configs (and fingerprints) of the Llama-shaped families never change;
# checkpoint.engine_config maps each to its rl_config field.
VARIANTS: dict[str, Any] = {
    "norms": "pre",              # "pre" | "pre_post" (Gemma) | "post" (OLMo-2): rl_norms
    "norm_offset": 0.0,          # 1.0: every RMSNorm multiplies by (1 + w) (Gemma in HF files)
    "hidden_act": "silu",        # "gelu_tanh": GeGLU (Gemma)
    "qk_norm_over": "head",      # "projection": q/k norm before the head split (OLMo-2)
    "embed_scale": None,         # embeddings times this (Gemma: sqrt(hidden))
    "attn_scale": None,          # score scale (Gemma: query_pre_attn_scalar**-0.5); None: hd**-0.5
    "attn_softcap": None,        # cap * tanh(s / cap) on the scores (Gemma-2)
    "layer_types": None,         # per layer "sliding_attention" | "full_attention"; None: the
                                 # window (if any) applies to every layer
    "rope_local_theta": None,    # RoPE base of sliding layers (Gemma-3); None: rope_theta
}
NORMS = ("pre", "pre_post", "post")
ACTIVATIONS = ("silu", "gelu_tanh")

_LAYER_NUMBER = re.compile(r"\.(0|[1-9][0-9]*)\.")


def _canonical(name: str) -> str:
    """A tensor name with its first `.N.` component replaced by `.{layer}.`."""
    return _LAYER_NUMBER.sub(".{layer}.", name, count=1)


class Family:
    """Abstract root: every field a family must state (see module docstring)."""

    name: str = ""
    hf_model_types: tuple[str, ...] = ()
    hf_architectures: tuple[str, ...] = ()
    gguf_architecture: str | None = None
    gguf_permuted_qk: bool = False

    COMPUTED: frozenset[str] = frozenset({"rope_inv_freq", "rope_inv_freq_swa"})
    ROPE_THETA: float = 10000.0         # rope_theta when config.json has none
    ROPE_PER_LAYER_TYPE: bool = False   # rope_parameters per layer type (Gemma-3's local base)
    UNUSED_KINDS: frozenset[str] = frozenset()
    ROPE_TYPES: tuple[str, ...] = ("default",)
    HF_NAMES: dict[str, str] = {}
    HF_OPTIONAL_PREFIX: str = ""
    HF_IGNORED: tuple[str, ...] = ()
    GGUF_NAMES: dict[str, str] = {}
    GGUF_IGNORED: tuple[str, ...] = ()
    GGUF_LM_HEAD: str | None = None
    GGUF_ROPE_FREQS: str | None = None
    GGUF_KEYS: dict[str, str] = {}
    GGUF_FLAGS: dict[str, bool] = {}

    # -- HF config.json ----------------------------------------------------

    @classmethod
    def hf_flags(cls, raw: dict) -> dict[str, bool]:
        """rl_config's structural flags (FLAGS) from a config.json dict."""
        raise NotImplementedError

    @classmethod
    def hf_variants(cls, raw: dict, where: str) -> dict[str, Any]:
        """The VARIANTS of this family that differ from Llama, from config.json."""
        act = raw.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ModelFormatError(f"{where}: hidden_act {act!r} is not supported (only silu)")
        return {}

    @classmethod
    def hf_sliding_window(cls, raw: dict) -> Any:
        """The raw `sliding_window` value that applies (None: full attention).
        None unless the family has a window: HF's Llama and OLMo-2 attention
        ignore a `sliding_window` key in config.json, and so do we."""
        return None

    @classmethod
    def hf_layer_types(cls, raw: dict, window: int | None, where: str) -> list[str] | None:
        """Per-layer attention types when the window applies to some layers
        only (None: to every layer, or there is no window)."""
        return None

    @classmethod
    def gguf_variants(cls, cfg: dict, get: Any, where: str) -> dict[str, Any]:
        """The VARIANTS of a GGUF file of this architecture (`get(key)` reads
        `<arch>.<key>` metadata, None if absent; `cfg` is the public config
        read so far)."""
        return {}

    # -- tensor names --------------------------------------------------------

    @classmethod
    def hf_name(cls, kind: str, layer: int) -> str:
        return cls.HF_NAMES[kind].format(layer=layer)

    @classmethod
    def gguf_name(cls, kind: str, layer: int) -> str:
        return cls.GGUF_NAMES[kind].format(layer=layer)

    @classmethod
    def hf_kind(cls, name: str) -> tuple[str, int] | None:
        """HF tensor name -> (engine kind, layer), None if not one of ours."""
        found = _lookup(_reverse(cls, "HF_NAMES"), name)
        if found is None and cls.HF_OPTIONAL_PREFIX:
            found = _lookup(_reverse(cls, "HF_NAMES"), cls.HF_OPTIONAL_PREFIX + name)
        return found

    @classmethod
    def gguf_kind(cls, name: str) -> tuple[str, int] | None:
        """GGUF tensor name -> (engine kind, layer), None if not one of ours."""
        return _lookup(_reverse(cls, "GGUF_NAMES"), name)

    @classmethod
    def hf_ignored(cls, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in cls.HF_IGNORED)

    @classmethod
    def gguf_ignored(cls, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in cls.GGUF_IGNORED)


_REVERSE_CACHE: dict[tuple[type, str], dict[str, str]] = {}


def _reverse(cls: type, table: str) -> dict[str, str]:
    key = (cls, table)
    if key not in _REVERSE_CACHE:
        names = getattr(cls, table)
        rev = {template: kind for kind, template in names.items()}
        if len(rev) != len(names):
            raise ValueError(f"{cls.__name__}.{table} names two kinds alike")
        _REVERSE_CACHE[key] = rev
    return _REVERSE_CACHE[key]


def _lookup(reverse: dict[str, str], name: str) -> tuple[str, int] | None:
    if name in reverse and "{layer}" not in name:  # a global tensor (no layer number)
        return reverse[name], 0
    canon = _canonical(name)
    kind = reverse.get(canon)
    if kind is None or "{layer}" not in canon:
        return None
    return kind, int(_LAYER_NUMBER.search(name).group(1))


def unsupported(what: str, value: Any, supported: list[str], where: str) -> ModelFormatError:
    return ModelFormatError(f"{where}: {what} {value!r} is not supported "
                            f"(supported: {', '.join(supported)})")


# ---------------------------------------------------------------------------
# the registry

FAMILIES: list[type[Family]] = []
BY_MODEL_TYPE: dict[str, type[Family]] = {}
BY_HF_ARCHITECTURE: dict[str, type[Family]] = {}
BY_GGUF_ARCHITECTURE: dict[str, type[Family]] = {}
# model_types refused with a reason of their own (a near relative of a family)
REFUSED_MODEL_TYPES: dict[str, str] = {}


_KINDS: set[str] = set()


def engine_kinds() -> set[str]:
    """Every tensor kind the C core knows: its layout with every flag set."""
    if not _KINDS:
        from ... import _native  # noqa: F401  (preloads OpenBLAS before _core)
        from ... import _core
        cfg = {"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_layers": 1,
               "num_heads": 1, "num_kv_heads": 1, "head_dim": 8, "max_layer": 1,
               "rms_norm_eps": 1e-6, **{flag: 1 for flag in FLAGS},
               "norms": NORMS.index("pre_post"), "rope_swa": 1}
        _KINDS.update(kind for kind, _, _ in _core.tensor_layout(cfg))
    return _KINDS


def register(family: type[Family]) -> type[Family]:
    """Adds a family to the lookups (usable as a class decorator). A name,
    model_type or architecture already claimed by another family is an error;
    so is a family whose name tables do not name every tensor kind of the
    engine (`engine_kinds`) but those it never uses (`UNUSED_KINDS`)."""
    claims = [(BY_MODEL_TYPE, v) for v in family.hf_model_types]
    claims += [(BY_HF_ARCHITECTURE, v) for v in family.hf_architectures]
    if family.gguf_architecture is not None:
        claims.append((BY_GGUF_ARCHITECTURE, family.gguf_architecture))
    if family.name in {f.name for f in FAMILIES}:
        raise ValueError(f"family {family.name!r} is already registered")
    for index, value in claims:
        if value in index:
            raise ValueError(f"{value!r} is claimed by {index[value].name} and {family.name}")
    for table in ("HF_NAMES", "GGUF_NAMES"):
        _reverse(family, table)  # two kinds under one name is an error here already
        missing = (engine_kinds() - family.COMPUTED - family.UNUSED_KINDS
                   - set(getattr(family, table)))
        if missing:
            raise ValueError(f"{family.name}.{table} names no {', '.join(sorted(missing))}")
    for index, value in claims:
        index[value] = family
    FAMILIES.append(family)
    return family


def unregister(family: type[Family]) -> None:
    """Removes a registered family (for tests of a family added at run time)."""
    FAMILIES.remove(family)
    for index in (BY_MODEL_TYPE, BY_HF_ARCHITECTURE, BY_GGUF_ARCHITECTURE):
        for key in [k for k, v in index.items() if v is family]:
            del index[key]


def for_model_type(model_type, where: str) -> type[Family]:
    if isinstance(model_type, str) and model_type in REFUSED_MODEL_TYPES:
        raise ModelFormatError(f"{where}: {REFUSED_MODEL_TYPES[model_type]}")
    fam = BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if fam is None:
        raise unsupported("model_type", model_type, list(BY_MODEL_TYPE), where)
    return fam


def for_hf_config(raw: dict, where: str) -> type[Family]:
    """By `model_type`; a config without one is looked up by `architectures`."""
    names = raw.get("architectures")
    if names is not None and (not isinstance(names, list)
                              or not all(isinstance(n, str) for n in names)):
        raise ModelFormatError(f"{where}: field 'architectures' must be a list of class names, "
                               f"got {names!r:.80}")
    model_type = raw.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ModelFormatError(f"{where}: field 'model_type' must be a string, got {model_type!r:.80}")
    if model_type is None:
        for name in names or ():
            if isinstance(name, str) and name in BY_HF_ARCHITECTURE:
                return BY_HF_ARCHITECTURE[name]
    return for_model_type(raw.get("model_type"), where)


def for_gguf_architecture(arch, where: str) -> type[Family]:
    fam = BY_GGUF_ARCHITECTURE.get(arch) if isinstance(arch, str) else None
    if fam is None:
        raise unsupported("GGUF architecture", arch, list(BY_GGUF_ARCHITECTURE), where)
    return fam
