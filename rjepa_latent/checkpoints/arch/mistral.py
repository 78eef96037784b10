"""Mistral = Llama without the bias options (HF's MistralAttention / MLP have
no `attention_bias` / `mlp_bias`); `sliding_window` is read as it stands, and
a config.json without the key has HF's default window (MistralConfig: 4096;
an explicit null is no window).

GGUF: llama.cpp's converter writes Mistral checkpoints as architecture
`llama` (read by the llama unit, whose network this is when no window
applies), so this unit reads no GGUF architecture of its own. HF's GGUF
loader knows a `mistral` architecture too, but reads its q/k rows unpermuted
and no llama.cpp version writes it, so it is refused rather than guessed.
"""
from __future__ import annotations

from typing import Any

from .base import register
from .llama import Llama


@register
class Mistral(Llama):
    name = "mistral"
    hf_model_types = ("mistral",)
    hf_architectures = ("MistralForCausalLM",)
    gguf_architecture = None

    @classmethod
    def hf_flags(cls, raw: dict) -> dict[str, bool]:
        return {**super().hf_flags(raw), "attn_qkv_bias": False, "attn_o_bias": False,
                "mlp_bias": False}

    @classmethod
    def hf_sliding_window(cls, raw: dict) -> Any:
        return raw.get("sliding_window", cls.HF_DEFAULT_WINDOW)

    HF_DEFAULT_WINDOW = 4096   # MistralConfig's default
