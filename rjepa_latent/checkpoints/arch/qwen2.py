"""Qwen2 = Mistral with q/k/v biases (always; no o bias) and a sliding window
that applies only when `use_sliding_window` is set, and then only to the
layers `layer_types` names `sliding_attention` (HF's default: layers from
`max_window_layers` on).

GGUF: architecture `qwen2`, keys `qwen2.*`, `blk.N.attn_{q,k,v}.bias`, q/k
rows NOT permuted (llama.cpp's Qwen2 converter writes them in HF order). A
file with `attention.sliding_window` is refused: GGUF does not store which
layers the window applies to (HF's max_window_layers / layer_types).
"""
from __future__ import annotations

from typing import Any

from ...errors import ModelFormatError
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
        # as Qwen2Config: no window without use_sliding_window (a layer_types
        # naming sliding layers then is refused, as HF cannot run it either)
        return raw.get("sliding_window", cls.HF_DEFAULT_WINDOW) if raw.get("use_sliding_window") else None

    @classmethod
    def hf_layer_types(cls, raw: dict, window: int | None, where: str) -> list[str] | None:
        types = raw.get("layer_types")
        if window is None:
            return types if types and "sliding_attention" in types else None
        if types is None:
            first = raw.get("max_window_layers", 28)
            types = ["sliding_attention" if i >= first else "full_attention"
                     for i in range(raw["num_hidden_layers"])]
        return types

    @classmethod
    def gguf_variants(cls, cfg: dict, get: Any, where: str) -> dict[str, Any]:
        if cfg["sliding_window"] is not None:
            raise ModelFormatError(
                f"{where}: metadata {cls.gguf_architecture}.attention.sliding_window="
                f"{cfg['sliding_window']} is not supported: a {cls.gguf_architecture} file does not "
                "store which layers the window applies to (max_window_layers / layer_types); "
                "load the HF checkpoint instead")
        return super().gguf_variants(cfg, get, where)
