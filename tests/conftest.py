"""Shared fixtures: tiny random HF checkpoints of every supported architecture.

`tiny_model_dir(arch)` (session fixture, a function) returns the directory of
a tiny model created with transformers (random weights, nothing downloaded),
saved as *sharded* safetensors (config.json, model.safetensors.index.json,
model-0000k-of-0000n.safetensors) plus a `tokenizer.json`. Each is built once
per test session. Architectures (`ARCHS`):

  llama         GQA (4 heads, 2 kv heads), tied embeddings
  llama3_rope   rope_scaling llama3 (active at these lengths), untied lm_head
  llama_bias    attention_bias=True (q,k,v,o biases) and mlp_bias=True
  mistral       sliding_window=None
  qwen2         q/k/v biases
  qwen3         head_dim=32 != hidden/heads, per-head q/k RMSNorm
  llama_bf16    `llama` weights stored in bfloat16

All: hidden 64, 3 layers, intermediate 128, vocab 320, max positions 1024.
Weights are re-drawn ~ N(0, 0.2) (norm weights 1 + N(0, 0.2), fixed seed) so
activations are far from zero and a wrong op shows up in every layer.

The tokenizer is `rjepa_latent.testing.tokenizer(300)`: a byte-level BPE of
300 tokens (trained in-process on a few sentences; ids 300..319 of the model
are free for tokens a test adds) whose post-processor prepends "<s>" like
Llama's; offsets work.

`hf_hidden_states(dir, ids)` returns HF's `output_hidden_states` for one
sequence, float32 numpy [L+1, T, hidden], computed in fp32 with eager
attention (the reference of the parity tests).
"""
from __future__ import annotations

import functools
import os
import pathlib
from typing import Callable

import numpy as np
import pytest

ARCHS = ("llama", "llama3_rope", "llama_bias", "mistral", "qwen2", "qwen3", "llama_bf16")
VOCAB = 320
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024,
            rms_norm_eps=1e-5)


def _hf_config(arch: str):
    import transformers as T
    if arch in ("llama", "llama_bf16"):
        return T.LlamaConfig(**BASE, tie_word_embeddings=True, rope_theta=10000.0)
    if arch == "llama3_rope":
        return T.LlamaConfig(**BASE, tie_word_embeddings=False, rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 64})
    if arch == "llama_bias":
        return T.LlamaConfig(**BASE, attention_bias=True, mlp_bias=True)
    if arch == "mistral":
        return T.MistralConfig(**BASE, sliding_window=None)
    if arch == "qwen2":
        return T.Qwen2Config(**BASE, use_sliding_window=False)
    if arch == "qwen3":
        return T.Qwen3Config(**BASE, head_dim=32, use_sliding_window=False)
    raise KeyError(arch)


def _randomize(model, seed: int) -> None:
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1.0 + noise if "norm" in name else noise)


TOKENIZER_VOCAB = 300   # below VOCAB: ids 300..319 are free for tokens a test adds


def make_tokenizer(path: pathlib.Path) -> None:
    """Writes the tiny byte-level BPE tokenizer.json of `rjepa_latent.testing`
    with TOKENIZER_VOCAB tokens (specials <s>=0, prepended to every text, and </s>=1)."""
    from rjepa_latent.testing import tokenizer
    path.write_text(tokenizer(TOKENIZER_VOCAB).to_str(), encoding="utf-8")


def build_tiny_model(arch: str, out: pathlib.Path, shard: str = "100KB") -> pathlib.Path:
    """Creates, randomizes and saves one tiny model (see module docstring)."""
    import torch
    import transformers as T
    torch.manual_seed(0)
    cfg = _hf_config(arch)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomize(model, seed=ARCHS.index(arch) + 1 if arch != "llama_bf16" else 1)
    if arch == "llama_bf16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size=shard)
    make_tokenizer(out / "tokenizer.json")
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[[str], pathlib.Path]:
    """tiny_model_dir(arch) -> directory of that tiny checkpoint (built once)."""
    root = tmp_path_factory.mktemp("tiny_models")

    @functools.lru_cache(maxsize=None)
    def get(arch: str) -> pathlib.Path:
        return build_tiny_model(arch, root / arch)
    return get


def ids_of(length: int, seed: int) -> np.ndarray:
    """`length` random token ids of the tiny vocabulary (fixed seed)."""
    return np.random.default_rng(seed).integers(0, VOCAB, length).astype(np.int64)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Relative error per layer (axis 0): ||ours - ref|| / ||ref||."""
    diff = np.linalg.norm((ours - ref).reshape(len(ref), -1), axis=1)
    return diff / np.linalg.norm(ref.reshape(len(ref), -1), axis=1)


def interrupt_at_shard(monkeypatch, index: int):
    """Make extraction raise KeyboardInterrupt (as Ctrl-C would) when it starts
    computing shard `index`; returns the original method (to undo it)."""
    from rjepa_latent.run import local as rl_local
    compute = rl_local._Runner._compute

    def interrupted(self, shard, bar, t0):
        if shard["index"] == index:
            raise KeyboardInterrupt
        return compute(self, shard, bar, t0)
    monkeypatch.setattr(rl_local._Runner, "_compute", interrupted)
    return compute


@pytest.fixture(scope="module")
def model_of(tiny_model_dir):
    """model_of(arch) -> a CPU rl.Model (2 threads) of that tiny checkpoint,
    loaded once per test module and closed after it."""
    import rjepa_latent as rl
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = rl.Model(tiny_model_dir(arch), device="cpu", threads=2)
        return cache[arch]
    yield get
    for m in cache.values():
        m.close()


@functools.lru_cache(maxsize=None)
def _hf_model(directory: str):
    import torch
    import transformers as T
    model = T.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                   attn_implementation="eager")
    return model.eval()


def hf_hidden_states(directory: str | os.PathLike, ids) -> np.ndarray:
    """HF fp32 reference: float32 [L+1, T, hidden] for one sequence."""
    import torch
    model = _hf_model(os.fspath(directory))
    with torch.inference_mode():
        out = model.model(torch.as_tensor(np.asarray(ids, np.int64))[None],
                          output_hidden_states=True)
    return torch.stack(out.hidden_states)[:, 0].float().numpy()


@pytest.fixture(scope="session")
def hf_states() -> Callable:
    """The `hf_hidden_states` function, as a fixture for tests in other files."""
    return hf_hidden_states


_LOAD_RSS_SCRIPT = """
import json, sys
import rjepa_latent as rl

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
base = status("VmRSS:")
m = rl.Model(sys.argv[1], device="cpu", max_batch_tokens=16, weights=sys.argv[2])
print(json.dumps({"base": base, "peak": status("VmHWM:"), "after": status("VmRSS:"),
                  "weight_bytes": m.memory_report()["weight_bytes"]}))
"""


def load_rss(path, weights: str) -> dict:
    """Load `path` with `weights` ("keep" / "dequantize") in a fresh process:
    its RSS before the load ("base"), the peak ("peak"), after ("after") and the
    engine's weight bytes."""
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _LOAD_RSS_SCRIPT, str(path), weights],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])
