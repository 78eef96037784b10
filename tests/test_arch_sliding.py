"""Sliding-window attention of the Llama-shaped families, no longer refused
for texts longer than the window: Mistral (the window on every layer) and
Qwen2 (on the layers from `max_window_layers` on, or as `layer_types`
says), every hidden-state layer equal to HF transformers (CPU, fp32, eager)
within 1e-5 (max|ours-HF|/max|HF| per layer) at lengths up to 130 with a
window of 8; packing bitwise neutral.

Run with -s to see the worst error."""
from __future__ import annotations

import pytest

import rjepa_latent as rl
from tiny_families import (LENGTHS, build, every_layer_matches_hf, packing_is_neutral,
                           window_matters)

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024, rms_norm_eps=1e-6)


def _config(name: str):
    import transformers as T
    if name == "mistral":
        return T.MistralConfig(**BASE, sliding_window=8)
    if name == "qwen2":   # layers 2 and 3 sliding
        return T.Qwen2Config(**BASE, use_sliding_window=True, sliding_window=8,
                             max_window_layers=2)
    if name == "qwen3":   # explicit layer_types
        return T.Qwen3Config(**BASE, head_dim=32, use_sliding_window=True, sliding_window=8,
                             layer_types=["sliding_attention", "full_attention",
                                          "full_attention", "sliding_attention"])
    raise KeyError(name)


LAYERS = {"mistral": [True] * 4, "qwen2": [False, False, True, True],
          "qwen3": [True, False, False, True]}


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3"])
def test_window_longer_texts_match_hf(name, tmp_path):
    d = build(_config(name), tmp_path / name)
    assert window_matters(d) > 1e-3
    m = rl.Model(d, device="cpu", threads=2)
    assert m.sliding_window == 8
    from rjepa_latent.checkpoint import open_checkpoint
    src = open_checkpoint(d)
    assert src.engine_config["layer_sliding"] == LAYERS[name]
    src.close()
    worst = every_layer_matches_hf(m, d)
    packing_is_neutral(m)
    m.close()
    print(f"\n{name} window 8: worst max|ours-HF|/max|HF| {worst:.2e}, lengths {LENGTHS}")
