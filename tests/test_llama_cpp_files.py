"""The GGUF files the benchmarks give llama.cpp hold the same model: a copy
dequantized to F32 and/or cut to the first layers, a vocabulary padded to a
model's size, and an HF Llama written in llama.cpp's layout, each loaded by
this engine against the source (llama.cpp itself is not needed here)."""
import os
import sys

import numpy as np
import pytest

import rjepa_latent as rl
from rjepa_latent.checkpoints.default_model import default_model_path

sys.path.insert(0, os.path.dirname(__file__))
import peer_llama_cpp as llama_cpp  # noqa: E402

TEXTS = ["Tom has 3 apples.\nHe eats one.\nHow many are left?", "2 + 2 = 4\n4 * 3 = 12"]


def _run(model, layer):
    ids = [np.array(model.tokenizer.encode(t).ids, np.int32) for t in TEXTS]
    spans = [np.array([[0, len(i)]], np.int32) for i in ids]
    return ids, model.extract(ids, spans, layers=(layer,))


@pytest.mark.parametrize("f32", [True, False])
def test_rewrite_keeps_the_model(tmp_path, f32):
    src = rl.Model(default_model_path(), device="cpu", threads=1)
    dst = llama_cpp.rewrite_gguf(default_model_path(), tmp_path / "cut.gguf", f32=f32, layers=3)
    cut = rl.Model(str(dst), device="cpu", threads=1)
    assert cut.config["num_layers"] == 3
    # layer 2, not the cut model's last (HF-style last hidden states are normed)
    ids_a, a = _run(src, 2)
    ids_b, b = _run(cut, 2)
    assert all(np.array_equal(x, y) for x, y in zip(ids_a, ids_b))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))   # the engine dequantizes as gguf-py
    with pytest.raises(ValueError, match="cannot keep 31"):
        llama_cpp.rewrite_gguf(default_model_path(), tmp_path / "x.gguf", f32=f32, layers=31)


def test_padded_vocab(tmp_path):
    import gguf
    fields = llama_cpp.padded_vocab(default_model_path(), 50000)
    tokens = fields["tokenizer.ggml.tokens"][0]
    assert len(tokens) == len(fields["tokenizer.ggml.token_type"][0]) == 50000
    assert fields["tokenizer.ggml.token_type"][0][-1] == gguf.TokenType.UNUSED
    with pytest.raises(ValueError, match="more than the model's vocabulary"):
        llama_cpp.padded_vocab(default_model_path(), 1000)


def test_hf_llama_as_llama_cpp_gguf(tmp_path):
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("transformers")
    import bench_cpu
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32, vocab_size=49200, num_hidden_layers=3,
                        rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
                        tie_word_embeddings=True)
    model = T.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    rl.Model(default_model_path(), device="cpu", threads=1).tokenizer.save(
        str(tmp_path / "tokenizer.json"))
    bench_cpu.write_llama_gguf(model, str(tmp_path / "m.gguf"), 3)
    hf = rl.Model(str(tmp_path), device="cpu", threads=1)
    gg = rl.Model(str(tmp_path / "m.gguf"), device="cpu", threads=1)
    ids_a, a = _run(hf, -2)
    ids_b, b = _run(gg, -2)
    assert all(np.array_equal(x, y) for x, y in zip(ids_a, ids_b))   # same tokenizer
    assert all(np.array_equal(x, y) for x, y in zip(a, b))           # q/k permuted as llama.cpp's
