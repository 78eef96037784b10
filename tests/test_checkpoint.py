"""Checkpoint loading: config mapping, RoPE frequencies, safetensors validation
and tensor-name checks. Every malformed input must raise ModelFormatError (or
FileNotFoundError for a missing path) with a message naming the problem."""
from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent.checkpoints.checkpoint import load_hf, load_hf_config, read_safetensors_header, rope_inv_freq


# --------------------------------------------------------------------------
# helpers: hand-written safetensors files


def st_bytes(entries: list[tuple[str, str, list[int], int, int]], data: bytes,
             extra: dict | None = None) -> bytes:
    """A safetensors file from explicit (name, dtype, shape, begin, end) entries."""
    header = {name: {"dtype": dt, "shape": shape, "data_offsets": [b, e]}
              for name, dt, shape, b, e in entries}
    header.update(extra or {})
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def write_st(path, entries, data, extra=None) -> None:
    path.write_bytes(st_bytes(entries, data, extra))


def consolidate(src, dst, rename=None, drop=(), add=None, shape_of=None) -> None:
    """Copies an fp32 tiny model into `dst` as one model.safetensors, with
    tensors renamed / dropped / added / reshaped on the way."""
    from safetensors.numpy import load_file, save_file
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    out = {}
    for name, arr in tensors.items():
        if name in drop:
            continue
        if shape_of and name in shape_of:
            arr = np.zeros(shape_of[name], arr.dtype)
        out[(rename or (lambda n: n))(name)] = arr
    out.update(add or {})
    save_file(out, dst / "model.safetensors")


@pytest.fixture()
def llama_dir(tiny_model_dir):
    return tiny_model_dir("llama")


# --------------------------------------------------------------------------
# config.json


def test_config_mapping_all_archs(tiny_model_dir):
    want = {"llama": (16, False, False, False), "qwen2": (16, True, False, False),
            "qwen3": (32, False, False, True), "llama_bias": (16, True, True, False)}
    for arch, (hd, qkv_b, o_b, qkn) in want.items():
        pub, eng = load_hf_config(tiny_model_dir(arch))
        assert (pub["head_dim"], pub["attn_qkv_bias"], pub["attn_o_bias"], pub["qk_norm"]) == \
            (hd, qkv_b, o_b, qkn), arch
        assert eng["max_layer"] == eng["num_layers"] == pub["num_layers"] == 3
        assert (pub["num_heads"], pub["num_kv_heads"], pub["vocab_size"]) == (4, 2, 320)
    assert load_hf_config(tiny_model_dir("llama_bias"))[0]["mlp_bias"] is True


@pytest.mark.parametrize("arch", ["llama", "llama3_rope", "qwen3"])
def test_rope_inv_freq_matches_hf_buffer(tiny_model_dir, arch):
    from conftest import _hf_model
    ref = _hf_model(str(tiny_model_dir(arch))).model.rotary_emb.inv_freq.numpy()
    ours = rope_inv_freq(load_hf_config(tiny_model_dir(arch))[0])
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1.2e-7, atol=0)  # at most one float32 ulp


def test_rope_llama3_real_shape_and_old_style_fields():
    """Llama-3.1-8B's rope settings, written the transformers<5 way."""
    import torch
    import transformers as T
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf = T.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                       rope_scaling=dict(scaling), max_position_embeddings=131072)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    ref = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))[0].numpy()
    raw = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 131072,
           "rope_scaling": {**scaling, "type": "llama3"}}
    from rjepa_latent.checkpoints.checkpoint import config_from_dict
    pub, _ = config_from_dict(raw, "x")
    np.testing.assert_allclose(rope_inv_freq(pub), ref, rtol=1.2e-7, atol=0)


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_missing_config_field(llama_dir, tmp_path):
    d = _edit_config(llama_dir, tmp_path / "m", hidden_size=None)
    with pytest.raises(rl.ModelFormatError, match=r"config\.json.*'hidden_size' is missing"):
        rl.Model(d, device="cpu")


def test_unsupported_architecture(llama_dir, tmp_path):
    d = _edit_config(llama_dir, tmp_path / "m", model_type="gpt2")
    with pytest.raises(rl.ModelFormatError, match=r"'gpt2' is not supported.*llama, gemma2, "
                                                  r"gemma3_text, mistral, olmo2, qwen2, qwen3"):
        rl.Model(d, device="cpu")


@pytest.mark.parametrize("kind", ["yarn", "linear", "dynamic", "longrope"])
def test_unsupported_rope_scaling(llama_dir, tmp_path, kind):
    d = _edit_config(llama_dir, tmp_path / "m", rope_parameters={
        "rope_type": kind, "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(rl.ModelFormatError, match=f"rope scaling type '{kind}'"):
        load_hf(d)


def test_bad_config_values(llama_dir, tmp_path):
    d = _edit_config(llama_dir, tmp_path / "a", num_key_value_heads=3)
    with pytest.raises(rl.ModelFormatError, match="not a multiple of num_key_value_heads=3"):
        load_hf(d)
    d = _edit_config(llama_dir, tmp_path / "b", hidden_act="gelu")
    with pytest.raises(rl.ModelFormatError, match="hidden_act 'gelu'"):
        load_hf(d)
    d = _edit_config(llama_dir, tmp_path / "c", num_hidden_layers=-1)
    with pytest.raises(rl.ModelFormatError, match="num_hidden_layers"):
        load_hf(d)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{not json")
    with pytest.raises(rl.ModelFormatError, match="not valid JSON"):
        load_hf(tmp_path / "d")


def test_sliding_window_recorded(tiny_model_dir, tmp_path):
    d = _edit_config(tiny_model_dir("mistral"), tmp_path / "m", sliding_window=16)
    assert load_hf_config(d)[0]["sliding_window"] == 16
    d = _edit_config(tiny_model_dir("qwen2"), tmp_path / "q", use_sliding_window=True,
                     sliding_window=32)
    assert load_hf_config(d)[0]["sliding_window"] == 32
    d = _edit_config(tiny_model_dir("qwen2"), tmp_path / "q2", sliding_window=32)
    assert load_hf_config(d)[0]["sliding_window"] is None  # use_sliding_window false


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        rl.Model(tmp_path / "does_not_exist", device="cpu")
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        rl.Model(tmp_path / "nope.gguf", device="cpu")


def test_directory_without_weights(llama_dir, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(llama_dir / "config.json", d)
    with pytest.raises(rl.ModelFormatError, match="no model.safetensors"):
        load_hf(d)


# --------------------------------------------------------------------------
# safetensors file format

GOOD = [("a", "F32", [2, 2], 0, 16), ("b", "BF16", [3], 16, 22)]
GOOD_DATA = bytes(22)


def test_valid_header_parses(tmp_path):
    write_st(tmp_path / "x.safetensors", GOOD, GOOD_DATA, {"__metadata__": {"format": "pt"}})
    infos, meta = read_safetensors_header(str(tmp_path / "x.safetensors"))
    assert meta == {"format": "pt"}
    assert infos["a"].shape == (2, 2) and infos["b"].dtype == "BF16"
    assert infos["b"].end - infos["b"].begin == 6


@pytest.mark.parametrize("case,match", [
    ("truncated", "ends at byte .*truncated"),
    ("tiny", "truncated safetensors file"),
    ("huge_header", "header length 1099511627776 is larger than 100 MB"),
    ("header_past_end", "is larger than the file"),
    ("garbage", "not valid JSON|not UTF-8|not a JSON object"),
    ("not_utf8", "not UTF-8"),
    ("array", "not a JSON object"),
    ("overlap", "'b'.*overlaps"),
    ("hole", "'b'.*hole"),
    ("trailing", "trailing bytes"),
    ("unknown_dtype", "'b'.*unknown dtype 'Q4_K'"),
    ("size_mismatch", "'a'.*needs 16"),
    ("bad_shape", "'a'.*shape"),
    ("bool_shape", "'a'.*shape"),
    ("bad_offsets", "'a'.*data_offsets"),
    ("duplicate", "duplicate key 'a'"),
    ("bad_metadata", "__metadata__"),
    ("entry_not_object", "'a'.*not an object"),
])
def test_bad_safetensors(tmp_path, case, match):
    f = tmp_path / "x.safetensors"
    good = st_bytes(GOOD, GOOD_DATA)
    if case == "truncated":
        f.write_bytes(good[:-3])
    elif case == "tiny":
        f.write_bytes(b"\x05\x00")
    elif case == "huge_header":
        f.write_bytes(struct.pack("<Q", 1 << 40) + good[8:])
    elif case == "header_past_end":
        f.write_bytes(struct.pack("<Q", len(good)) + good[8:])
    elif case == "garbage":
        n = len(good) - 8 - 22
        f.write_bytes(struct.pack("<Q", n) + b"\x7b\x00garbage" + b"#" * (n - 9) + GOOD_DATA)
    elif case == "not_utf8":
        f.write_bytes(struct.pack("<Q", 4) + b"{\xff\xfe}")
    elif case == "array":
        raw = b"[1, 2]"
        f.write_bytes(struct.pack("<Q", len(raw)) + raw)
    elif case == "overlap":
        write_st(f, [("a", "F32", [2, 2], 0, 16), ("b", "BF16", [3], 10, 16)], bytes(16))
    elif case == "hole":
        write_st(f, [("a", "F32", [2, 2], 0, 16), ("b", "BF16", [3], 18, 24)], bytes(24))
    elif case == "trailing":
        f.write_bytes(good + b"xx")
    elif case == "unknown_dtype":
        write_st(f, [("a", "F32", [2, 2], 0, 16), ("b", "Q4_K", [3], 16, 22)], GOOD_DATA)
    elif case == "size_mismatch":
        write_st(f, [("a", "F32", [2, 2], 0, 12), ("b", "BF16", [5], 12, 22)], GOOD_DATA)
    elif case == "bad_shape":
        write_st(f, [("a", "F32", [2, -2], 0, 16), ("b", "BF16", [3], 16, 22)], GOOD_DATA)
    elif case == "bool_shape":
        write_st(f, [("a", "F32", [True, 4], 0, 16), ("b", "BF16", [3], 16, 22)], GOOD_DATA)
    elif case == "bad_offsets":
        write_st(f, [("a", "F32", [2, 2], 16, 0), ("b", "BF16", [3], 16, 22)], GOOD_DATA)
    elif case == "duplicate":
        raw = (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
               b' "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}')
        f.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    elif case == "bad_metadata":
        write_st(f, GOOD, GOOD_DATA, {"__metadata__": {"format": 3}})
    elif case == "entry_not_object":
        write_st(f, GOOD[1:], bytes(6), {"a": [1, 2]})
    with pytest.raises(rl.ModelFormatError, match=match) as e:
        read_safetensors_header(str(f))
    assert "x.safetensors" in str(e.value)


def test_truncated_shard_through_model(llama_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(llama_dir, d)
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(rl.ModelFormatError, match=shard.name + ".*truncated"):
        rl.Model(d, device="cpu")


# --------------------------------------------------------------------------
# tensor names and shapes


def test_single_file_and_prefixless_names(llama_dir, tmp_path):
    consolidate(llama_dir, tmp_path / "m", rename=lambda n: n.removeprefix("model."))
    src = load_hf(tmp_path / "m")
    kinds = {k for k, *_ in src.tensors()}
    src.close()
    assert {"embed", "final_norm", "q", "down", "rope_inv_freq"} <= kinds


def test_wrong_shape(llama_dir, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"
    consolidate(llama_dir, tmp_path / "m", shape_of={name: (16, 64)})
    with pytest.raises(rl.ModelFormatError, match=rf"'{name}'.*shape \[16, 64\], expected "
                                                  r"\[32, 64\]"):
        rl.Model(tmp_path / "m", device="cpu")


def test_missing_and_unexpected_tensors_all_named(llama_dir, tmp_path):
    drop = ("model.layers.0.mlp.up_proj.weight", "model.layers.2.input_layernorm.weight")
    add = {"model.layers.1.mlp.extra.weight": np.zeros(3, np.float32),
           "model.layers.7.mlp.up_proj.weight": np.zeros((128, 64), np.float32),
           "lm_head.weight": np.zeros((320, 64), np.float32)}  # expected, ignored
    consolidate(llama_dir, tmp_path / "m", drop=drop, add=add)
    with pytest.raises(rl.ModelFormatError) as e:
        rl.Model(tmp_path / "m", device="cpu")
    msg = str(e.value)
    for name in drop:
        assert name in msg.split("unexpected tensors:")[0].split("missing tensors:")[1]
    assert "model.layers.1.mlp.extra.weight" in msg and "model.layers.7.mlp.up_proj" in msg
    assert "lm_head" not in msg


def test_unsupported_dtype_of_needed_tensor(llama_dir, tmp_path):
    name = "model.layers.0.post_attention_layernorm.weight"
    consolidate(llama_dir, tmp_path / "m", drop=(name,),
                add={name: np.zeros(64, np.int32), "lm_head.weight": np.zeros(4, np.int64)})
    with pytest.raises(rl.ModelFormatError, match=f"'{name}'.*unsupported dtype I32"):
        load_hf(tmp_path / "m")


def test_tensor_in_two_shards(llama_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(llama_dir, d)
    shards = sorted(d.glob("model-*.safetensors"))
    from safetensors.numpy import load_file, save_file
    first = load_file(shards[0])
    second = load_file(shards[1])
    dup = next(iter(first))
    second[dup] = first[dup]
    save_file(second, shards[1])
    with pytest.raises(rl.ModelFormatError, match=f"'{dup}' is in two shards"):
        load_hf(d)


def test_index_names_missing_shard(llama_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(llama_dir, d)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = "model-99999-of-99999.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(rl.ModelFormatError, match="model-99999-of-99999.safetensors.*not exist"):
        load_hf(d)
    idx["weight_map"]["model.norm.weight"] = "../evil.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(rl.ModelFormatError, match="not a plain file name"):
        load_hf(d)


def test_max_layer_skips_deeper_tensors(tiny_model_dir):
    src = load_hf(tiny_model_dir("qwen3"), max_layer=1)
    feed = list((k, layer) for k, layer, *_ in src.tensors())
    src.close()
    assert ("embed", 0) in feed and ("final_norm", 0) not in feed
    assert {layer for k, layer in feed} == {0}
    assert src.engine_config["max_layer"] == 1
    full = load_hf(tiny_model_dir("qwen3"))
    assert full.fingerprint == src.fingerprint  # same checkpoint
    assert full.fingerprint != load_hf(tiny_model_dir("llama")).fingerprint
