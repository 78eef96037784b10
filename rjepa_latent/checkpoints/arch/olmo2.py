"""OLMo-2 = Llama with its norms AFTER attention and MLP instead of before
(`x = x + post_attention_layernorm(attn(x))`, `x = x + post_feedforward_layernorm(mlp(x))`,
no input norm) and q/k RMSNorm over the whole q / k projection
([nh*hd] / [nkv*hd] weights, before the head split). Olmo2RMSNorm multiplies
by the weight in fp32 before casting back, which in fp32 is Llama's norm.

HF: `Olmo2ForCausalLM` (model_type `olmo2`), `attention_bias` on q, k, v, o.
GGUF: architecture `olmo2`, `blk.N.post_attention_norm` / `post_ffw_norm` /
`attn_{q,k}_norm`, q/k rows not permuted, untied `output.weight` ignored.
"""
from __future__ import annotations

from typing import Any

from .base import register
from .llama import POST_NORMS_GGUF, POST_NORMS_HF, Llama


@register
class Olmo2(Llama):
    name = "olmo2"
    hf_model_types = ("olmo2",)
    hf_architectures = ("Olmo2ForCausalLM",)
    gguf_architecture = "olmo2"
    gguf_permuted_qk = False
    UNUSED_KINDS = frozenset({"attn_norm", "ffn_norm"})

    HF_NAMES = {**{k: v for k, v in Llama.HF_NAMES.items() if k not in ("attn_norm", "ffn_norm")},
                **POST_NORMS_HF}
    GGUF_NAMES = {**{k: v for k, v in Llama.GGUF_NAMES.items()
                     if k not in ("attn_norm", "ffn_norm")}, **POST_NORMS_GGUF}
    GGUF_FLAGS = {**Llama.GGUF_FLAGS, "qk_norm": True}

    @classmethod
    def hf_flags(cls, raw: dict) -> dict[str, bool]:
        return {**super().hf_flags(raw), "mlp_bias": False, "qk_norm": True}

    @classmethod
    def hf_variants(cls, raw: dict, where: str) -> dict[str, Any]:
        super().hf_variants(raw, where)   # hidden_act: silu only
        return {"norms": "post", "qk_norm_over": "projection"}

    @classmethod
    def gguf_variants(cls, cfg: dict, get: Any, where: str) -> dict[str, Any]:
        return {"norms": "post", "qk_norm_over": "projection"}
