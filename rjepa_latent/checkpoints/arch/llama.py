"""Llama: the root family; every other family is written as its differences.

HF: `LlamaForCausalLM` (model_type `llama`); `attention_bias` puts biases on
q, k, v and o, `mlp_bias` on gate, up and down; RoPE `default` or `llama3`
(checkpoint.rope_inv_freq). GGUF: architecture `llama`, keys `llama.*`, q/k
rows interleaved per head by llama.cpp's converter, llama3 RoPE scaling as the
`rope_freqs.weight` factors. SmolLM, TinyLlama and other Llama-shaped models
are this family; llama.cpp also writes Mistral models as `llama`.
"""
from __future__ import annotations

from .base import Family, register


def _layer(names: dict[str, str], prefix: str) -> dict[str, str]:
    return {kind: prefix + "{layer}." + short for kind, short in names.items()}


# The norms after attention and after the MLP (rl_norms pre_post / post), as
# HF (Gemma-2/3, OLMo-2) and llama.cpp name them.
POST_NORMS_HF = _layer({"post_attn_norm": "post_attention_layernorm.weight",
                        "post_ffn_norm": "post_feedforward_layernorm.weight"}, "model.layers.")
POST_NORMS_GGUF = _layer({"post_attn_norm": "post_attention_norm.weight",
                          "post_ffn_norm": "post_ffw_norm.weight"}, "blk.")


@register
class Llama(Family):
    name = "llama"
    hf_model_types = ("llama",)
    hf_architectures = ("LlamaForCausalLM",)
    gguf_architecture = "llama"
    gguf_permuted_qk = True
    ROPE_TYPES = ("default", "llama3")
    # no pre-/post-norm pair: HF's post_attention_layernorm is the MLP's pre-norm here
    UNUSED_KINDS = frozenset({"post_attn_norm", "post_ffn_norm"})

    HF_NAMES = {
        "embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
        **_layer({
            "attn_norm": "input_layernorm.weight",
            "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight",
            "v": "self_attn.v_proj.weight", "o": "self_attn.o_proj.weight",
            "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias",
            "v_bias": "self_attn.v_proj.bias", "o_bias": "self_attn.o_proj.bias",
            "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
            "ffn_norm": "post_attention_layernorm.weight",
            "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
            "down": "mlp.down_proj.weight", "gate_bias": "mlp.gate_proj.bias",
            "up_bias": "mlp.up_proj.bias", "down_bias": "mlp.down_proj.bias",
        }, "model.layers."),
    }
    HF_OPTIONAL_PREFIX = "model."
    HF_IGNORED = (r"lm_head\.weight",
                  r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")

    GGUF_NAMES = {
        "embed": "token_embd.weight", "final_norm": "output_norm.weight",
        **_layer({
            "attn_norm": "attn_norm.weight",
            "q": "attn_q.weight", "k": "attn_k.weight", "v": "attn_v.weight",
            "o": "attn_output.weight",
            "q_bias": "attn_q.bias", "k_bias": "attn_k.bias", "v_bias": "attn_v.bias",
            "o_bias": "attn_output.bias",
            "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
            "ffn_norm": "ffn_norm.weight",
            "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight",
            "gate_bias": "ffn_gate.bias", "up_bias": "ffn_up.bias", "down_bias": "ffn_down.bias",
        }, "blk."),
    }
    GGUF_LM_HEAD = "output.weight"
    GGUF_IGNORED = (r"output\.weight",)
    GGUF_ROPE_FREQS = "rope_freqs.weight"
    # public config field -> metadata key under "<gguf_architecture>."
    GGUF_KEYS = {
        "num_layers": "block_count", "hidden_size": "embedding_length",
        "intermediate_size": "feed_forward_length", "num_heads": "attention.head_count",
        "num_kv_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
        "value_dim": "attention.value_length", "rope_dim": "rope.dimension_count",
        "rms_norm_eps": "attention.layer_norm_rms_epsilon", "rope_theta": "rope.freq_base",
        "rope_scaling_type": "rope.scaling.type", "rope_scaling_factor": "rope.scaling.factor",
        "max_position_embeddings": "context_length", "vocab_size": "vocab_size",
        "sliding_window": "attention.sliding_window",
    }
    # biases / q-k norm are not llama.cpp `llama` tensors: such a file is refused
    GGUF_FLAGS = {"attn_qkv_bias": False, "attn_o_bias": False, "mlp_bias": False,
                  "qk_norm": False}

    @classmethod
    def hf_flags(cls, raw: dict) -> dict[str, bool]:
        attention_bias = bool(raw.get("attention_bias", False))
        return {"attn_qkv_bias": attention_bias, "attn_o_bias": attention_bias,
                "mlp_bias": bool(raw.get("mlp_bias", False)), "qk_norm": False}
