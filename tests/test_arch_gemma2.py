"""Gemma-2 (rjepa_latent/checkpoints/arch/gemma2.py): its config mapping, and every
hidden-state layer equal to HF transformers (CPU, fp32, eager) within 1e-5
(max|ours-HF|/max|HF| per layer) on a tiny random model with every Gemma-2
feature active: (1 + w) norms, embeddings times sqrt(48) (not exact in
float32), GeGLU, pre- and post-norms, query_pre_attn_scalar 24 != head_dim
16, a soft-cap of 5 that binds, and a window of 8 on layers 0 and 2 with
texts up to 130 tokens; packing stays bitwise neutral.

Run with -s to see the worst error."""
from __future__ import annotations

import json

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent.checkpoints.checkpoint import config_from_dict, read_checkpoint_headers, tensor_layout
from tiny_families import (LENGTHS, build, every_layer_matches_hf, hf_states, ids_of, max_rel,
                           packing_is_neutral, window_matters)

BASE = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=320, max_position_embeddings=1024,
            rms_norm_eps=1e-6)


def gemma2_config(**over):
    import transformers as T
    return T.Gemma2Config(**{**BASE, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 5.0,
                             "sliding_window": 8, **over})


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    # Gemma's norms are applied as 1 + w: stored weights near 0
    return build(gemma2_config(), tmp_path_factory.mktemp("gemma2") / "m", norm_mean=0.0)


@pytest.fixture(scope="module")
def gemma2(gemma2_dir):
    m = rl.Model(gemma2_dir, device="cpu", threads=2)
    yield m
    m.close()


def test_config_mapping(gemma2_dir):
    raw = json.loads((gemma2_dir / "config.json").read_text())
    pub, eng = config_from_dict(raw, "x")
    assert pub["model_type"] == "gemma2" and pub["tie_word_embeddings"]
    assert (pub["norms"], pub["norm_offset"], pub["hidden_act"]) == ("pre_post", 1.0, "gelu_tanh")
    assert pub["embed_scale"] == 48 ** 0.5 and pub["attn_scale"] == 24 ** -0.5
    assert pub["attn_softcap"] == 5.0 and pub["sliding_window"] == 8
    assert pub["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert (eng["norms"], eng["norm_offset"], eng["act"], eng["layer_sliding"]) == \
        (1, 1.0, 1, [True, False, True, False])
    # what HF holds is exactly what the engine asks for (lm_head tied: absent)
    fam = rl.checkpoints.arch.Gemma2
    want = {fam.hf_name(k, i) for k, i, _ in tensor_layout(pub, pub["num_layers"])
            if k not in fam.COMPUTED}
    assert set(read_checkpoint_headers(str(gemma2_dir))) == want
    assert "model.layers.0.pre_feedforward_layernorm.weight" in want


def test_every_layer_matches_hf(gemma2, gemma2_dir):
    assert window_matters(gemma2_dir) > 1e-3
    worst = every_layer_matches_hf(gemma2, gemma2_dir)
    print(f"\ngemma2: worst max|ours-HF|/max|HF| {worst:.2e} over all layers, lengths {LENGTHS}")


def test_index_0_is_the_scaled_embedding_and_the_last_is_normed(gemma2, gemma2_dir):
    """HF's hidden_states[0] is the embedding times sqrt(hidden) in the
    weights' dtype; the last index is after the final norm."""
    import torch
    from safetensors.numpy import load_file
    ids = ids_of(20, seed=3)
    emb = load_file(str(gemma2_dir / "model.safetensors"))["model.embed_tokens.weight"]
    scale = torch.tensor(48 ** 0.5).to(torch.float32).item()
    np.testing.assert_array_equal(gemma2.hidden_states(ids, layers=[0])[0],
                                  emb[ids] * np.float32(scale))
    ref = hf_states(gemma2_dir, ids)
    assert max_rel(gemma2.hidden_states(ids, layers=[-1]), ref[-1:]).max() <= 1e-5
    assert gemma2.hidden_states(ids, layers=[-1]).shape == (1, 20, 48)


def test_packing_is_bitwise_neutral(gemma2):
    packing_is_neutral(gemma2)


def test_max_layer_loads_only_the_layers_needed(gemma2_dir, gemma2):
    part = rl.Model(gemma2_dir, device="cpu", max_layer=2)
    ids = ids_of(40, seed=9)
    np.testing.assert_array_equal(part.hidden_states(ids), gemma2.hidden_states(ids, layers=[0, 1, 2]))
    part.close()


@pytest.mark.parametrize("edit,words", [
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not supported"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types must list 4 entries"),
    ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar must be a positive number"),
    ({"sliding_window": None}, "names sliding_attention layers but no sliding_window"),
])
def test_bad_configs_are_refused(gemma2_dir, edit, words):
    raw = {**json.loads((gemma2_dir / "config.json").read_text()), **edit}
    with pytest.raises(rl.ModelFormatError, match=words):
        config_from_dict(raw, "x")


def test_no_softcap_and_only_full_layers(tmp_path):
    """attn_logit_softcapping null and every layer full (HF's mask code needs
    a sliding_window even so): the network without those two ops."""
    from rjepa_latent.checkpoints.loader import open_checkpoint
    d = build(gemma2_config(attn_logit_softcapping=None, sliding_window=4096,
                            layer_types=["full_attention"] * 4), tmp_path / "m", norm_mean=0.0)
    src = open_checkpoint(d)
    assert "attn_softcap" not in src.config and "attn_softcap" not in src.engine_config
    assert src.engine_config["layer_sliding"] == [False] * 4
    src.close()
    m = rl.Model(d, device="cpu")
    every_layer_matches_hf(m, d, lengths=(1, 45))
    m.close()


def test_parity_command_passes(gemma2_dir):
    """`rjepa-latent parity`'s check against HF on this family, also with only
    the first layers loaded on the HF side (layer_types cut to match)."""
    from rjepa_latent.tools.parity import check_parity
    for layers in (None, [0, 2]):
        r = check_parity(gemma2_dir, n_texts=2, layers=layers)
        assert r.passed, r.table()
        assert [lp.layer for lp in r.layers] == (list(range(5)) if layers is None else layers)


def test_bf16_checkpoint(gemma2_dir, tmp_path):
    """A bfloat16 checkpoint: the engine widens to fp32 and matches HF loading
    the same file in fp32 (where HF's embedding scale is fp32 too)."""
    import torch
    import transformers as T
    model = T.AutoModelForCausalLM.from_pretrained(gemma2_dir, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    from conftest import make_tokenizer
    make_tokenizer(tmp_path / "bf16" / "tokenizer.json")
    m = rl.Model(tmp_path / "bf16", device="cpu")
    every_layer_matches_hf(m, tmp_path / "bf16", lengths=(9, 45))
    m.close()


def test_attention_bias(tmp_path):
    """`attention_bias` puts biases on q, k, v and o (HF's Gemma2Attention);
    with them every layer still matches HF."""
    d = build(gemma2_config(attention_bias=True), tmp_path / "m", norm_mean=0.0)
    m = rl.Model(d, device="cpu")
    assert m.config["attn_qkv_bias"] and m.config["attn_o_bias"]
    every_layer_matches_hf(m, d, lengths=(9, 45))
    m.close()
