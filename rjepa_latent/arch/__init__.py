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

FAMILIES: list[type[Family]] = []
BY_MODEL_TYPE: dict[str, type[Family]] = {}
BY_HF_ARCHITECTURE: dict[str, type[Family]] = {}
BY_GGUF_ARCHITECTURE: dict[str, type[Family]] = {}


def register(family: type[Family]) -> type[Family]:
    """Adds a family to the lookups (usable as a class decorator). A name,
    model_type or architecture already claimed by another family is an error;
    so is a family whose name tables do not name every tensor kind."""
    claims = [(BY_MODEL_TYPE, v) for v in family.hf_model_types]
    claims += [(BY_HF_ARCHITECTURE, v) for v in family.hf_architectures]
    if family.gguf_architecture is not None:
        claims.append((BY_GGUF_ARCHITECTURE, family.gguf_architecture))
    if family.name in {f.name for f in FAMILIES}:
        raise ValueError(f"family {family.name!r} is already registered")
    for index, value in claims:
        if value in index:
            raise ValueError(f"{value!r} is claimed by {index[value].name} and {family.name}")
    if set(family.HF_NAMES) != set(family.GGUF_NAMES):
        raise ValueError(f"{family.name}: HF_NAMES and GGUF_NAMES name different kinds")
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


for _family in (Llama, Mistral, Qwen2, Qwen3):
    register(_family)

SUPPORTED_MODEL_TYPES = tuple(BY_MODEL_TYPE)
SUPPORTED_GGUF_ARCHITECTURES = tuple(BY_GGUF_ARCHITECTURE)


def for_model_type(model_type, where: str) -> type[Family]:
    fam = BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if fam is None:
        raise unsupported("model_type", model_type, list(BY_MODEL_TYPE), where)
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
        raise unsupported("GGUF architecture", arch, list(BY_GGUF_ARCHITECTURE), where)
    return fam


__all__ = ["FAMILIES", "FLAGS", "Family", "Llama", "Mistral", "Qwen2", "Qwen3",
           "SUPPORTED_MODEL_TYPES", "SUPPORTED_GGUF_ARCHITECTURES", "for_model_type",
           "for_hf_config", "for_gguf_architecture", "register", "unregister"]
