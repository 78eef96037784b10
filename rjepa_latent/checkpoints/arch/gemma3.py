"""Gemma-3 (text) = Gemma-2 with per-head q/k RMSNorm ((1 + w), before RoPE),
no attention soft-capping, sliding layers by `layer_types` (HF's default:
five sliding, then one full, from `sliding_window_pattern` = 6), and its own
RoPE per layer type: full layers use `rope_parameters["full_attention"]`
(base 1e6, `linear` scaling in the larger models), sliding layers the default
RoPE of `rope_parameters["sliding_attention"]` (base 1e4; older configs:
`rope_theta`, `rope_scaling`, `rope_local_base_freq`).

HF: `Gemma3ForCausalLM`, model_type `gemma3_text`. A `gemma3` config (the
multimodal `Gemma3ForConditionalGeneration`, text under `text_config`, its
weights under `language_model` next to a vision tower) is refused with a
message saying so. GGUF: architecture `gemma3`; the converter adds 1 to
every `*norm.weight` (q/k norms included); the local base is
`rope.freq_base_swa` when present, else 1e4 (llama.cpp's default); the
scale follows llama.cpp (head_dim**-0.5; (hidden/heads)**-0.5 for the
62-layer 27B); layers follow `attention.sliding_window_pattern`, else the
pattern of 6.
"""
from __future__ import annotations

from typing import Any

from ...errors import ModelFormatError
from .base import REFUSED_MODEL_TYPES, register
from .gemma2 import Gemma2


@register
class Gemma3(Gemma2):
    name = "gemma3_text"
    hf_model_types = ("gemma3_text",)
    hf_architectures = ("Gemma3ForCausalLM",)
    gguf_architecture = "gemma3"
    ROPE_TYPES = ("default", "linear")
    ROPE_PER_LAYER_TYPE = True
    SLIDING_PATTERN = 6
    GGUF_SCALE_BY_HIDDEN_LAYERS = 62
    HF_PATTERN_KEY = "sliding_window_pattern"
    ROPE_THETA = 1000000.0              # Gemma3TextConfig.default_theta["global"]
    LOCAL_THETA = 10000.0               # ... ["local"]
    GGUF_FLAGS = {**Gemma2.GGUF_FLAGS, "qk_norm": True}

    @classmethod
    def hf_flags(cls, raw: dict) -> dict[str, bool]:
        return {**super().hf_flags(raw), "qk_norm": True}

    @classmethod
    def hf_variants(cls, raw: dict, where: str) -> dict[str, Any]:
        raw = {"attn_logit_softcapping": None, **raw}
        out = super().hf_variants(raw, where)
        params = raw.get("rope_parameters") or {}
        local = params.get("sliding_attention") if isinstance(params, dict) else None
        if isinstance(local, dict):
            kind = local.get("rope_type", "default") or "default"
            if kind != "default":
                raise ModelFormatError(f"{where}: rope scaling type {kind!r} of the sliding "
                                       "layers is not supported (supported: default)")
            theta = local.get("rope_theta", cls.LOCAL_THETA)
        else:
            theta = raw.get("rope_local_base_freq", cls.LOCAL_THETA)
        return {**out, "rope_local_theta": theta}

    @classmethod
    def gguf_softcap(cls, get: Any, where: str) -> float | None:
        return None                     # Gemma-3 has no attention soft-cap

    @classmethod
    def gguf_variants(cls, cfg: dict, get: Any, where: str) -> dict[str, Any]:
        out = super().gguf_variants(cfg, get, where)
        theta = get("rope.freq_base_swa")
        return {**out, "rope_local_theta": cls.LOCAL_THETA if theta is None else theta}


REFUSED_MODEL_TYPES["gemma3"] = (
    "model_type 'gemma3' is the multimodal Gemma3ForConditionalGeneration (the text model under "
    "text_config, its weights under language_model next to a vision tower), which is not "
    "supported; use a text-only Gemma3ForCausalLM checkpoint (model_type 'gemma3_text', e.g. "
    "gemma-3-1b) or a GGUF file of the text model (architecture gemma3)")
