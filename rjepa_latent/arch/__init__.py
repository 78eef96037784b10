"""The architecture registry: one unit per decoder family, each the
differences from its parent (docs/models.md, "Adding a family").

    llama  <-  mistral  <-  qwen2  <-  qwen3

`for_model_type` / `for_hf_config` (config.json), `for_gguf_architecture`
(`general.architecture`) return the family class or raise ModelFormatError
naming the file, the value and the supported ones.
"""
from __future__ import annotations

from .base import FLAGS, Family, unsupported
from .llama import Llama
from .mistral import Mistral
from .qwen2 import Qwen2
from .qwen3 import Qwen3

FAMILIES: tuple[type[Family], ...] = (Llama, Mistral, Qwen2, Qwen3)


def _index(attr: str) -> dict[str, type[Family]]:
    out: dict[str, type[Family]] = {}
    for fam in FAMILIES:
        values = getattr(fam, attr)
        for v in (values if isinstance(values, tuple) else (values,)):
            if v is None:
                continue
            if v in out:
                raise ValueError(f"{attr} {v!r} is claimed by {out[v].name} and {fam.name}")
            out[v] = fam
    return out


BY_MODEL_TYPE = _index("hf_model_types")
BY_HF_ARCHITECTURE = _index("hf_architectures")
BY_GGUF_ARCHITECTURE = _index("gguf_architecture")
SUPPORTED_MODEL_TYPES = tuple(BY_MODEL_TYPE)
SUPPORTED_GGUF_ARCHITECTURES = tuple(BY_GGUF_ARCHITECTURE)


def for_model_type(model_type, where: str) -> type[Family]:
    fam = BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if fam is None:
        raise unsupported("model_type", model_type, list(SUPPORTED_MODEL_TYPES), where)
    return fam


def for_hf_config(raw: dict, where: str) -> type[Family]:
    """By `model_type`; a config without one is looked up by `architectures`."""
    if raw.get("model_type") is None:
        for name in raw.get("architectures") or ():
            if isinstance(name, str) and name in BY_HF_ARCHITECTURE:
                return BY_HF_ARCHITECTURE[name]
    return for_model_type(raw.get("model_type"), where)


def for_gguf_architecture(arch, where: str) -> type[Family]:
    fam = BY_GGUF_ARCHITECTURE.get(arch) if isinstance(arch, str) else None
    if fam is None:
        raise unsupported("GGUF architecture", arch, list(SUPPORTED_GGUF_ARCHITECTURES), where)
    return fam


__all__ = ["FAMILIES", "FLAGS", "Family", "Llama", "Mistral", "Qwen2", "Qwen3",
           "SUPPORTED_MODEL_TYPES", "SUPPORTED_GGUF_ARCHITECTURES", "for_model_type",
           "for_hf_config", "for_gguf_architecture"]
