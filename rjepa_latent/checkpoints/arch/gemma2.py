"""Gemma-2 = Llama with RMSNorm weights applied as (1 + w), embeddings times
sqrt(hidden), a GELU-tanh gated MLP (GeGLU), a norm before AND after both
attention and MLP, score scale query_pre_attn_scalar**-0.5, attention logit
soft-capping, and a sliding window on the layers `layer_types` names
(HF's default: every other layer, from layer 0). Embeddings are tied (no
LM head is read); `final_logit_softcapping` concerns the LM head only.

HF: `Gemma2ForCausalLM` (model_type `gemma2`); `post_attention_layernorm` is
the norm AFTER attention here (Llama's MLP pre-norm is
`pre_feedforward_layernorm`). GGUF: architecture `gemma2`; llama.cpp's
converter adds 1 to every `*norm.weight` (so a GGUF file's norms are applied
as w), q/k rows are not permuted, there is no query_pre_attn_scalar key (as
llama.cpp, the scale is head_dim**-0.5, or (hidden/heads)**-0.5 for the
46-layer 27B), layers alternate sliding / full from layer 0 unless
`attention.sliding_window_pattern` says otherwise.
"""
from __future__ import annotations

import math
from typing import Any

from ...errors import ModelFormatError
from .base import register
from .llama import POST_NORMS_GGUF, POST_NORMS_HF, Llama, _layer


@register
class Gemma2(Llama):
    name = "gemma2"
    hf_model_types = ("gemma2",)
    hf_architectures = ("Gemma2ForCausalLM",)
    gguf_architecture = "gemma2"
    gguf_permuted_qk = False
    ROPE_TYPES = ("default",)
    UNUSED_KINDS = frozenset()
    SLIDING_PATTERN = 2                 # HF's default layer_types: every 2nd layer is full
    GGUF_SCALE_BY_HIDDEN_LAYERS = 46    # the 27B (see gguf_attn_scale)
    HF_PATTERN_KEY: str | None = None   # Gemma2Config ignores sliding_window_pattern

    HF_NAMES = {**Llama.HF_NAMES, **POST_NORMS_HF,
                **_layer({"ffn_norm": "pre_feedforward_layernorm.weight"}, "model.layers.")}
    GGUF_NAMES = {**Llama.GGUF_NAMES, **POST_NORMS_GGUF}

    @classmethod
    def hf_flags(cls, raw: dict) -> dict[str, bool]:
        attention_bias = bool(raw.get("attention_bias", False))
        return {"attn_qkv_bias": attention_bias, "attn_o_bias": attention_bias,
                "mlp_bias": False, "qk_norm": False}

    @classmethod
    def _common_variants(cls, cfg: dict) -> dict[str, Any]:
        return {"norms": "pre_post", "hidden_act": "gelu_tanh",
                "embed_scale": float(cfg["hidden_size"]) ** 0.5}

    @classmethod
    def hf_variants(cls, raw: dict, where: str) -> dict[str, Any]:
        act = raw.get("hidden_activation", raw.get("hidden_act", "gelu_pytorch_tanh"))
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ModelFormatError(f"{where}: hidden_activation {act!r} is not supported "
                                   "(only gelu_pytorch_tanh)")
        if raw.get("use_bidirectional_attention"):
            raise ModelFormatError(f"{where}: use_bidirectional_attention (an encoder, not a "
                                   "causal decoder) is not supported")
        scalar = raw.get("query_pre_attn_scalar", 256)
        if (isinstance(scalar, bool) or not isinstance(scalar, (int, float)) or not scalar > 0
                or not math.isfinite(scalar)):
            raise ModelFormatError(f"{where}: query_pre_attn_scalar must be a positive number, "
                                   f"got {scalar!r}")
        return {**cls._common_variants({"hidden_size": raw["hidden_size"]}), "norm_offset": 1.0,
                "attn_scale": float(scalar) ** -0.5,
                "attn_softcap": cls._softcap(raw.get("attn_logit_softcapping", 50.0))}

    @staticmethod
    def _softcap(value: Any) -> float | None:
        return None if value in (None, 0, 0.0) else value

    @classmethod
    def hf_sliding_window(cls, raw: dict) -> Any:
        return raw.get("sliding_window", 4096)

    @staticmethod
    def periodic_layer_types(n_layers: int, period: int) -> list[str]:
        """HF's and llama.cpp's rule of a period n: layer i is sliding unless
        (i + 1) % n == 0 (so layer 0 slides)."""
        return ["sliding_attention" if (i + 1) % period else "full_attention"
                for i in range(n_layers)]

    @classmethod
    def hf_layer_types(cls, raw: dict, window: int | None, where: str) -> list[str] | None:
        types = raw.get("layer_types")
        if types is None:
            pattern = raw.get(cls.HF_PATTERN_KEY, cls.SLIDING_PATTERN) if cls.HF_PATTERN_KEY \
                else cls.SLIDING_PATTERN
            if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern <= 0:
                raise ModelFormatError(f"{where}: sliding_window_pattern must be a positive "
                                       f"integer, got {pattern!r}")
            types = cls.periodic_layer_types(raw["num_hidden_layers"], pattern)
        return types if window is not None or "sliding_attention" in types else None

    @classmethod
    def gguf_attn_scale(cls, cfg: dict) -> float:
        # llama.cpp's rule (no key carries query_pre_attn_scalar): the 46-layer
        # 27B scales by (hidden/heads)**-0.5, every other size by head_dim**-0.5
        if cfg["num_layers"] == cls.GGUF_SCALE_BY_HIDDEN_LAYERS:
            return float(cfg["hidden_size"] // cfg["num_heads"]) ** -0.5
        return float(cfg["head_dim"]) ** -0.5

    @classmethod
    def gguf_softcap(cls, get: Any, where: str) -> float | None:
        """`attn_logit_softcapping`, which llama.cpp's converter always writes
        for Gemma-2 (a file without it is refused rather than guessed)."""
        key = f"{cls.gguf_architecture}.attn_logit_softcapping"
        cap = get("attn_logit_softcapping")
        if cap is None:
            raise ModelFormatError(f"{where}: metadata '{key}' is missing")
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) \
                or cap < 0:
            raise ModelFormatError(f"{where}: metadata {key}={cap!r} must be a finite number >= 0")
        return cls._softcap(cap)

    @classmethod
    def gguf_variants(cls, cfg: dict, get: Any, where: str) -> dict[str, Any]:
        if cfg["sliding_window"] is None:   # every Gemma has sliding layers
            raise ModelFormatError(f"{where}: metadata '{cls.gguf_architecture}.attention."
                                   "sliding_window' is missing")
        return {**cls._common_variants(cfg), "attn_scale": cls.gguf_attn_scale(cfg),
                "attn_softcap": cls.gguf_softcap(get, where),
                "layer_types": cls.gguf_layer_types(cfg, get("attention.sliding_window_pattern"),
                                                    where)}

    @classmethod
    def gguf_layer_types(cls, cfg: dict, pattern: Any, where: str) -> list[str]:
        """`attention.sliding_window_pattern` as llama.cpp reads it: a period n
        (layer i sliding unless (i + 1) % n == 0) or one flag per layer (true:
        sliding); absent: the family's period."""
        n_layers = cfg["num_layers"]
        if pattern is None:
            return cls.periodic_layer_types(n_layers, cls.SLIDING_PATTERN)
        if isinstance(pattern, list) and len(pattern) == n_layers and \
                all(isinstance(p, bool) for p in pattern):
            return ["sliding_attention" if p else "full_attention" for p in pattern]
        if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 0:
            return cls.periodic_layer_types(n_layers, pattern)
        raise ModelFormatError(f"{where}: metadata {cls.gguf_architecture}.attention."
                               f"sliding_window_pattern={pattern!r} must be a positive integer or "
                               f"{n_layers} booleans")
