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
  config.json keys and their defaults), `hf_sliding_window(raw)`.
- GGUF metadata mapping: `GGUF_KEYS` (public field -> key under
  `<gguf_architecture>.`), `GGUF_FLAGS` (the structural flags, which GGUF
  does not store: they follow from the architecture).
- tensor names: `HF_NAMES` / `GGUF_NAMES`, engine kind -> name template
  (`{layer}` is the decoder layer); `HF_OPTIONAL_PREFIX` (a prefix HF names
  may lack); `HF_IGNORED` / `GGUF_IGNORED` (regexes of tensors a checkpoint
  may carry that are never needed: LM head, cached RoPE buffers);
  `GGUF_ROPE_FREQS` (llama.cpp's per-frequency RoPE factors tensor);
  `GGUF_LM_HEAD` (its presence means untied embeddings).
- layout quirks: `gguf_permuted_qk` (llama.cpp's converter interleaved the
  rows of q/k within each head for this architecture).
- `COMPUTED`: engine kinds the loader derives from the config instead of
  reading (the RoPE inverse frequencies).
"""
from __future__ import annotations

import re
from typing import Any

from ..errors import ModelFormatError

# structural flags of rl_config a family decides (names as in csrc/engine.h)
FLAGS = ("attn_qkv_bias", "attn_o_bias", "mlp_bias", "qk_norm")

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

    COMPUTED: frozenset[str] = frozenset({"rope_inv_freq"})
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
    def hf_sliding_window(cls, raw: dict) -> Any:
        """The raw `sliding_window` value that applies (None: full attention)."""
        return raw.get("sliding_window")

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
    if name in reverse:  # a global tensor (no layer number)
        return reverse[name], 0
    canon = _canonical(name)
    kind = reverse.get(canon)
    if kind is None or "{layer}" not in canon:
        return None
    return kind, int(_LAYER_NUMBER.search(name).group(1))


def unsupported(what: str, value: Any, supported: list[str], where: str) -> ModelFormatError:
    return ModelFormatError(f"{where}: {what} {value!r} is not supported "
                            f"(supported: {', '.join(supported)})")
