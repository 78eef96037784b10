"""Whole-model parity of the CUDA engine with HF transformers on the GPU for
the Gemma-2, Gemma-3 and OLMo-2 families (marked `gpu`; skipped cleanly
without a CUDA device). The CPU engine's parity for them is in
tests/test_arch_<family>.py; this is the same check for the CUDA kernels of
their features, with the rules of tests/test_gpu_model.py:

- bf16: per hidden-state index, ||ours - ref|| / ||ref|| to HF fp32 (eager,
  TF32 off, same GPU) at most SLACK times HF bf16's own error to it; with the
  tensor-core attention (default) and with RJEPA_ATTN=fma;
- fp32 mode (dtype="float32"): within FP32_REL of HF fp32 on every layer.

Models: tiny random checkpoints with every feature of the family active
(Gemma-2: (1 + w) norms, sqrt(d) embedding scale, GeGLU, pre+post norms,
query_pre_attn_scalar != head_dim, a soft-cap that binds, a window on every
other layer; Gemma-3: per-head q/k norm with (1 + w), a local RoPE base on
sliding layers; OLMo-2: post-norms only, q/k norm over the whole projection),
at head_dim 16 and at the families' real head dims (256 Gemma-2, 128 Gemma-3
and OLMo-2), with windows shorter than the longest texts and crossing the
attention kernels' key tiles.

On the emulated device of a RJEPA_CUDA=emu test build, HF runs on the CPU as the
reference (fp32 and bf16, eager) on shorter texts (1 to 129 tokens: still past
every window and across the 64-row tiles).
"""
from __future__ import annotations

import functools
import pathlib

import numpy as np
import pytest

from conftest import make_tokenizer
from test_gpu_model import FP32_REL, SLACK, _rel_per_layer, _require_gpu, _seqs, set_attention, sizes
from test_gpu_model import _hf_states as _hf_states_with

pytestmark = pytest.mark.gpu

LENS = sizes([1, 9, 17, 63, 64, 65, 150, 300], [1, 9, 63, 64, 65, 129])


def _config(name: str):
    import transformers as T
    common = dict(vocab_size=320, max_position_embeddings=2048, rms_norm_eps=1e-6)
    if name == "gemma2":
        return T.Gemma2Config(**common, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                              sliding_window=8)
    if name == "gemma2_hd256":
        return T.Gemma2Config(**common, hidden_size=256, intermediate_size=512,
                              num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=256, query_pre_attn_scalar=256,
                              attn_logit_softcapping=50.0, sliding_window=100)
    if name == "gemma3":
        rope = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        return T.Gemma3TextConfig(**common, hidden_size=48, intermediate_size=96,
                                  num_hidden_layers=5, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                                  sliding_window=8, sliding_window_pattern=3,
                                  rope_parameters=rope)
    if name == "gemma3_hd128":
        return T.Gemma3TextConfig(**common, hidden_size=256, intermediate_size=512,
                                  num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=128, query_pre_attn_scalar=128,
                                  sliding_window=64, sliding_window_pattern=2)
    if name == "olmo2":
        return T.Olmo2Config(**common, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2)
    if name == "olmo2_hd128":
        return T.Olmo2Config(**common, hidden_size=512, intermediate_size=1024,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    raise KeyError(name)


MODELS = ("gemma2", "gemma2_hd256", "gemma3", "gemma3_hd128", "olmo2", "olmo2_hd128")


def _build(name: str, out: pathlib.Path) -> pathlib.Path:
    """Weights ~ N(0, 1.4 / sqrt(hidden)); norm weights 1 + N(0, 0.2) as
    applied (Gemma stores w with the norm applying 1 + w: stored near 0);
    with the tests' tokenizer (tests/gpu_check.sh runs `rjepa-latent parity`
    on these models too)."""
    import torch
    import transformers as T
    cfg = _config(name)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(MODELS.index(name) + 31)
    norm_mean = 0.0 if name.startswith("gemma") else 1.0
    std = 1.4 / cfg.hidden_size ** 0.5
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(norm_mean + 0.2 * noise if "norm" in pname else std * noise)
    model.save_pretrained(out, max_shard_size="2MB")
    make_tokenizer(out / "tokenizer.json")
    return out


def _hf_states(torch, directory: pathlib.Path, seqs: list[np.ndarray], bf16: bool) -> list:
    """Eager attention in both dtypes: Gemma-2's soft-cap has no sdpa path."""
    return _hf_states_with(torch, directory, seqs, bf16, attn="eager")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """name -> (directory, seqs, HF fp32 states, HF bf16 states), once per model."""
    root = tmp_path_factory.mktemp("gpu_families")

    @functools.lru_cache(maxsize=None)
    def get(name: str) -> tuple:
        torch = _require_gpu()
        d = _build(name, root / name)
        seqs = _seqs(np.random.default_rng(), LENS)
        return (d, seqs, _hf_states(torch, d, seqs, bf16=False),
                _hf_states(torch, d, seqs, bf16=True))
    return get


@pytest.mark.parametrize("attn", ["mma", "fma"])
@pytest.mark.parametrize("name", MODELS)
def test_parity_with_hf_bf16(reference, name, attn, monkeypatch):
    _require_gpu()
    import rjepa_latent as rl
    d, seqs, ref, hf16 = reference(name)
    set_attention(monkeypatch, attn)
    gpu = rl.Model(d, device="cuda:0")
    assert gpu.kernel.endswith(f"attention {attn}"), gpu.kernel
    ours = [gpu.hidden_states(s) for s in seqs]
    gpu.close()
    assert all(np.isfinite(o).all() for o in ours), "non-finite hidden states"
    e_ours, e_hf = _rel_per_layer(ours, ref), _rel_per_layer(hf16, ref)
    table = "\n".join(f"  layer {k}: ours {a:.3e}  hf-bf16 {b:.3e}"
                      for k, (a, b) in enumerate(zip(e_ours, e_hf)))
    print(f"\n{name}-{attn}\n{table}")   # gpu_check.sh's summary (see test_gpu_model.py)
    assert (e_ours <= SLACK * e_hf + 1e-7).all(), f"{name}: bf16 error above HF's:\n{table}"


@pytest.mark.parametrize("name", MODELS)
def test_parity_with_hf_fp32(reference, name):
    _require_gpu()
    import rjepa_latent as rl
    d, seqs, ref, _ = reference(name)
    gpu = rl.Model(d, device="cuda:0", dtype="float32")
    ours = [gpu.hidden_states(s) for s in seqs]
    gpu.close()
    assert all(np.isfinite(o).all() for o in ours), "non-finite hidden states"
    e_gpu = _rel_per_layer(ours, ref)
    # "fp32 <name>": a line gpu_check.sh's summary picks up (worst layer)
    print(f"\nfp32 {name}: worst layer cuda {e_gpu.max():.3e}\n" +
          "\n".join(f"  L{k}: cuda-fp32 {e:.3e}" for k, e in enumerate(e_gpu)))
    assert (e_gpu <= FP32_REL).all(), f"{name}: CUDA fp32 vs HF fp32 on GPU: {e_gpu}"
