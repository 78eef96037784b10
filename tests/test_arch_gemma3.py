"""Gemma-3 text (rjepa_latent/checkpoints/arch/gemma3.py, model_type gemma3_text):
config mapping (transformers-5 per-layer-type rope_parameters and the older
rope_theta / rope_scaling / rope_local_base_freq form alike), and every
hidden-state layer equal to HF transformers (CPU, fp32, eager) within 1e-5
(max|ours-HF|/max|HF| per layer) on a tiny random model with Gemma-3's
features: per-head q/k norms (1 + w), a window of 8 on the sliding layers
of `sliding_window_pattern` 3 (layers 0, 1, 3, 4 of 5), linear RoPE scaling
(factor 4, base 1e6) on the full layers and the local base 1e4 on the
sliding ones, no soft-cap; packing bitwise neutral; the multimodal `gemma3`
config refused with a message saying what to use.

Run with -s to see the worst error."""
from __future__ import annotations

import json

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent.checkpoints.checkpoint import config_from_dict
from tiny_families import (LENGTHS, build, every_layer_matches_hf, packing_is_neutral,
                           window_matters)

BASE = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=320, max_position_embeddings=1024,
            rms_norm_eps=1e-6, query_pre_attn_scalar=24, sliding_window=8)
ROPE = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    import transformers as T
    cfg = T.Gemma3TextConfig(**BASE, sliding_window_pattern=3, rope_parameters=ROPE)
    return build(cfg, tmp_path_factory.mktemp("gemma3") / "m", norm_mean=0.0)


@pytest.fixture(scope="module")
def gemma3(gemma3_dir):
    m = rl.Model(gemma3_dir, device="cpu", threads=2)
    yield m
    m.close()


def test_config_mapping(gemma3_dir):
    raw = json.loads((gemma3_dir / "config.json").read_text())
    assert raw["model_type"] == "gemma3_text" and "sliding_attention" in raw["rope_parameters"]
    pub, eng = config_from_dict(raw, "x")
    assert pub["model_type"] == "gemma3_text" and pub["qk_norm"]
    assert (pub["rope_theta"], pub["rope_scaling"], pub["rope_local_theta"]) == \
        (1e6, {"rope_type": "linear", "factor": 4.0}, 10000.0)
    assert pub["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention",
                                  "sliding_attention", "sliding_attention"]
    assert "attn_softcap" not in pub and pub["attn_scale"] == 24 ** -0.5
    assert (eng["qk_norm"], eng["rope_swa"], eng["norm_offset"]) == (1, 1, 1.0)
    # the older form of the same settings maps to the same config
    old = {k: v for k, v in raw.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 4.0},
               rope_local_base_freq=10000.0, sliding_window_pattern=3)
    assert config_from_dict(old, "x") == (pub, eng)


def test_every_layer_matches_hf(gemma3, gemma3_dir):
    assert window_matters(gemma3_dir) > 1e-3
    worst = every_layer_matches_hf(gemma3, gemma3_dir)
    print(f"\ngemma3: worst max|ours-HF|/max|HF| {worst:.2e} over all layers, lengths {LENGTHS}")


def test_local_rope_base_is_used(gemma3_dir, tmp_path):
    """The sliding layers' base matters: with another one the states differ,
    and still match HF with that base."""
    import transformers as T
    cfg = T.Gemma3TextConfig(**BASE, sliding_window_pattern=3, rope_parameters={
        **ROPE, "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}})
    d = build(cfg, tmp_path / "m", norm_mean=0.0)
    a, b = rl.Model(d, device="cpu"), rl.Model(gemma3_dir, device="cpu")
    ids = np.arange(3, 60)
    assert not np.allclose(a.hidden_states(ids, layers=[1]), b.hidden_states(ids, layers=[1]))
    every_layer_matches_hf(a, d, lengths=(45,))
    a.close()
    b.close()


def test_packing_is_bitwise_neutral(gemma3):
    packing_is_neutral(gemma3)


def test_multimodal_gemma3_is_refused_with_what_to_use(gemma3_dir):
    raw = json.loads((gemma3_dir / "config.json").read_text())
    with pytest.raises(rl.ModelFormatError, match="Gemma3ForConditionalGeneration.*not "
                                                  "supported; use a text-only Gemma3ForCausalLM"):
        config_from_dict({"model_type": "gemma3", "text_config": raw}, "x")


def test_sliding_layers_rope_scaling_is_refused(gemma3_dir):
    raw = json.loads((gemma3_dir / "config.json").read_text())
    raw["rope_parameters"] = {**ROPE, "sliding_attention": {"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 1e4}}
    with pytest.raises(rl.ModelFormatError, match="'linear' of the sliding layers"):
        config_from_dict(raw, "x")
