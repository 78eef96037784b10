"""Sliding-window attention of the Llama-shaped families, no longer refused
for texts longer than the window: Mistral (the window on every layer) and
Qwen2 (on the layers from `max_window_layers` on, or as `layer_types`
says), every hidden-state layer equal to HF transformers (CPU, fp32, eager)
within 1e-5 (max|ours-HF|/max|HF| per layer) at lengths up to 130 with a
window of 8; packing bitwise neutral.

Run with -s to see the worst error."""
from __future__ import annotations

import numpy as np
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
    from rjepa_latent.checkpoints.loader import open_checkpoint
    src = open_checkpoint(d)
    assert src.engine_config["layer_sliding"] == LAYERS[name]
    src.close()
    worst = every_layer_matches_hf(m, d)
    packing_is_neutral(m)
    m.close()
    print(f"\n{name} window 8: worst max|ours-HF|/max|HF| {worst:.2e}, lengths {LENGTHS}")


TINY = {"vocab_size": 11, "hidden_size": 8, "intermediate_size": 16, "num_layers": 2,
        "num_heads": 2, "num_kv_heads": 1, "head_dim": 4, "rms_norm_eps": 1e-6}


@pytest.mark.parametrize("over,words", [
    ({"sliding_window": 8}, "sliding_window but no 'layer_sliding'"),
    ({"sliding_window": 8, "layer_sliding": [True]}, "has 1 flags, expected num_layers=2"),
    ({"sliding_window": -1}, "sliding_window must be in"),
    ({"sliding_window": 8, "num_layers": 600, "layer_sliding": [True] * 600},
     "at most 512 layers"),
    ({"norm_offset": 2.0}, "norm_offset must be 0 or 1"),
    ({"act": 5}, "act must be 0 .silu. or 1 .gelu_tanh."),
    ({"norms": 3}, "norms must be 0 .pre."),
    ({"qk_norm": 3}, "qk_norm must be 0"),
    ({"attn_softcap": float("nan")}, "attn_softcap must be finite"),
    ({"embed_scale": -1.0}, "embed_scale must be finite and >= 0"),
])
def test_engine_config_errors_name_the_field(over, words):
    """The C core refuses a bad variant naming it (never a crash)."""
    from rjepa_latent import _core
    with pytest.raises(ValueError, match=words):
        _core.tensor_layout({**TINY, **over})


def test_cpu_runs_every_feature_and_layouts_follow_the_variants():
    from rjepa_latent import _core
    assert len(_core.backend_caps("cpu")["features"]) == 9
    kinds = lambda **o: {k for k, _, _ in _core.tensor_layout({**TINY, **o})}  # noqa: E731
    assert {"attn_norm", "ffn_norm"} <= kinds() and "post_attn_norm" not in kinds()
    assert {"attn_norm", "post_attn_norm", "ffn_norm", "post_ffn_norm"} <= kinds(norms=1)
    assert "attn_norm" not in kinds(norms=2) and "post_ffn_norm" in kinds(norms=2)
    assert "rope_inv_freq_swa" in kinds(rope_swa=1)
    shapes = {k: s for k, _, s in _core.tensor_layout({**TINY, "qk_norm": 2})}
    assert shapes["q_norm"] == (8,) and shapes["k_norm"] == (4,)


def test_a_backend_refuses_the_features_its_caps_do_not_state():
    """Checked before any allocation and without a device: CUDA's caps (when
    compiled in) list what its kernels run; a config needing anything else
    is refused naming it."""
    from rjepa_latent import _core
    if not _core.build_info()["cuda"]:
        pytest.skip("CUDA is not compiled into this build")
    have = set(_core.backend_caps("cuda:0")["features"])
    cfg = {**TINY, "head_dim": 16, "num_heads": 2, "hidden_size": 32, "norms": 1,
           "sliding_window": 8, "layer_sliding": [True, False]}
    missing = [f for f in ("post-norms", "sliding_window") if f not in have]
    if not missing:
        _core.check_config(cfg, "cuda:0")
        return
    with pytest.raises(ValueError, match=f"cannot run this model: it does not support {missing[0]}"):
        _core.check_config(cfg, "cuda:0")


def test_a_device_without_windowed_attention_takes_texts_up_to_the_window(tmp_path,
                                                                           monkeypatch):
    """Where a backend's caps lack sliding_window (CUDA before its kernel),
    the model runs with full attention, the same network on texts that fit
    the window, and longer texts are a SequenceLengthError there (simulated
    on the CPU by capabilities without the feature)."""
    from rjepa_latent import _core
    from rjepa_latent.engine import model as model_mod
    d = build(_config("mistral"), tmp_path / "m")
    windowed = rl.Model(d, device="cpu")

    class NoWindowCaps:
        def __getattr__(self, name):
            return getattr(_core, name)

        @staticmethod
        def backend_caps(device):
            caps = _core.backend_caps(device)
            return {**caps, "features": [f for f in caps["features"] if f != "sliding_window"]}
    monkeypatch.setattr(model_mod, "_core", NoWindowCaps())
    cfg, limit = model_mod.device_engine_config(
        {"sliding_window": 8, "layer_sliding": [True, False], "max_layer": 2}, "cpu")
    assert (cfg, limit) == ({"max_layer": 2}, 8)
    assert model_mod.device_engine_config({"sliding_window": 8, "layer_sliding": [False] * 2,
                                           "max_layer": 2}, "cpu")[1] is None
    m = rl.Model(d, device="cpu")
    ids = np.arange(5, 13)
    np.testing.assert_array_equal(m.hidden_states(ids), windowed.hidden_states(ids))
    with pytest.raises(rl.SequenceLengthError, match=r"ids has 9 tokens, more than this "
                                                     r"model's sliding_window=8; cpu has no "
                                                     r"sliding-window attention"):
        m.hidden_states(np.arange(5, 14))
    m.close()
    windowed.close()
