"""The architecture registry: one unit per decoder family, each the
differences from its parent (docs/models.md, "Adding a family").

    llama  <-  mistral  <-  qwen2  <-  qwen3
    llama  <-  gemma2  <-  gemma3 (gemma3_text)
    llama  <-  olmo2

Every module of this package but `base` is a family unit that registers
itself (`@register`); they are imported here in name order, so adding a
family is adding its module. `for_model_type` / `for_hf_config`
(config.json) and `for_gguf_architecture` (`general.architecture`) return the
family class or raise ModelFormatError naming the file, the value and the
supported ones.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import (ACTIVATIONS, BY_GGUF_ARCHITECTURE, BY_HF_ARCHITECTURE, BY_MODEL_TYPE,
                   FAMILIES, FLAGS, NORMS, REFUSED_MODEL_TYPES, VARIANTS, Family,
                   for_gguf_architecture, for_hf_config, for_model_type, register, unregister)

for _unit in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"):
    importlib.import_module(f"{__name__}.{_unit}")

from .gemma2 import Gemma2  # noqa: E402
from .gemma3 import Gemma3  # noqa: E402
from .llama import Llama  # noqa: E402
from .mistral import Mistral  # noqa: E402
from .olmo2 import Olmo2  # noqa: E402
from .qwen2 import Qwen2  # noqa: E402
from .qwen3 import Qwen3  # noqa: E402

SUPPORTED_MODEL_TYPES = tuple(BY_MODEL_TYPE)
SUPPORTED_GGUF_ARCHITECTURES = tuple(BY_GGUF_ARCHITECTURE)

__all__ = ["ACTIVATIONS", "NORMS", "REFUSED_MODEL_TYPES", "VARIANTS", "BY_GGUF_ARCHITECTURE", "BY_HF_ARCHITECTURE", "BY_MODEL_TYPE", "FAMILIES", "FLAGS",
           "Family", "Gemma2", "Gemma3", "Llama", "Mistral", "Olmo2", "Qwen2", "Qwen3", "SUPPORTED_GGUF_ARCHITECTURES",
           "SUPPORTED_MODEL_TYPES", "for_gguf_architecture", "for_hf_config", "for_model_type",
           "register", "unregister"]
