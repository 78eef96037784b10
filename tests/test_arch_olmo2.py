"""OLMo-2 (rjepa_latent/checkpoints/arch/olmo2.py): norms after attention and MLP (no
input norm), q/k RMSNorm over the whole projection; every hidden-state layer
equal to HF transformers (CPU, fp32, eager) within 1e-5
(max|ours-HF|/max|HF| per layer), also with `attention_bias`; packing
bitwise neutral.

Run with -s to see the worst error."""
from __future__ import annotations

import json

import pytest

import rjepa_latent as rl
from rjepa_latent.checkpoints.checkpoint import config_from_dict, read_checkpoint_headers, tensor_layout
from tiny_families import LENGTHS, build, every_layer_matches_hf, packing_is_neutral

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024,
            rms_norm_eps=1e-6, eos_token_id=1, pad_token_id=1)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "attention_bias"])
def olmo2_dir(request, tmp_path_factory):
    import transformers as T
    cfg = T.Olmo2Config(**BASE, attention_bias=request.param)
    return build(cfg, tmp_path_factory.mktemp("olmo2") / "m")


def test_config_mapping_and_names(olmo2_dir):
    raw = json.loads((olmo2_dir / "config.json").read_text())
    pub, eng = config_from_dict(raw, "x")
    assert (pub["norms"], pub["qk_norm_over"], pub["qk_norm"]) == ("post", "projection", True)
    assert (eng["norms"], eng["qk_norm"]) == (2, 2)
    assert pub["attn_qkv_bias"] == pub["attn_o_bias"] == raw["attention_bias"]
    layout = tensor_layout(pub, pub["num_layers"])
    shapes = {(k, i): s for k, i, s in layout}
    assert shapes[("q_norm", 0)] == (64,) and shapes[("k_norm", 0)] == (32,)
    assert ("attn_norm", 0) not in shapes and ("ffn_norm", 0) not in shapes
    fam = rl.checkpoints.arch.Olmo2
    want = {fam.hf_name(k, i) for k, i, _ in layout if k not in fam.COMPUTED}
    assert {n for n in read_checkpoint_headers(str(olmo2_dir)) if not fam.hf_ignored(n)} == want


def test_every_layer_matches_hf(olmo2_dir):
    m = rl.Model(olmo2_dir, device="cpu", threads=2)
    worst = every_layer_matches_hf(m, olmo2_dir)
    packing_is_neutral(m)
    m.close()
    print(f"\nolmo2: worst max|ours-HF|/max|HF| {worst:.2e} over all layers, lengths {LENGTHS}")


def test_a_sliding_window_key_is_ignored_as_hf_ignores_it(tmp_path):
    """HF's OLMo-2 (as Llama) attention has no window: a `sliding_window` in
    config.json changes nothing there, so it changes nothing here either
    (a window applied anyway would differ from HF past 8 tokens)."""
    import transformers as T
    cfg = T.Olmo2Config(**BASE)
    cfg.sliding_window = 8
    d = build(cfg, tmp_path / "m")
    assert json.loads((d / "config.json").read_text())["sliding_window"] == 8
    m = rl.Model(d, device="cpu")
    assert m.sliding_window is None and m.config["sliding_window"] is None
    every_layer_matches_hf(m, d, lengths=(45,))
    m.close()
