"""Tiny random checkpoints of every registered family, written without torch.

`tiny_model` writes an HF directory (config.json, model.safetensors,
tokenizer.json) or a GGUF file (the tokenizer in its metadata, as llama.cpp's
converter lays it out) from NumPy alone. Which tensors a family has, their
names and their shapes come from the architecture registry and the C core's
tensor layout, the same tables the loaders read, so a family added to the
registry gets tiny models without a change here. The same arguments give the
same bytes: weights come from `numpy.random.default_rng(seed)`, the BPE
tokenizer is trained on a fixed text, JSON is written with sorted keys.

Weights: every matrix and bias ~ N(0, 0.2); norm weights 1 + N(0, 0.2)
(families whose HF norms multiply by (1 + w), Gemma, draw w ~ N(0, 0.2)), so
activations stay far from zero and each layer changes the states.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = ("hf", "gguf")
DTYPES = ("float32", "float16", "bfloat16")
# also accepted for format="gguf": one GGML type for every matrix, or a mix
GGUF_QUANTIZED = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                  "IQ4_NL", "IQ4_XS", "Q4_K_M")
# types gguf-py quantizes from the float weights; the others are random valid blocks
_GGUF_QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# exactly representable in float32: the GGUF file (float32 metadata) and
# config.json then state the same epsilon, and both loaders agree bitwise
RMS_NORM_EPS = 2.0 ** -17
MAX_POSITIONS = 1024
SLIDING_WINDOW = 32            # the window of families that always have one (Gemma)
DEFAULT_VOCAB = 320
MERGED_VOCAB = 300   # at most this many tokens are learnt (specials, bytes, merges)
SPECIAL_TOKENS = ("<s>", "</s>")   # ids 0 (BOS, prepended to every text) and 1 (EOS)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
WEIGHT_STD = 0.2

_CORPUS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "Step 1: In May she sold 48 / 2 = 24 clips. Step 2: In total she sold 48 + 24 = 72 clips.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "The answer is 10. #### 10",
)


def _family(name: str):
    from rjepa_latent.checkpoints import arch
    for fam in arch.FAMILIES:   # by name, HF model_type or GGUF architecture ("gemma3")
        if name in (fam.name, *fam.hf_model_types, fam.gguf_architecture or fam.name):
            return fam
    raise ValueError(f"family must be one of {', '.join(f.name for f in arch.FAMILIES)}; "
                     f"got {name!r}")


def families() -> tuple[str, ...]:
    """The names `tiny_model(family=...)` accepts: every registered family."""
    from rjepa_latent.checkpoints import arch
    return tuple(f.name for f in arch.FAMILIES)


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


# ------------------------------------------------------------------ config.json

def hf_config(family: str = "qwen3", *, hidden: int = 64, layers: int = 2, heads: int = 4,
              kv_heads: int = 2, vocab: int = DEFAULT_VOCAB, dtype: str = "float32") -> dict:
    """The config.json dict of a tiny model of `family`, stating every field
    that HF's config class of the family and our loader read."""
    from rjepa_latent.checkpoints import arch
    fam = _family(family)
    hidden = _check_int("hidden", hidden, 2)
    layers = _check_int("layers", layers, 1)
    heads = _check_int("heads", heads, 1)
    kv_heads = _check_int("kv_heads", kv_heads, 1)
    vocab = _check_int("vocab", vocab, MIN_VOCAB)
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(f"hidden={hidden} must be heads={heads} times an even head size")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
    head_dim = hidden // heads
    raw: dict[str, Any] = {
        "architectures": [fam.hf_architectures[0]], "model_type": fam.hf_model_types[0],
        "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "vocab_size": vocab, "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": RMS_NORM_EPS, "tie_word_embeddings": True, "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
        "bos_token_id": 0, "eos_token_id": 1, "use_cache": True, "dtype": dtype,
        "rope_theta": fam.ROPE_THETA,
        "rope_parameters": {"rope_type": "default", "rope_theta": fam.ROPE_THETA},
    }
    if issubclass(fam, arch.Llama) and not issubclass(fam, (arch.Mistral, arch.Gemma2, arch.Olmo2)):
        raw["mlp_bias"] = False
    if issubclass(fam, arch.Mistral):
        raw["sliding_window"] = None       # full attention (HF's Mistral default is a window)
    if issubclass(fam, arch.Qwen2):
        raw["use_sliding_window"] = False
        raw["max_window_layers"] = layers
    if issubclass(fam, arch.Gemma2):
        del raw["hidden_act"]
        raw.update({
            "hidden_activation": "gelu_pytorch_tanh",
            # GGUF stores no query_pre_attn_scalar (llama.cpp scales by head_dim**-0.5):
            # stating head_dim makes both formats of one model the same network
            "query_pre_attn_scalar": head_dim, "sliding_window": SLIDING_WINDOW,
            "layer_types": fam.periodic_layer_types(layers, fam.SLIDING_PATTERN),
            "attn_logit_softcapping": None if issubclass(fam, arch.Gemma3) else 50.0,
            "final_logit_softcapping": None if issubclass(fam, arch.Gemma3) else 30.0,
        })
    if issubclass(fam, arch.Gemma3):
        del raw["rope_theta"]
        raw["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": fam.ROPE_THETA},
            "sliding_attention": {"rope_type": "default", "rope_theta": fam.LOCAL_THETA}}
    return raw


# ------------------------------------------------------------------ tokenizer

def tokenizer(vocab: int = DEFAULT_VOCAB):
    """The tiny byte-level BPE `tokenizers.Tokenizer` of exactly `vocab`
    tokens: <s> (0, prepended to every text) and </s> (1), the 256 byte
    symbols, merges learnt from a fixed text (up to MERGED_VOCAB tokens in
    all), then special tokens <|0|>, <|1|>, ... up to `vocab`. Deterministic."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, \
        trainers
    vocab = _check_int("vocab", vocab, MIN_VOCAB)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, MERGED_VOCAB),
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(_CORPUS) * 4, trainer)
    extra = vocab - tok.get_vocab_size()
    if extra > 0:
        tok.add_special_tokens([AddedToken(f"<|{i}|>", special=True, normalized=False)
                                for i in range(extra)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKENS[0]} $A", pair=f"{SPECIAL_TOKENS[0]} $A $B",
        special_tokens=[(SPECIAL_TOKENS[0], 0)])
    if tok.get_vocab_size() != vocab:   # never silently a model whose ids exceed its embedding
        raise RuntimeError(f"the tiny tokenizer has {tok.get_vocab_size()} tokens, not {vocab}")
    return tok


def _gguf_vocab(tok) -> tuple[list[str], list[str], list[int]]:
    """(tokens in id order, merges "a b", llama.cpp token types) of `tokenizer()`."""
    spec = json.loads(tok.to_str())
    vocab = dict(spec["model"]["vocab"])
    special = set()
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
        special.add(added["content"])
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    return tokens, merges, [3 if t in special else 1 for t in tokens]   # 3: control, 1: normal


# ------------------------------------------------------------------ weights

def _weights(public: dict, seed: int) -> list[tuple[str, int, np.ndarray]]:
    """[(engine kind, layer, float32 array in HF order)] of every stored tensor."""
    from rjepa_latent.checkpoints import checkpoint
    fam = checkpoint.family_of(public)
    rng = np.random.default_rng(seed)
    norm_mean = 0.0 if public.get("norm_offset") else 1.0
    out = []
    for kind, layer, shape in checkpoint.tensor_layout(public, public["num_layers"]):
        if kind in fam.COMPUTED:
            continue
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(WEIGHT_STD)
        if kind.endswith("norm"):
            w += np.float32(norm_mean)
        out.append((kind, layer, w))
    return out


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A safetensors file as HF writes one (names sorted, metadata format "pt")."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    names = sorted(tensors)
    for name in names:
        st_dtype, arr = tensors[name]
        header[name] = {"dtype": st_dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in names:
            f.write(np.ascontiguousarray(tensors[name][1]).tobytes())


def _as_hf_dtype(w: np.ndarray, dtype: str) -> tuple[str, np.ndarray]:
    if dtype == "float32":
        return "F32", w
    if dtype == "float16":
        return "F16", w.astype(np.float16)
    from rjepa_latent.store.files import bf16_from_f32
    return "BF16", bf16_from_f32(w)


def _write_hf(out: Path, raw: dict, public: dict, seed: int, dtype: str) -> Path:
    from rjepa_latent.checkpoints import checkpoint
    fam = checkpoint.family_of(public)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {fam.hf_name(kind, layer): _as_hf_dtype(w, dtype)
               for kind, layer, w in _weights(public, seed)}
    _write_safetensors(out / "model.safetensors", tensors)
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    (out / "tokenizer.json").write_text(tokenizer(public["vocab_size"]).to_str(pretty=True))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1],
        "model_max_length": MAX_POSITIONS, "tokenizer_class": "PreTrainedTokenizerFast",
    }, indent=2, sort_keys=True) + "\n")
    return out


def _gguf_family(fam):
    """The registry unit whose GGUF architecture stores `fam` (llama.cpp writes
    Mistral as `llama`): the nearest ancestor with a GGUF architecture."""
    for cls in fam.__mro__:
        if getattr(cls, "gguf_architecture", None):
            return cls
    raise ValueError(f"family {fam.name!r} has no GGUF architecture; use format='hf'")


def _write_gguf(path: Path, public: dict, seed: int, dtype: str) -> Path:
    import gguf
    from rjepa_latent.checkpoints import arch, checkpoint
    fam = _gguf_family(checkpoint.family_of(public))
    flags = {flag: public[flag] for flag in arch.FLAGS}
    if any(flags[f] != fam.GGUF_FLAGS[f] for f in arch.FLAGS):
        raise ValueError(f"a {public['model_type']} model with {flags} cannot be stored as GGUF "
                         f"architecture {fam.gguf_architecture!r} ({fam.GGUF_FLAGS})")
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), fam.gguf_architecture)
    prefix = fam.gguf_architecture + "."
    ints = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
            "head_dim", "max_position_embeddings", "vocab_size", "sliding_window")
    values = {**public, "value_dim": public["head_dim"], "rope_dim": public["head_dim"]}
    for field, key in fam.GGUF_KEYS.items():
        value = values.get(field)
        if value is None or field.startswith("rope_scaling"):
            continue
        if field in ints or field in ("value_dim", "rope_dim"):
            w.add_uint32(prefix + key, int(value))
        else:
            w.add_float32(prefix + key, float(value))
    if public.get("attn_softcap") is not None:
        w.add_float32(prefix + "attn_logit_softcapping", float(public["attn_softcap"]))
    if public.get("rope_local_theta") is not None:
        w.add_float32(prefix + "rope.freq_base_swa", float(public["rope_local_theta"]))
    tokens, merges, types = _gguf_vocab(tokenizer(public["vocab_size"]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    heads = {"q": public["num_heads"], "k": public["num_kv_heads"],
             "q_bias": public["num_heads"], "k_bias": public["num_kv_heads"]}
    shifted = bool(public.get("norm_offset"))
    for index, (kind, layer, arr) in enumerate(_weights(public, seed)):
        if shifted and kind.endswith("norm"):
            arr = arr + np.float32(1.0)   # llama.cpp's converter stores Gemma's (1 + w)
        if fam.gguf_permuted_qk and kind in heads:
            n = heads[kind]   # llama.cpp interleaves q/k rows within each head
            arr = arr.reshape(n, 2, arr.shape[0] // n // 2, *arr.shape[1:]).swapaxes(1, 2) \
                .reshape(arr.shape)
        arr = np.ascontiguousarray(arr)
        name = fam.gguf_name(kind, layer)
        if arr.ndim == 1 or dtype == "float32":
            w.add_tensor(name, arr)
        elif dtype == "float16":
            w.add_tensor(name, arr.astype(np.float16))
        elif dtype in ("bfloat16",) + _GGUF_QUANTIZABLE:
            qtype = getattr(gguf.GGMLQuantizationType, "BF16" if dtype == "bfloat16" else dtype)
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            from .gguf_blocks import random_blocks
            type_name = _mixed_type(kind, layer) if dtype == "Q4_K_M" else dtype
            blocks = random_blocks(type_name, arr.shape[0], arr.shape[1],
                                   np.random.default_rng([seed, index]), amplitude=0.25)
            w.add_tensor(name, blocks, raw_shape=blocks.shape,
                         raw_dtype=gguf.GGMLQuantizationType[type_name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _mixed_type(kind: str, layer: int) -> str:
    """Q4_K_M-like: Q6_K for v and down of every other layer, Q4_K elsewhere."""
    return "Q6_K" if kind in ("v", "down") and layer % 2 == 0 else "Q4_K"


def tiny_model(path: str | os.PathLike | None = None, *, family: str = "qwen3", hidden: int = 64,
               layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int | None = None,
               seed: int = 0, format: str = "hf", dtype: str = "float32") -> Path:
    """Write a tiny random checkpoint of `family` (any registered family:
    `families()`) and return the path `rjepa_latent.Model` takes.

    format "hf": a directory (`path`, created if needed; default a new
    temporary directory) with config.json, model.safetensors (weights in
    `dtype`: float32, float16 or bfloat16), tokenizer.json and
    tokenizer_config.json; HF transformers loads it too. format "gguf": a GGUF
    file with the tokenizer in its metadata (`path` ending in .gguf, or a
    directory that gets model.gguf; matrices in `dtype`, or a GGML type of
    GGUF_QUANTIZED: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 quantize the random float
    weights, the K-quants and IQ4 types are random valid blocks (see
    `gguf_blocks`; their rows need a multiple of 256 values (32 for IQ4_NL),
    so `hidden` 256 or more), "Q4_K_M" mixes Q4_K and Q6_K as llama.cpp's
    preset does; norms float32). Mistral is written as llama.cpp writes it, as
    architecture `llama`.

    hidden/heads is the head size (even); intermediate size 2 * hidden;
    `vocab` (default 320, at least 258) is also the tokenizer's size; tied
    embeddings; context 1024 tokens; Gemma's sliding window is 32 tokens.
    The same arguments always give the same bytes."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    allowed = DTYPES + (GGUF_QUANTIZED if format == "gguf" else ())
    if dtype not in allowed:
        raise ValueError(f"dtype must be one of {', '.join(allowed)} for format {format!r}; "
                         f"got {dtype!r}")
    seed = _check_int("seed", seed, 0)
    raw = hf_config(family, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                    vocab=DEFAULT_VOCAB if vocab is None else vocab,
                    dtype=dtype if format == "hf" else "float32")
    from rjepa_latent.checkpoints import checkpoint
    public, _ = checkpoint.config_from_dict(raw, f"tiny {family} config")
    if path is None:
        path = tempfile.mkdtemp(prefix=f"rjepa-tiny-{public['model_type']}-")
    out = Path(path)
    if out.exists() and not out.is_dir() and format == "hf":
        raise FileExistsError(f"{out} exists and is not a directory (format 'hf' writes a directory)")
    if format == "hf":
        return _write_hf(out, raw, public, seed, dtype)
    if out.suffix != ".gguf":
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{out} exists and is neither a directory nor a .gguf file")
        out = out / "model.gguf"
    return _write_gguf(out, public, seed, dtype)
