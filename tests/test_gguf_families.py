"""GGUF files of the Gemma-2, Gemma-3 and OLMo-2 architectures (and Mistral
with a sliding window, written as `llama`), written from tiny random HF
models as llama.cpp's converter writes them (tests/test_gguf.py's
`write_family_gguf`: gguf-py's name map, Gemma's norm weights stored as
w + 1, the softcap / window / linear-RoPE metadata), against HF transformers
on an HF checkpoint of the same dequantized weights: every layer within
test_gguf.TOL (max|ours-HF|/max|HF| per layer), on texts longer than the
window (8). The GGUF loader feeds the engine exactly what the HF loader does
(the +1 is the engine's norm_offset for HF files, the stored weights' own for
GGUF), so the two give bitwise the same states."""
from __future__ import annotations

import numpy as np
import pytest

import rjepa_latent as rl
from test_gguf import FAMILY_WORST, gguf_worst_vs_hf, TOL, TYPES, _expect_error, _family_hf_model, _vocab, \
    family_files, rel_errors, report_family_worst, write_family_gguf  # noqa: F401

LENGTHS = (1, 9, 45, 130)


CASES = [(f, q) for f in ("gemma2", "gemma3", "olmo2") for q in TYPES] + \
    [("mistral_swa", "F32"), ("mistral_swa", "Q4_1")]   # the window is the point there


@pytest.mark.parametrize("family,qtype", CASES)
def test_family_gguf_every_layer_matches_hf(family_files, family, qtype):
    path, hf_dir = family_files(family, qtype)
    m = rl.Model(path, device="cpu")
    ref_model = rl.Model(hf_dir, device="cpu")
    c = m.config
    assert c["model_type"] == {"gemma3": "gemma3_text", "mistral_swa": "llama"}.get(family, family)
    assert c["sliding_window"] == (None if family == "olmo2" else 8)
    if family.startswith("gemma"):
        # the converter stored 1 + w: the GGUF norms are applied as they are
        assert "norm_offset" not in c and ref_model.config["norm_offset"] == 1.0
        assert c["layer_types"] == ref_model.config["layer_types"]
    worst = gguf_worst_vs_hf(m, ref_model, hf_dir, LENGTHS)
    FAMILY_WORST[(family, qtype)] = worst
    assert worst <= TOL, (family, qtype, worst)


def test_gemma_norms_are_stored_shifted(family_files):
    """What llama.cpp writes: a Gemma norm tensor holds 1 + w (so a loader
    that applied 1 + w again would be off by one in every norm)."""
    import gguf
    from safetensors.numpy import load_file
    path, hf_dir = family_files("gemma3", "F32")
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    hf = load_file(str(hf_dir / "model.safetensors"))
    for gname, hname in (("blk.1.attn_q_norm.weight", "model.layers.1.self_attn.q_norm.weight"),
                         ("blk.0.post_ffw_norm.weight",
                          "model.layers.0.post_feedforward_layernorm.weight"),
                         ("output_norm.weight", "model.norm.weight")):
        np.testing.assert_array_equal(stored[gname], hf[hname] + np.float32(1))


def test_gguf_variants_read_from_metadata(family_files):
    from rjepa_latent.checkpoints.loader import read_config
    g2 = read_config(family_files("gemma2", "F32")[0])
    assert (g2["attn_softcap"], g2["attn_scale"], g2["embed_scale"]) == (5.0, 16 ** -0.5, 8.0)
    assert g2["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert (g2["norms"], g2["hidden_act"]) == ("pre_post", "gelu_tanh")
    g3 = read_config(family_files("gemma3", "F32")[0])
    assert "attn_softcap" not in g3 and g3["rope_local_theta"] == 10000.0
    assert g3["rope_linear_factor"] == 4.0 and g3["rope_theta"] == 1e6
    assert g3["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    o2 = read_config(family_files("olmo2", "F32")[0])
    assert (o2["norms"], o2["qk_norm"], o2["qk_norm_over"]) == ("post", True, "projection")


def _rewrite(src, dst, arch: str, drop: tuple[str, ...] = (), meta: dict | None = None,
             tensors: dict | None = None) -> None:
    """A copy of the GGUF file `src` without the metadata keys `drop`, with
    the typed metadata `meta` ({key: (value, GGUFValueType)}) and the extra
    `tensors` added."""
    import gguf as G
    r = G.GGUFReader(str(src))
    w = G.GGUFWriter(str(dst), arch)
    for field in r.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", *drop):
            continue
        w.add_key_value(field.name, field.contents(), field.types[0],
                        field.types[-1] if field.types[0] == G.GGUFValueType.ARRAY else None)
    for key, (value, vtype) in (meta or {}).items():
        w.add_key_value(key, value, vtype)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data))
    for name, arr in (tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_olmo2_gguf_with_a_pre_norm_is_unexpected(tmp_path):
    """OLMo-2 has no norm before attention: an attn_norm tensor is not ours."""
    model = _family_hf_model("olmo2", len(_vocab()[0]), seed=3)
    p = tmp_path / "m.gguf"
    write_family_gguf(model, p, "olmo2", "F32")
    _rewrite(p, tmp_path / "x.gguf", "olmo2",
             tensors={"blk.0.attn_norm.weight": np.ones(64, np.float32)})
    _expect_error(tmp_path / "x.gguf", "unexpected", "blk.0.attn_norm.weight", "olmo2")


F32_T, U32_T = "FLOAT32", "UINT32"


@pytest.mark.parametrize("family,drop,meta,words", [
    # every Gemma has sliding layers, and llama.cpp's converter writes the window
    ("gemma2", ("gemma2.attention.sliding_window",), {},
     ("metadata 'gemma2.attention.sliding_window' is missing",)),
    ("gemma3", ("gemma3.attention.sliding_window",), {},
     ("metadata 'gemma3.attention.sliding_window' is missing",)),
    ("gemma2", ("gemma2.attn_logit_softcapping",), {},
     ("metadata 'gemma2.attn_logit_softcapping' is missing",)),
    ("gemma2", ("gemma2.attn_logit_softcapping",),
     {"gemma2.attn_logit_softcapping": (float("nan"), F32_T)},
     ("gemma2.attn_logit_softcapping=nan", "finite")),
    ("gemma2", ("gemma2.attn_logit_softcapping",),
     {"gemma2.attn_logit_softcapping": (-1.0, F32_T)}, ("gemma2.attn_logit_softcapping=-1.0",)),
    ("gemma3", (), {"gemma3.rope.freq_base_swa": (float("nan"), F32_T)},
     ("rope_local_theta must be a positive number",)),
    ("gemma3", (), {"gemma3.attention.sliding_window_pattern": (0, U32_T)},
     ("gemma3.attention.sliding_window_pattern=0",)),
    ("gemma2", ("gemma2.block_count",), {"gemma2.block_count": (600, U32_T)},
     ("at most 512 layers", "num_layers=600")),
])
def test_gemma_gguf_missing_or_bad_metadata_is_named(family_files, tmp_path, family, drop, meta,
                                                     words):
    import gguf as G
    path, _ = family_files(family, "F32")
    meta = {k: (v, getattr(G.GGUFValueType, t)) for k, (v, t) in meta.items()}
    _rewrite(path, tmp_path / "x.gguf", family, drop, meta)
    _expect_error(tmp_path / "x.gguf", *words)


def test_gemma3_gguf_ignores_a_softcap_key(family_files, tmp_path):
    """llama.cpp's Gemma-3 has no attention soft-cap, whatever the metadata says."""
    import gguf as G
    from rjepa_latent.checkpoints.loader import read_config
    path, _ = family_files("gemma3", "F32")
    _rewrite(path, tmp_path / "x.gguf", "gemma3",
             meta={"gemma3.attn_logit_softcapping": (5.0, G.GGUFValueType.FLOAT32)})
    assert "attn_softcap" not in read_config(tmp_path / "x.gguf")


@pytest.mark.parametrize("fam,layers,hidden,heads,head_dim,hf_scalar", [
    # query_pre_attn_scalar of the HF configs: gemma-2-27b 144 = 4608 / 32,
    # gemma-3-27b 168 = 5376 / 32, the other sizes their head_dim (256)
    ("Gemma2", 46, 4608, 32, 128, 144), ("Gemma2", 42, 3584, 16, 256, 256),
    ("Gemma2", 26, 2304, 8, 256, 256), ("Gemma3", 62, 5376, 32, 128, 168),
    ("Gemma3", 26, 1152, 4, 256, 256), ("Gemma3", 48, 3840, 16, 256, 256),
])
def test_gguf_attention_scale_is_llama_cpps(fam, layers, hidden, heads, head_dim, hf_scalar):
    """No GGUF key holds query_pre_attn_scalar; llama.cpp's rule by layer
    count gives the HF value of every released size."""
    from rjepa_latent.checkpoints import arch
    cfg = {"num_layers": layers, "hidden_size": hidden, "num_heads": heads, "head_dim": head_dim}
    assert getattr(arch, fam).gguf_attn_scale(cfg) == float(hf_scalar) ** -0.5


@pytest.mark.parametrize("pattern", [[False, True, True, False], 2])
def test_sliding_window_pattern_metadata(tmp_path, pattern):
    """`gemma2.attention.sliding_window_pattern`, one flag per layer (true:
    sliding) or a period, decides the sliding layers; the states then match
    HF with the same layer_types."""
    import torch
    import transformers as T
    from conftest import hf_hidden_states
    types = (["sliding_attention" if p else "full_attention" for p in pattern]
             if isinstance(pattern, list) else ["sliding_attention", "full_attention"] * 2)
    cfg = T.Gemma2Config(vocab_size=len(_vocab()[0]), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                         layer_types=types, rms_norm_eps=2.0 ** -17)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    path = tmp_path / "m.gguf"
    write_family_gguf(model, path, "gemma2", "F32",
                      extra_meta={"gemma2.attention.sliding_window_pattern": pattern})
    model.save_pretrained(tmp_path / "hf")
    m = rl.Model(path, device="cpu")
    assert m.config["layer_types"] == types
    ids = np.random.default_rng(2).integers(0, m.config["vocab_size"], 60).astype(np.int32)
    assert max(rel_errors(m.hidden_states(ids), hf_hidden_states(tmp_path / "hf", ids))) <= TOL


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "olmo2"])
def test_gguf_names_agree_with_gguf_py(family_files, family):
    """llama.cpp's own HF -> GGUF name map (gguf-py) gives our names for every
    tensor the engine reads."""
    import gguf
    from rjepa_latent.checkpoints import arch
    from rjepa_latent.checkpoints.loader import read_config
    from rjepa_latent.checkpoints.checkpoint import tensor_layout
    cfg = read_config(family_files(family, "F32")[0])
    fam = arch.for_model_type(cfg["model_type"], "x")
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, fam.gguf_architecture.upper()),
                                    cfg["num_layers"])
    layout = [(k, i) for k, i, _ in tensor_layout(cfg, cfg["num_layers"]) if k not in fam.COMPUTED]
    assert {"post_attn_norm", "post_ffn_norm"} <= {k for k, _ in layout}
    for kind, layer in layout:
        theirs = tmap.get_name(fam.hf_name(kind, layer), try_suffixes=(".weight", ".bias"))
        assert theirs == fam.gguf_name(kind, layer), (kind, layer)
