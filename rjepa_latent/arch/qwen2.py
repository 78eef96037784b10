"""Qwen2 = Mistral with q/k/v biases (always; no o bias) and a sliding window
that applies only when `use_sliding_window` is set or `layer_types` names a
sliding layer.

GGUF: architecture `qwen2`, keys `qwen2.*`, `blk.N.attn_{q,k,v}.bias`, q/k
rows NOT permuted (llama.cpp's Qwen2 converter writes them in HF order).
"""
from __future__ import annotations

from typing import Any

from .base import register
from .mistral import Mistral


@register
class Qwen2(Mistral):
    name = "qwen2"
    hf_model_types = ("qwen2",)
    hf_architectures = ("Qwen2ForCausalLM",)
    gguf_architecture = "qwen2"
    gguf_permuted_qk = False
    GGUF_FLAGS = {**Mistral.GGUF_FLAGS, "attn_qkv_bias": True}

    @classmethod
    def hf_flags(cls, raw: dict) -> dict[str, bool]:
        return {**super().hf_flags(raw), "attn_qkv_bias": True}

    @classmethod
    def hf_sliding_window(cls, raw: dict) -> Any:
        layer_types = raw.get("layer_types") or []
        if raw.get("use_sliding_window") or "sliding_attention" in layer_types:
            return raw.get("sliding_window")
        return None
