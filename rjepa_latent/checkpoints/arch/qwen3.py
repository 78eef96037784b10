"""Qwen3 = Qwen2 with per-head q/k RMSNorm before RoPE, `attention_bias`
(default False) on q, k, v and o as in Llama, and a `head_dim` that may
differ from hidden/heads.

GGUF: architecture `qwen3`, `blk.N.attn_{q,k}_norm.weight`, no biases, q/k
not permuted; `head_dim` is `qwen3.attention.key_length` (read for every
family, see gguf_loader). HF's GGUF loader does not map that key for qwen3
(it keeps Qwen3Config's default head_dim, and refuses such files).
"""
from __future__ import annotations

from .base import register
from .qwen2 import Qwen2


@register
class Qwen3(Qwen2):
    name = "qwen3"
    hf_model_types = ("qwen3",)
    hf_architectures = ("Qwen3ForCausalLM",)
    gguf_architecture = "qwen3"
    GGUF_FLAGS = {**Qwen2.GGUF_FLAGS, "attn_qkv_bias": False, "qk_norm": True}

    @classmethod
    def hf_flags(cls, raw: dict) -> dict[str, bool]:
        attention_bias = bool(raw.get("attention_bias", False))
        return {**super().hf_flags(raw), "attn_qkv_bias": attention_bias,
                "attn_o_bias": attention_bias, "qk_norm": True}
