"""What a config.json leaves out, the families read as HF transformers'
own config classes default it (Gemma2Config, Gemma3TextConfig, Qwen2Config):
the sliding layers (`layer_types` from `sliding_window_pattern` /
`max_window_layers`), the window, the soft-cap, the score scale and the RoPE
bases. config.json files saved by transformers 5 spell most of these out, so
the parity tests (tests/test_arch_<family>.py) never reach the defaults;
older and hand-written files do. Also: bad values of these fields are a
ModelFormatError naming the field, never a crash or a later error of
another class."""
from __future__ import annotations

import copy

import pytest

import rjepa_latent as rl
from rjepa_latent.checkpoints.checkpoint import config_from_dict

SIZES = dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=320)


def _hf(model_type: str, raw: dict):
    import transformers as T
    cls = {"gemma2": T.Gemma2Config, "gemma3_text": T.Gemma3TextConfig,
           "qwen2": T.Qwen2Config, "olmo2": T.Olmo2Config}[model_type]
    return cls(**raw)


CASES = [
    ("gemma2", {"num_hidden_layers": 5}),
    ("gemma2", {"num_hidden_layers": 6, "sliding_window": 16, "sliding_window_pattern": 3}),
    ("gemma3_text", {"num_hidden_layers": 13}),
    ("gemma3_text", {"num_hidden_layers": 7, "sliding_window_pattern": 3, "sliding_window": 32}),
    ("gemma3_text", {"num_hidden_layers": 7, "rope_theta": 5e5, "rope_local_base_freq": 5e3}),
    ("gemma3_text", {"num_hidden_layers": 7,       # one layer type's RoPE stated, the other not
                     "rope_parameters": {"sliding_attention": {"rope_type": "default",
                                                               "rope_theta": 123.0}}}),
    ("gemma3_text", {"num_hidden_layers": 7,
                     "rope_parameters": {"full_attention": {"rope_type": "default",
                                                            "rope_theta": 4e5}}}),
    ("qwen2", {"num_hidden_layers": 6, "use_sliding_window": True, "sliding_window": 16,
               "max_window_layers": 2}),
    ("qwen2", {"num_hidden_layers": 4, "use_sliding_window": True, "max_window_layers": 0}),
]


@pytest.mark.parametrize("model_type,extra", CASES)
def test_defaults_are_hfs(model_type, extra):
    raw = {"model_type": model_type, **SIZES, **extra}
    # (a deep copy: the config classes fill in nested rope_parameters in place)
    hf = _hf(model_type, copy.deepcopy({k: v for k, v in raw.items() if k != "model_type"}))
    pub, eng = config_from_dict(raw, "x")
    types = list(hf.layer_types)
    assert pub.get("layer_types", None if "sliding_attention" not in types else "missing") in \
        (types, None)
    assert eng["layer_sliding"] == [t == "sliding_attention" for t in types]
    assert pub["sliding_window"] == hf.sliding_window
    if model_type.startswith("gemma"):
        assert pub["layer_types"] == types
        assert pub.get("attn_softcap") == hf.attn_logit_softcapping
        assert pub["attn_scale"] == hf.query_pre_attn_scalar ** -0.5
        rope = hf.rope_parameters
        if model_type == "gemma3_text":
            assert pub["rope_theta"] == rope["full_attention"]["rope_theta"]
            assert pub["rope_local_theta"] == rope["sliding_attention"]["rope_theta"]
        else:
            assert pub["rope_theta"] == rope["rope_theta"]


@pytest.mark.parametrize("model_type,edit,words", [
    ("gemma2", {"query_pre_attn_scalar": float("inf")}, "query_pre_attn_scalar must be a positive"),
    ("gemma2", {"attn_logit_softcapping": -1.0}, "attn_softcap must be a positive number"),
    ("gemma2", {"attn_logit_softcapping": float("nan")}, "attn_softcap must be a positive number"),
    ("gemma2", {"sliding_window": 0}, "'sliding_window' must be a positive integer"),
    ("gemma3_text", {"layer_types": ["chunked_attention"] * 4}, "layer_types must list 4 entries"),
    ("gemma3_text", {"sliding_window_pattern": True}, "sliding_window_pattern must be a positive"),
    ("gemma3_text", {"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not supported"),
    # the C core describes a window for at most 512 layers: its rule, this error class
    ("gemma2", {"num_hidden_layers": 600}, "at most 512 layers .layer_sliding.*num_layers=600"),
    ("mistral", {"num_hidden_layers": 513, "sliding_window": 8}, "at most 512 layers"),
])
def test_bad_values_are_model_format_errors(model_type, edit, words):
    raw = {"model_type": model_type, **SIZES, "num_hidden_layers": 4, **edit}
    with pytest.raises(rl.ModelFormatError, match=words):
        config_from_dict(raw, "x")


def test_mistral_without_a_window_key_has_hfs_default_window():
    import transformers as T
    raw = {"model_type": "mistral", **SIZES, "num_hidden_layers": 2}
    pub, _ = config_from_dict(raw, "x")
    assert pub["sliding_window"] == T.MistralConfig(**SIZES).sliding_window == 4096
    pub, eng = config_from_dict({**raw, "sliding_window": None}, "x")   # null: no window
    assert not pub.get("sliding_window") and "sliding_window" not in eng


def test_many_layers_without_a_window_are_fine():
    pub, eng = config_from_dict({"model_type": "mistral", **SIZES, "num_hidden_layers": 600,
                                 "sliding_window": None}, "x")
    assert pub["num_layers"] == 600 and "sliding_window" not in eng
