"""The architecture registry (rjepa_latent.arch): lookups and their errors,
each family's HF config mapping, name tables that cover exactly what the C
core's tensor_layout can ask for (checked against real HF checkpoints and
gguf-py's own HF -> GGUF name map), and a family added at run time loading
through the unchanged loaders."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent.checkpoints import arch
from rjepa_latent.checkpoints.checkpoint import config_from_dict, read_checkpoint_headers, tensor_layout
from rjepa_latent.checkpoints.loader import read_config, open_checkpoint

RAW = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}


def public(**flags) -> dict:
    cfg, _ = config_from_dict({**RAW, "model_type": "llama"}, "x")
    cfg.update(flags)
    return cfg


# ------------------------------------------------------------------ lookups


def test_lookups_by_every_name():
    for fam in (arch.Llama, arch.Mistral, arch.Qwen2, arch.Qwen3, arch.Gemma2, arch.Gemma3,
                arch.Olmo2):
        assert arch.for_model_type(fam.name, "x") is fam
        assert arch.for_hf_config({"architectures": list(fam.hf_architectures)}, "x") is fam
    assert [f.name for f in arch.FAMILIES] == ["llama", "gemma2", "gemma3_text", "mistral",
                                               "olmo2", "qwen2", "qwen3"]
    for name, fam in (("llama", arch.Llama), ("qwen2", arch.Qwen2), ("qwen3", arch.Qwen3),
                      ("gemma2", arch.Gemma2), ("gemma3", arch.Gemma3), ("olmo2", arch.Olmo2)):
        assert arch.for_gguf_architecture(name, "x") is fam


@pytest.mark.parametrize("value", ["gpt2", None, 3, "Llama"])
def test_unknown_family_names_file_value_and_supported(value):
    with pytest.raises(rl.ModelFormatError) as e:
        arch.for_model_type(value, "/m/config.json")
    assert str(e.value) == (f"/m/config.json: model_type {value!r} is not supported "
                            "(supported: llama, gemma2, gemma3_text, mistral, olmo2, qwen2, qwen3)")
    with pytest.raises(rl.ModelFormatError, match=r"^f\.gguf: GGUF architecture .* is not "
                                                  r"supported \(supported: llama, gemma2, gemma3, "
                                                  r"olmo2, qwen2, qwen3\)$"):
        arch.for_gguf_architecture(value, "f.gguf")


def test_config_without_model_type_found_by_architectures():
    cfg, _ = config_from_dict({**RAW, "architectures": ["Qwen2ForCausalLM"]}, "x")
    assert cfg["model_type"] == "qwen2" and cfg["attn_qkv_bias"]
    with pytest.raises(rl.ModelFormatError, match="model_type None is not supported"):
        config_from_dict({**RAW, "architectures": ["GPT2LMHeadModel"]}, "x")


def test_mistral_has_no_gguf_architecture_of_its_own():
    """llama.cpp writes Mistral as `llama`; a `mistral` GGUF is refused, not guessed."""
    assert arch.Mistral.gguf_architecture is None
    with pytest.raises(rl.ModelFormatError, match="'mistral'"):
        arch.for_gguf_architecture("mistral", "f.gguf")


def test_a_family_states_only_its_differences():
    assert arch.Qwen3.__mro__[:5] == (arch.Qwen3, arch.Qwen2, arch.Mistral, arch.Llama,
                                      arch.Family)
    for fam in (arch.Mistral, arch.Qwen2, arch.Qwen3):
        own = set(vars(fam))
        assert not own & {"HF_NAMES", "GGUF_NAMES", "GGUF_KEYS", "HF_IGNORED", "GGUF_IGNORED"}
        assert fam.HF_NAMES is arch.Llama.HF_NAMES and fam.GGUF_NAMES is arch.Llama.GGUF_NAMES
    assert (arch.Llama.gguf_permuted_qk, arch.Qwen2.gguf_permuted_qk,
            arch.Qwen3.gguf_permuted_qk) == (True, False, False)


def test_register_refuses_a_second_claim():
    class Dup(arch.Qwen3):
        name = "dup"
        hf_model_types = ("dup",)
        hf_architectures = ()
        gguf_architecture = "qwen3"  # already Qwen3's
    with pytest.raises(ValueError, match="'qwen3' is claimed by qwen3 and dup"):
        arch.register(Dup)
    assert "dup" not in arch.BY_MODEL_TYPE

    class NoNorm(arch.Qwen3):
        name = "nonorm"
        hf_model_types = ("nonorm",)
        hf_architectures = ()
        gguf_architecture = None
        GGUF_NAMES = {k: v for k, v in arch.Qwen3.GGUF_NAMES.items() if k != "q_norm"}
    with pytest.raises(ValueError, match="nonorm.GGUF_NAMES names no q_norm"):
        arch.register(NoNorm)
    assert "nonorm" not in arch.BY_MODEL_TYPE


# ------------------------------------------------------------------ HF config mapping


@pytest.mark.parametrize("model_type,extra,want", [
    ("llama", {}, (False, False, False, False)),
    ("llama", {"attention_bias": True}, (True, True, False, False)),
    ("llama", {"mlp_bias": True}, (False, False, True, False)),
    ("mistral", {"attention_bias": True, "mlp_bias": True}, (False, False, False, False)),
    ("qwen2", {}, (True, False, False, False)),
    ("qwen2", {"attention_bias": False, "mlp_bias": True}, (True, False, False, False)),
    ("qwen3", {}, (False, False, False, True)),
    ("qwen3", {"attention_bias": True}, (True, True, False, True)),
])
def test_hf_flags(model_type, extra, want):
    cfg, eng = config_from_dict({**RAW, "model_type": model_type, **extra}, "x")
    assert tuple(cfg[f] for f in arch.FLAGS) == want
    assert tuple(eng[f] for f in arch.FLAGS) == tuple(int(w) for w in want)
    assert cfg["model_type"] == model_type


@pytest.mark.parametrize("model_type,extra,want", [
    ("llama", {}, None), ("mistral", {"sliding_window": 4096}, 4096),
    ("llama", {"sliding_window": 8}, None),       # HF's Llama attention ignores the key
    ("mistral", {"sliding_window": None}, None),
    ("qwen2", {"sliding_window": 4096}, None),
    ("qwen2", {"sliding_window": 4096, "use_sliding_window": True}, 4096),
    ("qwen3", {"sliding_window": 64, "use_sliding_window": True,
               "layer_types": ["full_attention", "sliding_attention"]}, 64),
])
def test_sliding_window_rules(model_type, extra, want):
    cfg, eng = config_from_dict({**RAW, "model_type": model_type, **extra}, "x")
    assert cfg["sliding_window"] == want
    assert eng.get("sliding_window", None) == want
    if want is not None:   # the layers it applies to: all (mistral) or layer_types (qwen)
        want_layers = [True, True] if model_type == "mistral" else [
            t == "sliding_attention" for t in extra.get("layer_types", ["full_attention"] * 2)]
        assert eng["layer_sliding"] == want_layers


def test_sliding_layers_without_a_window_are_refused():
    """As Qwen2Config drops the window without use_sliding_window, HF cannot run
    a layer_types naming sliding layers then; neither do we (clearly)."""
    with pytest.raises(rl.ModelFormatError, match="names sliding_attention layers but no "
                                                  "sliding_window applies"):
        config_from_dict({**RAW, "model_type": "qwen3", "sliding_window": 64,
                          "layer_types": ["full_attention", "sliding_attention"]}, "x")


# ------------------------------------------------------------------ name tables


def _all_flag_configs():
    for values in itertools.product((False, True), repeat=len(arch.FLAGS)):
        yield public(**dict(zip(arch.FLAGS, values)))


@pytest.mark.parametrize("fam", [arch.Llama, arch.Mistral, arch.Qwen2, arch.Qwen3],
                         ids=lambda f: f.name)
def test_names_cover_every_layout_kind_and_round_trip(fam):
    kinds = set()
    for cfg in _all_flag_configs():
        layout = tensor_layout(cfg, cfg["num_layers"])
        hf = [fam.hf_name(k, i) for k, i, _ in layout if k not in fam.COMPUTED]
        gg = [fam.gguf_name(k, i) for k, i, _ in layout if k not in fam.COMPUTED]
        assert len(set(hf)) == len(hf) and len(set(gg)) == len(gg)
        for kind, layer, _ in layout:
            kinds.add(kind)
            if kind in fam.COMPUTED:
                continue
            assert fam.hf_kind(fam.hf_name(kind, layer)) == (kind, layer)
            assert fam.hf_kind(fam.hf_name(kind, layer).removeprefix("model.")) == (kind, layer)
            assert fam.gguf_kind(fam.gguf_name(kind, layer)) == (kind, layer)
            assert not fam.hf_ignored(fam.hf_name(kind, layer))
            assert not fam.gguf_ignored(fam.gguf_name(kind, layer))
    assert kinds - fam.COMPUTED == set(fam.HF_NAMES) == set(fam.GGUF_NAMES)
    for name in ("model.layers.01.mlp.up_proj.weight", "model.layers.x.mlp.up_proj.weight",
                 "model.layers.1.mlp.extra.weight", "blk.1.attn_q.weight"):
        assert fam.hf_kind(name) is None
    assert fam.gguf_kind("model.layers.1.mlp.up_proj.weight") is None
    assert fam.hf_ignored("lm_head.weight") and fam.hf_ignored(
        "model.layers.3.self_attn.rotary_emb.inv_freq")
    assert fam.gguf_ignored("output.weight") and not fam.gguf_ignored("output_norm.weight")


@pytest.mark.parametrize("tiny", ["llama", "llama3_rope", "llama_bias", "mistral", "qwen2",
                                  "qwen3"])
def test_hf_names_are_exactly_a_real_checkpoints(tiny_model_dir, tiny):
    """What a complete checkpoint holds (tensor_layout at max_layer = L, named
    by the family) is the HF model's state dict, ignored tensors aside."""
    d = tiny_model_dir(tiny)
    cfg = read_config(d)
    fam = arch.for_model_type(cfg["model_type"], "x")
    want = {fam.hf_name(k, i) for k, i, _ in tensor_layout(cfg, cfg["num_layers"])
            if k not in fam.COMPUTED}
    have = {n for n in read_checkpoint_headers(str(d)) if not fam.hf_ignored(n)}
    assert have == want


@pytest.mark.parametrize("fam", [arch.Llama, arch.Qwen2, arch.Qwen3], ids=lambda f: f.name)
def test_gguf_names_agree_with_gguf_py(fam):
    """llama.cpp's own HF -> GGUF tensor name map (gguf-py) gives our names."""
    gguf = pytest.importorskip("gguf")
    cfg = public(**fam.GGUF_FLAGS)
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, fam.gguf_architecture.upper()),
                                    cfg["num_layers"])
    layout = [(k, i) for k, i, _ in tensor_layout(cfg, cfg["num_layers"])
              if k not in fam.COMPUTED]
    assert layout
    for kind, layer in layout:
        theirs = tmap.get_name(fam.hf_name(kind, layer), try_suffixes=(".weight", ".bias"))
        assert theirs == fam.gguf_name(kind, layer), (kind, layer)
    assert tmap.get_name("lm_head.weight", try_suffixes=(".weight",)) == fam.GGUF_LM_HEAD


# ------------------------------------------------------------------ a family added at run time


class Toy(arch.Qwen3):
    """Qwen3 with its q projection under another HF name: the loaders must
    follow the table, with no change of theirs."""
    name = "toy"
    hf_model_types = ("toy",)
    hf_architectures = ("ToyForCausalLM",)
    gguf_architecture = "toy"
    HF_NAMES = {**arch.Qwen3.HF_NAMES, "q": "model.layers.{layer}.self_attn.wq.weight"}


@pytest.fixture()
def toy_family():
    arch.register(Toy)
    yield Toy
    arch.unregister(Toy)


def test_family_registered_at_run_time_loads(toy_family, tiny_model_dir, tmp_path):
    from safetensors.numpy import load_file, save_file
    src = tiny_model_dir("qwen3")
    d = tmp_path / "toy"
    d.mkdir()
    raw = json.loads((src / "config.json").read_text())
    raw.update(model_type="toy", architectures=["ToyForCausalLM"])
    (d / "config.json").write_text(json.dumps(raw))
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    save_file({n.replace("self_attn.q_proj.", "self_attn.wq."): a for n, a in tensors.items()},
              d / "model.safetensors")
    src_cfg = read_config(d)
    assert src_cfg["model_type"] == "toy" and src_cfg["qk_norm"] and src_cfg["head_dim"] == 32
    ids = np.arange(3, 50, dtype=np.int32)
    np.testing.assert_array_equal(rl.Model(d, device="cpu").hidden_states(ids),
                                  rl.Model(src, device="cpu").hidden_states(ids))
    # the old name is now unknown to this family: reported, with the missing one
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(rl.ModelFormatError) as e:
        open_checkpoint(d)
    msg = str(e.value)
    assert "missing tensors: model.layers.0.self_attn.wq.weight" in msg
    assert "unexpected tensors: model.layers.0.self_attn.q_proj.weight" in msg


# ------------------------------------------------------------------ open_checkpoint / read_config


def test_open_checkpoint_and_read_config_errors(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        open_checkpoint(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_config(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="no_dir"):
        open_checkpoint(tmp_path / "no_dir")
    with pytest.raises(FileNotFoundError, match="no_dir"):
        read_config(tmp_path / "no_dir")
    (tmp_path / "file").write_text("x")
    with pytest.raises(rl.ModelFormatError, match="not a model directory"):
        open_checkpoint(tmp_path / "file")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(10))
    with pytest.raises(rl.ModelFormatError, match="bad.gguf"):
        read_config(tmp_path / "bad.gguf")
    src = open_checkpoint(tiny_model_dir("qwen2"), max_layer=-2)
    assert src.engine_config["max_layer"] == 2 and src.config == read_config(tiny_model_dir("qwen2"))
    src.close()
